"""Kernel symbols for the few addresses a tracer meets, without holding all of kallsyms.

:class:`nettracer.kernel.kallsyms.Kallsyms` keeps every symbol of ``/proc/kallsyms``
(about 120k on 6.18), which costs some 50 MB of peak RSS in Python -- most of the
drop monitor's budget -- while a drop monitor meets a handful of drop locations and
the frames of their stacks.  :class:`SymbolCache` therefore reads the file once per
batch of *new* addresses, keeps only the lines that decide how ``%pS`` names each of
them, and hands those lines to ``Kallsyms``, so the naming rules (first alias, core
text bounds, module names) stay in that one module:

* for each address, every alias at the greatest symbol address ``<=`` it, and the
  first symbol above it (the size);
* the bound symbols ``_stext``, ``_etext``, ``_sinittext``, ``_einittext``, ``_end``;
* one static-data line when the file has any (``Kallsyms`` infers
  ``CONFIG_KALLSYMS_ALL`` from their presence); it cannot be nearer to an address
  than the symbols already kept, so it changes no answer.

Lines keep their file order.  Results are cached per address; modules loaded later
are seen by the next batch.
"""

from __future__ import annotations

import os
import sys
from array import array
from bisect import bisect_right
from collections.abc import Iterable

from nettracer.errors import NettracerError
from nettracer.kernel.kallsyms import KALLSYMS_PATH, Kallsyms, Symbol

_BOUNDS = (b"_stext", b"_etext", b"_sinittext", b"_einittext", b"_end")
_DATA_TYPES = (b" d ", b" b ")  # what Kallsyms counts to detect CONFIG_KALLSYMS_ALL


def _line_at(block: bytes, pos: int) -> tuple[int, bytes]:
    """(line number within ``block``, the line) of the line containing ``pos``."""
    start = block.rfind(b"\n", 0, pos) + 1
    end = block.find(b"\n", pos)
    return block.count(b"\n", 0, start), block[start : end if end >= 0 else len(block)]


def _special_lines(block: bytes, want_data: bool) -> list[tuple[int, bytes]]:
    """The core bound-symbol lines of ``block``, and its first static-data line."""
    out = []
    for name in _BOUNDS:
        pos = block.find(b" " + name + b"\n")
        while pos >= 0:
            out.append(_line_at(block, pos))
            pos = block.find(b" " + name + b"\n", pos + 1)
    if want_data:
        found = [p for p in (block.find(t) for t in _DATA_TYPES) if p >= 0]
        if found:
            out.append(_line_at(block, min(found)))
    return out


_CHUNK = 1 << 18


def _addresses(lines: list[bytes], path: str) -> array[int]:
    """The address of every line, in order."""
    out = array("Q")
    heads = b"".join([line[:17] for line in lines])
    if len(heads) == 17 * len(lines) and heads[16::17] == b" " * len(lines):
        # 64-bit kernels print 16 hex digits and a blank: convert them all at once
        out.frombytes(bytes.fromhex(heads.replace(b" ", b"").decode()))
        if sys.byteorder == "little":
            out.byteswap()  # fromhex gave big-endian words
        return out
    try:
        out.extend(int(line[: line.index(b" ")], 16) for line in lines)
    except ValueError:
        raise NettracerError(f"{path}: not in kallsyms format") from None
    return out


class _Best:
    """For one address: the aliases at the greatest symbol address <= it, in file order,
    and a line of the least symbol address above it."""

    __slots__ = ("above", "above_line", "at", "lines")

    def __init__(self) -> None:
        self.at = -1
        self.lines: list[tuple[int, bytes]] = []
        self.above = 1 << 64
        self.above_line: tuple[int, bytes] | None = None


class SymbolCache:
    """``lookup(addr)`` like :meth:`Kallsyms.lookup`, reading only what it needs."""

    def __init__(self, path: str = KALLSYMS_PATH) -> None:
        self.path = path
        self._known: dict[int, Symbol | None] = {}
        self.passes = 0  # how many times the file was read (for tests and benchmarks)

    def lookup(self, addr: int) -> Symbol | None:
        if addr not in self._known:
            self.prefetch((addr,))
        return self._known[addr]

    def format(self, addr: int) -> str:
        sym = self.lookup(addr)
        return sym.format() if sym else f"{addr:#x}"

    def prefetch(self, addrs: Iterable[int]) -> None:
        """Resolve every address not seen before in one read of the file."""
        new = sorted({a for a in addrs if a not in self._known})
        if not new:
            return
        ksyms = self._subset(new)
        for a in new:
            self._known[a] = ksyms.lookup(a) if ksyms is not None else None

    def _subset(self, queries: list[int]) -> Kallsyms | None:
        """``Kallsyms`` over the lines that decide ``queries``, read in chunks."""
        best = {q: _Best() for q in queries}
        extra: list[tuple[int, bytes]] = []
        have_data_line = False
        lineno = 0
        rest = b""
        try:
            with open(self.path, "rb") as f:
                self.passes += 1
                while True:
                    chunk = f.read(_CHUNK)
                    block = rest + chunk
                    if chunk:
                        cut = block.rfind(b"\n") + 1
                        block, rest = block[:cut], block[cut:]
                    lines = block.split(b"\n")
                    if lines and not lines[-1]:
                        lines.pop()
                    if lines:
                        self._scan(lines, lineno, best)
                        for n, line in _special_lines(block, not have_data_line):
                            extra.append((lineno + n, line))
                            have_data_line = have_data_line or line[16:19] in _DATA_TYPES
                        lineno += len(lines)
                    if not chunk:
                        break
        except OSError as e:
            raise NettracerError(
                f"cannot read {self.path}: {e.strerror}; run as root on a kernel with "
                f"CONFIG_KALLSYMS"
            ) from None
        keep: dict[int, bytes] = {}
        for b in best.values():
            keep.update(b.lines)
            if b.above_line is not None:
                keep[b.above_line[0]] = b.above_line[1]
        if not keep:
            return None
        keep.update(extra)
        text = b"\n".join(line for _, line in sorted(keep.items())) + b"\n"
        fd = os.memfd_create("nettracer-kallsyms", os.MFD_CLOEXEC)
        try:
            os.write(fd, text)
            return Kallsyms(f"/proc/self/fd/{fd}").load()
        finally:
            os.close(fd)

    def _scan(self, lines: list[bytes], first: int, best: dict[int, _Best]) -> None:
        """Update every query's candidates with one chunk of lines (numbered from ``first``)."""
        addrs = _addresses(lines, self.path)
        if first == 0 and not any(addrs[:1000]):  # kptr_restrict: let Kallsyms say so
            fd = os.memfd_create("nettracer-kallsyms", os.MFD_CLOEXEC)
            try:
                os.write(fd, b"\n".join(lines[:1000]) + b"\n")
                Kallsyms(f"/proc/self/fd/{fd}").load()
            finally:
                os.close(fd)
        order: list[int] | range = range(len(addrs))
        ascending = sorted(addrs)
        if array("Q", ascending) != addrs:
            order = sorted(order, key=addrs.__getitem__)  # stable: aliases keep file order
        n = len(ascending)
        for q, b in best.items():
            i = bisect_right(ascending, q) - 1
            if i >= 0 and ascending[i] >= b.at:
                at = ascending[i]
                while i > 0 and ascending[i - 1] == at:
                    i -= 1
                if at > b.at:
                    b.at, b.lines = at, []
                j = i
                while j < n and ascending[j] == at:
                    b.lines.append((first + order[j], lines[order[j]]))
                    j += 1
                above = j
            else:
                above = i + 1
            if above < n and ascending[above] < b.above:
                b.above = ascending[above]
                b.above_line = (first + order[above], lines[order[above]])
