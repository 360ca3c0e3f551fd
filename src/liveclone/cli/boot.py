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
    rate_option,
    region_size_option,
    stop_on_signals,
)
from liveclone.errors import UsageError
from liveclone.session import CloneSession
from liveclone.units import format_size
from liveclone.vm import VM, VMConfig, choose_accel


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
              help="auto: KVM if a probe boot works under it, else TCG.")
@click.option("--mountpoint", type=click.Path(file_okay=False),
              help="With --via file: mount here (default: a temporary directory).")
@region_size_option
@rate_option
@copy_on_read_option
def command(source: str, clone_path: str, qemu_args: tuple[str, ...], via: str, memory: str,
            cpus: int, kernel: str | None, initrd: str | None, append: str | None,
            accel: str, mountpoint: str | None, region_size: int | None,
            rate: int | None, copy_on_read: bool | None) -> None:
    """Boot a VM from CLONE (created from SOURCE, or resumed) at once.

    The clone is the VM's first virtio disk before its data is copied; the copy
    goes on while the VM runs. The serial console is this terminal. When the VM
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
                               copy_on_read=copy_on_read)
        stack.callback(session.close)
        session.start()
        if via == "file":
            disk = stack.enter_context(_fuse_disk(session, mountpoint))
        else:
            disk = stack.enter_context(_nbd_disk(session))
        session.extra_status["vm"] = {"via": via, "accel": chosen, "disk": disk}
        click.echo(f"liveclone: booting {clone_path} via {via} ({disk}), accel {chosen}, "
                   f"{session.clone.regions_present}/{session.clone.regions_total} regions "
                   "copied", err=True)
        vm = VM(VMConfig(disk=disk, memory=memory, cpus=cpus, kernel=kernel, initrd=initrd,
                         append=append, accel=chosen, extra=list(qemu_args),
                         interactive=interactive)).start()
        stack.callback(vm.kill)
        status = _wait_vm(vm, stop)
    _report(session, source, clone_path, status)
    sys.exit(status)


def _wait_vm(vm: VM, stop: threading.Event) -> int:
    """Wait for QEMU; on SIGINT/SIGTERM ask it to quit, once, and keep waiting."""
    asked = False
    while True:
        status = vm.wait(0.2)
        if status is not None:
            return status if status >= 0 else 128 - status
        if stop.is_set() and not asked:
            vm.terminate()
            asked = True


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
