"""``kill -9`` of ``liveclone serve`` mid-copy, with a real client writing.

Invariant 7 through NBD: every write acknowledged before a completed FLUSH is
there after the crash and restart; writes never flushed are each either fully
there or not at all (per 4 KiB block, the granularity they were written in); and
the finished clone file alone equals source plus the writes.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import LIVECLONE, make_image
from tests.integration.test_nbd_clients import nbdcopy_out, run, serve

SIZE = 64 << 20
BLOCK = 4096


def qemu_io(uri: str, cmds: list[str]) -> list[str]:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    return [*args, uri]


def test_kill_9_mid_copy_keeps_flushed_writes(tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    model = bytearray(make_image(source, SIZE, seed=3))
    clone = tmp_path / "clone.img"
    rng = random.Random(5)
    # Per cycle, a separate area for writes that are never flushed.
    unflushed: list[tuple[int, int, int]] = []  # (offset, length, pattern)
    for cycle in range(3):
        with serve(source, clone, "--rate", "1M") as s:
            # Acknowledged and flushed: must all survive.
            for _ in range(4):
                cmds = []
                for _ in range(6):
                    length = rng.randrange(1, 200_000)
                    offset = rng.randrange(0, 32 << 20)  # [0, 32M): flushed area
                    pattern = rng.randrange(1, 256)
                    cmds.append(f"write -P {pattern} {offset} {length}")
                    model[offset:offset + length] = bytes([pattern]) * length
                cmds.append("flush")
                res = run(qemu_io(s.uri, cmds))
                assert "failed" not in res.stdout + res.stderr
            # Never flushed, still being written when the server dies.
            base = (40 << 20) + cycle * (4 << 20)
            cmds = []
            for i in range(256):
                pattern = 0x80 + cycle
                cmds.append(f"aio_write -P {pattern} {base + i * 3 * BLOCK} {BLOCK}")
                unflushed.append((base + i * 3 * BLOCK, BLOCK, pattern))
            writer = subprocess.Popen(qemu_io(s.uri, cmds), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            try:
                time.sleep(0.05 * cycle)  # vary where the writer is when we kill
                s.proc.send_signal(signal.SIGKILL)
                s.proc.wait()
            finally:
                writer.wait(30)
            status = json.loads(run([LIVECLONE, "status", "--json", str(clone)]).stdout)
            assert status["regions_present"] < status["regions_total"]  # it was mid-copy

    def check(data: bytes) -> None:
        for off, length, pattern in unflushed:
            block = data[off:off + length]
            assert block in (bytes([pattern]) * length, bytes(model[off:off + length])), off
        merged = bytearray(data)
        for off, length, _ in unflushed:  # whichever it was, the rest must match
            merged[off:off + length] = model[off:off + length]
        assert merged == model

    # Restart: flushed writes are all there, before the copy ends ...
    with serve(source, clone, "--rate", "1M") as s:
        check(nbdcopy_out(s.uri, tmp_path / "after-crash.img"))
    # ... and after it, in the clone file alone.
    with serve(source, clone) as s:
        deadline = time.monotonic() + 120
        while True:
            status = json.loads(run([LIVECLONE, "status", "--json", str(clone)]).stdout)
            if status["phase"] == "complete":
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0
    source.unlink()
    check(clone.read_bytes())
