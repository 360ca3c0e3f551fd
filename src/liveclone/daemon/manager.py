"""The daemon's clones: create, list, pause, resume and remove them, by name.

Each clone is a ``CloneSession`` (the same clone, copier and status file as the
standalone commands), exported on the daemon's one NBD server under its name,
shown as ``MOUNT/<name>`` when the daemon has a FUSE directory, and recorded in
the state directory (``records``) so a restart serves it again.

Threads and the loop. Every method here runs on the event loop; whatever blocks
(opening or creating a clone, which reads the source and fsyncs; closing one,
which commits its map; writing records and status files) runs in the loop's
executor, so one slow clone never holds up the API or another clone's I/O.
Names and clone paths are reserved on the loop before that work starts, so two
requests can never make the same clone.

Errors a request can cause are ``ApiError``: an HTTP status, what went wrong and
how to fix it. A failed create leaves nothing behind (``open_clone`` removes what
it made) and touches no other clone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import PurePosixPath
from typing import Any

from liveclone.cli.status import combine_status
from liveclone.core.copier import Phase
from liveclone.core.metadata import map_paths
from liveclone.core.profile import ProfileOptions
from liveclone.core.profile import load as load_profile
from liveclone.daemon.copiers import CopierPool
from liveclone.daemon.events import EventBus
from liveclone.daemon.names import NAME_RULE, is_name
from liveclone.daemon.opener import SourceOpener
from liveclone.daemon.records import Record, StateDir
from liveclone.errors import (
    CloneBusyError,
    CorruptMetadataError,
    LivecloneError,
    MissingDependencyError,
    NoSpaceError,
    NotACloneError,
    SourceError,
    TargetError,
    UsageError,
)
from liveclone.nbd.server import NBDServer
from liveclone.session import CloneSession, pause_path, status_path
from liveclone.sources import Source, open_source
from liveclone.units import format_size, parse_size

log = logging.getLogger("liveclone.daemon")

STATUS_INTERVAL = 0.5  # seconds between status files and event checks
OPENERS = 16  # clones opened (or created) at once
BODY_FIELDS = {"source", "clone", "name", "region_size", "rate", "copy_on_read", "read_only",
               "profile"}


class ApiError(Exception):
    """A request that cannot be done: its HTTP status, the error and the fix."""

    def __init__(self, status: int, error: str, fix: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.fix = fix


def api_error(e: BaseException, what: str) -> ApiError:
    """The ApiError for an error raised while making or opening a clone."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, (MissingDependencyError, SourceError)):
        return ApiError(422, e.message, "give a source the daemon can open and read: "
                        "a readable image file, or a reachable http(s)://, s3:// or "
                        "nbd:// URL")
    if isinstance(e, (CloneBusyError, NotACloneError, CorruptMetadataError)):
        return ApiError(409, e.message, "give another clone path, or stop what uses it")
    if isinstance(e, NoSpaceError) or (isinstance(e, OSError)
                                       and e.errno in (errno.ENOSPC, errno.EDQUOT)):
        msg = e.message if isinstance(e, LivecloneError) else f"{what}: {e.strerror}"
        return ApiError(507, msg, "free space on the clone's filesystem, or give a clone "
                        "path on another one")
    if isinstance(e, (UsageError, TargetError)):
        return ApiError(400, e.message, "correct the request and send it again")
    if isinstance(e, LivecloneError):
        return ApiError(400, e.message, "correct the request and send it again")
    if isinstance(e, OSError):
        return ApiError(500, f"{what}: {e.strerror or e}", "see the daemon's log")
    log.error("%s failed", what, exc_info=e)
    return ApiError(500, f"{what} failed: {e!r}", "see the daemon's log")


def parse_body(body: object) -> Record:
    """Check a POST /v1/clones body (400 for anything wrong) and make its record."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object",
                       'send {"source": ..., "clone": "/abs/path"}')
    unknown = sorted(set(body) - BODY_FIELDS)
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}",
                       f"use only {', '.join(sorted(BODY_FIELDS))}")
    for key in ("source", "clone"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise ApiError(400, f"{key!r} is required and must be a non-empty string",
                           'send {"source": ..., "clone": "/abs/path"}')
    clone: str = body["clone"]
    if "\0" in clone or not os.path.isabs(clone):
        raise ApiError(400, f"the clone path {clone!r} is not absolute",
                       "give the clone's absolute path, e.g. /var/lib/images/vm1.img")
    if ".." in PurePosixPath(clone).parts:
        raise ApiError(400, f"the clone path {clone!r} contains '..'",
                       "give the clone's path without '..' components")
    clone = os.path.normpath(clone)
    name = body.get("name", os.path.basename(clone))
    if not isinstance(name, str) or not is_name(name):
        raise ApiError(400, f"invalid clone name {name!r}", f"give a name of {NAME_RULE}")
    source: str = body["source"]
    if "://" not in source and not os.path.isabs(source):
        raise ApiError(400, f"the source path {source!r} is not absolute",
                       "give the source's absolute path or a URL")
    sizes: dict[str, int | None] = {}
    for key in ("region_size", "rate"):
        value = body.get(key)
        if value is None:
            sizes[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ApiError(400, f"{key} must be a size such as \"64K\" or a number",
                           f"give {key} as a string like \"64K\" or \"100M\"")
        try:
            sizes[key] = parse_size(value, key)
        except UsageError as e:
            raise ApiError(400, e.message, f"give {key} like \"64K\" or \"100M\"") from None
        if sizes[key] is not None and sizes[key] <= 0:  # type: ignore[operator]
            raise ApiError(400, f"{key} must be above 0", f"give a positive {key}")
    for key in ("copy_on_read", "read_only"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise ApiError(400, f"{key} must be true or false", f"give {key} as a boolean")
    extra = {}
    profile = body.get("profile")
    if profile is not None:
        if not isinstance(profile, str) or not os.path.isabs(profile):
            raise ApiError(400, f"the profile {profile!r} is not an absolute path",
                           "give the absolute path of a .lcprofile file")
        extra["profile"] = profile
    return Record(name=name, source=source, clone=clone, region_size=sizes["region_size"],
                  rate=sizes["rate"], copy_on_read=body.get("copy_on_read"),
                  read_only=bool(body.get("read_only", False)), created=time.time(),
                  extra=extra)


def check_space(record: Record) -> None:
    """A new clone of a local source on a filesystem without room for the source's
    data is refused (507) before anything is made. Remote and image sources are not
    measured here: their copier reports a full disk when it meets one."""
    if "://" in record.source or os.path.exists(record.clone):
        return
    try:
        st = os.stat(record.source)
        vfs = os.statvfs(os.path.dirname(record.clone))
    except OSError:
        return  # the open reports it
    need = min(st.st_size, st.st_blocks * 512)
    free = vfs.f_bavail * vfs.f_frsize
    if need > free:
        raise ApiError(507, f"no space for the clone {record.clone}: its source holds "
                       f"{format_size(need)} of data and the filesystem has "
                       f"{format_size(free)} free",
                       "free space there, or give a clone path on a filesystem with room")


class DaemonSession(CloneSession):
    """A ``CloneSession`` whose status the daemon publishes (one task for all clones,
    not one thread each) and whose copier runs in the daemon's ``CopierPool``."""

    def __init__(self, record: Record, opener: Callable[[str], Source],
                 pool: CopierPool) -> None:
        profile = _profile_options(record)
        super().__init__(record.source, record.clone, record.region_size, record.rate,
                         copy_on_read=record.copy_on_read, opener=opener, profile=profile)
        # The session made a copier with threads of its own: the pool's instead.
        self.copier = pool.copier(self.clone, rate=record.rate, persistent=True,
                                  profile=profile.replay, replay_bytes=profile.replay_bytes,
                                  replay_time=profile.replay_time)

    def start(self) -> DaemonSession:
        self._follow_pause_file()
        if self._copy and not self.clone.complete:
            self.copier.start()
        self.write_status()
        return self


def _open_session(record: Record, opener: Callable[[str], Source],
                  pool: CopierPool) -> DaemonSession:
    """Open (or create) the clone and start its copy, in one trip off the loop."""
    session = DaemonSession(record, opener, pool)
    try:
        return session.start()
    except BaseException:
        session.close()
        raise


def _profile_options(record: Record) -> ProfileOptions:
    """A boot profile to replay, as ``serve --profile`` takes it (read here, in the
    executor: a missing or damaged file is a UsageError, so 400)."""
    path = record.extra.get("profile")
    if path is None:
        return ProfileOptions()
    return ProfileOptions(replay=load_profile(path))


@dataclass(eq=False)
class Managed:
    """One clone of the daemon."""

    record: Record
    session: DaemonSession | None = None
    error: str | None = None  # why it could not be opened (after a restart)
    phase: str | None = None  # last phase seen, for the completed/failed events
    busy: bool = False  # being created, removed, paused or resumed
    file: str | None = None  # its FUSE file

    @property
    def name(self) -> str:
        return self.record.name


class Manager:
    """Every clone of one daemon. Methods run on the event loop."""

    def __init__(self, state: StateDir, server: NBDServer, events: EventBus,
                 pool: CopierPool, mount: Any = None, cache: Any = None) -> None:
        self.state = state
        self.server = server
        self.events = events
        self.mount = mount  # fuse.mount.MountHandle of a directory, or None
        self.cache = cache  # sources.cache.SourceCache, or None
        self.opener: Callable[[str], Source] = SourceOpener(
            cache.open if cache is not None else open_source).open
        self.pool = pool
        # Opening a clone may wait on its source (a remote one retries for up to 30 s):
        # opens get threads of their own, so that a few slow ones never hold up the
        # status files, removals and records of the other clones (the default executor).
        self._openers = concurrent.futures.ThreadPoolExecutor(OPENERS,
                                                              thread_name_prefix="open")
        self.clones: dict[str, Managed] = {}
        self._paths: dict[str, str] = {}  # clone path → name (reserved ones too)
        self._watcher: asyncio.Task[None] | None = None

    # -- queries -------------------------------------------------------------------

    def nbd_uri(self, name: str) -> str | None:
        uris = self.server.uri(name)
        return uris[0] if uris else None

    def describe(self, m: Managed) -> dict[str, Any]:
        """The API's object for one clone."""
        r = m.record
        return {"name": r.name, "source": r.source, "clone": r.clone,
                "nbd_uri": self.nbd_uri(r.name), "file": m.file, "status": self.status(m)}

    def status(self, m: Managed, running: bool = True) -> dict[str, Any]:
        """``liveclone status --json``'s object, from memory."""
        s = m.session
        if s is None:  # could not be opened again: what the record knows, and why
            return {"phase": Phase.FAILED, "running": False, "clone": m.record.clone,
                    "source": {"path": m.record.source}, "regions_total": 0,
                    "regions_present": 0, "region_size": m.record.region_size or 0,
                    "bytes_total": 0, "bytes_copied": 0, "rate": 0.0, "eta": None,
                    "last_error": m.error or "being created"}
        clone = s.clone
        return combine_status(clone.path, clone.header, clone.regions_total,
                              clone.regions_committed, s.status(running), running)

    def get(self, name: str) -> Managed:
        m = self.clones.get(name)
        if m is None or (m.session is None and m.error is None):
            raise ApiError(404, f"no clone named {name!r}",
                           "GET /v1/clones lists the clones (liveclone ls)")
        return m

    def listing(self) -> list[dict[str, Any]]:
        return [self.describe(m) for m in list(self.clones.values())
                if m.session is not None or m.error is not None]

    # -- creating ------------------------------------------------------------------

    async def create(self, record: Record, save: bool = True) -> Managed:
        """Make (or resume) the clone and serve it; raises ApiError. The clone is
        readable over NBD when this returns."""
        self._reserve(record)
        m = self.clones[record.name]
        loop = asyncio.get_running_loop()
        opening: asyncio.Future[DaemonSession] | None = None
        try:
            if save:
                check_space(record)
            opening = loop.run_in_executor(
                self._openers, partial(_open_session, record, self.opener, self.pool))
            if save:
                # The record is made durable beside the clone (each costs fsyncs); a
                # failed create deletes it again.
                await loop.run_in_executor(None, self.state.save, record)
            session = await opening
        except BaseException as e:
            if save:
                await self._forget(record, opening)
                self._release(m)
                raise api_error(e, f"creating the clone {record.clone}") from None
            m.error = api_error(e, f"opening the clone {record.clone}").error
            m.busy = False
            log.error("cannot serve %s again: %s", record.name, m.error)
            return m
        try:
            m.session = session
            self.server.add_export(record.name, session.clone, read_only=record.read_only)
            if self.mount is not None:
                m.file = await loop.run_in_executor(None, partial(
                    self.mount.add, record.name, session.clone, record.read_only))
        except BaseException as e:
            await self._teardown(m)
            if save:
                await self._forget(record, None)
            self._release(m)
            raise api_error(e, f"creating the clone {record.clone}") from None
        m.busy = False
        m.phase = session.copier.phase
        session.extra_status["daemon"] = {"name": record.name, "file": m.file}
        if save:
            self.events.publish("created", record.name, self.status(m))
            log.info("created %s: %s from %s", record.name, record.clone, record.source)
        return m

    async def _forget(self, record: Record,
                      opening: asyncio.Future[DaemonSession] | None) -> None:
        """Undo a create that failed: its record goes (and a session that opened
        after all is closed)."""
        loop = asyncio.get_running_loop()
        if opening is not None and not opening.cancelled():
            try:
                session = await opening
            except BaseException:  # noqa: BLE001 - the error being reported already
                session = None
            if session is not None:
                await loop.run_in_executor(None, session.close)
        try:
            await loop.run_in_executor(None, self.state.delete, record.name)
        except OSError as e:
            log.error("cannot delete the record of %s: %s", record.name, e)

    def _reserve(self, record: Record) -> None:
        if record.name in self.clones:
            raise ApiError(409, f"a clone named {record.name!r} exists",
                           "give another name, or remove that clone first")
        other = self._paths.get(record.clone)
        if other is not None:
            raise ApiError(409, f"the clone path {record.clone} is in use by the clone "
                           f"{other!r}", "give another clone path")
        self.clones[record.name] = Managed(record, busy=True)
        self._paths[record.clone] = record.name

    def _release(self, m: Managed) -> None:
        self.clones.pop(m.name, None)
        if self._paths.get(m.record.clone) == m.name:
            del self._paths[m.record.clone]

    async def restore(self, parallel: int = 8) -> None:
        """Serve every recorded clone again (after a restart)."""
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(None, self.state.load)
        gate = asyncio.Semaphore(parallel)

        async def one(record: Record) -> None:
            async with gate:
                try:
                    await self.create(record, save=False)
                except ApiError as e:
                    log.error("skipping the recorded clone %s: %s", record.name, e.error)

        await asyncio.gather(*(one(r) for r in records))
        if records:
            log.info("serving %d recorded clone(s) again", len(records))

    # -- changing ------------------------------------------------------------------

    def _idle(self, name: str) -> Managed:
        m = self.get(name)
        if m.busy:
            raise ApiError(409, f"the clone {name!r} is busy with another request",
                           "try again in a moment")
        return m

    async def pause(self, name: str) -> Managed:
        m = self._idle(name)
        if m.session is not None:
            await asyncio.get_running_loop().run_in_executor(None, _pause, m.session, True)
        return m

    async def resume(self, name: str) -> Managed:
        m = self._idle(name)
        if m.session is not None:
            await asyncio.get_running_loop().run_in_executor(None, _pause, m.session, False)
        return m

    async def remove(self, name: str, delete_files: bool) -> dict[str, Any]:
        """Stop serving ``name``; with ``delete_files`` delete its clone and map too."""
        m = self._idle(name)
        m.busy = True
        final = self.status(m)
        try:
            await self._teardown(m)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self.state.delete, name)
            if delete_files:
                await loop.run_in_executor(None, _delete_files, m.record.clone)
        finally:
            self._release(m)
        if m.session is not None:
            final = self.status(m, running=False)
        self.events.publish("removed", name, final)
        log.info("removed %s (%s)%s", name, m.record.clone,
                 ", files deleted" if delete_files else "")
        return final

    async def _teardown(self, m: Managed) -> None:
        """Stop serving and close the clone (its map committed); keep its files."""
        loop = asyncio.get_running_loop()
        if m.name in self.server.exports:
            await self.server.remove_export(m.name)
        if self.mount is not None and m.file is not None:
            await loop.run_in_executor(None, self.mount.remove, m.name)
            m.file = None
        if m.session is not None:
            try:
                await loop.run_in_executor(None, m.session.close)
            except LivecloneError as e:
                log.error("closing %s: %s", m.name, e.message)

    # -- watching ------------------------------------------------------------------

    def start_watching(self) -> None:
        self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """Publish status files, follow pause files, and send completed/failed."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            sessions = [m.session for m in self.clones.values()
                        if m.session is not None and not m.busy]
            try:
                await loop.run_in_executor(None, _publish_all, sessions)
            except Exception:  # noqa: BLE001 - a status file is best effort
                log.exception("publishing status files")
            for m in list(self.clones.values()):
                if m.session is None or m.busy:
                    continue
                phase = m.session.copier.phase
                if phase != m.phase:
                    if phase in (Phase.COMPLETE, Phase.FAILED):
                        kind = "completed" if phase == Phase.COMPLETE else "failed"
                        self.events.publish(kind, m.name, self.status(m))
                    m.phase = phase

    async def close(self) -> None:
        """Stop serving every clone and commit their maps; records stay."""
        if self._watcher is not None:
            self._watcher.cancel()
        await asyncio.gather(*(self._teardown(m) for m in list(self.clones.values())
                               if m.session is not None), return_exceptions=True)
        self.clones.clear()
        self._paths.clear()
        await asyncio.get_running_loop().run_in_executor(None, self._openers.shutdown)


def _pause(session: DaemonSession, paused: bool) -> None:
    """Pause or resume the copy now, and keep it so across restarts (the pause file,
    as ``liveclone pause`` writes it)."""
    path = pause_path(session.clone.path)
    if paused:
        with open(path, "w") as f:
            f.write("paused through the daemon's API; POST .../resume removes this file\n")
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    session.publish()


def _publish_all(sessions: list[DaemonSession]) -> None:
    for session in sessions:
        session.publish()


def _delete_files(clone_path: str) -> None:
    """The clone file and every file liveclone keeps beside it (CLONE.lc*: map,
    journal, status, pause, digests, profile)."""
    import glob

    from liveclone.core import fsops

    beside = glob.glob(glob.escape(clone_path) + ".lc*")
    for path in (clone_path, *map_paths(clone_path), status_path(clone_path),
                 pause_path(clone_path), *beside):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    fsops.fsync_dir(clone_path)
