"""The daemon's copiers: one total rate for all of them, shared fairly.

``CopierPool(max_copiers, rate)`` is what every clone's copier is started through.
The total rate is one ``RateLimiter`` whose schedule every copier books its
batches on, in the order they finish them: each gets its turn, so the rate is
shared between the clones that copy, and a clone's own rate (``"rate"`` in its
POST) is kept as well. A batch is at most a quarter second of the total, so no
clone holds the rate for long.
"""

from __future__ import annotations

import threading
from typing import Any

from liveclone.core.copier import Copier
from liveclone.core.ratelimit import RateLimiter


class _Limits:
    """A clone's own rate and the daemon's total, both kept."""

    def __init__(self, *limiters: RateLimiter) -> None:
        self.limiters = limiters
        self.rate = min(limiter.rate for limiter in limiters)

    def take(self, nbytes: int, stop: threading.Event) -> None:
        for limiter in self.limiters:
            limiter.take(nbytes, stop)


class CopierPool:
    """Starts and stops the daemon's copiers under one total rate."""

    def __init__(self, max_copiers: int, rate: float | None = None) -> None:
        if max_copiers < 1:
            raise ValueError("max_copiers must be at least 1")
        self.max_copiers = max_copiers
        self.total = RateLimiter(rate) if rate else None
        self._lock = threading.Lock()
        self._copiers: set[Copier] = set()

    def start(self, copier: Copier) -> None:
        """Start ``copier`` under the pool's limits."""
        if self.total is not None:
            own = copier.limiter
            copier.limiter = _Limits(own, self.total) if own else self.total  # type: ignore[assignment]
            region = copier.clone.region_size
            copier.batch_regions = max(1, min(copier.batch_regions * region,
                                              int(self.total.rate) // 4) // region)
        copier.workers = min(copier.workers, self.max_copiers, 1)
        with self._lock:
            self._copiers.add(copier)
        copier.start()

    def stop(self, copier: Copier) -> None:
        copier.stop()
        with self._lock:
            self._copiers.discard(copier)

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._copiers)

    def close(self) -> None:
        with self._lock:
            copiers = list(self._copiers)
        for copier in copiers:
            self.stop(copier)

    def status(self) -> dict[str, Any]:
        return {"max_copiers": self.max_copiers,
                "rate": self.total.rate if self.total is not None else None,
                "copiers": self.running}
