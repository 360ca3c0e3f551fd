"""Watch a running VM until it exits: faults over QMP, and a boot watchdog.

A VM can stop without exiting. KVM's "internal error" (an emulation failure, as
a real SYSLINUX boot hits on some hosts where a probe passed) pauses the vCPU
and leaves QEMU running; so does a guest panic reported by a pvpanic device.
Both arrive as QMP events (``STOP`` with run state ``internal-error``, or
``GUEST_PANICKED``) and end the watch as a *fault*: QEMU is killed and the
caller decides (``liveclone boot --accel auto`` restarts once under TCG).

Progress is console output (the size of the console log) or disk I/O (QMP
``query-blockstats`` on the clone). Two rules use it:

* ``kvm_grace``: a VM under KVM that shows no progress at all in its first
  seconds has a KVM that hangs (on some hosts ``-accel kvm`` spins before the
  firmware reads a sector): a fault, like an internal error.
* ``watchdog``: no progress for that long is reported once, with what to try;
  the VM keeps running (a quiet, idle guest is not wrong).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from liveclone.vm.qemu import VM

POLL = 0.2  # seconds between checks for exit, events and signals
PROGRESS_EVERY = 1.0  # seconds between progress samples
FAULT_STATES = {"internal-error": "KVM internal error (emulation failure)",
                "guest-panicked": "the guest panicked"}


@dataclass
class Outcome:
    """How a watched VM ended: ``status`` if QEMU exited, else ``fault``."""

    status: int | None = None
    fault: str | None = None


def watch(vm: VM, stop: threading.Event, *, watchdog: float | None = None,
          kvm_grace: float | None = None,
          report: Callable[[str], None] = print) -> Outcome:
    """Wait for ``vm`` to exit; on ``stop`` (a signal) ask QEMU to quit once and keep
    waiting. Returns as soon as QEMU exits or a fault shows; after a fault QEMU
    has been killed."""
    asked = False
    started = last_sample = last_progress = time.monotonic()
    seen: tuple[int, int] | None = None
    progressed = stalled = False
    while True:
        status = vm.wait(POLL)
        if status is not None:
            return Outcome(status=status if status >= 0 else 128 - status)
        if stop.is_set() and not asked:
            vm.terminate()
            asked = True
        fault = _fault(vm)
        now = time.monotonic()
        if fault is None and now - last_sample >= PROGRESS_EVERY:
            last_sample = now
            ops = vm.disk_operations()
            sample = (vm.console_bytes(), ops if ops is not None else -1)
            if seen is not None and sample != seen:
                progressed, last_progress = True, now
                if stalled:
                    report("liveclone: the VM is making progress again")
                    stalled = False
            elif seen is None and (sample[0] > 0 or sample[1] > 0):
                progressed, last_progress = True, now
            seen = sample
            if kvm_grace is not None and not progressed and now - started >= kvm_grace:
                fault = (f"no console output and no disk I/O in {kvm_grace:.0f} s under "
                         "KVM: KVM hangs on this host")
            elif (watchdog and not stalled and not asked
                  and now - last_progress >= watchdog):
                stalled = True
                report(stall_message(vm, now - last_progress))
        if fault is not None and vm.wait(0) is None:
            vm.kill()
            return Outcome(fault=fault)


def _fault(vm: VM) -> str | None:
    """A fatal event, if one has arrived: STOP in a fault state, or GUEST_PANICKED."""
    while (event := vm.qmp.get_event()) is not None:
        name = event.get("event")
        if name == "GUEST_PANICKED":
            return FAULT_STATES["guest-panicked"]
        if name == "STOP":
            state = vm.run_state()
            if state in FAULT_STATES:
                return FAULT_STATES[state]
    return None


def stall_message(vm: VM, idle: float) -> str:
    """What a user sees when the VM shows no sign of life, and what to try."""
    cfg = vm.config
    tips = []
    if cfg.accel == "kvm":
        tips.append("--accel tcg (KVM may hang on this host)")
    if cfg.kernel:
        tips.append("console=ttyS0 in --append, or the kernel prints nowhere we see")
    else:
        tips.append("check the disk is bootable: a boot loader in sector 0 for --firmware "
                    "bios, an EFI system partition for --firmware uefi")
        tips.append("a boot loader that prints on the serial console (SYSLINUX: "
                    "SERIAL 0 115200; the kernel: console=ttyS0)")
    return (f"liveclone: the VM has made no progress for {idle:.0f} s: no console output, "
            f"no disk I/O (accel {cfg.accel}, firmware {cfg.firmware}). It keeps running; "
            f"Ctrl-C stops it. Try: " + "; ".join(tips) + ".")
