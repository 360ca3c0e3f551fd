"""NBD server: asyncio glue between sockets, ``ServerConnection`` and a ``Clone``.

This module only moves bytes and calls the clone. The protocol (handshake,
parsing, validation, reply encoding) is ``nbd/protocol.py``; the storage policy
is ``core/clone.py``. Each connection reads requests as fast as they come, runs
each storage call in a thread pool (the ``Clone`` is thread-safe and blocking),
and writes each answer as soon as it is ready, so many requests are in flight
and answered out of order. An OSError from the clone answers that one request
with the matching NBD error; a peer that breaks the protocol loses only its own
connection; the listener keeps accepting.

Reusable entry points, for ``liveclone serve`` and for commands that need the
export in-process (``liveclone boot`` launching QEMU on it):

* ``NBDServer(clone, export_name=..., read_only=...)`` in a running event loop::

      server = NBDServer(clone, export_name="disk")
      uris = await server.start(unix_path="/run/disk.sock")   # or tcp=("::1", 0)
      ...                                                     # clients connect
      await server.stop()        # closes listeners and connections, waits for I/O

  ``start`` returns one NBD URI per listener; ``server.uris`` keeps them.

* ``ServerThread(clone, ...)`` runs the same server on its own event loop in a
  background thread, for synchronous callers::

      with ServerThread(clone, export_name="disk") as t:
          uri = t.start(unix_path=path)[0]
          subprocess.run(["qemu-system-x86_64", "-drive", f"file={uri},format=raw"])

The caller owns the clone: stop the server before closing the clone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import stat
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from liveclone.nbd import protocol as p
from liveclone.nbdwire import wire
from liveclone.nbdwire.wire import Cmd

if TYPE_CHECKING:  # ssl is imported only when TLS is used: it costs start-up time
    import ssl

    from liveclone.sources.base import Extent

log = logging.getLogger("liveclone.nbd")

IO_THREADS = 16
# Per connection: stop reading at HIGH requests in flight, resume at LOW.
INFLIGHT_HIGH = 128
INFLIGHT_LOW = 32
# Answers smaller than this are joined into one write; bigger ones go out as is.
JOIN_BELOW = 64 << 10


class Storage(Protocol):
    """What the server needs of a clone (``core.clone.Clone`` fits)."""

    size: int
    region_size: int

    def read(self, offset: int, length: int) -> bytearray: ...
    # Served on the event loop when they can be done without blocking; None/False
    # sends the request to the pool instead.
    def read_nowait(self, offset: int, length: int) -> bytearray | None: ...
    def write_nowait(self, offset: int, data: bytes | bytearray | memoryview) -> bool: ...
    def write(self, offset: int, data: bytes | bytearray | memoryview,
              fua: bool = False) -> None: ...
    def write_zeroes(self, offset: int, length: int, fua: bool = False,
                     no_hole: bool = False) -> None: ...
    def trim(self, offset: int, length: int, fua: bool = False) -> None: ...
    def flush(self) -> None: ...
    def cache(self, offset: int, length: int) -> None: ...
    # Contiguous extents covering the range; ``protocol.extent_flags`` makes NBD flags of them.
    def block_status(self, offset: int, length: int) -> list[Extent]: ...


@dataclass
class ServerStats:
    connections: int = 0  # accepted since start
    active: int = 0  # open now
    requests: int = 0
    rejected: int = 0  # invalid requests answered by the protocol
    errors: int = 0  # valid requests whose storage call failed
    dropped: int = 0  # connections closed for breaking the protocol


def unix_uri(path: str, name: str, tls: bool = False) -> str:
    scheme = "nbds+unix" if tls else "nbd+unix"
    return f"{scheme}:///{quote(name, safe='')}?socket={quote(path, safe='/')}"


def tcp_uri(host: str, port: int, name: str, tls: bool = False) -> str:
    if ":" in host:
        host = f"[{host}]"
    return f"{'nbds' if tls else 'nbd'}://{host}:{port}/{quote(name, safe='')}"


def tls_server_context(directory: str) -> ssl.SSLContext:
    """A TLS server context from a directory laid out as qemu-nbd and nbdkit expect:
    ``server-cert.pem`` and ``server-key.pem``. Raises ValueError naming what is wrong."""
    cert = os.path.join(directory, "server-cert.pem")
    key = os.path.join(directory, "server-key.pem")
    for path in (cert, key):
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: the TLS directory needs server-cert.pem "
                             "and server-key.pem (the layout qemu-nbd and nbdkit use)")
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"cannot load {cert} with {key}: {e}") from None
    return ctx


class NBDServer:
    """One export of one clone, on any number of listeners."""

    def __init__(self, clone: Storage, export_name: str = "", read_only: bool = False,
                 description: str = "liveclone", io_threads: int = IO_THREADS,
                 tls: ssl.SSLContext | None = None) -> None:
        """``tls``: a server context; clients must then STARTTLS before anything else."""
        self.clone = clone
        self.tls = tls
        self.export = p.Export(export_name, clone.size, read_only=read_only,
                               description=description,
                               preferred_block=min(max(4096, clone.region_size), 1 << 20))
        self.stats = ServerStats()
        self.uris: list[str] = []
        self._io_threads = io_threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self._connections: set[_Connection] = set()
        # Invariant: every storage call started and not yet finished, so that
        # stop() can wait for them before the caller closes the clone.
        self._pending: set[asyncio.Future[Any]] = set()

    async def start(self, unix_path: str | None = None,
                    tcp: tuple[str, int] | None = None) -> list[str]:
        """Listen on a unix socket (mode 0600) and/or TCP; return the new URIs."""
        if unix_path is None and tcp is None:
            raise ValueError("give unix_path or tcp")
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self._io_threads, thread_name_prefix="nbd-io")
        new: list[str] = []
        if unix_path is not None:
            unix_path = os.path.abspath(unix_path)
            sock = bind_unix(unix_path)
            self._unix_paths.append(unix_path)
            self._servers.append(await loop.create_unix_server(self._connection, sock=sock))
            new.append(unix_uri(unix_path, self.export.name, self.tls is not None))
        if tcp is not None:
            server = await loop.create_server(self._connection, tcp[0], tcp[1],
                                              reuse_address=True)
            self._servers.append(server)
            host, port = server.sockets[0].getsockname()[:2]
            new.append(tcp_uri(host, port, self.export.name, self.tls is not None))
        self.uris.extend(new)
        return new

    def _connection(self) -> _Connection:
        return _Connection(self)

    async def serve_forever(self) -> None:
        """Wait until cancelled (the listeners serve on their own)."""
        await asyncio.Event().wait()

    async def stop(self) -> None:
        """Close the listeners and every connection; wait for storage calls."""
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            conn.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._pending:
            await asyncio.wait(list(self._pending))
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._unix_paths.clear()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run one storage call in the pool, tracked for stop()."""
        assert self._pool is not None
        fut = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
        return fut


def _block_status(clone: Storage, offset: int, length: int) -> list[tuple[int, int]]:
    """The clone's extents as ``(length, flags)`` descriptors (run in the pool)."""
    return p.extent_flags(clone.block_status(offset, length))


def bind_unix(path: str) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600 from the first moment.

    It is bound inside a fresh 0700 directory beside ``path`` and renamed into
    place, so no one else can connect in between, and the process umask is left
    alone. A stale socket at ``path`` (nobody listening) is replaced; a live one
    or a non-socket is an error.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale: replace it
        else:
            raise FileExistsError(f"{path} is in use by a running server")
        finally:
            probe.close()
    tmpdir = tempfile.mkdtemp(prefix=".lc", dir=os.path.dirname(path))
    tmp = os.path.join(tmpdir, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(128)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        raise
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.rmdir(tmpdir)
    sock.setblocking(False)
    return sock


class _Connection(asyncio.Protocol):
    """One client: feeds the protocol, dispatches commands, writes answers."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.clone = server.clone
        self.proto = p.ServerConnection([server.export], tls=server.tls is not None)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._paused_reading = False  # by us, for too many requests in flight
        self._write_blocked = False  # by the transport's high-water mark
        self._upgrade: asyncio.Future[None] | None = None  # the STARTTLS handshake

    # -- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._connections.add(self)
        self.server.stats.connections += 1
        self.server.stats.active += 1
        self._write(self.proto.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self in self.server._connections:
            self.server._connections.discard(self)
            self.server.stats.active -= 1

    def pause_writing(self) -> None:
        self._write_blocked = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        self._handle(lambda: self.proto.receive_data(data))

    def _handle(self, parse: Callable[[], list[p.Event]]) -> None:
        """Run the protocol on new input and act on its events."""
        try:
            events = parse()
        except p.RemoteProtocolError as e:
            log.warning("dropping NBD client: %s", e)
            self.server.stats.dropped += 1
            self._write(self.proto.data_to_send())
            self.close()
            return
        for ev in events:
            if type(ev) is p.Command:
                self._dispatch(ev)
            elif type(ev) is p.Rejected:
                self.server.stats.rejected += 1
                log.debug("rejected %s: %s", Cmd(ev.cmd).name if ev.cmd in Cmd._value2member_map_
                          else ev.cmd, ev.reason)
            elif type(ev) is p.StartTLS:
                self._write(self.proto.data_to_send())  # the ACK goes out in plain text
                assert self.transport is not None
                self.transport.pause_reading()  # no byte of the handshake reaches proto
                self._upgrade = asyncio.ensure_future(self._start_tls())
        self._write(self.proto.data_to_send())
        self._after_change()

    async def _start_tls(self) -> None:
        import ssl

        loop = asyncio.get_running_loop()
        assert self.transport is not None and self.server.tls is not None
        try:
            transport = await loop.start_tls(self.transport, self, self.server.tls,
                                             server_side=True)
        except (OSError, ssl.SSLError, ConnectionError) as e:
            log.warning("dropping NBD client: TLS handshake failed: %s", e)
            self.server.stats.dropped += 1
            self.close()
            return
        if transport is None or self.closed:
            return
        self.transport = transport
        self._handle(self.proto.tls_started)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # -- requests ----------------------------------------------------------------------

    def _dispatch(self, c: p.Command) -> None:
        self.server.stats.requests += 1
        clone, run, cmd = self.clone, self.server.run, c.cmd
        fua = bool(c.flags & wire.CMD_FLAG_FUA)
        if cmd == Cmd.READ:
            # Present, cached data is answered at once; anything else in the pool.
            data = clone.read_nowait(c.offset, c.length)
            if data is not None:
                self._answer_now(c.cookie, cmd, data)
                return
            fut = run(clone.read, c.offset, c.length)
        elif cmd == Cmd.WRITE:
            assert c.data is not None  # validate_request: every WRITE carries its payload
            if not fua and clone.write_nowait(c.offset, c.data):
                self._answer_now(c.cookie, cmd, None)
                return
            fut = run(clone.write, c.offset, c.data, fua)
        elif cmd == Cmd.FLUSH:
            fut = run(clone.flush)
        elif cmd == Cmd.TRIM:
            fut = run(clone.trim, c.offset, c.length, fua)
        elif cmd == Cmd.WRITE_ZEROES:
            fut = run(clone.write_zeroes, c.offset, c.length, fua,
                      bool(c.flags & wire.CMD_FLAG_NO_HOLE))
        elif cmd == Cmd.CACHE:
            fut = run(clone.cache, c.offset, c.length)
        elif cmd == Cmd.BLOCK_STATUS:
            fut = run(_block_status, clone, c.offset, c.length)
        else:  # validate_request lets nothing else through
            raise AssertionError(f"unexpected command {cmd}")
        fut.add_done_callback(partial(self._finish, c.cookie, cmd))

    def _answer_now(self, cookie: int, cmd: int, result: Any) -> None:
        """Answer a request served without the pool, through the same path."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(result)
        self._finish(cookie, cmd, done)

    def _finish(self, cookie: int, cmd: int, fut: asyncio.Future[Any]) -> None:
        exc = fut.exception()
        if self.closed or self.proto.state is p.State.CLOSED:
            return  # the client is gone (or broke the protocol): nobody to answer
        reply: p.Reply
        if exc is None:
            result = fut.result()
            if cmd == Cmd.READ:
                reply = p.ReadDone(cookie, result)
            elif cmd == Cmd.BLOCK_STATUS:
                reply = p.Extents(cookie, result)
            else:
                reply = p.Done(cookie)
        else:
            self.server.stats.errors += 1
            if isinstance(exc, OSError):
                log.info("NBD %s failed: %s", Cmd(cmd).name, exc)
                reply = p.Failed(cookie, p.nbd_error(exc.errno), str(exc))
            else:
                log.error("NBD %s failed", Cmd(cmd).name, exc_info=exc)
                reply = p.Failed(cookie, wire.EIO, "internal server error")
        self._write(self.proto.send(reply))
        self._after_change()

    # -- output and flow control ----------------------------------------------------------

    def _write(self, parts: list[wire.Buffer]) -> None:
        if not parts or self.transport is None or self.closed:
            return
        if len(parts) > 1 and sum(len(x) for x in parts) < JOIN_BELOW:
            self.transport.write(b"".join(parts))
        else:
            for part in parts:
                self.transport.write(part)

    def _after_change(self) -> None:
        if self.proto.state is p.State.CLOSED:
            self.close()
        else:
            self._update_reading()

    def _update_reading(self) -> None:
        if self.transport is None or self.closed:
            return
        busy = self._write_blocked or self.proto.inflight >= INFLIGHT_HIGH
        if busy and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()
        elif (self._paused_reading and not self._write_blocked
              and self.proto.inflight <= INFLIGHT_LOW):
            self._paused_reading = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class ServerThread:
    """An ``NBDServer`` on its own event loop in a daemon thread."""

    def __init__(self, clone: Storage, **kwargs: Any) -> None:
        self.server = NBDServer(clone, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nbd-server",
                                        daemon=True)
        self._thread.start()

    def start(self, unix_path: str | None = None,
              tcp: tuple[str, int] | None = None) -> list[str]:
        return asyncio.run_coroutine_threadsafe(
            self.server.start(unix_path, tcp), self._loop).result()

    def stop(self) -> None:
        if not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
