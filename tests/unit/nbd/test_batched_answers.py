"""The server's batched answers: every answer ready in a turn of the loop goes out
together (those served on the loop and those from the pool), each exactly once,
with the right bytes, and every byte of memory charged for them is given back."""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path

from liveclone.nbd.server import ServerThread
from liveclone.nbdwire import wire
from tests.unit.nbd.drive import recv_exact as _recv

K = 1024
SIZE = 4 << 20


class _Memory:
    """A disk in a bytearray. Of each kind of call, the nowait one declines at random,
    so that answers from the loop and from the pool mix in the same batches."""

    size = SIZE
    region_size = 64 * K

    def __init__(self, seed: int) -> None:
        self.data = bytearray(random.Random(seed).randbytes(SIZE))
        self.rng = random.Random(seed + 1)
        self.lock = threading.Lock()
        self.nowait = {"read": 0, "write": 0}
        self.pool = {"read": 0, "write": 0}

    def read(self, offset: int, length: int) -> bytearray:
        time.sleep(self.rng.random() / 1000)  # finish out of order
        with self.lock:
            self.pool["read"] += 1
            return self.data[offset:offset + length]

    def read_nowait(self, offset: int, length: int) -> bytearray | None:
        if self.rng.random() < 0.5:
            return None
        self.nowait["read"] += 1
        with self.lock:
            return self.data[offset:offset + length]

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        with self.lock:
            self.pool["write"] += 1
            self.data[offset:offset + len(data)] = data

    def write_nowait(self, offset: int, data: bytes) -> bool:
        if self.rng.random() < 0.5:
            return False
        self.nowait["write"] += 1
        with self.lock:
            self.data[offset:offset + len(data)] = data
        return True

    def flush(self) -> None:
        pass


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)  # against a hang only
    sock.connect(path)
    _recv(sock, wire.GREETING.size)
    sock.sendall(wire.encode_client_flags(wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES)
                 + wire.encode_option(wire.Opt.EXPORT_NAME, b""))
    _recv(sock, 10)
    return sock


def _answers(sock: socket.socket, lengths: dict[int, int]) -> dict[int, bytes]:
    """Read one simple reply per cookie in ``lengths`` (the data length it carries)."""
    got: dict[int, bytes] = {}
    while len(got) < len(lengths):
        _, error, cookie = wire.decode_simple_reply(_recv(sock, wire.SIMPLE_REPLY.size))
        assert error == 0 and cookie in lengths and cookie not in got
        got[cookie] = _recv(sock, lengths[cookie])
    return got


def test_pipelined_batches_are_answered_once_each_with_the_right_bytes(
        tmp_path: Path) -> None:
    storage = _Memory(seed=7)
    model = bytearray(storage.data)
    rng = random.Random(3)
    with ServerThread(storage) as t:  # type: ignore[arg-type]
        path = str(tmp_path / "s")
        t.start(unix_path=path)
        socks = [_connect(path) for _ in range(2)]
        cookie = 0
        for _round in range(20):
            # Writes to distinct 64 KiB slots (so their order does not matter), all
            # sent in one go, on both connections; then reads of anything, likewise.
            slots = rng.sample(range(SIZE // (64 * K)), 16)
            sent: list[dict[int, int]] = [{}, {}]
            batches = [b"", b""]
            for i, slot in enumerate(slots):
                cookie += 1
                offset = slot * 64 * K + rng.randrange(0, 60 * K)
                data = rng.randbytes(rng.choice([1, 512, 4 * K]))
                model[offset:offset + len(data)] = data
                batches[i % 2] += wire.encode_request(wire.Cmd.WRITE, cookie, offset,
                                                      len(data)) + data
                sent[i % 2][cookie] = 0
            for sock, batch in zip(socks, batches, strict=True):
                sock.sendall(batch)
            for sock, lengths in zip(socks, sent, strict=True):
                _answers(sock, lengths)
            wanted: list[dict[int, tuple[int, int]]] = [{}, {}]
            batches = [b"", b""]
            for i in range(48):
                cookie += 1
                length = rng.choice([1, 4 * K, 4 * K, 100 * K])
                offset = rng.randrange(0, SIZE - length)
                batches[i % 2] += wire.encode_request(wire.Cmd.READ, cookie, offset, length)
                wanted[i % 2][cookie] = (offset, length)
            for sock, batch in zip(socks, batches, strict=True):
                sock.sendall(batch)
            for sock, reads in zip(socks, wanted, strict=True):
                got = _answers(sock, {c: n for c, (_, n) in reads.items()})
                for c, (offset, length) in reads.items():
                    assert got[c] == model[offset:offset + length], (c, offset, length)
        for sock in socks:
            sock.close()
        deadline = time.monotonic() + 30  # against a hang only
        while t.server.memory and time.monotonic() < deadline:
            time.sleep(0.01)
        assert t.server.memory == 0  # every byte charged is given back
        assert t.server.stats.errors == 0
    assert min(*storage.nowait.values(), *storage.pool.values()) > 0  # both paths ran
    assert storage.data == model
