"""The copier's rate limit: a token bucket with an injectable clock.

``RateLimiter(rate).take(nbytes, stop)`` is called once ``nbytes`` went by (the
copier calls it after each batch). It waits until every byte taken before has had
its time at ``rate`` bytes a second, then books the next ``nbytes / rate`` seconds
for these bytes, so the long-run rate stays at or under ``rate``. The schedule is
shared by all threads: concurrent takers split the rate between them, in the order
they took. The first take after the limiter was made, or after it sat idle, does
not wait: a burst of one take, never more, since idle time is not saved up. A take
of nothing neither waits nor books anything.

The clock and the sleep are parameters so tests can run on a fake clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: ``sleep(seconds, stop)``: wait that long, or less once ``stop`` is set.
Sleep = Callable[[float, threading.Event], object]


def _wait(seconds: float, stop: threading.Event) -> None:
    stop.wait(seconds)


class RateLimiter:
    """Token bucket: ``take(n)`` sleeps so the long-run rate stays under ``rate``."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Sleep | None = None) -> None:
        """``rate``: bytes a second, above 0. ``clock``: monotonic seconds.
        ``sleep``: how to wait; by default ``stop.wait(seconds)``, so that setting
        the take's stop event ends the wait at once."""
        if not rate > 0:
            raise ValueError(f"rate must be above 0 bytes a second, not {rate!r}")
        self.rate = rate  # bytes per second
        self._clock = clock
        self._sleep: Sleep = sleep if sleep is not None else _wait
        self._lock = threading.Lock()
        # --- guarded by _lock ----------------------------------------------------
        # Invariant: _next is when the bytes booked so far are all due; the next
        # take waits until then and books its bytes from max(_next, now) on.
        self._next = clock()

    def due(self) -> float:
        """When every byte booked so far is due, on the limiter's clock. A taker that
        starts its next bytes no sooner (as ``take`` makes its caller wait) keeps
        the rate; the daemon's copier pool starts no batch before then."""
        with self._lock:
            return self._next

    def take(self, nbytes: int, stop: threading.Event) -> None:
        """Book ``nbytes`` and wait until the bytes booked before them are due,
        unless ``stop`` is set first. The booking stands if the wait is cut short."""
        if nbytes < 0:
            raise ValueError(f"cannot take {nbytes} bytes")
        if nbytes == 0:
            return
        with self._lock:
            now = self._clock()
            start = max(self._next, now)
            self._next = start + nbytes / self.rate
            delay = start - now
        if delay > 0:
            self._sleep(delay, stop)
