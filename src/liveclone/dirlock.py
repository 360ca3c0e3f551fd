"""One process per directory: a directory that a long-running process owns (the
daemon's state directory, a cache directory) is locked with ``flock`` on its
``.lock`` file, which names the holder's pid for the error a second process gets.
The lock goes with the process (``kill -9`` included)."""

from __future__ import annotations

import fcntl
import os

from liveclone.errors import CloneBusyError, TargetError

LOCK_NAME = ".lock"


def lock_directory(path: str, what: str, fix: str) -> int:
    """Create ``path`` (0700) if needed and lock it for this process; return the lock's
    descriptor (close it to let go). ``what`` names the directory in errors ("the
    cache directory /x"); ``fix`` says what to do when another process holds it.
    Raises TargetError (cannot create or open) or CloneBusyError (held)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
    except OSError as e:
        raise TargetError(f"cannot use {what}: {e.strerror}; give a writable directory"
                          ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise CloneBusyError(f"{what} is in use by another liveclone process "
                             f"(pid {holder or 'unknown'}); {fix}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
