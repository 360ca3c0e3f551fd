"""Launch QEMU on a clone: the command line, the accelerator probe, the console.

The clone reaches QEMU either as a file (a FUSE mount's ``MOUNTPOINT/<name>``) or
as an NBD URI; either way it is the first virtio disk. This module knows
nothing of how the clone is served.

KVM. ``/dev/kvm`` existing is not proof that KVM works: on nested or odd hosts
``-accel kvm`` aborts or spins forever once a real kernel starts. So the probe
really boots something under KVM with a deadline: the guest kernel itself, with
no root, until it panics (``panic=-1`` + ``-no-reboot`` make QEMU exit), or,
without a kernel, a 512-byte boot sector that writes to ``isa-debug-exit``. The
answer is cached per host boot, QEMU binary and kernel in
``$XDG_CACHE_HOME/liveclone/accel.json``, since a hanging probe costs its deadline.
A probe can pass where a real boot fails (a host whose KVM runs a boot sector but
stops at SYSLINUX with "KVM internal error"), so the VM is also watched over QMP
(``vm/watch.py``) and :func:`record_kvm` corrects the cache when KVM proves wrong.

Firmware. Without ``--kernel`` the VM boots from the clone's own boot loader:
SeaBIOS (``bios``, QEMU's default) or OVMF (``uefi``, Debian's ``ovmf`` package:
its code read-only, and a private copy of its variable store for each run).

Each VM runs with a private directory holding its QMP socket and a copy of its
serial console (the chardev's ``logfile``): the watchdog reads both for progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from liveclone.errors import UsageError
from liveclone.vm.qmp import QMPClient, QMPError

QEMU = "qemu-system-x86_64"
PROBE_TIMEOUT = 10.0
DISK_ID = "clone0"  # the -drive id; query-blockstats reports it as the device

# OVMF's code and variable-store templates, best first (Debian's ovmf package).
OVMF_PAIRS = (("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
              ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"))

# mov al, 1; out 0xf4, al; hlt; jmp $-1 — QEMU exits with status (1 << 1) | 1.
_BOOT_SECTOR = bytes([0xB0, 0x01, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
_DEBUG_EXIT_OK = 3


@dataclass
class VMConfig:
    """What to run. ``disk`` is a path (raw file) or an ``nbd`` URI."""

    disk: str
    memory: str = "512M"
    cpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    accel: str = "tcg"
    firmware: str = "bios"  # bios (SeaBIOS) or uefi (OVMF)
    extra: list[str] = field(default_factory=list)
    interactive: bool = False  # stdin is a terminal: multiplex the monitor on it
    qmp_socket: str | None = None  # -qmp unix:PATH,server=on,wait=off
    console_log: str | None = None  # the serial console is also appended here
    efi_vars: str | None = None  # with uefi: the writable variable store

    def command(self) -> list[str]:
        console = "stdio,id=con0"
        if self.interactive:
            console += ",mux=on"
        if self.console_log:
            console += f",logfile={_drive_escape(self.console_log)},logappend=on"
        cmd = [qemu_binary(), "-accel", self.accel,
               "-cpu", "host" if self.accel == "kvm" else "max",
               "-m", self.memory, "-smp", str(self.cpus),
               "-nodefaults", "-display", "none", "-no-reboot",
               "-chardev", console, "-serial", "chardev:con0"]
        if self.interactive:
            cmd += ["-mon", "chardev=con0,mode=readline"]
        if self.qmp_socket:
            cmd += ["-qmp", f"unix:{_drive_escape(self.qmp_socket)},server=on,wait=off"]
        if self.firmware == "uefi":
            code, _ = ovmf_files()
            cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,"
                              f"file={_drive_escape(code)}"]
            if self.efi_vars:
                cmd += ["-drive", f"if=pflash,format=raw,unit=1,"
                                  f"file={_drive_escape(self.efi_vars)}"]
        elif self.firmware != "bios":
            raise UsageError(f"unknown firmware {self.firmware!r}: use bios or uefi")
        if self.kernel:
            cmd += ["-kernel", self.kernel]
            if self.initrd:
                cmd += ["-initrd", self.initrd]
            if self.append:
                cmd += ["-append", self.append]
        elif self.initrd or self.append:
            raise UsageError("--initrd and --append need --kernel")
        if self.disk.startswith("nbd"):
            drive = f"file={self.disk},format=raw,discard=unmap"
        else:
            drive = f"file={_drive_escape(self.disk)},format=raw"
        device = "virtio-blk-pci,drive=clone0"
        if not self.kernel:
            device += ",bootindex=0"  # -kernel's option ROM takes boot index 0 itself
        cmd += ["-drive", f"{drive},if=none,id={DISK_ID}", "-device", device]
        return cmd + list(self.extra)


def ovmf_files() -> tuple[str, str]:
    """OVMF's (code, variable-store template), or UsageError naming the package."""
    for code, template in OVMF_PAIRS:
        if os.path.exists(code) and os.path.exists(template):
            return code, template
    raise UsageError("--firmware uefi needs OVMF, which is not installed "
                     "(Debian: apt-get install ovmf)")


def _drive_escape(path: str) -> str:
    return path.replace(",", ",,")  # QEMU's option syntax doubles commas


def qemu_binary() -> str:
    found = shutil.which(QEMU)
    if found is None:
        raise UsageError(f"{QEMU} is not installed (Debian: apt-get install qemu-system-x86)")
    return found


# -- accelerator ----------------------------------------------------------------


def _cache_file() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "liveclone", "accel.json")


def _probe_key(kernel: str | None) -> str:
    parts = [qemu_binary()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        pass
    for path in (qemu_binary(), kernel):
        if path:
            st = os.stat(path)
            parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _probe_run(cmd: list[str], ok: int, want: str | None) -> bool:
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == ok and (want is None or want.encode() in r.stdout)


def probe_kvm(kernel: str | None = None) -> bool:
    """True if ``-accel kvm`` really runs a guest here (cached; see module doc)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    key = _probe_key(kernel)
    known = _load_cache()
    if key in known:
        return bool(known[key])
    base = [qemu_binary(), "-accel", "kvm", "-cpu", "host", "-m", "128", "-nodefaults",
            "-display", "none", "-no-reboot"]
    with tempfile.TemporaryDirectory(prefix="liveclone-kvm-") as tmp:
        if kernel:
            works = _probe_run(base + ["-serial", "stdio", "-kernel", kernel, "-append",
                                       "console=ttyS0 panic=-1 root=/dev/lc-none "
                                       "rdinit=/lc-none"], 0, "Kernel panic")
        else:
            img = os.path.join(tmp, "boot.img")
            with open(img, "wb") as f:
                f.write(_BOOT_SECTOR.ljust(510, b"\0") + b"\x55\xaa")
            works = _probe_run(base + ["-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                                       "-drive", f"file={img},format=raw,if=floppy",
                                       "-boot", "a"], _DEBUG_EXIT_OK, None)
    _store(key, works)
    return works


def _load_cache() -> dict[str, bool]:
    try:
        with open(_cache_file()) as f:
            known = json.load(f)
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _store(key: str, works: bool) -> None:
    cache = _cache_file()
    known = _load_cache()
    known[key] = works
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmpname = f"{cache}.{os.getpid()}"
        with open(tmpname, "w") as f:
            json.dump(known, f)
        os.replace(tmpname, cache)
    except OSError:
        pass  # the cache only saves time


def record_kvm(kernel: str | None, works: bool) -> None:
    """Correct the cached probe answer: a real boot showed whether KVM works."""
    _store(_probe_key(kernel), works)


def choose_accel(requested: str, kernel: str | None) -> str:
    """``kvm`` or ``tcg`` for ``--accel auto|kvm|tcg``."""
    if requested == "auto":
        return "kvm" if probe_kvm(kernel) else "tcg"
    if requested not in ("kvm", "tcg"):
        raise UsageError(f"unknown accelerator {requested!r}: use auto, kvm or tcg")
    return requested


# -- running -------------------------------------------------------------------


class VM:
    """A QEMU child process whose serial console is our stdin/stdout, with its QMP
    monitor connected and its console copied to a log the watchdog reads."""

    def __init__(self, config: VMConfig) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp = QMPClient()
        self._dir = tempfile.mkdtemp(prefix="liveclone-vm-")  # 0700: ours alone
        config.qmp_socket = os.path.join(self._dir, "qmp.sock")
        config.console_log = os.path.join(self._dir, "console.log")
        if config.firmware == "uefi":
            _, template = ovmf_files()
            config.efi_vars = os.path.join(self._dir, "efivars.fd")
            shutil.copyfile(template, config.efi_vars)

    def start(self) -> VM:
        sys.stdout.flush()
        sys.stderr.flush()
        self.proc = subprocess.Popen(self.config.command(),
                                     stdin=None if self.config.interactive
                                     else subprocess.DEVNULL)
        assert self.config.qmp_socket is not None
        try:
            self.qmp.connect(self.config.qmp_socket, alive=lambda: self.poll() is None)
        except QMPError:
            if self.poll() is None:
                self.kill()
                raise
            # QEMU exited at once (a bad option): its status and message say why.
        return self

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, or None if still running after ``timeout``."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def console_bytes(self) -> int:
        """How much the guest has written to its serial console so far."""
        try:
            return os.stat(self.config.console_log or "").st_size
        except OSError:
            return 0

    def disk_operations(self) -> int | None:
        """Reads + writes + flushes the guest has sent to the clone, per QMP; None if
        the monitor did not answer."""
        try:
            stats = self.qmp.execute("query-blockstats", timeout=2.0)
        except QMPError:
            return None
        for dev in stats or []:
            if dev.get("device") == DISK_ID:
                s = dev.get("stats", {})
                return int(s.get("rd_operations", 0)) + int(s.get("wr_operations", 0)) \
                    + int(s.get("flush_operations", 0))
        return None

    def run_state(self) -> str | None:
        """QEMU's run state (running, paused, internal-error, guest-panicked...)."""
        try:
            return str(self.qmp.execute("query-status", timeout=2.0).get("status"))
        except (QMPError, AttributeError):
            return None

    def terminate(self) -> None:
        """Ask QEMU to quit (SIGTERM: it stops the guest and exits)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Kill QEMU if it still runs, drop the monitor and the private directory."""
        self.kill()
        self.qmp.close()
        shutil.rmtree(self._dir, ignore_errors=True)
