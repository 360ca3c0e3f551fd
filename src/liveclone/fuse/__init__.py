"""FUSE frontend: a mount where a clone (or a directory of clones) appears as regular files."""

from liveclone.fuse.mount import MountHandle, start_dir_mount, start_mount

__all__ = ["MountHandle", "start_dir_mount", "start_mount"]
