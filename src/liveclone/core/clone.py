"""The clone: the routing policy of DESIGN invariants 3-6. Knows nothing of protocols.

A ``Clone`` is a read-only source, a clone file of the source's size, and a
region map. Every frontend (NBD, FUSE, the copier) calls the same blocking,
thread-safe methods: ``read``, ``write``, ``write_zeroes``, ``trim``, ``flush``,
``cache``, ``block_status`` and ``fill``. Async frontends run them in worker
threads (or the ``*_nowait`` variants on their loop).

This module decides *where* each byte goes; the parts below it do the rest:

- ``core.ownership``: the in-core map and who may change an absent region;
- ``core.fill``: copying source bytes into the clone file;
- ``core.durability``: pending and committed maps, the commit thread, failed mode;
- ``core.lifecycle``: the clone's one state;
- ``core.fsops``: the syscalls;
- ``core.opening``: the one way to open or create a clone (``open_clone``).
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

from liveclone.core import fill, fsops
from liveclone.core.buffers import ANSWERS
from liveclone.core.digests import Digester
from liveclone.core.durability import Durability
from liveclone.core.fill import FillEngine
from liveclone.core.lifecycle import Lifecycle, State
from liveclone.core.metadata import MapHeader, MapStore
from liveclone.core.ownership import Owned, Ownership, Run
from liveclone.core.regions import (
    BLOCK_SHIFT,
    BLOCK_SIZE,
    Geometry,
    RegionMap,
    block_mask,
    mask_runs,
    subblock_limit,
)
from liveclone.errors import CloneFailedError, SourceChangedError
from liveclone.sources.base import Extent, Source
from liveclone.sources.local import fd_extents
from liveclone.values import Value

# Largest write ``write_nowait`` takes on an event loop.
NOWAIT_WRITE_MAX = 64 << 10


class CloneStats(Value):
    """Counters for ``status``, all 0 at first. Updated under ``Clone._stats_lock``."""

    __slots__ = ("bytes_copied", "bytes_from_source", "regions_skipped", "guest_reads",
                 "guest_writes", "guest_bytes_read", "guest_bytes_written")
    bytes_copied: int  # source bytes written into the clone by fills
    bytes_from_source: int  # every byte read from the source (fills and reads)
    regions_skipped: int  # a fill found the region already present: "done"
    guest_reads: int
    guest_writes: int
    guest_bytes_read: int
    guest_bytes_written: int

    def __init__(self) -> None:
        for name in self._fields:
            setattr(self, name, 0)


class LaneState(NamedTuple):
    """``Clone.lane``: what the NBD lane reads and writes, and how it checks."""

    fd: int  # the clone file
    shift: int  # log2 of the region size
    # RegionMap bitmaps (``RegionMap.bits``), read without locks: bits only go
    # from 0 to 1. ``present`` is None once every region is.
    present: bytearray | mmap.mmap | None
    marked: bytearray | mmap.mmap  # regions needing no write intent (core.digests)
    max_write: int  # the largest write done without a wait; 0 after a failure


class Clone:
    """A partly filled clone, safe for concurrent callers. Made by ``open_clone``."""

    def __init__(self, path: str, fd: int, store: MapStore, rmap: RegionMap,
                 source: Source | None, autocommit: bool = True) -> None:
        header = store.header
        self.path = path
        self.size = header.size
        self.region_size = header.region_size
        self.geometry = Geometry(header.size, header.region_size)
        self.source = source
        self.header: MapHeader = header
        # Copy-on-read: a guest read of absent regions fills them first, so a slow
        # source is read once. The fill takes ownership like the copier does.
        self.copy_on_read = False
        # Called with (first, end) for every guest read that touched absent regions;
        # the copier uses it to copy what the guest touches first. Must not block.
        self.on_absent_read: Callable[[int, int], None] | None = None
        # Called with ``(offset, length)`` of every guest read, present or not: a
        # boot profile's recorder (``core.profile.Recorder.hook``, a deque's append).
        # Must be cheap: it runs on every read while set.
        self.on_read: Callable[[tuple[int, int]], None] | None = None
        self.lifecycle = Lifecycle(path)
        self._fd = fd
        self._stats_lock = threading.Lock()
        self.stats = CloneStats()  # guarded by _stats_lock
        # Regions a fill copied or reported done (guarded by _stats_lock): a region
        # counts in ``regions_skipped`` once, however often fills pass over it.
        self._reported = RegionMap(rmap.count)
        self.guest_inflight = 0  # guest requests now running (under _stats_lock)
        self.last_guest_io = 0.0  # time.monotonic() of the last guest request
        self.last_error: str | None = None  # the last harmless error worth showing
        self._durability = Durability(fd, store, rmap.copy(), self.lifecycle)
        self._digests = store.digests  # a slot per region: copied digest, or "guest"
        self._own = Ownership(rmap, self._durability.note_present, self._durability.note_blocks)
        # How many absent regions may have written sub-blocks at once (memory bound;
        # 0 for 4 KiB regions). A partial write into another absent region fills it.
        self.subblock_limit = subblock_limit(self.region_size)
        self._fill = FillEngine(fd, source, self.region_size, self._count_source_bytes)
        self.lifecycle.to(State.RUNNING)
        if autocommit:  # tests that model commits exactly turn it off
            self._durability.start()

    # -- reporting ---------------------------------------------------------------

    @property
    def regions_total(self) -> int:
        return self._own.map.count

    @property
    def regions_present(self) -> int:
        return self._own.map.present_count

    @property
    def regions_partial(self) -> int:
        """Absent regions with guest-written sub-blocks (``RegionMap.blocks``)."""
        return len(self._own.map.blocks)

    @property
    def regions_committed(self) -> int:
        return self._durability.committed_count

    @property
    def complete(self) -> bool:
        return self._own.complete

    @property
    def failure(self) -> str | None:
        """Why the clone is in its failed mode (invariant 9), or None."""
        return self.lifecycle.failure

    @property
    def commits(self) -> int:
        return self._durability.commits

    def is_present(self, region: int) -> bool:
        return self._own.is_present(region)

    def committed_snapshot(self) -> bytes:
        return self._durability.committed_snapshot()

    def find_absent(self, start: int, stop: int | None = None) -> int | None:
        """The first absent region in ``[start, stop)``, or None."""
        return self._own.find_absent(start, stop)

    def batch_end(self, start: int, stop: int, budget: int, gap: int,
                  max_reads: int | None = None) -> int:
        """Where a copier batch from ``start`` ends: ``RegionMap.batch_end``."""
        return self._own.batch_end(start, stop, budget, gap, max_reads)

    def absent_runs(self, first: int, end: int) -> list[Run]:
        return self._own.absent_runs(first, end)

    def present_runs(self, first: int, end: int) -> list[tuple[int, int, bool]]:
        return self._own.runs(first, end)

    def _count_source_bytes(self, n: int) -> None:
        with self._stats_lock:
            self.stats.bytes_from_source += n

    # -- the copier's operation --------------------------------------------------

    def fill(self, first: int, end: int, wait: bool = False,
             bulk: bool = False) -> tuple[int, int]:
        """Copy absent regions of ``[first, end)`` from the source and make them present.

        This is the copier's write and CACHE's: regions that are present are "done"
        without being written (invariant 4); regions owned by another caller are
        skipped unless ``wait``. ``bulk``: a copier batch (direct I/O for its long runs).
        The absent runs are copied together (``FillEngine.copy``: few large reads,
        present gaps read along and dropped, never written). Return ``(regions
        filled, source bytes read)``; the rate limit counts what was read. Source
        failures raise ``SourceReadError``; anything else is the clone's side.
        """
        self.lifecycle.check_writable()
        runs, present = self._own.take(first, end, wait)
        with self._stats_lock:
            # The seed's write reported done: each region once.
            self.stats.regions_skipped += self._reported.set_runs(present)
        if not runs:
            return 0, 0
        shift, size = self.geometry.shift, self.size
        spans = [(a << shift, min(b << shift, size)) for a, b in runs]
        # Regions with written sub-blocks: only their other blocks are copied
        # (invariant 4 per block); they are owned, so the marks cannot change.
        blocks = self._own.blocks_of(runs)
        pieces = _unwritten(spans, blocks, shift) if blocks else spans
        progress = [spans[0][0]]
        read = copied = 0
        digester = Digester(size, self.region_size)
        try:
            if pieces:
                read, copied = self._fill.copy(pieces, progress, bulk, digester)
            progress[0] = spans[-1][1]  # the written blocks between were there already
        finally:
            # Keep the whole regions copied before a failure (a full disk mid-batch
            # must not throw away what was written).
            done: list[Run] = []
            for (a, b), (start, stop) in zip(runs, spans, strict=True):
                if progress[0] < stop:
                    done.append((a, a + (max(progress[0] - start, 0) >> shift)))
                    break
                done.append((a, b))
            try:
                # While still owned, after direct writes (only in spans of
                # DIRECT_MIN or more of a bulk fill): drop pages a neighbour's
                # readahead cached while the range was a hole. Such a span may also
                # hold pieces written through the page cache (cut by zero blocks or
                # guest-written sub-blocks): their writeback starts here. Shorter
                # spans went wholly through the page cache and are left to the
                # commit's fdatasync: starting their writeback here (tens of
                # thousands of small runs on a fragmented map) took a third of the
                # copier's time, serialised with its work.
                end = min(done[-1][1] << shift, size)
                for start, stop in spans if bulk else ():
                    if stop - start >= fill.DIRECT_MIN and start < end:
                        fsops.drop_cached(self._fd, start, min(stop, end) - start)
            finally:
                try:
                    # Their digest slots before their bits (core.digests); a region
                    # whose slot could not be written stays absent. A region with
                    # guest-written blocks is a guest region.
                    self._durability.record_digests(digester, done)
                    if blocks:
                        self._durability.guest_made_present(
                            [(r, r + 1) for r in blocks if any(a <= r < b for a, b in done)])
                except BaseException:
                    done = []
                    raise
                finally:
                    with self._stats_lock:
                        self._reported.set_runs(done)  # copied: never reported skipped
                        self.stats.bytes_copied += copied
                    self._own.release(runs, done)
        return sum(b - a for a, b in runs), read

    # -- the guest's operations -------------------------------------------------

    def _guest(self) -> _GuestOp:
        return _GuestOp(self)

    def read(self, offset: int, length: int) -> memoryview:
        """Source ⊕ acknowledged writes (invariant 3): present runs from the clone,
        absent runs from the source, split where they meet."""
        self.lifecycle.check_open()
        with self._guest():
            absent_seen = False
            if self.copy_on_read and self.lifecycle.failure is None:
                first, end = self._span(offset, length)
                absent_seen = self._own.any_absent(first, end)
                if absent_seen:
                    self.fill(first, end, wait=True)
            buf = ANSWERS.take(length)
            from_source = 0
            for start, stop, present in self._byte_runs(offset, length):
                part = buf[start - offset:stop - offset]
                absent_seen = absent_seen or not present
                if present:
                    got = os.preadv(self._fd, [part], start)
                    if got < len(part):
                        part[got:] = bytes(len(part) - got)
                else:
                    part[:] = self._fill.source_pread(start, stop - start)
                    from_source += stop - start
            self._count_read(offset, length, from_source, absent_seen)
            return buf

    def read_nowait(self, offset: int, length: int) -> memoryview | None:
        """The read, served without blocking, or None if it would block.

        For event-loop frontends: it succeeds when every byte is in the page cache
        (``RWF_NOWAIT``), from the clone file for present regions and from a local
        source's file for absent ones; otherwise the caller runs ``read`` in a
        worker thread. With copy-on-read, absent regions always take that path."""
        self.lifecycle.check_open()
        buf = ANSWERS.take(length)
        if self.complete:  # present regions never change back: no lock needed
            try:
                got = os.preadv(self._fd, [buf], offset, fsops.RWF_NOWAIT)
            except OSError:  # EAGAIN: not cached; EOPNOTSUPP: no NOWAIT here
                return None
            if got < length:
                return None
            self._count_read(offset, length, 0, False)
            return buf
        src_fd = -1
        runs = list(self._byte_runs(offset, length))
        if any(not present for _, _, present in runs):
            local = self.source.fileno() if self.source is not None else None
            if local is None or self.copy_on_read:
                return None
            src_fd = local
        for start, stop, present in runs:
            fd = self._fd if present else src_fd
            try:
                got = os.preadv(fd, [buf[start - offset:stop - offset]], start,
                                fsops.RWF_NOWAIT)
            except OSError:  # EAGAIN: not cached; EOPNOTSUPP: no NOWAIT here
                return None
            if got < stop - start:
                return None
        absent = sum(stop - start for start, stop, present in runs if not present)
        if absent and self.source is not None:
            try:
                self.source.check_unchanged()  # one fstat: never serve changed bytes
            except SourceChangedError:
                return None  # ``read`` reports it
        self._count_read(offset, length, absent, absent > 0)
        return buf

    def lane(self, reads: bool = True) -> LaneState | None:
        """What the NBD lane (``nbd/lane.py``) needs to do plain READs and WRITEs
        of present regions itself, as ``read_nowait`` and ``write_nowait`` would;
        None when every request must come through them (closed, or reads
        recorded for a boot profile). It reports what it did with ``count_lane``.
        ``reads=False``: for a caller that only writes by it (the FUSE view), which
        gets it while reads are recorded too."""
        self.lifecycle.check_open()
        if reads and self.on_read is not None:
            return None
        writable = self.lifecycle.failure is None
        return LaneState(self._fd, self.geometry.shift,
                         None if self.complete else self._own.map.bits(),
                         self._digests.marked_bits(),
                         NOWAIT_WRITE_MAX if writable else 0)

    def count_lane(self, reads: int, read_bytes: int, writes: int, write_bytes: int) -> None:
        """Account the reads and writes, of present regions only, the NBD lane did."""
        with self._stats_lock:
            self.stats.guest_reads += reads
            self.stats.guest_bytes_read += read_bytes
            self.stats.guest_writes += writes
            self.stats.guest_bytes_written += write_bytes
            self.last_guest_io = time.monotonic()

    def write_nowait(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Do a small write at once if it needs no wait, and return True; return
        False (nothing done) if the caller must use ``write``.

        A present region needs no ownership and no fill (it never goes back to
        absent), so this is one ``pwrite`` into the page cache. An absent region
        nobody owns takes whole 4 KiB blocks as sub-blocks with no source read
        (``_write_absent_nowait``). For event-loop frontends, for small writes
        only: a large one could wait on writeback."""
        self.lifecycle.check_writable()
        if len(data) > NOWAIT_WRITE_MAX:
            return False
        span = self._span(offset, len(data))
        if not self.complete and self._own.any_absent(*span):
            return self._write_absent_nowait(offset, data, *span)
        if not self._intent_nowait(*span):
            return False
        fsops.pwrite_all(self._fd, data, offset)
        self._count_write(len(data))
        return True

    def _intent_nowait(self, first: int, end: int) -> bool:
        """Write intent for present regions with no I/O (core.digests): they are
        marked, or their zones are open; else ``write`` takes it, with a sync."""
        return self._digests.marked(first, end) or self._digests.intent_nowait(first, end)

    def _write_absent_nowait(self, offset: int, data: bytes | bytearray | memoryview,
                             first: int, end: int) -> bool:
        """``write_nowait`` into absent regions: done when nobody else owns them, it
        needs no source read (whole blocks, or whole regions) and no write intent
        (the present regions it touches are marked). The same steps as ``write``;
        whole blocks of one region in one step (``Ownership.write_blocks``)."""
        stop = offset + len(data)
        touched = self.geometry.blocks_touched(first, offset, stop)
        if end - first == 1 and self.geometry.blocks_covered(first, offset, stop) == touched:
            try:
                if self._own.write_blocks(
                        first, block_mask(*touched), self.geometry.full_mask(first),
                        self.subblock_limit,
                        lambda: fsops.pwrite_all(self._fd, data, offset)):
                    self._count_write(len(data))
                    return True
            except OSError:
                return False  # ``write`` meets it again and reports it
        runs = self._own.try_take(first, end)
        if runs is None:
            return False
        with Owned(self._own, runs) as own:
            if not all(self._intent_nowait(a, b) for a, b in _gaps(first, end, runs)):
                return False
            blocks = self._partial_blocks(offset, offset + len(data), runs, fill=False)
            if blocks is None:
                return False
            try:
                fsops.pwrite_all(self._fd, data, offset)
                self._made_present(own, blocks)
            except OSError:
                return False  # ``write`` meets it again and reports it
        self._count_write(len(data))
        return True

    def _count_read(self, offset: int, length: int, from_source: int,
                    touched_absent: bool) -> None:
        """Account a guest read, and steer the copier to what it touched."""
        with self._stats_lock:
            self.stats.guest_reads += 1
            self.stats.guest_bytes_read += length
            self.stats.bytes_from_source += from_source
            self.last_guest_io = time.monotonic()
        record = self.on_read
        if record is not None:
            record((offset, length))
        hook = self.on_absent_read
        if touched_absent and hook is not None:
            hook(*self._span(offset, length))

    def _count_write(self, length: int) -> None:
        with self._stats_lock:
            self.stats.guest_writes += 1
            self.stats.guest_bytes_written += length
            self.last_guest_io = time.monotonic()

    def _span(self, offset: int, length: int) -> Run:
        span = self.geometry.span(offset, length)
        return span.start, span.stop

    def _byte_runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """Split ``[offset, offset+length)`` into byte runs whose authoritative bytes
        are all the clone's (True: present regions, and written sub-blocks of absent
        ones) or all the source's (False), from one snapshot of the map."""
        first, end = self._span(offset, length)
        stop_at = offset + length
        shift = self.geometry.shift
        runs, blocks = self._own.runs_and_blocks(first, end)
        regions = sorted(blocks)
        for a, b, present in runs:
            lo, hi = max(offset, a << shift), min(stop_at, b << shift)
            if present or not blocks:
                yield lo, hi, present
            else:
                yield from _split_by_blocks(lo, hi, blocks, regions, shift)

    def _modify(self, offset: int, length: int, fua: bool,
                apply: Callable[[], None]) -> None:
        """A guest write, or zero-write: own the absent regions touched, apply the
        change, then mark them present; all before returning (the acknowledgement).

        A partly covered absent region (invariant 5) keeps the source's bytes
        outside the write as sub-blocks: the blocks the write touches are marked
        written, and only a block it covers in part is first completed from the
        source (unless written before). The region stays absent until its blocks
        are all written or a fill copies the rest. Past ``subblock_limit``, or with
        4 KiB regions, the region's uncovered parts are filled from the source first
        and it becomes present."""
        self.lifecycle.check_writable()
        first, end = self._span(offset, length)
        stop = offset + length
        with self._guest(), self._own.owning(first, end) as own:
            self._mark_guest(first, end, own.runs)
            blocks = self._partial_blocks(offset, stop, own.runs, fill=True)
            assert blocks is not None  # with fill, never None
            apply()
            self._made_present(own, blocks)
            self._count_write(length)
        if fua:
            self.flush()

    def _partial_blocks(self, offset: int, stop: int, owned: list[Run],
                        fill: bool) -> dict[int, int] | None:
        """The sub-blocks a change of ``[offset, stop)`` writes in the owned absent
        regions it covers in part (region → mask). With ``fill``, first complete
        from the source what must be: a region past ``subblock_limit`` whole, a
        block covered in part and not written before; without, None if anything
        must."""
        blocks: dict[int, int] = {}
        for a, b in owned:
            for r in {a, b - 1}:
                rs, re_ = self.geometry.bounds(r)
                if offset <= rs and stop >= re_:
                    continue
                s, e = max(offset, rs), min(stop, re_)
                mask = self._own.may_track(r, self.subblock_limit)
                if mask is None:  # fill the whole region's uncovered parts
                    if not fill:
                        return None
                    self._fill_outside(rs, re_, s, e)
                    continue
                b0, b1 = self.geometry.blocks_touched(r, s, e)
                for blk in {b0, b1 - 1}:
                    bs = rs + (blk << BLOCK_SHIFT)
                    be = min(bs + BLOCK_SIZE, re_)
                    if not mask >> blk & 1 and (s > bs or e < be):
                        if not fill:
                            return None
                        self._fill_outside(bs, be, s, e)
                blocks[r] = block_mask(b0, b1)
        return blocks

    def _made_present(self, own: Owned, blocks: dict[int, int],
                      keep_absent: bool = False) -> None:
        """After a change's bytes are written: mark its sub-blocks; the owned regions
        keeping sub-blocks stay absent, the others become present on release (only
        those written whole, with ``keep_absent``: a trim's). Their digest slots say
        "guest" first (core.digests: they travel with the bits); the slot of a region
        staying absent means nothing, and its fill will write "guest"."""
        present = own.runs if not keep_absent else []
        if blocks:
            whole = self._own.mark_blocks(blocks, self.geometry.full_mask)
            present = ([(r, r + 1) for r in sorted(whole)] if keep_absent
                       else _without(own.runs, set(blocks) - whole))
        self._durability.guest_made_present(present)
        own.present = present
        own.made_present = True
        self._digests.note_marked(present)

    def _fill_outside(self, start: int, stop: int, s: int, e: int) -> None:
        """Fill ``[start, stop)`` from the source, but for ``[s, e)`` inside it."""
        if s > start:
            self._fill.copy([(start, s)])
        if e < stop:
            self._fill.copy([(e, stop)])

    def _mark_guest(self, first: int, end: int, owned: list[Run]) -> None:
        """Write intent (core.digests): the present regions a guest changes (those of
        ``[first, end)`` between the ``owned`` absent runs) get "guest" slots durably
        before their bytes change. Owned ones get theirs in ``_made_present``."""
        present = _gaps(first, end, owned)
        if present:
            self._durability.guest_intent(present)

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._modify(offset, len(data), fua, lambda: fsops.pwrite_all(self._fd, data, offset))

    def write_zeroes(self, offset: int, length: int, fua: bool = False,
                     no_hole: bool = False) -> None:
        """Zero a range. Whole absent regions become present holes with nothing
        copied (invariant 2); partly covered absent regions are filled first."""
        def apply() -> None:
            if no_hole:
                fsops.zero_range(self._fd, offset, length)
            else:
                fsops.punch_hole(self._fd, offset, length)

        self._modify(offset, length, fua, apply)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard a range. Whole regions become present holes (invariant 2); on a
        partly covered present region the covered part is punched; a partly covered
        absent region is left alone: trim is advisory and must not zero the rest."""
        self.lifecycle.check_writable()
        with self._guest():
            rs = self.region_size
            inner_start = -(-offset // rs) * rs
            inner_end = min(((offset + length) // rs) * rs, self.size)
            if offset + length >= self.size:
                inner_end = self.size  # the short last region is covered whole
            if inner_end > inner_start:
                first, end = self._span(inner_start, inner_end - inner_start)
                with self._own.owning(first, end) as own:
                    self._mark_guest(first, end, own.runs)
                    fsops.punch_hole(self._fd, inner_start, inner_end - inner_start)
                    self._made_present(own, {})
            else:
                inner_start = inner_end = offset
            # Partly covered edges, under ownership so a concurrent fill cannot make
            # them present behind our back: punch the covered part where present;
            # where absent, punch the whole blocks covered and mark them written
            # (sub-blocks), or, past the limit, leave the region alone (advisory).
            for start, stop in ((offset, min(inner_start, offset + length)),
                                (max(inner_end, offset), offset + length)):
                if stop <= start:
                    continue
                first, end = self._span(start, stop - start)
                with self._own.owning(first, end) as own:
                    owned = {r for a, b in own.runs for r in range(a, b)}
                    blocks: dict[int, int] = {}
                    for r in range(first, end):
                        rs, re_ = self.geometry.bounds(r)
                        s, e = max(start, rs), min(stop, re_)
                        if r not in owned:
                            self._durability.guest_intent([(r, r + 1)])
                            fsops.punch_hole(self._fd, s, e - s)
                            continue
                        b0, b1 = self.geometry.blocks_covered(r, s, e)
                        if b1 > b0 and self._own.may_track(r, self.subblock_limit) is not None:
                            bs = rs + (b0 << BLOCK_SHIFT)
                            fsops.punch_hole(self._fd, bs, min(rs + (b1 << BLOCK_SHIFT), re_) - bs)
                            blocks[r] = block_mask(b0, b1)
                    if blocks:  # a region whose blocks are now all written is present
                        self._made_present(own, blocks, keep_absent=True)
        if fua:
            self.flush()

    def cache(self, offset: int, length: int) -> None:
        """A hint: fill these regions now."""
        with self._guest():
            self.fill(*self._span(offset, length), wait=False)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Extents covering the range in order: present runs from the clone file's
        holes, absent runs from the source's extents (``data`` False: reads as
        zeros). Frontends map them to their protocol's flags."""
        self.lifecycle.check_open()
        out: list[Extent] = []
        for start, stop, present in self._byte_runs(offset, length):
            if present:
                out.extend(fd_extents(self._fd, start, stop))
            elif self.source is not None:
                out.extend(self._fill.source_extents(start, stop))
            else:
                out.append(Extent(start, stop - start, True))
        return out

    # -- durability and closing ---------------------------------------------------

    def flush(self) -> None:
        """Make every acknowledged write durable (invariant 6). Blocks. Raises
        OSError(EIO) in the failed mode."""
        self._durability.flush()

    def pause(self) -> None:
        self.lifecycle.to(State.PAUSED)

    def resume(self) -> None:
        self.lifecycle.to(State.RUNNING)

    def close(self) -> None:
        """Commit and close. Blocks. A failed clone closes without committing (its
        failure stays in ``failure``); if this last commit fails, the clone is closed
        and CloneFailedError says why. A second close does nothing."""
        if not self.lifecycle.begin_close():
            return
        self._durability.stop()
        try:
            if self.lifecycle.failure is None:
                self._durability.flush(closing=True)
                self._durability.close_zones()
        except OSError:
            if self.lifecycle.failure is None:
                raise
            raise CloneFailedError(self.lifecycle.failure) from None
        finally:
            self._release_files()

    def abandon(self) -> None:
        """Close without committing anything, as ``kill -9`` would: for crash tests."""
        if not self.lifecycle.begin_close():
            return
        self._durability.stop()
        self._release_files()

    def _release_files(self) -> None:
        try:
            self._durability.close()
            self._fill.close()
            os.close(self._fd)
        finally:
            self.lifecycle.to(State.CLOSED)
            if self.source is not None:
                self.source.close()

    def __enter__(self) -> Clone:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _GuestOp:
    """Counts guest requests in flight, so the copier can yield to them."""

    def __init__(self, clone: Clone) -> None:
        self.clone = clone

    def __enter__(self) -> None:
        with self.clone._stats_lock:
            self.clone.guest_inflight += 1

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        with self.clone._stats_lock:
            self.clone.guest_inflight -= 1
            self.clone.last_guest_io = time.monotonic()
        if isinstance(exc, SourceChangedError):
            # A guest gets an I/O error for data it can no longer have (invariant 10).
            raise OSError(errno.EIO, exc.message) from exc


def _split_by_blocks(start: int, stop: int, blocks: dict[int, int], regions: list[int],
                     shift: int) -> Iterator[tuple[int, int, bool]]:
    """Split bytes ``[start, stop)`` into runs that are all written sub-blocks of
    ``blocks`` (True) or all outside them (False); ``regions``: ``blocks``, sorted."""
    pos = start
    for r in regions[bisect.bisect_left(regions, start >> shift):
                     bisect.bisect_left(regions, -(-stop >> shift))]:
        base = r << shift
        for f, e in mask_runs(blocks[r]):
            s, t = max(pos, base + (f << BLOCK_SHIFT)), min(stop, base + (e << BLOCK_SHIFT))
            if s >= t:
                continue
            if s > pos:
                yield pos, s, False
            yield s, t, True
            pos = t
    if pos < stop:
        yield pos, stop, False


def _unwritten(spans: list[tuple[int, int]], blocks: dict[int, int],
               shift: int) -> list[tuple[int, int]]:
    """The byte runs of ``spans`` outside the written sub-blocks of ``blocks``."""
    regions = sorted(blocks)
    return [(s, t) for start, stop in spans
            for s, t, written in _split_by_blocks(start, stop, blocks, regions, shift)
            if not written]


def _gaps(first: int, end: int, runs: list[Run]) -> list[Run]:
    """The runs of ``[first, end)`` between the sorted ``runs`` (the present ones,
    when ``runs`` are the absent ones owned)."""
    out, at = [], first
    for a, b in runs:
        if a > at:
            out.append((at, a))
        at = b
    if at < end:
        out.append((at, end))
    return out


def _without(runs: list[Run], regions: set[int]) -> list[Run]:
    """``runs`` with ``regions`` cut out."""
    out: list[Run] = []
    for a, b in runs:
        pos = a
        for r in sorted(r for r in regions if a <= r < b):
            if r > pos:
                out.append((pos, r))
            pos = r + 1
        if pos < b:
            out.append((pos, b))
    return out
