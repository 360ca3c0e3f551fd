"""Boot profiles: which regions a guest reads first, recorded once and replayed.

A **profile** is a small JSON file: the identity of the source it was recorded on
(the ``source`` dict of the clone's map header), the source's size, and the byte
runs the guest read, in the order it first read them, merged where one run
continues the last::

    {"format": "liveclone-profile", "version": 1, "size": N, "region_size": R,
     "source": {...}, "recorded": UNIX_TIME, "runs": [[offset, length], ...]}

Runs are in bytes, so a profile recorded on a clone of one region size replays on
a clone of another. It is written atomically (tmp + fsync + rename + directory
fsync): a profile file is the old one or the new one, never half of either.

**Recording** (``Recorder``): the clone calls ``Recorder.hook`` with the offset and
length of every guest read (``Clone.on_read``). That is the hot path, so the hook
is a deque's own ``append`` (no Python frame, no lock, no clock); ``poll`` (the
session's status thread, every half second) turns them into regions and keeps
those not read before, in order. Every
region the guest reads counts, present or not: with the copier running, much of
what a boot reads was fetched just before by the copier's readahead, and a fresh
clone replaying the profile needs those regions as much as the others. The window
opens at the guest's first read and closes after ``max_time`` seconds, or once no
new region was read for ``idle`` seconds; then the hook is taken off and the
profile saved. A process that ends earlier saves what it has on ``finish``.

**Replay** is the copier's (``Copier`` with ``profile=``): the profile's regions
go first, in recorded order, after the reads a guest is waiting for.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from liveclone.core import fsops
from liveclone.core.regions import Geometry, RegionMap
from liveclone.errors import UsageError
from liveclone.values import Frozen

PROFILE_SUFFIX = ".lcprofile"
FORMAT = "liveclone-profile"
VERSION = 1

# Recording: the window after the guest's first read, and the idle time that ends it.
DEFAULT_RECORD_TIME = 120.0
DEFAULT_RECORD_IDLE = 10.0
# Replay: at most this many bytes of the profile, and for at most this long.
DEFAULT_REPLAY_BYTES = 2 << 30
DEFAULT_REPLAY_TIME = 300.0

Run = tuple[int, int]


def default_path(clone_path: str) -> str:
    return os.path.abspath(clone_path) + PROFILE_SUFFIX


def _identity(source: dict[str, Any]) -> dict[str, Any]:
    """What makes two sources the same image: everything but the name it was given."""
    return {k: v for k, v in source.items() if k != "path"}


class Profile(Frozen):
    """A recorded boot profile. ``runs``: ``(offset, length)`` in bytes, in first-read
    order; no byte is in two runs. ``region_size``: of the clone it was recorded on
    (informational); ``path``: where it was loaded from, for messages."""

    __slots__ = ("source", "size", "runs", "region_size", "recorded", "path")
    source: dict[str, Any]
    size: int
    runs: list[Run]
    region_size: int
    recorded: float
    path: str

    def __init__(self, source: dict[str, Any], size: int, runs: list[Run],
                 region_size: int = 0, recorded: float = 0.0, path: str = "") -> None:
        self._init(source, size, runs, region_size, recorded, path)

    def identity_problem(self, source: dict[str, Any], size: int) -> str | None:
        """Why this profile must not be applied to a clone of ``source``, or None."""
        mine, theirs = _identity(self.source), _identity(source)
        if mine == theirs and self.size == size:
            return None
        keys = sorted(k for k in {*mine, *theirs, "size"} if mine.get(k) != theirs.get(k))

        def facts(ident: dict[str, Any]) -> str:
            return ", ".join(f"{k} {str(ident.get(k))[:20]}" for k in keys)

        return (f"the profile {self.path} was recorded for another source and is not "
                f"applied: it is for {self.source.get('path')!r} ({facts(mine)}), this "
                f"clone's source is {source.get('path')!r} ({facts(theirs)}). Give the "
                "profile recorded for this source, or run without --profile to record one "
                "(boot, serve and mount save it as CLONE.lcprofile).")

    def region_runs(self, geometry: Geometry) -> list[Run]:
        """The runs as regions of ``geometry``, in order, each region once."""
        seen = RegionMap(geometry.count)
        out: list[Run] = []
        for offset, length in self.runs:
            span = geometry.span(offset, length)
            for a, b, present in seen.runs(span.start, span.stop):
                if not present:
                    _append_run(out, a, b)
            seen.set(span.start, span.stop)
        return out

    def to_json(self) -> bytes:
        return json.dumps({
            "format": FORMAT, "version": VERSION, "size": self.size,
            "region_size": self.region_size, "source": self.source,
            "recorded": self.recorded, "runs": [list(r) for r in self.runs],
        }, separators=(",", ":")).encode() + b"\n"


def _append_run(runs: list[Run], a: int, b: int) -> None:
    """Add ``[a, b)`` after the last run, merged with it when it continues it."""
    if runs and runs[-1][1] == a:
        runs[-1] = (runs[-1][0], b)
    else:
        runs.append((a, b))


def load(path: str) -> Profile:
    """Read a profile; a missing, unreadable or damaged file is a UsageError."""
    try:
        with open(path, "rb") as f:
            text = f.read(64 << 20)
    except OSError as e:
        raise UsageError(f"cannot read the profile {path}: {e.strerror or e}; give the "
                         "path of a .lcprofile file") from None
    try:
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError("not a liveclone profile")
        if d.get("version") != VERSION:
            raise ValueError(f"format version {d.get('version')!r}, this liveclone reads "
                             f"{VERSION}")
        runs = [(int(o), int(n)) for o, n in d["runs"]]
        size = int(d["size"])
        if any(o < 0 or n <= 0 or o + n > size for o, n in runs):
            raise ValueError("a run lies outside the image")
        return Profile(source=dict(d["source"]), size=size, runs=runs,
                       region_size=int(d.get("region_size", 0)),
                       recorded=float(d.get("recorded", 0.0)), path=path)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is not a usable liveclone profile ({e}); give a file "
                         "saved by liveclone (CLONE.lcprofile or --save-profile), or "
                         "record a new one") from None


def save(path: str, profile: Profile, mode: int = 0o600) -> None:
    """Write ``profile`` to ``path`` atomically: old file or new file, never torn."""
    fsops.write_file_atomically(path, profile.to_json(), mode)


class RecordState:
    WAITING = "waiting"  # for the guest's first read
    RECORDING = "recording"
    DONE = "done"  # saved
    SKIPPED = "skipped"  # nothing to save, or saving failed (``error`` says why)


class Recorder:
    """Records a guest's reads into a profile for ``path``; see the module doc.

    ``hook`` is the clone's ``on_read``: a deque's append, no lock, no I/O. Everything
    else runs in one thread at a time (the session's status thread, then ``finish``).
    """

    def __init__(self, geometry: Geometry, source: dict[str, Any], path: str,
                 max_time: float = DEFAULT_RECORD_TIME, idle: float = DEFAULT_RECORD_IDLE,
                 mode: int = 0o600) -> None:
        self.geometry = geometry
        self.source = source
        self.path = path
        self.max_time = max_time
        self.idle = idle
        self.mode = mode
        self.state: str = RecordState.WAITING
        self.error: str | None = None
        self.stopped_by: str | None = None  # "time", "idle", "exit"
        # (offset, length) of reads not yet looked at (appended by guest threads,
        # drained by poll).
        self._pending: deque[Run] = deque()
        # --- poll's own (one thread) -----------------------------------------------
        # Invariant: _seen has exactly the regions of _runs; _runs are disjoint, in
        # the order the guest first read them.
        self._runs: list[Run] = []
        self._seen: RegionMap | None = None
        self._started: float | None = None  # monotonic time of the first read
        self._last_new = 0.0  # monotonic time a new region was last seen
        self._lock = threading.Lock()  # poll vs finish

    @property
    def hook(self) -> Callable[[Run], None]:
        """The hot-path hook: remember ``(offset, length)`` of one guest read."""
        return self._pending.append

    @property
    def active(self) -> bool:
        return self.state in (RecordState.WAITING, RecordState.RECORDING)

    @property
    def regions(self) -> int:
        return sum(b - a for a, b in self._runs)

    def _drain(self, now: float) -> None:
        if self._seen is None:
            self._seen = RegionMap(self.geometry.count)
        seen, new, geometry = self._seen, False, self.geometry
        while True:
            try:
                offset, length = self._pending.popleft()
            except IndexError:
                break
            span = geometry.span(offset, length)
            first, end = span.start, span.stop
            for a, b, present in seen.runs(first, end):
                if not present:
                    _append_run(self._runs, a, b)
                    new = True
            seen.set(first, end)
        if new:
            if self._started is None:
                self._started = now
                self.state = RecordState.RECORDING
            self._last_new = now

    def poll(self, now: float | None = None) -> bool:
        """Take in what was noted; close the window (and save) when its time is up.
        True while still recording."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if not self.active:
                return False
            self._drain(now)
            if self._started is None:
                return True
            if now - self._started >= self.max_time:
                self._stop("time")
            elif now - self._last_new >= self.idle:
                self._stop("idle")
            return self.active

    def finish(self) -> None:
        """The guest's process ends: save what was recorded (if anything)."""
        with self._lock:
            if self.active:
                self._drain(time.monotonic())
                self._stop("exit")

    def _stop(self, why: str) -> None:
        self.stopped_by = why
        if not self._runs:
            self.state = RecordState.SKIPPED
            self.error = "the guest read nothing"
            return
        shift, size = self.geometry.shift, self.geometry.size
        runs = [(a << shift, min(b << shift, size) - (a << shift)) for a, b in self._runs]
        profile = Profile(source=self.source, size=size, runs=runs,
                          region_size=self.geometry.region_size, recorded=time.time())
        try:
            save(self.path, profile, self.mode)
        except OSError as e:
            self.state = RecordState.SKIPPED
            self.error = f"saving the profile {self.path} failed: {e.strerror or e}"
            return
        self.state = RecordState.DONE

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "file": self.path, "regions": self.regions,
                "runs": len(self._runs), "stopped_by": self.stopped_by, "error": self.error}


class ProfileOptions(Frozen):
    """What a session does with boot profiles (``CloneSession(profile=...)``).
    ``replay``: replay this one (checked against the source); ``record``: record
    the guest's reads (services: boot, serve, mount); ``save_to``: where to save the
    recording (default CLONE.lcprofile)."""

    __slots__ = ("replay", "replay_bytes", "replay_time", "record", "save_to", "record_time",
                 "record_idle")
    replay: Profile | None
    replay_bytes: int
    replay_time: float
    record: bool
    save_to: str | None
    record_time: float
    record_idle: float

    def __init__(self, replay: Profile | None = None,
                 replay_bytes: int = DEFAULT_REPLAY_BYTES,
                 replay_time: float = DEFAULT_REPLAY_TIME, record: bool = False,
                 save_to: str | None = None, record_time: float = DEFAULT_RECORD_TIME,
                 record_idle: float = DEFAULT_RECORD_IDLE) -> None:
        self._init(replay, replay_bytes, replay_time, record, save_to, record_time,
                   record_idle)
