"""``liveclone libvirt-xml``: the libvirt ``<disk>`` element for a served clone.

It reads the running ``liveclone serve``'s status file (``CLONE.lcstatus``), whose
``nbd.uris`` name the listeners, and turns the first URI into a network disk:

* ``nbd+unix:///NAME?socket=PATH`` → ``<host transport='unix' socket='PATH'/>``
* ``nbd://HOST:PORT/NAME`` → ``<host name='HOST' port='PORT'/>``
* ``nbds://…`` and ``nbds+unix://…`` (serve --tls-certificates) → ``tls='yes'`` on
  ``<source>``; libvirt's QEMU then needs the CA in ``nbd_tls_x509_cert_dir``
  (``/etc/libvirt/qemu.conf``), which is said on stderr.

stdout carries the XML and nothing else, so ``liveclone libvirt-xml CLONE >
disk.xml`` or ``virsh attach-device DOMAIN <(liveclone libvirt-xml CLONE)`` work.
"""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import click

from liveclone.errors import UsageError

STATUS_WAIT = 3.0  # seconds to wait for a just-started serve's status

# The first letters of a target device name → libvirt's bus for it.
_BUSES = {"vd": "virtio", "sd": "scsi", "hd": "ide", "xv": "xen"}


@dataclass(frozen=True)
class Export:
    """Where an NBD export is, as libvirt needs it."""

    name: str
    tls: bool
    socket: str | None = None  # a unix socket, or
    host: str | None = None  # a TCP host and port
    port: int | None = None


def parse_nbd_uri(uri: str) -> Export:
    """An ``nbd``/``nbds`` URI (with ``+unix`` or ``+tcp``) → :class:`Export`."""
    parts = urlsplit(uri)
    scheme, _, transport = parts.scheme.partition("+")
    if scheme not in ("nbd", "nbds") or transport not in ("", "tcp", "unix"):
        raise UsageError(f"not an NBD URI: {uri}")
    name = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    tls = scheme == "nbds"
    if transport == "unix":
        sockets = parse_qs(parts.query).get("socket")
        if not sockets:
            raise UsageError(f"NBD URI without a socket: {uri}")
        return Export(name=name, tls=tls, socket=os.path.abspath(sockets[0]))
    if not parts.hostname:
        raise UsageError(f"NBD URI without a host: {uri}")
    return Export(name=name, tls=tls, host=parts.hostname, port=parts.port or 10809)


def disk_element(export: Export, target: str, read_only: bool = False) -> ET.Element:
    """The ``<disk type='network'>`` element for ``export`` as device ``target``."""
    bus = _BUSES.get(target[:2])
    if bus is None or len(target) < 3:
        raise UsageError(f"invalid --target {target!r}: use a name like vda, sda or hda")
    disk = ET.Element("disk", type="network", device="disk")
    driver = {"name": "qemu", "type": "raw"}
    if not read_only:
        driver["discard"] = "unmap"  # trims reach the clone as holes
    ET.SubElement(disk, "driver", driver)
    source = ET.SubElement(disk, "source", protocol="nbd")
    if export.name:
        source.set("name", export.name)
    if export.tls:
        source.set("tls", "yes")
    if export.socket is not None:
        ET.SubElement(source, "host", transport="unix", socket=export.socket)
    else:
        ET.SubElement(source, "host", name=str(export.host), port=str(export.port))
    ET.SubElement(disk, "target", dev=target, bus=bus)
    if read_only:
        ET.SubElement(disk, "readonly")
    return disk


def served_export(status: dict[str, Any], clone_path: str) -> tuple[Export, bool]:
    """The export a running ``serve`` publishes in its status, and whether it is
    read-only. UsageError if nothing serves the clone."""
    nbd = status.get("nbd") or {}
    uris = nbd.get("uris") or []
    if not status.get("running") or not uris:
        raise UsageError(f"{clone_path} is not being served: start `liveclone serve SOURCE "
                         f"{clone_path}` first (libvirt connects to its NBD export)")
    return parse_nbd_uri(uris[0]), bool(nbd.get("read_only"))


@click.command("libvirt-xml")
@click.argument("clone_path", metavar="CLONE")
@click.option("--target", default="vda", show_default=True,
              help="The guest's device name; its prefix picks the bus (vd: virtio, "
                   "sd: scsi, hd: ide).")
def command(clone_path: str, target: str) -> None:
    """Print the libvirt <disk> element for CLONE's running NBD export.

    Paste it into a domain's <devices>, or `virsh attach-device DOMAIN FILE`.
    """
    from liveclone.cli.status import read_status

    if not os.path.exists(clone_path):
        raise UsageError(f"no clone at {clone_path}")
    # serve prints its URI, then publishes its status: a script that runs this as
    # soon as it has the URI waits a moment for it.
    deadline = time.monotonic() + STATUS_WAIT
    while True:
        try:
            export, read_only = served_export(read_status(clone_path), clone_path)
            break
        except UsageError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    disk = disk_element(export, target, read_only)
    ET.indent(disk)
    click.echo(ET.tostring(disk, encoding="unicode"))
    if export.tls:
        click.echo("liveclone: TLS: libvirt's QEMU must trust the server's CA: put "
                   "ca-cert.pem in the directory named by nbd_tls_x509_cert_dir in "
                   "/etc/libvirt/qemu.conf", err=True)
