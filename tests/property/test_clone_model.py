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
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from liveclone.core import fill as fill_mod
from liveclone.core.opening import open_clone
from liveclone.core.regions import RegionMap
from liveclone.sources.local import LocalFileSource

RS = 4096
NREG = 12
SIZE = RS * NREG + 1000  # a short last region
offsets = st.integers(0, SIZE - 1)


class CloneModel(RuleBasedStateMachine):
    @initialize(seed=st.integers(0, 2**32 - 1))
    def setup(self, seed: int) -> None:
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
        self.clone = open_clone(str(self.dir / "c.img"), LocalFileSource(str(src)),
                                region_size=RS, create=True, exclusive=True,
                                autocommit=False)

    def teardown(self) -> None:
        if hasattr(self, "clone"):
            self.clone.close()
            shutil.rmtree(self.dir)

    # -- model helpers -----------------------------------------------------------

    def _span(self, off: int, n: int) -> range:
        return range(off // RS, (off + n - 1) // RS + 1) if n else range(0)

    def _bounds(self, r: int) -> tuple[int, int]:
        return r * RS, min((r + 1) * RS, SIZE)

    # -- rules -------------------------------------------------------------------

    @rule(off=offsets, n=st.integers(1, 3 * RS))
    def read(self, off: int, n: int) -> None:
        n = min(n, SIZE - off)
        assert bytes(self.clone.read(off, n)) == bytes(self.model[off:off + n])

    @rule(off=offsets, n=st.integers(1, 3 * RS), fill=st.integers(1, 255))
    def write(self, off: int, n: int, fill: int) -> None:
        n = min(n, SIZE - off)
        data = bytes([fill]) * n
        self.clone.write(off, data)
        self.model[off:off + n] = data
        self.present |= set(self._span(off, n))

    @rule(r=st.integers(0, NREG), k=st.integers(1, 3))
    def write_whole_regions(self, r: int, k: int) -> None:
        off = r * RS
        n = min(k * RS, SIZE - off)
        self.write(off, n, 0xAB)

    @rule(off=offsets, n=st.integers(1, 3 * RS), no_hole=st.booleans())
    def write_zeroes(self, off: int, n: int, no_hole: bool) -> None:
        n = min(n, SIZE - off)
        self.clone.write_zeroes(off, n, no_hole=no_hole)
        self.model[off:off + n] = bytes(n)
        self.present |= set(self._span(off, n))

    @rule(off=offsets, n=st.integers(1, 3 * RS))
    def trim(self, off: int, n: int) -> None:
        n = min(n, SIZE - off)
        self.clone.trim(off, n)
        end = off + n
        for r in self._span(off, n):
            a, b = self._bounds(r)
            if off <= a and end >= b:  # whole region: present hole
                self.model[a:b] = bytes(b - a)
                self.present.add(r)
            elif r in self.present:  # partial, present: the covered part may be zeroed
                s, e = max(a, off), min(b, end)
                self.model[s:e] = bytes(e - s)
            # partial, absent: advisory, nothing changes

    @rule(regions=st.sets(st.integers(0, NREG), min_size=2), fill=st.integers(1, 255))
    def scatter(self, regions: set[int], fill: int) -> None:
        """Whole-region guest writes here and there: present and absent interleave."""
        for r in sorted(regions):
            a, b = self._bounds(r)
            self.write(a, b - a, fill)

    @rule(r=st.integers(0, NREG), k=st.integers(1, NREG + 1), bulk=st.booleans(),
          gap=st.sampled_from([0, RS, 2 * RS, 256 << 10]))
    def copier_step(self, r: int, k: int, bulk: bool, gap: int) -> None:
        """A copier batch (direct I/O), or a guest-driven fill (page cache), over a
        span that may hold present gaps; gaps up to ``gap`` bytes are read along."""
        end = min(r + k, NREG + 1)
        span = set(range(r, end))
        before, fill_mod.READ_ALONG = fill_mod.READ_ALONG, gap
        try:
            self.clone.fill(r, end, bulk=bulk)
        finally:
            fill_mod.READ_ALONG = before
        self.skipped += len(span & self.present - self.reported)
        self.reported |= span
        self.present |= span

    @rule()
    def flush(self) -> None:
        """A FLUSH, or the periodic commit (same mechanism): present bits committed."""
        self.clone.flush()
        self.committed = set(self.present)

    @rule()
    def crash(self) -> None:
        self.clone.abandon()
        # Regions not committed go back to the source's bytes.
        for r in self.present - self.committed:
            a, b = self._bounds(r)
            self.model[a:b] = self.source[a:b]
        self.present = set(self.committed)
        self.reported, self.skipped = set(), 0  # a new process counts afresh
        self.clone = open_clone(str(self.dir / "c.img"), LocalFileSource(str(self.src_path)),
                                autocommit=False)

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        if not hasattr(self, "clone"):
            return
        assert bytes(self.clone.read(0, SIZE)) == bytes(self.model)
        got = {r for r in range(NREG + 1) if self.clone.is_present(r)}
        assert got == self.present
        committed = RegionMap(NREG + 1, self.clone.committed_snapshot())
        assert {r for r in range(NREG + 1) if r in committed} <= got
        assert self.clone.stats.regions_skipped == self.skipped


TestCloneModel = CloneModel.TestCase
TestCloneModel.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
