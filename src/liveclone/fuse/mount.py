"""A FUSE mount where a clone appears as one regular file, served by its ``Clone``.

The filesystem holds a root directory with a single file, ``<clone file name>``,
whose bytes are the clone's (source ⊕ writes, DESIGN invariant 3). Reads,
writes and fsync go to the same thread-safe ``Clone`` the copier fills; each
call runs in a worker thread (``trio.to_thread.run_sync``) so the trio loop
that pyfuse3 drives keeps taking requests while one waits on the source.

Page cache. Files are opened with ``keep_cache`` and without ``direct_io``, so
the kernel page cache serves repeated reads. That is safe because the file's
content never changes behind the kernel's back: the copier only moves bytes
from the source into the clone file, which leaves the visible content as it
was, and every write comes through this mount, where the kernel updates its
cache itself. A process that also writes the clone by another route (an NBD
export in the same process) must call :meth:`MountHandle.invalidate` after
such writes. ``O_DIRECT`` opens bypass the cache in the kernel, as usual.

Writes are write-through (no FUSE writeback cache): a ``write()`` returns once
the clone has it, like a disk with a volatile cache; ``fsync``/``fdatasync``
are the FLUSH that commits data then map (invariant 6).

fallocate: pyfuse3 (3.5) does not expose FUSE's fallocate operation, so
``fallocate --punch-hole`` / ``--zero-range`` on the file fail with EOPNOTSUPP
and leave the data alone. Discards reach the clone through NBD instead.

pyfuse3 keeps its session in module globals, so one process can hold one mount
at a time; :func:`start_mount` refuses a second.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from liveclone.core.clone import Clone
from liveclone.errors import UsageError

ROOT_INODE = pyfuse3.ROOT_INODE
FILE_INODE = ROOT_INODE + 1

T = TypeVar("T")
log = logging.getLogger(__name__)

_active_lock = threading.Lock()
_active: MountHandle | None = None


class CloneFS(pyfuse3.Operations):
    """One directory, one file: the clone."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, clone: Clone, name: str, read_only: bool) -> None:
        super().__init__()
        self.clone = clone
        self.name = name.encode()
        self.read_only = read_only
        self.started = time.time_ns()
        self._mtime = self.started
        self.reads = 0
        self.writes = 0
        self.last_error: str | None = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking clone call in a worker thread. Every failure becomes a
        FUSEError: any other exception would end pyfuse3's main loop and leave the
        kernel's request unanswered."""
        try:
            return await trio.to_thread.run_sync(fn, *args)
        except OSError as e:
            self.last_error = f"{getattr(fn, '__name__', fn)}: {e}"
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception as e:
            self.last_error = f"{getattr(fn, '__name__', fn)}: {e!r}"
            log.exception("clone call failed")
            raise pyfuse3.FUSEError(errno.EIO) from None

    # -- metadata -----------------------------------------------------------------

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid = os.getuid()
        a.st_gid = os.getgid()
        a.st_atime_ns = a.st_ctime_ns = self.started
        a.st_mtime_ns = self._mtime
        a.st_blksize = 4096
        if inode == ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
        elif inode == FILE_INODE:
            a.st_mode = stat.S_IFREG | (0o444 if self.read_only else 0o644)
            a.st_nlink = 1
            a.st_size = self.clone.size
            a.st_blocks = (self.clone.size + 511) // 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        # The size never changes; let the kernel keep attributes a while.
        a.attr_timeout = 60.0
        a.entry_timeout = 60.0
        return a

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INODE and name == self.name:
            return self._attr(FILE_INODE)
        if parent_inode == ROOT_INODE and name in (b".", b".."):
            return self._attr(ROOT_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        if fields.update_size and (inode != FILE_INODE or attr.st_size != self.clone.size):
            # A disk image has a fixed size; O_TRUNC and ftruncate cannot change it.
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mtime:
            self._mtime = attr.st_mtime_ns
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ROOT_INODE

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attr(FILE_INODE), 1)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (self.clone.size + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = 2
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- data ----------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if self.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & os.O_TRUNC and self.clone.size:
            raise pyfuse3.FUSEError(errno.EPERM)
        return pyfuse3.FileInfo(fh=FILE_INODE, keep_cache=True, direct_io=False)

    async def read(self, fh: int, off: int,  # type: ignore[override]
                   size: int) -> bytes | bytearray:
        end = min(off + size, self.clone.size)
        if end <= off:
            return b""
        self.reads += 1
        return await self._call(self.clone.read, off, end - off)  # pyfuse3 takes any buffer

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not buf:
            return 0
        if off >= self.clone.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        n = min(len(buf), self.clone.size - off)
        self.writes += 1
        await self._call(self.clone.write, off, memoryview(buf)[:n])
        self._mtime = time.time_ns()
        return n

    async def fsync(self, fh: int, datasync: bool) -> None:
        if not self.read_only:
            await self._call(self.clone.flush)

    async def flush(self, fh: int) -> None:
        pass  # close(): nothing to do; durability is fsync's job

    async def release(self, fh: int) -> None:
        pass


class MountHandle:
    """A mount running its FUSE loop in a background thread. ``stop()`` unmounts."""

    def __init__(self, clone: Clone, mountpoint: str, read_only: bool,
                 name: str | None, allow_other: bool) -> None:
        self.clone = clone
        self.mountpoint = os.path.abspath(mountpoint)
        self.name = name or os.path.basename(clone.path)
        self.path = os.path.join(self.mountpoint, self.name)
        self.fs = CloneFS(clone, self.name, read_only)
        self._options = {"fsname=liveclone", "subtype=liveclone",
                         "default_permissions"}
        if read_only:
            self._options.add("ro")
        if allow_other:
            self._options.add("allow_other")
        self._ready = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=self._run, name="fuse", daemon=True)

    def _run(self) -> None:
        global _active
        mounted = False
        try:
            pyfuse3.init(self.fs, self.mountpoint, self._options)
            mounted = True
            trio.run(self._main)
        except BaseException as e:  # reported by start() or stop()
            self._error = e
        finally:
            try:
                if mounted:
                    pyfuse3.close(unmount=True)
            finally:
                with _active_lock:
                    _active = None
                self._done.set()
                self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._ready.set()
        await pyfuse3.main()

    def start(self) -> MountHandle:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise UsageError(f"cannot mount FUSE on {self.mountpoint}: {self._error}")
        return self

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the mount ends (``stop()`` or an outside ``fusermount3 -u``)."""
        return self._done.wait(timeout)

    def invalidate(self) -> None:
        """Drop the kernel's cached pages of the file, after writes by another route."""
        if self.running:
            pyfuse3.invalidate_inode(FILE_INODE, attr_only=False)

    def stop(self) -> None:
        """Leave the FUSE loop and unmount. Blocks until done; safe to call twice."""
        token = self._token
        if not self._done.is_set() and token is not None:
            try:
                trio.from_thread.run_sync(pyfuse3.terminate, trio_token=token)
            except trio.RunFinishedError:
                pass
        self._thread.join()
        err, self._error = self._error, None
        if err is not None and not isinstance(err, trio.Cancelled):
            raise err


def start_mount(clone: Clone, mountpoint: str, read_only: bool = False,
                name: str | None = None, allow_other: bool = False) -> MountHandle:
    """Mount ``clone`` as ``mountpoint/<name>`` (default: the clone file's name) and
    serve it from a background thread. Returns once the mount is usable."""
    global _active
    try:
        st = os.stat(mountpoint)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise UsageError(f"{mountpoint} is a stale FUSE mount (its process died); "
                             f"run `fusermount3 -u -z {mountpoint}` and retry") from None
        raise UsageError(f"mount point {mountpoint}: {e.strerror}; create it first") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is already a mount point: stop the process serving "
                         "it, or if that process died, run "
                         f"`fusermount3 -u -z {mountpoint}`")
    with _active_lock:
        if _active is not None:
            raise UsageError("this process already serves a FUSE mount (pyfuse3 allows one)")
        handle = MountHandle(clone, mountpoint, read_only, name, allow_other)
        _active = handle
    try:
        return handle.start()
    except BaseException:
        with _active_lock:
            if _active is handle:
                _active = None
        raise
