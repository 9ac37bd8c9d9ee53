"""Compile :class:`~nettracer.access.path.AccessPath`\\ s into eBPF instructions.

The values land in a *record* on the program's stack, laid out by :class:`Record`:
one status byte per path (:data:`OK`, :data:`NULL`, :data:`FAULT`), padded to 8,
then one 8-byte aligned slot per path.  The record is zeroed first and every byte of
it is defined afterwards (strings are read with ``bpf_probe_read_kernel_str``, Linux
5.5, and a failed read leaves zeros), so it can serve as a hash map key as it is.
A tracer embeds :func:`compile_reads` and then uses the record: copy it into a ring
buffer (``bpf_ringbuf_output``), use it as a map key, or compare a slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nettracer.access.path import AccessError, AccessPath
from nettracer.bpf.helpers import Helper
from nettracer.bpf.insn import (
    FP,
    R0,
    R1,
    R2,
    R3,
    R6,
    R7,
    Insn,
    JmpOp,
    Reg,
    add64,
    call,
    ja,
    jeq,
    jmp,
    ldx,
    mov64,
    st,
    stx,
)

#: status byte of a path: the value was read
OK = 0
#: a pointer on the way (or the argument) was NULL
NULL = 1
#: ``bpf_probe_read_kernel`` failed (an unmapped address)
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
    record: Record,
    buf_off: int,
    *,
    ctx: Reg = R6,
    base: Reg = R7,
    prefix: str = "acc",
) -> list[Insn]:
    """Instructions filling ``record`` at ``FP + buf_off`` (8-byte aligned, negative).

    ``ctx`` holds the raw tracepoint context (``u64`` arguments; keep it in a
    callee-saved register, it must survive helper calls); ``base`` is a callee-saved
    scratch register for the pointer being followed.  R0-R5 are clobbered.  Labels are
    ``{prefix}_...``: use distinct prefixes when embedding it twice in one program.
    Every read is bounded: ``len(derefs) + 1`` helper calls per path, each
    preceded by a NULL check.
    """
    if buf_off % 8 or buf_off + record.size > 0 or buf_off < -512:
        raise ValueError(f"record at fp{buf_off:+d} ({record.size} bytes) is not on the stack")
    out: list[Insn] = [st(8, FP, buf_off + i, 0) for i in range(0, record.size, 8)]
    for k, (path, slot) in enumerate(zip(record.paths, record.slots, strict=True)):
        s = buf_off + slot
        flag = buf_off + k
        done, null, fault = f"{prefix}_{k}_done", f"{prefix}_{k}_null", f"{prefix}_{k}_fault"
        out.append(ldx(8, base, ctx, 8 * path.arg_index))
        if path.offset is None:
            out.append(stx(8, FP, s, base))
            continue
        hops = [(off, True) for off in path.derefs] + [(path.offset, False)]
        for off, is_ptr in hops:
            string = not is_ptr and path.decode == "str"
            out += [
                jeq(base, 0, null),
                mov64(R1, FP),
                add64(R1, s),
                mov64(R2, 8 if is_ptr else path.size),
                mov64(R3, base),
                add64(R3, off),
                call(Helper.probe_read_kernel_str if string else Helper.probe_read_kernel),
                jmp(JmpOp.JSLT, R0, 0, fault),
            ]
            if is_ptr:
                out += [ldx(8, base, FP, s), st(8, FP, s, 0)]
        out.append(ja(done))
        out.append(st(1, FP, flag, NULL).at(null))
        out.append(ja(done))
        out.append(st(1, FP, flag, FAULT).at(fault))
        out += [st(8, FP, s + i, 0) for i in range(0, _round8(max(path.size, 8)), 8)]
        out.append(mov64(R0, 0).at(done))
    return out
