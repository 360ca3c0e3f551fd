"""One fetch per source (``liveclone.sources.cache``): many clones of one HTTP image,
read through one SourceCache, fetch it from a real nginx once.

The byte counts come from nginx's own access log ($body_bytes_sent); content is
checked against the source image plus each clone's own writes.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from liveclone.core.metadata import MapStore
from liveclone.errors import CloneBusyError, SourceChangedError
from liveclone.session import CloneSession
from liveclone.sources.cache import IMAGE_NAME, SourceCache
from liveclone.sources.local import LocalFileSource
from tests.conftest import LIVECLONE, ROOT, make_image, tmpfs
from tests.integration import test_reflink
from tests.integration.servers import Nginx

SIZE = 4 << 20
xfs = test_reflink.xfs  # a loop-mounted XFS with reflink


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Nginx, bytes]]:
    root = tmp_path / "www"
    root.mkdir()
    data = make_image(root / "disk.img", SIZE)
    server = Nginx(root, tmp_path / "nginx", access_log=True).start()
    try:
        yield server, data
    finally:
        server.stop()


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def writes_for(i: int) -> list[tuple[int, bytes]]:
    """Clone i's own guest writes: partial writes into regions that are still absent
    (each first fills its region through the cache), one crossing a region border."""
    rng = random.Random(100 + i)
    return [(rng.randrange(0, SIZE - 8192), rng.randbytes(rng.randrange(1, 8192)))
            for _ in range(3)] + [((i + 1) * (64 << 10) - 10, b"border %d" % i * 3)]


def expected(data: bytes, writes: Sequence[tuple[int, bytes]]) -> bytes:
    out = bytearray(data)
    for off, buf in writes:
        out[off:off + len(buf)] = buf
    return bytes(out)


def clone_through(cache: SourceCache, url: str, path: Path,
                  writes: Sequence[tuple[int, bytes]] = ()) -> None:
    """A clone whose source comes from ``cache``: made, written, completed, closed.
    Not persistent: a source read that keeps failing ends the copy (and the test)."""
    session = CloneSession(url, str(path), opener=cache.open, persistent=False).start()
    try:
        for off, buf in writes:
            session.clone.write(off, buf)
        assert session.wait() and session.clone.complete, session.status()
    finally:
        session.close()


def test_eight_clones_fetch_the_image_once(tmp_path: Path,
                                           served: tuple[Nginx, bytes]) -> None:
    server, data = served
    url = server.url("disk.img")
    cache = SourceCache(str(tmp_path / "cache"))
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            barrier.wait()  # all eight created at once
            clone_through(cache, url, tmp_path / f"c{i}.img", writes_for(i))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    st = cache.status()
    cache.close()
    server.stop()  # nginx has written every request's line
    sent = server.bytes_sent()
    assert sent <= 1.1 * SIZE, f"nginx sent {sent} bytes for a {SIZE}-byte image"
    assert (st["misses"], st["hits"], len(st["entries"])) == (1, 7, 1)
    assert st["entries"][0]["complete"] and st["entries"][0]["holders"] == 0
    for i in range(8):
        got = (tmp_path / f"c{i}.img").read_bytes()
        assert sha(got) == sha(expected(data, writes_for(i))), f"clone {i}"
        # Each clone's map records the real remote source, not the cache.
        header, _ = MapStore.read(str(tmp_path / f"c{i}.img"))
        assert header.source["kind"] == "http" and header.source["path"] == url
        assert header.source["etag"]


def test_changed_source_gets_a_new_entry(tmp_path: Path,
                                         served: tuple[Nginx, bytes]) -> None:
    """Another identity (nginx's ETag and Last-Modified), another entry and new
    bytes; a clone made from the old image is refused, through the cache or not."""
    server, old = served
    url = server.url("disk.img")
    cache = SourceCache(str(tmp_path / "cache"))
    clone_through(cache, url, tmp_path / "a.img")
    # A clone of the old image left incomplete: no copier, one write.
    half = CloneSession(url, str(tmp_path / "half.img"), copy=False, opener=cache.open)
    half.clone.write(0, b"mine")
    half.close()

    image = tmp_path / "www" / "disk.img"
    new = make_image(tmp_path / "new.img", SIZE, seed=2)
    os.replace(tmp_path / "new.img", image)
    os.utime(image, (time.time() + 10, time.time() + 10))  # nginx's ETag has seconds
    before = server.bytes_sent()
    clone_through(cache, url, tmp_path / "b.img")
    assert sha((tmp_path / "b.img").read_bytes()) == sha(new)
    assert sha((tmp_path / "a.img").read_bytes()) == sha(old)
    st = cache.status()
    assert (st["misses"], len(st["entries"])) == (2, 2)
    with pytest.raises(SourceChangedError):
        CloneSession(url, str(tmp_path / "half.img"), opener=cache.open)
    cache.close()
    # Without the cache (no daemon), the same refusal: the map records the remote.
    r = subprocess.run([LIVECLONE, "clone", url, str(tmp_path / "half.img")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 4 and "changed" in r.stderr, r.stderr
    server.stop()
    assert server.bytes_sent() - before >= SIZE  # the new image's bytes were fetched


def test_a_clone_made_through_the_cache_resumes_without_it(
        tmp_path: Path, served: tuple[Nginx, bytes]) -> None:
    server, data = served
    url = server.url("disk.img")
    with SourceCache(str(tmp_path / "cache")) as cache:
        half = CloneSession(url, str(tmp_path / "half.img"), copy=False, opener=cache.open)
        half.clone.write(70000, b"mine")
        half.clone.read(1 << 20, 1 << 20)  # copy-on-read: fills part of the clone
        half.close()
    r = subprocess.run([LIVECLONE, "clone", url, str(tmp_path / "half.img")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sha((tmp_path / "half.img").read_bytes()) == sha(expected(data, [(70000, b"mine")]))


def test_lru_eviction_never_evicts_an_entry_in_use(tmp_path: Path) -> None:
    mib = 1 << 20
    root = tmp_path / "www"
    root.mkdir()
    images = {}
    for name in "abcd":  # incompressible, not sparse: each entry holds 1 MiB
        images[name] = random.Random(name).randbytes(mib)
        (root / f"{name}.img").write_bytes(images[name])
    server = Nginx(root, tmp_path / "nginx").start()
    try:
        # An entry holds 1 MiB and its map (about 0.3 MiB); a new one is expected to
        # need 1.5 MiB. Two fit, not three.
        cache = SourceCache(str(tmp_path / "cache"), max_bytes=3 * mib)

        def entries() -> dict[str, dict[str, object]]:
            return {str(e["source"]).rsplit("/", 1)[1][0]: e
                    for e in cache.status()["entries"]}

        # a: held by a clone that stays open; b: used and released, more recently.
        held_a = CloneSession(server.url("a.img"), str(tmp_path / "a.img"),
                              opener=cache.open).start()
        assert held_a.wait()
        clone_through(cache, server.url("b.img"), tmp_path / "b.img")
        assert set(entries()) == {"a", "b"}
        b_dir = tmp_path / "cache" / str(entries()["b"]["key"])
        # c does not fit beside both: the least recently used entry no clone holds
        # goes (b), never a, which is older but in use.
        clone_through(cache, server.url("c.img"), tmp_path / "c.img")
        assert set(entries()) == {"a", "c"}
        assert (tmp_path / "cache" / str(entries()["a"]["key"])).is_dir()
        assert not b_dir.exists()  # renamed away at once, then removed
        # With a and c held, d cannot fit at all: read directly, and said so.
        held_c = CloneSession(server.url("c.img"), str(tmp_path / "c2.img"),
                              opener=cache.open).start()
        assert held_c.wait()
        clone_through(cache, server.url("d.img"), tmp_path / "d.img")
        st = cache.status()
        assert st["uncached"] == 1 and "does not fit" in st["warning"]
        assert set(entries()) == {"a", "c"}
        assert st["bytes_used"] <= cache.max_bytes  # type: ignore[operator]
        held_a.close()
        held_c.close()
        # a is free now (and older than c): d takes its place.
        clone_through(cache, server.url("d.img"), tmp_path / "d2.img")
        assert set(entries()) == {"c", "d"}
        cache.close()  # waits for the evicted entries' removal
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
            [".lock", str(entries()["c"]["key"]), str(entries()["d"]["key"])])
        for path, name in (("a.img", "a"), ("b.img", "b"), ("c.img", "c"), ("c2.img", "c"),
                           ("d.img", "d"), ("d2.img", "d")):
            assert sha((tmp_path / path).read_bytes()) == sha(images[name]), path
    finally:
        server.stop()


def test_complete_cache_serves_without_the_remote_and_shares_blocks(
        xfs: Path, tmp_path: Path, served: tuple[Nginx, bytes]) -> None:
    server, data = served
    url = server.url("disk.img")
    cache = SourceCache(str(xfs / "cache"))
    try:
        clone_through(cache, url, xfs / "first.img")
        server.stop()
        # The same cache, and a new one on the same directory (a restarted daemon).
        clone_through(cache, url, xfs / "offline.img", [(5, b"x")])
    finally:
        cache.close()
    with SourceCache(str(xfs / "cache")) as again:
        clone_through(again, url, xfs / "offline2.img")
        assert again.status()["hits"] == 1
    assert sha((xfs / "offline.img").read_bytes()) == sha(expected(data, [(5, b"x")]))
    assert sha((xfs / "offline2.img").read_bytes()) == sha(data)
    # Filled from the complete entry's file by copy_file_range: blocks shared.
    assert test_reflink.shared_extents(xfs / "offline2.img") > 0
    # Still the remote's identity, as the clone made online recorded it.
    online, _ = MapStore.read(str(xfs / "first.img"))
    for name in ("offline.img", "offline2.img"):
        header, _ = MapStore.read(str(xfs / name))
        assert header.source == online.source and header.source["kind"] == "http"


KILLED_FILLER = textwrap.dedent("""
    import sys
    from liveclone.sources.cache import SourceCache
    cache = SourceCache(sys.argv[1])
    source = cache.open(sys.argv[2])
    for off in range(0, source.size, 256 << 10):  # reads fill the entry as they go
        source.pread(off, 256 << 10)
    print("read all", flush=True)
    sys.stdin.read()
""")


def test_kill9_while_filling_then_reopen(tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    size = 8 << 20
    data = make_image(root / "disk.img", size, seed=5)
    slow = Nginx(root, tmp_path / "slow", limit_rate="1m").start()
    url = slow.url("disk.img")
    cache_dir = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_FILLER, str(cache_dir), url],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
    try:
        committed = 0
        while committed == 0:  # until a commit has made part of the entry durable
            assert proc.poll() is None, "the filler exited before it was killed"
            images = list(cache_dir.glob(f"*/{IMAGE_NAME}.lcmap"))
            if images:
                committed = MapStore.read(str(images[0])[:-len(".lcmap")])[1].present_count
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        slow.stop()
    assert committed * (64 << 10) < size, "the entry was complete before the kill"
    # The same URL, now served at full speed.
    server = Nginx(root, tmp_path / "fast", port=slow.port, access_log=True).start()
    try:
        with SourceCache(str(cache_dir)) as cache:
            source = cache.open(url)
            entry = cache.status()["entries"][0]
            assert entry["regions_present"] >= committed  # resumed, not started again
            source.close()
            clone_through(cache, url, tmp_path / "c.img")
            entry = cache.status()["entries"][0]
            assert entry["complete"]
            assert entry["bytes_fetched"] <= size - committed * (64 << 10)
            image = cache_dir / str(entry["key"]) / IMAGE_NAME
        assert sha(image.read_bytes()) == sha(data)  # no wrong byte in the entry
        assert sha((tmp_path / "c.img").read_bytes()) == sha(data)
    finally:
        server.stop()
    assert server.bytes_sent() <= size - committed * (64 << 10) + (256 << 10)


def test_local_files_are_not_cached_and_one_process_owns_the_dir(tmp_path: Path) -> None:
    make_image(tmp_path / "local.img", 1 << 20)
    with SourceCache(str(tmp_path / "cache")) as cache:
        with pytest.raises(CloneBusyError, match=f"pid {os.getpid()}"):
            SourceCache(str(tmp_path / "cache"))
        source = cache.open(str(tmp_path / "local.img"))
        assert isinstance(source, LocalFileSource) and source.fileno() is not None
        source.close()
        assert cache.status()["entries"] == []


def test_full_cache_disk_reads_bypass_the_entry(tmp_path: Path) -> None:
    """The cache directory's disk fills up: clones still get every byte (read from
    the source directly), and the entry says why."""
    root = tmp_path / "www"
    root.mkdir()
    data = random.Random(3).randbytes(SIZE)  # no holes: needs all 4 MiB, 2 are free
    (root / "disk.img").write_bytes(data)
    server = Nginx(root, tmp_path / "nginx").start()
    try:
        with tmpfs(tmp_path / "small", "2m") as small:
            with SourceCache(str(small / "cache")) as cache:
                clone_through(cache, server.url("disk.img"), tmp_path / "c.img", [(9, b"w")])
                entry = cache.status()["entries"][0]
                assert not entry["complete"] and "bypass" in entry["last_error"]
    finally:
        server.stop()
    assert sha((tmp_path / "c.img").read_bytes()) == sha(expected(data, [(9, b"w")]))


def test_entry_that_cannot_be_made_is_bypassed(tmp_path: Path,
                                               served: tuple[Nginx, bytes]) -> None:
    """No room for an entry's map at all: the clone reads its source directly."""
    server, data = served
    with tmpfs(tmp_path / "tiny", "8k") as tiny:
        with SourceCache(str(tiny / "cache")) as cache:
            clone_through(cache, server.url("disk.img"), tmp_path / "c.img")
            st = cache.status()
            assert (st["uncached"], st["entries"]) == (1, [])
            assert "cannot be opened" in st["warning"]
    assert sha((tmp_path / "c.img").read_bytes()) == sha(data)


def test_damaged_entry_is_made_again(tmp_path: Path, served: tuple[Nginx, bytes]) -> None:
    server, data = served
    url = server.url("disk.img")
    with SourceCache(str(tmp_path / "cache")) as cache:
        clone_through(cache, url, tmp_path / "a.img")
        key = cache.status()["entries"][0]["key"]
    superblock = tmp_path / "cache" / str(key) / f"{IMAGE_NAME}.lcmap"
    superblock.write_bytes(b"not a superblock" * 64)
    with SourceCache(str(tmp_path / "cache")) as cache:
        clone_through(cache, url, tmp_path / "b.img")
        assert cache.status()["entries"][0]["complete"]
    assert sha((tmp_path / "b.img").read_bytes()) == sha(data)


def test_image_format_through_qemu_nbd_is_cached(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    data = make_image(raw, 2 << 20)
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True)
    with SourceCache(str(tmp_path / "cache")) as cache:
        for name in ("a.img", "b.img"):
            clone_through(cache, str(qcow2), tmp_path / name)
        st = cache.status()
        assert (st["misses"], st["hits"], st["entries"][0]["complete"]) == (1, 1, True)
    for name in ("a.img", "b.img"):
        assert sha((tmp_path / name).read_bytes()) == sha(data)
        assert MapStore.read(str(tmp_path / name))[0].source["kind"] == "image"
