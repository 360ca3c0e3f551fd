"""``liveclone boot``: start a VM on a clone before its copy ends."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import click

from liveclone.cli.options import (
    copy_on_read_option,
    profile_options,
    rate_option,
    region_size_option,
    stop_on_signals,
)
from liveclone.core.profile import ProfileOptions
from liveclone.errors import UsageError
from liveclone.session import CloneSession
from liveclone.units import format_size
from liveclone.vm import VM, VMConfig, choose_accel, record_kvm
from liveclone.vm.watch import Outcome, watch

# Under --accel auto, a KVM VM that shows no console output and no disk I/O in this
# long is judged hung and restarted under TCG (see vm/watch.py).
KVM_GRACE = 10.0


@click.command("boot", context_settings={"ignore_unknown_options": False})
@click.argument("source")
@click.argument("clone_path", metavar="CLONE")
@click.argument("qemu_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- QEMU ARGS...]")
@click.option("--via", type=click.Choice(["auto", "nbd", "file"]), default="auto",
              show_default=True,
              help="How QEMU reaches the clone: an NBD export on a unix socket, or a "
                   "file on a FUSE mount. auto: nbd when available, else file.")
@click.option("--memory", "-m", default="512M", show_default=True, help="Guest memory.")
@click.option("--cpus", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False),
              help="Boot this kernel directly instead of the disk's boot loader.")
@click.option("--initrd", type=click.Path(exists=True, dir_okay=False))
@click.option("--append", help="Kernel command line (with --kernel).")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto",
              show_default=True,
              help="auto: KVM if a probe boot works under it, else TCG; a VM that "
                   "fails under KVM is restarted once under TCG.")
@click.option("--firmware", type=click.Choice(["bios", "uefi"]), default="bios",
              show_default=True,
              help="Without --kernel the VM boots the disk's own boot loader: bios "
                   "(SeaBIOS) or uefi (OVMF, Debian package ovmf).")
@click.option("--watchdog", type=click.FloatRange(min=0), default=60.0, show_default=True,
              metavar="SECONDS",
              help="Report when the VM shows no progress (no console output, no disk "
                   "I/O) for this long, with what to try. 0: never.")
@click.option("--mountpoint", type=click.Path(file_okay=False),
              help="With --via file: mount here (default: a temporary directory).")
@region_size_option
@rate_option
@copy_on_read_option
@profile_options(record=True)
def command(source: str, clone_path: str, qemu_args: tuple[str, ...], via: str, memory: str,
            cpus: int, kernel: str | None, initrd: str | None, append: str | None,
            accel: str, firmware: str, watchdog: float, mountpoint: str | None,
            region_size: int | None, rate: int | None, copy_on_read: bool | None,
            profile: ProfileOptions) -> None:
    """Boot a VM from CLONE (created from SOURCE, or resumed) at once.

    The clone is the VM's first virtio disk before its data is copied; the copy
    goes on while the VM runs. Without --kernel the VM boots the disk's own boot
    loader. The serial console is this terminal. When the VM
    exits, the copy stops and the map is committed; `liveclone clone SOURCE CLONE`
    finishes it. Exits with QEMU's status.
    """
    if (initrd or append) and not kernel:
        raise UsageError("--initrd and --append need --kernel")
    if via == "auto":
        via = "nbd" if nbd_available() else "file"
    chosen = choose_accel(accel, kernel)
    interactive = sys.stdin.isatty()
    with stop_on_signals() as stop, ExitStack() as stack:
        session = CloneSession(source, clone_path, region_size, rate,
                               copy_on_read=copy_on_read, profile=profile)
        stack.callback(session.close)
        session.start()
        if via == "file":
            disk = stack.enter_context(_fuse_disk(session, mountpoint))
        else:
            disk = stack.enter_context(_nbd_disk(session))
        boot_from = "kernel" if kernel else f"the disk's boot loader ({firmware})"
        click.echo(f"liveclone: booting {clone_path} via {via} ({disk}), accel {chosen}, "
                   f"from {boot_from}, {session.clone.regions_present}/"
                   f"{session.clone.regions_total} regions copied", err=True)
        while True:
            session.extra_status["vm"] = {"via": via, "accel": chosen, "disk": disk,
                                          "firmware": firmware}
            config = VMConfig(disk=disk, memory=memory, cpus=cpus, kernel=kernel,
                              initrd=initrd, append=append, accel=chosen, firmware=firmware,
                              extra=list(qemu_args), interactive=interactive)
            vm = VM(config)
            try:
                vm.start()
                outcome = _watch(vm, stop, watchdog,
                                 KVM_GRACE if accel == "auto" and chosen == "kvm" else None)
            finally:
                vm.close()
            if outcome.fault is None:
                break
            if accel == "auto" and chosen == "kvm" and not stop.is_set():
                record_kvm(kernel, False)  # the cached "KVM works" proved wrong
                click.echo(f"liveclone: the VM failed under KVM: {outcome.fault}. "
                           "Restarting it under TCG (remembered for this host; "
                           "--accel tcg skips KVM)", err=True)
                chosen = "tcg"
                continue
            click.echo(f"liveclone: error: the VM stopped: {outcome.fault} (accel {chosen})"
                       + ("; try --accel tcg" if chosen == "kvm" else "")
                       + ". QEMU was stopped.", err=True)
            outcome.status = 1
            break
        assert outcome.status is not None
        status = outcome.status
    _report(session, source, clone_path, status)
    sys.exit(status)


def _watch(vm: VM, stop: threading.Event, watchdog: float, kvm_grace: float | None
           ) -> Outcome:
    """Watch the VM (faults, boot watchdog); messages go to stderr."""
    return watch(vm, stop, watchdog=watchdog or None, kvm_grace=kvm_grace,
                 report=lambda text: click.echo(text, err=True))


def _report(session: CloneSession, source: str, clone_path: str, status: int) -> None:
    clone = session.clone
    if clone.complete:
        click.echo(f"liveclone: VM exited ({status}); the copy is complete: {clone.path} "
                   "stands alone.", err=True)
        return
    pct = 100.0 * clone.regions_present / max(clone.regions_total, 1)
    copied = min(clone.regions_present * clone.region_size, clone.size)
    click.echo(
        f"liveclone: VM exited ({status}) before the copy ended: {clone.regions_present}/"
        f"{clone.regions_total} regions ({pct:.1f}%, {format_size(copied)} of "
        f"{format_size(clone.size)}). The map is committed; run `liveclone clone {source} "
        f"{clone_path}` to finish it.", err=True)


@contextmanager
def _fuse_disk(session: CloneSession, mountpoint: str | None) -> Iterator[str]:
    from liveclone.fuse import start_mount

    made = mountpoint is None
    mnt = mountpoint or tempfile.mkdtemp(prefix="liveclone-boot-")
    try:
        handle = start_mount(session.clone, mnt)
        try:
            yield handle.path
        finally:
            handle.stop()
    finally:
        if made:
            shutil.rmtree(mnt, ignore_errors=True)


def nbd_available() -> bool:
    """True if the in-process NBD server (``liveclone.nbd.server.ServerThread``) exists."""
    try:
        from liveclone.nbd.server import ServerThread  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def _nbd_disk(session: CloneSession) -> Iterator[str]:
    """Export the clone on a unix socket in a private directory; yield its NBD URI."""
    if not nbd_available():
        raise UsageError("--via nbd is not available in this build; use --via file")
    from liveclone.nbd.server import ServerThread

    tmp = tempfile.mkdtemp(prefix="liveclone-boot-")
    try:
        server = ServerThread(session.clone, export_name="clone")
        try:
            uris = server.start(unix_path=os.path.join(tmp, "nbd.sock"))
            yield uris[0]
        finally:
            server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
