"""libvirt boots a clone that is still copying, from `liveclone serve`'s NBD export and
the `<disk>` that `liveclone libvirt-xml` prints.

The test runs its own libvirtd. What it takes on a bare Debian host, each done
here: the ``libvirt-qemu`` user (Debian's libvirt-daemon-system makes it; the
bare daemon does not), a ``qemu.conf`` with ``cgroup_controllers = [ ]`` (no
cgroup delegation in a container), and ``virtlogd`` beside ``libvirtd``, both
started with ``-d``. They run in a private mount namespace whose ``/etc/libvirt``,
``/run/libvirt``, ``/var/lib/libvirt``, ``/var/log/libvirt`` and
``/var/cache/libvirt`` are directories of the test, so the host's libvirt (if
any) is neither used nor changed.

QEMU runs as libvirt-qemu, so the serve socket (0600) is given to it with ``serve
--socket-owner libvirt-qemu``, in a directory it can traverse.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from guest.bootdisk import BOOT_TEXT, BootDisk, build_boot_disk
from guest.build import RESULT_OK
from guest.checks import debugfs_cat, e2fsck, finish_copy
from tests.integration.servers import free_port, make_pki

LIVECLONE = [sys.executable, "-m", "liveclone.cli.main"]
QEMU_USER = "libvirt-qemu"
QEMU_CONF = f"""# liveclone's libvirt test
cgroup_controllers = [ ]
user = "{QEMU_USER}"
group = "{QEMU_USER}"
security_driver = "none"
"""
# The test's directory → the libvirt directory it stands for, in the namespace.
BIND = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
        "log": "/var/log/libvirt", "cache": "/var/cache/libvirt"}


@dataclass
class Libvirt:
    root: Path
    uri: str

    def virsh(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True,
                           timeout=120)
        if check:
            assert r.returncode == 0, f"virsh {' '.join(args)}: {r.stdout}{r.stderr}"
        return r.stdout


def ensure_user(name: str) -> None:
    if subprocess.run(["getent", "passwd", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", name], check=True)


def _kill_pidfile(path: Path) -> None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def libvirt() -> Iterator[Libvirt]:
    for tool in ("libvirtd", "virtlogd", "virsh"):
        assert shutil.which(tool), f"{tool} missing: run scripts/install-system-deps.sh"
    ensure_user(QEMU_USER)
    root = Path(tempfile.mkdtemp(prefix="lc-libvirt-"))
    for name in BIND:
        (root / name).mkdir()
    (root / "etc" / "qemu.conf").write_text(QEMU_CONF)
    binds = "\n".join(f"mkdir -p {d}\nmount --bind {root / name} {d}"
                      for name, d in BIND.items())
    script = (f"set -e\n{binds}\n"
              f"virtlogd -d -p {root}/virtlogd.pid\n"
              f"libvirtd -d -p {root}/libvirtd.pid\n")
    lib = Libvirt(root=root, uri=f"qemu:///system?socket={root}/run/libvirt-sock")
    try:
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 60
        while subprocess.run(["virsh", "-c", lib.uri, "version"],
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "libvirtd did not come up"
            time.sleep(0.2)
        yield lib
    finally:
        _kill_pidfile(root / "libvirtd.pid")
        _kill_pidfile(root / "virtlogd.pid")
        shutil.rmtree(root, ignore_errors=True)


DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {disk}
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
  </devices>
</domain>
"""


def status_of(clone: Path) -> dict[str, Any]:
    return dict(json.loads(subprocess.run([*LIVECLONE, "status", str(clone), "--json"],
                                          capture_output=True, text=True,
                                          check=True).stdout))


@pytest.fixture(scope="module")
def boot_disk() -> BootDisk:
    return build_boot_disk()


def test_libvirt_boots_a_copying_clone(tmp_path: Path, libvirt: Libvirt,
                                       boot_disk: BootDisk) -> None:
    src, clone = tmp_path / "src.qcow2", tmp_path / "clone.img"
    shutil.copyfile(boot_disk.qcow2, src)
    # A directory libvirt-qemu can traverse (pytest's is root's alone) for the socket
    # and the console log.
    share = Path(tempfile.mkdtemp(prefix="lc-libvirt-share-"))
    share.chmod(0o711)
    sock = share / "clone.sock"
    console = share / "console.log"
    serve = subprocess.Popen([*LIVECLONE, "serve", str(src), str(clone), "--socket", str(sock),
                              "--socket-owner", QEMU_USER, "--rate", "256K"],
                             stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    name = f"lc-{os.getpid()}"
    try:
        assert serve.stdout is not None
        uri = serve.stdout.readline().strip()
        assert uri.startswith("nbd+unix://"), uri
        assert sock.stat().st_uid == pwd.getpwnam(QEMU_USER).pw_uid
        r = subprocess.run([*LIVECLONE, "libvirt-xml", str(clone)], capture_output=True,
                           text=True, check=True)
        disk = ET.fromstring(r.stdout)  # stdout is the XML and nothing else
        host = disk.find("source/host")
        assert host is not None and host.get("socket") == str(sock)
        domain = tmp_path / "domain.xml"
        domain.write_text(DOMAIN.format(name=name, disk=r.stdout, console=console))
        libvirt.virsh("define", str(domain))
        before = status_of(clone)
        assert before["regions_present"] < before["regions_total"]  # still copying
        t0 = time.monotonic()
        libvirt.virsh("start", name)
        # The guest powers off after its result line (ACPI), and the domain goes.
        while "running" in libvirt.virsh("domstate", name, check=False):
            assert time.monotonic() - t0 < 240, console.read_text(errors="replace")
            time.sleep(0.5)
        booted = time.monotonic() - t0
        out = console.read_text(errors="replace")
        assert "SYSLINUX" in out and RESULT_OK in out, out
        status = status_of(clone)
        assert status["running"]
        print(f"libvirt booted the clone in {booted:.1f} s at "
              f"{status['regions_present']}/{status['regions_total']} regions")
    finally:
        libvirt.virsh("destroy", name, check=False)
        libvirt.virsh("undefine", name, check=False)
        serve.terminate()
        serve.communicate(timeout=60)
        shutil.rmtree(share, ignore_errors=True)
    # Completion: the clone alone is a clean ext4 holding the guest's file.
    finish_copy(src, clone)
    e2fsck(clone)
    assert debugfs_cat(clone, "new/boot.txt").decode() == BOOT_TEXT


KINDS = {"tcp": [], "tls": ["--tls-certificates"], "read-only": ["--read-only"]}


def served_disk_xml(tmp_path: Path, kind: str, target: str) -> tuple[str, str, int]:
    """Serve a small clone over TCP as ``kind``; ``libvirt-xml``'s (stdout, stderr) and
    the port."""
    d = tmp_path / kind
    d.mkdir()
    src, clone = d / "src.img", d / "clone.img"
    src.write_bytes(bytes(4 << 20))
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--export-name", "disk"]
    if kind == "tls":
        args += ["--tls-certificates", str(make_pki(d / "pki"))]
    if kind == "read-only":
        args += ["--read-only"]
    serve = subprocess.Popen([*LIVECLONE, "serve", str(src), str(clone), *args, "--rate",
                              "64K"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert serve.stdout is not None
        serve.stdout.readline()
        r = subprocess.run([*LIVECLONE, "libvirt-xml", str(clone), "--target", target],
                           capture_output=True, text=True, check=True)
    finally:
        serve.terminate()
        serve.communicate(timeout=60)
    return r.stdout, r.stderr, port


def test_libvirt_xml_for_tcp_and_tls(tmp_path: Path, libvirt: Libvirt) -> None:
    """The <disk> for a TCP, a TLS and a read-only export: right on its own, and
    accepted by libvirt's schema and parser in one domain (a define costs about 45 s
    here: libvirt probes QEMU again for each)."""
    disks = []
    for n, kind in enumerate(KINDS):
        target = f"sd{'bcd'[n]}"
        xml, err, port = served_disk_xml(tmp_path, kind, target)
        disk = ET.fromstring(xml)
        source = disk.find("source")
        assert source is not None and source.get("name") == "disk"
        host = disk.find("source/host")
        assert host is not None and host.attrib == {"name": "127.0.0.1", "port": str(port)}
        got = disk.find("target")
        assert got is not None and got.attrib == {"dev": target, "bus": "scsi"}
        assert (source.get("tls") == "yes") == (kind == "tls")
        assert (disk.find("readonly") is not None) == (kind == "read-only")
        assert ("nbd_tls_x509_cert_dir" in err) == (kind == "tls")
        disks.append(xml)
    domain = tmp_path / "domain.xml"
    name = f"lc-xml-{os.getpid()}"
    domain.write_text(DOMAIN.format(name=name, disk="\n".join(disks), console="/dev/null"))
    libvirt.virsh("define", "--validate", str(domain))  # libvirt's schema accepts them
    try:
        parsed = ET.fromstring(libvirt.virsh("dumpxml", "--inactive", name))
    finally:
        libvirt.virsh("undefine", name)
    kept = {}
    for disk in parsed.iterfind("devices/disk"):
        kept[disk.find("target").get("dev")] = ET.tostring(disk, encoding="unicode")  # type: ignore[union-attr]
    assert set(kept) == {"sdb", "sdc", "sdd"}
    assert 'tls="yes"' in kept["sdc"] and "tls" not in kept["sdb"]
    assert "<readonly" in kept["sdd"] and "<readonly" not in kept["sdb"]


def test_libvirt_xml_needs_a_running_serve(tmp_path: Path) -> None:
    src, clone = tmp_path / "src.img", tmp_path / "clone.img"
    src.write_bytes(bytes(1 << 20))
    subprocess.run([*LIVECLONE, "clone", str(src), str(clone)], check=True,
                   capture_output=True)
    r = subprocess.run([*LIVECLONE, "libvirt-xml", str(clone)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert "is not being served: start `liveclone serve" in r.stderr
