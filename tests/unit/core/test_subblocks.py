"""Sub-blocks: 4 KiB guest writes into absent regions without fetching the region.

Every test runs a real clone on a real file source and checks bytes: what reads
return, what the clone file holds once the copy ends, and how many source bytes
were read (``stats.bytes_from_source``, counted by the fill engine's reads).
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest

from liveclone.core import regions
from liveclone.core.clone import Clone
from liveclone.core.copier import Copier
from liveclone.core.digests import COPIED, GUEST
from liveclone.core.metadata import MapStore
from liveclone.core.opening import open_clone
from liveclone.core.regions import BLOCK_SIZE, RegionMap, subblock_limit
from liveclone.core.verify import verify_clone
from liveclone.sources.local import LocalFileSource
from tests.unit.core.test_digests import slots

RS = 64 << 10
B = BLOCK_SIZE


def _clone(tmp_path: Path, src: Path, rs: int = RS) -> Clone:
    return open_clone(str(tmp_path / "clone.img"), LocalFileSource(str(src)), region_size=rs,
                      create=True, exclusive=True)


def test_aligned_writes_read_no_source_and_the_copier_fills_only_the_rest(
        tmp_path: Path, source_image: tuple[Path, bytes]) -> None:
    src, data = source_image
    model = bytearray(data)
    with _clone(tmp_path, src) as c:
        for off in (RS + 3 * B, 5 * RS, 5 * RS + 15 * B, 9 * RS + 7 * B):
            blob = os.urandom(B)
            c.write(off, blob)
            model[off:off + B] = blob
        c.write_zeroes(7 * RS + B, 2 * B)  # zero-writes too
        model[7 * RS + B:7 * RS + 3 * B] = bytes(2 * B)
        assert c.stats.bytes_from_source == 0  # nothing fetched for any of them
        assert c.regions_present == 0 and c.regions_partial == 4
        assert bytes(c.read(0, 12 * RS)) == bytes(model[:12 * RS])
        c.flush()
        Copier(c).start().wait(60)
        assert c.complete and c.regions_partial == 0
    assert (tmp_path / "clone.img").read_bytes() == bytes(model)
    got = slots(str(tmp_path / "clone.img"), 12)
    assert [k for k, _ in got] == [COPIED, GUEST, COPIED, COPIED, COPIED, GUEST, COPIED,
                                   GUEST, COPIED, GUEST, COPIED, COPIED]
    rep = verify_clone(str(tmp_path / "clone.img"), LocalFileSource(str(src)))
    assert rep.ok and rep.guest_count == 4 and not rep.mismatched


def test_a_region_written_block_by_block_becomes_present_without_a_source_read(
        tmp_path: Path, source_image: tuple[Path, bytes]) -> None:
    src, data = source_image
    with _clone(tmp_path, src) as c:
        blobs = [os.urandom(B) for _ in range(RS // B)]
        for i in reversed(range(RS // B)):
            assert not c.is_present(2)
            c.write(2 * RS + i * B, blobs[i])
        assert c.is_present(2) and c.regions_partial == 0
        assert c.stats.bytes_from_source == 0
        assert bytes(c.read(2 * RS, RS)) == b"".join(blobs)


def test_partial_trim_of_an_absent_region_zeroes_only_whole_blocks(
        tmp_path: Path, source_image: tuple[Path, bytes]) -> None:
    src, data = source_image
    model = bytearray(data)
    with _clone(tmp_path, src) as c:
        c.trim(3 * RS + 100, 3 * B)  # whole blocks 1 and 2; blocks 0 and 3 partly
        model[3 * RS + B:3 * RS + 3 * B] = bytes(2 * B)
        assert not c.is_present(3) and c.regions_partial == 1
        assert bytes(c.read(3 * RS, RS)) == bytes(model[3 * RS:4 * RS])
        Copier(c).start().wait(60)
        assert c.complete
    assert (tmp_path / "clone.img").read_bytes() == bytes(model)


def test_sub_blocks_survive_a_crash_once_flushed_and_vanish_if_not(
        tmp_path: Path, source_image: tuple[Path, bytes]) -> None:
    src, data = source_image
    path = str(tmp_path / "clone.img")
    model = bytearray(data)
    c = _clone(tmp_path, src)
    kept, lost = os.urandom(B), os.urandom(B)
    c.write(4 * RS + 2 * B, kept)
    model[4 * RS + 2 * B:4 * RS + 3 * B] = kept
    c.flush()
    c.write(6 * RS, lost)  # never flushed: a crash may drop it
    c.abandon()  # as kill -9: the page cache (and ``lost`` in the file) survives
    assert MapStore.read(path)[1].blocks == {4: 0b100}
    with open_clone(path, LocalFileSource(str(src))) as c:
        assert c.regions_partial == 1 and c.stats.bytes_from_source == 0
        assert bytes(c.read(0, len(data))) == bytes(model)
        Copier(c).start().wait(60)  # fills block 0 of region 6 again from the source
    assert Path(path).read_bytes() == bytes(model)


def test_past_the_limit_a_partial_write_fills_its_region_first(
        tmp_path: Path, source_image: tuple[Path, bytes]) -> None:
    src, data = source_image
    model = bytearray(data)
    with _clone(tmp_path, src) as c:
        c.subblock_limit = 3
        for r in range(6):
            c.write(r * RS + B, b"w" * B)
            model[r * RS + B:r * RS + 2 * B] = b"w" * B
            if r == 2:
                assert c.stats.bytes_from_source == 0
        assert c.regions_partial == 3
        assert [c.is_present(r) for r in range(6)] == [False] * 3 + [True] * 3
        # the three read-modify-writes (a source hole is not read)
        assert 0 < c.stats.bytes_from_source <= 3 * (RS - B)
        c.write(1 * RS + 9 * B, b"v" * B)  # a region with sub-blocks keeps taking them
        model[RS + 9 * B:RS + 10 * B] = b"v" * B
        assert c.regions_partial == 3 and not c.is_present(1)
        assert bytes(c.read(0, len(data))) == bytes(model)


def test_sub_block_state_is_bounded_in_memory() -> None:
    """A client writing one 4 KiB block into every region of a huge clone: at most
    ``subblock_limit`` regions keep state, and that state stays within
    SUBBLOCK_MEMORY (a dict entry and a mask per region)."""
    for rs in (64 << 10, 1 << 20, 1 << 30):
        limit = subblock_limit(rs)
        rmap = RegionMap(2 * limit)
        tracemalloc.start()
        try:
            for r in range(limit):
                rmap.add_blocks(r, 1 << (r % (rs // B)))
            used = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert used <= regions.SUBBLOCK_MEMORY, (rs, limit, used)
    assert subblock_limit(4096) == 0 and subblock_limit(64 << 10) > 100_000


@pytest.mark.parametrize("rs", [16 << 10, 64 << 10])
def test_block_status_reports_written_blocks_from_the_clone(
        tmp_path: Path, source_image: tuple[Path, bytes], rs: int) -> None:
    src, _ = source_image
    with _clone(tmp_path, src, rs) as c:
        c.write_zeroes(rs + B, B)  # a hole punched in the clone, inside an absent region
        ext = [(e.offset, e.length, e.data) for e in c.block_status(rs, rs)
               if e.offset <= rs + B < e.offset + e.length]
        assert ext == [(rs + B, B, False)]


def test_copy_on_read_and_cache_fill_around_written_blocks(
        tmp_path: Path, source_image: tuple[Path, bytes]) -> None:
    """The other fills (a guest read with copy-on-read, CACHE) copy only the blocks
    not written, like the copier."""
    src, data = source_image
    model = bytearray(data)
    with _clone(tmp_path, src) as c:
        c.copy_on_read = True
        for r in (2, 8):
            c.write(r * RS + 5 * B, b"g" * B)
            model[r * RS + 5 * B:r * RS + 6 * B] = b"g" * B
        assert bytes(c.read(2 * RS, RS)) == bytes(model[2 * RS:3 * RS])
        c.cache(8 * RS, RS)
        assert c.is_present(2) and c.is_present(8) and c.regions_partial == 0
    with open(tmp_path / "clone.img", "rb") as f:
        got = f.read()
    for r in (2, 8):
        assert got[r * RS:(r + 1) * RS] == model[r * RS:(r + 1) * RS]


def test_a_nowait_block_write_leaves_a_region_a_fill_owns_alone(
        tmp_path: Path, source_image: tuple[Path, bytes]) -> None:
    """``write_nowait`` of whole blocks into one absent region (one hold of the
    ownership lock, ``Ownership.write_blocks``) is refused while a fill owns the
    region, writing nothing; once it is free, it writes the blocks and marks them,
    and a write that would complete the region is left to the general path."""
    src, data = source_image
    with _clone(tmp_path, src) as c:
        with c._own.owning(2, 3):  # as a fill of region 2 would
            assert not c.write_nowait(2 * RS + B, b"g" * B)
            with open(c.path, "rb") as f:
                f.seek(2 * RS + B)
                assert f.read(B) == bytes(B)  # the file is untouched
        assert c.regions_partial == 0
        assert c.write_nowait(2 * RS + B, b"g" * B)
        assert c.regions_partial == 1 and c.stats.bytes_from_source == 0
        assert bytes(c.read(2 * RS, RS)) == data[2 * RS:2 * RS + B] + b"g" * B + \
            data[2 * RS + 2 * B:3 * RS]
        rest = bytes(c.read(3 * RS, RS))
        c.write(3 * RS, rest[:RS - B])  # every block of region 3 but its last
        assert c.write_nowait(4 * RS - B, rest[RS - B:])  # completes it: present
        assert c.regions_present == 1 and c.regions_partial == 1
