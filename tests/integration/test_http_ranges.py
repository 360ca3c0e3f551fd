"""A fill over real nginx asks for the absent runs of a batch in few requests
(multipart/byteranges), and falls back to one range a request where nginx is told
to answer a request for several ranges with the whole image (``max_ranges 1``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from liveclone.core.copier import Copier, Phase
from liveclone.core.fill import READ_ALONG
from liveclone.core.opening import open_clone
from liveclone.sources.http import MAX_RANGES, HttpSource
from tests.conftest import make_image
from tests.integration.servers import Nginx

SIZE = 16 << 20
RS = 4096
# Absent runs of one region, farther apart than READ_ALONG: each is its own range.
STEP = READ_ALONG + 64 * RS


def statuses(server: Nginx) -> list[str]:
    return [line.split()[0] for line in server.access_log.read_text().splitlines()]


def fill_scattered(tmp_path: Path, server: Nginx, data: bytes, step: int,
                   batches: list[int] | None = None) -> int:
    """Clone over ``server`` with the guest writing all but one region every
    ``step`` bytes, finish it, check its content; return the runs left.
    ``batches`` gets the first region of each batch the copier handed out."""
    model = bytearray(data)
    c = open_clone(str(tmp_path / "c.img"), HttpSource(server.url("disk.img")),
                   region_size=RS, create=True, exclusive=True)
    with c:
        absent = list(range(RS, SIZE, step))
        for a, b in zip([0, *(x + RS for x in absent)], [*absent, SIZE], strict=True):
            fill = bytes([a // step % 251 + 1]) * (b - a)
            c.write(a, fill)
            model[a:b] = fill
        assert c.regions_total - c.regions_present == len(absent)
        cp = Copier(c, workers=1).start()
        assert cp.wait(60)
        cp.stop()
        assert cp.phase == Phase.COMPLETE
        # Each region the guest wrote is reported skipped once, however the
        # batches were cut.
        assert c.stats.regions_skipped == c.regions_total - len(absent)
        if batches is not None:
            batches += [first for _, first in cp.first_batches]
    assert (tmp_path / "c.img").read_bytes() == bytes(model)
    return len(absent)


@pytest.mark.parametrize("max_ranges", [None, 1])
def test_fill_of_scattered_runs_over_nginx(tmp_path: Path, max_ranges: int | None) -> None:
    root = tmp_path / "www"
    root.mkdir()
    data = make_image(root / "disk.img", SIZE, seed=3, block=RS)
    server = Nginx(root, tmp_path / "nginx", access_log=True, max_ranges=max_ranges).start()
    try:
        runs = fill_scattered(tmp_path, server, data, STEP)
        asked = statuses(server)[1:]  # after the source's opening probe
        if max_ranges is None:
            # A batch's runs in one request (a busy guest makes batches smaller).
            assert set(asked) == {"206"} and len(asked) <= 4 < runs
        else:  # refused once (the whole image, never read), then a range a request
            assert asked[0] == "200" and asked[1:] == ["206"] * runs
    finally:
        server.stop()


def test_short_gaps_are_left_out_where_ranges_are_cheap(tmp_path: Path) -> None:
    """Gaps of 60 KiB, under READ_ALONG: read along from a local file, but left out
    of the reads of a server that takes many ranges a request."""
    root = tmp_path / "www"
    root.mkdir()
    data = make_image(root / "disk.img", SIZE, seed=4, block=RS)
    server = Nginx(root, tmp_path / "nginx", access_log=True).start()
    try:
        probe = server.bytes_sent()
        runs = fill_scattered(tmp_path, server, data, 64 << 10)
        sent = server.bytes_sent() - probe
        assert runs * RS <= sent < 2 * runs * RS  # the runs and their part headers
    finally:
        server.stop()


def test_a_batch_holds_one_requests_ranges(tmp_path: Path) -> None:
    """More scattered runs than one request takes (MAX_RANGES) make several
    batches, so the copier's workers can ask for them side by side: no batch
    holds more runs than one request's ranges."""
    root = tmp_path / "www"
    root.mkdir()
    data = make_image(root / "disk.img", SIZE, seed=5, block=RS)
    server = Nginx(root, tmp_path / "nginx", access_log=True).start()
    try:
        step = 64 << 10  # 256 runs of one region, 60 KiB apart (past the read-along)
        batches: list[int] = []
        runs = fill_scattered(tmp_path, server, data, step, batches)
        assert runs == 2 * MAX_RANGES
        starts = sorted(batches)
        assert starts[0] == 0 and len(starts) >= runs // MAX_RANGES
        for a, b in zip(starts, [*starts[1:], SIZE // RS], strict=True):
            held = sum(a * RS <= o < b * RS for o in range(RS, SIZE, step))
            assert held <= MAX_RANGES, f"a batch from region {a} holds {held} runs"
    finally:
        server.stop()
