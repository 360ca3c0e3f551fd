"""The FUSE mount with real programs: cmp, dd, fallocate, several readers, kill -9."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveclone.core import verify
from liveclone.core.opening import open_clone
from liveclone.fuse import start_mount
from liveclone.session import CloneSession
from liveclone.sources.local import LocalFileSource

LIVECLONE = [sys.executable, "-m", "liveclone.cli.main"]
MiB = 1 << 20
SIZE = 24 * MiB


def make_source(path: Path, size: int = SIZE, seed: int = 7) -> bytearray:
    """Random data with a zero stretch and a hole, so sparse paths are used too."""
    data = bytearray(random.Random(seed).randbytes(size))
    data[size // 8:size // 4] = bytes(size // 8)
    hole = slice(size // 2, size // 2 + size // 8)
    data[hole] = bytes(size // 8)
    with open(path, "wb") as f:
        f.write(data[:hole.start])
        f.seek(hole.stop)
        f.write(data[hole.stop:])
    assert os.path.getsize(path) == size
    return data


class Mount:
    """A ``liveclone mount`` child process; ``stop()`` ends it, ``kill()`` crashes it."""

    def __init__(self, src: Path, clone: Path, mnt: Path, *args: str) -> None:
        mnt.mkdir(exist_ok=True)
        self.mnt = mnt
        self.proc = subprocess.Popen(
            [*LIVECLONE, "mount", str(src), str(clone), str(mnt), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            self.proc.wait()
            raise AssertionError(f"mount failed: {self.proc.stderr.read()}")  # type: ignore[union-attr]
        self.file = Path(line)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(60)
        self._unmount()
        return rc

    def kill(self) -> None:
        """kill -9: the mount stays behind, stale, until ``_unmount``."""
        self.proc.kill()
        self.proc.wait(60)

    def _unmount(self) -> None:
        if os.path.ismount(self.mnt) or _stale(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False,
                           capture_output=True)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _stale(mnt: Path) -> bool:
    try:
        os.stat(mnt)
    except OSError:
        return True
    return False


@pytest.fixture
def mounts() -> Iterator[list[Mount]]:
    started: list[Mount] = []
    try:
        yield started
    finally:
        for m in started:
            if m.proc.poll() is None:
                m.kill()
            m._unmount()


def finish(src: Path, clone: Path) -> None:
    subprocess.run([*LIVECLONE, "clone", str(src), str(clone), "--no-progress"], check=True,
                   capture_output=True)


def test_cmp_while_copying_and_finished_clone_equals_source(tmp_path: Path,
                                                            mounts: list[Mount]) -> None:
    src, clone = tmp_path / "src.img", tmp_path / "disk.img"
    expected = make_source(src)
    m = Mount(src, clone, tmp_path / "mnt", "--rate", "2M")
    mounts.append(m)
    assert m.file == tmp_path / "mnt" / "disk.img"
    assert m.file.stat().st_size == SIZE
    status = subprocess.run([*LIVECLONE, "status", str(clone)], capture_output=True, text=True)
    assert "copying" in status.stdout
    subprocess.run(["cmp", str(m.file), str(src)], check=True)
    assert m.stop() == 128 + signal.SIGTERM
    finish(src, clone)
    assert clone.read_bytes() == expected


def test_dd_writes_survive_kill9_and_remount(tmp_path: Path, mounts: list[Mount]) -> None:
    src, clone, mnt = tmp_path / "src.img", tmp_path / "disk.img", tmp_path / "mnt"
    expected = make_source(src)
    m = Mount(src, clone, mnt, "--rate", "1M")
    mounts.append(m)
    # Unaligned, across region edges, into the hole, and the last bytes of the disk.
    writes = [(1000, 5000), (65536 - 7, 70000), (SIZE // 2 + MiB + 3, 200000),
              (SIZE - 4096, 4096)]
    for i, (off, n) in enumerate(writes):
        payload = random.Random(100 + i).randbytes(n)
        subprocess.run(["dd", f"of={m.file}", "bs=1M", "oflag=seek_bytes", f"seek={off}",
                        "conv=notrunc,fsync", "status=none"], input=payload, check=True)
        expected[off:off + n] = payload
    m.kill()
    stale = subprocess.run([*LIVECLONE, "mount", str(src), str(clone), str(mnt)],
                           capture_output=True, text=True, timeout=60)
    assert stale.returncode == 2
    assert f"fusermount3 -u -z {mnt}" in stale.stderr
    m._unmount()
    m2 = Mount(src, clone, mnt, "--rate", "1M")
    mounts.append(m2)
    assert m2.file.read_bytes() == expected
    assert m2.stop() == 128 + signal.SIGTERM
    finish(src, clone)
    assert clone.read_bytes() == expected


def test_several_readers_and_o_direct(tmp_path: Path, mounts: list[Mount]) -> None:
    src, clone = tmp_path / "src.img", tmp_path / "disk.img"
    make_source(src)
    m = Mount(src, clone, tmp_path / "mnt", "--rate", "2M")
    mounts.append(m)
    readers = [subprocess.Popen(["cmp", str(m.file), str(src)]) for _ in range(4)]
    direct = subprocess.Popen(["dd", f"if={m.file}", f"of={tmp_path / 'direct.out'}",
                               "bs=256K", "iflag=direct", "status=none"])
    try:
        assert [r.wait(120) for r in readers] == [0, 0, 0, 0]
        assert direct.wait(120) == 0
    finally:
        for p in [*readers, direct]:
            if p.poll() is None:
                p.kill()
                p.wait()
    subprocess.run(["cmp", str(tmp_path / "direct.out"), str(src)], check=True)


def fallocate(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fallocate", *args, str(path)], capture_output=True, text=True)


def test_fallocate_punch_hole_and_zero_range_while_copying(tmp_path: Path,
                                                          mounts: list[Mount]) -> None:
    """util-linux fallocate on the mounted file: punch-hole and zero-range read back as
    zeros, on present and not yet copied regions, whole and partial (64 KiB regions);
    preallocation is a no-op; growing the file is refused."""
    src, clone = tmp_path / "src.img", tmp_path / "disk.img"
    model = make_source(src)
    m = Mount(src, clone, tmp_path / "mnt", "--rate", "1M")
    mounts.append(m)
    R = 65536
    ops = [
        ("--punch-hole", 1000, 5000),                    # partial, copied first
        ("--punch-hole", SIZE - 3 * MiB + 12345, 200000),  # absent: partial edges + whole
        ("--zero-range", SIZE - 5 * MiB + 777, 100000),  # absent, partial edges
        ("--zero-range", SIZE - 8 * MiB, 4 * R),         # absent, whole regions
        ("--punch-hole", SIZE - 6 * MiB + 100, 300),     # absent, inside one region
        ("--zero-range", 3 * R - 10, 20),                # across a region edge
        ("--punch-hole", SIZE - 100, 4096),              # past the end: clipped
    ]
    for mode, off, n in ops:
        r = fallocate(m.file, mode, "-o", str(off), "-l", str(n))
        assert r.returncode == 0, (mode, off, n, r.stderr)
        end = min(off + n, SIZE)
        model[off:end] = bytes(end - off)
    status = subprocess.run([*LIVECLONE, "status", str(clone)], capture_output=True, text=True)
    assert "copying" in status.stdout  # the ops above did meet absent regions
    # Preallocation inside the file is a no-op; growing the file is refused.
    assert fallocate(m.file, "-o", "0", "-l", str(4 * R)).returncode == 0
    assert fallocate(m.file, "--keep-size", "-o", str(SIZE - R), "-l", str(4 * R)).returncode == 0
    for args in (["-o", str(SIZE - 10), "-l", "100"],
                 ["--zero-range", "-o", str(SIZE - 10), "-l", "100"]):
        r = fallocate(m.file, *args)
        assert r.returncode != 0 and "not permitted" in r.stderr, (args, r.stderr)
    assert m.file.stat().st_size == SIZE
    assert m.file.read_bytes() == model
    with open(m.file, "rb", buffering=0) as f:  # past the page cache as well
        fd = os.open(m.file, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 1 << 20)
            for off in range(0, SIZE, 1 << 20):
                assert os.preadv(fd, [buf], off) == 1 << 20
                assert buf[:] == model[off:off + (1 << 20)], off
        finally:
            os.close(fd)
        f.seek(SIZE - 3 * MiB)
        assert f.read(MiB) == model[SIZE - 3 * MiB:SIZE - 2 * MiB]
    assert m.stop() == 128 + signal.SIGTERM
    finish(src, clone)
    assert clone.read_bytes() == model


def test_read_only_mount_refuses_writes(tmp_path: Path, mounts: list[Mount]) -> None:
    src, clone = tmp_path / "src.img", tmp_path / "disk.img"
    make_source(src)
    m = Mount(src, clone, tmp_path / "mnt", "--read-only")
    mounts.append(m)
    with pytest.raises(OSError):
        os.open(m.file, os.O_WRONLY)
    subprocess.run(["cmp", str(m.file), str(src)], check=True)


def test_in_process_mount_with_other_work(tmp_path: Path) -> None:
    """start_mount serves from a background thread while this thread does I/O on it."""
    src, clone = tmp_path / "src.img", tmp_path / "disk.img"
    expected = make_source(src, 4 * MiB)
    (tmp_path / "mnt").mkdir()
    session = CloneSession(str(src), str(clone), rate=1 << 20).start()
    try:
        handle = start_mount(session.clone, str(tmp_path / "mnt"))
        try:
            fd = os.open(handle.path, os.O_RDWR | os.O_DIRECT)
            try:
                buf = bytearray(random.Random(3).randbytes(8192))
                aligned = mmap.mmap(-1, 8192)
                aligned[:] = buf
                assert os.pwrite(fd, aligned, 12288) == 8192
                os.fsync(fd)
                expected[12288:12288 + 8192] = buf
            finally:
                os.close(fd)
            with open(handle.path, "rb") as f:
                assert f.read() == expected
        finally:
            handle.stop()
        assert not os.path.ismount(tmp_path / "mnt")
    finally:
        session.close()
    finish(src, clone)
    assert clone.read_bytes() == expected


def test_two_mounts_in_one_process_direct_io_errors_and_busy_stop(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Two clones mounted by one process at once. The direct_io mount sees writes made
    behind the kernel's back; a Python exception in a callback becomes EIO and the
    mount keeps serving; stop() ends a mount whose file is still open."""
    sessions, handles = [], []
    models = []
    try:
        for i in range(2):
            src, clone = tmp_path / f"src{i}.img", tmp_path / f"disk{i}.img"
            models.append(make_source(src, 2 * MiB, seed=20 + i))
            (tmp_path / f"mnt{i}").mkdir()
            sessions.append(CloneSession(str(src), str(clone), rate=1 << 20).start())
        handles.append(start_mount(sessions[0].clone, str(tmp_path / "mnt0")))
        handles.append(start_mount(sessions[1].clone, str(tmp_path / "mnt1"), direct_io=True))
        for h, model in zip(handles, models, strict=True):
            with open(h.path, "rb") as f:
                assert f.read() == model
        # A write that does not pass through the mount: direct_io shows it at once.
        sessions[1].clone.write(4096, b"\x5a" * 100)
        models[1][4096:4196] = b"\x5a" * 100
        with open(handles[1].path, "rb") as f:
            assert f.read() == models[1]
        # A bug in a callback: EIO for that request, and the loop lives on.
        clone1 = sessions[1].clone

        def broken(offset: int, length: int) -> bytearray:
            raise ValueError("injected")

        clone1.read = broken  # type: ignore[method-assign]
        with open(handles[1].path, "rb") as f, pytest.raises(OSError) as exc:
            f.read(4096)
        assert exc.value.errno == errno.EIO
        del clone1.read
        assert handles[1].fs.last_error is not None and "injected" in handles[1].fs.last_error
        with open(handles[1].path, "rb") as f:
            assert f.read() == models[1]
        # Stop the first mount while its file is open here: stop() still returns.
        busy = open(handles[0].path, "rb")
        try:
            handles[0].stop()
            assert not os.path.ismount(tmp_path / "mnt0")
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN: the server is gone
                busy.close()
        with open(handles[1].path, "rb") as f:  # the other mount is unaffected
            assert f.read() == models[1]
        handles[1].stop()
        assert not os.path.ismount(tmp_path / "mnt1")
    finally:
        for h in handles:
            with contextlib.suppress(Exception):
                h.stop()
        for i in range(2):
            subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / f"mnt{i}")],
                           capture_output=True)
        for s in sessions:
            s.close()
    err = capfd.readouterr().err
    assert "fuse:" not in err, err  # libfuse complained about something


def test_sigint_unmounts_and_commits(tmp_path: Path, mounts: list[Mount]) -> None:
    """Ctrl-C reaches the command's own handler (libfuse leaves it alone)."""
    src, clone = tmp_path / "src.img", tmp_path / "disk.img"
    model = make_source(src)
    m = Mount(src, clone, tmp_path / "mnt", "--rate", "1M")
    mounts.append(m)
    fd = os.open(m.file, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x77" * 3000, SIZE - MiB + 5)  # an absent region: filled first
    finally:
        os.close(fd)
    model[SIZE - MiB + 5:SIZE - MiB + 3005] = b"\x77" * 3000
    m.proc.send_signal(signal.SIGINT)
    assert m.proc.wait(60) == 128 + signal.SIGINT
    assert m.proc.stderr is not None and "the map is committed" in m.proc.stderr.read()
    assert not os.path.ismount(m.mnt)
    finish(src, clone)
    assert clone.read_bytes() == model


def test_fsync_commits_what_the_file_wrote_and_is_free_with_nothing_new(
        tmp_path: Path) -> None:
    """An fsync of the mounted file makes every write the file acknowledged before it
    durable, data and map; one with no write or fallocate since the last completed
    flush commits nothing (no fdatasync: a loop device sends such flushes). A crash
    (``abandon``: no last commit) then keeps exactly what was fsynced."""
    src, path, mnt = tmp_path / "src.img", tmp_path / "disk.img", tmp_path / "mnt"
    expected = make_source(src, 2 * MiB)
    mnt.mkdir()
    clone = open_clone(str(path), LocalFileSource(str(src)), create=True, autocommit=False)
    rs = clone.geometry.region_size
    handle = start_mount(clone, str(mnt))
    try:
        fd = os.open(handle.path, os.O_RDWR)
        try:
            for n, region in enumerate((3, 7), start=1):  # absent: each write pends a run
                data = random.Random(region).randbytes(rs)
                assert os.pwrite(fd, data, region * rs) == rs
                expected[region * rs:(region + 1) * rs] = data
                os.fsync(fd)
                assert clone.regions_committed == n
                commits = clone.commits
                os.fsync(fd)  # nothing new: answered without a commit
                assert clone.commits == commits
            fallocate(Path(handle.path), "--punch-hole", "--offset", str(9 * rs),
                      "--length", str(rs)).check_returncode()
            expected[9 * rs:10 * rs] = bytes(rs)
            os.fsync(fd)
            assert clone.regions_committed == 3
        finally:
            os.close(fd)
    finally:
        handle.stop()
        clone.abandon()  # as kill -9: nothing more is committed
    with open_clone(str(path), LocalFileSource(str(src))) as again:
        assert again.regions_present == 3
        assert again.read(0, 2 * MiB) == expected


def test_writes_fill_absent_regions_and_take_write_intent_before_the_short_path(
        tmp_path: Path) -> None:
    """Writes through the mount over copied, written and absent regions. Only regions
    present and already written by the guest (write intent done) take the one-pwrite
    path (``present_writes``); the first write over a copied region gets its intent
    first, and a partial write into an absent region fills it first, also after a
    whole block of it was written. After fsync and a crash (``abandon``), the clone
    equals the model, and `verify` finds no mismatch."""
    src, path, mnt = tmp_path / "src.img", tmp_path / "disk.img", tmp_path / "mnt"
    expected = make_source(src, 2 * MiB)
    mnt.mkdir()
    clone = open_clone(str(path), LocalFileSource(str(src)), create=True, autocommit=False)
    rs, total = clone.geometry.region_size, clone.regions_total
    clone.fill(0, total // 2, wait=True)  # the first half copied, the rest absent
    rng = random.Random(17)
    handle = start_mount(clone, str(mnt))
    try:
        fd = os.open(handle.path, os.O_RDWR)
        try:
            def write(offset: int, data: bytes) -> None:
                assert os.pwrite(fd, data, offset) == len(data)
                expected[offset:offset + len(data)] = data

            for region in range(0, total, 2):  # copied and absent regions, whole blocks
                write(region * rs + 4096, rng.randbytes(4096))
            for region in range(0, total, 2):  # then partial writes into each again
                write(region * rs + 9000, rng.randbytes(1000))
            for _ in range(64):  # anywhere, some over two regions
                offset = rng.randrange(2 * MiB - 6000)
                write(offset, rng.randbytes(rng.choice((512, 4096, 6000))))
            os.fsync(fd)
        finally:
            os.close(fd)
        assert handle.fs.present_writes > total // 2
        with open(handle.path, "rb") as f:
            assert f.read() == expected
    finally:
        handle.stop()
        clone.abandon()  # as kill -9: nothing more is committed
    with open_clone(str(path), LocalFileSource(str(src))) as again:
        assert again.read(0, 2 * MiB) == expected
    report = verify.verify_clone(str(path))
    assert report.mismatch_count == 0, report.mismatched
    assert report.guest_count > 0


def test_failed_fdatasync_refuses_every_later_write(tmp_path: Path, mounts: list[Mount]) -> None:
    """strace makes every fdatasync of the clone file fail (not those of its digest
    file: the first write's intent succeeds). After the fsync's failed commit the
    clone is in its failed mode: the fsync, and every write, also one over the
    region already written (the one-pwrite path), get EIO, while reads still work."""
    src, clone = tmp_path / "src.img", tmp_path / "disk.img"
    model = make_source(src, 2 * MiB)
    finish(src, clone)  # complete: no commit but the fsync's
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount.__new__(Mount)
    m.mnt = mnt
    m.proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=fdatasync", "-P", str(clone),
         "-e", "inject=fdatasync:error=EIO", *LIVECLONE, "mount", str(src),
         str(clone), str(mnt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mounts.append(m)
    assert m.proc.stdout is not None
    m.file = Path(m.proc.stdout.readline().strip())
    fd = os.open(m.file, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"\x11" * 4096, 8192) == 4096  # with its intent
        assert os.pwrite(fd, b"\x22" * 4096, 8192) == 4096  # marked: one pwrite
        with pytest.raises(OSError) as exc:
            os.fsync(fd)
        assert exc.value.errno == errno.EIO
        for offset in (8192, 12288, MiB):
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"\x33" * 4096, offset)
            assert exc.value.errno == errno.EIO
        model[8192:12288] = b"\x22" * 4096
        assert os.pread(fd, 2 * MiB, 0) == model
    finally:
        os.close(fd)
    # strace ends when liveclone does (a SIGTERM to strace leaves it waiting).
    child = (Path("/proc") / str(m.proc.pid) / "task" / str(m.proc.pid) / "children").read_text()
    os.kill(int(child.split()[0]), signal.SIGTERM)
    m.proc.wait(60)
