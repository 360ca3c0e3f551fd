"""Adaptive polling: wait for a client's next request awake, a few microseconds.

A client that sends one request at a time (a VM at queue depth 1, ``fio
--iodepth=1``) leaves the server idle between an answer and the next request.
When the event loop sleeps in that gap, each request must first wake its thread:
on a virtual machine, an interrupt to a halted vCPU that costs tens of
microseconds, as much as the rest of the request. So when the server has nothing
left to do, it first polls its clients' sockets without sleeping, for up to
``ns`` nanoseconds, and only then gives the loop back to sleep. The next request
then finds the thread running.

How long to poll adapts as QEMU's event loop does (its IOThread ``poll-max-ns``):
``ns`` starts at 0; a wait that ended within ``max_ns`` doubles it (from
``GROW_FROM``), up to ``max_ns``; a wait longer than ``max_ns`` halves it. So a
client that keeps the server waiting longer than that (an idle or slow one) costs
no polling, and a busy one at queue depth 1 gets its requests polled for.

A connection with a lane polls through ``Lane.serve`` and answers its client's
plain requests from the poll itself (``_Connection._serve_in_lane``).

Measured (benchmarks/results.md, "NBD export"; benchmarks/poll_bench.py): 4 KiB
random reads at queue depth 1 went from 13.7k IOPS to about 23k with polling
alone, and to about 40k with the poll answering; it costs CPU only while a client
keeps sending within ``max_ns``, as polling does in QEMU and SPDK.

Polling runs in C without the GIL (``lc_poll``, ``lc_serve`` in ``lane.c``), so
other threads keep running; without the compiled module there is no polling. The
loop's other work (timers, callbacks from threads) waits at most ``max_ns`` for a
poll to end, or ``SERVE_BUDGET`` (nbd/server.py) while a poll answers a client.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from liveclone.nbd import lane
from liveclone.nbd.limits import DEFAULT_POLL_MAX_NS

GROW_FROM = 4_000  # the first poll after none: QEMU's
_POLLIN = 0x001
# Poll (a struct pollfd array, how many, which is the caller's, for how long);
# True if nothing came.
Serve = Callable[[Any, int, int, int], bool]


class Poller:
    """The server's polling: which sockets to poll, and for how long now.

    Invariant: ``ns`` is 0 or between ``GROW_FROM`` and ``max_ns``; ``_since`` is
    when a poll last ran out (0: the last wait ended in a poll, or none is
    measured), so that the next ``woke`` knows how long the server waited.
    """

    def __init__(self, max_ns: int = DEFAULT_POLL_MAX_NS) -> None:
        if max_ns < 0:
            raise ValueError("the most time to poll must not be negative")
        self.max_ns = max_ns if lane.poll_available() else 0
        self.ns = 0
        self._since = 0
        self._fds: dict[int, int] = {}  # fd -> watches not yet forgotten
        self._array: Any = None  # struct pollfd[] of _fds; None: to be made again
        self._index: dict[int, int] = {}  # fd -> its place in _array

    def watch(self, fd: int) -> None:
        """Poll ``fd`` (a client's socket) from now on: once for each ``watch``
        not yet undone by a ``forget`` (a closed socket's number may be reused by
        a new one before its connection is told it is gone)."""
        count = self._fds.get(fd, 0)
        self._fds[fd] = count + 1
        if not count:
            self._array = None

    def forget(self, fd: int) -> None:
        count = self._fds.get(fd, 0)
        if count > 1:
            self._fds[fd] = count - 1
        elif count:
            del self._fds[fd]
            self._array = None

    def woke(self) -> None:
        """A client sent something: adapt ``ns`` to how long the server waited."""
        since = self._since
        if not since:
            return
        self._since = 0
        waited = time.monotonic_ns() - since + self.ns
        if waited <= self.max_ns:
            self.ns = min(self.max_ns, self.ns * 2 if self.ns else GROW_FROM)
        elif self.ns:
            self.ns = self.ns // 2 if self.ns // 2 >= GROW_FROM else 0

    def idle(self, fd: int = -1, serve: Serve | None = None) -> None:
        """The server has nothing left to do: poll before the loop sleeps. With
        ``serve``, the connection of ``fd`` polls, and may answer its client's next
        requests itself meanwhile (``_Connection._serve_in_lane``)."""
        if not self.max_ns or not self._fds:
            return
        if self.ns:
            array = self._array
            if array is None:
                array = self._array = lane.pollfds(self._fds, _POLLIN)
                self._index = {watched: i for i, watched in enumerate(self._fds)}
            index = self._index.get(fd)
            if serve is not None and index is not None:
                if not serve(array, len(self._fds), index, self.ns):
                    return
            elif lane.poll(array, len(self._fds), self.ns) != 0:
                return  # a request came (or poll failed: the loop will see why)
        self._since = time.monotonic_ns()
