"""``liveclone serve --mount``: NBD clients and file users share one clone, live."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from liveclone.process import stop_process
from tests.conftest import LIVECLONE, make_image


def qemu_io(uri: str, *cmds: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run(args + [uri], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "fail" not in r.stdout.lower(), r.stdout + r.stderr
    return r.stdout


def test_nbd_and_file_users_share_one_clone(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    model = bytearray(make_image(src, 16 << 20, seed=9))
    clone = tmp_path / "clone.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([LIVECLONE, "serve", str(src), str(clone), "--rate", "1M",
                             "--mount", str(mnt)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri.startswith("nbd+unix://"), uri
        file = mnt / "clone.img"
        # Reads through the file see source ⊕ writes while copying.
        assert file.read_bytes() == bytes(model)
        # A write through NBD is seen through the file at once (no stale page cache).
        qemu_io(uri, "write -P 0xab 1048576 65536", "flush")
        model[1 << 20:(1 << 20) + 65536] = b"\xab" * 65536
        with open(file, "rb") as f:
            f.seek(1 << 20)
            assert f.read(65536) == b"\xab" * 65536
        # A write through the file is seen by NBD clients.
        fd = os.open(file, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xcd" * 5000, (4 << 20) + 123)
            os.fsync(fd)
        finally:
            os.close(fd)
        model[(4 << 20) + 123:(4 << 20) + 5123] = b"\xcd" * 5000
        qemu_io(uri, f"read -P 0xcd {(4 << 20) + 123} 5000")
        assert file.read_bytes() == bytes(model)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not os.path.ismount(mnt)
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    r = subprocess.run([LIVECLONE, "clone", str(src), str(clone)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert clone.read_bytes() == bytes(model)
