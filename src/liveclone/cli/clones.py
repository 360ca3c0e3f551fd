"""``liveclone add``, ``ls`` and ``rm``: the daemon's clones, through its API.

These commands (and ``status``, ``pause`` and ``resume`` given a daemon clone's
name) talk to a running ``liveclone daemon`` over its unix socket with
``daemon.client``: the standard library only, so they start as fast as the CLI can.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from liveclone.cli.options import SIZE
from liveclone.daemon.client import Client
from liveclone.daemon.names import is_name
from liveclone.units import format_size

F = TypeVar("F", bound=Callable[..., Any])


def api_option(f: F) -> F:
    return click.option(
        "--api", "api", default=None, metavar="PATH",
        help="The daemon's API socket (default: $LIVECLONE_API, else "
             "/run/liveclone/api.sock for root, $XDG_RUNTIME_DIR/liveclone/api.sock "
             "otherwise).")(f)


def daemon_for(target: str, api: str | None) -> Client | None:
    """The daemon to ask about ``target``, if it names one of its clones: always
    with ``--api``; otherwise when ``target`` is a clone name and no such file
    exists here, and a daemon answers on the default socket."""
    if api is not None:
        return Client(api)
    if os.path.exists(target) or not is_name(target):
        return None
    client = Client()
    return client if os.path.exists(client.api) and client.reachable() else None


@click.command("add")
@click.argument("source")
@click.argument("clone_path", metavar="CLONE")
@click.option("--name", default=None, help="The clone's name and NBD export name "
              "(default: CLONE's file name).")
@click.option("--region-size", type=SIZE, default=None,
              help="Tracking granularity, a power of two from 4K to 1G (default 64K).")
@click.option("--rate", type=SIZE, default=None,
              help="Limit this clone's background copy to this many bytes per second.")
@click.option("--copy-on-read/--no-copy-on-read", default=None,
              help="Keep what guests read in the clone (default: on for remote sources).")
@click.option("--read-only", is_flag=True, help="Export the clone read-only.")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's answer as JSON.")
@api_option
def add(source: str, clone_path: str, name: str | None, region_size: int | None,
        rate: int | None, copy_on_read: bool | None, read_only: bool, as_json: bool,
        api: str | None) -> None:
    """Have the daemon clone SOURCE into CLONE and serve it at once.

    Prints the clone's NBD URI on stdout once it is readable. SOURCE is an image
    path or an http(s)://, s3:// or nbd:// URL; relative paths are taken from here.
    """
    if "://" not in source:
        source = os.path.abspath(source)
    body: dict[str, Any] = {"source": source, "clone": os.path.abspath(clone_path)}
    for key, value in (("name", name), ("region_size", region_size), ("rate", rate),
                       ("copy_on_read", copy_on_read)):
        if value is not None:
            body[key] = value
    if read_only:
        body["read_only"] = True
    result = Client(api).add(body)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    click.echo(result["nbd_uri"])
    where = f"; file {result['file']}" if result.get("file") else ""
    click.echo(f"liveclone: added {result['name']}: {result['clone']} from "
               f"{result['source']}{where}", err=True)


@click.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's list as JSON.")
@api_option
def ls(as_json: bool, api: str | None) -> None:
    """List the daemon's clones: name, phase, progress, NBD URI."""
    clones = Client(api).list()
    if as_json:
        click.echo(json.dumps(clones, sort_keys=True))
        return
    rows = [("NAME", "PHASE", "COPIED", "SIZE", "NBD URI")]
    for c in clones:
        st = c["status"]
        total = st.get("regions_total") or 0
        pct = f"{100.0 * st.get('regions_present', 0) / total:.0f}%" if total else "-"
        rows.append((c["name"], str(st.get("phase")), pct,
                     format_size(st.get("bytes_total", 0)), str(c.get("nbd_uri"))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])


@click.command("rm")
@click.argument("name")
@click.option("--remove", "delete_files", is_flag=True,
              help="Also delete the clone file and its map (default: keep them).")
@api_option
def rm(name: str, delete_files: bool, api: str | None) -> None:
    """Stop serving the daemon's clone NAME (its map is committed first)."""
    result = Client(api).remove(name, delete_files)
    st = result.get("status", {})
    kept = "deleted" if delete_files else f"kept at {st.get('clone')}"
    click.echo(f"liveclone: removed {name} ({st.get('regions_present')}/"
               f"{st.get('regions_total')} regions copied); its files are {kept}", err=True)
