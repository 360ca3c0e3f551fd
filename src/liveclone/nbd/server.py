"""NBD server: asyncio glue between sockets, ``ServerConnection`` and a ``Clone``.

This module only moves bytes and calls the clone. The protocol (handshake,
parsing, validation, reply encoding) is ``nbd/protocol.py``; the storage policy
is ``core/clone.py``. Each connection runs each storage call in a thread pool
(the ``Clone`` is thread-safe and blocking) and writes each answer as soon as it
is ready, so many requests are in flight and answered out of order. An OSError
from the clone answers that one request with the matching NBD error; a peer that
breaks the protocol loses only its own connection; the listener keeps accepting.

What clients can make it spend is bounded (``nbd/limits.py``, DESIGN invariant 11):

* Memory. Every byte held for a client is counted, per connection and in
  total (``NBDServer.memory``): a partial request in the parser (a WRITE's whole
  payload once it is admitted), WRITE payloads waiting, the answer of each
  dispatched request (a READ's length), and answers queued in the transport for a
  client that does not read. A request is dispatched only when its answer fits
  both bounds; until then it waits, and the connection stops reading. A client
  that does not read its answers fills the transport, which pauses our writing
  (``pause_writing``), which stops our reading (``pause_reading``): nothing more
  of it is taken in until it reads.
* Connections: at most ``max_connections`` sockets (fewer if ``ulimit -n`` has
  no room for them). A newcomer past the limit closes the oldest connection still
  negotiating (a real client gets in past idle ones), else it is refused.
* Time: a client that has not chosen an export ``handshake_limit`` seconds after
  connecting is dropped.

Log lines a client can cause (refusals, drops, timeouts, accept errors such as
EMFILE) go through ``LogThrottle``: one line per kind per 10 s, never a traceback.

Reusable entry points, for ``liveclone serve`` and for commands that need the
export in-process (``liveclone boot`` launching QEMU on it):

* ``NBDServer(clone, export_name=..., read_only=..., limits=Limits(...))`` in a
  running event loop::

      server = NBDServer(clone, export_name="disk")
      uris = await server.start(unix_path="/run/disk.sock")   # or tcp=("::1", 0)
      ...                                                     # clients connect
      await server.stop()        # closes listeners and connections, waits for I/O

  ``start`` returns one NBD URI per listener; ``server.uris`` keeps them. Sockets
  bound beforehand with ``listen_unix``/``listen_tcp`` (so that a command can fail
  before it creates anything) are passed as ``start(listeners=[...])``.

* ``ServerThread(clone, ...)`` runs the same server on its own event loop in a
  background thread, for synchronous callers::

      with ServerThread(clone, export_name="disk") as t:
          uri = t.start(unix_path=path)[0]
          subprocess.run(["qemu-system-x86_64", "-drive", f"file={uri},format=raw"])

* Many exports on one server (``liveclone daemon``): no clone at construction,
  then ``add_export(name, clone)`` and ``await remove_export(name)`` at any time
  on the server's loop. Every export is listed by NBD_OPT_LIST and opened by its
  name; the name "" opens nothing. Removing an export closes the connections
  that chose it and waits for their storage calls, so the caller may then close
  that clone; the other exports are not touched::

      server = NBDServer()
      await server.start(unix_path="/run/liveclone/nbd.sock")
      server.add_export("vm1", clone1)
      server.add_export("vm2", clone2, read_only=True)
      await server.remove_export("vm1")

The caller owns the clone: stop the server (or remove its export) before closing
the clone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, cast

from liveclone import eventloop
from liveclone.core.buffers import ANSWERS
from liveclone.errors import CloneClosedError
from liveclone.nbd import protocol as p
from liveclone.nbd.lane import FileRange, Lane
from liveclone.nbd.lane import available as lane_available
from liveclone.nbd.lane import poll as poll_fds
from liveclone.nbd.limits import (
    DEFAULT_POLL_MAX_NS,
    Limits,
    LogThrottle,
    fd_headroom,
    pin_mmap_threshold,
)
from liveclone.nbd.listeners import Listener, listen_tcp, listen_unix
from liveclone.nbd.poll import Poller
from liveclone.nbdwire import wire
from liveclone.nbdwire.wire import Cmd
from liveclone.values import Value

if TYPE_CHECKING:  # ssl is imported only when TLS is used: it costs start-up time
    import ssl

    from liveclone.core.clone import LaneState
    from liveclone.sources.base import Extent

log = logging.getLogger("liveclone.nbd")

IO_THREADS = 16
# Per connection: stop reading at HIGH requests running, resume at LOW.
INFLIGHT_HIGH = 128
INFLIGHT_LOW = 32
# Answers smaller than this are joined into one write; bigger ones go out as is.
JOIN_BELOW = 64 << 10
JOIN_MAX = 1 << 20  # most bytes joined into one write
# READs this long or longer, of present data in the page cache, are sent from
# the clone file by the kernel (sendfile) as far as the socket takes them at once;
# the rest of each is copied as any answer is. Not with TLS.
SENDFILE_MIN = 128 << 10
# The send buffer of a unix socket that may carry them (the kernel doubles it,
# and caps it at net.core.wmem_max).
SENDFILE_SNDBUF = 1 << 20
_READ = int(Cmd.READ)
_WRITE = int(Cmd.WRITE)
ACCEPT_BATCH = 32  # accepts per wake-up of a listener
ACCEPT_RETRY = 0.5  # seconds a listener rests after EMFILE and the like
RETRY_BLOCKED = 0.05  # seconds between looks at connections waiting for memory
CLOSE_GRACE = 5.0  # seconds a closing connection may take to flush before it is cut
# While another client waits for memory, a client none of whose queued answers has
# left for this long is dropped: memory held for a peer that does not read comes
# back no other way.
STALL_LIMIT = 5.0
# What a BLOCK_STATUS answer is charged per 4 KiB of range: its descriptor and the
# Python objects that listing an extent costs (a bound: extents are >= 4 KiB).
BLOCK_STATUS_CHARGE = 128
PIN_AFTER = 0.1  # seconds from start to pin_mmap_threshold
# The most nanoseconds a connection answers its client from its poll before the
# loop gets a turn for its other work (timers, other clients, threads' results).
SERVE_BUDGET = 1_000_000
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Storage(Protocol):
    """What the server needs of a clone (``core.clone.Clone`` fits)."""

    size: int
    region_size: int

    def read(self, offset: int, length: int) -> memoryview: ...
    # For the lane; a storage without ``lane`` gets none (``_new_lane``).
    def lane(self) -> LaneState | None: ...
    def count_lane(self, reads: int, read_bytes: int, writes: int,
                   write_bytes: int) -> None: ...
    # Served on the event loop when they can be done without blocking; None/False
    # sends the request to the pool instead.
    def read_nowait(self, offset: int, length: int) -> memoryview | None: ...
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


class ServerStats(Value):
    """Counters, all 0 at first."""

    __slots__ = ("connections", "active", "requests", "lane", "rejected", "errors", "dropped",
                 "refused", "evicted", "timed_out", "stalled", "memory_peak", "sendfile",
                 "polled")
    connections: int  # accepted since start
    active: int  # open now
    requests: int
    lane: int  # of them, READs and WRITEs done by the lane (nbd/lane.py)
    rejected: int  # invalid requests answered by the protocol
    errors: int  # valid requests whose storage call failed
    dropped: int  # connections closed for breaking the protocol
    refused: int  # closed at once: max_connections negotiated clients were open
    evicted: int  # closed while negotiating, to make room for a newcomer
    timed_out: int  # closed for choosing no export within handshake_limit
    stalled: int  # closed for taking no answer while others waited for memory
    memory_peak: int  # most bytes held for clients at once
    sendfile: int  # READ answers sent, in part or whole, from the file by sendfile
    polled: int  # of the lane's, answered from a poll (nbd/poll.py), not a turn of the loop

    def __init__(self) -> None:
        for name in self._fields:
            setattr(self, name, 0)


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


class _Entry:
    """One export and the storage behind it, with the connections that chose it
    and their storage calls still running (what ``remove_export`` waits for)."""

    __slots__ = ("export", "storage", "connections", "pending")

    def __init__(self, export: p.Export, storage: Storage) -> None:
        self.export = export
        self.storage = storage
        self.connections: set[_Connection] = set()
        self.pending: set[asyncio.Future[Any]] = set()


class NBDServer:
    """Exports of clones, on any number of listeners: one export given at
    construction (``serve``), or any number added and removed while it runs."""

    def __init__(self, clone: Storage | None = None, export_name: str = "",
                 read_only: bool = False, description: str = "liveclone",
                 io_threads: int = IO_THREADS, tls: ssl.SSLContext | None = None,
                 limits: Limits | None = None, poll_max_ns: int = DEFAULT_POLL_MAX_NS) -> None:
        """``clone``: the one export's storage, which the name "" opens too; None
        for a server whose exports come with ``add_export``. ``tls``: a server
        context; clients must then STARTTLS before anything else. ``limits``: what
        clients may make the server spend (defaults: ``Limits()``). ``poll_max_ns``:
        the most time to poll clients before the loop sleeps (nbd/poll.py; 0: never)."""
        self.tls = tls
        self.limits = limits or Limits()
        # Shared with every connection's protocol: NBD_OPT_LIST and lookups see
        # exports added and removed later. Invariant: same names as _entries.
        self.exports = p.ExportTable()
        self._entries: dict[str, _Entry] = {}
        self.clone = clone
        self._export: p.Export | None = None
        if clone is not None:
            self._export = self.add_export(export_name, clone, read_only, description)
            self.exports.default = export_name
        self.stats = ServerStats()
        # The bounds of self.limits, looked up for every request.
        self.connection_memory = self.limits.connection_memory
        self.max_memory = self.limits.max_memory
        self.uris: list[str] = []
        # Lowered by start() to what the open-file limit leaves room for.
        self.max_connections = self.limits.max_connections
        self._io_threads = io_threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._listeners: list[Listener] = []
        # Invariant: every accepted socket not yet closed, from accept() to
        # connection_lost; never more than max_connections (+1 while an evicted one
        # closes).
        self._slots = 0
        self._connections: dict[_Connection, None] = {}  # connected, oldest first
        self._opening: set[asyncio.Task[Any]] = set()  # accepted, transport being made
        # Invariant: memory == sum of held over _connections; it is kept at most
        # limits.max_memory by admitting requests only when their answer fits.
        self.memory = 0
        self._blocked: set[_Connection] = set()  # waiting for memory to be freed
        self._retry: asyncio.TimerHandle | None = None  # the next look at _blocked
        self._retry_soon = False  # a look at _blocked is queued with call_soon
        self.log = LogThrottle(log)
        # Invariant: every storage call started and not yet finished, so that
        # stop() can wait for them before the caller closes the clone.
        self._pending: set[asyncio.Future[Any]] = set()
        # Invariant: running == requests dispatched (_pump) and not yet taken by a
        # _flush, over every connection, open or gone: 0 when nothing is left to answer.
        self.running = 0
        self.poller = Poller(poll_max_ns)
        # Above 0 while input or resumed connections are still being dealt with:
        # then no connection polls (_Connection._idle), as work is left to do.
        self.holding = 0

    # -- exports ---------------------------------------------------------------------

    @property
    def export(self) -> p.Export:
        """The export of the clone given at construction."""
        if self._export is None:
            raise AttributeError("this server was made without a clone: see add_export")
        return self._export

    def add_export(self, name: str, clone: Storage, read_only: bool = False,
                   description: str = "liveclone") -> p.Export:
        """Offer ``clone`` as the export ``name`` from now on (on the server's loop,
        or before ``start``). Raises ValueError for a bad or taken name."""
        if name in self._entries:
            raise ValueError(f"an export named {name!r} exists")
        export = p.Export(name, clone.size, read_only=read_only, description=description,
                          preferred_block=min(max(4096, clone.region_size), 1 << 20),
                          max_block=self.limits.max_block)
        self.exports.add(export)
        self._entries[name] = _Entry(export, clone)
        return export

    async def remove_export(self, name: str) -> None:
        """Stop offering ``name``: new clients cannot open it, the connections that
        chose it are closed, and their storage calls are waited for. Then the
        caller may close its clone. Raises KeyError for an unknown name."""
        entry = self._entries.pop(name)
        self.exports.remove(name)
        if self._export is entry.export:
            self._export = None
            self.exports.default = None
        for conn in list(entry.connections):
            conn.abort()
        await asyncio.sleep(0)  # let the aborted transports call connection_lost
        if entry.pending:
            await asyncio.wait(list(entry.pending))

    def uri(self, name: str) -> list[str]:
        """The URIs of export ``name`` on every listener."""
        return [listener.uri(name, self.tls is not None) for listener in self._listeners]

    def connections_of(self, name: str) -> int:
        entry = self._entries.get(name)
        return len(entry.connections) if entry is not None else 0

    def _chosen(self, export: p.Export) -> _Entry | None:
        """The entry of an export a client just chose (None if it went meanwhile)."""
        entry = self._entries.get(export.name)
        return entry if entry is not None and entry.export is export else None

    async def start(self, unix_path: str | None = None, tcp: tuple[str, int] | None = None,
                    listeners: Sequence[Listener] = ()) -> list[str]:
        """Serve on a unix socket (made mode 0600), on TCP, and/or on sockets bound
        beforehand; return the new URIs."""
        new_listeners = list(listeners)
        if unix_path is not None:
            new_listeners.append(listen_unix(unix_path))
        if tcp is not None:
            new_listeners.extend(listen_tcp(*tcp))
        if not new_listeners:
            raise ValueError("give unix_path, tcp or listeners")
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self._io_threads, thread_name_prefix="nbd-io")
        if not self._listeners:
            self._fit_connections_to_fds()
            # So that RSS follows the memory held (limits.py); a moment later, when
            # the first clients have been answered: it imports ctypes (2-3 ms).
            loop.call_later(PIN_AFTER, pin_mmap_threshold)
        new: list[str] = []
        for listener in new_listeners:
            listener.sock.setblocking(False)
            self._listeners.append(listener)
            self._listen(listener.sock, True)
            new.append(listener.uri(self._export.name if self._export is not None else "",
                                    self.tls is not None))
        self.uris.extend(new)
        return new

    def _fit_connections_to_fds(self) -> None:
        room = fd_headroom()
        if room is not None and room < self.max_connections:
            self.max_connections = max(1, room)
            log.warning("NBD: at most %d connections, not %d: the open-file limit "
                        "(ulimit -n) leaves no room for more", self.max_connections,
                        self.limits.max_connections)

    # -- accepting -------------------------------------------------------------------

    def _accept(self, lsock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            if self._slots >= self.max_connections and self._evicting():
                return  # accept again once the evicted one's descriptor is closed
            try:
                sock, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno not in _OUT_OF_RESOURCES:
                    raise
                self.log("accept", logging.WARNING,
                         "NBD: cannot accept a client: %s; retrying in %.1f s",
                         e.strerror or e, ACCEPT_RETRY)
                self._rest(lsock)
                return
            if self._slots >= self.max_connections:
                victim = next((c for c in self._connections if c.negotiating
                               and not c.closing), None)
                if victim is None:
                    sock.close()
                    self.stats.refused += 1
                    self.log("refused", logging.WARNING,
                             "NBD: refusing a client: %d connections are open, the most "
                             "allowed (--max-connections)", self._slots)
                    continue
                self.stats.evicted += 1
                self.log("evicted", logging.WARNING,
                         "NBD: %d connections are open, the most allowed "
                         "(--max-connections): closing the oldest one still negotiating "
                         "to let a new client in", self._slots)
                victim.abort()
            self._slots += 1
            self.stats.connections += 1
            self._open(sock)

    def _evicting(self) -> bool:
        """True while a connection closed to make room has not let go of its socket."""
        return any(c.closing for c in self._connections)

    def _listen(self, lsock: socket.socket, on: bool) -> None:
        """Accept on ``lsock`` from now on, or no more. A listener accepting is
        polled too (nbd/poll.py): a new client ends a poll."""
        loop = asyncio.get_running_loop()
        if on:
            loop.add_reader(lsock.fileno(), self._accept, lsock)
            self.poller.watch(lsock.fileno())
        else:
            loop.remove_reader(lsock.fileno())
            self.poller.forget(lsock.fileno())

    def _rest(self, lsock: socket.socket) -> None:
        self._listen(lsock, False)

        def again() -> None:
            if any(x.sock is lsock for x in self._listeners):
                self._listen(lsock, True)

        asyncio.get_running_loop().call_later(ACCEPT_RETRY, again)

    def _open(self, sock: socket.socket) -> None:
        made: list[_Connection] = []

        def factory() -> _Connection:
            made.append(_Connection(self))
            return made[0]

        async def connect() -> None:
            try:
                await asyncio.get_running_loop().connect_accepted_socket(factory, sock)
            except BaseException as e:
                if not made or made[0].transport is None:
                    sock.close()
                    self._slots -= 1
                else:
                    made[0].abort()
                if not isinstance(e, (OSError, asyncio.CancelledError)):
                    raise

        task = asyncio.ensure_future(connect())
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    # -- memory ----------------------------------------------------------------------

    def block(self, conn: _Connection) -> None:
        """``conn`` waits for memory: look at it again when some is freed."""
        self._blocked.add(conn)
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(RETRY_BLOCKED,
                                                                self._retry_blocked)
        self.log("memory", logging.INFO,
                 "NBD: clients hold %d MiB of %d MiB (--max-memory): a client waits",
                 self.memory >> 20, self.limits.max_memory >> 20)

    def freed(self) -> None:
        """Memory was given back: let blocked connections try again at once."""
        if self._blocked and not self._retry_soon:
            self._retry_soon = True
            asyncio.get_running_loop().call_soon(self._retry_blocked)

    def _retry_blocked(self) -> None:
        self._retry_soon = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._drop_stalled()
        blocked, self._blocked = self._blocked, set()
        self.holding += 1  # no poll while some of them are still to be resumed
        try:
            for conn in blocked:  # (re-)block themselves if they still cannot go on
                conn.resume()
        finally:
            self.holding -= 1

    def _drop_stalled(self) -> None:
        """Drop the client holding most memory in answers it has not taken for
        STALL_LIMIT, if another one waits for memory meanwhile."""
        now = asyncio.get_running_loop().time()
        stalled = [c for c in self._connections if c.stalled_for(now) >= STALL_LIMIT]
        if not stalled:
            return
        worst = max(stalled, key=lambda c: c.held)
        if not any(c is not worst and c.stalled_for(now) < STALL_LIMIT
                   for c in self._blocked):
            return  # it only holds itself up
        self.stats.stalled += 1
        self.log("stalled", logging.WARNING,
                 "NBD: dropping a client that took none of its %d MiB of answers for "
                 "%.0f s while others waited for memory (--max-memory)",
                 worst.held >> 20, STALL_LIMIT)
        worst.abort()

    # -- running ---------------------------------------------------------------------

    def _connection(self) -> _Connection:
        return _Connection(self)

    async def serve_forever(self) -> None:
        """Wait until cancelled (the listeners serve on their own)."""
        await asyncio.Event().wait()

    async def stop(self) -> None:
        """Close the listeners and every connection; wait for storage calls."""
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            self._listen(listener.sock, False)
            listener.close()
        self._listeners.clear()
        for task in list(self._opening):
            task.cancel()
        if self._opening:
            await asyncio.wait(list(self._opening))
        for conn in list(self._connections):
            conn.abort()
        await asyncio.sleep(0)  # let the aborted transports call connection_lost
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._pending:
            await asyncio.wait(list(self._pending))
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await loop.run_in_executor(None, pool.shutdown)

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run one storage call in the pool, tracked for stop()."""
        assert self._pool is not None
        fut = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
        return fut

    def _run_for(self, entry: _Entry, fn: Callable[..., Any], *args: Any
                 ) -> asyncio.Future[Any]:
        """``run``, also tracked for ``remove_export`` of ``entry``."""
        fut = self.run(fn, *args)
        entry.pending.add(fut)
        fut.add_done_callback(entry.pending.discard)
        return fut


def _block_status(clone: Storage, offset: int, length: int) -> list[tuple[int, int]]:
    """The clone's extents as ``(length, flags)`` descriptors (run in the pool)."""
    return p.extent_flags(clone.block_status(offset, length))


def _new_lane(clone: Storage, export: p.Export, structured: bool) -> Lane | None:
    """A lane for a connection to ``export`` on ``clone``, where one can work:
    built, storage that offers it (``Clone.lane``), no alignment to check."""
    if not lane_available() or export.min_block != 1 or not hasattr(clone, "lane"):
        return None
    state = clone.lane()
    if state is None:
        return None
    return Lane(state.fd, export.size, export.max_block, structured, state.shift,
                writable=not export.read_only)


def _widen_send_buffer(transport: asyncio.BaseTransport | None) -> None:
    """Let a unix socket hold ``SENDFILE_SNDBUF`` bytes of answers, so that most
    of a large READ goes by sendfile before the socket is full (1M reads at QD8:
    4.0 GB/s against 2.8 with the default 208 KiB). Not for TCP, whose send
    buffer Linux sizes by itself once nobody sets it."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < SENDFILE_SNDBUF:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SENDFILE_SNDBUF)
    except OSError:  # kept as it is: only slower
        pass


def _answer_bytes(c: p.Command) -> int:
    """Memory the answer to ``c`` may hold while it is made: a READ's bytes twice
    (a read from the source is copied into the answer; asyncio copies an answer
    the socket did not take into its own buffer, while ours still lives)."""
    if c.cmd == Cmd.READ:
        return 2 * c.length
    if c.cmd == Cmd.BLOCK_STATUS:
        return (c.length // 4096 + 2) * BLOCK_STATUS_CHARGE
    return 0


class _Connection(asyncio.Protocol):
    """One client: feeds the protocol, dispatches commands, writes answers."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        # The export chosen, its storage, and how its calls run: set on ExportChosen.
        self.entry: _Entry | None = None
        self.clone: Storage = cast(Storage, None)
        self.run: Callable[..., asyncio.Future[Any]] = server.run
        self.proto = p.ServerConnection(server.exports, tls=server.tls is not None)
        self.transport: asyncio.Transport | None = None
        self.closed = False  # the socket is gone (connection_lost or equivalent)
        self.closing = False  # close() or abort() was called
        self._paused_reading = False  # by us: busy, short of memory, or not read from
        self._write_blocked = False  # by the transport's high-water mark
        self._upgrade: asyncio.Future[None] | None = None  # the STARTTLS handshake
        self._timers: list[asyncio.TimerHandle] = []
        # Memory, in bytes. Invariant: held == what this connection adds to
        # server.memory (updated by _count()); once closed, held is 0 and
        # _running_bytes, the charge of storage calls still running, stays in
        # server.memory until each returns.
        self.held = 0
        self._out = 0  # bytes queued in the transport when last counted
        self._answering = False  # inside transport.write() of a charged answer
        self._pump_queued = False  # a _pump_later is scheduled
        # Answers made and not yet sent: (cookie, cmd, charge, result, exception).
        # Invariant: each is counted in _running and _running_bytes until _flush
        # sends it; a _flush is due (this turn or the next) whenever it is not empty.
        self._ready: list[tuple[int, int, int, Any, BaseException | None]] = []
        self._flush_queued = False  # a _flush is scheduled with call_soon
        # Parsed requests not dispatched yet: their answers did not fit.
        self._waiting: deque[p.Command] = deque()
        self._waiting_bytes = 0  # WRITE payloads among them
        self._running = 0  # dispatched and not answered
        self._running_bytes = 0  # their payloads and the answers they will make
        # When bytes last left the transport (or it was empty), and how many it held.
        self._drained_at = 0.0
        self._out_seen = 0
        self._looked_at = -1e9
        self._lane: Lane | None = None  # set on ExportChosen, if there is a lane
        # proto.received when the partial WRITE being received was admitted: its
        # whole payload is then counted (and read in) before it is complete.
        self._admitted = -1
        self._fd = -1  # the socket's
        self._watched = False  # _fd is polled by server.poller: connected, and read from

    @property
    def negotiating(self) -> bool:
        return self.proto.state in (p.State.HANDSHAKE, p.State.NEGOTIATING,
                                    p.State.TLS_HANDSHAKE)

    # -- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        server._connections[self] = None
        server.stats.active += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()
            self._polled(True)
        limit = server.limits.handshake_limit
        if limit:
            self._timers.append(asyncio.get_running_loop().call_later(
                limit, self._handshake_expired))
        self._write(self.proto.data_to_send())
        self._count()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()

    def _gone(self) -> None:
        """The socket is closed: give back the slot, the memory and the timers."""
        if self.closed:
            return
        self._answering = False
        self._count()  # held must match what it added to server.memory
        self.closed = self.closing = True
        server = self.server
        self._polled(False)
        for timer in self._timers:
            timer.cancel()
        if self._upgrade is not None:
            self._upgrade.cancel()
        # Storage calls still running keep their buffers until they return: their
        # charge stays counted until then (_finish gives it back).
        server.memory -= self.held - self._running_bytes
        self.held = 0
        self._waiting.clear()
        server._blocked.discard(self)
        if self in server._connections:
            del server._connections[self]
            server.stats.active -= 1
        if self.entry is not None:
            self.entry.connections.discard(self)
        server._slots -= 1
        server.freed()

    def pause_writing(self) -> None:
        self._write_blocked = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._update_reading()
        self.server.freed()

    def data_received(self, data: bytes) -> None:
        server = self.server
        server.poller.woke()
        server.holding += 1  # no poll before all of ``data`` is with the protocol
        try:
            self._receive(data)
        finally:
            server.holding -= 1
        self._idle()

    def _receive(self, data: bytes) -> None:
        rest = data
        if self._lane is not None:
            proto = self.proto
            # The end of a message begun in an earlier piece goes to the protocol
            # first, so that the lane starts at a message boundary.
            need = proto.to_boundary
            while 0 < need < len(rest) and not self.closing:
                head, rest = rest[:need], rest[need:]
                self._handle(partial(proto.receive_data, head))
                need = proto.to_boundary
            if not need:
                rest = self._lane_run(rest)
                if not rest:
                    self._after_change()
                    return
        self._handle(lambda: self.proto.receive_data(rest))

    def _lane_run(self, data: bytes) -> bytes:
        """Do the plain READs and WRITEs of present data in ``data`` in the lane
        (``nbd/lane.py``); return every other message, for the protocol.

        Only at a message boundary (no partial message buffered), with no request
        waiting for memory and the transport taking answers; the lane's answers
        are held to the same memory bounds as any other. The lane does not see
        the cookies in flight here: a client that reuses one while in flight
        (which NBD forbids) may get both answers, in any order."""
        lane = self._lane
        assert lane is not None and self.transport is not None
        room, state = self._lane_room()
        if state is None:
            return data
        out, done, rest = lane.run(data, state, room)
        if not (done.reads or done.writes):
            return data
        self._answered_in_lane(done)
        self._send_lane(out, 0, done.out_used)
        return rest

    def _lane_room(self) -> tuple[int, LaneState | None]:
        """How many bytes of answers the lane may make now, and the clone's state
        for it; (0, None) when it may not run: only at a message boundary (no
        partial message buffered), with no request waiting for memory and the
        transport taking answers. The lane's answers are held to the same memory
        bounds as any other."""
        proto, server = self.proto, self.server
        if (proto.state is not p.State.TRANSMISSION or proto.to_boundary
                or self._waiting or self._write_blocked or self.closing):
            return 0, None
        room = min(server.connection_memory - self.held, server.max_memory - server.memory)
        if room <= 0:
            return 0, None
        try:
            state = self.clone.lane()
        except CloneClosedError:
            return 0, None  # the protocol's path answers with the error
        return room, state

    def _answered_in_lane(self, done: Any) -> None:
        """Account the READs and WRITEs the lane answered (``struct lc_done`` or
        ``lc_served``)."""
        count = done.reads + done.writes
        self.proto.answered_in_lane(count)
        stats = self.server.stats
        stats.requests += count
        stats.lane += count
        self.clone.count_lane(done.reads, done.read_bytes, done.writes, done.write_bytes)

    def _send_lane(self, out: Any, start: int, end: int) -> None:
        """Queue the lane's replies ``out[start:end]``; reuse ``out`` once the
        transport holds none of it."""
        lane, transport = self._lane, self.transport
        assert lane is not None and transport is not None
        if start < end:
            transport.write(lane.view(out, end)[start:])
        if not self.proto.tls_active and transport.get_write_buffer_size() == 0:
            lane.sent(out)

    def _serve_in_lane(self, fds: Any, n: int, index: int, ns: int) -> bool:
        """``Poller.idle``'s poll for a connection with a lane, which has nothing
        in flight: answer here what the client sends, up to the first message the
        lane does not answer (``Lane.serve``), until nothing comes within ``ns``,
        or the loop has other work. True if nothing came."""
        lane = self._lane
        assert lane is not None
        room, state = self._lane_room()
        if state is None or self.proto.tls_active:  # the socket holds TLS records
            return poll_fds(fds, n, ns) == 0
        out, served = lane.serve(state, fds, n, index, ns, SERVE_BUDGET, room)
        if served.reads or served.writes:
            self._answered_in_lane(served)
            self.server.stats.polled += served.reads + served.writes
        self._send_lane(out, served.sent, served.out_used)
        if served.sent < served.out_used:
            self._after_change()  # the transport holds answers now
        return bool(served.idle)

    def _handle(self, parse: Callable[[], list[p.Event]]) -> None:
        """Run the protocol on new input and act on its events."""
        try:
            events = parse()
        except p.RemoteProtocolError as e:
            self.server.log("dropped", logging.WARNING, "dropping NBD client: %s", e)
            self.server.stats.dropped += 1
            self._write(self.proto.data_to_send())
            self.close()
            return
        for ev in events:
            if type(ev) is p.Command:
                if ev.data is not None:
                    self._waiting_bytes += len(ev.data)
                self._waiting.append(ev)
            elif type(ev) is p.Rejected:
                self.server.stats.rejected += 1
                log.debug("rejected %s: %s", Cmd(ev.cmd).name if ev.cmd in Cmd._value2member_map_
                          else ev.cmd, ev.reason)
            elif type(ev) is p.ExportChosen:
                for timer in self._timers:
                    timer.cancel()
                entry = self.server._chosen(ev.export)
                if entry is None:  # removed in this very turn: nothing to serve
                    self.abort()
                    return
                self.entry = entry
                self.clone = entry.storage
                self.run = partial(self.server._run_for, entry)
                entry.connections.add(self)
                self._lane = _new_lane(self.clone, ev.export, ev.structured)
                if self._lane is not None and not self.proto.tls_active:
                    _widen_send_buffer(self.transport)
            elif type(ev) is p.StartTLS:
                self._write(self.proto.data_to_send())  # the ACK goes out in plain text
                assert self.transport is not None
                self.transport.pause_reading()  # no byte of the handshake reaches proto
                self._upgrade = asyncio.ensure_future(self._start_tls())
        self._write(self.proto.data_to_send())
        self._pump()
        self._after_change()

    async def _start_tls(self) -> None:
        import ssl

        loop = asyncio.get_running_loop()
        assert self.transport is not None and self.server.tls is not None
        old = self.transport
        try:
            transport = await loop.start_tls(old, self, self.server.tls, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError) as e:
            self.server.log("tls", logging.WARNING,
                            "dropping NBD client: TLS handshake failed: %s", e)
            self.server.stats.dropped += 1
            self._upgrade = None
            old.abort()
            self._gone()  # the TLS layer owned the socket: our connection_lost is not called
            return
        if transport is None or self.closed:
            return
        self.transport = transport
        self._paused_reading = False  # the TLS transport reads from the start
        self._handle(self.proto.tls_started)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def _handshake_expired(self) -> None:
        if self.negotiating and not self.closing:
            self.server.stats.timed_out += 1
            self.server.log("handshake", logging.WARNING,
                            "NBD: closing a client that chose no export within %g s "
                            "(--handshake-limit)", self.server.limits.handshake_limit)
            self.abort()

    # -- requests ----------------------------------------------------------------------

    def _fits(self, more: int) -> bool:
        """Whether ``more`` bytes may be held beside what is held now. A connection
        with no answer running or queued may always take one (so that its own
        waiting WRITE payloads never lock it out), within the total."""
        server = self.server
        mine = (self.held + more <= server.connection_memory
                or (self._running_bytes == 0 and self._out == 0))
        return mine and server.memory + more <= server.max_memory

    def _pump(self) -> None:
        """Dispatch waiting requests while their answers fit in memory.

        Requests that make an answer (READ, BLOCK_STATUS) go in order; the others
        hold nothing more than they already do and go past an answer that waits
        (NBD lets a server run requests in flight in any order), so that WRITE
        payloads waiting here always drain and free their memory."""
        self._count()
        if not self._waiting:
            return
        keep: deque[p.Command] = deque()
        blocked = False
        while self._waiting and self._running < INFLIGHT_HIGH and not self.closing:
            c = self._waiting.popleft()
            cost = _answer_bytes(c)
            if cost and (blocked or not self._fits(cost)):
                blocked = True
                keep.append(c)
                continue
            payload = len(c.data) if c.data is not None else 0
            self._waiting_bytes -= payload
            self._running += 1
            self.server.running += 1
            self._running_bytes += cost + payload
            self._charge(cost)  # what _count() would find: the payload only moved
            try:
                self._dispatch(c, cost + payload)
            except Exception as e:  # answered as the errors of the pool's calls are
                self._ready.append((c.cookie, c.cmd, cost + payload, None, e))
        keep.extend(self._waiting)
        self._waiting = keep
        if blocked:
            self.server.block(self)
        if self._ready:
            self._flush()

    def _charge(self, more: int) -> None:
        """Add ``more`` to what this connection holds (as ``_count`` would)."""
        if self.closed or self._answering or not more:
            return
        server = self.server
        self.held += more
        server.memory += more
        if server.memory > server.stats.memory_peak:
            server.stats.memory_peak = server.memory

    def _dispatch(self, c: p.Command, charge: int) -> None:
        self.server.stats.requests += 1
        clone, run, cmd = self.clone, self.run, c.cmd
        if cmd == _READ:
            # Present, cached data is answered in this turn of the loop, together
            # with every other answer ready by then; anything else in the pool.
            if c.length >= SENDFILE_MIN and self._lane is not None \
                    and not self.proto.tls_active:
                state = clone.lane()
                rng = self._lane.sendable(state, c.offset, c.length) if state else None
                if rng is not None:
                    clone.count_lane(1, c.length, 0, 0)
                    self._ready.append((c.cookie, cmd, charge, rng, None))
                    return
            data = clone.read_nowait(c.offset, c.length)
            if data is not None:
                self._ready.append((c.cookie, cmd, charge, data, None))
                return
            fut = run(clone.read, c.offset, c.length)
        elif cmd == _WRITE:
            assert c.data is not None  # validate_request: every WRITE carries its payload
            fua = bool(c.flags & wire.CMD_FLAG_FUA)
            if not fua and clone.write_nowait(c.offset, c.data):
                self._ready.append((c.cookie, cmd, charge, None, None))
                return
            fut = run(clone.write, c.offset, c.data, fua)
        elif cmd == Cmd.FLUSH:
            fut = run(clone.flush)
        elif cmd == Cmd.TRIM:
            fut = run(clone.trim, c.offset, c.length, bool(c.flags & wire.CMD_FLAG_FUA))
        elif cmd == Cmd.WRITE_ZEROES:
            fut = run(clone.write_zeroes, c.offset, c.length,
                      bool(c.flags & wire.CMD_FLAG_FUA), bool(c.flags & wire.CMD_FLAG_NO_HOLE))
        elif cmd == Cmd.CACHE:
            fut = run(clone.cache, c.offset, c.length)
        elif cmd == Cmd.BLOCK_STATUS:
            fut = run(_block_status, clone, c.offset, c.length)
        else:  # validate_request lets nothing else through
            raise AssertionError(f"unexpected command {cmd}")
        fut.add_done_callback(partial(self._finish, c.cookie, cmd, charge))

    def _finish(self, cookie: int, cmd: int, charge: int, fut: asyncio.Future[Any]) -> None:
        """A storage call of the pool returned: its answer joins the others ready,
        all sent together at the end of this turn of the loop."""
        exc = fut.exception()
        self._ready.append((cookie, cmd, charge, None if exc else fut.result(), exc))
        if not self._flush_queued:
            self._flush_queued = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send every answer ready, in one write (large READ data apart), then give
        back their charges. The charge of each covers both copies while the
        transport takes it; its buffer is counted instead once ours are let go."""
        self._flush_queued = False
        ready, self._ready = self._ready, []
        if not ready:
            return
        self.server.running -= len(ready)  # answered now, whatever happens below
        charges = 0
        answered = 0
        if self.closed:  # the client is gone: nobody to answer
            for item in ready:
                charges += item[2]
            del ready
            self._running_bytes -= charges
            self.server.memory -= charges  # held back by _gone() until now
            self.server.freed()
            return
        out: list[wire.Buffer] = []
        proto = self.proto
        stats = self.server.stats
        for cookie, cmd, charge, result, exc in ready:
            charges += charge
            answered += 1
            if proto.state is p.State.CLOSED:  # it broke the protocol: no answer
                continue
            reply: p.Reply
            if exc is None:
                if cmd == _READ:  # its bytes, or a FileRange of them
                    reply = p.ReadDone(cookie, result)
                elif cmd == Cmd.BLOCK_STATUS:
                    reply = p.Extents(cookie, result)
                else:
                    reply = p.Done(cookie)
            else:
                stats.errors += 1
                if isinstance(exc, OSError):
                    log.info("NBD %s failed: %s", Cmd(cmd).name, exc)
                    reply = p.Failed(cookie, p.nbd_error(exc.errno), str(exc))
                else:
                    log.error("NBD %s failed", Cmd(cmd).name, exc_info=exc)
                    reply = p.Failed(cookie, wire.EIO, "internal server error")
            out += proto.send(reply)
        del ready
        self._answering = True
        try:
            self._write(out)
        finally:
            self._answering = False
        del out
        self._running -= answered
        self._running_bytes -= charges  # the transport's buffer is counted instead
        self._after_change()
        if self._waiting:  # admit more now that these answers' memory is free
            self._pump_soon()
        self.server.freed()
        self._idle()

    def _polled(self, on: bool) -> None:
        if on != self._watched and self._fd >= 0:
            self._watched = on
            if on:
                self.server.poller.watch(self._fd)
            else:
                self.server.poller.forget(self._fd)

    def _idle(self) -> None:
        """This connection has answered all it was asked: if the whole server has
        nothing left to do either, poll the clients before the loop sleeps."""
        server = self.server
        if (server.running or server.holding or server._blocked or self._waiting
                or self.closing or self.transport is None
                or self.transport.get_write_buffer_size()):
            return
        if self._lane is not None:
            server.poller.idle(self._fd, self._serve_in_lane)
        else:
            server.poller.idle()

    def _pump_soon(self) -> None:
        if not self._pump_queued:
            self._pump_queued = True
            asyncio.get_running_loop().call_soon(self._pump_later)

    def _pump_later(self) -> None:
        self._pump_queued = False
        if not self.closing:
            self._pump()
            self._update_reading()

    # -- output and flow control ----------------------------------------------------------

    def _write(self, parts: list[wire.Buffer]) -> None:
        """Queue ``parts`` in as few transport writes as it takes: small parts are
        joined (one send for a whole batch of 4 KiB answers), a large one goes as
        a view of its own, copied by the transport only if the socket does not
        take it at once."""
        if not parts or self.transport is None or self.closing:
            return
        transport = self.transport
        if len(parts) == 1:
            transport.write(memoryview(parts[0]))
            return
        group: list[wire.Buffer] = []
        size = 0
        for part in parts:
            n = len(part)
            if isinstance(cast(object, part), FileRange):  # a READ's bytes, in the file
                head = group.pop()  # its reply's header, the part before it
                if group:
                    transport.write(b"".join(group))
                    group = []
                    size = 0
                self._send_range(head, cast(FileRange, part))
                continue
            if n >= JOIN_BELOW:
                if group:
                    transport.write(b"".join(group))
                    group = []
                    size = 0
                transport.write(memoryview(part))
                continue
            if size + n > JOIN_MAX and group:
                transport.write(b"".join(group))
                group = []
                size = 0
            group.append(part)
            size += n
        if group:
            transport.write(b"".join(group) if len(group) > 1 else memoryview(group[0]))

    def _send_range(self, head: wire.Buffer, rng: FileRange) -> None:
        """Send a READ's reply whose bytes are ``rng`` of the clone file: when the
        transport holds nothing, the header and as much of the bytes as the
        socket takes now go straight to the socket, the bytes by sendfile (from
        the page cache, with no copy of ours); whatever is left is read and
        given to the transport like any answer, after them."""
        transport = self.transport
        assert transport is not None
        sent_head = sent = 0
        if transport.get_write_buffer_size() == 0:
            fd = transport.get_extra_info("socket").fileno()
            try:
                sent_head = os.write(fd, head)
                if sent_head == len(head):
                    while sent < rng.length:
                        n = os.sendfile(fd, rng.fd, rng.offset + sent, rng.length - sent)
                        if n <= 0:
                            break
                        sent += n
            except OSError:  # full (EAGAIN), or broken: the transport will say so
                pass
            if sent:
                self.server.stats.sendfile += 1
        if sent_head < len(head):
            transport.write(memoryview(head)[sent_head:])
        if sent < rng.length:
            rest = ANSWERS.take(rng.length - sent)
            got = os.preadv(rng.fd, [rest], rng.offset + sent)
            if got < len(rest):  # past the clone file's end: cannot happen
                rest[got:] = bytes(len(rest) - got)
            transport.write(rest)

    def _count(self) -> None:
        """Bring this connection's share of ``server.memory`` up to date."""
        if self.closed or self._answering:
            return
        proto = self.proto
        partial_msg = proto.buffered
        if self._admitted == proto.received:
            partial_msg += proto.incomplete
        out = self.transport.get_write_buffer_size() if self.transport is not None else 0
        self._out = out
        held = partial_msg + self._waiting_bytes + self._running_bytes + out
        server = self.server
        server.memory += held - self.held
        self.held = held
        if server.memory > server.stats.memory_peak:
            server.stats.memory_peak = server.memory

    def stalled_for(self, now: float) -> float:
        """Seconds since answers last left for this client (0 if none wait)."""
        if self.transport is None or self.closing:
            return 0.0
        out = self.transport.get_write_buffer_size()
        # Measured only over looks in a row: a first look (or one after a quiet
        # spell, when nobody waited) starts the clock.
        fresh = now - self._looked_at > 4 * RETRY_BLOCKED
        if fresh or out == 0 or out < self._out_seen:
            self._drained_at = now
        self._out_seen = out
        self._looked_at = now
        return now - self._drained_at

    def _after_change(self) -> None:
        if self.proto.state is p.State.CLOSED:
            self.close()
        else:
            self._update_reading()

    def resume(self) -> None:
        """Memory may have been freed: dispatch and read again if it now fits."""
        if not self.closing:
            self._pump()
            self._update_reading()

    def _update_reading(self) -> None:
        if (self.transport is None or self.closing
                or self.proto.state is p.State.TLS_HANDSHAKE):
            return
        self._count()
        proto = self.proto
        incomplete = proto.incomplete
        if incomplete and self._admitted != proto.received and self._fits(incomplete):
            self._admitted = proto.received  # hold all of it: read it in whole
            self._count()
        if incomplete:
            short = self._admitted != proto.received
        else:
            server = self.server
            short = (self.held >= server.connection_memory
                     or server.memory >= server.max_memory)
        if short:
            self.server.block(self)
        busy = self._write_blocked or short or bool(self._waiting)
        if busy or self._running >= INFLIGHT_HIGH:
            if not self._paused_reading:
                self._paused_reading = True
                self.transport.pause_reading()
                self._polled(False)  # what it sends waits: no event for the poll
        elif self._paused_reading and self._running <= INFLIGHT_LOW:
            self._paused_reading = False
            self.transport.resume_reading()
            self._polled(True)

    def close(self) -> None:
        """Close after the queued bytes are sent; cut if the client does not take them."""
        if self.transport is not None and not self.closing:
            self.closing = True
            self._polled(False)  # the loop reads it no more
            self.transport.close()
            self._timers.append(asyncio.get_running_loop().call_later(CLOSE_GRACE,
                                                                      self.abort))

    def abort(self) -> None:
        """Close at once, dropping whatever is queued."""
        self.closing = True
        self._polled(False)
        if self.transport is not None and not self.closed:
            self.transport.abort()


class ServerThread:
    """An ``NBDServer`` on its own event loop in a daemon thread."""

    def __init__(self, clone: Storage, **kwargs: Any) -> None:
        self.server = NBDServer(clone, **kwargs)
        self._loop = eventloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nbd-server",
                                        daemon=True)
        self._thread.start()

    def start(self, unix_path: str | None = None, tcp: tuple[str, int] | None = None,
              listeners: Sequence[Listener] = ()) -> list[str]:
        return asyncio.run_coroutine_threadsafe(
            self.server.start(unix_path, tcp, listeners), self._loop).result()

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
