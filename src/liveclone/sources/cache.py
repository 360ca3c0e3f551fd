"""One fetch per source: a shared local cache that many clones of one remote source
read through.

A ``SourceCache`` owns a cache directory. Each remote source identity (HTTP(S), S3,
NBD, or an image format read through qemu-nbd: every source without a local file
descriptor) gets one *entry*: a liveclone clone of the source, made and filled by
the same core as any clone (``CloneSession``: crash-safe map, background copier,
copy-on-read). ``open(spec)`` gives a ``Source`` that reads through that entry:

- while the entry is incomplete, a read of a region absent from it fills that
  region in the entry first (copy-on-read through ``Clone.read``), so each byte
  crosses the network once however many clones read it; readers of the same
  absent region wait on the one fill (``core.ownership``);
- once the entry is complete, ``open`` gives the entry's file as a local file
  source: new clones fill from it with ``copy_file_range``, which shares blocks
  (reflink) where the filesystem can, and without the remote;
- a source whose identity changed (ETag, Last-Modified, size, fingerprint...)
  has another key, so another entry: never stale bytes.

Every ``Source`` given out reports the *remote* source's spec and identity, so a
consumer clone's map records the real source: ``liveclone status`` shows it,
``liveclone clone SPEC CLONE`` resumes it from the remote without any cache, and a
changed source is refused as always. Through a cache, the same identity finds the
same entry again.

On disk (``DIR`` is the cache directory)::

    DIR/.lock              flock: one SourceCache (one process) per directory
    DIR/KEY/meta.json      identity, size, the digests of the specs seen, last use
    DIR/KEY/image          the entry: a clone, with image.lcmap, image.lcjournal

KEY is a digest of the identity. ``meta.json`` is written (tmp, fsync, rename, fsync
dir) before the entry's clone is created, so a KEY directory without it is debris
of a crash and is removed. The clone itself is crash-safe (invariant 7): after
``kill -9`` the entry resumes from its committed map.

``max_bytes`` bounds the directory: before an entry is made or reopened, least-
recently-used entries that no clone holds are evicted until it fits. An entry
counts what it holds on disk, and an incomplete open entry also the rest of its
size (what it may still grow to); a new one, its size and ``ENTRY_EXTRA``. An
entry held by a clone is never evicted; when the bound cannot be met anyway, the
source is read directly, uncached, and ``status()["warning"]`` (and the log) says
so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from liveclone.core import fsops
from liveclone.core.fill import SourceReadError
from liveclone.core.metadata import MapStore
from liveclone.dirlock import lock_directory
from liveclone.errors import (
    CloneFailedError,
    CorruptMetadataError,
    LivecloneError,
    NotACloneError,
    SourceError,
    SourceUnreachableError,
    TargetError,
)
from liveclone.session import CloneSession
from liveclone.sources import open_source
from liveclone.sources.base import Extent, Source
from liveclone.sources.local import LocalFileSource
from liveclone.units import format_size

log = logging.getLogger(__name__)

META_NAME = "meta.json"
IMAGE_NAME = "image"
KEY_CHARS = 32  # hex digits of the identity digest that name an entry
# What an entry not made yet is expected to hold besides its image: the map's
# journal (256 KiB reserved ahead of its end), the map, status and meta files.
ENTRY_EXTRA = 512 << 10
EVICTED = ".evicted-"  # an evicted entry's directory while it is removed


def entry_key(identity: dict[str, Any]) -> str:
    """The entry for a source identity: equal identities, equal keys; any change in
    what the source vouches for (ETag, size, fingerprint...), another key."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS]


def spec_digest(spec: str) -> str:
    """What ``meta.json`` keeps of a spec: URLs may carry passwords or signatures."""
    return hashlib.sha256(spec.encode()).hexdigest()


def _message(e: BaseException) -> str:
    return e.message if isinstance(e, LivecloneError) else (
        getattr(e, "strerror", None) or str(e))


def _allocated(path: str) -> int:
    """Bytes a file, or a directory's files, hold on disk (sparse: data only)."""
    try:
        if not os.path.isdir(path):
            return os.stat(path).st_blocks * 512
        names = os.listdir(path)
    except FileNotFoundError:
        return 0
    return sum(_allocated(os.path.join(path, name)) for name in names)


@dataclass
class _Entry:
    """One source identity's cache. Fields are guarded by ``SourceCache._lock``."""

    key: str
    dir: str
    identity: dict[str, Any]
    size: int
    specs: list[str]  # digests of the specs it was opened with (offline lookup)
    created: float
    last_used: float
    # The entry's clone, open in this process (None: only on disk).
    session: CloneSession | None = None
    # Invariant: holders > 0 ⇒ the entry is never evicted. One per Source given
    # out and not yet closed.
    holders: int = 0
    copying: bool = False  # its copier was started (on the first read through it)
    # Bytes fetched by sessions of this entry that were closed (evicted or reopened).
    fetched_before: int = 0
    last_error: str | None = None  # the last time reads had to bypass the entry
    # Whether the committed map of an entry not open here is complete (None: not
    # read yet); only valid while ``session`` is None.
    complete_on_disk: bool | None = None

    @property
    def image(self) -> str:
        return os.path.join(self.dir, IMAGE_NAME)

    def complete(self) -> bool:
        if self.session is not None:
            return self.session.clone.complete
        if self.complete_on_disk is None:  # read once: nobody writes it while unloaded
            try:
                self.complete_on_disk = MapStore.read(self.image)[1].complete
            except (OSError, CorruptMetadataError):
                self.complete_on_disk = False
        return self.complete_on_disk

    def fetched(self) -> int:
        if self.session is None:
            return 0
        return self.session.clone.stats.bytes_from_source

    def meta(self) -> dict[str, Any]:
        return {"version": 1, "key": self.key, "identity": self.identity,
                "size": self.size, "specs": self.specs, "created": self.created,
                "last_used": self.last_used}


@dataclass
class _Hold:
    """A clone's hold on an entry: released once, when its Source closes."""

    cache: SourceCache
    entry: _Entry
    released: bool = field(default=False)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.cache._release(self.entry)


class SourceCache:
    """The cache directory of a process (the daemon): one entry per source identity.
    Thread-safe."""

    def __init__(self, cache_dir: str, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise TargetError(f"the cache size must be positive, not {max_bytes}")
        self.dir = os.path.abspath(cache_dir)
        self.max_bytes = max_bytes
        self._lock_fd = lock_directory(self.dir, f"the cache directory {self.dir}",
                                       "give each daemon its own cache directory")
        self._lock = threading.Lock()
        # --- guarded by _lock ----------------------------------------------------
        self._entries: dict[str, _Entry] = {}  # every entry on disk, by key
        self.hits = 0  # opens that found their source's entry (its bytes shared)
        self.misses = 0  # opens that made a new entry (its bytes to be fetched)
        self.uncached = 0  # opens read directly because the bound could not be met
        self.warning: str | None = None  # why the last uncached open was uncached
        self._fetched_gone = 0  # bytes fetched by entries since evicted
        self._reapers: list[threading.Thread] = []  # evicted entries being removed
        self._closed = False
        # --- end ---------------------------------------------------------------
        self._scan()
        with self._lock:
            self._make_room(0, None)  # the bound may have been lowered since

    # -- the interface -------------------------------------------------------------

    def open(self, spec: str) -> Source:
        """A Source reading ``spec`` through the one shared entry for its identity.

        A local plain file (a source with a file descriptor) is returned as
        ``open_source(spec)``: there is nothing to fetch. A remote that does not
        answer is served from a complete entry opened with the same spec, if there
        is one (the newest); otherwise its SourceUnreachableError is raised.
        Closing the Source releases its hold on the entry."""
        try:
            upstream = open_source(spec)
        except SourceUnreachableError as e:
            return self._open_offline(spec, e)
        if upstream.fileno() is not None:
            return upstream
        try:
            identity = upstream.identity()
            key = entry_key(identity)
            with self._lock:
                self._check_open()
                found = self._entries.get(key)
                if found is None:
                    if not self._make_room(upstream.size + ENTRY_EXTRA, None):
                        return self._uncached(upstream)
                else:
                    if found.session is None:
                        need = 0 if found.complete() else (
                            found.size - _allocated(found.dir))
                        if not self._make_room(max(need, 0), key):
                            return self._uncached(upstream)
                entry = found
                try:
                    if entry is None:
                        entry = self._new_entry(key, spec, identity, upstream.size)
                    self._load(entry, upstream)
                except (CorruptMetadataError, NotACloneError) as e:
                    # Its bytes are only a cache: a damaged entry is made again
                    # (these are raised before the entry's clone took ``upstream``).
                    log.warning("cache %s: entry %s is damaged (%s); making it again",
                                self.dir, key, e.message)
                    assert entry is not None
                    self._evict(entry)
                    entry = self._new_entry(key, spec, identity, upstream.size)
                    self._load(entry, upstream)
                except (OSError, LivecloneError) as e:
                    # The cache's side (its disk is full, unwritable...): the clone
                    # still gets its source, directly. The entry's files go.
                    if entry is not None and entry.holders == 0:
                        self._evict(entry)
                    upstream.close()  # a failed open may have closed it already
                    return self._uncached(
                        open_source(spec),
                        f"its cache entry cannot be opened ({_message(e)}); fix the "
                        "cache directory")
                if found is None:
                    self.misses += 1
                else:
                    self.hits += 1
                source = self._hold(entry, spec)
        except BaseException:
            upstream.close()
            raise
        if source is not upstream and (entry.session is None
                                       or entry.session.clone.source is not upstream):
            upstream.close()  # the entry has its own, or needs none
        return source

    def status(self) -> dict[str, Any]:
        """Counters and entries, for the daemon's status and ``/metrics``."""
        with self._lock:
            entries = [self._entry_status(e) for e in
                       sorted(self._entries.values(), key=lambda e: -e.last_used)]
            return {
                "dir": self.dir,
                "hits": self.hits,
                "misses": self.misses,
                "uncached": self.uncached,
                "bytes_fetched": self._fetched_gone + sum(
                    e.fetched_before + e.fetched() for e in self._entries.values()),
                "bytes_used": self._usage(),
                "max_bytes": self.max_bytes,
                "warning": self.warning,
                "entries": entries,
            }

    def close(self) -> None:
        """Stop every entry's copier and commit its map; release the directory.
        Sources still open read nothing more (close the clones first)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            errors = []
            for entry in self._entries.values():
                try:
                    self._unload(entry)
                except CloneFailedError as e:
                    errors.append(e)
            reapers = self._reapers
        for reaper in reapers:
            reaper.join()
        os.close(self._lock_fd)
        if errors:
            raise errors[0]

    def __enter__(self) -> SourceCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- entries -------------------------------------------------------------------

    def _scan(self) -> None:
        """Know every entry on disk; remove what a crash left before an entry's meta."""
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            if EVICTED in name:  # an eviction cut short
                shutil.rmtree(path, ignore_errors=True)
                continue
            if len(name) != KEY_CHARS or not os.path.isdir(path):
                continue
            try:
                with open(os.path.join(path, META_NAME)) as f:
                    meta = json.load(f)
                entry = _Entry(key=name, dir=path, identity=dict(meta["identity"]),
                               size=int(meta["size"]), specs=list(meta["specs"]),
                               created=float(meta["created"]),
                               last_used=float(meta["last_used"]))
            except FileNotFoundError:
                log.info("cache %s: removing %s, an entry cut short before its meta",
                         self.dir, name)
                shutil.rmtree(path, ignore_errors=True)
                continue
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("cache %s: ignoring entry %s, its %s is unreadable (%s); "
                            "remove the directory to reclaim it", self.dir, name,
                            META_NAME, e)
                continue
            if entry_key(entry.identity) != name:
                log.warning("cache %s: ignoring entry %s, its identity does not match "
                            "its name; remove the directory to reclaim it", self.dir, name)
                continue
            self._entries[name] = entry

    def _new_entry(self, key: str, spec: str, identity: dict[str, Any],
                   size: int) -> _Entry:
        """Record a new entry on disk (its meta; the clone comes in ``_load``)."""
        now = time.time()
        entry = _Entry(key=key, dir=os.path.join(self.dir, key), identity=identity,
                       size=size, specs=[spec_digest(spec)], created=now, last_used=now)
        try:
            os.makedirs(entry.dir, mode=0o700, exist_ok=True)
            self._write_meta(entry, durable=True)
        except OSError as e:
            raise TargetError(f"cannot make a cache entry in {self.dir}: {e.strerror}; "
                              "free space or fix the directory's permissions") from None
        self._entries[key] = entry
        return entry

    def _write_meta(self, entry: _Entry, durable: bool = False) -> None:
        """Replace meta.json atomically. ``durable`` for a new entry (its name must
        survive a power cut before its clone is made); last-use updates need not."""
        path = os.path.join(entry.dir, META_NAME)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            fsops.pwrite_all(fd, json.dumps(entry.meta()).encode(), 0)
            if durable:
                fsops.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            fsops.fsync_dir(path)
            fsops.fsync_dir(entry.dir)

    def _load(self, entry: _Entry, upstream: Source | None) -> None:
        """Open the entry's clone in this process, if not yet. Its copier starts on
        the first read through it (``_start_copier``), so an entry made for a clone
        that is then refused (its source changed) fetches nothing."""
        if entry.session is not None:
            return

        def opener(_spec: str) -> Source:
            if upstream is None:
                raise SourceError(f"the cache entry {entry.dir} is not complete and its "
                                  "source cannot be reached")
            return upstream

        # The spec only matters for an incomplete entry, which gets ``upstream``.
        entry.session = CloneSession(entry.identity.get("path"), entry.image,
                                     copy=False, copy_on_read=True, persistent=True,
                                     opener=opener).start()
        entry.copying = False

    def _unload(self, entry: _Entry) -> None:
        """Stop the entry's copier and close its clone (committing its map)."""
        session, entry.session = entry.session, None
        entry.complete_on_disk = None
        if session is not None:
            entry.fetched_before += session.clone.stats.bytes_from_source
            session.close()

    def _start_copier(self, entry: _Entry) -> None:
        if entry.copying:
            return
        with self._lock:
            if not entry.copying and entry.session is not None:
                entry.copying = True
                if not entry.session.clone.complete:
                    entry.session.copier.start()

    def _hold(self, entry: _Entry, spec: str) -> Source:
        """A Source for one clone, holding the entry until it closes."""
        assert entry.session is not None
        entry.holders += 1
        entry.last_used = time.time()
        digest = spec_digest(spec)
        if digest not in entry.specs:
            entry.specs.append(digest)
        self._write_meta(entry)
        hold = _Hold(self, entry)
        try:
            if entry.session.clone.complete:
                return _EntryFile(entry, spec, hold)
            return _EntryReader(self, entry, spec, hold)
        except BaseException:
            entry.holders -= 1
            raise

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.holders -= 1
            entry.last_used = time.time()
            if self._closed or entry.key not in self._entries:
                return
            try:
                self._write_meta(entry)
            except OSError as e:
                log.warning("cache %s: cannot record the last use of %s: %s",
                            self.dir, entry.key, e.strerror)
            if self.max_bytes is not None and self._usage() > self.max_bytes:
                self._make_room(0, None)

    def _open_offline(self, spec: str, error: SourceUnreachableError) -> Source:
        """The remote does not answer: serve the newest complete entry opened with
        this spec. Its bytes are the source as it was when the entry was made; a
        remote that changed meanwhile is noticed at the next open that reaches it."""
        digest = spec_digest(spec)
        with self._lock:
            self._check_open()
            found = [e for e in self._entries.values() if digest in e.specs and e.complete()]
            if not found:
                raise error
            entry = max(found, key=lambda e: e.last_used)
            log.warning("cache %s: %s; serving the complete cached copy %s",
                        self.dir, error.message, entry.key)
            self._load(entry, None)
            self.hits += 1
            return self._hold(entry, spec)

    def _uncached(self, upstream: Source, why: str | None = None) -> Source:
        """The entry cannot be had (the bound cannot be met, or ``why``): read the
        source directly, and say so."""
        if why is None:
            held = sum(e.holders > 0 for e in self._entries.values())
            why = (f"it does not fit in the cache size {format_size(self.max_bytes or 0)}: "
                   f"{format_size(self._usage())} is used, by {held} entries that clones "
                   "still read. Give a larger cache size, or let those clones finish first")
        self.warning = (f"cache {self.dir}: {upstream.spec} ({format_size(upstream.size)}) "
                        f"is read directly from the source, not cached: {why}.")
        self.uncached += 1
        log.warning("%s", self.warning)
        return upstream

    def _check_open(self) -> None:
        if self._closed:
            raise TargetError(f"the cache {self.dir} is closed")

    # -- the bound -----------------------------------------------------------------

    def _charge(self, entry: _Entry) -> int:
        """What an entry counts against ``max_bytes``: its bytes on disk, and for an
        incomplete open entry, what it may still grow to."""
        held = _allocated(entry.dir)
        if entry.session is not None and not entry.session.clone.complete:
            held += max(entry.size - _allocated(entry.image), 0)
        return held

    def _usage(self) -> int:
        return sum(self._charge(e) for e in self._entries.values())

    def _make_room(self, need: int, keep: str | None) -> bool:
        """Evict least-recently-used entries no clone holds until ``need`` more bytes
        fit; False if they cannot (the rest is held). Called under ``_lock``."""
        if self.max_bytes is None:
            return True
        used = self._usage()
        victims = sorted((e for e in self._entries.values()
                          if e.holders == 0 and e.key != keep), key=lambda e: e.last_used)
        for victim in victims:
            if used + need <= self.max_bytes:
                break
            used -= self._charge(victim)
            self._evict(victim)
        return used + need <= self.max_bytes

    def _evict(self, entry: _Entry) -> None:
        """Forget an entry at once (under ``_lock``); its clone is closed and its
        files removed by a thread of their own, since closing waits for the copier's
        batch in flight, which may be a slow fetch: opens must not wait for it. The
        directory is renamed first, so a new entry of the same key never meets it."""
        assert entry.holders == 0, "an entry a clone holds is never evicted"
        del self._entries[entry.key]
        self._fetched_gone += entry.fetched_before + entry.fetched()
        doomed = f"{entry.dir}{EVICTED}{os.urandom(4).hex()}"  # never a KEY
        try:
            os.rename(entry.dir, doomed)
        except OSError:
            doomed = entry.dir
        session, entry.session = entry.session, None
        reaper = threading.Thread(target=self._reap, args=(session, doomed),
                                  name=f"cache-evict-{entry.key[:8]}")
        reaper.start()
        self._reapers = [t for t in self._reapers if t.is_alive()] + [reaper]
        log.info("cache %s: evicted %s (%s, last used %s)", self.dir, entry.key,
                 entry.identity.get("path"), time.ctime(entry.last_used))

    def _reap(self, session: CloneSession | None, path: str) -> None:
        if session is not None:
            try:
                session.close()
            except (OSError, LivecloneError) as e:  # its files are going anyway
                log.info("cache %s: closing evicted %s: %s", self.dir, path, e)
        shutil.rmtree(path, ignore_errors=True)

    def _entry_status(self, e: _Entry) -> dict[str, Any]:
        clone = e.session.clone if e.session is not None else None
        return {
            "key": e.key,
            "source": e.identity.get("path"),
            "identity": e.identity,
            "size": e.size,
            "complete": e.complete(),
            "phase": e.session.copier.phase if e.session is not None else "stopped",
            "regions_present": clone.regions_present if clone else None,
            "regions_total": clone.regions_total if clone else None,
            "holders": e.holders,
            "last_used": e.last_used,
            "bytes_on_disk": _allocated(e.dir),
            "bytes_fetched": e.fetched_before + e.fetched(),
            "last_error": e.last_error or (clone.failure or clone.last_error
                                           if clone else None),
        }


class _EntryReader(Source):
    """The remote source, read through an incomplete entry: absent regions are
    fetched into the entry first (its clone's copy-on-read), present ones come
    from its file. Reports the remote's spec and identity."""

    def __init__(self, cache: SourceCache, entry: _Entry, spec: str, hold: _Hold) -> None:
        assert entry.session is not None
        self.spec = spec
        self.size = entry.size
        self._cache, self._entry, self._hold = cache, entry, hold
        self._clone = entry.session.clone
        self._identity = dict(entry.identity)

    def pread(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if end <= offset:
            return bytes(max(length, 0))
        data: memoryview | bytearray
        try:
            data = self._clone.read(offset, end - offset)
        except SourceReadError:
            raise
        except OSError as e:
            # The entry's side (its disk is full...): the consumer still gets the
            # source's bytes, read directly, and the entry fills again later.
            source = self._clone.source
            if source is None:
                raise
            self._entry.last_error = f"reads bypass the entry: {e.strerror or e}"
            data = bytearray(source.pread(offset, end - offset))
        finally:  # after the first read, which need not share the source with it
            self._cache._start_copier(self._entry)
        if len(data) < length:
            data = bytearray(data) + bytes(length - len(data))
        # A bytearray or a view: every caller only slices it or takes its length,
        # and a copy into bytes would double a 32 MiB batch's memory.
        return cast(bytes, data)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        end = min(offset + length, self.size)
        if end <= offset:
            return iter(())
        # Present runs: the entry's holes; absent runs: the remote's own extents.
        return iter(self._clone.block_status(offset, end - offset))

    def check_unchanged(self) -> None:
        source = self._clone.source
        if source is not None:
            source.check_unchanged()

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def status(self) -> dict[str, Any]:
        source = self._clone.source
        return {**(source.status() if source is not None else {}),
                "cache_entry": self._entry.key}

    def close(self) -> None:
        self._hold.release()


class _EntryFile(LocalFileSource):
    """A complete entry as a local file source (``copy_file_range``, reflink,
    ``RWF_NOWAIT`` reads), reporting the remote's spec and identity."""

    def __init__(self, entry: _Entry, spec: str, hold: _Hold) -> None:
        try:
            super().__init__(entry.image)
        except SourceError as e:
            raise SourceError(f"the complete cache entry {entry.dir} cannot be read: "
                              f"{e.message}") from None
        self.spec = spec
        self._entry_key = entry.key
        self._identity = dict(entry.identity)
        self._hold = hold

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def status(self) -> dict[str, Any]:
        return {"cache_entry": self._entry_key, "cache_complete": True}

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._hold.release()


__all__ = ["SourceCache", "entry_key"]
