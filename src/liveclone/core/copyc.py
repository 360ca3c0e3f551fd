"""The copier's C helpers, ``_copyc`` (``putruns.c`` and ``bitruns.c``, compiled
at install through cffi), or None.

Without the compiled module (no C compiler at install), or with
``LIVECLONE_COPYC=0``, ``lib`` is None and the callers (``fsops.put_runs``,
``RegionMap.runs`` and ``batch_end``) do the same work in Python, with the same
results, more slowly.
"""

from __future__ import annotations

import os
from typing import Any

ENV = "LIVECLONE_COPYC"  # "0": the Python paths even when the module is built
ffi: Any = None
lib: Any = None
if os.environ.get(ENV) != "0":
    try:
        from liveclone.core import _copyc  # type: ignore[attr-defined]
    except ImportError:  # built without a compiler
        pass
    else:
        ffi, lib = _copyc.ffi, _copyc.lib
