"""What ``nettracer read`` shows for the values it reads: names where the kernel has them.

* kernel text addresses (``void *`` values such as ``kfree_skb``'s ``location``) as
  ``symbol+0xoff [module]``, named by :class:`nettracer.tracers.drops.groups.Names` as
  ``drops`` names its locations (kallsyms, read only for new addresses);
* enum-typed values by their enumerator names, from BTF (``enum skb_drop_reason``), and
  tracepoint arguments that the event's ``print fmt`` prints with ``__print_symbolic()``
  (``inet_sock_set_state``'s ``int newstate``: ``TCP_ESTABLISHED``) from that table,
  with or without BTF; a value with no name stays a number;
* ``char[]`` members are strings already (:meth:`nettracer.access.path.AccessPath.decode_value`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nettracer.access.path import AccessPath
    from nettracer.kernel.btf import Btf
    from nettracer.kernel.tracefs import TracepointFormat

Shown = int | str | None


def is_text_address(path: AccessPath) -> bool:
    """Whether ``path``'s value is an untyped kernel address worth naming (``void *``,
    a function pointer): a pointer to a struct is a heap address, never a symbol."""
    return path.decode == "ptr" and (path.ctype.replace(" ", "") == "void*" or "(*)" in path.ctype)


class ValueNames:
    """``show(i, value)``: the value of ``paths[i]`` as ``read`` prints it."""

    def __init__(
        self,
        paths: Sequence[AccessPath],
        btf: Btf | None = None,
        fmt: TracepointFormat | None = None,
        location: Callable[[int], str] | None = None,
    ) -> None:
        self._location = location
        self.tables: list[Mapping[int, str] | None] = [_table(p, btf, fmt) for p in paths]
        self.addresses = [is_text_address(p) for p in paths]

    def show(self, i: int, value: Shown) -> Shown:
        if value is None:
            return None
        table = self.tables[i]
        if table is not None and isinstance(value, int):
            return table.get(value, value)
        if self.addresses[i] and isinstance(value, str) and self._location is not None:
            return self._location(int(value, 16))
        return value

    def row(self, values: Sequence[Shown]) -> list[Shown]:
        return [self.show(i, v) for i, v in enumerate(values)]


def _table(
    path: AccessPath, btf: Btf | None, fmt: TracepointFormat | None
) -> dict[int, str] | None:
    """Value -> name for ``path``: its BTF enum, else the ``__print_symbolic()`` table of
    the tracepoint field its argument is recorded in (a bare argument only)."""
    if path.ctype.startswith("enum ") and btf is not None:
        from nettracer.kernel.btf import BtfLookupError

        try:
            return btf.enum(path.ctype.split()[1])
        except BtfLookupError:
            pass
    if fmt is not None and path.offset is None and not path.derefs:
        from nettracer.errors import NettracerError

        root = path.expr.strip()
        try:
            return fmt.symbolic(root)
        except NettracerError:
            return None
    return None


def tracepoint_format(tracepoint: str) -> TracepointFormat | None:
    """The tracefs format of the event named ``tracepoint`` (any category), or None when
    tracefs or the event is not there (its ``print fmt`` tables are optional extras)."""
    import os

    from nettracer.errors import NettracerError
    from nettracer.kernel.tracefs import tracefs_mounted

    try:
        with tracefs_mounted() as fs:
            for category in sorted(os.listdir(fs.path("events"))):
                if fs.has_event(category, tracepoint):
                    return fs.tracepoint_format(category, tracepoint)
    except (NettracerError, OSError):
        return None
    return None
