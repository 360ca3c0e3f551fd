"""Region ownership: the in-core map, and who may change an absent region.

A region that is absent can only change (its clone bytes written, its bit set,
its written sub-blocks marked: ``RegionMap.blocks``) by the one caller that *owns*
it. Ownership is taken for runs of regions under
``cond`` and released there. Guest writes wait until no region they touch is owned
by someone else; the copier never waits: it skips owned and present regions.
Since a region's bit is set only by its owner, and the copier only writes regions
it found absent and took, the copier never overwrites guest data (invariant 4),
and there is one fill per region at a time.

Owned runs are kept sorted, so a check or a cut costs the runs it meets, not every
run owned: a copier batch over a fragmented map owns thousands of small runs.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

from liveclone.core.regions import RegionMap

Run = tuple[int, int]  # regions [first, end)


class Ownership:
    """The in-core map and the owned runs, under one condition variable."""

    def __init__(self, rmap: RegionMap, on_present: Callable[[Run], None],
                 on_blocks: Callable[[int, int], None] | None = None) -> None:
        self.cond = threading.Condition()
        # --- guarded by cond -------------------------------------------------------
        # Invariant: bit r set ⇒ the clone file holds r's authoritative bytes
        # (perhaps not yet durable). Bits only go 0 → 1 (invariant 2).
        # Invariant: block i of absent r marked in map.blocks ⇒ the clone file holds
        # that block's authoritative bytes; the other blocks' are the source's.
        # Marks only grow, and only r's owner adds them.
        self.map = rmap
        # Invariant: runs of absent regions owned by one caller each; no two overlap;
        # sorted. Only the owner writes an owned region's clone bytes or sets its bit.
        self._owned: list[Run] = []
        # --- end -------------------------------------------------------------------
        # Told of every run made present, and of sub-blocks marked (region, mask),
        # under cond (durability queues their commit).
        self._on_present = on_present
        self._on_blocks = on_blocks

    # -- queries (each takes the lock) ------------------------------------------

    def runs(self, first: int, end: int) -> list[tuple[int, int, bool]]:
        """``(a, b, present)`` runs of ``[first, end)``, from one snapshot."""
        with self.cond:
            return list(self.map.runs(first, end))

    def runs_and_blocks(self, first: int, end: int
                        ) -> tuple[list[tuple[int, int, bool]], dict[int, int]]:
        """``runs`` and the sub-block masks of ``[first, end)``, from one snapshot."""
        with self.cond:
            return list(self.map.runs(first, end)), self.map.blocks_in(first, end)

    def blocks_of(self, runs: list[Run]) -> dict[int, int]:
        """Sub-block masks of the regions of ``runs`` (owned by the caller: they
        cannot change under it)."""
        with self.cond:
            if not self.map.blocks:
                return {}
            out: dict[int, int] = {}
            for a, b in runs:
                out.update(self.map.blocks_in(a, b))
            return out

    def may_track(self, region: int, limit: int) -> int | None:
        """The sub-block mask of absent ``region`` (0: none yet), or None when it has
        none and ``limit`` regions already have some: its write must fill it whole."""
        with self.cond:
            mask = self.map.blocks.get(region)
            if mask is None and len(self.map.blocks) >= limit:
                return None
            return mask or 0

    def mark_blocks(self, blocks: dict[int, int], full: Callable[[int], int]) -> set[int]:
        """Mark sub-blocks of owned absent regions written (their bytes are), and
        return the regions now written whole: the caller makes them present
        instead (``release``), so they are not marked."""
        whole = set()
        with self.cond:
            for r, mask in blocks.items():
                old = self.map.blocks.get(r, 0)
                if old | mask == full(r):
                    whole.add(r)
                elif mask & ~old:
                    self.map.add_blocks(r, mask)
                    if self._on_blocks is not None:
                        self._on_blocks(r, mask & ~old)
        return whole

    def write_blocks(self, region: int, mask: int, full: int, limit: int,
                     write: Callable[[], object]) -> bool:
        """A write of whole sub-blocks ``mask`` into absent ``region`` that leaves it
        absent, as ``take``, the write, ``mark_blocks`` and ``release`` would do it,
        in one hold of the lock: no fill can take the region meanwhile. False, with
        nothing written, if the region is present or owned, if the write would
        complete it (the caller makes it present instead), or if it has no
        sub-blocks yet and ``limit`` regions have some. ``write``'s OSError is
        raised with nothing marked."""
        with self.cond:
            if region in self.map or self._owned_within(region, region + 1):
                return False
            old = self.map.blocks.get(region)
            if old is None and len(self.map.blocks) >= limit or (old or 0) | mask == full:
                return False
            write()
            if mask & ~(old or 0):
                self.map.add_blocks(region, mask)
                if self._on_blocks is not None:
                    self._on_blocks(region, mask & ~(old or 0))
        return True

    def absent_runs(self, first: int, end: int) -> list[Run]:
        with self.cond:
            return [(a, b) for a, b, present in self.map.runs(first, end) if not present]

    def any_absent(self, first: int, end: int) -> bool:
        with self.cond:
            return self.map.find_absent(first, end) is not None

    def find_absent(self, start: int, stop: int | None = None) -> int | None:
        with self.cond:
            return self.map.find_absent(start, stop)

    def batch_end(self, start: int, stop: int, budget: int, gap: int,
                  max_reads: int | None = None) -> int:
        with self.cond:
            return self.map.batch_end(start, stop, budget, gap, max_reads)

    def is_present(self, region: int) -> bool:
        with self.cond:
            return region in self.map

    @property
    def complete(self) -> bool:
        return self.map.complete  # bits never go back: a stale True cannot happen

    # -- taking and giving back -------------------------------------------------

    def _owned_within(self, first: int, end: int) -> list[Run]:
        """The owned runs that overlap ``[first, end)``, in order."""
        owned = self._owned
        i = bisect.bisect_left(owned, (first, first))
        if i and owned[i - 1][1] > first:
            i -= 1
        j = bisect.bisect_left(owned, (end, end), i)
        return owned[i:j]

    def take(self, first: int, end: int, wait: bool) -> tuple[list[Run], list[Run]]:
        """Own the absent regions of ``[first, end)``; return them as runs, and the
        runs there that were present (the copier's "done without writing").

        With ``wait``, block until no region there is owned by another, then take
        every absent one (all at once, so two writers never deadlock). Without
        ``wait``, take only absent regions nobody owns."""
        with self.cond:
            if wait:
                while self._owned_within(first, end):
                    self.cond.wait()
            others = [] if wait else self._owned_within(first, end)
            taken: list[Run] = []
            present: list[Run] = []
            i = 0  # others before i end at or before the run in hand
            for a, b, is_present in self.map.runs(first, end):
                if is_present:
                    present.append((a, b))
                    continue
                while i < len(others) and others[i][1] <= a:
                    i += 1
                k = i
                while k < len(others) and others[k][0] < b:  # cut owned runs out
                    oa, ob = others[k]
                    if oa > a:
                        taken.append((a, oa))
                    a = max(a, ob)
                    k += 1
                if a < b:
                    taken.append((a, b))
            if taken:
                self._owned = sorted(self._owned + taken)  # merges two sorted lists
            return taken, present

    def release(self, runs: list[Run], present: list[Run]) -> None:
        """Give owned ``runs`` back; the regions of ``present`` (within them, in
        order) had their clone bytes written, so their bits are set, pending commit.

        The maximal present runs that hold ``present`` are noted, so runs separated
        only by regions already present are one: the durability layer commits it as
        one journal record. The gap's bits were set before ours, so its data is
        written too, and the fdatasync of the next commit covers it (invariant 6)."""
        with self.cond:
            if runs:
                gone = set(runs)
                self._owned = [r for r in self._owned if r not in gone]
            present = [(a, b) for a, b in present if b > a]
            if present:
                self.map.set_runs(present)  # one operation for many nearby runs
                k = 0  # the present runs that hold some of ours are noted
                for a, b, is_present in self.map.runs(present[0][0], present[-1][1]):
                    while k < len(present) and present[k][1] <= a:
                        k += 1
                    if is_present and k < len(present) and present[k][0] < b:
                        self._on_present((a, b))
            self.cond.notify_all()

    def try_take(self, first: int, end: int) -> list[Run] | None:
        """Own every absent region of ``[first, end)`` if none is owned by another,
        else None (nothing taken). Never waits."""
        with self.cond:  # an RLock: ``take`` takes it again
            if self._owned_within(first, end):
                return None
            return self.take(first, end, wait=False)[0]

    def owning(self, first: int, end: int, wait: bool = True) -> Owned:
        """Own the absent regions of ``[first, end)`` for a ``with`` block."""
        return Owned(self, self.take(first, end, wait)[0])


class Owned:
    """Owned runs, released on exit; made present on exit if ``made_present`` was set
    and the block raised nothing: all of them, or only the runs of ``present`` if
    set (regions keeping sub-blocks stay absent)."""

    def __init__(self, ownership: Ownership, runs: list[Run]) -> None:
        self.ownership = ownership
        self.runs = runs
        self.made_present = False
        self.present: list[Run] | None = None

    def __enter__(self) -> Owned:
        return self

    def __exit__(self, *exc: object) -> None:
        ok = self.made_present and exc[0] is None
        present = self.runs if self.present is None else self.present
        self.ownership.release(self.runs, present if ok else [])
