"""Copy-on-read and guest-driven order over a real remote source (nginx), shown by
the counters of ``liveclone status --json``."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveclone.core.metadata import MapStore
from liveclone.process import stop_process
from tests.conftest import LIVECLONE, make_image
from tests.integration.servers import Nginx

SIZE = 16 << 20
RS = 64 << 10


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[tuple[Nginx, bytes]]:
    root = tmp_path / "www"
    root.mkdir()
    data = make_image(root / "disk.img", SIZE, seed=21)
    server = Nginx(root, tmp_path / "nginx").start()
    try:
        yield server, data
    finally:
        server.stop()


def status(clone: Path) -> dict[str, object]:
    r = subprocess.run([LIVECLONE, "status", "--json", str(clone)], capture_output=True,
                       text=True, check=True)
    return dict(json.loads(r.stdout))


def serve(url: str, clone: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([LIVECLONE, "serve", url, str(clone), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def stop(proc: subprocess.Popen[str]) -> None:
    stop_process(proc)
    if proc.stdout is not None:
        proc.stdout.close()


def test_guest_reads_are_fetched_once(tmp_path: Path, nginx: tuple[Nginx, bytes]) -> None:
    """The guest reads the whole disk while the copy runs; with copy-on-read every
    byte crosses HTTP once, whoever asked for it first."""
    server, data = nginx
    clone = tmp_path / "c.img"
    proc, uri = serve(server.url("disk.img"), clone, "--rate", "1M")
    try:
        out = tmp_path / "out.img"
        subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=120)
        assert out.read_bytes() == data
        assert status(clone)["copy_on_read"] is True
        # The reads filled it all, long before a 1 MiB/s copier could (16 s); the
        # status file is refreshed twice a second, so give it a moment.
        deadline = time.monotonic() + 5
        while (st := status(clone))["regions_present"] != st["regions_total"]:
            assert time.monotonic() < deadline, f"reads did not fill the clone: {st}"
            time.sleep(0.1)
        deadline = time.monotonic() + 60
        while status(clone)["phase"] != "complete":
            assert time.monotonic() < deadline, "copy never completed"
            time.sleep(0.2)
        assert int(status(clone)["bytes_from_source"]) <= SIZE  # nothing fetched twice
    finally:
        stop(proc)
    assert clone.read_bytes() == data


def test_without_copy_on_read_the_source_is_read_twice(tmp_path: Path,
                                                      nginx: tuple[Nginx, bytes]) -> None:
    server, data = nginx
    clone = tmp_path / "c.img"
    proc, uri = serve(server.url("disk.img"), clone, "--no-copy-on-read")
    try:
        out = tmp_path / "out.img"
        subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=120)
        assert out.read_bytes() == data
        deadline = time.monotonic() + 60
        while status(clone)["phase"] != "complete":
            assert time.monotonic() < deadline, "copy never completed"
            time.sleep(0.2)
        st = status(clone)
        assert st["copy_on_read"] is False
        assert int(st["bytes_from_source"]) > SIZE  # guest reads and copier both fetched
    finally:
        stop(proc)


def test_guest_driven_order_copies_ahead_of_a_read(tmp_path: Path,
                                                   nginx: tuple[Nginx, bytes]) -> None:
    """A read far ahead of the sweep makes the copier fetch the regions after it
    (readahead) before the linear sweep gets there."""
    server, _ = nginx
    clone = tmp_path / "c.img"
    proc, uri = serve(server.url("disk.img"), clone, "--rate", "512K")
    try:
        far = 12 << 20
        for off in (far, far + RS):  # two sequential reads: readahead grows
            subprocess.run(["qemu-io", "-f", "raw", "-c", f"read {off} {RS}", uri],
                           check=True, capture_output=True, timeout=60)
        # Beyond what the two reads fetched (regions first, first+1): readahead.
        first, wanted = far // RS, far // RS + 3
        deadline = time.monotonic() + 60
        while True:
            _, rmap = MapStore.read(str(clone))
            if wanted in rmap:
                break
            assert time.monotonic() < deadline, "readahead never happened"
            time.sleep(0.2)
        # The sweep from region 0 is far behind: the copier went where the guest read.
        assert rmap.find_absent(0, first) is not None
    finally:
        stop(proc)
