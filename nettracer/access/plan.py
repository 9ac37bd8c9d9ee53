"""Plan and emit a program's reads of kernel structs: few, bounded, NULL-checked.

The one way a generated program reads kernel memory above :mod:`nettracer.bpf.memory`
(which picks the helper):

* :func:`plan_reads` / :func:`plan_fields` group fields of one struct into as few
  ``bpf_probe_read_kernel`` calls as possible, each at most ``max_span`` bytes, and lay
  the copies out in one stack buffer (:class:`ReadPlan`); :func:`emit_plan` emits them.
* :func:`read_chain` follows a chain of pointers (``skb->dev->nd_net.net``) with a NULL
  check before every read and reads the final value.
* :func:`plan_paths` does both for resolved struct paths
  (:class:`~nettracer.access.path.AccessPath`): paths that start at the same argument
  and follow the same pointers share those reads, and their final members are grouped
  like fields (:mod:`nettracer.access.compile` emits the result).

Example: ``sk_buff.dev`` and ``sk_buff.protocol`` in one read, then the device::

    plan = plan_reads(offsets, ["sk_buff.dev", "sk_buff.protocol"], max_span=192)
    emit_plan(p, plan, buf_off=-64 - plan.size, src=R7)       # R7: struct sk_buff *
    p += ldx(8, R8, FP, -64 - plan.size + plan.where["sk_buff.dev"])
    read_chain(p, R8, (), offsets.offset("net_device.ifindex"), 4, -8, null="out")
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from nettracer.bpf.insn import FP, R0, JmpOp, Program, Reg, jeq, jmp, ldx, st
from nettracer.bpf.memory import load, read
from nettracer.value import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.access.path import AccessPath
    from nettracer.layout.offsets import Offsets

#: default largest span of one read (bytes)
MAX_SPAN = 128


class ReadPlan(Value):
    """How to read a set of fields of one struct with few helper calls.

    ``reads`` are ``(src_off, length, buf_off)``; ``where[key]`` is the field's
    position in the buffer.  Each read starts 8-aligned in both struct and buffer, so
    fields keep their natural alignment in the buffer.  ``size`` is the buffer size (a
    multiple of 8).  ``fields`` are ``(src_off, size, buf_off)`` of each field, for
    plain loads (:class:`~nettracer.bpf.memory.KernelReads` ``direct``), which read
    fields, not spans: the verifier refuses a load that cuts a pointer member.
    """

    __slots__ = ("reads", "where", "size", "fields")  # noqa: RUF023 - field order

    def __init__(
        self,
        reads: tuple[tuple[int, int, int], ...],
        where: dict[str, int],
        size: int,
        fields: tuple[tuple[int, int, int], ...] = (),
    ) -> None:
        self.reads = reads
        self.where = where
        self.size = size
        self.fields = fields

    def __hash__(self) -> int:
        return hash((self.reads, tuple(sorted(self.where.items())), self.size, self.fields))


def plan_fields(fields: Mapping[str, tuple[int, int]], max_span: int = MAX_SPAN) -> ReadPlan:
    """Group ``fields`` (name -> ``(offset, size)`` from the same base pointer) into
    reads of at most ``max_span`` bytes each (a single field larger than that is read
    alone)."""
    ordered = sorted(((o, s, k) for k, (o, s) in fields.items()), key=lambda f: (f[0], f[2]))
    clusters: list[list[tuple[int, int, str]]] = []
    for f in ordered:
        if clusters:
            start = clusters[-1][0][0] & ~7
            end = max(o + s for o, s, _ in clusters[-1])
            if max(end, f[0] + f[1]) - start <= max_span:
                clusters[-1].append(f)
                continue
        clusters.append([f])
    reads = []
    where = {}
    loads = []
    pos = 0
    for c in clusters:
        start = c[0][0] & ~7
        length = max(o + s for o, s, _ in c) - start
        reads.append((start, length, pos))
        for o, s, k in c:
            where[k] = pos + (o - start)
            loads.append((o, s, where[k]))
        pos += (length + 7) & ~7
    return ReadPlan(tuple(reads), where, pos, tuple(loads))


def plan_reads(offsets: Offsets, keys: Iterable[str], max_span: int = MAX_SPAN) -> ReadPlan:
    """:func:`plan_fields` for catalogue keys (``"sock_common.skc_dport"``) of one
    struct; ``where`` is keyed by catalogue key. Raises
    :class:`~nettracer.layout.offsets.UnresolvedField` for a key ``offsets`` lacks."""
    return plan_fields({k: (offsets[k].offset, offsets[k].size) for k in keys}, max_span)


class PathGroup(Value):
    """Paths (indices into the list given to :func:`plan_paths`) that start at argument
    ``arg_index`` and follow the same pointers ``derefs``; then ``reads`` from the
    struct reached: ``(src_off, length, members, string)``, one helper call each
    (``string``: one NUL-terminated member, read with the ``_str`` helper)."""

    __slots__ = ("arg_index", "derefs", "reads")

    def __init__(
        self,
        arg_index: int,
        derefs: tuple[int, ...],
        reads: tuple[tuple[int, int, tuple[int, ...], bool], ...],
    ) -> None:
        self.arg_index = arg_index
        self.derefs = derefs
        self.reads = reads

    @property
    def members(self) -> tuple[int, ...]:
        return tuple(i for *_, idx, _ in self.reads for i in idx)


def plan_paths(paths: Sequence[AccessPath], max_span: int = MAX_SPAN) -> list[PathGroup]:
    """Group the paths that read a struct member (``offset`` not None) by argument and
    pointer chain, in order of first appearance; within a group, members other than
    strings are coalesced as :func:`plan_fields` does (``max_span=0``: one read each).
    A read of several members has ``src_off`` 8-aligned; a lone member is read exactly."""
    chains: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for i, path in enumerate(paths):
        if path.offset is not None:
            chains.setdefault((path.arg_index, path.derefs), []).append(i)
    groups = []
    for (arg, derefs), idx in chains.items():
        plain = {str(i): (paths[i].offset, paths[i].size) for i in idx if paths[i].decode != "str"}
        plan = plan_fields(plain, max_span) if max_span else None
        reads: list[tuple[int, int, tuple[int, ...], bool]] = []
        for i in idx:
            if paths[i].decode == "str" or plan is None:
                reads.append((paths[i].offset, paths[i].size, (i,), paths[i].decode == "str"))
        if plan is not None:
            for src_off, length, pos in plan.reads:
                members = tuple(int(k) for k, w in plan.where.items() if pos <= w < pos + length)
                if len(members) == 1:
                    m = paths[members[0]]
                    src_off, length = m.offset, m.size
                reads.append((src_off, length, members, False))
        reads.sort(key=lambda r: r[2][0])
        groups.append(PathGroup(arg, derefs, tuple(reads)))
    return groups


def emit_plan(p: Program, plan: ReadPlan, buf_off: int, src: Reg, dst: Reg = FP) -> None:
    """Append the reads of ``plan`` from the struct at ``src`` into the buffer at
    ``dst + buf_off`` (the stack by default). No NULL check: test ``src`` first.
    On a fault the kernel zeroes that read's bytes. Clobbers R0-R5.  With direct reads
    (a ``tp_btf`` program, ``src`` BTF-typed) each field is loaded alone."""
    if _direct(p):
        for src_off, size, pos in plan.fields:
            load(p, dst, buf_off + pos, size, src, src_off)
        return
    for src_off, length, pos in plan.reads:
        read(p, dst, buf_off + pos, length, src, src_off)


def _direct(p: Program) -> bool:
    return p.reads is not None and p.reads.direct


def read_chain(
    p: Program,
    base: Reg,
    derefs: Sequence[int],
    offset: int,
    size: int,
    dst_off: int,
    *,
    null: str,
    fault: str | None = None,
    string: bool = False,
    clear: bool = False,
) -> None:
    """Read ``size`` bytes at ``(*(*(base + derefs[0]) + derefs[1]) ...) + offset`` into
    ``fp + dst_off``, jumping to ``null`` when ``base`` or a pointer on the way is NULL.

    Each pointer hop is one 8-byte read into ``fp + dst_off`` (so the slot must hold
    at least 8 bytes when ``derefs`` is not empty) loaded back into ``base`` after the
    call, so ``base`` may be any register but R0-R2 (R3 saves a copy per read); with
    direct reads (``tp_btf``, ``base`` BTF-typed) a hop is one load into ``base``, the
    final value one load (a string is still read with the helper).
    ``fault`` (optional) is where to go when a read fails (R0 < 0); ``string`` uses the
    ``_str`` helper for the final read; ``clear`` zeroes the 8-byte slot after each hop
    so that a shorter final value leaves no pointer bytes behind (records used as map
    keys). Clobbers R0-R5 and ``base``.
    """
    direct = _direct(p)
    for hop in derefs:
        if direct:
            p += [jeq(base, 0, null), ldx(8, base, base, hop)]
            continue
        _checked_read(p, base, hop, 8, dst_off, null, fault, False)
        p += ldx(8, base, FP, dst_off)
        if clear:
            p += st(8, FP, dst_off, 0)
    if direct and not string:
        p += jeq(base, 0, null)
        load(p, FP, dst_off, size, base, offset)
        return
    _checked_read(p, base, offset, size, dst_off, null, fault, string)


def _checked_read(
    p: Program,
    base: Reg,
    off: int,
    size: int,
    dst_off: int,
    null: str,
    fault: str | None,
    string: bool,
) -> None:
    p += jeq(base, 0, null)
    read(p, FP, dst_off, size, base, off, string=string)
    if fault is not None:
        p += jmp(JmpOp.JSLT, R0, 0, fault)
