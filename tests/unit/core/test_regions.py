from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from liveclone.core import copyc
from liveclone.core.regions import Geometry, RegionMap, check_region_size


def test_region_size_must_be_power_of_two_in_range() -> None:
    for ok in (4096, 65536, 1 << 30):
        check_region_size(ok)
    for bad in (0, 2048, 65535, 3 << 20, 2 << 30):
        with pytest.raises(ValueError):
            check_region_size(bad)


def test_geometry_short_last_region() -> None:
    g = Geometry(10_000, 4096)
    assert g.count == 3
    assert g.bounds(2) == (8192, 10_000)
    assert list(g.span(4095, 2)) == [0, 1]
    assert list(g.span(0, 0)) == []
    assert g.covers(8192, 1808, 2)
    assert not g.covers(8192, 1000, 2)


@given(st.integers(1, 200), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 200))))
def test_map_matches_a_set(count: int, ops: list[tuple[int, int]]) -> None:
    m, ref = RegionMap(count), set()
    for a, b in ops:
        a, b = min(a, count), min(b, count)
        a, b = min(a, b), max(a, b)
        assert m.set(a, b) == len(set(range(a, b)) - ref)
        ref |= set(range(a, b))
    assert m.present_count == len(ref)
    assert [r for r in range(count) if r in m] == sorted(ref)
    for start in range(count + 1):
        assert m.find_absent(start) == min((r for r in range(start, count) if r not in ref),
                                           default=None)
        assert m.find_present(start) == min((r for r in range(start, count) if r in ref),
                                            default=None)
    covered = [(a, b) for a, b, _ in m.runs(0, count)]
    assert sum(b - a for a, b in covered) == count
    assert RegionMap(count, m.to_bytes()).present_count == len(ref)


def test_bitmap_length_is_checked() -> None:
    with pytest.raises(ValueError):
        RegionMap(9, b"\x00")


@given(st.integers(1, 300), st.sets(st.integers(0, 299)), st.integers(0, 300),
       st.integers(0, 300))
def test_find_within_a_range(count: int, present: set[int], start: int, stop: int) -> None:
    m = RegionMap(count)
    for r in present:
        if r < count:
            m.set(r, r + 1)
    want = range(start, min(stop, count))
    assert m.find_absent(start, stop) == next((r for r in want if r not in present), None)
    assert m.find_present(start, stop) == next((r for r in want if r in present), None)


def _batch_cost(m: RegionMap, start: int, end: int, gap: int) -> int:
    """What ``batch_end`` promises to keep within the budget, counted from the runs."""
    runs = list(m.runs(start, end))
    cost = 0
    for i, (a, b, present) in enumerate(runs):
        if not present:
            cost += b - a
        elif 0 < i < len(runs) - 1:  # a gap between two absent runs
            cost += b - a if b - a <= gap else max(gap, 1)
    return cost


def _batch_reads(m: RegionMap, start: int, end: int, gap: int) -> int:
    """The separate reads a batch needs: its absent runs, those apart by a gap of
    at most ``gap`` counted as one."""
    runs = list(m.runs(start, end))
    return sum(1 for i, (a, b, present) in enumerate(runs) if not present
               and not (i > 1 and runs[i - 1][1] - runs[i - 1][0] <= gap))


@given(st.integers(1, 300), st.sets(st.integers(0, 299)), st.integers(0, 299),
       st.integers(1, 40), st.integers(0, 8), st.none() | st.integers(1, 6))
def test_batch_end_keeps_within_the_budget(count: int, present: set[int], start: int,
                                           budget: int, gap: int,
                                           max_reads: int | None) -> None:
    m = RegionMap(count)
    for r in present:
        if r < count:
            m.set(r, r + 1)
    start = min(start, count - 1)
    end = m.batch_end(start, count, budget, gap, max_reads)
    assert start < end <= count
    assert _batch_cost(m, start, end, gap) <= budget
    if max_reads is not None:
        assert _batch_reads(m, start, end, gap) <= max_reads
    first = m.find_absent(start)
    if first is not None:
        assert end > first  # a batch always makes progress
    else:
        assert end == count  # nothing to copy: the batch passes the rest


def test_batch_end_reads_short_gaps_along_and_prices_long_ones() -> None:
    m = RegionMap(100)
    m.set(10, 12)  # a 2-region gap
    m.set(20, 40)  # a 20-region gap
    # gap 4: the short gap costs 2, the long one 4 (one more read)
    assert m.batch_end(0, 100, 12, 4) == 10  # 10 absent + 2 gap = 12: ends before the gap
    assert m.batch_end(0, 100, 30, 4) == 46  # 10 + 2 + 8 + 4 + 6 = 30
    assert m.batch_end(0, 100, 1000, 4) == 100
    assert m.batch_end(20, 100, 5, 4) == 45  # a leading present run costs nothing
    # At most two reads: the short gap is read along, the long one starts the second.
    assert m.batch_end(0, 100, 1000, 4, max_reads=2) == 100
    assert m.batch_end(0, 100, 1000, 4, max_reads=1) == 20  # before the long gap
    assert m.batch_end(0, 100, 1000, 30, max_reads=1) == 100  # 20 regions read along


# Four 64 KiB chunks of bitmap and a short fifth: runs that pass chunk edges, and
# searches that go farther than the few bytes a regex looks ahead; a map this large
# starts as zero pages (an anonymous mapping), not a bytearray.
BIG = 4 * (64 << 10) * 8 + 77


@given(st.lists(st.integers(0, BIG), max_size=8), st.booleans(),
       st.lists(st.integers(0, BIG - 1), max_size=10))
def test_find_and_count_over_long_runs(edges: list[int], invert: bool,
                                       starts: list[int]) -> None:
    cuts = sorted(set(edges))
    runs = list(zip(cuts[::2], cuts[1::2], strict=False))  # present runs
    if invert:  # mostly present: the runs are the absent ones
        bounds = [0, *(x for run in runs for x in run), BIG]
        runs = [(a, b) for a, b in zip(bounds[::2], bounds[1::2], strict=True) if a < b]
    m = RegionMap(BIG)
    for a, b in runs:
        m.set(a, b)

    def present_from(s: int) -> int | None:
        return next((max(a, s) for a, b in runs if b > s), None)

    def absent_from(s: int) -> int | None:
        for a, b in runs:
            if a <= s < b:
                s = b
        return s if s < BIG else None

    chunk_edges = [k * (64 << 10) * 8 + d for k in range(1, 5) for d in (-1, 0, 1)]
    for s in [0, *starts, *chunk_edges, *cuts[:-1]]:
        s = min(s, BIG - 1)
        assert m.find_present(s) == present_from(s), s
        assert m.find_absent(s) == absent_from(s), s
    count = sum(b - a for a, b in runs)
    assert m.present_count == count
    assert RegionMap(BIG, m.to_bytes()).present_count == count
    # Runs over the whole map (many text windows; all-clear and all-set ones) and
    # over spans that start and end inside windows.
    assert [(a, b) for a, b, p in m.runs(0, BIG) if p] == [(a, b) for a, b in runs if a < b]
    for s in [0, *starts, *chunk_edges]:
        s = min(s, BIG - 1)
        e = min(BIG, s + 70_001)
        want = [(max(a, s), min(b, e)) for a, b in runs if a < e and b > s and a < b]
        assert [(a, b) for a, b, p in m.runs(s, e) if p] == want


@given(st.integers(65, 5000), st.sets(st.integers(0, 4999), max_size=400),
       st.integers(0, 4999), st.integers(0, 5000))
def test_runs_of_a_fragmented_span(count: int, present: set[int], start: int,
                                   stop: int) -> None:
    """Spans longer than a guest request's are split by the bits' text (``_TEXT``)."""
    m = RegionMap(count)
    for r in present:
        if r < count:
            m.set(r, r + 1)
    start, stop = min(start, count), min(stop, count)
    got = list(m.runs(start, stop))
    want: list[tuple[int, int, bool]] = []
    for r in range(start, stop):
        if want and want[-1][1] == r and want[-1][2] == (r in present):
            want[-1] = (want[-1][0], r + 1, r in present)
        else:
            want.append((r, r + 1, r in present))
    assert got == want


@given(st.lists(st.integers(0, 300_000), max_size=60), st.sets(st.integers(0, 299_999),
       max_size=50), st.sets(st.integers(0, 299_999), max_size=20))
def test_set_runs_is_set_of_each_run(edges: list[int], before: set[int],
                                     partial: set[int]) -> None:
    """Runs near each other (one integer OR), far apart and long: the same bits,
    count, and sub-block marks as ``set`` of each run."""
    cuts = sorted(set(edges))
    runs = [(a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=False) if a < b]
    one, each = RegionMap(300_000), RegionMap(300_000)
    for m in (one, each):
        for r in before:
            m.set(r, r + 1)
        for r in partial - before:
            m.add_blocks(r, 0b101)
    added = one.set_runs(runs)
    assert added == sum(each.set(a, b) for a, b in runs)
    assert one.to_bytes() == each.to_bytes()
    assert one.present_count == each.present_count == len(
        before | {r for a, b in runs for r in range(a, b)})
    assert one.blocks == each.blocks


def _python(fn):  # type: ignore[no-untyped-def]
    """``fn()`` with the map's Python paths (no ``bitruns.c``)."""
    lib = copyc.lib
    copyc.lib = None
    try:
        return fn()
    finally:
        copyc.lib = lib


@pytest.mark.skipif(copyc.lib is None, reason="liveclone.core._copyc is not built")
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, BIG), max_size=40), st.integers(0, BIG), st.integers(0, BIG),
       st.integers(1, 1 << 17), st.integers(0, 70), st.none() | st.integers(1, 50))
def test_compiled_runs_and_batch_end_match_python(edges: list[int], x: int, y: int,
                                                   budget: int, gap: int,
                                                   max_reads: int | None) -> None:
    """``bitruns.c`` gives the runs and batch ends that the Python code gives, over
    words, bytes and bits, windows and a map made of zero pages."""
    cuts = sorted(set(edges))
    m = RegionMap(BIG)
    m.set_runs([(a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=False) if a < b])
    start, stop = min(x, y), max(x, y) + 1
    assert list(m.runs(start, stop)) == _python(lambda: list(m.runs(start, stop)))
    assert m.batch_end(start, stop, budget, gap, max_reads) == \
        _python(lambda: m.batch_end(start, stop, budget, gap, max_reads))
