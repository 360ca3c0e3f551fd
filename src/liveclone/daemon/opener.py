"""How the daemon opens a clone's source: local image files remembered by identity.

Many clones of one golden image is the daemon's common case. Opening a local path
costs, each time, telling raw from qcow2 and friends (an in-process signature
probe, ``sources.local.is_plain_raw``; a ``qemu-img info`` child when the file
might be an image) and a sampled fingerprint (64 scattered reads), tens of
milliseconds on a busy disk. Both are facts of the file as it is: the same device,
inode, size, mtime and ctime (which no one can set back) mean the same bytes. So the daemon keeps,
per such key, "this is a raw image" and its fingerprint, and opens a known raw
file directly. A file that changed has another key and is looked at afresh;
anything that is not a local raw file goes to the next opener (the source cache,
or ``open_source``).
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from typing import Any

from liveclone.sources import Source
from liveclone.sources.local import LocalFileSource

Key = tuple[int, int, int, int, int]
MAX_KNOWN = 4096  # files remembered; the oldest are forgotten past it


def _key(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _KnownRawFile(LocalFileSource):
    """A local raw image whose fingerprint the opener remembers for its key."""

    def __init__(self, path: str, opener: SourceOpener) -> None:
        super().__init__(path)
        self._opener = opener

    def identity(self) -> dict[str, Any]:
        key = _key(os.fstat(self.fileno()))
        known = self._opener.fingerprint(key)
        if known is not None and self._fingerprint is None:
            self._fingerprint = known
        ident = super().identity()
        self._opener.remember(key, ident["fingerprint"])
        return ident


class SourceOpener:
    """``open(spec)``: a local raw image known by its key opens without ``qemu-img``
    and with its fingerprint; anything else goes to ``fallback``. Thread-safe."""

    def __init__(self, fallback: Callable[[str], Source]) -> None:
        self.fallback = fallback
        self._lock = threading.Lock()
        self._known: dict[Key, str | None] = {}  # raw files: key -> fingerprint

    def open(self, spec: str) -> Source:
        if "://" in spec:
            return self.fallback(spec)
        try:
            st = os.stat(spec)
        except OSError:
            return self.fallback(spec)  # it says what is wrong
        if not stat.S_ISREG(st.st_mode):
            return self.fallback(spec)
        with self._lock:
            known = _key(st) in self._known
        if known:
            source = _KnownRawFile(spec, self)
            if _key(os.fstat(source.fileno())) in self._known:  # the same file still
                return source
            source.close()
        opened = self.fallback(spec)
        if type(opened) is not LocalFileSource:
            return opened
        # Found raw: remember it, and hand out the file known by its key.
        key = _key(os.fstat(opened.fileno()))
        self.remember(key, None)
        source = _KnownRawFile(spec, self)
        if _key(os.fstat(source.fileno())) == key:
            opened.close()
            return source
        source.close()  # replaced in between: the file that was looked at it is
        return opened

    def fingerprint(self, key: Key) -> str | None:
        with self._lock:
            return self._known.get(key)

    def remember(self, key: Key, fingerprint: str | None) -> None:
        with self._lock:
            if fingerprint is None and self._known.get(key):
                return
            self._known[key] = fingerprint
            while len(self._known) > MAX_KNOWN:
                del self._known[next(iter(self._known))]
