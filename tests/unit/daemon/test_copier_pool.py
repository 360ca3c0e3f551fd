"""The daemon's copier pool: many clones copied by a few threads, none of which ever
waits for one clone, under one total rate shared between the clones."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from liveclone.core.copier import Phase
from liveclone.core.opening import open_clone
from liveclone.daemon.copiers import CopierPool
from liveclone.sources.local import LocalFileSource
from tests.conftest import make_image

RS = 64 << 10


def _clones(tmp_path: Path, n: int, size: int = 2 << 20):  # type: ignore[no-untyped-def]
    src = tmp_path / "src.img"
    data = make_image(src, size, block=RS)
    return data, [open_clone(str(tmp_path / f"c{i}.img"), LocalFileSource(str(src)),
                             region_size=RS, create=True) for i in range(n)]


def test_many_clones_few_threads(tmp_path: Path) -> None:
    data, clones = _clones(tmp_path, 8)
    before = set(threading.enumerate())  # an earlier test's copier may still be ending
    pool = CopierPool(2)
    try:
        copiers = [pool.copier(c, persistent=True, batch_bytes=4 * RS).start()
                   for c in clones]
        assert len([t for t in set(threading.enumerate()) - before
                    if t.name.startswith("copier")]) == 2  # the pool's, no more
        for cp in copiers:
            assert cp.wait(60)
            cp.stop()
            assert cp.phase == Phase.COMPLETE
        assert pool.copying == 0
    finally:
        pool.close()
        for c in clones:
            c.close()
    for i in range(8):
        assert (tmp_path / f"c{i}.img").read_bytes() == data


def test_total_rate_is_shared_between_clones(tmp_path: Path) -> None:
    rate = 2 << 20
    data, clones = _clones(tmp_path, 4, size=2 << 20)
    pool = CopierPool(4, rate=rate)
    try:
        started = time.monotonic()
        copiers = [pool.copier(c, persistent=True).start() for c in clones]
        deadline = time.monotonic() + 30
        while sum(c.stats.bytes_copied for c in clones) < 3 << 20:  # six batches
            assert time.monotonic() < deadline
            time.sleep(0.01)
        copied = [c.stats.bytes_copied for c in clones]
        # Shared: every clone has had its turns, none ran away with the rate.
        assert min(copied) > 0 and max(copied) <= 3 * min(copied) + (1 << 20), copied
        for cp in copiers:
            assert cp.wait(60)
        elapsed = time.monotonic() - started
        total = sum(c.stats.bytes_copied for c in clones)
        # No batch starts before the bytes booked are due: ahead by at most the
        # batches running at once (4 threads), a quarter second of the rate each.
        assert elapsed >= total / rate - 4 * 0.25 > 0.5, (elapsed, total)
        for cp in copiers:
            cp.stop()
    finally:
        pool.close()
        for c in clones:
            c.close()
    for i in range(4):
        assert (tmp_path / f"c{i}.img").read_bytes() == data


def test_paused_and_resumed_and_a_stop_waits_for_its_steps(tmp_path: Path) -> None:
    data, clones = _clones(tmp_path, 2)
    pool = CopierPool(1)
    try:
        paused = pool.copier(clones[0], persistent=True)
        paused.pause()
        paused.start()
        other = pool.copier(clones[1], persistent=True).start()
        assert other.wait(60)  # the one thread is never held by the paused clone
        assert clones[0].regions_present == 0 and paused.phase == Phase.PAUSED
        paused.resume()
        assert paused.wait(60)
        paused.stop()
        other.stop()
    finally:
        pool.close()
        for c in clones:
            c.close()
    assert (tmp_path / "c0.img").read_bytes() == data


def test_a_failing_region_is_set_aside_retried_and_holds_no_thread(
        tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A persistent pooled copier whose source fails on one region reports it
    (phase failed), lets the one pool thread serve another clone meanwhile, and
    copies the region once the source works again."""
    import errno

    import liveclone.core.copier as copier_mod
    from liveclone.core.fill import SourceReadError

    monkeypatch.setattr(copier_mod, "BACKOFF_MAX", 0.01)
    monkeypatch.setattr(copier_mod, "SET_ASIDE_RETRY", 0.5)
    data, clones = _clones(tmp_path, 2)
    broken = [True]
    real = clones[0]._fill.copy

    def flaky(runs, *args, **kwargs):  # type: ignore[no-untyped-def]
        if broken[0] and any(a <= 5 * RS < b for a, b in runs):
            raise SourceReadError(errno.EIO, "source unreachable")
        return real(runs, *args, **kwargs)

    monkeypatch.setattr(clones[0]._fill, "copy", flaky)
    pool = CopierPool(1)
    try:
        failing = pool.copier(clones[0], persistent=True, batch_bytes=RS).start()
        deadline = time.monotonic() + 30
        while failing.phase != Phase.FAILED:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert "source unreachable" in (clones[0].last_error or "")
        other = pool.copier(clones[1], persistent=True).start()
        assert other.wait(60)  # the set-aside retry waits without the thread
        broken[0] = False
        assert failing.wait(60)
        assert failing.phase == Phase.COMPLETE
        failing.stop()
        other.stop()
    finally:
        pool.close()
        for c in clones:
            c.close()
    assert (tmp_path / "c0.img").read_bytes() == data
