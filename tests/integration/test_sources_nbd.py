"""Cloning from NBD exports (nbdkit and qemu-nbd, unix socket, TCP and TLS)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LIVECLONE, allocated, make_image
from tests.integration.servers import (
    clone_partly,
    free_port,
    make_pki,
    stop,
    wait_listening,
)

SIZE = 32 << 20


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LIVECLONE, *args], capture_output=True, text=True, timeout=300)


def wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    while not path.exists():
        assert proc.poll() is None, "the NBD server exited"
        time.sleep(0.01)


@pytest.fixture
def raw(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "raw.img"
    return path, make_image(path, SIZE, seed=3)


@pytest.fixture
def nbdkit_unix(tmp_path: Path, raw: tuple[Path, bytes]) -> Iterator[str]:
    sock = tmp_path / "kit.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "-r", "-U", str(sock), "-e", "disk",
                             "file", str(raw[0])], stdin=subprocess.DEVNULL)
    try:
        wait_socket(sock, proc)
        yield f"nbd+unix:///disk?socket={sock}"
    finally:
        stop(proc)


def test_clone_from_nbdkit_unix_is_as_sparse_as_the_source(
        tmp_path: Path, raw: tuple[Path, bytes], nbdkit_unix: str) -> None:
    clone = tmp_path / "c.img"
    r = run("clone", nbdkit_unix, str(clone))
    assert r.returncode == 0, r.stderr
    assert clone.read_bytes() == raw[1]
    assert allocated(clone) <= allocated(raw[0])
    st = json.loads(run("status", "--json", str(clone)).stdout)
    assert st["source"]["kind"] == "nbd" and st["source"]["size"] == SIZE
    # Holes the server reported were never read: only the data extents came over.
    assert st["bytes_from_source"] <= allocated(raw[0])


def test_clone_from_qemu_nbd_tcp_qcow2(tmp_path: Path, raw: tuple[Path, bytes]) -> None:
    image = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw[0]), str(image)], check=True)
    port = free_port()
    proc = subprocess.Popen(["qemu-nbd", "--read-only", "--persistent", "--shared=8",
                             "-f", "qcow2", "-b", "127.0.0.1", "-p", str(port), "-x", "vm",
                             str(image)], stdin=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        clone = tmp_path / "c.img"
        r = run("clone", f"nbd://127.0.0.1:{port}/vm", str(clone))
        assert r.returncode == 0, r.stderr
        r = run("clone", f"nbd://127.0.0.1:{port}/nope", str(tmp_path / "c2.img"))
        assert r.returncode == 3 and "export name is wrong" in r.stderr
        assert "nbdinfo --list" in r.stderr
    finally:
        stop(proc)
    assert clone.read_bytes() == raw[1]
    assert allocated(clone) <= allocated(raw[0])


def test_resume_checks_the_fingerprint(tmp_path: Path, raw: tuple[Path, bytes],
                                       nbdkit_unix: str) -> None:
    clone = tmp_path / "c.img"
    clone_partly(nbdkit_unix, clone)
    with open(raw[0], "r+b") as f:  # the export now serves different bytes
        f.seek(SIZE - 4096)
        f.write(os.urandom(4096))
    r = run("clone", nbdkit_unix, str(clone))
    assert r.returncode == 4 and "fingerprint" in r.stderr


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    return make_pki(tmp_path / "pki")


def test_nbds_tls(tmp_path: Path, raw: tuple[Path, bytes], pki: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(["nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", str(port),
                             "--tls=require", f"--tls-certificates={pki}", "file",
                             str(raw[0])], stdin=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        clone = tmp_path / "c.img"
        r = run("clone", f"nbds://localhost:{port}/?tls-certificates={pki}", str(clone))
        assert r.returncode == 0, r.stderr
        assert clone.read_bytes() == raw[1]
        # Plain NBD to a TLS-only server: told to use nbds://.
        r = run("clone", f"nbd://localhost:{port}/", str(tmp_path / "c2.img"))
        assert r.returncode == 3 and "requires TLS: use nbds://" in r.stderr
        # Without the CA the server's certificate cannot be trusted.
        r = run("clone", f"nbds://localhost:{port}/", str(tmp_path / "c3.img"))
        assert r.returncode == 3 and "TLS" in r.stderr and "CERTIFICATE_VERIFY_FAILED" in r.stderr
    finally:
        stop(proc)


def test_unreachable_and_bad_uris(tmp_path: Path) -> None:
    r = run("clone", f"nbd://127.0.0.1:{free_port()}/x", str(tmp_path / "c.img"))
    assert r.returncode == 3 and "cannot reach NBD source" in r.stderr
    assert "Connection refused" in r.stderr
    r = run("clone", "nbd+unix:///x", str(tmp_path / "c.img"))
    assert r.returncode == 3 and "?socket=PATH" in r.stderr
    r = run("clone", f"nbd+unix:///x?socket={tmp_path}/none.sock", str(tmp_path / "c.img"))
    assert r.returncode == 3 and "No such file" in r.stderr
    r = run("clone", "ftp://host/disk.img", str(tmp_path / "c.img"))
    assert r.returncode == 3 and "unknown scheme" in r.stderr
    assert not (tmp_path / "c.img").exists()
