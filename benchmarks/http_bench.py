"""Cloning over HTTP from nginx on loopback: liveclone vs curl + local clone vs qemu-img.

One image of random data (no holes: the worst case, every byte crosses HTTP) is
served by a real nginx on 127.0.0.1. Interleaved, each run with a cold page cache:

* ``liveclone``: ``liveclone clone http://... CLONE`` (usable from the first second);
* ``curl + clone``: ``curl -o`` the image, then ``liveclone clone`` the local copy
  (the image is usable only at the end); curl alone is also shown;
* ``qemu-img``: ``qemu-img convert -O raw`` from the same URL (qemu's curl driver).

The medians and ratios go to the "HTTP source" section of benchmarks/results.md.
Not a test: it asserts only that every copy is byte-identical.

    python benchmarks/http_bench.py [--size 4G] [--runs 1] [--dir DIR]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from clone_bench import drop_caches, make_random  # noqa: E402
from results_file import write_section  # noqa: E402
from tests.integration.servers import Nginx  # noqa: E402

from liveclone.units import format_size, parse_size  # noqa: E402

LIVECLONE = str(Path(sys.executable).parent / "liveclone")


def remove_clone(path: Path) -> None:
    for suffix in ("", ".lcmap", ".lcjournal", ".lcstatus", ".lcstatus.tmp"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def timed(fn: Callable[[], None]) -> float:
    drop_caches()
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def read_latency_while_copying(url: str, clone: Path, reads: int = 200) -> dict[str, float]:
    """Spawn ``liveclone serve`` on ``url``; time the first read, then random 4 KiB
    reads while the copy runs."""
    import random

    from liveclone.core.metadata import MapStore
    from liveclone.nbdwire.client import Pool, parse_uri
    from liveclone.process import stop_process

    remove_clone(clone)
    t0 = time.monotonic()
    proc = subprocess.Popen([LIVECLONE, "serve", url, str(clone)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        pool = Pool(parse_uri(uri), 1)
        pool.pread(0, 4096)
        first = time.monotonic() - t0
        header, _ = MapStore.read(str(clone))
        size = header.size
        rng = random.Random(1)
        samples = []
        for _ in range(reads):
            off = rng.randrange(size // 4096) * 4096
            t = time.monotonic()
            pool.pread(off, 4096)
            samples.append(time.monotonic() - t)
        _, rmap = MapStore.read(str(clone))
        pool.close()
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()
        remove_clone(clone)
    samples.sort()
    return {"first": first, "median": statistics.median(samples),
            "p99": samples[int(len(samples) * 0.99) - 1],
            "present_at_end": rmap.present_count / rmap.count}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4G", help="image size (default 4G)")
    ap.add_argument("--runs", type=int, default=1, help="interleaved runs (median shown)")
    ap.add_argument("--qemu-timeout", type=float, default=600,
                    help="give up on one qemu-img convert after this many seconds")
    ap.add_argument("--dir", default=str(ROOT / "benchmarks" / "work" / "http"),
                    help="scratch directory (needs about 3x the image size)")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(args.dir)
    www = work / "www"
    www.mkdir(parents=True, exist_ok=True)
    image = www / "disk.img"
    print(f"making a {format_size(size)} image of random data...", file=sys.stderr)
    make_random(image, size)
    server = Nginx(www, work / "nginx").start()
    url = server.url("disk.img")
    qemu_spec = json.dumps({"file.driver": "http", "file.url": url})
    out = work / "out.img"
    local = work / "local.img"
    times: dict[str, list[float]] = {k: [] for k in
                                     ("liveclone", "curl", "curl + clone", "qemu-img")}

    def check() -> None:
        if not filecmp.cmp(out, image, shallow=False):
            raise SystemExit(f"{out} differs from the image")

    latency: dict[str, float] = {}
    try:
        latency = read_latency_while_copying(url, work / "served.img")
        for run in range(args.runs):
            remove_clone(out)
            t = timed(lambda: subprocess.run([LIVECLONE, "clone", url, str(out)], check=True))
            times["liveclone"].append(t)
            rate = json.loads(Path(str(out) + ".lcstatus").read_text())
            check()

            remove_clone(out)
            local.unlink(missing_ok=True)
            t_curl = timed(lambda: subprocess.run(["curl", "-sSf", "-o", str(local), url],
                                                  check=True))
            t0 = time.monotonic()
            subprocess.run([LIVECLONE, "clone", str(local), str(out)], check=True)
            times["curl"].append(t_curl)
            times["curl + clone"].append(t_curl + time.monotonic() - t0)
            check()
            local.unlink()

            remove_clone(out)
            try:
                times["qemu-img"].append(timed(lambda: subprocess.run(
                    ["qemu-img", "convert", "-O", "raw", f"json:{qemu_spec}", str(out)],
                    check=True, timeout=args.qemu_timeout)))
                check()
            except subprocess.TimeoutExpired:
                # qemu's curl driver sometimes stalls for good; say so rather than wait.
                times["qemu-img"].append(float("inf"))
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items())
                  + f" (liveclone source retries: {rate.get('source_status')})",
                  file=sys.stderr)
    finally:
        server.stop()
        remove_clone(out)
        local.unlink(missing_ok=True)
    shutil.rmtree(work / "nginx", ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    lc = med["liveclone"]
    gbps = {k: size / v / 1e9 for k, v in med.items()}
    today = time.strftime("%Y-%m-%d")
    body = f"""
`python benchmarks/http_bench.py --size {args.size} --runs {args.runs}` — median of \
{args.runs} interleaved cold-cache run(s), {today}, nginx 1.22 on 127.0.0.1 serving \
{format_size(size)} of random data (no holes: every byte crosses HTTP), on this 2-vCPU \
machine (shared: expect ±50% noise). `curl + clone`: download with `curl -o`, then \
`liveclone clone` the local file; the image is usable only at the end, while a \
liveclone clone is usable from its first second. `qemu-img`: `qemu-img convert -O raw` \
from the URL (qemu's curl driver). Ratio = peer time / liveclone time (>1: liveclone \
is faster).

| method | time | rate | ratio (peer / liveclone) |
|---|---|---|---|
| liveclone clone http://… | {lc:.2f} s | {gbps['liveclone']:.2f} GB/s | 1.00× |
| curl -o only | {med['curl']:.2f} s | {gbps['curl']:.2f} GB/s | {med['curl'] / lc:.2f}× |
| curl -o + liveclone clone local | {med['curl + clone']:.2f} s | \
{gbps['curl + clone']:.2f} GB/s | {med['curl + clone'] / lc:.2f}× |
| qemu-img convert from URL | {med['qemu-img']:.2f} s | {gbps['qemu-img']:.2f} GB/s | \
{med['qemu-img'] / lc:.2f}× |
"""
    body += f"""
Guest-visible latency during the copy: `liveclone serve` on the URL (copier running at
full speed, copy-on-read on), then 200 random 4 KiB reads through NBD with liveclone's
NBD client while the copy is still running ({latency['present_at_end']:.0%} of the
regions committed when the reads ended; the map commits once a second):

| first read after spawn | median read | p99 read |
|---|---|---|
| {latency['first'] * 1000:.0f} ms | {latency['median'] * 1000:.2f} ms | \
{latency['p99'] * 1000:.2f} ms |
"""
    if any(t == float("inf") for t in times["qemu-img"]):
        body += (f"\nqemu-img stalled (no progress) in "
                 f"{sum(t == float('inf') for t in times['qemu-img'])} of {args.runs} runs "
                 f"and was stopped after {args.qemu_timeout:.0f} s; those count as inf.\n")
    write_section("HTTP source", body)
    print(body)


if __name__ == "__main__":
    main()
