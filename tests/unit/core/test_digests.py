"""Region digests (core.digests): what the fills record, the guest marks and their
order against the data, the format upgrade and damage."""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from liveclone.core import digests, fsops
from liveclone.core.clone import Clone
from liveclone.core.copier import Copier
from liveclone.core.digests import COPIED, GUEST, NONE, OPEN, Digester, digest_path
from liveclone.core.metadata import MapStore
from liveclone.core.opening import open_clone
from liveclone.core.verify import verify_clone
from liveclone.errors import CorruptMetadataError
from liveclone.sources.local import LocalFileSource

RS = 4096


def slots(path: str, count: int) -> list[tuple[int, int]]:
    fd = os.open(digest_path(path), os.O_RDONLY)
    try:
        return digests.read_slots(fd, 0, count)
    finally:
        os.close(fd)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_digester_equals_a_digest_of_each_region(data: st.DataObject) -> None:
    """Pieces of data and zeros, cut anywhere, in order: each region's digest is
    XXH3-64 of its bytes, the short last region's included."""
    rs = data.draw(st.sampled_from([4096, 8192]))
    size = data.draw(st.integers(1, 6 * rs))
    rng = random.Random(data.draw(st.integers(0, 1 << 30)))
    content = bytearray(rng.randbytes(size))
    cuts = sorted({0, size, *data.draw(st.lists(st.integers(0, size), max_size=8))})
    dg = Digester(size, rs)
    for a, b in zip(cuts, cuts[1:], strict=False):
        if rng.random() < 0.4:
            content[a:b] = bytes(b - a)
            dg.zeros(a, b)
        else:
            dg.data(a, memoryview(content)[a:b])
    want = [(r, xxhash.xxh3_64_intdigest(bytes(content[r * rs:(r + 1) * rs])))
            for r in range((size + rs - 1) // rs)]
    assert sorted(dg.items().items()) == want


def test_digester_gives_no_digest_across_a_gap() -> None:
    dg = Digester(2 * RS, RS)
    dg.data(0, b"a" * 100)
    dg.data(200, b"b" * (RS - 200))  # bytes 100-200 never given
    dg.data(RS, b"c" * RS)
    assert list(dg.items()) == [1]


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    """Data, a zero block inside it, a hole, and a short last region."""
    rng = random.Random(3)
    data = bytearray(rng.randbytes(40 * RS + 1000))
    data[5 * RS:7 * RS] = bytes(2 * RS)
    data[20 * RS + 100:30 * RS] = bytes(10 * RS - 100)
    p = tmp_path / "src.img"
    with open(p, "wb") as f:
        f.write(data[:20 * RS + 100])
        f.seek(30 * RS)  # a real hole in the source
        f.write(data[30 * RS:])
    return p, bytes(data)


def test_copied_regions_carry_the_digest_of_their_bytes(tmp_path: Path,
                                                        source: tuple[Path, bytes]) -> None:
    src, data = source
    path = str(tmp_path / "c.img")
    with open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True) as c:
        assert Copier(c, batch_bytes=8 * RS).start().wait(30) and c.complete
        count = c.regions_total
    got = slots(path, count)
    for r in range(count):
        assert got[r] == (COPIED, xxhash.xxh3_64_intdigest(data[r * RS:(r + 1) * RS])), r


def test_guest_regions_are_marked_and_copied_ones_keep_their_digest(
        tmp_path: Path, source: tuple[Path, bytes]) -> None:
    src, data = source
    path = str(tmp_path / "c.img")
    with open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True) as c:
        c.write(3 * RS + 10, b"x" * 10)  # partial write: filled, then written
        c.write_zeroes(8 * RS, RS)  # a whole absent region: a hole, nothing copied
        c.trim(12 * RS, 2 * RS)  # whole regions: punched
        c.fill(15, 17)
        c.write(16 * RS, b"y")  # a copied region, then written: write intent
        c.trim(15 * RS + 8, 100)  # part of a copied region punched: marked too
        c.flush()
        count = c.regions_total
    got = slots(path, count)
    for r in (3, 8, 12, 13, 15, 16):
        assert got[r][0] == GUEST, r
    assert got[14] == (NONE, 0)  # never made present
    assert got[17][0] == NONE


def state_flag(path: str, count: int) -> bytes:
    with open(digest_path(path), "rb") as f:
        f.seek(digests.state_offset(count))
        return f.read(8)


def test_write_intent_opens_a_zone_durably_before_the_guests_bytes(
        tmp_path: Path, source: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """Write intent, per zone: the state block says open durably first; then the
    zone's copied slots say open, durably, before the guest's bytes reach one of its
    regions. Other regions of an open zone need no sync, a region of another zone
    does. A clean close turns the written regions' slots to guest and the others
    back to copied, with their digests."""
    monkeypatch.setattr(digests, "ZONE_SHIFT", 2)  # zones of 4 regions
    src, _ = source
    path = str(tmp_path / "c.img")
    c = open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True,
                   autocommit=False)
    count = c.regions_total
    events: list[str] = []
    real_sync, real_write = fsops.fdatasync, fsops.pwrite_all

    def sync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".lcdigest"):
            events.append(f"digest synced, flag {state_flag(path, count)!r}, "
                          f"slots {[k for k, _ in slots(path, 10)[4:10]]}")
        real_sync(fd)

    def write(fd: int, data: object, offset: int, progress: object = None) -> None:
        if fd == c._fd:  # the guest's bytes
            events.append(f"data at region {offset // RS}, slot kind "
                          f"{slots(path, 10)[offset // RS][0]}")
        real_write(fd, data, offset, progress)  # type: ignore[arg-type]

    try:
        c.fill(0, 10)
        c.flush()
        before = slots(path, 10)
        assert [k for k, _ in before] == [COPIED] * 10 and state_flag(path, count) == bytes(8)
        monkeypatch.setattr(fsops, "fdatasync", sync)
        monkeypatch.setattr(fsops, "pwrite_all", write)
        c.write(6 * RS + 5, b"guest")
        c.write(6 * RS + 5, b"again")
        c.write(7 * RS, b"other")
        c.write(9 * RS, b"next zone")
        flag = repr(b"LVCLOPEN")
        assert events == [
            f"digest synced, flag {flag}, slots {[COPIED] * 6}",
            f"digest synced, flag {flag}, slots {[OPEN] * 4 + [COPIED] * 2}",
            f"data at region 6, slot kind {OPEN}",
            f"data at region 6, slot kind {OPEN}",
            f"data at region 7, slot kind {OPEN}",
            f"digest synced, flag {flag}, slots {[OPEN] * 6}",
            f"data at region 9, slot kind {OPEN}",
        ]
        assert slots(path, 10)[:4] == before[:4]  # zone 0 never opened
    finally:
        monkeypatch.undo()
        c.close()
    after = slots(path, 10)
    assert [k for k, _ in after] == [COPIED] * 6 + [GUEST, GUEST, COPIED, GUEST]
    assert [after[r] for r in (0, 1, 2, 3, 4, 5, 8)] == [before[r] for r in (0, 1, 2, 3, 4, 5, 8)]
    assert state_flag(path, count) == bytes(8)
    rep = verify_clone(path)
    assert rep.ok and rep.guest_runs == [(6, 8), (9, 10)], rep.to_json()


def test_a_fill_into_an_open_zone_writes_open_slots(
        tmp_path: Path, source: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """A region filled after its zone opened gets an open slot (its digest kept),
    so a guest write there needs no sync; the close sorts the zone out."""
    monkeypatch.setattr(digests, "ZONE_SHIFT", 2)
    src, _ = source
    path = str(tmp_path / "c.img")
    synced: list[int] = []
    real_sync = fsops.fdatasync
    with open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True,
                    autocommit=False) as c:
        c.fill(0, 2)
        c.write(0, b"opens zone 0")
        c.fill(2, 4)
        assert [k for k, _ in slots(path, 4)] == [OPEN] * 4
        monkeypatch.setattr(fsops, "fdatasync", lambda fd: (synced.append(fd), real_sync(fd)))
        c.write(3 * RS + 1, b"no sync")
        assert synced == []
        monkeypatch.undo()
    assert [k for k, _ in slots(path, 4)] == [GUEST, COPIED, COPIED, GUEST]
    assert verify_clone(path).guest_runs == [(0, 1), (3, 4)]


def test_a_digest_file_from_before_zones_gets_its_state_block_or_keeps_region_intent(
        tmp_path: Path, source: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """A digest file sized as before zones (no state block) gets one when opened for
    writing, and intent goes by zones. Where it cannot be allocated (a full disk),
    intent stays per region: a "guest" slot synced before each first write."""
    src, _ = source
    path = str(tmp_path / "c.img")
    with open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True) as c:
        c.fill(0, 10)
        count = c.regions_total
    old_size = digests.HEADER_SIZE + count * digests.SLOT_SIZE
    os.truncate(digest_path(path), old_size)  # as a file made before zones
    with open_clone(path, LocalFileSource(str(src))) as c:
        assert os.path.getsize(digest_path(path)) == digests.state_offset(count) + 4096
        c.write(2 * RS, b"zone")
        assert slots(path, 10)[2][0] == OPEN and state_flag(path, count) == b"LVCLOPEN"
    assert slots(path, 10)[2][0] == GUEST and state_flag(path, count) == bytes(8)

    os.truncate(digest_path(path), old_size)
    real = os.posix_fallocate

    def full(fd: int, offset: int, length: int) -> None:
        if offset >= old_size:
            raise OSError(28, "No space left on device")
        real(fd, offset, length)

    monkeypatch.setattr(digests.os, "posix_fallocate", full)
    with open_clone(path, LocalFileSource(str(src))) as c:
        c.write(5 * RS, b"region")
        assert slots(path, 10)[5][0] == GUEST  # at once, per region
        assert [k for k, _ in slots(path, 10)].count(OPEN) == 0
    assert os.path.getsize(digest_path(path)) == old_size


def test_a_stop_without_close_leaves_open_slots_that_the_next_open_settles(
        tmp_path: Path, source: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """After a crash with zones open, verify counts changed open regions as the
    guest's and the others as matched; the next open settles each open slot by the
    region's bytes (changed: guest; same: copied) and clears the state block, and
    from then on damage in a settled copied region is found again."""
    monkeypatch.setattr(digests, "ZONE_SHIFT", 2)
    src, data = source
    path = str(tmp_path / "c.img")
    c = open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True)
    count = c.regions_total
    c.fill(0, count)
    c.flush()
    c.write(3 * RS, b"changed")
    c.write(9 * RS, data[9 * RS:9 * RS + 100])  # the same bytes again
    c.flush()
    c.abandon()  # as kill -9: no clean close
    kinds = [k for k, _ in slots(path, 12)]
    assert kinds == [OPEN] * 4 + [COPIED] * 4 + [OPEN] * 4
    assert state_flag(path, count) == b"LVCLOPEN"
    rep = verify_clone(path)
    assert rep.ok and rep.guest_runs == [(3, 4)] and rep.matched == count - 1
    with open_clone(path, LocalFileSource(str(src))):
        pass
    assert [k for k, _ in slots(path, 12)] == [COPIED] * 3 + [GUEST] + [COPIED] * 8
    assert state_flag(path, count) == bytes(8)
    with open(path, "r+b") as f:
        f.seek(9 * RS + 7)
        f.write(bytes([data[9 * RS + 7] ^ 1]))
    rep = verify_clone(path)
    assert rep.mismatched == [9] and rep.guest_runs == [(3, 4)], rep.to_json()


def _syncs_of(c: Clone, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the files ``c`` fdatasyncs, in order ("clone", "lcdigest",
    "lcjournal"); each sync still happens."""
    order: list[str] = []
    real = fsops.fdatasync

    def sync(fd: int) -> None:
        order.append("clone" if fd == c._fd
                     else os.readlink(f"/proc/self/fd/{fd}").rsplit(".", 1)[-1])
        real(fd)

    monkeypatch.setattr(fsops, "fdatasync", sync)
    return order


def test_a_commit_syncs_the_digests_after_the_data_and_before_the_map(
        tmp_path: Path, source: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = source
    path = str(tmp_path / "c.img")
    c = open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True,
                   autocommit=False)
    try:
        c.fill(0, 4)
        order = _syncs_of(c, monkeypatch)
        c.flush()
    finally:
        c.close()
    assert order[:3] == ["clone", "lcdigest", "lcjournal"]


def test_a_commit_syncs_the_digests_only_after_slots_were_written(
        tmp_path: Path, source: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """An fdatasync costs a disk cache flush even with nothing to write: a commit
    skips the digest file's when no slot was written since its last sync (a guest's
    write intent syncs its own), and never when one was."""
    src, _ = source
    path = str(tmp_path / "c.img")
    c = open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True,
                   autocommit=False)
    order = _syncs_of(c, monkeypatch)
    try:
        c.fill(0, 4)  # "copied" slots
        c.flush()
        assert order == ["clone", "lcdigest", "lcjournal"]
        order.clear()
        c.flush()  # nothing written anywhere
        assert order == ["clone"]
        order.clear()
        c.write(1 * RS, b"guest")  # write intent: the state block, then the zone's slots
        c.flush()
        assert order == ["lcdigest", "lcdigest", "clone"]
        order.clear()
        c.write(6 * RS, bytes(RS))  # an absent region made present: "guest", no sync yet
        c.fill(8, 10)
        c.flush()
        assert order == ["clone", "lcdigest", "lcjournal"]
    finally:
        c.close()
    assert [k for k, _ in slots(path, 10)] == [COPIED, GUEST, COPIED, COPIED, NONE,
                                               NONE, GUEST, NONE, COPIED, COPIED]


def _as_version_1(path: str) -> None:
    """Make a clone look as one made before digests: a LVCLMAP1 superblock, no
    digest file."""
    raw = Path(path + ".lcmap").read_bytes()
    _, hlen, blen, _ = struct.unpack_from("<8sIIQ", raw)
    v1 = bytearray(b"LVCLMAP1" + raw[8:24 + hlen + blen])  # nor sub-blocks
    v1 += struct.pack("<I", zlib.crc32(v1))
    Path(path + ".lcmap").write_bytes(bytes(v1))
    os.unlink(digest_path(path))


def test_a_map_from_before_digests_is_upgraded(tmp_path: Path,
                                               source: tuple[Path, bytes]) -> None:
    src, data = source
    path = str(tmp_path / "c.img")
    with open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True) as c:
        c.fill(0, 10)
    _as_version_1(path)
    header, rmap = MapStore.read(path)  # readers take the old map as it is
    assert rmap.present_count == 10
    with open_clone(path, LocalFileSource(str(src))) as c:
        # Upgraded at open, before anything else is written: an older liveclone,
        # which would not keep the digests, now refuses the map.
        assert Path(path + ".lcmap").read_bytes()[:8] == b"LVCLMAP3"
        assert c.regions_committed == 10
        assert Copier(c).start().wait(30) and c.complete
    got = slots(path, 41)
    assert all(k == NONE for k, _ in got[:10])  # copied before digests: unverified
    assert got[20] == (COPIED, xxhash.xxh3_64_intdigest(data[20 * RS:21 * RS]))
    assert Path(path).read_bytes() == data


def test_a_damaged_digest_file_is_refused_with_the_fix(tmp_path: Path,
                                                       source: tuple[Path, bytes]) -> None:
    src, _ = source
    path = str(tmp_path / "c.img")
    with open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True) as c:
        c.fill(0, 3)
    with open(digest_path(path), "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(CorruptMetadataError, match=r"digest file .* is damaged.*remove"):
        open_clone(path, LocalFileSource(str(src)))
    os.unlink(digest_path(path))  # the fix the message names
    with open_clone(path, LocalFileSource(str(src))) as c:
        assert c.regions_committed == 3
    assert slots(path, 3) == [(NONE, 0)] * 3


def test_a_damaged_slot_reads_as_damaged_never_as_a_digest() -> None:
    raw = bytearray(digests.encode_slot(COPIED, 12345))
    assert digests.decode_slot(raw) == (COPIED, 12345)
    for byte in (2, 9, 13):  # digest, kind, CRC
        bad = bytearray(raw)
        bad[byte] ^= 1
        assert digests.decode_slot(bad)[0] == digests.DAMAGED


def test_a_failed_digest_write_in_a_fill_leaves_its_regions_absent(
        tmp_path: Path, source: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """A fill whose slots cannot be written makes nothing present (a bit never goes
    without its slot) and fails the clone (invariant 9); a reopen copies again."""
    import errno

    src, data = source
    path = str(tmp_path / "c.img")
    c = open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True,
                   autocommit=False)
    real = fsops.pwrite_all

    def failing(fd: int, *args: object, **kw: object) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".lcdigest"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd, *args, **kw)  # type: ignore[arg-type]

    try:
        monkeypatch.setattr(fsops, "pwrite_all", failing)
        with pytest.raises(OSError) as info:
            c.fill(0, 4)
        assert info.value.errno == errno.EIO
        assert not any(c.is_present(r) for r in range(4))
        assert c.failure is not None and "digest file" in c.failure
    finally:
        c.close()
    monkeypatch.undo()
    with open_clone(path, LocalFileSource(str(src))) as c:
        assert c.regions_committed == 0
        c.fill(0, 4)
    assert slots(path, 4) == [(COPIED, xxhash.xxh3_64_intdigest(data[r * RS:(r + 1) * RS]))
                              for r in range(4)]


def test_write_intents_arriving_together_share_a_sync(
        tmp_path: Path, source: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """Guests writing to copied regions at once: their slots ("open", by zones) are made
    durable by fewer fdatasyncs than writes, and none writes its bytes before the
    sync that covers its slot has ended."""
    import threading
    import time

    monkeypatch.setattr(digests, "ZONE_SHIFT", 2)  # 16 regions in 4 zones
    src, _ = source
    path = str(tmp_path / "c.img")
    c = open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True,
                   autocommit=False)
    real_sync, real_write = fsops.fdatasync, fsops.pwrite_all
    syncs = 0
    durable: set[int] = set()  # regions whose guest slot a completed sync covered
    errors: list[str] = []

    def sync(fd: int) -> None:
        nonlocal syncs
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".lcdigest"):
            # What this sync covers: the slots written before it starts.
            covered = {r for r, (k, _) in enumerate(slots(path, 40)) if k in (GUEST, OPEN)}
            time.sleep(0.05)  # a slow disk: intents pile up behind the running sync
            real_sync(fd)
            syncs += 1
            durable.update(covered)
            return
        real_sync(fd)

    def write(fd: int, data: object, offset: int, progress: object = None) -> None:
        if fd == c._fd and offset % RS == 7:  # a guest's bytes
            if offset // RS not in durable:
                errors.append(f"region {offset // RS} written before its slot was durable")
        real_write(fd, data, offset, progress)  # type: ignore[arg-type]

    try:
        c.fill(0, 40)
        c.flush()
        monkeypatch.setattr(fsops, "fdatasync", sync)
        monkeypatch.setattr(fsops, "pwrite_all", write)
        threads = [threading.Thread(target=c.write, args=(r * RS + 7, b"g")) for r in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        c.close()
    assert not errors, errors
    assert syncs < 16, syncs
    assert [k for k, _ in slots(path, 16)] == [GUEST] * 16


def test_a_fragmented_fill_writes_its_slots_together_and_keeps_the_guests(
        tmp_path: Path, source: tuple[Path, bytes], monkeypatch) -> None:
    """A fill of runs between guest-written regions writes their slots in one write
    per group, with the guest slots between them read back: every guest slot stays
    "guest", every copied one has its digest. Runs far apart are written apart."""
    src, data = source
    path = str(tmp_path / "c.img")
    with open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True) as c:
        count = c.regions_total
        guest = list(range(1, 20, 2))
        for r in guest:
            c.write(r * RS, b"g" * RS)  # whole regions: present, slot "guest"
        writes: list[int] = []
        real = fsops.pwrite_all

        def spy(fd: int, buf: Any, offset: int, progress: Any = None) -> None:
            if fd == c._durability._store.digests._fd:
                writes.append(len(buf))
            real(fd, buf, offset, progress)

        monkeypatch.setattr(fsops, "pwrite_all", spy)
        c.fill(0, 20)
        assert writes == [19 * digests.SLOT_SIZE]  # regions 0-18: one write
        for r in (21, 23, 25):
            c.write(r * RS, b"g" * RS)
        monkeypatch.setattr(digests, "SLOT_GAP", 0)  # no slot between runs is read back
        writes.clear()
        c.fill(20, 27)
        assert writes == [digests.SLOT_SIZE] * 4  # 20, 22, 24, 26: one write each
        guest += [21, 23, 25]
        c.flush()
    got = slots(path, count)
    for r in guest:
        assert got[r][0] == GUEST, r
    for r in range(0, 27, 2):
        assert got[r] == (COPIED, xxhash.xxh3_64_intdigest(data[r * RS:(r + 1) * RS])), r


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_opening_slots_equals_opening_them_one_by_one(data: st.DataObject) -> None:
    """``_make_open`` (runs of equal slots converted at once) turns exactly the
    copied slots of opening or open zones into open slots with their digests, and
    notes exactly those as converted: the same as a slot-by-slot loop."""
    count = data.draw(st.integers(1, 64))
    store = digests.DigestStore("unused", -1, count)
    store._shift, store._zone = 2, bytearray((count >> 2) + 1)  # zones of 4 regions
    for z in data.draw(st.sets(st.integers(0, count >> 2))):
        store._zone[z] = data.draw(st.sampled_from([1, 2]))
    kinds = [(digests.COPIED, 7), (digests.COPIED, 9), (digests.GUEST, 0), (digests.NONE, 0),
             (digests.OPEN, 7)]
    cells = data.draw(st.lists(st.sampled_from(kinds), min_size=count, max_size=count))
    raw = bytearray(b"".join(digests.encode_slot(*c) if c[0] else bytes(16) for c in cells))
    want = bytearray(raw)
    opened = set()
    for r, (kind, digest) in enumerate(cells):
        if kind == digests.COPIED and store._zone[r >> 2]:
            want[r * 16:(r + 1) * 16] = digests.encode_slot(digests.OPEN, digest)
            opened.add(r)
    assert store._make_open(raw, 0) == bool(opened)
    assert raw == want
    assert {r for r in range(count) if r in store._converted} == opened
