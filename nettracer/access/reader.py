"""Read struct-path expressions on every hit of a raw tracepoint.

:func:`resolve_exprs` turns expressions into :class:`AccessPath`\\ s (BTF, or the
field catalogue with an ``Offsets`` object); :class:`Reader` builds the program
(:func:`build_program`), loads it, attaches it and hands back either each event's
values (ring buffer, lost events counted) or counts per distinct tuple of values
(a kernel hash map keyed by the record, like bpftrace's ``@[skb->dev->name] = count()``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from nettracer.access.compile import OK, Record, compile_reads
from nettracer.access.path import (
    KNOWN_ARGS,
    AccessError,
    AccessPath,
    resolve_btf,
    resolve_offsets,
    tracepoint_args_btf,
)
from nettracer.bpf.helpers import Helper
from nettracer.bpf.insn import (
    FP,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    Insn,
    JmpOp,
    add64,
    atomic_add,
    call,
    exit_,
    ja,
    jeq,
    jmp32,
    ld_map_fd,
    ldx,
    mov64,
    st,
)

if TYPE_CHECKING:
    from nettracer.bpf.maps import Map
    from nettracer.kernel.btf import Btf
    from nettracer.layout.offsets import Offsets

BPF_NOEXIST = 1
#: stack: fp-8 holds the constant 1 for new hash entries, fp-16 the u32 key of ``lost``
_ONE, _ZERO_KEY = -8, -16


def tracepoint_name(name: str) -> str:
    """``skb:kfree_skb`` or ``kfree_skb`` -> ``kfree_skb`` (raw tracepoints have no category)."""
    return name.rsplit(":", 1)[-1].strip()


def resolve_exprs(
    exprs: Sequence[str],
    tracepoint: str,
    btf: Btf | None = None,
    offsets: Offsets | None = None,
) -> list[AccessPath]:
    """Resolve each expression with ``btf`` when given, else with ``offsets``."""
    if btf is not None:
        args = tracepoint_args_btf(btf, tracepoint)
        return [resolve_btf(e, btf, args) for e in exprs]
    if offsets is None:
        raise ValueError("resolve_exprs needs btf or offsets")
    return [resolve_offsets(e, offsets, tracepoint) for e in exprs]


def netns_expr(tracepoint: str, btf: Btf | None = None) -> str:
    """An expression for the network namespace inode of the tracepoint's first
    ``struct sk_buff *``, ``struct sock *`` or ``struct net_device *`` argument."""
    if btf is not None:
        from nettracer.kernel.btf import Kind

        typed = []
        for n, tid in tracepoint_args_btf(btf, tracepoint):
            t = btf.type(btf.strip(tid))
            if t.kind == Kind.PTR:
                typed.append((n, btf.type(btf.strip(t.size_or_type)).name))
    else:
        typed = [(n, s) for n, s in KNOWN_ARGS.get(tracepoint, ()) if s]
    for name, struct in typed:
        if struct == "sk_buff":
            return f"{name}->dev->nd_net.net->ns.inum"
        if struct == "sock":
            return f"{name}->__sk_common.skc_net.net->ns.inum"
        if struct == "net_device":
            return f"{name}->nd_net.net->ns.inum"
    raise AccessError(
        f"tracepoint {tracepoint} has no sk_buff, sock or net_device argument to find "
        f"the network namespace of; drop --filter-netns"
    )


def key_type(record: Record) -> type[ctypes.Structure]:
    """The ctypes type of a record used as a hash map key."""
    return type(
        "RecordKey", (ctypes.Structure,), {"_fields_": [("raw", ctypes.c_uint8 * record.size)]}
    )


def build_program(
    record: Record,
    mode: str,
    netns_filter: tuple[Record, int] | None = None,
    out_map: str = "out",
    lost_map: str = "lost",
) -> list[Insn]:
    """The raw tracepoint program: optional netns filter, the reads, then either
    ``bpf_ringbuf_output`` of the record (``mode="events"``) or ``out[record] += 1``
    (``mode="count"``). What does not fit (ring buffer full, hash map full) is counted
    in ``lost[0]``."""
    buf = _ZERO_KEY - record.size
    insns: list[Insn] = [mov64(R6, R1), st(8, FP, _ONE, 1), st(8, FP, _ZERO_KEY, 0)]
    if netns_filter is not None:
        frec, inum = netns_filter
        fbuf = buf - frec.size
        slot = fbuf + frec.slots[0]
        imm = inum - (1 << 32) if inum >= 1 << 31 else inum
        insns += compile_reads(frec, fbuf, prefix="netns")
        insns += [
            ldx(1, R0, FP, fbuf),
            jmp32(JmpOp.JNE, R0, OK, "out"),
            ldx(4, R0, FP, slot),
            jmp32(JmpOp.JNE, R0, imm, "out"),
        ]
    insns += compile_reads(record, buf, prefix="val")
    if mode == "events":
        insns += [
            ld_map_fd(R1, out_map),
            mov64(R2, FP),
            add64(R2, buf),
            mov64(R3, record.size),
            mov64(R4, 0),
            call(Helper.ringbuf_output),
            jeq(R0, 0, "out"),
            ja("lost"),
        ]
    elif mode == "count":
        lookup = [ld_map_fd(R1, out_map), mov64(R2, FP), add64(R2, buf)]
        insns += [
            *lookup,
            call(Helper.map_lookup_elem),
            jeq(R0, 0, "new"),
            mov64(R1, 1),
            atomic_add(8, R0, 0, R1),
            ja("out"),
            ld_map_fd(R1, out_map).at("new"),
            mov64(R2, FP),
            add64(R2, buf),
            mov64(R3, FP),
            add64(R3, _ONE),
            mov64(R4, BPF_NOEXIST),
            call(Helper.map_update_elem),
            jeq(R0, 0, "out"),
            *lookup,  # another CPU created it meanwhile, or the map is full
            call(Helper.map_lookup_elem),
            jeq(R0, 0, "lost"),
            mov64(R1, 1),
            atomic_add(8, R0, 0, R1),
            ja("out"),
        ]
    else:
        raise ValueError(f"mode must be 'events' or 'count', not {mode!r}")
    insns += [
        ld_map_fd(R1, lost_map).at("lost"),
        mov64(R2, FP),
        add64(R2, _ZERO_KEY),
        call(Helper.map_lookup_elem),
        jeq(R0, 0, "out"),
        mov64(R1, 1),
        atomic_add(8, R0, 0, R1),
        mov64(R0, 0).at("out"),
        exit_(),
    ]
    return insns


class Reader:
    """Attach a program reading ``paths`` on each hit of raw tracepoint ``tracepoint``.

    ``mode`` is ``"events"`` (:meth:`poll`) or ``"count"`` (:meth:`pop_counts`);
    ``netns`` (an inode) keeps only hits whose ``netns_path`` value equals it.
    Use as a context manager; :meth:`close` detaches and frees everything.
    """

    def __init__(
        self,
        tracepoint: str,
        paths: Sequence[AccessPath],
        mode: str = "events",
        netns: tuple[AccessPath, int] | None = None,
        max_entries: int = 10240,
        ringbuf_size: int = 1 << 20,
    ) -> None:
        from nettracer.bpf import link, prog
        from nettracer.bpf.maps import hash_map
        from nettracer.bpf.ringbuf import RingBuf, RingBufReader, lost_counter

        self.record = Record.of(paths)
        self.mode = mode
        self._objs: list = []
        self.reader: RingBufReader | None = None
        try:
            self.lost_map: Map = lost_counter("lost")
            self._objs.append(self.lost_map)
            if mode == "events":
                rb = RingBuf(ringbuf_size, "out")
                self._objs.append(rb)
                self.out: Map = rb
                self.reader = RingBufReader(rb, self.lost_map)
            else:
                self.out = hash_map(key_type(self.record), ctypes.c_uint64, max_entries, "out")
                self._objs.append(self.out)
            flt = (Record.of([netns[0]]), netns[1]) if netns else None
            insns = build_program(self.record, mode, flt)
            self.prog = prog.load(
                insns, maps={"out": self.out, "lost": self.lost_map}, name="nt_read"
            )
            self._objs.append(self.prog)
            self.link = link.attach_raw_tracepoint(self.prog, tracepoint)
            self._objs.append(self.link)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        for obj in reversed(self._objs):
            obj.close()
        self._objs.clear()

    @property
    def lost(self) -> int:
        """Events the ring buffer or the hash map had no room for, since the start."""
        v = self.lost_map.lookup(0, 0)
        return sum(v) if isinstance(v, list) else int(v)

    def poll(self, timeout_s: float, callback: Callable[[list, list[str]], None]) -> int:
        """Events mode: call ``callback(values, statuses)`` for each event."""
        assert self.reader is not None
        rec = self.record
        return self.reader.poll(timeout_s, lambda mv: callback(rec.decode(mv), rec.statuses(mv)))

    def pop_counts(self) -> list[tuple[list, list[str], int]]:
        """Count mode: (values, statuses, count) counted since the last call, each key
        read and deleted atomically; most frequent first."""
        rec = self.record
        out = []
        for key, count in self.out.pop_items():
            raw = bytes(key.raw)
            out.append((rec.decode(raw), rec.statuses(raw), int(count)))
        out.sort(key=lambda r: (-r[2], [str(v) for v in r[0]]))
        return out
