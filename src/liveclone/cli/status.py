"""``liveclone status``: report a clone's state, live if a process is running it."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import click

from liveclone.cli.clones import api_option, daemon_for
from liveclone.core.copier import Phase
from liveclone.core.metadata import MapHeader, MapStore
from liveclone.session import status_path
from liveclone.units import format_size

# A status file older than this, from a process that is gone, is not "running".
_STALE = 5.0


def read_status(clone_path: str) -> dict[str, Any]:
    """The clone's state: the committed map, merged with the live status file if its
    writer still runs. Raises NotACloneError / CorruptMetadataError."""
    clone_path = os.path.abspath(clone_path)
    header, rmap = MapStore.read(clone_path)
    live: dict[str, Any] = {}
    for _ in range(5):  # a status rewritten in place (full disk) may read torn
        try:
            with open(status_path(clone_path)) as f:
                live = json.load(f)
            break
        except OSError:
            break
        except ValueError:
            time.sleep(0.02)
    running = bool(live.get("running")) and _alive(live.get("pid"))
    return combine_status(clone_path, header, rmap.count, rmap.present_count, live, running,
                          partial=len(rmap.blocks))


def combine_status(clone_path: str, header: MapHeader, regions: int, committed: int,
                   live: dict[str, Any], running: bool, partial: int = 0) -> dict[str, Any]:
    """The status object: the committed map's facts merged with what the running
    process reports (``live``, a ``CloneSession.status()``). ``read_status`` reads
    both from disk; the daemon passes its own in-memory ones, so ``liveclone status
    --json`` and its API give one and the same object. ``partial``: absent regions
    with committed guest-written sub-blocks."""
    present = committed
    if running:
        present = max(present, int(live.get("regions_present", 0)))
    if live.get("phase") == Phase.FAILED and (running or live.get("running") is False):
        # Failed, even if the map reads complete: a failed journal sync leaves the
        # map's durability unknown until the next open settles it.
        phase = Phase.FAILED
    elif present == regions:
        phase = Phase.COMPLETE
    elif running:
        phase = live.get("phase", Phase.COPYING)
    else:
        phase = Phase.PAUSED
    out: dict[str, Any] = {
        "phase": phase,
        "running": running,
        "clone": clone_path,
        "regions_total": regions,
        "regions_present": present,
        "regions_committed": committed,
        # absent regions holding guest-written 4 KiB blocks (core.regions)
        "regions_partial": int(live.get("regions_partial", partial)) if running else partial,
        "region_size": header.region_size,
        "bytes_total": header.size,
        "bytes_present": min(present * header.region_size, header.size),
        "bytes_copied": live.get("bytes_copied", 0),
        "rate": live.get("rate", 0.0) if running else 0.0,
        "eta": live.get("eta") if running else None,
        "source": header.source,
        "last_error": live.get("last_error"),
        "created": header.created,
    }
    for key, value in live.items():
        out.setdefault(key, value)
    out["running"] = running
    return out


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@click.command("status")
@click.argument("clone_path", metavar="CLONE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@api_option
def command(clone_path: str, as_json: bool, api: str | None) -> None:
    """Show how far CLONE's copy is, and what its running process reports.

    CLONE is a clone file, or the name of a daemon's clone."""
    daemon = daemon_for(clone_path, api)
    st = daemon.get(clone_path)["status"] if daemon is not None else read_status(clone_path)
    if as_json:
        click.echo(json.dumps(st, sort_keys=True))
        return
    pct = 100.0 * st["regions_present"] / max(st["regions_total"], 1)
    lines = [
        f"clone:   {st['clone']}",
        f"source:  {st['source'].get('path')}",
        f"phase:   {st['phase']}" + (" (running)" if st["running"] else ""),
        f"copied:  {st['regions_present']}/{st['regions_total']} regions ({pct:.1f}%) of "
        f"{format_size(st['bytes_total'])}, region size {format_size(st['region_size'])}",
    ]
    if st["running"] and st.get("rate"):
        eta = st.get("eta")
        lines.append(f"rate:    {format_size(st['rate'])}/s"
                     + (f", {eta:.0f} s left" if eta is not None else ""))
    if st.get("last_error"):
        lines.append(f"error:   {st['last_error']}")
    if st.get("created"):
        lines.append(f"created: {time.ctime(st['created'])}")
    click.echo("\n".join(lines))
