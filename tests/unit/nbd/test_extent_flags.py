"""``protocol.extent_flags``: a clone's extents as NBD ``base:allocation`` descriptors."""

from __future__ import annotations

from pathlib import Path

from liveclone.nbd import protocol as p
from liveclone.nbd.server import ServerThread
from liveclone.nbdwire import wire
from liveclone.nbdwire.client import Connection, parse_uri
from liveclone.sources.base import Extent
from tests.unit.nbd.drive import transmitting

HOLE = wire.STATE_HOLE | wire.STATE_ZERO
K = 4096


def test_data_is_zero_flags_and_a_hole_is_hole_and_zero() -> None:
    assert p.extent_flags([Extent(0, K, True)]) == [(K, 0)]
    assert p.extent_flags([Extent(0, K, False)]) == [(K, HOLE)]
    assert HOLE == 3  # NBD_STATE_HOLE (1) | NBD_STATE_ZERO (2), as the spec numbers them


def test_alternating_extents_keep_their_order_and_lengths() -> None:
    exts = [Extent(0, K, True), Extent(K, 2 * K, False), Extent(3 * K, 5, True),
            Extent(3 * K + 5, 7, False)]
    assert p.extent_flags(exts) == [(K, 0), (2 * K, HOLE), (5, 0), (7, HOLE)]


def test_neighbours_with_the_same_flags_merge() -> None:
    exts = [Extent(0, K, True), Extent(K, K, True), Extent(2 * K, 3, True),
            Extent(2 * K + 3, K, False), Extent(3 * K + 3, K, False),
            Extent(4 * K + 3, 1, True)]
    assert p.extent_flags(exts) == [(2 * K + 3, 0), (2 * K, HOLE), (1, 0)]


def test_empty_extents_are_dropped_and_do_not_split_a_run() -> None:
    exts = [Extent(0, K, False), Extent(K, 0, True), Extent(K, K, False)]
    assert p.extent_flags(exts) == [(2 * K, HOLE)]
    assert p.extent_flags([Extent(0, 0, True)]) == []
    assert p.extent_flags([]) == []


def test_accepts_any_iterable_once() -> None:
    gen = (Extent(i * K, K, i % 2 == 0) for i in range(4))
    assert p.extent_flags(gen) == [(K, 0), (K, HOLE), (K, 0), (K, HOLE)]


def test_total_length_is_kept() -> None:
    exts = [Extent(o, n, d) for o, n, d in
            [(0, 1, True), (1, 511, True), (512, 4096, False), (4608, 1 << 30, True)]]
    out = p.extent_flags(exts)
    assert sum(n for n, _ in out) == sum(e.length for e in exts)
    assert all(n > 0 for n, _ in out)


def test_descriptors_go_on_the_wire_unchanged() -> None:
    conn = transmitting()
    conn.receive_data(wire.encode_request(wire.Cmd.BLOCK_STATUS, 7, 0, 3 * K))
    descriptors = p.extent_flags([Extent(0, K, True), Extent(K, 2 * K, False)])
    (data,) = conn.send(p.Extents(7, descriptors))
    assert wire.decode_block_status(data[20:]) == (p.BASE_ALLOCATION_ID,
                                                   [(K, 0), (2 * K, HOLE)])


class ExtentStorage:
    """Just enough of a clone for BLOCK_STATUS: fixed extents, as ``Clone`` returns them."""

    size = 16 * K
    region_size = K

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self.calls.append((offset, length))
        return [Extent(offset, K, True), Extent(offset + K, K, True),
                Extent(offset + 2 * K, 0, False), Extent(offset + 2 * K, 3 * K, False),
                Extent(offset + 5 * K, length - 5 * K, True)]


def test_server_answers_block_status_from_extents(tmp_path: Path) -> None:
    storage = ExtentStorage()
    with ServerThread(storage, export_name="disk") as t:  # type: ignore[arg-type]
        uri = t.start(unix_path=str(tmp_path / "s"))[0]
        conn = Connection(parse_uri(uri))
        try:
            assert conn.meta_context is not None
            assert conn.block_status(K, 8 * K) == [(2 * K, 0), (3 * K, HOLE), (3 * K, 0)]
        finally:
            conn.close()
    assert storage.calls == [(K, 8 * K)]
