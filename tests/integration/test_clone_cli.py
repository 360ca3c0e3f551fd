"""``liveclone clone`` / ``status`` from the outside, including every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveclone.core.copier import DEFAULT_WORKERS
from tests.conftest import LIVECLONE, make_image, tmpfs


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LIVECLONE, *args], capture_output=True, text=True, timeout=300)


def test_clone_then_status_json(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    data = make_image(src, 4 << 20)
    clone = tmp_path / "c.img"
    r = run("clone", str(src), str(clone), "--region-size", "16K")
    assert r.returncode == 0, r.stderr
    assert clone.read_bytes() == data
    st = json.loads(run("status", "--json", str(clone)).stdout)
    assert st["phase"] == "complete"
    assert st["regions_total"] == st["regions_present"] == (4 << 20) // (16 << 10)
    assert st["bytes_total"] == 4 << 20 and st["region_size"] == 16 << 10
    assert st["source"]["path"] == str(src) and st["source"]["size"] == 4 << 20
    assert st["last_error"] is None and "bytes_copied" in st
    human = run("status", str(clone))
    assert "complete" in human.stdout
    # Running again on a complete clone is a no-op that succeeds, even without the source.
    os.unlink(src)
    r = run("clone", str(src), str(clone))
    assert r.returncode == 0, r.stderr
    assert clone.read_bytes() == data


def test_rate_is_honoured(tmp_path: Path) -> None:
    """``--rate`` holds the copy to that many bytes a second: it cannot end sooner than
    the bytes it copied allow. The limiter sleeps before each next batch, so this lower
    bound cannot fail by chance; the time has no upper bound, so a slow machine passes."""
    src = tmp_path / "src.img"
    block = 64 << 10
    data = make_image(src, 16 << 20, seed=9, block=block)  # about 8 MiB of random data
    clone = tmp_path / "c.img"
    rate = 2 << 20
    started = time.monotonic()
    r = run("clone", str(src), str(clone), "--rate", "2M")
    elapsed = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert clone.read_bytes() == data
    copied = json.loads(run("status", "--json", str(clone)).stdout)["bytes_copied"]
    nonzero = sum(block for off in range(0, len(data), block)
                  if data[off:off + block].count(0) != block)
    assert copied >= nonzero >= 6 << 20  # the bound below is worth something
    # A batch is at most a quarter second of the rate. The batches whose sleep may not
    # have ended when the clone completes: the last each worker took, and one more.
    unslept = (DEFAULT_WORKERS + 1) * 0.25
    assert elapsed >= copied / rate - unslept, (elapsed, copied)


@pytest.mark.parametrize("size,message", [
    ("3K", "region size 3072 must be a power of two from 4K to 1G"),
    ("96K", "region size 98304 must be a power of two from 4K to 1G"),
    ("2G", "region size 2147483648 must be a power of two from 4K to 1G"),
    ("bogus", "Invalid value for '--region-size': invalid region_size 'bogus'"),
])
def test_bad_region_size(tmp_path: Path, size: str, message: str) -> None:
    src = tmp_path / "src.img"
    make_image(src, 1 << 20)
    r = run("clone", str(src), str(tmp_path / "c.img"), "--region-size", size)
    assert r.returncode == 2
    assert message in r.stderr
    assert not (tmp_path / "c.img").exists()


def test_missing_source(tmp_path: Path) -> None:
    r = run("clone", str(tmp_path / "nope.img"), str(tmp_path / "c.img"))
    assert r.returncode == 3 and "does not exist" in r.stderr
    assert not (tmp_path / "c.img").exists()


def test_directory_source(tmp_path: Path) -> None:
    r = run("clone", str(tmp_path), str(tmp_path / "c.img"))
    assert r.returncode == 3 and "directory" in r.stderr


def test_clone_path_is_not_a_clone(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_image(src, 1 << 20)
    victim = tmp_path / "important.img"
    victim.write_bytes(b"precious")
    r = run("clone", str(src), str(victim))
    assert r.returncode == 5 and "not a liveclone clone" in r.stderr
    assert victim.read_bytes() == b"precious"


def test_changed_source_is_refused_on_resume(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_image(src, 8 << 20)
    clone = tmp_path / "c.img"
    p = subprocess.Popen([LIVECLONE, "clone", str(src), str(clone), "--rate", "1M"],
                         stderr=subprocess.DEVNULL)
    # Stop it once something is committed (however slowly this machine starts it).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = run("status", "--json", str(clone))
        if st.returncode == 0 and json.loads(st.stdout)["regions_committed"] > 0:
            break
        time.sleep(0.1)
    p.terminate()
    p.wait()
    before = clone.read_bytes()
    with open(src, "r+b") as f:
        f.seek(4 << 20)
        f.write(b"edited")
    r = run("clone", str(src), str(clone))
    assert r.returncode == 4 and "changed since" in r.stderr
    assert clone.read_bytes() == before


@pytest.mark.parametrize("damage", ["superblock", "journal-truncated"])
def test_corrupt_map_is_reported_not_guessed(tmp_path: Path, damage: str) -> None:
    src = tmp_path / "src.img"
    make_image(src, 2 << 20)
    clone = tmp_path / "c.img"
    assert run("clone", str(src), str(clone)).returncode == 0
    if damage == "superblock":
        p = Path(str(clone) + ".lcmap")
        raw = bytearray(p.read_bytes())
        raw[40] ^= 1
        p.write_bytes(bytes(raw))
    else:
        p = Path(str(clone) + ".lcjournal")
        p.write_bytes(p.read_bytes()[:40])  # into the header
    for args in (("clone", str(src), str(clone)), ("status", str(clone))):
        r = run(*args)
        assert r.returncode == 6, r.stderr
        assert "corrupt" in r.stderr and "will not guess" in r.stderr


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 6 MiB tmpfs: a disk that fills up."""
    with tmpfs(tmp_path / "small", "6m") as mnt:
        yield mnt


def test_full_disk_stops_cleanly_and_resumes(tmp_path: Path, small_fs: Path) -> None:
    src = tmp_path / "src.img"
    import random

    src.write_bytes(random.Random(1).randbytes(12 << 20))  # all data: needs 12 MiB
    clone = small_fs / "c.img"
    r = run("clone", str(src), str(clone))
    assert r.returncode == 8, r.stderr
    assert "no space left" in r.stderr and "still to copy" in r.stderr and "free" in r.stderr
    st = json.loads(run("status", "--json", str(clone)).stdout)
    assert 0 < st["regions_committed"] < st["regions_total"]
    # Every committed region holds the right bytes.
    data, got = src.read_bytes(), clone.read_bytes()
    rs = st["region_size"]
    from liveclone.core.metadata import MapStore

    _, rmap = MapStore.read(str(clone))
    for region in range(rmap.count):
        if region in rmap:
            assert got[region * rs:(region + 1) * rs] == data[region * rs:(region + 1) * rs]
    subprocess.run(["mount", "-o", "remount,size=32m", str(small_fs)], check=True)
    r = run("clone", str(src), str(clone))
    assert r.returncode == 0, r.stderr
    assert clone.read_bytes() == data


def test_unwritable_target_directory(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_image(src, 1 << 20)
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        r = run("clone", str(src), str(ro / "c.img"))
        assert r.returncode == 9, r.stderr
        assert f"directory {ro} is not writable" in r.stderr
        r = run("clone", str(src), str(tmp_path / "missing-dir" / "c.img"))
        assert r.returncode == 9 and "does not exist" in r.stderr


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o444])
def test_clone_is_never_more_readable_than_its_source(tmp_path: Path, mode: int) -> None:
    """Invariant 11: the clone and its map files take the source's mode for reading
    (the owner can always write them), within the umask."""
    src = tmp_path / "src.img"
    make_image(src, 1 << 20)
    os.chmod(src, mode)
    clone = tmp_path / "c.img"
    r = run("clone", str(src), str(clone))
    assert r.returncode == 0, r.stderr
    want = (mode & 0o644) | 0o600
    for path in (clone, *(Path(str(clone) + s) for s in (".lcmap", ".lcjournal", ".lcstatus"))):
        assert os.stat(path).st_mode & 0o777 == want & ~0o022, (path, oct(mode))
