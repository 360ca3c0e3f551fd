"""``liveclone clone``: create or resume a clone and fill it to the end."""

from __future__ import annotations

import sys

import click

from liveclone.cli.options import rate_option, region_size_option, stop_on_signals
from liveclone.core.copier import Phase
from liveclone.session import CloneSession
from liveclone.units import format_size


@click.command("clone")
@click.argument("source")
@click.argument("clone_path", metavar="CLONE")
@region_size_option
@rate_option
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: when stderr is a terminal).")
def command(source: str, clone_path: str, region_size: int | None, rate: int | None,
            progress: bool | None) -> None:
    """Clone SOURCE into CLONE, resuming if CLONE is a clone already.

    Exits 0 when the copy is complete. Ctrl-C or SIGTERM commits the map and
    stops (exit 130 or 143); the same command resumes.
    """
    if progress is None:
        progress = sys.stderr.isatty()
    with stop_on_signals() as stop:
        session = CloneSession(source, clone_path, region_size, rate, persistent=False).start()
        try:
            if progress:
                _with_progress(session, stop)
            else:
                while not session.wait(0.2) and not stop.is_set():
                    pass
        finally:
            session.close()
    clone = session.clone
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


def _with_progress(session: CloneSession, stop: object) -> None:
    # Imported here: rich takes tens of milliseconds to import, and only a terminal
    # needs it.
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    clone = session.clone
    columns = (TextColumn("[bold]cloning"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("clone", total=clone.size)
        while True:
            done = session.wait(0.2)
            bar.update(task, completed=min(clone.regions_present * clone.region_size,
                                           clone.size))
            if done or stop.is_set():  # type: ignore[attr-defined]
                return
