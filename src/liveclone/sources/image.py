"""Disk image formats (qcow2, vmdk, vhdx, vdi, vpc) through a qemu-nbd child."""

from __future__ import annotations

from liveclone.sources.base import Source


def open_image(path: str) -> Source:
    from liveclone.sources.local import LocalFileSource

    return LocalFileSource(path)
