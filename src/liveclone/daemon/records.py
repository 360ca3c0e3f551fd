"""The daemon's state directory: one record per clone, so a restart finds them all.

Layout (``STATE`` is ``--state-dir``)::

    STATE/.lock              flock: one daemon per state directory (its pid inside)
    STATE/clones/NAME.json   what POST /v1/clones asked for, as given back to it
    STATE/cache/             the source cache's default directory

A record is written crash-safely (``fsops.write_file_atomically``: tmp, fsync,
rename, fsync of the directory) before the API answers 201, and removed (unlink,
fsync of the directory) when the clone is removed. After ``kill -9`` or a reboot
each record is the clone again: same name, same clone file, same options; the
clone's own map says how far its copy got (invariant 7). A record torn or edited
by hand is reported and skipped, never guessed at.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from liveclone.core import fsops
from liveclone.dirlock import lock_directory
from liveclone.errors import TargetError

log = logging.getLogger(__name__)

CLONES = "clones"
SUFFIX = ".json"


@dataclass
class Record:
    """One clone of the daemon, as created (what a restart needs)."""

    name: str
    source: str
    clone: str
    region_size: int | None = None
    rate: int | None = None
    copy_on_read: bool | None = None
    read_only: bool = False
    created: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # later options

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        record = cls(**known)
        if not isinstance(record.name, str) or not isinstance(record.clone, str):
            raise ValueError("name and clone must be strings")
        return record


class StateDir:
    """The state directory, locked for this process."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.clones_dir = os.path.join(self.path, CLONES)
        self._lock_fd = lock_directory(
            self.path, f"the state directory {self.path}",
            "stop that daemon, or give --state-dir another directory")
        try:
            os.makedirs(self.clones_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            os.close(self._lock_fd)
            raise TargetError(f"cannot use the state directory {self.path}: {e.strerror}; "
                              "give --state-dir a writable directory") from None

    def _path(self, name: str) -> str:
        return os.path.join(self.clones_dir, name + SUFFIX)

    def load(self) -> list[Record]:
        """Every record, oldest first; unreadable ones are logged and skipped."""
        out = []
        for entry in sorted(os.listdir(self.clones_dir)):
            path = os.path.join(self.clones_dir, entry)
            if entry.endswith(".tmp"):
                os.unlink(path)  # a write cut short: its rename never happened
                continue
            if not entry.endswith(SUFFIX):
                continue
            try:
                with open(path) as f:
                    record = Record.from_json(json.load(f))
                if record.name + SUFFIX != entry:
                    raise ValueError(f"it names the clone {record.name!r}")
            except (OSError, ValueError, TypeError) as e:
                log.error("skipping the clone record %s: %s; fix or remove it", path, e)
                continue
            out.append(record)
        out.sort(key=lambda r: r.created)
        return out

    def save(self, record: Record) -> None:
        """Write ``record`` durably (old or new after a crash, never torn). Blocks."""
        data = json.dumps(asdict(record), indent=1, sort_keys=True).encode() + b"\n"
        fsops.write_file_atomically(self._path(record.name), data, 0o600)

    def delete(self, name: str) -> None:
        """Remove the record durably. Blocks."""
        try:
            os.unlink(self._path(name))
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            return
        fsops.fsync_dir(self._path(name))

    def close(self) -> None:
        os.close(self._lock_fd)
