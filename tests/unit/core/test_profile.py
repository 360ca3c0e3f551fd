"""Boot profiles: recording a guest's reads, saving atomically, and the copier's replay
order (profile after waiting guest reads, before the sweep; capped)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from liveclone.core import fsops
from liveclone.core.clone import Clone
from liveclone.core.copier import BUSY_BATCH, Copier, Kind, ReplayState
from liveclone.core.opening import open_clone
from liveclone.core.profile import Profile, Recorder, RecordState, load, save
from liveclone.core.regions import Geometry
from liveclone.errors import UsageError
from liveclone.sources.local import LocalFileSource

RS = 64 << 10
SOURCE = {"kind": "file", "path": "/golden.img", "size": 8 << 20, "inode": 7,
          "fingerprint": "abc"}


def _clone(tmp_path: Path, src: Path) -> Clone:
    return open_clone(str(tmp_path / "c.img"), LocalFileSource(str(src)), region_size=RS,
                      create=True, exclusive=True)


def note(rec: Recorder, first: int, end: int) -> None:
    """A guest read of regions ``[first, end)``, as the clone reports it (bytes)."""
    rec.hook((first * RS, (end - first) * RS))


def _recorder(tmp_path: Path, **kw: float) -> Recorder:
    return Recorder(Geometry(8 << 20, RS), SOURCE, str(tmp_path / "p.lcprofile"), **kw)


# -- recording --------------------------------------------------------------------------


def test_recorder_keeps_first_read_order_once_per_region_and_saves_on_idle(
        tmp_path: Path) -> None:
    rec = _recorder(tmp_path, max_time=120, idle=10)
    assert rec.poll(now=0) and rec.state == RecordState.WAITING  # no read yet: no clock
    for span in [(50, 52), (51, 53), (10, 11), (52, 54), (11, 12), (30, 31)]:
        note(rec, *span)
    assert rec.poll(now=100)  # the window opens at the first read seen
    assert rec.state == RecordState.RECORDING
    assert rec._runs == [(50, 53), (10, 11), (53, 54), (11, 12), (30, 31)]
    note(rec, 10, 12)  # nothing new: does not keep the window open
    assert rec.poll(now=109)
    assert not (tmp_path / "p.lcprofile").exists()  # nothing saved while recording
    assert not rec.poll(now=110)  # 10 s without a new region
    assert rec.state == RecordState.DONE and rec.stopped_by == "idle"
    p = load(str(tmp_path / "p.lcprofile"))
    assert p.source == SOURCE and p.size == 8 << 20 and p.region_size == RS
    assert p.runs == [(50 * RS, 3 * RS), (10 * RS, RS), (53 * RS, RS), (11 * RS, RS),
                      (30 * RS, RS)]
    assert p.region_runs(Geometry(8 << 20, RS)) == [(50, 53), (10, 11), (53, 54), (11, 12),
                                                    (30, 31)]
    note(rec, 60, 61)  # after the window: not taken in
    rec.finish()
    assert load(str(tmp_path / "p.lcprofile")).runs == p.runs


def test_recorder_window_time_and_finish(tmp_path: Path) -> None:
    rec = _recorder(tmp_path, max_time=5, idle=100)
    note(rec, 1, 2)
    rec.poll(now=0)
    for t in range(1, 5):
        note(rec, t * 10, t * 10 + 1)
        assert rec.poll(now=t)
    assert not rec.poll(now=5)
    assert rec.stopped_by == "time"
    assert len(load(str(tmp_path / "p.lcprofile")).runs) == 5
    # A process that ends during the window saves what it has.
    rec2 = Recorder(Geometry(8 << 20, RS), SOURCE, str(tmp_path / "q.lcprofile"))
    rec2.hook((3 * RS + 5, 10))  # part of a region: the whole region
    rec2.finish()
    assert rec2.stopped_by == "exit" and rec2.state == RecordState.DONE
    assert load(str(tmp_path / "q.lcprofile")).runs == [(3 * RS, RS)]
    # Nothing read: nothing saved.
    rec3 = Recorder(Geometry(8 << 20, RS), SOURCE, str(tmp_path / "r.lcprofile"))
    rec3.finish()
    assert rec3.state == RecordState.SKIPPED and not (tmp_path / "r.lcprofile").exists()


def test_region_runs_translate_to_another_region_size() -> None:
    p = Profile(SOURCE, 8 << 20, [(5 * RS + 100, 10), (0, 2 * RS), (RS, 4096)])
    assert p.region_runs(Geometry(8 << 20, RS)) == [(5, 6), (0, 2)]
    assert p.region_runs(Geometry(8 << 20, 4096)) == [(80, 81), (0, 32)]


# -- the file ------------------------------------------------------------------------------


def test_save_is_atomic_a_failed_save_leaves_the_old_profile(tmp_path: Path,
                                                             monkeypatch) -> None:
    path = str(tmp_path / "p.lcprofile")
    old = Profile(SOURCE, 8 << 20, [(0, RS)])
    save(path, old)
    before = Path(path).read_bytes()

    def fsync_fails(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fsops, "fsync", fsync_fails)
    new = Profile(SOURCE, 8 << 20, [(i * RS, RS) for i in range(100)])
    with pytest.raises(OSError):
        save(path, new)
    assert Path(path).read_bytes() == before  # never half of the new one
    assert load(path).runs == [(0, RS)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.lcprofile"]
    # A recorder whose save fails says so and leaves the old file.
    rec = Recorder(Geometry(8 << 20, RS), SOURCE, path)
    note(rec, 3, 4)
    rec.finish()
    assert rec.state == RecordState.SKIPPED and "Input/output error" in (rec.error or "")
    assert Path(path).read_bytes() == before


@pytest.mark.parametrize("text, why", [
    (b"", "not a usable"),
    (b'{"format": "something-else"}', "not a liveclone profile"),
    (b'{"format": "liveclone-profile", "version": 99}', "version 99"),
    (b'{"format": "liveclone-profile", "version": 1, "size": 10, "source": {}, '
     b'"runs": [[8, 4]]}', "outside the image"),
    (json.dumps({"format": "liveclone-profile", "version": 1, "size": 10,
                 "source": {}, "runs": [[0, 4]]}).encode()[:-3], "not a usable"),
])
def test_a_bad_profile_file_is_a_usage_error(tmp_path: Path, text: bytes, why: str) -> None:
    path = tmp_path / "bad.lcprofile"
    path.write_bytes(text)
    with pytest.raises(UsageError) as e:
        load(str(path))
    assert why in e.value.message and str(path) in e.value.message
    with pytest.raises(UsageError, match="cannot read the profile"):
        load(str(tmp_path / "missing.lcprofile"))


def test_identity_ignores_the_path_and_names_both_sources() -> None:
    p = Profile(SOURCE, 8 << 20, [], path="/p.lcprofile")
    assert p.identity_problem({**SOURCE, "path": "/elsewhere/golden.img"}, 8 << 20) is None
    why = p.identity_problem({**SOURCE, "path": "/other.img", "inode": 8}, 8 << 20)
    assert why is not None
    assert "/golden.img" in why and "/other.img" in why and "inode 7" in why
    assert "inode 8" in why and "--profile" in why and "/p.lcprofile" in why
    assert p.identity_problem(SOURCE, 4 << 20) is not None


# -- replay order ------------------------------------------------------------------------------


def _profile_for(c: Clone, regions: list[tuple[int, int]]) -> Profile:
    return Profile(c.header.source, c.size, [(a * RS, (b - a) * RS) for a, b in regions])


def test_replay_copies_the_profile_in_order_after_guest_reads_before_the_sweep(
        tmp_path: Path, source_image) -> None:
    src, data = source_image
    with _clone(tmp_path, src) as c:
        order = [(100, 103), (10, 12), (60, 61), (30, 34)]
        cp = Copier(c, workers=1, profile=_profile_for(c, order))
        cp.prioritize(70, 71)  # a read a guest waits for goes first
        cp.start()
        assert cp.wait(60)
        cp.stop()
        kinds = cp.first_batches
        assert kinds[0] == (Kind.GUEST, 70)
        assert kinds[1:5] == [(Kind.PROFILE, a) for a, _ in order]
        assert all(k == Kind.SWEEP for k, _ in kinds[5:])
        assert cp.order == {Kind.GUEST: 1, Kind.PROFILE: 10, Kind.SWEEP: c.regions_total - 11}
        st = cp.profile_status()
        assert st is not None and st["state"] == ReplayState.DONE
        assert st["regions_replayed"] == st["regions_total"] == 10
        assert st["stopped_by"] == "end"
    assert (tmp_path / "c.img").read_bytes() == data


def test_replay_merges_close_runs_skips_present_ones_and_splits_big_ones(
        tmp_path: Path, source_image) -> None:
    src, _ = source_image
    with _clone(tmp_path, src) as c:
        c.write(40 * RS, b"g" * RS)  # the guest wrote region 40: never copied
        regions = [(20, 22), (23, 25), (40, 41), (5, 6), (80, 120)]
        cp = Copier(c, batch_bytes=16 * RS, profile=_profile_for(c, regions))
        batches = [cp._next_batch() for _ in range(5)]
        # 20-21 and 23-24 are one batch (the gap is read along), 40 is present, big
        # runs come in batch-sized pieces, then the sweep.
        assert batches == [(20, 25, Kind.PROFILE), (5, 6, Kind.PROFILE),
                           (80, 96, Kind.PROFILE), (96, 112, Kind.PROFILE),
                           (112, 120, Kind.PROFILE)]
        assert cp._next_batch() == (0, 16, Kind.SWEEP)
        # All handed out, none copied yet: still replaying until the last is copied.
        assert cp.replay_state == ReplayState.REPLAYING
        # Replay batches are small even while the guest is idle: a guest read of a
        # region in one waits for all of it.
        c.last_guest_io = 0.0  # the guest is idle (the write above made it busy)
        big = Copier(c, profile=_profile_for(c, [(0, 120)]))
        assert big._next_batch() == (0, BUSY_BATCH // RS, Kind.PROFILE)
        assert big.batch_regions > BUSY_BATCH // RS


def test_replay_is_capped_in_bytes_and_time(tmp_path: Path, source_image) -> None:
    src, _ = source_image
    with _clone(tmp_path, src) as c:
        regions = [(50, 60), (10, 20)]
        cp = Copier(c, profile=_profile_for(c, regions), replay_bytes=12 * RS)
        assert cp._next_batch() == (50, 60, Kind.PROFILE)
        assert cp._next_batch() == (10, 12, Kind.PROFILE)  # 12 regions: the cap
        assert cp._next_batch()[2] == Kind.SWEEP
        assert cp.replay_stopped_by == "bytes"
        cp2 = Copier(c, profile=_profile_for(c, regions), replay_time=0)
        assert cp2._next_batch()[2] == Kind.SWEEP
        assert cp2.replay_stopped_by == "time"


def test_replay_of_a_complete_clone_is_skipped(tmp_path: Path, source_image) -> None:
    src, _ = source_image
    with _clone(tmp_path, src) as c:
        c.fill(0, c.regions_total)
        cp = Copier(c, profile=_profile_for(c, [(1, 2)]))
        assert cp.replay_state == ReplayState.SKIPPED
        assert cp._next_batch() is None


def test_the_read_hook_gets_every_read(tmp_path: Path, source_image) -> None:
    """Recording takes each read's offset and length and nothing else on the read
    path; the status thread turns them into regions."""
    src, _ = source_image
    with _clone(tmp_path, src) as c:
        rec = Recorder(c.geometry, c.header.source, str(tmp_path / "p.lcprofile"))
        c.on_read = rec.hook
        c.read(3 * RS + 10, RS)
        c.fill(1, 2)
        c.read(RS, 1)  # a present region counts too
        assert list(rec._pending) == [(3 * RS + 10, RS), (RS, 1)]
        rec.poll()
        assert rec._runs == [(3, 5), (1, 2)]
