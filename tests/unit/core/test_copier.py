"""Copier order, copy-on-read, rate limit and pause, without timing assertions."""

from __future__ import annotations

import time
from pathlib import Path

from liveclone.core.clone import Clone
from liveclone.core.copier import Copier, Phase
from liveclone.core.fill import SourceReadError
from liveclone.core.opening import open_clone
from liveclone.sources.local import LocalFileSource

RS = 64 << 10


def _clone(tmp_path: Path, src: Path) -> Clone:
    return open_clone(str(tmp_path / "c.img"), LocalFileSource(str(src)), region_size=RS,
                      create=True, exclusive=True)


def test_linear_order_and_batching(tmp_path: Path, source_image) -> None:
    src, _ = source_image
    with _clone(tmp_path, src) as c:
        cp = Copier(c, batch_bytes=4 * RS)
        assert cp._next_batch() == (0, 4)
        assert cp._next_batch() == (4, 8)
        c.write(8 * RS, b"g" * RS)  # present: the sweep starts after it
        assert cp._next_batch() == (9, 13)


def test_guest_reads_are_copied_first_with_growing_readahead(tmp_path: Path,
                                                            source_image) -> None:
    src, _ = source_image
    with _clone(tmp_path, src) as c:
        cp = Copier(c, batch_bytes=2 * RS)
        assert cp._next_batch() == (0, 2)
        c.read(100 * RS, 10)  # a random guest read far ahead
        assert cp._next_batch() == (100, 101)
        c.read(101 * RS, RS)  # sequential: readahead kicks in
        first, end = cp._next_batch()
        assert first == 101 and end > 102
        assert cp._next_batch() == (2, 4)  # then the sweep goes on
        c.copy_on_read = True  # the reads fill their regions, and still steer the copier
        c.read(50 * RS, RS)
        c.read(51 * RS, RS)  # sequential: readahead past what was read
        assert c.is_present(50) and c.is_present(51)
        assert cp._next_batch()[0] == 52


def test_copy_on_read_reads_the_source_once(tmp_path: Path, source_image) -> None:
    src, data = source_image
    with _clone(tmp_path, src) as c:
        c.copy_on_read = True
        assert bytes(c.read(3 * RS + 5, 2 * RS)) == data[3 * RS + 5:5 * RS + 5]
        assert all(c.is_present(r) for r in (3, 4, 5))
        fetched = c.stats.bytes_from_source
        assert bytes(c.read(3 * RS, 3 * RS)) == data[3 * RS:6 * RS]
        assert c.stats.bytes_from_source == fetched  # served from the clone now
        # and it never overwrites guest data
        c.write(7 * RS, b"w" * 10)
        assert bytes(c.read(7 * RS, 10)) == b"w" * 10


def test_pause_resume_and_rate_limit(tmp_path: Path, source_image) -> None:
    src, data = source_image
    with _clone(tmp_path, src) as c:
        rate = 2 << 20
        cp = Copier(c, rate=rate)
        cp.pause()
        cp.start()
        assert cp.phase == Phase.PAUSED
        assert not cp.wait(0.3)
        assert c.regions_present == 0
        started = time.monotonic()
        cp.resume()
        assert cp.wait(60)
        elapsed = time.monotonic() - started
        cp.stop()
        assert cp.phase == Phase.COMPLETE
        # The limiter sleeps, so this lower bound cannot flake: only the last waits of
        # each worker (a batch is a quarter second of the rate) may be cut short.
        assert elapsed >= c.stats.bytes_copied / rate - (cp.workers + 1) * 0.25 > 0.5
    assert (tmp_path / "c.img").read_bytes() == data


def test_source_error_is_reported_not_retried_forever(tmp_path: Path, source_image,
                                                      monkeypatch) -> None:
    import errno

    import liveclone.core.copier as copier_mod

    src, _ = source_image
    monkeypatch.setattr(copier_mod, "BACKOFF_MAX", 0.01)
    with _clone(tmp_path, src) as c:
        real = c._fill.copy

        def failing(start: int, end: int, progress: list[int] | None = None,
                    bulk: bool = False) -> int:
            if start <= 5 * RS < end:
                raise SourceReadError(errno.EIO, "injected source failure")
            return real(start, end, progress, bulk)

        monkeypatch.setattr(c._fill, "copy", failing)
        cp = Copier(c, batch_bytes=RS).start()
        assert cp.wait(60)
        cp.stop()
        assert cp.phase == Phase.FAILED
        assert "injected source failure" in (c.last_error or "")
        assert "regions 5-5" in str(cp.error)
        # The failing region is set aside; everything else is copied.
        assert not c.is_present(5)
        assert c.regions_present == c.regions_total - 1


def test_persistent_copier_tries_failing_regions_again(tmp_path: Path, source_image,
                                                       monkeypatch) -> None:
    """A service's copier reports the failing region, then copies it once the source
    works again."""
    import errno

    import liveclone.core.copier as copier_mod

    src, data = source_image
    monkeypatch.setattr(copier_mod, "BACKOFF_MAX", 0.01)
    monkeypatch.setattr(copier_mod, "SET_ASIDE_RETRY", 0.2)
    broken = [True]
    with _clone(tmp_path, src) as c:
        real = c._fill.copy

        def flaky(start: int, end: int, progress: list[int] | None = None,
                  bulk: bool = False) -> int:
            if broken[0] and start <= 5 * RS < end:
                raise SourceReadError(errno.EIO, "source unreachable")
            return real(start, end, progress, bulk)

        monkeypatch.setattr(c._fill, "copy", flaky)
        cp = Copier(c, batch_bytes=RS, persistent=True).start()
        while cp.phase != Phase.FAILED:
            assert not cp.wait(0.01)
        assert "source unreachable" in (c.last_error or "")
        broken[0] = False  # the source comes back
        assert cp.wait(60)
        cp.stop()
        assert cp.phase == Phase.COMPLETE
    assert (tmp_path / "c.img").read_bytes() == data


def test_a_busy_guest_slows_the_copier_but_never_starves_it(tmp_path: Path,
                                                            source_image) -> None:
    src, data = source_image
    with _clone(tmp_path, src) as c:
        cp = Copier(c, batch_bytes=4 * RS)
        c.last_guest_io = float("inf")  # a guest that never goes quiet
        cp.start()
        assert cp.wait(60)
        cp.stop()
        assert cp.phase == Phase.COMPLETE
    assert (tmp_path / "c.img").read_bytes() == data


def test_guest_read_never_waits_on_the_copiers_source_extents(tmp_path: Path,
                                                             source_image) -> None:
    """Issue 9: the copier asks the source for extents (a network call for NBD and
    qcow2 sources, retried for up to 30 s). A guest read of absent data must not wait
    for that call: here it blocks until the read has finished."""
    import threading

    src, data = source_image
    entered, release = threading.Event(), threading.Event()

    class SlowExtents(LocalFileSource):
        def extents(self, offset: int, length: int):  # type: ignore[no-untyped-def]
            if threading.current_thread().name.startswith("copier"):
                entered.set()
                release.wait(60)
            return super().extents(offset, length)

    c = open_clone(str(tmp_path / "c.img"), SlowExtents(str(src)), region_size=RS,
                   create=True)
    cp = Copier(c, workers=1).start()
    try:
        assert entered.wait(10)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(bytes(c.read(5 * RS, RS))))
        reader.start()
        reader.join(20)
        # The copier is still blocked in extents(): the read finished without it.
        assert got == [data[5 * RS:6 * RS]] and not release.is_set()
    finally:
        release.set()
        cp.stop()
        c.close()
