from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
