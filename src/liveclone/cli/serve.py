"""``liveclone serve``: export a clone over NBD while it is still being copied."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Generic, TypeVar

import click

from liveclone.cli.options import (
    SIZE,
    copy_on_read_option,
    poll_option,
    profile_options,
    rate_option,
    region_size_option,
    stop_on_signals,
)
from liveclone.errors import CloneBusyError, TargetError, UsageError
from liveclone.mountpoint import check_mountpoint
from liveclone.nbd import limits as nbd_limits
from liveclone.nbd.limits import Limits
from liveclone.nbd.listeners import Listener, listen_tcp, listen_unix
from liveclone.nbd.protocol import export_name_problem
from liveclone.units import format_size

if TYPE_CHECKING:
    import ssl

    from liveclone.core.profile import ProfileOptions
    from liveclone.nbd.server import NBDServer
    from liveclone.session import CloneSession

T = TypeVar("T")

SOCKET_SUFFIX = ".sock"
STATUS_EVERY = 0.2  # seconds between status updates; also how soon a signal stops us


LOOPBACK = "127.0.0.1"
UNIX_PATH_MAX = 107  # bytes in sun_path, less the terminating NUL


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (loopback: 127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"invalid --listen {text!r}: use HOST:PORT, e.g. 127.0.0.1:10809")
    if host.startswith("[") != host.endswith("]"):
        raise UsageError(f"invalid --listen {text!r}: write an IPv6 address as [::1]:PORT")
    host = host.strip("[]") or LOOPBACK
    return host, int(port)


def exposure_warning(host: str, port: int, tls: bool) -> str | None:
    """What to tell the user about listening on ``host`` without TLS, or None."""
    if tls or host == "localhost":
        return None
    import ipaddress  # only for --listen: not on the way to a unix socket's first read

    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if addr is not None and addr.is_loopback:
        return None
    where = ("every interface" if addr is not None and addr.is_unspecified
             else "a non-loopback address")
    return (f"warning: listening on {where} ({host}:{port}) without TLS: anyone who can "
            "reach this port can read and write the clone (NBD has no authentication). "
            "Use --tls-certificates, or a loopback address.")


def check_socket_dir(path: str) -> None:
    """Refuse a socket path that cannot be made, before anything is created."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise UsageError(f"socket path {path} is longer than {UNIX_PATH_MAX} bytes, the most "
                         "a unix socket allows: give a shorter --socket path")
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise TargetError(f"cannot create the socket {path}: {directory} {what}; create the "
                          "directory or give --socket a path in an existing one")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise TargetError(f"cannot create the socket {path}: no permission to write in "
                          f"{directory}; give --socket a path in a writable directory")


def parse_socket_mode(text: str) -> int:
    """An octal mode for the socket, never with bits for others (invariant 11)."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise UsageError(f"invalid --socket-mode {text!r}: give octal digits, e.g. 0660"
                         ) from None
    if mode & ~0o777:
        raise UsageError(f"invalid --socket-mode {text!r}: only permission bits (0-0777)")
    if mode & 0o007:
        raise UsageError(f"--socket-mode {text} would let every user on this machine read "
                         "and write the clone: give the users a group (--socket-owner "
                         "USER:GROUP) and use 0660")
    return mode


def parse_socket_owner(text: str) -> tuple[int, int]:
    """``USER[:GROUP]`` (names or numbers) as (uid, gid); a missing group keeps the
    socket's (-1)."""
    import grp
    import pwd

    user, _, group = text.partition(":")
    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid if user else -1
    except KeyError:
        raise UsageError(f"--socket-owner: no user {user!r} on this machine") from None
    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid if group else -1
    except KeyError:
        raise UsageError(f"--socket-owner: no group {group!r} on this machine") from None
    return uid, gid


def open_listeners(socket_path: str | None, tcp: tuple[str, int] | None,
                   mode: int = 0o600, owner: tuple[int, int] | None = None,
                   clone_path: str | None = None) -> list[Listener]:
    """Bind the unix socket or TCP port now, so a failure leaves nothing behind.
    ``clone_path``: the socket is that clone's default one, so a live server on it
    means the clone is in use (exit 7)."""
    if socket_path is not None:
        check_socket_dir(socket_path)
        try:
            return [listen_unix(socket_path, mode, owner)]
        except FileExistsError as e:
            if e.errno == errno.EADDRINUSE and clone_path is not None:
                raise CloneBusyError(
                    f"the clone {clone_path} is in use: a liveclone server is listening on "
                    f"{socket_path}; stop it first (or use `liveclone status`)") from None
            fix = ("stop it or give another --socket path" if e.errno == errno.EADDRINUSE
                   else "remove it or give another --socket path")
            raise UsageError(f"{e.strerror}: {fix}") from None
        except PermissionError as e:
            raise UsageError(f"cannot give the socket {socket_path} its owner or mode: "
                             f"{e.strerror}; --socket-owner needs root") from None
        except OSError as e:
            raise TargetError(f"cannot create the socket {socket_path}: "
                              f"{e.strerror or e}; give another --socket path") from None
    assert tcp is not None
    host, port = tcp
    try:
        return listen_tcp(host, port)
    except socket.gaierror as e:
        raise UsageError(f"invalid --listen host {host!r}: {e.strerror}") from None
    except OSError as e:
        fix = ("choose another port" if e.errno == errno.EADDRINUSE else
               "give an address of this machine" if e.errno == errno.EADDRNOTAVAIL else
               "choose another address or port")
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}; {fix}") from None


def limits_option(max_connections: int, handshake_limit: float, max_memory: int) -> Limits:
    """The NBD client bounds of --max-connections, --handshake-limit, --max-memory."""
    try:
        return Limits(max_connections, handshake_limit, max_memory)
    except ValueError as e:
        raise UsageError(str(e).replace("max_memory", "--max-memory")) from None


def tls_option(tls_dir: str | None) -> ssl.SSLContext | None:
    """The TLS context of --tls-certificates DIR, or None without it."""
    if tls_dir is None:
        return None
    from liveclone.nbd.server import tls_server_context

    try:
        return tls_server_context(tls_dir)
    except ValueError as e:
        raise UsageError(f"--tls-certificates: {e}") from None


def default_export_name(clone_path: str) -> str:
    name = os.path.basename(clone_path)
    return "" if export_name_problem(name) else name


@click.command("serve")
@click.argument("source")
@click.argument("clone_path", metavar="CLONE")
@click.option("--socket", "socket_path", default=None,
              help="Unix socket to listen on, mode 0600 (default: CLONE.sock).")
@click.option("--socket-owner", default=None, metavar="USER[:GROUP]",
              help="Owner of the unix socket, e.g. libvirt-qemu (libvirt's QEMU user) or "
                   "root:kvm.")
@click.option("--socket-mode", default="0600", show_default=True, metavar="MODE",
              help="Octal mode of the unix socket; never with bits for others (0660 lets "
                   "the socket's group in).")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Listen on TCP instead of a unix socket. ':PORT' listens on 127.0.0.1 "
                   "only; other machines can connect only with an explicit address, such "
                   "as 0.0.0.0:PORT or [::]:PORT (every interface), which warns unless "
                   "--tls-certificates is given: NBD itself has no authentication.")
@click.option("--export-name", default=None,
              help="The export's name (default: CLONE's file name; '' also opens it).")
@click.option("--tls-certificates", "tls_dir", type=click.Path(file_okay=False), default=None,
              help="Require TLS (STARTTLS; clients use nbds://) with DIR/server-cert.pem "
                   "and DIR/server-key.pem, the layout qemu-nbd and nbdkit use.")
@click.option("--read-only", is_flag=True, help="Refuse writes (EPERM).")
@click.option("--mount", "mountpoint", type=click.Path(file_okay=False), default=None,
              help="Also show the clone as the file MOUNTPOINT/<CLONE name> (FUSE), in "
                   "this process: NBD clients and file users share one clone.")
@click.option("--max-connections", type=click.IntRange(min=1),
              default=nbd_limits.DEFAULT_MAX_CONNECTIONS, show_default=True,
              help="Most clients connected at once (fewer if `ulimit -n` leaves no room). "
                   "A newcomer past it closes the oldest connection still negotiating, or "
                   "is refused.")
@click.option("--handshake-limit", type=click.FloatRange(min=0),
              default=nbd_limits.DEFAULT_HANDSHAKE_LIMIT, show_default=True,
              metavar="SECONDS",
              help="Drop a client that has not chosen an export this long after "
                   "connecting (0: never).")
@click.option("--max-memory", type=SIZE, default=nbd_limits.DEFAULT_MAX_MEMORY,
              show_default="64M",
              help="Most memory held for clients' requests and answers, in total (one "
                   "client gets at most a quarter, up to 64M); a client that does not "
                   "read its answers is not read from. At least 4M.")
@poll_option
@region_size_option
@rate_option
@copy_on_read_option
@profile_options(record=True)
def command(source: str, clone_path: str, socket_path: str | None, socket_owner: str | None,
            socket_mode: str, listen: str | None, export_name: str | None,
            tls_dir: str | None, read_only: bool, mountpoint: str | None,
            max_connections: int, handshake_limit: float, max_memory: int,
            poll_max_ns: int, region_size: int | None, rate: int | None, copy_on_read: bool | None,
            profile: ProfileOptions) -> None:
    """Serve CLONE over NBD at once, copying SOURCE into it in the background.

    Prints the NBD URI on stdout as soon as clients can connect. Reads of regions
    not yet copied come from SOURCE; writes go to CLONE and are never overwritten
    by the copier. The export stays up after the copy completes; a complete clone
    can be served again without its source. Ctrl-C or SIGTERM commits the map and
    exits 0.

    Every argument is checked, and the socket bound, before the clone is created:
    a command that fails to start leaves nothing behind.
    """
    if socket_path is not None and listen is not None:
        raise UsageError("give --socket or --listen, not both")
    mode = parse_socket_mode(socket_mode)
    owner = parse_socket_owner(socket_owner) if socket_owner is not None else None
    if listen is not None and (owner is not None or mode != 0o600):
        raise UsageError("--socket-owner and --socket-mode are for the unix socket, not "
                         "--listen")
    tcp = parse_listen(listen) if listen is not None else None
    default_socket = tcp is None and socket_path is None
    if tcp is None:
        socket_path = os.path.abspath(socket_path if socket_path is not None
                                      else clone_path + SOCKET_SUFFIX)
    name = default_export_name(clone_path) if export_name is None else export_name
    why = export_name_problem(name)
    if why:
        raise UsageError(f"invalid --export-name {name!r}: {why}")
    limits = limits_option(max_connections, handshake_limit, max_memory)
    tls = tls_option(tls_dir)
    if mountpoint is not None:
        check_mountpoint(mountpoint)
    listeners = open_listeners(socket_path, tcp, mode, owner,
                               os.path.abspath(clone_path) if default_socket else None)
    try:
        if tcp is not None:
            warning = exposure_warning(*tcp, tls=tls is not None)
            if warning:
                click.echo(f"liveclone: {warning}", err=True)
        with stop_on_signals() as stop:
            from liveclone.session import CloneSession

            # The clone is opened or made (files written, fsynced) in a thread while
            # this one imports the NBD server: the one waits on the disk, the other
            # on the CPU. Started (copier and all) by _serve once clients can
            # connect: the first read must not wait behind the copier.
            opening = Background(partial(CloneSession, source, clone_path, region_size, rate,
                                         copy_on_read=copy_on_read, profile=profile))
            try:
                from liveclone import eventloop
                from liveclone.nbd.server import NBDServer

                new_loop = eventloop.loop_factory()  # imports uvloop, beside the opening too
            except BaseException:
                opening.discard(CloneSession.close)
                raise
            session = opening.result()
            try:
                server = NBDServer(session.clone, export_name=name, read_only=read_only,
                                   tls=tls, limits=limits, poll_max_ns=poll_max_ns)
                eventloop.run(_serve(session, server, stop, listeners, read_only, mountpoint),
                              new_loop)
            finally:
                session.close()
    finally:
        for listener in listeners:  # the server has closed them; a failed start has not
            listener.close()
    clone = session.clone
    click.echo(f"liveclone: stopped serving {clone.path} at {clone.regions_present}/"
               f"{clone.regions_total} regions; the map is committed", err=True)


class Background(Generic[T]):
    """``make()`` run in a thread of its own, started at once; ``result()`` waits for
    it and returns what it made or raises what it raised. (A shorter switch
    interval while it runs, 0.5 ms, measured 10% slower on a busy machine: the
    importing thread gives up the GIL at each file it reads anyway.)"""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="opening", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._make()
        except BaseException as e:
            self._error = e

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

    def discard(self, close: Callable[[T], object]) -> None:
        """Wait for it and undo it: ``close`` what it made. For a caller that is
        already failing: its error is the one to report, so this one's are dropped."""
        self._thread.join()
        if self._value is not None:
            with contextlib.suppress(Exception):
                close(self._value)


async def _serve(session: CloneSession, server: NBDServer, stop: threading.Event,
                 listeners: list[Listener], read_only: bool, mountpoint: str | None) -> None:
    import asyncio

    from liveclone.core.copier import Phase

    mount = None
    try:
        uris = await server.start(listeners=listeners)
        if mountpoint is not None:
            from liveclone.fuse.mount import start_mount

            # direct_io: NBD writes change the clone behind the kernel's back, so the
            # mount must not keep pages in the page cache.
            mount = await asyncio.get_running_loop().run_in_executor(
                None, partial(start_mount, session.clone, mountpoint, read_only=read_only,
                              direct_io=True))
            click.echo(f"liveclone: the clone is also the file {mount.path}", err=True)
        print(uris[0], flush=True)  # the one line on stdout; scripts wait for it
        # The copier starts after the first status round (STATUS_EVERY): a client
        # that connected at once is answered first, without copier threads taking
        # the GIL from this loop at every turn of its handshake.
        session.start_status()
        clone = session.clone
        click.echo(f"liveclone: serving {clone.path} ({format_size(clone.size)}) at {uris[0]}",
                   err=True)
        if server.export.name and uris[0].startswith("nbd+unix://"):
            # libguestfs (guestfish -a, virt-*) takes its own form of the same address.
            sock = uris[0].partition("?socket=")[2]
            click.echo(f"liveclone: for guestfish and virt-* tools: "
                       f"nbd:///{server.export.name}?socket={sock}", err=True)
        reported = -1  # last progress decile printed
        failure_shown = False  # a copy failure was printed (and has not cleared)
        while not stop.is_set():
            stats = server.stats
            session.extra_status["nbd"] = {
                "uris": list(server.uris), "read_only": read_only,
                "connections": stats.active, "requests": stats.requests,
                "rejected": stats.rejected, "errors": stats.errors,
                "refused": stats.refused, "evicted": stats.evicted,
                "timed_out": stats.timed_out, "stalled": stats.stalled,
                "memory": server.memory,
                "memory_peak": stats.memory_peak,
                # Of the requests, answered in C (nbd/lane.py), and of those, from a
                # poll before the loop slept (nbd/poll.py, --poll-max-ns).
                "lane": stats.lane, "polled": stats.polled,
            }
            decile = clone.regions_present * 10 // max(1, clone.regions_total)
            if decile != reported:
                reported = decile
                if clone.complete:
                    click.echo("liveclone: copy complete; still serving", err=True)
                else:
                    click.echo(f"liveclone: copying, {decile * 10}% present", err=True)
            failed = session.copier.phase == Phase.FAILED
            if failed and not failure_shown:
                click.echo(f"liveclone: copy failed: {session.copier.error}; "
                           "still serving the copied regions and the source", err=True)
            elif failure_shown and not failed:
                click.echo("liveclone: the copy resumed", err=True)
            failure_shown = failed
            await asyncio.sleep(STATUS_EVERY)
            session.start_copy()
    finally:
        if mount is not None:
            await asyncio.get_running_loop().run_in_executor(None, mount.stop)
        await server.stop()
