"""Sync-heavy guests on the file view: ext4 on a loop device on ``liveclone mount``
against ext4 on a loop device on a plain file of the same disk, in one run.

Workloads: stress-ng ``--io`` (a loop on sync()) and ``--hdd`` with fsync after
each write, and ``fs_mark -S 1`` (files written and fsynced before close, by two
threads), when fs_mark is installed. stress-ng ``--sync-file`` (sync_file_range)
runs only when named with ``--workloads``: it does a handful of operations per
second even on the plain file, too few to compare. Each round runs every
configuration once per workload, in a shuffled order, each on a fresh file system
(a new copy of the plain file, a new clone). For all but sync() the configurations
are mounted together and their runs follow back to back, which pairs them more
closely on a shared machine; sync() flushes every mounted file system, so it mounts
one configuration at a time. The ratio of each round is liveclone's
rate (bogo-ops/s, files/s) over the plain file's, and the medians of at least 5
ratios go to benchmarks/results.md, with the 1-minute load average at the start
and the end.

``--compare REV`` also runs liveclone as it was at git revision REV (checked out
with ``git worktree``), e.g. main before a change. Needs root (loop devices,
mount), stress-ng and fs_mark (``apt-get install stress-ng fsmark``). Not a test.

    python benchmarks/sync_bench.py [--rounds 5] [--seconds 8] [--compare REV]
                                    [--workloads 'sync(),write+fsync,fs_mark']
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 1 << 30
# name: (stress-ng arguments, the metrics line's stressor name)
STRESSORS = {
    "sync()": (["--io", "2"], "io"),
    "write+fsync": (["--hdd", "2", "--hdd-opts", "fsync", "--hdd-bytes", "8M"], "hdd"),
    "sync_file_range": (["--sync-file", "2"], "sync-file"),
}
# fs_mark: two threads, each writes FS_MARK_FILES files of 16 KiB per loop, fsyncing
# each before close (-S 1), for 2 loops; its Files/sec of each loop, averaged.
FS_MARK = "fs_mark"
FS_MARK_FILES = 1000
DEFAULT = ["sync()", "write+fsync", FS_MARK]


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def stress(where: Path, name: str, seconds: int) -> float:
    """bogo ops/s of one stressor run in ``where`` (files/s for fs_mark)."""
    if name == FS_MARK:
        return fs_mark(where)
    argv, metric = STRESSORS[name]
    out = subprocess.run(
        ["stress-ng", *argv, "--timeout", f"{seconds}s", "--metrics-brief",
         "--temp-path", str(where)], capture_output=True, text=True, timeout=seconds + 120)
    text = out.stdout + out.stderr
    m = re.search(rf"{re.escape(metric)}\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)", text)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"stress-ng {name} failed:\n{text[-2000:]}")
    return float(m.group(2))


def fs_mark(where: Path) -> float:
    """Files/s of ``fs_mark -S 1`` in ``where``: the mean of its loops' figures."""
    shutil.rmtree(where / "fsm", ignore_errors=True)  # a file system used before
    out = subprocess.run(
        ["fs_mark", "-d", "fsm", "-s", "16384", "-n", str(FS_MARK_FILES),
         "-S", "1", "-t", "2", "-L", "2"],  # a relative -d: it takes under 40 bytes
        cwd=where, capture_output=True, text=True, timeout=600)
    rates = [float(m.group(1)) for m in
             re.finditer(r"^\s*\d+\s+\d+\s+16384\s+([\d.]+)\s+\d+\s*$", out.stdout, re.M)]
    if out.returncode != 0 or not rates:
        raise RuntimeError(f"fs_mark failed:\n{(out.stdout + out.stderr)[-2000:]}")
    return statistics.fmean(rates)


class Loop:
    """ext4 on a loop device over ``image``, mounted at ``mnt``."""

    def __init__(self, image: Path, mnt: Path) -> None:
        self.dev = sh("losetup", "--find", "--show", str(image)).strip()
        mnt.mkdir(exist_ok=True)
        subprocess.run(["mount", self.dev, str(mnt)], check=True)
        self.mnt = mnt

    def close(self) -> None:
        subprocess.run(["umount", str(self.mnt)], check=True)
        subprocess.run(["losetup", "-d", self.dev], check=True)


@contextlib.contextmanager
def plain_fs(work: Path, golden: Path) -> Iterator[Path]:
    """ext4 on a loop device on a sparse copy of ``golden``; its mount point."""
    plain = work / "plain.img"
    subprocess.run(["cp", "--sparse=always", str(golden), str(plain)], check=True)
    loop = Loop(plain, work / "plain-mnt")
    try:
        yield loop.mnt
    finally:
        loop.close()
        plain.unlink()


@contextlib.contextmanager
def liveclone_fs(work: Path, golden: Path, tag: str, src: Path) -> Iterator[Path]:
    """ext4 on a loop device on ``liveclone mount`` of a new clone of ``golden``, run
    from the source tree ``src`` (this checkout, or a worktree); its mount point."""
    clone, mnt = work / f"clone-{tag}.img", work / f"fuse-{tag}"
    mnt.mkdir(exist_ok=True)
    # The old tree may load libfuse2 where both are installed: name libfuse3.
    env = dict(os.environ, PYTHONPATH=str(src), FUSE_LIBRARY_NAME="fuse3")
    proc = subprocess.Popen([sys.executable, "-m", "liveclone.cli.main", "mount", str(golden),
                             str(clone), str(mnt)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        image = mnt / clone.name
        deadline = time.monotonic() + 30
        while not image.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("liveclone mount did not come up")
            time.sleep(0.05)
        loop = Loop(image, work / f"ext4-{tag}")
        try:
            yield loop.mnt
        finally:
            loop.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        for p in work.glob(f"clone-{tag}.img*"):
            p.unlink()


def mount(work: Path, golden: Path, config: str,
          trees: dict[str, Path]) -> contextlib.AbstractContextManager[Path]:
    """The file system of ``config``: "plain" or a key of ``trees``."""
    if config == "plain":
        return plain_fs(work, golden)
    return liveclone_fs(work, golden, str(list(trees).index(config)), trees[config])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--compare", help="also run liveclone at this git revision")
    ap.add_argument("--dir", default=str(ROOT / "benchmarks" / "work" / "sync"))
    ap.add_argument("--workloads", default=",".join(DEFAULT),
                    help=f"comma-separated, of: {', '.join([*STRESSORS, FS_MARK])}")
    args = ap.parse_args()
    workloads = args.workloads.split(",")
    if unknown := set(workloads) - {*STRESSORS, FS_MARK}:
        sys.exit(f"unknown workloads: {', '.join(sorted(unknown))}")
    if shutil.which("stress-ng") is None:
        sys.exit("stress-ng is missing: apt-get install stress-ng")
    if FS_MARK in workloads and shutil.which("fs_mark") is None:
        print("fs_mark is missing (apt-get install fsmark): left out", file=sys.stderr)
        workloads.remove(FS_MARK)
    load_start = os.getloadavg()[0]
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    golden = work / "golden.img"
    if not golden.exists():
        with open(golden, "wb") as f:
            f.truncate(SIZE)
        sh("mkfs.ext4", "-q", "-F", str(golden))
    trees = {"liveclone": ROOT / "src"}
    if args.compare:
        wt = work / "compare-tree"
        if wt.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)])
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(wt),
                        args.compare], check=True)
        trees[f"liveclone@{args.compare}"] = wt / "src"
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for name in workloads:
            configs = ["plain", *trees]
            random.shuffle(configs)
            got = {}
            if name == "sync()":
                # sync() flushes every file system: one configuration mounted at a time.
                for c in configs:
                    with mount(work, golden, c, trees) as where:
                        got[c] = stress(where, name, args.seconds)
            else:
                # Every configuration mounted at once, fresh for each workload; the
                # runs then follow one another closely, so the ratios of a round
                # compare runs a few seconds apart on this shared machine.
                with contextlib.ExitStack() as mounted:
                    where = {c: mounted.enter_context(mount(work, golden, c, trees))
                             for c in configs}
                    for c in configs:
                        got[c] = stress(where[c], name, args.seconds)
            for c, v in got.items():
                results.setdefault((name, c), []).append(v)
            print(f"round {r + 1} {name}: " + ", ".join(f"{c} {v:.0f}/s" for c, v in got.items()),
                  flush=True)
    lines = ["Sync-heavy guest on the file view: ext4 on a loop device on `liveclone mount` "
             "vs on a plain file on the same disk (stress-ng bogo-ops/s, "
             f"{args.seconds} s per run; fs_mark -S 1 files/s, 2 threads x "
             f"{FS_MARK_FILES} files of 16 KiB x 2 loops; {args.rounds} interleaved "
             "rounds, shuffled order; for write+fsync and fs_mark every configuration "
             "is mounted afresh at once and its runs follow back to back, sync() mounts "
             "one at a time as it flushes every file system). Ratio: median over rounds "
             "of liveclone / plain in the same round; the spread is the min-max of the "
             f"ratios (this machine's noise). 1-minute load average {load_start:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end.", "",
             "| workload | config | median ops/s | ratio to plain (median) | ratio min-max |",
             "|---|---|---|---|---|"]
    for name in workloads:
        plain = results[(name, "plain")]
        lines.append(f"| {name} | plain file | {statistics.median(plain):.0f} | 1 | |")
        for c in trees:
            vals = results[(name, c)]
            ratios = [v / p for v, p in zip(vals, plain, strict=True)]
            lines.append(f"| {name} | {c} | {statistics.median(vals):.0f} | "
                         f"{statistics.median(ratios):.2f} | "
                         f"{min(ratios):.2f}-{max(ratios):.2f} |")
    body = "\n".join(lines)
    print(body)
    write_section("Sync-heavy guests (group commit)", body)


if __name__ == "__main__":
    main()
