"""20 clones of one HTTP image: through one SourceCache vs 20 independent processes.

One image of random data (no holes: every byte must cross HTTP) is served by a real
nginx on 127.0.0.1 with an access log of body bytes. Per round, in a shuffled order,
each arm starts from a cold page cache and empty clone paths:

* ``cache``: one Python process (as the daemon would be) makes one ``SourceCache``
  in a fresh cache directory and creates the N clones at once, each a
  ``CloneSession`` in its own thread whose source comes from the cache; it ends
  when every clone is complete and closed (map committed);
* ``cache warm``: the same, on the cache directory the ``cache`` arm left complete
  (the image is already local: a second batch of clones);
* ``independent``: N ``liveclone clone URL CLONE`` processes started at once; it
  ends when the last exits.

With ``--xfs``, the clones and the cache directory are on a loop-mounted XFS with
reflink: the warm arm's clones then share the entry's blocks instead of copying.

Measured: wall time, and the body bytes nginx sent during the arm (its access log).
Every clone is compared with the image. Ratios are per round (independent / cache),
median over the rounds with their min-max: the noise of this shared machine.

    python benchmarks/cache_bench.py [--size 128M] [--clones 20] [--rounds 5] [--xfs]
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from clone_bench import drop_caches, make_random  # noqa: E402
from results_file import write_section  # noqa: E402
from tests.integration.servers import Nginx  # noqa: E402

from liveclone.units import format_size, parse_size  # noqa: E402

LIVECLONE = str(Path(sys.executable).parent / "liveclone")


def cache_arm(url: str, cache_dir: str, clones: list[str]) -> None:
    """The ``cache`` arms, run in a child process: N sessions from one SourceCache."""
    from liveclone.session import CloneSession
    from liveclone.sources.cache import SourceCache

    errors: list[BaseException] = []

    def one(path: str) -> None:
        try:
            session = CloneSession(url, path, opener=cache.open).start()
            try:
                if not session.wait() or not session.clone.complete:
                    raise RuntimeError(f"{path}: {session.status()['last_error']}")
            finally:
                session.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with SourceCache(cache_dir) as cache:
        threads = [threading.Thread(target=one, args=(p,)) for p in clones]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


def independent_arm(url: str, clones: list[str]) -> None:
    procs = [subprocess.Popen([LIVECLONE, "clone", url, p], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for p in clones]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"liveclone clone failed: {err.decode()}")


@contextlib.contextmanager
def xfs_mount(where: Path, size: int) -> Iterator[Path]:
    """A fresh XFS with reflink on a sparse loop image, mounted at ``where``."""
    image = where.with_suffix(".xfs")
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    where.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
        image.unlink()


def run_rounds(args: argparse.Namespace, work: Path, place: Path, image: Path,
               size: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """The interleaved rounds; clones and cache directory under ``place``."""
    arms = ["cache", "cache warm", "independent"]
    times: dict[str, list[float]] = {a: [] for a in arms}
    sent: dict[str, list[int]] = {a: [] for a in arms}
    rng = random.Random(1)
    server = Nginx(work / "www", work / "nginx", access_log=True).start()
    url = server.url("disk.img")
    clones = [str(place / "clones" / f"c{i}.img") for i in range(args.clones)]
    try:
        for rnd in range(args.rounds):
            # "cache warm" needs the entry "cache" made: it follows it directly.
            order = ["independent", "cache"]
            rng.shuffle(order)
            order.insert(order.index("cache") + 1, "cache warm")
            shutil.rmtree(place / "cachedir", ignore_errors=True)
            for arm in order:
                shutil.rmtree(place / "clones", ignore_errors=True)
                (place / "clones").mkdir()
                drop_caches()
                before = server.bytes_sent()
                t0 = time.monotonic()
                if arm == "independent":
                    independent_arm(url, clones)
                else:
                    subprocess.run([sys.executable, __file__, "--child", url,
                                    str(place / "cachedir"), *clones], check=True)
                times[arm].append(time.monotonic() - t0)
                time.sleep(0.2)  # nginx logs a request when it ends
                sent[arm].append(server.bytes_sent() - before)
                for c in clones:
                    if not filecmp.cmp(c, image, shallow=False):
                        raise SystemExit(f"{arm}: {c} differs from the image")
                print(f"round {rnd + 1} {arm}: {times[arm][-1]:.2f} s, "
                      f"{format_size(sent[arm][-1])} from nginx", flush=True)
    finally:
        server.stop()
        shutil.rmtree(place / "clones", ignore_errors=True)
        shutil.rmtree(place / "cachedir", ignore_errors=True)
    return times, sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="128M")
    ap.add_argument("--clones", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=str(ROOT / "benchmarks" / "work" / "cache"))
    ap.add_argument("--xfs", action="store_true",
                    help="clones and cache on a loop-mounted XFS with reflink")
    ap.add_argument("--no-write", action="store_true", help="do not update results.md")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        cache_arm(args.child[0], args.child[1], args.child[2:])
        return
    size = parse_size(args.size)
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    (work / "www").mkdir(parents=True)
    image = work / "www" / "disk.img"
    make_random(image, size)
    with contextlib.ExitStack() as stack:
        place = (stack.enter_context(xfs_mount(work / "fs", args.clones * size * 2 + (1 << 30)))
                 if args.xfs else work)
        times, sent = run_rounds(args, work, place, image, size)

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}× ({min(values):.2f}-{max(values):.2f})"

    arms = list(times)
    med = {a: statistics.median(times[a]) for a in arms}
    rows = [
        f"| {a} | {med[a]:.2f} s ({min(times[a]):.2f}-{max(times[a]):.2f}) | "
        f"{format_size(int(statistics.median(sent[a])))} "
        f"({statistics.median(sent[a]) / size:.2f}× the image) |"
        for a in arms
    ]
    time_ratio = [i / c for i, c in zip(times["independent"], times["cache"], strict=True)]
    warm_ratio = [i / c for i, c in zip(times["independent"], times["cache warm"],
                                        strict=True)]
    byte_ratio = statistics.median(sent["independent"]) / max(statistics.median(sent["cache"]), 1)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    n = args.clones
    body = "\n".join([
        f"`python benchmarks/cache_bench.py --size {args.size} --clones {n} --rounds "
        f"{args.rounds}{' --xfs' if args.xfs else ''}` — {day}, {n} clones of one "
        f"{format_size(size)} image of random "
        f"data served by nginx on loopback, {args.rounds} rounds, arms in a shuffled order "
        "per round, each from a cold page cache. `cache`: one process, one `SourceCache` "
        f"in a fresh cache directory, {n} `CloneSession`s created at once in threads (as "
        "the daemon does); `cache warm`: the same on the complete cache the `cache` arm "
        f"left; `independent`: {n} `liveclone clone URL CLONE` "
        "processes at once. Time: until every clone is complete and its map committed. "
        "Bytes: body bytes nginx logged during the arm. Cells: median (min-max) over the "
        "rounds. Clones and cache on "
        + ("a loop-mounted XFS with reflink (the warm arm's clones share the entry's "
           "blocks)." if args.xfs else "ext4 (no reflink: the warm arm copies)."),
        "",
        "| arm | time | bytes from nginx |",
        "|---|---|---|",
        *rows,
        "",
        f"Ratio independent / cache, per round: time {spread(time_ratio)}; against the "
        f"warm cache {spread(warm_ratio)}. Bytes: {byte_ratio:.1f}× fewer through the cache.",
    ])
    print(body)
    if not args.no_write:
        fs = "XFS, reflink" if args.xfs else "ext4"
        write_section(f"One fetch per source: {n} clones of one HTTP image ({fs})", body)


if __name__ == "__main__":
    main()
