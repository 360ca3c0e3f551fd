"""Boot profiles end to end: a real boot records what the guest read; a profile replays
in recorded order (the copier's order counters in ``status --json``); a profile for
another source is refused; ``kill -9`` while recording or replaying leaves a correct
clone and never a half-written profile."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from guest.build import RESULT_OK, Guest, build_guest, verify_script
from liveclone.core.profile import load
from tests.conftest import LIVECLONE, make_image
from tests.integration.servers import wait_status

RS = 64 << 10
SIZE = 16 << 20
# (offset, length) read by the "guest" of the serve tests, in this order.
READS = [(12 << 20, 64 << 10), (2 << 20, 4096), (8 << 20, 256 << 10), (1 << 20, 100)]
READ_REGIONS = [(192, 193), (32, 33), (128, 132), (16, 17)]


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "src.img"
    return path, make_image(path, SIZE, seed=13)


def status(clone: Path) -> dict[str, Any]:
    r = subprocess.run([LIVECLONE, "status", "--json", str(clone)], capture_output=True,
                       text=True, check=True)
    return dict(json.loads(r.stdout))


def serve(src: Path, clone: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen([LIVECLONE, "serve", str(src), str(clone), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().decode().strip()


def qemu_io(uri: str, *commands: str) -> None:
    args = [a for c in commands for a in ("-c", c)]
    subprocess.run(["qemu-io", "-f", "raw", *args, uri], check=True, capture_output=True)


def guest_reads(uri: str) -> None:
    qemu_io(uri, *(f"read {o} {n}" for o, n in READS))


def record(src: Path, clone: Path, *extra: str) -> Path:
    """Serve, read READS through NBD, let the recording end on idle; the profile."""
    proc, uri = serve(src, clone, "--rate", "256K", "--profile-idle", "1", *extra)
    try:
        guest_reads(uri)
        wait_status(clone, lambda s: s["profile"]["record"]["state"] == "done",
                    proc)  # type: ignore[arg-type]
    finally:
        proc.terminate()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    return Path(str(clone) + ".lcprofile")


def profile_batches(st: dict[str, Any]) -> list[int]:
    return [start for kind, start in st["copy_order"]["first_batches"] if kind == "profile"]


def test_replay_follows_the_recorded_order(tmp_path: Path, source: tuple[Path, bytes]
                                           ) -> None:
    src, data = source
    prof = record(src, tmp_path / "a.img")
    p = load(str(prof))
    assert p.runs == [(a * RS, (b - a) * RS) for a, b in READ_REGIONS]  # first-read order
    assert p.source["path"] == str(src) and p.size == SIZE
    # A fresh clone of the same source replays it before its sweep.
    clone = tmp_path / "b.img"
    subprocess.run([LIVECLONE, "clone", str(src), str(clone), "--profile", str(prof),
                    "--no-progress"], check=True, capture_output=True)
    st = status(clone)
    first = st["copy_order"]["first_batches"]
    assert [tuple(b) for b in first[:4]] == [("profile", a) for a, _ in READ_REGIONS]
    assert all(kind == "sweep" for kind, _ in first[4:])
    assert st["copy_order"]["profile"] == 7
    assert st["copy_order"]["sweep"] + 7 <= SIZE // RS
    replay = st["profile"]["replay"]
    assert replay["state"] == "done" and replay["stopped_by"] == "end"
    assert replay["regions_replayed"] == replay["regions_total"] == 7
    assert replay["file"] == str(prof)
    assert clone.read_bytes() == data


def test_a_profile_for_another_source_is_refused(tmp_path: Path,
                                                 source: tuple[Path, bytes]) -> None:
    src, _ = source
    prof = record(src, tmp_path / "a.img")
    other = tmp_path / "other.img"
    make_image(other, SIZE, seed=14)
    before = sorted(os.listdir(tmp_path))
    for cmd in (["clone", str(other), str(tmp_path / "o.img"), "--no-progress"],
                ["serve", str(other), str(tmp_path / "o.img")]):
        r = subprocess.run([LIVECLONE, *cmd, "--profile", str(prof)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert str(src) in r.stderr and str(other) in r.stderr, r.stderr  # both named
        assert "not applied" in r.stderr and str(prof) in r.stderr
        assert "without --profile" in r.stderr  # the fix
        assert sorted(os.listdir(tmp_path)) == before  # nothing created
    # A resumed clone of the source is refused too, and left as it was.
    partial = tmp_path / "a.img"
    other_prof = record(other, tmp_path / "x.img")
    r = subprocess.run([LIVECLONE, "clone", str(src), str(partial), "--profile",
                        str(other_prof), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 2 and "not applied" in r.stderr
    assert status(partial)["phase"] != "complete"
    # A file that is not a profile: a usage error too.
    junk = tmp_path / "junk.lcprofile"
    junk.write_text('{"format": "liveclone-profile", "version": 1, "runs": [[0, 1]]')
    r = subprocess.run([LIVECLONE, "clone", str(src), str(partial), "--profile", str(junk)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a usable liveclone profile" in r.stderr


def test_kill_9_while_recording_keeps_the_clone_and_the_old_profile(
        tmp_path: Path, source: tuple[Path, bytes]) -> None:
    src, data = source
    clone = tmp_path / "c.img"
    old = b'{"an older profile": true}\n'
    Path(str(clone) + ".lcprofile").write_bytes(old)
    proc, uri = serve(src, clone, "--rate", "512K", "--profile-idle", "600")
    try:
        guest_reads(uri)
        qemu_io(uri, "write -P 0x5a 3M 100k")  # and a guest write, acknowledged
        qemu_io(uri, "flush")
        wait_status(clone, lambda s: s["profile"]["record"]["state"] == "recording"
                    and s["profile"]["record"]["regions"] >= 7, proc)  # type: ignore[arg-type]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert Path(str(clone) + ".lcprofile").read_bytes() == old  # never half a new one
    assert [p.name for p in tmp_path.iterdir() if "lcprofile" in p.name] == ["c.img.lcprofile"]
    subprocess.run([LIVECLONE, "clone", str(src), str(clone), "--no-progress"], check=True,
                   capture_output=True)
    want = bytearray(data)
    want[3 << 20:(3 << 20) + 102400] = b"\x5a" * 102400
    assert clone.read_bytes() == bytes(want)


def test_kill_9_while_replaying_leaves_a_correct_clone(tmp_path: Path,
                                                        source: tuple[Path, bytes]) -> None:
    src, data = source
    prof = record(src, tmp_path / "a.img")
    clone = tmp_path / "c.img"
    proc = subprocess.Popen([LIVECLONE, "clone", str(src), str(clone), "--profile", str(prof),
                             "--rate", "128K", "--no-progress"], stderr=subprocess.DEVNULL)
    try:
        st = wait_status(clone, lambda s: s["profile"]["replay"]["regions_replayed"] >= 1
                         and s["profile"]["replay"]["state"] == "replaying",
                         proc)  # type: ignore[arg-type]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    replay = st["profile"]["replay"]
    assert replay["state"] == "replaying" and replay["regions_total"] == 7
    assert replay["bytes_replayed"] >= RS
    subprocess.run([LIVECLONE, "clone", str(src), str(clone), "--profile", str(prof),
                    "--no-progress"], check=True, capture_output=True)
    assert clone.read_bytes() == data
    assert status(clone)["profile"]["replay"]["state"] == "done"


# -- one real boot --------------------------------------------------------------------------


def file_regions(image: Path, path: str) -> set[int]:
    """The 64 KiB regions holding ``path``'s data blocks in the ext4 image."""
    stat = subprocess.run(["debugfs", "-R", f"stat /{path}", str(image)], capture_output=True,
                          text=True, check=True).stdout
    header = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True,
                            check=True).stdout
    found = re.search(r"Block size:\s+(\d+)", header)
    assert found is not None
    block = int(found.group(1))
    regions: set[int] = set()
    # "(0-11730):12846-24576, (11731-12287):24835-25391": logical):physical runs
    for a, b in re.findall(r"\(\d+(?:-\d+)?\):(\d+)(?:-(\d+))?", stat.split("EXTENTS:")[1]):
        first, last = int(a), int(b or a)
        regions.update(range(first * block // RS, ((last + 1) * block - 1) // RS + 1))
    assert regions
    return regions


def test_a_real_boot_records_what_the_guest_read(tmp_path: Path) -> None:
    guest: Guest = build_guest()
    src, clone = tmp_path / "src.img", tmp_path / "c.img"
    shutil.copyfile(guest.disk, src)
    r = subprocess.run(
        [LIVECLONE, "boot", str(src), str(clone), "--via", "nbd", "--kernel",
         str(guest.kernel), "--initrd", str(guest.initrd), "--append",
         guest.append(verify_script()), "--memory", "256M", "--rate", "1M",
         "--profile-idle", "120", "--save-profile", str(tmp_path / "boot.lcprofile")],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and RESULT_OK in r.stdout, r.stdout + r.stderr
    p = load(str(tmp_path / "boot.lcprofile"))
    recorded = {r for a, b in p.region_runs(_geometry(src)) for r in range(a, b)}
    # Every region of every file the guest checked (sha256sum reads them whole).
    for path in guest.files:
        missing = file_regions(src, path) - recorded
        assert not missing, f"{path}: regions {sorted(missing)} not in the profile"
    assert 0 in recorded  # the superblock, read at mount
    assert p.runs[0][0] < RS  # ... first of all
    # Only what was read: the guest reads about 18 MiB of the 96 MiB disk.
    assert len(recorded) * RS < 40 << 20
    st = status(clone)
    rec = st["profile"]["record"]
    assert rec["state"] == "done" and rec["regions"] == len(recorded)
    assert rec["stopped_by"] == "exit"  # the VM powered off within the window
    # Replayed on a fresh clone: the copier takes the regions in the recorded order.
    fresh = tmp_path / "fresh.img"
    subprocess.run([LIVECLONE, "clone", str(src), str(fresh), "--profile",
                    str(tmp_path / "boot.lcprofile"), "--no-progress"], check=True,
                   capture_output=True)
    st = status(fresh)
    starts = profile_batches(st)
    runs = p.region_runs(_geometry(src))
    assert starts and starts[0] == runs[0][0]
    assert st["copy_order"]["profile"] >= len(recorded) - 8  # gaps read along, at most
    assert fresh.read_bytes() == src.read_bytes()


def _geometry(image: Path):  # type: ignore[no-untyped-def]
    from liveclone.core.regions import Geometry

    return Geometry(image.stat().st_size, RS)
