"""Start-up benchmark: spawn ``liveclone serve`` on a new clone, time its first read.

    .venv/bin/python benchmarks/start_bench.py [--rounds 11] [--base-src DIR]
        [--write-results]

For a sparse 1 GiB and a sparse 1 TiB source (4 KiB of random data at the start),
each round spawns, in a shuffled order, ``liveclone serve SOURCE NEW-CLONE`` (the
console script users run, creating the clone and its map), ``qemu-nbd`` and
``nbdkit file`` on the source, and times from the spawn to the first 4 KiB read
answered over the unix socket (our NBD handshake and read, by hand, the bytes
checked against the source); with ``--base-src``, an older liveclone's ``src``
directory too, in the same rounds. The report gives each median, its min-max, and
liveclone's ratio to each peer per round (median and min-max), with the machine's
load average before and after. Then where liveclone's start goes: Python's own
start (``python -c pass``), the libraries it is built on alone (``python -c
"import click, asyncio, uvloop"``: what no change to liveclone's own code can
remove), and what each top-level import of ``serve`` costs with all it imports in
turn (``PYTHONPROFILEIMPORTTIME``). With ``--write-results`` the
"Start-up" section of benchmarks/results.md is replaced. Not a test: nothing here
asserts.
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
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import nbd_bench  # noqa: E402
from nbd_bench import BASE, LIVECLONE, first_read, spawn, stop  # noqa: E402
from results_file import write_section  # noqa: E402

from liveclone.process import stop_process  # noqa: E402

HEADING = "Start-up"
KINDS = ["liveclone (copying)", "qemu-nbd", "nbdkit file"]
SHOWN = {"liveclone (copying)": "liveclone serve (new clone)",
         "liveclone (base)": "base (--base-src)", "nbdkit file": "nbdkit"}
SIZES = (("1 GiB", 1 << 30), ("1 TiB", 1 << 40))


def make_sparse(path: Path, size: int) -> bytes:
    """A sparse file of ``size`` bytes whose first 4 KiB are random; returns them."""
    head = os.urandom(4096)
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(head)
    return head


def read_when_up(proc: subprocess.Popen[Any], sock: Path) -> bytes:
    """The first read's bytes, retried until the server answers it."""
    while True:
        try:
            return first_read(sock)
        except (OSError, ConnectionError):
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}") from None
            time.sleep(0.0005)


def time_first_read(kind: str, source: Path, head: bytes, work: Path) -> float:
    """Seconds from spawning ``kind`` on ``source`` to its first read answered."""
    clone, sock = work / "start-clone.img", work / "start.sock"
    for p in [*work.glob("start-clone.img*"), sock]:
        p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = spawn(kind, source, clone, sock)
    try:
        got = read_when_up(proc, sock)
        took = time.perf_counter() - t0
    finally:
        stop(proc)
        for p in work.glob("start-clone.img*"):
            p.unlink()
    if got != head:
        raise RuntimeError(f"{kind} answered the first read with the wrong bytes")
    return took


# Python alone, in the same rounds: its own start, and the libraries serve is built on.
PYTHON = {"pass": "pass", "libraries": "import click, asyncio, uvloop"}


def python_once(code: str) -> float:
    """Seconds of ``python -c CODE`` with the venv's interpreter."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def import_times(source: Path, work: Path, runs: int) -> dict[str, float]:
    """Median time (s) of each import ``liveclone serve`` makes at the top level
    before it says it is serving, with all it imports in turn (the cumulative column
    of PYTHONPROFILEIMPORTTIME=1 for the entries not nested in another):
    liveclone.cli.main brings click, asyncio brings ssl, and so on."""
    per_run: list[dict[str, float]] = []
    for _ in range(runs):
        clone, sock = work / "imp-clone.img", work / "imp.sock"
        env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
        proc = subprocess.Popen(
            [LIVECLONE, "serve", str(source), str(clone), "--socket", str(sock),
             "--export-name", "", "--rate", "1M"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            read_when_up(proc, sock)
        finally:
            stop_process(proc, 30)
            assert proc.stderr is not None
            text = proc.stderr.read()
            for p in work.glob("imp-clone.img*"):
                p.unlink()
        tops: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("liveclone: serving"):
                break  # later imports (mallopt's ctypes, 0.1 s on) are not on the way
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            _, cumulative, name = line[12:].split("|")
            if not name.startswith("  "):  # one space, then the name: not nested
                tops[name.strip()] = tops.get(name.strip(), 0.0) + int(cumulative) / 1e6
        per_run.append(tops)
    names = {g for run in per_run for g in run}
    return {g: statistics.median(run.get(g, 0.0) for run in per_run) for g in names}


def ms(t: float) -> str:
    return f"{t * 1000:.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=11, help="interleaved rounds (default 11)")
    ap.add_argument("--base-src", default=None,
                    help="an older liveclone's src directory, run beside (e.g. from git archive)")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "start"))
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    kinds = list(KINDS)
    trees = [ROOT / "src"]
    if args.base_src:
        nbd_bench.BASE_SRC = os.path.abspath(args.base_src)
        kinds.insert(1, BASE)
        trees.append(Path(nbd_bench.BASE_SRC))
    # Compiled modules, as an installed wheel has them (see nbd_bench).
    for tree in trees:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree)], check=True)
    rng = random.Random()
    try:
        sources = {label: (work / f"sparse-{label.replace(' ', '')}.img", size)
                   for label, size in SIZES}
        heads = {label: make_sparse(path, size) for label, (path, size) in sources.items()}
        load_before = os.getloadavg()
        times: dict[tuple[str, str], list[float]] = {}
        for rnd in range(args.rounds):
            cells = [(label, kind) for label in sources for kind in kinds]
            cells += [("python", name) for name in PYTHON]
            rng.shuffle(cells)
            for label, kind in cells:
                if label == "python":
                    t = python_once(PYTHON[kind])
                else:
                    t = time_first_read(kind, sources[label][0], heads[label], work)
                times.setdefault((label, kind), []).append(t)
            print(f"round {rnd + 1}: " + ", ".join(
                f"{label} {kind} {ms(t[-1])}" for (label, kind), t in times.items()),
                file=sys.stderr)
        load_after = os.getloadavg()
        imports = import_times(sources["1 TiB"][0], work, 5)
        body = report(times, kinds, imports, load_before, load_after, args.rounds)
        print(f"{HEADING}\n\n{body}")
        if args.write_results:
            write_section(HEADING, body)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def spread(ts: list[float]) -> str:
    return f"{ms(statistics.median(ts))} ({ms(min(ts))}-{ms(max(ts))})"


def ratio(a: list[float], b: list[float]) -> str:
    """Median (min-max) of the per-round ratios a/b."""
    rs = [x / y for x, y in zip(a, b, strict=True)]
    return f"{statistics.median(rs):.1f}× ({min(rs):.1f}-{max(rs):.1f})"


def report(times: dict[tuple[str, str], list[float]], kinds: list[str],
           imports: dict[str, float], load_before: tuple[float, float, float],
           load_after: tuple[float, float, float], rounds: int) -> str:
    ours = kinds[0]
    lines = [
        f"`python benchmarks/start_bench.py --rounds {rounds}` — {date.today().isoformat()}, "
        "on this 2-vCPU machine, load average (1 min) "
        f"{load_before[0]:.2f} before and {load_after[0]:.2f} after. Time from spawning "
        "the server to the first 4 KiB read answered over its unix socket (checked "
        "against the source's bytes), for a new clone of a sparse source: median of "
        f"{rounds} rounds, min-max in brackets; in each round every (source, server) "
        "cell runs once, in a shuffled order. liveclone is the `liveclone` console "
        "script of the venv (modules compiled), creating the clone, its map and "
        "digest file. Ratio: liveclone / peer per round, median (min-max).",
        "",
        "| source | " + " | ".join(SHOWN.get(k, k) for k in kinds) + " | "
        + " | ".join(f"ratio to {SHOWN.get(k, k).split(' (')[0]}" for k in kinds[1:]) + " |",
        "|---|" + "---|" * (2 * len(kinds) - 1),
    ]
    for label, _ in SIZES:
        cells = [spread(times[(label, k)]) for k in kinds]
        ratios = [ratio(times[(label, ours)], times[(label, peer)]) for peer in kinds[1:]]
        lines.append(f"| {label} sparse | " + " | ".join(cells + ratios) + " |")
    libraries = times[("python", "libraries")]
    total = sum(imports.values())
    lines += [
        "",
        "Python alone, in the same rounds: `python -c pass` "
        f"{spread(times[('python', 'pass')])}; `python -c \"{PYTHON['libraries']}\"`, "
        f"the libraries `serve` is built on and nothing of liveclone, {spread(libraries)}. "
        "liveclone serve's first read against that, per round: "
        + ", ".join(f"{label} {ratio(times[(label, ours)], libraries)}"
                    for label, _ in SIZES) + ".",
        "",
        f"Where liveclone's start goes: the imports `serve` makes before it serves take "
        f"{ms(total)} (median of 5 runs with "
        "PYTHONPROFILEIMPORTTIME=1, which itself adds to them), each top-level import "
        "with all it brings in (site and encodings are part of `python -c pass`):",
        "",
        "| top-level import | with what it imports |",
        "|---|---|",
    ]
    shown = 0.0
    for name, t in sorted(imports.items(), key=lambda kv: -kv[1]):
        if t >= 0.001:
            lines.append(f"| {name} | {t * 1000:.1f} ms |")
            shown += t
    lines.append(f"| the rest | {(total - shown) * 1000:.1f} ms |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
