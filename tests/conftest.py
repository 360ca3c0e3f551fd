"""Shared fixtures: source images with data, zero blocks and holes."""

from __future__ import annotations

import os
import random
import sys
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


@pytest.fixture
def source_image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "source.img"
    data = make_image(path, 8 << 20)
    return path, data


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512
