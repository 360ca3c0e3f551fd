"""``liveclone clone``: create or resume a clone and fill it to the end."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from liveclone.cli.options import (
    profile_options,
    rate_option,
    region_size_option,
    stop_on_signals,
)
from liveclone.cli.progress import transfer_progress
from liveclone.core.copier import Phase
from liveclone.core.profile import ProfileOptions
from liveclone.errors import CloneFailedError
from liveclone.session import CloneSession
from liveclone.units import format_size


@click.command("clone")
@click.argument("source")
@click.argument("clone_path", metavar="CLONE")
@region_size_option
@rate_option
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: when stderr is a terminal).")
@profile_options(record=False)
def command(source: str, clone_path: str, region_size: int | None, rate: int | None,
            progress: bool | None, profile: ProfileOptions) -> None:
    """Clone SOURCE into CLONE, resuming if CLONE is a clone already.

    Exits 0 when the copy is complete. Ctrl-C or SIGTERM commits the map and
    stops (exit 130 or 143); the same command resumes.
    """
    if progress is None:
        progress = sys.stderr.isatty()
    with stop_on_signals() as stop:
        session = CloneSession(source, clone_path, region_size, rate, persistent=False,
                               profile=profile).start()
        try:
            step = _waiter(session)
            if progress:
                _with_progress(session, step, stop)
            else:
                while not step() and not stop.is_set():
                    pass
        finally:
            session.close()
    clone = session.clone
    if clone.failure is not None:
        raise CloneFailedError(clone.failure)
    if session.copier.error is not None:
        raise session.copier.error
    if stop.is_set():
        click.echo(
            f"liveclone: interrupted at {clone.regions_present}/{clone.regions_total} "
            f"regions; the map is committed. Run the same command to resume.", err=True)
        sys.exit(128 + getattr(stop, "signum", 2))
    if session.copier.phase != Phase.COMPLETE:
        raise AssertionError("copier stopped without completing or failing")
    click.echo(f"liveclone: {clone.path} complete ({format_size(clone.size)}, "
               f"{format_size(clone.stats.bytes_copied)} copied)", err=True)


def _waiter(session: CloneSession) -> Callable[[], bool]:
    """A step that waits a moment for the copy to end (True when it has), and says
    when the copy gets paused or resumed by `liveclone pause` / `resume`."""
    paused = False
    path = session.clone.path

    def step() -> bool:
        nonlocal paused
        if session.copier.paused != paused:
            paused = not paused
            click.echo(f"liveclone: the copy is paused; `liveclone resume {path}` continues "
                       "it" if paused else "liveclone: the copy resumed", err=True)
        return session.wait(0.2)

    return step


def _with_progress(session: CloneSession, step: Callable[[], bool], stop: object) -> None:
    clone = session.clone
    with transfer_progress("cloning", transient=False) as bar:
        task = bar.add_task("clone", total=clone.size)
        while True:
            done = step()
            bar.update(task, completed=min(clone.regions_present * clone.region_size,
                                           clone.size))
            if done or stop.is_set():  # type: ignore[attr-defined]
                return
