"""A real VM boots from a clone that is still copying, checks and writes files, and the
finished clone alone holds the original files plus the guest's."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from guest.build import RESULT_OK, Guest, build_guest, file_content, verify_script

LIVECLONE = [sys.executable, "-m", "liveclone.cli.main"]

NEW_TEXT = "written by the guest while the clone was copying\n"
GUEST_WRITES = (
    "mkdir -p new\n"
    f"printf '%s' '{NEW_TEXT}' > new/hello.txt\n"
    "cp data/five-meg.bin new/five-copy.bin\n"
    "dd if=/dev/zero of=new/zeros.bin bs=64k count=16 2>/dev/null\n"
    "sync\n"
)


@pytest.fixture(scope="module")
def guest() -> Guest:
    return build_guest()


def debugfs_cat(image: Path, path: str) -> bytes:
    r = subprocess.run(["debugfs", "-R", f"cat /{path}", str(image)], capture_output=True,
                       check=True)
    return r.stdout


def boot(src: Path, clone: Path, guest: Guest, script: str, *args: str
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LIVECLONE, "boot", str(src), str(clone), "--kernel", str(guest.kernel),
         "--initrd", str(guest.initrd), "--append", guest.append(script), "--memory", "256M",
         *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


def check_finished_clone(src: Path, clone: Path, guest: Guest) -> None:
    subprocess.run([*LIVECLONE, "clone", str(src), str(clone), "--no-progress"], check=True,
                   capture_output=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(clone)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    src.unlink()  # the finished clone must stand alone
    for path, digest in guest.files.items():
        assert hashlib.sha256(debugfs_cat(clone, path)).hexdigest() == digest, path
    assert debugfs_cat(clone, "new/hello.txt").decode() == NEW_TEXT
    assert debugfs_cat(clone, "new/five-copy.bin") == file_content("five-meg.bin")
    assert debugfs_cat(clone, "new/zeros.bin") == bytes(1 << 20)


@pytest.mark.parametrize("via", ["file", "nbd"])
def test_vm_boots_from_clone_still_copying(tmp_path: Path, guest: Guest, via: str) -> None:
    src, clone = tmp_path / "src.img", tmp_path / "clone.img"
    shutil.copyfile(guest.disk, src)
    r = boot(src, clone, guest, verify_script() + GUEST_WRITES, "--via", via, "--rate", "1M")
    assert r.returncode == 0, r.stdout + r.stderr
    # Every original file checked out inside the guest, and its script succeeded.
    for path in guest.files:
        assert f"{Path(path).name}: OK" in r.stdout
    assert RESULT_OK in r.stdout
    started = re.search(r"booting .* via (\w+) .* (\d+)/(\d+) regions copied", r.stderr)
    assert started is not None, r.stderr
    assert started.group(1) == via
    assert int(started.group(2)) < int(started.group(3))  # the copy had not ended
    assert f"liveclone clone {src} {clone}" in r.stderr  # says how to finish
    check_finished_clone(src, clone, guest)


def test_vm_failure_is_reported_and_clone_resumes(tmp_path: Path, guest: Guest) -> None:
    """A guest script that fails shows in the console; a second boot resumes the clone."""
    src, clone = tmp_path / "src.img", tmp_path / "clone.img"
    shutil.copyfile(guest.disk, src)
    r = boot(src, clone, guest, "false\n", "--via", "file", "--rate", "1M")
    assert r.returncode == 0  # QEMU powered off normally; the guest said why
    assert "LC-RESULT: fail 1" in r.stdout
    r = boot(src, clone, guest, verify_script() + GUEST_WRITES, "--via", "file",
             "--", "-name", "lctest")  # extra QEMU arguments pass through
    assert RESULT_OK in r.stdout, r.stdout + r.stderr
    check_finished_clone(src, clone, guest)


def test_qemu_command_line() -> None:
    from liveclone.vm import VMConfig

    cmd = VMConfig(disk="/m/a,b.img", kernel="/k", append="x=1", extra=["-snapshot"]).command()
    assert "file=/m/a,,b.img,format=raw,if=none,id=clone0" in cmd
    assert "virtio-blk-pci,drive=clone0" in cmd  # no bootindex: -kernel's ROM takes 0
    assert cmd[-1] == "-snapshot" and cmd[cmd.index("-append") + 1] == "x=1"
    cmd = VMConfig(disk="nbd+unix:///clone?socket=/s.sock").command()
    assert "file=nbd+unix:///clone?socket=/s.sock,format=raw,discard=unmap,if=none,id=clone0" \
        in cmd
    assert "virtio-blk-pci,drive=clone0,bootindex=0" in cmd
