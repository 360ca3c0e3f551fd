"""A clone's lifecycle: one state, its allowed transitions, and the failed mode.

::

    opening ──► running ⇄ paused ──► closing ──► closed
        │          │         │          ▲
        └──────────┴─────────┴──► failed┘

*paused* means paused by the user (only the background copy stops; guests keep
reading and writing). *failed* is invariant 9's mode, entered once and kept until
the clone is closed: a sync, journal write or compaction step failed, so writes,
zero-writes, trims and flushes get EIO while committed data is still served.
Only a reopen, after the cause is fixed, leaves it.
"""

from __future__ import annotations

import errno
import threading
from enum import Enum

from liveclone.errors import CloneClosedError


class State(Enum):
    OPENING = "opening"
    RUNNING = "running"
    PAUSED = "paused"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


_ALLOWED: dict[State, frozenset[State]] = {
    State.OPENING: frozenset({State.RUNNING, State.FAILED, State.CLOSING}),
    State.RUNNING: frozenset({State.PAUSED, State.FAILED, State.CLOSING}),
    State.PAUSED: frozenset({State.RUNNING, State.FAILED, State.CLOSING}),
    State.FAILED: frozenset({State.CLOSING}),
    State.CLOSING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class Lifecycle:
    """Thread-safe holder of a clone's state."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        # --- guarded by _lock ------------------------------------------------------
        self._state = State.OPENING
        # Invariant: set once, on the first failure, and never cleared; it outlives
        # the move to closing/closed so a final status still says why.
        self.failure: str | None = None
        # --- end -------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    def to(self, new: State) -> bool:
        """Move to ``new``; False (nothing changes) if the current state does not
        allow it. Pausing a failed clone, say, is not an error, just nothing."""
        with self._lock:
            if new is self._state:
                return True
            if new not in _ALLOWED[self._state]:
                return False
            self._state = new
            return True

    def begin_close(self) -> bool:
        """Move to closing; False if the clone is already closing or closed."""
        with self._lock:
            if self._state in (State.CLOSING, State.CLOSED):
                return False
            self._state = State.CLOSING
            return True

    def fail(self, reason: str) -> bool:
        """Enter the failed mode; True if this call did (the first reason wins)."""
        with self._lock:
            if self.failure is not None or self._state is State.CLOSED:
                return False
            self.failure = reason
            if State.FAILED in _ALLOWED[self._state]:
                self._state = State.FAILED  # while closing, the state stays closing
            return True

    def check_open(self) -> None:
        """Raise CloneClosedError if the clone is closing or closed."""
        if self._state in (State.CLOSING, State.CLOSED):
            raise CloneClosedError(f"the clone {self._name} is {self._state.value}; "
                                   "open it again to use it")

    def check_writable(self) -> None:
        """Raise (EIO) if the clone is failed, CloneClosedError if it is closed."""
        self.check_open()
        if self.failure is not None:
            raise OSError(errno.EIO, f"the clone is read-only after a failure: {self.failure}")
