"""Answer buffers (``core/buffers.py``) are lent again only once nothing else
refers to them: an answer still held (by a transport's view, a slice, a ctypes
array over it) keeps its bytes, whatever later reads do. And through a clone:
large reads, each held while the next ones run, all keep their own bytes."""

from __future__ import annotations

import ctypes
import os
import random
from pathlib import Path

from liveclone.core.buffers import SMALLEST, AnswerBuffers
from liveclone.core.opening import open_clone
from liveclone.sources.local import LocalFileSource
from tests.conftest import make_image

MiB = 1 << 20


def test_a_buffer_is_lent_again_only_when_nothing_holds_it() -> None:
    pool = AnswerBuffers()
    first = pool.take(MiB)
    first[:] = b"a" * MiB
    second = pool.take(MiB)  # ``first`` is held: a buffer of its own
    assert second.obj is not first.obj
    second[:] = b"b" * MiB
    assert first == b"a" * MiB
    owner = id(first.obj)
    del first
    third = pool.take(MiB - 5)  # the same size class: ``first``'s buffer again
    assert id(third.obj) == owner and len(third) == MiB - 5
    # Views made from an answer hold it too, as a transport's or FUSE's do.
    for hold in (lambda v: v[10:20], lambda v: v.cast("B"),
                 lambda v: (ctypes.c_char * len(v)).from_buffer(v)):
        view = pool.take(MiB)
        view[:] = b"c" * MiB
        held = hold(view)
        owner_id = id(view.obj)
        del view
        for _ in range(3):
            other = pool.take(MiB)
            assert id(other.obj) != owner_id
            other[:] = b"d" * MiB
        assert bytes(held)[:10] == b"c" * 10
        del held, other


def test_the_pool_keeps_at_most_its_bound_and_small_reads_are_not_pooled() -> None:
    pool = AnswerBuffers(keep=4 * MiB)
    held = [pool.take(MiB) for _ in range(10)]  # all held: 4 kept, 6 not
    assert pool.held == 4 * MiB
    assert len({id(v.obj) for v in held}) == 10
    small = pool.take(SMALLEST - 1)
    assert pool.held == 4 * MiB and len(small) == SMALLEST - 1
    del held
    again = [pool.take(MiB) for _ in range(4)]
    assert pool.held == 4 * MiB  # the four kept ones, nothing new
    del again


def test_large_reads_held_while_others_run_keep_their_bytes(tmp_path: Path) -> None:
    size = 16 * MiB
    src = tmp_path / "source.img"
    image = make_image(src, size, seed=21)
    rng = random.Random(5)
    with open_clone(str(tmp_path / "clone.img"), LocalFileSource(str(src)),
                    region_size=64 << 10, create=True, exclusive=True) as clone:
        clone.fill(0, clone.regions_total // 2, wait=True)  # half present
        held: list[tuple[int, memoryview]] = []
        for i in range(60):
            length = rng.choice([SMALLEST, 300_000, MiB, 2 * MiB])
            offset = rng.randrange(size - length)
            read = clone.read_nowait if i % 2 else clone.read
            data = read(offset, length)
            if data is None:
                data = clone.read(offset, length)
            assert data == image[offset:offset + length]
            held.append((offset, data))
            if rng.random() < 0.4:  # some answers are let go, most stay held
                held.pop(rng.randrange(len(held)))
        for offset, data in held:
            assert data == image[offset:offset + len(data)], offset
        assert os.path.getsize(tmp_path / "clone.img") == size
