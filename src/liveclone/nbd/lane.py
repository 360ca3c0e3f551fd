"""The lane: plain READs and WRITEs of present data done in C.

Most of what a VM asks of its disk are READs of data already in the clone and
in the page cache, and WRITEs over data already there. The lane (``lane.c``,
compiled at install through cffi) does a whole batch of them, as the client
pipelined them, in one call that lets the GIL go: it checks each request as
``validate_request``'s own fast path would, checks the present bits of the
regions it touches (and, for a write, that no write intent is due: the same
test as ``Clone.write_nowait``), reads with ``RWF_NOWAIT`` or writes from the
request's own payload, and puts the replies in one buffer that the connection
sends. Every other message, and any request it cannot do at once, goes on to
the protocol layer, in order, as if the lane were not there.

Without the compiled module (no C compiler at install), or with
``LIVECLONE_LANE=0``, there is no lane and the connection answers every request
in Python: the same answers, more slowly. Tests run both ways.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from liveclone.core.clone import LaneState

_ffi: Any = None
_lib: Any = None
try:
    from liveclone.nbd import _lane  # type: ignore[attr-defined]
except ImportError:  # built without a compiler: every request goes through Python
    pass
else:
    _ffi, _lib = _lane.ffi, _lane.lib

ENV = "LIVECLONE_LANE"  # "0": no lane even when it is built
SENDFILE_ENV = "LIVECLONE_SENDFILE"  # "0": large READs are never sent by sendfile
_sendfile_ok = os.environ.get(SENDFILE_ENV, "1") != "0"
# The reply buffer: what one call may answer (a QD32 batch of 4 KiB reads needs
# 132 KiB). Larger reads go through the protocol layer, where each answer has a
# buffer of its own, admitted against the memory limits and sent as it is.
BUFFER = 256 << 10
# What ``serve`` reads of a client at once: a batch of requests at queue depth 1
# is one request; a longer one (a WRITE's payload past it) goes to the event loop.
SERVE_INPUT = 16 << 10


class FileRange:
    """The answer to a READ that the kernel sends from the clone file itself
    (sendfile): ``length`` bytes of ``fd`` at ``offset``. The protocol layer
    takes it as the READ's data (it needs only its length); the connection
    sends it (``_Connection._send_range``)."""

    __slots__ = ("fd", "offset", "length")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length


def sendfile_ok() -> bool:
    """Whether large READs may still go by sendfile: not turned off, and no
    ``sendable`` found yet that the kernel cannot tell what it caches."""
    return _sendfile_ok


def available() -> bool:
    """Whether connections get a lane: built, and not turned off."""
    return _lib is not None and os.environ.get(ENV, "1") != "0"


class Lane:
    """One connection's lane, for one export: its geometry and reply buffer."""

    def __init__(self, fd: int, size: int, max_block: int, structured: bool,
                 region_shift: int, writable: bool) -> None:
        self._writable = writable  # the export takes writes
        self._spec = _ffi.new("struct lc_lane *", {
            "fd": fd, "structured": int(structured), "max_block": max_block,
            "shift": region_shift, "size": size})
        self._alloc = _ffi.new_allocator(should_clear_after_alloc=False)
        self._out: Any = None  # the reply buffer, when the transport holds none of it
        self._done = _ffi.new("struct lc_done *")
        self._in: Any = None  # serve's input buffer, made on first use
        self._served = _ffi.new("struct lc_served *")

    def run(self, data: bytes, state: LaneState, cap: int) -> tuple[Any, Any, bytes]:
        """Do the READs and WRITEs the lane can in ``data``, in at most ``cap``
        bytes of replies, with the clone's ``state`` of now (``Clone.lane``).

        Returns (the reply buffer, what was done: ``struct lc_done``, what the
        protocol layer must be given: every message not answered, in order).
        The caller sends the buffer's first ``done.out_used`` bytes (``view``),
        and calls ``sent(buffer)`` once the transport holds none of them."""
        out = self._take_out()
        rest = self._alloc("uint8_t[]", len(data))
        done = self._done
        with _ffi.from_buffer("uint8_t[]", data) as inp:
            used = self._call(state, _lib.lc_lane, inp, len(data), out, min(cap, BUFFER),
                              rest, done)
        if not (done.reads or done.writes):  # ``rest`` is data up to ``used``
            return out, done, data
        return out, done, _ffi.buffer(rest, done.rest_used)[:] + data[used:]

    def serve(self, state: LaneState, fds: Any, n: int, index: int, ns: int, budget: int,
              cap: int) -> tuple[Any, Any]:
        """Poll the first ``n`` of ``fds`` (``pollfds``) for up to ``ns`` nanoseconds
        as ``poll`` does, and answer from here what this lane's client,
        ``fds[index]``, sends, up to the first message the lane does not answer,
        for at most ``budget`` nanoseconds (``lc_serve`` in lane.c), in at most
        ``cap`` bytes of replies at a time. The caller's connection must be at a
        message boundary with nothing in flight or queued.

        Returns (the reply buffer, ``struct lc_served``): the caller accounts what
        was answered, and sends ``view(out, s.out_used)[s.sent:]`` if the socket
        did not take it all (else ``sent(out)``)."""
        out = self._take_out()
        if self._in is None:
            self._in = self._alloc("uint8_t[]", SERVE_INPUT)
        served = self._served
        self._call(state, _lib.lc_serve, fds, n, index, ns, budget, self._in, SERVE_INPUT,
                   out, min(cap, BUFFER), served)
        return out, served

    def _take_out(self) -> Any:
        out = self._out
        if out is None:  # the last one is still held by the transport
            out = self._alloc("uint8_t[]", BUFFER)
        self._out = None
        return out

    def _call(self, state: LaneState, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(spec, *args)``, the lane's spec pointing at ``state``'s bitmaps
        meanwhile (read without locks: ``Clone.lane`` says why that is safe)."""
        spec = self._spec
        spec.max_write = state.max_write if self._writable else 0
        with _ffi.from_buffer("uint8_t[]", state.marked) as marked:
            spec.marked = marked
            try:
                if state.present is None:
                    return fn(spec, *args)
                with _ffi.from_buffer("uint8_t[]", state.present) as present:
                    spec.present = present
                    return fn(spec, *args)
            finally:
                spec.present = spec.marked = _ffi.NULL

    def sendable(self, state: LaneState, offset: int, length: int) -> FileRange | None:
        """A READ's bytes as a ``FileRange`` of the clone file, when every region
        is present and every page in the page cache (so sending them does not
        wait for the disk); else None. Also None from then on where the kernel
        cannot tell (no cachestat: before Linux 6.5, or refused by a filter)."""
        global _sendfile_ok
        if not _sendfile_ok:
            return None
        ok = self._call(state, _lib.lc_sendable, offset, length)
        if ok < 0:
            _sendfile_ok = False
        return FileRange(state.fd, offset, length) if ok > 0 else None

    def view(self, out: Any, n: int) -> memoryview:
        return memoryview(_ffi.buffer(out, n))

    def sent(self, out: Any) -> None:
        """``out`` went out whole (the transport holds none of it): reuse it."""
        self._out = out


def poll_available() -> bool:
    """Whether ``poll`` can be used (nbd/poll.py): the module is built."""
    return _lib is not None


def pollfds(fds: Iterable[int], events: int) -> Any:
    """A ``struct pollfd`` array of ``fds``, each waiting for ``events``."""
    fds = list(fds)
    array = _ffi.new("struct pollfd[]", len(fds))
    for i, fd in enumerate(fds):
        array[i].fd = fd
        array[i].events = events
    return array


def poll(array: Any, n: int, ns: int) -> int:
    """Poll the first ``n`` of ``array`` without sleeping for up to ``ns``
    nanoseconds, without the GIL: 1 an event came, 0 none, -1 poll(2) failed."""
    return int(_lib.lc_poll(array, n, ns))
