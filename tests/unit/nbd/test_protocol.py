"""The sans-IO server state machine: handshake, validation, replies, lifecycle."""

from __future__ import annotations

import errno

import pytest

from liveclone.nbd import protocol as p
from liveclone.nbdwire import wire
from liveclone.nbdwire.wire import Cmd, Opt, Rep
from tests.unit.nbd.drive import (
    EXPORT,
    SIZE,
    negotiating,
    new,
    option_replies,
    out,
    tls_handshake,
    transmitting,
)

# --- handshake -----------------------------------------------------------------------


def test_unknown_client_flags_drop() -> None:
    conn = new()
    with pytest.raises(p.RemoteProtocolError):
        conn.receive_data(wire.encode_client_flags(1 << 7))
    assert conn.state is p.State.CLOSED
    assert conn.receive_data(b"more") == []  # ignored once closed


def test_bad_option_magic_drops() -> None:
    conn = negotiating()
    with pytest.raises(p.RemoteProtocolError):
        conn.receive_data(b"X" * 16)
    assert conn.state is p.State.CLOSED


@pytest.mark.parametrize("no_zeroes,length", [(True, 10), (False, 134)])
def test_export_name(no_zeroes: bool, length: int) -> None:
    conn = new()
    flags = wire.FLAG_C_FIXED_NEWSTYLE | (wire.FLAG_C_NO_ZEROES if no_zeroes else 0)
    events = conn.receive_data(wire.encode_client_flags(flags)
                               + wire.encode_option(Opt.EXPORT_NAME, b"disk"))
    assert events == [p.ExportChosen(EXPORT, False, False)]
    data = out(conn)
    assert len(data) == length
    assert wire.decode_export_name_reply(data) == (SIZE, EXPORT.flags)


@pytest.mark.parametrize("name", ["nope", "../etc/passwd", "a/b", "\x01"])
def test_export_name_unknown_or_tricky_drops(name: str) -> None:
    conn = negotiating()
    with pytest.raises(p.RemoteProtocolError):
        conn.receive_data(wire.encode_option(Opt.EXPORT_NAME, name.encode()))


@pytest.mark.parametrize("name,rep", [("nope", Rep.ERR_UNKNOWN), ("..", Rep.ERR_INVALID),
                                      ("x/../../y", Rep.ERR_INVALID)])
def test_go_unknown_export_is_an_error_reply(name: str, rep: int) -> None:
    conn = negotiating()
    assert conn.receive_data(wire.encode_option(Opt.GO, wire.encode_info_request(name, []))) \
        == []
    ((opt, got, _),) = option_replies(out(conn))
    assert (opt, got) == (Opt.GO, rep)
    assert conn.state is p.State.NEGOTIATING


def test_info_then_go_with_block_size() -> None:
    conn = negotiating()
    req = wire.encode_info_request("", [wire.Info.BLOCK_SIZE, wire.Info.NAME,
                                        wire.Info.DESCRIPTION])
    assert conn.receive_data(wire.encode_option(Opt.INFO, req)) == []
    replies = option_replies(out(conn))
    assert [r for _, r, _ in replies] == [Rep.INFO, Rep.INFO, Rep.INFO, Rep.ACK]
    infos = dict(wire.decode_info(d) for _, r, d in replies if r == Rep.INFO)
    assert infos[wire.Info.EXPORT] == (SIZE, EXPORT.flags)
    assert infos[wire.Info.NAME] == "disk"
    assert infos[wire.Info.BLOCK_SIZE] == (1, 4096, p.DEFAULT_MAX_BLOCK)
    events = conn.receive_data(wire.encode_option(Opt.GO, req))
    assert events == [p.ExportChosen(EXPORT, False, False)]


def test_go_needs_block_size_when_aligned() -> None:
    aligned = p.Export("a", 8192, min_block=512)
    conn = negotiating(aligned)
    conn.receive_data(wire.encode_option(Opt.GO, wire.encode_info_request("a", [])))
    assert option_replies(out(conn))[0][1] == Rep.ERR_BLOCK_SIZE_REQD


def test_list_and_unknown_options_and_abort() -> None:
    conn = negotiating(EXPORT, p.Export("other", 4096, description="two"))
    conn.receive_data(wire.encode_option(Opt.LIST))
    replies = option_replies(out(conn))
    assert [wire.decode_rep_server(d) for _, r, d in replies if r == Rep.SERVER] == [
        ("disk", ""), ("other", "two")]
    assert replies[-1][1] == Rep.ACK
    conn.receive_data(wire.encode_option(Opt.LIST, b"x"))
    assert option_replies(out(conn))[0][1] == Rep.ERR_INVALID
    conn.receive_data(wire.encode_option(Opt.STARTTLS))
    assert option_replies(out(conn)) == [(Opt.STARTTLS, Rep.ERR_UNSUP,
                                          b"TLS is not configured on this server")]
    for opt in (Opt.EXTENDED_HEADERS, 999):
        conn.receive_data(wire.encode_option(opt, b"abc"))
        assert option_replies(out(conn)) == [(opt, Rep.ERR_UNSUP, b"option %d is not "
                                              b"supported" % opt)]
    assert conn.receive_data(wire.encode_option(Opt.ABORT)) == [p.Aborted()]
    assert option_replies(out(conn)) == [(Opt.ABORT, Rep.ACK, b"")]
    assert conn.state is p.State.CLOSED


def test_meta_context_needs_structured_replies() -> None:
    conn = negotiating()
    q = wire.encode_meta_context_request("disk", [wire.BASE_ALLOCATION])
    conn.receive_data(wire.encode_option(Opt.SET_META_CONTEXT, q))
    assert option_replies(out(conn))[0][1] == Rep.ERR_INVALID
    conn.receive_data(wire.encode_option(Opt.STRUCTURED_REPLY, b"x"))
    assert option_replies(out(conn))[0][1] == Rep.ERR_INVALID
    conn.receive_data(wire.encode_option(Opt.STRUCTURED_REPLY))
    assert option_replies(out(conn)) == [(Opt.STRUCTURED_REPLY, Rep.ACK, b"")]
    for opt, queries, found in ((Opt.LIST_META_CONTEXT, [], True),
                                (Opt.LIST_META_CONTEXT, ["base:"], True),
                                (Opt.LIST_META_CONTEXT, ["qemu:dirty"], False),
                                (Opt.SET_META_CONTEXT, ["qemu:dirty"], False),
                                (Opt.SET_META_CONTEXT, [wire.BASE_ALLOCATION], True)):
        conn.receive_data(wire.encode_option(opt, wire.encode_meta_context_request(
            "disk", queries)))
        replies = option_replies(out(conn))
        contexts = [wire.decode_rep_meta_context(d) for _, r, d in replies
                    if r == Rep.META_CONTEXT]
        assert contexts == ([(p.BASE_ALLOCATION_ID, wire.BASE_ALLOCATION)] if found else [])
        assert replies[-1][1] == Rep.ACK
    assert conn.base_allocation
    conn.receive_data(wire.encode_option(Opt.SET_META_CONTEXT, b"\0\0"))  # malformed
    assert option_replies(out(conn))[0][1] == Rep.ERR_INVALID


def test_non_fixed_newstyle_client_may_only_export_name() -> None:
    conn = new()
    conn.receive_data(wire.encode_client_flags(0))
    with pytest.raises(p.RemoteProtocolError):
        conn.receive_data(wire.encode_option(Opt.LIST))


def test_oversized_option_drops() -> None:
    conn = negotiating()
    with pytest.raises(p.RemoteProtocolError):
        conn.receive_data(wire.OPTION_HEADER.pack(wire.IHAVEOPT, Opt.GO, 1 << 30))


# --- transmission ------------------------------------------------------------------------


def test_requests_parse_byte_by_byte() -> None:
    conn = transmitting()
    data = (wire.encode_request(Cmd.WRITE, 1, 100, 5) + b"hello"
            + wire.encode_request(Cmd.READ, 2, 0, 4096, wire.CMD_FLAG_DF)
            + wire.encode_request(Cmd.FLUSH, 3))
    events: list[p.Event] = []
    for i in range(len(data)):
        events += conn.receive_data(data[i:i + 1])
    assert events == [p.Command(1, Cmd.WRITE, 0, 100, 5, bytearray(b"hello")),
                      p.Command(2, Cmd.READ, wire.CMD_FLAG_DF, 0, 4096),
                      p.Command(3, Cmd.FLUSH, 0, 0, 0)]
    assert conn.inflight == 3


def test_invalid_request_is_answered_and_connection_goes_on() -> None:
    conn = transmitting(structured=False)
    events = conn.receive_data(wire.encode_request(Cmd.READ, 5, SIZE, 1)
                               + wire.encode_request(Cmd.READ, 6, 0, 1))
    assert events[0] == p.Rejected(5, Cmd.READ, wire.EINVAL, events[0].reason)  # type: ignore[union-attr]
    assert events[1] == p.Command(6, Cmd.READ, 0, 0, 1)
    assert out(conn) == wire.encode_simple_reply(5, wire.EINVAL)


def test_oversized_write_payload_is_skipped() -> None:
    small = p.Export("s", SIZE, max_block=4096)
    conn = transmitting(export=small)
    events = conn.receive_data(wire.encode_request(Cmd.WRITE, 1, 0, 5000) + b"x" * 3000)
    assert [type(e) for e in events] == [p.Rejected]
    events = conn.receive_data(b"x" * 2000 + wire.encode_request(Cmd.FLUSH, 2))
    assert events == [p.Command(2, Cmd.FLUSH, 0, 0, 0)]
    err, msg = wire.decode_error_chunk(out(conn)[20:])
    assert err == wire.EINVAL and "maximum" in msg


def test_reused_cookie_drops() -> None:
    conn = transmitting()
    conn.receive_data(wire.encode_request(Cmd.READ, 1, 0, 1))
    with pytest.raises(p.RemoteProtocolError):
        conn.receive_data(wire.encode_request(Cmd.READ, 1, 0, 1))


def test_bad_request_magic_drops() -> None:
    conn = transmitting()
    with pytest.raises(p.RemoteProtocolError):
        conn.receive_data(b"\0" * 28)
    with pytest.raises(p.LocalProtocolError):
        conn.send(p.Done(1))


def test_disc_drains_in_flight_then_closes() -> None:
    conn = transmitting()
    conn.receive_data(wire.encode_request(Cmd.WRITE, 1, 0, 2) + b"ab")
    events = conn.receive_data(wire.encode_request(Cmd.DISC, 2))
    assert events == [p.Disconnect()]
    assert conn.state is p.State.DRAINING
    assert conn.send(p.Done(1)) == [wire.encode_simple_reply(1)]
    assert conn.state is p.State.CLOSED


def test_request_after_disc_drops() -> None:
    conn = transmitting()
    conn.receive_data(wire.encode_request(Cmd.READ, 1, 0, 1))
    conn.receive_data(wire.encode_request(Cmd.DISC, 2))
    with pytest.raises(p.RemoteProtocolError):
        conn.receive_data(wire.encode_request(Cmd.READ, 3, 0, 1))


# --- replies ------------------------------------------------------------------------------


def test_read_replies_simple_and_structured() -> None:
    simple = transmitting(structured=False)
    simple.receive_data(wire.encode_request(Cmd.READ, 1, 8, 3))
    assert simple.send(p.ReadDone(1, b"abc")) == [wire.encode_simple_reply(1), b"abc"]
    structured = transmitting()
    structured.receive_data(wire.encode_request(Cmd.READ, 1, 8, 3))
    head, data = structured.send(p.ReadDone(1, b"abc"))
    assert data == b"abc"
    assert wire.decode_chunk_header(head[:20]).length == 11
    assert int.from_bytes(head[20:], "big") == 8


def test_reply_misuse_is_local_error() -> None:
    conn = transmitting()
    with pytest.raises(p.LocalProtocolError):
        conn.send(p.Done(99))  # nothing in flight
    conn.receive_data(wire.encode_request(Cmd.READ, 1, 0, 4))
    with pytest.raises(p.LocalProtocolError):
        conn.send(p.ReadDone(1, b"ab"))  # wrong length
    with pytest.raises(p.LocalProtocolError):
        conn.send(p.Done(1))  # a read needs data
    with pytest.raises(p.LocalProtocolError):
        conn.send(p.Failed(1, 12345))  # not an NBD error
    assert conn.inflight == 1  # still owed
    conn.send(p.Failed(1, wire.EIO, "disk on fire"))
    assert conn.inflight == 0
    with pytest.raises(p.LocalProtocolError):
        negotiating().send(p.Done(1))


def test_block_status_clipped_and_req_one() -> None:
    conn = transmitting()
    conn.receive_data(wire.encode_request(Cmd.BLOCK_STATUS, 1, 0, 10000)
                      + wire.encode_request(Cmd.BLOCK_STATUS, 2, 0, 10000,
                                            wire.CMD_FLAG_REQ_ONE))
    (data,) = conn.send(p.Extents(1, [(4096, 0), (8192, 3), (99, 0)]))
    assert wire.decode_block_status(data[20:]) == (p.BASE_ALLOCATION_ID, [(4096, 0), (5904, 3)])
    (data,) = conn.send(p.Extents(2, [(4096, 0), (8192, 3)]))
    assert wire.decode_block_status(data[20:])[1] == [(4096, 0)]


def test_nbd_error_mapping() -> None:
    assert p.nbd_error(errno.ENOSPC) == wire.ENOSPC
    assert p.nbd_error(errno.EROFS) == wire.EPERM
    assert p.nbd_error(errno.EDQUOT) == wire.ENOSPC
    assert p.nbd_error(errno.ENOENT) == wire.EIO
    assert p.nbd_error(None) == wire.EIO


# --- validate_request ----------------------------------------------------------------------

RO = p.Export("ro", SIZE, read_only=True)
ALIGNED = p.Export("al", SIZE - 100, min_block=512)
BIG = p.Export("big", 1 << 30)
F = wire


@pytest.mark.parametrize("export,structured,meta,cmd,flags,offset,length,error", [
    (EXPORT, True, True, Cmd.READ, 0, 0, 4096, None),
    (EXPORT, True, True, Cmd.READ, 0, SIZE - 1, 1, None),
    (EXPORT, True, True, Cmd.READ, 0, SIZE - 1, 2, F.EINVAL),
    (EXPORT, True, True, Cmd.READ, 0, 1 << 63, 1, F.EINVAL),
    (EXPORT, True, True, Cmd.READ, 0, 0, 0, F.EINVAL),
    (EXPORT, True, True, Cmd.WRITE, 0, SIZE, 1, F.ENOSPC),
    (EXPORT, True, True, Cmd.WRITE_ZEROES, 0, SIZE - 1, 2, F.ENOSPC),
    (EXPORT, True, True, Cmd.TRIM, 0, SIZE - 1, 2, F.EINVAL),
    (RO, True, True, Cmd.WRITE, 0, 0, 1, F.EPERM),
    (RO, True, True, Cmd.TRIM, 0, 0, 1, F.EPERM),
    (RO, True, True, Cmd.READ, 0, 0, 1, None),
    (RO, True, True, Cmd.WRITE_ZEROES, F.CMD_FLAG_FAST_ZERO, 0, 1, F.EINVAL),
    (EXPORT, False, False, Cmd.READ, F.CMD_FLAG_DF, 0, 1, F.EINVAL),
    (EXPORT, True, True, Cmd.READ, F.CMD_FLAG_DF, 0, 1, None),
    (EXPORT, True, True, Cmd.WRITE, F.CMD_FLAG_DF, 0, 1, F.EINVAL),
    (EXPORT, True, True, Cmd.WRITE, F.CMD_FLAG_NO_HOLE, 0, 1, F.EINVAL),
    (EXPORT, True, True, Cmd.WRITE_ZEROES, F.CMD_FLAG_NO_HOLE | F.CMD_FLAG_FAST_ZERO
     | F.CMD_FLAG_FUA, 0, 1, None),
    (EXPORT, True, True, Cmd.READ, F.CMD_FLAG_REQ_ONE, 0, 1, F.EINVAL),
    (EXPORT, True, True, Cmd.READ, 1 << 9, 0, 1, F.EINVAL),
    (EXPORT, True, True, Cmd.FLUSH, F.CMD_FLAG_FUA, 0, 0, None),
    (EXPORT, True, True, Cmd.FLUSH, 0, 0, 1, F.EINVAL),
    (EXPORT, True, True, Cmd.CACHE, F.CMD_FLAG_FUA, 0, 1, None),
    (EXPORT, True, True, Cmd.BLOCK_STATUS, F.CMD_FLAG_REQ_ONE, 0, 1, None),
    (EXPORT, True, False, Cmd.BLOCK_STATUS, 0, 0, 1, F.EINVAL),
    (EXPORT, False, False, Cmd.BLOCK_STATUS, 0, 0, 1, F.EINVAL),
    (EXPORT, True, True, Cmd.RESIZE, 0, 0, 1, F.EINVAL),
    (EXPORT, True, True, 77, 0, 0, 1, F.EINVAL),
    (BIG, True, True, Cmd.READ, 0, 0, p.DEFAULT_MAX_BLOCK + 1, F.EINVAL),
    (BIG, True, True, Cmd.READ, F.CMD_FLAG_DF, 0, p.DEFAULT_MAX_BLOCK + 1, F.EOVERFLOW),
    (BIG, True, True, Cmd.TRIM, 0, 0, p.DEFAULT_MAX_BLOCK + 1, None),
    (ALIGNED, True, True, Cmd.READ, 0, 512, 1024, None),
    (ALIGNED, True, True, Cmd.READ, 0, 511, 1024, F.EINVAL),
    (ALIGNED, True, True, Cmd.WRITE, 0, 512, 100, F.EINVAL),
    (ALIGNED, True, True, Cmd.READ, 0, SIZE - 100 - 412, 412, None),  # the short tail
])
def test_validate_request(export: p.Export, structured: bool, meta: bool, cmd: int,
                          flags: int, offset: int, length: int, error: int | None) -> None:
    got = p.validate_request(export, structured, meta, cmd, flags, offset, length)
    assert (got[0] if got else None) == error, got


def test_export_flags_and_names() -> None:
    assert EXPORT.flags & wire.TF_CAN_MULTI_CONN
    assert RO.flags & wire.TF_READ_ONLY and not RO.flags & wire.TF_SEND_TRIM
    for bad in ("a/b", "..", "-x", "a\nb", "x" * 300):
        with pytest.raises(ValueError):
            p.Export(bad, 1)


def test_tls_required_before_anything_else() -> None:
    """A server with TLS: every option but STARTTLS and ABORT gets ERR_TLS_REQD,
    EXPORT_NAME drops the client, and after the handshake negotiation goes on."""
    conn = negotiating(tls=True)
    for opt in (Opt.LIST, Opt.GO, Opt.INFO, Opt.STRUCTURED_REPLY):
        conn.receive_data(wire.encode_option(opt, wire.encode_info_request("", []) if
                                             opt in (Opt.GO, Opt.INFO) else b""))
        [(o, rep, _)] = option_replies(out(conn))
        assert (o, rep) == (opt, Rep.ERR_TLS_REQD) and conn.state is p.State.NEGOTIATING
    with pytest.raises(p.RemoteProtocolError, match="TLS is required"):
        conn.receive_data(wire.encode_option(Opt.EXPORT_NAME, b""))
    conn = tls_handshake()
    # Bytes that come through TLS before the I/O layer reports the handshake done
    # are held, then parsed inside TLS.
    assert conn.receive_data(wire.encode_option(Opt.INFO, wire.encode_info_request(
        "", []))) == []
    assert out(conn) == b""
    assert conn.tls_started() == []
    assert conn.state is p.State.NEGOTIATING and conn.tls_active
    assert option_replies(out(conn))[-1][:2] == (Opt.INFO, Rep.ACK)
    conn.receive_data(wire.encode_option(Opt.STARTTLS))
    assert option_replies(out(conn))[0][1] == Rep.ERR_INVALID  # already on
    events = conn.receive_data(wire.encode_option(Opt.GO, wire.encode_info_request("", [])))
    assert isinstance(events[-1], p.ExportChosen) and conn.state is p.State.TRANSMISSION
