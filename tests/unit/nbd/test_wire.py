"""The wire codec: fixed layouts and round trips in both directions."""

from __future__ import annotations

import pytest

from liveclone.nbdwire import wire


def test_greeting_layout() -> None:
    data = wire.encode_greeting(wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES)
    assert data == b"NBDMAGICIHAVEOPT\x00\x03"
    assert wire.decode_greeting(data) == (wire.NBDMAGIC, wire.IHAVEOPT, 3)


def test_request_layout_and_round_trip() -> None:
    data = wire.encode_request(wire.Cmd.WRITE, 0x0102030405060708, 4096, 512,
                               wire.CMD_FLAG_FUA)
    assert len(data) == 28
    assert data[:4] == b"\x25\x60\x95\x13"
    req = wire.decode_request(data)
    assert req == (wire.REQUEST_MAGIC, 1, 1, 0x0102030405060708, 4096, 512)


def test_simple_and_structured_reply_headers() -> None:
    assert wire.decode_simple_reply(wire.encode_simple_reply(9, wire.EIO)) == (
        wire.SIMPLE_REPLY_MAGIC, wire.EIO, 9)
    head = wire.encode_offset_data_header(5, 1 << 40, 4096)
    chunk = wire.decode_chunk_header(head[:20])
    assert chunk == (wire.STRUCTURED_REPLY_MAGIC, wire.REPLY_FLAG_DONE,
                     wire.ReplyType.OFFSET_DATA, 5, 8 + 4096)
    assert int.from_bytes(head[20:], "big") == 1 << 40


def test_option_round_trips() -> None:
    opt = wire.encode_option(wire.Opt.GO, wire.encode_info_request("disk", [3, 1]))
    hdr = wire.decode_option_header(opt[:16])
    assert hdr == (wire.IHAVEOPT, wire.Opt.GO, len(opt) - 16)
    assert wire.decode_info_request(opt[16:]) == ("disk", [3, 1])
    payload = wire.encode_meta_context_request("d", ["base:allocation", "qemu:x"])
    assert wire.decode_meta_context_request(payload) == ("d", ["base:allocation", "qemu:x"])
    rep = wire.encode_option_reply(wire.Opt.LIST, wire.Rep.SERVER,
                                   wire.encode_rep_server("a", "desc"))
    hdr2 = wire.decode_option_reply_header(rep[:20])
    assert hdr2 == (wire.OPTION_REPLY_MAGIC, wire.Opt.LIST, wire.Rep.SERVER, len(rep) - 20)
    assert wire.decode_rep_server(rep[20:]) == ("a", "desc")
    assert wire.decode_rep_meta_context(wire.encode_rep_meta_context(7, "base:allocation")) \
        == (7, "base:allocation")


def test_info_payloads() -> None:
    assert wire.decode_info(wire.encode_info_export(123, 0x1ff)) == (0, (123, 0x1ff))
    assert wire.decode_info(wire.encode_info_block_size(1, 4096, 1 << 25)) == (
        3, (1, 4096, 1 << 25))
    assert wire.decode_info(wire.encode_info_string(wire.Info.NAME, "x")) == (1, "x")


def test_export_name_reply_padding() -> None:
    assert len(wire.encode_export_name_reply(10, 1, no_zeroes=True)) == 10
    padded = wire.encode_export_name_reply(10, 1, no_zeroes=False)
    assert len(padded) == 134 and padded[10:] == bytes(124)
    assert wire.decode_export_name_reply(padded) == (10, 1)


def test_chunks() -> None:
    data = wire.encode_block_status(3, 1, [(4096, 0), (8192, 3)])
    hdr = wire.decode_chunk_header(data[:20])
    assert hdr.type == wire.ReplyType.BLOCK_STATUS and hdr.length == len(data) - 20
    assert wire.decode_block_status(data[20:]) == (1, [(4096, 0), (8192, 3)])
    err = wire.encode_error_chunk(3, wire.ENOSPC, "full")
    assert wire.decode_error_chunk(err[20:]) == (wire.ENOSPC, "full")
    hole = wire.encode_offset_hole(3, 512, 1024)
    assert wire.decode_offset_hole(hole[20:]) == (512, 1024)


@pytest.mark.parametrize("payload", [
    b"",  # too short
    b"\0\0\0\5abc",  # name longer than payload
    b"\0\0\0\1a\0\1",  # count says one info, none follows
    b"\0\0\0\1\xff\0\0",  # not UTF-8
    b"\0\0\0\1\0\0\0",  # NUL in the name
    b"\0\0\0\0\0\0extra",  # trailing bytes
])
def test_malformed_info_request(payload: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_info_request(payload)


def test_malformed_meta_context_request() -> None:
    with pytest.raises(wire.WireError):
        wire.decode_meta_context_request(b"\0\0\0\0\xff\xff\xff\xff")
    with pytest.raises(wire.WireError):
        wire.decode_block_status(b"\0\0\0\1\0\0")


def test_strings_limits() -> None:
    with pytest.raises(wire.WireError):
        wire.encode_string("a\0b")
    with pytest.raises(wire.WireError):
        wire.decode_string(b"x" * 4097)
    assert wire.decode_string("é".encode()) == "é"
