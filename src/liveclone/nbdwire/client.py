"""A small synchronous NBD client: enough to read an export, fast and from threads.

``Connection`` is one socket: fixed newstyle handshake, optional STARTTLS,
structured replies, ``base:allocation``, NBD_OPT_GO (or NBD_OPT_EXPORT_NAME on
an old server); then READ and BLOCK_STATUS, one request in flight. ``Pool``
hands out connections to threads, opening more up to a limit and dropping any
that failed, so several threads read at once. All bytes on the wire are made
and parsed by ``nbdwire/wire.py``; this file only moves them.

Errors by blame: ``NbdDisconnected`` means the transport broke (a dead or
restarted server: worth reconnecting), ``NbdCommandError`` is the server's error
reply to one request (the connection is still good), ``NbdHandshakeError`` is a
refusal during negotiation (no such export, TLS required...), and
``NbdProtocolError`` is a server that broke the protocol.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from liveclone.nbdwire import wire
from liveclone.nbdwire.wire import BASE_ALLOCATION, Cmd, Info, Opt, Rep, ReplyType

DEFAULT_PORT = 10809
# Largest READ we send when the server does not say (the spec's safe default is 32 MiB).
DEFAULT_MAX_READ = 32 << 20
# BLOCK_STATUS asks about at most this much at once (its length field is 32 bits).
MAX_STATUS = 1 << 30
_ERRNO_NAMES = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC",
                75: "EOVERFLOW", 95: "ENOTSUP", 108: "ESHUTDOWN"}


class NbdError(Exception):
    """Base of the client's errors."""


class NbdDisconnected(NbdError):
    """The connection is gone (refused, reset, closed mid-reply, timed out)."""


class NbdHandshakeError(NbdError):
    """The server refused an option during negotiation."""

    def __init__(self, message: str, reply: int = 0) -> None:
        super().__init__(message)
        self.reply = reply


class NbdProtocolError(NbdError):
    """The server sent something the protocol does not allow."""


class NbdCommandError(NbdError):
    """The server answered one request with an error; the connection stays usable."""

    def __init__(self, error: int, message: str) -> None:
        name = _ERRNO_NAMES.get(error, f"error {error}")
        super().__init__(f"{name}: {message}" if message else name)
        self.errno = error


@dataclass(frozen=True)
class Address:
    """Where an export is: a unix socket or host and port, the name, and TLS."""

    export: str = ""
    socket_path: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT
    tls: bool = False
    #: directory with ca-cert.pem (and client-cert.pem, client-key.pem), as qemu and
    #: nbdkit lay them out; None means the system's CAs
    tls_certificates: str | None = None
    tls_verify: bool = True
    extra: dict[str, str] = field(default_factory=dict)

    def where(self) -> str:
        return self.socket_path if self.socket_path else f"{self.host}:{self.port}"

    def describe(self) -> str:
        return f"export {self.export!r} at {self.where()}"


def parse_uri(uri: str) -> Address:
    """An NBD URI (the NetworkBlockDevice/nbd ``doc/uri.md`` syntax) as an ``Address``:
    ``nbd://host[:port]/export``, ``nbd+unix:///export?socket=PATH``, ``nbds://``..."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    base, _, transport = scheme.partition("+")
    if base not in ("nbd", "nbds") or transport not in ("", "tcp", "unix"):
        raise ValueError(f"{uri!r} is not an NBD URI (nbd://, nbds://, nbd+unix://)")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    tls = base == "nbds"
    common = {"export": export, "tls": tls,
              "tls_certificates": query.pop("tls-certificates", None),
              "tls_verify": query.pop("tls-verify-peer", "true").lower()
              not in ("false", "0", "no")}
    if transport == "unix":
        path = query.pop("socket", None)
        if not path:
            raise ValueError(f"{uri!r} needs ?socket=PATH to name the unix socket")
        return Address(socket_path=path, extra=query, **common)  # type: ignore[arg-type]
    if not parts.hostname:
        raise ValueError(f"{uri!r} names no host")
    return Address(host=parts.hostname, port=parts.port or DEFAULT_PORT, extra=query,
                   **common)  # type: ignore[arg-type]


class Connection:
    """One negotiated NBD connection, used by one thread at a time."""

    size: int
    flags: int

    def __init__(self, address: Address, timeout: float | None = 60.0) -> None:
        self.address = address
        self.structured = False
        self.meta_context: int | None = None  # the id of base:allocation, if agreed
        self.max_read = DEFAULT_MAX_READ
        self._cookie = 0
        self._pending_data = 0  # data bytes of the OFFSET_DATA chunk being read
        self.generation = 0  # the Pool's, when this connection was made
        self._sock = self._connect(timeout)
        try:
            self._handshake()
        except BaseException:
            self._sock.close()
            raise

    # -- transport ---------------------------------------------------------------------

    def _connect(self, timeout: float | None) -> socket.socket:
        a = self.address
        try:
            if a.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                try:
                    sock.connect(a.socket_path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((a.host, a.port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise NbdDisconnected(f"cannot connect to {a.describe()}: "
                                  f"{e.strerror or e}") from None
        return sock

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise NbdDisconnected(f"sending to {self.address.describe()}: "
                                  f"{e.strerror or e}") from None

    def _recv_into(self, view: memoryview) -> None:
        while view:
            try:
                n = self._sock.recv_into(view)
            except OSError as e:
                raise NbdDisconnected(f"receiving from {self.address.describe()}: "
                                      f"{e.strerror or e}") from None
            if n == 0:
                raise NbdDisconnected(f"{self.address.describe()} closed the connection")
            view = view[n:]

    def _recv(self, n: int) -> bytearray:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return buf

    # -- handshake -----------------------------------------------------------------------

    def _handshake(self) -> None:
        nbdmagic, optmagic, hflags = wire.decode_greeting(self._recv(wire.GREETING.size))
        if nbdmagic != wire.NBDMAGIC:
            raise NbdProtocolError(f"{self.address.describe()} is not an NBD server")
        if optmagic != wire.IHAVEOPT or not hflags & wire.FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError(
                f"{self.address.describe()} speaks an old NBD handshake (oldstyle or not "
                "fixed newstyle), which liveclone does not support")
        cflags = wire.FLAG_C_FIXED_NEWSTYLE
        self._no_zeroes = bool(hflags & wire.FLAG_NO_ZEROES)
        if self._no_zeroes:
            cflags |= wire.FLAG_C_NO_ZEROES
        self._send(wire.encode_client_flags(cflags))
        if self.address.tls:
            self._starttls()
        reply, _ = self._option(Opt.STRUCTURED_REPLY)
        self.structured = reply == Rep.ACK
        if self.structured:
            self._set_meta_context()
        self._go()

    def _option(self, opt: int, payload: bytes = b"") -> tuple[int, bytes]:
        """Send one option, return its (single) reply type and payload."""
        self._send(wire.encode_option(opt, payload))
        return self._option_reply(opt)

    def _option_reply(self, opt: int) -> tuple[int, bytes]:
        h = wire.decode_option_reply_header(self._recv(wire.OPTION_REPLY_HEADER.size))
        if h.magic != wire.OPTION_REPLY_MAGIC or h.option != opt:
            raise NbdProtocolError(f"bad reply to option {opt} from {self.address.describe()}")
        if h.length > 1 << 20:
            raise NbdProtocolError(f"option reply of {h.length} bytes is too long")
        return h.reply, bytes(self._recv(h.length))

    def _refused(self, what: str, reply: int, payload: bytes) -> NbdHandshakeError:
        text = payload.decode(errors="replace")
        try:
            name = Rep(reply).name
        except ValueError:
            name = str(reply)
        return NbdHandshakeError(
            f"the server at {self.address.where()} refused {what} "
            f"({name}{': ' + text if text else ''})",
            reply)

    def _starttls(self) -> None:
        reply, payload = self._option(Opt.STARTTLS)
        if reply != Rep.ACK:
            raise self._refused("TLS", reply, payload)
        a = self.address
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if a.tls_certificates:
            ca = os.path.join(a.tls_certificates, "ca-cert.pem")
            if os.path.exists(ca):
                ctx.load_verify_locations(ca)
            cert = os.path.join(a.tls_certificates, "client-cert.pem")
            key = os.path.join(a.tls_certificates, "client-key.pem")
            if os.path.exists(cert) and os.path.exists(key):
                ctx.load_cert_chain(cert, key)
        if not a.tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif a.socket_path is not None:
            ctx.check_hostname = False  # no host name to check on a unix socket
        try:
            self._sock = ctx.wrap_socket(self._sock, server_hostname=a.host or None)
        except ssl.SSLError as e:
            raise NbdHandshakeError(f"TLS with {a.describe()} failed: {e.reason or e}") \
                from None
        except OSError as e:
            raise NbdDisconnected(f"TLS with {a.describe()}: {e.strerror or e}") from None

    def _set_meta_context(self) -> None:
        self._send(wire.encode_option(Opt.SET_META_CONTEXT, wire.encode_meta_context_request(
            self.address.export, [BASE_ALLOCATION])))
        while True:
            reply, payload = self._option_reply(Opt.SET_META_CONTEXT)
            if reply == Rep.META_CONTEXT:
                context_id, name = wire.decode_rep_meta_context(payload)
                if name == BASE_ALLOCATION:
                    self.meta_context = context_id
            elif reply == Rep.ACK or wire.is_error_reply(reply):
                return  # no block status is not fatal: everything reads as data

    def _go(self) -> None:
        payload = wire.encode_info_request(self.address.export, [Info.BLOCK_SIZE])
        self._send(wire.encode_option(Opt.GO, payload))
        got_export = False
        while True:
            reply, data = self._option_reply(Opt.GO)
            if reply == Rep.INFO:
                info, values = wire.decode_info(data)
                if info == Info.EXPORT and isinstance(values, tuple):
                    self.size, self.flags = values
                    got_export = True
                elif info == Info.BLOCK_SIZE and isinstance(values, tuple):
                    self.max_read = max(4096, min(values[2], DEFAULT_MAX_READ))
            elif reply == Rep.ACK:
                if not got_export:
                    raise NbdProtocolError("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
                return
            elif reply == Rep.ERR_UNSUP:
                self._export_name()
                return
            elif wire.is_error_reply(reply):
                raise self._refused(f"the export {self.address.export!r}", reply, data)

    def _export_name(self) -> None:
        """The old way into transmission, for servers without NBD_OPT_GO."""
        self._send(wire.encode_option(Opt.EXPORT_NAME, self.address.export.encode()))
        n = wire.EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else wire.EXPORT_NAME_PADDING)
        try:
            self.size, self.flags = wire.decode_export_name_reply(self._recv(n))
        except NbdDisconnected:
            raise NbdHandshakeError(
                f"{self.address.describe()} has no export {self.address.export!r}") from None
        self.structured = False  # no GO: the meta context negotiation did not take
        self.meta_context = None

    # -- transmission --------------------------------------------------------------------

    def _request(self, cmd: int, offset: int, length: int, flags: int = 0) -> int:
        self._cookie += 1
        self._send(wire.encode_request(cmd, self._cookie, offset, length, flags))
        return self._cookie

    def _replies(self, cookie: int) -> Iterator[tuple[int, memoryview | bytearray]]:
        """Yield (chunk type, payload) for every chunk of the reply to ``cookie``; a
        simple reply yields (NONE, b"") on success. Errors raise NbdCommandError after
        the whole reply is read, so the connection stays in step."""
        error: NbdCommandError | None = None
        while True:
            magic = bytes(self._recv(4))
            if magic == wire.SIMPLE_REPLY_MAGIC.to_bytes(4, "big"):
                _, err, got = wire.decode_simple_reply(magic + self._recv(12))
                if got != cookie:
                    raise NbdProtocolError(f"reply for cookie {got}, expected {cookie}")
                if err:
                    raise NbdCommandError(err, "")
                yield ReplyType.NONE, bytearray()
                return
            if magic != wire.STRUCTURED_REPLY_MAGIC.to_bytes(4, "big"):
                raise NbdProtocolError(f"bad reply magic {magic.hex()}")
            h = wire.decode_chunk_header(magic + self._recv(wire.STRUCTURED_REPLY.size - 4))
            if h.cookie != cookie:
                raise NbdProtocolError(f"reply for cookie {h.cookie}, expected {cookie}")
            if h.type in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
                err, msg = wire.decode_error_chunk(self._recv(h.length))
                error = error or NbdCommandError(err, msg)
            elif h.type != ReplyType.OFFSET_DATA:
                yield h.type, self._recv(h.length)
            else:
                if h.length < 8:
                    raise NbdProtocolError("OFFSET_DATA chunk shorter than its offset")
                self._pending_data = h.length - 8
                yield h.type, memoryview(self._recv(8))  # the offset; the caller reads data
            if h.flags & wire.REPLY_FLAG_DONE:
                if error is not None:
                    raise error
                return

    def pread_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the export's bytes at ``offset`` (at most ``max_read``)."""
        length = len(view)
        cookie = self._request(Cmd.READ, offset, length)
        covered = 0
        for kind, payload in self._replies(cookie):
            if kind == ReplyType.NONE and not self.structured:
                self._recv_into(view)  # simple reply: the data follows
                return
            if kind == ReplyType.OFFSET_DATA:
                at = int.from_bytes(payload, "big") - offset
                n = self._pending_data
                if at < 0 or at + n > length:
                    raise NbdProtocolError("OFFSET_DATA chunk outside the request")
                self._recv_into(view[at:at + n])
                covered += n
            elif kind == ReplyType.OFFSET_HOLE:
                hole_at, n = wire.decode_offset_hole(payload)
                at = hole_at - offset
                if at < 0 or at + n > length:
                    raise NbdProtocolError("OFFSET_HOLE chunk outside the request")
                view[at:at + n] = bytes(n)
                covered += n
            elif kind == ReplyType.NONE:
                continue
            else:
                raise NbdProtocolError(f"unexpected chunk type {kind} in a READ reply")
        if self.structured and covered != length:
            raise NbdProtocolError(f"READ reply covered {covered} of {length} bytes")

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(length, flags)`` runs from ``offset`` (base:allocation flags). They may
        cover less than asked, never more; without the context, one data run."""
        length = min(length, MAX_STATUS, self.size - offset)
        if self.meta_context is None:
            return [(length, 0)]
        cookie = self._request(Cmd.BLOCK_STATUS, offset, length)
        out: list[tuple[int, int]] = []
        for kind, payload in self._replies(cookie):
            if kind == ReplyType.BLOCK_STATUS:
                context_id, extents = wire.decode_block_status(payload)
                if context_id == self.meta_context:
                    out = extents
            elif kind != ReplyType.NONE:
                raise NbdProtocolError(f"unexpected chunk type {kind} in a BLOCK_STATUS reply")
        if not out or any(n == 0 for n, _ in out):
            raise NbdProtocolError("BLOCK_STATUS reply without extents")
        return out

    def close(self) -> None:
        with contextlib.suppress(NbdError, OSError):
            self._send(wire.encode_request(Cmd.DISC, 0))
        self._sock.close()


class Pool:
    """Connections to one export for many threads: at most ``size`` open at once.

    ``with pool.connection() as c`` lends a connection; if the body raises anything
    but ``NbdCommandError`` the connection is closed and not reused, so a restarted
    server is reached through fresh connections.
    """

    def __init__(self, address: Address, size: int = 4, timeout: float | None = 60.0) -> None:
        self.address = address
        self.timeout = timeout
        self._idle: queue.LifoQueue[Connection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._generation = 0  # bumped by reset(): older connections are not reused
        first = Connection(address, timeout)  # fail now if the export is not there
        self.size_bytes = first.size
        self.flags = first.flags
        self.can_extents = first.meta_context is not None
        self._idle.put(first)

    def _give_back(self, conn: Connection) -> None:
        with self._lock:
            if conn.generation == self._generation:
                self._idle.put(conn)
                return
        conn.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        self._slots.acquire()
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = Connection(self.address, self.timeout)
                conn.generation = self._generation
            try:
                yield conn
            except NbdCommandError:
                self._give_back(conn)
                raise
            except BaseException:
                conn.close()
                raise
            self._give_back(conn)
        finally:
            self._slots.release()

    def pread(self, offset: int, length: int) -> bytearray:
        """``length`` bytes at ``offset``, in requests of at most the server's maximum."""
        buf = bytearray(length)
        view = memoryview(buf)
        with self.connection() as c:
            pos = 0
            while pos < length:
                n = min(c.max_read, length - pos)
                c.pread_into(view[pos:pos + n], offset + pos)
                pos += n
        return buf

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        with self.connection() as c:
            return c.block_status(offset, length)

    def reset(self) -> None:
        """Close idle connections; ones lent out now are closed when given back."""
        with self._lock:
            self._generation += 1
            idle = []
            while True:
                try:
                    idle.append(self._idle.get_nowait())
                except queue.Empty:
                    break
        for conn in idle:
            conn.close()

    def close(self) -> None:
        self.reset()
