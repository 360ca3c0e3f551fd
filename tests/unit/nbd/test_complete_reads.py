"""The loop's read path on a complete clone (``Clone.read_nowait``'s shortcut):
cached bytes are source ⊕ acknowledged writes, exactly as ``read`` gives them."""

from __future__ import annotations

import random
from pathlib import Path

from liveclone.core.opening import open_clone
from liveclone.sources.local import LocalFileSource

RS = 64 << 10


def test_read_nowait_on_a_complete_clone_equals_read(tmp_path: Path, source_image) -> None:
    src, data = source_image
    model = bytearray(data)
    with open_clone(str(tmp_path / "clone.img"), LocalFileSource(str(src)), region_size=RS,
                    create=True, exclusive=True) as c:
        c.fill(0, c.regions_total, wait=True)
        assert c.complete
        rng = random.Random(5)
        for _ in range(50):  # acknowledged writes, then reads of anything
            offset = rng.randrange(len(model) - 5000)
            chunk = rng.randbytes(rng.randrange(1, 5000))
            c.write(offset, chunk)
            model[offset:offset + len(chunk)] = chunk
        with open(tmp_path / "clone.img", "rb") as f:  # every byte in the page cache
            while f.read(1 << 20):
                pass
        reads = c.stats.guest_reads
        for _ in range(200):
            length = rng.choice([1, 512, 4096, 4096, 70000])
            offset = rng.randrange(len(model) - length + 1)
            got = c.read_nowait(offset, length)
            assert got is not None and got == model[offset:offset + length]
            assert c.read(offset, length) == got
        got = c.read_nowait(len(model) - 7, 7)  # the last bytes
        assert got == model[-7:]
        assert c.stats.guest_reads == reads + 401  # each one counted
