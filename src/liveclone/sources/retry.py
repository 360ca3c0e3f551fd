"""Retrying a remote source's requests: exponential back-off inside a bounded budget.

A remote source wraps each request in ``Retrier.call``. A ``TransientError``
(connection refused or reset, a timeout, a 5xx answer) is retried after a
growing pause, until either ``tries`` attempts or ``budget`` seconds are spent;
then the request fails with ``OSError(EIO, message)``, which the clone turns
into EIO for a guest read and the copier reports and retries later. Any other
exception is not retried: it means the request itself is wrong (a 404, a source
that changed), and retrying would only hide that.

The retrier's state is meant for ``status``: ``retrying`` counts requests now
waiting to try again, ``last_error`` is the newest failure, ``failures`` and
``recoveries`` count failed attempts and requests that succeeded after one.
"""

from __future__ import annotations

import abc
import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from liveclone.errors import SourceError, UsageError
from liveclone.sources.base import Source

T = TypeVar("T")


class TransientError(Exception):
    """A failure that may go away if the same request is tried again later."""


def _env_budget(default: float) -> float:
    raw = os.environ.get("LIVECLONE_RETRY_BUDGET")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"LIVECLONE_RETRY_BUDGET={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise UsageError("LIVECLONE_RETRY_BUDGET must be a positive number of seconds")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one request tries: at most ``tries`` attempts within ``budget`` seconds,
    pausing ``first_delay`` and then twice as long each time, never above ``max_delay``."""

    tries: int = 8
    # Seconds one request may spend retrying; LIVECLONE_RETRY_BUDGET overrides it
    # (how long a guest read that needs a dead source waits before EIO).
    budget: float = field(default_factory=lambda: _env_budget(30.0))
    first_delay: float = 0.1
    max_delay: float = 4.0

    def delay(self, attempt: int) -> float:
        """The pause after failed attempt number ``attempt`` (1-based)."""
        return min(self.max_delay, self.first_delay * 2.0 ** (attempt - 1))


class Retrier:
    """Runs requests under a ``RetryPolicy``; thread-safe, one per source."""

    def __init__(self, what: str, policy: RetryPolicy | None = None,
                 sleep: Callable[[float], Any] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what  # names the source in messages: "HTTP source https://..."
        self.policy = policy or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        # --- guarded by _lock --------------------------------------------------
        self.retrying = 0  # requests now between a failed attempt and the next one
        self.last_error: str | None = None  # newest failed attempt, kept after recovery
        self.failures = 0  # failed attempts, all requests together
        self.recoveries = 0  # requests that succeeded after failing at least once
        # --- end ---------------------------------------------------------------

    def call(self, fn: Callable[[], T], request: str,
             before_retry: Callable[[], None] | None = None,
             policy: RetryPolicy | None = None) -> T:
        """Return ``fn()``, trying again on ``TransientError``.

        ``before_retry`` runs before each new attempt (for example to restart a
        dead child process). When the budget is spent, raise ``OSError(EIO)``
        naming the request, the last error and how long it was tried.
        """
        policy = policy or self.policy
        start = self._clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                if attempt > 1 and before_retry is not None:
                    before_retry()
                result = fn()
            except TransientError as e:
                elapsed = self._clock() - start
                pause = policy.delay(attempt)
                with self._lock:
                    self.failures += 1
                    self.last_error = f"{request}: {e}"
                    give_up = attempt >= policy.tries or elapsed + pause > policy.budget
                if give_up:
                    raise OSError(
                        errno.EIO,
                        f"{self.what}: {request} failed {attempt} times in {elapsed:.1f}s, "
                        f"last: {e}. Check that the source is reachable; liveclone resumes "
                        "where it stopped when run again",
                    ) from e
                with self._lock:
                    self.retrying += 1
                try:
                    self._sleep(pause)
                finally:
                    with self._lock:
                        self.retrying -= 1
                continue
            if attempt > 1:
                with self._lock:
                    self.recoveries += 1
            return result

    def status(self) -> dict[str, Any]:
        """The retry state, for ``liveclone status``."""
        with self._lock:
            return {
                "retrying": self.retrying,
                "failures": self.failures,
                "recoveries": self.recoveries,
                "last_error": self.last_error,
            }


class RemoteSource(Source):
    """A source whose reads are requests that may fail for a while (HTTP, S3, NBD).

    Subclasses set ``spec``, ``size`` and ``retrier`` and implement ``_read_once``,
    one attempt that raises ``TransientError`` for failures worth retrying. A
    ``SourceError`` from it (a changed or vanished image) is not retried: the
    reader gets ``OSError(EIO)`` carrying its message.
    """

    retrier: Retrier

    @abc.abstractmethod
    def _read_once(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``, inside the image, in one attempt."""

    def _before_retry(self) -> None:
        """Runs before a read is tried again (reconnect, restart a child process...)."""

    def pread(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if end <= offset:
            return bytes(max(length, 0))
        try:
            data = self.retrier.call(lambda: self._read_once(offset, end - offset),
                                     f"reading {end - offset} bytes at {offset}",
                                     before_retry=self._before_retry)
        except SourceError as e:
            raise OSError(errno.EIO, e.message) from e
        return data + bytes(length - len(data)) if len(data) < length else data

    def status(self) -> dict[str, Any]:
        return self.retrier.status()
