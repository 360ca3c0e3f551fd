"""Clone names in the daemon: also file names (its record, its FUSE file) and NBD
export names. Imports nothing: the CLI's client commands use it."""

from __future__ import annotations

import re

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NAME_RULE = ("letters, digits, '.', '_' and '-', at most 128, starting with a letter or "
             "digit")


def is_name(text: str) -> bool:
    return NAME_RE.match(text) is not None
