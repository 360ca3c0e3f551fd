"""``liveclone pause`` / ``resume`` against a real running ``liveclone clone``."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.conftest import LIVECLONE, make_image
from tests.integration.servers import stop, wait_status


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LIVECLONE, *args], capture_output=True, text=True, timeout=60)


def status(clone: Path) -> dict:
    r = run("status", "--json", str(clone))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def stays_still(clone: Path, proc: subprocess.Popen[bytes], seconds: float = 1.5) -> int:
    """Wait until the running process reports phase paused, then check that no
    region is copied for ``seconds``. Returns the regions present."""
    st = wait_status(clone, lambda s: s["phase"] == "paused", proc)
    time.sleep(seconds)
    later = status(clone)
    assert later["phase"] == "paused" and later["running"]
    assert later["regions_present"] == st["regions_present"]
    return int(st["regions_present"])


def test_pause_and_resume_a_running_copy(tmp_path: Path) -> None:
    src, clone = tmp_path / "src.img", tmp_path / "clone.img"
    data = make_image(src, 24 << 20, seed=3)
    log = tmp_path / "clone.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([LIVECLONE, "clone", str(src), str(clone), "--rate", "4M"],
                                stderr=err)
    try:
        wait_status(clone, lambda s: s["regions_present"] > 0, proc)
        r = run("pause", str(clone))
        assert r.returncode == 0 and "resume" in r.stderr
        present = stays_still(clone, proc)
        assert present < status(clone)["regions_total"]
        r = run("resume", str(clone))
        assert r.returncode == 0 and "resumed" in r.stderr
        assert proc.wait(60) == 0
    finally:
        stop(proc)
    said = log.read_text()
    assert "paused" in said and "resumed" in said
    assert clone.read_bytes() == data
    assert status(clone)["phase"] == "complete"


def test_a_paused_clone_stays_paused_across_restarts(tmp_path: Path) -> None:
    """The pause is kept beside the clone: a new process on it copies nothing until
    `liveclone resume`, and a stopped one reports paused."""
    src, clone = tmp_path / "src.img", tmp_path / "clone.img"
    data = make_image(src, 8 << 20, seed=4)
    # Slow enough (about 8 s of data) not to finish before the pause on a loaded machine.
    first = subprocess.Popen([LIVECLONE, "clone", str(src), str(clone), "--rate", "512K"],
                             stderr=subprocess.DEVNULL)
    try:
        wait_status(clone, lambda s: s["regions_present"] > 0, first)
        assert run("pause", str(clone)).returncode == 0
        stays_still(clone, first, 0.5)
    finally:
        stop(first)
    assert status(clone)["phase"] == "paused"
    second = subprocess.Popen([LIVECLONE, "clone", str(src), str(clone)],
                              stderr=subprocess.DEVNULL)  # full speed, were it not paused
    try:
        stays_still(clone, second)
        assert run("resume", str(clone)).returncode == 0
        assert second.wait(60) == 0
    finally:
        stop(second)
    assert clone.read_bytes() == data


def test_pause_errors(tmp_path: Path) -> None:
    r = run("pause", str(tmp_path / "nope.img"))
    assert r.returncode == 5 and "no liveclone map" in r.stderr
    src, clone = tmp_path / "src.img", tmp_path / "clone.img"
    make_image(src, 1 << 20)
    assert run("clone", str(src), str(clone)).returncode == 0
    r = run("pause", str(clone))
    assert r.returncode == 0 and "complete" in r.stderr
    r = run("resume", str(clone))
    assert r.returncode == 0 and "not paused" in r.stderr
