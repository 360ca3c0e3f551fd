"""core.verify in-process: regions larger than a read, and a guest writing while a
verify reads (the order bytes-then-slots)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import threading
from pathlib import Path

import pytest

from liveclone.core import fsops, verify
from liveclone.core.copier import Copier
from liveclone.core.opening import open_clone
from liveclone.sources.local import LocalFileSource

RS = 64 << 10


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    data = bytearray(random.Random(5).randbytes(20 * RS + 999))
    data[4 * RS:6 * RS] = bytes(2 * RS)
    p = tmp_path / "src.img"
    p.write_bytes(data)
    return p, bytes(data)


def _complete_clone(tmp_path: Path, src: Path, region_size: int = RS) -> str:
    """A clone of ``src``, copied in full; returns its path."""
    path = str(tmp_path / "c.img")
    with open_clone(path, LocalFileSource(str(src)), region_size=region_size,
                    create=True) as c:
        assert Copier(c).start().wait(30) and c.complete
    return path


def test_regions_larger_than_a_read_are_digested_in_pieces(
        tmp_path: Path, source: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = source
    path = _complete_clone(tmp_path, src)
    monkeypatch.setattr(verify, "CHUNK", 12288)  # not even a divisor of the region
    with LocalFileSource(str(src)) as s:
        rep = verify.verify_clone(path, s)
    assert rep.ok and rep.matched == rep.source_matched == 21
    with open(path, "r+b") as f:
        f.seek(20 * RS + 998)  # the last byte of the short last region
        f.write(b"\x01")
    rep = verify.verify_clone(path)
    assert rep.mismatched == [20] and rep.mismatch_count == 1


def test_a_guest_write_racing_a_verify_is_never_a_mismatch(
        tmp_path: Path, source: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """Just before verify reads a chunk's bytes, the guest writes into a copied
    region of it: since verify reads the slots after the bytes, and the guest's slot
    is made "guest" before its bytes, the region is reported as guest-written."""
    src, _ = source
    path = str(tmp_path / "c.img")
    c = open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True)
    try:
        assert Copier(c).start().wait(30) and c.complete
        c.flush()
        monkeypatch.setattr(verify, "CHUNK", 4 * RS)
        real = verify._Reader._read
        wrote: list[int] = []

        def racing(self: verify._Reader, pos: int, n: int, buf: memoryview) -> object:
            for r in (2, 9):
                if pos <= r * RS < pos + n and r not in wrote:
                    wrote.append(r)
                    c.write(r * RS + 100, b"guest bytes")  # another thread's, in real life
            return real(self, pos, n, buf)

        monkeypatch.setattr(verify._Reader, "_read", racing)
        rep = verify.verify_clone(path)
    finally:
        c.close()
    assert wrote == [2, 9]
    assert rep.ok, rep.to_json()
    assert rep.guest_runs == [(2, 3), (9, 10)] and rep.matched == 19


def test_a_source_of_another_size_never_verifies(tmp_path: Path,
                                                 source: tuple[Path, bytes]) -> None:
    src, data = source
    path = _complete_clone(tmp_path, src)
    with open(src, "ab") as f:
        f.write(b"more")
    with LocalFileSource(str(src)) as s:
        rep = verify.verify_clone(path, s)
    assert not rep.ok and rep.source_resized and rep.mismatch_count == 0
    assert rep.source_problem is not None and "bytes" in rep.source_problem


class _NoFdSource(LocalFileSource):
    """A source read only by pread, as a remote one is (no holes known)."""

    def fileno(self) -> None:  # type: ignore[override]
        return None


def test_holes_and_data_across_chunk_boundaries(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 3 regions over data runs and hole runs that cross their boundaries
    (the reader walks the clone's extents once, for every chunk): a clean clone
    verifies with only its data regions read, and a changed byte is found in a
    hole run, just after one, and in a data run at a chunk's first region."""
    monkeypatch.setattr(verify, "CHUNK", 3 * RS)
    monkeypatch.setattr(verify, "DEPTH", 2)
    monkeypatch.setattr(verify, "AHEAD", 4 * RS)
    rng = random.Random(9)
    data = bytearray(24 * RS + 999)
    for r in [0, 1, 2, 3, 4, 14, 17, 18, 19, 20, 21, 22]:
        data[r * RS:(r + 1) * RS] = rng.randbytes(RS)
    data[5 * RS:5 * RS + 8192] = rng.randbytes(8192)  # a region only partly data
    data[24 * RS:] = rng.randbytes(999)
    src = tmp_path / "src.img"
    src.write_bytes(data)
    path = _complete_clone(tmp_path, src)
    with LocalFileSource(str(src)) as s:
        rep = verify.verify_clone(path, s)
    assert rep.ok and rep.matched == rep.source_matched == 25, rep.to_json()
    assert rep.bytes_read == 13 * RS + 999  # the regions holding data, and no more
    with _NoFdSource(str(src)) as s:
        rep = verify.verify_clone(path, s)
    assert rep.ok and rep.source_matched == 25
    with open(path, "r+b") as f:
        for off in (10 * RS + 7, 14 * RS + 5, 18 * RS + 100):
            f.seek(off)
            f.write(bytes([data[off] ^ 1]))
    with open(src, "r+b") as f:
        f.seek(3 * RS + 1)
        f.write(bytes([data[3 * RS + 1] ^ 1]))
    for cls in (LocalFileSource, _NoFdSource):
        with cls(str(src)) as s:
            rep = verify.verify_clone(path, s)
        assert rep.mismatched == [10, 14, 18] and rep.mismatch_count == 3
        assert rep.source_mismatched == [3] and rep.source_mismatch_count == 1
        assert rep.matched == 22 and rep.source_matched == 24
        assert rep.bytes_read == 14 * RS + 999  # the hole region written is read


@pytest.mark.timeout(60)
def test_a_read_error_is_raised_and_no_reader_is_left(
        tmp_path: Path, source: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = source
    path = _complete_clone(tmp_path, src)
    monkeypatch.setattr(verify, "CHUNK", 2 * RS)
    real = verify._Reader._read
    calls: list[int] = []

    def failing(self: verify._Reader, pos: int, n: int, buf: memoryview) -> object:
        calls.append(pos)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error")
        return real(self, pos, n, buf)

    monkeypatch.setattr(verify._Reader, "_read", failing)
    with pytest.raises(OSError) as e:
        verify.verify_clone(path)
    assert e.value.errno == errno.EIO
    assert not [t for t in threading.enumerate() if t.name == "verify-read"]


def _cached(path: str) -> int:
    """Bytes of the file at ``path`` in the page cache (mincore of a mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size, page = os.path.getsize(path), mmap.PAGESIZE
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        at = ctypes.c_char.from_buffer(m)
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(at)), ctypes.c_size_t(size), vec)
        del at
        assert rc == 0, os.strerror(ctypes.get_errno())
        return sum(v & 1 for v in vec) * page
    finally:
        m.close()


def test_the_read_ahead_asks_for_data_never_for_holes(tmp_path: Path) -> None:
    """verify asks the kernel to read ahead (WILLNEED) only the data of a sparse
    clone: over a hole that would fill the page cache with zero pages, at seconds
    of CPU per GiB. 1 MiB of data, then 128 MiB of holes, then one region."""
    src = tmp_path / "src.img"
    data = random.Random(3).randbytes(1 << 20)
    with open(src, "wb") as f:
        f.write(data)
        f.seek(129 << 20)
        f.write(data[:RS])
    path = _complete_clone(tmp_path, src)  # its data durable: clean pages
    with open(path, "rb") as f:
        fsops.drop_cached(f.fileno(), 0, 0)
    assert _cached(path) <= 1 << 20
    rep = verify.verify_clone(path)
    assert rep.ok and rep.bytes_read == (1 << 20) + RS
    # The data, and what the kernel's own read-ahead takes past it (16 MiB at most
    # here), but not the holes.
    assert _cached(path) < 32 << 20


def test_the_read_ahead_of_regions_larger_than_a_read_is_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With regions larger than a read (up to 1 GiB), what is asked of the kernel
    ahead stays within AHEAD bytes, not whole regions."""
    src = tmp_path / "src.img"
    data = random.Random(4).randbytes(6 << 20)
    src.write_bytes(data)
    path = _complete_clone(tmp_path, src, region_size=1 << 20)
    monkeypatch.setattr(verify, "CHUNK", 64 << 10)
    monkeypatch.setattr(verify, "AHEAD", 192 << 10)
    asked: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            asked.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    with LocalFileSource(str(src)) as s:
        rep = verify.verify_clone(path, s)
    assert rep.ok and rep.matched == rep.source_matched == 6
    assert sorted(asked) == [(r << 20, 192 << 10) for r in range(6) for _ in range(2)]
