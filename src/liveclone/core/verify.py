"""Verify a clone against the digests recorded while it was copied (``core.digests``).

Read-only: the committed map is read as ``status`` reads it (``MapStore.read``), the
clone and digest files are opened O_RDONLY, and no lock is taken, so a clone that
another process serves or copies can be verified meanwhile. Only regions present
in the committed map are checked (a region never goes back to absent).

Per chunk of present regions (16 MiB): the clone's bytes are read first (holes by
SEEK_HOLE, as zeros, without reading), then the chunk's slots. That order is what
makes a live clone safe: a guest's write into a copied region is preceded by its
"guest" slot being written (write intent), so a slot read after bytes that
include the guest's says "guest", never the old digest.

Two chunks are in flight in helper threads (each read, then digested, in its own
buffer), so reading one and digesting the other overlap.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from liveclone.core.digests import (
    COPIED,
    DAMAGED,
    GUEST,
    HEADER_SIZE,
    Digester,
    check_header,
    digest_path,
    read_slots,
)
from liveclone.core.metadata import MapStore
from liveclone.core.regions import RegionMap
from liveclone.errors import NotACloneError
from liveclone.sources.base import Extent, Source
from liveclone.sources.local import fd_extents

CHUNK = 16 << 20
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


class _Reader:
    """Digests of regions ``[first, end)`` of one file, read into its own buffers."""

    def __init__(self, fd: int | None, pread: Callable[[int, int], bytes] | None,
                 size: int, region_size: int, holes: bool) -> None:
        self.fd, self.pread, self.size, self.rs = fd, pread, size, region_size
        self.holes = holes
        self.shift = region_size.bit_length() - 1

    def digests(self, first: int, end: int, buf: memoryview) -> tuple[dict[int, int], int]:
        """Digests of regions ``[first, end)`` and the bytes read, in pieces of at
        most ``len(buf)`` (a region larger than the buffer is hashed in pieces)."""
        start, stop = first << self.shift, min(end << self.shift, self.size)
        dg = Digester(self.size, self.rs)
        read = 0
        extents = (fd_extents(self.fd, start, stop) if self.fd is not None and self.holes
                   else iter([Extent(start, stop - start, True)]))
        for ext in extents:
            if not ext.data:
                dg.zeros(ext.offset, ext.offset + ext.length)
                continue
            pos, ext_end = ext.offset, ext.offset + ext.length
            while pos < ext_end:
                n = min(len(buf), ext_end - pos)
                dg.data(pos, self._read(pos, n, buf))
                read += n
                pos += n
        return dg.items(), read

    def _read(self, pos: int, n: int, buf: memoryview) -> memoryview | bytes:
        if self.fd is None:
            assert self.pread is not None
            return self.pread(pos, n)
        got = os.preadv(self.fd, [buf[:n]], pos)
        if got < n:  # a file cut short behind our back reads as zeros past its end
            buf[got:n] = bytes(n - got)
        return buf[:n]


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
    try:
        try:
            dfd = os.open(digest_path(path), os.O_RDONLY | os.O_CLOEXEC)
            check_header(digest_path(path), os.pread(dfd, HEADER_SIZE, 0), header.uuid)
        except FileNotFoundError:
            dfd = -1  # a map from before digests, not yet upgraded: all unverified
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        per_chunk = max(1, CHUNK // rs)
        clone_reader = _Reader(fd, None, header.size, rs, holes=True)
        src_reader = None
        if source is not None and source.size == header.size:
            sfd = source.fileno()
            src_reader = _Reader(sfd, None if sfd is not None else source.pread,
                                 header.size, rs, holes=sfd is not None)
        total = rmap.present_count * rs
        done = 0
        chunks = _chunks(rmap, per_chunk)
        bufs = [memoryview(mmap.mmap(-1, CHUNK)) for _ in range(4)]
        with ThreadPoolExecutor(4, thread_name_prefix="verify") as pool:

            def submit(i: int) -> tuple[Future[Any], Future[Any] | None]:
                a, b = chunks[i]
                k = 2 * (i % 2)
                mine = pool.submit(clone_reader.digests, a, b, bufs[k])
                theirs = (pool.submit(src_reader.digests, a, b, bufs[k + 1])
                          if src_reader is not None else None)
                return mine, theirs

            ahead = submit(0) if chunks else None
            for i, (a, b) in enumerate(chunks):
                assert ahead is not None
                mine_f, theirs_f = ahead
                # The next chunk is read (into the other buffers) while this one is
                # digested; chunk i+2 reuses this one's buffers once it is done.
                ahead = submit(i + 1) if i + 1 < len(chunks) else None
                got, nread = mine_f.result()
                theirs = theirs_f.result()[0] if theirs_f is not None else None
                report.bytes_read += nread
                # The slots after the bytes (see the module's docstring).
                slots = read_slots(dfd, a, b) if dfd >= 0 else [(0, 0)] * (b - a)
                _compare(report, a, slots, got, theirs)
                done += (b - a) * rs
                if progress is not None:
                    progress(min(done, total), total)
    finally:
        os.close(fd)
        if dfd >= 0:
            os.close(dfd)
    report.seconds = time.monotonic() - t0
    return report


def _compare(report: Report, first: int, slots: list[tuple[int, int]],
             got: dict[int, int], theirs: dict[int, int] | None) -> None:
    for i, (kind, digest) in enumerate(slots):
        r = first + i
        if kind == COPIED:
            if got.get(r) == digest:
                report.matched += 1
            else:
                report.mismatch_count += 1
                _note(report.mismatched, r)
            if theirs is not None:
                if theirs.get(r) == digest:
                    report.source_matched += 1
                else:
                    report.source_mismatch_count += 1
                    _note(report.source_mismatched, r)
        elif kind == GUEST:
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
