"""VM boot-to-poweroff on a clone still copying, vs a local copy, vs copy-then-boot.

For the test guest (tests/guest/build.py: 96 MiB ext4 disk, ~18 MiB of files),
a padded sparse variant (the same files in an 8 GiB ext4 image) and the same
8 GiB image holding 2 GiB more random data that the guest never reads, time:

* ``live nbd`` / ``live file``: ``liveclone boot SRC CLONE --via nbd|file`` on a
  fresh clone, the copier running at full speed beside the VM;
* ``live nbd @4M``: the same with ``--rate 4M``, so nearly every guest read goes
  to the source (the copy is far from done when the guest powers off);
* ``local``: QEMU on a fully copied local raw file (the lower bound);
* ``copy+boot``: ``liveclone clone SRC CLONE`` to completion, then QEMU on it.

Each run starts from a cold page cache; variants are interleaved; medians are
reported. The guest checks every file's sha256, writes a file, syncs and powers
off. This is not a test: it asserts nothing but the guest's success.

    python benchmarks/boot_bench.py [--runs 3] [--sizes 96M,8G,8G:2G] [--dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from clone_bench import drop_caches  # noqa: E402
from results_file import write_section  # noqa: E402

from guest.build import RESULT_OK, Guest, build_guest, verify_script, write_script  # noqa: E402
from liveclone.units import format_size, parse_size  # noqa: E402
from liveclone.vm import VMConfig, choose_accel  # noqa: E402

LIVECLONE = str(Path(sys.executable).parent / "liveclone")
SCRIPT = verify_script() + write_script({"bench/out.txt": "benchmark run"})


def clean(path: Path) -> None:
    """Remove an image and its clone map and status files."""
    for q in [path, *path.parent.glob(path.name + ".*")]:
        q.unlink(missing_ok=True)


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0 or RESULT_OK not in r.stdout:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return elapsed


def qemu_cmd(guest: Guest, disk: Path, accel: str) -> list[str]:
    return VMConfig(disk=str(disk), memory="256M", kernel=str(guest.kernel),
                    initrd=str(guest.initrd), append=guest.append(SCRIPT),
                    accel=accel).command()


def boot_cmd(guest: Guest, src: Path, clone: Path, *args: str) -> list[str]:
    return [LIVECLONE, "boot", str(src), str(clone), "--memory", "256M",
            "--kernel", str(guest.kernel), "--initrd", str(guest.initrd),
            "--append", guest.append(SCRIPT), *args]


def parse_disk(spec: str) -> tuple[str, int]:
    """``8G`` or ``8G:2G`` (disk size : bytes of filler data) -> (size, filler)."""
    size, _, filler = spec.partition(":")
    return size, parse_size(filler) if filler else 0


def describe(spec: str) -> str:
    size, filler = parse_disk(spec)
    if filler:
        return f"{size} ext4 + {format_size(filler)} filler data"
    return f"{size} ext4" + (" (sparse)" if parse_size(size) > 1 << 30 else "")


def run_size(spec: str, runs: int, work: Path) -> dict[str, list[float]]:
    size, filler = parse_disk(spec)
    guest = build_guest(size, filler)
    size = spec.replace(":", "+")
    accel = choose_accel("auto", str(guest.kernel))
    src, clone, local = work / f"src-{size}.img", work / f"clone-{size}.img", \
        work / f"local-{size}.img"
    # Sources are private sparse copies, so a run never touches the build cache.
    subprocess.run(["cp", "--sparse=always", str(guest.disk), str(src)], check=True)

    def live(*args: str) -> Callable[[], float]:
        def go() -> float:
            clean(clone)
            return timed(boot_cmd(guest, src, clone, *args))
        return go

    def local_boot() -> float:
        clean(local)
        subprocess.run(["cp", "--sparse=always", str(src), str(local)], check=True)
        drop_caches()
        return timed(qemu_cmd(guest, local, accel))

    def copy_then_boot() -> float:
        clean(clone)
        t0 = time.perf_counter()
        subprocess.run([LIVECLONE, "clone", str(src), str(clone), "--no-progress"],
                       check=True, capture_output=True)
        copy = time.perf_counter() - t0
        return copy + timed(qemu_cmd(guest, clone, accel))

    variants: dict[str, Callable[[], float]] = {
        "live nbd": live("--via", "nbd"),
        "live file": live("--via", "file"),
        "live nbd @4M": live("--via", "nbd", "--rate", "4M"),
        "local": local_boot,
        "copy+boot": copy_then_boot,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(runs):
        for name, fn in variants.items():
            if name != "local":
                drop_caches()
            times[name].append(fn())
            print(f"{size} run {i + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
    clean(clone)
    clean(local)
    src.unlink()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="96M,8G,8G:2G",
                        help="disks: SIZE or SIZE:FILLER (random data the guest never reads)")
    parser.add_argument("--dir", type=Path, default=REPO / "benchmarks" / "work")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    results = {size: run_size(size, args.runs, args.dir) for size in args.sizes.split(",")}
    accel = choose_accel("auto", str(build_guest(*parse_disk(args.sizes.split(",")[0])).kernel))
    lines = [
        f"`python benchmarks/boot_bench.py` — median of {args.runs} interleaved cold-cache "
        f"runs, {time.strftime('%Y-%m-%d')}, accel {accel} (KVM unusable here), on this "
        "2-vCPU machine (shared: expect ±50% noise). Time = launch to guest poweroff; the "
        "guest checks the sha256 of ~18 MiB of files, writes one, syncs and powers off. "
        "`live`: `liveclone boot` on a fresh clone (includes creating it and starting the "
        "export), copier at full speed, or limited to 4 MiB/s so nearly every read goes to "
        "the source. `local`: QEMU on a finished local raw copy. `copy+boot`: "
        "`liveclone clone` to completion, then QEMU. Ratio = time / local.",
        "",
        "| disk | live nbd | live file | live nbd @4M | local | copy+boot | "
        "live nbd / local | copy+boot / live nbd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, times in results.items():
        med = {k: statistics.median(v) for k, v in times.items()}
        name = f"test guest, {describe(size)}"
        lines.append(
            f"| {name} | {med['live nbd']:.2f} s | {med['live file']:.2f} s | "
            f"{med['live nbd @4M']:.2f} s | {med['local']:.2f} s | {med['copy+boot']:.2f} s | "
            f"{med['live nbd'] / med['local']:.2f}× | "
            f"{med['copy+boot'] / med['live nbd']:.2f}× |")
    write_section("VM boot", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
