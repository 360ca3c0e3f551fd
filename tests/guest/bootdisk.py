"""Build (and cache) a disk that boots by itself: SeaBIOS → EXTLINUX → the test guest.

The disk is one whole-disk ext4 filesystem (no partition table) made with
``mkfs.ext4 -b 4096`` (SYSLINUX cannot read ext4 with 1 KiB blocks). It holds
the test guest's kernel and initramfs in ``/boot``, EXTLINUX (Debian's
``extlinux`` and ``syslinux-common``) in ``/boot/extlinux`` with a config that
boots the guest on the serial console with a fixed script, and the same
``/data`` files as the guest's data disk. ``extlinux --install`` needs the
filesystem mounted, so the build loop-mounts it (root). For a whole-disk
filesystem extlinux writes its boot sector to the filesystem's first sector,
which is the disk's sector 0: SeaBIOS loads it like an MBR.

The script is baked into the boot loader's config (``BOOT_SCRIPT``): check every
``/data`` file, then write ``new/boot.txt`` (``BOOT_TEXT``).

Cached in ``.cache/guest/boot-KEY/`` (key: this file, the guest's key, the
extlinux version), as ``disk.img`` and ``disk.qcow2``.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from guest.build import CACHE_DIR, Guest, build_guest, verify_script, write_script

BOOT_TEXT = "written by a guest that booted from its own disk"
BOOT_SCRIPT = verify_script() + write_script({"new/boot.txt": BOOT_TEXT})
DISK_SIZE = "96M"


@dataclass(frozen=True)
class BootDisk:
    raw: Path
    qcow2: Path
    guest: Guest


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _extlinux_version() -> str:
    extlinux = shutil.which("extlinux")
    if extlinux is None:
        raise RuntimeError("extlinux is missing: run scripts/install-system-deps.sh")
    return hashlib.sha256(Path(extlinux).read_bytes()).hexdigest()[:16]


def _config(guest: Guest) -> str:
    return ("SERIAL 0 115200\nDEFAULT lc\nPROMPT 0\nTIMEOUT 0\n"
            "LABEL lc\n  LINUX /boot/vmlinuz\n  INITRD /boot/initrd.gz\n"
            f"  APPEND {guest.append(BOOT_SCRIPT)}\n")


def _install_extlinux(image: Path, work: Path) -> None:
    mnt = work / "mnt"
    mnt.mkdir()
    _sh("mount", "-o", "loop", str(image), str(mnt))
    try:
        _sh("extlinux", "--install", str(mnt / "boot" / "extlinux"))
    finally:
        _sh("umount", str(mnt))


def build_boot_disk(cache_dir: Path = CACHE_DIR) -> BootDisk:
    """Return the cached bootable disk, building it first if needed."""
    guest = build_guest()
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(str(guest.kernel.parent.name).encode())  # the guest's own cache key
    h.update(_extlinux_version().encode())
    out = cache_dir / f"boot-{h.hexdigest()[:16]}"
    if not (out / "disk.qcow2").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix="build-boot-") as tmp:
            work = Path(tmp)
            tree = work / "tree"
            (tree / "boot" / "extlinux").mkdir(parents=True)
            shutil.copy2(guest.kernel, tree / "boot" / "vmlinuz")
            shutil.copy2(guest.initrd, tree / "boot" / "initrd.gz")
            (tree / "boot" / "extlinux" / "extlinux.conf").write_text(_config(guest))
            (tree / "data").mkdir()
            # The same files and sums as the guest's data disk, read back from it.
            for rel in [*guest.files, "data/SHA256SUMS"]:
                data = _sh_bytes("debugfs", "-R", f"cat /{rel}", str(guest.disk))
                (tree / rel).write_bytes(data)
            stage = work / "out"
            stage.mkdir()
            raw = stage / "disk.img"
            _sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "lcboot", "-d", str(tree),
                str(raw), DISK_SIZE)
            _install_extlinux(raw, work)
            _sh("e2fsck", "-fn", str(raw))
            _sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
                str(stage / "disk.qcow2"))
            try:
                stage.rename(out)
            except OSError:
                if not (out / "disk.qcow2").exists():
                    raise
    return BootDisk(raw=out / "disk.img", qcow2=out / "disk.qcow2", guest=guest)


def _sh_bytes(*cmd: str) -> bytes:
    return subprocess.run(cmd, check=True, capture_output=True).stdout


if __name__ == "__main__":
    disk = build_boot_disk()
    print(disk.raw, disk.qcow2)
