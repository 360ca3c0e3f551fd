"""A running clone: the clone, its copier and its status file, as every command uses them.

``CloneSession`` is what ``clone``, ``serve``, ``mount`` and ``boot`` share: open or
create the clone for a source, start the copier, publish progress to the status
file ``CLONE.lcstatus`` (read by ``liveclone status`` while the owner runs), and
on ``close`` stop the copier and commit the map.

Pause and resume: ``liveclone pause`` creates ``CLONE.lcpause`` and ``liveclone
resume`` removes it. The session follows that file whenever it publishes its
status, so a running process pauses within STATUS_INTERVAL, and one started on a
paused clone does not copy until it is resumed. Only the background copy stops:
guests keep reading and writing, and their partial writes still fill regions.

Boot profiles (``core.profile``): a session may replay a profile (its copier
fetches the profile's regions first) and record one (the guest's reads, saved as
``CLONE.lcprofile`` when the recording window closes or the session does). A
profile recorded for another source is refused before anything is created.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from liveclone.core import fsops
from liveclone.core.clone import Clone
from liveclone.core.copier import Copier, Phase
from liveclone.core.opening import open_clone as core_open_clone
from liveclone.core.profile import Profile, ProfileOptions, Recorder
from liveclone.core.profile import default_path as default_profile_path
from liveclone.errors import UsageError
from liveclone.sources import Source, open_source

STATUS_SUFFIX = ".lcstatus"
PAUSE_SUFFIX = ".lcpause"
STATUS_INTERVAL = 0.5
STATUS_BLOCK = 4096


def status_path(clone_path: str) -> str:
    return os.path.abspath(clone_path) + STATUS_SUFFIX


def pause_path(clone_path: str) -> str:
    return os.path.abspath(clone_path) + PAUSE_SUFFIX


def open_clone(source_spec: str | None, clone_path: str,
               region_size: int | None = None,
               opener: Callable[[str], Source] = open_source) -> Clone:
    """Resume the clone at ``clone_path`` if it exists, else create it from
    ``source_spec``. A complete clone needs no source: a missing one is not opened.
    ``opener`` opens the source (``open_source``, or a ``SourceCache``'s ``open``)."""

    def source(needed: bool) -> Source | None:
        if needed or (source_spec and os.path.exists(source_spec)):
            if source_spec is None:
                raise UsageError(f"the clone {clone_path} is not complete (or not made "
                                 "yet): give its SOURCE")
            return opener(source_spec)
        return None

    return core_open_clone(clone_path, source, region_size=region_size, create=True)


def _refusing_other_source(opener: Callable[[str], Source], profile: Profile
                           ) -> Callable[[str], Source]:
    """``opener``, refusing (UsageError) a source that ``profile`` was not recorded for."""

    def open_checked(spec: str) -> Source:
        source = opener(spec)
        problem = profile.identity_problem(source.identity(), source.size)
        if problem is not None:
            source.close()
            raise UsageError(problem)
        return source

    return open_checked


class CloneSession:
    """A clone with its copier running and its status published."""

    def __init__(self, source_spec: str | None, clone_path: str,
                 region_size: int | None = None, rate: float | None = None,
                 copy: bool = True, copy_on_read: bool | None = None,
                 persistent: bool = True,
                 opener: Callable[[str], Source] = open_source,
                 profile: ProfileOptions | None = None) -> None:
        """``persistent``: a long-running service keeps retrying regions whose source
        reads fail; a one-shot copy (``liveclone clone``) reports them and stops.
        ``opener``: how the source is opened, e.g. ``SourceCache.open`` (the daemon).
        ``profile``: boot profiles to replay and record (``core.profile``)."""
        profile = profile or ProfileOptions()
        if profile.replay is not None:  # refused before a clone is made from the source
            opener = _refusing_other_source(opener, profile.replay)
        self.clone = open_clone(source_spec, clone_path, region_size, opener)
        if profile.replay is not None:  # a complete clone may be opened without source
            problem = profile.replay.identity_problem(self.clone.header.source,
                                                      self.clone.size)
            if problem is not None:
                self.clone.close()
                raise UsageError(problem)
        source = self.clone.source
        if copy_on_read is None:  # default: on for remote sources, whose reads are dear
            copy_on_read = source is not None and source.fileno() is None
        self.clone.copy_on_read = copy_on_read
        self.copier = Copier(self.clone, rate=rate, persistent=persistent,
                             profile=profile.replay, replay_bytes=profile.replay_bytes,
                             replay_time=profile.replay_time)
        self.started = time.time()
        self._copy = copy
        self._copy_started = False
        self._stop = threading.Event()
        self._status_thread = threading.Thread(target=self._publish_loop, name="status",
                                               daemon=True)
        self.extra_status: dict[str, Any] = {}  # frontends add their counters here
        self._mode = os.stat(self.clone.path).st_mode & 0o777
        self.recorder: Recorder | None = None
        if profile.record and profile.record_time > 0:
            self.recorder = Recorder(
                self.clone.geometry, self.clone.header.source,
                profile.save_to or default_profile_path(self.clone.path),
                profile.record_time, profile.record_idle, self._mode)
            if self.clone.complete:
                self.recorder.state, self.recorder.error = "skipped", "the clone is complete"
            else:
                self.clone.on_read = self.recorder.hook

    def start(self) -> CloneSession:
        self.start_status()
        self.start_copy()
        return self

    def start_status(self) -> CloneSession:
        """Publish the status, and keep publishing it, without starting the copier:
        ``start_copy`` does that later (``serve`` answers its first clients before
        the copier's threads compete with its loop for the GIL)."""
        self._follow_pause_file()  # before the copier starts: a paused one never copies
        self.write_status()  # `status` sees the process as running from now on
        self._status_thread.start()
        return self

    def start_copy(self) -> None:
        """Start the background copy, once; not for a session that copies nothing
        or a complete clone."""
        if self._copy and not self.clone.complete and not self._copy_started:
            self._copy_started = True
            self.copier.start()

    def status(self, running: bool = True) -> dict[str, Any]:
        clone, copier = self.clone, self.copier
        stats = clone.stats
        source_status = clone.source.status() if clone.source is not None else {}
        last_error = clone.failure or clone.last_error
        # An outage in progress shows at once.
        if source_status.get("retrying") and clone.failure is None:
            last_error = f"source retrying: {source_status.get('last_error')}"
        phase = copier.phase
        if not running and phase == Phase.COPYING:
            phase = Phase.PAUSED
        return {
            "phase": phase,
            "running": running,
            "pid": os.getpid() if running else None,
            "clone": clone.path,
            "regions_total": clone.regions_total,
            "regions_present": clone.regions_present,
            "regions_partial": clone.regions_partial,
            "region_size": clone.region_size,
            "bytes_total": clone.size,
            "bytes_present": min(clone.regions_present * clone.region_size, clone.size),
            "bytes_copied": stats.bytes_copied,
            "bytes_from_source": stats.bytes_from_source,
            "regions_skipped": stats.regions_skipped,
            "rate": copier.rate(),
            "eta": copier.eta(),
            "guest": {
                "reads": stats.guest_reads,
                "writes": stats.guest_writes,
                "bytes_read": stats.guest_bytes_read,
                "bytes_written": stats.guest_bytes_written,
            },
            "commits": clone.commits,
            "regions_committed": clone.regions_committed,
            "state": clone.lifecycle.state.value,
            "source": clone.header.source,
            "source_status": source_status,
            "copy_on_read": clone.copy_on_read,
            "last_error": last_error,
            "copy_order": copier.order_status(),
            "profile": {
                "replay": copier.profile_status(),
                "record": self.recorder.status() if self.recorder is not None else None,
            },
            "updated": time.time(),
            **self.extra_status,
        }

    def write_status(self, running: bool = True) -> None:
        """Publish the status file: a new file renamed over the old one. Best effort,
        but a full disk must not hide the failure it causes: the text is padded to
        whole 4 KiB blocks, so when a new file cannot be written the old one's
        blocks are overwritten in place (readers retry a torn read)."""
        path = status_path(self.clone.path)
        text = json.dumps(self.status(running)).encode()
        text += b" " * (-(len(text) + 1) % STATUS_BLOCK) + b"\n"
        tmp = path + ".tmp"
        try:
            # As readable as the clone and its map, no more (invariant 11).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, self._mode)
                fsops.pwrite_all(fd, text, 0)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            return
        except OSError:
            pass
        try:  # no room for a new file: reuse the old one's blocks if it is as big
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                if os.fstat(fd).st_size >= len(text):
                    fsops.pwrite_all(fd, text.ljust(os.fstat(fd).st_size - 1) + b"\n", 0)
            finally:
                os.close(fd)
        except OSError:
            pass

    def _publish_loop(self) -> None:
        while not self._stop.wait(STATUS_INTERVAL):
            self.publish()

    def publish(self) -> None:
        """One round of the status thread: follow the pause file, the profile
        recording's window, and publish the status. Blocks. (The daemon calls it for
        all its sessions from one task instead of a thread each.)"""
        self._follow_pause_file()
        if self.recorder is not None and not self.recorder.poll():
            self.clone.on_read = None  # the window closed: reads cost nothing again
        self.write_status()

    def _follow_pause_file(self) -> None:
        paused = os.path.exists(pause_path(self.clone.path))
        if paused and not self.copier.paused:
            self.copier.pause()
        elif not paused and self.copier.paused:
            self.copier.resume()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the copier to finish; True if it has (complete or failed)."""
        if self.clone.complete:
            return True
        return self.copier.wait(timeout)

    def close(self) -> None:
        """Stop copying, commit the map, write the final status. Blocks."""
        self._stop.set()
        self.copier.stop()
        if self._status_thread.is_alive():
            self._status_thread.join()
        if self.recorder is not None:
            self.clone.on_read = None
            self.recorder.finish()  # saves what the window had so far
        try:
            self.clone.close()
        finally:
            self.write_status(running=False)

    def __enter__(self) -> CloneSession:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
