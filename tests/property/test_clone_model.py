"""Model-based test: the clone against a plain bytearray, with crashes.

Random interleavings of guest reads, writes (aligned and not, within and across
regions), scattered writes that fragment the map, zero-writes, trims, flushes,
copier steps (spans over present and absent regions, with present gaps read along
or skipped) and crashes that reopen from the committed map. After every step,
invariants 2-7 are checked:

- reads equal the model (source ⊕ acknowledged writes);
- present bits equal the model's, and only ever grow;
- committed bits are a subset of present bits;
- after a crash, every region committed before it keeps its data (and every
  flushed write is there); uncommitted regions read as the source again;
- ``regions_skipped`` counts each present region a fill passed over once.

``SubBlockModel`` runs the same rules on 16 KiB regions (four 4 KiB sub-blocks,
the last region short, its last block too), with few regions allowed sub-block
state at once: a partial write, zero-write or trim into an absent region marks
only its blocks (or, past the limit, fills the region first), reads take written
blocks from the clone and the rest from the source, fills copy only unwritten
blocks, and a crash keeps exactly the committed blocks. The in-core and committed
sub-block masks are compared with the model's after every step, and compaction is
forced often, so the superblock's sub-block section is read back too.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from liveclone.core import durability
from liveclone.core import fill as fill_mod
from liveclone.core.opening import open_clone
from liveclone.core.regions import RegionMap
from liveclone.sources.local import LocalFileSource

BS = 4096  # a sub-block
offsets = st.integers(0, 1 << 20)  # taken modulo the clone's size
lengths = st.integers(1, 12 << 10)


class CloneModel(RuleBasedStateMachine):
    RS = 4096
    NREG = 12
    SIZE = RS * NREG + 1000  # a short last region
    LIMIT: int | None = None  # regions allowed sub-block state (None: the default)

    @initialize(seed=st.integers(0, 2**32 - 1))
    def setup(self, seed: int) -> None:
        RS, NREG, SIZE = self.RS, self.NREG, self.SIZE
        rng = random.Random(seed)
        self.dir = Path(tempfile.mkdtemp(prefix="lcmodel-"))
        src = self.dir / "src.img"
        with open(src, "wb") as f:
            f.truncate(SIZE)
            for r in range(NREG + 1):
                kind = rng.random()
                n = min(RS, SIZE - r * RS)
                if kind < 0.6:
                    f.seek(r * RS)
                    f.write(rng.randbytes(n))
                elif kind < 0.75:
                    f.seek(r * RS)
                    f.write(bytes(n))
        self.src_path = src
        self.source = src.read_bytes()
        self.model = bytearray(self.source)
        self.present: set[int] = set()
        self.committed: set[int] = set()
        self.reported: set[int] = set()  # regions a fill copied or reported skipped
        self.skipped = 0
        # Written sub-blocks of absent regions: in core, and committed.
        self.written: dict[int, set[int]] = {}
        self.committed_blocks: dict[int, set[int]] = {}
        self.clone = open_clone(str(self.dir / "c.img"), LocalFileSource(str(src)),
                                region_size=RS, create=True, exclusive=True,
                                autocommit=False)
        self._limit()

    def _limit(self) -> None:
        if self.LIMIT is not None:
            self.clone.subblock_limit = self.LIMIT

    def teardown(self) -> None:
        if hasattr(self, "clone"):
            self.clone.close()
            shutil.rmtree(self.dir)

    # -- model helpers -----------------------------------------------------------

    def _span(self, off: int, n: int) -> range:
        return range(off // self.RS, (off + n - 1) // self.RS + 1) if n else range(0)

    def _bounds(self, r: int) -> tuple[int, int]:
        return r * self.RS, min((r + 1) * self.RS, self.SIZE)

    def _nblocks(self, r: int) -> int:
        a, b = self._bounds(r)
        return -(-(b - a) // BS)

    def _tracks(self, r: int, count: int) -> bool:
        """Does a partial change to absent ``r`` keep sub-blocks? ``count``: regions
        with sub-block state when the operation looked."""
        limit = self.clone.subblock_limit
        return self.RS > BS and (r in self.written or count < limit)

    def _mark(self, r: int, blocks: range) -> None:
        """Blocks of absent ``r`` written: the region is present once all are."""
        got = self.written.setdefault(r, set())
        got.update(blocks)
        if len(got) == self._nblocks(r):
            del self.written[r]
            self.present.add(r)

    def _clip(self, off: int, n: int) -> tuple[int, int]:
        off %= self.SIZE
        return off, min(n, self.SIZE - off)

    # -- rules -------------------------------------------------------------------

    @rule(off=offsets, n=lengths)
    def read(self, off: int, n: int) -> None:
        off, n = self._clip(off, n)
        assert bytes(self.clone.read(off, n)) == bytes(self.model[off:off + n])

    @rule(off=offsets, n=lengths, fill=st.integers(1, 255))
    def write(self, off: int, n: int, fill: int) -> None:
        off, n = self._clip(off, n)
        data = bytes([fill]) * n
        self.clone.write(off, data)
        self._written(off, n, data)

    def _written(self, off: int, n: int, data: bytes) -> None:
        """The model of a write or zero-write of ``data`` at ``off``."""
        count = len(self.written)
        for r in self._span(off, n):
            a, b = self._bounds(r)
            if r in self.present:
                continue
            if (off <= a and off + n >= b) or not self._tracks(r, count):
                self.written.pop(r, None)
                self.present.add(r)  # covered whole, or filled first
            else:
                s, e = max(a, off), min(b, off + n)
                self._mark(r, range((s - a) // BS, -(-(e - a) // BS)))
        self.model[off:off + n] = data

    @rule(blk=offsets, k=st.integers(1, 5), fill=st.integers(1, 255))
    def write_blocks(self, blk: int, k: int, fill: int) -> None:
        """Whole 4 KiB blocks: no source read at all inside an absent region."""
        off, n = self._clip(blk % (-(-self.SIZE // BS)) * BS, k * BS)
        self.write(off, n, fill)

    @rule(blk=offsets, k=st.integers(1, 5), fill=st.integers(1, 255))
    def write_nowait(self, blk: int, k: int, fill: int) -> None:
        """The event loop's write: done at once when it needs no wait (nothing is
        owned here), no source read and no write intent, else by ``write``."""
        off, n = self._clip(blk % (-(-self.SIZE // BS)) * BS, k * BS)
        data = bytes([fill]) * n
        if not self.clone.write_nowait(off, data):
            self.clone.write(off, data)
        self._written(off, n, data)

    @rule(r=offsets, k=st.integers(1, 3))
    def write_whole_regions(self, r: int, k: int) -> None:
        off = r % (self.NREG + 1) * self.RS
        self.write(off, min(k * self.RS, self.SIZE - off), 0xAB)

    @rule(off=offsets, n=lengths, no_hole=st.booleans())
    def write_zeroes(self, off: int, n: int, no_hole: bool) -> None:
        off, n = self._clip(off, n)
        self.clone.write_zeroes(off, n, no_hole=no_hole)
        self._written(off, n, bytes(n))

    @rule(off=offsets, n=lengths)
    def trim(self, off: int, n: int) -> None:
        off, n = self._clip(off, n)
        self.clone.trim(off, n)
        end, rs = off + n, self.RS
        # Whole regions first, then each partly covered edge (as Clone.trim does).
        inner_start = -(-off // rs) * rs
        inner_end = self.SIZE if end >= self.SIZE else min(end // rs * rs, self.SIZE)
        if inner_end <= inner_start:
            inner_start = inner_end = off
        for r in self._span(inner_start, inner_end - inner_start):
            a, b = self._bounds(r)
            self.model[a:b] = bytes(b - a)
            self.written.pop(r, None)
            self.present.add(r)
        for start, stop in ((off, min(inner_start, end)), (max(inner_end, off), end)):
            count = len(self.written)
            for r in self._span(start, stop - start):
                a, b = self._bounds(r)
                s, e = max(a, start), min(b, stop)
                if r in self.present:  # the covered part may be zeroed
                    self.model[s:e] = bytes(e - s)
                    continue
                # absent: whole blocks covered become written zeros (if tracked);
                # the rest is left alone (advisory)
                b0 = -(-(s - a) // BS)
                b1 = -(-(e - a) // BS) if e == b else (e - a) // BS
                if b1 > b0 and self._tracks(r, count):
                    self.model[a + b0 * BS:min(a + b1 * BS, b)] = bytes(min(a + b1 * BS, b)
                                                                      - a - b0 * BS)
                    self._mark(r, range(b0, b1))

    @rule(regions=st.sets(offsets, min_size=2), fill=st.integers(1, 255))
    def scatter(self, regions: set[int], fill: int) -> None:
        """Whole-region guest writes here and there: present and absent interleave."""
        for r in sorted({r % (self.NREG + 1) for r in regions}):
            a, b = self._bounds(r)
            self.write(a, b - a, fill)

    @rule(r=offsets, k=st.integers(1, 14), bulk=st.booleans(),
          gap=st.sampled_from([0, 4096, 8192, 256 << 10]),
          direct_min=st.sampled_from([4096, 16 << 10, fill_mod.DIRECT_MIN]))
    def copier_step(self, r: int, k: int, bulk: bool, gap: int, direct_min: int) -> None:
        """A copier batch (direct I/O for runs of at least ``direct_min``, the page
        cache for shorter ones), or a guest-driven fill (page cache), over a span that
        may hold present gaps; gaps up to ``gap`` bytes are read along."""
        r %= self.NREG + 1
        end = min(r + k, self.NREG + 1)
        span = set(range(r, end))
        before = fill_mod.READ_ALONG, fill_mod.DIRECT_MIN
        fill_mod.READ_ALONG, fill_mod.DIRECT_MIN = gap, direct_min
        try:
            self.clone.fill(r, end, bulk=bulk)
        finally:
            fill_mod.READ_ALONG, fill_mod.DIRECT_MIN = before
        self.skipped += len(span & self.present - self.reported)
        self.reported |= span
        self.present |= span
        for x in span:
            self.written.pop(x, None)

    @rule()
    def flush(self) -> None:
        """A FLUSH, or the periodic commit (same mechanism): present bits committed."""
        self.clone.flush()
        self.committed = set(self.present)
        self.committed_blocks = {r: set(b) for r, b in self.written.items()}

    @rule()
    def crash(self) -> None:
        self.clone.abandon()
        # Regions not committed go back to the source's bytes, but for their
        # committed sub-blocks.
        for r in self.present - self.committed | set(self.written):
            if r in self.committed:
                continue
            a, b = self._bounds(r)
            keep = self.committed_blocks.get(r, set())
            for k in range(self._nblocks(r)):
                if k not in keep:
                    x, y = a + k * BS, min(a + (k + 1) * BS, b)
                    self.model[x:y] = self.source[x:y]
        self.present = set(self.committed)
        self.written = {r: set(b) for r, b in self.committed_blocks.items()}
        self.reported, self.skipped = set(), 0  # a new process counts afresh
        self.clone = open_clone(str(self.dir / "c.img"), LocalFileSource(str(self.src_path)),
                                autocommit=False)
        self._limit()

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        if not hasattr(self, "clone"):
            return
        n = self.NREG + 1
        assert bytes(self.clone.read(0, self.SIZE)) == bytes(self.model)
        got = {r for r in range(n) if self.clone.is_present(r)}
        assert got == self.present
        committed = RegionMap(n, self.clone.committed_snapshot())
        assert {r for r in range(n) if r in committed} <= got
        assert self.clone.stats.regions_skipped == self.skipped
        assert self.clone.regions_partial == len(self.written)
        assert _masks(self.clone._own.map.blocks) == self.written
        assert _masks(self.clone._durability.committed_blocks) == {
            r: b for r, b in self.committed_blocks.items() if r not in committed}


def _masks(blocks: dict[int, int]) -> dict[int, set[int]]:
    return {r: {i for i in range(m.bit_length()) if m >> i & 1} for r, m in blocks.items()}


class SubBlockModel(CloneModel):
    RS = 16 << 10
    NREG = 7
    SIZE = RS * NREG + BS + 1000  # a short last region of two blocks, the last short
    LIMIT = 3


@pytest.fixture(autouse=True)
def _compact_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compaction every few records: the superblock's sub-block section is written
    and read back by the crashes."""
    monkeypatch.setattr(durability, "COMPACT_RECORDS", 6)


_SETTINGS = settings(max_examples=150, stateful_step_count=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestCloneModel = CloneModel.TestCase
TestCloneModel.settings = _SETTINGS
TestSubBlockModel = SubBlockModel.TestCase
TestSubBlockModel.settings = _SETTINGS
