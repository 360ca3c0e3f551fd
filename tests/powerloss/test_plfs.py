"""The power-loss file system itself: what survives a cut, and what the kernel does
with it (page cache, O_DIRECT, SEEK_DATA, copy_file_range, flock, fallocate)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.powerloss import PAGE, PLFS, powerloss_mount
from tests.powerloss.plfs import CTL_NAME

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def pattern(tag: int, n: int) -> bytes:
    return random.Random(tag).randbytes(n)


def write_file(path: Path, data: bytes, sync: bool = False, offset: int = 0,
               flags: int = os.O_CREAT) -> None:
    fd = os.open(path, os.O_RDWR | flags, 0o644)
    try:
        os.pwrite(fd, data, offset)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[PLFS]:
    with powerloss_mount(tmp_path, seed=1234) as fs:
        yield fs


# -- what survives a cut ------------------------------------------------------------


def test_unsynced_write_is_lost_with_p0(fs: PLFS) -> None:
    f = fs / "f"
    data = pattern(1, 3 * PAGE + 100)
    write_file(f, data)  # closed, never synced
    assert f.read_bytes() == data
    assert f.stat().st_size == len(data)
    assert (fs.backing / "f").read_bytes() == b""  # nothing reached the "disk"
    st = fs.stats()
    assert st["dirty_files"] == 1 and st["dirty_pages"] == 4
    cut = fs.cut(p=0)
    assert cut["pages_lost"] == 4 and cut["pages_kept"] == 0
    assert f.exists()  # creating it was durable at once
    assert f.stat().st_size == 0
    assert f.read_bytes() == b""
    assert fs.stats()["dirty_pages"] == 0


@pytest.mark.parametrize("sync", [os.fsync, os.fdatasync], ids=["fsync", "fdatasync"])
def test_synced_write_survives_a_cut(fs: PLFS, sync: Callable[[int], None]) -> None:
    f = fs / "f"
    old = pattern(2, 3 * PAGE)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, old, 0)
        sync(fd)
        assert (fs.backing / "f").read_bytes() == old
        os.pwrite(fd, b"B" * PAGE, PAGE)  # after the sync: not durable
        assert os.pread(fd, 3 * PAGE, 0) == old[:PAGE] + b"B" * PAGE + old[2 * PAGE:]
    finally:
        os.close(fd)
    counters = fs.stats()
    assert counters["fdatasyncs" if sync is os.fdatasync else "fsyncs"] == 1
    fs.cut(p=0)
    assert f.read_bytes() == old


def test_everything_survives_with_p1_and_sync_command(fs: PLFS) -> None:
    a, b = fs / "a", fs / "b"
    write_file(a, b"a" * 5000)
    fs.cut(p=1)
    assert a.read_bytes() == b"a" * 5000
    write_file(b, b"b" * 5000)
    fs.sync()
    assert (fs.backing / "b").read_bytes() == b"b" * 5000
    fs.cut(p=0)
    assert b.read_bytes() == b"b" * 5000


def torn_write(fs: PLFS, pages: int = 64) -> tuple[bytes, bytes, bytes]:
    f = fs / "torn"
    old, new = pattern(3, pages * PAGE), pattern(4, pages * PAGE)
    write_file(f, old, sync=True)
    write_file(f, new)  # one 256 KiB write, unsynced
    fs.cut(p=0.5)
    return old, new, f.read_bytes()


def test_cut_tears_a_write_into_whole_old_and_new_pages(tmp_path: Path) -> None:
    with powerloss_mount(tmp_path, seed=7, name="one") as fs:
        old, new, got = torn_write(fs)
        last = fs.stats()["last_cut"]
    assert len(got) == len(old)
    mask = []
    for i in range(64):
        page = got[i * PAGE:(i + 1) * PAGE]
        assert page in (old[i * PAGE:(i + 1) * PAGE], new[i * PAGE:(i + 1) * PAGE]), i
        mask.append(page == new[i * PAGE:(i + 1) * PAGE])
    assert 10 < sum(mask) < 54, mask  # about half: a mix, not all or nothing
    assert last["pages_kept"] == sum(mask) and last["pages_lost"] == 64 - sum(mask)
    # The same seed and workload tear the same way; another seed differently.
    with powerloss_mount(tmp_path, seed=7, name="two") as fs:
        assert torn_write(fs)[2] == got
    with powerloss_mount(tmp_path, seed=8, name="three") as fs:
        assert torn_write(fs)[2] != got


def test_pending_size_changes_are_lost_with_p0(fs: PLFS) -> None:
    a = pattern(5, 3 * PAGE)
    names = ["grow", "shrink", "otrunc", "fallocate", "shrink-synced"]
    for name in names:
        write_file(fs / name, a, sync=True)
    write_file(fs / "grow", b"x" * PAGE, offset=5 * PAGE)  # past the end
    os.truncate(fs / "shrink", 100)
    write_file(fs / "otrunc", b"new", flags=os.O_TRUNC)  # the classic lost-file pattern
    fd = os.open(fs / "fallocate", os.O_RDWR)
    os.posix_fallocate(fd, 0, 8 * PAGE)
    os.close(fd)
    os.truncate(fs / "shrink-synced", 100)
    fsync_path(fs / "shrink-synced")
    assert (fs / "grow").read_bytes() == a + bytes(2 * PAGE) + b"x" * PAGE
    assert (fs / "shrink").read_bytes() == a[:100]
    assert (fs / "otrunc").read_bytes() == b"new"
    assert (fs / "fallocate").read_bytes() == a + bytes(5 * PAGE)
    for name in names[:-1]:
        assert (fs.backing / name).read_bytes() == a
    fs.cut(p=0)
    for name in names[:-1]:
        assert (fs / name).read_bytes() == a, name
        assert (fs / name).stat().st_size == len(a), name
    assert (fs / "shrink-synced").read_bytes() == a[:100]


def test_shrink_then_grow_reads_zeros_and_persists_with_p1(fs: PLFS) -> None:
    a = pattern(6, 3 * PAGE)
    f = fs / "f"
    write_file(f, a, sync=True)
    os.truncate(f, 100)
    os.truncate(f, 3 * PAGE)
    write_file(f, b"w" * 10, offset=PAGE + 5)
    want = a[:100] + bytes(PAGE + 5 - 100) + b"w" * 10
    want += bytes(3 * PAGE - len(want))
    assert f.read_bytes() == want
    fs.cut(p=1)
    assert f.read_bytes() == want
    assert (fs.backing / "f").read_bytes() == want


def test_size_change_and_pages_follow_the_coins(fs: PLFS) -> None:
    """File 1 page of A grows to 8 pages of B, unsynced. After a p=0.5 cut each
    file has either its old size (and page 0 old or new) or its new size (page 0
    old or new, the others new or never written: zeros)."""
    a, b = b"A" * PAGE, b"B" * 8 * PAGE
    names = [f"f{i}" for i in range(16)]
    for name in names:
        write_file(fs / name, a, sync=True)
        write_file(fs / name, b)
    fs.cut(p=0.5)
    sizes = set()
    for name in names:
        got = (fs / name).read_bytes()
        sizes.add(len(got))
        assert len(got) in (PAGE, 8 * PAGE), name
        assert got[:PAGE] in (a, b[:PAGE]), name
        for i in range(1, len(got) // PAGE):
            assert got[i * PAGE:(i + 1) * PAGE] in (bytes(PAGE), b[:PAGE]), (name, i)
    assert sizes == {PAGE, 8 * PAGE}  # both outcomes happened (fixed seed)


def test_rename_carries_unsynced_data(fs: PLFS) -> None:
    old, new = b"old" * 2000, b"new" * 3000
    for name in ("f", "g", "h"):
        write_file(fs / name, old, sync=True)
    # f: written under a temporary name, renamed over f, then fsynced through the
    # descriptor opened under the old name.
    fd = os.open(fs / "f.tmp", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, new)
        os.rename(fs / "f.tmp", fs / "f")
        assert (fs / "f").read_bytes() == new
        assert (fs.backing / "f").read_bytes() == b""  # the rename is durable, data not
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (fs.backing / "f").read_bytes() == new
    # g: renamed without fsync, then a cut that loses everything: an empty g.
    write_file(fs / "g.tmp", new)
    os.rename(fs / "g.tmp", fs / "g")
    # h: the same, and a hard link shares the dirty state.
    write_file(fs / "h.tmp", new)
    os.rename(fs / "h.tmp", fs / "h")
    os.link(fs / "h", fs / "h.link")
    assert (fs / "h.link").read_bytes() == new
    fs.cut(p=0)
    assert (fs / "f").read_bytes() == new
    assert (fs / "g").read_bytes() == b""
    assert (fs / "h").read_bytes() == b"" == (fs / "h.link").read_bytes()
    assert not (fs / "g.tmp").exists() and not (fs / "h.tmp").exists()
    write_file(fs / "i.tmp", new)
    os.rename(fs / "i.tmp", fs / "i")
    fs.cut(p=1)
    assert (fs / "i").read_bytes() == new
    assert sorted(os.listdir(fs.mountpoint)) == ["f", "g", "h", "h.link", "i"]


def test_punch_hole_and_zero_range(fs: PLFS) -> None:
    data = pattern(7, 8 * PAGE)
    f = fs / "f"
    write_file(f, data, sync=True)
    blocks = os.stat(fs.backing / "f").st_blocks
    fd = os.open(f, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 * PAGE, 3 * PAGE)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 200)  # part of a page
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 6 * PAGE, 10 * PAGE)  # past end
        want = bytearray(data)
        want[100:300] = bytes(200)
        want[2 * PAGE:5 * PAGE] = bytes(3 * PAGE)
        want[6 * PAGE:] = bytes(2 * PAGE)
        assert os.pread(fd, 16 * PAGE, 0) == want
        assert os.fstat(fd).st_size == 8 * PAGE
        with pytest.raises(OSError) as e:  # PUNCH_HOLE needs KEEP_SIZE (fallocate(2))
            fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, PAGE)
        assert e.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    assert (fs.backing / "f").read_bytes() == data
    fs.cut(p=0)
    assert f.read_bytes() == data  # unsynced: the holes never happened
    fd = os.open(f, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 * PAGE, 3 * PAGE)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 7 * PAGE, 3 * PAGE)  # grows the file
        os.fdatasync(fd)
    finally:
        os.close(fd)
    fs.cut(p=0)
    want = bytearray(data)
    want[2 * PAGE:5 * PAGE] = bytes(3 * PAGE)
    want[7 * PAGE:] = bytes(3 * PAGE)
    assert f.read_bytes() == want
    # The synced punch is a real hole in the backing file.
    assert os.stat(fs.backing / "f").st_blocks < blocks


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct_io", "cached"])
def test_reads_after_a_cut_are_not_stale(tmp_path: Path, direct_io: bool) -> None:
    """The kernel must not serve pages or sizes from before the cut: not through a
    descriptor that was open across it, not through a new one, not to stat."""
    with powerloss_mount(tmp_path, direct_io=direct_io) as fs:
        check_reads_after_a_cut(fs, direct_io)


def check_reads_after_a_cut(fs: PLFS, direct_io: bool) -> None:
    f, g = fs / "f", fs / "g"
    old = pattern(8, 4 * PAGE)
    new = pattern(9, 6 * PAGE)
    write_file(f, old, sync=True)
    write_file(g, old, sync=True)
    fd, gfd = os.open(f, os.O_RDWR), os.open(g, os.O_RDWR)
    try:
        os.pwrite(fd, new, 0)
        # g keeps its size and (set back) mtime, so nothing in its attributes tells
        # a caching kernel that its pages changed at the cut.
        st = os.fstat(gfd)
        os.pwrite(gfd, new[:len(old)], 0)
        os.utime(gfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        for _ in range(3):  # would fill the page cache, if there were one
            assert os.pread(fd, 8 * PAGE, 0) == new
            assert os.pread(gfd, 8 * PAGE, 0) == new[:len(old)]
            assert f.read_bytes() == new
        out = subprocess.run(["cat", str(f)], capture_output=True, check=True).stdout
        assert out == new
        assert f.stat().st_size == len(new)
        fs.cut(p=0)
        assert os.pread(gfd, 8 * PAGE, 0) == old
        assert os.fstat(fd).st_size == len(old)
        assert os.pread(fd, 8 * PAGE, 0) == old
        assert f.stat().st_size == len(old)
        assert f.read_bytes() == old
        out = subprocess.run(["cat", str(f)], capture_output=True, check=True).stdout
        assert out == old
        with open(f, "rb") as h:  # a private mapping reads the durable bytes too
            with mmap.mmap(h.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as m:
                assert m[:] == old
            if direct_io:  # no shared mappings of direct_io files
                with pytest.raises(OSError) as e:
                    mmap.mmap(h.fileno(), 0, prot=mmap.PROT_READ)
                assert e.value.errno == errno.ENODEV
            else:
                with mmap.mmap(h.fileno(), 0, prot=mmap.PROT_READ) as m:
                    assert m[:] == old
    finally:
        os.close(fd)
        os.close(gfd)


_WRITER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, b"A" * 8192, 0)
    os.fdatasync(fd)
    os.pwrite(fd, b"B" * 8192, 4096)
    print("ready", flush=True)
    while True:
        time.sleep(1)
""")


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_kill9_writer_then_cut(fs: PLFS, p: float) -> None:
    f = fs / "f"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(f)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        fs.freeze()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(OSError) as e:  # frozen: nothing may change before the cut
        write_file(f, b"late")
    assert e.value.errno == errno.EIO
    assert f.read_bytes() == b"A" * 4096 + b"B" * 8192  # reads still work
    fs.cut(p=p)
    want = b"A" * 4096 + b"B" * 8192 if p else b"A" * 8192
    assert f.read_bytes() == want
    fd = os.open(f, os.O_RDWR)  # the dead writer's flock is gone; writes work again
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"C", 0)
    finally:
        os.close(fd)
    assert fs.stats()["frozen_refusals"] >= 1


def test_freeze_refuses_every_change(fs: PLFS) -> None:
    write_file(fs / "f", b"data", sync=True)
    fd = os.open(fs / "f", os.O_RDWR)
    try:
        fs.freeze()
        assert fs.stats()["frozen"] is True
        attempts = {
            "write": lambda: os.pwrite(fd, b"x", 0),
            "ftruncate": lambda: os.ftruncate(fd, 0),
            "fsync": lambda: os.fsync(fd),
            "create": lambda: os.close(os.open(fs / "g", os.O_CREAT | os.O_WRONLY)),
            "rename": lambda: os.rename(fs / "f", fs / "g"),
            "unlink": lambda: os.unlink(fs / "f"),
            "mkdir": lambda: os.mkdir(fs / "d"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EIO, what
        assert os.pread(fd, 10, 0) == b"data"
        fs.unfreeze()
        os.pwrite(fd, b"D", 0)
        fs.freeze()
        fs.cut(p=0)  # unfreezes
        os.pwrite(fd, b"E", 0)
        assert os.pread(fd, 10, 0) == b"Eata"
    finally:
        os.close(fd)


def test_unlinked_open_file(fs: PLFS) -> None:
    f = fs / "f"
    write_file(f, b"old", sync=True)
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"new!", 0)
        os.unlink(f)
        assert os.pread(fd, 10, 0) == b"new!"  # still readable through the handle
        # fstat of a file without a name: ESTALE (hard_remove; see plfs's docstring)
        assert os.listdir(fs.backing) == [] == os.listdir(fs.mountpoint)
        os.fsync(fd)  # harmless on a file without a name
        os.pwrite(fd, b"more", 4)
        write_file(f, b"fresh")  # a new file under the old name
        assert f.read_bytes() == b"fresh"
        assert os.pread(fd, 10, 0) == b"new!more"
    finally:
        os.close(fd)
    fs.cut(p=1)
    assert f.read_bytes() == b"fresh"
    assert fs.stats()["known_inodes"] == 0
    # Renamed over while open: the old file lives on for its descriptor, unlisted,
    # and the rename itself is one durable step.
    write_file(fs / "g", b"replacement", sync=True)
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"F", 0)
        os.rename(fs / "g", f)
        assert sorted(os.listdir(fs.backing)) == ["f"] == sorted(os.listdir(fs.mountpoint))
        assert (fs.backing / "f").read_bytes() == b"replacement"
        assert os.pread(fd, 10, 0) == b"Fresh"
        assert fs.stats()["dirty_files"] == 1
    finally:
        os.close(fd)
    assert fs.stats()["dirty_files"] == 0  # its unsynced state went with its last close
    assert f.read_bytes() == b"replacement"


def test_control_file(fs: PLFS) -> None:
    assert CTL_NAME not in os.listdir(fs.mountpoint)
    write_file(fs / "f", b"x" * (2 * PAGE))
    with open(fs.ctl) as g:
        st = json.load(g)
    assert st["dirty_pages"] == 2 and st["seed"] == 1234 and st["cuts"] == 0
    for bad in ("explode", "cut p=2", "cut q=1", "cut p=abc"):
        with pytest.raises(OSError) as e:
            fs.command(bad)
        assert e.value.errno == errno.EINVAL, bad
    # A shell's `echo cut > .plfs-ctl` (O_TRUNC, then a write) works too.
    subprocess.run(f"echo 'cut p=0' > {fs.ctl}", shell=True, check=True)
    assert fs.stats()["cuts"] == 1
    assert (fs / "f").read_bytes() == b""


# -- what the kernel does on this mount (callers rely on these) ----------------------


def test_o_direct_works_and_is_not_durable(fs: PLFS) -> None:
    f = fs / "f"
    write_file(f, b"\0" * (4 * PAGE), sync=True)
    buf = mmap.mmap(-1, 2 * PAGE)  # page aligned, as O_DIRECT wants on disks
    buf.write(b"D" * 2 * PAGE)
    fd = os.open(f, os.O_RDWR)
    try:
        dfd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_DIRECT)  # liveclone's reopen
        try:
            assert os.pwrite(dfd, buf, PAGE) == 2 * PAGE
            assert os.pwrite(dfd, b"odd", 5) == 3  # FUSE asks for no alignment
            assert os.pread(dfd, 8, 4) == b"\0odd\0\0\0\0"
        finally:
            os.close(dfd)
        assert os.pread(fd, PAGE, PAGE) == b"D" * PAGE
    finally:
        os.close(fd)
        buf.close()
    fs.cut(p=0)
    assert f.read_bytes() == b"\0" * (4 * PAGE)


def test_kernel_behaviour_seek_copy_locks_mmap(fs: PLFS, tmp_path: Path) -> None:
    f, g = fs / "f", fs / "g"
    write_file(f, b"F" * PAGE, sync=True)
    os.truncate(f, 64 * PAGE)
    fsync_path(f)
    assert os.stat(fs.backing / "f").st_blocks <= 16  # sparse in the backing file
    fd = os.open(f, os.O_RDWR)
    gfd = os.open(g, os.O_RDWR | os.O_CREAT, 0o644)
    outside = os.open(tmp_path / "outside", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # No lseek op: the kernel's default says everything is data.
        assert os.lseek(fd, 10 * PAGE, os.SEEK_DATA) == 10 * PAGE
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 64 * PAGE
        # copy_file_range within the mount: the kernel falls back to splicing
        # through read and write, so the copy is unsynced data like any write.
        assert os.copy_file_range(fd, gfd, 2 * PAGE, 0, 0) == 2 * PAGE
        assert os.pread(gfd, 2 * PAGE, 0) == b"F" * PAGE + bytes(PAGE)
        # ... and across file systems it is refused (callers must fall back).
        with pytest.raises(OSError) as e:
            os.copy_file_range(fd, outside, PAGE, 0, 0)
        assert e.value.errno == errno.EXDEV
        # FICLONERANGE (reflink) is not supported.
        with pytest.raises(OSError) as e:
            fcntl.ioctl(gfd, 0x4020940D, struct.pack("=qQQQ", fd, 0, PAGE, 0))
        assert e.value.errno in (errno.EOPNOTSUPP, errno.EXDEV)
        # flock and POSIX locks: the kernel's local locks.
        fd2 = os.open(f, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.lockf(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd2)
        # posix_fallocate grows the file, as a pending size change.
        os.posix_fallocate(gfd, 0, 4 * PAGE)
        assert os.fstat(gfd).st_size == 4 * PAGE
        assert os.stat(fs.backing / "g").st_size == 0
    finally:
        for x in (fd, gfd, outside):
            os.close(x)
    fs.cut(p=0)
    assert g.read_bytes() == b""


# -- against a model ----------------------------------------------------------------


class Model:
    """What a file should read as: ``visible`` now, ``durable`` after a p=0 cut."""

    def __init__(self) -> None:
        self.durable = bytearray()
        self.visible = bytearray()

    def write(self, off: int, data: bytes) -> None:
        if off > len(self.visible):
            self.visible.extend(bytes(off - len(self.visible)))
        self.visible[off:off + len(data)] = data

    def truncate(self, n: int) -> None:
        if n < len(self.visible):
            del self.visible[n:]
        else:
            self.visible.extend(bytes(n - len(self.visible)))

    def zero(self, off: int, n: int, keep: bool) -> None:
        end = min(off + n, len(self.visible)) if keep else off + n
        if end > off:
            self.write(off, bytes(end - off))


def test_random_operations_against_a_model(fs: PLFS) -> None:
    rng = random.Random(99)
    names = ["a", "b", "c"]
    models = {n: Model() for n in names}
    fds = {n: os.open(fs / n, os.O_RDWR | os.O_CREAT, 0o644) for n in names}
    try:
        for _round in range(12):
            for _op in range(25):
                name = rng.choice(names)
                fd, m = fds[name], models[name]
                kind = rng.random()
                off = rng.randrange(0, 12 * PAGE)
                n = rng.choice([1, 100, PAGE, PAGE + 1, 3 * PAGE - 7, rng.randrange(1, 5 * PAGE)])
                if kind < 0.45:
                    data = rng.randbytes(n)
                    os.pwrite(fd, data, off)
                    m.write(off, data)
                elif kind < 0.6:
                    os.ftruncate(fd, off)
                    m.truncate(off)
                elif kind < 0.7:
                    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n)
                    m.zero(off, n, keep=True)
                elif kind < 0.78:
                    keep = rng.random() < 0.5
                    fallocate(fd, FALLOC_FL_ZERO_RANGE | (FALLOC_FL_KEEP_SIZE if keep else 0),
                              off, n)
                    m.zero(off, n, keep=keep)
                elif kind < 0.85:
                    os.posix_fallocate(fd, off, n)
                    if off + n > len(m.visible):
                        m.truncate(off + n)
                else:
                    (os.fsync if kind < 0.92 else os.fdatasync)(fd)
                    m.durable = bytearray(m.visible)
                assert os.pread(fd, 20 * PAGE, 0) == m.visible, (name, kind, off, n)
                assert os.fstat(fd).st_size == len(m.visible)
            p = rng.choice([0.0, 1.0])
            fs.cut(p=p)
            for name in names:
                m = models[name]
                if p:
                    m.durable = bytearray(m.visible)
                else:
                    m.visible = bytearray(m.durable)
                assert (fs.backing / name).read_bytes() == m.durable, (name, p)
                assert os.pread(fds[name], 20 * PAGE, 0) == m.durable, (name, p)
    finally:
        for fd in fds.values():
            os.close(fd)


def test_concurrent_writers(fs: PLFS) -> None:
    """Several threads (so several libfuse workers) write interleaved pages of one
    file and whole other files; nothing is lost or mixed up."""
    shared = fs / "shared"
    fd = os.open(shared, os.O_RDWR | os.O_CREAT, 0o644)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            own = os.open(fs / f"own{k}", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                for i in range(k, 64, 4):
                    os.pwrite(fd, bytes([65 + k]) * PAGE, i * PAGE)
                    os.pwrite(own, bytes([97 + k]) * 1000, i * 1000)
                    if i % 3 == 0:
                        os.fdatasync(own)
            finally:
                os.close(own)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.close(fd)
    assert not errors
    want = b"".join(bytes([65 + i % 4]) * PAGE for i in range(64))
    assert shared.read_bytes() == want
    fs.cut(p=1)
    assert shared.read_bytes() == want
    for k in range(4):
        own = bytearray(1000 * (60 + k + 1))
        for i in range(k, 64, 4):
            own[i * 1000:(i + 1) * 1000] = bytes([97 + k]) * 1000
        assert (fs / f"own{k}").read_bytes() == own
