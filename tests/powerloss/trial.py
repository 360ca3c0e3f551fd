"""One power-loss trial of liveclone, with real processes; shared by the test and
the soak (``scripts/powerloss-soak.py``).

A trial:

1. ``liveclone serve SOURCE CLONE`` with the clone on plfs (unsynced data is lost
   at a cut), a rate-limited copier, and compaction forced often
   (``LIVECLONE_COMPACT_RECORDS``);
2. ``qemu-io`` batches over NBD: a few random writes and zero-writes, then a
   ``flush``. A batch whose qemu-io exits 0 is acknowledged;
3. at a random moment: freeze the filesystem (nothing more reaches it), ``kill
   -9`` the server and qemu-io, and cut power (each unsynced 4 KiB page kept or
   lost by a coin), or, in some trials, only ``kill -9`` (the page cache survives);
4. reopen: ``liveclone status --json`` must succeed (never "corrupt"), and
   ``liveclone clone`` must finish the copy. With 16K and 64K regions, the small
   writes into absent regions leave them absent with written 4 KiB sub-blocks,
   committed in the journal (and the superblock, at compaction) beside the
   regions: ``regions_partial`` counts those that survived the crash;
5. check the finished clone byte by byte: every byte is the source's or an
   acknowledged write's as of the last completed flush, or a value some
   unacknowledged write put there. Nothing else: no garbage, no zeros nobody wrote;
6. verify it against its digests and the source (``core.verify``): no mismatch (a
   guest's bytes, acknowledged or not, sit only in regions marked "guest"), no
   damaged or missing digest; then one byte flipped in a copied region behind
   liveclone's back is found there, and only there.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

LIVECLONE = [sys.executable, "-m", "liveclone.cli.main"]


@dataclass
class Model:
    """What the clone may hold: ``acked`` is source ⊕ writes acknowledged by a
    completed flush; ``pending`` are later writes (off, length, byte), any of which
    may or may not have reached the disk, page by page."""

    acked: bytearray
    pending: list[tuple[int, int, int]] = field(default_factory=list)

    def check(self, got: bytes) -> str | None:
        """None if ``got`` is allowed, else where and how it is wrong."""
        if len(got) != len(self.acked):
            return f"clone is {len(got)} bytes, expected {len(self.acked)}"
        page = 4096
        by_page: dict[int, list[tuple[int, int, int]]] = {}
        for o, n, v in self.pending:
            for p in range(o // page, (o + n - 1) // page + 1):
                by_page.setdefault(p, []).append((o, n, v))
        for off in range(0, len(got), page):
            if got[off:off + page] == self.acked[off:off + page]:
                continue
            near = by_page.get(off // page, [])
            for b in range(off, min(off + page, len(got))):
                if got[b] == self.acked[b]:
                    continue
                if not any(o <= b < o + n and got[b] == v for o, n, v in near):
                    return (f"byte {b} is {got[b]:#x}: neither the acknowledged "
                            f"{self.acked[b]:#x} nor any unacknowledged write's value")
        return None


@dataclass
class Result:
    seed: int
    kind: str  # "kill", "cut" (at a random moment), "cut@journal" / "cut@clone" /
    # "cut@torn" (at a sync of that file; of a multi-page commit)
    acked_batches: int
    pending_writes: int
    present_after: int
    partial_after: int = 0  # absent regions with committed sub-blocks after the crash
    error: str | None = None
    log: list[str] = field(default_factory=list)


def make_source(path: Path, size: int, seed: int) -> bytes:
    """Random data with some zero stretches (they become holes in the clone)."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    for _ in range(4):
        a = rng.randrange(0, size - 65536)
        data[a:a + rng.randrange(4096, 65536)] = bytes(rng.randrange(4096, 65536))
    data = data[:size]
    path.write_bytes(bytes(data))
    return bytes(data)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["LIVECLONE_COMPACT_RECORDS"] = "4"
    env.pop("LIVECLONE_DEBUG", None)
    return env


def run_trial(fs: object, workdir: Path, source: Path, data: bytes, seed: int,
              max_wait: float = 2.0) -> Result:
    """One trial on the mounted plfs ``fs`` (a ``tests.powerloss.PLFS``); a timed cut
    comes up to ``max_wait`` seconds after the guest starts."""
    rng = random.Random(seed)
    kind = rng.choice(["kill", "cut", "cut", "cut@journal", "cut@torn", "cut@clone",
                       "cut@digest"])
    mnt = Path(fs.mountpoint)  # type: ignore[attr-defined]
    clone = mnt / f"c{seed}.img"
    sock = workdir / f"s{seed}.sock"
    region = rng.choice(["4K", "4K", "16K", "64K"])
    # writeback: writes pile up until the flush (a big commit); writethrough: every
    # write is FUA (a commit each).
    cache = rng.choice(["writeback", "writeback", "writethrough"])
    rate = rng.choice(["512K", "1M", "4M", "64M"])
    torn = kind == "cut@torn"
    if torn:  # scattered writes to small absent regions: many ranges in one commit
        cache, region, rate = "writeback", "4K", "512K"
    model = Model(bytearray(data))
    res = Result(seed, kind, 0, 0, 0)
    serve_log = workdir / "serve.log"
    with open(serve_log, "wb") as log:
        serve = subprocess.Popen(
            [*LIVECLONE, "serve", str(source), str(clone), "--socket", str(sock),
             "--region-size", region, "--rate", rate],
            stdout=subprocess.PIPE, stderr=log, env=_env(), start_new_session=True)
    assert serve.stdout is not None
    with serve.stdout:
        uri = serve.stdout.readline().decode().strip()
    if not uri:
        serve.kill()
        serve.wait()
        res.error = f"serve did not start: {serve_log.read_text()[-2000:]}"
        return res
    stop = threading.Event()
    current: list[subprocess.Popen[bytes]] = []

    def guest() -> None:
        wrng = random.Random(seed * 7 + 1)
        while not stop.is_set():
            batch = []
            cmds: list[str] = []
            # Some batches scatter hundreds of small writes: their flush commits
            # hundreds of ranges, a journal commit spanning several pages.
            scatter = torn or wrng.random() < 0.3
            for _ in range(wrng.randrange(100, 300) if scatter else wrng.randrange(1, 5)):
                off = wrng.randrange(0, len(data) - 1) // 512 * 512
                n = 512 if scatter else min(
                    wrng.choice([512, 4096, 12288, 65536, 200000]), len(data) - off)
                if wrng.random() < 0.15:
                    value = 0
                    cmds += ["-c", f"write -z {off} {n}"]
                else:
                    value = wrng.randrange(1, 256)
                    cmds += ["-c", f"write -P {value} {off} {n}"]
                batch.append((off, n, value))
            # Until qemu-io says the flush completed, these writes are unacknowledged.
            model.pending.extend(batch)
            p = subprocess.Popen(["qemu-io", "-f", "raw", "-t", cache, *cmds, "-c", "flush", uri],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 start_new_session=True)
            current[:] = [p]
            _, err = p.communicate()
            if p.returncode != 0 or b"error" in err.lower() or b"failed" in err.lower():
                return  # the cut came (or the server failed): stay unacknowledged
            for off, n, value in model.pending:
                model.acked[off:off + n] = bytes([value]) * n
            model.pending.clear()
            res.acked_batches += 1

    t = threading.Thread(target=guest, daemon=True)
    if kind.startswith("cut@"):
        # Freeze at the n-th sync of the journal (or the clone file): the cut lands
        # while a commit's pages (or its data) are written and not yet synced.
        # cut@torn: at the first sync of a commit that spans pages (some may be kept
        # and others lost: a torn commit, never acknowledged).
        # cut@digest: at a sync of the digest slots (a commit's step 1b, or a
        # guest's write intent).
        suffix = {"cut@clone": clone.name, "cut@digest": ".lcdigest"}.get(kind, ".lcjournal")
        n, pages = (1, 2) if kind == "cut@torn" else (rng.randrange(1, 40), 0)
        fs.arm(suffix, n, pages)  # type: ignore[attr-defined]
    t.start()
    if torn:  # until the armed sync froze the filesystem
        deadline = time.monotonic() + 10
        while not fs.stats()["frozen"] and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.02)
    else:
        time.sleep(rng.uniform(0.05, max_wait))
    if kind.startswith("cut"):
        fs.freeze()  # type: ignore[attr-defined]
    stop.set()
    for p in (serve, *current):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    serve.wait()
    for p in current:
        p.wait()
    t.join(10)
    if kind.startswith("cut"):
        p = 0.5 if torn else rng.choice([0.0, 0.5, 0.5, 1.0])
        fs.cut(p=p, seed=seed)  # type: ignore[attr-defined]
    res.pending_writes = len(model.pending)
    # Reopen: status must read the map, the copy must finish.
    st = subprocess.run([*LIVECLONE, "status", "--json", str(clone)], capture_output=True,
                        env=_env(), timeout=60)
    if st.returncode != 0:
        res.error = f"status exited {st.returncode}: {st.stderr.decode()[-2000:]}"
        return res
    res.present_after = json.loads(st.stdout)["regions_present"]
    res.partial_after = json.loads(st.stdout)["regions_partial"]
    done = subprocess.run([*LIVECLONE, "clone", str(source), str(clone)], capture_output=True,
                          env=_env(), timeout=120)
    if done.returncode != 0:
        res.error = f"clone exited {done.returncode}: {done.stderr.decode()[-2000:]}"
        return res
    res.error = model.check(clone.read_bytes())
    if res.error is None:
        res.error = check_digests(clone, source, rng)
    if res.error is None:
        for suffix in ("", ".lcmap", ".lcjournal", ".lcdigest", ".lcstatus", ".lcpause"):
            try:
                os.unlink(str(clone) + suffix)
            except FileNotFoundError:
                pass
    return res


def check_digests(clone: Path, source: Path, rng: random.Random) -> str | None:
    """Step 6: the digests of the finished clone after the crash."""
    from liveclone.core.verify import verify_clone
    from liveclone.sources.local import LocalFileSource

    with LocalFileSource(str(source)) as src:
        rep = verify_clone(str(clone), src)
    if not rep.ok or rep.unverified_count or rep.matched + rep.guest_count != rep.regions_total:
        return f"verify after the crash: {rep.to_json()}"
    guest = {r for a, b in rep.guest_runs for r in range(a, b)}
    copied = [r for r in range(rep.regions_total) if r not in guest]
    if not copied:
        return None
    r = rng.choice(copied)
    off = r * rep.region_size + rng.randrange(min(rep.region_size, clone.stat().st_size
                                                  - r * rep.region_size))
    with open(clone, "r+b") as f:
        f.seek(off)
        old = f.read(1)
        f.seek(off)
        f.write(bytes([old[0] ^ 0x5A]))
    rep = verify_clone(str(clone))
    if rep.mismatched != [r] or rep.mismatch_count != 1:
        return f"a byte flipped at {off} (region {r}) was not found alone: {rep.to_json()}"
    return None
