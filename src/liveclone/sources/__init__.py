"""Read-only sources behind one interface; ``open_source`` picks one from the argument."""

from __future__ import annotations

from liveclone.sources.base import Extent, Source


def open_source(spec: str) -> Source:
    """Open the source named by ``spec`` (a path today; URIs join as they are built)."""
    from liveclone.sources.local import LocalFileSource

    return LocalFileSource(spec)


__all__ = ["Extent", "Source", "open_source"]
