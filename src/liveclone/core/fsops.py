"""The syscall layer: the few file operations the core needs that Python's ``os``
module lacks or spells awkwardly, and the durability primitives.

Every write, sync, rename and directory sync on the durability path (clone data,
journal, superblock) goes through a function here, so there is one place to read
what reaches the disk, and one seam where tests inject faults (ENOSPC, EIO,
EMFILE) at each site. Nothing here keeps state or takes a lock, except the lazily
loaded libc handle.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import struct
from collections.abc import Iterator
from typing import Any

from liveclone.core import copyc

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0x8)

# The filesystem cannot share blocks between these two files.
NO_SHARING = (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY,
              errno.EPERM)
_FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)

_libc: Any = None


def _load_libc() -> Any:
    global _libc
    if _libc is None:
        import ctypes

        # The symbols already loaded into this process, libc's among them: found
        # without ctypes.util.find_library, which runs ldconfig (milliseconds, in
        # the copier's first turn, beside a server answering its first client).
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc = libc
    return _libc


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode; Python's os module only has posix_fallocate."""
    if length <= 0:
        return
    if _load_libc().fallocate(fd, mode, offset, length) != 0:
        import ctypes

        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def punch_hole(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def zero_range(fd: int, offset: int, length: int) -> None:
    """Zero a range and keep it allocated (NBD's NO_HOLE)."""
    fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Drop the page cache of a range (``POSIX_FADV_DONTNEED``).

    After a direct write this removes any page that a neighbour's readahead loaded
    while the range was still a hole, so buffered reads see the new bytes; after a
    buffered write it starts writeback early, so the periodic fdatasync finds
    little left."""
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def clone_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Share ``length`` bytes at ``offset`` of the source with the clone (a reflink;
    XFS, btrfs). Raises OSError where the filesystem cannot."""
    fcntl.ioctl(dst_fd, _FICLONERANGE, struct.pack("=qQQQ", src_fd, offset, length, offset))


def copy_file_range(src_fd: int, dst_fd: int, offset: int, length: int,
                    progress: list[int] | None = None) -> None:
    """Copy ``length`` bytes at the same ``offset`` between two local files;
    ``progress[0]``, if given, follows the bytes copied."""
    while length > 0:
        n = os.copy_file_range(src_fd, dst_fd, length, offset, offset)
        if n == 0:
            raise OSError(errno.EIO, f"source ended early at offset {offset}")
        offset, length = offset + n, length - n
        if progress is not None:
            progress[0] = offset


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int,
               progress: list[int] | None = None) -> None:
    """Write all of ``data``; ``progress[0]``, if given, follows the bytes written."""
    n = os.pwrite(fd, data, offset)  # all of it, but for a full disk or a signal
    view = memoryview(data)[n:]
    offset += n
    if progress is not None:
        progress[0] = offset
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
        if progress is not None:
            progress[0] = offset


def fdatasync(fd: int) -> None:
    """fdatasync(2). A failure is final for the file's unsynced data: Linux reports
    a writeback error once and marks the pages clean, so a retry would "succeed"
    over lost data. Callers never retry it into success (invariant 9)."""
    os.fdatasync(fd)


def fsync(fd: int) -> None:
    os.fsync(fd)


def rename(src: str, dst: str) -> None:
    os.rename(src, dst)


def fsync_dir(path: str) -> None:
    """fsync the directory holding ``path``, so its new name is durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: str, data: bytes, mode: int) -> None:
    """Create (or replace) ``path`` with ``data`` and fsync it; no rename, no dir sync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode passes through the umask; be exact
        pwrite_all(fd, data, 0)
        fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: str, data: bytes, mode: int) -> None:
    """tmp + write + fsync + rename + fsync dir: the file is old or new, never torn.

    Raises ``StepError`` telling whether the failure came before the rename (the
    old file is untouched) or from the rename on (the name may point either way)."""
    tmp = path + ".tmp"
    try:
        write_new_file(tmp, data, mode)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StepError(e, renamed=False) from e
    try:
        rename(tmp, path)  # step: atomic switch to the new file
        fsync_dir(path)  # step: the rename itself is durable
    except OSError as e:
        raise StepError(e, renamed=True) from e


class StepError(OSError):
    """An OSError from an atomic file replacement, with where it stopped."""

    def __init__(self, cause: OSError, renamed: bool) -> None:
        super().__init__(cause.errno, cause.strerror, cause.filename)
        self.renamed = renamed


def put_runs(fd: int, runs: list[tuple[int, int]], data: memoryview | list[memoryview],
             base: int, zero_block: int, progress: list[int] | None = None,
             compiled: bool = True) -> None:
    """Put each ``(start, end)`` of ``runs`` (sorted, apart) into the clone ``fd``:
    run k's bytes are ``data[k]``, or, when ``data`` is one buffer, at
    ``data[start - base:]``. Its all-zero blocks (``zero_block`` bytes, aligned to
    the clone) are punched, the rest is written; nothing between the runs is
    touched. ``progress[0]``, if given, is kept at an offset below which every
    byte of the runs is done. ``compiled``: in C, without the GIL, if built (one
    call for any number of runs); else one pwrite or punch per stretch, in Python."""
    if not runs:
        return
    if compiled and copyc.lib is not None:
        ffi, lib = copyc.ffi, copyc.lib
        flat = ffi.new("uint64_t[]", [x for run in runs for x in run])
        if isinstance(data, list):
            held = [ffi.from_buffer("uint8_t[]", d) for d in data]  # alive for the call
            buf, ptrs = ffi.NULL, ffi.new("uint8_t *[]", held)
        else:
            buf, ptrs = ffi.from_buffer("uint8_t[]", data), ffi.NULL
        done = ffi.new("uint64_t *", runs[0][0])
        err = lib.lc_put_runs(fd, buf, base, flat, ptrs, len(runs), zero_block, done)
        if progress is not None:
            progress[0] = max(progress[0], done[0])
        if err:
            raise OSError(err, os.strerror(err))
        return
    hole: list[int] = []  # [start, end) of zeros not punched yet

    def flush() -> None:
        if hole:
            punch_hole(fd, hole[0], hole[1] - hole[0])
            if progress is not None:
                progress[0] = hole[1]
            hole.clear()

    for k, (off, end) in enumerate(runs):
        d = data[k] if isinstance(data, list) else data[off - base:off - base + end - off]
        for i, e, zero in stretches(d, off, zero_block):
            if not zero:
                flush()
                pwrite_all(fd, d[i:e], off + i, progress)
            elif hole and hole[1] == off + i:
                hole[1] = off + e
            else:
                flush()
                hole[:] = [off + i, off + e]
    flush()


@functools.cache
def _zeros(n: int) -> bytes:
    return bytes(n)


def stretches(data: memoryview, offset: int, zero_block: int) -> Iterator[tuple[int, int, bool]]:
    """Split ``data``, bound for the clone at ``offset``, into ``(start, end, zero)``
    stretches: each all-zero block (``zero_block`` bytes aligned to the clone, cut
    to ``data``) alone, the data between them as one."""
    n, zb, zeros = len(data), zero_block, _zeros(zero_block)
    i = 0
    while i < n:
        j = min(n, (offset + i) // zb * zb + zb - offset)
        if data[i:j] == zeros[:j - i]:
            yield i, j, True
            i = j
            continue
        k = j  # extend the data over the following non-zero blocks
        while k < n and data[k:k + zb] != zeros[:min(zb, n - k)]:
            k += zb
        k = min(k, n)
        yield i, k, False
        i = k
