"""Many exports on one server (the daemon's): a shared table that changes at runtime,
listed by NBD_OPT_LIST, each opened by its name; a removed export closes its
connections and leaves the others alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from liveclone.nbd import protocol as p
from liveclone.nbd.server import NBDServer
from liveclone.nbdwire import wire
from liveclone.nbdwire.client import Connection, NbdError, NbdHandshakeError, parse_uri
from tests.unit.nbd.drive import negotiating, option_replies, out


def _listed(conn: p.ServerConnection) -> list[str]:
    conn.receive_data(wire.encode_option(wire.Opt.LIST))
    names = []
    for _, rep, payload in option_replies(out(conn)):
        if rep == wire.Rep.SERVER:
            n = int.from_bytes(payload[:4], "big")
            names.append(payload[4:4 + n].decode())
    return names


def _go(conn: p.ServerConnection, name: str) -> tuple[list[p.Event], int]:
    events = conn.receive_data(wire.encode_option(
        wire.Opt.GO, wire.encode_info_request(name, [])))
    return events, option_replies(out(conn))[-1][1]


def test_a_shared_table_is_seen_live_by_every_connection() -> None:
    table = p.ExportTable()
    first = negotiating_on(table)
    assert _listed(first) == []
    table.add(p.Export("vm1", 1 << 20))
    table.add(p.Export("vm2", 2 << 20))
    second = negotiating_on(table)
    assert _listed(first) == ["vm1", "vm2"] == _listed(second)
    table.remove("vm1")
    assert _listed(first) == ["vm2"]
    events, rep = _go(first, "vm1")
    assert rep == wire.Rep.ERR_UNKNOWN and events == []
    events, rep = _go(first, "vm2")
    assert rep == wire.Rep.ACK and isinstance(events[-1], p.ExportChosen)
    assert events[-1].export.size == 2 << 20


def test_no_default_export_means_the_empty_name_is_unknown() -> None:
    conn = negotiating_on(p.ExportTable([p.Export("vm1", 4096)]))
    events, rep = _go(conn, "")
    assert rep == wire.Rep.ERR_UNKNOWN and events == []
    # EXPORT_NAME has no error reply: the connection is dropped.
    with pytest.raises(p.RemoteProtocolError):
        conn.receive_data(wire.encode_option(wire.Opt.EXPORT_NAME, b"nothing"))


def test_a_list_of_exports_keeps_its_first_as_the_default() -> None:
    conn = negotiating(p.Export("a", 4096), p.Export("b", 8192))
    events, rep = _go(conn, "")
    assert rep == wire.Rep.ACK and events[-1].export.name == "a"  # type: ignore[union-attr]


def negotiating_on(table: p.ExportTable) -> p.ServerConnection:
    conn = p.ServerConnection(table)
    out(conn)
    conn.receive_data(wire.encode_client_flags(wire.FLAG_C_FIXED_NEWSTYLE
                                               | wire.FLAG_C_NO_ZEROES))
    return conn


class _Bytes:
    """Storage that reads as one repeated byte."""

    region_size = 4096

    def __init__(self, byte: int, size: int = 1 << 20) -> None:
        self.byte, self.size = byte, size

    def read(self, offset: int, length: int) -> bytearray:
        return bytearray([self.byte]) * length

    def read_nowait(self, offset: int, length: int) -> bytearray | None:
        return None


def test_exports_added_and_removed_while_serving(tmp_path: Path) -> None:
    sock = str(tmp_path / "nbd.sock")

    async def scenario() -> None:
        server = NBDServer()
        await server.start(unix_path=sock)
        loop = asyncio.get_running_loop()

        def read(name: str) -> bytes:
            c = Connection(parse_uri(f"nbd+unix:///{name}?socket={sock}"), timeout=10)
            try:
                buf = bytearray(16)
                c.pread_into(memoryview(buf), 0)
                return bytes(buf)
            finally:
                c.close()

        try:
            with pytest.raises(NbdHandshakeError):
                await loop.run_in_executor(None, read, "vm1")
            server.add_export("vm1", _Bytes(1))  # type: ignore[arg-type]
            server.add_export("vm2", _Bytes(2))  # type: ignore[arg-type]
            assert await loop.run_in_executor(None, read, "vm1") == b"\1" * 16
            # A client attached to vm1 loses its connection when vm1 goes; vm2 stays.
            held = await loop.run_in_executor(None, lambda: Connection(
                parse_uri(f"nbd+unix:///vm1?socket={sock}"), timeout=10))
            assert server.connections_of("vm1") == 1
            await server.remove_export("vm1")
            assert server.connections_of("vm1") == 0
            with pytest.raises((NbdError, OSError)):
                await loop.run_in_executor(None, held.pread_into, memoryview(bytearray(4)), 0)
            held.close()
            with pytest.raises(NbdHandshakeError):
                await loop.run_in_executor(None, read, "vm1")
            assert await loop.run_in_executor(None, read, "vm2") == b"\2" * 16
            server.add_export("vm1", _Bytes(3))  # type: ignore[arg-type]
            assert await loop.run_in_executor(None, read, "vm1") == b"\3" * 16
            assert server.uri("vm2") == [f"nbd+unix:///vm2?socket={sock}"]
        finally:
            await server.stop()

    asyncio.run(scenario())
