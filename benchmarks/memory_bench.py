"""Peak memory of a server under 8 NBD connections at queue depth 32.

A new clone of a 1 TiB sparse source (64 MiB of random data at its start) is
served by `liveclone serve` (copier running), and the same source by qemu-nbd as
the peer; fio's nbd engine runs 8 jobs (8 connections) at iodepth 32, 4K random
read/write then 1M sequential and random reads, 8 s each. Reported: the server's
VmHWM (peak RSS) after each load, and fio's throughput.

    python benchmarks/memory_bench.py [--max-memory 64M] [--runtime 8]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIVECLONE = str(Path(sys.executable).with_name("liveclone"))
LOADS = (("randrw", "4k"), ("read", "1M"), ("randread", "1M"))


def hwm(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) << 10  # type: ignore[union-attr]


def wait_socket(sock: Path, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(500):
        if sock.exists():
            return
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        time.sleep(0.02)
    raise SystemExit("server did not start")


def run(name: str, argv: list[str], uri: str, sock: Path, runtime: float) -> list[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        wait_socket(sock, proc)
        time.sleep(1)
        for rw, bs in LOADS:
            out = subprocess.run(
                ["fio", "--name=m", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
                 f"--bs={bs}", "--iodepth=32", "--numjobs=8", "--size=1T",
                 f"--runtime={runtime}", "--time_based", "--group_reporting"],
                capture_output=True, text=True, check=True).stdout
            bw = ", ".join(m.group(0) for m in re.finditer(r"(read|write): IOPS=\S+ BW=\S+", out))
            rows.append(f"| {name} | {rw} {bs} | {hwm(proc.pid) >> 20} MiB | {bw} |")
            print(rows[-1], file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-memory", default=None, help="liveclone serve's --max-memory")
    ap.add_argument("--runtime", type=float, default=8)
    ap.add_argument("--dir", default=str(ROOT / "benchmarks" / "work" / "memory"))
    args = ap.parse_args()
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "src.img"
    with open(src, "wb") as f:
        f.write(os.urandom(64 << 20))
        f.truncate(1 << 40)
    sock = work / "s.sock"
    extra = ["--max-memory", args.max_memory] if args.max_memory else []
    rows = run(f"liveclone serve{' ' + ' '.join(extra) if extra else ''}",
               [LIVECLONE, "serve", str(src), str(work / "clone.img"), "--socket", str(sock),
                *extra], f"nbd+unix:///clone.img?socket={sock}", sock, args.runtime)
    sock.unlink(missing_ok=True)
    rows += run("qemu-nbd", ["qemu-nbd", "-k", str(sock), "-f", "raw", "-e", "8", "-t",
                             str(src)], f"nbd+unix:///?socket={sock}", sock, args.runtime)
    print("| server | load (8 connections, QD32) | peak RSS | fio |\n|---|---|---|---|")
    print("\n".join(rows))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
