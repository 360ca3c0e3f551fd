"""A FUSE mount where a clone appears as a regular file, served by its ``Clone``.

The filesystem holds a root directory with a single file, ``<clone file name>``,
whose bytes are the clone's (source ⊕ writes, DESIGN invariant 3). A directory
mount (``start_dir_mount``, for ``liveclone daemon --mount``) holds any number of
clones instead, one file each, added and removed while it runs: a removed file
waits for the calls still running on it, so its clone can then be closed. It is built on
mfusepy, ctypes bindings to libfuse3's high-level API (bound to libfuse3 even where
libfuse2 is installed too: see ``libfuse``): ``fuse_main_real`` runs
libfuse's multithreaded loop in a background thread, and each libfuse worker
thread calls straight into the thread-safe ``Clone``, so one request waiting on
the source does not hold up the others. Nothing is kept in module globals:
one process may serve several mounts.

Page cache. By default files are opened with ``keep_cache`` and without
``direct_io``, so the kernel page cache serves repeated reads. That is safe while
every write comes through this mount, where the kernel updates its cache itself;
the copier only moves bytes from the source into the clone file, which leaves the
visible content as it was. A process that also writes the clone by another route
(an NBD export in the same process) either mounts with ``direct_io=True``, which
opens every file with ``direct_io`` so no page of it is cached, or calls
:meth:`MountHandle.invalidate` after such writes. ``O_DIRECT`` opens bypass the
cache in the kernel, as usual.

Writes are write-through (no FUSE writeback cache): a ``write()`` returns once
the clone has it, like a disk with a volatile cache; ``fsync``/``fdatasync`` are
the FLUSH that commits data then map (invariant 6).

fallocate (keep-size semantics, the file's size never changes):

* ``FALLOC_FL_PUNCH_HOLE`` → ``clone.write_zeroes(..., no_hole=False)``: whole
  regions become present holes with nothing copied, like ``clone.trim``, but the
  range must read back as zeros afterwards (fallocate(2)), and ``trim`` leaves a
  partly covered absent region alone (it is advisory); ``write_zeroes`` fills
  such a region from the source first and then zeroes the covered part.
* ``FALLOC_FL_ZERO_RANGE`` → ``clone.write_zeroes(..., no_hole=True)``: zeros
  with the space kept allocated in the clone file, as fallocate(2) promises. On a
  clone file system without ZERO_RANGE (tmpfs) this fails with its EOPNOTSUPP.
* mode 0 or ``FALLOC_FL_KEEP_SIZE`` alone (preallocate) succeeds without doing
  anything: the clone file already has its full size.
* A range past the end is clipped with ``FALLOC_FL_KEEP_SIZE``; without it, a
  range that would grow the file is refused with EPERM (as is truncation), and
  any other mode bit with EOPNOTSUPP.

Signals and unmounting. ``fuse_main_real`` installs libfuse's own handlers for
SIGHUP, SIGINT and SIGTERM only where the disposition is still ``SIG_DFL``, and
restores them when its loop ends. The commands install Python handlers for SIGINT
and SIGTERM first (``cli.options.stop_on_signals``), so those reach the command,
which then calls :meth:`MountHandle.stop`. A SIGHUP (left at ``SIG_DFL`` by
Python) only sets libfuse's exit flag instead of killing the process: the loop
ends, cleanly, at the next request to the mount (libfuse's own behaviour).
:meth:`MountHandle.stop` unmounts with ``fusermount3 -u``, which ends the loop;
if that fails because a program still has the file open, it sets libfuse's exit
flag and sends one harmless request (``statfs``) to wake a worker, after which
libfuse detaches the mount lazily and closes the connection, so the programs
still holding the file get ENOTCONN, as with a crashed server.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from liveclone.core import fsops
from liveclone.core.clone import Clone
from liveclone.core.lifecycle import State
from liveclone.errors import UsageError
from liveclone.fuse.libfuse import libfuse3, mfusepy
from liveclone.mountpoint import check_mountpoint

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview | ctypes.Array[ctypes.c_char]
_CLOSED = (State.CLOSING, State.CLOSED)
log = logging.getLogger(__name__)

# fallocate(2) mode bits (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libfuse = libfuse3
# struct fuse_context starts with ``struct fuse *fuse``; that is all we read of it.
_libfuse.fuse_get_context.restype = ctypes.POINTER(ctypes.c_void_p)
_libfuse.fuse_get_context.argtypes = []
_libfuse.fuse_exit.argtypes = [ctypes.c_void_p]
_libfuse.fuse_exit.restype = None
_libfuse.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_libfuse.fuse_invalidate_path.restype = ctypes.c_int
_libc = ctypes.CDLL(None)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

# libfuse's messages go to this module's logger instead of straight to stderr. What
# it says while mounting is kept instead (``_said.message`` of the mounting thread,
# until ``_said.mounted`` is set), so that a failed mount can quote it.
_said = threading.local()


def _libfuse_log(level: int, fmt: bytes, args: int) -> None:
    """A ``fuse_log_func_t``: ``args`` is the ``va_list`` (a pointer on x86-64 and
    arm64), which only ``vsnprintf`` can read."""
    buf = ctypes.create_string_buffer(1024)
    _libc.vsnprintf(buf, len(buf), fmt, args)
    msg = buf.value.decode(errors="replace").strip()
    if "fuse_remove_signal_handlers: unknown session" in msg:
        # fuse_main_real keeps one signal session per process: with several mounts,
        # any but the last started says this when it ends. Nothing is wrong.
        log.debug("libfuse: %s", msg)
        return
    mounted = getattr(_said, "mounted", None)
    if mounted is not None and not mounted.is_set():
        _said.message = msg
        log.debug("libfuse: %s", msg)
        return
    log.log(logging.ERROR if level <= 3 else logging.WARNING if level == 4
            else logging.INFO if level < 7 else logging.DEBUG, "libfuse: %s", msg)


# Kept in a module global: libfuse holds the pointer for the life of the process.
_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p,
                                 ctypes.c_void_p)(_libfuse_log)
_libfuse.fuse_set_log_func(_LOG_CALLBACK)


def _fail(code: int) -> mfusepy.FuseOSError:
    return mfusepy.FuseOSError(code)


# libfuse's worker threads are not Python threads: for each callback ctypes makes a
# Python thread state (PyGILState_Ensure) and deletes it on return, and each new one
# maps a fresh frame stack and faults its pages in. One more PyGILState_Ensure, never
# released, on a worker's first callback keeps its thread state for the life of the
# thread: a 4 KiB write through the mount took 20-25 µs less. The workers never exit
# before the loop ends (libfuse 3.12 and later runs at most ``max_threads``, 10 by
# default, and ends idle ones only past ``max_idle_threads``, 16), so a mount keeps
# at most 10 of them, until the process exits.
_kept = threading.local()


def _keep_thread_state() -> None:
    if not getattr(_kept, "state", False):
        _kept.state = True
        ctypes.pythonapi.PyGILState_Ensure()


def _errno_only(fn: Callable[..., T]) -> Callable[..., T]:
    """Whatever a callback raises becomes an errno for the kernel: an OSError keeps
    its errno, anything else is logged and answered with EIO. mfusepy would turn
    a stray exception into EINVAL, and a BaseException would end the loop."""
    @functools.wraps(fn)
    def guarded(self: CloneFS, *args: Any) -> T:
        _keep_thread_state()
        try:
            return fn(self, *args)
        except mfusepy.FuseOSError:
            raise  # a refusal we chose (ENOENT, EPERM, ...), not a failure
        except OSError as e:
            self.last_error = f"{fn.__name__}: {e}"
            raise _fail(e.errno or errno.EIO) from None
        except Exception as e:
            self.last_error = f"{fn.__name__}: {e!r}"
            log.exception("FUSE %s failed", fn.__name__)
            raise _fail(errno.EIO) from None
    return guarded


class _File:
    """One clone shown as a file. ``inflight`` counts the calls running on it (under
    CloneFS._lock); a removed file takes no new ones and is let go at 0.

    ``changes`` counts the writes and fallocates through this file that have ended
    (failed ones too), and ``synced`` how many of them a completed fsync covers (it
    read ``changes``, then flushed), both under CloneFS._lock. An fsync with
    ``changes == synced`` has nothing of ours to make durable: every write this file
    acknowledged before it is covered by that earlier flush, so it is answered at
    once, sparing the disk a cache flush (a loop device sends one for each flush of
    the file system above it, with or without writes between)."""

    def __init__(self, clone: Clone, name: str, ino: int, read_only: bool) -> None:
        self.clone = clone
        # For ``_write_present``, taken once: the bitmaps it holds only gain bits, so
        # a region they show present and marked stays so (``Clone.lane``).
        self.lane = clone.lane(reads=False)
        self.name = name
        self.ino = ino
        self.read_only = read_only
        self.mtime = time.time_ns()
        self.inflight = 0
        self.removed = False
        self.changes = 0
        self.synced = 0


def _write_present(f: _File, data: Buffer, offset: int, n: int) -> bool:
    """Write ``n`` bytes at ``offset`` if they only cover regions that are present
    and marked (their write intent done), as ``Clone.write_nowait`` would, with the
    clone's lane state (``Clone.lane``) instead of its calls: one pwrite, no lock
    but the counters'. False (nothing done) otherwise, or if the clone failed."""
    clone, lane = f.clone, f.lane
    if lane is None or n > lane.max_write or clone.lifecycle.failure is not None \
            or clone.lifecycle.state in _CLOSED:
        return False
    shift, present, marked = lane.shift, lane.present, lane.marked
    for r in range(offset >> shift, ((offset + n - 1) >> shift) + 1):
        if not marked[r >> 3] >> (r & 7) & 1:
            return False
        if present is not None and not present[r >> 3] >> (r & 7) & 1:
            return False
    done = os.pwrite(lane.fd, data, offset)
    if done < n:
        fsops.pwrite_all(lane.fd, memoryview(data).cast("B")[done:n], offset + done)
    clone.count_lane(0, 0, 1, n)
    return True


class _InUse:
    """``CloneFS._using``: a class, not a generator context manager, as it runs for
    every read and write (a fifth of a write's Python time went to contextlib)."""

    __slots__ = ("fs", "f", "change")

    def __init__(self, fs: CloneFS, fh: int, change: bool) -> None:
        with fs._mutex:
            f = fs._by_ino.get(fh)
            if f is None:
                raise _fail(errno.EIO)
            f.inflight += 1
        self.fs, self.f, self.change = fs, f, change

    def __enter__(self) -> _File:
        return self.f

    def __exit__(self, *exc: object) -> None:
        f, fs = self.f, self.fs
        with fs._mutex:
            f.inflight -= 1
            f.changes += self.change
            if f.removed and not f.inflight:
                fs._lock.notify_all()


class CloneFS(mfusepy.Operations):  # type: ignore[misc]
    """One directory of clone files (one file for ``mount`` and ``serve --mount``).
    Callbacks run in libfuse worker threads."""

    use_ns = True  # times in nanoseconds (mfusepy warns otherwise)
    # read/write/fsync/fallocate/release need no path: libfuse skips building it.
    flag_nopath = True
    flag_nullpath_ok = True

    def __init__(self, clone: Clone | None, name: str, read_only: bool,
                 direct_io: bool) -> None:
        """``clone``: the one file's clone, named ``name``; None for a directory whose
        files come with ``add``. ``read_only``: the whole mount."""
        self.read_only = read_only
        self.direct_io = direct_io
        self.started = time.time_ns()
        self.reads = 0
        self.writes = 0
        self.present_writes = 0  # of ``writes``, those ``_write_present`` did
        self.last_error: str | None = None
        self.fuse_ptr: int | None = None  # libfuse's ``struct fuse *``, set by init
        self.ready = threading.Event()
        self.single = clone is not None
        # _mutex is _lock's own lock: ``with self._mutex`` takes it without the Python
        # frame of Condition.__enter__, on every read and write.
        self._mutex = threading.Lock()
        self._lock = threading.Condition(self._mutex)
        # --- guarded by _lock --------------------------------------------------------
        self._files: dict[str, _File] = {}  # by name
        self._by_ino: dict[int, _File] = {}  # by inode number, the open files' fh
        self._next_ino = 2
        # --- end ------------------------------------------------------------------------
        self.name = name
        self.file_path = "/" + name
        if clone is not None:
            self.add(name, clone, read_only)

    @property
    def clone(self) -> Clone:
        """The one file's clone (single-file mounts)."""
        return self._files[self.name].clone

    # -- the directory -----------------------------------------------------------------

    def add(self, name: str, clone: Clone, read_only: bool = False) -> None:
        with self._mutex:
            if name in self._files:
                raise ValueError(f"a file named {name!r} exists")
            f = _File(clone, name, self._next_ino, read_only or self.read_only)
            self._next_ino += 1
            self._files[name] = f
            self._by_ino[f.ino] = f

    def remove(self, name: str) -> None:
        """Take the file away and wait for the calls running on it. Blocks."""
        with self._mutex:
            f = self._files.pop(name)
            del self._by_ino[f.ino]
            f.removed = True
            while f.inflight:
                self._lock.wait()

    def names(self) -> list[str]:
        with self._mutex:
            return list(self._files)

    def _lookup(self, path: str | None) -> _File:
        with self._mutex:
            f = self._files.get(path[1:]) if path and path.startswith("/") else None
        if f is None:
            raise _fail(errno.ENOENT)
        return f

    def _using(self, fh: int, change: bool = False) -> _InUse:
        """``with fs._using(fh) as f``: the open file ``fh`` while a call runs on it
        (EIO once it was removed). ``change``: the call may change the file's bytes
        (counted when it ends)."""
        return _InUse(self, fh, change)

    # -- lifecycle ------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        # Runs in a libfuse thread during FUSE_INIT, inside a request context.
        self.fuse_ptr = _libfuse.fuse_get_context().contents.value
        if config is not None:
            # The size never changes; let the kernel keep attributes a while. In a
            # directory whose files come and go, a removed name lasts at most 1 s.
            config.attr_timeout = config.entry_timeout = 60.0 if self.single else 1.0
        self.ready.set()

    # -- metadata -------------------------------------------------------------------

    def _attr(self, f: _File | None) -> dict[str, int]:
        common = {"st_uid": os.getuid(), "st_gid": os.getgid(), "st_blksize": 4096,
                  "st_atime": self.started, "st_ctime": self.started,
                  "st_mtime": self.started if f is None else f.mtime}
        if f is None:
            return {**common, "st_ino": 1, "st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        size = f.clone.size
        return {**common, "st_ino": f.ino, "st_nlink": 1, "st_size": size,
                "st_mode": stat.S_IFREG | (0o444 if f.read_only else 0o644),
                "st_blocks": (size + 511) // 512}

    def _file_of(self, path: str | None, fh: Any) -> _File:
        """The file a call names by path, or (nopath calls) by its open handle."""
        if path is None:
            with self._mutex:
                f = self._by_ino.get(getattr(fh, "fh", fh) or 0)
            if f is None:
                raise _fail(errno.EIO)
            return f
        return self._lookup(path)

    @_errno_only
    def getattr(self, path: str | None, fh: Any = None) -> dict[str, int]:
        if path == "/":
            return self._attr(None)
        return self._attr(self._file_of(path, fh))

    @_errno_only
    def truncate(self, path: str | None, length: int, fh: Any = None) -> int:
        if path == "/" or length != self._file_of(path, fh).clone.size:
            # A disk image has a fixed size; O_TRUNC and ftruncate cannot change it.
            raise _fail(errno.EPERM)
        return 0

    def chmod(self, path: str | None, mode: int) -> int:
        raise _fail(errno.EPERM)

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        raise _fail(errno.EPERM)

    @_errno_only
    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        if path != "/":
            self._file_of(path, None).mtime = times[1] if times is not None \
                else time.time_ns()
        return 0

    @_errno_only
    def opendir(self, path: str) -> int:
        if path != "/":
            raise _fail(errno.ENOTDIR)
        return 0

    @_errno_only
    def readdir(self, path: str | None, fh: Any) -> list[str]:
        return [".", "..", *self.names()]

    @_errno_only
    def statfs(self, path: str) -> dict[str, int]:
        with self._mutex:
            sizes = [f.clone.size for f in self._files.values()]
        return {"f_bsize": 4096, "f_frsize": 4096,
                "f_blocks": sum((n + 4095) // 4096 for n in sizes),
                "f_bfree": 0, "f_bavail": 0, "f_files": len(sizes) + 1, "f_ffree": 0,
                "f_favail": 0, "f_namemax": 255}

    # -- data -----------------------------------------------------------------------

    @_errno_only
    def open(self, path: str, fi: Any) -> int:
        if path == "/":
            raise _fail(errno.EISDIR)
        f = self._lookup(path)
        flags = fi.flags
        if f.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise _fail(errno.EROFS)
        if flags & os.O_TRUNC and f.clone.size:
            raise _fail(errno.EPERM)
        fi.fh = f.ino
        fi.direct_io = int(self.direct_io)
        fi.keep_cache = int(not self.direct_io)
        return 0

    @_errno_only
    def read(self, path: str | None, size: int, offset: int, fi: Any) -> Any:
        with self._using(fi.fh) as f:
            end = min(offset + size, f.clone.size)
            if end <= offset:
                return b""
            self.reads += 1
            buf = f.clone.read(offset, end - offset)
        # mfusepy memmoves the result into libfuse's buffer; a ctypes view of the
        # bytearray saves copying it to bytes first.
        return (ctypes.c_char * len(buf)).from_buffer(buf)

    @_errno_only
    def write(self, path: str | None, data: Buffer, offset: int, fi: Any) -> int:
        """``data``: bytes, or a view of libfuse's buffer (``_Fuse.write``)."""
        with self._using(fi.fh, change=True) as f:
            if f.read_only:
                raise _fail(errno.EROFS)
            size, clone = len(data), f.clone
            if not size:
                return 0
            if offset >= clone.size:
                raise _fail(errno.ENOSPC)
            n = min(size, clone.size - offset)
            self.writes += 1
            if n < size:
                data = memoryview(data).cast("B")[:n]
            if _write_present(f, data, offset, n):
                self.present_writes += 1
            else:
                view = memoryview(data).cast("B")
                # write_nowait: whole blocks of absent regions nobody owns need no
                # wait either; the rest (fills, write intent) goes to ``write``.
                if not clone.write_nowait(offset, view):
                    clone.write(offset, view)
            f.mtime = time.time_ns()
            return n

    @_errno_only
    def fallocate(self, path: str | None, mode: int, offset: int, length: int,
                  fi: Any) -> int:
        """The mapping is in the module docstring."""
        with self._using(fi.fh, change=True) as f:
            if f.read_only:
                raise _fail(errno.EROFS)
            if offset < 0 or length <= 0:
                raise _fail(errno.EINVAL)
            if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                raise _fail(errno.EOPNOTSUPP)
            size = f.clone.size
            if offset + length > size and not mode & FALLOC_FL_KEEP_SIZE:
                raise _fail(errno.EPERM)  # would grow the file: a disk has a fixed size
            length = min(offset + length, size) - offset
            if length <= 0 or not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                return 0  # nothing in the file, or preallocation: it is all allocated
            f.clone.write_zeroes(offset, length, no_hole=bool(mode & FALLOC_FL_ZERO_RANGE))
            f.mtime = time.time_ns()
            return 0

    @_errno_only
    def fsync(self, path: str | None, datasync: int, fi: Any) -> int:
        with self._using(fi.fh) as f:
            if f.read_only:
                return 0
            with self._mutex:
                changes = f.changes
                if changes == f.synced and f.clone.failure is None:
                    return 0  # nothing since a completed flush (see _File)
            f.clone.flush()  # covers every change counted in ``changes``
            with self._mutex:
                f.synced = max(f.synced, changes)
            return 0

    def flush(self, path: str | None, fi: Any) -> int:
        return 0  # close(): nothing to do; durability is fsync's job

    def release(self, path: str | None, fi: Any) -> int:
        return 0


class _Fuse(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's glue, but ``write`` hands ``CloneFS.write`` a view of libfuse's
    buffer instead of a bytes copy of it (``string_at``: a tenth of the Python time
    of a write+fsync load, with the GIL held), as a ctypes array, which ``pwrite``
    takes as it is. The view is valid only during the call: the clone writes it
    out before returning and keeps no reference to it. The path is never needed
    (``flag_nopath``)."""

    def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        data = (ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))
        return self.operations.write(None, data, offset, fip.contents)  # type: ignore[no-any-return]


class MountHandle:
    """A mount running libfuse's loop in a background thread. ``stop()`` unmounts."""

    def __init__(self, clone: Clone | None, mountpoint: str, read_only: bool,
                 name: str | None, allow_other: bool, direct_io: bool) -> None:
        """``clone`` None: a directory mount, whose files come with ``add``."""
        self.clone = clone
        self.mountpoint = os.path.abspath(mountpoint)
        self.name = name or (os.path.basename(clone.path) if clone is not None else "")
        self.path = os.path.join(self.mountpoint, self.name)
        self.fs = CloneFS(clone, self.name, read_only, direct_io)
        self._options: dict[str, Any] = {
            "fsname": "liveclone", "subtype": "liveclone", "default_permissions": True,
            "ro": read_only, "allow_other": allow_other,
            # libfuse 3.14.0 prints "Ignoring invalid max threads value" for its own
            # default (UINT_MAX) unless it is given a value.
            "max_idle_threads": 16,
        }
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._libfuse_said: str | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"fuse {self.mountpoint}")

    def _run(self) -> None:
        _said.message = None
        _said.mounted = self.fs.ready
        try:
            # Blocks until the loop ends; libfuse mounts, serves and unmounts.
            _Fuse(self.fs, self.mountpoint, raw_fi=True, foreground=True,
                         nothreads=False, **self._options)
        except RuntimeError as e:
            # fuse_main_real's non-zero status. Once mounted it only says how the loop
            # ended (8: by a signal, e.g. SIGHUP through libfuse's handler): the mount
            # is gone either way, which is a normal end.
            if self.fs.fuse_ptr is None:
                self._error = e
                self._libfuse_said = _said.message
            else:
                log.info("FUSE loop on %s ended with status %s", self.mountpoint, e)
        except BaseException as e:  # reported by start() or stop()
            self._error = e
            self._libfuse_said = _said.message
        finally:
            self._done.set()
            self.fs.ready.set()

    def start(self) -> MountHandle:
        self._thread.start()
        self.fs.ready.wait()
        if self._done.is_set():
            self._thread.join()
            err = self._error
            why = (self._libfuse_said or f"libfuse failed ({err})"
                   if err is None or isinstance(err, RuntimeError) else err)
            raise UsageError(f"cannot mount FUSE on {self.mountpoint}: {why}")
        return self

    def add(self, name: str, clone: Clone, read_only: bool = False) -> str:
        """Show ``clone`` as ``MOUNTPOINT/name`` (a directory mount); its path."""
        self.fs.add(name, clone, read_only)
        return os.path.join(self.mountpoint, name)

    def remove(self, name: str) -> None:
        """Take ``MOUNTPOINT/name`` away; blocks until no call runs on it, so its
        clone may be closed. Programs that still hold it open get EIO."""
        self.fs.remove(name)
        ptr = self.fs.fuse_ptr
        if self.running and ptr is not None:
            _libfuse.fuse_invalidate_path(ptr, ("/" + name).encode())

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the mount ends (``stop()`` or an outside ``fusermount3 -u``)."""
        return self._done.wait(timeout)

    def invalidate(self) -> None:
        """Drop the kernel's cached pages of the file, after writes by another route."""
        ptr = self.fs.fuse_ptr
        if self.running and ptr is not None:
            # -ENOENT when the kernel holds no node for the file: nothing is cached.
            _libfuse.fuse_invalidate_path(ptr, self.fs.file_path.encode())

    def stop(self) -> None:
        """Unmount and end the loop. Blocks until done; safe to call twice."""
        if not self._done.is_set():
            r = subprocess.run(["fusermount3", "-u", self.mountpoint],
                               capture_output=True, text=True)
            if r.returncode != 0 and not self._done.wait(0.1):
                # Busy (a program has the file open): leave the loop from inside.
                log.info("fusermount3 -u %s: %s; ending the FUSE loop instead",
                         self.mountpoint, r.stderr.strip())
                self._exit_loop()
        self._thread.join()
        err, self._error = self._error, None
        if err is not None:
            raise err

    def _exit_loop(self) -> None:
        """Set libfuse's exit flag, then send one request so that a worker wakes,
        answers it and sees the flag. libfuse then unmounts (lazily) by itself."""
        ptr = self.fs.fuse_ptr
        if ptr is None:
            return
        _libfuse.fuse_exit(ptr)
        try:
            os.statvfs(self.mountpoint)
        except OSError:
            pass  # the loop ended on its own meanwhile


def start_dir_mount(mountpoint: str, allow_other: bool = False) -> MountHandle:
    """Mount an empty directory of clones on ``mountpoint`` (``MountHandle.add`` and
    ``remove`` change it while it runs). Files are opened with ``direct_io``: their
    clones are also written over NBD, so the kernel must not cache their pages."""
    check_mountpoint(mountpoint)
    return MountHandle(None, mountpoint, False, None, allow_other, direct_io=True).start()


def start_mount(clone: Clone, mountpoint: str, read_only: bool = False,
                name: str | None = None, allow_other: bool = False,
                direct_io: bool = False) -> MountHandle:
    """Mount ``clone`` as ``mountpoint/<name>`` (default: the clone file's name) and
    serve it from a background thread. Returns once the mount is usable.

    ``direct_io=True`` keeps the file out of the kernel page cache, for a process
    that also changes the clone by another route (an NBD export) while mounted."""
    check_mountpoint(mountpoint)
    return MountHandle(clone, mountpoint, read_only, name, allow_other, direct_io).start()
