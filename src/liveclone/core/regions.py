"""Region geometry and the in-core region map. Pure: no files, no sockets, no locks.

The clone is cut into fixed-size regions (a power of two from 4 KiB to 1 GiB).
Each region is *absent* (its authoritative bytes are the source's) or *present*
(the clone file holds them). The map is one bit per region.

Sub-blocks (DESIGN invariant 5 allows finer tracking): inside a region still
absent, the guest may have written some 4 KiB blocks (``BLOCK_SIZE``) without the
rest of the region being fetched. ``RegionMap.blocks`` maps such a region to the
bitmask of its written blocks (bit i: bytes ``[i·4K, (i+1)·4K)`` of the region).
Those blocks' authoritative bytes are in the clone file, the others' in the
source; a fill copies only the others, and the region then becomes present. Only
regions with such blocks pay for them (a dict entry); ``subblock_limit`` bounds how
many may have them at once. A region of 4 KiB is one block and never has any.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterator

from liveclone.core import copyc

MIN_REGION_SIZE = 4 << 10
MAX_REGION_SIZE = 1 << 30
DEFAULT_REGION_SIZE = 64 << 10
BLOCK_SHIFT = 12
BLOCK_SIZE = 1 << BLOCK_SHIFT  # the sub-block: the unit a guest write may mark
# Memory for sub-block state, counted as a dict entry (about 128 bytes) plus the
# mask's bits per region: at 64 KiB regions that is about 120k regions at once,
# whatever the clone's size. Past it, a partial write into a new region falls back
# to filling that region first (read-modify-write), which needs no state.
SUBBLOCK_MEMORY = 16 << 20

# The first byte holding a region that is present (not all clear) or absent (not
# all set). A regex search scans in C without copying, at about 120 MB/s: right for
# the next run of a fragmented map, a few bytes away, so it looks NEAR bytes ahead.
_ANY_SET = re.compile(b"[^\\x00]")
_ANY_CLEAR = re.compile(b"[^\\xff]")
_NEAR = 64
# Farther, the bitmap is scanned a chunk at a time: a chunk slice compared with a
# chunk of all clear (or all set) bytes is a memcmp, so passing a long run costs its
# length at memory speed (2 MiB, the map of 1 TiB at 64 KiB regions, in about 0.2
# ms, where the search took 17 ms); only the chunk where the run ends is searched.
_CHUNK = 1 << 16
# An all-clear bitmap this large (2 Mi regions: 128 GiB at 64 KiB) is an anonymous
# private mapping: its untouched pages read as zeros and take no memory.
_MAPPED = 1 << 18
_CLEAR = bytes(_CHUNK)
_SET = b"\xff" * _CHUNK
# The runs of a span longer than ``_TEXT_MIN`` regions are read from a text of its
# bits, one byte a region ("0" absent, "1" present), made a window at a time by a
# table lookup per map byte, in C; a regex match per run then gives it. About
# 0.5 us a run, where two searches of the map (``_find``) cost 5-8 us: a copier
# batch over a map the guest fragmented meets thousands of runs. A window whose
# map bytes are all clear or all set is one run, found by a compare.
_TEXT_MIN = 64
_WINDOW = 1 << 15  # regions: 4 KiB of map, 32 KiB of text
_TEXT = [bytes(0x30 | (b >> i) & 1 for i in range(8)) for b in range(256)]
_RUN = re.compile(b"0+|1+")
# ``set_runs`` sets the bits of nearby runs with one integer OR over at most this
# many regions (a few KiB of integer); runs farther apart start another.
_SET_SPAN = 1 << 16


def _run_end(bits: bytearray | mmap.mmap, fill: int, pos: int, end: int) -> int:
    """The first byte at or after ``pos`` (before ``end``) that is not ``fill``
    (0 or 0xFF), or ``end``."""
    same, other = (_CLEAR, _ANY_SET) if fill == 0 else (_SET, _ANY_CLEAR)
    while pos < end:
        hi = min(end, pos + _CHUNK)
        if bits[pos:hi] != (same if hi - pos == _CHUNK else same[:hi - pos]):
            m = other.search(bits, pos, hi)
            assert m is not None
            return m.start()
        pos = hi
    return end


def _count_set(bits: bytes | bytearray | mmap.mmap) -> int:
    """The number of set bits: all-clear and all-set chunks are counted whole."""
    count = 0
    for pos in range(0, len(bits), _CHUNK):
        chunk = bits[pos:pos + _CHUNK]
        if len(chunk) == _CHUNK and chunk == _CLEAR:
            continue
        count += 8 * _CHUNK if chunk == _SET else int.from_bytes(chunk, "little").bit_count()
    return count


def check_region_size(region_size: int) -> None:
    """Raise ValueError unless ``region_size`` is a power of two in [4 KiB, 1 GiB]."""
    if (
        region_size < MIN_REGION_SIZE
        or region_size > MAX_REGION_SIZE
        or region_size & (region_size - 1)
    ):
        raise ValueError(
            f"region size {region_size} must be a power of two from 4K to 1G"
        )


def subblock_limit(region_size: int) -> int:
    """How many regions may have sub-block state at once (``SUBBLOCK_MEMORY``)."""
    if region_size <= BLOCK_SIZE:
        return 0
    return max(64, SUBBLOCK_MEMORY // (128 + (region_size >> BLOCK_SHIFT) // 8))


def block_mask(first: int, end: int) -> int:
    """The mask of blocks ``[first, end)``."""
    return ((1 << (end - first)) - 1) << first if end > first else 0


def mask_runs(mask: int) -> Iterator[tuple[int, int]]:
    """``(first, end)`` runs of the set bits of ``mask``, in order."""
    at = 0
    while mask:
        skip = (mask & -mask).bit_length() - 1  # clear bits before the next run
        mask >>= skip
        ones = (~mask & (mask + 1)).bit_length() - 1  # the run's length
        yield at + skip, at + skip + ones
        mask >>= ones
        at += skip + ones


class Geometry:
    """How byte offsets map to region indices for a clone of ``size`` bytes."""

    __slots__ = ("size", "region_size", "shift", "count")

    def __init__(self, size: int, region_size: int) -> None:
        check_region_size(region_size)
        self.size = size
        self.region_size = region_size
        self.shift = region_size.bit_length() - 1
        # The last region may be short when size is not a multiple of region_size.
        self.count = (size + region_size - 1) >> self.shift

    def region_of(self, offset: int) -> int:
        return offset >> self.shift

    def span(self, offset: int, length: int) -> range:
        """Indices of regions touched by ``[offset, offset+length)`` (empty if length 0)."""
        if length <= 0:
            return range(0)
        return range(offset >> self.shift, ((offset + length - 1) >> self.shift) + 1)

    def bounds(self, region: int) -> tuple[int, int]:
        """``(start, end)`` byte offsets of ``region``; the last one ends at ``size``."""
        start = region << self.shift
        return start, min(start + self.region_size, self.size)

    def covers(self, offset: int, length: int, region: int) -> bool:
        """True if ``[offset, offset+length)`` covers all of ``region``."""
        start, end = self.bounds(region)
        return offset <= start and offset + length >= end

    def full_mask(self, region: int) -> int:
        """The mask of every block of ``region`` (the last one's last may be short)."""
        start, end = self.bounds(region)
        return block_mask(0, (end - start + BLOCK_SIZE - 1) >> BLOCK_SHIFT)

    def blocks_touched(self, region: int, start: int, stop: int) -> tuple[int, int]:
        """``(first, end)`` blocks of ``region`` that bytes ``[start, stop)`` touch."""
        base = region << self.shift
        return (start - base) >> BLOCK_SHIFT, (stop - base + BLOCK_SIZE - 1) >> BLOCK_SHIFT

    def blocks_covered(self, region: int, start: int, stop: int) -> tuple[int, int]:
        """``(first, end)`` blocks of ``region`` that bytes ``[start, stop)`` cover
        whole (a short last block counts as covered when ``stop`` is the end)."""
        base, end = self.bounds(region)
        stop = min(stop, end)
        last = (stop - base + BLOCK_SIZE - 1 if stop == end else stop - base) >> BLOCK_SHIFT
        return (start - base + BLOCK_SIZE - 1) >> BLOCK_SHIFT, last


class RegionMap:
    """One bit per region: set ⇔ present; and the sub-blocks of absent regions.

    Invariant: a bit only goes from 0 to 1 (DESIGN invariant 2). There is no
    ``clear``; ``present_count`` always equals the number of set bits.
    Invariant: ``blocks`` holds only absent regions, each with a non-zero mask of
    blocks whose authoritative bytes are the clone's; a mask only gains bits, and
    the entry goes when its region becomes present (``set``).
    """

    __slots__ = ("count", "_bits", "present_count", "blocks")
    _bits: bytearray | mmap.mmap

    def __init__(self, count: int, bits: bytes | bytearray | mmap.mmap | None = None) -> None:
        self.count = count
        nbytes = (count + 7) >> 3
        if bits is not None and len(bits) != nbytes:
            raise ValueError(f"bitmap has {len(bits)} bytes, expected {nbytes}")
        if nbytes >= _MAPPED and (bits is None or not _count_set(bits)):
            # All clear and large: zero pages, given memory only where bits get set,
            # so a new clone of 1 TiB costs no more memory than one of 1 GiB.
            self._bits = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            bits = None
        elif bits is None:
            self._bits = bytearray(nbytes)
        else:
            self._bits = bytearray(bits)
            # Bits past ``count`` in the last byte are kept clear.
            if count & 7:
                self._bits[-1] &= (1 << (count & 7)) - 1
        self.present_count = 0 if bits is None else _count_set(self._bits)
        self.blocks: dict[int, int] = {}

    def bits(self) -> bytearray | mmap.mmap:
        """The bitmap itself (bit ``r & 7`` of byte ``r >> 3`` is region ``r``), for
        a reader in C that checks present bits without the GIL. Its size never
        changes, and a bit only goes from 0 to 1 (above), so a region such a reader
        finds present stays present; one it finds absent it leaves to ``runs``."""
        return self._bits

    def copy(self) -> RegionMap:
        # No bit set: a new map, without scanning these bits (2 MiB at 1 TiB) for one.
        other = RegionMap(self.count, self._bits if self.present_count else None)
        other.blocks = dict(self.blocks)
        return other

    def __contains__(self, region: int) -> bool:
        return bool(self._bits[region >> 3] >> (region & 7) & 1)

    def is_present(self, region: int) -> bool:
        return region in self

    @property
    def complete(self) -> bool:
        return self.present_count == self.count

    def set(self, start: int, stop: int) -> int:
        """Mark regions ``[start, stop)`` present; return how many were newly set."""
        if stop <= start:
            return 0
        bits = self._bits
        first_byte, last_byte = start >> 3, (stop - 1) >> 3
        before = int.from_bytes(bits[first_byte:last_byte + 1], "little").bit_count()
        if first_byte == last_byte:
            bits[first_byte] |= ((1 << (stop - start)) - 1) << (start & 7)
        else:
            bits[first_byte] |= (0xFF << (start & 7)) & 0xFF
            bits[first_byte + 1:last_byte] = b"\xff" * (last_byte - first_byte - 1)
            bits[last_byte] |= (1 << (((stop - 1) & 7) + 1)) - 1
        added = int.from_bytes(bits[first_byte:last_byte + 1], "little").bit_count() - before
        self.present_count += added
        for r in self.blocks_in(start, stop):  # present regions have no sub-blocks
            del self.blocks[r]
        return added

    def set_runs(self, runs: list[tuple[int, int]]) -> int:
        """Mark the regions of sorted, disjoint ``runs`` present, as ``set`` does
        each; return how many were newly set. Runs close together are set with
        one operation on their bytes of the map, whatever their number."""
        bits, added, i = self._bits, 0, 0
        while i < len(runs):
            base, j, mask = runs[i][0] & ~7, i, 0
            while j < len(runs) and runs[j][1] - base <= _SET_SPAN:
                a, b = runs[j]
                mask |= ((1 << (b - a)) - 1) << (a - base)
                j += 1
            if j == i:  # one long run
                added += self.set(*runs[i])
                i += 1
                continue
            lo, hi = base >> 3, (runs[j - 1][1] + 7) >> 3
            old = int.from_bytes(bits[lo:hi], "little")
            new = old | mask
            bits[lo:hi] = new.to_bytes(hi - lo, "little")
            added += new.bit_count() - old.bit_count()
            self.present_count += new.bit_count() - old.bit_count()
            for r in self.blocks_in(runs[i][0], runs[j - 1][1]):
                if r in self:  # present regions have no sub-blocks
                    del self.blocks[r]
            i = j
        return added

    def add_blocks(self, region: int, mask: int) -> int:
        """Mark blocks of absent ``region`` written; return its new mask (0, and
        nothing kept, if the region is present: its bytes are the clone's anyway)."""
        if region in self or not mask:
            return 0
        new = self.blocks[region] = self.blocks.get(region, 0) | mask
        return new

    def blocks_in(self, first: int, end: int) -> dict[int, int]:
        """The sub-block masks of regions in ``[first, end)``."""
        blocks = self.blocks
        if not blocks:
            return {}
        if end - first <= len(blocks):
            return {r: blocks[r] for r in range(first, end) if r in blocks}
        return {r: m for r, m in blocks.items() if first <= r < end}

    def find_absent(self, start: int, stop: int | None = None) -> int | None:
        """The first absent region in ``[start, stop)``, or None."""
        return self._find(start, self.count if stop is None else stop, want_set=False)

    def find_present(self, start: int, stop: int | None = None) -> int | None:
        """The first present region in ``[start, stop)``, or None."""
        return self._find(start, self.count if stop is None else stop, want_set=True)

    def _find(self, start: int, stop: int, want_set: bool) -> int | None:
        stop = min(stop, self.count)
        if start >= stop:
            return None
        bits = self._bits
        flip = 0 if want_set else 0xFF  # look for set bits of (byte ^ flip)
        pos = start >> 3
        byte = (bits[pos] ^ flip) & (0xFF << (start & 7))  # the partial first byte
        if not byte:
            end = (stop + 7) >> 3
            near = min(end, pos + 1 + _NEAR)
            m = (_ANY_SET if want_set else _ANY_CLEAR).search(bits, pos + 1, near)
            if m is not None:
                pos = m.start()
            else:
                pos = _run_end(bits, flip, near, end)
                if pos == end:
                    return None
            byte = bits[pos] ^ flip
        r = (pos << 3) + (byte & -byte).bit_length() - 1  # its lowest wanted bit
        return r if r < stop else None

    def runs(self, start: int, stop: int) -> Iterator[tuple[int, int, bool]]:
        """Yield maximal ``(first, end, present)`` runs covering ``[start, stop)``."""
        stop = min(stop, self.count)
        if stop - start > _TEXT_MIN:
            yield from (self._text_runs if copyc.lib is None else self._c_runs)(start, stop)
            return
        r = start
        while r < stop:
            present = r in self
            nxt = self.find_absent(r, stop) if present else self.find_present(r, stop)
            end = stop if nxt is None else nxt
            yield r, end, present
            r = end

    def _text_runs(self, start: int, stop: int) -> Iterator[tuple[int, int, bool]]:
        """``runs``, from the text of the bits a window at a time (``_TEXT``)."""
        bits = self._bits
        at, present = start, None  # the run being extended: from ``at``
        for pos in range(start, stop, _WINDOW):
            hi = min(stop, pos + _WINDOW)
            lo_byte, hi_byte = pos >> 3, (hi + 7) >> 3
            chunk = bits[lo_byte:hi_byte]
            if chunk == _CLEAR[:len(chunk)] or chunk == _SET[:len(chunk)]:
                found: Iterator[tuple[int, int, bool]] = iter([(pos, hi, chunk[0] == 0xFF)])
            else:
                text, base = b"".join(map(_TEXT.__getitem__, chunk)), lo_byte << 3
                found = ((base + m.start(), base + m.end(), text[m.start()] == 0x31)
                         for m in _RUN.finditer(text, pos - base, hi - base))
            for a, _, p in found:
                if p != present:
                    if present is not None:
                        yield at, a, present
                    at, present = a, p
        if present is not None:
            yield at, stop, present

    def _c_runs(self, start: int, stop: int) -> Iterator[tuple[int, int, bool]]:
        """``runs``, from the edges that ``bitruns.c`` finds a window at a time."""
        ffi, lib = copyc.ffi, copyc.lib
        bits = ffi.from_buffer("uint8_t[]", self._bits)
        cap = min(_WINDOW, stop - start) + 1
        out = ffi.new("uint64_t[]", cap)
        at, present = start, None  # the run being extended: from ``at``
        for pos in range(start, stop, _WINDOW):
            edges = ffi.unpack(out, lib.lc_run_edges(bits, pos, min(stop, pos + _WINDOW),
                                                     out, cap))
            p = pos in self
            if present is None:
                present = p
            elif p != present:
                yield at, pos, present
                at, present = pos, p
            for e in edges[1:-1]:
                yield at, e, present
                at, present = e, not present
        if present is not None:
            yield at, stop, present

    def batch_end(self, start: int, stop: int, budget: int, gap: int,
                  max_reads: int | None = None) -> int:
        """Where a copy batch from ``start`` should end, at most ``stop``.

        A batch costs its absent regions, which are copied, and the present gaps
        between them: a gap of at most ``gap`` regions is read along with its
        neighbours (its bytes are read and dropped), a longer one is skipped over
        at the price of one more read, counted as ``gap`` regions (at least one).
        The batch ends when its cost reaches ``budget``, so a batch's time is
        bounded however fragmented the map. Present regions before the first
        absent one, and after the last, cost nothing: the batch passes them.
        ``max_reads``: the batch also ends before its runs need more separate
        reads than this (a gap skipped starts another)."""
        stop = min(stop, self.count)
        if copyc.lib is not None and start < stop:  # the same, in bitruns.c
            return int(copyc.lib.lc_batch_end(copyc.ffi.from_buffer("uint8_t[]", self._bits),
                                              start, stop, budget, gap, max_reads or 0))
        cost, reads = 0, 1
        last = None  # the end of the last absent run
        for r, run_end, present in self.runs(start, stop):
            if present:
                continue
            if last is not None:  # the present gap before this run
                if r - last <= gap:
                    cost += r - last
                else:
                    cost += max(gap, 1)
                    reads += 1
                if cost >= budget or (max_reads is not None and reads > max_reads):
                    return last
            if run_end - r >= budget - cost:
                return r + budget - cost
            cost += run_end - r
            last = run_end
        return stop

    def ranges(self) -> Iterator[tuple[int, int]]:
        """Yield ``(first, end)`` runs of present regions over the whole map."""
        for first, end, present in self.runs(0, self.count):
            if present:
                yield first, end

    def to_bytes(self) -> bytes:
        return bytes(self._bits)
