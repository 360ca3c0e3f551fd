"""Options and helpers shared by several commands."""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from liveclone.errors import UsageError
from liveclone.nbd.limits import DEFAULT_POLL_MAX_NS
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


def poll_option(f: F) -> F:
    """``--poll-max-ns``, of every command that runs an NBD server."""
    return click.option(
        "--poll-max-ns", type=click.IntRange(min=0), default=DEFAULT_POLL_MAX_NS,
        show_default=True, metavar="NS",
        help="When it has nothing left to do, the server polls its clients for their "
             "next request for up to NS nanoseconds before it sleeps, adapting to how "
             "fast they send (QEMU's poll-max-ns). Requests sent one at a time are "
             "answered sooner, for CPU spent only while a client keeps sending. "
             "0: never poll.",
    )(f)


def copy_on_read_option(f: F) -> F:
    return click.option(
        "--copy-on-read/--no-copy-on-read", default=None,
        help="Keep what guests read in the clone, so the source is read once "
             "(default: on for remote sources, off for local files).",
    )(f)


def profile_options(record: bool) -> Callable[[F], F]:
    """Boot profile options (``core.profile``), handed to the command as one
    ``profile: ProfileOptions`` argument. ``record``: the command runs guests, so it
    records a profile too (``--save-profile``, ``--profile-time``, ``--profile-idle``).
    The profile to replay is read here, before any clone is created."""

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def command(*args: Any, **kw: Any) -> Any:
            from liveclone.core.profile import ProfileOptions, load

            path = kw.pop("profile_file")
            options = ProfileOptions(
                replay=load(path) if path is not None else None,
                replay_bytes=kw.pop("replay_max"), replay_time=kw.pop("replay_time"),
                record=record and kw.get("profile_time", 0) > 0,
                save_to=kw.pop("save_profile", None),
                record_time=kw.pop("profile_time", 0.0),
                record_idle=kw.pop("profile_idle", 0.0))
            return f(*args, profile=options, **kw)

        options = [
            click.option("--profile", "profile_file", type=click.Path(dir_okay=False),
                         default=None,
                         help="Replay this boot profile: copy the regions it lists first, in "
                              "its order (after reads a guest waits for). It must have been "
                              "recorded for this source."),
            click.option("--replay-max", type=SIZE, default="2G", show_default=True,
                         help="Replay at most this many bytes of the profile."),
            click.option("--replay-time", type=click.FloatRange(min=0), default=300.0,
                         show_default=True, metavar="SECONDS",
                         help="Stop replaying the profile this long after the copy starts."),
        ]
        if record:
            options += [
                click.option("--save-profile", type=click.Path(dir_okay=False), default=None,
                             help="Save the recorded boot profile here (default: "
                                  "CLONE.lcprofile)."),
                click.option("--profile-time", type=click.FloatRange(min=0), default=120.0,
                             show_default=True, metavar="SECONDS",
                             help="Record which regions guests read for this long after "
                                  "their first read (0: do not record)."),
                click.option("--profile-idle", type=click.FloatRange(min=0), default=10.0,
                             show_default=True, metavar="SECONDS",
                             help="End the recording once guests read no new region for "
                                  "this long."),
            ]
        for option in reversed(options):
            command = option(command)
        return command  # type: ignore[return-value]

    return decorate


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
