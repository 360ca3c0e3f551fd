"""Checks on a clone after its copy: finish it, fsck it, read a file from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LIVECLONE = [sys.executable, "-m", "liveclone.cli.main"]


def finish_copy(src: Path, clone: Path) -> None:
    """Finish the copy with `liveclone clone`, then remove the source: from here on
    the clone must stand alone."""
    subprocess.run([*LIVECLONE, "clone", str(src), str(clone), "--no-progress"], check=True,
                   capture_output=True)
    src.unlink()


def e2fsck(image: Path) -> None:
    r = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def debugfs_cat(image: Path, path: str) -> bytes:
    """The content of ``path`` in the ext4 filesystem ``image``."""
    return subprocess.run(["debugfs", "-R", f"cat /{path.lstrip('/')}", str(image)],
                          capture_output=True, check=True).stdout
