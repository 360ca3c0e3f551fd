"""Listening sockets for the NBD server, and the URIs that name them.

Kept apart from ``nbd/server.py`` (asyncio) so that ``liveclone serve`` binds its
socket before it imports anything slow: a failed bind leaves nothing behind, and a
client may connect while the rest starts.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

# What urllib.parse.quote never changes (its always-safe characters).
_UNQUOTED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")


def quote(text: str, safe: str = "") -> str:
    """``urllib.parse.quote(text, safe)``; a text it would leave as it is (most
    paths and export names) is returned without importing urllib.parse, which
    imports ipaddress: 3-5 ms of a server's start."""
    if _UNQUOTED.union(safe).issuperset(text):
        return text
    from urllib.parse import quote as urllib_quote

    return urllib_quote(text, safe=safe)


def unix_uri(path: str, name: str, tls: bool = False) -> str:
    scheme = "nbds+unix" if tls else "nbd+unix"
    return f"{scheme}:///{quote(name, safe='')}?socket={quote(path, safe='/')}"


def tcp_uri(host: str, port: int, name: str, tls: bool = False) -> str:
    if ":" in host:
        host = f"[{host}]"
    return f"{'nbds' if tls else 'nbd'}://{host}:{port}/{quote(name, safe='')}"


class Listener:
    """A bound, listening socket; ``path`` is a unix socket's, unlinked at stop."""

    __slots__ = ("sock", "path")

    def __init__(self, sock: socket.socket, path: str | None = None) -> None:
        self.sock = sock
        self.path = path

    def uri(self, name: str, tls: bool) -> str:
        if self.path is not None:
            return unix_uri(self.path, name, tls)
        host, port = self.sock.getsockname()[:2]
        return tcp_uri(host, port, name, tls)

    def close(self) -> None:
        """Close the socket and remove a unix socket's file (for a caller that
        bound it and then could not start the server)."""
        self.sock.close()
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def listen_unix(path: str, mode: int = 0o600, owner: tuple[int, int] | None = None
                ) -> Listener:
    path = os.path.abspath(path)
    return Listener(bind_unix(path, mode, owner), path)


def listen_tcp(host: str, port: int) -> list[Listener]:
    """Listening sockets for every address ``host`` resolves to (as asyncio's
    create_server binds them). Raises OSError (EADDRINUSE, EACCES, a bad name)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    out: list[Listener] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            out.append(Listener(sock))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
            if port == 0:  # every address on the port the first one got
                port = sock.getsockname()[1]
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
    except BaseException:
        for listener in out:
            listener.sock.close()
        raise
    return out


def bind_unix(path: str, mode: int = 0o600,
              owner: tuple[int, int] | None = None) -> socket.socket:
    """A listening unix socket at ``path``, with ``mode`` (0600 by default) and
    ``owner`` (uid, gid; -1 keeps one) from the first moment.

    It is bound inside a fresh 0700 directory beside ``path``, given its mode and
    owner there, and renamed into place, so no one else can connect in between,
    and the process umask is left alone. A stale socket at ``path`` (nobody
    listening) is replaced; a live one or a non-socket is an error. ``mode`` never
    has bits for others (invariant 11): the caller checks.
    """
    assert not mode & 0o007, "a socket is never world-accessible"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket", path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale: replace it
        else:
            raise FileExistsError(errno.EADDRINUSE,
                                  f"{path} is in use by a running server", path)
        finally:
            probe.close()
    # A private directory, as tempfile.mkdtemp makes (tempfile would import shutil,
    # bz2, lzma and random on the way to a first read): 0700, a name nobody guesses.
    tmpdir = os.path.join(os.path.dirname(path), f".lc{os.getpid()}-{os.urandom(8).hex()}")
    os.mkdir(tmpdir, 0o700)
    tmp = os.path.join(tmpdir, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, mode)
        if owner is not None:
            os.chown(tmp, *owner)
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
