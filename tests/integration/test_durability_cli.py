"""Durability from the outside (issue 9): a failed fdatasync in a real process, status
polled across compaction, and two creates at the same instant."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from liveclone.cli.status import read_status
from liveclone.core import opening
from liveclone.core.opening import open_clone
from liveclone.errors import CloneBusyError
from liveclone.sources.local import LocalFileSource
from tests.conftest import LIVECLONE, make_image


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LIVECLONE, *args], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.mark.parametrize("when", [1, 2, 5])
def test_failed_fdatasync_fails_the_clone_and_a_rerun_resumes(tmp_path: Path,
                                                              when: int) -> None:
    """strace makes the n-th fdatasync of a real `liveclone clone` fail with EIO.
    The clone must stop with exit 10 (failed), say why and what to do, and status
    must show phase failed; rerunning (no fault) finishes it, equal to the source."""
    src = tmp_path / "src.img"
    data = make_image(src, 16 << 20)
    clone = tmp_path / "c.img"
    r = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=fdatasync",
         "-e", f"inject=fdatasync:error=EIO:when={when}",
         LIVECLONE, "clone", str(src), str(clone), "--region-size", "16K", "--rate", "2M"],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 10, r.stderr
    # The n-th fdatasync is the clone file's, the digest file's or the journal's
    # (each commit syncs them in that order).
    assert any(f"fdatasync of the {what} file failed" in r.stderr
               for what in ("clone", "digest")) or "journal commit" in r.stderr
    assert "read-only" in r.stderr and "run it again" in r.stderr
    st = json.loads(run("status", "--json", str(clone)).stdout)
    assert st["phase"] == "failed" and "Input/output error" in st["last_error"]
    again = run("clone", str(src), str(clone))
    assert again.returncode == 0, again.stderr
    assert clone.read_bytes() == data


def test_status_polled_across_completion_never_fails(tmp_path: Path) -> None:
    """Compaction runs at completion and every 2 records here; `status` reads in a
    tight loop (in-process and as a command) must never see a half-compacted map."""
    src = tmp_path / "src.img"
    make_image(src, 24 << 20)
    clone = tmp_path / "c.img"
    env = dict(os.environ, LIVECLONE_COMPACT_RECORDS="2")
    # About 3 s of copying: long enough for `status` commands to see it on a loaded machine.
    proc = subprocess.Popen([LIVECLONE, "clone", str(src), str(clone), "--region-size", "4K",
                             "--rate", "4M"], env=env, stderr=subprocess.PIPE, text=True)
    errors: list[str] = []
    reads = [0]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                read_status(str(clone))
                reads[0] += 1
            except FileNotFoundError:
                continue
            except Exception as e:  # noqa: BLE001 - any error is the failure
                if "has no liveclone map" in str(e) and reads[0] == 0:
                    continue  # not created yet
                errors.append(repr(e))
                return

    t = threading.Thread(target=poll)
    t.start()
    phases = set()
    try:
        while proc.poll() is None:
            r = run("status", "--json", str(clone))
            if r.returncode != 0 and "has no liveclone map" not in r.stderr:
                errors.append(r.stderr)
                break
            if r.returncode == 0:
                phases.add(json.loads(r.stdout)["phase"])
    finally:
        proc.wait()
        stop.set()
        t.join()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    assert not errors, errors
    assert reads[0] > 50 and "copying" in phases
    assert json.loads(run("status", "--json", str(clone)).stdout)["phase"] == "complete"


@pytest.mark.parametrize("how", ["O_TMPFILE", "O_EXCL"])
def test_two_creates_at_the_same_instant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         how: str) -> None:
    """One wins, the other gets CloneBusyError; the map is never written twice. Also
    where the filesystem has no O_TMPFILE (FUSE, some network filesystems)."""
    if how == "O_EXCL":
        monkeypatch.setattr(opening, "_create_locked",
                            lambda path, directory: opening._create_excl(path))
    src = tmp_path / "src.img"
    make_image(src, 1 << 20)
    for i in range(40):
        path = str(tmp_path / f"c{i}.img")
        barrier = threading.Barrier(2)
        outcome: list[str] = []
        lost = threading.Event()

        def create(path: str = path, barrier: threading.Barrier = barrier,
                   outcome: list[str] = outcome, lost: threading.Event = lost) -> None:
            barrier.wait()
            try:
                c = open_clone(path, LocalFileSource(str(src)), create=True)
            except CloneBusyError:
                outcome.append("busy")
                lost.set()
                return
            outcome.append("won")
            lost.wait(30)  # hold the clone until the other has tried
            c.close()

        threads = [threading.Thread(target=create) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert sorted(outcome) == ["busy", "won"], outcome
        with open_clone(path, LocalFileSource(str(src))) as c:  # the winner's map is sound
            assert c.regions_present == 0


def test_two_clone_commands_at_once(tmp_path: Path) -> None:
    """Two `liveclone clone` processes on one new clone: one exits 7 (busy)."""
    src = tmp_path / "src.img"
    data = make_image(src, 8 << 20)
    clone = tmp_path / "c.img"
    cmd = [LIVECLONE, "clone", str(src), str(clone), "--rate", "8M"]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = sorted(p.wait(120) for p in procs)
    for p in procs:
        assert p.stderr is not None
        p.stderr.close()
    assert codes == [0, 7]
    assert clone.read_bytes() == data


def test_create_cut_short_before_its_map_is_finished(tmp_path: Path) -> None:
    """kill -9 between linking the new clone file and writing its map leaves an empty
    file with no map: the next run finishes the create. A non-empty file with no map
    is someone else's and stays refused."""
    src = tmp_path / "src.img"
    data = make_image(src, 2 << 20)
    clone = tmp_path / "c.img"
    clone.write_bytes(b"")
    r = run("clone", str(src), str(clone))
    assert r.returncode == 0, r.stderr
    assert clone.read_bytes() == data
    other = tmp_path / "mine.img"
    other.write_bytes(b"mine")
    r = run("clone", str(src), str(other))
    assert r.returncode == 5 and "not a liveclone clone" in r.stderr
    assert other.read_bytes() == b"mine"
