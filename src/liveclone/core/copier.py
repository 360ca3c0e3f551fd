"""The background copier: fills absent regions in order, through ``Clone.fill``.

The copier is just another client of the clone. It never writes a region itself;
``Clone.fill`` takes ownership of absent regions and skips present ones, so the
copier can never overwrite guest data (invariant 4).

Order: a linear sweep from region 0. Regions asked for by ``prioritize`` (for
example near recent guest reads) are copied before the sweep goes on. A boot
profile (``profile=``, ``core.profile``) is replayed between the two: its regions,
in recorded order, come after what a guest waits for and before the sweep, capped
in bytes and time. ``order`` counts the regions each of the three copied, and
``first_batches`` keeps the kind and first region of the first batches, in the
order they were handed out, so tests can see the order the copier followed. A batch is a
span of regions whose cost is ``batch_bytes``: its absent regions, plus the present
gaps read along with them, plus a price for each gap skipped over
(``RegionMap.batch_end``), so a batch takes about as long on a map the guest has
fragmented as on a fresh one. ``workers`` threads keep that many batches in
flight. The first pass hands out spans that tile the map from its start, so each
present region is passed (and reported skipped) once; when the sweep reaches the
end, it starts again from the lowest absent region, until every region is present.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import deque

from liveclone.core.clone import Clone
from liveclone.core.fill import READ_ALONG, SourceReadError
from liveclone.core.profile import DEFAULT_REPLAY_BYTES, DEFAULT_REPLAY_TIME, Profile
from liveclone.core.ratelimit import RateLimiter
from liveclone.errors import CloneFailedError, NoSpaceError, TargetError
from liveclone.units import format_size

# Batches are copied with direct I/O in chunks of up to clone.COPY_CHUNK; three
# workers keep reads and writes in flight at once (measured best on a virtio disk).
DEFAULT_BATCH = 32 << 20
DEFAULT_WORKERS = 3
# While the guest is busy, batches are at most this big: a guest write to a region
# in a batch waits for the batch, so this bounds that wait to a few milliseconds.
BUSY_BATCH = 4 << 20
# A batch that starts in a source hole may cover this much of it.
HOLE_BATCH = 1 << 30
# Guest-driven order: readahead after a guest read of absent data, doubled while
# the guest reads sequentially, up to this much.
READAHEAD_MAX = 64 << 20
# Source errors: tries per batch before it is set aside, and the back-off cap.
RETRIES = 5
BACKOFF_MAX = 5.0
# The guest counts as busy this long after its last request. A booting guest's I/O
# comes in bursts between stretches of CPU work; at 0.1 s the copier went back to
# full speed between bursts and the next burst queued behind its 32 MiB I/Os
# (live boot over a 2 GiB-data disk: 6.2 s; at 1 s: 5.0-5.1 s, local 3.1-3.3 s).
GUEST_QUIET = 1.0
# Persistent copiers try set-aside regions again after this long.
SET_ASIDE_RETRY = 30.0
# Persistent copiers on a full disk look for free space again at most this often.
SPACE_RETRY_MAX = 10.0
# How many batches ``first_batches`` keeps.
FIRST_BATCHES_KEEP = 64


class Kind:
    """Why a batch was chosen: the three sources of the copier's order."""

    GUEST = "guest"
    PROFILE = "profile"
    SWEEP = "sweep"


class ReplayState:
    REPLAYING = "replaying"
    DONE = "done"  # every run copied, or a cap reached (``stopped_by``)
    SKIPPED = "skipped"  # nothing to replay: the clone was complete


class Phase:
    COPYING = "copying"
    PAUSED = "paused"
    COMPLETE = "complete"
    FAILED = "failed"


class Copier:
    """Fills a clone in the background with a few worker threads."""

    def __init__(self, clone: Clone, rate: float | None = None,
                 workers: int = DEFAULT_WORKERS, batch_bytes: int = DEFAULT_BATCH,
                 persistent: bool = False, profile: Profile | None = None,
                 replay_bytes: int = DEFAULT_REPLAY_BYTES,
                 replay_time: float = DEFAULT_REPLAY_TIME) -> None:
        self.clone = clone
        # persistent: when only failing regions are left, report phase "failed" but
        # try them again every SET_ASIDE_RETRY seconds (for long-running services,
        # so the copy resumes by itself when the source comes back).
        self.persistent = persistent
        if rate:
            # A batch is at most a quarter second of the rate, so the limit holds
            # from the first batch on.
            batch_bytes = min(batch_bytes, int(rate) // 4)
        self.batch_regions = max(1, batch_bytes // clone.region_size)
        self.busy_batch_regions = max(1, min(batch_bytes, BUSY_BATCH) // clone.region_size)
        # Present gaps up to this many regions are read along (FillEngine.copy).
        along = clone.source.read_along() if clone.source is not None else None
        self.gap_regions = (READ_ALONG if along is None else along) // clone.region_size
        # Separate reads a batch may need (Source.batch_reads): over HTTP, one
        # request's ranges, so the workers' requests go out side by side.
        self.max_reads = clone.source.batch_reads() if clone.source is not None else None
        self.workers = workers
        self.limiter = RateLimiter(rate) if rate else None
        self._lock = threading.Lock()
        # --- guarded by _lock ----------------------------------------------------
        self._cursor = 0  # next region of the linear sweep
        self._priority: deque[tuple[int, int]] = deque()  # runs to copy first
        self._failures: dict[int, int] = {}  # batch start → failed tries
        # Runs whose tries are used up: skipped by the sweep, reported at the end.
        self._set_aside: list[tuple[int, int]] = []
        self.error: BaseException | None = None  # fatal: the copier stopped on it
        self.started = time.monotonic()
        self._rate_window: deque[tuple[float, int]] = deque()  # (time, bytes_copied)
        # Regions filled per Kind: each region a fill made present counts once, under
        # the kind of the batch that filled it.
        self.order = {Kind.GUEST: 0, Kind.PROFILE: 0, Kind.SWEEP: 0}
        # Batches handed out and not yet filled. Invariant: a batch is handed out only
        # while not paused, and phase says PAUSED only once this is 0, so "paused"
        # means no region is being copied (a pause waits for the batches in flight).
        self._filling = 0
        # The spans of the batches counted in _filling. After its first pass the
        # sweep starts past them: a batch from the lowest absent region would be
        # one a worker is still filling, and its regions are owned, so the turn
        # would take nothing, scan the span and try again (on a fragmented map the
        # idle workers spent most of the GIL doing that).
        self._inflight: list[tuple[int, int]] = []
        # Profile replay. Invariant: _profile holds the runs not yet handed out, in
        # recorded order; it is empty unless replay_state is REPLAYING.
        self._profile: deque[tuple[int, int]] = deque()
        # (kind, first region) of the first FIRST_BATCHES_KEEP batches handed out.
        self.first_batches: list[tuple[str, int]] = []
        self.profile_regions = 0  # regions in the profile (each once)
        self.profile_bytes_read = 0  # source bytes read by profile batches
        self._profile_handed = 0  # regions of profile batches handed out
        self._profile_inflight = 0  # profile batches handed out and not yet copied
        self.replay_state: str | None = None  # None: no profile
        self.replay_stopped_by: str | None = None  # "end", "bytes", "time"
        # --- end ---------------------------------------------------------------
        self._replay_max_regions = max(1, replay_bytes // clone.region_size)
        self._replay_time = replay_time
        self.profile_file = profile.path if profile is not None else None
        if profile is not None:
            self._load_profile(profile)
        self._last_touch = (-1, 0)  # (end region of the last guest read, its readahead)
        self._last_batch_seconds = 0.0  # how long the last batch took, to rest as long
        clone.on_absent_read = self._guest_touched
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []

    def _load_profile(self, profile: Profile) -> None:
        """Queue the profile's regions, in order, runs that continue one another
        closely (a gap the fill reads along) merged into one."""
        runs = profile.region_runs(self.clone.geometry)
        self.profile_regions = sum(b - a for a, b in runs)
        if self.clone.complete:
            self.replay_state = ReplayState.SKIPPED
            return
        for a, b in runs:
            if self._profile and 0 <= a - self._profile[-1][1] <= self.gap_regions:
                self._profile[-1] = (self._profile[-1][0], b)
            else:
                self._profile.append((a, b))
        self.replay_state = ReplayState.REPLAYING

    # -- control -------------------------------------------------------------------

    def start(self) -> Copier:
        self.started = time.monotonic()  # the replay's time cap counts from here
        self._threads = [threading.Thread(target=self._work, args=(i,), name=f"copier-{i}",
                                          daemon=True) for i in range(self.workers)]
        for t in self._threads:
            t.start()
        return self

    def pause(self) -> None:
        self._running.clear()
        self.clone.pause()

    def resume(self) -> None:
        self._running.set()
        self.clone.resume()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def stop(self) -> None:
        """Stop the workers after their current batch. Blocks until they have."""
        self._stop.set()
        self._running.set()
        for t in self._threads:
            t.join()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until complete or failed; True if the copier has finished."""
        return self._done.wait(timeout)

    def prioritize(self, first: int, end: int) -> None:
        """Copy ``[first, end)`` before the sweep goes on (guest-driven order)."""
        self._priority.append((first, end))

    def _guest_touched(self, first: int, end: int) -> None:
        """Guest-driven order: copy what the guest reads, and a readahead after it that
        grows while the guest reads sequentially. Called on the guest's read path:
        takes no lock (a deque's append is atomic; the readahead state is a hint)."""
        last_end, ahead = self._last_touch
        if first <= last_end <= end:  # continues (or overlaps) the last read
            ahead = min(max(ahead * 2, self.batch_regions),
                        max(1, READAHEAD_MAX // self.clone.region_size))
        else:
            ahead = 0
        self._last_touch = (end, ahead)
        self._priority.append((first, min(end + ahead, self.clone.regions_total)))

    @property
    def phase(self) -> str:
        if self.clone.failure is not None:
            return Phase.FAILED  # complete in memory perhaps, never committed
        if self.clone.complete:
            return Phase.COMPLETE
        if self.error is not None:
            return Phase.FAILED
        return Phase.PAUSED if self.paused and not self._filling else Phase.COPYING

    # -- progress --------------------------------------------------------------------

    def rate(self) -> float:
        """Bytes per second over the last few seconds."""
        now = time.monotonic()
        copied = self.clone.stats.bytes_copied
        with self._lock:
            self._rate_window.append((now, copied))
            while len(self._rate_window) > 2 and now - self._rate_window[0][0] > 5:
                self._rate_window.popleft()
            t0, b0 = self._rate_window[0]
        return (copied - b0) / (now - t0) if now > t0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        remaining = (self.clone.regions_total - self.clone.regions_present) * self.clone.region_size
        return remaining / rate if rate > 0 else None

    # -- the work --------------------------------------------------------------------

    def profile_status(self) -> dict[str, object] | None:
        """The replay's progress for ``status``, or None without a profile."""
        if self.replay_state is None:
            return None
        with self._lock:
            return {
                "state": self.replay_state, "file": self.profile_file,
                "regions_total": self.profile_regions,
                "regions_replayed": self.order[Kind.PROFILE],
                "bytes_total": self.profile_regions * self.clone.region_size,
                "bytes_replayed": self.profile_bytes_read,
                "stopped_by": self.replay_stopped_by,
            }

    def order_status(self) -> dict[str, object]:
        """Regions copied per kind, and the first batches' kinds and starts."""
        with self._lock:
            return {**self.order, "first_batches": [list(b) for b in self.first_batches]}

    def _next_batch(self) -> tuple[int, int, str] | None:
        """The next batch, counted in _filling until _copy ends; None while paused."""
        with self._lock:
            if self.paused:
                return None
            self._filling += 1
        batch = None
        try:
            batch = self._choose_batch()
        finally:
            with self._lock:
                if batch is None:
                    self._filling -= 1
                else:
                    self._inflight.append(batch[:2])
        return batch

    def _choose_batch(self) -> tuple[int, int, str] | None:
        """The next span of regions to fill and its Kind, or None when nothing is left
        to try. No lock is held across source I/O (the hole probe may be a network
        call)."""
        clone = self.clone
        while True:  # guest-driven runs first
            try:
                first, end = self._priority.popleft()
            except IndexError:
                break
            start = clone.find_absent(first, end)
            if start is not None:
                stop = clone.batch_end(start, end, self._batch_limit(), self.gap_regions,
                                       self.max_reads)
                if stop < end:
                    self._priority.appendleft((stop, end))
                with self._lock:
                    self._handed(Kind.GUEST, start)
                return start, stop, Kind.GUEST
        with self._lock:
            batch = self._next_profile_batch()
            if batch is not None:
                self._handed(Kind.PROFILE, batch[0])
                return batch[0], batch[1], Kind.PROFILE
            start = None if clone.complete else self._sweep_start()
            if start is None:
                return None
            end = self._cursor = self._batch_end(start)
            self._handed(Kind.SWEEP, start)
        stretched = self._stretch_over_hole(start, end)
        if stretched > end:
            with self._lock:
                self._cursor = max(self._cursor, stretched)
        return start, stretched, Kind.SWEEP

    def _handed(self, kind: str, start: int) -> None:
        """Note a batch handed out (under _lock: profile and sweep batches are noted
        in the order they were chosen)."""
        if len(self.first_batches) < FIRST_BATCHES_KEEP:
            self.first_batches.append((kind, start))

    def _next_profile_batch(self) -> tuple[int, int] | None:
        """The next batch of the profile, in recorded order, within the caps. Under
        _lock."""
        if self.replay_state != ReplayState.REPLAYING:
            return None
        if time.monotonic() - self.started >= self._replay_time:
            self._end_replay("time")
            return None
        while self._profile:
            first, end = self._profile.popleft()
            start = self.clone.find_absent(first, end)
            if start is None:
                continue
            # BUSY_BATCH at most, even before the guest is busy: a guest read of a region
            # in a batch waits for all of it, and the guest is about to read these.
            budget = min(self.busy_batch_regions,
                         self._replay_max_regions - self._profile_handed)
            if budget <= 0:
                self._end_replay("bytes")
                return None
            stop = self.clone.batch_end(start, end, budget, self.gap_regions, self.max_reads)
            if stop < end:
                self._profile.appendleft((stop, end))
            self._profile_handed += stop - start
            self._profile_inflight += 1
            return start, stop
        if not self._profile_inflight:
            self._end_replay("end")
        return None

    def _end_replay(self, why: str) -> None:
        self._profile.clear()
        self.replay_state = ReplayState.DONE
        self.replay_stopped_by = why

    def _sweep_start(self) -> int | None:
        """Where the next sweep batch begins. On the first pass, at the cursor (past
        set-aside runs): the batches tile the map, so each present region is passed,
        and reported skipped, once. After it, at the first absent region from the
        start that is neither set aside nor in a batch in flight. Under _lock."""
        count = self.clone.regions_total
        x = self._cursor
        while x < count:
            blocker = self._blocker_at(x, self._set_aside)
            if blocker is None:
                return x
            x = blocker[1]
        blockers = self._set_aside + self._inflight
        absent = self.clone.find_absent(0)
        while absent is not None:
            blocker = self._blocker_at(absent, blockers)
            if blocker is None:
                return absent
            absent = self.clone.find_absent(blocker[1])
        return None

    @staticmethod
    def _blocker_at(region: int, spans: list[tuple[int, int]]) -> tuple[int, int] | None:
        return next((r for r in spans if r[0] <= region < r[1]), None)

    def _guest_busy(self) -> bool:
        return time.monotonic() - self.clone.last_guest_io <= GUEST_QUIET

    def _batch_limit(self) -> int:
        return self.busy_batch_regions if self._guest_busy() else self.batch_regions

    def _batch_end(self, start: int) -> int:
        end = self.clone.batch_end(start, self.clone.regions_total, self._batch_limit(),
                                   self.gap_regions, self.max_reads)
        return min([end] + [a for a, _ in self._set_aside if start < a < end])

    def _stretch_over_hole(self, start: int, end: int) -> int:
        """A batch that starts in a source hole may run to the hole's end (up to
        HOLE_BATCH): punching costs the same for 8 MiB or 1 GiB, Python work does not.
        Called without the lock: the source's extents may be a network call."""
        source, geo = self.clone.source, self.clone.geometry
        if source is None:
            return end
        first_byte = geo.bounds(start)[0]
        try:
            ext = next(iter(source.extents(first_byte,
                                           min(HOLE_BATCH, geo.size - first_byte))), None)
        except OSError:
            return end  # the fill meets the error and retries it
        if ext is None or ext.data:
            return end
        hole_end = ext.offset + ext.length
        whole = geo.count if hole_end >= geo.size else hole_end >> geo.shift
        with self._lock:
            limit = min([whole] + [a for a, _ in self._set_aside if start < a])
        return max(end, limit)

    def _only_set_aside_left(self) -> bool:
        with self._lock:
            if not self._set_aside:
                return False
            aside = sum(b - a - sum(y - x for x, y, p in self.clone.present_runs(a, b) if p)
                        for a, b in self._set_aside)
        return aside == self.clone.regions_total - self.clone.regions_present

    def _work(self, index: int) -> None:
        try:
            while not self._stop.is_set():
                self._running.wait()
                if self._stop.is_set() or not self._turn(index):
                    break
        except BaseException as e:  # noqa: BLE001 - reported through phase/error
            self._fail(e)
        finally:
            self._note_done()

    def _turn(self, index: int) -> bool:
        """One turn of worker ``index``: give way to a busy guest, or copy the next
        batch, or wait a moment for regions other callers own. False once the clone
        is complete. (The daemon's pooled copier runs the same turn.)"""
        if not self._yield_to_guest(index):
            return True
        batch = self._next_batch()
        if batch is not None:
            self._copy(*batch)
            return True
        if self.clone.complete:
            return False
        if self._only_set_aside_left():
            self._give_up_or_wait()
        self._stop.wait(0.01)  # regions owned by other callers: they finish soon
        return True

    def _fail(self, e: BaseException) -> None:
        """A worker met a fatal error: keep the first, report it, stop every worker."""
        with self._lock:
            if self.error is None:
                self.error = e
        self.clone.last_error = str(e)
        self._stop.set()

    def _note_done(self) -> None:
        """After a worker's turns: finished once complete, or stopped on an error."""
        if self.clone.complete or (self.error is not None and self._stop.is_set()):
            self._done.set()

    def _give_up_or_wait(self) -> None:
        """Only regions that keep failing are left: fail, or (persistent) report it
        and try them again later."""
        with self._lock:
            runs = ", ".join(f"{a}-{b - 1}" for a, b in self._set_aside)
        err = OSError(errno.EIO, f"regions {runs} could not be read from the source "
                      f"({self.clone.last_error}); everything else is copied. Fix the "
                      "source and run again to retry them.")
        if not self.persistent:
            raise err
        with self._lock:
            self.error = err
        self.clone.last_error = f"{err.strerror} (trying again every {SET_ASIDE_RETRY:.0f} s)"
        self._stop.wait(SET_ASIDE_RETRY)
        with self._lock:
            self._set_aside.clear()
            self._failures.clear()
            self.error = None

    def _yield_to_guest(self, index: int) -> bool:
        """Give way to a busy guest; False means skip this turn.

        While the guest did I/O in the last GUEST_QUIET seconds, one worker copies
        batches of BUSY_BATCH, and it rests as long as its last batch took: the guest
        keeps about half of what the copier would use (CPU, disk, GIL) until it goes
        quiet again."""
        if not self._guest_busy() or self.replay_state == ReplayState.REPLAYING:
            return True  # a replay fetches what the guest is about to read: no rest
        if index > 0:
            self._stop.wait(GUEST_QUIET)
            return False
        self._stop.wait(min(self._last_batch_seconds, GUEST_QUIET))
        return True

    def _copy(self, first: int, end: int, kind: str = Kind.SWEEP) -> None:
        """Fill a batch that _next_batch handed out."""
        try:
            self._fill_batch(first, end, kind)
        finally:
            with self._lock:
                self._filling -= 1
                self._inflight.remove((first, end))
                if kind == Kind.PROFILE:
                    self._profile_inflight -= 1
                    if (not self._profile_inflight and not self._profile
                            and self.replay_state == ReplayState.REPLAYING):
                        self._end_replay("end")

    def _fill_batch(self, first: int, end: int, kind: str) -> None:
        started = time.monotonic()
        try:
            taken, nbytes = self.clone.fill(first, end, bulk=True)
        except SourceReadError as e:
            self._retry_later(first, end, e)
            return
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                if not self.persistent:
                    raise self._no_space() from None
                self._wait_for_space(first, end)
                return
            if self.clone.failure is not None:
                raise CloneFailedError(self.clone.failure) from None
            # The clone's side, never blamed on the source.
            raise TargetError(f"writing the clone {self.clone.path} failed: "
                              f"{e.strerror or e}. The map is consistent; fix the clone's "
                              "disk and run again to resume.") from None
        self._last_batch_seconds = time.monotonic() - started
        with self._lock:
            self._failures.pop(first, None)
            self.order[kind] += taken
            if kind == Kind.PROFILE:
                self.profile_bytes_read += nbytes
        if not taken:
            # Every absent region there is owned by another filler: let it finish.
            self._stop.wait(0.002)
        if self.limiter is not None and nbytes:
            self.limiter.take(nbytes, self._stop)

    def _retry_later(self, first: int, end: int, e: OSError) -> None:
        with self._lock:
            tries = self._failures.get(first, 0) + 1
            self._failures[first] = tries
        msg = (f"reading source regions {first}-{end - 1} failed ({e}); "
               f"try {tries} of {RETRIES}")
        self.clone.last_error = msg
        if tries >= RETRIES:
            with self._lock:
                self._set_aside.append((first, end))
            return
        self._stop.wait(min(BACKOFF_MAX, 0.1 * 2 ** tries))
        self.prioritize(first, end)

    def _wait_for_space(self, first: int, end: int) -> None:
        """A persistent copier on a full disk: report it at once (phase failed, with
        the bytes still needed), look again with back-off, and resume by itself when
        a batch fits. Guests keep going meanwhile (their writes may get ENOSPC)."""
        delay = 0.5
        while not self._stop.is_set():
            err = self._no_space()
            with self._lock:
                self.error = err
            self.clone.last_error = (f"{err.message} The copy resumes by itself when space "
                                     f"is free (next look in {delay:.0f} s).")
            self._stop.wait(delay)
            if self._free_bytes() >= min(self._remaining_bytes(),
                                         self.busy_batch_regions * self.clone.region_size):
                break
            delay = min(delay * 2, SPACE_RETRY_MAX)
        with self._lock:
            self.error = None
        self.clone.last_error = None
        self.prioritize(first, end)

    def _free_bytes(self) -> int:
        st = os.statvfs(os.path.dirname(self.clone.path))
        return st.f_bavail * st.f_frsize

    def _remaining_bytes(self) -> int:
        clone = self.clone
        return (clone.regions_total - clone.regions_present) * clone.region_size

    def _no_space(self) -> NoSpaceError:
        fix = ("free some space." if self.persistent else
               "free some space and run the same command again to resume.")
        return NoSpaceError(
            f"no space left on the device holding {self.clone.path}: up to "
            f"{format_size(self._remaining_bytes())} is still to copy and "
            f"{format_size(self._free_bytes())} is free. The map is consistent; {fix}")
