"""``Offsets``: where each catalogue field lives on this kernel.

An ``Offsets`` object is produced from BTF (:func:`nettracer.layout.btf_offsets`),
by the guesser, or loaded from a saved profile; tracers ask it and bake the
numbers into generated instructions.  It never invents an offset: a field that
could not be found is in ``unresolved`` with the reason, and asking for it raises.
"""

from __future__ import annotations

from nettracer.errors import NettracerError
from nettracer.layout.catalogue import BY_KEY
from nettracer.value import Value


class Field(Value):
    """A resolved field: byte offset from the start of its struct, and size in bytes."""

    __slots__ = ("offset", "size")

    def __init__(self, offset: int, size: int) -> None:
        self.offset = offset
        self.size = size


class UnresolvedField(NettracerError):
    """A tracer needs a field whose offset is not known on this kernel."""


class Offsets:
    """Catalogue key -> :class:`Field`; ``source`` is ``"btf"``, ``"guess"`` or ``"profile"``."""

    __slots__ = ("elapsed_ms", "fields", "source", "unresolved")

    def __init__(
        self,
        source: str,
        fields: dict[str, Field] | None = None,
        unresolved: dict[str, str] | None = None,
        elapsed_ms: float = 0.0,
    ) -> None:
        self.source = source
        self.fields: dict[str, Field] = {} if fields is None else fields
        self.unresolved: dict[str, str] = {} if unresolved is None else unresolved
        self.elapsed_ms = elapsed_ms

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Offsets):
            return NotImplemented
        return (self.source, self.fields, self.unresolved, self.elapsed_ms) == (
            other.source, other.fields, other.unresolved, other.elapsed_ms,
        )  # fmt: skip

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"Offsets(source={self.source!r}, fields={len(self.fields)}, "
            f"unresolved={self.unresolved!r}, elapsed_ms={self.elapsed_ms:.1f})"
        )

    def __getitem__(self, key: str) -> Field:
        try:
            return self.fields[key]
        except KeyError:
            why = self.unresolved.get(key)
            if why is None and key not in BY_KEY:
                why = "not a catalogue field"
            raise UnresolvedField(
                f"offset of {key} is not known ({why or 'not resolved'}); "
                f"try offsets.source btf or offsets.source guess",
                setting="offsets.source",
            ) from None

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def offset(self, key: str) -> int:
        return self[key].offset

    def to_json(self) -> dict[str, dict[str, int]]:
        return {k: {"offset": f.offset, "size": f.size} for k, f in sorted(self.fields.items())}
