"""Copies on a filesystem that shares blocks (XFS with reflink, on a loop device).

There, data runs are shared with the source instead of copied; zero blocks and
holes still become holes (invariant 8). Across filesystems, sharing is impossible
and the copy falls back to direct I/O by itself.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LIVECLONE, make_image


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh XFS with reflink, loop-mounted (mount -o loop frees the loop device)."""
    image, mnt = tmp_path / "xfs.img", tmp_path / "xfs"
    with open(image, "wb") as f:
        f.truncate(512 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def shared_extents(path: Path) -> int:
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return sum(1 for line in out.splitlines() if "shared" in line)


def data_bytes(path: Path) -> int:
    """Bytes in data extents (SEEK_DATA/SEEK_HOLE): holes are what is not counted."""
    total, pos = 0, 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            total += pos - start
    return total


def clone_and_compare(src: Path, clone: Path, size: int, seed: int) -> bytes:
    data = make_image(src, size, seed=seed)
    r = subprocess.run([LIVECLONE, "clone", str(src), str(clone)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert clone.read_bytes() == data
    return data


def test_clone_shares_blocks_on_xfs(xfs: Path) -> None:
    clone = xfs / "clone.img"
    data = clone_and_compare(xfs / "src.img", clone, 32 << 20, seed=7)
    assert shared_extents(clone) > 0
    # Only the non-zero 64 KiB blocks are data in the clone: allocated zeros became holes.
    nonzero = sum(64 << 10 for off in range(0, len(data), 64 << 10)
                  if data[off:off + (64 << 10)].strip(b"\0"))
    assert data_bytes(clone) == nonzero


def test_clone_across_filesystems_copies(xfs: Path, tmp_path: Path) -> None:
    """Source on XFS, clone on the test directory's filesystem: no sharing possible."""
    clone = tmp_path / "clone.img"
    clone_and_compare(xfs / "src.img", clone, 16 << 20, seed=8)
    assert shared_extents(clone) == 0


def test_unaligned_guest_fill_first_keeps_sharing(xfs: Path) -> None:
    """A guest's partial write fills unaligned pieces before the copier's first run:
    that must neither fail nor turn block sharing off for the rest of the copy."""
    from liveclone.core.copier import Copier
    from liveclone.core.opening import open_clone
    from liveclone.sources.local import LocalFileSource

    src = xfs / "src.img"
    model = bytearray(make_image(src, 16 << 20, seed=9))
    with open_clone(str(xfs / "clone.img"), LocalFileSource(str(src)), create=True,
                    exclusive=True) as c:
        for off in (100, (5 << 20) + 7):
            c.write(off, b"g" * 512)
            model[off:off + 512] = b"g" * 512
        Copier(c).start().wait()
        assert c.complete and c._fill._share_blocks
    assert (xfs / "clone.img").read_bytes() == bytes(model)
    assert shared_extents(xfs / "clone.img") > 0
