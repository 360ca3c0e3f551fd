"""Options and helpers shared by several commands."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from liveclone.errors import UsageError
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
