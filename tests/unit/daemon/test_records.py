"""The daemon's state directory: records survive, a write cut short leaves the old
record (or none), a damaged record is skipped, one daemon per directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from liveclone.daemon.records import Record, StateDir
from liveclone.errors import CloneBusyError


def test_records_round_trip_and_damage(tmp_path: Path) -> None:
    state = StateDir(str(tmp_path / "state"))
    try:
        a = Record("vm1", "/img/golden.img", "/clones/vm1.img", region_size=65536, created=1.0)
        b = Record("vm2", "http://x/golden.img", "/clones/vm2.img", rate=1 << 20,
                   read_only=True, created=2.0, extra={"profile": "/p.lcprofile"})
        state.save(b)
        state.save(a)
        assert state.load() == [a, b]  # oldest first
        clones = tmp_path / "state" / "clones"
        (clones / "vm3.json.tmp").write_text('{"name": "vm3"')  # a write cut short
        (clones / "vm4.json").write_text("{not json")  # damaged: skipped, kept
        (clones / "vm5.json").write_text('{"name": "other", "source": "/s", "clone": "/c"}')
        assert state.load() == [a, b]
        assert not (clones / "vm3.json.tmp").exists() and (clones / "vm4.json").exists()
        state.delete("vm1")
        state.delete("vm1")  # twice: nothing
        assert state.load() == [b]
        with pytest.raises(CloneBusyError):
            StateDir(str(tmp_path / "state"))
    finally:
        state.close()
    StateDir(str(tmp_path / "state")).close()  # free again once closed
