"""A full disk that gets space again (issue 10): a served clone on a real tmpfs that
fills up, then is remounted larger. The failure shows at once, present data keeps
being served, and the copy resumes by itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LIVECLONE, tmpfs

SIZE = 24 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", "12m") as mnt:
        yield mnt


def _status(clone: Path) -> dict[str, object]:
    r = subprocess.run([LIVECLONE, "status", "--json", str(clone)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    st: dict[str, object] = json.loads(r.stdout)
    return st


def _wait_for(clone: Path, phase: str, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        st = _status(clone)
        if st["phase"] == phase or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def test_served_clone_resumes_when_space_comes_back(tmp_path: Path, small_disk: Path) -> None:
    src = tmp_path / "src.img"
    data = os.urandom(SIZE)  # every byte is data: the clone needs all of it
    src.write_bytes(data)
    clone = small_disk / "c.img"
    serve = subprocess.Popen([LIVECLONE, "serve", str(src), str(clone), "--socket",
                              str(tmp_path / "s.sock")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        uri = serve.stdout.readline().strip()
        st = _wait_for(clone, "failed", 30)
        assert st["phase"] == "failed", st
        err = str(st["last_error"])
        assert "no space left" in err and "is still to copy" in err and "resumes" in err
        # What was copied is still served, byte for byte.
        head = tmp_path / "head"
        r = subprocess.run(["qemu-img", "dd", "-f", "raw", "-O", "raw", f"if={uri}",
                            f"of={head}", "bs=64k", "count=16"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert head.read_bytes() == data[:1 << 20]
        # More space: the copy goes on by itself and completes.
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
        st = _wait_for(clone, "complete", 60)
        assert st["phase"] == "complete" and st["last_error"] is None, st
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=60)
    assert serve.returncode in (0, 128 + signal.SIGTERM, -signal.SIGTERM)
    assert clone.read_bytes() == data
