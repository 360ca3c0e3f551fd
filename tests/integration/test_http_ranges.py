"""A fill over real nginx asks for the absent runs of a batch in few requests
(multipart/byteranges), and falls back to one range a request where nginx is told
to answer a request for several ranges with the whole image (``max_ranges 1``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from liveclone.core.copier import Copier, Phase
from liveclone.core.fill import READ_ALONG
from liveclone.core.opening import open_clone
from liveclone.sources.http import HttpSource
from tests.conftest import make_image
from tests.integration.servers import Nginx

SIZE = 16 << 20
RS = 4096
# Absent runs of one region, farther apart than READ_ALONG: each is its own range.
STEP = READ_ALONG + 64 * RS


def statuses(server: Nginx) -> list[str]:
    return [line.split()[0] for line in server.access_log.read_text().splitlines()]


@pytest.mark.parametrize("max_ranges", [None, 1])
def test_fill_of_scattered_runs_over_nginx(tmp_path: Path, max_ranges: int | None) -> None:
    root = tmp_path / "www"
    root.mkdir()
    data = make_image(root / "disk.img", SIZE, seed=3, block=RS)
    model = bytearray(data)
    server = Nginx(root, tmp_path / "nginx", access_log=True, max_ranges=max_ranges).start()
    try:
        c = open_clone(str(tmp_path / "c.img"), HttpSource(server.url("disk.img")),
                       region_size=RS, create=True, exclusive=True)
        with c:
            # The guest writes everything but one region every STEP bytes.
            absent = list(range(RS, SIZE, STEP))
            for a, b in zip([0, *(x + RS for x in absent)], [*absent, SIZE], strict=True):
                fill = bytes([a // STEP % 251 + 1]) * (b - a)
                c.write(a, fill)
                model[a:b] = fill
            assert c.regions_total - c.regions_present == len(absent)
            before = len(statuses(server))
            cp = Copier(c, workers=1).start()
            assert cp.wait(60)
            cp.stop()
            assert cp.phase == Phase.COMPLETE
        assert (tmp_path / "c.img").read_bytes() == bytes(model)
        asked = statuses(server)[before:]
        if max_ranges is None:
            # A batch's runs in one request (a busy guest makes batches smaller).
            assert set(asked) == {"206"} and len(asked) <= 4 < len(absent)
        else:  # refused once (the whole image, never read), then a range a request
            assert asked[0] == "200" and asked[1:] == ["206"] * len(absent)
    finally:
        server.stop()
