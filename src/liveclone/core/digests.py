"""Region digests: what each copied region held, and which regions the guest changed.

``CLONE.lcdigest`` beside the map holds one fixed-size slot per region::

    0     4096  header: magic b"LVCLDIG1", clone uuid (16 bytes), u32 slot size,
                u32 length of the algorithm name, the name ("xxh3-64"), zeros, CRC32
    4096  16×n  slot of region r at 4096 + 16·r:
                u64 digest   XXH3-64 of the region's bytes (the short last region's
                             bytes only)
                u32 kind     0 none, 1 copied from the source, 2 guest, 3 open
                u32 CRC32    of (u32 kind, u64 digest); an all-zero slot is "none"
                             without a CRC. The region is not in the CRC, so the
                             slots of a run of hole regions are one repeated value,
                             written at C speed (a sparse copy passes 16k regions per
                             GiB of holes at 64 KiB)
    T     4096  the state block, T = 4096 + 16·n rounded up to 4096: b"LVCLOPEN"
                while zones may be open (below), zeros otherwise. Files made before
                zones lack it; it is allocated when they are opened for writing.

A slot is 16 bytes at a 16-byte boundary, so it never straddles a page or a sector:
a power cut leaves each slot old or new, never a mix; the state block's flag is in
its first sector. The file is sized and its blocks allocated when it is made, so
writing a slot never needs space (a full disk cannot stop the digests).

**copied**: a fill copied the region from the source; the digest is of the bytes it
copied (source holes and zero blocks count as the zeros they read as). **guest**:
the guest wrote, zeroed or trimmed the region, so its bytes are known not to be
the source's; there is no digest. **open**: copied, with that digest, and the guest
may have written since: bytes that match are the copy's, bytes that differ are
the guest's. **none**: nothing recorded (a clone made before digests existed).

Invariant (the digest half of invariant 6): a region's slot is written before its
present bit is set in memory, and a commit fdatasyncs this file after the clone's
data and before the journal, so a committed present bit never vouches for a slot
that is not durable. A slot of an absent region means nothing: it is rewritten when
the region is filled.

Invariant (write intent): before a guest's bytes are written into a region that is
already present, that region's slot says "guest" or "open" and is durable. A crash
can then leave a guest's unflushed bytes in a copied region (``kill -9`` keeps the
page cache) without the region ever reading as a mismatch.

Write intent is taken per **zone** of 2**ZONE_SHIFT regions, as a RAID write-intent
bitmap takes it per chunk: the first guest write into a zone turns the zone's
"copied" slots to "open" (same digests) and fdatasyncs once; from then on the zone
is open for this session, a fill into it writes "open" slots (they travel with the
present bits like any fill's), and a guest write there needs no sync
(``intent_nowait``). A clean close turns the open slots back (``close_zones``):
"guest" where the guest wrote in this session (``_marked``), "copied" where it did
not (``_converted``: slots this session made open). The state block says "open"
durably before the first zone opens and is cleared after ``close_zones``; a stop
without it leaves open slots behind, which the next writable open settles before
anything else (``settle``): a present region whose bytes match its digest is
"copied" again, one whose bytes differ is "guest". So a session pays one fdatasync
per zone it writes into, not one per region; what it gives up is only after a
crash, and only until that settle: damage in an open region reads as the guest's.

Blocking: every call does file I/O and may block. Thread-safe.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
import uuid
import zlib
from collections.abc import Iterable, Iterator
from itertools import repeat

import xxhash

from liveclone.core import fsops
from liveclone.core.regions import RegionMap
from liveclone.errors import CorruptMetadataError

DIGEST_SUFFIX = ".lcdigest"
ALGORITHM = "xxh3-64"
HEADER_SIZE = 4096
SLOT_SIZE = 16
# A fill's slots separated by at most this many bytes of other slots are written
# together (``DigestStore.record``).
SLOT_GAP = 64 << 10
# Regions per write-intent zone, as a power of two (module docstring): 64 MiB of
# 64 KiB regions, 4 MiB of 4 KiB ones.
ZONE_SHIFT = 10
STATE_SIZE = 4096
_OPEN_FLAG = b"LVCLOPEN"
# An open slot's kind field, as found by ``settle`` (its offset in the slot).
_KIND_AT = 8
_OPEN_KIND = b"\x03\x00\x00\x00"
_COPIED_KIND = b"\x01\x00\x00\x00"
_MAGIC = b"LVCLDIG1"
_HEAD = struct.Struct("<8s16sII")
_SLOT = struct.Struct("<QII")
_CRC_IN = struct.Struct("<IQ")
_ZERO_SLOT = bytes(SLOT_SIZE)

NONE, COPIED, GUEST, OPEN = 0, 1, 2, 3
DAMAGED = -1  # a slot whose CRC does not match (reported, never trusted)

Run = tuple[int, int]

digest_of = xxhash.xxh3_64_intdigest


def digest_path(clone_path: str) -> str:
    return clone_path + DIGEST_SUFFIX


def state_offset(count: int) -> int:
    """Where the state block of a digest file of ``count`` slots begins."""
    return HEADER_SIZE + -(-count * SLOT_SIZE // STATE_SIZE) * STATE_SIZE


def encode_slot(kind: int, digest: int = 0) -> bytes:
    return _SLOT.pack(digest, kind, zlib.crc32(_CRC_IN.pack(kind, digest)))


def decode_slot(raw: bytes | memoryview) -> tuple[int, int]:
    """``(kind, digest)`` of a slot; kind DAMAGED if its CRC is wrong."""
    if raw == _ZERO_SLOT:
        return NONE, 0
    digest, kind, crc = _SLOT.unpack(raw)
    if kind not in (NONE, COPIED, GUEST, OPEN) or zlib.crc32(_CRC_IN.pack(kind, digest)) != crc:
        return DAMAGED, 0
    return kind, digest


def _header(uid: str) -> bytes:
    name = ALGORITHM.encode()
    head = _HEAD.pack(_MAGIC, uuid.UUID(uid).bytes, SLOT_SIZE, len(name)) + name
    head = head.ljust(HEADER_SIZE - 4, b"\0")
    return head + struct.pack("<I", zlib.crc32(head))


def check_header(path: str, raw: bytes, uid: str) -> None:
    """Raise CorruptMetadataError unless ``raw`` is this clone's digest file header."""
    why = None
    if len(raw) < HEADER_SIZE or raw[:8] != _MAGIC:
        why = "bad magic or truncated header"
    elif zlib.crc32(raw[:HEADER_SIZE - 4]) != struct.unpack_from("<I", raw, HEADER_SIZE - 4)[0]:
        why = "header checksum mismatch"
    else:
        _, uid_bytes, slot, nlen = _HEAD.unpack_from(raw)
        name = raw[_HEAD.size:_HEAD.size + nlen].decode(errors="replace")
        if uuid.UUID(bytes=uid_bytes) != uuid.UUID(uid):
            why = "it belongs to a different clone"
        elif slot != SLOT_SIZE or name != ALGORITHM:
            why = f"unknown layout (slot {slot} bytes, algorithm {name!r})"
    if why:
        raise CorruptMetadataError(
            f"the digest file {path} is damaged: {why}. The clone's data and map are "
            f"intact; to go on without the recorded digests, remove {path} and the map "
            "will make an empty one (`liveclone verify` then reports those regions as "
            "unverified).")


class ZeroDigests:
    """The digest of ``n`` zero bytes, computed once per length."""

    def __init__(self) -> None:
        self._known: dict[int, int] = {}

    def __call__(self, n: int) -> int:
        d = self._known.get(n)
        if d is None:
            h = xxhash.xxh3_64()
            block = bytes(min(n, 1 << 20))
            left = n
            while left:
                step = min(left, len(block))
                h.update(block[:step] if step < len(block) else block)
                left -= step
            d = self._known[n] = h.intdigest()
        return d


ZEROS = ZeroDigests()


class Digester:
    """Digests of whole regions from pieces of data and zeros given in offset order
    (a fill's pieces; a verify's reads). ``out`` collects ``(region, digest)``, and
    ``runs`` ``(first, end, digest)`` for runs of whole zero regions (holes), so a
    hole costs no Python work per region.

    A piece may start or end inside a region: the region's digest is then built
    from its pieces, and emitted when its last byte is given. A region whose pieces
    do not follow each other gets no digest (never a wrong one)."""

    def __init__(self, size: int, region_size: int) -> None:
        self.size = size
        self.shift = region_size.bit_length() - 1
        self.rs = region_size
        self.out: list[tuple[int, int]] = []
        self.runs: list[tuple[int, int, int]] = []
        self._partial: xxhash.xxh3_64 | None = None
        self._at = -1  # the byte offset the partial region expects next

    def _bounds(self, pos: int) -> tuple[int, int, int]:
        r = pos >> self.shift
        start = r << self.shift
        return r, start, min(start + self.rs, self.size)

    def data(self, offset: int, view: memoryview | bytes) -> None:
        n, i, pos = len(view), 0, offset
        out, shift, rs = self.out, self.shift, self.rs
        while i < n:
            if self._partial is None and not pos & (rs - 1) and n - i >= rs:
                # The common case: whole regions, one call each.
                whole = (n - i) >> shift
                for k in range(whole):
                    out.append(((pos >> shift) + k, digest_of(view[i + (k << shift):
                                                                  i + ((k + 1) << shift)])))
                i += whole << shift
                pos += whole << shift
                continue
            r, start, end = self._bounds(pos)
            step = min(n - i, end - pos)
            if pos == start and step == end - start:  # the short last region, whole
                out.append((r, digest_of(view[i:i + step])))
            else:
                self._feed(pos, start, end, view[i:i + step])
            i += step
            pos += step

    def items(self) -> dict[int, int]:
        """Every region's digest, ``out`` and ``runs`` together."""
        got = dict(self.out)
        for a, b, d in self.runs:
            got.update(zip(range(a, b), repeat(d)))
        return got

    def zeros(self, start: int, stop: int) -> None:
        pos = start
        while pos < stop:
            r, rstart, rend = self._bounds(pos)
            whole = (stop - pos) >> self.shift  # full-size regions from here
            if pos == rstart and whole and self._partial is None:
                d = ZEROS(self.rs)
                if self.runs and self.runs[-1][1] == r and self.runs[-1][2] == d:
                    r = self.runs.pop()[0]
                self.runs.append((r, (pos >> self.shift) + whole, d))
                pos += whole << self.shift
                continue
            step = min(stop - pos, rend - pos)
            if pos == rstart and step == rend - rstart and self._partial is None:
                self.out.append((r, ZEROS(step)))
            else:
                zero = bytes(min(step, 1 << 20))
                for k in range(0, step, len(zero)):
                    piece = zero[:min(len(zero), step - k)]
                    self._feed(pos + k, rstart, rend, piece)
            pos += step

    def _feed(self, pos: int, start: int, end: int, piece: memoryview | bytes) -> None:
        if pos == start:
            self._partial = xxhash.xxh3_64()
        elif self._partial is None or self._at != pos:
            self._partial = None  # a gap: this region gets no digest
            return
        self._partial.update(piece)
        self._at = pos + len(piece)
        if self._at == end:
            self.out.append((start >> self.shift, self._partial.intdigest()))
            self._partial = None


class DigestStore:
    """The open digest file of one clone. Made and opened by ``MapStore``."""

    def __init__(self, path: str, fd: int, count: int, zones: bool = False,
                 unsettled: bool = False) -> None:
        self.path = path
        self._fd = fd
        self.count = count
        # Write intent per zone (module docstring), when the state block is there;
        # else per region. ``unsettled``: the state block says open slots were left
        # by a stop without close_zones (``settle`` runs before anything else).
        self._zones = zones
        self.unsettled = unsettled
        self._state_at = state_offset(count)
        self._lock = threading.Lock()
        # Held by every slot write. ``record`` writes a fill's slots together with
        # the present regions' slots between them, as read under this lock: one
        # write per group instead of one per run, and no guest slot lost to it.
        self._write_lock = threading.Lock()
        # Slot writes done (begun and ended, failed ones too), guarded by _write_lock.
        self._written = 0
        # Regions whose slot is known to say "guest" and to be durable, or to travel
        # with the region's present bit, or that the guest wrote in an open zone
        # (guarded by _lock). Bits only go 0 → 1.
        self._marked = RegionMap(count)
        # Each zone's state, guarded by _write_lock; states only grow. 0 closed; 1
        # opening: its copied slots are being made open, and a fill there writes
        # open slots; 2 open: that is durable, a guest write there needs no sync.
        self._shift = ZONE_SHIFT
        self._zone = bytearray((count >> self._shift) + 1)
        # Slots this session made open (guarded by _write_lock): close_zones turns
        # those the guest did not write back to "copied".
        self._converted = RegionMap(count)
        self._flag_lock = threading.Lock()
        self._flag_up = False  # the state block says open, durably (_flag_lock)
        # Group sync for write intents: guests writing at once share one fdatasync.
        self._group = threading.Condition()  # guards the four below
        self._asked = 0  # intent syncs asked for, numbered in arrival order
        self._covered = 0  # every one numbered up to this is durable
        self._syncing = False  # a leader's fdatasync is running
        self._failed: OSError | None = None  # a failed sync: every later one fails too
        # Invariant: the first ``_synced`` slot writes are durable (an fdatasync that
        # began after they ended has returned). ``sync`` with nothing written since
        # is free: an fdatasync costs a disk cache flush even with nothing dirty.
        self._synced = 0

    # -- creating and opening --------------------------------------------------------

    @staticmethod
    def create(path: str, uid: str, count: int, mode: int) -> None:
        """Write an empty digest file with every slot's space allocated. Blocks."""
        tmp = path + ".tmp"
        try:
            fsops.write_new_file(tmp, _header(uid), mode)
            fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.posix_fallocate(fd, 0, state_offset(count) + STATE_SIZE)
                fsops.fsync(fd)
            finally:
                os.close(fd)
            fsops.rename(tmp, path)
            fsops.fsync_dir(path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @classmethod
    def open(cls, path: str, uid: str, count: int) -> DigestStore:
        """Open for writing. A file made before zones gets its state block now; if
        that cannot be allocated (a full disk), write intent stays per region."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            check_header(path, os.pread(fd, HEADER_SIZE, 0), uid)
            at = state_offset(count)
            unsettled = os.pread(fd, len(_OPEN_FLAG), at) == _OPEN_FLAG
            try:
                os.posix_fallocate(fd, at, STATE_SIZE)
                zones = True
            except OSError:
                zones = False
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, count, zones, unsettled)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- writing ------------------------------------------------------------------------

    def record(self, digests: Digester, regions: list[Run]) -> None:
        """Write the slots of regions a fill copied (sorted runs): the digest the
        Digester has for each, else "none". Call before their bits are set."""
        if not regions:
            return
        lo, hi = regions[0][0], regions[-1][1]
        slots = bytearray((hi - lo) * SLOT_SIZE)  # all "none"
        for a, b, d in digests.runs:
            a, b = max(a, lo), min(b, hi)
            if a < b:
                slots[(a - lo) * SLOT_SIZE:(b - lo) * SLOT_SIZE] = encode_slot(COPIED, d) * (b - a)
        for r, d in digests.out:
            if lo <= r < hi:
                slots[(r - lo) * SLOT_SIZE:(r - lo + 1) * SLOT_SIZE] = encode_slot(COPIED, d)
        # Runs close enough together go out in one write, with the slots between
        # them (present regions: the guest's, or an earlier fill's) as read back.
        g = 0
        for k in range(1, len(regions) + 1):
            if k < len(regions) and (regions[k][0] - regions[k - 1][1]) * SLOT_SIZE <= SLOT_GAP:
                continue
            a, b = regions[g][0], regions[k - 1][1]
            with self._write_lock:
                out = slots[(a - lo) * SLOT_SIZE:(b - lo) * SLOT_SIZE]
                if k - g > 1:
                    out = bytearray(os.pread(self._fd, len(out), HEADER_SIZE + a * SLOT_SIZE))
                    if len(out) != (b - a) * SLOT_SIZE:
                        raise OSError(errno.EIO, f"the digest file {self.path} is short")
                    for x, y in regions[g:k]:
                        out[(x - a) * SLOT_SIZE:(y - a) * SLOT_SIZE] = \
                            slots[(x - lo) * SLOT_SIZE:(y - lo) * SLOT_SIZE]
                if any(self._zone[a >> self._shift:((b - 1) >> self._shift) + 1]):
                    self._make_open(out, a)  # a fill into a zone open for writes
                self._pwrite(out, HEADER_SIZE + a * SLOT_SIZE)
            g = k

    def guest_made_present(self, runs: Iterable[Run]) -> None:
        """Slots of absent regions a guest is about to make present: "guest". No
        sync: the commit that makes their bits durable syncs them first."""
        for a, b in runs:
            self._write_guest(a, b)

    def marked(self, first: int, end: int) -> bool:
        """True if every region of ``[first, end)`` is known to have a durable guest
        slot (a write there needs no intent). No I/O."""
        with self._lock:
            return self._marked.find_absent(first, end) is None

    def marked_bits(self) -> bytearray | mmap.mmap:
        """``marked`` as a bitmap (``RegionMap.bits``), for the NBD lane in C."""
        return self._marked.bits()

    def note_marked(self, runs: Iterable[Run]) -> None:
        """The guest's bytes reached these regions, whose slots say "guest"."""
        with self._lock:
            for a, b in runs:
                self._marked.set(a, b)

    def intent_nowait(self, first: int, end: int) -> bool:
        """Write intent without I/O: True, with the regions marked, if every zone of
        ``[first, end)`` is open (a guest write there needs no sync); else False
        and ``guest_intent`` is due."""
        zones = self._zone[first >> self._shift:((end - 1) >> self._shift) + 1]
        if not self._zones or zones.count(2) != len(zones):
            return False
        self.note_marked([(first, end)])
        return True

    def guest_intent(self, runs: Iterable[Run]) -> bool:
        """Write intent for present regions a guest is about to change: their slots
        say "guest" or "open" and are durable before this returns. Return True if it
        synced (the caller turns a failed sync into the failed mode, invariant 9)."""
        todo: list[Run] = []
        with self._lock:
            for a, b in runs:
                todo.extend((x, y) for x, y, known in self._marked.runs(a, b) if not known)
        if not todo:
            return False
        if self._zones:
            return self._zone_intent(todo)
        wrote = False
        for a, b in todo:
            raw = os.pread(self._fd, (b - a) * SLOT_SIZE, HEADER_SIZE + a * SLOT_SIZE)
            need = [r for r in range(a, b)
                    if decode_slot(raw[(r - a) * SLOT_SIZE:(r - a + 1) * SLOT_SIZE])[0] != GUEST]
            for r in need:
                self._write_guest(r, r + 1)
            wrote = wrote or bool(need)
        if wrote:
            self._group_sync()
        self.note_marked(todo)
        return wrote

    def _zone_intent(self, todo: list[Run]) -> bool:
        """``guest_intent`` by zones: open those of ``todo`` not open yet (their
        copied slots made open, one shared sync), then mark ``todo``."""
        zones = sorted({z for a, b in todo
                        for z in range(a >> self._shift, ((b - 1) >> self._shift) + 1)})
        synced = False
        if any(self._zone[z] != 2 for z in zones):
            self._raise_flag()
            with self._write_lock:
                for z in zones:
                    if not self._zone[z]:
                        self._zone[z] = 1
                        a, raw = self._zone_slots(z)
                        if self._make_open(raw, a):
                            self._pwrite(raw, HEADER_SIZE + a * SLOT_SIZE)
            self._group_sync()  # also covers a zone another thread is opening
            synced = True
            with self._write_lock:
                for z in zones:
                    self._zone[z] = 2
        self.note_marked(todo)
        return synced

    def _zone_slots(self, z: int) -> tuple[int, bytearray]:
        """Zone ``z``'s first region and its slots as they are in the file."""
        a = z << self._shift
        n = min(1 << self._shift, self.count - a)
        raw = bytearray(os.pread(self._fd, n * SLOT_SIZE, HEADER_SIZE + a * SLOT_SIZE))
        if len(raw) != n * SLOT_SIZE:
            raise OSError(errno.EIO, f"the digest file {self.path} is short")
        return a, raw

    def _make_open(self, raw: bytearray, first: int) -> bool:
        """Turn the copied slots in ``raw`` (regions ``first, first + 1, ...``) whose
        zones are opening or open into open ones, noting them converted. Under
        _write_lock. True if any changed."""
        view, changed = memoryview(raw), False
        for i in _slots_of_kind(raw, _COPIED_KIND):  # only copied slots are decoded
            r = first + i // SLOT_SIZE
            if self._zone[r >> self._shift]:
                kind, digest = decode_slot(view[i:i + SLOT_SIZE])
                if kind == COPIED:
                    # A run of equal slots (a run of holes) in this zone, converted
                    # at once: its length found by doubling compares.
                    slot = bytes(view[i:i + SLOT_SIZE])
                    room = min(len(raw) - i, (((r >> self._shift) + 1 << self._shift) - r)
                               * SLOT_SIZE) // SLOT_SIZE
                    n, step = 1, 1
                    while step:
                        k = min(n + step, room)
                        if k > n and raw[i:i + k * SLOT_SIZE] == slot * k:
                            n, step = k, step * 2
                        else:
                            step //= 2
                    raw[i:i + n * SLOT_SIZE] = encode_slot(OPEN, digest) * n
                    self._converted.set(r, r + n)
                    changed = True
        return changed

    def _raise_flag(self) -> None:
        """The state block says "open", durably, before any zone opens."""
        with self._flag_lock:
            if self._flag_up:
                return
            with self._write_lock:
                self._pwrite(_OPEN_FLAG, self._state_at)
            self._group_sync()
            self._flag_up = True

    def close_zones(self) -> None:
        """At a clean close, after the last commit (nothing writes any more): each
        open slot this session made becomes "guest" if the guest wrote its region,
        "copied" again if not; synced; then the state block is cleared and synced."""
        if not self._flag_up:
            return
        with self._write_lock:
            for z in (i for i, state in enumerate(self._zone) if state):
                a, raw = self._zone_slots(z)
                view, changed = memoryview(raw), False
                for x, y, made in self._converted.runs(a, a + len(raw) // SLOT_SIZE):
                    for r in range(x, y) if made else ():
                        i = (r - a) * SLOT_SIZE
                        kind, digest = decode_slot(view[i:i + SLOT_SIZE])
                        if kind == OPEN:
                            raw[i:i + SLOT_SIZE] = (encode_slot(GUEST) if r in self._marked
                                                    else encode_slot(COPIED, digest))
                            changed = True
                if changed:
                    self._pwrite(raw, HEADER_SIZE + a * SLOT_SIZE)
        self._lower_flag()
        with self._flag_lock:
            self._flag_up = False

    def settle(self, clone_fd: int, present: RegionMap, size: int, region_size: int) -> int:
        """After a stop without ``close_zones`` (the state block says open): each open
        slot of a present region becomes "copied" if the region's bytes match its
        digest, "guest" if not; then the state block is cleared. Reads those
        regions; call before the clone is used. Return how many were settled."""
        if not self.unsettled:
            return 0
        settled, step = 0, 1 << 16
        for a in range(0, self.count, step):
            b = min(a + step, self.count)
            raw = bytearray(os.pread(self._fd, (b - a) * SLOT_SIZE, HEADER_SIZE + a * SLOT_SIZE))
            view, changed = memoryview(raw), False
            for i in _slots_of_kind(raw, _OPEN_KIND):
                r = a + i // SLOT_SIZE
                if present.is_present(r):
                    kind, digest = decode_slot(view[i:i + SLOT_SIZE])
                    if kind == OPEN:
                        start = r * region_size
                        data = os.pread(clone_fd, min(region_size, size - start), start)
                        raw[i:i + SLOT_SIZE] = (encode_slot(COPIED, digest)
                                                if digest_of(data) == digest
                                                else encode_slot(GUEST))
                        changed = True
                        settled += 1
            if changed:
                with self._write_lock:
                    self._pwrite(raw, HEADER_SIZE + a * SLOT_SIZE)
        self._lower_flag()
        self.unsettled = False
        return settled

    def _lower_flag(self) -> None:
        """Sync the slots, then clear the state block and sync that."""
        self._fdatasync()
        with self._write_lock:
            self._pwrite(bytes(len(_OPEN_FLAG)), self._state_at)
        self._fdatasync()

    def _group_sync(self) -> None:
        """fdatasync, shared: a caller whose slots were written before a running sync
        started waits for the next one, which one of the waiters leads and which
        covers them all. A failed sync fails every caller from then on (invariant 9:
        never retried into success)."""
        with self._group:
            self._asked += 1
            ticket = self._asked
            while self._covered < ticket:
                if self._failed is not None:
                    raise self._failed
                if self._syncing:
                    self._group.wait()
                    continue
                self._syncing, target = True, self._asked
                self._group.release()
                try:
                    self._fdatasync()
                finally:
                    self._group.acquire()
                    self._syncing = False
                    self._group.notify_all()
                self._covered = max(self._covered, target)

    def _write_guest(self, a: int, b: int) -> None:
        slots = encode_slot(GUEST) * (b - a)
        with self._write_lock:
            self._pwrite(slots, HEADER_SIZE + a * SLOT_SIZE)

    def _pwrite(self, data: bytes | bytearray, offset: int) -> None:
        """One slot write (under _write_lock), counted once it has ended."""
        try:
            fsops.pwrite_all(self._fd, data, offset)
        finally:
            self._written += 1  # failed too: it may have changed the file

    def _fdatasync(self) -> None:
        """fdatasync, covering the slot writes ended before it began. A failure
        fails every later sync (invariant 9)."""
        with self._write_lock:
            written = self._written
        try:
            fsops.fdatasync(self._fd)
        except OSError as e:
            with self._group:
                self._failed = e
            raise
        with self._group:
            self._synced = max(self._synced, written)

    def sync(self) -> None:
        """Make every slot written so far durable (a commit's step 1b). Without a
        slot write since the last sync, there is nothing to do."""
        # Plain reads, no lock: each is atomic, and a slot write that ends after the
        # first read is a later commit's to sync (its bit is not pending in this one).
        if self._written <= self._synced and self._failed is None:
            return
        with self._group:
            if self._failed is not None:
                raise self._failed
        self._fdatasync()


def _slots_of_kind(raw: bytearray, kind: bytes) -> Iterator[int]:
    """Offsets of the slots in ``raw`` whose kind field is ``kind``, found by a C-speed
    search (slots the caller rewrites meanwhile are searched as they now are)."""
    at = raw.find(kind)
    while at >= 0:
        if (at - _KIND_AT) % SLOT_SIZE == 0:
            yield at - _KIND_AT
        at = raw.find(kind, at + 1)


def read_slot_bytes(fd: int, first: int, end: int) -> bytes:
    """The raw slots of regions ``[first, end)`` from an open digest file (a
    reader's: ``verify``). Slots past the end of a short file read as none."""
    raw = os.pread(fd, (end - first) * SLOT_SIZE, HEADER_SIZE + first * SLOT_SIZE)
    return raw.ljust((end - first) * SLOT_SIZE, b"\0")


def read_slots(fd: int, first: int, end: int) -> list[tuple[int, int]]:
    """``(kind, digest)`` of regions ``[first, end)`` from an open digest file."""
    return decode_slots(read_slot_bytes(fd, first, end))


def decode_slots(raw: bytes) -> list[tuple[int, int]]:
    """``(kind, digest)`` of each slot of ``raw`` (``decode_slot``)."""
    view = memoryview(raw)
    return [decode_slot(view[i:i + SLOT_SIZE]) for i in range(0, len(raw), SLOT_SIZE)]


def copied_slots(digests: Iterable[int]) -> bytes:
    """The slots that say "copied" with these digests, one after the other: what a
    verify expects to read where every region matches (one compare per chunk, not
    a decode per region). A digest repeated (a run of holes) is encoded once."""
    out, prev, slot = [], -1, b""
    for d in digests:
        if d != prev:
            prev, slot = d, encode_slot(COPIED, d)
        out.append(slot)
    return b"".join(out)
