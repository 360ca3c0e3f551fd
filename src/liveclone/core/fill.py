"""The fill engine: copy source bytes into the clone file.

Zero runs and source holes become holes in the clone (punched, never trusted:
invariant 8). A local source is read into a reused page-aligned buffer; non-zero
runs are shared with the source where the filesystem can (reflink), else written
from that buffer. Bulk fills (the copier's batches) read with direct I/O where the
files allow it, and write their runs of DIRECT_MIN or more with direct I/O, so a
large copy never waits on page-cache writeback; shorter runs (a map the guest has
fragmented) and guest-driven fills, small and latency-bound, go through the page
cache.

Errors carry their side. Anything the source raises (a read, its extents, a short
read) becomes ``SourceReadError``: retried by the copier with back-off. Errors
writing the clone stay plain ``OSError`` and are never blamed on the source.

A fill is a list of byte runs to write, in order (the absent runs of a batch). The
engine reads them in few, large source reads: runs separated by a gap of at most
``READ_ALONG`` bytes (or what the source says another range costs it:
``Source.read_along``) are read as one, and the gap's bytes are dropped; a longer
gap is skipped. Only the runs are ever written (invariant 4: the gaps are present
regions, the guest's). Small runs are written through the page cache: a direct
write waits for the device, and writeback of many small dirty runs goes out in
parallel at the next commit.

The caller owns every region it fills (``core.ownership``); the engine keeps no
map state, only its I/O strategy.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from liveclone.core import fsops
from liveclone.core.digests import Digester
from liveclone.sources.base import Extent, Source

T = TypeVar("T")

# Largest single read (and write) when filling. Direct I/O on a virtio disk: 32 MiB
# copied 4 GiB in 3.9-5.1 s, 8 MiB in 5.6-7.0 s (3-6 workers, interleaved runs).
COPY_CHUNK = 32 << 20
# Offsets and lengths of direct I/O are multiples of this (any device's logical block).
DIRECT_ALIGN = 4096
# Zero detection granularity cap: an all-zero block this big becomes a hole.
ZERO_BLOCK = 64 << 10
# A present gap between two runs of a fill is read along (and dropped) when it is at
# most this long; a longer one is skipped, at the price of one more read. A read
# costs about this many bytes of transfer on top of its own: a direct 4 KiB read
# here takes 60 us (1.5 GB/s x 60 us = 90 KB), a range request over HTTP on
# loopback 0.2-0.4 ms at about 1 GB/s.
READ_ALONG = 256 << 10
# Runs shorter than this are written through the page cache, longer ones with
# direct I/O. A direct write waits for the device, one at a time per worker: 60 us
# for 4 KiB on an idle disk here, 1-2 ms behind the copy's own reads and
# writeback. The page cache takes a piece in about the time it takes to copy it
# (1 MiB: 0.1 ms) and writeback sends many at once. At 64 KiB, finishing a clone
# of 64 KiB regions after 10k scattered guest writes took 1.9-2.2 s, at 1 MiB
# 1.2-1.7 s, at 4 MiB the same (its unfragmented twin: 1.2-1.3 s); a 32 MiB
# batch of a fresh map still goes direct.
DIRECT_MIN = 1 << 20


# Each copier thread's copy buffer, shared by every clone it fills: a thread fills
# one batch at a time, so a process holds one buffer per copier thread, however
# many clones it has (the daemon: its copier pool's threads). Freed when the thread
# ends. Guest-driven fills read into buffers of their own size (``_read``).
_BUFFERS = threading.local()


class SourceReadError(OSError):
    """Reading the source failed (the source's side, not the clone's)."""


def _source_error(source: Source, e: OSError) -> SourceReadError:
    return SourceReadError(e.errno or errno.EIO,
                           f"reading the source {source.spec} failed: {e.strerror or e}")


def _from_source(source: Source, what: Callable[[], T]) -> T:
    try:
        return what()
    except SourceReadError:
        raise
    except OSError as e:
        raise _source_error(source, e) from e


def _check_length(source: Source, offset: int, length: int, got: int) -> None:
    if got != length:
        raise SourceReadError(errno.EIO, f"the source {source.spec} returned {got} "
                              f"bytes at offset {offset}, not {length}: did it shrink?")


class FillEngine:
    """Moves bytes from one source into one clone file. Thread-safe."""

    def __init__(self, fd: int, source: Source | None, region_size: int,
                 count_source_bytes: Callable[[int], None]) -> None:
        self._fd = fd
        self.source = source
        self._count = count_source_bytes
        self._zero_block = min(ZERO_BLOCK, region_size)
        # Direct I/O on the clone: measured 2-3x faster than the page cache's
        # writeback on a virtio disk. Some filesystems open with O_DIRECT and refuse
        # the I/O (EINVAL): the first refusal turns it off for this clone.
        from liveclone.sources.local import open_direct

        self._dfd = open_direct(fd, os.O_RDWR)
        self._direct = True
        # Source and clone share blocks (reflink): None until the first fill tries.
        self._share_blocks: bool | None = None

    def close(self) -> None:
        if self._dfd is not None:
            os.close(self._dfd)
            self._dfd = None

    def need_source(self) -> Source:
        if self.source is None:
            raise SourceReadError(errno.EIO, "the clone's source is not available")
        return self.source

    def source_extents(self, start: int, end: int) -> Iterator[Extent]:
        source = self.need_source()
        return iter(_from_source(source, lambda: list(source.extents(start, end - start))))

    def source_pread(self, offset: int, length: int) -> bytes:
        source = self.need_source()
        data = _from_source(source, lambda: source.pread(offset, length))
        source.check_unchanged()
        _check_length(source, offset, length, len(data))
        return data

    def copy(self, runs: list[tuple[int, int]], progress: list[int] | None = None,
             bulk: bool = False, digests: Digester | None = None) -> tuple[int, int]:
        """Copy source bytes of each ``(start, end)`` byte run into the clone file;
        ``runs`` are sorted and apart. Return the source bytes read (with the gaps
        read along) and, of them, the bytes of the runs (source holes are not
        read). ``progress[0]``, if given, is kept at an offset below which every
        byte of the runs is written, so a failed copy keeps what it did.
        ``digests``, if given, is handed every piece of the runs (source holes as
        zeros) before the piece is written, from the buffer it was read into: a
        region's digest is of the bytes copied, at no extra read."""
        source = self.need_source()
        starts = [a for a, _ in runs]
        hole: list[int] = []  # [start, end) of a zero run waiting to be punched

        def pieces(start: int, end: int) -> list[tuple[int, int]]:
            """The parts of the runs within ``[start, end)``."""
            i = max(bisect.bisect_right(starts, start) - 1, 0)
            out = []
            while i < len(runs) and runs[i][0] < end:
                a, b = max(runs[i][0], start), min(runs[i][1], end)
                if a < b:
                    out.append((a, b))
                i += 1
            return out

        def punch(start: int, end: int) -> None:
            if hole and hole[1] == start:
                hole[1] = end
                return
            flush_hole()
            hole[:] = [start, end]

        def flush_hole() -> None:
            if hole:
                fsops.punch_hole(self._fd, hole[0], hole[1] - hole[0])
                hole.clear()

        along = source.read_along()
        along = READ_ALONG if along is None else along
        read = copied = 0
        for ext in self.source_extents(runs[0][0], runs[-1][1]):
            ext_end = ext.offset + ext.length
            if not ext.data:
                for a, b in pieces(ext.offset, ext_end):
                    if digests is not None:
                        digests.zeros(a, b)
                    punch(a, b)
                continue
            pos = ext.offset
            while pos < ext_end:
                chunk = pieces(pos, min(pos + COPY_CHUNK, ext_end))
                pos = min(pos + COPY_CHUNK, ext_end)
                # One read per group of pieces whose gaps are short.
                groups, g = [], 0
                for k in range(1, len(chunk) + 1):
                    if k < len(chunk) and chunk[k][0] - chunk[k - 1][1] <= along:
                        continue
                    groups.append((g, k))
                    g = k
                # A local source's reads share one buffer: each is put before the
                # next; a remote source's come together, and are put together.
                reads: list[tuple[memoryview, int, list[tuple[int, int]], bool]] = []
                for (g, k), (data, direct) in zip(
                        groups, self._read_groups(source, [(chunk[g][0], chunk[k - 1][1])
                                                           for g, k in groups], bulk),
                        strict=True):
                    start, end = chunk[g][0], chunk[k - 1][1]
                    read += end - start
                    self._count(end - start)
                    if digests is not None:
                        for a, b in chunk[g:k]:
                            digests.data(a, data[a - start:b - start])
                    reads.append((data, start, chunk[g:k], direct))
                    if source.fileno() is not None:
                        copied += self._put_reads(source, reads, punch, flush_hole, progress)
                        reads = []
                copied += self._put_reads(source, reads, punch, flush_hole, progress)
        flush_hole()
        try:
            source.check_unchanged()  # the bytes read are the source's as recorded
        except BaseException:
            if progress is not None:
                progress[0] = runs[0][0]  # keep nothing of this copy
            raise
        if progress is not None:
            progress[0] = runs[-1][1]
        return read, copied

    def _put_reads(self, source: Source,
                   reads: list[tuple[memoryview, int, list[tuple[int, int]], bool]],
                   punch: Callable[[int, int], None], flush_hole: Callable[[], None],
                   progress: list[int] | None) -> int:
        """Put the pieces of ``(data, start, pieces, direct)`` reads (``data`` holds
        the source bytes from ``start``), in order; return their bytes. Pieces that
        go through the page cache (not shared with the source, not big enough for
        direct I/O) go out together: consecutive ones in one ``fsops.put_runs``, one
        C call without the GIL for any number of them. The others go one by one
        (``_put``)."""
        runs: list[tuple[int, int]] = []
        views: list[memoryview] = []
        one: tuple[memoryview, int] | None = None  # all of runs from this buffer

        def flush() -> None:
            nonlocal one
            if runs:
                flush_hole()
                fsops.put_runs(self._fd, runs, views if one is None else one[0],
                               0 if one is None else one[1], self._zero_block, progress)
                runs.clear()
                views.clear()
            one = None

        total = 0
        for data, start, pieces, direct in reads:
            for a, b in pieces:
                total += b - a
                # Asked for each piece: the first piece of the first fill finds out
                # whether blocks can be shared (``_write``), and the rest of that
                # fill's pieces go out together once they cannot.
                if self._by_cache(source) and not (direct and b - a >= DIRECT_MIN):
                    if not runs:
                        one = (data, start)
                    elif one is not None and one[0] is not data:
                        views[:] = [one[0][x - one[1]:y - one[1]] for x, y in runs]
                        one = None
                    runs.append((a, b))
                    if one is None:
                        views.append(data[a - start:b - start])
                    continue
                flush()
                self._put(source, data[a - start:b - start], a, direct, punch, flush_hole,
                          progress)
        flush()
        return total

    def _by_cache(self, source: Source) -> bool:
        """Source bytes reach the clone through this process (the page cache or
        direct I/O), not shared with the source by the filesystem."""
        return self._share_blocks is False or source.fileno() is None

    def _put(self, source: Source, data: memoryview, offset: int, direct: bool,
             punch: Callable[[int, int], None], flush_hole: Callable[[], None],
             progress: list[int] | None) -> None:
        """Put one piece of a run: all-zero blocks (aligned to the clone) become
        holes, the data between them is written."""
        # Through the page cache, not shared: one pwrite, no more Python.
        by_cache = self._by_cache(source)
        for i, k, zero in fsops.stretches(data, offset, self._zero_block):
            if zero:
                punch(offset + i, offset + k)
                continue
            flush_hole()
            if by_cache and not (direct and k - i >= DIRECT_MIN):
                fsops.pwrite_all(self._fd, data[i:k], offset + i, progress)
            else:
                self._write(source, data[i:k], offset + i,
                            direct and k - i >= DIRECT_MIN, progress)

    def _write(self, source: Source, data: memoryview, offset: int,
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
                    fsops.copy_file_range(src_fd, self._fd, offset, len(data), progress)
                    return
                if offset % DIRECT_ALIGN == 0 and len(data) % DIRECT_ALIGN == 0:
                    # The probe, on whole blocks only: can this filesystem share?
                    fsops.clone_range(src_fd, self._fd, offset, len(data))
                    self._share_blocks = True
                    if progress is not None:
                        progress[0] = offset + len(data)
                    return
            except OSError as e:
                if share or e.errno not in fsops.NO_SHARING:
                    raise
                if e.errno != errno.EINVAL:  # EINVAL may be this range only: ask again
                    self._share_blocks = False
        if direct and self._direct and self._dfd is not None and offset % DIRECT_ALIGN == 0:
            whole = len(data) - len(data) % DIRECT_ALIGN
            try:
                if whole:
                    fsops.pwrite_all(self._dfd, data[:whole], offset, progress)
                    data, offset = data[whole:], offset + whole
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._direct = False  # refused after all: the page cache from now on
        if data:
            fsops.pwrite_all(self._fd, data, offset, progress)

    def _read_groups(self, source: Source, spans: list[tuple[int, int]],
                     bulk: bool) -> Iterator[tuple[memoryview, bool]]:
        """``_read`` of each ``(start, end)`` span, in order. A local source is read
        one span at a time into the thread's buffer (the caller is done with a span
        before asking for the next); any other source is asked for them all at
        once (``Source.read_ranges``: one request for many, where it can)."""
        if source.fileno() is not None or len(spans) < 2:
            for start, end in spans:
                yield self._read(source, start, end - start, bulk)
            return
        ranges = [(start, end - start) for start, end in spans]
        got = _from_source(source, lambda: source.read_ranges(ranges))
        source.check_unchanged()
        for (offset, length), data in zip(ranges, got, strict=True):
            _check_length(source, offset, length, len(data))
            yield memoryview(data), False

    def _read(self, source: Source, offset: int, length: int,
              bulk: bool) -> tuple[memoryview, bool]:
        """Source bytes ``[offset, offset+length)`` and whether they were read with
        direct I/O (only ``bulk``) into the aligned per-thread buffer."""
        src_fd = source.fileno()
        if src_fd is None:
            return memoryview(self.source_pread(offset, length)), False
        if not bulk:
            # A guest-driven fill (copy-on-read, CACHE, a partial write) runs on any
            # of a frontend's threads: it reads into a buffer of its own size, freed
            # with it. Only bulk fills (the copier's workers) keep a COPY_CHUNK
            # buffer, so fill buffers are bounded by the copier's threads, not by
            # how many threads a frontend runs.
            buf = memoryview(bytearray(length))
        else:
            kept: memoryview | None = getattr(_BUFFERS, "buf", None)
            if kept is None:  # anonymous mmap: page-aligned, as direct I/O needs
                kept = _BUFFERS.buf = memoryview(mmap.mmap(-1, COPY_CHUNK))
            buf = kept
        dfd = source.direct_fileno() if bulk and self._direct else None
        direct = dfd is not None and offset % DIRECT_ALIGN == 0
        got = 0
        if dfd is not None and direct:
            try:
                # Whole blocks; the last may run past the end of the file, which is short.
                got = os.preadv(dfd, [buf[:-(-length // DIRECT_ALIGN) * DIRECT_ALIGN]], offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise _source_error(source, e) from e
                self._direct = direct = False  # refused after all (alignment, filesystem)
        if not direct:
            got = _from_source(source, lambda: os.preadv(src_fd, [buf[:length]], offset))
        if got < length:
            raise SourceReadError(errno.EIO, f"the source {source.spec} ended early at offset "
                                  f"{offset + got}: did it shrink?")
        return buf[:length], direct
