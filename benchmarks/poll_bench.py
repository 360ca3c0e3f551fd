"""What polling before the loop sleeps buys and costs: queue-depth-1 clients.

    python benchmarks/poll_bench.py [--size 256M] [--runtime 5] [--rounds 5]
        [--write-results]

Serves one complete clone (in the page cache) with ``liveclone serve
--poll-max-ns 0`` (never poll), with the default (``nbd/poll.py``), and the same
image with ``nbdkit file``; runs fio 4K random reads at queue depth 1 against
each: as fast as the client goes, and paced at 10,000 and 2,000 requests per
second (100 and 500 µs apart). Reports the IOPS and the server's CPU (user and
system time of all its threads, from /proc, over the fio run, as a share of one
CPU). Every (rate, server) cell runs once per round, in a shuffled order; cells
are medians over the rounds with their min-max.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbd_bench import LIVECLONE, make_random_file, stop, wait_socket  # noqa: E402
from results_file import write_section  # noqa: E402

from liveclone.nbd.limits import DEFAULT_POLL_MAX_NS  # noqa: E402
from liveclone.units import parse_size  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RATES = [0, 10_000, 2_000]  # requests per second; 0: as fast as the client goes
SERVERS = ["liveclone, no polling", "liveclone, polling", "nbdkit file"]


def spawn(kind: str, image: Path, clone: Path, sock: Path) -> subprocess.Popen[bytes]:
    sock.unlink(missing_ok=True)
    if kind == "nbdkit file":
        cmd = ["nbdkit", "-f", "-U", str(sock), "file", f"file={image}"]
    else:
        poll = "0" if "no polling" in kind else str(DEFAULT_POLL_MAX_NS)
        cmd = [LIVECLONE, "serve", str(image), str(clone), "--socket", str(sock),
               "--export-name", "", "--poll-max-ns", poll]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cpu_seconds(pid: int) -> float:
    """User and system time of every thread of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_cell(kind: str, rate: int, image: Path, clone: Path, sock: Path,
             runtime: float) -> tuple[float, float, float]:
    """(IOPS, mean latency in µs, server CPU as a share of one CPU) of one fio run."""
    subprocess.run(["cat", str(clone)], stdout=subprocess.DEVNULL, check=True)
    proc = spawn(kind, image, clone, sock)
    try:
        wait_socket(sock, proc)
        args = ["fio", "--name=qd1", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
                "--rw=randread", "--bs=4k", "--iodepth=1", "--time_based",
                f"--runtime={runtime}", "--output-format=json"]
        if rate:
            args.append(f"--rate_iops={rate}")
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        out = subprocess.run(args, capture_output=True, text=True, check=True,
                             timeout=runtime + 60).stdout
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
    finally:
        stop(proc)
    read = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return float(read["iops"]), read["lat_ns"]["mean"] / 1000, (cpu1 - cpu0) / (t1 - t0)


def spread(values: list[float], unit: str = "") -> str:
    return f"{statistics.median(values):.0f}{unit} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--runtime", type=float, default=5, help="seconds per fio run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "poll"))
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    image, clone, sock = work / "source.img", work / "clone.img", work / "nbd.sock"
    size = parse_size(args.size)
    if not image.exists() or image.stat().st_size != size:
        make_random_file(image, size)
    for path in work.glob("clone.img*"):
        path.unlink()
    subprocess.run([LIVECLONE, "clone", "--no-progress", str(image), str(clone)], check=True)
    results: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
    rng = random.Random(1)
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    for rnd in range(args.rounds):
        cells = [(rate, kind) for rate in RATES for kind in SERVERS]
        rng.shuffle(cells)
        for rate, kind in cells:
            iops, lat, cpu = run_cell(kind, rate, image, clone, sock, args.runtime)
            results.setdefault((rate, kind), []).append((iops, lat, cpu))
            print(f"round {rnd + 1} {rate or 'free':>6} {kind:24} {iops:8.0f} IOPS "
                  f"{lat:6.1f} us CPU {100 * cpu:4.0f}%", flush=True)
    lines = [
        f"`python benchmarks/poll_bench.py --size {args.size} --runtime {args.runtime:g} "
        f"--rounds {args.rounds}` — {started} UTC, {os.cpu_count()} CPUs. fio 4K random "
        "reads at queue depth 1 against a complete clone in the page cache; `latency`: "
        "fio's mean, request to answer; `CPU`: the server's user and system time over "
        "the run, as a share of one CPU. Medians over the rounds, min-max in brackets.",
        "",
        "| client | server | IOPS | latency | CPU |",
        "|---|---|---|---|---|",
    ]
    for rate in RATES:
        for kind in SERVERS:
            got = results[(rate, kind)]
            lines.append(f"| {f'{rate:,} IOPS' if rate else 'as fast as it goes'} | {kind} "
                         f"| {spread([g[0] for g in got])} "
                         f"| {spread([g[1] for g in got], ' µs')} "
                         f"| {spread([100 * g[2] for g in got], '%')} |")
    body = "\n".join(lines)
    print(body)
    if args.write_results:
        write_section("Polling: queue depth 1", body)


if __name__ == "__main__":
    main()
