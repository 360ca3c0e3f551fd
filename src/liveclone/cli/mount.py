"""``liveclone mount``: show a clone as a regular file to any program while it copies."""

from __future__ import annotations

import sys

import click

from liveclone.cli.options import (
    copy_on_read_option,
    profile_options,
    rate_option,
    region_size_option,
    stop_on_signals,
)
from liveclone.core.profile import ProfileOptions
from liveclone.mountpoint import check_mountpoint
from liveclone.session import CloneSession


@click.command("mount")
@click.argument("source")
@click.argument("clone_path", metavar="CLONE")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@region_size_option
@rate_option
@copy_on_read_option
@click.option("--read-only", is_flag=True, help="Refuse writes to the mounted file.")
@click.option("--allow-other", is_flag=True,
              help="Let other users open the file (needs user_allow_other in /etc/fuse.conf "
                   "unless run as root).")
@profile_options(record=True)
def command(source: str, clone_path: str, mountpoint: str, region_size: int | None,
            rate: int | None, copy_on_read: bool | None, read_only: bool,
            allow_other: bool, profile: ProfileOptions) -> None:
    """Mount CLONE (created from SOURCE, or resumed) as the file MOUNTPOINT/<CLONE's name>.

    Reads of regions not copied yet come from SOURCE, writes go to CLONE, and the
    background copy continues. Prints the file's path on stdout once it is usable.
    Ctrl-C or SIGTERM unmounts and commits the map (exit 130 or 143); the same
    command resumes. `fusermount3 -u MOUNTPOINT` also ends it (exit 0).
    """
    from liveclone.fuse import start_mount

    check_mountpoint(mountpoint)  # before the clone is created: a failed start leaves nothing
    with stop_on_signals() as stop:
        session = CloneSession(source, clone_path, region_size, rate,
                               copy_on_read=copy_on_read, profile=profile).start()
        try:
            handle = start_mount(session.clone, mountpoint, read_only=read_only,
                                 allow_other=allow_other)
            session.extra_status["mount"] = handle.path
            try:
                click.echo(handle.path)
                sys.stdout.flush()
                while not stop.is_set() and not handle.wait(0.2):
                    pass
            finally:
                handle.stop()
        finally:
            session.close()
    clone = session.clone
    done = f"{clone.regions_present}/{clone.regions_total} regions copied"
    if stop.is_set():
        click.echo(f"liveclone: unmounted {mountpoint} ({done}); the map is committed.",
                   err=True)
        sys.exit(128 + getattr(stop, "signum", 2))
    click.echo(f"liveclone: {mountpoint} was unmounted ({done}).", err=True)
