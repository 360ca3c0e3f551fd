"""liveclone clone vs cp --sparse=always, interleaved in one run.

Two sources: a file of random data (4 GiB by default) and a sparse file (16 GiB
holding 1 GiB of data). Every run starts with a cold page cache. liveclone makes
its clone durable (fdatasync before committing the map), so cp is timed twice:
alone, and followed by ``sync`` for the same durability. ``qemu-img convert`` is
a second peer; like cp it leaves its writes in the page cache (strace shows no
fsync or fdatasync). The disk's own floor for a durable copy is measured too: fio
reading the data and writing as much with O_DIRECT, both at once, as two
independent streams in C. The order of the commands is shuffled in each run, so
one command's after-effects (writeback, online discard of the deleted copy) do
not always land on the same next one. The medians and ratios go to
benchmarks/results.md. This is not a test: it asserts nothing.

    python benchmarks/clone_bench.py [--random-size 4G] [--sparse-size 16G]
                                     [--sparse-data 1G] [--runs 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_section  # noqa: E402

from liveclone.units import format_size, parse_size  # noqa: E402

LIVECLONE = str(Path(sys.executable).parent / "liveclone")


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("warning: cannot drop caches (not root?): runs are warm", file=sys.stderr)


def make_random(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n


def make_sparse(path: Path, size: int, data: int) -> None:
    """``data`` bytes of random data in 16 extents spread over a ``size`` sparse file."""
    if path.exists() and path.stat().st_size == size:
        return
    with open(path, "wb") as f:
        f.truncate(size)
        pieces = 16
        for i in range(pieces):
            f.seek(i * (size // pieces))
            f.write(os.urandom(data // pieces))


def timed(cmd: list[str] | str, shell: bool = False) -> float:
    drop_caches()
    t0 = time.perf_counter()
    subprocess.run(cmd, shell=shell, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def clean(target: Path) -> None:
    for suffix in ("", ".lcmap", ".lcjournal", ".lcstatus"):
        Path(str(target) + suffix).unlink(missing_ok=True)


def fio_floor(data_file: Path, out: Path, size: int) -> list[str]:
    """fio reading ``size`` bytes of data and writing as many, at once, direct I/O."""
    common = ["--direct=1", "--ioengine=libaio", "--bs=32M", "--iodepth=2",
              f"--size={size}"]
    return ["fio", "--output=/dev/null", *common, "--name=read", f"--filename={data_file}",
            "--rw=read", "--name=write", f"--filename={out}", "--rw=write", "--fallocate=none"]


def bench(src: Path, data_file: Path, data: int, work: Path, runs: int) -> dict[str, float]:
    out = work / "out.img"
    commands: dict[str, tuple[list[str] | str, bool]] = {
        "floor": (fio_floor(data_file, out, data), False),
        "cp": (["cp", "--sparse=always", str(src), str(out)], False),
        "cp+sync": (f"cp --sparse=always '{src}' '{out}' && sync", True),
        "qemu-img": (["qemu-img", "convert", "-f", "raw", "-O", "raw", str(src), str(out)],
                     False),
        "liveclone": ([LIVECLONE, "clone", str(src), str(out)], False),
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    order = random.Random(1)
    for run in range(runs):  # interleaved, so machine noise hits all alike
        for name in order.sample(list(commands), len(commands)):
            cmd, shell = commands[name]
            clean(out)
            times[name].append(timed(cmd, shell))
            print(f"  run {run + 1} {name}: {times[name][-1]:.2f} s", flush=True)
            if name == "liveclone" and run == 0 and \
                    subprocess.run(["cmp", str(src), str(out)]).returncode != 0:
                raise SystemExit("liveclone's clone differs from the source")
        clean(out)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--random-size", default="4G")
    ap.add_argument("--sparse-size", default="16G")
    ap.add_argument("--sparse-data", default="1G")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=str(Path(__file__).parent / "work"))
    a = ap.parse_args()
    work = Path(a.dir)
    work.mkdir(parents=True, exist_ok=True)
    rsize, ssize, sdata = (parse_size(a.random_size), parse_size(a.sparse_size),
                           parse_size(a.sparse_data))
    rnd, sparse = work / "random.img", work / "sparse.img"
    make_random(rnd, rsize)
    make_sparse(sparse, ssize, sdata)
    rows = []
    for name, src, size in ((f"random {format_size(rsize)}", rnd, rsize),
                            (f"sparse {format_size(ssize)} with {format_size(sdata)} data",
                             sparse, sdata)):
        m = bench(src, rnd, size, work, a.runs)
        lc = m["liveclone"]
        rows.append(
            f"| {name} | {m['cp']:.2f} s | {m['cp+sync']:.2f} s | {m['qemu-img']:.2f} s "
            f"| {m['floor']:.2f} s | {lc:.2f} s | {m['cp'] / lc:.2f}× "
            f"| {m['cp+sync'] / lc:.2f}× | {m['qemu-img'] / lc:.2f}× "
            f"| {m['floor'] / lc:.2f}× | {size / lc / 1e9:.2f} GB/s |")
        print(rows[-1], flush=True)
    body = (
        f"`python benchmarks/clone_bench.py` — median of {a.runs} interleaved cold-cache runs, "
        f"{time.strftime('%Y-%m-%d')}, on this 2-vCPU machine (shared: expect ±50% noise). "
        "Throughput ratio = cp time / liveclone time (>1 means liveclone is faster). "
        "liveclone's time includes making the clone durable (fdatasync + map commit); "
        "`cp+sync` adds the same durability to cp; `qemu-img convert -O raw`, like cp, "
        "ends with its writes still in the page cache. `disk floor`: fio reading the "
        "data and writing as much at once with O_DIRECT (two independent streams in C, "
        "no copy between them): what this disk allows a durable copy. The order of the "
        "commands is shuffled in each run.\n\n"
        "| source | cp --sparse=always | cp + sync | qemu-img convert | disk floor (fio) "
        "| liveclone clone | ratio vs cp | ratio vs cp+sync | ratio vs qemu-img "
        "| ratio vs floor | liveclone data rate |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
    )
    write_section("Copy: liveclone clone vs cp", body)
    shutil.rmtree(work / "out.img", ignore_errors=True)


if __name__ == "__main__":
    main()
