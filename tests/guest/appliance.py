"""What libguestfs needs to build its appliance on a host without a kernel in /boot.

libguestfs boots a small appliance VM that supermin builds from the host's
packages and a kernel. A container has no kernel in ``/boot``, so the test
guest's kernel package (``linux-image-*-cloud-amd64``) is unpacked whole here,
with its ``modules.dep`` made by ``depmod`` (``dpkg -x`` does not run the
package's postinst), and handed to supermin through ``SUPERMIN_KERNEL`` and
``SUPERMIN_MODULES``. Cached in ``.cache/guest/kernel-VERSION/``; the appliance
itself is cached by libguestfs in ``.cache/guest/libguestfs/``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from guest.build import CACHE_DIR, _kernel_package

APPLIANCE_CACHE = CACHE_DIR / "libguestfs"


def kernel_tree(cache_dir: Path = CACHE_DIR) -> tuple[Path, Path]:
    """(vmlinuz, modules directory) of the unpacked guest kernel package."""
    pkg, version = _kernel_package()
    out = cache_dir / f"kernel-{pkg}-{version}"
    if not (out / "done").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix="build-kernel-") as tmp:
            work = Path(tmp)
            subprocess.run(["apt-get", "download", pkg], cwd=work, check=True,
                           capture_output=True)
            deb = next(work.glob(f"{pkg}_*.deb"))
            root = work / "root"
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
            release = next((root / "lib" / "modules").iterdir()).name
            subprocess.run(["depmod", "-b", str(root), release], check=True)
            (root / "done").write_text(release)
            try:
                root.rename(out)
            except OSError:
                if not (out / "done").exists():
                    raise
    release = (out / "done").read_text()
    return out / "boot" / f"vmlinuz-{release}", out / "lib" / "modules" / release


def libguestfs_env() -> dict[str, str]:
    """The environment for guestfish and virt-* here: the direct backend, TCG, the
    guest kernel for the appliance, a cache that outlives the test run."""
    vmlinuz, modules = kernel_tree()
    # supermin copies the modules into the appliance's /lib/modules and copies that
    # directory's attributes from the host's, which a container may lack.
    os.makedirs("/lib/modules", exist_ok=True)
    APPLIANCE_CACHE.mkdir(parents=True, exist_ok=True)
    return dict(os.environ,
                SUPERMIN_KERNEL=str(vmlinuz), SUPERMIN_MODULES=str(modules),
                LIBGUESTFS_BACKEND="direct",
                # The appliance asks for KVM first when /dev/kvm exists, and KVM hangs
                # on these hosts.
                LIBGUESTFS_BACKEND_SETTINGS="force_tcg",
                LIBGUESTFS_CACHEDIR=str(APPLIANCE_CACHE))
