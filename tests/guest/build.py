"""Build (and cache) a small Linux test guest from Debian packages.

The guest is three files:

* ``vmlinuz``: the kernel of Debian's ``linux-image-*-cloud-amd64`` package;
* ``initrd.gz``: a busybox-static initramfs with the virtio modules that kernel
  needs for a virtio disk, and an ``/init`` that mounts ``/dev/vda`` on ``/mnt``,
  runs a shell script passed on the kernel command line (``lc.script=`` base64 of
  gzip), prints ``LC-RESULT: ok`` or ``LC-RESULT: fail RC`` on the serial
  console, syncs, unmounts and powers off;
* ``disk-SIZE.img``: an ext4 image (``mkfs.ext4 -d``) with files of known
  content under ``/data`` and their checksums in ``/data/SHA256SUMS``.

Everything lands in ``.cache/guest/`` of the repository, in a directory named
by a hash of the inputs (this file, the kernel package version, busybox's
version, the disk size), so it is rebuilt only when one of them changes.

Use it from tests (``build_guest()`` returns a :class:`Guest`), or run it:
``python tests/guest/build.py [--disk-size 8G]`` prints the paths.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO / ".cache" / "guest"

# Loaded in this order; a module that is built in (absent here) is skipped.
VIRTIO_MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                  "virtio_pci", "virtio_blk")

# Files on the data disk: name -> (size, seed). Content is seeded random bytes.
DATA_FILES = {
    "small.txt": (1000, 1),
    "one-meg.bin": (1 << 20, 2),
    "five-meg.bin": (5 << 20, 3),
    "twelve-meg.bin": (12 << 20, 4),
}
DEFAULT_DISK_SIZE = "96M"

RESULT_OK = "LC-RESULT: ok"
RESULT_FAIL = "LC-RESULT: fail"

_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /mnt /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in __MODULES__; do
  [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
rc=0
if ! mount -t ext4 /dev/vda /mnt; then
  echo "LC: cannot mount /dev/vda"; rc=90
else
  script=$(sed -n 's/.*lc\.script=\([^ ]*\).*/\1/p' /proc/cmdline)
  if [ -n "$script" ]; then
    echo "$script" | base64 -d | gunzip > /tmp/script.sh
    (cd /mnt && sh -e /tmp/script.sh); rc=$?
  fi
  sync
  umount /mnt || rc=91
fi
if [ $rc -eq 0 ]; then echo "LC-RESULT: ok"; else echo "LC-RESULT: fail $rc"; fi
sync
poweroff -f
"""


@dataclass(frozen=True)
class Guest:
    """A built test guest. ``files`` maps paths on the disk to their sha256."""

    kernel: Path
    initrd: Path
    disk: Path
    files: dict[str, str]

    def append(self, script: str = "", extra: str = "") -> str:
        """A kernel command line that runs ``script`` (sh, cwd = the disk's root)."""
        args = "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init"
        if script:
            packed = base64.b64encode(gzip.compress(script.encode(), mtime=0)).decode()
            args += f" lc.script={packed}"
        if len(args) > 2000:
            raise ValueError("guest script too long for the kernel command line")
        return f"{args} {extra}".strip()


def verify_script() -> str:
    """Guest script: check every file on the disk against /data/SHA256SUMS."""
    return "cd data && sha256sum -c SHA256SUMS && cd ..\n"


def write_script(new_files: dict[str, str]) -> str:
    """Guest script: write text files (path -> content, no single quotes), sync."""
    lines = []
    for path, text in new_files.items():
        if "'" in text:
            raise ValueError("guest text must not contain single quotes")
        lines.append(f"mkdir -p {shlex.quote(os.path.dirname(path) or '.')}")
        lines.append(f"printf '%s' '{text}' > {shlex.quote(path)}")
    lines.append("sync")
    return "\n".join(lines) + "\n"


def file_content(name: str) -> bytes:
    size, seed = DATA_FILES[name]
    return random.Random(seed).randbytes(size)


# -- building -------------------------------------------------------------------


def _run(*cmd: str, **kw: object) -> str:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    return str(out.stdout)


def _kernel_package() -> tuple[str, str]:
    """(package, version) of the versioned cloud kernel the meta package depends on."""
    try:
        deps = _run("apt-cache", "depends", "linux-image-cloud-amd64")
    except subprocess.CalledProcessError:
        deps = ""
    pkgs = [line.split(":", 1)[1].strip() for line in deps.splitlines()
            if line.strip().startswith("Depends:") and "linux-image-" in line]
    if not pkgs:
        # No package lists yet: fetch them once.
        _run("apt-get", "update", "-q")
        deps = _run("apt-cache", "depends", "linux-image-cloud-amd64")
        pkgs = [line.split(":", 1)[1].strip() for line in deps.splitlines()
                if line.strip().startswith("Depends:") and "linux-image-" in line]
    if not pkgs:
        raise RuntimeError("cannot find linux-image-*-cloud-amd64 in the apt package lists")
    pkg = pkgs[0]
    version = ""
    for line in _run("apt-cache", "policy", pkg).splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
    return pkg, version


def _busybox_version() -> str:
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox is missing: run scripts/install-system-deps.sh")
    return hashlib.sha256(Path(busybox).read_bytes()).hexdigest()[:16]


def _key(disk_size: str, filler: int, kernel: tuple[str, str]) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(json.dumps([disk_size, filler, kernel, _busybox_version()]).encode())
    return h.hexdigest()[:16]


def _extract_kernel(pkg: str, work: Path) -> tuple[Path, dict[str, Path]]:
    """Download and unpack the kernel package; return vmlinuz and the virtio modules."""
    _run("apt-get", "download", pkg, cwd=str(work))
    debs = list(work.glob(f"{pkg}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {pkg} produced no .deb")
    root = work / "root"
    _run("dpkg", "-x", str(debs[0]), str(root))
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    modules: dict[str, Path] = {}
    for ko in (root / "lib" / "modules").rglob("*.ko*"):
        name = ko.name.split(".ko")[0]
        if name in VIRTIO_MODULES:
            modules[name] = ko
    return vmlinuz, modules


def _make_initrd(modules: dict[str, Path], out: Path, work: Path) -> None:
    tree = work / "initrd"
    for d in ("bin", "lib/modules", "proc", "sys", "dev", "mnt", "tmp"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    assert busybox is not None
    shutil.copy2(busybox, tree / "bin" / "busybox")
    (tree / "bin" / "sh").symlink_to("busybox")
    for name, ko in modules.items():
        dest = tree / "lib" / "modules" / f"{name}.ko"
        data = ko.read_bytes()
        if ko.name.endswith(".xz"):
            import lzma

            data = lzma.decompress(data)
        elif ko.name.endswith(".zst"):
            data = subprocess.run(["zstd", "-dc", str(ko)], check=True,
                                  capture_output=True).stdout
        dest.write_bytes(data)
    init = tree / "init"
    init.write_text(_INIT.replace("__MODULES__", " ".join(VIRTIO_MODULES)))
    init.chmod(0o755)
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"],
                          input="\n".join(names).encode(), cwd=str(tree), check=True,
                          capture_output=True)
    out.write_bytes(gzip.compress(cpio.stdout, mtime=0))


def _make_disk(out: Path, size: str, filler: int, work: Path) -> dict[str, str]:
    tree = work / "disk"
    data = tree / "data"
    data.mkdir(parents=True)
    if filler:
        # Random bytes the guest never reads: data a copy must move before a boot.
        with open(tree / "filler.bin", "wb") as f:
            for _ in range(0, filler, 64 << 20):
                f.write(os.urandom(min(64 << 20, filler - f.tell())))
    sums = {}
    for name in DATA_FILES:
        content = file_content(name)
        (data / name).write_bytes(content)
        sums[name] = hashlib.sha256(content).hexdigest()
    (data / "SHA256SUMS").write_text("".join(f"{h}  {n}\n" for n, h in sums.items()))
    tmp = out.with_suffix(".tmp")
    _run("mkfs.ext4", "-q", "-F", "-L", "lctest", "-d", str(tree), str(tmp), size)
    tmp.rename(out)
    return {f"data/{n}": h for n, h in sums.items()}


def build_guest(disk_size: str = DEFAULT_DISK_SIZE, filler: int = 0,
                cache_dir: Path = CACHE_DIR) -> Guest:
    """Return the cached guest for ``disk_size``, building it first if needed.
    ``filler`` bytes of random data go into ``/filler.bin``, which no check reads."""
    kernel_pkg = _kernel_package()
    key = _key(disk_size, filler, kernel_pkg)
    out = cache_dir / key
    manifest = out / "manifest.json"
    if not manifest.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix="build-") as tmp:
            work = Path(tmp)
            stage = work / "out"
            stage.mkdir()
            vmlinuz, modules = _extract_kernel(kernel_pkg[0], work)
            shutil.copy2(vmlinuz, stage / "vmlinuz")
            _make_initrd(modules, stage / "initrd.gz", work)
            files = _make_disk(stage / "disk.img", disk_size, filler, work)
            (stage / "manifest.json").write_text(json.dumps(
                {"files": files, "kernel": kernel_pkg, "disk_size": disk_size}, indent=1))
            try:
                stage.rename(out)  # atomic: a half-built guest is never seen
            except OSError:
                if not manifest.exists():  # lost a race with another builder: fine
                    raise
    files = json.loads(manifest.read_text())["files"]
    return Guest(kernel=out / "vmlinuz", initrd=out / "initrd.gz", disk=out / "disk.img",
                 files=files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--disk-size", default=DEFAULT_DISK_SIZE)
    parser.add_argument("--filler", type=int, default=0,
                        help="bytes of random data in /filler.bin")
    args = parser.parse_args(argv)
    guest = build_guest(args.disk_size, args.filler)
    print(json.dumps({"kernel": str(guest.kernel), "initrd": str(guest.initrd),
                      "disk": str(guest.disk), "files": guest.files}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
