"""Kernel symbols from ``/proc/kallsyms``: address -> ``symbol+0xoff``, and name -> address.

:class:`Kallsyms` resolves an address the way the kernel's own ``%pS`` printk
format does (``lib/vsprintf.c`` ``symbol_string()`` -> ``sprint_symbol()`` ->
``kallsyms_lookup_buildid()``), so that what nettracer prints for a drop location
is the text ``/sys/kernel/tracing/trace`` shows for ``skb:kfree_skb``'s
``location=%pS``:

* the symbol is the one with the greatest address ``<= addr``; among aliases at
  the same address the first one in kallsyms order wins (``get_symbol_pos()``
  walks back to the first alias; ``scripts/kallsyms`` sorts strong before weak and
  fewer leading underscores first, and ``/proc/kallsyms`` lists core symbols in
  that table order);
* its size runs to the next symbol with a greater address; past the last one the
  kernel uses ``_etext`` (``_einittext`` in init text, ``_end`` with
  ``CONFIG_KALLSYMS_ALL``);
* a core-kernel address resolves only inside ``[_stext, _etext)`` or
  ``[_sinittext, _einittext)`` (``is_ksym_addr()``; the whole image up to ``_end``
  with ``CONFIG_KALLSYMS_ALL``); elsewhere ``%pS`` prints ``0x<hex>``;
* ``%pS`` appends `` [module]`` for symbols of loadable modules only: JIT-ed BPF
  programs (``[bpf]``, ``bpf_address_lookup()`` clears the module name) and the
  ``[__builtin__*]`` pseudo-modules print without one;
* ``%#lx`` in the kernel's ``vsprintf`` prints ``0x0`` for zero (glibc would print ``0``).

Sizes of module and BPF symbols are approximations: ``/proc/kallsyms`` does not
give a module's text end, so the size runs to the next listed symbol (whichever
module it belongs to).

Loading is lazy (the file is read on first use) and keeps every symbol, since
sizes depend on the next symbol of any type. 120k lines load in about 0.1 s.
"""

from __future__ import annotations

import os
import re
from array import array
from bisect import bisect_right

from nettracer.errors import NettracerError
from nettracer.value import Value

KALLSYMS_PATH = "/proc/kallsyms"
KPTR_RESTRICT_PATH = "/proc/sys/kernel/kptr_restrict"

CORE = "kernel"
"""``Symbol.module`` of core-kernel symbols (no ``[module]`` column in kallsyms)."""

# "ffffffff81000000 T _stext" or "ffffffffc0201000 t ftrace_trampoline\t[__builtin__ftrace]"
_LINE = re.compile(r"^([0-9a-fA-F]+) (\S) (\S+)(?:\t\[([^\]\n]*)\])?", re.M)
_BOUNDS = frozenset({"_stext", "_etext", "_sinittext", "_einittext", "_end"})


class Symbol(Value):
    """A resolved address: ``address`` is the symbol's start, ``offset`` the distance into it.

    ``size`` is the kernel's idea of the symbol size (distance to the next
    symbol), ``None`` when unknown.  ``module`` is the ``[mod]`` column of
    ``/proc/kallsyms`` (``"bpf"`` for JIT-ed programs), or ``"kernel"`` for the core.
    ``type`` is the ``nm`` letter (``T``, ``t``, ``W``, ...).
    """

    __slots__ = ("name", "address", "offset", "size", "module", "type")  # noqa: RUF023 - field order

    def __init__(
        self, name: str, address: int, offset: int, size: int | None, module: str, type: str
    ) -> None:
        self.name = name
        self.address = address
        self.offset = offset
        self.size = size
        self.module = module
        self.type = type

    @property
    def is_module(self) -> bool:
        """True for symbols of a loadable module (what ``%pS`` shows as `` [mod]``)."""
        return self.module not in (CORE, "bpf") and not self.module.startswith("__builtin__")

    def format(self) -> str:
        """Our short form: ``sym+0x1a`` (``+0x0`` at the start of a symbol)."""
        return f"{self.name}+{self.offset:#x}"

    def format_ps(self) -> str:
        """What the kernel's ``%pS`` prints: ``sym+0x1a/0x2b`` or ``sym+0x1a/0x2b [mod]``."""
        text = f"{self.name}+{self.offset:#x}"
        if self.size is not None:
            text += f"/{self.size:#x}"
        if self.is_module:
            text += f" [{self.module}]"
        return text


def _find(names: list[str], name: str, start: int = 0) -> int:
    try:
        return names.index(name, start)
    except ValueError:
        return -1


def _kptr_restrict() -> str:
    try:
        with open(KPTR_RESTRICT_PATH) as f:
            return f.read().strip()
    except OSError:
        return "?"


class Kallsyms:
    """The symbol table of the running kernel (or of a saved kallsyms file, for tests).

    Addresses are ``unsigned long`` kernel virtual addresses.  The file is read on
    the first lookup; :meth:`load` reads it now.  Raises :class:`NettracerError`
    when the file cannot be read or every address is zero (``kptr_restrict``).
    """

    def __init__(self, path: str = KALLSYMS_PATH) -> None:
        self.path = path
        self._loaded = False
        self._addrs: array[int] = array("Q")
        self._names: list[str] = []
        self._types = ""
        self._mods: list[str] = []
        self._by_name: dict[str, int] | None = None
        self._text: list[tuple[int, int]] = []
        self._core_end = 0
        self._kallsyms_all = False

    # -- loading -----------------------------------------------------------------

    def load(self) -> Kallsyms:
        """Read and index the file now (idempotent); returns ``self``."""
        if self._loaded:
            return self
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise NettracerError(
                f"cannot read {self.path}: {e.strerror}; run as root on a kernel with "
                f"CONFIG_KALLSYMS"
            ) from None
        self._parse(data.decode("utf-8", "replace"))
        self._loaded = True
        return self

    def _parse(self, text: str) -> None:
        rows = _LINE.findall(text)
        if not rows:
            raise NettracerError(f"{self.path} lists no symbols; is CONFIG_KALLSYMS set?")
        addrs = [int(r[0], 16) for r in rows]
        if not any(addrs):
            restrict = _kptr_restrict()
            fix = "set kernel.kptr_restrict=0" if restrict != "0" else "CAP_SYSLOG is needed"
            raise NettracerError(
                f"kernel symbol addresses are hidden (kptr_restrict={restrict}); "
                f"run as root or {fix}"
            )
        # /proc/kallsyms is in address order (core first, then modules, BPF, ...);
        # a file that is not gets a stable sort, so aliases keep their kallsyms order.
        if addrs != sorted(addrs):
            order = sorted(range(len(addrs)), key=addrs.__getitem__)
            rows = [rows[i] for i in order]
            addrs = [addrs[i] for i in order]
        self._addrs = array("Q", addrs)
        self._types = types = "".join([r[1] for r in rows])
        self._names = names = [r[2] for r in rows]
        self._mods = mods = [r[3] or CORE for r in rows]
        last_core = next((i for i in range(len(mods) - 1, -1, -1) if mods[i] == CORE), -1)
        self._core_end = addrs[last_core] if last_core >= 0 else 0
        bounds: dict[str, int] = {}
        for name in _BOUNDS:
            i = _find(names, name)
            while i >= 0 and mods[i] != CORE:
                i = _find(names, name, i + 1)
            if i >= 0:
                bounds[name] = addrs[i]
        # Without CONFIG_KALLSYMS_ALL kallsyms holds no static data symbols.
        self._kallsyms_all = types.count("d") + types.count("b") > 0
        text_ranges = []
        if "_stext" in bounds and "_etext" in bounds:
            hi = bounds["_end"] if self._kallsyms_all and "_end" in bounds else bounds["_etext"]
            text_ranges.append((bounds["_stext"], hi))
        if "_sinittext" in bounds and "_einittext" in bounds:
            text_ranges.append((bounds["_sinittext"], bounds["_einittext"]))
        self._text = text_ranges

    # -- queries -----------------------------------------------------------------

    def __len__(self) -> int:
        self.load()
        return len(self._names)

    def _is_core_text(self, addr: int) -> bool:
        if not self._text:  # no boundary symbols: accept the core's whole span
            return addr <= self._core_end
        return any(lo <= addr < hi for lo, hi in self._text)

    def lookup(self, addr: int) -> Symbol | None:
        """The symbol ``addr`` falls in, as ``%pS`` would pick it, or ``None``."""
        self.load()
        addrs = self._addrs
        i = bisect_right(addrs, addr) - 1
        if i < 0:
            return None
        start = addrs[i]
        while i > 0 and addrs[i - 1] == start:  # first alias, like get_symbol_pos()
            i -= 1
        mod = self._mods[i]
        j = i + 1
        n = len(addrs)
        while j < n and addrs[j] == start:
            j += 1
        end: int | None = addrs[j] if j < n else None
        if mod == CORE:
            if not self._is_core_text(addr):
                return None
            if end is None or self._mods[j] != CORE:
                # Past the last core symbol the kernel ends at _etext/_einittext/_end.
                end = next((hi for lo, hi in self._text if lo <= addr < hi), None)
        return Symbol(
            name=self._names[i],
            address=start,
            offset=addr - start,
            size=None if end is None else end - start,
            module=mod,
            type=self._types[i],
        )

    def format(self, addr: int) -> str:
        """Short form ``sym+0x1a``; ``0x<hex>`` when no symbol covers ``addr``."""
        sym = self.lookup(addr)
        return sym.format() if sym else f"{addr:#x}"

    def format_ps(self, addr: int) -> str:
        """Exactly what the kernel's ``%pS`` prints for ``addr`` (see the module docstring)."""
        sym = self.lookup(addr)
        return sym.format_ps() if sym else f"{addr:#x}"

    def _index(self) -> dict[str, int]:
        if self._by_name is None:
            self.load()
            by_name: dict[str, int] = {}
            for i, name in enumerate(self._names):
                by_name.setdefault(name, i)
            self._by_name = by_name
        return self._by_name

    def addresses(self, name: str, module: str | None = None) -> list[int]:
        """Every address of ``name`` (static functions may share a name), in kallsyms order.

        ``module`` restricts the search to one ``[mod]`` (``"kernel"`` for the core).
        """
        first = self._index().get(name)
        if first is None:
            return []
        names, mods = self._names, self._mods
        return [
            self._addrs[i]
            for i in range(first, len(names))
            if names[i] == name and (module is None or mods[i] == module)
        ]

    def lookup_name(self, name: str, module: str | None = None) -> int:
        """The address of ``name`` (the first one, like ``kallsyms_lookup_name()``).

        ``module`` restricts the search to one ``[mod]`` (``"kernel"`` for the core).
        Raises :class:`NettracerError` when there is no such symbol.
        """
        if module is None:
            i = self._index().get(name)
            found = [] if i is None else [self._addrs[i]]
        else:
            found = self.addresses(name, module)
        if not found:
            where = f" in [{module}]" if module else ""
            raise NettracerError(f"no kernel symbol {name!r}{where} in {self.path}")
        return found[0]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._index()

    @property
    def modules(self) -> list[str]:
        """Names in the ``[mod]`` column, in order of first appearance (not ``kernel``)."""
        self.load()
        return list(dict.fromkeys(m for m in self._mods if m != CORE))


def kallsyms_readable(path: str = KALLSYMS_PATH) -> bool:
    """True when ``path`` exists and is readable by this process (addresses may still be 0)."""
    return os.access(path, os.R_OK)
