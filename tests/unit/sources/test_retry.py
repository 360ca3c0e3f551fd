"""The retry helper: back-off, the bounded budget, permanent errors, observable state."""

from __future__ import annotations

import errno
import threading

import pytest

from liveclone.errors import SourceError
from liveclone.sources.retry import Retrier, RetryPolicy, TransientError


class FakeClock:
    """Time that moves only when the retrier sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def flaky(failures: int, result: str = "ok") -> tuple[list[int], object]:
    calls = [0]

    def fn() -> str:
        calls[0] += 1
        if calls[0] <= failures:
            raise TransientError(f"refused #{calls[0]}")
        return result

    return calls, fn


def test_recovers_after_transient_failures_with_growing_pauses() -> None:
    clock = FakeClock()
    r = Retrier("src", RetryPolicy(tries=10, budget=100, first_delay=0.1, max_delay=1.0),
                sleep=clock.sleep, clock=clock)
    calls, fn = flaky(5)
    assert r.call(fn, "reading") == "ok"  # type: ignore[arg-type]
    assert calls[0] == 6
    assert clock.sleeps == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert r.status() == {"retrying": 0, "failures": 5, "recoveries": 1,
                          "last_error": "reading: refused #5"}


def test_gives_up_after_tries_with_eio() -> None:
    clock = FakeClock()
    r = Retrier("HTTP source x", RetryPolicy(tries=3, budget=100), sleep=clock.sleep,
                clock=clock)
    calls, fn = flaky(100)
    with pytest.raises(OSError) as info:
        r.call(fn, "reading 4 bytes at 0")  # type: ignore[arg-type]
    assert info.value.errno == errno.EIO
    msg = str(info.value)
    assert "HTTP source x" in msg and "reading 4 bytes at 0 failed 3 times" in msg
    assert "refused #3" in msg and "reachable" in msg
    assert calls[0] == 3 and len(clock.sleeps) == 2


def test_gives_up_when_budget_is_spent() -> None:
    clock = FakeClock()
    r = Retrier("s", RetryPolicy(tries=100, budget=1.0, first_delay=0.3, max_delay=10),
                sleep=clock.sleep, clock=clock)
    calls, fn = flaky(100)
    with pytest.raises(OSError):
        r.call(fn, "x")  # type: ignore[arg-type]
    # 0.3 then 0.6 fit in a second of budget; the next 1.2 would not.
    assert clock.sleeps == [0.3, 0.6]
    assert calls[0] == 3


def test_permanent_errors_are_not_retried() -> None:
    clock = FakeClock()
    r = Retrier("s", sleep=clock.sleep, clock=clock)
    calls = [0]

    def fn() -> None:
        calls[0] += 1
        raise SourceError("404")

    with pytest.raises(SourceError):
        r.call(fn, "x")
    assert calls[0] == 1 and clock.sleeps == [] and r.failures == 0


def test_before_retry_runs_between_attempts_and_may_fail_transiently() -> None:
    clock = FakeClock()
    r = Retrier("s", RetryPolicy(tries=5, budget=100), sleep=clock.sleep, clock=clock)
    restarts = [0]

    def restart() -> None:
        restarts[0] += 1
        if restarts[0] == 1:
            raise TransientError("restart failed")

    calls, fn = flaky(1)
    assert r.call(fn, "x", before_retry=restart) == "ok"  # type: ignore[arg-type]
    assert restarts[0] == 2 and calls[0] == 2
    assert r.failures == 2 and r.last_error == "x: restart failed"


def test_retrying_counts_waiting_requests() -> None:
    release = threading.Event()
    entered = threading.Event()
    r = Retrier("s", RetryPolicy(tries=2, budget=100),
                sleep=lambda s: (entered.set(), release.wait()))
    calls, fn = flaky(1)
    t = threading.Thread(target=r.call, args=(fn, "x"))
    t.start()
    assert entered.wait(10)
    assert r.status()["retrying"] == 1
    release.set()
    t.join()
    assert r.status()["retrying"] == 0 and r.recoveries == 1
