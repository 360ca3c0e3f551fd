"""A daemon clone on a disk that fills up while it copies (the pooled copier's wait
for space): the failure shows at once in its status and as a ``failed`` event, the
copied part keeps being served, other clones go on, and the copy resumes by itself
when space comes back."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import tmpfs
from tests.integration.daemon_kit import Daemon, Events, qemu_io

SIZE = 8 << 20


def test_disk_fills_up_while_copying_and_gets_space_again(tmp_path: Path) -> None:
    src = tmp_path / "golden.img"
    data = os.urandom(SIZE)
    src.write_bytes(data)
    with tmpfs(tmp_path / "small", "12m") as small:
        # One pool thread: the full disk must not hold it, or the other clone stops.
        d = Daemon(tmp_path, "--rate", "4M", "--max-copiers", "1").start()
        events = Events(d.api)
        try:
            vm = d.add(src, small / "vm.img", name="vm")  # fits: 8 of 12 MiB
            other = d.add(src, tmp_path / "other.img", name="other")
            filler = small / "filler"
            with open(filler, "wb") as f:  # someone else takes the room meanwhile
                try:
                    while True:
                        f.write(b"\1" * (256 << 10))
                        f.flush()
                except OSError:
                    pass
            st = d.wait_phase("vm", "failed", 60)
            assert "no space left" in st["last_error"] and "resumes" in st["last_error"], st
            assert events.wait_for("failed", "vm")["status"]["phase"] == "failed"
            qemu_io(vm["nbd_uri"], "read -v 0 16")  # still served
            d.wait_phase("other", "complete", 60)  # the pool went on without it
            assert d.status("vm")["phase"] == "failed"
            filler.unlink()  # room again: the copy goes on by itself
            st = d.wait_phase("vm", "complete", 60)
            assert st["last_error"] is None, st
            assert events.wait_for("completed", "vm")
            qemu_io(other["nbd_uri"], "read 0 64k")
        finally:
            events.close()
            assert d.stop() == 0, d.log.read_text()
        assert (small / "vm.img").read_bytes() == data
