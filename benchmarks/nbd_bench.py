"""NBD export benchmark: liveclone serve vs qemu-nbd vs nbdkit file, with fio.

    .venv/bin/python benchmarks/nbd_bench.py --size 4G [--runtime 10] [--write-results]

Serves the same raw random-data file with: liveclone on a complete clone,
liveclone on a fresh clone still copying (copier held to 1 MiB/s, so reads come
from the source), ``qemu-nbd`` and ``nbdkit file`` (these two on a copy of the
file, since the write test changes it). Each fio test runs against each server in
turn (interleaved), over a unix socket with fio's nbd engine. Then the time from
spawning ``liveclone serve`` on a new clone to the first 4 KiB read answered, for
a 1 GiB and a 1 TiB sparse source, beside the same for qemu-nbd and nbdkit.
With ``--write-results`` the "NBD export" section of benchmarks/results.md is
replaced (other sections are kept). Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

sys.path.insert(0, str(ROOT / "benchmarks"))

from results_file import write_section  # noqa: E402

from liveclone.nbdwire import wire  # noqa: E402
from liveclone.process import stop_process  # noqa: E402
from liveclone.units import format_size, parse_size  # noqa: E402

LIVECLONE = str(Path(sys.executable).parent / "liveclone")
HEADING = "NBD export"

TESTS = [  # name, fio arguments
    ("4K randread QD1", ["--rw=randread", "--bs=4k", "--iodepth=1"]),
    ("4K randread QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"]),
    ("4K randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
    ("1M seq read QD8", ["--rw=read", "--bs=1M", "--iodepth=8"]),
]
SERVERS = ["liveclone (complete)", "liveclone (copying)", "qemu-nbd", "nbdkit file"]


def make_random_file(path: Path, size: int) -> None:
    block = os.urandom(64 << 20)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
            block = block[1:] + block[:1]  # no two blocks alike
        f.flush()
        os.fsync(f.fileno())


def wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, 30)


def spawn(kind: str, image: Path, clone: Path, sock: Path) -> subprocess.Popen[bytes]:
    sock.unlink(missing_ok=True)
    if kind.startswith("liveclone"):
        rate = ["--rate", "1M"] if "copying" in kind else []
        return subprocess.Popen([LIVECLONE, "serve", str(image), str(clone), "--socket",
                                 str(sock), "--export-name", "", *rate],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kind == "qemu-nbd":
        return subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), "-t", "-e", "16",
                                 "--cache=writeback", "--aio=threads", str(image)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kind == "nbdkit file":
        return subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "file", f"file={image}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    raise ValueError(kind)


@contextmanager
def running(kind: str, image: Path, clone: Path, sock: Path) -> Iterator[str]:
    proc = spawn(kind, image, clone, sock)
    try:
        wait_socket(sock, proc)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        stop(proc)


def fio(uri: str, args: list[str], size: int, runtime: float) -> dict[str, float]:
    res = subprocess.run(
        ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--size={size}",
         f"--runtime={runtime}", "--time_based", "--output-format=json", "--randrepeat=0",
         *args], capture_output=True, text=True, check=True)
    job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    side = job["write"] if "write" in "".join(args) else job["read"]
    return {"iops": side["iops"], "bw": side["bw_bytes"]}


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise ConnectionError("closed")
        buf += got
    return buf


def first_read(sock: Path) -> None:
    """Handshake (GO on the default export) and one 4 KiB read, by hand."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        recv_exact(s, wire.GREETING.size)
        s.sendall(wire.encode_client_flags(wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES)
                  + wire.encode_option(wire.Opt.GO, wire.encode_info_request("", [])))
        while True:
            hdr = wire.decode_option_reply_header(recv_exact(s, wire.OPTION_REPLY_HEADER.size))
            recv_exact(s, hdr.length)
            if hdr.reply == wire.Rep.ACK:
                break
            if wire.is_error_reply(hdr.reply):
                raise ConnectionError(f"GO refused: {hdr.reply:#x}")
        s.sendall(wire.encode_request(wire.Cmd.READ, 1, 0, 4096))
        _, error, _ = wire.decode_simple_reply(recv_exact(s, wire.SIMPLE_REPLY.size))
        if error:
            raise OSError(error, "first read failed")
        recv_exact(s, 4096)


def time_to_first_read(kind: str, image: Path, work: Path) -> float:
    clone = work / "ttfr-clone.img"
    sock = work / "ttfr.sock"
    for p in [*work.glob("ttfr-clone.img*"), sock]:
        p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = spawn(kind, image, clone, sock)
    try:
        while True:
            try:
                first_read(sock)
                return time.perf_counter() - t0
            except (OSError, ConnectionError):
                if proc.poll() is not None:
                    raise RuntimeError(f"{kind} exited with {proc.returncode}") from None
                time.sleep(0.001)
    finally:
        stop(proc)
        for p in work.glob("ttfr-clone.img*"):
            p.unlink()


def warm(path: Path) -> None:
    """Evict a file from the page cache, then read it all back, so every server
    starts warm and in the same state. (liveclone's copier writes with direct I/O,
    leaving nothing cached, while cp leaves small dirty folios behind; readahead
    brings large folios, and the first 4 KiB write into one costs several times more
    than into a small one: measured 22k against 108k writes/s.)"""
    with open(path, "rb", buffering=0) as f:
        os.fsync(f.fileno())  # clean pages can be dropped
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        while f.read(8 << 20):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4G", help="size of the served image (default 4G)")
    ap.add_argument("--runtime", type=float, default=10, help="seconds per fio run")
    ap.add_argument("--ttfr-runs", type=int, default=5, help="runs per time-to-first-read")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "nbd"))
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        src = work / "source.img"
        peer = work / "peer.img"
        print(f"making a {format_size(size)} random image ...", file=sys.stderr)
        make_random_file(src, size)
        shutil.copyfile(src, peer)
        done = work / "done.img"
        subprocess.run([LIVECLONE, "clone", "--no-progress", str(src), str(done)], check=True)
        for image in (src, peer, done):  # the same page-cache state for every server
            warm(image)
        results: dict[tuple[str, str], dict[str, float]] = {}
        for test, fio_args in TESTS:
            for kind in SERVERS:
                image = src if kind.startswith("liveclone") else peer
                clone = done if "complete" in kind else work / "live.img"
                if "copying" in kind:  # a fresh clone for every test: still mostly absent
                    for p in work.glob("live.img*"):
                        p.unlink()
                with running(kind, image, clone, work / "b.sock") as uri:
                    r = fio(uri, fio_args, size, args.runtime)
                results[(test, kind)] = r
                print(f"{test:20} {kind:22} {r['iops']:10.0f} IOPS {r['bw'] / 1e6:8.1f} MB/s",
                      file=sys.stderr)
        ttfr: dict[tuple[str, str], float] = {}
        for label, tsize in (("1 GiB", 1 << 30), ("1 TiB", 1 << 40)):
            sparse = work / f"sparse-{label.replace(' ', '')}.img"
            with open(sparse, "wb") as f:
                f.truncate(tsize)
                f.write(os.urandom(4096))
            for kind in ("liveclone (copying)", "qemu-nbd", "nbdkit file"):
                times = [time_to_first_read(kind, sparse, work) for _ in range(args.ttfr_runs)]
                ttfr[(label, kind)] = statistics.median(times)
                print(f"first read {label} {kind}: {ttfr[(label, kind)] * 1000:.0f} ms",
                      file=sys.stderr)
        body = report(results, ttfr, size, args.runtime, args.ttfr_runs)
        print(f"{HEADING}\n\n{body}")
        if args.write_results:
            write_section(HEADING, body)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict[tuple[str, str], dict[str, float]],
           ttfr: dict[tuple[str, str], float], size: int, runtime: float, runs: int) -> str:
    lines = [
        f"`python benchmarks/nbd_bench.py --size {format_size(size).replace(' ', '')} "
        f"--runtime {runtime:g}` — {date.today().isoformat()}, one interleaved run per "
        "cell, fio's nbd engine over a unix socket, warm page cache, on this 2-vCPU "
        "machine (shared: expect ±50% noise). `copying`: a fresh clone whose copier is held "
        "to 1 MiB/s, so nearly every read goes to the source and every write first fills "
        "its 64 KiB region. Ratio = liveclone (complete) / peer.",
        "",
        "| test | " + " | ".join(SERVERS) + " | vs qemu-nbd | vs nbdkit |",
        "|---|" + "---|" * (len(SERVERS) + 2),
    ]
    for test, _ in TESTS:
        cells = []
        for kind in SERVERS:
            r = results[(test, kind)]
            cells.append(f"{r['bw'] / 1e6:.0f} MB/s" if "1M" in test
                         else f"{r['iops'] / 1000:.1f}k IOPS")
        ours = results[(test, SERVERS[0])]["iops"]
        q = ours / results[(test, "qemu-nbd")]["iops"]
        k = ours / results[(test, "nbdkit file")]["iops"]
        lines.append(f"| {test} | " + " | ".join(cells) + f" | {q:.2f}× | {k:.2f}× |")
    lines += [
        "",
        f"Time from spawning the server to the first 4 KiB read answered (median of {runs}; "
        "liveclone includes creating the clone and its map, and Python start-up):",
        "",
        "| source | liveclone serve (new clone) | qemu-nbd | nbdkit file |",
        "|---|---|---|---|",
    ]
    for label in ("1 GiB", "1 TiB"):
        lines.append(f"| {label} sparse | " + " | ".join(
            f"{ttfr[(label, k)] * 1000:.0f} ms"
            for k in ("liveclone (copying)", "qemu-nbd", "nbdkit file")) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
