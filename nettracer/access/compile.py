"""Compile :class:`~nettracer.access.path.AccessPath`\\ s into eBPF instructions.

The values land in a *record* on the program's stack, laid out by :class:`Record`:
one status byte per path (:data:`OK`, :data:`NULL`, :data:`FAULT`), padded to 8,
then one 8-byte aligned slot per path.  The record is zeroed first and every byte of
it is defined afterwards (strings are read with ``bpf_probe_read_kernel_str``, Linux
5.5, or its older form, see :mod:`nettracer.bpf.memory`; a failed read leaves zeros), so it can serve as a hash map key as it is.
A tracer embeds :func:`compile_reads` and then uses the record: copy it into a ring
buffer (:meth:`nettracer.bpf.channel.EventChannel.output`), use it as a map key, or compare a slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nettracer.access.path import AccessError, AccessPath
from nettracer.access.plan import read_chain
from nettracer.bpf.insn import FP, R0, R6, R7, Program, Reg, ja, ldx, mov64, st, stx

#: status byte of a path: the value was read
OK = 0
#: a pointer on the way (or the argument) was NULL
NULL = 1
#: the read helper failed (an unmapped address)
FAULT = 2
#: largest record (the eBPF stack is 512 bytes, shared with the rest of the program)
MAX_RECORD = 256


def _round8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True)
class Record:
    """Where each path's status byte and value live in the record."""

    paths: tuple[AccessPath, ...]
    slots: tuple[int, ...]  # byte offset of each value from the start of the record
    size: int

    @classmethod
    def of(cls, paths: Sequence[AccessPath]) -> Record:
        """The layout for ``paths``; AccessError when it exceeds :data:`MAX_RECORD`."""
        off = _round8(len(paths))
        slots = []
        for p in paths:
            slots.append(off)
            off += _round8(max(p.size, 8))
        if off > MAX_RECORD:
            raise AccessError(
                f"{', '.join(p.expr for p in paths)}: {off} bytes of values, at most "
                f"{MAX_RECORD} fit in one record; read fewer or smaller members"
            )
        return cls(tuple(paths), tuple(slots), off)

    def decode(self, raw: bytes | memoryview) -> list[int | str | None]:
        """Each path's value (None where it was NULL or unreadable)."""
        out: list[int | str | None] = []
        for i, (p, slot) in enumerate(zip(self.paths, self.slots, strict=True)):
            if raw[i] != OK:
                out.append(None)
            else:
                out.append(p.decode_value(bytes(raw[slot : slot + p.size])))
        return out

    def statuses(self, raw: bytes | memoryview) -> list[str]:
        """``"ok"``, ``"null"`` or ``"fault"`` per path."""
        names = {OK: "ok", NULL: "null", FAULT: "fault"}
        return [names.get(raw[i], "?") for i in range(len(self.paths))]


def compile_reads(
    p: Program,
    record: Record,
    buf_off: int,
    *,
    ctx: Reg = R6,
    base: Reg = R7,
) -> None:
    """Append the instructions filling ``record`` at ``FP + buf_off`` (8-byte aligned,
    negative) to ``p``; may be used any number of times in one program.

    ``ctx`` holds the raw tracepoint context (``u64`` arguments; keep it in a
    callee-saved register, it must survive helper calls); ``base`` is a callee-saved
    scratch register for the pointer being followed.  R0-R5 are clobbered.
    Every read is bounded and NULL-checked (:func:`nettracer.access.plan.read_chain`):
    ``len(derefs) + 1`` helper calls per path.
    """
    if buf_off % 8 or buf_off + record.size > 0 or buf_off < -512:
        raise ValueError(f"record at fp{buf_off:+d} ({record.size} bytes) is not on the stack")
    p += [st(8, FP, buf_off + i, 0) for i in range(0, record.size, 8)]
    for k, (path, slot) in enumerate(zip(record.paths, record.slots, strict=True)):
        s = buf_off + slot
        p += ldx(8, base, ctx, 8 * path.arg_index)
        if path.offset is None:
            p += stx(8, FP, s, base)
            continue
        done, null, fault = p.new_label("done"), p.new_label("null"), p.new_label("fault")
        read_chain(
            p, base, path.derefs, path.offset, path.size, s, null=null, fault=fault,
            string=path.decode == "str", clear=True,
        )  # fmt: skip
        p += [ja(done), st(1, FP, buf_off + k, NULL).at(null), ja(done)]
        p += st(1, FP, buf_off + k, FAULT).at(fault)
        p += [st(8, FP, s + i, 0) for i in range(0, _round8(max(path.size, 8)), 8)]
        p += mov64(R0, 0).at(done)
