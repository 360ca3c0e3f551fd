"""``liveclone serve``: export a clone over NBD while it is still being copied."""

from __future__ import annotations

import asyncio
import os
import threading
from functools import partial
from typing import TYPE_CHECKING

import click

from liveclone.cli.options import (
    copy_on_read_option,
    rate_option,
    region_size_option,
    stop_on_signals,
)
from liveclone.core.copier import Phase
from liveclone.errors import UsageError
from liveclone.nbd.protocol import export_name_problem
from liveclone.nbd.server import NBDServer, tls_server_context
from liveclone.session import CloneSession
from liveclone.units import format_size

if TYPE_CHECKING:
    import ssl

SOCKET_SUFFIX = ".sock"
STATUS_EVERY = 0.2  # seconds between status updates; also how soon a signal stops us


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (every interface)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"invalid --listen {text!r}: use HOST:PORT, e.g. 127.0.0.1:10809")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def default_export_name(clone_path: str) -> str:
    name = os.path.basename(clone_path)
    return "" if export_name_problem(name) else name


@click.command("serve")
@click.argument("source")
@click.argument("clone_path", metavar="CLONE")
@click.option("--socket", "socket_path", default=None,
              help="Unix socket to listen on, mode 0600 (default: CLONE.sock).")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Listen on TCP instead of a unix socket. NBD has no authentication: "
                   "prefer a loopback address.")
@click.option("--export-name", default=None,
              help="The export's name (default: CLONE's file name; '' also opens it).")
@click.option("--tls-certificates", "tls_dir", type=click.Path(file_okay=False), default=None,
              help="Require TLS (STARTTLS; clients use nbds://) with DIR/server-cert.pem "
                   "and DIR/server-key.pem, the layout qemu-nbd and nbdkit use.")
@click.option("--read-only", is_flag=True, help="Refuse writes (EPERM).")
@click.option("--mount", "mountpoint", type=click.Path(file_okay=False), default=None,
              help="Also show the clone as the file MOUNTPOINT/<CLONE name> (FUSE), in "
                   "this process: NBD clients and file users share one clone.")
@region_size_option
@rate_option
@copy_on_read_option
def command(source: str, clone_path: str, socket_path: str | None, listen: str | None,
            export_name: str | None, tls_dir: str | None, read_only: bool,
            mountpoint: str | None, region_size: int | None, rate: int | None,
            copy_on_read: bool | None) -> None:
    """Serve CLONE over NBD at once, copying SOURCE into it in the background.

    Prints the NBD URI on stdout as soon as clients can connect. Reads of regions
    not yet copied come from SOURCE; writes go to CLONE and are never overwritten
    by the copier. The export stays up after the copy completes; a complete clone
    can be served again without its source. Ctrl-C or SIGTERM commits the map and
    exits 0.
    """
    if socket_path is not None and listen is not None:
        raise UsageError("give --socket or --listen, not both")
    tcp = parse_listen(listen) if listen is not None else None
    if tcp is None and socket_path is None:
        socket_path = os.path.abspath(clone_path) + SOCKET_SUFFIX
    name = default_export_name(clone_path) if export_name is None else export_name
    why = export_name_problem(name)
    if why:
        raise UsageError(f"invalid --export-name {name!r}: {why}")
    tls = None
    if tls_dir is not None:
        try:
            tls = tls_server_context(tls_dir)
        except ValueError as e:
            raise UsageError(f"--tls-certificates: {e}") from None
    with stop_on_signals() as stop:
        # Started (copier and all) by _serve once clients can connect: the first
        # read must not wait behind the copier's start.
        session = CloneSession(source, clone_path, region_size, rate,
                               copy_on_read=copy_on_read)
        try:
            asyncio.run(_serve(session, stop, socket_path, tcp, name, read_only, mountpoint,
                               tls))
        finally:
            session.close()
    clone = session.clone
    click.echo(f"liveclone: stopped serving {clone.path} at {clone.regions_present}/"
               f"{clone.regions_total} regions; the map is committed", err=True)


async def _serve(session: CloneSession, stop: threading.Event, socket_path: str | None,
                 tcp: tuple[str, int] | None, name: str, read_only: bool,
                 mountpoint: str | None, tls: ssl.SSLContext | None) -> None:
    server = NBDServer(session.clone, export_name=name, read_only=read_only, tls=tls)
    mount = None
    try:
        try:
            uris = await server.start(unix_path=socket_path, tcp=tcp)
        except OSError as e:
            where = socket_path if socket_path is not None else f"{tcp}"
            raise UsageError(f"cannot listen on {where}: {e.strerror or e}") from None
        if mountpoint is not None:
            from liveclone.fuse.mount import start_mount

            # direct_io: NBD writes change the clone behind the kernel's back, so the
            # mount must not keep pages in the page cache.
            mount = await asyncio.get_running_loop().run_in_executor(
                None, partial(start_mount, session.clone, mountpoint, read_only=read_only,
                              direct_io=True))
            click.echo(f"liveclone: the clone is also the file {mount.path}", err=True)
        print(uris[0], flush=True)  # the one line on stdout; scripts wait for it
        session.start()
        clone = session.clone
        click.echo(f"liveclone: serving {clone.path} ({format_size(clone.size)}) at {uris[0]}",
                   err=True)
        reported = -1  # last progress decile printed
        while not stop.is_set():
            stats = server.stats
            session.extra_status["nbd"] = {
                "uris": list(server.uris), "read_only": read_only,
                "connections": stats.active, "requests": stats.requests,
                "rejected": stats.rejected, "errors": stats.errors,
            }
            decile = clone.regions_present * 10 // max(1, clone.regions_total)
            if decile != reported:
                reported = decile
                if clone.complete:
                    click.echo("liveclone: copy complete; still serving", err=True)
                else:
                    click.echo(f"liveclone: copying, {decile * 10}% present", err=True)
            if session.copier.phase == Phase.FAILED and reported != -2:
                click.echo(f"liveclone: copy failed: {session.copier.error}; "
                           "still serving the copied regions and the source", err=True)
                reported = -2
            await asyncio.sleep(STATUS_EVERY)
    finally:
        if mount is not None:
            await asyncio.get_running_loop().run_in_executor(None, mount.stop)
        await server.stop()
