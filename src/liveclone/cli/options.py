"""Options and helpers shared by several commands."""

from __future__ import annotations

import errno
import os
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from liveclone.errors import TargetError, UsageError
from liveclone.units import parse_size

F = TypeVar("F", bound=Callable[..., Any])


class SizeType(click.ParamType[int, Any]):
    """A byte count with an optional binary suffix: 4096, 64K, 64M, 2G."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value, param.name if param and param.name else "size")
        except UsageError as e:
            self.fail(e.message, param, ctx)


SIZE = SizeType()


def region_size_option(f: F) -> F:
    return click.option(
        "--region-size", type=SIZE, default=None,
        help="Tracking granularity, a power of two from 4K to 1G (default 64K; "
             "a resumed clone keeps its own).",
    )(f)


def rate_option(f: F) -> F:
    return click.option(
        "--rate", type=SIZE, default=None,
        help="Limit the background copy to this many bytes per second (e.g. 100M).",
    )(f)


def copy_on_read_option(f: F) -> F:
    return click.option(
        "--copy-on-read/--no-copy-on-read", default=None,
        help="Keep what guests read in the clone, so the source is read once "
             "(default: on for remote sources, off for local files).",
    )(f)


def check_mountpoint(mountpoint: str) -> None:
    """Refuse a mount point FUSE cannot use, before anything is created: a missing
    or unwritable directory (TargetError, exit 9), a file, a live or stale mount
    (UsageError, exit 2)."""
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise TargetError(f"mount point {mountpoint} does not exist: create it first "
                          f"(mkdir -p {mountpoint})") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise UsageError(f"{mountpoint} is a stale FUSE mount (its process died); "
                             f"run `fusermount3 -u -z {mountpoint}` and retry") from None
        raise TargetError(f"mount point {mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mount point {mountpoint} is not a directory: give a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is already a mount point: stop the process serving "
                         f"it, or if that process died, run `fusermount3 -u -z {mountpoint}`")
    if not os.access(mountpoint, os.W_OK | os.X_OK):
        raise TargetError(f"cannot mount on {mountpoint}: no write permission there; "
                          "choose a directory you own")


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT, SIGTERM or SIGHUP while the block runs; the number is
    kept in ``event.signum`` so the command can exit with 128+signum."""
    stop = threading.Event()
    old = {}

    def handler(signum: int, frame: object) -> None:
        stop.signum = signum  # type: ignore[attr-defined]
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        old[sig] = signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
