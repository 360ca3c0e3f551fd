"""Checks on a FUSE mount point, shared by the commands (before anything is created)
and the FUSE layer (at mount time). Imports nothing heavy."""

from __future__ import annotations

import errno
import os
import stat

from liveclone.errors import TargetError, UsageError


def check_mountpoint(mountpoint: str) -> None:
    """Refuse a mount point FUSE cannot use, before anything is created: a missing
    or unwritable directory (TargetError, exit 9), a file, a live or stale mount
    (UsageError, exit 2)."""
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise TargetError(f"mount point {mountpoint} does not exist: create it first "
                          f"(mkdir -p {mountpoint})") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise UsageError(f"{mountpoint} is a stale FUSE mount (its process died); "
                             f"run `fusermount3 -u -z {mountpoint}` and retry") from None
        raise TargetError(f"mount point {mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mount point {mountpoint} is not a directory: give a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is already a mount point: stop the process serving "
                         f"it, or if that process died, run `fusermount3 -u -z {mountpoint}`")
    if not os.access(mountpoint, os.W_OK | os.X_OK):
        raise TargetError(f"cannot mount on {mountpoint}: no write permission there; "
                          "choose a directory you own")
