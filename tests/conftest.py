"""Shared fixtures: source images with data, zero blocks and holes."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LIVECLONE = str(BIN / "liveclone")


def make_image(path: Path, size: int, seed: int = 1, block: int = 64 << 10) -> bytes:
    """A sparse image with a mix of random blocks, all-zero data blocks and holes.
    Returns its bytes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, block):
            kind = rng.random()
            n = min(block, size - off)
            if kind < 0.5:
                f.seek(off)
                f.write(rng.randbytes(n))
            elif kind < 0.6:
                f.seek(off)
                f.write(bytes(n))  # allocated zeros: must become a hole in the clone
            # else: a hole
    return path.read_bytes()


def qemu_img_create(*args: str) -> None:
    """``qemu-img create -q ARGS``. LUKS encryption first times its key derivation
    by the thread's CPU time, which now and then reads 0 ms on a busy machine
    ("Unable to get accurate CPU usage"): only that failure is tried again."""
    for _ in range(10):
        made = subprocess.run(["qemu-img", "create", "-q", *args], capture_output=True,
                              text=True)
        if made.returncode == 0 or "Unable to get accurate CPU usage" not in made.stderr:
            break
    assert made.returncode == 0, made.stderr


@pytest.fixture
def source_image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "source.img"
    data = make_image(path, 8 << 20)
    return path, data


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@contextlib.contextmanager
def tmpfs(where: Path, size: str, options: str = "") -> Iterator[Path]:
    """A real tmpfs of ``size`` (e.g. "6m") mounted on the new directory ``where``: a disk
    that fills up (or, with options "ro", one that cannot be written)."""
    where.mkdir()
    opts = ",".join(o for o in (options, f"size={size}") if o)
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
