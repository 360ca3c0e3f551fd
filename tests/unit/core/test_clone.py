"""The clone's routing policy (invariants 2-6) against a real file source."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from liveclone.core import copyc
from liveclone.core.clone import Clone
from liveclone.core.copier import Copier
from liveclone.core.fill import DIRECT_MIN
from liveclone.core.opening import open_clone
from liveclone.errors import CloneBusyError, NotACloneError, SourceChangedError, TargetError
from liveclone.sources.base import Extent
from liveclone.sources.local import LocalFileSource
from tests.conftest import allocated, make_image

RS = 64 << 10


def _clone(tmp_path: Path, src: Path, rs: int = RS) -> Clone:
    return open_clone(str(tmp_path / "clone.img"), LocalFileSource(str(src)), region_size=rs,
                      create=True, exclusive=True)


def _direct_source(tmp_path: Path) -> tuple[Path, bytes, int]:
    """A source of random data, and how many regions from its start make one run
    long enough for a bulk fill to write it with direct I/O (2 * DIRECT_MIN)."""
    src = tmp_path / "random.img"
    data = os.urandom(4 * DIRECT_MIN)
    src.write_bytes(data)
    return src, data, 2 * DIRECT_MIN // RS


def test_reads_come_from_source_until_copied(tmp_path: Path, source_image) -> None:
    src, data = source_image
    with _clone(tmp_path, src) as c:
        assert c.regions_present == 0
        assert bytes(c.read(0, len(data))) == data
        assert bytes(c.read(RS - 10, 20)) == data[RS - 10:RS + 10]
        assert c.stats.bytes_copied == 0


def test_partial_write_to_absent_region_completes_only_its_block(tmp_path: Path,
                                                                 source_image) -> None:
    """Invariant 5 at 4 KiB: the write's block is completed from the source and
    marked; the rest of the region stays the source's, fetched by nobody."""
    src, data = source_image
    with _clone(tmp_path, src) as c:
        c.write(RS + 100, b"x" * 50)
        assert not any(c.is_present(r) for r in range(3)) and c.regions_partial == 1
        assert c.stats.bytes_from_source == 4096 - 50
        # The clone file holds the whole block: source bytes around the write.
        with open(c.path, "rb") as f:
            f.seek(RS)
            block = f.read(4096)
        assert block == data[RS:RS + 100] + b"x" * 50 + data[RS + 150:RS + 4096]
        assert bytes(c.read(0, 3 * RS)) == data[:RS + 100] + b"x" * 50 + data[RS + 150:3 * RS]


def test_write_across_regions_and_unaligned(tmp_path: Path, source_image) -> None:
    src, data = source_image
    model = bytearray(data)
    with _clone(tmp_path, src) as c:
        blob = os.urandom(3 * RS + 333)
        c.write(RS // 2 + 7, blob)
        model[RS // 2 + 7:RS // 2 + 7 + len(blob)] = blob
        assert bytes(c.read(0, len(model))) == bytes(model)
        Copier(c).start().wait()
        assert c.complete
    assert Path(tmp_path / "clone.img").read_bytes() == bytes(model)


def test_copier_never_overwrites_guest_data(tmp_path: Path, source_image) -> None:
    src, data = source_image
    model = bytearray(data)
    with _clone(tmp_path, src) as c:
        for r in range(0, c.regions_total, 3):
            c.write(r * RS, b"G" * RS)
            model[r * RS:(r + 1) * RS] = b"G" * RS
        cp = Copier(c, workers=3, batch_bytes=4 * RS).start()
        assert cp.wait(30)
        cp.stop()
        # The seed's rule, asked directly: a copier write to a written region is
        # reported done and not performed; it was counted once, when the copier
        # passed it, and asking again counts nothing more.
        written = len(range(0, c.regions_total, 3))
        assert c.stats.regions_skipped == written
        assert c.fill(0, 1) == (0, 0)
        assert c.stats.regions_skipped == written
    assert Path(tmp_path / "clone.img").read_bytes() == bytes(model)


def test_whole_region_zero_and_trim_make_holes_without_copying(tmp_path: Path,
                                                               source_image) -> None:
    src, data = source_image
    with _clone(tmp_path, src) as c:
        c.write_zeroes(2 * RS, 2 * RS)
        c.trim(5 * RS, RS)
        assert c.is_present(2) and c.is_present(3) and c.is_present(5)
        assert c.stats.bytes_copied == 0
        assert bytes(c.read(2 * RS, 2 * RS)) == bytes(2 * RS)
        assert c.block_status(2 * RS, 2 * RS) == [Extent(2 * RS, 2 * RS, False)]


def test_partial_trim_of_absent_region_is_advisory(tmp_path: Path, source_image) -> None:
    src, data = source_image
    with _clone(tmp_path, src) as c:
        c.trim(RS + 10, 100)
        assert not c.is_present(1)
        assert bytes(c.read(RS, RS)) == data[RS:2 * RS]


def test_partial_zero_write_keeps_the_rest(tmp_path: Path, source_image) -> None:
    src, data = source_image
    with _clone(tmp_path, src) as c:
        c.write_zeroes(RS + 10, 100, no_hole=True)
        expect = data[RS:RS + 10] + bytes(100) + data[RS + 110:2 * RS]
        assert bytes(c.read(RS, RS)) == expect


def test_complete_clone_is_standalone_and_sparse(tmp_path: Path, source_image) -> None:
    src, data = source_image
    with _clone(tmp_path, src) as c:
        Copier(c).start().wait()
    clone_path = tmp_path / "clone.img"
    assert clone_path.read_bytes() == data
    # zero data blocks in the source became holes: the clone is no bigger than the source
    assert allocated(clone_path) <= allocated(src)
    os.unlink(src)
    with open_clone(str(clone_path), None) as c:
        assert c.complete
        assert bytes(c.read(0, len(data))) == data


def test_reopen_refuses_changed_source(tmp_path: Path, source_image) -> None:
    src, _ = source_image
    _clone(tmp_path, src).close()
    with open(src, "r+b") as f:
        f.write(b"changed")
    with pytest.raises(SourceChangedError, match="changed since"):
        open_clone(str(tmp_path / "clone.img"), LocalFileSource(str(src)))


def test_second_opener_is_refused(tmp_path: Path, source_image) -> None:
    src, _ = source_image
    with _clone(tmp_path, src):
        with pytest.raises(CloneBusyError):
            open_clone(str(tmp_path / "clone.img"), LocalFileSource(str(src)))


def test_existing_file_is_not_a_clone(tmp_path: Path, source_image) -> None:
    src, _ = source_image
    (tmp_path / "clone.img").write_bytes(b"mine")
    with pytest.raises(NotACloneError, match="not a liveclone clone"):
        open_clone(str(tmp_path / "clone.img"), LocalFileSource(str(src)))
    with pytest.raises(TargetError):
        _clone(tmp_path, src)
    assert (tmp_path / "clone.img").read_bytes() == b"mine"


def test_flushed_writes_survive_a_crash(tmp_path: Path, source_image) -> None:
    src, data = source_image
    c = _clone(tmp_path, src)
    c.write(3 * RS + 5, b"durable")
    c.flush()
    c.write(6 * RS + 5, b"volatile")  # not flushed: may be lost, never half-applied
    c.abandon()
    with open_clone(str(tmp_path / "clone.img"), LocalFileSource(str(src))) as c2:
        assert bytes(c2.read(3 * RS + 5, 7)) == b"durable"
        assert c2.regions_partial == 1  # block 0 of region 3, committed; region 6 lost
        got = bytes(c2.read(6 * RS, RS))
        assert got in (data[6 * RS:7 * RS],
                       data[6 * RS:6 * RS + 5] + b"volatile" + data[6 * RS + 13:7 * RS])


def test_concurrent_guest_writes_and_copier(tmp_path: Path) -> None:
    """Threads write disjoint stripes while the copier runs: every byte ends right."""
    from tests.conftest import make_image

    src = tmp_path / "src.img"
    data = make_image(src, 4 << 20, seed=7)
    model = bytearray(data)
    c = open_clone(str(tmp_path / "clone.img"), LocalFileSource(str(src)), region_size=4096,
                   create=True, exclusive=True)
    cp = Copier(c, workers=2, batch_bytes=64 << 10).start()
    writes: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def writer(k: int) -> None:
        import random

        rng = random.Random(k)
        for _ in range(200):
            # stripe k of 4: 4 KiB-aligned cells owned by this thread only
            cell = rng.randrange(len(data) // 4096 // 4) * 4 + k
            off = cell * 4096 + rng.randrange(0, 2048)
            blob = rng.randbytes(rng.randrange(1, 2048))
            c.write(off, blob)
            with lock:
                writes.append((off, blob))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for off, blob in writes:  # per-thread order is preserved; stripes are disjoint
        model[off:off + len(blob)] = blob
    assert bytes(c.read(0, len(model))) == bytes(model)
    assert cp.wait(60)
    cp.stop()
    c.close()
    assert (tmp_path / "clone.img").read_bytes() == bytes(model)


@pytest.mark.parametrize("bulk", [True, False], ids=["direct", "buffered"])
def test_failed_fill_keeps_the_regions_it_finished(tmp_path: Path, monkeypatch,
                                                    bulk: bool) -> None:
    """A disk that fills up mid-batch: regions written before the failure stay present
    (and correct); the rest stay absent. A bulk fill meets it in a direct write."""
    import errno

    import liveclone.core.clone as clone_mod

    src, data, n = _direct_source(tmp_path)  # regions 0..n-1: direct if bulk
    real = os.pwrite
    budget = 5 * RS + 4096  # the disk fills up inside region 5
    fds: set[int] = set()

    def pwrite(fd: int, buf, offset: int) -> int:
        fds.add(fd)
        if offset >= budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, memoryview(buf)[:budget - offset], offset)  # short, like a full disk

    with _clone(tmp_path, src) as c:
        c._fill._share_blocks = False  # write, even on a filesystem that can share blocks
        # os.pwrite is the Python path's; the compiled put_runs meets a real full
        # disk in tests/unit/core/test_putruns.py.
        monkeypatch.setattr(copyc, "lib", None)
        monkeypatch.setattr(clone_mod.os, "pwrite", pwrite)
        with pytest.raises(OSError):
            c.fill(0, n, bulk=bulk)
        monkeypatch.undo()
        assert (c._fill._dfd in fds) == bulk  # the failing write was direct, or buffered
        present = [r for r in range(n) if c.is_present(r)]
        assert present == list(range(5))
        assert bytes(c.read(0, n * RS)) == data[:n * RS]


def test_read_nowait_serves_cached_bytes_only(tmp_path: Path, source_image) -> None:
    src, data = source_image
    with _clone(tmp_path, src) as c:
        c.write(0, b"p" * RS)
        got = c.read_nowait(100, 200)
        assert got is not None and bytes(got) == b"p" * 200  # just written: cached
        c.read(RS, RS)  # the source's bytes are in the page cache now
        got = c.read_nowait(RS - 10, 20)  # spans present and absent (cached source)
        assert got is not None and bytes(got) == b"p" * 10 + data[RS:RS + 10]
        c.copy_on_read = True
        assert c.read_nowait(RS - 10, 20) is None  # must fill first: not on a loop


def test_write_nowait_only_for_present_regions(tmp_path: Path, source_image) -> None:
    src, data = source_image
    with _clone(tmp_path, src) as c:
        assert not c.write_nowait(10, b"x")  # absent: needs a fill first
        assert not c.is_present(0)
        c.write(0, b"p" * RS)
        assert c.write_nowait(10, b"xyz")
        assert bytes(c.read(8, 6)) == b"ppxyzp"
        assert not c.write_nowait(RS - 1, b"ab")  # spills into an absent region
        assert bytes(c.read(RS - 1, 2)) == b"p" + data[RS:RS + 1]


def test_fills_use_direct_io_and_buffered_reads_stay_coherent(tmp_path: Path,
                                                             monkeypatch) -> None:
    """Bulk fills write runs of DIRECT_MIN or more with O_DIRECT. Pages of a region
    that a buffered read (say, a neighbour's readahead) cached while it was still a
    hole must not survive the fill: reads of the now present region see the
    source's bytes."""
    from liveclone.core import fsops

    src, data, n = _direct_source(tmp_path)  # regions 1..n: one run that goes direct
    with _clone(tmp_path, src) as c:
        assert c._fill._dfd is not None and c.source is not None
        assert c.source.direct_fileno() is not None
        direct: list[int] = []
        real = fsops.pwrite_all

        def spy(fd: int, *args: object) -> None:
            if fd == c._fill._dfd:
                direct.append(fd)
            real(fd, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(fsops, "pwrite_all", spy)
        c._fill._share_blocks = False  # as found on ext4 (no reflink)
        c.write(0, b"g" * RS)
        stale = os.pread(c._fd, n * RS, RS)  # regions 1..n are holes: zeros get cached
        assert stale == bytes(n * RS)
        c.fill(1, n + 1, bulk=True)
        assert direct  # the run went with direct I/O
        assert bytes(c.read(RS, n * RS)) == data[RS:(n + 1) * RS]
        assert os.pread(c._fd, n * RS, RS) == data[RS:(n + 1) * RS]


@pytest.mark.parametrize("size", [(1 << 20) + 3 * RS + 1000, (2 << 20) - 512, 4096 + 7])
def test_unaligned_source_tail_is_copied(tmp_path: Path, size: int) -> None:
    """Direct I/O takes whole 4 KiB blocks (runs of DIRECT_MIN, 1 MiB, or more); the
    tail of a source whose size is not a multiple of that goes through the page
    cache, and the clone keeps the size."""
    src = tmp_path / "odd.img"
    data = os.urandom(size)
    src.write_bytes(data)
    with _clone(tmp_path, src) as c:
        Copier(c).start().wait()
        assert c.complete
    assert (tmp_path / "clone.img").read_bytes() == data


def test_fills_work_without_direct_io(tmp_path: Path, source_image) -> None:
    """Where a filesystem refuses O_DIRECT, fills read and write through the page cache."""
    src, data = source_image
    model = bytearray(data)
    with _clone(tmp_path, src) as c:
        assert c._fill._dfd is not None and c.source is not None
        for owner in (c._fill, c.source):
            os.close(owner._dfd)  # type: ignore[union-attr]
            owner._dfd = None  # type: ignore[union-attr]
        c.write(RS + 5, b"w" * 10)
        model[RS + 5:RS + 15] = b"w" * 10
        Copier(c).start().wait()
        assert c.complete
    assert (tmp_path / "clone.img").read_bytes() == bytes(model)


@pytest.mark.parametrize("refuse", ["preadv", "pwrite"])
def test_direct_io_refused_midway_falls_back(tmp_path: Path, monkeypatch,
                                             refuse: str) -> None:
    """A filesystem that opens files with O_DIRECT but refuses the I/O itself (EINVAL):
    the copy goes on through the page cache instead of failing."""
    import errno

    import liveclone.core.clone as clone_mod

    # Data in blocks long enough to be written with direct I/O.
    src = tmp_path / "big.img"
    data = make_image(src, 8 << 20, block=2 * DIRECT_MIN)
    with _clone(tmp_path, src) as c:
        c._fill._share_blocks = False
        direct_fds = {c._fill._dfd, c.source.direct_fileno()}  # type: ignore[union-attr]
        real = getattr(os, refuse)

        def refusing(fd: int, *args: object) -> object:
            if fd in direct_fds:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, *args)

        monkeypatch.setattr(clone_mod.os, refuse, refusing)
        Copier(c).start().wait()
        monkeypatch.undo()
        assert c.complete and not c._fill._direct
    assert (tmp_path / "clone.img").read_bytes() == data


def test_only_bulk_fills_keep_a_copy_buffer_in_their_thread(tmp_path: Path,
                                                            source_image) -> None:
    """Fill buffers are bounded by the copier's threads: a guest-driven fill
    (copy-on-read, CACHE) on a frontend's thread reads into a buffer of its own size
    and keeps nothing; a copier batch keeps its thread's COPY_CHUNK buffer."""
    from liveclone.core import fill

    src, data = source_image
    kept: dict[str, bool] = {}

    def run(name: str, first: int, end: int, bulk: bool) -> None:
        c.fill(first, end, bulk=bulk)
        kept[name] = getattr(fill._BUFFERS, "buf", None) is not None

    with _clone(tmp_path, src) as c:
        for name, args in (("guest", (0, 4, False)), ("copier", (4, 8, True))):
            t = threading.Thread(target=run, args=(name, *args))
            t.start()
            t.join()
        assert kept == {"guest": False, "copier": True}
        assert bytes(c.read(0, 8 * RS)) == data[:8 * RS]
        assert c.regions_present == 8
