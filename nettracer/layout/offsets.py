"""``Offsets``: where each catalogue field lives on this kernel.

An ``Offsets`` object is produced from BTF (:func:`nettracer.layout.btf_offsets`),
by the guesser, or loaded from a saved profile; tracers ask it and bake the
numbers into generated instructions.  It never invents an offset: a field that
could not be found is in ``unresolved`` with the reason, and asking for it raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nettracer.errors import NettracerError
from nettracer.layout.catalogue import BY_KEY


@dataclass(frozen=True)
class Field:
    """A resolved field: byte offset from the start of its struct, and size in bytes."""

    offset: int
    size: int


class UnresolvedField(NettracerError):
    """A tracer needs a field whose offset is not known on this kernel."""


@dataclass
class Offsets:
    """Catalogue key -> :class:`Field`; ``source`` is ``"btf"``, ``"guess"`` or ``"profile"``."""

    source: str
    fields: dict[str, Field] = field(default_factory=dict)
    unresolved: dict[str, str] = field(default_factory=dict)
    elapsed_ms: float = 0.0

    def __getitem__(self, key: str) -> Field:
        try:
            return self.fields[key]
        except KeyError:
            why = self.unresolved.get(key)
            if why is None and key not in BY_KEY:
                why = "not a catalogue field"
            raise UnresolvedField(
                f"offset of {key} is not known ({why or 'not resolved'}); "
                f"try --offsets btf or --offsets guess"
            ) from None

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def offset(self, key: str) -> int:
        return self[key].offset

    def to_json(self) -> dict[str, dict[str, int]]:
        return {k: {"offset": f.offset, "size": f.size} for k, f in sorted(self.fields.items())}
