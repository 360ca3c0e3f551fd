"""make demo: clone a generated disk image and use it while the copy is still running.

1. Build a sample disk image (ext4 with files of known checksums) and a tiny test
   guest from Debian's packages (cached in .cache/guest).
2. Serve a clone over NBD with `liveclone serve`, slowed with --rate so the copy
   visibly runs, and read files from the clone's filesystem with real clients
   (nbdinfo, nbdfuse + debugfs) before the copy has finished.
3. Boot a VM from another clone with `liveclone boot` while it is being copied: the
   guest checks its files and writes a new one.
4. Finish that copy with `liveclone clone`, then check the standalone clone with
   e2fsck and read the guest's new file on the host.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.guest.build import build_guest, verify_script, write_script  # noqa: E402

BIN = Path(sys.executable).parent
LIVECLONE = str(BIN / "liveclone")
OUT = REPO / "demo-out"
RATE = "3M"


def step(text: str) -> None:
    print(f"\n\033[1;36m==> {text}\033[0m", flush=True)


def show(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print("  " + out.replace("\n", "\n  "), flush=True)
    if r.returncode != 0:
        raise SystemExit(f"demo: {cmd[0]} failed with {r.returncode}")
    return r


def status(clone: Path) -> dict[str, object]:
    r = subprocess.run([LIVECLONE, "status", "--json", str(clone)], capture_output=True,
                       text=True, check=True)
    return dict(json.loads(r.stdout))


def progress_line(clone: Path) -> str:
    s = status(clone)
    return (f"status: phase={s['phase']} regions {s['regions_present']}/{s['regions_total']} "
            f"guest reads={s.get('guest', {}).get('reads')}")  # type: ignore[union-attr]


def clean(clone: Path) -> None:
    for suffix in ("", ".lcmap", ".lcjournal", ".lcdigest", ".lcstatus", ".lcprofile",
                   ".sock"):
        Path(str(clone) + suffix).unlink(missing_ok=True)


def debugfs(image: str, request: str) -> bytes:
    return subprocess.run(["debugfs", "-R", request, image], capture_output=True,
                          check=True).stdout


def nbd_part(source: Path, files: dict[str, str]) -> None:
    clone = OUT / "nbd-clone.img"
    clean(clone)
    step(f"Serve a clone over NBD at once (copy limited to {RATE}/s so you can watch)")
    server = subprocess.Popen([LIVECLONE, "serve", str(source), str(clone), "--rate", RATE],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    mnt = Path(tempfile.mkdtemp(prefix="liveclone-demo-"))
    fuse: subprocess.Popen[bytes] | None = None
    try:
        assert server.stdout is not None
        uri = server.stdout.readline().strip()
        print(f"liveclone serve printed: {uri}")
        print(progress_line(clone))
        show(["nbdinfo", "--size", uri])
        step("Read the clone's filesystem through NBD while it copies (nbdfuse + debugfs)")
        fuse = subprocess.Popen(["nbdfuse", "-r", str(mnt / "disk"), uri])
        for _ in range(100):
            if (mnt / "disk").exists():
                break
            time.sleep(0.1)
        listing = debugfs(str(mnt / "disk"), "ls -l /data").decode(errors="replace")
        print("  " + listing.strip().replace("\n", "\n  "))
        for name, digest in files.items():
            data = debugfs(str(mnt / "disk"), f"cat {name}")
            ok = hashlib.sha256(data).hexdigest() == digest
            print(f"  {name}: {len(data)} bytes, sha256 {'OK' if ok else 'MISMATCH'}")
            if not ok:
                raise SystemExit("demo: wrong data read through NBD")
        print(progress_line(clone) + "   <- still copying, yet every file read correctly")
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        fuse.wait(10)
        fuse = None
        step("Wait for the background copy to finish; the server keeps serving")
        while status(clone)["phase"] != "complete":
            print(progress_line(clone), flush=True)
            time.sleep(1)
        print(progress_line(clone))
        show(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), uri])
    finally:
        if fuse is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
            fuse.kill()
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        shutil.rmtree(mnt, ignore_errors=True)


def boot_part(guest_disk: Path, kernel: Path, initrd: Path, append_for: object) -> None:
    clone = OUT / "vm-clone.img"
    clean(clone)
    step(f"Boot a VM on a fresh clone before any data is copied (copy at {RATE}/s)")
    script = verify_script() + write_script({"hello/from-guest.txt": "written while cloning"})
    cmd = [LIVECLONE, "boot", str(guest_disk), str(clone), "--rate", RATE, "--memory", "256M",
           "--kernel", str(kernel), "--initrd", str(initrd),
           "--append", append_for(script)]  # type: ignore[operator]
    print("$ liveclone boot SOURCE CLONE --rate ... --kernel ... --initrd ... --append ...")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    for line in (r.stdout + r.stderr).splitlines():
        if ": OK" in line or "LC-RESULT" in line or line.startswith("liveclone"):
            print("  guest| " + line if not line.startswith("liveclone") else "  " + line)
    if "LC-RESULT: ok" not in r.stdout + r.stderr:
        raise SystemExit("demo: the guest did not report success")
    print(progress_line(clone) + "   <- the VM ran and exited before the copy ended")
    step("Finish the copy with `liveclone clone` (it resumes where the map says)")
    show([LIVECLONE, "clone", str(guest_disk), str(clone)])
    step("The clone is now a standalone file: the source's files plus the guest's write")
    show(["e2fsck", "-fn", str(clone)])
    print("  /hello/from-guest.txt: " + debugfs(str(clone), "cat /hello/from-guest.txt").decode())
    show([LIVECLONE, "status", str(clone)])
    step("Check every copied region against the digest taken while copying, and the source")
    show([LIVECLONE, "verify", str(clone), "--against-source"])


def main() -> None:
    OUT.mkdir(exist_ok=True)
    step("Build a sample disk image and a test guest (cached after the first run)")
    guest = build_guest()
    print(f"  disk image: {guest.disk} ({guest.disk.stat().st_size >> 20} MiB, ext4)")
    print(f"  kernel: {guest.kernel.name}, initrd: {guest.initrd.name}")
    files = {"/" + k.lstrip("/"): v for k, v in guest.files.items()}
    nbd_part(guest.disk, files)
    boot_part(guest.disk, guest.kernel, guest.initrd, guest.append)
    step("Done. Outputs are in demo-out/.")


if __name__ == "__main__":
    main()
