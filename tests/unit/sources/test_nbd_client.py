"""The NBD client against a real nbdkit: URIs, reads, block status, replies with and
without structured replies, errors, and the pool under threads and restarts."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from liveclone.nbdwire.client import (
    Address,
    Connection,
    NbdCommandError,
    NbdDisconnected,
    NbdHandshakeError,
    NbdProtocolError,
    Pool,
    parse_uri,
)
from liveclone.nbdwire.wire import STATE_HOLE, STATE_ZERO, Rep
from liveclone.sources.nbd import NbdSource

SIZE = 4 << 20


def test_parse_uri() -> None:
    a = parse_uri("nbd://example.com:1234/my%20disk")
    assert (a.host, a.port, a.export, a.tls, a.socket_path) == \
        ("example.com", 1234, "my disk", False, None)
    assert parse_uri("nbd://h").port == 10809 and parse_uri("nbd://h").export == ""
    u = parse_uri("nbd+unix:///e?socket=/run/x.sock")
    assert (u.socket_path, u.export, u.host) == ("/run/x.sock", "e", None)
    t = parse_uri("nbds://h/e?tls-certificates=/pki&tls-verify-peer=false")
    assert t.tls and t.tls_certificates == "/pki" and not t.tls_verify
    assert parse_uri("nbds+unix:///?socket=/s").tls
    for bad in ("nbd+unix:///e", "nbd:///e", "http://h/x", "nbd+vsock:///"):
        with pytest.raises(ValueError):
            parse_uri(bad)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    """Data, then a hole, then data; the file ends in a hole."""
    rng = random.Random(5)
    path = tmp_path / "img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(rng.randbytes(1 << 20))
        f.seek(2 << 20)
        f.write(rng.randbytes(1 << 20))
    return path, path.read_bytes()


ServerFactory = Callable[..., tuple[Address, subprocess.Popen[bytes]]]


@pytest.fixture
def nbdkit(tmp_path: Path, image: tuple[Path, bytes]) -> Iterator[ServerFactory]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*options: str, sock: Path | None = None,
              params: tuple[str, ...] = ()) -> tuple[Address, subprocess.Popen[bytes]]:
        sock = sock or tmp_path / f"s{len(procs)}.sock"
        proc = subprocess.Popen(["nbdkit", "-f", "-r", "-U", str(sock), *options, "file",
                                 str(image[0]), *params], stdin=subprocess.DEVNULL)
        procs.append(proc)
        while not sock.exists():
            assert proc.poll() is None
            time.sleep(0.01)
        return Address(socket_path=str(sock)), proc

    try:
        yield start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.mark.parametrize("options", [(), ("--no-sr",)], ids=["structured", "simple"])
def test_read_and_block_status(nbdkit: ServerFactory, image: tuple[Path, bytes],
                               options: tuple[str, ...]) -> None:
    data = image[1]
    c = Connection(nbdkit(*options)[0])
    try:
        assert c.size == SIZE and c.structured == (not options)
        for off, n in [(0, 4096), (123, 1), (1 << 20, 1 << 20), (SIZE - 7, 7), (0, SIZE)]:
            buf = bytearray(n)
            c.pread_into(memoryview(buf), off)
            assert buf == data[off:off + n]
        runs = c.block_status(0, SIZE)
        if options:  # no structured replies: no base:allocation, all data
            assert runs == [(SIZE, 0)]
        else:
            assert sum(n for n, _ in runs) == SIZE
            pos, holes = 0, []
            for n, flags in runs:
                if flags & STATE_ZERO:
                    assert flags & STATE_HOLE
                    holes.append((pos, n))
                pos += n
            assert holes == [(1 << 20, 1 << 20), (3 << 20, 1 << 20)]
        # A bad request gets an error reply and the connection goes on.
        with pytest.raises(NbdCommandError) as info:
            c.pread_into(memoryview(bytearray(4096)), SIZE)
        assert "EINVAL" in str(info.value)
        buf = bytearray(10)
        c.pread_into(memoryview(buf), 5)
        assert buf == data[5:15]
    finally:
        c.close()


def test_handshake_refusals(nbdkit: ServerFactory, tmp_path: Path) -> None:
    addr, _ = nbdkit("--filter=exportname",
                     params=("exportname-strict=true", "exportname=good"))
    with pytest.raises(NbdHandshakeError) as info:
        Connection(Address(socket_path=addr.socket_path, export="bad"))
    assert info.value.reply == Rep.ERR_UNKNOWN
    # nbdkit may add its own text after the reply's name.
    assert str(info.value).startswith(
        f"the server at {addr.socket_path} refused the export 'bad' (ERR_UNKNOWN"), info.value
    Connection(Address(socket_path=addr.socket_path, export="good")).close()
    old, _ = nbdkit("--mask-handshake=0")
    with pytest.raises(NbdProtocolError, match="old NBD handshake"):
        Connection(old)
    with pytest.raises(NbdDisconnected, match="cannot connect"):
        Connection(Address(socket_path=str(tmp_path / "nothing.sock")))


def test_pool_serves_threads(nbdkit: ServerFactory, tmp_path: Path,
                                                     image: tuple[Path, bytes]) -> None:
    data = image[1]
    sock = tmp_path / "pool.sock"
    pool = Pool(nbdkit(sock=sock)[0], size=4)
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(50):
                off = rng.randrange(SIZE)
                n = rng.randrange(1, min(256 << 10, SIZE - off) + 1)
                assert pool.pread(off, n) == data[off:off + n]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool._idle.qsize() <= 4  # never more connections than the pool's size
    pool.close()


def test_source_reconnects_after_server_restart(nbdkit: ServerFactory, tmp_path: Path,
                                                image: tuple[Path, bytes]) -> None:
    data = image[1]
    sock = tmp_path / "r.sock"
    address, server = nbdkit(sock=sock)
    source = NbdSource(address, f"nbd+unix:///?socket={sock}")
    try:
        assert source.pread(0, 4096) == data[:4096]
        # Kill the server, start a new one on the same socket: the pooled connection
        # is dead; the retry opens a fresh one.
        server.kill()
        server.wait()
        sock.unlink(missing_ok=True)
        nbdkit(sock=sock)
        assert source.pread(1 << 20, 8192) == data[1 << 20:(1 << 20) + 8192]
        assert source.status()["recoveries"] >= 1
        ext = list(source.extents(0, SIZE))
        assert sum(e.length for e in ext) == SIZE
        assert [(e.offset, e.length) for e in ext if not e.data] == \
            [(1 << 20, 1 << 20), (3 << 20, 1 << 20)]
    finally:
        source.close()
