"""Bounds on what clients may make the server spend: the pure pieces, and the
server in-process against a client that never reads."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from liveclone.nbd import protocol as p
from liveclone.nbd.limits import Limits, LogThrottle
from liveclone.nbd.server import ServerThread
from liveclone.nbdwire import wire
from tests.unit.nbd.drive import transmitting

MiB = 1 << 20


def test_log_throttle_counts_what_it_leaves_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttle = LogThrottle(logging.getLogger("t"), interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t"):
        assert throttle("accept", logging.WARNING, "EMFILE %d", 1)
        for i in range(1000):
            now[0] += 0.001
            assert not throttle("accept", logging.WARNING, "EMFILE %d", i)
        assert throttle("other", logging.WARNING, "another kind")
        now[0] = 11
        assert throttle("accept", logging.WARNING, "EMFILE %d", 2)
    assert [r.getMessage() for r in caplog.records] == [
        "EMFILE 1", "another kind", "EMFILE 2 (1000 more like it in the last 11 s not logged)"]


@pytest.mark.parametrize("total,conn,block", [
    (256 * MiB, 64 * MiB, 32 * MiB), (32 * MiB, 8 * MiB, 4 * MiB),
    (4 * MiB, 2 * MiB, 1 * MiB), (1 << 40, 64 * MiB, 32 * MiB)])
def test_limits_derive_shares(total: int, conn: int, block: int) -> None:
    limits = Limits(max_memory=total)
    assert (limits.connection_memory, limits.max_block) == (conn, block)
    assert 2 * limits.max_block <= limits.connection_memory <= limits.max_memory


@pytest.mark.parametrize("kwargs", [{"max_memory": MiB}, {"max_connections": 0},
                                    {"handshake_limit": -1}])
def test_limits_refuse_nonsense(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Limits(**kwargs)


def test_incomplete_write_is_known_from_its_header() -> None:
    conn = transmitting()
    header = wire.encode_request(wire.Cmd.WRITE, 1, 0, 4096)
    assert conn.receive_data(header + b"x" * 1000) == []
    assert (conn.buffered, conn.incomplete, conn.received) == (28 + 1000, 3096, 0)
    events = conn.receive_data(b"x" * 3096 + wire.encode_request(wire.Cmd.READ, 2, 0, 1)[:5])
    assert [type(e) for e in events] == [p.Command]
    assert (conn.buffered, conn.incomplete, conn.received) == (5, 0, 1)


def test_block_status_range_is_cut() -> None:
    conn = transmitting()
    events = conn.receive_data(wire.encode_request(wire.Cmd.BLOCK_STATUS, 1, 0, 0xFFFFFFFF))
    assert events == [p.Rejected(1, wire.Cmd.BLOCK_STATUS, wire.EINVAL, events[0].reason)]
    big = p.Export("big", 1 << 40)
    conn = transmitting(export=big)
    (ev,) = conn.receive_data(wire.encode_request(wire.Cmd.BLOCK_STATUS, 1, 0, 0xFFFFFFFF))
    assert isinstance(ev, p.Command) and ev.length == p.MAX_BLOCK_STATUS
    # The reply may cover less than asked, never more.
    out = conn.send(p.Extents(1, [(p.MAX_BLOCK_STATUS, 0)]))
    assert len(b"".join(bytes(x) for x in out)) > 0


class _Zeros:
    """Storage that answers every read with zeros, from the event loop."""

    size = 64 * MiB
    region_size = 64 << 10

    def read(self, offset: int, length: int) -> bytearray:
        return bytearray(length)

    def read_nowait(self, offset: int, length: int) -> bytearray | None:
        return bytearray(length)


def _client(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    sock.recv(18)
    sock.sendall(wire.encode_client_flags(wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES)
                 + wire.encode_option(wire.Opt.EXPORT_NAME, b""))
    got = b""
    while len(got) < 10:
        got += sock.recv(10 - len(got))
    return sock


def test_clients_that_never_read_are_held_to_their_bounds(tmp_path: Path) -> None:
    """With --max-memory 8M (2 MiB per connection, 1 MiB blocks), five clients each
    ask for 200 MiB and read nothing: each holds about one answer, and the total
    never passes the bound (plus what one receive takes in)."""
    limits = Limits(max_memory=8 * MiB)
    with ServerThread(_Zeros(), limits=limits) as t:
        path = str(tmp_path / "s")
        t.start(unix_path=path)
        server = t.server
        socks = [_client(path) for _ in range(5)]
        for sock in socks:
            sock.sendall(b"".join(wire.encode_request(wire.Cmd.READ, i, 0, MiB)
                                  for i in range(200)))
        deadline = time.monotonic() + 30  # against a hang only
        while server.stats.requests < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # let every connection take all it may
        held = [c.held for c in list(server._connections)]
        assert server.stats.memory_peak <= limits.max_memory + 256 * 1024
        assert all(h <= limits.connection_memory for h in held), held
        assert server.stats.requests < 5 * 4  # not 1000: nothing is buffered ahead
        for sock in socks:
            sock.close()
        while server.memory and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.memory == 0  # every byte counted is given back
