"""``RateLimiter`` on a fake clock: exact waits, no real sleeping (but for the stop
event, which is about real threads)."""

from __future__ import annotations

import random
import threading

import pytest

from liveclone.core.ratelimit import RateLimiter

RATE = 1000.0  # bytes per second


class FakeClock:
    """Time moves only when someone sleeps; every sleep is recorded."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float, stop: threading.Event) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            if not stop.is_set():
                self.now += seconds


class FrozenClock(FakeClock):
    """Time does not move at all: sleeps are only recorded (for threads)."""

    def sleep(self, seconds: float, stop: threading.Event) -> None:
        with self._lock:
            self.sleeps.append(seconds)


def limiter(clock: FakeClock, rate: float = RATE) -> RateLimiter:
    return RateLimiter(rate, clock=clock, sleep=clock.sleep)


def test_long_run_rate_is_honoured_and_not_undershot() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    stop = threading.Event()
    rng = random.Random(3)
    start, taken = clock.now, 0
    for _ in range(500):
        n = rng.randrange(1, 5000)
        lim.take(n, stop)
        # When a take returns, everything taken before it had its time at RATE...
        assert taken <= RATE * (clock.now - start) + 1e-6
        taken += n
    # ...and no more: a caller that takes without pause goes exactly at RATE, but for
    # the last take, whose time has not come yet.
    assert clock.now - start == pytest.approx((taken - n) / RATE)


def test_the_wait_is_for_the_bytes_taken_before() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    stop = threading.Event()
    for n in (500, 2000, 100, 1):
        lim.take(n, stop)
    assert clock.sleeps == pytest.approx([0.5, 2.0, 0.1])  # the first did not wait


def test_time_spent_elsewhere_counts() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    stop = threading.Event()
    lim.take(1000, stop)  # books one second
    clock.now += 0.75  # the caller copied for 0.75 s
    lim.take(1000, stop)
    assert clock.sleeps == pytest.approx([0.25])


def test_burst_at_start_then_the_rate() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    stop = threading.Event()
    lim.take(10 * int(RATE), stop)  # ten seconds' worth at once: no wait for the first
    assert clock.sleeps == []
    lim.take(1, stop)
    assert clock.sleeps == pytest.approx([10.0])


def test_idle_time_is_not_saved_up() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    stop = threading.Event()
    lim.take(100, stop)
    clock.now += 3600  # an hour idle (a paused copier)
    lim.take(500, stop)  # after idling, one take goes at once, as at the start...
    assert clock.sleeps == []
    lim.take(500, stop)  # ...but no more: the idle hour gave no credit
    assert clock.sleeps == pytest.approx([0.5])


def test_concurrent_takers_share_the_rate() -> None:
    """Threads taking at the same instant get successive slots of one schedule."""
    clock = FrozenClock()
    lim = limiter(clock)
    stop = threading.Event()
    threads, n = 16, 250
    barrier = threading.Barrier(threads)

    def taker() -> None:
        barrier.wait()
        for _ in range(10):
            lim.take(n, stop)

    workers = [threading.Thread(target=taker) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    # 160 takes at one instant: the first goes at once, the k-th waits for the k-1
    # before it, whatever thread each came from.
    assert sorted(clock.sleeps) == pytest.approx([k * n / RATE for k in range(1, 160)])


def test_interleaved_takers_together_stay_under_the_rate() -> None:
    """Two callers of one limiter get the rate between them, not each."""
    clock = FakeClock()
    lim = limiter(clock)
    stop = threading.Event()
    start, taken = clock.now, {"a": 0, "b": 0}
    rng = random.Random(8)
    for _ in range(300):
        who, n = rng.choice("ab"), rng.randrange(1, 3000)
        lim.take(n, stop)
        taken[who] += n
    total = taken["a"] + taken["b"]
    assert clock.now - start == pytest.approx((total - n) / RATE)
    assert clock.now - start > 1.5 * max(taken.values()) / RATE


def test_zero_length_take_neither_waits_nor_books() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    stop = threading.Event()
    lim.take(0, stop)  # on a fresh limiter
    lim.take(1000, stop)
    lim.take(0, stop)  # while a second is booked ahead
    assert clock.sleeps == []
    lim.take(1000, stop)
    assert clock.sleeps == pytest.approx([1.0])  # the zero takes booked nothing


def test_bad_arguments() -> None:
    for rate in (0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            RateLimiter(rate)
    with pytest.raises(ValueError):
        limiter(FakeClock()).take(-1, threading.Event())


def test_stop_set_before_the_take_returns_at_once() -> None:
    """With the default sleep (stop.wait) and a fake clock that asks for an hour."""
    clock = FakeClock()
    lim = RateLimiter(1.0, clock=clock)
    stop = threading.Event()
    lim.take(3600, stop)  # books an hour
    stop.set()
    done = threading.Event()
    t = threading.Thread(target=lambda: (lim.take(1, stop), done.set()), daemon=True)
    t.start()
    t.join(30)  # an hour if stop did not end the wait
    assert done.is_set()


def test_stop_interrupts_a_wait_in_progress() -> None:
    clock = FakeClock()
    lim = RateLimiter(1.0, clock=clock)
    stop = threading.Event()
    lim.take(3600, stop)
    started, done = threading.Event(), threading.Event()

    def taker() -> None:
        started.set()
        lim.take(1, stop)  # waits an hour of real time: stop.wait(3600)
        done.set()

    t = threading.Thread(target=taker, daemon=True)
    t.start()
    assert started.wait(30)
    assert not done.wait(0.05)  # it really is waiting
    stop.set()
    t.join(30)
    assert done.is_set()


def test_a_cut_wait_keeps_its_booking() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    stop = threading.Event()
    lim.take(1000, stop)
    stop.set()
    lim.take(1000, stop)  # asks for 1 s, cut short: the clock does not move
    assert clock.sleeps == pytest.approx([1.0]) and clock.now == 100.0
    lim.take(1000, threading.Event())  # both seconds booked before are still owed
    assert clock.sleeps == pytest.approx([1.0, 2.0])


def test_the_default_clock_and_sleep_are_real() -> None:
    lim = RateLimiter(1 << 30)
    stop = threading.Event()
    for _ in range(3):
        lim.take(1 << 20, stop)  # a millisecond each: returns
