"""The clone: routing policy of DESIGN invariants 3-6. Knows nothing of protocols.

A ``Clone`` is a read-only source, a clone file of the source's size, and a
region map. Every frontend (NBD, FUSE, the copier) calls the same blocking,
thread-safe methods: ``read``, ``write``, ``write_zeroes``, ``trim``, ``flush``,
``cache`` and ``fill``. Async frontends run them in worker threads.

Ownership of absent regions. A region that is absent can only change (its clone
bytes written, its bit set) by the one caller that *owns* it. Ownership is taken
for runs of regions under ``_cond``'s lock and released there. Guest writes wait
until no region they touch is owned by someone else; the copier never waits: it
skips owned and present regions. Since a region's bit is set only by its owner,
and the copier only writes regions it found absent and took, the copier never
overwrites guest data (invariant 4), and there is one fill per region at a time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from liveclone.core.metadata import COMPACT_RECORDS, MapHeader, MapStore
from liveclone.core.regions import DEFAULT_REGION_SIZE, Geometry, RegionMap
from liveclone.errors import (
    CloneBusyError,
    CorruptMetadataError,
    NotACloneError,
    SourceChangedError,
    SourceError,
    TargetError,
)
from liveclone.sources.base import Source
from liveclone.sources.local import fd_extents, open_direct

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# Largest single read (and write) when filling. Direct I/O on a virtio disk: 32 MiB
# copied 4 GiB in 3.9-5.1 s, 8 MiB in 5.6-7.0 s (3-6 workers, interleaved runs).
COPY_CHUNK = 32 << 20
# Offsets and lengths of direct I/O are multiples of this (any device's logical block).
DIRECT_ALIGN = 4096
# Zero detection granularity cap: an all-zero block this big becomes a hole.
ZERO_BLOCK = 64 << 10
# Invariant 6: commit at least this often while bits are pending.
COMMIT_INTERVAL = 1.0

_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0x8)
# Largest write ``write_nowait`` takes on an event loop.
NOWAIT_WRITE_MAX = 64 << 10

# Block status flags, as NBD's base:allocation defines them.
STATE_HOLE = 1
STATE_ZERO = 2

_libc: Any = None


def _load_libc() -> None:
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc = libc


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode; Python's os module only has posix_fallocate."""
    if length <= 0:
        return
    _load_libc()
    if _libc.fallocate(fd, mode, offset, length) != 0:
        import ctypes

        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Drop the page cache of a range the copier just wrote (``POSIX_FADV_DONTNEED``).

    After a direct write this removes any page that a neighbour's readahead loaded
    while the range was still a hole, so buffered reads see the new bytes; after a
    buffered write it starts writeback early, so the periodic fdatasync finds little
    left. Called while the range is still owned, before its bits are set."""
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def punch_hole(fd: int, offset: int, length: int) -> None:
    _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


# The filesystem cannot share blocks between these two files.
_NO_SHARING = (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY,
               errno.EPERM)
_FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)


def _clone_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Share ``length`` bytes at ``offset`` of the source with the clone (a reflink;
    XFS, btrfs). Raises OSError where the filesystem cannot."""
    import struct

    fcntl.ioctl(dst_fd, _FICLONERANGE, struct.pack("=qQQQ", src_fd, offset, length, offset))


def _copy_file_range(src_fd: int, dst_fd: int, offset: int, length: int,
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


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int,
                progress: list[int] | None = None) -> None:
    """Write all of ``data``; ``progress[0]``, if given, follows the bytes written."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
        if progress is not None:
            progress[0] = offset


def _is_zero(view: memoryview, zeros: memoryview) -> bool:
    """``zeros`` is a view of at least ``len(view)`` zero bytes (slicing it copies nothing)."""
    return view == zeros[: len(view)]


@dataclass
class CloneStats:
    """Counters for ``status``. Updated under ``Clone._cond``."""

    bytes_copied: int = 0  # source bytes written into the clone by fills
    bytes_from_source: int = 0  # every byte read from the source (fills and reads)
    regions_skipped: int = 0  # copier found the region already present: "done"
    guest_reads: int = 0
    guest_writes: int = 0
    guest_bytes_read: int = 0
    guest_bytes_written: int = 0
    commits: int = 0
    last_commit: float = 0.0


class Clone:
    """A partly filled clone, safe for concurrent callers."""

    def __init__(self, path: str, fd: int, store: MapStore, rmap: RegionMap,
                 source: Source | None, autocommit: bool = True) -> None:
        header = store.header
        self.path = path
        self.size = header.size
        self.region_size = header.region_size
        self.geometry = Geometry(header.size, header.region_size)
        self.source = source
        self.source_spec = str(header.source.get("path", ""))
        # Copy-on-read: a guest read of absent regions fills them first, so a slow
        # source is read once. The fill takes ownership like the copier does.
        self.copy_on_read = False
        # Called with (first, end) for every guest read that touched absent regions;
        # the copier uses it to copy what the guest touches first.
        self.on_absent_read: Callable[[int, int], None] | None = None
        self._fd = fd
        self._store = store
        self._zero_block = min(ZERO_BLOCK, self.region_size)
        self._zeros = memoryview(bytes(self._zero_block))  # compared against, never written
        self._local = threading.local()  # per-thread copy buffer
        # Fills write source bytes with direct I/O where the filesystem allows it:
        # measured 2-3x faster than the page cache's writeback on a virtio disk.
        self._dfd = open_direct(fd, os.O_RDWR)
        # Some filesystems open with O_DIRECT and refuse the I/O (EINVAL): the first
        # refusal turns direct I/O off for this clone.
        self._direct = True
        # Source and clone share blocks (reflink): None until the first fill tries.
        self._share_blocks: bool | None = None
        self._cond = threading.Condition()
        # --- state guarded by _cond ------------------------------------------
        # Invariant: bit r set ⇒ the clone file holds r's authoritative bytes
        # (perhaps not yet durable). Bits only go 0 → 1.
        self._map = rmap
        # Invariant: bit r set ⇒ r's bytes were fdatasynced before the bit reached
        # the journal. committed ⊆ map.
        self._committed = RegionMap(rmap.count, rmap.to_bytes())
        # Runs (first, end) set in _map and not yet committed, in the order set.
        self._pending: list[tuple[int, int]] = []
        # Runs of absent regions owned by one caller each; no two overlap.
        # Only the owner writes an owned region's clone bytes or sets its bit.
        self._owned: list[tuple[int, int]] = []
        self.guest_inflight = 0  # guest requests now running, for the copier to yield
        self.last_guest_io = 0.0  # time.monotonic() of the last guest request
        self.stats = CloneStats()
        self.last_error: str | None = None
        # --- end of state guarded by _cond -----------------------------------
        self._commit_lock = threading.Lock()  # one commit/compaction at a time
        self._closed = threading.Event()
        self._committer = threading.Thread(target=self._commit_loop, name="commit",
                                           daemon=True)
        if autocommit:  # tests that model commits exactly turn it off
            self._committer.start()

    # -- opening ---------------------------------------------------------------

    @classmethod
    def create(cls, source: Source, path: str,
               region_size: int = DEFAULT_REGION_SIZE, autocommit: bool = True) -> Clone:
        """Make a new clone of ``source`` at ``path``. Blocks."""
        path = os.path.abspath(path)
        if os.path.lexists(path):
            raise TargetError(f"{path} already exists")
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            raise TargetError(f"cannot create clone {path}: directory {directory} does not exist")
        if not os.access(directory, os.W_OK):
            raise TargetError(
                f"cannot create clone {path}: directory {directory} is not writable; "
                "choose a writable directory or fix its permissions"
            )
        header = MapStore.new_header(source.size, region_size, source.identity(), time.time())
        store = MapStore.create(path, header)  # the map first: its superblock marks the clone
        return cls._open_file(path, store, RegionMap(Geometry(source.size, region_size).count),
                              source, autocommit)

    @classmethod
    def open(cls, path: str, source: Source | None, autocommit: bool = True) -> Clone:
        """Open an existing clone. ``source`` may be None only if it is complete."""
        path = os.path.abspath(path)
        if not MapStore.exists(path):
            if os.path.lexists(path):
                raise NotACloneError(
                    f"{path} exists but is not a liveclone clone (no {os.path.basename(path)}"
                    ".lcmap beside it); choose another clone path, or remove the file if "
                    "you do not need it"
                )
            raise NotACloneError(f"{path} is not a liveclone clone: it does not exist")
        store, rmap = MapStore.load(path)
        return cls.from_store(path, store, rmap, source, autocommit)

    @classmethod
    def from_store(cls, path: str, store: MapStore, rmap: RegionMap, source: Source | None,
                   autocommit: bool = True) -> Clone:
        """Open the clone whose map ``MapStore.load`` just gave; the store is closed if
        this fails. ``source`` may be None only if the clone is complete."""
        try:
            header = store.header
            if not rmap.complete:
                if source is None:
                    raise SourceError(
                        f"the clone {path} is {rmap.present_count}/{rmap.count} regions "
                        f"copied and needs its source {header.source.get('path')!r}"
                    )
                if source.size != header.size:
                    raise SourceChangedError(
                        f"source {source.spec} is {source.size} bytes but the clone {path} "
                        f"was made from {header.size} bytes; give the original source"
                    )
                why = source.identity_mismatch(header.source)
                if why:
                    raise SourceChangedError(
                        f"source {source.spec} changed since the clone {path} was made "
                        f"({why}). Resuming would mix two different images. Restore the "
                        "original source, or delete the clone and its map and start again."
                    )
            return cls._open_file(path, store, rmap, source, autocommit)
        except BaseException:
            store.close()
            raise

    @classmethod
    def _open_file(cls, path: str, store: MapStore, rmap: RegionMap,
                   source: Source | None, autocommit: bool) -> Clone:
        size = store.header.size
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            store.close()
            raise TargetError(f"cannot open clone file {path}: {e.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CloneBusyError(
                    f"the clone {path} is in use by another liveclone process; stop it first "
                    "(or use `liveclone status` to see its progress)"
                ) from None
            actual = os.fstat(fd).st_size
            if actual != size:
                if rmap.present_count:
                    raise CorruptMetadataError(
                        f"clone file {path} is {actual} bytes but its map says {size} bytes "
                        f"with {rmap.present_count} regions present: the file was truncated "
                        "or replaced. Delete the clone and its map and clone again."
                    )
                # Crash during creation, before any data: finishing it is safe.
                os.ftruncate(fd, size)
            return cls(path, fd, store, rmap, source, autocommit)
        except BaseException:
            os.close(fd)
            store.close()
            raise

    # -- reporting ---------------------------------------------------------------

    @property
    def header(self) -> MapHeader:
        return self._store.header

    @property
    def regions_total(self) -> int:
        return self._map.count

    @property
    def regions_present(self) -> int:
        return self._map.present_count

    @property
    def complete(self) -> bool:
        return self._map.complete

    def is_present(self, region: int) -> bool:
        with self._cond:
            return region in self._map

    def committed_snapshot(self) -> bytes:
        with self._cond:
            return self._committed.to_bytes()

    def find_absent(self, start: int) -> int | None:
        """The first absent region at or after ``start``, or None."""
        with self._cond:
            return self._map.find_absent(start)

    def present_runs(self, first: int, end: int) -> list[tuple[int, int, bool]]:
        with self._cond:
            return list(self._map.runs(first, end))

    # -- ownership -------------------------------------------------------------

    def _overlaps_owned(self, first: int, end: int) -> bool:
        return any(a < end and first < b for a, b in self._owned)

    def _take(self, first: int, end: int, wait: bool) -> list[tuple[int, int]]:
        """Own the absent regions of ``[first, end)``; return them as runs.

        With ``wait``, block until no region there is owned by another, then take
        every absent one (all at once, so two writers never deadlock). Without
        ``wait``, take only absent regions nobody owns. Caller holds ``_cond``.
        """
        if wait:
            while self._overlaps_owned(first, end):
                self._cond.wait()
            taken = [(a, b) for a, b, present in self._map.runs(first, end) if not present]
        else:
            taken = []
            for a, b, present in self._map.runs(first, end):
                if present:
                    continue
                # Cut owned runs out of [a, b).
                pieces = [(a, b)]
                for oa, ob in self._owned:
                    pieces = [q for pa, pb in pieces
                              for q in ((pa, min(pb, oa)), (max(pa, ob), pb)) if q[0] < q[1]]
                taken.extend(pieces)
        self._owned.extend(taken)
        return taken

    def _release(self, runs: list[tuple[int, int]], present: list[tuple[int, int]]) -> None:
        """Give owned ``runs`` back; the regions of ``present`` (within them) had their
        clone bytes written, so their bits are set, pending commit."""
        with self._cond:
            for run in runs:
                self._owned.remove(run)
            for run in present:
                if run[1] > run[0]:
                    self._map.set(*run)
                    self._pending.append(run)
            self._cond.notify_all()

    def _owning(self, first: int, end: int, wait: bool) -> _Ownership:
        with self._cond:
            return _Ownership(self, self._take(first, end, wait))

    # -- data movement ---------------------------------------------------------

    def _need_source(self) -> Source:
        if self.source is None:
            raise OSError(errno.EIO, "the clone's source is not available")
        return self.source

    def _copy_from_source(self, start: int, end: int, progress: list[int] | None = None,
                          bulk: bool = False) -> int:
        """Copy source bytes ``[start, end)`` into the clone file; zero runs and source
        holes become holes (punched, never trusted). Return the data bytes read.
        The caller owns every region touched. ``progress[0]``, if given, is kept at
        the offset below which every byte is written, so a failed copy keeps what it did.

        A local source is read into a reused page-aligned buffer. Non-zero runs are
        shared with the source where the filesystem can (reflink), else written from
        that buffer. ``bulk`` (the copier's batches): both the read and the write use
        direct I/O where the files allow it, so the copy never waits on page-cache
        writeback. Guest-driven fills are small and latency-bound: they go through the
        page cache, where the source's readahead and the guest's next read find
        them. Other sources are read with ``pread``."""
        source = self._need_source()
        fd, zb = self._fd, self._zero_block
        read = 0
        hole_start: int | None = None  # a zero run waiting to be punched

        def flush_hole(upto: int) -> None:
            nonlocal hole_start
            if hole_start is not None and upto > hole_start:
                punch_hole(fd, hole_start, upto - hole_start)
            hole_start = None

        for ext in source.extents(start, end - start):
            if not ext.data:
                if hole_start is None:
                    hole_start = ext.offset
                continue
            pos, ext_end = ext.offset, ext.offset + ext.length
            while pos < ext_end:
                n = min(COPY_CHUNK, ext_end - pos)
                data, direct = self._read_source(source, pos, n, bulk)
                read += n
                # Walk zero-detection blocks aligned to the clone, not to pos.
                i = 0
                while i < n:
                    j = min(n, (((pos + i) // zb) + 1) * zb - pos)
                    if _is_zero(data[i:j], self._zeros):
                        if hole_start is None:
                            hole_start = pos + i
                        i = j
                        continue
                    flush_hole(pos + i)
                    # Extend the data run over following non-zero blocks.
                    k = j
                    while k < n:
                        nk = min(n, k + zb)
                        if _is_zero(data[k:nk], self._zeros):
                            break
                        k = nk
                    self._write_from_source(source, data[i:k], pos + i, direct, progress)
                    i = k
                pos += n
        flush_hole(end)
        if progress is not None:
            progress[0] = end
        with self._cond:
            self.stats.bytes_from_source += read
        return read

    def _write_from_source(self, source: Source, data: memoryview, offset: int,
                           direct: bool, progress: list[int] | None) -> None:
        """Put source bytes at ``offset`` in the clone. ``direct``: ``data`` starts on
        a DIRECT_ALIGN boundary of an aligned buffer, so its whole blocks may go with
        direct I/O (a short tail goes through the page cache). ``progress[0]`` follows
        every byte written, so a disk that fills up midway keeps what was done."""
        src_fd = source.fileno()
        share = self._share_blocks  # this call's view: other fillers may change it
        if src_fd is not None and share is not False:
            try:
                if share:  # the kernel shares blocks, or copies unaligned pieces
                    _copy_file_range(src_fd, self._fd, offset, len(data), progress)
                    return
                if offset % DIRECT_ALIGN == 0 and len(data) % DIRECT_ALIGN == 0:
                    # The probe, on whole blocks only: can this filesystem share?
                    _clone_range(src_fd, self._fd, offset, len(data))
                    self._share_blocks = True
                    if progress is not None:
                        progress[0] = offset + len(data)
                    return
            except OSError as e:
                if share or e.errno not in _NO_SHARING:
                    raise
                if e.errno != errno.EINVAL:  # EINVAL may be this range only: ask again
                    self._share_blocks = False
        if direct and self._direct and self._dfd is not None and offset % DIRECT_ALIGN == 0:
            whole = len(data) - len(data) % DIRECT_ALIGN
            try:
                if whole:
                    _pwrite_all(self._dfd, data[:whole], offset, progress)
                    data, offset = data[whole:], offset + whole
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._direct = False  # refused after all: the page cache from now on
        if data:
            _pwrite_all(self._fd, data, offset, progress)

    def _read_source(self, source: Source, offset: int, length: int,
                     bulk: bool) -> tuple[memoryview, bool]:
        """Source bytes ``[offset, offset+length)`` and whether they were read with
        direct I/O (only ``bulk``) into the aligned per-thread buffer."""
        src_fd = source.fileno()
        if src_fd is None:
            return memoryview(source.pread(offset, length)), False
        buf = getattr(self._local, "buf", None)
        if buf is None:  # anonymous mmap: page-aligned, as direct I/O needs
            buf = self._local.buf = memoryview(mmap.mmap(-1, COPY_CHUNK))
        dfd = source.direct_fileno() if bulk and self._direct else None
        direct = dfd is not None and offset % DIRECT_ALIGN == 0
        got = 0
        if dfd is not None and direct:
            try:
                # Whole blocks; the last may run past the end of the file, which is short.
                got = os.preadv(dfd, [buf[:-(-length // DIRECT_ALIGN) * DIRECT_ALIGN]], offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._direct = direct = False  # refused after all (alignment, filesystem)
        if not direct:
            got = os.preadv(src_fd, [buf[:length]], offset)
        if got < length:
            raise OSError(errno.EIO, f"source {source.spec} ended early at offset {offset + got}")
        return buf[:length], direct

    def fill(self, first: int, end: int, wait: bool = False,
             bulk: bool = False) -> tuple[int, int]:
        """Copy absent regions of ``[first, end)`` from the source and make them present.

        This is the copier's write and CACHE's: regions that are present are "done"
        without being written (invariant 4); regions owned by another caller are
        skipped unless ``wait``. ``bulk``: a copier batch, moved with direct I/O.
        Return ``(regions filled, source bytes read)``.
        """
        with self._cond:
            # Present regions are "done" without writing (the seed's skipped write).
            self.stats.regions_skipped += sum(
                b - a for a, b, present in self._map.runs(first, end) if present)
            runs = self._take(first, end, wait)
            taken = sum(b - a for a, b in runs)
        read = 0
        done: list[tuple[int, int]] = []  # runs whose bytes are all in the clone
        try:
            for a, b in runs:
                start, _ = self.geometry.bounds(a)
                _, stop = self.geometry.bounds(b - 1)
                progress = [start]
                try:
                    read += self._copy_from_source(start, stop, progress, bulk)
                except BaseException:
                    # Keep the whole regions copied before the failure (a full disk
                    # mid-batch must not throw away what was written).
                    whole = b - a if progress[0] >= stop else \
                        (progress[0] - start) >> self.geometry.shift
                    done.append((a, a + whole))
                    raise
                done.append((a, b))
                drop_cached(self._fd, start, stop - start)
        finally:
            self._release(runs, done)
            with self._cond:
                self.stats.bytes_copied += read
        return taken, read

    # -- the guest's operations -------------------------------------------------

    def _guest(self) -> _GuestOp:
        return _GuestOp(self)

    def read(self, offset: int, length: int) -> bytearray:
        """Source ⊕ acknowledged writes (invariant 3): present runs from the clone,
        absent runs from the source, split where they meet."""
        with self._guest():
            absent_seen = False
            if self.copy_on_read:
                first, end = self._span(offset, length)
                with self._cond:
                    absent_seen = self._map.find_absent(first, end) is not None
                if absent_seen:
                    self.fill(first, end, wait=True)
            buf = bytearray(length)
            view = memoryview(buf)
            from_source = 0
            for start, stop, present in self._byte_runs(offset, length):
                part = view[start - offset:stop - offset]
                absent_seen = absent_seen or not present
                if present:
                    got = os.preadv(self._fd, [part], start)
                    if got < len(part):
                        part[got:] = bytes(len(part) - got)
                else:
                    part[:] = self._need_source().pread(start, stop - start)
                    from_source += stop - start
            self._count_read(offset, length, from_source, absent_seen)
            return buf

    def read_nowait(self, offset: int, length: int) -> bytearray | None:
        """The read, served without blocking, or None if it would block.

        For event-loop frontends: it succeeds when every byte is in the page cache
        (``RWF_NOWAIT``), from the clone file for present regions and from a local
        source's file for absent ones; otherwise the caller runs ``read`` in a
        worker thread. With copy-on-read, absent regions always take that path."""
        buf = bytearray(length)
        view = memoryview(buf)
        src_fd = -1
        if self._map.complete:  # present regions never change back: no lock needed
            runs: list[tuple[int, int, bool]] = [(offset, offset + length, True)]
        else:
            runs = list(self._byte_runs(offset, length))
            if any(not present for _, _, present in runs):
                local = self.source.fileno() if self.source is not None else None
                if local is None or self.copy_on_read:
                    return None
                src_fd = local
        for start, stop, present in runs:
            fd = self._fd if present else src_fd
            try:
                got = os.preadv(fd, [view[start - offset:stop - offset]], start, _RWF_NOWAIT)
            except OSError:  # EAGAIN: not cached; EOPNOTSUPP: no NOWAIT here
                return None
            if got < stop - start:
                return None
        absent = sum(stop - start for start, stop, present in runs if not present)
        self._count_read(offset, length, absent, absent > 0)
        return buf

    def write_nowait(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Do a small write at once if every region it touches is present, and
        return True; return False (nothing done) if the caller must use ``write``.

        A present region needs no ownership and no fill (it never goes back to
        absent), so this is one ``pwrite`` into the page cache. For event-loop
        frontends, for small writes only: a large one could wait on writeback."""
        if len(data) > NOWAIT_WRITE_MAX:
            return False
        if not self._map.complete:
            first, end = self._span(offset, len(data))
            with self._cond:
                if self._map.find_absent(first, end) is not None:
                    return False
        _pwrite_all(self._fd, data, offset)
        self._count_write(len(data))
        return True

    def _count_read(self, offset: int, length: int, from_source: int,
                    touched_absent: bool) -> None:
        """Account a guest read, and steer the copier to what it touched."""
        with self._cond:
            self.stats.guest_reads += 1
            self.stats.guest_bytes_read += length
            self.stats.bytes_from_source += from_source
            self.last_guest_io = time.monotonic()
        hook = self.on_absent_read
        if touched_absent and hook is not None:
            hook(*self._span(offset, length))

    def _count_write(self, length: int) -> None:
        with self._cond:
            self.stats.guest_writes += 1
            self.stats.guest_bytes_written += length
            self.last_guest_io = time.monotonic()

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        span = self.geometry.span(offset, length)
        return span.start, span.stop

    def _byte_runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """Split ``[offset, offset+length)`` into byte runs that are all present or
        all absent, from one snapshot of the map."""
        first, end = self._span(offset, length)
        stop_at = offset + length
        shift = self.geometry.shift
        for a, b, present in self.present_runs(first, end):
            yield max(offset, a << shift), min(stop_at, b << shift), present

    def _modify(self, offset: int, length: int, fua: bool,
                apply: Callable[[], None]) -> None:
        """A guest write, or zero-write: own the absent regions touched, fill the parts
        of partly covered absent regions from the source (invariant 5), apply the
        change, then mark them present. All before returning (the acknowledgement)."""
        first, end = self._span(offset, length)
        with self._guest(), self._owning(first, end, wait=True) as own:
            for a, b in own.runs:
                for r in {a, b - 1}:
                    rs, re_ = self.geometry.bounds(r)
                    if offset > rs:
                        self._copy_from_source(rs, min(offset, re_))
                    if offset + length < re_:
                        self._copy_from_source(max(offset + length, rs), re_)
            apply()
            own.made_present = True
            self._count_write(length)
        if fua:
            self.flush()

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._modify(offset, len(data), fua, lambda: _pwrite_all(self._fd, data, offset))

    def write_zeroes(self, offset: int, length: int, fua: bool = False,
                     no_hole: bool = False) -> None:
        """Zero a range. Whole absent regions become present holes with nothing
        copied (invariant 2); partly covered absent regions are filled first."""
        def apply() -> None:
            if no_hole:
                _fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            else:
                punch_hole(self._fd, offset, length)

        self._modify(offset, length, fua, apply)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard a range. Whole regions become present holes (invariant 2); on a
        partly covered present region the covered part is punched; a partly covered
        absent region is left alone: trim is advisory and must not zero the rest."""
        with self._guest():
            rs = self.region_size
            inner_start = -(-offset // rs) * rs
            inner_end = min(((offset + length) // rs) * rs, self.size)
            if offset + length >= self.size:
                inner_end = self.size  # the short last region is covered whole
            if inner_end > inner_start:
                first, end = self._span(inner_start, inner_end - inner_start)
                with self._owning(first, end, wait=True) as own:
                    punch_hole(self._fd, inner_start, inner_end - inner_start)
                    own.made_present = True
            else:
                inner_start = inner_end = offset
            # Partly covered edges: punch only where present, under ownership so a
            # concurrent fill cannot make them present behind our back.
            for start, stop in ((offset, min(inner_start, offset + length)),
                                (max(inner_end, offset), offset + length)):
                if stop <= start:
                    continue
                first, end = self._span(start, stop - start)
                with self._owning(first, end, wait=True):
                    for s, e, present in self._byte_runs(start, stop - start):
                        if present:
                            punch_hole(self._fd, s, e - s)
        if fua:
            self.flush()

    def cache(self, offset: int, length: int) -> None:
        """A hint: fill these regions now."""
        first, end = self._span(offset, length)
        self.fill(first, end, wait=False)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(length, flags)`` extents covering the range: present runs from the clone's
        holes, absent runs from the source's extents. Flags: STATE_HOLE | STATE_ZERO."""
        out: list[tuple[int, int]] = []

        def add(n: int, flags: int) -> None:
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + n, flags)
            else:
                out.append((n, flags))

        for start, stop, present in self._byte_runs(offset, length):
            if present:
                for ext in fd_extents(self._fd, start, stop):
                    add(ext.length, 0 if ext.data else STATE_HOLE | STATE_ZERO)
            elif self.source is not None:
                for ext in self.source.extents(start, stop - start):
                    add(ext.length, 0 if ext.data else STATE_HOLE | STATE_ZERO)
            else:
                add(stop - start, 0)
        return out

    # -- durability --------------------------------------------------------------

    def flush(self) -> None:
        """Make every acknowledged write durable (invariant 6). Blocks."""
        with self._commit_lock:
            with self._cond:
                ranges, self._pending = self._pending, []
            try:
                os.fdatasync(self._fd)  # step 1: data first
                self._store.commit(_merge(ranges))  # step 2: then the map
            except BaseException:
                with self._cond:
                    self._pending[:0] = ranges  # not committed: try again next time
                raise
            with self._cond:
                for a, b in ranges:
                    self._committed.set(a, b)
                self.stats.commits += 1
                self.stats.last_commit = time.time()
                compact = (self._store.records > COMPACT_RECORDS
                           or (self._committed.complete and self._store.records))
                snapshot = RegionMap(self._committed.count, self._committed.to_bytes()) \
                    if compact else None
            if snapshot is not None:
                try:
                    self._store.compact(snapshot)
                except OSError as e:
                    # The journal still holds every bit; compaction can wait.
                    with self._cond:
                        self.last_error = f"map compaction postponed: {e}"

    def _commit_loop(self) -> None:
        while not self._closed.wait(COMMIT_INTERVAL):
            with self._cond:
                idle = not self._pending
            if idle:
                continue
            try:
                self.flush()
            except OSError as e:
                with self._cond:
                    self.last_error = f"periodic commit failed: {e}"

    def close(self) -> None:
        """Commit and close. Blocks."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._committer.is_alive():
            self._committer.join()
        try:
            self.flush()
        finally:
            self._release_files()

    def abandon(self) -> None:
        """Close without committing anything, as ``kill -9`` would: for crash tests."""
        self._closed.set()
        if self._committer.is_alive():
            self._committer.join()
        self._release_files()

    def _release_files(self) -> None:
        try:
            self._store.close()
        finally:
            try:
                for fd in (self._fd, self._dfd):
                    if fd is not None:
                        with contextlib.suppress(OSError):
                            os.close(fd)
            finally:
                if self.source is not None:
                    self.source.close()

    def __enter__(self) -> Clone:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Ownership:
    """Context manager around owned runs: released on exit, made present on request."""

    def __init__(self, clone: Clone, runs: list[tuple[int, int]]) -> None:
        self.clone = clone
        self.runs = runs
        self.made_present = False

    def __enter__(self) -> _Ownership:
        return self

    def __exit__(self, *exc: object) -> None:
        ok = self.made_present and exc[0] is None
        self.clone._release(self.runs, self.runs if ok else [])


class _GuestOp:
    """Counts guest requests in flight, so the copier can yield to them."""

    def __init__(self, clone: Clone) -> None:
        self.clone = clone

    def __enter__(self) -> None:
        with self.clone._cond:
            self.clone.guest_inflight += 1

    def __exit__(self, *exc: object) -> None:
        with self.clone._cond:
            self.clone.guest_inflight -= 1
            self.clone.last_guest_io = time.monotonic()


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
