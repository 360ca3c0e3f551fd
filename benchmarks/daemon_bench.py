"""The daemon: time from an API request to the first NBD read answered, its memory
with many clones, and 20 clones of one HTTP image through it.

* ``first read``: a running ``liveclone daemon``; for each of N clones (default 50)
  of one local image, the time from sending ``POST /v1/clones`` (http.client over
  the unix socket) to the first 4 KiB read answered on the clone's export (our NBD
  client: a new connection, a handshake, one READ). Reported at the 1st and the Nth
  clone and the median of all, beside ``qemu-nbd``'s spawn-to-read (spawn, connect
  until it answers, the same read), measured interleaved in the same run.
* ``memory``: the daemon's RSS (VmRSS) and threads with 0 clones, with N clones
  copying, and when all are complete.
* ``http``: 20 clones of one image behind a real nginx (access log of body bytes):
  created at once through the daemon (its source cache fetches the image once),
  against 20 independent ``liveclone clone URL CLONE`` processes started at once.
  Wall time until every clone is complete, and the bytes nginx sent.

Results go to the "Daemon" section of benchmarks/results.md with --write-results.
Not a test: it asserts only that clones read back right.

    python benchmarks/daemon_bench.py [--clones 50] [--http-size 128M] [--write-results]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from results_file import write_section  # noqa: E402
from tests.integration.servers import Nginx  # noqa: E402

from liveclone.nbdwire.client import Connection, parse_uri  # noqa: E402
from liveclone.units import format_size, parse_size  # noqa: E402

LIVECLONE = str(Path(sys.executable).parent / "liveclone")


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=120)
        self.path_ = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path_)


def api(sock: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = _Unix(sock)
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def first_read(uri: str) -> bytes:
    c = Connection(parse_uri(uri), timeout=30)
    try:
        buf = bytearray(4096)
        c.pread_into(memoryview(buf), 0)
        return bytes(buf)
    finally:
        c.close()


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS bytes, threads) of a process."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["Threads"])


class Daemon:
    def __init__(self, work: Path, *args: str) -> None:
        self.work = work
        self.api = str(work / "api.sock")
        self.nbd = str(work / "nbd.sock")
        self.log = open(work / "daemon.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [LIVECLONE, "daemon", "--state-dir", str(work / "state"), "--api", self.api,
             "--nbd-socket", self.nbd, *args], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while True:
            try:
                if api(self.api, "GET", "/openapi.json")[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start: see " + str(work / "daemon.log"))
            time.sleep(0.02)

    def wait_complete(self, names: list[str], timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            _, clones = api(self.api, "GET", "/v1/clones")
            phases = {c["name"]: c["status"]["phase"] for c in clones}
            if all(phases.get(n) == "complete" for n in names):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not complete: {phases}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)
        self.log.close()


def qemu_nbd_spawn_to_read(src: Path, work: Path) -> float:
    sock = str(work / "qemu-nbd.sock")
    started = time.perf_counter()
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-r", "--socket", sock, "-x", "disk",
                             str(src)], stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                first_read(f"nbd+unix:///disk?socket={sock}")
                return time.perf_counter() - started
            except Exception:  # noqa: BLE001 - not listening yet
                if proc.poll() is not None:
                    raise RuntimeError("qemu-nbd exited") from None
                time.sleep(0.0005)
    finally:
        proc.terminate()
        proc.wait()


def bench_first_read(work: Path, clones: int, size: int) -> dict[str, Any]:
    src = work / "golden.img"
    with open(src, "wb") as f:
        for _ in range(size // (4 << 20)):
            f.write(os.urandom(4 << 20))
    expected = src.read_bytes()[:4096]
    d = Daemon(work, "--rate", "64M")
    try:
        base = rss(d.proc.pid)
        times: list[float] = []
        qemu: list[float] = []
        for i in range(clones):
            started = time.perf_counter()
            code, answer = api(d.api, "POST", "/v1/clones",
                               {"source": str(src), "clone": str(work / f"c{i}.img"),
                                "name": f"c{i}"})
            assert code == 201, answer
            assert first_read(answer["nbd_uri"]) == expected
            times.append(time.perf_counter() - started)
            if i % 5 == 0 or i == clones - 1:  # interleaved with the daemon's
                qemu.append(qemu_nbd_spawn_to_read(src, work))
        copying = rss(d.proc.pid)
        d.wait_complete([f"c{i}" for i in range(clones)])
        complete = rss(d.proc.pid)
    finally:
        d.stop()
    return {"times": times, "qemu": qemu, "rss_base": base, "rss_copying": copying,
            "rss_complete": complete, "size": size, "clones": clones,
            "load": os.getloadavg()[0]}


def bench_http(work: Path, clones: int, size: int) -> dict[str, Any]:
    root = work / "www"
    root.mkdir()
    with open(root / "golden.img", "wb") as f:
        for _ in range(size // (4 << 20)):
            f.write(os.urandom(4 << 20))
    data = (root / "golden.img").read_bytes()
    nginx = Nginx(root, work / "nginx", access_log=True).start()
    out: dict[str, Any] = {}
    try:
        url = nginx.url("golden.img")
        # Through the daemon: one cache, every clone created at once.
        dwork = work / "daemon"
        dwork.mkdir()
        before = nginx.bytes_sent()
        started = time.perf_counter()
        d = Daemon(dwork)
        try:
            ready = time.perf_counter()
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(clones) as pool:
                answers = list(pool.map(lambda i: api(d.api, "POST", "/v1/clones", {
                    "source": url, "clone": str(dwork / f"c{i}.img"), "name": f"c{i}"}),
                    range(clones)))
            assert all(code == 201 for code, _ in answers), answers
            d.wait_complete([f"c{i}" for i in range(clones)])
            done = time.perf_counter()
        finally:
            d.stop()
        out["daemon"] = (done - ready, nginx.bytes_sent() - before, done - started)
        for i in range(clones):
            assert (dwork / f"c{i}.img").read_bytes() == data
        shutil.rmtree(dwork)
        # Independent processes.
        iwork = work / "independent"
        iwork.mkdir()
        before = nginx.bytes_sent()
        started = time.perf_counter()
        procs = [subprocess.Popen([LIVECLONE, "clone", url, str(iwork / f"c{i}.img")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for i in range(clones)]
        for p in procs:
            assert p.wait() == 0
        out["independent"] = (time.perf_counter() - started, nginx.bytes_sent() - before)
        for i in range(clones):
            assert (iwork / f"c{i}.img").read_bytes() == data
    finally:
        nginx.stop()
    out["size"], out["clones"] = size, clones
    return out


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


def report(fr: dict[str, Any], hb: dict[str, Any] | None) -> str:
    t, q = fr["times"], fr["qemu"]
    n = fr["clones"]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on this 2-core machine (shared: expect noise; "
        f"load average {fr['load']:.1f} during the run) by `benchmarks/daemon_bench.py`.",
        "",
        f"**API request to first NBD read answered** ({n} clones of one "
        f"{format_size(fr['size'])} local image, one after another, while the earlier "
        "ones copy): `POST /v1/clones` over the unix socket, then a new NBD connection, "
        "handshake and one 4 KiB READ of the new export.",
        "",
        "| | time |",
        "|---|---|",
        f"| daemon, 1st clone | {ms(t[0])} |",
        f"| daemon, {n}th clone | {ms(t[-1])} |",
        f"| daemon, median of all {n} (min-max) | {ms(statistics.median(t))} "
        f"({ms(min(t))}-{ms(max(t))}) |",
        f"| qemu-nbd spawn to first read, median of {len(q)} (min-max) | "
        f"{ms(statistics.median(q))} ({ms(min(q))}-{ms(max(q))}) |",
        "",
        "**Daemon memory** (VmRSS, threads):",
        "",
        "| | RSS | threads |",
        "|---|---|---|",
        f"| no clones | {format_size(fr['rss_base'][0])} | {fr['rss_base'][1]} |",
        f"| {n} clones, copying | {format_size(fr['rss_copying'][0])} | "
        f"{fr['rss_copying'][1]} |",
        f"| {n} clones, complete | {format_size(fr['rss_complete'][0])} | "
        f"{fr['rss_complete'][1]} |",
    ]
    if hb is not None:
        dt, db, dtotal = hb["daemon"]
        it, ib = hb["independent"]
        size = hb["size"]
        lines += [
            "",
            f"**{hb['clones']} clones of one HTTP image** ({format_size(size)} of random data "
            "behind nginx on loopback, access log of body bytes), created at once, until "
            "every clone is complete:",
            "",
            "| | wall time | bytes nginx sent | × image |",
            "|---|---|---|---|",
            f"| daemon (one source cache) | {dt:.1f} s ({dtotal:.1f} s with its start) | "
            f"{format_size(db)} | {db / size:.2f} |",
            f"| {hb['clones']} independent `liveclone clone` | {it:.1f} s | {format_size(ib)} | "
            f"{ib / size:.2f} |",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clones", type=int, default=50)
    ap.add_argument("--size", default="64M", help="local image size (first-read arm)")
    ap.add_argument("--http-clones", type=int, default=20)
    ap.add_argument("--http-size", default="128M")
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--dir", default=str(ROOT / "benchmarks" / "work" / "daemon"))
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    (work / "first").mkdir(parents=True)
    fr = bench_first_read(work / "first", args.clones, parse_size(args.size))
    shutil.rmtree(work / "first")
    hb = None
    if not args.no_http:
        (work / "http").mkdir()
        hb = bench_http(work / "http", args.http_clones, parse_size(args.http_size))
        shutil.rmtree(work / "http")
    text = report(fr, hb)
    print(text)
    if args.write_results:
        write_section("Daemon", text)


if __name__ == "__main__":
    main()
