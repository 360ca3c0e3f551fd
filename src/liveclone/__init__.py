"""liveclone: a clone of a disk image that is usable before the copy ends."""

__version__ = "0.1.0"
