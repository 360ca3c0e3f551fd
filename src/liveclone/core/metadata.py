"""The on-disk region map. The only code that writes liveclone metadata.

Layout, beside the clone file ``CLONE``:

``CLONE.lcmap`` — the superblock, replaced atomically, never edited in place::

    0   8  magic  b"LVCLMAP3" (b"LVCLMAP2": before sub-blocks, b"LVCLMAP1": before
                  digests; both read, and upgraded when opened for writing)
    8   4  u32    length H of the header JSON
    12  4  u32    length B of the zlib-compressed bitmap
    16  8  u64    generation G
    24  H  JSON   header: uuid, size, region_size, source spec and identity, created
    ..  B  zlib   bitmap, one bit per region, bit r of byte r//8 = region r present
    ..  4  u32    length S of the sub-block section (LVCLMAP3 only)
    ..  S  zlib   sub-blocks of absent regions: 16-byte runs u64 region, u32 first
                  block, u32 block count (``core.regions``: written 4 KiB blocks)
    ..  4  u32    CRC32 of every byte before it

``CLONE.lcjournal`` — an append-only log of commits of newly present ranges::

    0   64        header: magic b"LVCLJRN2", uuid (16 bytes), u64 generation, zeros, CRC32
    64  32 × n    commits, each: k range records then one trailer record
                  range:   u32 b"LCCR", u32 CRC32 of the next 24 bytes,
                           u64 commit sequence, u64 first region, u64 region count
                  blocks:  u32 b"LCCB", u32 CRC32 of the next 24 bytes,
                           u64 commit sequence, u64 region, u32 first block,
                           u32 block count (written sub-blocks of an absent region)
                  trailer: u32 b"LCCT", u32 CRC32 of the next 24 bytes,
                           u64 commit sequence, u64 k, u32 CRC32 of the k ranges, u32 0
    ..            zeros (space reserved with fallocate so a full disk cannot stop a commit)

``CLONE.lcdigest`` — one slot per region: the digest of what a fill copied, or
"guest" (see ``core.digests``). A LVCLMAP2 or 3 superblock promises this file
exists. A LVCLMAP1 map (no digest file) is upgraded when opened for writing: an
empty digest file is made, then the superblock is rewritten as LVCLMAP3 (a
compaction), so an older liveclone, which would not keep the digests, refuses the
map from then on. A LVCLMAP2 map is rewritten as LVCLMAP3 the same way: its
journal may then get sub-block records, which an older liveclone would take for a
torn commit and drop. A missing digest file under LVCLMAP2/3 is made again, empty
(its regions verify as "unverified", never as a mismatch); a damaged one is
refused.

What *committed* means: region r is committed present iff its bit is set in the
superblock bitmap, or a **complete** commit of a journal of the same generation
covers it. A block of an absent region is committed written iff the superblock's
sub-block section or a complete commit's blocks record names it. A commit is
complete when its trailer is valid, counts its records and their CRC matches;
sequence numbers strictly increase. Replay is idempotent because bits only ever go
absent → present (invariant 2) and written blocks stay written until their region
is present, which supersedes them.

Commit order (the caller's half comes first, see ``core.durability``):

1. the caller makes the clone data durable (fdatasync of the clone file), then
   the digest slots (``digests.sync()``): a committed bit never vouches for a slot
   that is not durable;
2. ``commit()`` appends the ranges and the trailer after the last complete commit;
3. ``commit()`` fdatasyncs the journal. Only now are the bits committed.

A power cut during steps 2-3 can leave any subset of that commit's pages on disk
(a *torn* tail). Its commit never returned, so load ignores it and, when opening
for writing, zeroes it before appending. Bytes after the last complete commit
followed by a later complete commit are damage, not a torn tail: load refuses
them with CorruptMetadataError.

Compaction (``compact()``), so the journal stays short:

1. write the full bitmap to ``CLONE.lcmap.tmp`` with generation G+1, fsync it;
2. rename it over ``CLONE.lcmap``, fsync the directory;
3. write an empty journal of generation G+1 to ``CLONE.lcjournal.tmp``, fsync it,
   rename it over ``CLONE.lcjournal``, fsync the directory.

A journal of generation G under a superblock of G+1 (a crash or failure between 2
and 3) holds only bits the superblock already has: load ignores it, and opening
for writing finishes step 3. A failure in step 1 changes nothing (the tmp file is
removed, compaction is postponed). A failure from step 2 on leaves the store
*broken*: it refuses every later call, because the generation on disk is unknown
and appending to a journal that replay would ignore would lose commits. The owner
must then fail the clone (invariant 9); the next open settles the generation.

Blocking: every call here does file I/O and may block; none takes a lock.
The caller serialises ``commit`` and ``compact``.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import time
import uuid
import zlib
from typing import Any

from liveclone.core import fsops
from liveclone.core.digests import DigestStore, digest_path
from liveclone.core.regions import (
    BLOCK_SHIFT,
    RegionMap,
    block_mask,
    check_region_size,
    mask_runs,
)
from liveclone.errors import CorruptMetadataError, NotACloneError, TargetError
from liveclone.values import Value

MAP_SUFFIX = ".lcmap"
JOURNAL_SUFFIX = ".lcjournal"

_SB_MAGIC = b"LVCLMAP3"
_SB_MAGIC_V2 = b"LVCLMAP2"  # before sub-blocks: read, and upgraded when opened for writing
_SB_MAGIC_V1 = b"LVCLMAP1"  # before digests: read, and upgraded when opened for writing
_SB_MAGICS = (_SB_MAGIC, _SB_MAGIC_V2, _SB_MAGIC_V1)
_SB_HEAD = struct.Struct("<8sIIQ")
_JR_MAGIC = b"LVCLJRN2"
_JR_HEAD = struct.Struct("<8s16sQ")  # + zero padding + CRC32 in the last 4 bytes
_JR_HEAD_SIZE = 64
_REC = struct.Struct("<IIQQQ")
_REC_MAGIC = 0x5243434C  # "LCCR": a range
_BLK_MAGIC = 0x4243434C  # "LCCB": written sub-blocks of one absent region
_END_MAGIC = 0x5443434C  # "LCCT": a commit's trailer
_REC_BODY = struct.Struct("<QQQ")
_BLK_BODY = struct.Struct("<QQII")
_BLK_RUN = struct.Struct("<QII")  # a run of the superblock's sub-block section
_END_BODY = struct.Struct("<QQII")
REC_SIZE = _REC.size
# Journal space reserved ahead of the write position; enough for many commits
# even when the disk fills up.
_RESERVE = 256 << 10
# Compact once the journal holds this many records.
COMPACT_RECORDS = 8192
# Readers (status, pause) retry this long while the owner compacts under them.
READ_RETRY_SECONDS = 2.0
DEFAULT_MODE = 0o644


def map_paths(clone_path: str) -> tuple[str, str, str]:
    """The map's files: superblock, journal, digests (removed with the clone)."""
    return clone_path + MAP_SUFFIX, clone_path + JOURNAL_SUFFIX, digest_path(clone_path)


class MapHeader(Value):
    """What the superblock says about the clone."""

    __slots__ = ("uuid", "size", "region_size", "source", "created")

    def __init__(self, uuid: str, size: int, region_size: int, source: dict[str, Any],
                 created: float) -> None:
        self.uuid = uuid
        self.size = size
        self.region_size = region_size
        self.source = source
        self.created = created

    def to_json(self) -> bytes:
        return json.dumps({name: getattr(self, name) for name in self._fields},
                          sort_keys=True).encode()

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


def _block_runs(blocks: dict[int, int]) -> list[tuple[int, int, int]]:
    """``(region, first block, block count)`` runs of sub-block masks, in order."""
    return [(r, a, b - a) for r in sorted(blocks) for a, b in mask_runs(blocks[r])]


_ZERO_CHUNK = 64 << 10
_FINAL_BLOCK = b"\x03\x00"  # deflate's empty last block (fixed codes, end of block)


def _compress_zeros(n: int) -> bytes:
    """A zlib stream of ``n`` zero bytes, as ``zlib.compress(bytes(n), 1)`` would
    decompress: 64 KiB of zeros compressed once, ended by a full flush (so it
    refers to nothing before it) and repeated, then the rest the same way, the last
    block and the Adler-32 of ``n`` zeros, ``(n mod 65521) << 16 | 1``. A new 1 TiB
    map's 2 MiB of zeros took 10 ms to compress, beside the first client."""
    whole, rest = divmod(n, _ZERO_CHUNK)
    parts = []
    for length, times in ((_ZERO_CHUNK, whole), (rest, 1)):
        if length and times:
            c = zlib.compressobj(1)
            stream = c.compress(bytes(length)) + c.flush(zlib.Z_FULL_FLUSH)
            parts.append(stream[2:] * times)  # without the 2-byte zlib header
    head = zlib.compressobj(1).flush()[:2]
    return b"".join([head, *parts, _FINAL_BLOCK, struct.pack(">I", (n % 65521) << 16 | 1)])


def _encode_superblock(header: MapHeader, rmap: RegionMap, generation: int) -> bytes:
    hdr = header.to_json()
    bitmap = (_compress_zeros((rmap.count + 7) >> 3) if rmap.present_count == 0
              else zlib.compress(rmap.to_bytes(), 1))
    blocks = zlib.compress(b"".join(_BLK_RUN.pack(*run) for run in _block_runs(rmap.blocks)), 1)
    body = (_SB_HEAD.pack(_SB_MAGIC, len(hdr), len(bitmap), generation) + hdr + bitmap
            + struct.pack("<I", len(blocks)) + blocks)
    return body + struct.pack("<I", zlib.crc32(body))


def _add_block_run(rmap: RegionMap, region_size: int, region: int, first: int,
                   count: int, apply: bool = True) -> str | None:
    """Apply one run of written sub-blocks (if ``apply``); the reason if it cannot
    be valid."""
    if region >= rmap.count or count == 0 or first + count > region_size >> BLOCK_SHIFT:
        return f"sub-blocks {first}+{count} of region {region} are out of range"
    if apply:
        rmap.add_blocks(region, block_mask(first, first + count))
    return None


def _corrupt(path: str, what: str) -> CorruptMetadataError:
    return CorruptMetadataError(
        f"the region map {path} is corrupt: {what}. liveclone will not guess which "
        "regions hold guest data. Restore the map from a backup, or delete the clone "
        "and its .lcmap/.lcjournal files and clone again."
    )


def _decode_superblock(path: str, raw: bytes) -> tuple[MapHeader, RegionMap, int]:
    if len(raw) < _SB_HEAD.size + 4 or raw[:8] not in _SB_MAGICS:
        raise _corrupt(path, "bad magic or truncated superblock")
    _, hlen, blen, generation = _SB_HEAD.unpack_from(raw)
    end = bitmap_end = _SB_HEAD.size + hlen + blen
    if raw[:8] == _SB_MAGIC:  # the sub-block section follows the bitmap
        if len(raw) < end + 8:
            raise _corrupt(path, "superblock is truncated in its sub-block section")
        end += 4 + struct.unpack_from("<I", raw, end)[0]
    if len(raw) != end + 4:
        raise _corrupt(path, f"superblock is {len(raw)} bytes, expected {end + 4} (truncated?)")
    (crc,) = struct.unpack_from("<I", raw, end)
    if zlib.crc32(raw[:end]) != crc:
        raise _corrupt(path, "superblock checksum mismatch")
    header = MapHeader.from_json(raw[_SB_HEAD.size:_SB_HEAD.size + hlen], path)
    count = (header.size + header.region_size - 1) // header.region_size
    try:
        bits = zlib.decompress(raw[_SB_HEAD.size + hlen:bitmap_end])
        rmap = RegionMap(count, bits)
        runs = zlib.decompress(raw[bitmap_end + 4:end]) if end > bitmap_end else b""
    except (zlib.error, ValueError) as e:
        raise _corrupt(path, f"bitmap is unreadable ({e})") from None
    if len(runs) % _BLK_RUN.size:
        raise _corrupt(path, "the sub-block section is not whole runs")
    for region, first, n in _BLK_RUN.iter_unpack(runs):
        why = _add_block_run(rmap, header.region_size, region, first, n)
        if why:
            raise _corrupt(path, why)
    return header, rmap, generation


def _journal_header(uid: str, generation: int) -> bytes:
    head = _JR_HEAD.pack(_JR_MAGIC, uuid.UUID(uid).bytes, generation)
    head = head.ljust(_JR_HEAD_SIZE - 4, b"\0")
    return head + struct.pack("<I", zlib.crc32(head))


def _record(magic: int, body: bytes) -> bytes:
    return struct.pack("<II", magic, zlib.crc32(body)) + body


def encode_commit(seq: int, ranges: list[tuple[int, int]],
                  blocks: dict[int, int] | None = None) -> bytes:
    """One commit: a range record per ``(first, end)``, a blocks record per run of
    written sub-blocks (``region → mask``), then the trailer."""
    recs = b"".join([
        *(_record(_REC_MAGIC, _REC_BODY.pack(seq, a, b - a)) for a, b in ranges),
        *(_record(_BLK_MAGIC, _BLK_BODY.pack(seq, *run)) for run in _block_runs(blocks or {})),
    ])
    count = len(recs) // REC_SIZE
    return recs + _record(_END_MAGIC, _END_BODY.pack(seq, count, zlib.crc32(recs), 0))


def _decode_record(raw: bytes, pos: int, magic: int) -> tuple[int, int, int] | None:
    """``(seq, a, b)`` of a valid record of kind ``magic`` at ``pos`` (a range or
    a blocks record for ``_REC_MAGIC``), else None."""
    m, crc, seq, a, b = _REC.unpack_from(raw, pos)
    if (m != magic and (magic, m) != (_REC_MAGIC, _BLK_MAGIC)) \
            or zlib.crc32(raw[pos + 8:pos + REC_SIZE]) != crc:
        return None
    return seq, a, b


def _commit_ending_at(raw: bytes, trailer: int, lowest: int) -> tuple[int, int] | None:
    """If the record at ``trailer`` closes a complete commit starting at or after
    ``lowest``, return ``(start, seq)`` of that commit."""
    end = _decode_record(raw, trailer, _END_MAGIC)
    if end is None:
        return None
    seq, count, crc = end[0], end[1], end[2] & 0xFFFFFFFF
    start = trailer - count * REC_SIZE
    if start < lowest or zlib.crc32(raw[start:trailer]) != crc:
        return None
    for pos in range(start, trailer, REC_SIZE):
        rec = _decode_record(raw, pos, _REC_MAGIC)
        if rec is None or rec[0] != seq:
            return None
    return start, seq


class _Replay(Value):
    __slots__ = ("generation", "end", "seq", "records", "torn")

    def __init__(self, generation: int, end: int, seq: int, records: int, torn: int) -> None:
        self.generation = generation  # the journal's
        self.end = end  # byte offset after the last complete commit
        self.seq = seq  # sequence number of the last complete commit
        self.records = records  # records in complete commits
        self.torn = torn  # bytes of an incomplete last commit after ``end`` (0 if none)


def _replay(path: str, raw: bytes, header: MapHeader, generation: int,
            rmap: RegionMap) -> _Replay:
    """Apply every complete commit to ``rmap`` (if the journal's generation is the
    superblock's). Raises CorruptMetadataError for damage; ignores a torn tail."""
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
    # The file only grows by whole records, reserved and fsynced before use; a
    # commit never changes its size. Any other length means it was cut or edited.
    if (len(raw) - _JR_HEAD_SIZE) % REC_SIZE:
        raise _corrupt(path, f"journal length {len(raw)} is not whole records (truncated?)")
    limit = len(raw)
    pos, seq, records = _JR_HEAD_SIZE, 0, 0
    while pos < limit:
        # A commit: range records of one sequence number, then its trailer.
        trailer = pos
        while trailer < limit and _decode_record(raw, trailer, _REC_MAGIC) is not None:
            trailer += REC_SIZE
        found = _commit_ending_at(raw, trailer, pos) if trailer < limit else None
        if found is None or found[0] != pos or found[1] <= seq:
            break
        current = jgen == generation
        for rpos in range(pos, trailer, REC_SIZE):
            if _REC.unpack_from(raw, rpos)[0] == _BLK_MAGIC:
                _, region, first, n = _BLK_BODY.unpack_from(raw, rpos + 8)
                why = _add_block_run(rmap, header.region_size, region, first, n, current)
                if why:
                    raise _corrupt(path, f"journal record at byte {rpos}: {why}")
                continue
            _, first, count = _REC.unpack_from(raw, rpos)[2:]
            if first + count > rmap.count:
                raise _corrupt(path, f"journal record at byte {rpos} is out of range")
            if current:
                rmap.set(first, first + count)
        records += (trailer - pos) // REC_SIZE
        seq, pos = found[1], trailer + REC_SIZE
    torn = -(-len(raw[pos:].rstrip(b"\0")) // REC_SIZE) * REC_SIZE
    if torn:
        # An incomplete commit followed by a complete one is damage in the middle of
        # the log; an incomplete last commit is a torn tail (it never returned).
        for later in range(pos, min(pos + torn, limit), REC_SIZE):
            if _commit_ending_at(raw, later, pos) is not None:
                raise _corrupt(path, f"journal commit at byte {pos} is damaged and later "
                               "commits are complete")
    return _Replay(jgen, pos, seq, records, torn)


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _path_ident(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class MapStore:
    """The durable half of the region map for one clone.

    Invariant: every bit this store has committed is set in the RegionMap that
    ``load`` returns, and no other bit is.
    Invariant: records are appended only to a journal whose generation is the
    superblock's (``_journal_generation == generation``), and never after a
    failed step: ``broken`` is then set and every later call raises.
    """

    def __init__(self, clone_path: str, header: MapHeader, generation: int,
                 jfd: int, replay: _Replay, mode: int, digests: DigestStore) -> None:
        self.clone_path = clone_path
        self.digests = digests  # the region digests (core.digests); synced before commit
        self.map_path, self.journal_path, _ = map_paths(clone_path)
        self.header = header
        self.mode = mode
        self.generation = generation  # the superblock's on disk
        self._journal_generation = replay.generation
        self._jfd = jfd
        self._write_pos = replay.end  # byte offset of the next commit in the journal
        self._seq = replay.seq  # sequence number of the last commit
        self.records = replay.records  # records in the journal, for the compaction policy
        self.broken: str | None = None  # why a failed step left the on-disk state unknown
        self._sb_ident = _path_ident(self.map_path)  # the superblock this store wrote/read

    # -- creation and loading -------------------------------------------------

    @classmethod
    def create(cls, clone_path: str, header: MapHeader, mode: int = DEFAULT_MODE) -> MapStore:
        """Write a new, empty map. Blocks. The caller holds the clone's lock. The
        superblock is written last: it is the marker that the clone exists."""
        map_path, journal_path, _ = map_paths(clone_path)
        rmap = RegionMap((header.size + header.region_size - 1) // header.region_size)
        try:
            fsops.write_file_atomically(journal_path, _journal_header(header.uuid, 0), mode)
            DigestStore.create(digest_path(clone_path), header.uuid, rmap.count, mode)
            fsops.write_file_atomically(map_path, _encode_superblock(header, rmap, 0), mode)
        except OSError as e:
            raise TargetError(
                f"cannot create the region map {map_path}: {e.strerror}; "
                "check that the clone's directory exists, is writable and has space"
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
        """Read the committed map without opening it for writing (``status``, ``pause``).

        The owner may be compacting meanwhile, so the superblock and the journal are
        read as a pair and the superblock's generation checked again after the
        journal; a pair that disagrees, or looks damaged, is read again until it
        settles (READ_RETRY_SECONDS). Only damage that stays is reported."""
        _, journal_path, _ = map_paths(clone_path)
        deadline = time.monotonic() + READ_RETRY_SECONDS
        while True:
            header, rmap, generation = MapStore._read_superblock(clone_path)
            try:
                try:
                    with open(journal_path, "rb") as f:
                        raw = f.read()
                except FileNotFoundError:
                    raise _corrupt(journal_path, "the journal is missing") from None
                _replay(journal_path, raw, header, generation, rmap)
                if MapStore._read_superblock(clone_path)[2] == generation:
                    return header, rmap
            except CorruptMetadataError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.01)

    @staticmethod
    def _read_superblock(clone_path: str) -> tuple[MapHeader, RegionMap, int]:
        map_path, _, _ = map_paths(clone_path)
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
        """Open an existing map for writing. Blocks. The caller holds the clone's lock.
        Raises NotACloneError or CorruptMetadataError; never repairs by guessing. An
        interrupted compaction is finished and a torn tail zeroed before returning."""
        header, rmap, generation = cls._read_superblock(clone_path)
        return cls._open(clone_path, header, rmap, generation)

    @classmethod
    def _open(cls, clone_path: str, header: MapHeader, rmap: RegionMap,
              generation: int) -> tuple[MapStore, RegionMap]:
        map_path, journal_path, _ = map_paths(clone_path)
        try:
            jfd = os.open(journal_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _corrupt(journal_path, "the journal is missing") from None
        store = None
        try:
            st = os.fstat(jfd)
            raw = os.pread(jfd, st.st_size, 0)
            replay = _replay(journal_path, raw, header, generation, rmap)
            mode = stat.S_IMODE(os.stat(map_path).st_mode)
            with open(map_path, "rb") as f:
                upgrade = f.read(8) != _SB_MAGIC
            dpath = digest_path(clone_path)
            if not os.path.exists(dpath):
                # LVCLMAP1 (before digests), or removed by the user after a damaged
                # header: an empty one; its regions verify as "unverified".
                DigestStore.create(dpath, header.uuid, rmap.count, mode)
            digests = DigestStore.open(dpath, header.uuid, rmap.count)
            store = cls(clone_path, header, generation, jfd, replay, mode, digests)
            if replay.generation != generation:
                # Compaction stopped between steps 2 and 3: the superblock already
                # holds every journalled bit. Finish step 3 now.
                store._reset_journal()
            elif replay.torn:
                # An unacknowledged torn commit: undo it, so the next commit's pages
                # cannot be mistaken for a mix of it and them.
                fsops.pwrite_all(store._jfd, bytes(replay.torn), replay.end)
                fsops.fdatasync(store._jfd)
            store._reserve(0)
            if upgrade and not store.compact(rmap):  # now LVCLMAP3: older versions refuse it
                raise TargetError(f"cannot upgrade the region map {map_path} to record "
                                  "digests and sub-blocks: its new superblock could not be "
                                  "written; check the directory's space and permissions")
        except BaseException:
            if store is not None:
                store.close()
            else:
                os.close(jfd)
            raise
        return store, rmap

    # -- writing ----------------------------------------------------------------

    def _check(self) -> None:
        if self.broken is not None:
            raise OSError(errno.EIO, f"the region map cannot be written: {self.broken}")
        if self._jfd < 0:
            raise OSError(errno.EBADF, "the region map is closed")
        # The files must still be the ones this store writes: a map deleted or
        # replaced under a running process would take every later commit with it.
        for path, fd in ((self.journal_path, self._jfd), (self.map_path, None)):
            try:
                st = os.stat(path)
                ident = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                ident = None
            mine = self._sb_ident if fd is None else _ident(fd)
            if ident != mine:
                self.broken = (f"{path} was {'deleted' if ident is None else 'replaced'} "
                               "while the clone was open")
                raise OSError(errno.ESTALE, f"the region map cannot be written: {self.broken}")

    def commit(self, ranges: list[tuple[int, int]],
               blocks: dict[int, int] | None = None) -> None:
        """Make ``(first, end)`` region ranges committed-present, and the sub-blocks
        of ``blocks`` (region → mask) committed-written. Blocks; durable on return.
        The caller must have made their clone data durable before calling. Any
        failure breaks the store: whether the commit reached the disk is unknown."""
        if not ranges and not blocks:
            return
        self._check()
        if self._journal_generation != self.generation:
            self._reset_journal()  # never append to a journal replay would ignore
        seq = self._seq + 1
        data = encode_commit(seq, ranges, blocks)
        try:
            self._reserve(len(data))
            fsops.pwrite_all(self._jfd, data, self._write_pos)  # step 2
            fsops.fdatasync(self._jfd)  # step 3: now the bits are committed
        except OSError as e:
            self.broken = f"a journal commit failed ({e.strerror or e})"
            raise
        self._write_pos += len(data)
        self._seq = seq
        self.records += len(data) // REC_SIZE

    def _reserve(self, nbytes: int) -> None:
        """Keep reserved journal space ahead of the write position."""
        size = os.fstat(self._jfd).st_size
        if self._write_pos + nbytes <= size - REC_SIZE * 64:
            return
        want = self._write_pos + nbytes + _RESERVE
        try:
            os.posix_fallocate(self._jfd, size, want - size)
            fsops.fsync(self._jfd)  # the new size must survive a crash, or replay sees less
        except OSError as e:
            if e.errno != errno.ENOSPC or self._write_pos + nbytes > size:
                raise
            # Disk full, but the old reserve still holds this commit: go on.

    def compact(self, rmap: RegionMap) -> bool:
        """Fold the journal into a new superblock. Blocks. ``rmap`` must hold only
        committed bits. Returns False if step 1 failed (nothing changed; try again
        later); raises, and breaks the store, if a later step failed."""
        self._check()
        generation = self.generation + 1
        try:
            fsops.write_file_atomically(
                self.map_path, _encode_superblock(self.header, rmap, generation), self.mode)
        except fsops.StepError as e:
            if not e.renamed:
                return False
            self.broken = f"map compaction failed after replacing the superblock ({e.strerror})"
            raise
        self.generation = generation  # steps 1-2 done: the superblock alone holds every bit
        self._sb_ident = _path_ident(self.map_path)
        self._reset_journal()
        return True

    def _reset_journal(self) -> None:
        """Step 3: an empty journal of the superblock's generation."""
        try:
            fsops.write_file_atomically(
                self.journal_path, _journal_header(self.header.uuid, self.generation),
                self.mode)
            jfd = os.open(self.journal_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            self.broken = f"the journal could not be replaced after compaction ({e.strerror})"
            raise
        os.close(self._jfd)
        self._jfd, self._write_pos, self.records = jfd, _JR_HEAD_SIZE, 0
        self._journal_generation, self._seq = self.generation, 0
        try:
            self._reserve(0)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                self.broken = f"the new journal could not be extended ({e.strerror})"
                raise
            # No room for a reserve now: commits will try again.

    def close(self) -> None:
        self.digests.close()
        if self._jfd >= 0:
            os.close(self._jfd)
            self._jfd = -1
