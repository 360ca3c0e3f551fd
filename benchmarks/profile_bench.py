"""Boot profiles: a VM booted from a slow HTTP source, with and without a profile.

The source is the test guest (tests/guest/build.py: a kernel, an initramfs, an ext4
disk whose files the guest checks with sha256sum, then it powers off) behind real
nginx sending at most 20 MiB/s per connection (``limit_rate``), reached through a
small asyncio TCP proxy that holds every request 20 ms before passing it on. The
disk is made here: ``--disk`` big, with ``--filler`` bytes of random data the guest
never reads laid out *before* its files (``0-filler.bin`` sorts first, and mkfs.ext4
-d fills in name order), as on a real image where the boot reads regions spread far
from the start; otherwise the copier's linear sweep fetches the files before the
guest asks and no order matters. ``--boot kernel``: QEMU loads the kernel and
initramfs from local files (``--kernel``), only the data files come from the disk.
``--boot disk`` (as tests/guest/bootdisk.py): the disk boots by itself, SeaBIOS ->
EXTLINUX -> the kernel and initramfs in its ``/boot``, so those come from the
source too, read by the firmware and the boot loader.

Each round, on fresh clones:

* ``record``: ``liveclone boot URL CLONE --save-profile P`` (the first boot; records);
* ``with profile``: ``liveclone boot URL CLONE --profile P`` (this round's profile);
* ``without``: ``liveclone boot URL CLONE`` (no profile, none recorded);
* ``copy+boot``: ``liveclone clone URL CLONE`` to completion, then QEMU on the file;
* ``local``: QEMU on a local copy of the disk (the floor: no source at all).

A first boot before the rounds records the profile the first round replays; in
each round all five run in a shuffled order (``with profile`` replays the latest
recording). Time = launch to the guest's ``LC-RESULT:
ok`` on the console. Ratios are taken within each round; the table gives the
median over the rounds and their min-max (the noise of this shared machine).

    python benchmarks/profile_bench.py [--rounds 5] [--disk 2G] [--filler 1G]
                                       [--boot kernel|disk]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_section  # noqa: E402
from tests.integration.servers import Nginx  # noqa: E402

from guest.build import (  # noqa: E402
    DATA_FILES,
    RESULT_OK,
    Guest,
    build_guest,
    file_content,
    verify_script,
)
from liveclone.core.profile import load  # noqa: E402
from liveclone.units import format_size, parse_size  # noqa: E402
from liveclone.vm import VMConfig, choose_accel  # noqa: E402

LIVECLONE = str(Path(sys.executable).parent / "liveclone")
SCRIPT = verify_script()
RATE = "20m"  # nginx limit_rate: per connection
LATENCY = 0.020  # added to every request by the proxy


# -- the source ---------------------------------------------------------------------------


def make_disk(path: Path, size: str, filler: int, boot: Guest | None) -> None:
    """An ext4 disk with the test guest's files after ``filler`` bytes of random data;
    ``boot``: with that guest's kernel, initramfs and EXTLINUX, booting by itself."""
    if path.exists():
        return
    tree = path.parent / (path.name + ".tree")
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "data").mkdir(parents=True)
    if boot is not None:
        (tree / "boot" / "extlinux").mkdir(parents=True)
        shutil.copy2(boot.kernel, tree / "boot" / "vmlinuz")
        shutil.copy2(boot.initrd, tree / "boot" / "initrd.gz")
        (tree / "boot" / "extlinux" / "extlinux.conf").write_text(
            "SERIAL 0 115200\nDEFAULT lc\nPROMPT 0\nTIMEOUT 0\nLABEL lc\n"
            "  LINUX /boot/vmlinuz\n  INITRD /boot/initrd.gz\n"
            f"  APPEND {boot.append(SCRIPT)}\n")
    with open(tree / "0-filler.bin", "wb") as f:
        for _ in range(0, filler, 64 << 20):
            f.write(os.urandom(min(64 << 20, filler - f.tell())))
    sums = {}
    for name in DATA_FILES:
        content = file_content(name)
        (tree / "data" / name).write_bytes(content)
        sums[name] = hashlib.sha256(content).hexdigest()
    (tree / "data" / "SHA256SUMS").write_text("".join(f"{h}  {n}\n" for n, h in sums.items()))
    tmp = path.with_suffix(".tmp")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "lctest", "-d", str(tree),
                    str(tmp), size], check=True)
    shutil.rmtree(tree)
    if boot is not None:  # the boot sector and ldlinux.sys, on the mounted filesystem
        mnt = path.parent / (path.name + ".mnt")
        mnt.mkdir(exist_ok=True)
        subprocess.run(["mount", "-o", "loop", str(tmp), str(mnt)], check=True)
        try:
            subprocess.run(["extlinux", "--install", str(mnt / "boot" / "extlinux")],
                           check=True, capture_output=True)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
            mnt.rmdir()
    tmp.rename(path)


class DelayProxy:
    """A loopback TCP proxy that holds each chunk the client sends (an HTTP request)
    ``delay`` seconds before passing it on: latency per request, not per byte."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port, self.delay = target_port, delay
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> DelayProxy:
        self._thread.start()
        self._ready.wait()
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       delay: float) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(1 << 16):
                    if delay:
                        await asyncio.sleep(delay)
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        await asyncio.gather(pump(reader, up_writer, self.delay),
                             pump(up_reader, writer, 0.0))


@contextlib.contextmanager
def slow_source(disk: Path, work: Path) -> Iterator[str]:
    """The disk's URL behind nginx (limit_rate) and the delaying proxy."""
    root = work / "www"
    root.mkdir(exist_ok=True)
    served = root / "disk.img"
    served.unlink(missing_ok=True)
    os.link(disk, served)
    nginx = Nginx(root, work / "nginx", limit_rate=RATE).start()
    proxy = DelayProxy(nginx.port, LATENCY).start()
    try:
        yield f"http://127.0.0.1:{proxy.port}/disk.img"
    finally:
        proxy.stop()
        nginx.stop()


# -- the runs -----------------------------------------------------------------------------


def clean(path: Path) -> None:
    for q in [path, *path.parent.glob(path.name + ".*")]:
        q.unlink(missing_ok=True)


def until_ok(cmd: list[str]) -> float:
    """Run ``cmd`` (a VM on the console), the seconds until the guest's LC-RESULT: ok;
    then let it power off."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    elapsed = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if RESULT_OK in line and elapsed is None:
            elapsed = time.perf_counter() - t0
    _, err = proc.communicate()
    if proc.returncode != 0 or elapsed is None:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{''.join(lines)}\n{err}")
    return elapsed


def boot_cmd(guest: Guest | None, url: str, clone: Path, *args: str) -> list[str]:
    """``guest``: boot its kernel directly; None: the disk boots by itself."""
    kernel = [] if guest is None else ["--kernel", str(guest.kernel), "--initrd",
                                       str(guest.initrd), "--append", guest.append(SCRIPT)]
    return [LIVECLONE, "boot", url, str(clone), "--via", "nbd", "--memory", "256M",
            *kernel, *args]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--disk", default="2G")
    parser.add_argument("--filler", default="1G")
    parser.add_argument("--boot", choices=["kernel", "disk"], default="kernel",
                        help="kernel: QEMU loads the guest's kernel from files; disk: the "
                             "disk boots by itself (SeaBIOS, EXTLINUX)")
    parser.add_argument("--dir", type=Path, default=REPO / "benchmarks" / "work" / "profile")
    parser.add_argument("--no-write", action="store_true", help="do not touch results.md")
    args = parser.parse_args()
    work: Path = args.dir
    work.mkdir(parents=True, exist_ok=True)
    filler = parse_size(args.filler)
    guest = build_guest()  # its kernel and initramfs; the disk is made here
    from_disk = args.boot == "disk"
    disk = work / f"disk-{args.disk}-{args.filler}{'-boot' if from_disk else ''}.img"
    make_disk(disk, args.disk, filler, guest if from_disk else None)
    accel = choose_accel("auto", None if from_disk else str(guest.kernel))
    kernel_guest = None if from_disk else guest
    clone, prof = work / "clone.img", work / "boot.lcprofile"
    names = ["record", "with profile", "without", "copy+boot", "local"]
    times: dict[str, list[float]] = {n: [] for n in names}
    profile_info = {}
    load_seen = [os.getloadavg()[0]]
    with slow_source(disk, work) as url:
        def record() -> float:
            clean(clone)
            prof.unlink(missing_ok=True)
            return until_ok(boot_cmd(kernel_guest, url, clone, "--save-profile", str(prof)))

        def with_profile() -> float:
            clean(clone)
            return until_ok(boot_cmd(kernel_guest, url, clone, "--profile", str(prof),
                                     "--profile-time", "0"))

        def without() -> float:
            clean(clone)
            return until_ok(boot_cmd(kernel_guest, url, clone, "--profile-time", "0"))

        def copy_then_boot() -> float:
            clean(clone)
            t0 = time.perf_counter()
            subprocess.run([LIVECLONE, "clone", url, str(clone), "--no-progress"],
                           check=True, capture_output=True)
            copy = time.perf_counter() - t0
            return copy + until_ok(qemu_cmd(clone))

        def local() -> float:
            local_disk = work / "local.img"
            subprocess.run(["cp", "--sparse=always", str(disk), str(local_disk)], check=True)
            try:
                return until_ok(qemu_cmd(local_disk))
            finally:
                local_disk.unlink()

        def qemu_cmd(image: Path) -> list[str]:
            if from_disk:
                return VMConfig(disk=str(image), memory="256M", accel=accel).command()
            return VMConfig(disk=str(image), memory="256M", kernel=str(guest.kernel),
                            initrd=str(guest.initrd), append=guest.append(SCRIPT),
                            accel=accel).command()

        variants = {"record": record, "with profile": with_profile, "without": without,
                    "copy+boot": copy_then_boot, "local": local}
        print(f"setup: record: {record():.2f} s", flush=True)
        for i in range(args.rounds):
            order = list(variants)
            random.shuffle(order)
            for name in order:
                times[name].append(variants[name]())
                load_seen.append(os.getloadavg()[0])
                print(f"round {i + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
        p = load(str(prof))
        profile_info = {"runs": len(p.runs), "bytes": sum(n for _, n in p.runs),
                        "file_bytes": prof.stat().st_size}
    clean(clone)
    ratios = {
        "without / with profile": [w / p for w, p in zip(times["without"],
                                                          times["with profile"], strict=True)],
        "copy+boot / with profile": [c / p for c, p in zip(times["copy+boot"],
                                                           times["with profile"], strict=True)],
        "record / without": [r / w for r, w in zip(times["record"], times["without"],
                                                   strict=True)],
        "with profile / local": [p / c for p, c in zip(times["with profile"], times["local"],
                                                       strict=True)],
    }
    print(json.dumps({"times": times, "ratios": ratios, "profile": profile_info}, indent=1))
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        f"`python benchmarks/profile_bench.py --rounds {args.rounds} --disk {args.disk} "
        f"--filler {args.filler} --boot {args.boot}` — {time.strftime('%Y-%m-%d')}, "
        f"accel {accel}, on this "
        "2-vCPU machine, shared with other jobs (1-minute load average during the runs "
        f"{min(load_seen):.0f}-{max(load_seen):.0f}). Source: the test guest's files on a "
        f"{args.disk} ext4 disk after {format_size(filler)} of filler data the guest never "
        f"reads, served by nginx with `limit_rate {RATE}` (per connection) through a proxy "
        f"that holds each request {LATENCY * 1000:.0f} ms. Time: launch of `liveclone boot` "
        "(or of the copy) to the guest's `LC-RESULT: ok` (it has mounted the disk and "
        "checked the sha256 of ~18 MiB of files; with `--boot disk` the firmware and "
        "EXTLINUX have read the kernel and initramfs from it first). Fresh clone each "
        "run; all five in a shuffled order each round (a first recording before the "
        "rounds). The profile: "
        f"{profile_info.get('runs')} runs, {format_size(profile_info.get('bytes', 0))} of "
        f"regions, a {profile_info.get('file_bytes')}-byte file.",
        "",
        "| run | median | min-max |",
        "|---|---|---|",
    ]
    for name in names:
        lines.append(f"| {name} | {med[name]:.2f} s | {min(times[name]):.2f}-"
                     f"{max(times[name]):.2f} s |")
    lines += ["", "| ratio (within each round) | median | min-max |", "|---|---|---|"]
    for name, values in ratios.items():
        lines.append(f"| {name} | {statistics.median(values):.2f}× | {min(values):.2f}-"
                     f"{max(values):.2f}× |")
    text = "\n".join(lines)
    if not args.no_write:
        write_section(f"Boot profiles (--boot {args.boot})", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
