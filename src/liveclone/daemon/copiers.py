"""The daemon's copiers: a bounded pool of threads for every clone's background copy.

A standalone command runs one clone with its own copier threads (three). The
daemon runs many: it would be three threads, and three copy buffers, per clone.
Instead every clone's copier is a ``PooledCopier`` run by one ``CopierPool`` of
``--max-copiers`` threads, so memory grows with the pool, not with the clones.

How a copier runs in the pool. ``Copier._work`` is a loop of ``Copier._turn``:
yield to the guest, take the next batch, copy it, book it on the rate limiter, and
wait where it must (a busy guest, a source error's back-off, a full disk, the
rate). A pooled copier runs one ``_turn`` per ``step``, and never waits in a pool
thread: its stop event is a ``_DeferringStop`` whose ``wait(t)`` returns at once
and records ``t``, and the pool runs that worker again no sooner than ``t`` later. The two
waits that are states rather than pauses (a full disk's look for space with
back-off; a persistent copier's retry of set-aside regions after 30 s) are kept
as deadlines here, with the same messages as the standalone copier.

Sharing. Each copier has ``workers`` slots (three: one clone alone copies as fast
as a standalone one). The pool picks, among slots that are due, the copier that
has copied the fewest bytes (virtual time, as in fair queueing; one that was idle
does not save up credit). ``--rate`` is one ``RateLimiter`` booked by every batch
of every clone, beside the clone's own rate; no batch starts before the bytes
booked on those limiters are due, so the total holds (ahead of it by at most the
batches running at once, a quarter second each) and is shared in turn.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from liveclone.core import copier as copier_mod
from liveclone.core.clone import Clone
from liveclone.core.copier import Copier
from liveclone.core.ratelimit import RateLimiter

# A pooled copier that asks for no wait after a step whose batch took nothing
# runs again after this long (the standalone loop's own pause there is 0.002 s).
MIN_REST = 0.002


class _DeferringStop:
    """A pooled copier's stop event. ``wait(t)`` never blocks (a pool thread is never
    held by one clone): it records the longest ``t`` asked by this thread during
    the step, which the pool then honours before the next step of that worker."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._asked = threading.local()

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()

    def wait(self, timeout: float | None = None) -> bool:
        if timeout:
            self._asked.delay = max(getattr(self._asked, "delay", 0.0), timeout)
        return self._event.is_set()

    def take_delay(self) -> float:
        delay: float = getattr(self._asked, "delay", 0.0)
        self._asked.delay = 0.0
        return delay


class _Meter:
    """A pooled copier's limiter: counts the bytes of each step (for the pool's
    fair share) and books them on the clone's own rate and the daemon's total."""

    def __init__(self, *limiters: RateLimiter | None) -> None:
        self.limiters = [lim for lim in limiters if lim is not None]
        self.rate = min((lim.rate for lim in self.limiters), default=0.0)
        self._counted = threading.local()

    def take(self, nbytes: int, stop: Any) -> None:
        self._counted.n = getattr(self._counted, "n", 0) + nbytes
        for limiter in self.limiters:
            limiter.take(nbytes, stop)  # stop is the deferring one: nothing blocks

    def due(self) -> float:
        """When the bytes booked on these limiters are all due (0: nothing booked)."""
        return max((lim.due() for lim in self.limiters), default=0.0)

    def counted(self) -> int:
        n: int = getattr(self._counted, "n", 0)
        self._counted.n = 0
        return n


class PooledCopier(Copier):
    """A copier whose workers are slots of a ``CopierPool`` (see the module doc)."""

    def __init__(self, clone: Clone, pool: CopierPool, **kwargs: Any) -> None:
        super().__init__(clone, **kwargs)
        self.pool = pool
        self._stop: _DeferringStop = _DeferringStop()  # type: ignore[assignment]
        total = pool.total
        if total is not None:  # a batch is at most a quarter second of the total
            self.batch_regions = max(1, min(self.batch_regions * clone.region_size,
                                            int(total.rate) // 4) // clone.region_size)
        self.meter = _Meter(self.limiter, total)
        self.limiter = self.meter  # type: ignore[assignment]
        # Waits that are states (see the module doc); guarded by _lock.
        self._space: tuple[int, int] | None = None  # the batch that found no space
        self._space_delay = 0.5
        self._space_at = 0.0  # when to look for space again
        self._aside_at: float | None = None  # when to retry set-aside regions

    # -- control: the pool instead of threads ------------------------------------------

    def start(self) -> PooledCopier:
        self.started = time.monotonic()
        self.pool.add(self)
        return self

    def resume(self) -> None:
        super().resume()
        self.pool.wake()

    def stop(self) -> None:
        """Stop after the steps running now; blocks until they are done."""
        super().stop()
        self.pool.remove(self)

    # -- one turn of the loop ----------------------------------------------------------

    def step(self, index: int) -> tuple[float | None, int]:
        """One turn of worker ``index``: (seconds before its next turn, None when it
        is finished; source bytes it copied)."""
        stop = self._stop
        try:
            if stop.is_set():
                return None, 0
            wait = self._pending_state()
            if wait:
                return wait, 0
            if not self._turn(index):
                return None, 0
            delay = stop.take_delay()
            return max(delay, MIN_REST) if delay else 0.0, self.meter.counted()
        except BaseException as e:  # noqa: BLE001 - reported through phase/error
            self._fail(e)
            return None, 0
        finally:
            self._note_done()

    def _pending_state(self) -> float:
        """Seconds this copier must still wait for space or for its set-aside retry
        (0: go on), ending those waits when they are over."""
        now = time.monotonic()
        with self._lock:
            if self._aside_at is not None:
                if now < self._aside_at:
                    return self._aside_at - now
                self._aside_at = None
                self._set_aside.clear()
                self._failures.clear()
                self.error = None
            space = self._space
            if space is None:
                return 0.0
            if now < self._space_at:
                return self._space_at - now
            needed = min(self._remaining_bytes(),
                         self.busy_batch_regions * self.clone.region_size)
            if self._free_bytes() >= needed:
                self._space = None
                self.error = None
                self.clone.last_error = None
                self.prioritize(*space)
                return 0.0
            self._space_delay = min(self._space_delay * 2, copier_mod.SPACE_RETRY_MAX)
            return self._report_no_space()

    def _report_no_space(self) -> float:
        """Under _lock: phase failed with the bytes still needed; look again later."""
        err = self._no_space()
        self.error = err
        delay = self._space_delay
        self.clone.last_error = (f"{err.message} The copy resumes by itself when space is "
                                 f"free (next look in {delay:.0f} s).")
        self._space_at = time.monotonic() + delay
        return delay

    def _wait_for_space(self, first: int, end: int) -> None:
        """A full disk: report it at once, and look again with back-off (as a state)."""
        with self._lock:
            if self._space is None:
                self._space = (first, end)
                self._space_delay = 0.5
            else:  # another worker met it too: its batch is copied with the first
                self.prioritize(first, end)
            self._stop.wait(self._report_no_space())

    def _give_up_or_wait(self) -> None:
        """Only failing regions are left: fail, or (persistent) report it and retry
        them after SET_ASIDE_RETRY seconds (as a state)."""
        if not self.persistent:
            super()._give_up_or_wait()  # raises
            return
        with self._lock:
            if self._aside_at is not None:
                return
            runs = ", ".join(f"{a}-{b - 1}" for a, b in self._set_aside)
            retry = copier_mod.SET_ASIDE_RETRY
            self.error = OSError(5, f"regions {runs} could not be read from the source "
                                 f"({self.clone.last_error}); everything else is copied.")
            self.clone.last_error = (f"{self.error.strerror} (trying again every "
                                     f"{retry:.0f} s)")
            self._aside_at = time.monotonic() + retry


class _Slot:
    __slots__ = ("index", "due", "running")

    def __init__(self, index: int, due: float) -> None:
        self.index = index
        self.due: float | None = due  # None: this worker is finished
        self.running = False


class _Member:
    __slots__ = ("copier", "slots", "vtime", "removed")

    def __init__(self, copier: PooledCopier, now: float) -> None:
        self.copier = copier
        self.slots = [_Slot(i, now) for i in range(copier.workers)]
        self.vtime = 0.0  # bytes copied, for the fair share
        self.removed = False


class CopierPool:
    """``max_copiers`` threads running the steps of every pooled copier."""

    def __init__(self, max_copiers: int, rate: float | None = None) -> None:
        if max_copiers < 1:
            raise ValueError("max_copiers must be at least 1")
        self.max_copiers = max_copiers
        self.total = RateLimiter(rate) if rate else None
        self._cond = threading.Condition()
        # --- guarded by _cond ------------------------------------------------------
        self._members: dict[PooledCopier, _Member] = {}
        self._vclock = 0.0  # the virtual time of the last copier picked
        self._closing = False
        # --- end -------------------------------------------------------------------
        self._threads = [threading.Thread(target=self._run, name=f"copier-pool-{i}",
                                          daemon=True) for i in range(max_copiers)]
        for t in self._threads:
            t.start()

    def copier(self, clone: Clone, **kwargs: Any) -> PooledCopier:
        """A copier for ``clone`` that runs in this pool (``start()`` adds it)."""
        return PooledCopier(clone, self, **kwargs)

    # -- members -------------------------------------------------------------------------

    def add(self, copier: PooledCopier) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("the copier pool is closed")
            member = _Member(copier, time.monotonic())
            member.vtime = self._vclock
            self._members[copier] = member
            self._cond.notify_all()

    def remove(self, copier: PooledCopier) -> None:
        """Take ``copier`` out; blocks until none of its steps runs."""
        with self._cond:
            member = self._members.get(copier)
            if member is None:
                return
            member.removed = True
            while any(s.running for s in member.slots):
                self._cond.wait()
            self._members.pop(copier, None)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def copying(self) -> int:
        """Copiers with work left."""
        with self._cond:
            return sum(1 for m in self._members.values()
                       if any(s.due is not None for s in m.slots))

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    # -- the threads ---------------------------------------------------------------------

    def _pick(self, now: float) -> tuple[_Member | None, _Slot | None, float | None]:
        """The due slot of the copier with the least virtual time, or when the next
        slot falls due. Under _cond."""
        best: tuple[_Member, _Slot] | None = None
        # No batch starts before every byte booked is due: the total, and each
        # clone's own rate (so a few slots cannot copy ahead of the schedule).
        if self.total is not None and self.total.due() > now:
            return None, None, self.total.due()
        next_due: float | None = None
        for member in self._members.values():
            if member.removed or member.copier.paused:
                continue
            due = member.copier.meter.due()
            if due > now:
                next_due = due if next_due is None else min(next_due, due)
                continue
            for slot in member.slots:
                if slot.running or slot.due is None:
                    continue
                if slot.due <= now:
                    if best is None or member.vtime < best[0].vtime:
                        best = (member, slot)
                    break  # one due slot per copier is enough to compare
                if next_due is None or slot.due < next_due:
                    next_due = slot.due
        if best is None:
            return None, None, next_due
        return best[0], best[1], None

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closing:
                        return
                    now = time.monotonic()
                    member, slot, next_due = self._pick(now)
                    if member is not None and slot is not None:
                        break
                    self._cond.wait(None if next_due is None else max(next_due - now, 0.0))
                slot.running = True
                member.vtime = max(member.vtime, self._vclock)
                self._vclock = member.vtime
            delay, nbytes = member.copier.step(slot.index)
            with self._cond:
                slot.running = False
                slot.due = None if delay is None else time.monotonic() + delay
                member.vtime += nbytes
                self._cond.notify_all()
