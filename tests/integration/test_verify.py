"""``liveclone verify``: real processes, a real NBD client (qemu-io over ``serve``),
bytes changed behind liveclone's back, a changed source, and ``kill -9``."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import LIVECLONE, make_image
from tests.integration.servers import wait_status
from tests.integration.test_nbd_clients import run, serve

SIZE = 16 << 20
RS = 64 << 10
MISMATCH = 12  # errors.MismatchError.exit_code


def verify(clone: Path, *args: str, code: int = 0) -> dict[str, Any]:
    res = run([LIVECLONE, "verify", "--json", str(clone), *args], check=False)
    assert res.returncode == code, f"verify exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))


def guest_ranges(report: dict[str, Any]) -> set[int]:
    return {off // RS + k for g in report["guest_ranges"] for off in [g["offset"]]
            for k in range(g["length"] // RS)}


def test_a_complete_clone_verifies_and_a_flipped_byte_is_found(tmp_path: Path) -> None:
    source, clone = tmp_path / "source.img", tmp_path / "clone.img"
    make_image(source, SIZE, seed=21)
    run([LIVECLONE, "clone", "--no-progress", str(source), str(clone)])
    rep = verify(clone, "--against-source")
    total = SIZE // RS
    assert rep["ok"] and rep["matched"] == total == rep["source_matched"]
    assert rep["guest_written"] == rep["unverified"] == rep["mismatches"] == 0
    # One byte behind liveclone's back, in a region that is a hole in the clone (a
    # zero region of the source) and one in a data region: both found, at their offsets.
    data = source.read_bytes()
    hole = next(r for r in range(total) if data[r * RS:(r + 1) * RS] == bytes(RS))
    full = next(r for r in range(total) if data[r * RS:(r + 1) * RS].count(0) < RS // 2)
    flip(clone, full * RS + 1234)
    flip(clone, hole * RS + RS - 1)
    res = run([LIVECLONE, "verify", str(clone)], check=False)
    assert res.returncode == MISMATCH
    assert f"region {min(full, hole)} (offset {min(full, hole) * RS})" in res.stderr
    rep = verify(clone, code=MISMATCH)
    assert rep["mismatches"] == 2 and rep["matched"] == total - 2
    assert [m["offset"] for m in rep["first_mismatches"]] == sorted([full * RS, hole * RS])


def test_guest_writes_over_nbd_are_reported_not_mismatched_on_a_copying_clone(
        tmp_path: Path) -> None:
    """While ``serve`` copies slowly, qemu-io writes, zeroes and discards through the
    NBD socket; verify runs beside the live server (no lock), then after kill -9 and
    a resume: every guest region is reported as such, none as a mismatch."""
    source, clone = tmp_path / "source.img", tmp_path / "clone.img"
    data = make_image(source, SIZE, seed=22)
    with serve(source, clone, "--rate", "2M") as s:
        wait_status(clone, lambda st: st["regions_present"] >= 8, s.proc)  # type: ignore[arg-type]
        # Region 1 was copied first (write intent on a present region); 100-101 are
        # absent (partial write, fill then write); 120 zeroed whole; 140 discarded.
        cmds = ["write -P 0x41 65636 100", "write -P 0x42 6553700 70000",
                "write -z 7864320 65536", "discard 9175040 65536", "flush"]
        run(["qemu-io", "-f", "raw", *(a for c in cmds for a in ("-c", c)), s.uri])
        # Unflushed writes to copied regions when the server dies: their bytes may
        # be in the file (kill -9 keeps the page cache), and must still never count
        # as mismatches.
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x43 131072 4096",
             "-c", "write -P 0x44 200000 300", s.uri])
        live = verify(clone)
        assert live["regions_present"] < SIZE // RS  # it checked a clone mid-copy
        assert live["matched"] >= 1 and {1, 2, 3} <= guest_ranges(live)
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait()
    assert Path(str(clone) + ".lcdigest").exists()
    rep = verify(clone, "--against-source")  # after kill -9, before resuming
    assert rep["ok"] and rep["source_mismatches"] == 0
    run([LIVECLONE, "clone", "--no-progress", str(source), str(clone)])
    rep = verify(clone, "--against-source")
    guest = guest_ranges(rep)
    assert {1, 2, 3, 100, 101, 120, 140} <= guest, sorted(guest)
    assert rep["guest_written"] == len(guest) < 12
    assert rep["matched"] + rep["guest_written"] == SIZE // RS
    assert rep["ok"] and rep["unverified"] == 0
    # The guest's bytes are there; a copied region beside them is the source's.
    got = clone.read_bytes()
    assert got[65636:65736] == b"A" * 100 and got[7864320:7929856] == bytes(65536)
    assert got[5 * RS:6 * RS] == data[5 * RS:6 * RS]


def test_a_source_changed_since_the_copy_is_caught_against_the_source(tmp_path: Path) -> None:
    source, clone = tmp_path / "source.img", tmp_path / "clone.img"
    make_image(source, SIZE, seed=23)
    run([LIVECLONE, "clone", "--no-progress", str(source), str(clone)])
    flip(source, 77 * RS + 5)
    assert verify(clone)["ok"]  # the clone itself is as copied
    rep = verify(clone, "--against-source", code=MISMATCH)
    assert rep["source_mismatches"] == 1 and rep["mismatches"] == 0
    assert rep["first_source_mismatches"][0]["offset"] == 77 * RS
    assert rep["source_problem"]  # the identity (mtime, fingerprint) says so too
    res = run([LIVECLONE, "verify", "--against-source", str(clone)], check=False)
    assert res.returncode == MISMATCH and f"offset {77 * RS}" in res.stderr


def test_verify_of_something_that_is_not_a_clone_says_so(tmp_path: Path) -> None:
    (tmp_path / "plain.img").write_bytes(b"x" * 4096)
    res = run([LIVECLONE, "verify", str(tmp_path / "plain.img")], check=False)
    assert res.returncode == 5 and "no liveclone map" in res.stderr


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """Under a pseudo-terminal verify draws its bar on stderr and still reports."""
    source, clone = tmp_path / "source.img", tmp_path / "clone.img"
    make_image(source, 4 << 20, seed=24)
    run([LIVECLONE, "clone", "--no-progress", str(source), str(clone)])
    res = subprocess.run(["script", "-qec", f"{LIVECLONE} verify {clone}", "/dev/null"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout
    assert "verifying" in res.stdout and "result:     ok" in res.stdout
