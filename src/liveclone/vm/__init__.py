"""Launching QEMU with a clone attached before its copy ends."""

from liveclone.vm.qemu import VM, VMConfig, choose_accel, probe_kvm, record_kvm

__all__ = ["VM", "VMConfig", "choose_accel", "probe_kvm", "record_kvm"]
