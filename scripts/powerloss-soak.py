#!/usr/bin/env python3
"""Power-loss soak: thousands of the trials ``make test`` runs a hundred of.

Each trial serves a clone on plfs (a FUSE filesystem that loses unsynced pages at
a power cut), writes and flushes through qemu-io while the copier runs and the
journal compacts, then cuts power or kill -9s at a random moment (or exactly at a
journal or clone sync), reopens, finishes the copy and checks every byte. See
``tests/powerloss/trial.py``.

    .venv/bin/python scripts/powerloss-soak.py --trials 10000 --jobs 3

Prints progress, then a summary; exits 1 if any trial failed (its seed reproduces
it: ``--first SEED --trials 1``).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.powerloss import powerloss_mount  # noqa: E402
from tests.powerloss.trial import make_source, run_trial  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10000)
    ap.add_argument("--first", type=int, default=0, help="seed of the first trial")
    ap.add_argument("--jobs", type=int, default=2, help="filesystems run side by side")
    ap.add_argument("--size", type=int, default=8 << 20, help="source size in bytes")
    ap.add_argument("--max-wait", type=float, default=2.0,
                    help="a timed cut comes up to this many seconds into a trial")
    args = ap.parse_args()
    seeds = iter(range(args.first, args.first + args.trials))
    lock = threading.Lock()
    kinds: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    done = [0, 0]  # trials, acknowledged batches
    started = time.monotonic()

    def job(index: int) -> None:
        with tempfile.TemporaryDirectory(prefix=f"lc-soak{index}-") as d:
            tmp = Path(d)
            source = tmp / "src.img"
            data = make_source(source, args.size, seed=index + 1)
            with powerloss_mount(tmp, seed=1000 + index) as fs:
                while True:
                    with lock:
                        seed = next(seeds, None)
                    if seed is None:
                        return
                    res = run_trial(fs, tmp, source, data, seed, args.max_wait)
                    with lock:
                        kinds[res.kind] += 1
                        done[0] += 1
                        done[1] += res.acked_batches
                        if res.error is not None:
                            failures.append(f"seed {seed} ({res.kind}): {res.error}")
                            print(f"FAIL seed {seed} ({res.kind}): {res.error}", flush=True)
                        if done[0] % 100 == 0:
                            rate = done[0] / (time.monotonic() - started)
                            print(f"{done[0]} trials, {len(failures)} failed, "
                                  f"{rate:.2f}/s, {dict(kinds)}", flush=True)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(args.jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    print(f"\n{done[0]} trials in {elapsed:.0f} s ({dict(kinds)}), "
          f"{done[1]} acknowledged flush batches checked, {len(failures)} failed")
    for f in failures:
        print(f"  {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
