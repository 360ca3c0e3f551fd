"""Opening and creating a clone: the one entry point, ``open_clone``.

Order, so two processes can never both own a clone or clobber each other's map:

1. take the clone file and its lock. An existing file is opened and locked
   (``flock``, non-blocking: a holder means exit 7). A new file is made as an
   anonymous ``O_TMPFILE``, locked, and only then linked to its name, so it never
   appears unlocked; where the filesystem has no ``O_TMPFILE``, ``O_EXCL``;
2. with the lock held, load the map (finishing an interrupted compaction and
   undoing a torn commit), or, for a new clone, write the map, then size the file,
   and fsync the directory so the new names survive a power cut. The file stays
   empty until its map exists, so an empty file with no map is a create cut short
   (``kill -9``, power loss), which the next create finishes;
3. check the source against the map's record of it (invariants 1, 10).

A failure at any step releases what was taken; a clone created by this call is
removed again, so a failed start leaves no debris.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable

from liveclone.core import fsops
from liveclone.core.clone import Clone
from liveclone.core.metadata import MapStore, map_paths
from liveclone.core.regions import DEFAULT_REGION_SIZE, RegionMap, check_region_size
from liveclone.errors import (
    CloneBusyError,
    CorruptMetadataError,
    NotACloneError,
    SourceChangedError,
    SourceError,
    TargetError,
    UsageError,
)
from liveclone.sources.base import Source

# The source, or a function giving it when it is needed (True: the clone is new or
# incomplete and must have it; False: complete, a source is optional).
SourceArg = Source | Callable[[bool], Source | None] | None


def open_clone(path: str, source: SourceArg = None, *, region_size: int | None = None,
               create: bool = False, exclusive: bool = False,
               autocommit: bool = True) -> Clone:
    """Open the clone at ``path``, or with ``create`` make it if it does not exist.

    ``exclusive``: the clone must not exist yet. ``region_size``: for a new clone
    (default 64 KiB); for an existing one it must match. Raises the LivecloneError
    that names the problem: CloneBusyError, NotACloneError, CorruptMetadataError,
    SourceChangedError, TargetError, UsageError."""
    path = os.path.abspath(path)
    if region_size is not None:
        try:
            check_region_size(region_size)
        except ValueError as e:
            raise UsageError(str(e)) from None
    fd, created = _open_locked(path, create, exclusive)
    store: MapStore | None = None
    opened: Source | None = None
    made_map = False
    try:
        if MapStore.exists(path):
            store, rmap = MapStore.load(path)
            header = store.header
            if region_size is not None and region_size != header.region_size:
                raise UsageError(
                    f"the clone {path} was made with region size {header.region_size}; "
                    f"drop --region-size or give {header.region_size}")
            src = opened = _resolve(source, needed=not rmap.complete)
            if not rmap.complete:
                _check_source(path, src, header.size, header.source)
            actual = os.fstat(fd).st_size
            if actual != header.size:
                if rmap.present_count:
                    raise CorruptMetadataError(
                        f"clone file {path} is {actual} bytes but its map says "
                        f"{header.size} bytes with {rmap.present_count} regions present: "
                        "the file was truncated or replaced. Delete the clone and its map "
                        "and clone again.")
                os.ftruncate(fd, header.size)  # a create cut short before any data
            # Open digest slots left by a stop without a clean close (core.digests).
            store.digests.settle(fd, rmap, header.size, header.region_size)
        elif created or (create and os.fstat(fd).st_size == 0):
            # New, or an empty file with no map: a create cut short before its map
            # was written (the file stays empty until then), which is finished now.
            src = opened = _resolve(source, needed=True)
            assert src is not None
            header = MapStore.new_header(src.size, region_size or DEFAULT_REGION_SIZE,
                                         src.identity(), time.time())
            mode = _mode_for(src)
            os.fchmod(fd, mode)
            made_map = True
            store = MapStore.create(path, header, mode)  # the superblock marks the clone
            os.ftruncate(fd, header.size)  # only now: a crash before leaves it empty
            rmap = _empty_map(header.size, header.region_size)
            fsops.fsync(fd)
            fsops.fsync_dir(path)
        else:
            raise NotACloneError(
                f"{path} exists but is not a liveclone clone (no {os.path.basename(path)}"
                ".lcmap beside it); choose another clone path, or remove the file if you "
                "do not need it")
        return Clone(path, fd, store, rmap, src, autocommit)
    except BaseException:
        if store is not None:
            store.close()
        if opened is not None and opened is not source:
            opened.close()
        if created:
            for name in (path, *(map_paths(path) if made_map else ())):
                try:
                    os.unlink(name)
                except OSError:
                    pass
        os.close(fd)
        raise


def _open_locked(path: str, create: bool, exclusive: bool) -> tuple[int, bool]:
    """The clone file's descriptor, holding its exclusive lock; and whether this call
    created the file."""
    directory = os.path.dirname(path)
    young_until = time.monotonic() + 0.5
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if not create:
                raise NotACloneError(f"{path} is not a liveclone clone: it does not exist"
                                     ) from None
            made = _create_locked(path, directory)
            if made is None:
                continue  # another process created it first: open theirs
            return made, True
        except OSError as e:
            raise TargetError(f"cannot open clone file {path}: {e.strerror}") from None
        if exclusive:
            os.close(fd)
            raise TargetError(f"{path} already exists")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CloneBusyError(
                f"the clone {path} is in use by another liveclone process; stop it first "
                "(or use `liveclone status` to see its progress)") from None
        if (create and not MapStore.exists(path) and os.fstat(fd).st_size == 0
                and time.monotonic() < young_until):
            # An empty file with no map: perhaps another creator's, made with O_EXCL
            # and not locked yet. Let go, so it can lock it, and look again.
            os.close(fd)
            time.sleep(0.02)
            continue
        return fd, False


def _create_locked(path: str, directory: str) -> int | None:
    """Create ``path`` already locked; None if another process created it first."""
    if not os.path.isdir(directory):
        raise TargetError(f"cannot create clone {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise TargetError(f"cannot create clone {path}: directory {directory} is not "
                          "writable; choose a writable directory or fix its permissions")
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise TargetError(f"cannot create clone {path}: {e.strerror}") from None
        return _create_excl(path)
    fcntl.flock(fd, fcntl.LOCK_EX)  # nobody else can see this file yet
    proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # linkat(..., AT_SYMLINK_FOLLOW): giving src_dir_fd makes Python use linkat.
        os.link(str(fd), path, src_dir_fd=proc_fd, follow_symlinks=True)
    except FileExistsError:
        os.close(fd)
        return None
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EOPNOTSUPP, errno.EPERM, errno.ENOENT, errno.EXDEV):
            return _create_excl(path)
        raise TargetError(f"cannot create clone {path}: {e.strerror}") from None
    finally:
        os.close(proc_fd)
    return fd


def _create_excl(path: str) -> int | None:
    """``O_EXCL`` then lock. A racing opener may lock the empty file in between; it
    finds no map and lets go at once (``_open_locked``), so the wait here is short.
    Only the ``O_EXCL`` winner writes a map."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return None
    except OSError as e:
        raise TargetError(f"cannot create clone {path}: {e.strerror}") from None
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _mode_for(source: Source) -> int:
    """The clone and its map are never more readable than the source (invariant 11):
    0644 at most, without the permissions a local source lacks."""
    fileno = source.fileno()
    if fileno is None:
        return 0o644 & ~_umask()
    return 0o644 & os.fstat(fileno).st_mode & ~_umask() | 0o600


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, racily)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _empty_map(size: int, region_size: int) -> RegionMap:
    return RegionMap((size + region_size - 1) // region_size)


def _resolve(source: SourceArg, needed: bool) -> Source | None:
    got = source(needed) if callable(source) else source
    return got


def _check_source(path: str, source: Source | None, size: int,
                  recorded: dict[str, object]) -> None:
    """Refuse a missing, resized or changed source for an incomplete clone."""
    if source is None:
        raise SourceError(
            f"the clone {path} is not complete and needs its source "
            f"{recorded.get('path')!r}; give it")
    if source.size != size:
        raise SourceChangedError(
            f"source {source.spec} is {source.size} bytes but the clone {path} was made "
            f"from {size} bytes: it changed since the clone was made; give the original "
            "source")
    why = source.identity_mismatch(dict(recorded))
    if why:
        raise SourceChangedError(
            f"source {source.spec} changed since the clone {path} was made ({why}). "
            "Resuming would mix two different images. Restore the original source, or "
            "delete the clone and its map and start again.")
