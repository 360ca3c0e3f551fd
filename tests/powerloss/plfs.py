"""plfs: a FUSE file system that simulates power loss, for crash tests.

Run ``python tests/powerloss/plfs.py BACKING_DIR MOUNTPOINT [--seed N]``, or from a
test use :func:`powerloss_mount`, which runs that command as a separate process.

The model (after LazyFS and SQLite's crash tests):

* ``BACKING_DIR`` holds the *durable* state: what would be on the disk.
* Namespace operations (create, mknod, mkdir, unlink, rmdir, rename, link,
  symlink, chmod, chown, utimens) go to the backing directory at once: they are
  durable as soon as they return.
* File data is not. ``write``, size changes (``truncate``/``ftruncate``, ``O_TRUNC``,
  writes past the end, ``fallocate`` without ``KEEP_SIZE``) and
  ``fallocate(PUNCH_HOLE | ZERO_RANGE)`` are kept in memory, per backing inode, as
  dirty 4 KiB pages plus a pending size. Reads see them: durable bytes, cut or
  extended to the pending size, with the dirty pages laid over them.
* Only ``fsync``/``fdatasync`` of a file (either) writes that file's dirty pages
  and size to the backing file (then ``fsync`` s it). ``close`` does not, and nor
  does ``sync(2)``/``syncfs(2)``: the kernel sends no request for those.
* The control file ``/.plfs-ctl`` (not listed by readdir) takes commands, one a
  line, each done before the ``write`` returns:

  ``cut [p=P] [seed=N]``
      A power cut. For every file, each dirty page independently reaches the
      backing file with probability ``P`` (default 0.5, or ``--p``), or is lost; a
      pending size change reaches it with the same probability. A page is written
      whole or not at all, clipped to the size the file ends up with. Then all
      in-memory state is dropped, ``freeze`` ends, and the mount shows exactly the
      durable state. The coins come from ``random.Random("SEED:CUT:PATH")``: a
      workload that does the same thing gets the same cut.
  ``sync``
      Write every file's dirty state, as ``fsync`` would.
  ``freeze`` / ``unfreeze``
      While frozen, every operation that would change a file or the namespace
      fails with EIO (reads still work): stops stray processes between a kill and
      the cut. ``cut`` unfreezes.

  Reading the control file returns a JSON object of counters (see
  ``PowerLossFS.stats``).

Kernel caches: every file is opened with ``direct_io`` (no page cache, so a read
after a cut cannot see pages from before it), and attribute, entry and negative
timeouts are 0 (``stat`` after a cut shows the durable size). ``direct_io`` files
cannot be mapped shared (ENODEV); with ``--no-direct-io`` they can, the kernel
caches pages, and a cut ends by invalidating the cache of every file opened so far
(``fuse_invalidate_path``).

Dirty state is keyed by the backing inode (device, inode number) and holds an
open descriptor of the backing file, so it follows renames and hard links, and
an inode number cannot be reused while state for it is held. A file whose last
name goes away loses its state when its last handle closes. The mount uses
libfuse's ``hard_remove``: without it, libfuse "hides" a file renamed over while
open by a rename of its own before the real one, and a cut between those two
requests lost the target's name (rename(2) is one atomic step on a real disk).
The price: ``fstat`` of an open file that has lost its last name gets ESTALE.
(Hidden names, if a libfuse still makes them, go to a stash directory next to the
backing directory, ``.<name>.plfs-hidden``, never in the durable namespace.)

What the kernel does on this mount (checked by ``test_plfs.py``, Linux 6.x,
libfuse 3.14):

* ``O_DIRECT`` opens (also the reopen through ``/proc/self/fd``) work, with no
  alignment rule; the I/O is ordinary unsynced data.
* ``SEEK_DATA``/``SEEK_HOLE``: no ``lseek`` op, so the kernel's default: all data
  (``SEEK_DATA`` returns the offset, ``SEEK_HOLE`` the size).
* ``copy_file_range`` within the mount: the kernel falls back to read + write
  (unsynced data, as it should be); across file systems: EXDEV. ``FICLONERANGE``:
  EOPNOTSUPP. ``sendfile``/``splice`` work.
* ``flock`` and ``fcntl`` locks are the kernel's local locks (no lock ops).
* ``posix_fallocate``/``fallocate`` mode 0 reserve space in the backing file at
  once (invisible to reads) and make the size change pending, like any other.
* ``MAP_SHARED`` of a ``direct_io`` file: ENODEV; ``MAP_PRIVATE`` works.

Limitations: ``st_blocks`` is the backing file's (durable) count; ``sync(2)``
and ``syncfs(2)`` do nothing here; a descriptor kept open across a cut reads the
durable state, but an ``O_APPEND`` write through it uses the kernel's idea of the
size from before the cut until something stats the file (processes are meant to
be dead by the cut); every dirty page costs about 4.1 KiB of memory, punched and
zeroed pages about 100 bytes; xattrs are not supported (EOPNOTSUPP).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import itertools
import json
import logging
import os
import random
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

# mfusepy looks up "fuse" (libfuse2 where grub or libguestfs installed it) before
# "fuse3"; this filesystem is written for libfuse3. Set only for the import, so
# child processes of the importer do not inherit it.
_saved = os.environ.get("FUSE_LIBRARY_NAME")
os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
try:
    import mfusepy
finally:
    if _saved is None:
        del os.environ["FUSE_LIBRARY_NAME"]
    else:
        os.environ["FUSE_LIBRARY_NAME"] = _saved

T = TypeVar("T")
log = logging.getLogger("plfs")

PAGE = 4096
CTL_NAME = ".plfs-ctl"
CTL_PATH = "/" + CTL_NAME
HIDDEN_PREFIX = ".fuse_hidden"  # libfuse's name for open files that lost their name
STASH_NAME = ".plfs-hidden"  # where they go, if not next to the backing directory
_CTL_INO = 0x7FFF_FFFF_FFFF_FFF0

# fallocate(2) modes (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# renameat2(2) flags.
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
# utimensat(2) special nanosecond values.
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_ZERO_PAGE = bytes(PAGE)  # a zero-range page; compared by identity
_HOLE = None  # a punched page

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if length > 0 and _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@functools.cache
def _fuse3() -> ctypes.CDLL:
    """libfuse 3, for the two calls mfusepy does not wrap (same library it loaded)."""
    name = os.environ.get("FUSE_LIBRARY_NAME", "fuse3")
    lib = ctypes.CDLL(ctypes.util.find_library(name) or "libfuse3.so.3")
    lib.fuse_get_context.restype = ctypes.POINTER(ctypes.c_void_p)  # struct fuse * first
    lib.fuse_get_context.argtypes = []
    lib.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.fuse_invalidate_path.restype = ctypes.c_int
    return lib


def _fail(code: int) -> mfusepy.FuseOSError:
    return mfusepy.FuseOSError(code)


class Inode:
    """One backing file that is open through the mount or has unsynced state.

    ``pages`` maps a page index to its full visible content: 4096 bytes (zero
    past ``size``), ``_ZERO_PAGE`` for a zeroed page, or ``_HOLE`` for a punched
    one. ``size`` is the pending size (None: the durable size). ``floor`` is the
    smallest size the file was cut to since the last sync: durable bytes from
    there on are no longer visible (None: no cut below the durable size)."""

    __slots__ = ("key", "fd", "path", "opens", "pages", "size", "floor", "mtime_ns")

    def __init__(self, key: tuple[int, int], fd: int, path: str) -> None:
        self.key = key
        self.fd = fd  # read-write where possible; owned by this object
        self.path = path  # last name seen: for messages and the cut's coins
        self.opens = 0
        self.pages: dict[int, bytes | None] = {}
        self.size: int | None = None
        self.floor: int | None = None
        self.mtime_ns: int | None = None

    @property
    def dirty(self) -> bool:
        return bool(self.pages) or self.size is not None or self.floor is not None

    def clear(self) -> None:
        self.pages = {}
        self.size = self.floor = self.mtime_ns = None


class CtlHandle:
    """An open control file: reads return the stats as they were at open (or at
    this handle's last command)."""

    def __init__(self, snapshot: bytes) -> None:
        self.snapshot = snapshot


def _op(fn: Callable[..., T]) -> Callable[..., T]:
    """OSError → its errno; anything else is logged, counted and answered with EIO
    (mfusepy would answer EINVAL, and a BaseException would stop the loop)."""
    @functools.wraps(fn)
    def guarded(self: PowerLossFS, *args: Any) -> T:
        try:
            return fn(self, *args)
        except mfusepy.FuseOSError:
            raise
        except OSError as e:
            raise _fail(e.errno or errno.EIO) from None
        except Exception as e:
            with self._lock:
                self.counters["internal_errors"] += 1
                self.last_error = f"{fn.__name__}: {e!r}"
            log.exception("plfs %s failed", fn.__name__)
            raise _fail(errno.EIO) from None
    return guarded


class PowerLossFS(mfusepy.Operations):  # type: ignore[misc]
    """The file system. All state is guarded by ``self._lock`` (libfuse calls from
    several threads)."""

    use_ns = True

    def __init__(self, backing: str, seed: int = 0, default_p: float = 0.5,
                 direct_io: bool = True, fsync_backing: bool = True) -> None:
        self.root = os.path.realpath(backing)
        if not os.path.isdir(self.root):
            raise NotADirectoryError(self.root)
        self.stash = self._make_stash()
        self.seed = seed
        self.default_p = default_p
        self.direct_io = direct_io
        self.fsync_backing = fsync_backing
        self._lock = threading.RLock()
        self.inodes: dict[tuple[int, int], Inode] = {}
        self.handles: dict[int, Inode | CtlHandle] = {}
        self.dirs: dict[int, int] = {}  # directory handle → fd of the backing directory
        self._fh = itertools.count(1)
        self.frozen = False
        # "arm": freeze at the n-th fsync/fdatasync of a file whose name ends with
        # suffix (and that has at least ``pages`` dirty pages), before it syncs
        # anything: the cut then lands exactly while that file's last writes are
        # unsynced. [suffix, calls left, pages] or None.
        self.armed: list[Any] | None = None
        self.counters = dict.fromkeys(
            ["writes", "bytes_written", "reads", "truncates", "fallocates", "fsyncs",
             "fdatasyncs", "fsyncdirs", "syncs", "cuts", "pages_synced", "pages_kept",
             "pages_lost", "frozen_refusals", "internal_errors"], 0)
        self.last_cut: dict[str, Any] | None = None
        self.last_error: str | None = None
        self._uid, self._gid = os.geteuid(), os.getegid()
        # Without direct_io: the paths the kernel may cache pages of, and libfuse's
        # ``struct fuse *`` to drop those caches after a cut.
        self._cached_paths: set[str] = set()
        self._fuse_ptr: int | None = None

    # -- helpers --------------------------------------------------------------------

    def _make_stash(self) -> str:
        """The directory for files libfuse hides (see ``_bp``): next to the backing
        directory if on the same file system (renames must work), else inside it.
        Emptied: what a previous run left there had no name anyway."""
        parent, base = os.path.split(self.root)
        stash = os.path.join(parent, f".{base}.plfs-hidden")
        try:
            os.makedirs(stash, exist_ok=True)
            if os.stat(stash).st_dev != os.stat(self.root).st_dev:
                raise OSError(errno.EXDEV, "another file system")
        except OSError:
            stash = os.path.join(self.root, STASH_NAME)
            os.makedirs(stash, exist_ok=True)
        for name in os.listdir(stash):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(stash, name))
        return stash

    def _bp(self, path: str | None) -> str:
        """The backing path of a mount path. libfuse keeps a file that is unlinked
        (or renamed over) while open alive under a name ``.fuse_hidden…`` until its
        last close, so that fstat & co. keep working on it; those names go to the
        stash directory instead, out of the durable namespace."""
        if path is None:
            raise _fail(errno.ENOENT)
        if path == CTL_PATH:
            raise _fail(errno.EPERM)
        if path == "/":
            return self.root
        name = path.rpartition("/")[2]
        if name.startswith(HIDDEN_PREFIX):
            return os.path.join(self.stash, name)
        if path == "/" + STASH_NAME:
            raise _fail(errno.ENOENT)
        return self.root + path

    @staticmethod
    def _nameless(ino: Inode) -> bool:
        """No name in the backing directory: unlinked, or only in the stash."""
        nlink = os.fstat(ino.fd).st_nlink
        hidden = ino.path.rpartition("/")[2].startswith(HIDDEN_PREFIX)
        return nlink == 0 or (hidden and nlink == 1)

    def _check_frozen(self) -> None:
        if self.frozen:
            self.counters["frozen_refusals"] += 1
            raise _fail(errno.EIO)

    def _own(self, bp: str) -> None:
        """Give a new backing entry to the calling user, as a real file system would."""
        uid, gid, _pid = mfusepy.fuse_get_context()
        if (uid, gid) != (self._uid, self._gid):
            os.lchown(bp, uid, gid)

    def _inode_at(self, bp: str, path: str) -> Inode:
        """The Inode of the regular file at ``bp``, registered if new. Caller holds the lock."""
        try:
            fd = os.open(bp, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY):
                raise
            fd = os.open(bp, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        return self._adopt(fd, path)

    def _adopt(self, fd: int, path: str) -> Inode:
        """Register ``fd`` (a backing file) or, if its inode is known, close it."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise _fail(errno.EINVAL)
        key = (st.st_dev, st.st_ino)
        ino = self.inodes.get(key)
        if ino is not None:
            os.close(fd)
            ino.path = path
            return ino
        ino = self.inodes[key] = Inode(key, fd, path)
        return ino

    def _forget_if_idle(self, ino: Inode) -> None:
        """Drop an Inode nobody has open: at once if clean, and with its state if
        the file has no name left. Caller holds the lock."""
        if ino.opens or self.inodes.get(ino.key) is not ino:
            return
        if ino.dirty and not self._nameless(ino):
            return  # the unsynced state waits for fsync, sync or a cut
        del self.inodes[ino.key]
        os.close(ino.fd)

    def _inode_of(self, fi: Any) -> Inode:
        h = self.handles.get(fi.fh)
        if not isinstance(h, Inode):
            raise _fail(errno.EBADF)
        return h

    @staticmethod
    def _durable_size(ino: Inode) -> int:
        return os.fstat(ino.fd).st_size

    def _visible_size(self, ino: Inode) -> int:
        return ino.size if ino.size is not None else self._durable_size(ino)

    def _durable_end(self, ino: Inode) -> int:
        """Durable bytes below this offset are visible (unless a dirty page covers them)."""
        end = self._durable_size(ino)
        return end if ino.floor is None else min(end, ino.floor)

    def _read(self, ino: Inode, offset: int, size: int) -> bytearray:
        end = min(offset + size, self._visible_size(ino))
        if end <= offset:
            return bytearray()
        buf = bytearray(end - offset)
        dend = min(end, self._durable_end(ino))
        if dend > offset:
            data = os.pread(ino.fd, dend - offset, offset)
            buf[:len(data)] = data
        pages = ino.pages
        if pages:
            for idx in range(offset // PAGE, (end - 1) // PAGE + 1):
                if idx not in pages:
                    continue
                page = pages[idx]
                ps = idx * PAGE
                lo, hi = max(offset, ps), min(end, ps + PAGE)
                buf[lo - offset:hi - offset] = (
                    _ZERO_PAGE if page is None else page)[lo - ps:hi - ps]
        return buf

    def _page(self, ino: Inode, idx: int) -> bytearray:
        """Page ``idx`` as a reader sees it now (zeros past the end)."""
        page = bytearray(self._read(ino, idx * PAGE, PAGE))
        page.extend(bytes(PAGE - len(page)))
        return page

    def _write(self, ino: Inode, data: bytes, offset: int) -> None:
        end = offset + len(data)
        view = memoryview(data)
        pages = ino.pages
        for idx in range(offset // PAGE, (end - 1) // PAGE + 1):
            ps = idx * PAGE
            lo, hi = max(offset, ps), min(end, ps + PAGE)
            if hi - lo == PAGE:
                pages[idx] = bytes(view[lo - offset:hi - offset])
            else:
                page = self._page(ino, idx)
                page[lo - ps:hi - ps] = view[lo - offset:hi - offset]
                pages[idx] = bytes(page)
        if end > self._visible_size(ino):
            ino.size = end
        ino.mtime_ns = time.time_ns()

    def _zero(self, ino: Inode, start: int, stop: int, hole: bool) -> None:
        """Make [start, stop) read as zeros: punched pages, or zeroed ones."""
        pages = ino.pages
        for idx in range(start // PAGE, (stop - 1) // PAGE + 1):
            ps = idx * PAGE
            lo, hi = max(start, ps), min(stop, ps + PAGE)
            if hi - lo == PAGE:
                pages[idx] = _HOLE if hole else _ZERO_PAGE
            else:
                page = self._page(ino, idx)
                page[lo - ps:hi - ps] = bytes(hi - lo)
                pages[idx] = bytes(page)
        ino.mtime_ns = time.time_ns()

    def _truncate(self, ino: Inode, length: int) -> None:
        if length < 0:
            raise _fail(errno.EINVAL)
        visible = self._visible_size(ino)
        if length < visible:
            ino.floor = length if ino.floor is None else min(ino.floor, length)
            first_gone = -(-length // PAGE)
            for idx in [i for i in ino.pages if i >= first_gone]:
                del ino.pages[idx]
            if length % PAGE:
                idx = length // PAGE
                page = ino.pages.get(idx)
                if page is not None:  # keep the tail of a dirty page zero
                    cut = length % PAGE
                    ino.pages[idx] = page[:cut] + bytes(PAGE - cut)
        ino.size = length
        ino.mtime_ns = time.time_ns()

    def _apply(self, ino: Inode, p: float | None, rng: random.Random | None) -> tuple[int, int]:
        """Write ``ino``'s state to its backing file: all of it (``p`` None), or
        each page and the size change with probability ``p``. Clears the state.
        Returns (pages written, pages dropped). Caller holds the lock."""
        fd = ino.fd
        durable = self._durable_size(ino)
        target = durable
        size_change = (ino.size is not None and ino.size != durable) or (
            ino.floor is not None and ino.floor < durable)
        if size_change and (p is None or (rng is not None and rng.random() < p)):
            if ino.floor is not None and ino.floor < durable:
                os.ftruncate(fd, ino.floor)  # what was cut off is gone, even if regrown
            target = ino.size if ino.size is not None else min(durable, ino.floor or durable)
            os.ftruncate(fd, target)
        kept = lost = 0
        run: list[tuple[int, bytes | None]] = []  # consecutive kept pages

        def flush_run() -> None:
            # Split the run where the kind of page changes.
            for _kind, group in itertools.groupby(
                    run, key=lambda e: "h" if e[1] is None else
                    "z" if e[1] is _ZERO_PAGE else "d"):
                items = list(group)
                start = items[0][0] * PAGE
                stop = min((items[-1][0] + 1) * PAGE, target)
                if stop <= start:
                    continue
                page0 = items[0][1]
                if page0 is None or page0 is _ZERO_PAGE:
                    mode = FALLOC_FL_PUNCH_HOLE if page0 is None else FALLOC_FL_ZERO_RANGE
                    try:
                        _fallocate(fd, mode | FALLOC_FL_KEEP_SIZE, start, stop - start)
                        continue
                    except OSError as e:
                        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                            raise
                    data = bytes(stop - start)
                else:
                    data = b"".join(page for _i, page in items)[:stop - start]  # type: ignore[misc]
                view = memoryview(data)
                pos = start
                while view:
                    n = os.pwrite(fd, view, pos)
                    view, pos = view[n:], pos + n
            run.clear()

        for idx in sorted(ino.pages):
            keep = p is None or (rng is not None and rng.random() < p)
            if keep:
                kept += 1
                if run and run[-1][0] != idx - 1:
                    flush_run()
                run.append((idx, ino.pages[idx]))
            else:
                lost += 1
                flush_run()
        flush_run()
        if p is None and ino.mtime_ns is not None:
            st = os.fstat(fd)
            os.utime(fd, ns=(st.st_atime_ns, ino.mtime_ns))
        ino.clear()
        return kept, lost

    def _fsync_backing(self, fds: list[int]) -> None:
        """fsync duplicates of backing descriptors, outside the lock."""
        for fd in fds:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _sync_all(self) -> list[int]:
        """Apply every dirty inode; returns dups to fsync. Caller holds the lock."""
        dups = []
        for ino in list(self.inodes.values()):
            if ino.dirty:
                self.counters["pages_synced"] += self._apply(ino, None, None)[0]
                if self.fsync_backing:
                    dups.append(os.dup(ino.fd))
            self._forget_if_idle(ino)
        return dups

    def cut(self, p: float | None = None, seed: int | None = None) -> dict[str, Any]:
        """The power cut (see the module docstring)."""
        p = self.default_p if p is None else p
        if not 0.0 <= p <= 1.0:
            raise _fail(errno.EINVAL)
        seed = self.seed if seed is None else seed
        dups = []
        with self._lock:
            cut_no = self.counters["cuts"]
            result: dict[str, Any] = {"cut": cut_no, "p": p, "seed": seed, "files": 0,
                                      "pages_kept": 0, "pages_lost": 0}
            for ino in sorted(self.inodes.values(), key=lambda i: (i.path, i.key)):
                if not ino.dirty:
                    continue
                result["files"] += 1
                if self._nameless(ino):
                    result["pages_lost"] += len(ino.pages)
                    ino.clear()  # no name: nothing of it can be found after the cut
                    continue
                rng = random.Random(f"{seed}:{cut_no}:{ino.path}")
                kept, lost = self._apply(ino, p, rng)
                result["pages_kept"] += kept
                result["pages_lost"] += lost
                if self.fsync_backing and kept:
                    dups.append(os.dup(ino.fd))
            for ino in list(self.inodes.values()):
                ino.clear()
                self._forget_if_idle(ino)
            self.counters["cuts"] += 1
            self.counters["pages_kept"] += result["pages_kept"]
            self.counters["pages_lost"] += result["pages_lost"]
            self.frozen, self.armed = False, None
            self.last_cut = result
        self._fsync_backing(dups)
        self._invalidate_kernel_caches()
        log.info("cut: %s", result)
        return result

    def sync(self) -> None:
        with self._lock:
            self.counters["syncs"] += 1
            dups = self._sync_all()
        self._fsync_backing(dups)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            dirty = [i for i in self.inodes.values() if i.dirty]
            return {
                **self.counters,
                "dirty_files": len(dirty),
                "dirty_pages": sum(len(i.pages) for i in dirty),
                "pending_sizes": sum(i.size is not None for i in dirty),
                "open_handles": len(self.handles),
                "known_inodes": len(self.inodes),
                "frozen": self.frozen,
                "seed": self.seed,
                "default_p": self.default_p,
                "last_cut": self.last_cut,
                "last_error": self.last_error,
                "pid": os.getpid(),
            }

    def _command(self, text: str) -> None:
        for line in text.replace(";", "\n").splitlines():
            words = line.split()
            if not words:
                continue
            cmd, args = words[0], {}
            for w in words[1:]:
                k, sep, v = w.partition("=")
                if not sep:
                    raise _fail(errno.EINVAL)
                args[k] = v
            try:
                if cmd == "cut" and set(args) <= {"p", "seed"}:
                    self.cut(float(args["p"]) if "p" in args else None,
                             int(args["seed"]) if "seed" in args else None)
                elif cmd == "sync" and not args:
                    self.sync()
                elif cmd == "freeze" and not args:
                    with self._lock:
                        self.frozen = True
                elif cmd == "arm" and {"suffix", "n"} <= set(args) <= {"suffix", "n", "pages"}:
                    with self._lock:
                        self.armed = [args["suffix"], int(args["n"]), int(args.get("pages", 0))]
                elif cmd == "unfreeze" and not args:
                    with self._lock:
                        self.frozen = False
                else:
                    raise _fail(errno.EINVAL)
            except ValueError:
                raise _fail(errno.EINVAL) from None

    def _ctl_attr(self) -> dict[str, Any]:
        now = time.time_ns()
        return {"st_mode": stat.S_IFREG | 0o666, "st_nlink": 1, "st_size": 0,
                "st_uid": self._uid, "st_gid": self._gid, "st_ino": _CTL_INO,
                "st_atime": now, "st_mtime": now, "st_ctime": now, "st_blksize": PAGE}

    # -- lifecycle ------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            config.attr_timeout = 0.0
            config.entry_timeout = 0.0
            config.negative_timeout = 0.0
            config.ac_attr_timeout_set = 0
            config.kernel_cache = 0
            config.auto_cache = 0
            config.hard_remove = 1  # no hiding: a hide + rename pair is not atomic at a cut
            config.nullpath_ok = 1  # ops on open files use the handle, not a path
            config.use_ino = 1
        if not self.direct_io:
            self._fuse_ptr = _fuse3().fuse_get_context().contents.value
        log.info("plfs ready: %s (seed %d)", self.root, self.seed)

    def _invalidate_kernel_caches(self) -> None:
        """Cached mode only: drop the kernel's pages and attributes of every file it
        may hold. Not under the lock: the kernel may wait for a read in progress."""
        with self._lock:
            paths, ptr = sorted(self._cached_paths), self._fuse_ptr
        if ptr is None:
            return
        lib = _fuse3()
        for path in paths:
            # -ENOENT: libfuse has no node for it (any more), so nothing is cached.
            lib.fuse_invalidate_path(ptr, os.fsencode(path))

    def destroy(self, path: str) -> None:
        with self._lock:
            for ino in self.inodes.values():
                with contextlib.suppress(OSError):
                    os.close(ino.fd)
            self.inodes.clear()
            for fd in self.dirs.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.dirs.clear()

    # -- attributes -----------------------------------------------------------------

    @_op
    def getattr(self, path: str | None, fi: Any = None) -> dict[str, Any]:
        with self._lock:
            h = self.handles.get(fi.fh) if fi is not None else None
            if path == CTL_PATH or isinstance(h, CtlHandle):
                return self._ctl_attr()
            st = os.fstat(h.fd) if h is not None else os.lstat(self._bp(path))
            attrs = {k: getattr(st, k) for k in (
                "st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size",
                "st_blocks", "st_blksize", "st_rdev")}
            attrs["st_atime"] = st.st_atime_ns
            attrs["st_mtime"] = st.st_mtime_ns
            attrs["st_ctime"] = st.st_ctime_ns
            if path is not None and path.rpartition("/")[2].startswith(HIDDEN_PREFIX):
                attrs["st_nlink"] = max(0, st.st_nlink - 1)  # an unlinked file's count
            if stat.S_ISREG(st.st_mode):
                ino = h if h is not None else self.inodes.get((st.st_dev, st.st_ino))
                if ino is not None and ino.dirty:
                    if ino.size is not None:
                        attrs["st_size"] = ino.size
                    if ino.mtime_ns is not None:
                        attrs["st_mtime"] = ino.mtime_ns
                        attrs["st_ctime"] = max(st.st_ctime_ns, ino.mtime_ns)
            return attrs

    @_op
    def truncate(self, path: str | None, length: int, fi: Any = None) -> int:
        with self._lock:
            h = self.handles.get(fi.fh) if fi is not None else None
            if path == CTL_PATH or isinstance(h, CtlHandle):
                return 0
            self._check_frozen()
            if h is None:
                ino = self._inode_at(self._bp(path), path or "")
            else:
                ino = h
            try:
                self._truncate(ino, length)
            finally:
                self._forget_if_idle(ino)
            self.counters["truncates"] += 1
        return 0

    @_op
    def chmod(self, path: str | None, mode: int, fi: Any = None) -> int:
        with self._lock:
            self._check_frozen()
            h = self.handles.get(fi.fh) if fi is not None else None
            if isinstance(h, Inode):
                os.fchmod(h.fd, stat.S_IMODE(mode))
            else:
                os.chmod(self._bp(path), stat.S_IMODE(mode), follow_symlinks=False)
        return 0

    @_op
    def chown(self, path: str | None, uid: int, gid: int, fi: Any = None) -> int:
        with self._lock:
            self._check_frozen()
            h = self.handles.get(fi.fh) if fi is not None else None
            if isinstance(h, Inode):
                os.fchown(h.fd, uid, gid)
            else:
                os.lchown(self._bp(path), uid, gid)
        return 0

    @_op
    def utimens(self, path: str | None, times: tuple[int | None, int | None] | None = None,
                fi: Any = None) -> int:
        with self._lock:
            self._check_frozen()
            h = self.handles.get(fi.fh) if fi is not None else None
            target: int | str = h.fd if isinstance(h, Inode) else self._bp(path)
            st = os.stat(target) if isinstance(target, int) else os.lstat(target)
            now = time.time_ns()
            atime, mtime = times if times is not None else (now, now)
            atime = st.st_atime_ns if atime is None else atime
            mtime = st.st_mtime_ns if mtime is None else mtime
            if isinstance(target, int):
                os.utime(target, ns=(atime, mtime))
            else:
                os.utime(target, ns=(atime, mtime), follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                ino = self.inodes.get((st.st_dev, st.st_ino))
                if ino is not None and ino.dirty:
                    ino.mtime_ns = mtime  # re-applied after the next sync
        return 0

    @_op
    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self.root)
        return {k: getattr(sv, k) for k in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
            "f_favail", "f_flag", "f_namemax")}

    # -- namespace (durable at once) ------------------------------------------------

    @_op
    def readlink(self, path: str) -> str:
        return os.readlink(self._bp(path))

    @_op
    def mknod(self, path: str, mode: int, dev: int) -> int:
        with self._lock:
            self._check_frozen()
            bp = self._bp(path)
            os.mknod(bp, mode, dev)
            self._own(bp)
        return 0

    @_op
    def mkdir(self, path: str, mode: int) -> int:
        with self._lock:
            self._check_frozen()
            bp = self._bp(path)
            os.mkdir(bp, mode)
            self._own(bp)
        return 0

    @_op
    def symlink(self, target: str, source: str) -> int:
        """``target`` is the new link's path, ``source`` its content (mfusepy's naming)."""
        with self._lock:
            self._check_frozen()
            bp = self._bp(target)
            os.symlink(source, bp)
            self._own(bp)
        return 0

    @_op
    def link(self, target: str, source: str) -> int:
        """``target`` is the new name of the existing ``source``."""
        with self._lock:
            self._check_frozen()
            os.link(self._bp(source), self._bp(target), follow_symlinks=False)
        return 0

    def _replaced(self, bp: str) -> Inode | None:
        """The registered Inode of the file at ``bp``, about to lose that name."""
        try:
            st = os.lstat(bp)
        except FileNotFoundError:
            return None
        return self.inodes.get((st.st_dev, st.st_ino)) if stat.S_ISREG(st.st_mode) else None

    @_op
    def unlink(self, path: str) -> int:
        with self._lock:
            bp = self._bp(path)
            if not bp.startswith(self.stash + "/"):  # libfuse's cleanup after a close
                self._check_frozen()
            ino = self._replaced(bp)
            os.unlink(bp)
            if ino is not None:
                self._forget_if_idle(ino)
        return 0

    @_op
    def rmdir(self, path: str) -> int:
        with self._lock:
            self._check_frozen()
            os.rmdir(self._bp(path))
        return 0

    @_op
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        with self._lock:
            self._check_frozen()
            bold, bnew = self._bp(old), self._bp(new)
            moved = self._replaced(bold)
            replaced = None if flags & RENAME_EXCHANGE else self._replaced(bnew)
            if flags:
                if _libc.renameat2(AT_FDCWD, os.fsencode(bold), AT_FDCWD, os.fsencode(bnew),
                                   flags) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, os.strerror(e))
            else:
                os.rename(bold, bnew)
            if moved is not None:
                moved.path = new
            if flags & RENAME_EXCHANGE:
                other = self._replaced(bold)
                if other is not None:
                    other.path = old
            if replaced is not None and replaced is not moved:
                self._forget_if_idle(replaced)
        return 0

    # -- directories ----------------------------------------------------------------

    @_op
    def opendir(self, path: str) -> int:
        fd = os.open(self._bp(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        with self._lock:
            fh = next(self._fh)
            self.dirs[fh] = fd
        return fh

    @_op
    def readdir(self, path: str | None, fh: int) -> list[Any]:
        with self._lock:
            fd = self.dirs.get(fh)
        if fd is None:
            raise _fail(errno.EBADF)
        here = os.fstat(fd)
        is_root = os.path.samestat(here, os.stat(self.root))
        up = here if is_root else os.stat("..", dir_fd=fd)
        # With use_ino the entries' inode numbers reach the kernel, and readdir(3)
        # skips entries numbered 0: every entry needs its number.
        out: list[Any] = [(".", {"st_mode": stat.S_IFDIR, "st_ino": here.st_ino}, 0),
                          ("..", {"st_mode": stat.S_IFDIR, "st_ino": up.st_ino}, 0)]
        with os.scandir(fd) as it:
            for e in it:
                if is_root and e.name in (CTL_NAME, STASH_NAME):
                    continue
                kind = (stat.S_IFLNK if e.is_symlink() else stat.S_IFDIR if
                        e.is_dir(follow_symlinks=False) else stat.S_IFREG if
                        e.is_file(follow_symlinks=False) else 0)
                out.append((e.name, {"st_mode": kind, "st_ino": e.inode()}, 0))
        return out

    @_op
    def releasedir(self, path: str | None, fh: int) -> int:
        with self._lock:
            fd = self.dirs.pop(fh, None)
        if fd is not None:
            os.close(fd)
        return 0

    @_op
    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        with self._lock:
            self.counters["fsyncdirs"] += 1  # the namespace is durable already
        return 0

    # -- files ----------------------------------------------------------------------

    def _new_handle(self, obj: Inode | CtlHandle, fi: Any) -> None:
        fh = next(self._fh)
        self.handles[fh] = obj
        fi.fh = fh
        fi.keep_cache = 0
        fi.direct_io = 1 if (self.direct_io or isinstance(obj, CtlHandle)) else 0
        if not fi.direct_io:
            self._cached_paths.add(obj.path)  # type: ignore[union-attr]

    @_op
    def open(self, path: str, fi: Any) -> int:
        with self._lock:
            if path == CTL_PATH:
                self._new_handle(CtlHandle(json.dumps(self.stats()).encode() + b"\n"), fi)
                return 0
            if fi.flags & os.O_TRUNC:
                self._check_frozen()
            ino = self._inode_at(self._bp(path), path)
            ino.opens += 1
            try:
                if fi.flags & os.O_TRUNC:
                    self._truncate(ino, 0)
            except BaseException:
                ino.opens -= 1
                self._forget_if_idle(ino)
                raise
            self._new_handle(ino, fi)
        return 0

    @_op
    def create(self, path: str, mode: int, fi: Any) -> int:
        with self._lock:
            if path == CTL_PATH:
                return self.open(path, fi)
            self._check_frozen()
            bp = self._bp(path)
            flags = os.O_CREAT | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (
                fi.flags & os.O_EXCL)
            fd = os.open(bp, flags, stat.S_IMODE(mode))
            try:
                self._own(bp)
            except BaseException:
                os.close(fd)
                raise
            ino = self._adopt(fd, path)
            if fi.flags & os.O_TRUNC:
                self._truncate(ino, 0)
            ino.opens += 1
            self._new_handle(ino, fi)
        return 0

    @_op
    def read(self, path: str | None, size: int, offset: int, fi: Any) -> Any:
        with self._lock:
            h = self.handles.get(fi.fh)
            if isinstance(h, CtlHandle):
                return h.snapshot[offset:offset + size]
            if h is None:
                raise _fail(errno.EBADF)
            self.counters["reads"] += 1
            buf = self._read(h, offset, size)
        return (ctypes.c_char * len(buf)).from_buffer(buf) if buf else b""

    @_op
    def write(self, path: str | None, data: bytes, offset: int, fi: Any) -> int:
        h = self.handles.get(fi.fh)
        if isinstance(h, CtlHandle):
            self._command(data.decode("ascii", "replace"))
            h.snapshot = json.dumps(self.stats()).encode() + b"\n"
            return len(data)
        with self._lock:
            ino = self._inode_of(fi)
            self._check_frozen()
            if data:
                self._write(ino, data, offset)
            self.counters["writes"] += 1
            self.counters["bytes_written"] += len(data)
        return len(data)

    @_op
    def fallocate(self, path: str | None, mode: int, offset: int, length: int, fi: Any) -> int:
        with self._lock:
            ino = self._inode_of(fi)
            self._check_frozen()
            if offset < 0 or length <= 0:
                raise _fail(errno.EINVAL)
            if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                raise _fail(errno.EOPNOTSUPP)  # collapse, insert, unshare
            punch, zero = mode & FALLOC_FL_PUNCH_HOLE, mode & FALLOC_FL_ZERO_RANGE
            keep = mode & FALLOC_FL_KEEP_SIZE
            if (punch and not keep) or (punch and zero):
                raise _fail(errno.EINVAL)
            self.counters["fallocates"] += 1
            visible = self._visible_size(ino)
            end = offset + length
            if punch or zero:
                stop = min(end, visible) if keep else end
                if stop > offset:
                    self._zero(ino, offset, stop, hole=bool(punch))
            else:
                # Plain allocation changes no content: reserve the space in the backing
                # file at once (KEEP_SIZE, so no size change becomes durable early).
                try:
                    _fallocate(ino.fd, FALLOC_FL_KEEP_SIZE, offset, length)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
            if not keep and end > visible:
                ino.size = end
                ino.mtime_ns = time.time_ns()
        return 0

    @_op
    def fsync(self, path: str | None, datasync: int, fi: Any) -> int:
        dup = None
        with self._lock:
            h = self.handles.get(fi.fh)
            if isinstance(h, CtlHandle):
                return 0
            ino = self._inode_of(fi)
            if (self.armed is not None and ino.path.endswith(self.armed[0])
                    and len(ino.pages) >= self.armed[2]):
                self.armed[1] -= 1
                if self.armed[1] <= 0:
                    self.armed, self.frozen = None, True
            self._check_frozen()
            self.counters["fdatasyncs" if datasync else "fsyncs"] += 1
            if ino.dirty:
                self.counters["pages_synced"] += self._apply(ino, None, None)[0]
                if self.fsync_backing:
                    dup = os.dup(ino.fd)
        if dup is not None:
            self._fsync_backing([dup])
        return 0

    @_op
    def release(self, path: str | None, fi: Any) -> int:
        with self._lock:
            h = self.handles.pop(fi.fh, None)
            if isinstance(h, Inode):
                h.opens -= 1
                self._forget_if_idle(h)
        return 0


class _PLFuse(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE, passing what its libfuse 3 wrappers drop: rename flags, the
    file info of truncate/chmod/chown/utimens, and UTIME_NOW/UTIME_OMIT."""

    def _fi(self, fip: Any) -> Any:
        return fip.contents if fip else None

    def _path(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(self._path(old), self._path(new), flags)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        return self.operations.truncate(self._path(path), length, self._fi(fip))

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
        return self.operations.chmod(self._path(path), mode, self._fi(fip))

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
        uid = -1 if uid == 0xFFFFFFFF else uid
        gid = -1 if gid == 0xFFFFFFFF else gid
        return self.operations.chown(self._path(path), uid, gid, self._fi(fip))

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        times = None
        if buf:
            now = time.time_ns()

            def ns(ts: Any) -> int | None:
                if ts.tv_nsec == UTIME_OMIT:
                    return None
                if ts.tv_nsec == UTIME_NOW:
                    return now
                return int(ts.tv_sec) * 10**9 + int(ts.tv_nsec)

            times = (ns(buf.contents.actime), ns(buf.contents.modtime))
        return self.operations.utimens(self._path(path), times, self._fi(fip))


def serve(backing: str, mountpoint: str, seed: int = 0, default_p: float = 0.5,
          direct_io: bool = True, allow_other: bool = False, debug: bool = False,
          fsync_backing: bool = True) -> None:
    """Mount and serve until unmounted (or SIGINT/SIGTERM/SIGHUP)."""
    os.umask(0)  # the kernel has applied the caller's umask to every mode already
    fs = PowerLossFS(backing, seed=seed, default_p=default_p, direct_io=direct_io,
                     fsync_backing=fsync_backing)
    options: dict[str, Any] = {
        "fsname": "plfs", "subtype": "plfs", "default_permissions": True,
        "allow_other": allow_other, "max_idle_threads": 16,
    }
    _PLFuse(fs, mountpoint, raw_fi=True, foreground=True, nothreads=False, debug=debug,
            **options)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 prog="plfs.py")
    ap.add_argument("backing", help="directory holding the durable state")
    ap.add_argument("mountpoint")
    ap.add_argument("--seed", type=int, default=0, help="seed of the cuts' coins")
    ap.add_argument("--p", type=float, default=0.5,
                    help="default probability that a dirty page survives a cut")
    ap.add_argument("--no-direct-io", action="store_true",
                    help="let the kernel cache file pages (allows MAP_SHARED); a cut "
                         "invalidates them")
    ap.add_argument("--no-fsync-backing", action="store_true",
                    help="do not fsync backing files when applying state (faster)")
    ap.add_argument("--allow-other", action="store_true")
    ap.add_argument("--debug", action="store_true", help="libfuse's request trace")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="plfs[%(process)d] %(levelname)s %(message)s", stream=sys.stderr)
    try:
        serve(a.backing, a.mountpoint, seed=a.seed, default_p=a.p,
              direct_io=not a.no_direct_io, allow_other=a.allow_other, debug=a.debug,
              fsync_backing=not a.no_fsync_backing)
    except RuntimeError as e:  # fuse_main's status: the mount failed, or a signal ended it
        log.error("libfuse ended with status %s", e)
        return 1
    return 0


# -- the test helper ------------------------------------------------------------------


class PLFS:
    """A running plfs process (see :func:`powerloss_mount`)."""

    def __init__(self, backing: Path, mountpoint: Path, process: subprocess.Popen[bytes],
                 log_path: Path, seed: int) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.ctl = mountpoint / CTL_NAME
        self.process = process
        self.log_path = log_path
        self.seed = seed

    def __truediv__(self, name: str | os.PathLike[str]) -> Path:
        return self.mountpoint / name

    def command(self, text: str) -> None:
        fd = os.open(self.ctl, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def cut(self, p: float = 0.5, seed: int | None = None) -> dict[str, Any]:
        """Power cut: each dirty page (and pending size) survives with probability p.
        Returns what happened (``stats()["last_cut"]``)."""
        self.command(f"cut p={p!r}" + (f" seed={seed}" if seed is not None else ""))
        result: dict[str, Any] = self.stats()["last_cut"]
        return result

    def sync(self) -> None:
        self.command("sync")

    def freeze(self) -> None:
        self.command("freeze")

    def unfreeze(self) -> None:
        self.command("unfreeze")

    def arm(self, suffix: str, n: int, pages: int = 0) -> None:
        """Freeze at the n-th fsync/fdatasync of a file whose name ends with suffix
        and that has at least ``pages`` dirty pages then."""
        self.command(f"arm suffix={suffix} n={n} pages={pages}")

    def stats(self) -> dict[str, Any]:
        with open(self.ctl, "rb") as f:
            result: dict[str, Any] = json.loads(f.read())
        return result

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def unmount(self, timeout: float = 10.0) -> int | None:
        """Unmount and wait for the process to end. If the mount is busy (something
        still has a file open), unmount lazily and stop the process (SIGTERM, then
        SIGKILL): whoever holds files there then gets ENOTCONN. Returns the exit
        status if the process ended by itself, else None. Safe to call twice."""
        mnt = str(self.mountpoint)
        forced = False
        if self.process.poll() is None:
            r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
                timeout = min(timeout, 1.0)  # it stays while files are open: stop it
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                forced = True
                self.process.terminate()
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        if _mounted(self.mountpoint):  # the process died: a stale mount remains
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        return None if forced else self.process.returncode


def _mounted(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN  # a dead FUSE server's mount
    return os.path.ismount(path)


@contextlib.contextmanager
def powerloss_mount(tmp_path: str | os.PathLike[str], *, seed: int | None = None,
                    p: float = 0.5, name: str = "plfs", direct_io: bool = True,
                    fsync_backing: bool = True, timeout: float = 15.0) -> Iterator[PLFS]:
    """Run plfs in its own process over ``tmp_path/<name>-backing`` mounted on
    ``tmp_path/<name>-mnt``; yields a :class:`PLFS`. ``seed`` defaults to
    ``$PLFS_SEED`` or 0. On exit: unmount, and fail if the file system logged an
    internal error (when the body itself did not fail)."""
    base = Path(tmp_path)
    backing, mnt = base / f"{name}-backing", base / f"{name}-mnt"
    backing.mkdir(exist_ok=True)
    mnt.mkdir(exist_ok=True)
    if seed is None:
        seed = int(os.environ.get("PLFS_SEED", "0"))
    log_path = base / f"{name}.log"
    cmd = [sys.executable, os.path.abspath(__file__), str(backing), str(mnt),
           "--seed", str(seed), "--p", repr(p), "-v"]
    if not direct_io:
        cmd.append("--no-direct-io")
    if not fsync_backing:
        cmd.append("--no-fsync-backing")
    env = dict(os.environ)
    env.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    with open(log_path, "wb") as logf:
        # Its own session: signals for the test's process group do not reach it.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                env=env, close_fds=True, start_new_session=True)
    fs = PLFS(backing, mnt, proc, log_path, seed)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"plfs exited with {proc.returncode}:\n{fs.log()}")
            try:
                os.stat(fs.ctl)
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"plfs did not mount in {timeout}s:\n{fs.log()}")
            time.sleep(0.01)
    except BaseException:
        fs.unmount()
        raise
    failed = False
    try:
        yield fs
    except BaseException:
        failed = True
        raise
    finally:
        errors = None
        if not failed and proc.poll() is None:
            with contextlib.suppress(OSError):
                errors = fs.stats()["internal_errors"]
        rc = fs.unmount()
        if not failed:
            if errors:
                raise RuntimeError(f"plfs had {errors} internal errors:\n{fs.log()}")
            if rc not in (0, None):
                raise RuntimeError(f"plfs exited with {rc}:\n{fs.log()}")


if __name__ == "__main__":
    sys.exit(main())
