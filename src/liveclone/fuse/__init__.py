"""FUSE frontend: a mount where the clone appears as a regular file."""

from liveclone.fuse.mount import MountHandle, start_mount

__all__ = ["MountHandle", "start_mount"]
