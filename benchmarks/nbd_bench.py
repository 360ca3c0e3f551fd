"""NBD export benchmark: liveclone serve vs qemu-nbd vs nbdkit file, with fio.

    .venv/bin/python benchmarks/nbd_bench.py --size 1G [--runtime 4] [--rounds 5]
        [--base-src DIR] [--tests '4K randread QD32,...'] [--write-results]

Serves the same raw random-data file with: liveclone on a complete clone,
liveclone on a fresh clone still copying (copier held to 1 MiB/s, so reads come
from the source), ``qemu-nbd`` and ``nbdkit file`` (these two on a copy of the
file, since the write tests change it), ``nbdkit --filter=cow file`` on the
source (writes go to its overlay: the copying clone's peer), and, with
``--base-src``, an older
liveclone's ``src`` directory (e.g. from ``git archive``) on the complete clone.
Each round runs every test against every server in a shuffled order, over a unix
socket with fio's nbd engine, every image read back into the page cache first
(other jobs on a shared machine drop caches). Per round and test, liveclone
(complete) / peer is a ratio; the report gives the median ratio over the rounds
and its min-max, which is the machine's noise. Then the time from spawning each
server to its first 4 KiB read answered, for a 1 GiB and a 1 TiB sparse source,
interleaved the same way. With ``--write-results`` the "NBD export" section of
benchmarks/results.md is replaced (other sections are kept). Not a test: nothing
here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
    ("4K randwrite QD1", ["--rw=randwrite", "--bs=4k", "--iodepth=1"]),
    ("4K randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
    ("1M seq read QD8", ["--rw=read", "--bs=1M", "--iodepth=8"]),
    # Four connections (fio opens one per job), QD8 each.
    ("4K randread 4 conn QD8", ["--rw=randread", "--bs=4k", "--iodepth=8", "--numjobs=4",
                                "--group_reporting"]),
]
SERVERS = ["liveclone (complete)", "liveclone (copying)", "qemu-nbd", "nbdkit file",
           "nbdkit cow"]
BASE = "liveclone (base)"
PEERS = ["qemu-nbd", "nbdkit file"]


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


BASE_SRC: str | None = None  # --base-src: an older liveclone's src directory


def spawn(kind: str, image: Path, clone: Path, sock: Path) -> subprocess.Popen[bytes]:
    sock.unlink(missing_ok=True)
    if kind.startswith("liveclone"):
        rate = ["--rate", "1M"] if "copying" in kind else []
        args = ["serve", str(image), str(clone), "--socket", str(sock), "--export-name", "",
                *rate]
        env = None
        cmd = [LIVECLONE]
        if kind == BASE:
            assert BASE_SRC is not None
            env = {**os.environ, "PYTHONPATH": BASE_SRC}
            cmd = [sys.executable, "-c", "from liveclone.cli.main import main; main()"]
        return subprocess.Popen([*cmd, *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kind == "qemu-nbd":
        return subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), "-t", "-e", "16",
                                 "--cache=writeback", "--aio=threads", str(image)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kind == "nbdkit file":
        return subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "file", f"file={image}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kind == "nbdkit cow":  # the source read-only below, writes in a fresh overlay
        return subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "--filter=cow", "file",
                                 f"file={image}"],
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
    jobs = json.loads(res.stdout[res.stdout.index("{"):])["jobs"]
    key = "write" if "write" in "".join(args) else "read"
    return {"iops": sum(j[key]["iops"] for j in jobs),
            "bw": sum(j[key]["bw_bytes"] for j in jobs)}


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise ConnectionError("closed")
        buf += got
    return buf


def first_read(sock: Path) -> bytes:
    """Handshake (GO on the default export) and one 4 KiB read at 0, by hand; its bytes."""
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
        return recv_exact(s, 4096)


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


def run_fio(kind: str, fio_args: list[str], src: Path, peer: Path, done: Path, work: Path,
            size: int, runtime: float) -> dict[str, float]:
    image = src if kind.startswith("liveclone") or kind == "nbdkit cow" else peer
    clone = work / "live.img" if "copying" in kind else done
    if "copying" in kind:  # a fresh clone for every run: still mostly absent
        for p in work.glob("live.img*"):
            p.unlink()
    for path in (src, peer, done):  # the same page-cache state for every server
        warm(path)
    with running(kind, image, clone, work / "b.sock") as uri:
        return fio(uri, fio_args, size, runtime)


def main() -> None:
    global BASE_SRC
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="size of the served image (default 1G)")
    ap.add_argument("--runtime", type=float, default=4, help="seconds per fio run")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--tests", default=None,
                    help="comma-separated test names (default: all)")
    ap.add_argument("--base-src", default=None,
                    help="an older liveclone's src directory, run as a fifth server")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "nbd"))
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(args.work)
    tests = [t for t in TESTS if args.tests is None or t[0] in args.tests.split(",")]
    servers = list(SERVERS)
    if args.base_src:
        BASE_SRC = os.path.abspath(args.base_src)
        servers.insert(1, BASE)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random()
    # Compiled modules, as an installed wheel has them: an editable install under
    # PYTHONDONTWRITEBYTECODE would otherwise compile every edited module at each start.
    for tree in [ROOT / "src", *([Path(BASE_SRC)] if BASE_SRC else [])]:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree)], check=True)
    try:
        src = work / "source.img"
        peer = work / "peer.img"
        print(f"making a {format_size(size)} random image ...", file=sys.stderr)
        make_random_file(src, size)
        shutil.copyfile(src, peer)
        done = work / "done.img"
        subprocess.run([LIVECLONE, "clone", "--no-progress", str(src), str(done)], check=True)
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for rnd in range(args.rounds):
            cells = [(test, kind) for test in tests for kind in servers]
            rng.shuffle(cells)
            for (test, fio_args), kind in cells:
                r = run_fio(kind, fio_args, src, peer, done, work, size, args.runtime)
                results.setdefault((test, kind), []).append(r)
                print(f"round {rnd + 1} {test:24} {kind:22} {r['iops']:10.0f} IOPS "
                      f"{r['bw'] / 1e6:8.1f} MB/s", file=sys.stderr)
        body = report(results, tests, servers, size, args)
        print(f"{HEADING}\n\n{body}")
        if args.write_results:
            write_section(HEADING, body)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _value(test: str, r: dict[str, float]) -> float:
    return r["bw"] if "1M" in test else r["iops"]


def _cell(test: str, v: float) -> str:
    return f"{v / 1e6:.0f} MB/s" if "1M" in test else f"{v / 1000:.1f}k"


def report(results: dict[tuple[str, str], list[dict[str, float]]],
           tests: list[tuple[str, list[str]]],
           servers: list[str], size: int, args: argparse.Namespace) -> str:
    rounds = args.rounds
    lines = [
        f"`python benchmarks/nbd_bench.py --size {format_size(size).replace(' ', '')} "
        f"--runtime {args.runtime:g} --rounds {rounds}` — {date.today().isoformat()}, fio's "
        "nbd engine over a unix socket, every image read back into the page cache before "
        f"each run, {rounds} rounds, each running every (test, server) cell once in a "
        "shuffled order, on this 2-vCPU machine. Cells: median over the rounds (IOPS, or "
        "MB/s for 1M). Ratios: liveclone (complete) / peer within each round, median over "
        "the rounds, and in brackets their min-max, which is the noise of the machine. "
        "`copying`: a fresh clone whose copier is held to 1 MiB/s, so nearly every read "
        "goes to the source and nearly every write lands in a region not yet copied "
        "(as 4 KiB sub-blocks, with no source read).",
        "",
        "| test | " + " | ".join(servers) + " | vs qemu-nbd | vs nbdkit |",
        "|---|" + "---|" * (len(servers) + 2),
    ]
    for test, _ in tests:
        cells = [_cell(test, statistics.median(_value(test, r) for r in results[(test, k)]))
                 for k in servers]
        ours = [_value(test, r) for r in results[(test, SERVERS[0])]]
        ratios = []
        for peer in PEERS:
            rs = [a / _value(test, b) for a, b in zip(ours, results[(test, peer)],
                                                     strict=True)]
            ratios.append(f"{statistics.median(rs):.2f}× ({min(rs):.2f}-{max(rs):.2f})")
        lines.append(f"| {test} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines += [
        "",
        "A clone still copying against the complete clone and against `nbdkit "
        "--filter=cow` on the source (per-round ratios, median, min-max in brackets):",
        "",
        "| test | copying / complete | copying / nbdkit cow |",
        "|---|---|---|",
    ]
    for test, _ in tests:
        ours = [_value(test, r) for r in results[(test, "liveclone (copying)")]]
        cells = []
        for peer in ("liveclone (complete)", "nbdkit cow"):
            rs = [a / _value(test, b) for a, b in zip(ours, results[(test, peer)], strict=True)]
            cells.append(f"{statistics.median(rs):.2f}× ({min(rs):.2f}-{max(rs):.2f})")
        lines.append(f"| {test} | " + " | ".join(cells) + " |")
    lines += ["", "Time from spawning a server to its first read: `benchmarks/start_bench.py` "
              "(section Start-up)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
