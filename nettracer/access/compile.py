"""Compile :class:`~nettracer.access.path.AccessPath`\\ s into eBPF instructions.

The values land in a *record* on the program's stack, laid out by :class:`RecordLayout`:
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
from nettracer.access.plan import MAX_SPAN, PathGroup, plan_paths, read_chain
from nettracer.bpf.insn import (
    FP,
    R0,
    R6,
    R7,
    JmpOp,
    Program,
    Reg,
    ja,
    jeq,
    jmp,
    ldx,
    mov64,
    st,
    stx,
)
from nettracer.bpf.memory import copy, read
from nettracer.kernel.tracepoints import TracepointArgs

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
class RecordLayout:
    """Where each path's status byte and value live in the record."""

    paths: tuple[AccessPath, ...]
    slots: tuple[int, ...]  # byte offset of each value from the start of the record
    size: int

    @classmethod
    def of(cls, paths: Sequence[AccessPath]) -> RecordLayout:
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
    record: RecordLayout,
    buf_off: int,
    *,
    ctx: Reg = R6,
    base: Reg = R7,
    tmp_off: int | None = None,
    args: TracepointArgs | None = None,
) -> None:
    """Append the instructions filling ``record`` at ``FP + buf_off`` (8-byte aligned,
    negative) to ``p``; may be used any number of times in one program.

    ``ctx`` holds the tracepoint context, laid out as ``args`` says (default: the raw
    tracepoint's ``u64`` arguments, :func:`raw_args`; keep it in a callee-saved
    register, it must survive helper calls); ``base`` is a callee-saved
    scratch register for the pointer being followed.  R0-R5 are clobbered.  The reads
    are those of :func:`nettracer.access.plan.plan_paths`: paths sharing an argument and
    pointer chain share its reads, each preceded by a NULL check; with ``tmp_off`` (an
    8-aligned stack buffer of :data:`~nettracer.access.plan.MAX_SPAN` bytes) members of
    one struct that lie close together are read with one call and copied into their
    slots.  A NULL pointer or a failed read marks every path of its group.
    """
    if buf_off % 8 or buf_off + record.size > 0 or buf_off < -512:
        raise ValueError(f"record at fp{buf_off:+d} ({record.size} bytes) is not on the stack")
    if tmp_off is not None and (tmp_off % 8 or tmp_off < -512 or tmp_off + MAX_SPAN > 0):
        raise ValueError(f"scratch buffer at fp{tmp_off:+d} is not on the stack")
    if args is None:
        args = raw_args("", record.paths)
    p += [st(8, FP, buf_off + i, 0) for i in range(0, record.size, 8)]
    for path, slot in zip(record.paths, record.slots, strict=True):
        if path.offset is None:
            p += [args.load(base, ctx, path.arg), stx(8, FP, buf_off + slot, base)]
    for group in plan_paths(record.paths, MAX_SPAN if tmp_off is not None else 0):
        _emit_group(p, record, buf_off, group, (args, ctx, base), tmp_off)


def _emit_group(
    p: Program,
    record: RecordLayout,
    buf_off: int,
    group: PathGroup,
    regs: tuple[TracepointArgs, Reg, Reg],
    tmp_off: int | None,
) -> None:
    """The shared pointer hops (landing in the first member's slot, cleared after each:
    a record is a map key), then the reads; the status bytes on NULL and fault."""
    done, null, fault = p.new_label("done"), p.new_label("null"), p.new_label("fault")
    members = group.members
    land = buf_off + record.slots[members[0]]
    args, ctx, base = regs
    p += args.load(base, ctx, record.paths[members[0]].arg)
    for hop in group.derefs:
        read_chain(p, base, (), hop, 8, land, null=null, fault=fault)
        p += [ldx(8, base, FP, land), st(8, FP, land, 0)]
    p += jeq(base, 0, null)
    for src_off, length, idx, string in group.reads:
        if len(idx) == 1:
            read(p, FP, buf_off + record.slots[idx[0]], length, base, src_off, string=string)
            p += jmp(JmpOp.JSLT, R0, 0, fault)
            continue
        assert tmp_off is not None
        read(p, FP, tmp_off, length, base, src_off)
        p += jmp(JmpOp.JSLT, R0, 0, fault)
        for k in idx:
            path = record.paths[k]
            assert path.offset is not None
            copy(p, FP, buf_off + record.slots[k], FP, tmp_off + path.offset - src_off, path.size)
    p += ja(done)
    p.label(null)
    p += [st(1, FP, buf_off + k, NULL) for k in members]
    p += ja(done)
    p.label(fault)
    p += [st(1, FP, buf_off + k, FAULT) for k in members]
    for k in members:
        s = buf_off + record.slots[k]
        p += [st(8, FP, s + i, 0) for i in range(0, _round8(max(record.paths[k].size, 8)), 8)]
    p += mov64(R0, 0).at(done)


def raw_args(tracepoint: str, paths: Sequence[AccessPath]) -> TracepointArgs:
    """The raw tracepoint layout of the arguments ``paths`` start from (each at
    ``8 * arg_index``; arguments no path names are ``arg<i>``)."""
    by_index = {p.arg_index: p.arg for p in paths}
    names = [by_index.get(i, f"arg{i}") for i in range(max(by_index, default=-1) + 1)]
    return TracepointArgs.raw_args(tracepoint, names)
