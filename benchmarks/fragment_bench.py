"""Finishing a clone whose map the guest fragmented, against the same bytes unfragmented.

For each region size (4K, 64K) and N scattered 4 KiB guest writes (0, 1k, 10k, 100k)
a clone of a source of random data (1 GiB by default) gets its N writes through
``Clone.write``, as a guest's would arrive, and is closed: the *fragmented* clone.
Its twin, the *contiguous* clone, has the same number of present regions as one
run at the start, so the same bytes are left to copy, in one piece. Each round
restores both from templates, drops the page cache, and times a copier from start
to a committed, complete clone (``Copier`` + ``close``), in shuffled order; the
ratio (fragmented bytes/s over contiguous bytes/s) is taken per round and its
median shown. With ``--remote`` the source is the same image served by nginx on
loopback (``HttpSource``): a fill asks for up to 128 separate reads in one request
(``multipart/byteranges``).

Not a test: it asserts only that every finished clone is the source plus the
guest's writes (checksums).

    python benchmarks/fragment_bench.py [--size 1G] [--rounds 5] [--remote]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from clone_bench import drop_caches, make_random  # noqa: E402
from results_file import write_section  # noqa: E402
from tests.integration.servers import Nginx  # noqa: E402

from liveclone.core.copier import Copier  # noqa: E402
from liveclone.core.opening import open_clone  # noqa: E402
from liveclone.sources.base import Source  # noqa: E402
from liveclone.sources.http import HttpSource  # noqa: E402
from liveclone.sources.local import LocalFileSource  # noqa: E402
from liveclone.units import format_size, parse_size  # noqa: E402

SUFFIXES = ("", ".lcmap", ".lcjournal", ".lcdigest")
WRITES = (0, 1000, 10_000, 100_000)
REGION_SIZES = (4 << 10, 64 << 10)
GUEST = b"\xa5" * 4096  # what the guest writes: never in a random source


def remove(path: Path) -> None:
    for s in SUFFIXES + (".lcstatus",):
        Path(str(path) + s).unlink(missing_ok=True)


def copy_files(src: Path, dst: Path) -> None:
    remove(dst)
    for s in SUFFIXES:
        subprocess.run(["cp", "--sparse=always", str(src) + s, str(dst) + s], check=True)


def make_templates(open_source: Callable[[], Source], work: Path, rs: int, n: int,
                   size: int) -> tuple[Path, Path, int, str]:
    """The fragmented and contiguous clones, and the bytes left to copy and the
    expected checksum of the finished fragmented clone."""
    frag, cont = work / f"frag-{rs}-{n}.img", work / f"cont-{rs}-{n}.img"
    remove(frag)
    remove(cont)
    rng = random.Random(n * 31 + rs)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(n)]
    with open_clone(str(frag), open_source(), region_size=rs, create=True, exclusive=True) as c:
        for off in offsets:
            c.write(off, GUEST)
        present = c.regions_present
    remaining = size - present * rs
    with open_clone(str(cont), open_source(), region_size=rs, create=True, exclusive=True) as c:
        step = 8 << 20
        for off in range(0, present * rs, step):
            c.write(off, bytes(min(step, present * rs - off)))
    with open_source() as source:
        return frag, cont, remaining, expected_sum(offsets, source, size)


def expected_sum(offsets: list[int], source: Source, size: int) -> str:
    written = set(offsets)
    h = hashlib.sha256()
    step = 32 << 20
    for off in range(0, size, step):
        chunk = bytearray(source.pread(off, min(step, size - off)))
        for w in range(off, off + len(chunk), 4096):
            if w in written:
                chunk[w - off:w - off + 4096] = GUEST
        h.update(chunk)
    return h.hexdigest()


def file_sum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(32 << 20):
            h.update(block)
    return h.hexdigest()


def finish(path: Path, source: Source, warm: Path | None = None) -> float:
    """Seconds from the copier's start to a complete, committed clone. The page
    cache is dropped first (source and clone cold); ``warm``: then this file (the
    source image) is read back into it, the same for either arm."""
    drop_caches()
    if warm is not None:
        with open(warm, "rb") as f:
            while f.readinto(bytearray(32 << 20)):
                pass
    c = open_clone(str(path), source)
    t0 = time.monotonic()
    cp = Copier(c).start()
    cp.wait()
    cp.stop()
    if cp.error is not None:
        raise SystemExit(f"copier failed: {cp.error}")
    c.close()
    return time.monotonic() - t0


def run(kind: str, open_source: Callable[[], Source], work: Path, size: int,
        rounds: int, warm: Path | None = None,
        server: Nginx | None = None) -> list[dict[str, Any]]:
    """The rows of one source kind. ``server``: nginx with its access log, whose
    requests and bytes sent are counted per finish."""
    rows = []
    configs: list[dict[str, Any]] = []
    for rs in REGION_SIZES:
        for n in WRITES:
            print(f"{kind}: preparing {format_size(rs)} regions, {n} writes", file=sys.stderr)
            frag, cont, remaining, want = make_templates(open_source, work, rs, n, size)
            configs.append({"rs": rs, "n": n, "frag": frag, "cont": cont,
                            "remaining": remaining, "want": want, "ratios": [],
                            "frag_t": [], "cont_t": [], "frag_http": [], "cont_http": []})
    live = work / "live.img"
    for rnd in range(rounds):
        order = [(cfg, which) for cfg in configs for which in ("frag", "cont")]
        random.Random(rnd).shuffle(order)
        times: dict[tuple[int, int, str], float] = {}
        for cfg, which in order:
            copy_files(cfg[which], live)
            source = open_source()
            before = _served(server)
            t = finish(live, source, warm)
            after = _served(server)
            cfg[f"{which}_http"].append((after[0] - before[0], after[1] - before[1]))
            times[(cfg["rs"], cfg["n"], which)] = t
            if which == "frag" and file_sum(live) != cfg["want"]:
                raise SystemExit(f"{kind} rs={cfg['rs']} n={cfg['n']}: wrong content")
        for cfg in configs:
            tf, tc = times[(cfg["rs"], cfg["n"], "frag")], times[(cfg["rs"], cfg["n"], "cont")]
            cfg["frag_t"].append(tf)
            cfg["cont_t"].append(tc)
            cfg["ratios"].append(tc / tf)  # same bytes: rate ratio = time ratio inverted
        print(f"{kind} round {rnd + 1}: " + ", ".join(
            f"{format_size(c['rs'])}/{c['n']} {c['ratios'][-1]:.2f}" for c in configs),
            file=sys.stderr)
    remove(live)
    for cfg in configs:
        rem = cfg["remaining"]
        r = cfg["ratios"]
        rows.append({
            "kind": kind, "rs": cfg["rs"], "n": cfg["n"], "remaining": rem,
            "frag_rate": rem / statistics.median(cfg["frag_t"]) / 1e6,
            "cont_rate": rem / statistics.median(cfg["cont_t"]) / 1e6,
            "ratio": statistics.median(r), "lo": min(r), "hi": max(r),
            "spread": (statistics.pstdev(cfg["cont_t"]) / statistics.mean(cfg["cont_t"])),
            "http": {w: tuple(statistics.median(x[i] for x in cfg[f"{w}_http"]) for i in (0, 1))
                     for w in ("frag", "cont")} if server is not None else None,
        })
        for which in ("frag", "cont"):
            remove(cfg[which])
    return rows


def _served(server: Nginx | None) -> tuple[int, int]:
    """Requests answered and body bytes sent so far (0, 0 without a server)."""
    if server is None or not server.access_log.exists():
        return 0, 0
    lines = server.access_log.read_text().splitlines()
    return len(lines), sum(int(line.split()[1]) for line in lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--remote", action="store_true", help="also from nginx over HTTP")
    ap.add_argument("--remote-only", action="store_true", help="only from nginx over HTTP")
    ap.add_argument("--warm-source", action="store_true",
                    help="read the source image into the page cache before each finish")
    ap.add_argument("--dir", default=str(ROOT / "benchmarks" / "work" / "fragment"))
    args = ap.parse_args()
    size = parse_size(args.size)
    load_before = os.getloadavg()[0]
    work = Path(args.dir)
    www = work / "www"
    www.mkdir(parents=True, exist_ok=True)
    image = www / "disk.img"
    make_random(image, size)
    warm = image if args.warm_source else None
    rows = [] if args.remote_only else \
        run("local", lambda: LocalFileSource(str(image)), work, size, args.rounds, warm)
    if args.remote or args.remote_only:
        server = Nginx(www, work / "nginx", access_log=True).start()
        try:
            url = server.url("disk.img")
            rows += run("HTTP", lambda: HttpSource(url), work, size, args.rounds, warm, server)
        finally:
            server.stop()
            shutil.rmtree(work / "nginx", ignore_errors=True)
    def http(r: dict[str, Any]) -> str:
        if r["http"] is None:
            return ""
        (fq, fb), (cq, cb) = r["http"]["frag"], r["http"]["cont"]
        return f" {fq:.0f} / {cq:.0f} | {fb / 1e6:.1f} / {cb / 1e6:.1f} MB |"

    remote = args.remote or args.remote_only
    table = "\n".join(
        f"| {r['kind']} | {format_size(r['rs'])} | {r['n']:,} | {format_size(r['remaining'])} "
        f"| {r['frag_rate']:.0f} MB/s | {r['cont_rate']:.0f} MB/s | **{r['ratio']:.2f}×** "
        f"({r['lo']:.2f}-{r['hi']:.2f}) | ±{r['spread']:.0%} |"
        + (http(r) if r["http"] is not None else " | |" if remote else "") for r in rows)
    flags = (" --remote" if args.remote else " --remote-only" if args.remote_only else "") \
        + (" --warm-source" if args.warm_source else "")
    cache = ("page cache dropped, then the source image read back into it (a warm source, "
             "a cold clone)" if args.warm_source else "page cache dropped (source and clone "
             "cold)")
    http_head = " requests frag / unfrag | sent frag / unfrag |" if remote else ""
    http_rule = "---|---|" if remote else ""
    head = ("| source | regions | N writes | left to copy | fragmented | unfragmented "
            "| ratio | noise |")
    body = f"""
`python benchmarks/fragment_bench.py --size {args.size} --rounds {args.rounds}{flags}` \
— {time.strftime('%Y-%m-%d')}, this 2-vCPU machine
(1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end).
A clone of {format_size(size)} of random data gets N scattered 4 KiB guest writes
(`Clone.write`), then a copier finishes it
(start to complete and committed). Its twin has as many present regions, as one run
at the start: the same bytes left, unfragmented. Each round times both, shuffled,
from templates, {cache}, the same for both; ratio = fragmented rate / unfragmented
rate per round, median of {args.rounds} (range in brackets); noise = the unfragmented
runs' standard deviation over their mean. HTTP: nginx on loopback, up to 128 separate
reads a request; requests and body bytes nginx sent per finish (medians), against the
bytes left to copy. Every finished clone was checked against the source plus the writes.

{head}{http_head}
|---|---|---|---|---|---|---|---|{http_rule}
{table}
"""
    print(body)
    write_section("Fragmented maps" + (" (HTTP)" if args.remote_only else "")
                  + (", warm source" if args.warm_source else ""), body)


if __name__ == "__main__":
    main()
