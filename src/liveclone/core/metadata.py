"""The on-disk region map. The only code that writes liveclone metadata.

Layout, beside the clone file ``CLONE``:

``CLONE.lcmap`` — the superblock, replaced atomically, never edited in place::

    0   8  magic  b"LVCLMAP1"
    8   4  u32    length H of the header JSON
    12  4  u32    length B of the zlib-compressed bitmap
    16  8  u64    generation G
    24  H  JSON   header: uuid, size, region_size, source spec and identity, created
    ..  B  zlib   bitmap, one bit per region, bit r of byte r//8 = region r present
    ..  4  u32    CRC32 of every byte before it

``CLONE.lcjournal`` — an append-only log of newly present ranges::

    0   64        header: magic b"LVCLJRN1", uuid (16 bytes), u64 generation, zeros, CRC32
    64  32 × n    records: u32 magic, u32 CRC32 of the next 24 bytes, u64 commit
                  sequence, u64 first region, u64 region count
    ..            zeros (space reserved with fallocate so a full disk cannot stop a commit)

What *committed* means: region r is committed present iff its bit is set in the
superblock bitmap, or a valid journal record of the same generation covers it.
Replay is idempotent because bits only ever go absent → present (invariant 2).

Commit order (the caller's half comes first, see ``Clone.flush``):

1. the caller makes the clone data durable (fdatasync of the clone file);
2. ``commit()`` writes the records after the last valid one;
3. ``commit()`` fdatasyncs the journal. Only now are the bits committed.

A crash before step 3 completes leaves records that are absent or torn; a torn
record at the tail is ignored on load, because its commit never returned. A bad
record followed by a valid one is corruption, and load refuses with an error.

Compaction (``compact()``), so the journal stays short:

1. write the full bitmap to ``CLONE.lcmap.tmp`` with generation G+1, fsync it;
2. rename it over ``CLONE.lcmap``, fsync the directory;
3. write an empty journal of generation G+1 to ``CLONE.lcjournal.tmp``, fsync it,
   rename it over ``CLONE.lcjournal``, fsync the directory.

A crash between 2 and 3 leaves a journal of generation G under a superblock of
G+1: its records are all in the superblock already, so load ignores and resets it.

Blocking: every call here does file I/O and may block; none takes a lock.
The caller (``Clone``) serialises ``commit`` and ``compact``.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

from liveclone.core.regions import RegionMap, check_region_size
from liveclone.errors import CorruptMetadataError, NotACloneError, TargetError

MAP_SUFFIX = ".lcmap"
JOURNAL_SUFFIX = ".lcjournal"

_SB_MAGIC = b"LVCLMAP1"
_SB_HEAD = struct.Struct("<8sIIQ")
_JR_MAGIC = b"LVCLJRN1"
_JR_HEAD = struct.Struct("<8s16sQ")  # + zero padding + CRC32 in the last 4 bytes
_JR_HEAD_SIZE = 64
_REC = struct.Struct("<IIQQQ")
_REC_MAGIC = 0x5243434C  # "LCCR"
_REC_BODY = struct.Struct("<QQQ")
REC_SIZE = _REC.size
# Journal space reserved ahead of the write position; enough for many commits
# even when the disk fills up.
_RESERVE = 256 << 10
# Compact once the journal holds this many records.
COMPACT_RECORDS = 8192


def map_paths(clone_path: str) -> tuple[str, str]:
    return clone_path + MAP_SUFFIX, clone_path + JOURNAL_SUFFIX


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_atomically(path: str, data: bytes) -> None:
    """tmp + write + fsync + rename + fsync dir: the file is old or new, never torn."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)  # step: the new bytes are durable before they get the name
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.close(fd)
    os.rename(tmp, path)  # step: atomic switch to the new file
    _fsync_dir(path)  # step: the rename itself is durable


@dataclass
class MapHeader:
    """What the superblock says about the clone."""

    uuid: str
    size: int
    region_size: int
    source: dict[str, Any]
    created: float

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> MapHeader:
        try:
            d = json.loads(raw)
            hdr = cls(
                uuid=str(d["uuid"]),
                size=int(d["size"]),
                region_size=int(d["region_size"]),
                source=dict(d["source"]),
                created=float(d["created"]),
            )
            check_region_size(hdr.region_size)
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptMetadataError(f"{where}: header is unreadable ({e})") from None
        return hdr


def _encode_superblock(header: MapHeader, rmap: RegionMap, generation: int) -> bytes:
    hdr = header.to_json()
    bitmap = zlib.compress(rmap.to_bytes(), 1)
    body = _SB_HEAD.pack(_SB_MAGIC, len(hdr), len(bitmap), generation) + hdr + bitmap
    return body + struct.pack("<I", zlib.crc32(body))


def _corrupt(path: str, what: str) -> CorruptMetadataError:
    return CorruptMetadataError(
        f"the region map {path} is corrupt: {what}. liveclone will not guess which "
        "regions hold guest data. Restore the map from a backup, or delete the clone "
        "and its .lcmap/.lcjournal files and clone again."
    )


def _decode_superblock(path: str, raw: bytes) -> tuple[MapHeader, RegionMap, int]:
    if len(raw) < _SB_HEAD.size + 4 or raw[:8] != _SB_MAGIC:
        raise _corrupt(path, "bad magic or truncated superblock")
    _, hlen, blen, generation = _SB_HEAD.unpack_from(raw)
    end = _SB_HEAD.size + hlen + blen
    if len(raw) != end + 4:
        raise _corrupt(path, f"superblock is {len(raw)} bytes, expected {end + 4} (truncated?)")
    (crc,) = struct.unpack_from("<I", raw, end)
    if zlib.crc32(raw[:end]) != crc:
        raise _corrupt(path, "superblock checksum mismatch")
    header = MapHeader.from_json(raw[_SB_HEAD.size:_SB_HEAD.size + hlen], path)
    count = (header.size + header.region_size - 1) // header.region_size
    try:
        bits = zlib.decompress(raw[_SB_HEAD.size + hlen:end])
        rmap = RegionMap(count, bits)
    except (zlib.error, ValueError) as e:
        raise _corrupt(path, f"bitmap is unreadable ({e})") from None
    return header, rmap, generation


def _journal_header(uid: str, generation: int) -> bytes:
    head = _JR_HEAD.pack(_JR_MAGIC, uuid.UUID(uid).bytes, generation)
    head = head.ljust(_JR_HEAD_SIZE - 4, b"\0")
    return head + struct.pack("<I", zlib.crc32(head))


def _encode_record(seq: int, first: int, count: int) -> bytes:
    body = _REC_BODY.pack(seq, first, count)
    return struct.pack("<II", _REC_MAGIC, zlib.crc32(body)) + body


def _decode_record(raw: bytes, pos: int) -> tuple[int, int, int] | None:
    magic, crc, seq, first, count = _REC.unpack_from(raw, pos)
    if magic != _REC_MAGIC or zlib.crc32(raw[pos + 8:pos + REC_SIZE]) != crc:
        return None
    return seq, first, count


class MapStore:
    """The durable half of the region map for one clone.

    Invariant: every bit this store has committed is set in the RegionMap that
    ``load`` returns, and no other bit is.
    """

    def __init__(self, clone_path: str, header: MapHeader, generation: int,
                 jfd: int, write_pos: int, seq: int, records: int) -> None:
        self.clone_path = clone_path
        self.map_path, self.journal_path = map_paths(clone_path)
        self.header = header
        self.generation = generation
        self._jfd = jfd
        self._write_pos = write_pos  # byte offset of the next record in the journal
        self._seq = seq  # sequence number of the last commit
        self.records = records  # records in the journal, for the compaction policy

    # -- creation and loading -------------------------------------------------

    @classmethod
    def create(cls, clone_path: str, header: MapHeader) -> MapStore:
        """Write a new, empty map. Blocks. The superblock is written last: it is the
        marker that the clone exists."""
        map_path, journal_path = map_paths(clone_path)
        rmap = RegionMap((header.size + header.region_size - 1) // header.region_size)
        try:
            _write_file_atomically(journal_path, _journal_header(header.uuid, 0))
            _write_file_atomically(map_path, _encode_superblock(header, rmap, 0))
        except OSError as e:
            raise TargetError(
                f"cannot create the region map {map_path}: {e.strerror}; "
                "check that the clone's directory exists and is writable"
            ) from None
        store, _ = cls._open(clone_path, header, rmap, 0)
        return store

    @staticmethod
    def new_header(size: int, region_size: int, source: dict[str, Any], now: float) -> MapHeader:
        return MapHeader(str(uuid.uuid4()), size, region_size, source, now)

    @staticmethod
    def exists(clone_path: str) -> bool:
        return os.path.exists(map_paths(clone_path)[0])

    @staticmethod
    def read(clone_path: str) -> tuple[MapHeader, RegionMap]:
        """Read the committed map without opening it for writing (for ``status``)."""
        header, rmap, generation = MapStore._read_superblock(clone_path)
        _, journal_path = map_paths(clone_path)
        try:
            with open(journal_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise _corrupt(journal_path, "the journal is missing") from None
        MapStore._replay(journal_path, raw, header, generation, rmap)
        return header, rmap

    @staticmethod
    def _read_superblock(clone_path: str) -> tuple[MapHeader, RegionMap, int]:
        map_path, _ = map_paths(clone_path)
        try:
            with open(map_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise NotACloneError(
                f"{clone_path} has no liveclone map ({map_path} is missing)"
            ) from None
        return _decode_superblock(map_path, raw)

    @classmethod
    def load(cls, clone_path: str) -> tuple[MapStore, RegionMap]:
        """Open an existing map for writing. Blocks. Raises NotACloneError or
        CorruptMetadataError; never repairs by guessing."""
        header, rmap, generation = cls._read_superblock(clone_path)
        return cls._open(clone_path, header, rmap, generation)

    @classmethod
    def _open(cls, clone_path: str, header: MapHeader, rmap: RegionMap,
              generation: int) -> tuple[MapStore, RegionMap]:
        _, journal_path = map_paths(clone_path)
        try:
            jfd = os.open(journal_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _corrupt(journal_path, "the journal is missing") from None
        try:
            raw = os.pread(jfd, os.fstat(jfd).st_size, 0)
            jgen, pos, seq, records = cls._replay(journal_path, raw, header, generation, rmap)
            store = cls(clone_path, header, generation, jfd, pos, seq, records)
            if jgen != generation:
                # Crash between compaction steps 2 and 3: the superblock already
                # holds every journalled bit. Finish step 3 now.
                store._reset_journal(generation)
            store._reserve(0)
        except BaseException:
            os.close(jfd)
            raise
        return store, rmap

    @staticmethod
    def _replay(path: str, raw: bytes, header: MapHeader, generation: int,
                rmap: RegionMap) -> tuple[int, int, int, int]:
        """Apply valid records to ``rmap``; return (generation, write pos, last seq, records)."""
        if len(raw) < _JR_HEAD_SIZE:
            raise _corrupt(path, "journal header is truncated")
        head = raw[:_JR_HEAD_SIZE]
        magic, uid, jgen = _JR_HEAD.unpack_from(head)
        if magic != _JR_MAGIC or zlib.crc32(head[:-4]) != struct.unpack_from("<I", head, 60)[0]:
            raise _corrupt(path, "bad journal header")
        if uuid.UUID(bytes=uid) != uuid.UUID(header.uuid):
            raise _corrupt(path, "the journal belongs to a different clone")
        if jgen > generation:
            raise _corrupt(path, f"journal generation {jgen} is newer than the map's {generation}")
        if (len(raw) - _JR_HEAD_SIZE) % REC_SIZE:
            raise _corrupt(path, f"journal length {len(raw)} is not whole records (truncated?)")
        pos, seq, records = _JR_HEAD_SIZE, 0, 0
        while pos < len(raw):
            rec = _decode_record(raw, pos)
            if rec is None:
                break
            rseq, first, count = rec
            if rseq < seq or first + count > rmap.count:
                raise _corrupt(path, f"journal record at byte {pos} is out of range")
            if jgen == generation:
                rmap.set(first, first + count)
            seq, pos, records = rseq, pos + REC_SIZE, records + 1
        # Past the end of the log only zeros (reserved space) or one torn commit may lie.
        # A valid record after a bad one means damage in the middle of the log.
        if raw[pos:].strip(b"\0"):  # usually all reserved zeros: nothing to scan
            for later in range(pos + REC_SIZE, len(raw) - REC_SIZE + 1, REC_SIZE):
                if _decode_record(raw, later) is not None:
                    raise _corrupt(path, f"journal record at byte {pos} is damaged")
        return jgen, pos, seq, records

    # -- writing ----------------------------------------------------------------

    def commit(self, ranges: list[tuple[int, int]]) -> None:
        """Make ``(first, end)`` region ranges committed-present. Blocks; durable on
        return. The caller must have made their clone data durable before calling."""
        if not ranges:
            return
        seq = self._seq + 1
        data = b"".join(_encode_record(seq, a, b - a) for a, b in ranges)
        self._reserve(len(data))
        view, pos = memoryview(data), self._write_pos
        while view:  # step 2: records after the last valid one
            n = os.pwrite(self._jfd, view, pos)
            view, pos = view[n:], pos + n
        os.fdatasync(self._jfd)  # step 3: now the bits are committed
        self._write_pos, self._seq = pos, seq
        self.records += len(ranges)

    def _reserve(self, nbytes: int) -> None:
        """Keep reserved journal space ahead of the write position."""
        size = os.fstat(self._jfd).st_size
        if self._write_pos + nbytes <= size - REC_SIZE * 64:
            return
        want = self._write_pos + nbytes + _RESERVE
        try:
            os.posix_fallocate(self._jfd, size, want - size)
            os.fsync(self._jfd)  # the new size must survive a crash, or replay sees less
        except OSError as e:
            if e.errno != errno.ENOSPC or self._write_pos + nbytes > size:
                raise
            # Disk full, but the old reserve still holds this commit: go on.

    def compact(self, rmap: RegionMap) -> None:
        """Fold the journal into a new superblock. Blocks. ``rmap`` must hold only
        committed bits (``Clone`` passes its committed map)."""
        generation = self.generation + 1
        _write_file_atomically(self.map_path, _encode_superblock(self.header, rmap, generation))
        self.generation = generation  # steps 1-2 done: the superblock alone holds every bit
        self._reset_journal(generation)

    def _reset_journal(self, generation: int) -> None:
        _write_file_atomically(self.journal_path, _journal_header(self.header.uuid, generation))
        jfd = os.open(self.journal_path, os.O_RDWR | os.O_CLOEXEC)
        os.close(self._jfd)
        self._jfd, self._write_pos, self.records = jfd, _JR_HEAD_SIZE, 0
        try:
            self._reserve(0)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            # No room for a reserve now: commits will try again.

    def close(self) -> None:
        if self._jfd >= 0:
            os.close(self._jfd)
            self._jfd = -1
