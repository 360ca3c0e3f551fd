"""50 clones in one daemon on this 2-core machine: each made through the API in
milliseconds however many exist, all on the one NBD socket, all complete; the
daemon's memory follows its copier pool, not the number of clones."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

from tests.conftest import make_image
from tests.integration.daemon_kit import Daemon, qemu_io

CLONES = 50


def _rss_threads(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines())
    return int(fields["VmRSS"].split()[0]) << 10, int(fields["Threads"])


def test_fifty_clones(tmp_path: Path) -> None:
    src = tmp_path / "golden.img"
    data = make_image(src, 4 << 20)
    daemon = Daemon(tmp_path, "--max-copiers", "2").start()
    try:
        assert daemon.proc is not None
        times = []
        for i in range(CLONES):
            started = time.perf_counter()
            daemon.add(src, tmp_path / f"c{i:02}.img", name=f"c{i:02}")
            times.append(time.perf_counter() - started)
        listed = subprocess.run(["nbdinfo", "--list", "--json",
                                 f"nbd+unix:///?socket={daemon.nbd}"],
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        names = sorted(e["export-name"] for e in json.loads(listed.stdout)["exports"])
        assert names == [f"c{i:02}" for i in range(CLONES)]
        qemu_io(f"nbd+unix:///c00?socket={daemon.nbd}", "read -v 0 16")
        qemu_io(f"nbd+unix:///c49?socket={daemon.nbd}", "write -P 7 0 4k", "flush")
        rss, threads = _rss_threads(daemon.proc.pid)
        # Memory follows the pool (2 copy buffers), not 50 clones x 3 copiers x 32 MiB.
        assert rss < 400 << 20, rss
        assert len([t for t in Path(f"/proc/{daemon.proc.pid}/task").iterdir()]) == threads
        for i in range(CLONES):
            daemon.wait_phase(f"c{i:02}", "complete", 120)
        # Creating the 50th costs about what the 1st did.
        first, last = statistics.median(times[:10]), statistics.median(times[-10:])
        assert last <= 3 * first + 0.1, (first, last, times)
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()
    assert (tmp_path / "c00.img").read_bytes() == data
    assert (tmp_path / "c49.img").read_bytes()[4096:] == data[4096:]
