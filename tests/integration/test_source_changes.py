"""A source that changes under a running copy is an error, never a hole or a mix
(invariant 10; issue 10): truncated, extended, overwritten, re-touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import LIVECLONE, make_image

SIZE = 32 << 20


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LIVECLONE, *args], capture_output=True, text=True, timeout=300)


def _truncate(src: Path) -> None:
    os.truncate(src, SIZE // 4)


def _extend(src: Path) -> None:
    os.truncate(src, SIZE + (1 << 20))


def _overwrite_and_retouch(src: Path) -> None:
    """Overwrite a block in place and put the mtime back, as rsync -t or cp -p would:
    only the ctime tells."""
    st = os.stat(src)
    with open(src, "r+b") as f:
        f.seek(SIZE - (3 << 20))
        f.write(os.urandom(4096))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))


CHANGES: dict[str, Callable[[Path], None]] = {
    "truncated": _truncate, "extended": _extend, "overwritten": _overwrite_and_retouch}


def _wait_for_progress(clone: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = run("status", "--json", str(clone))
        if r.returncode == 0 and json.loads(r.stdout)["regions_present"] > 0:
            return
        time.sleep(0.05)
    raise AssertionError("the copy made no progress")


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_clone_stops_when_the_source_changes(tmp_path: Path, change: str) -> None:
    src = tmp_path / "src.img"
    make_image(src, SIZE)
    clone = tmp_path / "c.img"
    proc = subprocess.Popen([LIVECLONE, "clone", str(src), str(clone), "--rate", "8M"],
                            stderr=subprocess.PIPE, text=True)
    _wait_for_progress(clone)
    CHANGES[change](src)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err
    assert "changed while being cloned" in err and "Restore the original image" in err
    st = json.loads(run("status", "--json", str(clone)).stdout)
    assert st["phase"] == "failed" and st["regions_present"] < st["regions_total"]
    assert "changed while being cloned" in st["last_error"]
    # The same command refuses to resume on the changed source, and says why.
    again = run("clone", str(src), str(clone))
    assert again.returncode == 4, again.stderr
    assert "changed since the clone" in again.stderr


def test_retouched_source_is_refused_on_resume(tmp_path: Path) -> None:
    """Issue 10, problem 2: an overwritten source whose mtime was put back."""
    src = tmp_path / "src.img"
    make_image(src, SIZE)
    clone = tmp_path / "c.img"
    proc = subprocess.Popen([LIVECLONE, "clone", str(src), str(clone), "--rate", "4M"],
                            stderr=subprocess.DEVNULL)
    _wait_for_progress(clone)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    _overwrite_and_retouch(src)
    r = run("clone", str(src), str(clone))
    assert r.returncode == 4, r.stderr
    assert "ctime_ns was" in r.stderr


def test_serve_keeps_present_data_and_refuses_changed_bytes(tmp_path: Path) -> None:
    """Under serve: the copy stops with phase failed, data already in the clone is
    still served, and a read that would need the changed source gets EIO."""
    src = tmp_path / "src.img"
    data = make_image(src, SIZE)
    clone = tmp_path / "c.img"
    sock = tmp_path / "s.sock"
    serve = subprocess.Popen([LIVECLONE, "serve", str(src), str(clone), "--socket", str(sock),
                              "--rate", "2M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert serve.stdout is not None
        uri = serve.stdout.readline().strip()
        _wait_for_progress(clone)
        _overwrite_and_retouch(src)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = json.loads(run("status", "--json", str(clone)).stdout)
            if st["phase"] == "failed":
                break
            time.sleep(0.1)
        assert st["phase"] == "failed" and "changed while being cloned" in st["last_error"]
        # Region 0 was copied first: it is still served, byte for byte.
        head = subprocess.run(["qemu-img", "dd", "-f", "raw", "-O", "raw", f"if={uri}",
                               f"of={tmp_path / 'head'}", "bs=64k", "count=1"],
                              capture_output=True, text=True)
        assert head.returncode == 0, head.stderr
        assert (tmp_path / "head").read_bytes() == data[:64 << 10]
        # The end of the image was not copied yet: reading it needs the source.
        tail = subprocess.run(["qemu-io", "-f", "raw", "-c", f"read {SIZE - (1 << 20)} 65536",
                               uri], capture_output=True, text=True)
        assert "Input/output error" in tail.stdout + tail.stderr
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=60)
