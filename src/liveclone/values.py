"""Value classes that cost nothing to define: bases in place of ``@dataclass``.

``@dataclass`` writes a class's ``__init__``, ``__repr__`` and ``__eq__`` as source
text and compiles it when the module is imported: 0.5-1 ms a class on these
2-vCPU machines, some 15 ms for the classes that ``liveclone serve`` imports
before it answers its first read. A class based on ``Value`` lists its fields in
``__slots__`` and writes its own ``__init__``; equality, repr and (``Frozen``)
immutability and hash are the ones a dataclass would have, from those slots.
"""

from __future__ import annotations

from typing import Any, ClassVar


class Value:
    """Equal to an object of the same class whose fields are equal, shown as
    ``Name(field=value, ...)``; unhashable (as a dataclass with ``eq`` and not
    ``frozen``). Fields: the ``__slots__`` of the Value classes of the MRO, bases
    first."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        slots = cls.__dict__.get("__slots__", ())
        cls._fields = cls._fields + ((slots,) if isinstance(slots, str) else tuple(slots))

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._values() == other._values()
        return NotImplemented

    __hash__: ClassVar[None] = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{self.__class__.__qualname__}({fields})"


class Frozen(Value):
    """A Value whose fields cannot be assigned once made (AttributeError, as a frozen
    dataclass's), hashed by its fields. ``__init__`` sets them with ``_init``."""

    __slots__ = ()

    def _init(self, *values: Any) -> None:
        """Set every field, in ``_fields`` order."""
        for name, value in zip(self._fields, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(self._values())
