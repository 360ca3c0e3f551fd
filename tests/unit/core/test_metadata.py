"""The on-disk map: commit, reload, compaction, and refusal to guess on damage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from liveclone.core import metadata
from liveclone.core.metadata import JOURNAL_SUFFIX, MAP_SUFFIX, REC_SIZE, MapStore
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


def test_crash_between_compaction_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Superblock of G+1 written, journal of G left: load ignores the old journal."""
    path, store = _new(tmp_path)
    store.commit([(0, 5)])
    rmap = RegionMap(256)
    rmap.set(0, 5)

    def boom(generation: int) -> None:
        raise OSError("crash before step 3")

    monkeypatch.setattr(store, "_reset_journal", boom)
    with pytest.raises(OSError):
        store.compact(rmap)
    store.close()
    monkeypatch.undo()
    store2, got = MapStore.load(path)
    assert got.present_count == 5
    store2.commit([(7, 8)])
    store2.close()
    assert MapStore.read(path)[1].present_count == 6


def test_torn_tail_record_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit that died mid-write (never acknowledged) leaves a torn record: ignored."""
    path, store = _new(tmp_path)
    store.commit([(0, 1)])
    real_pwrite = os.pwrite

    def torn(fd: int, data: bytes, offset: int) -> int:
        real_pwrite(fd, bytes(data)[: REC_SIZE // 2], offset)
        raise OSError("crash mid-write")

    monkeypatch.setattr(metadata.os, "pwrite", torn)
    with pytest.raises(OSError):
        store.commit([(5, 6)])
    monkeypatch.undo()
    store.close()
    _, got = MapStore.read(path)
    assert got.present_count == 1 and 5 not in got


def test_damage_in_the_middle_is_refused(tmp_path: Path) -> None:
    path, store = _new(tmp_path)
    store.commit([(0, 1)])
    store.commit([(2, 3)])
    store.close()
    with open(path + JOURNAL_SUFFIX, "r+b") as f:
        f.seek(64 + 8)
        f.write(b"\xff")
    with pytest.raises(CorruptMetadataError, match="damaged"):
        MapStore.read(path)


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
