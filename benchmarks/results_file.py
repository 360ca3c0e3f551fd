"""Write one benchmark's run into its section of benchmarks/results.md, leaving the
other sections alone."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.md"


def write_section(heading: str, body: str) -> None:
    """Put ``body`` at the top of the ``## heading`` section, or append a new
    section. Whatever the section held stays below it: earlier runs, and the
    analyses written beside them by hand, are kept, never replaced."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", re.S | re.M)
    found = pattern.search(text)
    earlier = found.group(1).strip() if found else ""
    section = f"## {heading}\n\n{body.strip()}\n" + (f"\n{earlier}\n" if earlier else "")
    if found:
        text = text[:found.start()] + section + "\n" + text[found.end():]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)
