"""What the region digests cost, and how fast ``liveclone verify`` reads.

1. Copy with digests against copy without: ``liveclone clone`` of this tree (or
   ``--new REV``) against the same command of an older tree without digests
   (``--base REV``, the commit before digests); trees of commits are exported with
   ``git archive`` and run with PYTHONPATH. On a
   file of random data and on a sparse file, cold page cache each run, in
   interleaved shuffled rounds. Each round gives a throughput ratio (old time / new
   time); the median of the ratios and their min-max are reported.
2. ``liveclone verify`` of the finished clone against ``cat CLONE > /dev/null`` and
   ``xxhsum -H3`` and ``b3sum`` (if installed), cold page cache each run,
   interleaved.
3. The digest alone per 64 KiB region (XXH3-64, XXH3-128, BLAKE3 if installed), in
   memory: the figure that chose the algorithm.

This is not a test: it asserts nothing.

    python benchmarks/digest_bench.py --base REV [--new REV|DIR] [--size 2G]
        [--sparse-size 8G] [--sparse-data 512M] [--runs 5] [--dir DIR] [--write-results]
    python benchmarks/digest_bench.py --verify-only [--size 2G] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clone_bench import drop_caches, make_random, make_sparse  # noqa: E402
from results_file import write_section  # noqa: E402

from liveclone.units import format_size, parse_size  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SUFFIXES = ("", ".lcmap", ".lcjournal", ".lcdigest", ".lcstatus")


def clean(target: Path) -> None:
    for suffix in SUFFIXES:
        Path(str(target) + suffix).unlink(missing_ok=True)


def timed(cmd: list[str] | str, env: dict[str, str] | None = None, shell: bool = False) -> float:
    drop_caches()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, shell=shell, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def export_base(rev: str, where: Path) -> Path:
    """The ``src`` tree of ``rev``, for PYTHONPATH."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True,
                             capture_output=True).stdout
    where.mkdir()
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where / "src"


def ratio_line(name: str, ratios: list[float]) -> str:
    return (f"{name}: median {statistics.median(ratios):.3f}, "
            f"min-max {min(ratios):.3f}-{max(ratios):.3f} ({len(ratios)} rounds)")


def copy_rounds(src: Path, work: Path, base_src: Path, new_src: Path | None,
                runs: int) -> tuple[list[float], list[float], list[float]]:
    out = work / "digest-out.img"
    cli = [PY, "-m", "liveclone.cli.main", "clone", "--no-progress", str(src), str(out)]
    envs = {"digests": {**os.environ, **({"PYTHONPATH": str(new_src)} if new_src else {})},
            "no digests": {**os.environ, "PYTHONPATH": str(base_src)}}
    order = random.Random(7)
    new, old, ratios = [], [], []
    for run in range(runs):
        t: dict[str, float] = {}
        for name in order.sample(list(envs), len(envs)):
            clean(out)
            t[name] = timed(cli, envs[name])
            print(f"  round {run + 1} {name}: {t[name]:.2f} s", flush=True)
        new.append(t["digests"])
        old.append(t["no digests"])
        ratios.append(t["no digests"] / t["digests"])
    clean(out)
    return new, old, ratios


def verify_rounds(src: Path, work: Path, runs: int) -> dict[str, list[float]]:
    clone = work / "digest-verify.img"
    clean(clone)
    subprocess.run([PY, "-m", "liveclone.cli.main", "clone", "--no-progress", str(src),
                    str(clone)], check=True)
    commands: dict[str, tuple[list[str] | str, bool]] = {
        "verify": ([PY, "-m", "liveclone.cli.main", "verify", "--json", "--no-progress",
                    str(clone), ">", str(work / "verify.json")], True),
        "cat": (f"cat '{clone}' > /dev/null", True),
    }
    if shutil.which("xxhsum"):
        commands["xxhsum -H3"] = (["xxhsum", "-H3", str(clone)], False)
    if shutil.which("b3sum"):  # BLAKE3 in C/Rust, multithreaded (mmap)
        commands["b3sum"] = (["b3sum", str(clone)], False)
    times: dict[str, list[float]] = {k: [] for k in commands}
    (work / "verify.json").unlink(missing_ok=True)
    order = random.Random(8)
    for run in range(runs):
        for name in order.sample(list(commands), len(commands)):
            cmd, shell = commands[name]
            cmd = " ".join(cmd) if shell and isinstance(cmd, list) else cmd
            times[name].append(timed(cmd, shell=shell))
            if name == "verify":  # its own time, without Python's start-up and imports
                report = json.loads((work / "verify.json").read_text())
                assert report["ok"], report
                times.setdefault("verify, reading and digesting only", []).append(
                    report["seconds"])
            print(f"  round {run + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    clean(clone)
    return times


def per_region() -> list[str]:
    """us per 64 KiB region, digest only, from memory (median of 7 passes over 32 MiB)."""
    import xxhash

    buf = memoryview(mmap.mmap(-1, 32 << 20))
    buf[:] = os.urandom(len(buf))
    rs = 64 << 10
    algos: dict[str, Callable[[memoryview], object]] = {
        "XXH3-64": xxhash.xxh3_64_intdigest, "XXH3-128": xxhash.xxh3_128_intdigest}
    try:
        import blake3

        algos["BLAKE3"] = lambda v: blake3.blake3(v).digest()
    except ImportError:
        pass
    rows = []
    for name, f in algos.items():
        passes = []
        for _ in range(7):
            t0 = time.perf_counter()
            for i in range(0, len(buf), rs):
                f(buf[i:i + rs])
            passes.append(time.perf_counter() - t0)
        passes.sort()
        n = len(buf) // rs
        rows.append(f"| {name} | {passes[3] / n * 1e6:.1f} us | "
                    f"{len(buf) / passes[3] / 1e9:.1f} GB/s | "
                    f"{len(buf) / passes[-1] / 1e9:.1f}-{len(buf) / passes[0] / 1e9:.1f} GB/s |")
    return rows


def copy_section(a: argparse.Namespace, work: Path, rnd: Path, sparse: Path, size: int,
                 ssize: int, sdata: int) -> list[str]:
    if not a.base:
        raise SystemExit("--base REV is needed for the copy rounds (or --verify-only)")
    lines = ["Copy throughput with digests / without (the base commit), per round: "
             "without's time / with's time (above 1: faster with digests).", ""]
    with tempfile.TemporaryDirectory() as tmp:
        base_src = export_base(a.base, Path(tmp) / "base")
        new_src = (Path(a.new).resolve() if a.new and os.path.isdir(a.new)
                   else export_base(a.new, Path(tmp) / "new") if a.new else None)
        for name, src, data in ((f"random {format_size(size)}", rnd, size),
                                (f"sparse {format_size(ssize)} with {format_size(sdata)} data",
                                 sparse, sdata)):
            print(f"copy: {name}", flush=True)
            new, old, ratios = copy_rounds(src, work, base_src, new_src, a.runs)
            lines.append(f"- {name}: with digests {statistics.median(new):.2f} s "
                         f"({data / statistics.median(new) / 1e9:.2f} GB/s), without "
                         f"{statistics.median(old):.2f} s; "
                         + ratio_line("throughput ratio", ratios)
                         + "; per round " + ", ".join(f"{r:.3f}" for r in ratios))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--sparse-size", default="8G")
    ap.add_argument("--sparse-data", default="512M")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--base", help="a commit without digests (needed for the copies)")
    ap.add_argument("--new", default=None,
                    help="a commit with digests, or an src directory (default: this tree)")
    ap.add_argument("--dir", default=str(Path(__file__).parent / "work"))
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--verify-only", action="store_true",
                    help="only the per-region digest figures and verify (no copies)")
    a = ap.parse_args()
    work = Path(a.dir)
    work.mkdir(parents=True, exist_ok=True)
    size, ssize, sdata = parse_size(a.size), parse_size(a.sparse_size), parse_size(a.sparse_data)
    rnd, sparse = work / "digest-random.img", work / "digest-sparse.img"
    make_random(rnd, size)
    if not a.verify_only:
        make_sparse(sparse, ssize, sdata)
    lines = ["Region digests: cost while copying, and `liveclone verify` speed "
             f"(`benchmarks/digest_bench.py --runs {a.runs}"
             + (f" --base {a.base}" if a.base else "") + (f" --new {a.new}" if a.new else "")
             + (" --verify-only" if a.verify_only else "") + "`; 2 vCPUs, "
             "shared machine, cold page cache every run, interleaved shuffled rounds).", ""]
    lines += ["Digest alone per 64 KiB region, from memory (median of 7 passes; min-max):", "",
              "| algorithm | per region | speed | min-max |", "|---|---|---|---|",
              *per_region(), ""]
    if not a.verify_only:
        lines += copy_section(a, work, rnd, sparse, size, ssize, sdata)
    print("verify", flush=True)
    times = verify_rounds(rnd, work, a.runs)
    lines += ["", f"`liveclone verify` of the complete {format_size(size)} random clone:", ""]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"- {name}: median {med:.2f} s ({size / med / 1e6:.0f} MB/s), "
                     f"min-max {min(ts):.2f}-{max(ts):.2f} s")
    ratios = [c / v for c, v in zip(times["cat"], times["verify"], strict=True)]
    lines.append("- " + ratio_line("verify speed / cat speed (whole command)", ratios))
    inner = times["verify, reading and digesting only"]
    ratios = [c / v for c, v in zip(times["cat"], inner, strict=True)]
    lines.append("- " + ratio_line("verify speed / cat speed (reading and digesting only)",
                                   ratios))
    text = "\n".join(lines)
    print(text)
    if a.write_results:
        write_section("Region digests", text)


if __name__ == "__main__":
    main()
