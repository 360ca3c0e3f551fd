"""core.verify in-process: regions larger than a read, and a guest writing while a
verify reads (the order bytes-then-slots)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from liveclone.core import verify
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


def test_regions_larger_than_a_read_are_digested_in_pieces(
        tmp_path: Path, source: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = source
    path = str(tmp_path / "c.img")
    with open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True) as c:
        assert Copier(c).start().wait(30) and c.complete
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
    path = str(tmp_path / "c.img")
    with open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True) as c:
        assert Copier(c).start().wait(30) and c.complete
    with open(src, "ab") as f:
        f.write(b"more")
    with LocalFileSource(str(src)) as s:
        rep = verify.verify_clone(path, s)
    assert not rep.ok and rep.source_resized and rep.mismatch_count == 0
    assert rep.source_problem is not None and "bytes" in rep.source_problem
