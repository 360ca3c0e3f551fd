"""``liveclone daemon`` through its public surfaces: the API with curl over its unix
socket, the exports with real NBD clients (nbdinfo, qemu-io, nbdcopy), the FUSE
directory with cmp, /metrics with prometheus_client's parser, events with an SSE
client, and the CLI's add/ls/rm/status/pause/resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LIVECLONE, make_image, tmpfs
from tests.integration.daemon_kit import Daemon, Events, qemu_io
from tests.integration.servers import free_port, make_pki, nginx

SIZE = 8 << 20


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    (tmp_path / "mnt").mkdir()
    d = Daemon(tmp_path, "--mount", str(tmp_path / "mnt"), "--rate", "8M").start()
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log.read_text()


def _cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LIVECLONE, *args, "--api", d.api], capture_output=True, text=True,
                          timeout=60)


def _metrics(d: Daemon) -> dict[tuple[str, str], float]:
    code, text = d.curl("GET", "/metrics")
    assert code == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, s.labels.get("name", ""))] = s.value
    return out


def test_routes_lifecycle(tmp_path: Path, daemon: Daemon) -> None:
    src = tmp_path / "golden.img"
    data = make_image(src, SIZE)
    events = Events(daemon.api)
    try:
        vm1 = daemon.add(src, tmp_path / "vm1.img")
        assert set(vm1) == {"name", "source", "clone", "nbd_uri", "file", "status"}
        assert vm1["name"] == "vm1.img" and vm1["file"] == str(tmp_path / "mnt" / "vm1.img")
        assert vm1["status"]["phase"] in ("copying", "complete")
        # The CLI's add: the URI on stdout, a chosen name, a relative clone path.
        r = subprocess.run([LIVECLONE, "add", str(src), "vm2.img", "--name", "vm2", "--api",
                            daemon.api, "--rate", "1M"], capture_output=True, text=True,
                           cwd=tmp_path, timeout=60)
        assert r.returncode == 0, r.stderr
        uri2 = r.stdout.strip()
        assert uri2 == f"nbd+unix:///vm2?socket={daemon.nbd}"
        assert events.wait_for("created", "vm2")["status"]["clone"] == str(tmp_path / "vm2.img")

        # One NBD socket: NBD_OPT_LIST lists both exports, each opens by its name.
        listed = subprocess.run(["nbdinfo", "--list", "--json",
                                 f"nbd+unix:///?socket={daemon.nbd}"],
                                capture_output=True, text=True, timeout=30)
        assert listed.returncode == 0, listed.stderr
        assert sorted(e["export-name"] for e in json.loads(listed.stdout)["exports"]) == \
            ["vm1.img", "vm2"]
        # Guest I/O on vm2 while it copies: a write reads back; the rest is the source's.
        qemu_io(uri2, "write -P 0xab 1M 64k", "flush", "read -P 0xab 1M 64k")
        expected2 = bytearray(data)
        expected2[1 << 20:(1 << 20) + (64 << 10)] = b"\xab" * (64 << 10)
        out = tmp_path / "vm2.copy"
        r = subprocess.run(["nbdcopy", uri2, str(out)], capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == bytes(expected2)
        # The FUSE directory: each clone is the file MOUNT/<name>.
        assert subprocess.run(["cmp", vm1["file"], str(src)]).returncode == 0
        assert subprocess.run(["cmp", str(tmp_path / "mnt" / "vm2"), str(out)]).returncode == 0

        # Pause and resume, by API and by the CLI with the clone's name.
        code, paused = daemon.curl("POST", "/v1/clones/vm2/pause")
        assert code == 200 and paused["status"]["phase"] == "paused"
        assert json.loads(_cli(daemon, "status", "vm2", "--json").stdout)["phase"] == "paused"
        assert _cli(daemon, "resume", "vm2").returncode == 0
        assert daemon.status("vm2")["phase"] in ("copying", "complete")
        # status by name equals the file's `liveclone status --json`, key for key.
        by_name = json.loads(_cli(daemon, "status", "vm1.img", "--json").stdout)
        by_path = json.loads(subprocess.run([LIVECLONE, "status", "--json", vm1["clone"]],
                                            capture_output=True, text=True).stdout)
        assert set(by_name) == set(by_path)

        code, listing = daemon.curl("GET", "/v1/clones")
        assert code == 200 and sorted(c["name"] for c in listing) == ["vm1.img", "vm2"]
        assert "vm2" in _cli(daemon, "ls").stdout
        assert events.wait_for("completed", "vm1.img", 60)["status"]["phase"] == "complete"

        m = _metrics(daemon)
        assert m[("liveclone_clones", "")] == 2
        assert m[("liveclone_clone_size_bytes", "vm2")] == SIZE
        assert m[("liveclone_clone_guest_writes_total", "vm2")] >= 1
        assert m[("liveclone_clone_guest_reads_total", "vm2")] >= 1
        assert m[("liveclone_clone_copied_bytes_total", "vm1.img")] > 0
        assert ("liveclone_clone_copy_rate_bytes_per_second", "vm2") in m
        assert ("liveclone_cache_hits_total", "") in m
        assert any(k[0] == "liveclone_api_request_duration_seconds_count" for k in m)

        # DELETE keeps the files; ?remove=true deletes them; the export goes.
        code, gone = daemon.curl("DELETE", "/v1/clones/vm1.img")
        assert code == 200 and gone["files_deleted"] is False
        assert (tmp_path / "vm1.img").read_bytes() == data  # complete: standalone
        assert events.wait_for("removed", "vm1.img")["status"]["phase"] == "complete"
        assert _cli(daemon, "rm", "vm2", "--remove").returncode == 0
        assert not (tmp_path / "vm2.img").exists()
        assert not list(tmp_path.glob("vm2.img.lc*"))
        code, listing = daemon.curl("GET", "/v1/clones")
        assert listing == []
        r = subprocess.run(["nbdinfo", "--size", uri2], capture_output=True, text=True)
        assert r.returncode != 0  # an unknown export is refused
        assert os.listdir(tmp_path / "mnt") == []
        code, err = daemon.curl("GET", "/v1/clones/vm2")
        assert code == 404 and set(err) == {"error", "fix"}
        assert _cli(daemon, "rm", "vm2").returncode == 5
    finally:
        events.close()


def test_openapi_describes_exactly_the_routes(daemon: Daemon) -> None:
    code, doc = daemon.curl("GET", "/openapi.json")
    assert code == 200 and doc["openapi"].startswith("3.")
    routes = {(method.upper(), path) for path, ops in doc["paths"].items()
              for method in ops if method != "parameters"}
    assert routes == {
        ("POST", "/v1/clones"), ("GET", "/v1/clones"), ("GET", "/v1/clones/{name}"),
        ("DELETE", "/v1/clones/{name}"), ("POST", "/v1/clones/{name}/pause"),
        ("POST", "/v1/clones/{name}/resume"), ("GET", "/v1/events"), ("GET", "/metrics"),
        ("GET", "/openapi.json")}
    code, err = daemon.curl("GET", "/v2/nothing")
    assert code == 404 and set(err) == {"error", "fix"}
    assert oct(os.stat(daemon.api).st_mode & 0o777) == "0o600"
    assert oct(os.stat(daemon.nbd).st_mode & 0o777) == "0o600"


def test_bad_requests_each_get_their_error_and_others_keep_serving(
        tmp_path: Path, daemon: Daemon) -> None:
    src = tmp_path / "golden.img"
    data = make_image(src, SIZE)
    good = daemon.add(src, tmp_path / "good.img", name="good")
    qemu_io(good["nbd_uri"], "write -P 0x5a 0 64k", "flush")

    def still_serving() -> None:
        qemu_io(good["nbd_uri"], "read -P 0x5a 0 64k")
        assert subprocess.run(["cmp", "-n", str(SIZE - (1 << 20)), "-i", str(1 << 20),
                               good["file"], str(src)]).returncode == 0

    def refused(status: int, body: object = None, raw: str | None = None) -> str:
        code, err = daemon.curl("POST", "/v1/clones", body, raw=raw)
        assert code == status, err
        assert set(err) == {"error", "fix"} and err["error"] and err["fix"]
        still_serving()
        return str(err["error"])

    assert "JSON" in refused(400, raw='{"source": "/x", "clone": ')
    assert "JSON object" in refused(400, raw='["not", "an", "object"]')
    assert "required" in refused(400, {"clone": str(tmp_path / "x.img")})
    assert "not absolute" in refused(400, {"source": str(src), "clone": "rel/x.img"})
    assert "'..'" in refused(400, {"source": str(src),
                                   "clone": str(tmp_path / ".." / "x.img")})
    assert "unknown field" in refused(400, {"source": str(src), "clone": "/x", "nme": "a"})
    assert "profile" in refused(400, {"source": str(src), "clone": str(tmp_path / "p.img"),
                                      "profile": str(tmp_path / "none.lcprofile")})
    assert not (tmp_path / "p.img").exists()
    assert "exists" in refused(409, {"source": str(src), "clone": str(tmp_path / "y.img"),
                                     "name": "good"})
    assert "in use" in refused(409, {"source": str(src), "clone": good["clone"],
                                     "name": "other"})
    assert "does not exist" in refused(422, {"source": str(tmp_path / "missing.img"),
                                             "clone": str(tmp_path / "m.img")})
    assert not (tmp_path / "m.img").exists()  # nothing left behind
    secret = tmp_path / "www" / "secret"
    secret.mkdir(parents=True)
    (secret / "disk.img").write_bytes(b"\0" * 4096)
    with nginx(tmp_path / "www", tmp_path / "nginx") as server:  # 403 for /secret/
        refused(422, {"source": server.url("secret/disk.img"), "clone": str(tmp_path / "h.img")})
    with tmpfs(tmp_path / "small", "4m") as small:
        big = tmp_path / "big.img"
        big.write_bytes(os.urandom(8 << 20))
        assert "no space" in refused(507, {"source": str(big), "clone": str(small / "c.img")})
        assert not (small / "c.img").exists()
    code, listing = daemon.curl("GET", "/v1/clones")
    assert [c["name"] for c in listing] == ["good"]
    daemon.wait_phase("good", "complete")
    expected = bytearray(data)
    expected[:64 << 10] = b"\x5a" * (64 << 10)
    assert (tmp_path / "good.img").read_bytes() == bytes(expected)


def test_tcp_with_tls_as_serve_has_it(tmp_path: Path) -> None:
    src = tmp_path / "golden.img"
    data = make_image(src, 1 << 20)
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    d = Daemon(tmp_path, "--tls-certificates", str(pki), listen=f"127.0.0.1:{port}").start()
    try:
        vm = d.add(src, tmp_path / "vm.img")
        assert vm["nbd_uri"] == f"nbds://127.0.0.1:{port}/vm.img"
        out = tmp_path / "out.img"
        r = subprocess.run(["nbdcopy", f"nbds://localhost:{port}/vm.img?tls-certificates={pki}",
                            str(out)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == data
        plain = subprocess.run(["nbdinfo", f"nbd://localhost:{port}/vm.img"],
                               capture_output=True, text=True, timeout=30)
        assert plain.returncode != 0  # TLS is required
    finally:
        assert d.stop() == 0, d.log.read_text()


def test_sources_that_hang_hold_up_nothing_else(tmp_path: Path) -> None:
    """Eight creates whose HTTP source accepts and never answers (more than the
    loop's default executor has threads) wait on their own: other clones keep
    serving, their status files keep being written, and a new clone is made at once."""
    src = tmp_path / "golden.img"
    make_image(src, 1 << 20)
    d = Daemon(tmp_path).start()
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(64)  # connections complete in the backlog; nothing is ever read
    waiting = []
    try:
        good = d.add(src, tmp_path / "good.img", name="good")
        for i in range(8):
            waiting.append(subprocess.Popen(
                ["curl", "-s", "--max-time", "30", "--unix-socket", d.api, "-X", "POST",
                 "-d", json.dumps({"source": f"http://127.0.0.1:{hang.getsockname()[1]}/x",
                                   "clone": str(tmp_path / f"h{i}.img")}),
                 "http://localhost/v1/clones"], stdout=subprocess.DEVNULL))
        time.sleep(1.0)
        status = tmp_path / "good.img.lcstatus"
        before = json.loads(status.read_text())["updated"]
        started = time.monotonic()
        second = d.add(src, tmp_path / "second.img", name="second")
        assert time.monotonic() - started < 10
        qemu_io(good["nbd_uri"], "read 0 64k")
        qemu_io(second["nbd_uri"], "write -P 1 0 4k", "flush", "read -P 1 0 4k")
        time.sleep(1.0)
        assert json.loads(status.read_text())["updated"] > before
        code, listing = d.curl("GET", "/v1/clones")
        assert sorted(c["name"] for c in listing) == ["good", "second"]
    finally:
        d.kill()  # the hung opens would hold a polite stop for their whole timeout
        for p in waiting:
            p.kill()
            p.wait()
        hang.close()


def test_tells_systemd_when_ready_and_stopping(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Type=notify: READY=1 once the API answers, STOPPING=1 on SIGTERM."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    d = Daemon(tmp_path).start()
    try:
        assert notify.recv(256) == b"READY=1"
    finally:
        assert d.stop() == 0, d.log.read_text()
        assert notify.recv(256) == b"STOPPING=1"
        notify.close()
