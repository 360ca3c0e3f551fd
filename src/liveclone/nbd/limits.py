"""What a client may make the NBD server spend, and quiet logs when clients push it.

DESIGN invariant 11: every resource a client can make the server spend is bounded.
``Limits`` holds the bounds (``liveclone serve`` options in brackets):

* connections open at once [--max-connections], further lowered to what the
  open-file limit (``ulimit -n``) leaves room for, so accept() never meets EMFILE;
* seconds from connect to a chosen export [--handshake-limit], as qemu-nbd's
  option of that name: a client that never negotiates loses its slot;
* bytes held for clients [--max-memory], in total and per connection: requests
  received and not yet answered (WRITE payloads, partial messages), answers being
  made (READ buffers), and answers queued for a client that does not read.

``LogThrottle`` keeps a hostile client from filling the log: one line per kind of
event per interval, then a count of the ones left out.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Callable

from liveclone.values import Frozen

MiB = 1 << 20
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_HANDSHAKE_LIMIT = 10.0  # seconds, qemu-nbd's default
# 8 connections at QD32 of 1 MiB reads: peak RSS of `serve` (1 TiB clone, copier
# running) 138 MiB at 64 MiB, 329 MiB at 256 MiB, at the same throughput.
DEFAULT_MAX_MEMORY = 64 * MiB
CONNECTION_SHARE = 64 * MiB  # one connection's bound, at most
MIN_MAX_MEMORY = 4 * MiB
# File descriptors kept free for everything but client connections: the clone, its
# map and journal, the source (and its direct-I/O twin), the status file, FUSE, TLS.
FD_RESERVE = 24
# The most nanoseconds the server polls clients before its loop sleeps
# [--poll-max-ns] (nbd/poll.py): CPU it spends only while a client keeps sending.
DEFAULT_POLL_MAX_NS = 128_000


class Limits(Frozen):
    """``handshake_limit``: seconds, 0 for none."""

    __slots__ = ("max_connections", "handshake_limit", "max_memory")
    max_connections: int
    handshake_limit: float
    max_memory: int

    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 handshake_limit: float = DEFAULT_HANDSHAKE_LIMIT,
                 max_memory: int = DEFAULT_MAX_MEMORY) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if handshake_limit < 0:
            raise ValueError("handshake_limit must not be negative")
        if max_memory < MIN_MAX_MEMORY:
            raise ValueError(f"max_memory must be at least {MIN_MAX_MEMORY // MiB} MiB")
        self._init(max_connections, handshake_limit, max_memory)

    @property
    def connection_memory(self) -> int:
        """One connection's bound: a quarter of the total, from 2 MiB to 64 MiB."""
        return max(2 * MiB, min(CONNECTION_SHARE, self.max_memory // 4))

    @property
    def max_block(self) -> int:
        """The largest READ/WRITE to advertise: half a connection's bound (so one
        request of it always fits beside a partial one), at most 32 MiB."""
        block = 32 * MiB
        while block > self.connection_memory // 2:
            block //= 2
        return block


def fd_headroom(reserve: int = FD_RESERVE) -> int | None:
    """How many more descriptors this process may open, less ``reserve``; None if
    there is no soft limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        used = len(os.listdir("/proc/self/fd")) - 1  # less listdir's own descriptor
    except OSError:
        used = 16
    return max(0, soft - used - reserve)


M_MMAP_THRESHOLD = -3  # mallopt(3)
MMAP_THRESHOLD = 4 * MiB
_pinned = False


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc's malloc serve every allocation of ``threshold`` bytes or more
    with its own mmap, returned to the system when freed. By default glibc raises
    that threshold each time such a block is freed (up to 32 MiB), after which
    answer-sized buffers come from the heap and freed ones stay resident: RSS then
    keeps whatever peak the clients once caused instead of the bytes held now.
    Once per process; False where there is no glibc."""
    global _pinned
    if _pinned:
        return True
    import ctypes  # here: not on the way to a server's first answer

    try:
        # The symbols already loaded into this process: libc's among them, found
        # without find_library (which runs ldconfig: milliseconds at every start).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        try:
            from ctypes.util import find_library

            mallopt = ctypes.CDLL(find_library("c") or "libc.so.6").mallopt
        except (OSError, AttributeError):
            return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _pinned = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    return _pinned


class LogThrottle:
    """Log each kind of event at most once per ``interval`` seconds. The first line
    after a quiet spell says how many like it were left out."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def __call__(self, key: str, level: int, msg: str, *args: object) -> bool:
        """Log ``msg % args`` under ``key`` unless one was logged lately; True if logged."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped and last is not None:
            msg += f" ({dropped} more like it in the last {now - last:.0f} s not logged)"
        self.logger.log(level, msg, *args)
        return True
