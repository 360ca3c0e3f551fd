"""A served clone while its remote source (a real nginx) is down: present regions keep
being served, reads that need the source fail with EIO after the retry budget instead
of hanging, and the copy finishes by itself when the source comes back."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from liveclone.core.metadata import MapStore
from liveclone.process import stop_process
from tests.conftest import LIVECLONE, make_image
from tests.integration.servers import Nginx

SIZE = 16 << 20
RS = 64 << 10


def qemu_io_read(uri: str, offset: int, length: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", "-f", "raw", "-c", f"read -v {offset} {length}", uri],
                          capture_output=True, text=True, timeout=120)


def dumped(out: str) -> bytes:
    """The bytes of qemu-io's ``read -v`` hex dump."""
    data = bytearray()
    for line in out.splitlines():
        if ":  " in line and line[:8].strip("0123456789abcdef") == "":
            hexpart = line.split(":  ", 1)[1][:47]
            data += bytes.fromhex(hexpart.replace(" ", ""))
    return bytes(data)


def test_present_regions_served_while_source_is_down(tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    data = make_image(root / "disk.img", SIZE, seed=31)
    nginx = Nginx(root, tmp_path / "nginx").start()
    clone = tmp_path / "c.img"
    env = dict(os.environ, LIVECLONE_RETRY_BUDGET="3")
    proc = subprocess.Popen([LIVECLONE, "serve", nginx.url("disk.img"), str(clone),
                             "--rate", "1M"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        deadline = time.monotonic() + 60
        while True:  # wait until the first regions are committed present
            _, rmap = MapStore.read(str(clone))
            if 4 in rmap:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        nginx.stop()
        # A present region reads correctly, again and again, with the source gone.
        for _ in range(3):
            r = qemu_io_read(uri, 2 * RS, 4096)
            assert r.returncode == 0, r.stdout + r.stderr
            assert dumped(r.stdout) == data[2 * RS:2 * RS + 4096]
        # A region not copied yet needs the source: EIO after the budget, no hang.
        r = qemu_io_read(uri, SIZE - RS, 4096)
        assert "Input/output error" in r.stdout + r.stderr, r.stdout + r.stderr
        # The source comes back: the copy finishes by itself.
        nginx.start()
        deadline = time.monotonic() + 120
        while True:
            _, rmap = MapStore.read(str(clone))
            if rmap.complete:
                break
            assert proc.poll() is None, "serve died during the outage"
            assert time.monotonic() < deadline, "copy did not resume"
            time.sleep(0.2)
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()
        nginx.stop()
    assert clone.read_bytes() == data
