"""mfusepy bound to libfuse3, whatever other libfuse the machine has.

mfusepy looks for ``libfuse.so.2`` first (``find_library('fuse')``) and only then for
libfuse3. ``grub-common`` and ``libguestfs0`` depend on libfuse2, so most Debian and
Ubuntu hosts have it, and a mount through libfuse2 dies on libfuse3's options
("fuse: unknown option `max_idle_threads=16'"). This module finds libfuse3 itself,
hands its path to mfusepy in ``FUSE_LIBRARY_PATH`` for the import (the variable is
put back afterwards, so children do not inherit it), and checks that mfusepy bound
the same library. Import ``mfusepy`` and ``libfuse3`` from here, never mfusepy
directly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from liveclone.errors import MissingDependencyError

INSTALL_HINT = "install the Debian package fuse3 (apt-get install fuse3, which brings libfuse3-3)"


def _load_libfuse3() -> tuple[str, ctypes.CDLL]:
    """libfuse3's path (as ``dlopen`` takes it) and the loaded library."""
    # find_library asks ldconfig's cache; the soname alone still works where that
    # cache is missing but the dynamic linker finds the library (LD_LIBRARY_PATH).
    candidates = [p for p in (ctypes.util.find_library("fuse3"), "libfuse3.so.3") if p]
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        version = lib.fuse_version() if hasattr(lib, "fuse_version") else 0
        # FUSE_VERSION is major * 10 + minor before 3.10, major * 100 + minor since.
        if (version // 10 if version < 100 else version // 100) == 3:
            return path, lib
    raise MissingDependencyError(f"FUSE mounts need libfuse3, which is not installed: "
                                 f"{INSTALL_HINT}")


def _bind_mfusepy(path: str) -> None:
    """Import mfusepy with the libfuse at ``path``, or say why it cannot be."""
    already = "mfusepy" in sys.modules
    saved = os.environ.get("FUSE_LIBRARY_PATH")
    os.environ["FUSE_LIBRARY_PATH"] = path
    try:
        import mfusepy
    except ModuleNotFoundError as e:
        if e.name != "mfusepy":
            raise
        raise MissingDependencyError(
            "the Python package mfusepy, which liveclone needs for FUSE mounts, is not "
            "installed; reinstall liveclone (pip install --force-reinstall liveclone)"
        ) from None
    finally:
        if saved is None:
            del os.environ["FUSE_LIBRARY_PATH"]
        else:
            os.environ["FUSE_LIBRARY_PATH"] = saved
    bound = getattr(mfusepy, "fuse_version_major", None)
    if bound != 3:
        # Only when something in this process imported mfusepy before us.
        how = "before liveclone could choose libfuse3" if already else "despite FUSE_LIBRARY_PATH"
        raise MissingDependencyError(
            f"mfusepy was loaded with libfuse {bound} ({getattr(mfusepy, '_libfuse_path', '?')}) "
            f"{how}; liveclone mounts need libfuse3 (set FUSE_LIBRARY_NAME=fuse3 for the "
            "program that imported mfusepy first)"
        )


libfuse3_path, libfuse3 = _load_libfuse3()
_bind_mfusepy(libfuse3_path)
import mfusepy  # noqa: E402  (bound by now: this only takes it from sys.modules)

__all__ = ["libfuse3", "libfuse3_path", "mfusepy"]
