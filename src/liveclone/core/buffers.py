"""Buffers for large read answers, used again once their answer is gone.

A read of 1 MiB into a new ``bytearray`` costs more than the read itself: glibc
gives memory of that size back to the kernel when it is freed (an mmap of its
own, which ``serve`` asks for so that its RSS follows what it holds:
``nbd/limits.py`` ``pin_mmap_threshold``), so every new buffer page-faults 256
zeroed pages in and then zeroes them again, before a byte is read. Profiled on
``serve`` answering fio's 1M sequential reads at QD8: 445 of the loop thread's
923 samples were in that allocation, 96 in the preadv itself.

``AnswerBuffers`` keeps the buffers of answers of at least ``SMALLEST`` bytes and
lends them again, rounded up to a power of two, within ``KEEP`` bytes in all
(one pool per process, ``ANSWERS``, for every clone it serves);
past that, or below ``SMALLEST`` (where Python's allocator reuses memory
anyway), a read gets a new ``bytearray`` as before.

When a lent buffer is free again: once nothing but the pool refers to it. Its
answer is sent and the transport (or FUSE) let go of the views it held until
then. CPython counts references, so the pool sees that in the bytearray's count;
a buffer something else still refers to is never lent again. A reused buffer is
not cleared: its reader overwrites every byte it returns (``Clone.read`` fills a
short read's tail with zeros, ``read_nowait`` refuses one), so nothing of an
earlier answer is ever sent.
"""

from __future__ import annotations

import sys
import threading
from collections import deque

SMALLEST = 128 << 10  # glibc's own mmap threshold: below it, memory is reused
KEEP = 32 << 20  # bytes of buffers the pool may hold, lent or idle


def _idle_refs() -> int:
    """The reference count of a buffer only the pool holds, as ``_reuse`` sees it."""
    probe: deque[bytearray] = deque([bytearray(1)])
    buf = probe[0]
    return sys.getrefcount(buf)


class AnswerBuffers:
    """Reusable buffers of answers by size class, for any thread."""

    __slots__ = ("_lock", "_lent", "_held", "_idle", "keep")

    def __init__(self, keep: int = KEEP) -> None:
        self._lock = threading.Lock()
        # Size class -> its buffers, oldest lent first: whether free again is
        # seen when one is wanted, oldest first (the likeliest to be sent).
        self._lent: dict[int, deque[bytearray]] = {}
        self._held = 0  # bytes of every buffer in _lent
        self._idle = _idle_refs()
        self.keep = keep

    def take(self, length: int) -> memoryview:
        """A writable view of ``length`` bytes, of unspecified content."""
        if length < SMALLEST:
            return memoryview(bytearray(length))
        size = 1 << (length - 1).bit_length()
        with self._lock:
            lent = self._lent.get(size)
            if lent is None:
                lent = self._lent[size] = deque()
            buf = self._reuse(lent)
            if buf is None:
                if self._held + size > self.keep:
                    return memoryview(bytearray(length))  # not kept: as before
                buf = bytearray(size)
                self._held += size
            lent.append(buf)
        return memoryview(buf)[:length]

    def _reuse(self, lent: deque[bytearray]) -> bytearray | None:
        """The first buffer of ``lent`` nothing else refers to, taken out of it."""
        for _ in range(len(lent)):
            buf = lent[0]
            if sys.getrefcount(buf) == self._idle:
                lent.popleft()
                return buf
            lent.rotate(-1)
        return None

    @property
    def held(self) -> int:
        """Bytes of the buffers kept, lent or idle."""
        return self._held


ANSWERS = AnswerBuffers()  # every clone's reads in this process share it
