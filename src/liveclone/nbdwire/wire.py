"""NBD wire format: constants and a pure struct codec. No I/O, no state.

Everything here turns Python values into the bytes of one NBD message, or one
message's bytes back into values, for both directions, so the server frontend
(``nbd/protocol.py``) and the client (``nbdwire/client.py``) share it. The
protocol is the fixed newstyle handshake and the transmission phase with simple
and structured replies of NetworkBlockDevice/nbd ``doc/proto.md``. All integers
are big-endian.

Decoders of fixed-size headers take exactly the header's bytes (any buffer) and
never fail on content: checking magic numbers is the caller's job, since what to
do about a bad one depends on who is reading. Decoders of variable payloads raise
``WireError`` when the payload is malformed (short, overlong, bad UTF-8, NUL).
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

Buffer = bytes | bytearray | memoryview

# --- magic numbers --------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71  # extended headers: recognised, not supported
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- handshake flags (server, 16 bits) and client flags (32 bits) -----------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# --- transmission flags (16 bits, per export) --------------------------------------
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# Bytes of zeroes after the NBD_OPT_EXPORT_NAME reply, unless NO_ZEROES.
EXPORT_NAME_PADDING = 124


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Rep(IntEnum):
    """Option reply types. Those with the top bit set are errors."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9


def is_error_reply(rep: int) -> bool:
    return bool(rep & _ERR)


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


# --- command flags (16 bits) ------------------------------------------------------
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_PAYLOAD_LEN = 1 << 5


class ReplyType(IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE = 1 << 0

# --- errors, as the protocol numbers them (equal to Linux errno values) ------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108
NBD_ERRORS = frozenset({EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN})

# --- block status -----------------------------------------------------------------
BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1
STATE_ZERO = 2

MAX_STRING = 4096  # the spec's hard limit on any string

# --- structs ----------------------------------------------------------------------
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_INFO_EXPORT = struct.Struct(">HQH")  # type, size, flags
_INFO_BLOCK_SIZE = struct.Struct(">HIII")  # type, minimum, preferred, maximum
_OFFSET_HOLE = struct.Struct(">QI")
_ERROR_CHUNK = struct.Struct(">IH")
_EXTENT = struct.Struct(">II")


class WireError(ValueError):
    """A payload that does not parse."""


# --- strings ------------------------------------------------------------------------

def encode_string(text: str) -> bytes:
    data = text.encode()
    if len(data) > MAX_STRING or b"\0" in data:
        raise WireError(f"string of {len(data)} bytes is not an NBD string")
    return data


def decode_string(data: Buffer) -> str:
    if len(data) > MAX_STRING:
        raise WireError(f"string of {len(data)} bytes is over {MAX_STRING}")
    raw = bytes(data)
    if b"\0" in raw:
        raise WireError("string contains NUL")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise WireError("string is not UTF-8") from None


def _encode_lstring(text: str) -> bytes:
    data = encode_string(text)
    return _U32.pack(len(data)) + data


class _Reader:
    """Cursor over one payload; every short read is a WireError."""

    def __init__(self, data: Buffer) -> None:
        self.view = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n > len(self.view) - self.pos:
            raise WireError(f"payload too short: wanted {n} bytes at {self.pos}")
        out = self.view[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        value: int = _U16.unpack(self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = _U32.unpack(self.take(4))[0]
        return value

    def lstring(self) -> str:
        return decode_string(self.take(self.u32()))

    def end(self) -> None:
        if self.pos != len(self.view):
            raise WireError(f"{len(self.view) - self.pos} unexpected bytes at end of payload")


# --- handshake --------------------------------------------------------------------

def encode_greeting(flags: int) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def decode_greeting(data: Buffer) -> tuple[int, int, int]:
    """(NBDMAGIC?, IHAVEOPT?, handshake flags)."""
    magic, opt_magic, flags = GREETING.unpack(data)
    return magic, opt_magic, flags


def encode_client_flags(flags: int) -> bytes:
    return CLIENT_FLAGS.pack(flags)


def decode_client_flags(data: Buffer) -> int:
    flags: int = CLIENT_FLAGS.unpack(data)[0]
    return flags


class OptionHeader(NamedTuple):
    magic: int
    option: int
    length: int


def encode_option(option: int, data: Buffer = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + bytes(data)


def decode_option_header(data: Buffer) -> OptionHeader:
    return OptionHeader(*OPTION_HEADER.unpack(data))


class OptionReplyHeader(NamedTuple):
    magic: int
    option: int
    reply: int
    length: int


def encode_option_reply(option: int, reply: int, data: Buffer = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + bytes(data)


def decode_option_reply_header(data: Buffer) -> OptionReplyHeader:
    return OptionReplyHeader(*OPTION_REPLY_HEADER.unpack(data))


def encode_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    out = EXPORT_NAME_REPLY.pack(size, flags)
    return out if no_zeroes else out + bytes(EXPORT_NAME_PADDING)


def decode_export_name_reply(data: Buffer) -> tuple[int, int]:
    """(size, transmission flags) from the first 10 bytes."""
    size, flags = EXPORT_NAME_REPLY.unpack(memoryview(data)[:EXPORT_NAME_REPLY.size])
    return size, flags


# --- option payloads ----------------------------------------------------------------

def encode_info_request(name: str, infos: list[int]) -> bytes:
    """Payload of NBD_OPT_INFO and NBD_OPT_GO."""
    return (_encode_lstring(name) + _U16.pack(len(infos))
            + b"".join(_U16.pack(i) for i in infos))


def decode_info_request(data: Buffer) -> tuple[str, list[int]]:
    r = _Reader(data)
    name = r.lstring()
    infos = [r.u16() for _ in range(r.u16())]
    r.end()
    return name, infos


def encode_meta_context_request(name: str, queries: list[str]) -> bytes:
    """Payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT."""
    return (_encode_lstring(name) + _U32.pack(len(queries))
            + b"".join(_encode_lstring(q) for q in queries))


def decode_meta_context_request(data: Buffer) -> tuple[str, list[str]]:
    r = _Reader(data)
    name = r.lstring()
    count = r.u32()
    if count > len(r.view):  # each query takes at least 4 bytes; refuse absurd counts
        raise WireError(f"{count} queries cannot fit in {len(r.view)} bytes")
    queries = [r.lstring() for _ in range(count)]
    r.end()
    return name, queries


def encode_rep_server(name: str, description: str = "") -> bytes:
    """Payload of an NBD_REP_SERVER reply (NBD_OPT_LIST)."""
    return _encode_lstring(name) + encode_string(description)


def decode_rep_server(data: Buffer) -> tuple[str, str]:
    r = _Reader(data)
    name = r.lstring()
    return name, decode_string(r.take(len(r.view) - r.pos))


def encode_rep_meta_context(context_id: int, name: str) -> bytes:
    return _U32.pack(context_id) + encode_string(name)


def decode_rep_meta_context(data: Buffer) -> tuple[int, str]:
    r = _Reader(data)
    context_id = r.u32()
    return context_id, decode_string(r.take(len(r.view) - r.pos))


def encode_info_export(size: int, flags: int) -> bytes:
    return _INFO_EXPORT.pack(Info.EXPORT, size, flags)


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def encode_info_string(info: int, text: str) -> bytes:
    """NBD_INFO_NAME or NBD_INFO_DESCRIPTION."""
    return _U16.pack(info) + encode_string(text)


def decode_info(data: Buffer) -> tuple[int, tuple[int, ...] | str]:
    """An NBD_REP_INFO payload: (info type, its fields). Unknown types give ()."""
    r = _Reader(data)
    info = r.u16()
    if info == Info.EXPORT:
        size, flags = struct.unpack(">QH", r.take(10))
        r.end()
        return info, (size, flags)
    if info == Info.BLOCK_SIZE:
        values: tuple[int, int, int] = struct.unpack(">III", r.take(12))
        r.end()
        return info, values
    if info in (Info.NAME, Info.DESCRIPTION):
        return info, decode_string(r.take(len(r.view) - r.pos))
    return info, ()


# --- transmission -------------------------------------------------------------------

class Request(NamedTuple):
    magic: int
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int


def encode_request(cmd: int, cookie: int, offset: int = 0, length: int = 0,
                   flags: int = 0) -> bytes:
    """A request header; a WRITE's payload follows it separately."""
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def decode_request(data: Buffer, pos: int = 0) -> Request:
    return Request._make(REQUEST.unpack_from(data, pos))


def encode_simple_reply(cookie: int, error: int = 0) -> bytes:
    """A simple reply header; a successful READ's data follows it."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def decode_simple_reply(data: Buffer) -> tuple[int, int, int]:
    """(magic, error, cookie)."""
    magic, error, cookie = SIMPLE_REPLY.unpack(data)
    return magic, error, cookie


class ChunkHeader(NamedTuple):
    magic: int
    flags: int
    type: int
    cookie: int
    length: int


def encode_chunk_header(cookie: int, type: int, length: int, done: bool = True) -> bytes:
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                                 type, cookie, length)


def decode_chunk_header(data: Buffer) -> ChunkHeader:
    """A structured reply chunk header (20 bytes). Its first 4 bytes tell it from a
    simple reply (16 bytes), so a client peeks the magic first."""
    return ChunkHeader._make(STRUCTURED_REPLY.unpack(data))


def encode_offset_data_header(cookie: int, offset: int, data_length: int,
                              done: bool = True) -> bytes:
    """Chunk header plus the 8-byte offset of an OFFSET_DATA chunk; data follows."""
    return (encode_chunk_header(cookie, ReplyType.OFFSET_DATA, 8 + data_length, done)
            + _U64.pack(offset))


def encode_offset_hole(cookie: int, offset: int, length: int, done: bool = True) -> bytes:
    return (encode_chunk_header(cookie, ReplyType.OFFSET_HOLE, _OFFSET_HOLE.size, done)
            + _OFFSET_HOLE.pack(offset, length))


def decode_offset_hole(data: Buffer) -> tuple[int, int]:
    if len(data) != _OFFSET_HOLE.size:
        raise WireError("OFFSET_HOLE payload is not 12 bytes")
    offset, length = _OFFSET_HOLE.unpack(data)
    return offset, length


def encode_error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    text = encode_string(message)
    payload = _ERROR_CHUNK.pack(error, len(text)) + text
    return encode_chunk_header(cookie, ReplyType.ERROR, len(payload)) + payload


def decode_error_chunk(data: Buffer) -> tuple[int, str]:
    r = _Reader(data)
    error, n = _ERROR_CHUNK.unpack(r.take(_ERROR_CHUNK.size))
    message = decode_string(r.take(n))
    return error, message  # ERROR_OFFSET chunks carry an offset after this; ignored


def encode_block_status(cookie: int, context_id: int,
                        extents: list[tuple[int, int]], done: bool = True) -> bytes:
    """A BLOCK_STATUS chunk of ``(length, flags)`` descriptors."""
    body = [_U32.pack(context_id)]
    body.extend(_EXTENT.pack(n, f) for n, f in extents)
    payload = b"".join(body)
    return encode_chunk_header(cookie, ReplyType.BLOCK_STATUS, len(payload), done) + payload


def decode_block_status(data: Buffer) -> tuple[int, list[tuple[int, int]]]:
    view = memoryview(data)
    if len(view) < 4 or (len(view) - 4) % _EXTENT.size:
        raise WireError(f"BLOCK_STATUS payload of {len(view)} bytes is malformed")
    context_id: int = _U32.unpack(view[:4])[0]
    return context_id, [(n, f) for n, f in _EXTENT.iter_unpack(view[4:])]
