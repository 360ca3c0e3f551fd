"""The on-disk map: commit, reload, compaction, and refusal to guess on damage."""

from __future__ import annotations

import errno
import os
import threading
import zlib
from pathlib import Path

import pytest

from liveclone.core import fsops
from liveclone.core.metadata import JOURNAL_SUFFIX, MAP_SUFFIX, MapStore, _compress_zeros
from liveclone.core.regions import RegionMap
from liveclone.errors import CorruptMetadataError, NotACloneError


def _new(tmp_path: Path, size: int = 1 << 20, rs: int = 4096) -> tuple[str, MapStore]:
    path = str(tmp_path / "c.img")
    hdr = MapStore.new_header(size, rs, {"path": "/src", "size": size}, 0.0)
    return path, MapStore.create(path, hdr)


def test_commit_and_reload(tmp_path: Path) -> None:
    path, store = _new(tmp_path)
    store.commit([(0, 3), (10, 12)])
    store.commit([(100, 101)])
    store.close()
    _, rmap = MapStore.read(path)
    assert [r for r in range(rmap.count) if r in rmap] == [0, 1, 2, 10, 11, 100]
    store2, rmap2 = MapStore.load(path)
    assert rmap2.present_count == 6
    store2.commit([(5, 6)])
    store2.close()
    assert MapStore.read(path)[1].present_count == 7


def test_compaction_keeps_bits_and_empties_journal(tmp_path: Path) -> None:
    path, store = _new(tmp_path)
    store.commit([(0, 50)])
    rmap = RegionMap(256)
    rmap.set(0, 50)
    store.compact(rmap)
    assert store.records == 0
    store.commit([(60, 61)])
    store.close()
    _, got = MapStore.read(path)
    assert got.present_count == 51 and 60 in got


def _fail_nth(monkeypatch: pytest.MonkeyPatch, name: str, n: int, err: int) -> None:
    """Make the n-th call (from 1) of ``fsops.<name>`` fail with ``err``."""
    real = getattr(fsops, name)
    calls = [0]

    def wrapper(*args: object, **kw: object) -> object:
        calls[0] += 1
        if calls[0] == n:
            raise OSError(err, os.strerror(err))
        return real(*args, **kw)

    monkeypatch.setattr(fsops, name, wrapper)


def test_failed_journal_reset_breaks_the_store(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9, failure 1: superblock G+1 written, the journal reset fails. The store
    must never append to the journal of G (replay would ignore it): it refuses every
    later commit, and reopening finishes the compaction and keeps every bit."""
    path, store = _new(tmp_path)
    store.commit([(0, 5)])
    rmap = RegionMap(256)
    rmap.set(0, 5)
    # write_new_file: 1 = new superblock's tmp, 2 = new journal's tmp
    _fail_nth(monkeypatch, "write_new_file", 2, errno.ENOSPC)
    with pytest.raises(OSError):
        store.compact(rmap)
    assert store.broken
    with pytest.raises(OSError, match="cannot be written"):
        store.commit([(7, 8)])
    store.close()
    monkeypatch.undo()
    store2, got = MapStore.load(path)
    assert got.present_count == 5
    store2.commit([(7, 8)])
    store2.close()
    assert MapStore.read(path)[1].present_count == 6


def test_failed_superblock_write_postpones_compaction(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 1 failing changes nothing on disk: compaction reports False, commits go on."""
    path, store = _new(tmp_path)
    store.commit([(0, 5)])
    rmap = RegionMap(256)
    rmap.set(0, 5)
    _fail_nth(monkeypatch, "fsync", 1, errno.EIO)
    assert store.compact(rmap) is False
    assert not store.broken and not os.path.exists(path + MAP_SUFFIX + ".tmp")
    monkeypatch.undo()
    store.commit([(9, 10)])
    store.close()
    assert MapStore.read(path)[1].present_count == 6


@pytest.mark.parametrize("site", ["pwrite_all", "fdatasync"])
def test_failed_commit_breaks_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        site: str) -> None:
    """A failed journal write or fdatasync is never retried into success."""
    path, store = _new(tmp_path)
    store.commit([(0, 1)])
    _fail_nth(monkeypatch, site, 1, errno.EIO)
    with pytest.raises(OSError):
        store.commit([(5, 6)])
    monkeypatch.undo()
    with pytest.raises(OSError, match="cannot be written"):
        store.commit([(5, 6)])
    store.close()
    _, got = MapStore.read(path)
    assert 0 in got


def _journal_with_two_commits(tmp_path: Path, ranges: int) -> tuple[str, bytes, int, int]:
    """A journal holding commit 1 (one range) and commit 2 (``ranges`` ranges, several
    pages); return (path, its bytes, where commit 2 starts, where it ends)."""
    path, store = _new(tmp_path, size=64 << 20)
    store.commit([(0, 1)])
    start = store._write_pos
    store.commit([(2 * i + 2, 2 * i + 3) for i in range(ranges)])
    end = store._write_pos
    store.close()
    return path, Path(path + JOURNAL_SUFFIX).read_bytes(), start, end


def test_torn_commit_any_pages_lost_is_ignored(tmp_path: Path) -> None:
    """Issue 9, failure 3: power fails with any subset of one commit's 4 KiB pages
    on disk. The commit was never acknowledged: load must ignore it (never call the
    map corrupt), keep the earlier commit, and a later commit must replay."""
    path, raw, start, end = _journal_with_two_commits(tmp_path, 300)  # ~9.6 KB, 3-4 pages
    pages = list(range(start // 4096, (end - 1) // 4096 + 1))
    assert len(pages) >= 3
    for mask in range(1 << len(pages)):
        torn = bytearray(raw)
        for i, page in enumerate(pages):
            if not mask >> i & 1:  # this page never reached the disk: it is still zeros
                lo, hi = max(page * 4096, start), min((page + 1) * 4096, end)
                torn[lo:hi] = bytes(hi - lo)
        Path(path + JOURNAL_SUFFIX).write_bytes(bytes(torn))
        _, got = MapStore.read(path)
        whole = mask == (1 << len(pages)) - 1
        assert got.present_count == (301 if whole else 1), mask
        store, got = MapStore.load(path)  # undoes the torn tail
        store.commit([(1000, 1001)])
        store.close()
        _, got = MapStore.read(path)
        assert 1000 in got and 0 in got and (2 in got) == whole, mask


def test_damage_before_a_complete_commit_is_refused(tmp_path: Path) -> None:
    """A bad record followed by a complete later commit is real damage, not a tear."""
    path, raw, start, end = _journal_with_two_commits(tmp_path, 3)
    damaged = bytearray(raw)
    damaged[64 + 8] ^= 0xFF  # inside commit 1's range record
    Path(path + JOURNAL_SUFFIX).write_bytes(bytes(damaged))
    with pytest.raises(CorruptMetadataError, match="damaged"):
        MapStore.read(path)
    with pytest.raises(CorruptMetadataError, match="damaged"):
        MapStore.load(path)


def test_reader_never_sees_a_half_compacted_map(tmp_path: Path) -> None:
    """Issue 9, failure 4: ``status`` reads while the owner commits and compacts."""
    path, store = _new(tmp_path)
    rmap = RegionMap(256)
    stop = threading.Event()
    errors: list[BaseException] = []
    counts: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                counts.append(MapStore.read(path)[1].present_count)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return

    t = threading.Thread(target=reader)
    t.start()
    try:
        for r in range(200):
            store.commit([(r, r + 1)])
            rmap.set(r, r + 1)
            if r % 3 == 0:
                store.compact(RegionMap(256, rmap.to_bytes()))
    finally:
        stop.set()
        t.join()
        store.close()
    assert not errors, errors
    assert counts and counts == sorted(counts)  # bits never go back


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_superblock_is_refused(tmp_path: Path, damage: str) -> None:
    path, store = _new(tmp_path)
    store.close()
    sb = Path(path + MAP_SUFFIX)
    raw = bytearray(sb.read_bytes())
    if damage == "flip":
        raw[30] ^= 0x40
    else:
        raw = raw[:-9]
    sb.write_bytes(bytes(raw))
    with pytest.raises(CorruptMetadataError, match="corrupt"):
        MapStore.load(path)


def test_truncated_journal_is_refused(tmp_path: Path) -> None:
    path, store = _new(tmp_path)
    store.commit([(0, 1)])
    store.close()
    j = Path(path + JOURNAL_SUFFIX)
    j.write_bytes(j.read_bytes()[:64 + 20])
    with pytest.raises(CorruptMetadataError, match="truncated"):
        MapStore.read(path)


def test_missing_map_is_not_a_clone(tmp_path: Path) -> None:
    with pytest.raises(NotACloneError):
        MapStore.load(str(tmp_path / "nothing.img"))


def test_journal_of_another_clone_is_refused(tmp_path: Path) -> None:
    a, sa = _new(tmp_path)
    sa.close()
    b = str(tmp_path / "b.img")
    MapStore.create(b, MapStore.new_header(1 << 20, 4096, {}, 0.0)).close()
    os.replace(b + JOURNAL_SUFFIX, a + JOURNAL_SUFFIX)
    with pytest.raises(CorruptMetadataError, match="different clone"):
        MapStore.read(a)


# -- sub-blocks: written 4 KiB blocks of absent regions ---------------------------------

def test_sub_blocks_are_committed_compacted_and_read_back(tmp_path: Path) -> None:
    """Blocks records replay; a region later made present drops its blocks (in either
    order of records); a compaction keeps them in the superblock's section."""
    path, store = _new(tmp_path, rs=64 << 10)  # 16 blocks a region, 16 regions
    store.commit([], {3: 0b1011, 5: 1 << 15})
    store.commit([(5, 6)], {3: 0b0100, 7: 0b1})  # 5 present: its blocks are moot
    store.commit([(7, 8)])
    store.close()
    for _, rmap in (MapStore.read(path), MapStore.load(path)):
        assert rmap.blocks == {3: 0b1111} and 5 in rmap and 7 in rmap
    store, rmap = MapStore.load(path)
    store.compact(rmap)
    store.commit([], {9: 0b110})
    store.close()
    assert Path(path + MAP_SUFFIX).read_bytes()[:8] == b"LVCLMAP3"
    _, rmap = MapStore.read(path)
    assert rmap.blocks == {3: 0b1111, 9: 0b110} and rmap.present_count == 2


def test_a_block_record_out_of_range_is_damage(tmp_path: Path) -> None:
    path, store = _new(tmp_path, rs=16 << 10)  # 4 blocks a region
    store.commit([], {1: 1 << 4})  # block 4 of a 4-block region
    store.close()
    with pytest.raises(CorruptMetadataError, match="out of range"):
        MapStore.read(path)


def test_a_map_from_before_sub_blocks_opens_and_is_upgraded(tmp_path: Path) -> None:
    """A LVCLMAP2 superblock (no sub-block section) is read as it is, and rewritten
    as LVCLMAP3 when opened for writing, so an older liveclone refuses a journal that
    may now hold blocks records instead of dropping them as a torn commit."""
    import struct
    import zlib

    path, store = _new(tmp_path, rs=64 << 10)
    store.commit([(2, 4)])
    store.close()
    raw = Path(path + MAP_SUFFIX).read_bytes()
    _, hlen, blen, _ = struct.unpack_from("<8sIIQ", raw)
    v2 = bytearray(b"LVCLMAP2" + raw[8:24 + hlen + blen])
    v2 += struct.pack("<I", zlib.crc32(v2))
    Path(path + MAP_SUFFIX).write_bytes(bytes(v2))
    assert MapStore.read(path)[1].present_count == 2
    store, rmap = MapStore.load(path)
    assert Path(path + MAP_SUFFIX).read_bytes()[:8] == b"LVCLMAP3"
    assert rmap.present_count == 2 and not rmap.blocks
    store.commit([], {0: 0b11})
    store.close()
    assert MapStore.read(path)[1].blocks == {0: 0b11}


@pytest.mark.parametrize("n", [0, 1, 4095, 64 << 10, (64 << 10) + 1, 2 << 20, 3_000_017])
def test_a_new_maps_zeros_are_one_zlib_stream_of_exactly_them(n: int) -> None:
    """The bitmap of a map with no region present is made without compressing its
    zeros (``_compress_zeros``): still one zlib stream, its checksum right, ending
    where it says."""
    d = zlib.decompressobj()
    assert d.decompress(_compress_zeros(n)) == bytes(n)
    assert d.eof and not d.unused_data


def test_a_new_1tib_map_reads_back_empty(tmp_path: Path) -> None:
    clone = str(tmp_path / "c.img")
    header = MapStore.new_header(1 << 40, 64 << 10, {"path": "s"}, 0.0)
    MapStore.create(clone, header).close()
    _, rmap = MapStore.read(clone)
    assert rmap.count == 1 << 24 and rmap.present_count == 0
