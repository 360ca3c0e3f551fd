"""``fsops.put_runs``: a fill's runs written in one call (C, without the GIL), and
the same in Python. Both against a model: only the runs are touched (the bytes
between them are present regions, the guest's: invariant 4), all-zero blocks of
a run become holes, and on a real full disk ``progress`` never claims a byte
that is not written."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from liveclone.core import copyc, fsops
from tests.conftest import tmpfs

BLOCK = 4096
GUEST = 0x5A  # what the file holds outside the runs: never in a run's data
WAYS = [pytest.param(True, id="compiled"), pytest.param(False, id="python")]


def _compiled(compiled: bool) -> None:
    if compiled and copyc.lib is None:
        pytest.skip("liveclone.core._copyc is not built")


@st.composite
def _runs(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int]:
    """Sorted, apart runs at 512-byte granularity within 64 blocks, and a zero block
    size."""
    zb = draw(st.sampled_from([512, 4096, 8192]))
    cuts = sorted(draw(st.sets(st.integers(0, 64 * 8), min_size=2, max_size=24)))
    runs = [(a * 512, b * 512) for a, b in zip(cuts[::2], cuts[1::2], strict=False)
            if draw(st.booleans()) or a == cuts[0]]
    return runs, zb


def _fill(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.pwrite(fd, bytes([GUEST]) * size, 0)
    return fd


@pytest.mark.parametrize("compiled", WAYS)
@settings(max_examples=60, deadline=None)
@given(case=_runs(), seed=st.integers(0, 2**32), scattered=st.booleans())
def test_only_the_runs_are_written_and_zero_blocks_punched(
        tmp_path_factory: pytest.TempPathFactory, compiled: bool,
        case: tuple[list[tuple[int, int]], int], seed: int, scattered: bool) -> None:
    _compiled(compiled)
    runs, zb = case
    rng = random.Random(seed)
    size = 64 * BLOCK
    # The source bytes: random, with whole zero blocks (aligned to the clone) here
    # and there, as a sparse source's holes and zero blocks read.
    src = bytearray(rng.randbytes(size))
    for b in range(0, size, zb):
        if rng.random() < 0.4:
            src[b:b + zb] = bytes(zb)
    model = bytearray([GUEST]) * size
    for a, b in runs:
        model[a:b] = src[a:b]
    data: memoryview | list[memoryview]
    if scattered:  # each run somewhere else in a buffer (an HTTP answer's parts)
        buf, at = bytearray(), []
        for a, b in runs:
            buf += rng.randbytes(rng.randrange(3) * 512)
            at.append(len(buf))
            buf += src[a:b]
        data, base = [memoryview(buf)[x:x + b - a] for x, (a, b) in zip(at, runs, strict=True)], 0
    else:
        data, base = memoryview(src)[runs[0][0]:], runs[0][0]
    path = tmp_path_factory.mktemp("put") / "clone.img"
    fd = _fill(path, size)
    try:
        progress = [runs[0][0]]
        fsops.put_runs(fd, runs, data, base, zb, progress, compiled=compiled)
        assert progress[0] == runs[-1][1]
        assert os.pread(fd, size, 0) == model
        # The all-zero blocks of the runs are punched: a file block (4 KiB here)
        # that they cover whole is a hole, and every other block holds data.
        punched = bytearray(size)
        for a, e in runs:
            for b in range(a // zb * zb, e, zb):  # each block, cut to the run
                x, y = max(a, b), min(e, b + zb)
                if not any(src[x:y]):
                    punched[x:y] = b"\x01" * (y - x)
        for b in range(0, size, BLOCK):
            try:
                hole = os.lseek(fd, b, os.SEEK_DATA) > b
            except OSError as e:  # ENXIO: nothing but a hole up to the end
                assert e.errno == errno.ENXIO
                hole = True
            assert hole == all(punched[b:b + BLOCK]), f"block at {b}"
    finally:
        os.close(fd)


@pytest.mark.parametrize("compiled", WAYS)
def test_a_full_disk_keeps_progress_honest(tmp_path: Path, compiled: bool) -> None:
    """On a real full disk the call fails with ENOSPC, and every byte of the runs
    below ``progress`` is written; nothing between runs is touched."""
    _compiled(compiled)
    rng = random.Random(5)
    size = 4 << 20
    src = rng.randbytes(size)
    runs = [(a, a + 3 * BLOCK) for a in range(0, size, 4 * BLOCK)]  # 3 of every 4 blocks
    with tmpfs(tmp_path / "small", "2m") as mnt:
        fd = os.open(mnt / "clone.img", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, size)
            progress = [0]
            with pytest.raises(OSError) as e:
                fsops.put_runs(fd, runs, memoryview(src), 0, BLOCK, progress,
                               compiled=compiled)
            assert e.value.errno == errno.ENOSPC
            done = progress[0]
            assert 0 < done < size
            got = os.pread(fd, size, 0)
            for a, b in runs:
                if b <= done:
                    assert got[a:b] == src[a:b]
            for a in range(3 * BLOCK, size, 4 * BLOCK):
                assert got[a:a + BLOCK] == bytes(BLOCK)  # the gaps: never written
        finally:
            os.close(fd)
