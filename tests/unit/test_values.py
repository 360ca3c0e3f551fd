"""Value and Frozen behave as the dataclasses they replace: equality by class and
fields, dataclass's repr, no assignment to a frozen one, hash by fields."""

from __future__ import annotations

import pytest

from liveclone.nbd.protocol import Command, Disconnect, Done, Export, Failed
from liveclone.sources.base import Extent


def test_equality_is_by_class_and_every_field() -> None:
    assert Command(1, 0, 0, 0, 512) == Command(1, 0, 0, 0, 512, None)
    assert Command(1, 0, 0, 0, 512, bytearray(b"x")) != Command(1, 0, 0, 0, 512,
                                                                bytearray(b"y"))
    assert Done(3) != Failed(3, 0)  # other class, same first field
    assert Disconnect() == Disconnect()
    assert Extent(0, 4096, True) != Extent(0, 4096, False)
    assert Export("a", 1) == Export("a", 1) != Export("a", 1, read_only=True)


def test_repr_is_dataclass_repr() -> None:
    assert repr(Failed(7, 5, "no")) == "Failed(cookie=7, error=5, message='no')"
    assert repr(Disconnect()) == "Disconnect()"
    assert repr(Extent(1, 2, True)) == "Extent(offset=1, length=2, data=True)"


def test_frozen_cannot_change_and_hashes_by_fields() -> None:
    e = Extent(0, 4096, True)
    with pytest.raises(AttributeError):
        e.length = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del e.data  # type: ignore[misc]
    assert hash(e) == hash(Extent(0, 4096, True))
    assert len({e, Extent(0, 4096, True), Extent(0, 4096, False)}) == 2
    assert Export("a", 1).flags == Export("a", 1).flags  # set once, at __init__
    with pytest.raises(TypeError):
        hash(Done(1))  # not frozen: unhashable, as an eq dataclass
