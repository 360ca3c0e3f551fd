"""The read lane: plain READs of present, cached data answered in C.

Most of what a VM asks of its disk are READs of data that is already in the
clone and in the page cache. The lane (``lane.c``, compiled at install through
cffi) answers a run of them at the front of what the client sent in one call:
it checks each request as ``validate_request``'s own fast path would, checks
the present bits of the regions it reads, reads with ``RWF_NOWAIT`` and writes
the replies into one buffer that the connection sends. Every other request, and
any read it cannot do at once, goes on to the protocol layer as if the lane were
not there.

Without the compiled module (no C compiler at install), or with
``LIVECLONE_LANE=0``, there is no lane and the connection answers every request
in Python: the same answers, more slowly. Tests run both ways.
"""

from __future__ import annotations

import os
from typing import Any

_ffi: Any = None
_lib: Any = None
try:
    from liveclone.nbd import _lane  # type: ignore[attr-defined]
except ImportError:  # built without a compiler: every request goes through Python
    pass
else:
    _ffi, _lib = _lane.ffi, _lane.lib

ENV = "LIVECLONE_LANE"  # "0": no lane even when it is built
# The reply buffer: what one call may answer (a QD32 batch of 4 KiB reads needs
# 132 KiB). Larger reads go through the protocol layer, where each answer has a
# buffer of its own, admitted against the memory limits and sent as it is.
BUFFER = 256 << 10


def available() -> bool:
    """Whether connections get a lane: built, and not turned off."""
    return _lib is not None and os.environ.get(ENV, "1") != "0"


class ReadLane:
    """One connection's lane, for one export: its geometry and reply buffer."""

    def __init__(self, fd: int, size: int, max_block: int, structured: bool,
                 region_shift: int) -> None:
        self._spec = _ffi.new("struct lc_lane *", {
            "fd": fd, "structured": int(structured), "max_block": max_block,
            "shift": region_shift, "size": size})
        self._alloc = _ffi.new_allocator(should_clear_after_alloc=False)
        self._out: Any = None  # the reply buffer, when the transport holds none of it
        self._used = _ffi.new("size_t *")
        self._kept = _ffi.new("size_t *")
        self._count = _ffi.new("uint64_t *")
        self._bytes = _ffi.new("uint64_t *")

    def reads(self, data: bytes, bits: Any, cap: int) -> tuple[Any, int, int, int, bytes]:
        """Answer the READs the lane can in ``data``, in at most ``cap`` bytes of
        replies. ``bits``: the present bitmap (a buffer read while the copier may
        set bits in it), or None when every region is.

        Returns (the reply buffer, bytes of replies in it, requests answered,
        bytes read, what the protocol layer must be given: every message not
        answered, in order). The buffer is the caller's to send; it calls
        ``sent(buffer)`` once the transport holds none of it."""
        out = self._out
        if out is None:  # the last one is still held by the transport
            out = self._alloc("uint8_t[]", BUFFER)
        self._out = None
        rest = self._alloc("uint8_t[]", len(data))
        spec = self._spec
        with _ffi.from_buffer("uint8_t[]", data) as inp:
            if bits is None:
                spec.bits = _ffi.NULL
                used = _lib.lc_lane_reads(spec, inp, len(data), out, min(cap, BUFFER),
                                          self._used, rest, self._kept, self._count,
                                          self._bytes)
            else:
                with _ffi.from_buffer("uint8_t[]", bits) as b:
                    spec.bits = b
                    used = _lib.lc_lane_reads(spec, inp, len(data), out, min(cap, BUFFER),
                                              self._used, rest, self._kept, self._count,
                                              self._bytes)
                spec.bits = _ffi.NULL
        count = self._count[0]
        if not count:  # nothing answered: ``rest`` is data up to ``used``
            return out, 0, 0, 0, data
        left = _ffi.buffer(rest, self._kept[0])[:] + data[used:]
        return out, self._used[0], count, self._bytes[0], left

    def view(self, out: Any, n: int) -> memoryview:
        return memoryview(_ffi.buffer(out, n))

    def sent(self, out: Any) -> None:
        """``out`` went out whole (the transport holds none of it): reuse it."""
        self._out = out
