"""Sync-heavy guests on the file view: ext4 on a loop device on ``liveclone mount``
against ext4 on a loop device on a plain file of the same disk, in one run.

Workloads (stress-ng): ``--io`` (a loop on sync()), ``--hdd`` with fsync after
each write, and ``--sync-file`` (sync_file_range). Each round runs every configuration once, in a
shuffled order; the ratio of each round is liveclone's bogo-ops/s over the plain
file's, and the medians of at least 5 ratios go to benchmarks/results.md.

``--compare REV`` also runs liveclone as it was at git revision REV (checked out
with ``git worktree``), e.g. the commit before group commit. Needs root (loop
devices, mount) and stress-ng (``apt-get install stress-ng``). Not a test.

    python benchmarks/sync_bench.py [--rounds 5] [--seconds 8] [--compare REV]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
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


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def stress(where: Path, name: str, seconds: int) -> float:
    """bogo ops/s of one stressor run in ``where``."""
    argv, metric = STRESSORS[name]
    out = subprocess.run(
        ["stress-ng", *argv, "--timeout", f"{seconds}s", "--metrics-brief",
         "--temp-path", str(where)], capture_output=True, text=True, timeout=seconds + 120)
    text = out.stdout + out.stderr
    m = re.search(rf"{re.escape(metric)}\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)", text)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"stress-ng {name} failed:\n{text[-2000:]}")
    return float(m.group(2))


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


def run_plain(work: Path, golden: Path, name: str, seconds: int) -> float:
    plain = work / "plain.img"
    subprocess.run(["cp", "--sparse=always", str(golden), str(plain)], check=True)
    loop = Loop(plain, work / "plain-mnt")
    try:
        return stress(loop.mnt, name, seconds)
    finally:
        loop.close()
        plain.unlink()


def run_liveclone(work: Path, golden: Path, name: str, seconds: int, src: Path) -> float:
    """``src``: the liveclone source tree to run (this checkout, or a worktree)."""
    clone, mnt = work / "clone.img", work / "fuse-mnt"
    mnt.mkdir(exist_ok=True)
    # The old tree may load libfuse2 where both are installed: name libfuse3.
    env = dict(os.environ, PYTHONPATH=str(src), FUSE_LIBRARY_NAME="fuse3")
    proc = subprocess.Popen([sys.executable, "-m", "liveclone.cli.main", "mount", str(golden),
                             str(clone), str(mnt)], env=env, stderr=subprocess.DEVNULL)
    try:
        image = mnt / clone.name
        deadline = time.monotonic() + 30
        while not image.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("liveclone mount did not come up")
            time.sleep(0.05)
        loop = Loop(image, work / "clone-mnt")
        try:
            return stress(loop.mnt, name, seconds)
        finally:
            loop.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        for p in work.glob("clone.img*"):
            p.unlink()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--compare", help="also run liveclone at this git revision")
    ap.add_argument("--dir", default=str(ROOT / "benchmarks" / "work" / "sync"))
    args = ap.parse_args()
    if shutil.which("stress-ng") is None:
        sys.exit("stress-ng is missing: apt-get install stress-ng")
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
        for name in STRESSORS:
            configs = ["plain", *trees]
            random.shuffle(configs)
            got = {}
            for c in configs:
                if c == "plain":
                    got[c] = run_plain(work, golden, name, args.seconds)
                else:
                    got[c] = run_liveclone(work, golden, name, args.seconds, trees[c])
                results.setdefault((name, c), []).append(got[c])
            print(f"round {r + 1} {name}: " + ", ".join(f"{c} {v:.0f}/s" for c, v in got.items()),
                  flush=True)
    lines = ["Sync-heavy guest on the file view: ext4 on a loop device on `liveclone mount` "
             "vs on a plain file on the same disk (stress-ng, bogo-ops/s, "
             f"{args.seconds} s per run, {args.rounds} interleaved rounds, shuffled order). "
             "Ratio: median over rounds of liveclone / plain in the same round; the spread "
             "is the min-max of the ratios (this machine's noise).", "",
             "| stressor | config | median ops/s | ratio to plain (median) | ratio min-max |",
             "|---|---|---|---|---|"]
    for name in STRESSORS:
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
