"""The progress bar of the commands that move bytes (``clone``, ``verify``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress


def transfer_progress(label: str, transient: bool) -> Progress:
    """A rich bar for ``label`` with bytes done, speed and time left. rich is
    imported here: it takes tens of milliseconds, and only a terminal needs it."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(),
                    DownloadColumn(binary_units=True), TransferSpeedColumn(),
                    TimeRemainingColumn(), transient=transient)
