"""Verify a clone against the digests recorded while it was copied (``core.digests``).

Read-only: the committed map is read as ``status`` reads it (``MapStore.read``), the
clone and digest files are opened O_RDONLY, and no lock is taken, so a clone that
another process serves or copies can be verified meanwhile. Only regions present
in the committed map are checked (a region never goes back to absent).

Per chunk of present regions (at most CHUNK bytes): the clone's bytes are read
first (whole regions that are holes, by SEEK_HOLE, count as zeros without being
read), then the chunk's slots. That order is what makes a live clone safe: a
guest's write into a copied region is preceded by its slot saying "guest" or "open"
(write intent), so a slot read after bytes that include the guest's never holds
the old digest alone: an open slot whose digest differs from the bytes counts the
region as the guest's.

Disk speed: one reader thread per file (the clone, and the source with
``--against-source``) reads its chunks in order into a ring of DEPTH reused
buffers, so the kernel sees one sequential stream per file and both files are
read at once; the calling thread digests a chunk (XXH3-64 of memoryview slices,
no copies) while the readers fill the next ones, and compares the chunk's slots
with one bytes compare (``copied_slots``), decoding slot by slot only a chunk
that holds something else than matching copied regions.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import xxhash

from liveclone.core.digests import (
    COPIED,
    DAMAGED,
    GUEST,
    HEADER_SIZE,
    NONE,
    OPEN,
    ZEROS,
    check_header,
    copied_slots,
    decode_slots,
    digest_of,
    digest_path,
    read_slot_bytes,
)
from liveclone.core.metadata import MapStore
from liveclone.core.regions import RegionMap
from liveclone.errors import NotACloneError
from liveclone.sources.base import Extent, Source
from liveclone.sources.local import fd_extents

# Bytes per read, and the most bytes of one chunk of regions (a region larger than
# this is read, and digested, in pieces of this size).
CHUNK = 4 << 20
# Buffers per file: how many chunks its reader may be ahead of the digesting.
DEPTH = 4
# Bytes the kernel is asked to read ahead of the chunk being read (WILLNEED).
AHEAD = 32 << 20

# Regions named one by one in a report; the rest are counted.
LIST_MAX = 20

Run = tuple[int, int]


@dataclass
class Report:
    """What a verify found. Offsets are bytes; runs are ``(first, end)`` regions."""

    clone: str
    region_size: int
    regions_total: int
    regions_present: int = 0
    matched: int = 0  # copied regions whose clone bytes match their digest
    mismatched: list[int] = field(default_factory=list)  # first LIST_MAX regions
    mismatch_count: int = 0
    guest_runs: list[Run] = field(default_factory=list)  # written/zeroed/trimmed
    guest_count: int = 0
    unverified_count: int = 0  # present with no digest (copied before digests)
    damaged: list[int] = field(default_factory=list)  # slots whose CRC is wrong
    damaged_count: int = 0
    source_checked: bool = False
    source_problem: str | None = None  # the source's identity changed since the copy
    source_resized: bool = False  # another size: nothing of it can be compared
    source_matched: int = 0
    source_mismatched: list[int] = field(default_factory=list)
    source_mismatch_count: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.mismatch_count or self.damaged_count or self.source_mismatch_count
                    or self.source_resized)

    def to_json(self) -> dict[str, Any]:
        rs = self.region_size

        def where(regions: list[int]) -> list[dict[str, int]]:
            return [{"region": r, "offset": r * rs, "length": rs} for r in regions]

        return {
            "ok": self.ok,
            "clone": self.clone,
            "region_size": rs,
            "regions_total": self.regions_total,
            "regions_present": self.regions_present,
            "matched": self.matched,
            "mismatches": self.mismatch_count,
            "first_mismatches": where(self.mismatched),
            "guest_written": self.guest_count,
            "guest_ranges": [{"offset": a * rs, "length": (b - a) * rs}
                             for a, b in self.guest_runs],
            "unverified": self.unverified_count,
            "damaged_digests": self.damaged_count,
            "first_damaged": where(self.damaged),
            "against_source": self.source_checked,
            "source_problem": self.source_problem,
            "source_resized": self.source_resized,
            "source_matched": self.source_matched,
            "source_mismatches": self.source_mismatch_count,
            "first_source_mismatches": where(self.source_mismatched),
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
        }


def _note(regions: list[int], r: int) -> None:
    if len(regions) < LIST_MAX:
        regions.append(r)


def _chunks(rmap: RegionMap, per_chunk: int) -> list[Run]:
    out = []
    for a, b in rmap.ranges():
        for x in range(a, b, per_chunk):
            out.append((x, min(x + per_chunk, b)))
    return out


# A chunk's part, in region order: digests already known (holes; a region larger
# than a buffer, digested as it was read), or whole regions to digest.
Part = list[int] | memoryview | bytes


class _Reader:
    """Reads chunks of one file, in order, in a thread of its own into DEPTH reused
    buffers; ``next()``, in the caller's thread, digests the next chunk. Regions
    that are holes as a whole are not read (SEEK_DATA/SEEK_HOLE, where ``holes``)."""

    def __init__(self, fd: int | None, pread: Callable[[int, int], bytes] | None,
                 size: int, region_size: int, holes: bool) -> None:
        self.fd, self.pread, self.size, self.rs = fd, pread, size, region_size
        self.holes = holes and fd is not None
        self.shift = region_size.bit_length() - 1
        self._bufs: list[memoryview] = []
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[int, list[Part], int] | BaseException] = (
            queue.SimpleQueue())
        self._stop = False
        self._thread: threading.Thread | None = None
        self._exts: Iterator[Extent] | None = None  # the file's extents, walked once
        self._ext: Extent | None = None  # the first not yet passed
        self._found = 0  # chunks whose data runs were found (and asked for, in AHEAD)
        self._ahead: deque[list[Run]] = deque()  # those runs, from the next chunk on

    def start(self, chunks: list[Run]) -> None:
        self._bufs = [memoryview(mmap.mmap(-1, CHUNK)) for _ in range(DEPTH)]
        for k in range(DEPTH):
            self._free.put(k)
        self._thread = threading.Thread(target=self._run, args=(chunks,), daemon=True,
                                        name="verify-read")
        self._thread.start()

    def close(self) -> None:
        """Stop reading (at the end of the read in progress) and wait for it."""
        self._stop = True
        self._free.put(-1)
        if self._thread is not None:
            self._thread.join()
        self._bufs = []

    def next(self) -> tuple[list[int], int]:
        """The digests of the next chunk's regions, and the bytes read for them.
        Raises what reading raised."""
        item = self._done.get()
        if isinstance(item, BaseException):
            raise item
        k, parts, nread = item
        rs, got = self.rs, []
        for part in parts:
            if isinstance(part, list):
                got += part
            else:
                got += [digest_of(part[i:i + rs]) for i in range(0, len(part), rs)]
        self._free.put(k)  # its bytes are digested: the reader may fill it again
        return got, nread

    def _run(self, chunks: list[Run]) -> None:
        try:
            for j, (a, b) in enumerate(chunks):
                k = self._free.get()
                if self._stop:
                    return
                parts, nread = self._chunk(a, b, self._runs(chunks, j), self._bufs[k])
                self._done.put((k, parts, nread))
        except BaseException as e:  # handed to the caller's next()
            self._done.put(e)

    def _runs(self, chunks: list[Run], j: int) -> list[Run]:
        """The data runs of chunk ``j``. Those of the chunks that start less than
        AHEAD bytes after it are found now too (in order, each once) and asked of
        the kernel (POSIX_FADV_WILLNEED) up to that point, so the disk stays busy
        while this thread waits for a buffer or for the CPU: on a loaded machine
        that is what keeps pace with ``cat``. Only data is asked for: WILLNEED over
        a hole would fill the page cache with zero pages (seconds of CPU per GiB of
        holes). Past AHEAD, a large region is left to the kernel's own read-ahead."""
        sh, fd = self.shift, self.fd
        limit = (chunks[j][0] << sh) + AHEAD
        while self._found < len(chunks) and (self._found <= j
                                             or chunks[self._found][0] << sh < limit):
            runs = self._data_runs(*chunks[self._found])
            for x, y in runs:
                start, end = x << sh, min(y << sh, self.size, limit)
                if fd is not None and start < end:
                    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
            self._ahead.append(runs)
            self._found += 1
        return self._ahead.popleft()

    def _chunk(self, a: int, b: int, runs: list[Run],
               buf: memoryview) -> tuple[list[Part], int]:
        """Read regions ``[a, b)``, whose data ``runs`` are given, into ``buf`` (at
        most its size, or one region)."""
        parts: list[Part] = []
        nread, r, sh = 0, a, self.shift
        for x, y in runs:
            if x > r:
                parts.append(self._zeros(r, x))
            start, stop = x << sh, min(y << sh, self.size)
            if self.rs <= len(buf):
                parts.append(self._read(start, stop - start, buf[(x - a) << sh:]))
            else:
                parts.append([self._digest_pieces(start, stop, buf)])
            nread += stop - start
            r = y
        if r < b:
            parts.append(self._zeros(r, b))
        return parts, nread

    def _data_runs(self, a: int, b: int) -> list[Run]:
        """Runs of regions of ``[a, b)`` that hold any data (the rest are holes).
        Chunks come in order, so one walk over the file's extents serves them all:
        a data extent that spans many chunks costs one SEEK_DATA/SEEK_HOLE pair, not
        a pair per chunk (on ext4 a pair costs a third of a millisecond)."""
        if not self.holes:
            return [(a, b)]
        assert self.fd is not None
        sh, runs = self.shift, list[Run]()
        start, stop = a << sh, min(b << sh, self.size)
        if self._exts is None:
            self._exts = fd_extents(self.fd, start, self.size)
            self._ext = next(self._exts, None)
        ext = self._ext
        while ext is not None and ext.offset < stop:
            end = ext.offset + ext.length
            if ext.data and end > start:
                x, y = max(ext.offset, start) >> sh, ((min(end, stop) - 1) >> sh) + 1
                if runs and runs[-1][1] >= x:
                    runs[-1] = (runs[-1][0], y)
                else:
                    runs.append((x, y))
            if end > stop:  # it goes on into the next chunk
                break
            ext = next(self._exts, None)
        self._ext = ext
        return runs

    def _zeros(self, a: int, b: int) -> list[int]:
        """Digests of regions ``[a, b)`` that are holes (the short last one's too)."""
        sh = self.shift
        if b << sh <= self.size:
            return [ZEROS(self.rs)] * (b - a)
        return [ZEROS(self.rs)] * (b - 1 - a) + [ZEROS(self.size - ((b - 1) << sh))]

    def _digest_pieces(self, start: int, stop: int, buf: memoryview) -> int:
        """The digest of one region larger than ``buf``, read in pieces."""
        h = xxhash.xxh3_64()
        for pos in range(start, stop, len(buf)):
            h.update(self._read(pos, min(len(buf), stop - pos), buf))
        return h.intdigest()

    def _read(self, pos: int, n: int, buf: memoryview) -> memoryview | bytes:
        """``n`` bytes at ``pos``, read into ``buf`` (a local file) or as returned."""
        if self.fd is None:
            assert self.pread is not None
            return self.pread(pos, n)
        view, got = buf[:n], 0
        while got < n:
            k = os.preadv(self.fd, [view[got:]], pos + got)
            if k == 0:  # a file cut short behind our back reads as zeros past its end
                view[got:] = bytes(n - got)
                break
            got += k
        return view


def verify_clone(path: str, source: Source | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Report:
    """Check every committed present region of the clone at ``path`` against its
    recorded digest; with ``source``, also the source's bytes. ``progress(done,
    total)`` is called with bytes. Raises NotACloneError / CorruptMetadataError."""
    t0 = time.monotonic()
    path = os.path.abspath(path)
    header, rmap = MapStore.read(path)
    rs = header.region_size
    report = Report(path, rs, rmap.count, regions_present=rmap.present_count)
    report.source_checked = source is not None
    if source is not None:
        report.source_problem = source.identity_mismatch(dict(header.source))
        if source.size != header.size:
            report.source_resized = True
            report.source_problem = (f"the source is {source.size} bytes, the clone "
                                     f"{header.size}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotACloneError(f"the clone file {path} is missing") from None
    dfd = -1
    readers = [_Reader(fd, None, header.size, rs, holes=True)]
    try:
        try:
            dfd = os.open(digest_path(path), os.O_RDONLY | os.O_CLOEXEC)
            check_header(digest_path(path), os.pread(dfd, HEADER_SIZE, 0), header.uuid)
        except FileNotFoundError:
            dfd = -1  # a map from before digests, not yet upgraded: all unverified
        if source is not None and source.size == header.size:
            sfd = source.fileno()
            readers.append(_Reader(sfd, None if sfd is not None else source.pread,
                                   header.size, rs, holes=True))
        for rd in readers:
            if rd.fd is not None:
                os.posix_fadvise(rd.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        chunks = _chunks(rmap, max(1, CHUNK // rs))
        for rd in readers:
            rd.start(chunks)
        total, done = rmap.present_count * rs, 0
        for a, b in chunks:
            got, nread = readers[0].next()
            theirs = readers[1].next()[0] if len(readers) > 1 else None
            report.bytes_read += nread
            # The slots after the bytes (see the module's docstring).
            raw = read_slot_bytes(dfd, a, b) if dfd >= 0 else None
            _compare(report, a, raw, got, theirs)
            done += (b - a) * rs
            if progress is not None:
                progress(min(done, total), total)
    finally:
        for rd in readers:
            rd.close()
        os.close(fd)
        if dfd >= 0:
            os.close(dfd)
    report.seconds = time.monotonic() - t0
    return report


def _compare(report: Report, first: int, raw: bytes | None, got: list[int],
             theirs: list[int] | None) -> None:
    """Count regions ``first, first + 1, ...`` by their slots (``raw``, None for
    no digest file), their clone digests ``got`` and source digests ``theirs``."""
    if raw is not None and raw == copied_slots(got) and (theirs is None or theirs == got):
        report.matched += len(got)  # the common case: every region copied and equal
        if theirs is not None:
            report.source_matched += len(got)
        return
    slots = decode_slots(raw) if raw is not None else [(NONE, 0)] * len(got)
    for i, (kind, digest) in enumerate(slots):
        r = first + i
        if kind == COPIED or (kind == OPEN and got[i] == digest):
            if got[i] == digest:
                report.matched += 1
            else:
                report.mismatch_count += 1
                _note(report.mismatched, r)
            if theirs is not None:
                if theirs[i] == digest:
                    report.source_matched += 1
                else:
                    report.source_mismatch_count += 1
                    _note(report.source_mismatched, r)
        elif kind in (GUEST, OPEN):  # open and changed: the guest's (core.digests)
            report.guest_count += 1
            runs = report.guest_runs
            if runs and runs[-1][1] == r:
                runs[-1] = (runs[-1][0], r + 1)
            else:
                runs.append((r, r + 1))
        elif kind == DAMAGED:
            report.damaged_count += 1
            _note(report.damaged, r)
        else:
            report.unverified_count += 1
