"""``Value``: immutable-by-convention record classes without ``dataclasses``.

``@dataclass(frozen=True)`` costs about 1 ms per class at import and pulls in
``inspect`` and ``ast``; nettracer's start-up path (command start to attached)
defines a few dozen records, so they derive from :class:`Value` instead: equality,
hash and repr come from ``__slots__`` (in field order), and :meth:`replace` makes a
changed copy as ``dataclasses.replace`` did.
"""

from __future__ import annotations


def _fields(cls: type) -> tuple[str, ...]:
    """The ``__slots__`` of ``cls`` and its bases, base first (a subclass that adds none,
    ``__slots__ = ()``, keeps its base's fields); computed once per class."""
    names = cls.__dict__.get("_fields_of_class")
    if names is None:
        names = tuple(n for c in reversed(cls.__mro__) for n in c.__dict__.get("__slots__", ()))
        cls._fields_of_class = names  # type: ignore[attr-defined]
    return names


class Value:
    """Base of slot records: ``==``, ``hash`` and ``repr`` from ``__slots__`` (its own
    and its bases')."""

    __slots__ = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in _fields(type(self)))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in _fields(type(self)))
        return f"{type(self).__name__}({args})"

    def replace(self, **changes: object):
        """A copy with ``changes`` applied (the fields are the ``__slots__``)."""
        new = object.__new__(type(self))
        for name in _fields(type(self)):
            object.__setattr__(new, name, changes.pop(name, getattr(self, name)))
        if changes:
            raise TypeError(f"{type(self).__name__} has no field(s) {', '.join(changes)}")
        return new
