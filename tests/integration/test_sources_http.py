"""Cloning from a real nginx over loopback, including a server that goes away
mid-copy, and every bad HTTP input."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LIVECLONE, make_image
from tests.integration.servers import (
    Nginx,
    clone_partly,
    free_port,
    no_range_server,
    stop,
    wait_status,
)

SIZE = 32 << 20


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LIVECLONE, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Nginx, bytes]]:
    root = tmp_path / "www"
    root.mkdir()
    data = make_image(root / "disk.img", SIZE)
    (root / "secret").mkdir()
    (root / "secret" / "disk.img").write_bytes(b"x" * 4096)
    server = Nginx(root, tmp_path / "nginx").start()
    try:
        yield server, data
    finally:
        server.stop()


def test_clone_over_http(tmp_path: Path, served: tuple[Nginx, bytes]) -> None:
    server, data = served
    clone = tmp_path / "c.img"
    r = run("clone", server.url("disk.img"), str(clone))
    assert r.returncode == 0, r.stderr
    assert clone.read_bytes() == data
    # Zero blocks and holes of the source became holes in the clone.
    assert os.stat(clone).st_blocks * 512 <= os.stat(tmp_path / "www" / "disk.img").st_blocks * 512
    st = json.loads(run("status", "--json", str(clone)).stdout)
    assert st["phase"] == "complete"
    assert st["source"]["kind"] == "http" and st["source"]["size"] == SIZE
    assert st["source"]["etag"] and st["source"]["last_modified"]


def test_server_stopped_mid_copy_then_restarted(tmp_path: Path,
                                               served: tuple[Nginx, bytes]) -> None:
    server, data = served
    clone = tmp_path / "c.img"
    proc = subprocess.Popen([LIVECLONE, "clone", server.url("disk.img"), str(clone),
                             "--rate", "4M", "--region-size", "64K"],
                            stderr=subprocess.PIPE)
    try:
        st = wait_status(clone, lambda s: 0 < s["regions_present"], proc)
        server.stop()
        # Reads now fail: the source retries them with back-off while the server is down.
        time.sleep(1.5)
        assert proc.poll() is None
        stalled = wait_status(clone, lambda s: True, proc)["regions_present"]
        assert stalled < st["regions_total"]
        server.start()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    finally:
        stop(proc)
    assert clone.read_bytes() == data


def test_resume_unchanged_and_changed(tmp_path: Path, served: tuple[Nginx, bytes]) -> None:
    server, data = served
    clone = tmp_path / "c.img"

    clone_partly(server.url("disk.img"), clone)
    # Unchanged source: the identity recorded matches a fresh open, and it resumes.
    r = run("clone", server.url("disk.img"), str(clone))
    assert r.returncode == 0, r.stderr
    assert clone.read_bytes() == data

    clone.unlink()
    for suffix in (".lcmap", ".lcjournal", ".lcstatus"):
        Path(str(clone) + suffix).unlink(missing_ok=True)
    clone_partly(server.url("disk.img"), clone)
    before = clone.read_bytes()
    src = tmp_path / "www" / "disk.img"
    with open(src, "r+b") as f:
        f.seek(SIZE - 4096)
        f.write(b"edited")
    os.utime(src, (time.time() + 10, time.time() + 10))
    r = run("clone", server.url("disk.img"), str(clone))
    assert r.returncode == 4, r.stderr
    assert "changed since" in r.stderr and "etag" in r.stderr
    assert clone.read_bytes() == before


def test_not_found(tmp_path: Path, served: tuple[Nginx, bytes]) -> None:
    server, _ = served
    r = run("clone", server.url("missing.img"), str(tmp_path / "c.img"))
    assert r.returncode == 3
    assert "not found (404" in r.stderr and "check the URL" in r.stderr
    assert not (tmp_path / "c.img").exists()


def test_forbidden(tmp_path: Path, served: tuple[Nginx, bytes]) -> None:
    server, _ = served
    r = run("clone", server.url("secret/disk.img"), str(tmp_path / "c.img"))
    assert r.returncode == 3
    assert "refused access (403" in r.stderr
    assert not (tmp_path / "c.img").exists()


def test_server_without_ranges(tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    make_image(root / "disk.img", 1 << 20)
    with no_range_server(root) as base:
        r = run("clone", f"{base}/disk.img", str(tmp_path / "c.img"))
    assert r.returncode == 3
    assert "does not support range requests" in r.stderr
    assert "download it first" in r.stderr
    assert not (tmp_path / "c.img").exists()


def test_unreachable(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/disk.img"
    r = run("clone", url, str(tmp_path / "c.img"))
    assert r.returncode == 3
    assert "cannot reach" in r.stderr and "Connection refused" in r.stderr
    assert not (tmp_path / "c.img").exists()
