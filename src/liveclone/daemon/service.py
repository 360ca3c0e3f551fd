"""The daemon process: logging, sockets, the clones, and an orderly stop.

Start-up order, so a restart after ``kill -9`` is seamless for clients:

1. lock the state directory (one daemon per directory) and bind every socket (the
   API's, mode 0600, and the NBD socket or TCP port): a daemon that cannot start
   fails here, having made nothing;
2. open the cache and the FUSE directory (a mount left stale by a killed daemon
   is detached first);
3. serve every recorded clone again (``Manager.restore``), then start answering
   on the NBD socket: a client reconnecting meanwhile (QEMU's reconnect-delay)
   waits in the socket's backlog and then finds its export, never "unknown";
4. answer the API, and tell systemd READY=1 (``Type=notify``).

SIGTERM or SIGINT stops it: the API closes, every clone's export goes and its map
is committed, the FUSE directory is unmounted. Records stay for the next start.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("liveclone.daemon")


@dataclass
class Options:
    state_dir: str
    api: str
    nbd_socket: str | None
    listen: tuple[str, int] | None
    tls: Any  # ssl.SSLContext or None
    mount: str | None
    cache_dir: str | None  # None: no cache
    cache_size: int | None
    max_copiers: int
    rate: int | None
    limits: Any  # nbd.limits.Limits
    poll_max_ns: int  # nbd/poll.py; 0: never poll


class JournalFormatter(logging.Formatter):
    """One line per message. Under systemd (JOURNAL_STREAM names our stderr) each line
    starts with its syslog priority, ``<3>`` .. ``<7>``, which journald reads as the
    level; elsewhere the level is written out. journald adds the time itself."""

    PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
                logging.DEBUG: 7}

    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        if self.journald:
            prio = self.PRIORITY.get(record.levelno, 6)
            return f"<{prio}>{text}"
        return f"liveclone daemon: {record.levelname.lower()}: {text}"


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(_stderr_is_journal()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return bool(stream) and f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) how we are; nothing without NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError as e:
        log.warning("cannot notify systemd: %s", e)


def _detach_stale_mount(mountpoint: str) -> None:
    """A FUSE directory left by a daemon that was killed: detach it, so this one can
    mount there again."""
    try:
        os.stat(mountpoint)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            return
        log.warning("%s is a stale FUSE mount (the previous daemon died): detaching it",
                    mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False,
                       capture_output=True)


def run(opts: Options) -> None:
    """Run the daemon until SIGTERM or SIGINT. Raises LivecloneError if it cannot start."""
    from liveclone import eventloop
    from liveclone.cli.serve import open_listeners
    from liveclone.daemon.records import StateDir
    from liveclone.errors import TargetError, UsageError
    from liveclone.nbd.listeners import bind_unix

    state = StateDir(opts.state_dir)
    closers: list[Any] = [state.close]
    try:
        api_dir = os.path.dirname(opts.api)
        try:
            os.makedirs(api_dir, mode=0o755, exist_ok=True)
            if opts.nbd_socket is not None:
                os.makedirs(os.path.dirname(opts.nbd_socket), mode=0o755, exist_ok=True)
        except OSError as e:
            raise TargetError(f"cannot create {e.filename}: {e.strerror}") from None
        try:
            api_sock = bind_unix(opts.api, 0o600)
        except FileExistsError as e:
            raise UsageError(f"the API socket {opts.api}: {e.strerror}; stop the daemon "
                             "using it, or give another --api path") from None
        except OSError as e:
            raise TargetError(f"cannot create the API socket {opts.api}: {e.strerror}") from None
        closers.append(lambda: _unlink_socket(api_sock, opts.api))
        listeners = open_listeners(opts.nbd_socket, opts.listen)
        closers.extend(listener.close for listener in listeners)
        cache = None
        if opts.cache_dir is not None:
            from liveclone.sources.cache import SourceCache

            cache = SourceCache(opts.cache_dir, opts.cache_size)
            closers.append(cache.close)
        mount = None
        if opts.mount is not None:
            from liveclone.fuse.mount import start_dir_mount

            _detach_stale_mount(opts.mount)
            mount = start_dir_mount(opts.mount)
            closers.append(mount.stop)
            log.info("clones appear as files in %s", opts.mount)
        eventloop.run(_main(opts, state, api_sock, listeners, cache, mount))
    finally:
        for close in reversed(closers):
            try:
                close()
            except Exception:  # noqa: BLE001 - stopping: say it, go on
                log.exception("while stopping")


def _unlink_socket(sock: socket.socket, path: str) -> None:
    sock.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def _main(opts: Options, state: Any, api_sock: socket.socket, listeners: list[Any],
                cache: Any, mount: Any) -> None:
    from aiohttp import web

    from liveclone.daemon.api import make_app
    from liveclone.daemon.copiers import CopierPool
    from liveclone.daemon.events import EventBus
    from liveclone.daemon.manager import Manager
    from liveclone.daemon.metrics import Metrics
    from liveclone.nbd.server import NBDServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = NBDServer(tls=opts.tls, limits=opts.limits, poll_max_ns=opts.poll_max_ns)
    bus = EventBus()
    pool = CopierPool(opts.max_copiers, opts.rate)
    manager = Manager(state, server, bus, pool, mount=mount, cache=cache)
    metrics = Metrics(manager)
    runner = web.AppRunner(make_app(manager, metrics, bus), access_log=None,
                           handle_signals=False)
    # What the first POST would otherwise import while its client waits (qemu-img
    # format detection alone is about 0.3 s of imports on a loaded machine).
    import liveclone.sources.image  # noqa: F401
    import liveclone.sources.local  # noqa: F401
    try:
        await manager.restore()
        uris = await server.start(listeners=listeners)
        manager.start_watching()
        await runner.setup()
        await web.SockSite(runner, api_sock).start()
        log.info("serving %d clone(s); API on %s, NBD on %s", len(manager.clones), opts.api,
                 uris[0] if uris else "?")
        sd_notify("READY=1")
        await stop.wait()
        log.info("stopping: committing every clone's map")
        sd_notify("STOPPING=1")
    finally:
        bus.close()
        await runner.cleanup()
        await manager.close()
        await server.stop()
        await loop.run_in_executor(None, pool.close)  # after every copier has stopped
