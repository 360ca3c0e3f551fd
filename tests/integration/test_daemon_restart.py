"""Restart without losing anything (issue 11): ``kill -9`` of the daemon while its
clones copy and a ``qemu-io`` with ``reconnect-delay`` has one open. A new daemon
on the same state directory serves every clone again under the same name and URI,
the client's next read succeeds, every clone completes byte for byte, and no
flushed write is lost."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.conftest import make_image
from tests.integration.daemon_kit import Daemon

SIZE = 16 << 20
K64 = 64 << 10


def test_kill_9_while_copying_and_a_reconnecting_client_reads(tmp_path: Path) -> None:
    src = tmp_path / "golden.img"
    data = make_image(src, SIZE)
    daemon = Daemon(tmp_path, "--rate", "4M").start()
    qemu = None
    try:
        clones = [daemon.add(src, tmp_path / f"vm{i}.img", name=f"vm{i}") for i in range(3)]
        uris = [c["nbd_uri"] for c in clones]
        qemu = subprocess.Popen(
            ["qemu-io", "--image-opts",
             f"driver=nbd,server.type=unix,server.path={daemon.nbd},export=vm0,"
             "reconnect-delay=30"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert qemu.stdin is not None
        # A flushed write, and a read of regions the copier has not reached yet.
        qemu.stdin.write(f"write -P 0xab {8 << 20} 64k\nflush\n"
                         f"read -P 0xab {8 << 20} 64k\n")
        qemu.stdin.flush()
        deadline = time.monotonic() + 30
        while daemon.status("vm0")["guest"]["writes"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # the flush and the read are answered
        before = [daemon.status(f"vm{i}") for i in range(3)]
        assert all(st["phase"] == "copying" for st in before), before
        daemon.kill()

        daemon = Daemon(tmp_path, "--rate", "64M").start()
        # The same client goes on: its next reads are answered after it reconnects.
        qemu.stdin.write(f"read -P 0xab {8 << 20} 64k\nread 0 {SIZE}\n")
        qemu.stdin.flush()
        out, _ = qemu.communicate(timeout=60)  # closes stdin: qemu-io ends
        assert qemu.returncode == 0, out
        assert out.count("read 65536/65536 bytes") == 2, out
        assert f"read {SIZE}/{SIZE} bytes" in out, out
        assert "fail" not in out.lower() and "error" not in out.lower(), out
        for i, uri in enumerate(uris):
            code, answer = daemon.curl("GET", f"/v1/clones/vm{i}")
            assert code == 200 and answer["nbd_uri"] == uri
        for i in range(3):
            st = daemon.wait_phase(f"vm{i}", "complete", 60)
            assert st["regions_present"] >= before[i]["regions_committed"]
        expected = bytearray(data)
        expected[8 << 20:(8 << 20) + K64] = b"\xab" * K64
        assert (tmp_path / "vm0.img").read_bytes() == bytes(expected)
        for i in (1, 2):
            assert (tmp_path / f"vm{i}.img").read_bytes() == data
    finally:
        if qemu is not None and qemu.poll() is None:
            qemu.kill()
            qemu.communicate()
        assert daemon.stop() == 0, daemon.log.read_text()
    log = daemon.log.read_text()
    assert "serving 3 recorded clone(s) again" in log, log


def test_a_recorded_clone_that_cannot_open_again_is_listed_failed(tmp_path: Path) -> None:
    from tests.conftest import LIVECLONE

    src = tmp_path / "golden.img"
    make_image(src, SIZE)
    daemon = Daemon(tmp_path, "--rate", "1M").start()
    try:
        daemon.add(src, tmp_path / "vm.img", name="vm")
        ok = daemon.add(src, tmp_path / "ok.img", name="ok")
    finally:
        assert daemon.stop() == 0
    src.rename(tmp_path / "moved.img")  # the incomplete clone's source is gone
    daemon = Daemon(tmp_path).start()
    try:
        st = daemon.status("vm")
        assert st["phase"] == "failed" and "source" in st["last_error"], st
        r = subprocess.run([LIVECLONE, "status", "vm", "--api", daemon.api],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "failed" in r.stdout and "error:" in r.stdout, r
        assert daemon.status("ok")["phase"] == "failed"  # same source, same fate
        code, _ = daemon.curl("DELETE", "/v1/clones/vm")
        assert code == 200
        code, listing = daemon.curl("GET", "/v1/clones")
        assert [c["name"] for c in listing] == ["ok"] and listing[0]["nbd_uri"] == ok["nbd_uri"]
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()
    assert "cannot serve vm again" in daemon.log.read_text()
