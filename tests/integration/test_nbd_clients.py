"""``liveclone serve`` against real NBD clients: qemu-img, qemu-io, nbdinfo, nbdcopy, fio.

Every test runs twice: on a clone still copying (the copier throttled to 1 MiB/s
on a 64 MiB image, so most regions come from the source) and on a complete clone
whose source has been deleted. Tests keep a ``bytearray`` model of what the
export must hold and compare content, never just exit codes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from liveclone.nbdwire import wire
from liveclone.process import stop_process
from tests.conftest import LIVECLONE, make_image

SIZE = 64 << 20
SLOW = "1M"  # copier rate that keeps a 64 MiB clone copying for the whole test


def run(cmd: list[str], timeout: float = 120, check: bool = True,
        **kw: object) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check:
        assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res  # type: ignore[no-any-return]


@dataclass
class Served:
    uri: str
    proc: subprocess.Popen[str]
    clone: Path
    socket: Path


@contextmanager
def serve(source: Path | str, clone: Path, *args: str) -> Iterator[Served]:
    """Run ``liveclone serve`` until the block ends; yield once it prints its URI."""
    sock = Path(str(clone) + ".sock")
    err = open(str(clone) + ".serve.log", "a")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([LIVECLONE, "serve", str(source), str(clone), *args],
                            stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            err.flush()
            raise AssertionError(f"serve exited {proc.returncode} without a URI:\n"
                                 + Path(str(clone) + ".serve.log").read_text())
        yield Served(line.strip(), proc, clone, sock)
    finally:
        stop_process(proc, 20)
        if proc.stdout is not None:
            proc.stdout.close()
        err.close()


def stop_gracefully(s: Served) -> None:
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(20) == 0


@dataclass
class Setup:
    source: Path
    clone: Path
    model: bytearray  # what the export must hold
    copying: bool
    tmp: Path

    def expected_file(self) -> Path:
        path = self.tmp / "expected.img"
        path.write_bytes(self.model)
        return path

    def serve(self, *args: str) -> AbstractContextManager[Served]:
        rate = ("--rate", SLOW) if self.copying else ()
        return serve(self.source, self.clone, *rate, *args)


@pytest.fixture(params=["copying", "complete"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Setup:
    source = tmp_path / "source.img"
    data = make_image(source, SIZE, seed=7)
    clone = tmp_path / "clone.img"
    copying = request.param == "copying"
    if not copying:
        run([LIVECLONE, "clone", "--no-progress", str(source), str(clone)])
        source.unlink()  # a complete clone serves without its source
    return Setup(source, clone, bytearray(data), copying, tmp_path)


def assert_same(setup: Setup, uri: str) -> None:
    res = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri,
               str(setup.expected_file())], check=False)
    assert res.returncode == 0 and "identical" in res.stdout, res.stdout + res.stderr


def nbdcopy_out(uri: str, dest: Path) -> bytes:
    run(["nbdcopy", "-C", "4", uri, str(dest)])
    return dest.read_bytes()


def assert_zero_extents_are_zero(model: bytes, extents: list[tuple[int, int, bool]]) -> None:
    """Extents (start, length, zero) cover the export, and none claims zeros wrongly."""
    pos = 0
    for start, length, zero in extents:
        assert start == pos
        if zero:
            assert model[start:start + length].count(0) == length, (start, length)
        pos += length
    assert pos == len(model)


# --- tests -------------------------------------------------------------------------------


def test_qemu_img_info_map_compare(setup: Setup) -> None:
    with setup.serve() as s:
        info = json.loads(run(["qemu-img", "info", "--output=json", s.uri]).stdout)
        assert info["virtual-size"] == SIZE
        extents = json.loads(run(["qemu-img", "map", "--output=json", s.uri]).stdout)
        assert_zero_extents_are_zero(
            setup.model, [(e["start"], e["length"], e["zero"]) for e in extents])
        # The clone's own zero detection must show up: the image has holes.
        assert any(e["zero"] for e in extents)
        assert_same(setup, s.uri)
        if setup.copying:
            status = json.loads(run([LIVECLONE, "status", "--json", str(setup.clone)]).stdout)
            assert status["phase"] == "copying"
            assert status["nbd"]["uris"] == [s.uri]


def test_qemu_io_patterns_unaligned_zero_discard_aio(setup: Setup) -> None:
    m = setup.model
    with setup.serve() as s:
        cmds = [
            "write -P 0xab 1000 5000",  # unaligned, inside one region
            "read -P 0xab 1000 5000",
            "write -P 0xcd 131071 70000",  # unaligned, across a region boundary
            "read -P 0xcd 131071 70000",
            "write -z 1048576 65536",  # whole region
            "read -P 0 1048576 65536",
            "write -z 2000000 12345",  # partial regions: the rest must survive
            "read -P 0 2000000 12345",
            "discard 4194304 131072",  # two whole regions become holes
            "read -P 0 4194304 131072",
            "flush",
            "aio_write -P 0x11 8388608 4096",
            "aio_write -P 0x22 8392704 4096",
            "aio_flush",
            "aio_read -P 0x11 8388608 4096",
            "aio_read -P 0x22 8392704 4096",
            "aio_flush",
        ]
        args = ["qemu-io", "-f", "raw"]
        for c in cmds:
            args += ["-c", c]
        res = run([*args, s.uri])
        assert "failed" not in res.stdout + res.stderr, res.stdout + res.stderr
        m[1000:6000] = b"\xab" * 5000
        m[131071:131071 + 70000] = b"\xcd" * 70000
        m[1048576:1048576 + 65536] = bytes(65536)
        m[2000000:2000000 + 12345] = bytes(12345)
        m[4194304:4194304 + 131072] = bytes(131072)
        m[8388608:8388608 + 4096] = b"\x11" * 4096
        m[8392704:8392704 + 4096] = b"\x22" * 4096
        assert_same(setup, s.uri)
        stop_gracefully(s)
    # The writes were committed by SIGTERM: a new server shows them.
    with setup.serve() as s:
        assert_same(setup, s.uri)


def test_nbdinfo_json_list_map(setup: Setup) -> None:
    with setup.serve("--export-name", "disk0") as s:
        assert s.uri == f"nbd+unix:///disk0?socket={s.socket}"
        info = json.loads(run(["nbdinfo", "--json", s.uri]).stdout)
        (export,) = info["exports"]
        assert export["export-size"] == SIZE
        assert export["export-name"] == "disk0"
        assert info["structured"] is True
        assert "base:allocation" in export["contexts"]
        for cap in ("can_multi_conn", "can_flush", "can_fua", "can_trim", "can_zero",
                    "can_cache", "can_df", "can_fast_zero"):
            assert export[cap] is True, cap
        assert export["is_read_only"] is False
        listing = run(["nbdinfo", "--list", f"nbd+unix:///?socket={s.socket}"]).stdout
        assert 'export="disk0"' in listing
        # The empty name opens the default export.
        size = run(["nbdinfo", "--size", f"nbd+unix:///?socket={s.socket}"]).stdout
        assert int(size) == SIZE
        mapped = json.loads(run(["nbdinfo", "--map", "--json", s.uri]).stdout)
        assert_zero_extents_are_zero(
            setup.model, [(e["offset"], e["length"], bool(e["type"] & 2)) for e in mapped])


def test_nbdcopy_out_and_in(setup: Setup) -> None:
    with setup.serve() as s:
        out = nbdcopy_out(s.uri, setup.tmp / "out1.img")
        assert hashlib.sha256(out).digest() == hashlib.sha256(setup.model).digest()
        new = setup.tmp / "new.img"
        data = make_image(new, SIZE, seed=99)
        run(["nbdcopy", "-C", "4", str(new), s.uri])
        back = nbdcopy_out(s.uri, setup.tmp / "out2.img")
        assert back == data
        setup.model[:] = data
        run(["qemu-io", "-f", "raw", "-c", "flush", s.uri])
        assert_same(setup, s.uri)


def test_fio_random_writes_verify(setup: Setup) -> None:
    with setup.serve() as s:
        res = run(["fio", "--name=v", "--ioengine=nbd", f"--uri={s.uri}", "--rw=randwrite",
                   "--bs=4k", "--size=8M", "--offset_increment=16M", "--numjobs=4",
                   "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--group_reporting",
                   "--output-format=json"], cwd=setup.tmp)  # fio drops verify state in cwd
        job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == 4 * (8 << 20)
        assert job["read"]["io_bytes"] == 4 * (8 << 20)  # every block verified
        # Regions fio did not touch still hold the source.
        out = nbdcopy_out(s.uri, setup.tmp / "out.img")
        for j in range(4):
            lo, hi = j * (16 << 20) + (8 << 20), (j + 1) * (16 << 20)
            assert out[lo:hi] == setup.model[lo:hi]


@pytest.mark.parametrize("poll_max_ns", ["0", "1000000"])
def test_one_request_at_a_time_with_and_without_polling(setup: Setup, poll_max_ns: str) -> None:
    """Clients that wait for each answer before the next request (queue depth 1),
    with the server never polling, and polling for up to 1 ms before it sleeps
    (nbd/poll.py): every block fio wrote reads back as written, and what it did
    not touch still holds the source. While it runs, the status file (a timer on
    the same loop) keeps being written."""
    with setup.serve("--poll-max-ns", poll_max_ns) as s:
        res = run(["fio", "--name=v", "--ioengine=nbd", f"--uri={s.uri}", "--rw=randwrite",
                   "--bs=4k", "--size=4M", "--offset_increment=16M", "--numjobs=2",
                   "--iodepth=1", "--verify=crc32c", "--do_verify=1", "--group_reporting",
                   "--output-format=json"], cwd=setup.tmp)
        job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
        assert job["error"] == 0
        assert job["read"]["io_bytes"] == 2 * (4 << 20)  # every block verified
        out = nbdcopy_out(s.uri, setup.tmp / "out.img")
        for j in range(2):
            lo, hi = j * (16 << 20) + (4 << 20), (j + 1) * (16 << 20)
            assert out[lo:hi] == setup.model[lo:hi]
        assert out[2 * (16 << 20):] == setup.model[2 * (16 << 20):]
        # fio's writes and reads, counted within a second (the file lags by up to
        # 0.7 s); 30 s only against a hang.
        deadline = time.monotonic() + 30
        while True:
            status = json.loads(run([LIVECLONE, "status", "--json", str(setup.clone)]).stdout)
            if status["nbd"]["requests"] >= 2 * 2 * 1024 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status["nbd"]["requests"] >= 2 * 2 * 1024
        if poll_max_ns == "0":
            assert status["nbd"]["polled"] == 0


def _fio_verify(uri: str, cwd: Path, *extra: str) -> dict[str, object]:
    # A quarter of each job's 8 MiB: most regions get only some of their blocks.
    res = run(["fio", "--name=v", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
               "--bs=4k", "--size=8M", "--io_size=2M", "--offset_increment=16M",
               "--numjobs=4", "--iodepth=16", "--verify=crc32c", "--group_reporting",
               "--output-format=json", *extra], cwd=cwd)  # fio drops verify state in cwd
    job: dict[str, object] = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    return job


@pytest.mark.parametrize("region", ["4K", "64K"])
def test_fio_random_writes_verify_on_a_copying_clone_until_complete(
        tmp_path: Path, region: str) -> None:
    """4 KiB random writes into a copying clone (with 64K regions: into absent
    regions, as sub-blocks), verified by fio as written; then the copy finishes and
    fio verifies the same blocks again: the copier filled around them and never over
    them. Regions fio did not touch hold the source."""
    source = tmp_path / "source.img"
    data = make_image(source, SIZE, seed=7)
    clone = tmp_path / "clone.img"
    with serve(source, clone, "--rate", SLOW, "--region-size", region) as s:
        job = _fio_verify(s.uri, tmp_path, "--do_verify=1")
        assert job["write"]["io_bytes"] == job["read"]["io_bytes"] == 4 * (2 << 20)  # type: ignore[index]
        stop_gracefully(s)
    st = json.loads(run([LIVECLONE, "status", "--json", str(clone)]).stdout)
    assert st["phase"] != "complete"
    if region == "64K":  # the writes left absent regions with written sub-blocks
        assert st["regions_partial"] > 0, st
    run([LIVECLONE, "clone", "--no-progress", str(source), str(clone)])
    assert json.loads(run([LIVECLONE, "status", "--json", str(clone)]).stdout)[
        "regions_partial"] == 0
    with serve(source, clone) as s:
        job = _fio_verify(s.uri, tmp_path, "--verify_only")
        assert job["read"]["io_bytes"] == 4 * (2 << 20)  # type: ignore[index]
    out = clone.read_bytes()
    for j in range(4):
        lo, hi = j * (16 << 20) + (8 << 20), (j + 1) * (16 << 20)
        assert out[lo:hi] == data[lo:hi]


def raw_client(path: Path) -> socket.socket:
    """A hand-made client (liveclone.nbdwire.wire) through GO with structured replies,
    for requests a real client would refuse to send."""
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(10)
    c.connect(str(path))
    recv_exact(c, wire.GREETING.size)
    c.sendall(wire.encode_client_flags(wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES))
    for opt, payload in ((wire.Opt.STRUCTURED_REPLY, b""),
                         (wire.Opt.GO, wire.encode_info_request("", []))):
        c.sendall(wire.encode_option(opt, payload))
        while True:
            hdr = wire.decode_option_reply_header(recv_exact(c, wire.OPTION_REPLY_HEADER.size))
            recv_exact(c, hdr.length)
            if hdr.reply == wire.Rep.ACK:
                break
    return c


def recv_exact(c: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = c.recv(n - len(buf))
        assert got, "server closed the connection"
        buf += got
    return buf


def raw_request_error(c: socket.socket, cmd: int, offset: int, length: int,
                      payload: bytes = b"", flags: int = 0) -> int:
    """Send one request; return the NBD error of its (error or empty) reply."""
    c.sendall(wire.encode_request(cmd, 77, offset, length, flags) + payload)
    head = recv_exact(c, 4)
    if int.from_bytes(head, "big") == wire.SIMPLE_REPLY_MAGIC:
        _, error, cookie = wire.decode_simple_reply(head + recv_exact(c, 12))
        assert cookie == 77
        return error
    chunk = wire.decode_chunk_header(head + recv_exact(c, 16))
    body = recv_exact(c, chunk.length)
    assert chunk.cookie == 77 and chunk.type == wire.ReplyType.ERROR
    return wire.decode_error_chunk(body)[0]


def test_read_only_export(setup: Setup) -> None:
    with setup.serve("--read-only") as s:
        res = run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4096", s.uri], check=False)
        # qemu refuses to open a read-only export for writing
        assert res.returncode != 0 and "Permission denied" in res.stderr, res.stderr
        info = json.loads(run(["nbdinfo", "--json", s.uri]).stdout)
        assert info["exports"][0]["is_read_only"] is True
        with raw_client(s.socket) as c:  # the server refuses anyway
            assert raw_request_error(c, wire.Cmd.WRITE, 0, 4096, b"x" * 4096) == wire.EPERM
            assert raw_request_error(c, wire.Cmd.TRIM, 0, 65536) == wire.EPERM
            assert raw_request_error(c, wire.Cmd.WRITE_ZEROES, 0, 65536) == wire.EPERM
            assert raw_request_error(c, wire.Cmd.FLUSH, 0, 0) == 0
        assert_same(setup, s.uri)


def test_bad_clients_drop_only_their_connection(setup: Setup) -> None:
    with setup.serve() as s:
        # Garbage instead of client flags, then a well-behaved client at once.
        for junk in (b"\xff" * 4, b"\0\0\0\1" + b"X" * 64, b"\0\0\0\3" + os.urandom(200)):
            with socket.socket(socket.AF_UNIX) as c:
                c.settimeout(10)
                c.connect(str(s.socket))
                greeting = c.recv(18)
                assert greeting[:8] == b"NBDMAGIC"
                c.sendall(junk)
                try:
                    while c.recv(4096):
                        pass  # read until the server hangs up (option replies first)
                except ConnectionResetError:
                    pass
        # An error answers only its request; the connection goes on.
        with raw_client(s.socket) as c:
            assert raw_request_error(c, wire.Cmd.READ, SIZE - 512, 4096) == wire.EINVAL
            assert raw_request_error(c, wire.Cmd.WRITE, SIZE - 512, 4096,
                                     b"y" * 4096) == wire.ENOSPC
            assert raw_request_error(c, wire.Cmd.WRITE, 0, 8, b"z" * 8,
                                     flags=wire.CMD_FLAG_NO_HOLE) == wire.EINVAL
            assert raw_request_error(c, 42, 0, 8) == wire.EINVAL
            assert raw_request_error(c, wire.Cmd.FLUSH, 0, 0) == 0
            c.sendall(b"garbage!" * 4)  # now break the protocol: dropped
            assert c.recv(100) == b""
        assert_same(setup, s.uri)
        assert s.proc.poll() is None


def test_tcp_listener(setup: Setup) -> None:
    with setup.serve("--listen", "127.0.0.1:0") as s:
        assert s.uri.startswith("nbd://127.0.0.1:")
        assert s.uri.endswith("/clone.img")
        assert not s.socket.exists()
        out = nbdcopy_out(s.uri, setup.tmp / "out.img")
        assert out == setup.model


def test_socket_is_private_and_removed(setup: Setup) -> None:
    with setup.serve() as s:
        assert (s.socket.stat().st_mode & 0o777) == 0o600
        stop_gracefully(s)
        assert not s.socket.exists()


def test_the_pure_python_path_gives_the_same_answers(setup: Setup,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the compiled read lane and on the standard library's event loop
    (what a machine without a C compiler or without uvloop runs), the same
    clients get the same bytes: every other test here runs with both."""
    monkeypatch.setenv("LIVECLONE_LANE", "0")
    monkeypatch.setenv("LIVECLONE_LOOP", "asyncio")
    test_qemu_io_patterns_unaligned_zero_discard_aio(setup)
    test_fio_random_writes_verify(setup)
