"""``liveclone pause`` and ``liveclone resume``: stop and restart the background copy.

The request is the file ``CLONE.lcpause`` (see ``liveclone.session``): it reaches a
running process within half a second and stays for the next one, like a paused
block job. Guests are not paused; only the copier is.
"""

from __future__ import annotations

import os

import click

from liveclone.cli.clones import api_option, daemon_for
from liveclone.core.metadata import MapStore
from liveclone.session import pause_path


def _check_clone(clone_path: str) -> bool:
    """Raise the usual error if CLONE is not a clone; True if it is complete."""
    _, rmap = MapStore.read(os.path.abspath(clone_path))
    return rmap.complete


@click.command("pause")
@click.argument("clone_path", metavar="CLONE")
@api_option
def pause(clone_path: str, api: str | None) -> None:
    """Pause the background copy of CLONE (guests keep running). CLONE is a clone
    file, or the name of a daemon's clone."""
    daemon = daemon_for(clone_path, api)
    if daemon is not None:
        phase = daemon.pause(clone_path)["status"]["phase"]
        click.echo(f"liveclone: paused the copy of {clone_path} ({phase}); `liveclone "
                   f"resume {clone_path}` continues it", err=True)
        return
    if _check_clone(clone_path):
        click.echo(f"liveclone: {clone_path} is complete: nothing to pause", err=True)
        return
    with open(pause_path(clone_path), "w") as f:
        f.write("paused by `liveclone pause`; `liveclone resume` removes this file\n")
    click.echo(f"liveclone: paused the copy of {clone_path}; `liveclone resume "
               f"{clone_path}` continues it", err=True)


@click.command("resume")
@click.argument("clone_path", metavar="CLONE")
@api_option
def resume(clone_path: str, api: str | None) -> None:
    """Resume the background copy of CLONE after `liveclone pause`. CLONE is a clone
    file, or the name of a daemon's clone."""
    daemon = daemon_for(clone_path, api)
    if daemon is not None:
        phase = daemon.resume(clone_path)["status"]["phase"]
        click.echo(f"liveclone: resumed the copy of {clone_path} ({phase})", err=True)
        return
    _check_clone(clone_path)
    try:
        os.unlink(pause_path(clone_path))
    except FileNotFoundError:
        click.echo(f"liveclone: {clone_path} was not paused", err=True)
        return
    click.echo(f"liveclone: resumed the copy of {clone_path}", err=True)
