"""Drive a ``ServerConnection`` from the client side with ``wire``: a test kit."""

from __future__ import annotations

import socket

from liveclone.nbd import protocol as p
from liveclone.nbdwire import wire

SIZE = 1 << 20
EXPORT = p.Export("disk", SIZE)


def new(*exports: p.Export, tls: bool = False) -> p.ServerConnection:
    conn = p.ServerConnection(list(exports) or [EXPORT], tls=tls)
    assert conn.data_to_send() == [wire.encode_greeting(
        wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES)]
    return conn


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split server bytes into (option, reply type, payload)."""
    out = []
    pos = 0
    while pos < len(data):
        hdr = wire.decode_option_reply_header(data[pos:pos + wire.OPTION_REPLY_HEADER.size])
        assert hdr.magic == wire.OPTION_REPLY_MAGIC
        pos += wire.OPTION_REPLY_HEADER.size
        out.append((hdr.option, hdr.reply, data[pos:pos + hdr.length]))
        pos += hdr.length
    return out


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from a server's socket (which must not close first)."""
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        assert got, "server closed the connection"
        buf += got
    return bytes(buf)


def out(conn: p.ServerConnection) -> bytes:
    return b"".join(bytes(x) for x in conn.data_to_send())


def negotiating(*exports: p.Export, tls: bool = False) -> p.ServerConnection:
    conn = new(*exports, tls=tls)
    assert conn.receive_data(wire.encode_client_flags(
        wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES)) == []
    assert conn.state is p.State.NEGOTIATING
    return conn


def transmitting(structured: bool = True, export: p.Export = EXPORT) -> p.ServerConnection:
    conn = negotiating(export)
    data = b""
    if structured:
        data += wire.encode_option(wire.Opt.STRUCTURED_REPLY)
        data += wire.encode_option(wire.Opt.SET_META_CONTEXT, wire.encode_meta_context_request(
            export.name, [wire.BASE_ALLOCATION]))
    data += wire.encode_option(wire.Opt.GO, wire.encode_info_request(
        export.name, [wire.Info.BLOCK_SIZE]))
    events = conn.receive_data(data)
    assert isinstance(events[-1], p.ExportChosen)
    assert conn.state is p.State.TRANSMISSION
    out(conn)
    return conn


def draining() -> p.ServerConnection:
    conn = transmitting()
    conn.receive_data(wire.encode_request(wire.Cmd.READ, 1, 0, 512))
    conn.receive_data(wire.encode_request(wire.Cmd.DISC, 2))
    assert conn.state is p.State.DRAINING
    return conn


def tls_handshake() -> p.ServerConnection:
    """TLS required; STARTTLS acknowledged, the I/O layer's handshake not done yet."""
    conn = negotiating(tls=True)
    assert conn.receive_data(wire.encode_option(wire.Opt.STARTTLS)) == [p.StartTLS()]
    assert option_replies(out(conn)) == [(wire.Opt.STARTTLS, wire.Rep.ACK, b"")]
    assert conn.state is p.State.TLS_HANDSHAKE
    return conn


def closed() -> p.ServerConnection:
    conn = negotiating()
    conn.receive_data(wire.encode_option(wire.Opt.ABORT))
    assert conn.state is p.State.CLOSED
    out(conn)
    return conn


BUILDERS = {
    p.State.HANDSHAKE: new,
    p.State.NEGOTIATING: negotiating,
    p.State.TLS_HANDSHAKE: tls_handshake,
    p.State.TRANSMISSION: transmitting,
    p.State.DRAINING: draining,
    p.State.CLOSED: closed,
}
