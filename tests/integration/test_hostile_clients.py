"""``liveclone serve`` against clients that try to make it spend without bound, and
starts that must fail without leaving anything behind (DESIGN invariant 11).

Each test runs the real command as a child process and attacks it with raw
sockets, while a real client (nbdinfo, qemu-img) must still be served. Memory is
read from /proc/PID/status: VmHWM is the peak resident set, so a burst that was
buffered and then freed still shows.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from liveclone.nbdwire import wire
from liveclone.process import stop_process
from tests.conftest import LIVECLONE, make_image
from tests.integration.test_nbd_clients import recv_exact

MiB = 1 << 20
SIZE = 64 * MiB
BOUND = 256 * MiB  # the --max-memory these tests serve with (the default is 64M)
# Peak RSS may pass the bytes counted by one answer being copied (asyncio keeps a
# copy of what the socket did not take) and by allocator slack; no more.
MARGIN = 48 * MiB


@dataclass
class Server:
    proc: subprocess.Popen[str]
    uri: str
    clone: Path
    log: Path
    # Every socket a test opens, closed by serve() however the test ends (a
    # failed test must not leave them for the garbage collector of a later one).
    sockets: list[socket.socket]

    def status(self) -> dict[str, Any]:
        for _ in range(100):
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                st: dict[str, Any] = json.loads(Path(f"{self.clone}.lcstatus").read_text())
                if "nbd" in st:
                    return st
            time.sleep(0.05)
        raise AssertionError("no status with NBD counters")

    def proc_status(self, field: str) -> int:
        """A VmRSS/VmHWM-like field of /proc/PID/status, in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field}")

    def wait_nbd(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30) -> \
            dict[str, Any]:
        """Poll the status file until ``pred(status["nbd"])`` (a deadline only
        against hanging, never an assertion on speed)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            nbd: dict[str, Any] = self.status()["nbd"]
            if pred(nbd):
                return nbd
            assert time.monotonic() < deadline, f"status never matched: {nbd}"
            time.sleep(0.05)


@contextlib.contextmanager
def serve(tmp: Path, *args: str, nofile: int | None = None) -> Iterator[Server]:
    source = tmp / "source.img"
    if not source.exists():
        make_image(source, SIZE, seed=3)
    clone = tmp / "clone.img"
    log = tmp / "serve.log"

    def limit_fds() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(log, "w") as err:
        if "--max-memory" not in args:
            args = ("--max-memory", "256M", *args)
        proc = subprocess.Popen([LIVECLONE, "serve", str(source), str(clone), *args],
                                stdout=subprocess.PIPE, stderr=err, text=True,
                                preexec_fn=limit_fds)
    sockets: list[socket.socket] = []  # every one a test opens, closed however it ends
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"serve exited {proc.wait(10)}:\n{log.read_text()}"
        yield Server(proc, line.strip(), clone, log, sockets)
    finally:
        for sock in sockets:
            sock.close()
        stop_process(proc, 20)
        if proc.stdout is not None:
            proc.stdout.close()


def raw_client(server: Server) -> socket.socket:
    """A connected socket past the handshake (EXPORT_NAME, no zeroes)."""
    sock = connect(server)
    greeting = recv_exact(sock, wire.GREETING.size)
    assert wire.GREETING.unpack(greeting)[1] == wire.IHAVEOPT
    sock.sendall(wire.encode_client_flags(wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES)
                 + wire.encode_option(wire.Opt.EXPORT_NAME, b""))
    size, _ = wire.decode_export_name_reply(recv_exact(sock, 10))
    assert size == SIZE
    return sock


def connect(server: Server) -> socket.socket:
    if server.uri.startswith("nbd+unix"):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(server.uri.split("socket=", 1)[1])
    else:
        host, port = server.uri.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        sock = socket.create_connection((host.strip("[]"), int(port)))
    server.sockets.append(sock)
    return sock


def burst(sock: socket.socket, count: int, length: int = 32 * MiB) -> None:
    """``count`` READs of ``length`` bytes in one send; the answers are never read."""
    sock.sendall(b"".join(wire.encode_request(wire.Cmd.READ, i, (i * length) % SIZE, length)
                          for i in range(count)))


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}: {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def assert_served(server: Server, tmp: Path) -> None:
    """nbdinfo negotiates and qemu-img reads every byte, equal to the source."""
    info = run(["nbdinfo", "--json", server.uri])
    assert json.loads(info.stdout)["exports"][0]["export-size"] == SIZE
    res = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", server.uri,
               str(tmp / "source.img")])
    assert "identical" in res.stdout


def idle_rss(server: Server, tmp: Path) -> int:
    """RSS after one full read by a real client (pool threads and buffers warm)."""
    assert_served(server, tmp)
    return server.proc_status("VmRSS")


# --- memory ------------------------------------------------------------------------


def test_read_burst_from_clients_that_never_read_is_bounded(tmp_path: Path) -> None:
    """3 clients each send 40 READs of 32 MiB (3.75 GiB asked) and read nothing:
    each is held to its share (64 MiB), and qemu-img reads the whole export
    meanwhile, nobody dropped."""
    with serve(tmp_path, "--rate", "1M") as server:
        idle = idle_rss(server, tmp_path)
        attackers = [raw_client(server) for _ in range(3)]
        for sock in attackers:
            burst(sock, 40)
        nbd = server.wait_nbd(lambda n: n["memory"] >= 3 * 30 * MiB)
        assert_served(server, tmp_path)  # meanwhile
        nbd = server.status()["nbd"]
        assert nbd["memory_peak"] <= BOUND + MiB
        assert nbd["stalled"] == 0 and nbd["connections"] >= 3, nbd
        grown = server.proc_status("VmHWM") - idle
        print(f"idle RSS {idle >> 20} MiB, peak +{grown >> 20} MiB, {nbd}")
        assert grown < 3 * 64 * MiB + MARGIN, f"RSS grew {grown >> 20} MiB"
        for sock in attackers:
            sock.close()
        assert_served(server, tmp_path)  # after


def test_many_clients_that_never_read_cannot_pass_the_total(tmp_path: Path) -> None:
    """12 such clients could hold 384 MiB even at one answer each: the total stays
    at --max-memory (256 MiB) and RSS grows by less than that. Small reads still
    fit beside them (nbdinfo and qemu-img are served meanwhile); a 32 MiB read
    does not, until the stalled clients are dropped (after 5 s)."""
    with serve(tmp_path, "--rate", "1M") as server:
        idle = idle_rss(server, tmp_path)
        attackers = [raw_client(server) for _ in range(12)]
        for sock in attackers:
            burst(sock, 40)
        nbd = server.wait_nbd(lambda n: n["memory"] >= BOUND - 40 * MiB)
        assert_served(server, tmp_path)  # meanwhile
        reader = raw_client(server)
        reader.settimeout(60)  # against a hang only
        reader.sendall(wire.encode_request(wire.Cmd.READ, 1, 32 * MiB, 32 * MiB))
        reply = recv_exact(reader, wire.SIMPLE_REPLY.size + 32 * MiB)
        assert wire.SIMPLE_REPLY.unpack(reply[:wire.SIMPLE_REPLY.size])[1:] == (0, 1)
        with open(tmp_path / "source.img", "rb") as f:
            f.seek(32 * MiB)
            assert reply[wire.SIMPLE_REPLY.size:] == f.read(32 * MiB)
        # The reader was let in only once a stalled client was dropped; the status
        # file lags by up to 0.7 s (counters taken every 0.2 s, written every 0.5 s),
        # so the count may show a moment later.
        nbd = server.wait_nbd(lambda n: n["stalled"] >= 1)
        assert nbd["memory_peak"] <= BOUND + MiB, nbd
        grown = server.proc_status("VmHWM") - idle
        print(f"idle RSS {idle >> 20} MiB, peak +{grown >> 20} MiB, {nbd}")
        assert grown < BOUND + MARGIN, f"RSS grew {grown >> 20} MiB"
        for sock in [reader, *attackers]:
            sock.close()
        assert_served(server, tmp_path)  # after
    assert "dropping a client that took none of its" in server.log.read_text()


def test_smaller_max_memory_is_kept(tmp_path: Path) -> None:
    """--max-memory 32M: the export advertises 4 MiB blocks, and clients that never
    read make the server hold no more than 32 MiB."""
    with serve(tmp_path, "--rate", "1M", "--max-memory", "32M") as server:
        info = json.loads(run(["nbdinfo", "--json", server.uri]).stdout)
        assert info["exports"][0]["block_size_maximum"] == 4 * MiB
        attackers = [raw_client(server) for _ in range(6)]
        for sock in attackers:
            burst(sock, 200, 4 * MiB)
        server.wait_nbd(lambda n: n["memory"] >= 16 * MiB)
        nbd = server.status()["nbd"]
        assert nbd["memory_peak"] <= 33 * MiB, nbd
        for sock in attackers:
            sock.close()
        assert_served(server, tmp_path)


# --- connections -------------------------------------------------------------------


def test_idle_connections_under_a_low_fd_limit(tmp_path: Path) -> None:
    """200 connections that never negotiate, under `ulimit -n 64`: the server caps
    connections to what its descriptors allow, a real client gets in past the idle
    ones at once, and the log stays a few lines."""
    with serve(tmp_path, "--rate", "1M", nofile=64) as server:
        idle = []
        for _ in range(200):
            idle.append(connect(server))
        nbd = server.wait_nbd(lambda n: n["evicted"] + n["refused"] >= 100)
        assert_served(server, tmp_path)
        run(["nbdinfo", "--list", server.uri])
        nbd = server.status()["nbd"]
        assert nbd["evicted"] >= 100 and nbd["evicted"] + nbd["refused"] >= 150, nbd
        for sock in idle:
            sock.close()
        server.wait_nbd(lambda n: n["connections"] == 0)
        assert_served(server, tmp_path)
    log = server.log.read_text()
    assert "Too many open files" not in log
    assert "no room for more" in log  # the cap is said once
    assert len(log.splitlines()) < 20, log
    assert len(log) < 4096, log


def test_a_client_that_never_negotiates_is_dropped(tmp_path: Path) -> None:
    with serve(tmp_path, "--rate", "1M", "--handshake-limit", "0.5") as server:
        sock = connect(server)
        sock.settimeout(30)  # against a hang only
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        assert data.startswith(wire.encode_greeting(wire.FLAG_FIXED_NEWSTYLE
                                                    | wire.FLAG_NO_ZEROES))
        nbd = server.wait_nbd(lambda n: n["timed_out"] == 1)
        assert nbd["connections"] == 0
        # A client that negotiated is never timed out, however long it stays.
        client = raw_client(server)
        time.sleep(1.0)
        client.sendall(wire.encode_request(wire.Cmd.READ, 7, 0, 4096))
        reply = recv_exact(client, wire.SIMPLE_REPLY.size + 4096)
        assert wire.SIMPLE_REPLY.unpack(reply[:wire.SIMPLE_REPLY.size])[1] == 0
        assert reply[wire.SIMPLE_REPLY.size:] == (tmp_path / "source.img").read_bytes()[:4096]
        assert server.status()["nbd"]["timed_out"] == 1
        sock.close()
        client.close()


def test_max_connections_refuses_past_negotiated_clients(tmp_path: Path) -> None:
    with serve(tmp_path, "--rate", "1M", "--max-connections", "2") as server:
        a, b = raw_client(server), raw_client(server)
        c = connect(server)
        c.settimeout(30)
        assert c.recv(100) == b""  # closed at once, before the greeting
        c.close()
        server.wait_nbd(lambda n: n["refused"] == 1)
        a.close()
        server.wait_nbd(lambda n: n["connections"] == 1)
        run(["nbdinfo", server.uri])
        b.close()
    assert "refusing a client: 2 connections are open" in server.log.read_text()


# --- a clean start --------------------------------------------------------------------


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("clone"))


def start_fails(tmp: Path, *args: str, user: str | None = None) -> \
        subprocess.CompletedProcess[str]:
    source = tmp / "source.img"
    if not source.exists():
        make_image(source, 1 * MiB, seed=3)
    cmd = [LIVECLONE, *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp)
    assert res.returncode != 0, res.stderr
    assert "Traceback" not in res.stderr
    return res


def test_socket_in_a_missing_directory(tmp_path: Path) -> None:
    res = start_fails(tmp_path, "serve", "source.img", "clone.img",
                      "--socket", str(tmp_path / "nope" / "s.sock"))
    assert res.returncode == 9, res.stderr
    assert "nope does not exist; create the directory or give --socket" in res.stderr
    assert leftovers(tmp_path) == []


def test_socket_path_is_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("precious")
    res = start_fails(tmp_path, "serve", "source.img", "clone.img",
                      "--socket", str(tmp_path / "taken"))
    assert res.returncode == 2, res.stderr
    assert "exists and is not a socket: remove it or give another --socket" in res.stderr
    assert (tmp_path / "taken").read_text() == "precious"
    assert leftovers(tmp_path) == []


def test_socket_in_an_unwritable_directory() -> None:
    """Run as nobody: the clone's directory is writable, the socket's is not."""
    base = Path(tempfile.mkdtemp(prefix="lc-hostile-", dir="/tmp"))  # nobody reaches it
    try:
        base.chmod(0o777)
        make_image(base / "source.img", 1 * MiB, seed=3)
        (base / "source.img").chmod(0o644)
        sockdir = base / "root-only"
        sockdir.mkdir(mode=0o755)
        res = start_fails(base, "serve", "source.img", "clone.img",
                          "--socket", str(sockdir / "s.sock"), user="65534")
        assert res.returncode == 9, res.stderr
        assert "no permission to write in" in res.stderr
        assert "writable directory" in res.stderr
        assert leftovers(base) == []
    finally:
        shutil.rmtree(base)


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = start_fails(tmp_path, "serve", "source.img", "clone.img",
                          "--listen", f"127.0.0.1:{port}")
    assert res.returncode == 2, res.stderr
    assert "choose another port" in res.stderr
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["serve", "mount"])
def test_missing_mount_point(tmp_path: Path, command: str) -> None:
    extra = ["--mount", "mnt"] if command == "serve" else ["mnt"]
    res = start_fails(tmp_path, command, "source.img", "clone.img", *extra)
    assert res.returncode == 9, res.stderr
    assert "mount point mnt does not exist: create it first" in res.stderr
    assert leftovers(tmp_path) == []


# --- TCP exposure ---------------------------------------------------------------------


def other_address() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one."""
    if shutil.which("hostname") is None:
        return None
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout
    return next((a for a in out.split() if "." in a and not a.startswith("127.")), None)


def test_listen_without_host_is_loopback_only(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with serve(tmp_path, "--rate", "1M", "--listen", f":{port}") as server:
        assert server.uri == f"nbd://127.0.0.1:{port}/clone.img"
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                                   text=True).stdout.split()
        assert f"127.0.0.1:{port}" in listening, listening
        assert f"0.0.0.0:{port}" not in listening and f"*:{port}" not in listening
        addr = other_address()
        if addr is not None:
            with pytest.raises(ConnectionRefusedError), socket.socket() as s:
                s.connect((addr, port))
        run(["nbdinfo", server.uri])
    assert "warning" not in server.log.read_text()


def test_listen_on_every_interface_warns(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with serve(tmp_path, "--rate", "1M", "--listen", f"0.0.0.0:{port}") as server:
        run(["nbdinfo", f"nbd://127.0.0.1:{port}/clone.img"])
    log = server.log.read_text()
    assert f"warning: listening on every interface (0.0.0.0:{port}) without TLS" in log


def test_port_given_alone_is_refused(tmp_path: Path) -> None:
    res = start_fails(tmp_path, "serve", "source.img", "clone.img", "--listen", "10809")
    assert res.returncode == 2 and "use HOST:PORT" in res.stderr
    assert leftovers(tmp_path) == []

