"""``liveclone verify``: check a clone against the digests recorded while copying."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from liveclone.cli.progress import transfer_progress
from liveclone.errors import MismatchError
from liveclone.units import format_size

if TYPE_CHECKING:
    from liveclone.core.verify import Report

# Guest-written ranges shown one by one in the text report; the rest are counted.
SHOW_RANGES = 10
# The clone's first bytes asked of the kernel before the verifier is imported: what
# this disk reads in the 40-90 ms that the imports and the map take (1.4 GB/s).
START_BYTES = 64 << 20


@click.command("verify")
@click.argument("clone_path", metavar="CLONE")
@click.option("--against-source", is_flag=True,
              help="Also re-read the source and compare it with the recorded digests.")
@click.option("--source", "source_spec", metavar="SOURCE",
              help="The source to compare with (default: the one recorded in the map).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: when stderr is a terminal).")
def command(clone_path: str, against_source: bool, source_spec: str | None, as_json: bool,
            progress: bool | None) -> None:
    """Check every region of CLONE copied from the source against the digest
    recorded when it was copied.

    Works on a complete clone and on one still copying (only the regions present
    are checked), also while another liveclone process serves it. Regions the guest
    wrote, zeroed or trimmed are reported as such, never as mismatches. Exits 0
    when everything checked matches, 12 on a mismatch.
    """
    _start_reading(clone_path)
    from liveclone.core.metadata import MapStore
    from liveclone.core.verify import verify_clone

    source = None
    if against_source or source_spec:
        from liveclone.sources import open_source

        spec = source_spec or str(MapStore.read(clone_path)[0].source.get("path"))
        source = open_source(spec)
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        with _progress_bar(progress) as tick:
            report = verify_clone(clone_path, source, tick)
    finally:
        if source is not None:
            source.close()
    if as_json:
        click.echo(json.dumps(report.to_json(), sort_keys=True))
    else:
        click.echo(_text(report))
    if not report.ok:
        raise MismatchError(_summary(report))


def _start_reading(path: str) -> None:
    """Ask the kernel now for the clone's first START_BYTES of data, so the disk
    works while Python imports the verifier and reads the map (40 ms here, several
    times that on a loaded machine), as it would from ``cat``'s first read. Those
    bytes are read anyway unless the clone's first regions are absent. Holes are
    never asked for (WILLNEED over a hole fills the cache with zero pages). A path
    that cannot be opened is left to the verifier to report."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        start = os.lseek(fd, 0, os.SEEK_DATA)
        end = min(os.lseek(fd, start, os.SEEK_HOLE), start + START_BYTES)
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # no data (ENXIO), or no SEEK_DATA here: the verifier reads as it can
    finally:
        os.close(fd)


@contextmanager
def _progress_bar(show: bool) -> Iterator[Callable[[int, int], None] | None]:
    if not show:
        yield None
        return
    with transfer_progress("verifying", transient=True) as bar:
        task = bar.add_task("verify", total=None)

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield tick


def _regions(report: Report, regions: list[int], count: int) -> str:
    rs = report.region_size
    shown = ", ".join(f"region {r} (offset {r * rs})" for r in regions)
    more = f" and {count - len(regions)} more" if count > len(regions) else ""
    return shown + more


def _summary(report: Report) -> str:
    parts = []
    if report.mismatch_count:
        parts.append(f"{report.mismatch_count} region(s) of the clone do not match the "
                     "digest recorded when they were copied: "
                     + _regions(report, report.mismatched, report.mismatch_count))
    if report.source_mismatch_count:
        parts.append(f"{report.source_mismatch_count} region(s) of the source differ from "
                     "what was copied: "
                     + _regions(report, report.source_mismatched, report.source_mismatch_count)
                     + (f" (the source changed: {report.source_problem})"
                        if report.source_problem else ""))
    if report.source_resized:
        parts.append(f"the source cannot be compared: {report.source_problem}")
    if report.damaged_count:
        parts.append(f"{report.damaged_count} digest slot(s) are damaged: "
                     + _regions(report, report.damaged, report.damaged_count))
    return "; ".join(parts) + (". Copy the affected ranges again from a good source, or "
                               "make the clone again")


def _text(report: Report) -> str:
    rs = report.region_size
    lines = [
        f"clone:      {report.clone}",
        f"present:    {report.regions_present}/{report.regions_total} regions of "
        f"{format_size(rs)}",
        f"matched:    {report.matched} copied regions match their digests",
    ]
    if report.mismatch_count:
        lines.append(f"MISMATCH:   {report.mismatch_count}: "
                     + _regions(report, report.mismatched, report.mismatch_count))
    if report.guest_count:
        shown = ", ".join(f"{a * rs}+{(b - a) * rs}" for a, b in report.guest_runs[:SHOW_RANGES])
        more = len(report.guest_runs) - SHOW_RANGES
        lines.append(f"guest:      {report.guest_count} regions written, zeroed or trimmed by "
                     f"the guest (not compared), in {len(report.guest_runs)} ranges "
                     f"(offset+length): {shown}" + (f" and {more} more" if more > 0 else ""))
    if report.unverified_count:
        lines.append(f"unverified: {report.unverified_count} regions have no digest (copied "
                     "before liveclone recorded digests)")
    if report.damaged_count:
        lines.append(f"DAMAGED:    {report.damaged_count} digest slots: "
                     + _regions(report, report.damaged, report.damaged_count))
    if report.source_checked:
        if report.source_problem:
            lines.append(f"source:     changed since the clone was made ({report.source_problem})")
        lines.append(f"source:     {report.source_matched} regions match, "
                     f"{report.source_mismatch_count} differ"
                     + (": " + _regions(report, report.source_mismatched,
                                        report.source_mismatch_count)
                        if report.source_mismatch_count else ""))
    speed = report.bytes_read / report.seconds if report.seconds else 0.0
    lines.append(f"read:       {format_size(report.bytes_read)} in {report.seconds:.2f} s "
                 f"({format_size(int(speed))}/s)")
    lines.append("result:     " + ("ok" if report.ok else "MISMATCH"))
    return "\n".join(lines)
