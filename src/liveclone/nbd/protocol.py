"""The NBD server protocol as a sans-IO state machine: bytes in, events out.

``ServerConnection`` never touches a socket (h11's habit). The I/O layer feeds it
what the peer sent with ``receive_data(bytes) -> [events]``, writes whatever
``data_to_send()`` returns (the greeting, option replies, rejections), and turns
each answer to a ``Command`` into bytes with ``send(reply) -> [buffers]``.

The handshake is answered entirely in here, since it needs nothing but the
``Export`` descriptions. Transmission requests are parsed and then checked by the
single choke point ``validate_request``: storage code only ever sees a
``Command`` whose range, flags and payload are valid for the export. An invalid
request is answered with its error here (``Rejected`` tells the I/O layer).

Errors are split by blame. ``RemoteProtocolError``: the peer broke the protocol
in a way we cannot answer (bad magic, unknown client flags, an export name it may
not have after NBD_OPT_EXPORT_NAME, a cookie reused while in flight); the
connection is now CLOSED and must be dropped. ``LocalProtocolError``: our own
misuse (a reply for no request, a reply of the wrong kind, a reply in the wrong
state). Neither is raised for anything else: a request that is merely invalid
gets an NBD error reply and the connection goes on.

States and every allowed transition are in ``TRANSITIONS`` below; nothing else
changes ``state``.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import Enum
from typing import TYPE_CHECKING

from liveclone.nbdwire import wire
from liveclone.nbdwire.wire import (
    BASE_ALLOCATION,
    CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    EINVAL,
    ENOSPC,
    EOVERFLOW,
    EPERM,
    REQUEST,
    REQUEST_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    Buffer,
    Cmd,
    Info,
    Opt,
    Rep,
)
from liveclone.values import Frozen, Value

if TYPE_CHECKING:
    from liveclone.sources.base import Extent

DEFAULT_MAX_BLOCK = 32 << 20  # largest READ/WRITE payload we accept and advertise
MAX_OPTION_LENGTH = 64 << 10  # an option payload bigger than this is a denial of service
MAX_NAME = 256  # export names we serve are this short (the spec's SHOULD)
# BLOCK_STATUS looks at most this much of a request's range; the reply covers less
# than asked (the spec allows it, and clients ask again from where it ends). Storage
# then walks a bounded range, so one request cannot make it list millions of extents.
MAX_BLOCK_STATUS = 128 << 20
BASE_ALLOCATION_ID = 1  # the context id we give base:allocation


class LocalProtocolError(Exception):
    """We misused the state machine (a bug in the I/O layer)."""


class RemoteProtocolError(Exception):
    """The peer broke the protocol; the connection must be dropped."""


class State(Enum):
    HANDSHAKE = "handshake"  # greeting queued; waiting for the 32-bit client flags
    NEGOTIATING = "negotiating"  # option haggling
    TLS_HANDSHAKE = "tls handshake"  # STARTTLS acknowledged: the I/O layer upgrades
    TRANSMISSION = "transmission"  # requests and replies
    DRAINING = "draining"  # NBD_CMD_DISC received: answer what is in flight, read nothing
    CLOSED = "closed"  # done (or broken): the I/O layer closes after sending its data


class Input(Enum):
    CLIENT_FLAGS = "client flags"
    OPTION = "option"  # any option answered in place (INFO, LIST, errors...)
    EXPORT_CHOSEN = "export chosen"  # EXPORT_NAME or GO succeeded
    ABORT = "abort"
    STARTTLS = "starttls"  # the ACK to NBD_OPT_STARTTLS is queued
    TLS_STARTED = "tls started"  # local: the I/O layer finished the TLS handshake
    REQUEST = "request"
    DISC = "disc"
    REPLY = "reply"  # local: send() of an answer
    DRAINED = "drained"  # internal: the last in-flight answer after DISC
    PEER_ERROR = "peer error"


# The whole lifecycle. PEER_ERROR leads from any state to CLOSED as well.
TRANSITIONS: dict[tuple[State, Input], State] = {
    (State.HANDSHAKE, Input.CLIENT_FLAGS): State.NEGOTIATING,
    (State.NEGOTIATING, Input.OPTION): State.NEGOTIATING,
    (State.NEGOTIATING, Input.EXPORT_CHOSEN): State.TRANSMISSION,
    (State.NEGOTIATING, Input.ABORT): State.CLOSED,
    (State.NEGOTIATING, Input.STARTTLS): State.TLS_HANDSHAKE,
    (State.TLS_HANDSHAKE, Input.TLS_STARTED): State.NEGOTIATING,
    (State.TRANSMISSION, Input.REQUEST): State.TRANSMISSION,
    (State.TRANSMISSION, Input.REPLY): State.TRANSMISSION,
    (State.TRANSMISSION, Input.DISC): State.DRAINING,
    (State.DRAINING, Input.REPLY): State.DRAINING,
    (State.DRAINING, Input.DRAINED): State.CLOSED,
}
for _state in State:
    TRANSITIONS[(_state, Input.PEER_ERROR)] = State.CLOSED
LOCAL_INPUTS = frozenset({Input.REPLY, Input.TLS_STARTED})
# Requests and replies in TRANSMISSION leave the state as it is; the hot path
# (_request, send) takes that from here instead of looking the pair up each time.
assert TRANSITIONS[(State.TRANSMISSION, Input.REQUEST)] is State.TRANSMISSION
assert TRANSITIONS[(State.TRANSMISSION, Input.REPLY)] is State.TRANSMISSION


# --- exports ------------------------------------------------------------------------

class Export(Frozen):
    """What a client may open. Size and flags are fixed for the connection.
    ``min_block``: every offset and length must be a multiple (but the tail);
    ``max_block``: the largest READ/WRITE payload."""

    __slots__ = ("name", "size", "read_only", "description", "min_block", "preferred_block",
                 "max_block", "flags")
    name: str
    size: int
    read_only: bool
    description: str
    min_block: int
    preferred_block: int
    max_block: int
    flags: int

    def __init__(self, name: str, size: int, read_only: bool = False, description: str = "",
                 min_block: int = 1, preferred_block: int = 4096,
                 max_block: int = DEFAULT_MAX_BLOCK) -> None:
        why = export_name_problem(name)
        if why:
            raise ValueError(f"bad export name {name!r}: {why}")
        flags = (wire.TF_HAS_FLAGS | wire.TF_SEND_FLUSH | wire.TF_SEND_FUA | wire.TF_SEND_DF
                 | wire.TF_CAN_MULTI_CONN | wire.TF_SEND_CACHE)
        if read_only:
            flags |= wire.TF_READ_ONLY
        else:
            flags |= wire.TF_SEND_TRIM | wire.TF_SEND_WRITE_ZEROES | wire.TF_SEND_FAST_ZERO
        self._init(name, size, read_only, description, min_block, preferred_block, max_block,
                   flags)


class ExportTable:
    """The exports a server offers, by name: what NBD_OPT_LIST lists and what
    INFO, GO and EXPORT_NAME open. Connections share one table, so exports added
    or removed later are seen by every negotiation from then on; an export that a
    connection already chose stays its own (the I/O layer closes it when the
    export goes). ``default``: what the name "" opens (None: "" is unknown)."""

    def __init__(self, exports: Iterable[Export] = (), default: str | None = None) -> None:
        self._exports: dict[str, Export] = {}
        for export in exports:
            self.add(export)
        self.default = default

    def add(self, export: Export) -> None:
        if export.name in self._exports:
            raise ValueError(f"an export named {export.name!r} exists")
        self._exports[export.name] = export

    def remove(self, name: str) -> Export:
        return self._exports.pop(name)

    def get(self, name: str) -> Export | None:
        return self._exports.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._exports

    def __iter__(self) -> Iterator[Export]:
        return iter(list(self._exports.values()))

    def __len__(self) -> int:
        return len(self._exports)

    def lookup(self, name: str) -> tuple[Export | None, int, str]:
        """(export, error reply, message) for a name a client asked for."""
        if name == "":
            if self.default is None:
                return None, Rep.ERR_UNKNOWN, ("this server has no default export: "
                                               "give an export name (NBD_OPT_LIST lists them)")
            name = self.default
        else:
            why = export_name_problem(name)
            if why:
                return None, Rep.ERR_INVALID, f"export name refused: {why}"
        export = self._exports.get(name)
        if export is None:
            return None, Rep.ERR_UNKNOWN, f"no export named {name!r}"
        return export, 0, ""


def export_name_problem(name: str) -> str | None:
    """Why ``name`` may not name an export, or None. Names never reach a file
    system here, but path-like names are refused so that they never can."""
    if len(name.encode()) > MAX_NAME:
        return f"longer than {MAX_NAME} bytes"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains control characters"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if name in (".", "..") or name.startswith("-"):
        return "looks like a path or an option"
    return None


# --- events (out of receive_data) ----------------------------------------------------

class ExportChosen(Value):
    """Transmission begins on ``export``."""

    __slots__ = ("export", "structured", "base_allocation")

    def __init__(self, export: Export, structured: bool, base_allocation: bool) -> None:
        self.export = export
        self.structured = structured
        self.base_allocation = base_allocation


class Command(Value):
    """A valid request. ``data`` is the payload of a WRITE, else None. A
    BLOCK_STATUS ``length`` is cut to MAX_BLOCK_STATUS (its reply covers less)."""

    __slots__ = ("cookie", "cmd", "flags", "offset", "length", "data")

    def __init__(self, cookie: int, cmd: int, flags: int, offset: int, length: int,
                 data: bytearray | None = None) -> None:
        self.cookie = cookie
        self.cmd = cmd
        self.flags = flags
        self.offset = offset
        self.length = length
        self.data = data


class Rejected(Value):
    """An invalid request, already answered with ``error``."""

    __slots__ = ("cookie", "cmd", "error", "reason")

    def __init__(self, cookie: int, cmd: int, error: int, reason: str) -> None:
        self.cookie = cookie
        self.cmd = cmd
        self.error = error
        self.reason = reason


class Disconnect(Value):
    """NBD_CMD_DISC: finish the requests in flight, then close."""

    __slots__ = ()


class Aborted(Value):
    """NBD_OPT_ABORT during the handshake: send the ACK queued, then close."""

    __slots__ = ()


class StartTLS(Value):
    """NBD_OPT_STARTTLS accepted: send the ACK queued, read nothing more in plain
    text, run the TLS handshake as the server, then call ``tls_started()``."""

    __slots__ = ()


Event = ExportChosen | Command | Rejected | Disconnect | Aborted | StartTLS


# --- replies (into send) --------------------------------------------------------------

class ReadDone(Value):
    __slots__ = ("cookie", "data")

    def __init__(self, cookie: int, data: Buffer) -> None:
        self.cookie = cookie
        self.data = data  # exactly the length asked for


class Done(Value):
    __slots__ = ("cookie",)

    def __init__(self, cookie: int) -> None:
        self.cookie = cookie


class Failed(Value):
    __slots__ = ("cookie", "error", "message")

    def __init__(self, cookie: int, error: int, message: str = "") -> None:
        self.cookie = cookie
        self.error = error  # one of wire.NBD_ERRORS
        self.message = message


class Extents(Value):
    __slots__ = ("cookie", "extents")

    def __init__(self, cookie: int, extents: list[tuple[int, int]]) -> None:
        self.cookie = cookie
        self.extents = extents  # (length, flags) from the request's offset on


Reply = ReadDone | Done | Failed | Extents


def extent_flags(extents: Iterable[Extent]) -> list[tuple[int, int]]:
    """``base:allocation`` descriptors for a clone's extents, in the same order.

    Data reads as 0; a hole (reads as zeros) as STATE_HOLE | STATE_ZERO. Neighbours
    with the same flags become one descriptor and empty extents are dropped, so the
    reply has as few descriptors as it can and none of length 0 (which the spec
    forbids). Offsets are not looked at: the extents are taken to be contiguous
    from the request's offset on, as ``Clone.block_status`` returns them.
    """
    out: list[tuple[int, int]] = []
    for ext in extents:
        if ext.length <= 0:
            continue
        flags = 0 if ext.data else STATE_HOLE | STATE_ZERO
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + ext.length, flags)
        else:
            out.append((ext.length, flags))
    return out


def nbd_error(os_errno: int | None) -> int:
    """The NBD error for an OSError's errno: the spec allows only a few."""
    if os_errno in wire.NBD_ERRORS:
        assert os_errno is not None
        return os_errno
    return {
        _errno.EROFS: EPERM, _errno.EACCES: EPERM,
        _errno.EDQUOT: ENOSPC, _errno.EFBIG: ENOSPC,
        _errno.EOPNOTSUPP: wire.ENOTSUP,
    }.get(os_errno or 0, wire.EIO)


# --- the one request-validation choke point ---------------------------------------------

# Command flags each command accepts. FUA is valid on every command (the spec
# asks servers to accept it where it has no meaning). DF and REQ_ONE need their
# negotiation, checked below.
ALLOWED_FLAGS: dict[int, int] = {
    Cmd.READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    Cmd.WRITE: CMD_FLAG_FUA,
    Cmd.FLUSH: CMD_FLAG_FUA,
    Cmd.TRIM: CMD_FLAG_FUA,
    Cmd.CACHE: CMD_FLAG_FUA,
    Cmd.WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    Cmd.BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}
_MODIFYING = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
_READ = int(Cmd.READ)
_WRITE = int(Cmd.WRITE)
_RANGED = frozenset({Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES,
                     Cmd.BLOCK_STATUS})
# Export flags a command (or a command flag) needs.
_NEEDS_EXPORT_FLAG: dict[int, int] = {
    Cmd.TRIM: wire.TF_SEND_TRIM, Cmd.WRITE_ZEROES: wire.TF_SEND_WRITE_ZEROES,
    Cmd.CACHE: wire.TF_SEND_CACHE, Cmd.FLUSH: wire.TF_SEND_FLUSH,
}


def validate_request(export: Export, structured: bool, base_allocation: bool,
                     cmd: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
    """None if the request may reach storage, else ``(NBD error, reason)``.

    Order matters only for which error a doubly wrong request gets; it follows
    the cheapest, most fundamental check first.
    """
    # Fast path: a READ or WRITE with no flags, in range, within max_block, on an
    # export with no alignment, writable for a WRITE: every check below passes.
    # (The property tests hold it to the same answers as _validate_request.)
    if (not flags and (cmd == _READ or (cmd == _WRITE and not export.read_only))
            and 0 < length <= export.max_block and offset + length <= export.size
            and export.min_block == 1):
        return None
    return _validate_request(export, structured, base_allocation, cmd, flags, offset, length)


def _validate_request(export: Export, structured: bool, base_allocation: bool,
                      cmd: int, flags: int, offset: int,
                      length: int) -> tuple[int, str] | None:
    """``validate_request`` without its fast path: every check, in order."""
    allowed = ALLOWED_FLAGS.get(cmd)
    if allowed is None:
        return EINVAL, f"unknown or unsupported command {cmd}"
    if flags & ~allowed:
        return EINVAL, f"flags {flags:#x} not allowed on {Cmd(cmd).name}"
    if flags & CMD_FLAG_DF and not structured:
        return EINVAL, "DF needs structured replies"
    if flags & CMD_FLAG_FAST_ZERO and not export.flags & wire.TF_SEND_FAST_ZERO:
        return EINVAL, "FAST_ZERO was not offered"
    if cmd in _MODIFYING and export.read_only:
        return EPERM, "the export is read-only"
    need = _NEEDS_EXPORT_FLAG.get(cmd, 0)
    if export.flags & need != need:
        return EINVAL, f"{Cmd(cmd).name} was not offered"
    if cmd == Cmd.FLUSH:
        if offset or length:
            return EINVAL, "FLUSH must have offset and length 0"
        return None
    if cmd == Cmd.BLOCK_STATUS and not (structured and base_allocation):
        return EINVAL, "BLOCK_STATUS needs structured replies and base:allocation"
    # cmd is ranged from here on.
    if length == 0:
        return EINVAL, "zero-length request"
    if offset > export.size or length > export.size - offset:
        if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES):
            return ENOSPC, f"write of {length} at {offset} is past the end ({export.size})"
        return EINVAL, f"{length} bytes at {offset} is past the end ({export.size})"
    if cmd in (Cmd.READ, Cmd.WRITE) and length > export.max_block:
        if flags & CMD_FLAG_DF:
            return EOVERFLOW, f"{length} bytes cannot be sent in one chunk"
        return EINVAL, f"{length} bytes is over the maximum block size {export.max_block}"
    m = export.min_block
    if m > 1 and (offset % m or (length % m and offset + length != export.size)):
        return EINVAL, f"{length} bytes at {offset} is not aligned to {m}"
    return None


# --- the connection ----------------------------------------------------------------------

class _InFlight(Value):
    __slots__ = ("cmd", "flags", "length", "offset")

    def __init__(self, cmd: int, flags: int, length: int, offset: int) -> None:
        self.cmd = cmd
        self.flags = flags
        self.length = length
        self.offset = offset


class ServerConnection:
    """One client's NBD session, from greeting to close. Not thread-safe."""

    def __init__(self, exports: Sequence[Export] | ExportTable, tls: bool = False) -> None:
        """``exports``: a list (its first is what the name "" opens), or a table
        shared with other connections (its exports may change between
        negotiations). ``tls``: TLS is offered and required (NBD_OPT_STARTTLS
        before anything else)."""
        if not isinstance(exports, ExportTable):
            if not exports:
                raise ValueError("a server needs at least one export")
            exports = ExportTable(exports, default=exports[0].name)
        self.tls = tls
        self.tls_active = False
        self.exports = exports
        self.state = State.HANDSHAKE
        # Bytes we produced ourselves (handshake, rejections), not yet taken.
        self._outbox: list[Buffer] = [wire.encode_greeting(
            wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES)]
        # Received bytes not yet parsed. Invariant: holds less than one message.
        self._buf = bytearray()
        # Bytes of an oversized WRITE payload still to skip.
        self._discard = 0
        # Negotiated; fixed once state reaches TRANSMISSION.
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.structured = False
        self.base_allocation = False  # base:allocation selected by SET_META_CONTEXT
        self.export: Export | None = None  # set exactly when TRANSMISSION is entered
        # Invariant: every Command emitted and not yet answered by send(), by cookie.
        self._inflight: dict[int, _InFlight] = {}
        # Transmission requests parsed so far (valid or not): names the message
        # that ``incomplete`` is about, so the I/O layer can tell one from the next.
        self.received = 0

    # -- state -----------------------------------------------------------------------

    def _go(self, inp: Input) -> None:
        new = TRANSITIONS.get((self.state, inp))
        if new is None:
            if inp in LOCAL_INPUTS:
                raise LocalProtocolError(f"cannot {inp.value} in state {self.state.value}")
            old, self.state = self.state, State.CLOSED
            raise RemoteProtocolError(f"unexpected {inp.value} in state {old.value}")
        self.state = new

    def _peer_error(self, message: str) -> RemoteProtocolError:
        self._go(Input.PEER_ERROR)
        return RemoteProtocolError(message)

    def _open(self) -> bool:
        return self.state is not State.CLOSED

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def buffered(self) -> int:
        """Bytes received and held, waiting for the rest of their message."""
        return len(self._buf)

    @property
    def incomplete(self) -> int:
        """Bytes still to come before the WRITE whose header is buffered is whole
        (0 if none is): what the I/O layer must be ready to hold for it."""
        if self.state is not State.TRANSMISSION and self.state is not State.DRAINING:
            return 0
        buf = self._buf
        if len(buf) < REQUEST.size or self._discard:
            return 0
        magic: int
        length: int
        magic, _flags, cmd, _cookie, _offset, length = REQUEST.unpack_from(buf, 0)
        if magic != REQUEST_MAGIC or cmd != Cmd.WRITE or length > self._export().max_block:
            return 0
        return max(0, REQUEST.size + length - len(buf))

    @property
    def to_boundary(self) -> int:
        """Bytes of input still to come before the next message starts (0 at a
        boundary): the rest of a request header, of a WRITE's payload, or of an
        oversized payload being skipped. Known once a header is whole, so after a
        partial header it counts only the header's rest."""
        if self.state is not State.TRANSMISSION:
            return 0
        if self._discard:
            return self._discard
        held = len(self._buf)
        if not held:
            return 0
        return REQUEST.size - held if held < REQUEST.size else self.incomplete

    # -- bytes in -------------------------------------------------------------------------

    def tls_started(self) -> list[Event]:
        """The I/O layer finished the TLS handshake; negotiation goes on inside it.

        The I/O layer reads nothing in plain text after StartTLS (it stops reading
        until its TLS layer is in place), so bytes given to ``receive_data`` in
        TLS_HANDSHAKE came through TLS (a client may send its next option as soon
        as the handshake ends): they are held, and parsed now. Returns their events."""
        self._go(Input.TLS_STARTED)
        self.tls_active = True
        return self.receive_data(b"")

    def data_to_send(self) -> list[Buffer]:
        out, self._outbox = self._outbox, []
        return out

    def receive_data(self, data: Buffer) -> list[Event]:
        """Parse what the peer sent. Raises RemoteProtocolError (and is CLOSED)
        when the peer broke the protocol. Data arriving when CLOSED is ignored."""
        if self.state is State.CLOSED:
            return []
        buf = self._buf
        buf += data
        events: list[Event] = []
        pos = 0
        try:
            while self._open():
                if self._discard:
                    n = min(self._discard, len(buf) - pos)
                    pos += n
                    self._discard -= n
                    if self._discard:
                        break
                used = self._parse_one(buf, pos, events)
                if not used:
                    break
                pos += used
        finally:
            del buf[:pos]
        return events

    def _parse_one(self, buf: bytearray, pos: int, events: list[Event]) -> int:
        """Parse one message at ``pos``; return bytes used, 0 if incomplete."""
        avail = len(buf) - pos
        state = self.state
        if state is State.TRANSMISSION or state is State.DRAINING:
            if avail < REQUEST.size:
                return 0
            magic: int
            length: int
            magic, flags, cmd, cookie, offset, length = REQUEST.unpack_from(buf, pos)
            if magic != REQUEST_MAGIC:
                raise self._peer_error(f"bad request magic {magic:#x}")
            if cmd == Cmd.WRITE:
                if length > self._export().max_block:
                    # Too big to buffer: skip the payload and answer with an error.
                    self._discard = length
                    self._request(events, cookie, cmd, flags, offset, length, None,
                                  (EINVAL, f"write of {length} bytes is over the maximum"))
                    return REQUEST.size
                if avail < REQUEST.size + length:
                    return 0
                start = pos + REQUEST.size
                payload = buf[start:start + length]
                self._request(events, cookie, cmd, flags, offset, length, payload, None)
                return REQUEST.size + length
            if cmd == Cmd.DISC:
                self._go(Input.DISC)
                events.append(Disconnect())
                self._check_drained()
                return REQUEST.size
            self._request(events, cookie, cmd, flags, offset, length, None, None)
            return REQUEST.size
        if state is State.NEGOTIATING:
            if avail < wire.OPTION_HEADER.size:
                return 0
            option: int
            magic, option, length = wire.OPTION_HEADER.unpack_from(buf, pos)
            if magic != wire.IHAVEOPT:
                raise self._peer_error(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                raise self._peer_error(f"option {option} of {length} bytes is too long")
            if avail < wire.OPTION_HEADER.size + length:
                return 0
            start = pos + wire.OPTION_HEADER.size
            self._option(option, bytes(buf[start:start + length]), events)
            return wire.OPTION_HEADER.size + length
        if state is State.HANDSHAKE:
            if avail < wire.CLIENT_FLAGS.size:
                return 0
            flags = wire.decode_client_flags(buf[pos:pos + 4])
            if flags & ~wire.KNOWN_CLIENT_FLAGS:
                raise self._peer_error(f"unknown client flags {flags:#x}")
            self.fixed_newstyle = bool(flags & wire.FLAG_C_FIXED_NEWSTYLE)
            self.no_zeroes = bool(flags & wire.FLAG_C_NO_ZEROES)
            self._go(Input.CLIENT_FLAGS)
            return wire.CLIENT_FLAGS.size
        return 0

    def _export(self) -> Export:
        assert self.export is not None  # set on entering TRANSMISSION
        return self.export

    def _request(self, events: list[Event], cookie: int, cmd: int, flags: int, offset: int,
                 length: int, payload: bytearray | None,
                 error: tuple[int, str] | None) -> None:
        if self.state is not State.TRANSMISSION:  # a self-loop there (see TRANSITIONS)
            self._go(Input.REQUEST)
        self.received += 1
        if cookie in self._inflight:
            raise self._peer_error(f"cookie {cookie:#x} reused while in flight")
        if error is None:
            error = validate_request(self._export(), self.structured, self.base_allocation,
                                     cmd, flags, offset, length)
        if error is not None:
            err, reason = error
            self._outbox.append(self._encode_error(cookie, err, reason))
            events.append(Rejected(cookie, cmd, err, reason))
            return
        self._inflight[cookie] = _InFlight(cmd, flags, length, offset)
        if cmd == Cmd.BLOCK_STATUS:
            length = min(length, MAX_BLOCK_STATUS)  # the reply may cover less
        events.append(Command(cookie, cmd, flags, offset, length, payload))

    def answered_in_lane(self, count: int) -> None:
        """``count`` READs and WRITEs the I/O layer's lane (``nbd/lane.py``) answered
        itself, taking them out of the input before ``receive_data`` saw it, at a
        message boundary. The lane answers only what ``validate_request``'s fast
        path accepts: count them as parsed and answered."""
        if self.state is not State.TRANSMISSION or self._buf or self._discard:
            raise LocalProtocolError(f"no lane in state {self.state.value} with "
                                     f"{len(self._buf)} bytes buffered and "
                                     f"{self._discard} to skip")
        self.received += count

    # -- options ----------------------------------------------------------------------------

    def _option(self, option: int, payload: bytes, events: list[Event]) -> None:
        if option == Opt.EXPORT_NAME:
            self._opt_export_name(payload, events)
            return
        if not self.fixed_newstyle:
            raise self._peer_error("options other than EXPORT_NAME need fixed newstyle")
        if option == Opt.ABORT:
            self._reply(option, Rep.ACK)
            self._go(Input.ABORT)
            events.append(Aborted())
            return
        if option == Opt.STARTTLS:
            self._opt_starttls(payload, events)
            return
        self._go(Input.OPTION)
        if self._tls_missing():
            self._reply(option, Rep.ERR_TLS_REQD,
                        "TLS is required: connect with nbds:// (STARTTLS)")
            return
        handler = self._OPTIONS.get(option)
        if handler is None:
            self._reply(option, Rep.ERR_UNSUP, f"option {option} is not supported")
            return
        try:
            handler(self, option, payload, events)
        except wire.WireError as e:
            self._reply(option, Rep.ERR_INVALID, f"malformed option: {e}")

    def _tls_missing(self) -> bool:
        return self.tls and not self.tls_active

    def _opt_starttls(self, payload: bytes, events: list[Event]) -> None:
        if not self.tls or self.tls_active or payload:
            self._go(Input.OPTION)
            why = ("TLS is not configured on this server" if not self.tls else
                   "TLS is already on" if self.tls_active else "STARTTLS takes no data")
            self._reply(Opt.STARTTLS, Rep.ERR_UNSUP if not self.tls else Rep.ERR_INVALID, why)
            return
        self._reply(Opt.STARTTLS, Rep.ACK)
        self._go(Input.STARTTLS)
        events.append(StartTLS())

    def _reply(self, option: int, rep: int, data: Buffer | str = b"") -> None:
        if isinstance(data, str):
            data = wire.encode_string(data[:1000])
        self._outbox.append(wire.encode_option_reply(option, rep, data))

    def _lookup(self, name: str) -> tuple[Export | None, int, str]:
        """(export, error reply, message) for a name a client asked for."""
        return self.exports.lookup(name)

    def _enter_transmission(self, export: Export, events: list[Event]) -> None:
        self.export = export
        self._go(Input.EXPORT_CHOSEN)
        events.append(ExportChosen(export, self.structured, self.base_allocation))

    def _opt_export_name(self, payload: bytes, events: list[Event]) -> None:
        if self._tls_missing():
            # EXPORT_NAME has no error reply: the spec says to drop the connection.
            raise self._peer_error("TLS is required: the client must use STARTTLS first")
        try:
            name = wire.decode_string(payload)
        except wire.WireError as e:
            raise self._peer_error(f"bad export name: {e}") from None
        export, _, message = self._lookup(name)
        if export is None:
            # EXPORT_NAME has no error reply: the spec says to drop the connection.
            raise self._peer_error(message)
        self._outbox.append(wire.encode_export_name_reply(export.size, export.flags,
                                                          self.no_zeroes))
        self.structured = False  # EXPORT_NAME clients get simple replies only ...
        self.base_allocation = False  # ... and hence no block status.
        self._enter_transmission(export, events)

    def _opt_info(self, option: int, payload: bytes, events: list[Event]) -> None:
        name, infos = wire.decode_info_request(payload)
        export, err, message = self._lookup(name)
        if export is None:
            self._reply(option, err, message)
            return
        if export.min_block > 1 and Info.BLOCK_SIZE not in infos and option == Opt.GO:
            self._reply(option, Rep.ERR_BLOCK_SIZE_REQD,
                        f"this export needs {export.min_block}-byte alignment")
            return
        self._reply(option, Rep.INFO, wire.encode_info_export(export.size, export.flags))
        if Info.NAME in infos:
            self._reply(option, Rep.INFO, wire.encode_info_string(Info.NAME, export.name))
        if Info.DESCRIPTION in infos and export.description:
            self._reply(option, Rep.INFO,
                        wire.encode_info_string(Info.DESCRIPTION, export.description))
        if Info.BLOCK_SIZE in infos:
            self._reply(option, Rep.INFO, wire.encode_info_block_size(
                export.min_block, export.preferred_block, export.max_block))
        self._reply(option, Rep.ACK)
        if option == Opt.GO:
            self._enter_transmission(export, events)

    def _opt_list(self, option: int, payload: bytes, events: list[Event]) -> None:
        if payload:
            self._reply(option, Rep.ERR_INVALID, "LIST takes no data")
            return
        for export in self.exports:
            self._reply(option, Rep.SERVER, wire.encode_rep_server(export.name,
                                                                   export.description))
        self._reply(option, Rep.ACK)

    def _opt_structured_reply(self, option: int, payload: bytes, events: list[Event]) -> None:
        if payload:
            self._reply(option, Rep.ERR_INVALID, "STRUCTURED_REPLY takes no data")
            return
        self.structured = True
        self._reply(option, Rep.ACK)

    def _opt_meta_context(self, option: int, payload: bytes, events: list[Event]) -> None:
        setting = option == Opt.SET_META_CONTEXT
        if not self.structured:
            self._reply(option, Rep.ERR_INVALID, "meta contexts need structured replies")
            return
        name, queries = wire.decode_meta_context_request(payload)
        export, err, message = self._lookup(name)
        if export is None:
            self._reply(option, err, message)
            return
        if setting:
            # SET replaces the selection; only exact names select a context.
            chosen = BASE_ALLOCATION in queries
            self.base_allocation = chosen
        else:
            chosen = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        if chosen:
            self._reply(option, Rep.META_CONTEXT,
                        wire.encode_rep_meta_context(BASE_ALLOCATION_ID, BASE_ALLOCATION))
        self._reply(option, Rep.ACK)

    _OPTIONS: dict[int, Callable[[ServerConnection, int, bytes, list[Event]], None]] = {
        Opt.INFO: _opt_info,
        Opt.GO: _opt_info,
        Opt.LIST: _opt_list,
        Opt.STRUCTURED_REPLY: _opt_structured_reply,
        Opt.LIST_META_CONTEXT: _opt_meta_context,
        Opt.SET_META_CONTEXT: _opt_meta_context,
    }

    # -- answers out ------------------------------------------------------------------------

    def _encode_error(self, cookie: int, error: int, message: str) -> bytes:
        if self.structured:
            return wire.encode_error_chunk(cookie, error, message[:1000])
        return wire.encode_simple_reply(cookie, error)

    def _check_drained(self) -> None:
        if self.state is State.DRAINING and not self._inflight:
            self._go(Input.DRAINED)

    def send(self, reply: Reply) -> list[Buffer]:
        """The bytes answering one ``Command``. Raises LocalProtocolError when the
        reply does not fit the request it names."""
        if self.state is not State.TRANSMISSION:  # a self-loop there (see TRANSITIONS)
            self._go(Input.REPLY)
        req = self._inflight.pop(reply.cookie, None)
        if req is None:
            raise LocalProtocolError(f"no request in flight with cookie {reply.cookie:#x}")
        try:
            out = self._encode_reply(reply, req)
        except LocalProtocolError:
            self._inflight[reply.cookie] = req  # still unanswered
            raise
        self._check_drained()
        return out

    def _encode_reply(self, reply: Reply, req: _InFlight) -> list[Buffer]:
        cookie = reply.cookie
        if isinstance(reply, ReadDone):
            if req.cmd != Cmd.READ or len(reply.data) != req.length:
                raise LocalProtocolError(
                    f"ReadDone of {len(reply.data)} bytes for {Cmd(req.cmd).name} of "
                    f"{req.length}")
            if self.structured:
                return [wire.encode_offset_data_header(cookie, req.offset, req.length),
                        reply.data]
            return [wire.encode_simple_reply(cookie), reply.data]
        if isinstance(reply, Done):
            if req.cmd in (Cmd.READ, Cmd.BLOCK_STATUS):
                raise LocalProtocolError(f"{Cmd(req.cmd).name} needs data, not Done")
            return [wire.encode_simple_reply(cookie)]
        if isinstance(reply, Failed):
            if reply.error not in wire.NBD_ERRORS:
                raise LocalProtocolError(f"{reply.error} is not an NBD error")
            return [self._encode_error(cookie, reply.error, reply.message)]
        if isinstance(reply, Extents):
            if req.cmd != Cmd.BLOCK_STATUS:
                raise LocalProtocolError(f"Extents for {Cmd(req.cmd).name}")
            return [wire.encode_block_status(cookie, BASE_ALLOCATION_ID,
                                             _clip(reply.extents, req))]
        raise LocalProtocolError(f"not a reply: {reply!r}")


def _clip(extents: list[tuple[int, int]], req: _InFlight) -> list[tuple[int, int]]:
    """Descriptors within the request (one only with REQ_ONE), none empty."""
    out: list[tuple[int, int]] = []
    left = req.length
    for n, flags in extents:
        n = min(n, left)
        if n <= 0:
            break
        out.append((n, flags))
        left -= n
        if req.flags & CMD_FLAG_REQ_ONE:
            break
    if not out:
        raise LocalProtocolError("Extents with no descriptor")
    return out
