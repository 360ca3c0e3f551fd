"""Errors that reach the user.

Each error carries a message that names the problem and the fix, and the exit
code the CLI uses for it (borg's habit: the error class owns its exit code).
Code below the CLI raises these; only ``cli/`` turns them into exit codes.
"""

from __future__ import annotations


class LivecloneError(Exception):
    """Base of every error liveclone reports to a user."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(LivecloneError):
    """A bad argument: wrong size syntax, region size out of range..."""

    exit_code = 2


class SourceError(LivecloneError):
    """The source is missing, unreadable, not a file, or failing."""

    exit_code = 3


class SourceChangedError(SourceError):
    """The source no longer matches the identity recorded when the clone was made."""

    exit_code = 4


class SourceUnreachableError(SourceError):
    """A remote source did not answer at all (connection refused, timed out): unlike a
    refusal (404, 403), it says nothing about the image, so a complete cached copy of
    it may still serve (``sources.cache``)."""


class NotACloneError(LivecloneError):
    """The CLONE path exists but has no liveclone map beside it."""

    exit_code = 5


class CorruptMetadataError(LivecloneError):
    """The region map is damaged; liveclone never guesses which regions are present."""

    exit_code = 6


class CloneBusyError(LivecloneError):
    """Another liveclone process holds the clone open."""

    exit_code = 7


class NoSpaceError(LivecloneError):
    """The clone's filesystem is full; the map stays consistent and the copy resumes later."""

    exit_code = 8


class TargetError(LivecloneError):
    """The clone cannot be created or written: unwritable directory, bad path."""

    exit_code = 9


class CloneFailedError(LivecloneError):
    """A sync, journal write or compaction step of the clone failed (invariant 9):
    the clone went read-only. Committed data is safe; reopen after fixing the cause."""

    exit_code = 10


class CloneClosedError(LivecloneError):
    """A call on a clone that is closing or closed (a bug in the caller)."""

    exit_code = 1


class MissingDependencyError(LivecloneError):
    """A Python package or system library a command needs is not installed; the
    message names what to install (an extra such as ``liveclone[s3]``, a Debian package)."""

    exit_code = 11


class MismatchError(LivecloneError):
    """``liveclone verify`` found regions of the clone (or, with --against-source, of
    the source) that differ from the digests recorded when they were copied, or
    damaged digest slots. The report names the first regions and their offsets."""

    exit_code = 12
