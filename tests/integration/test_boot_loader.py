"""`liveclone boot` without --kernel: the disk's own boot loader (SeaBIOS → EXTLINUX →
the test guest), a KVM that fails mid-boot, a guest that stops, a boot that makes
no progress. Never a silent hang."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guest.bootdisk import BOOT_TEXT, BootDisk, build_boot_disk
from guest.build import RESULT_OK
from guest.checks import debugfs_cat, e2fsck, finish_copy

LIVECLONE = [sys.executable, "-m", "liveclone.cli.main"]


@pytest.fixture(scope="module")
def boot_disk() -> BootDisk:
    return build_boot_disk()


def liveclone_boot(src: Path, clone: Path, *args: str, env: dict[str, str] | None = None,
                   timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `liveclone boot`; past ``timeout`` fail with its output so far and every
    thread's stack (faulthandler, on SIGABRT)."""
    env = dict(env or os.environ, PYTHONFAULTHANDLER="1")
    with subprocess.Popen([*LIVECLONE, "boot", str(src), str(clone), "--memory", "256M",
                           *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"liveclone boot still ran after {timeout} s; stdout:\n{out}\n"
                        f"stderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def plain_qemu_boot(image: Path) -> str:
    """Boot a finished clone with QEMU alone (SeaBIOS, TCG): its console output."""
    r = subprocess.run(
        ["qemu-system-x86_64", "-accel", "tcg", "-m", "256M", "-nodefaults", "-display",
         "none", "-no-reboot", "-serial", "stdio",
         "-drive", f"file={image},format=raw,if=none,id=d0",
         "-device", "virtio-blk-pci,drive=d0,bootindex=0"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("via", ["nbd", "file"])
def test_boots_from_the_disks_own_boot_loader(tmp_path: Path, boot_disk: BootDisk,
                                              via: str) -> None:
    """A qcow2 source whose only way in is its boot sector: SeaBIOS loads EXTLINUX,
    EXTLINUX the kernel, and the guest checks every file, all while the clone copies."""
    src, clone = tmp_path / "src.qcow2", tmp_path / "clone.img"
    shutil.copyfile(boot_disk.qcow2, src)
    r = liveclone_boot(src, clone, "--via", via, "--accel", "tcg", "--rate", "1M")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SYSLINUX" in r.stdout  # the boot loader ran, on the serial console
    for path in boot_disk.guest.files:
        assert f"{Path(path).name}: OK" in r.stdout
    assert RESULT_OK in r.stdout
    started = re.search(r"via (\w+) .*from the disk's boot loader \(bios\), (\d+)/(\d+) "
                        r"regions copied", r.stderr)
    assert started is not None, r.stderr
    assert started.group(1) == via and int(started.group(2)) < int(started.group(3))
    # Finish the copy; the clone alone boots with plain QEMU and is a clean ext4.
    finish_copy(src, clone)
    e2fsck(clone)
    assert debugfs_cat(clone, "new/boot.txt").decode() == BOOT_TEXT
    if via == "nbd":  # once is enough: the clones are the same bytes
        out = plain_qemu_boot(clone)
        assert "SYSLINUX" in out and RESULT_OK in out, out
        e2fsck(clone)


def test_kvm_that_fails_mid_boot_falls_back_to_tcg(tmp_path: Path, boot_disk: BootDisk
                                                   ) -> None:
    """A cached "KVM works" that is wrong on this host (here -accel kvm spins before the
    firmware reads a sector): --accel auto restarts the VM under TCG, says so, boots,
    and corrects the cache."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm: --accel auto never tries KVM here, so cannot fall back")
    from liveclone.vm.qemu import _cache_file, record_kvm

    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    os.environ["XDG_CACHE_HOME"], saved = env["XDG_CACHE_HOME"], os.environ.get(
        "XDG_CACHE_HOME")
    try:
        record_kvm(None, True)  # the lie: "KVM works here"
        cache = Path(_cache_file())
    finally:
        if saved is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = saved
    assert list(json.loads(cache.read_text()).values()) == [True]
    src, clone = tmp_path / "src.qcow2", tmp_path / "clone.img"
    shutil.copyfile(boot_disk.qcow2, src)
    t0 = time.monotonic()
    r = liveclone_boot(src, clone, "--via", "nbd", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "accel kvm" in r.stderr  # the lie was believed at first
    assert "the VM failed under KVM" in r.stderr and "Restarting it under TCG" in r.stderr
    assert RESULT_OK in r.stdout, r.stdout + r.stderr
    assert list(json.loads(cache.read_text()).values()) == [False]  # corrected
    assert time.monotonic() - t0 < 200


def _boot_sector(code: bytes) -> bytes:
    return code.ljust(510, b"\0") + b"\x55\xaa"


def test_guest_panic_is_fatal_not_a_hang(tmp_path: Path) -> None:
    """A guest that reports a panic (pvpanic; QEMU told to pause, as a KVM internal
    error pauses it): liveclone reports it and stops QEMU instead of waiting."""
    src, clone = tmp_path / "src.img", tmp_path / "clone.img"
    # mov dx, 0x505; mov al, 1; out dx, al; hlt; jmp $-1: pvpanic's "panicked".
    src.write_bytes(_boot_sector(bytes([0xBA, 0x05, 0x05, 0xB0, 0x01, 0xEE, 0xF4, 0xEB,
                                        0xFD])).ljust(1 << 20, b"\0"))
    r = liveclone_boot(src, clone, "--accel", "tcg", "--", "-device", "pvpanic",
                       "-action", "panic=pause", timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the VM stopped: the guest panicked" in r.stderr, r.stderr


def test_watchdog_reports_a_boot_that_makes_no_progress(tmp_path: Path) -> None:
    """A disk with no boot loader: no console output, no disk I/O after the BIOS gives
    up. The watchdog says so, with what to try; the VM keeps running until stopped."""
    src, clone = tmp_path / "src.img", tmp_path / "clone.img"
    src.write_bytes(bytes(1 << 20))
    proc = subprocess.Popen([*LIVECLONE, "boot", str(src), str(clone), "--accel", "tcg",
                             "--watchdog", "3"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "no progress" in line:
                break
        text = "".join(lines)
        assert "has made no progress for" in text, text
        assert "check the disk is bootable" in text
        assert proc.poll() is None  # reported, not killed
        proc.terminate()
        assert proc.wait(30) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
