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
from guest.build import RESULT_OK, build_guest, verify_script
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
        except BaseException:  # pytest-timeout, Ctrl-C: never wait on a hung boot
            proc.kill()
            raise
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
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    cache = _cache_kvm_works(env)
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


def _cache_kvm_works(env: dict[str, str]) -> Path:
    """Write the lie "KVM works here" into the accelerator cache that ``env`` (its
    XDG_CACHE_HOME and PATH) selects; return the cache file."""
    code = ("from liveclone.vm.qemu import _cache_file, record_kvm; record_kvm(None, True); "
            "print(_cache_file())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    cache = Path(out.strip())
    assert list(json.loads(cache.read_text()).values()) == [True]
    return cache


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


FAKE_KVM_QEMU = r'''#!__PYTHON__
"""qemu-system-x86_64 as a host whose KVM fails mid-boot: under -accel kvm it prints
the console's first line, then QEMU's "KVM internal error", and stops the vCPU
without exiting (QMP: STOP, run state internal-error), as SYSLINUX under KVM did on
the host of issue 14. Any other accelerator runs the real QEMU."""
import json, os, socket, sys
argv = sys.argv[1:]
if argv[argv.index("-accel") + 1] != "kvm":
    os.execv("__QEMU__", ["__QEMU__", *argv])
path = argv[argv.index("-qmp") + 1][len("unix:"):].split(",")[0]
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(1)
print("SeaBIOS (version fake)", flush=True)
print("KVM internal error. Suberror: 1\nemulation failure", file=sys.stderr, flush=True)
conn, _ = srv.accept()
f = conn.makefile("rwb")
def send(msg):
    f.write(json.dumps(msg).encode() + b"\r\n")
    f.flush()
send({"QMP": {"version": {}, "capabilities": []}})
for line in f:
    cmd = json.loads(line)
    ret = {}
    if cmd["execute"] == "query-status":
        ret = {"status": "internal-error", "running": False}
    elif cmd["execute"] == "query-blockstats":
        ret = [{"device": "clone0", "stats": {"rd_operations": 3}}]
    send({"return": ret, "id": cmd.get("id")})
    if cmd["execute"] == "qmp_capabilities":
        send({"event": "STOP", "data": {}, "timestamp": {"seconds": 0, "microseconds": 0}})
'''


def test_kvm_internal_error_restarts_under_tcg(tmp_path: Path, boot_disk: BootDisk) -> None:
    """The failure of issue 14 as QEMU shows it: KVM passes the probe, then a real
    boot stops in "KVM internal error" with QEMU still running. --accel auto sees the
    STOP over QMP, restarts under TCG, says so, and the boot completes."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm: --accel auto never tries KVM here, so cannot fall back")
    real = shutil.which("qemu-system-x86_64")
    assert real is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "qemu-system-x86_64"
    fake.write_text(FAKE_KVM_QEMU.replace("__PYTHON__", sys.executable)
                    .replace("__QEMU__", real))
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    _cache_kvm_works(env)
    src, clone = tmp_path / "src.qcow2", tmp_path / "clone.img"
    shutil.copyfile(boot_disk.qcow2, src)
    r = liveclone_boot(src, clone, "--via", "nbd", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "KVM internal error" in r.stderr  # QEMU's own words reach the user
    assert "the VM failed under KVM: KVM internal error (emulation failure)" in r.stderr
    assert "Restarting it under TCG" in r.stderr
    assert RESULT_OK in r.stdout, r.stdout + r.stderr


def test_uefi_firmware(tmp_path: Path) -> None:
    """--firmware uefi runs OVMF (its code read-only, a private copy of its variable
    store): here with --kernel, which OVMF loads; the guest checks its files."""
    assert os.path.exists("/usr/share/OVMF"), "ovmf missing: run scripts/install-system-deps.sh"
    guest = build_guest()
    src, clone = tmp_path / "src.img", tmp_path / "clone.img"
    shutil.copyfile(guest.disk, src)
    r = liveclone_boot(src, clone, "--firmware", "uefi", "--accel", "tcg", "--kernel",
                       str(guest.kernel), "--initrd", str(guest.initrd), "--append",
                       guest.append(verify_script()))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "\x1b[2J" in r.stdout  # OVMF's console clears the screen; SeaBIOS prints nothing
    assert RESULT_OK in r.stdout, r.stdout + r.stderr
