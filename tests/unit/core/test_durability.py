"""Fault injection at every syscall site of the durability path (issue 9).

Each site (the clone's fdatasync, the journal's write and fdatasync, each step of
compaction) fails once with ENOSPC, EIO or EMFILE. Either the clone keeps every
guarantee, or it enters its failed mode (invariant 9): writes and flushes get EIO,
present data is still read, the copier stops; and after a reopen without the fault
every write acknowledged by a completed flush reads back, and every region holds
either its acknowledged bytes or its later written ones, never anything else.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from liveclone.core import durability, fsops
from liveclone.core.copier import Copier, Phase
from liveclone.core.opening import open_clone
from liveclone.core.regions import RegionMap
from liveclone.sources.local import LocalFileSource

RS = 4096
NREG = 64


def _target(arg: object) -> str:
    """The path a file descriptor or path argument names. A clone file created with
    O_TMPFILE shows in /proc as "#inode (deleted)" even once linked: find its name."""
    if not isinstance(arg, int):
        return str(arg)
    path = os.readlink(f"/proc/self/fd/{arg}")
    if path.endswith(" (deleted)"):
        st = os.fstat(arg)
        directory = os.path.dirname(path)
        for name in os.listdir(directory):
            other = os.stat(os.path.join(directory, name))
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return os.path.join(directory, name)
    return path


class Fault:
    """Fail the first call of ``fsops.<site>`` whose target ends with ``suffix``, once
    (a retry of a failed fdatasync "succeeds" on Linux: that is the trap)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, site: str, suffix: str,
                 err: int) -> None:
        self.fired = False
        self.armed = False
        real: Callable[..., object] = getattr(fsops, site)
        target_arg = 1 if site == "rename" else 0

        def wrapper(*args: object, **kw: object) -> object:
            if self.armed and not self.fired and _target(args[target_arg]).endswith(suffix):
                self.fired = True
                raise OSError(err, os.strerror(err))
            return real(*args, **kw)

        monkeypatch.setattr(fsops, site, wrapper)


# (site, target): every write, sync, rename and directory sync of the durability path
SITES = [
    ("fdatasync", "c.img"),  # the clone's data, step 1 of a commit
    ("pwrite_all", "c.img.lcdigest"),  # a region's digest slot, before its bit
    ("fdatasync", "c.img.lcdigest"),  # step 1b: the slots, before the map
    ("pwrite_all", "c.img.lcjournal"),  # the commit's records
    ("fdatasync", "c.img.lcjournal"),  # the commit point
    ("write_new_file", "c.img.lcmap.tmp"),  # compaction step 1
    ("rename", "c.img.lcmap"),  # compaction step 2
    ("fsync_dir", "c.img.lcmap"),
    ("write_new_file", "c.img.lcjournal.tmp"),  # compaction step 3
    ("rename", "c.img.lcjournal"),
    ("fsync_dir", "c.img.lcjournal"),
]


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(4).randbytes(NREG * RS)
    p = tmp_path / "src.img"
    p.write_bytes(data)
    return p, data


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO, errno.EMFILE])
@pytest.mark.parametrize("site,suffix", SITES)
def test_fault_at_each_durability_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       source: tuple[Path, bytes], site: str, suffix: str,
                                       err: int) -> None:
    src, data = source
    monkeypatch.setattr(durability, "COMPACT_RECORDS", 3)  # compact on most flushes
    fault = Fault(monkeypatch, site, suffix, err)
    path = str(tmp_path / "c.img")
    rng = random.Random(f"{site}{suffix}{err}")
    model = bytearray(data)
    c = open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True,
                   autocommit=False)
    acked = bytes(model)
    failed_at = None
    try:
        for step in range(12):
            if step == 2:
                fault.armed = True
            for _ in range(4):
                off = rng.randrange(0, len(model) - 3000)
                blob = rng.randbytes(rng.randrange(1, 3000))
                try:
                    c.write(off, blob)
                except OSError as e:
                    # Only after a failure: a failed flush, or a failed digest slot
                    # write (the write itself then fails, before its bytes).
                    assert e.errno == errno.EIO and c.failure is not None, e
                    failed_at = step if failed_at is None else failed_at
                    break
                model[off:off + len(blob)] = blob
            if failed_at is not None:
                break
            try:
                c.flush()
                acked = bytes(model)
            except OSError as e:
                assert e.errno == errno.EIO and "read-only" in str(e)
                failed_at = step
        if site == "write_new_file" and suffix.endswith("lcmap.tmp"):
            # Before the superblock's rename nothing changed: compaction is postponed.
            assert fault.fired and failed_at is None and c.failure is None
        else:
            assert fault.fired and failed_at is not None, "the fault was not noticed"
            assert c.failure is not None and "failed" in c.failure
            assert os.strerror(err) in c.failure
            # Failed mode: writes, zero-writes, trims and flushes get EIO...
            for op in (lambda: c.write(0, b"x"), lambda: c.write_zeroes(0, RS),
                       lambda: c.trim(0, RS), c.flush):
                with pytest.raises(OSError) as info:
                    op()
                assert info.value.errno == errno.EIO
            # ...while reads are still served.
            assert bytes(c.read(0, len(model))) == bytes(model)
    finally:
        c.close()
    # Reopen without the fault: acknowledged writes are there, nothing else is wrong.
    monkeypatch.undo()
    with open_clone(path, LocalFileSource(str(src))) as c2:
        got = bytes(c2.read(0, len(model)))
        committed = RegionMap(NREG, c2.committed_snapshot())
    for r in range(NREG):
        a, b = r * RS, (r + 1) * RS
        assert got[a:b] in (acked[a:b], model[a:b]), f"region {r} holds neither version"
        if r in committed:
            assert Path(path).read_bytes()[a:b] in (acked[a:b], model[a:b])


def test_failed_commit_stops_the_copier_and_keeps_source_blameless(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: tuple[Path, bytes]) -> None:
    """The commit thread's fdatasync fails while the copier runs: the clone fails, the
    copier stops with phase failed, and the error names the clone, not the source."""
    src, data = source
    monkeypatch.setattr(durability, "COMMIT_INTERVAL", 0.05)
    fault = Fault(monkeypatch, "fdatasync", "c.img", errno.EIO)
    fault.armed = True
    path = str(tmp_path / "c.img")
    c = open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True)
    gate = threading.Event()
    real_fill = c.fill

    def slow_fill(first: int, end: int, wait: bool = False, bulk: bool = False
                  ) -> tuple[int, int]:
        gate.wait(0.02)  # give the commit thread time to fail before the copy ends
        return real_fill(first, end, wait, bulk)

    monkeypatch.setattr(c, "fill", slow_fill)
    cp = Copier(c, batch_bytes=RS, workers=1).start()
    try:
        assert cp.wait(30)
        assert cp.phase == Phase.FAILED
        assert c.failure is not None and "fdatasync of the clone file failed" in c.failure
        assert "source" not in str(cp.error).split(".")[0]
    finally:
        cp.stop()
        c.close()
    assert fault.fired
    # Reopen and finish: the clone equals the source.
    monkeypatch.undo()
    with open_clone(path, LocalFileSource(str(src))) as c2:
        Copier(c2).start().wait(30)
        assert c2.complete
    assert Path(path).read_bytes() == data


def test_clone_side_write_error_is_not_blamed_on_the_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: tuple[Path, bytes]) -> None:
    """EROFS writing the clone stops the copier with an error about the clone."""
    src, _ = source
    path = str(tmp_path / "c.img")
    c = open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True)
    real = fsops.pwrite_all

    def readonly(fd: int, *args: object, **kw: object) -> None:
        if _target(fd).endswith("c.img"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real(fd, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(fsops, "pwrite_all", readonly)
    cp = Copier(c, batch_bytes=RS, workers=1).start()
    try:
        assert cp.wait(30)
        assert cp.phase == Phase.FAILED
        msg = str(cp.error)
        assert "writing the clone" in msg and os.strerror(errno.EROFS) in msg
        assert "reading source" not in (c.last_error or "")
    finally:
        cp.stop()
        c.close()


def test_calls_after_close_get_a_clear_error(tmp_path: Path,
                                             source: tuple[Path, bytes]) -> None:
    from liveclone.errors import CloneClosedError

    src, _ = source
    c = open_clone(str(tmp_path / "c.img"), LocalFileSource(str(src)), region_size=RS,
                   create=True)
    c.close()
    c.close()  # twice is harmless
    for op in (lambda: c.read(0, 10), lambda: c.write(0, b"x"), c.flush,
               lambda: c.fill(0, 1)):
        with pytest.raises(CloneClosedError, match="closed"):
            op()


@pytest.mark.parametrize("victim", [".lcjournal", ".lcmap"])
@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_map_file_deleted_or_replaced_under_the_clone(tmp_path: Path,
                                                      source: tuple[Path, bytes],
                                                      victim: str, how: str) -> None:
    """Issue 10: a map file deleted or replaced under a running clone is noticed at
    the next commit: the flush fails, and no later write is acknowledged."""
    src, _ = source
    path = str(tmp_path / "c.img")
    c = open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True,
                   autocommit=False)
    try:
        c.write(0, b"a" * 100)
        c.flush()
        if how == "deleted":
            os.unlink(path + victim)
        else:
            Path(path + victim + ".new").write_bytes(Path(path + victim).read_bytes())
            os.replace(path + victim + ".new", path + victim)
        c.write(5 * RS, b"b" * 100)
        with pytest.raises(OSError) as info:
            c.flush()
        assert info.value.errno == errno.EIO
        assert c.failure is not None and f"c.img{victim} was {how}" in c.failure
        with pytest.raises(OSError):
            c.write(9 * RS, b"c")
    finally:
        c.close()


def test_group_commit_answers_concurrent_flushes_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: tuple[Path, bytes]) -> None:
    """Issue 14: flushes arriving while a commit runs are answered by the next commit
    together, and none returns before the commit that covers its own write."""
    src, _ = source
    real = fsops.fdatasync

    def slow(fd: int) -> None:
        time.sleep(0.05)  # a slow disk: the flushes pile up behind the running commit
        real(fd)

    monkeypatch.setattr(fsops, "fdatasync", slow)
    c = open_clone(str(tmp_path / "c.img"), LocalFileSource(str(src)), region_size=RS,
                   create=True, autocommit=False)
    threads = 16
    barrier = threading.Barrier(threads)
    errors: list[str] = []

    def guest(i: int) -> None:
        c.write(i * RS + 7, b"w" * 10)  # a partial write: region i becomes present
        barrier.wait()
        c.flush()
        if i not in RegionMap(NREG, c.committed_snapshot()):
            errors.append(f"flush {i} returned before its region was committed")

    try:
        workers = [threading.Thread(target=guest, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert not errors, errors
        assert c.commits <= 4, f"{threads} flushes took {c.commits} commits"
    finally:
        c.close()
