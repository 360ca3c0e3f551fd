"""The one small interface every read-only source implements.

A source is never written (invariant 1). It exposes its virtual size, positional
reads, its allocation extents (so holes are skipped without reading), and an
identity recorded when a clone is made so a changed source is refused on resume.
Implementations must be safe to call from several threads at once.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from liveclone.values import Frozen


class Extent(Frozen):
    """A run of the source: ``data`` may hold bytes; not ``data`` reads as zeros (a hole)."""

    __slots__ = ("offset", "length", "data")
    offset: int
    length: int
    data: bool

    def __init__(self, offset: int, length: int, data: bool) -> None:
        self._init(offset, length, data)


class Source(abc.ABC):
    """A read-only disk image the clone is filled from."""

    #: the URI or path the user gave, shown in messages and recorded in the map
    spec: str
    #: virtual size in bytes
    size: int

    @abc.abstractmethod
    def pread(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes at ``offset`` (short only past the end: never)."""

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes | memoryview]:
        """The bytes of each ``(offset, length)`` range, in order (each as ``pread``
        gives it). Sources where each request costs a round trip override it to ask
        for many ranges at once; the default reads them one by one."""
        return [self.pread(offset, length) for offset, length in ranges]

    def read_along(self) -> int | None:
        """What another range costs this source, in bytes it could read instead: a
        fill reads a present gap at most this long along with its neighbours and
        drops it, and asks for the runs apart past it. None: the fill's default,
        set by a local read's cost."""
        return None

    def batch_reads(self) -> int | None:
        """How many separate reads (runs apart, past the gaps read along) one
        copier batch should need at most, or None for no limit. A source where
        each read is a request of its own, or many go in one request, caps it, so
        a fragmented map gives several batches that workers fetch side by side."""
        return None

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Yield the allocation of ``[offset, offset+length)`` in order, covering it whole.

        The default says everything is data; sources that know better override it.
        """
        yield Extent(offset, length, True)

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """Facts that change when the source changes (size, mtime, ETag, fingerprint)."""

    def check_unchanged(self) -> None:  # noqa: B027 - optional hook
        """Raise SourceChangedError if the source changed since it was opened (cheap:
        called after every fill's reads). Remote sources check each response instead
        (ETag, If-Match), so the default does nothing."""

    def status(self) -> dict[str, Any]:
        """Health of the source for ``status``: remote sources report their retries."""
        return {}

    def fileno(self) -> int | None:
        """A local file descriptor for ``copy_file_range``, or None when not a local file."""
        return None

    def direct_fileno(self) -> int | None:
        """The same local file opened with O_DIRECT, or None (not local, or no direct I/O)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most sources hold nothing
        """Release what the source holds (file descriptors, child processes)."""

    def identity_mismatch(self, recorded: dict[str, Any]) -> str | None:
        """Explain how ``recorded`` differs from this source now, or None if it matches."""
        now = self.identity()
        # Keys the record lacks were added after it was made: not a change.
        diffs = [
            f"{key} was {recorded.get(key)!r}, now {now.get(key)!r}"
            for key in sorted(recorded)
            if key != "path" and recorded.get(key) != now.get(key)
        ]
        return "; ".join(diffs) or None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Blocks sampled for a fingerprint: enough to notice an edited image, cheap on a huge one.
FINGERPRINT_SAMPLES = 64
FINGERPRINT_BLOCK = 4096


def sample_fingerprint(pread: Callable[[int, int], bytes], size: int,
                       samples: int = FINGERPRINT_SAMPLES,
                       block: int = FINGERPRINT_BLOCK) -> str:
    """SHA-256 of ``size`` and ``samples`` blocks spread evenly over the image, the
    last block included. Same image, same fingerprint, whatever the source kind."""
    h = hashlib.sha256()
    h.update(size.to_bytes(8, "little"))
    if size:
        last = max(size - block, 0)
        step = max(size // samples, 1)
        offsets = sorted({min(i * step, last) for i in range(samples)} | {last})
        for off in offsets:
            h.update(pread(off, min(block, size - off)))
    return h.hexdigest()
