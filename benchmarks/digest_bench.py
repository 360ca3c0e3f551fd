"""What the region digests cost, and how fast ``liveclone verify`` reads.

1. Copy with digests against copy without: ``liveclone clone`` of this tree (or
   ``--new REV``) against the same command of an older tree without digests
   (``--base REV``, the commit before digests); trees of commits are exported with
   ``git archive`` and run with PYTHONPATH. On a
   file of random data and on a sparse file, cold page cache each run, in
   interleaved shuffled rounds. Each round gives a throughput ratio (old time / new
   time); the median of the ratios and their min-max are reported.
2. ``liveclone verify`` of the finished clone against ``cat CLONE > /dev/null`` and
   ``xxhsum -H3`` and ``b3sum`` (if installed); ``verify --against-source`` against
   reading both files (``cat SOURCE CLONE``, and two cats at once); verify of a
   clone of the sparse file; with ``--verify-base REV`` also that commit's verify.
   Cold page cache each run (by default only for the files read, with
   ``--drop-caches`` the whole cache), interleaved shuffled rounds; each round
   gives a speed ratio (peer's time / verify's time), and their median is
   reported.
3. The digest alone per 64 KiB region (XXH3-64, XXH3-128, BLAKE3 if installed), in
   memory: the figure that chose the algorithm.

This is not a test: it asserts nothing.

    python benchmarks/digest_bench.py --base REV [--new REV|DIR] [--size 2G]
        [--sparse-size 8G] [--sparse-data 512M] [--runs 5] [--dir DIR] [--write-results]
    python benchmarks/digest_bench.py --verify-only [--size 2G] [--runs 5]
        [--verify-base REV] [--drop-caches] [--write-results]
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


def evict(paths: list[Path]) -> None:
    """Cold page cache for these files only (posix_fadvise DONTNEED of their clean
    pages), leaving the rest of the machine's cache, Python's modules among them,
    as it is: the figure is then the reading, not a cold interpreter."""
    for p in paths:
        if not p.exists():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def verify_rounds(src: Path, sparse: Path, work: Path, runs: int, evict_all: bool,
                  base_src: Path | None) -> tuple[dict[str, list[float]], list[float]]:
    """Interleaved shuffled rounds of ``liveclone verify`` (with and without
    ``--against-source``, and of a clone of ``sparse``; also of the ``base_src``
    tree's, if given) and its peers, each from a cold page cache. Times of a
    verify's own reading and digesting (its report's ``seconds``) are kept as
    ``NAME, reading and digesting only``.
    Also returns the 1-minute load average after each round."""
    clone, sclone = work / "digest-verify.img", work / "digest-verify-sparse.img"
    for a, b in ((src, clone), (sparse, sclone)):
        clean(b)
        subprocess.run([PY, "-m", "liveclone.cli.main", "clone", "--no-progress", str(a),
                        str(b)], check=True)
    files = [src, *(Path(str(c) + s) for s in SUFFIXES for c in (clone, sclone))]
    out = work / "verify.json"
    env_new = dict(os.environ)
    arms: dict[str, tuple[str | list[str], dict[str, str] | None]] = {}
    trees = [("", env_new)] + ([(" (base)", {**os.environ, "PYTHONPATH": str(base_src)})]
                               if base_src else [])
    for tag, env in trees:
        for opt in ("", " --against-source"):
            arms[f"verify{opt}{tag}"] = (
                f"{PY} -m liveclone.cli.main verify --json --no-progress{opt} '{clone}' "
                f"> '{out}'", env)
        arms[f"verify sparse{tag}"] = (
            f"{PY} -m liveclone.cli.main verify --json --no-progress '{sclone}' > '{out}'", env)
    arms["cat"] = (f"cat '{clone}' > /dev/null", None)
    arms["cat source clone"] = (f"cat '{src}' '{clone}' > /dev/null", None)
    arms["cat both at once"] = (f"cat '{src}' > /dev/null & cat '{clone}' > /dev/null; wait",
                                None)
    if shutil.which("xxhsum"):
        arms["xxhsum -H3"] = (["xxhsum", "-H3", str(clone)], None)
    if shutil.which("b3sum"):  # BLAKE3 in C/Rust, multithreaded (mmap)
        arms["b3sum"] = (["b3sum", str(clone)], None)
    times: dict[str, list[float]] = {k: [] for k in arms}
    order = random.Random(8)
    loads = []
    os.sync()
    for run in range(runs):
        for name in order.sample(list(arms), len(arms)):
            cmd, env = arms[name]
            out.unlink(missing_ok=True)
            if evict_all:
                drop_caches()
            else:
                evict(files)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, shell=isinstance(cmd, str),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - t0)
            if name.startswith("verify"):  # its own time, without Python's start
                report = json.loads(out.read_text())
                assert report["ok"], report
                times.setdefault(f"{name}, reading and digesting only", []).append(
                    report["seconds"])
            print(f"  round {run + 1} {name}: {times[name][-1]:.2f} s", flush=True)
        loads.append(os.getloadavg()[0])
    clean(clone)
    clean(sclone)
    return times, loads


def verify_lines(times: dict[str, list[float]], size: int, sdata: int) -> list[str]:
    """Medians of every arm, and per-round speed ratios of each verify to its peer
    and to the base commit's verify."""
    lines = []
    for name, ts in times.items():
        med = statistics.median(ts)
        data = (2 * size if "source" in name or "both" in name
                else sdata if "sparse" in name else size)
        lines.append(f"- {name}: median {med:.2f} s ({data / med / 1e6:.0f} MB/s), "
                     f"min-max {min(ts):.2f}-{max(ts):.2f} s")
    lines.append("")
    lines.append("Speed ratios, per round (peer's time / verify's time; 1 is the peer's "
                 "speed):")
    lines.append("")
    pairs = [("verify", "cat")]
    pairs += [("verify --against-source", p) for p in ("cat source clone", "cat both at once")]
    for name in [k for k in times if k.startswith("verify")]:
        base = name.split(",")[0].replace(" (base)", "")
        for v, peer in pairs:
            if base == v:
                ratios = [c / t for c, t in zip(times[peer], times[name], strict=True)]
                lines.append("- " + ratio_line(f"{name} / {peer}", ratios))
    for name in [k for k in times if "(base)" in k]:
        new = name.replace(" (base)", "")
        ratios = [b / t for b, t in zip(times[name], times[new], strict=True)]
        lines.append("- " + ratio_line(f"{new} / {name}", ratios))
    return lines


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
    ap.add_argument("--verify-base", metavar="REV",
                    help="also time the verify of this commit, in the same rounds")
    ap.add_argument("--drop-caches", action="store_true",
                    help="verify rounds: drop the whole page cache before each run "
                    "(default: only the files read)")
    a = ap.parse_args()
    work = Path(a.dir)
    work.mkdir(parents=True, exist_ok=True)
    size, ssize, sdata = parse_size(a.size), parse_size(a.sparse_size), parse_size(a.sparse_data)
    rnd, sparse = work / "digest-random.img", work / "digest-sparse.img"
    make_random(rnd, size)
    make_sparse(sparse, ssize, sdata)
    lines = [("`liveclone verify` speed " if a.verify_only else
              "Region digests: cost while copying, and `liveclone verify` speed ")
             + f"(`benchmarks/digest_bench.py --runs {a.runs}"
             + (f" --base {a.base}" if a.base else "") + (f" --new {a.new}" if a.new else "")
             + (" --verify-only" if a.verify_only else "") + f" --size {a.size}"
             + (f" --verify-base {a.verify_base}" if a.verify_base else "")
             + (" --drop-caches" if a.drop_caches else "") + "`; 2 vCPUs, "
             "shared machine, cold page cache every run, interleaved shuffled rounds).", ""]
    lines += ["Digest alone per 64 KiB region, from memory (median of 7 passes; min-max):", "",
              "| algorithm | per region | speed | min-max |", "|---|---|---|---|",
              *per_region(), ""]
    if not a.verify_only:
        lines += copy_section(a, work, rnd, sparse, size, ssize, sdata)
    print("verify", flush=True)
    base_src = None
    with tempfile.TemporaryDirectory() as tmp:
        if a.verify_base:
            base_src = export_base(a.verify_base, Path(tmp) / "verify-base")
        times, loads = verify_rounds(rnd, sparse, work, a.runs, a.drop_caches, base_src)
    lines += ["", f"`liveclone verify` of the complete {format_size(size)} random clone "
              f"(`verify sparse`: of a clone of the sparse {format_size(ssize)} file with "
              f"{format_size(sdata)} of data; its MB/s are of the data) "
              + ("(every run after `echo 3 > /proc/sys/vm/drop_caches`)" if a.drop_caches
                 else "(every run after posix_fadvise DONTNEED of the source, the clone "
                 "and its map files: their bytes cold, Python's modules as they were)")
              + (f"; `(base)` is commit {a.verify_base}'s verify" if a.verify_base else "")
              + f"; 1-minute load average {min(loads):.1f}-{max(loads):.1f} after the "
              "rounds:", ""]
    lines += verify_lines(times, size, sdata)
    text = "\n".join(lines)
    print(text)
    if a.write_results:
        write_section("Verify speed" if a.verify_only else "Region digests", text)


if __name__ == "__main__":
    main()
