"""Copier order, copy-on-read, rate limit and pause, without timing assertions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from liveclone.core.clone import Clone
from liveclone.core.copier import Copier, Phase
from liveclone.core.fill import SourceReadError
from liveclone.core.opening import open_clone
from liveclone.sources.local import LocalFileSource
from tests.conftest import make_image

RS = 64 << 10


def _clone(tmp_path: Path, src: Path) -> Clone:
    return open_clone(str(tmp_path / "c.img"), LocalFileSource(str(src)), region_size=RS,
                      create=True, exclusive=True)


def test_linear_order_and_batching(tmp_path: Path, source_image) -> None:
    src, _ = source_image
    with _clone(tmp_path, src) as c:
        cp = Copier(c, batch_bytes=4 * RS)
        assert cp._next_batch()[:2] == (0, 4)
        assert cp._next_batch()[:2] == (4, 8)
        c.write(8 * RS, b"g" * RS)  # present: the batch passes it, and copies 4 after it
        assert cp._next_batch()[:2] == (8, 13)


def test_guest_reads_are_copied_first_with_growing_readahead(tmp_path: Path,
                                                            source_image) -> None:
    src, _ = source_image
    with _clone(tmp_path, src) as c:
        cp = Copier(c, batch_bytes=2 * RS)
        assert cp._next_batch()[:2] == (0, 2)
        c.read(100 * RS, 10)  # a random guest read far ahead
        assert cp._next_batch()[:2] == (100, 101)
        c.read(101 * RS, RS)  # sequential: readahead kicks in
        first, end, _ = cp._next_batch()
        assert first == 101 and end > 102
        assert cp._next_batch()[:2] == (103, 104)  # the rest of the readahead
        assert cp._next_batch()[:2] == (2, 4)  # then the sweep goes on
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

        def failing(runs: list[tuple[int, int]], *args: Any, **kwargs: Any) -> tuple[int, int]:
            if any(a <= 5 * RS < b for a, b in runs):
                raise SourceReadError(errno.EIO, "injected source failure")
            return real(runs, *args, **kwargs)

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

        def flaky(runs: list[tuple[int, int]], *args: Any, **kwargs: Any) -> tuple[int, int]:
            if broken[0] and any(a <= 5 * RS < b for a, b in runs):
                raise SourceReadError(errno.EIO, "source unreachable")
            return real(runs, *args, **kwargs)

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


def _fragment(c: Clone, rng, model: bytearray, writes: int) -> set[int]:  # type: ignore[no-untyped-def]
    """Scattered guest writes of one to three regions (some partial): return the
    regions they made present."""
    rs, written = c.region_size, set()
    for _ in range(writes):
        r, k = rng.randrange(c.regions_total), rng.choice((1, 1, 1, 2, 3))
        off = r * rs + rng.choice((0, 0, 100))
        data = rng.randbytes(max(1, min(k * rs, c.size - off) - rng.choice((0, 0, 7))))
        c.write(off, data)
        model[off:off + len(data)] = data
        written |= set(c.geometry.span(off, len(data)))
    return written


@pytest.mark.parametrize("seed,writes,batch_regions,gap_bytes", [
    (1, 40, 8, 0), (2, 150, 16, 16 << 10), (3, 400, 64, 256 << 10), (4, 700, 1024, 64 << 10),
])
def test_copier_never_writes_a_present_region_however_fragmented(
        tmp_path: Path, monkeypatch, seed: int, writes: int, batch_regions: int,
        gap_bytes: int) -> None:
    """Invariant 4: every byte range the copier writes, punches or shares lies in a
    region that was absent, however the guest fragmented the map (and while it keeps
    writing). Checked by recording the fill engine's writes, and by content."""
    import random
    import threading

    import liveclone.core.copier as copier_mod
    import liveclone.core.fill as fill_mod
    from liveclone.core import fsops

    monkeypatch.setattr(fill_mod, "READ_ALONG", gap_bytes)
    monkeypatch.setattr(copier_mod, "READ_ALONG", gap_bytes)
    rng = random.Random(seed)
    src = tmp_path / "src.img"
    data = make_image(src, 2 << 20, seed=seed, block=4096)
    model = bytearray(data)
    c = open_clone(str(tmp_path / "c.img"), LocalFileSource(str(src)), region_size=4096,
                   create=True, exclusive=True)
    try:
        before = set(_fragment(c, rng, model, writes))
        touched: list[tuple[int, int, set[int]]] = []  # (start, end, present then)

        # Where each call writes: [(fd, offset, length)] from its arguments. Only the
        # clone file's writes count, buffered or direct (the copier also writes the
        # digest file).
        # put_runs touches only its runs (tests/unit/core/test_putruns.py).
        where = {"pwrite_all": lambda fd, data, offset, *_: [(fd, offset, len(data))],
                 "punch_hole": lambda fd, offset, length: [(fd, offset, length)],
                 "copy_file_range": lambda s, d, offset, length, *_: [(d, offset, length)],
                 "clone_range": lambda s, d, offset, length: [(d, offset, length)],
                 "put_runs": lambda fd, runs, *_: [(fd, a, b - a) for a, b in runs]}

        clone_fds = {c._fd, c._fill._dfd}

        def spy(name: str):  # type: ignore[no-untyped-def]
            real = getattr(fsops, name)

            def wrapped(*args):  # type: ignore[no-untyped-def]
                for fd, offset, length in where[name](*args):
                    if threading.current_thread().name.startswith("copier") and fd in clone_fds:
                        with c._own.cond:
                            present = {r for r in c.geometry.span(offset, length)
                                       if c._own.map.is_present(r)}
                        touched.append((offset, offset + length, present))
                return real(*args)
            return wrapped

        for name in where:
            monkeypatch.setattr(fsops, name, spy(name))
        cp = Copier(c, batch_bytes=batch_regions * 4096).start()
        during = _fragment(c, rng, model, writes // 4)  # the guest keeps writing
        assert cp.wait(60)
        cp.stop()
        assert cp.phase == Phase.COMPLETE
        assert touched  # the spy saw the copier's writes
        for start, end, present in touched:
            assert not present, f"copier wrote [{start}, {end}) over present {present}"
            assert not set(c.geometry.span(start, end - start)) & before
        assert during  # the concurrent writes happened, and survived (content below)
    finally:
        c.close()
    assert (tmp_path / "c.img").read_bytes() == bytes(model)


def test_regions_skipped_counts_each_present_region_once(tmp_path: Path) -> None:
    """The seed's "done without being performed": each region the guest wrote before
    the copy is reported once, however many batches, workers and passes meet it."""
    import random

    rng = random.Random(7)
    src = tmp_path / "src.img"
    data = make_image(src, 1 << 20, seed=7, block=4096)
    model = bytearray(data)
    c = open_clone(str(tmp_path / "c.img"), LocalFileSource(str(src)), region_size=4096,
                   create=True, exclusive=True)
    with c:
        written = _fragment(c, rng, model, 90) | {0, c.regions_total - 1}
        for r in (0, c.regions_total - 1):  # the first and the last region too
            c.write(r * 4096, b"e" * min(4096, c.size - r * 4096))
            model[r * 4096:(r + 1) * 4096] = b"e" * min(4096, c.size - r * 4096)
        cp = Copier(c, workers=3, batch_bytes=5 * 4096).start()
        assert cp.wait(60)
        cp.stop()
        assert c.stats.regions_skipped == len(written)
        # Asking again (a CACHE over the whole clone, a second copier) counts nothing.
        assert c.fill(0, c.regions_total) == (0, 0)
        again = Copier(c).start()
        assert again.wait(60)
        again.stop()  # its other workers may still be giving way to the guest
        assert c.stats.regions_skipped == len(written)
    assert (tmp_path / "c.img").read_bytes() == bytes(model)
    with open_clone(str(tmp_path / "fresh.img"), LocalFileSource(str(src)),
                    region_size=4096, create=True, exclusive=True) as fresh:
        cp = Copier(fresh, batch_bytes=5 * 4096).start()
        assert cp.wait(60)
        cp.stop()
        assert fresh.stats.regions_skipped == 0


def test_paused_only_once_no_batch_is_in_flight(tmp_path: Path, source_image,
                                                monkeypatch) -> None:
    """"paused" means nothing is being copied: a batch taken before the pause is
    still copying, so the phase says so until it is filled; then nothing moves."""
    import threading

    src, data = source_image
    with _clone(tmp_path, src) as c:
        real = c._fill.copy
        entered, release = threading.Event(), threading.Event()

        def slow(runs: list[tuple[int, int]], *args: Any, **kwargs: Any) -> tuple[int, int]:
            entered.set()
            assert release.wait(30)
            return real(runs, *args, **kwargs)

        monkeypatch.setattr(c._fill, "copy", slow)
        cp = Copier(c, workers=1, batch_bytes=4 * RS).start()
        try:
            assert entered.wait(30)  # a batch is in flight
            cp.pause()
            assert cp.paused and cp.phase == Phase.COPYING
            release.set()
            while cp.phase != Phase.PAUSED:
                time.sleep(0.01)
            assert c.regions_present == 4  # the one batch, and none after the pause
            cp.resume()
            assert cp.wait(60)
        finally:
            release.set()
            cp.stop()
    assert (tmp_path / "c.img").read_bytes() == data


def test_a_pause_between_turn_and_batch_hands_out_nothing(tmp_path: Path,
                                                          source_image) -> None:
    """A worker past its wait for running when the pause comes takes no batch."""
    src, data = source_image
    with _clone(tmp_path, src) as c:
        cp = Copier(c, workers=1, batch_bytes=4 * RS)
        real = cp._yield_to_guest

        def pause_now(index: int) -> bool:
            cp.pause()  # the pause lands after the worker's running.wait()
            return real(index)

        cp._yield_to_guest = pause_now  # type: ignore[method-assign]
        cp.start()
        try:
            while cp.phase == Phase.COPYING:
                time.sleep(0.01)
            time.sleep(0.2)
            assert cp.phase == Phase.PAUSED and c.regions_present == 0
            cp._yield_to_guest = real  # type: ignore[method-assign]
            cp.resume()
            assert cp.wait(60)
        finally:
            cp.stop()
    assert (tmp_path / "c.img").read_bytes() == data


def test_after_its_first_pass_the_sweep_never_hands_out_a_batch_in_flight(
        tmp_path: Path, source_image) -> None:
    """Once the sweep has passed the end, its next batch starts at the first absent
    region outside every batch still being filled; when there is none, a turn gets
    nothing (and rests) rather than a batch whose regions another worker owns."""
    src, data = source_image
    with _clone(tmp_path, src) as c:
        count = c.regions_total  # 128 regions of 64 KiB
        cp = Copier(c, batch_bytes=32 * RS)
        first_pass = [cp._next_batch() for _ in range(4)]
        assert [b[:2] for b in first_pass] == [(0, 32), (32, 64), (64, 96), (96, count)]
        assert cp._next_batch() is None  # everything absent is in flight
        cp._copy(*first_pass[1])  # one worker finishes its batch
        assert cp._next_batch() is None
        cp._copy(*first_pass[0])
        cp._copy(*first_pass[3])
        c.write(70 * RS, b"g" * RS)
        assert cp._next_batch() is None
        cp._copy(*first_pass[2])
        assert c.complete and cp._next_batch() is None
    want = bytearray(data)
    want[70 * RS:71 * RS] = b"g" * RS
    assert (tmp_path / "c.img").read_bytes() == want
