#!/usr/bin/env bash
# Install the Debian packages liveclone's demo and tests use, if any is missing.
# Safe to run twice: it does nothing when everything is there.
set -euo pipefail
need=()
check() { command -v "$1" >/dev/null 2>&1 || need+=("$2"); }
check qemu-img qemu-utils
check qemu-system-x86_64 qemu-system-x86
check nbdkit nbdkit
check nbdinfo libnbd-bin
check fio fio
check fusermount3 fuse3
check pkg-config pkg-config
check mkfs.ext4 e2fsprogs
check busybox busybox-static
check nginx nginx-light
check cpio cpio
check curl curl
check openssl openssl
check ps procps
check mkfs.xfs xfsprogs
check losetup mount
check strace strace
# The boot-loader, libvirt and libguestfs tests (tests/integration/test_boot_loader.py,
# test_libvirt.py, test_guestfish.py).
check extlinux extlinux
[ -e /usr/share/OVMF ] || need+=(ovmf)
check libvirtd libvirt-daemon
check virsh libvirt-clients
check guestfish libguestfs-tools
[ -e /usr/include/fuse3/fuse.h ] || need+=(libfuse3-dev)
# libfuse2 beside libfuse3, as grub-common and libguestfs0 bring it to most hosts:
# the tests prove that liveclone's FUSE layer still binds libfuse3.
# (Debian 12's libfuse2; from Debian 13 on it is libfuse2t64, chosen after the update.)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
installed libfuse2 || installed libfuse2t64 || need+=(libfuse2)
# The NBD read lane and the copier's helpers are C, compiled at install (cffi): a
# compiler and Python's headers.
check gcc gcc
python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    2>/dev/null || need+=(python3-dev)
# The packaging test installs the wheel into a fresh venv (ensurepip).
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${need[*]}; install them as root (apt-get install ${need[*]})" >&2
  exit 1
fi
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
if apt-cache show libfuse2t64 >/dev/null 2>&1; then need=("${need[@]/#libfuse2/libfuse2t64}"); fi
apt-get install -y -q --no-install-recommends "${need[@]}"
