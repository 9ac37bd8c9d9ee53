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

from nettracer.access.compile import OK, RecordLayout, compile_reads, raw_args
from nettracer.access.path import (
    KNOWN_ARGS,
    AccessError,
    AccessPath,
    resolve_btf,
    resolve_offsets,
    tracepoint_args_btf,
)
from nettracer.access.plan import MAX_SPAN
from nettracer.bpf.channel import event_channel
from nettracer.bpf.counters import count_in_hash, lost_counter
from nettracer.bpf.insn import FP, R0, R1, R6, JmpOp, Program, exit_, jmp32, ldx, mov64

if TYPE_CHECKING:
    from collections.abc import Mapping

    from nettracer.bpf.channel import ChannelReader
    from nettracer.bpf.maps import Map
    from nettracer.bpf.memory import KernelReads
    from nettracer.kernel.btf import Btf
    from nettracer.kernel.tracepoints import TracepointArgs
    from nettracer.layout.offsets import Offsets

#: stack: fp-8 holds the constant 1 for new hash entries, fp-16 the u32 key of ``lost``
_ONE, _SCRATCH = -8, -16


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
        f"the network namespace of; drop read.netns",
        setting="read.netns",
    )


def key_type(record: RecordLayout) -> type[ctypes.Structure]:
    """The ctypes type of a record used as a hash map key."""
    return type(
        "RecordKey", (ctypes.Structure,), {"_fields_": [("raw", ctypes.c_uint8 * record.size)]}
    )


def build_program(
    record: RecordLayout,
    mode: str,
    netns_filter: tuple[RecordLayout, int] | None = None,
    out_map: str = "out",
    lost_map: str = "lost",
    reads: KernelReads | None = None,
    args: TracepointArgs | None = None,
    channel: str = "ringbuf",
) -> Program:
    """The raw tracepoint program: optional netns filter, the reads, then either the
    record to the event channel ``out_map`` (``mode="events"``) or ``out[record] += 1``
    (``mode="count"``). What does not fit (channel full, hash map full) is counted
    in ``lost[0]``. ``reads`` chooses the helper (:mod:`nettracer.bpf.memory`), ``args``
    the context's layout (default: raw tracepoint, :func:`nettracer.access.compile.raw_args`),
    ``channel`` the event channel's kind (:func:`nettracer.bpf.channel.event_channel`)."""
    if mode not in ("events", "count"):
        raise ValueError(f"mode must be 'events' or 'count', not {mode!r}")
    buf = _SCRATCH - record.size
    tmp = buf - (netns_filter[0].size if netns_filter else 0) - MAX_SPAN
    p = Program(reads=reads)
    p += mov64(R6, R1)
    if netns_filter is not None:
        frec, inum = netns_filter
        fbuf = buf - frec.size
        imm = inum - (1 << 32) if inum >= 1 << 31 else inum
        compile_reads(p, frec, fbuf, args=args)
        p += [
            ldx(1, R0, FP, fbuf),
            jmp32(JmpOp.JNE, R0, OK, "out"),
            ldx(4, R0, FP, fbuf + frec.slots[0]),
            jmp32(JmpOp.JNE, R0, imm, "out"),
        ]
    compile_reads(p, record, buf, tmp_off=tmp, args=args)
    if mode == "events":
        event_channel(out_map, lost_map, channel).output(
            p, ctx=R6, buf_off=buf, size=record.size, done="out", scratch_off=_SCRATCH
        )
    else:
        count_in_hash(
            p, out_map, buf, one_off=_ONE, lost=lost_map, scratch_off=_SCRATCH, done="out"
        )
    p.label("out")
    p += [mov64(R0, 0), exit_()]
    return p


class Reader:
    """Attach a program reading ``paths`` on each hit of raw tracepoint ``tracepoint``.

    ``mode`` is ``"events"`` (:meth:`poll`) or ``"count"`` (:meth:`pop_counts`);
    ``netns`` (an inode) keeps only hits whose ``netns_path`` value equals it.
    Built by :meth:`from_config` (the contract of :mod:`nettracer.tracers`); use as a
    context manager or call :meth:`start` and :meth:`close`.
    """

    #: where the offsets came from: ``btf`` (expressions resolved with BTF's types) or
    #: an ``Offsets`` source (the field catalogue's expressions only)
    source = "btf"
    notices: list[str] = []  # noqa: RUF012  # never appended to

    def __init__(
        self,
        tracepoint: str,
        paths: Sequence[AccessPath],
        mode: str = "events",
        netns: tuple[AccessPath, int] | None = None,
        max_entries: int = 10240,
        ringbuf_size: int = 1 << 20,
        reads: KernelReads | None = None,
    ) -> None:
        self.tracepoint = tracepoint
        #: which helper reads kernel memory (:mod:`nettracer.bpf.memory`)
        self.reads = reads
        self.paths = list(paths)
        self.record = RecordLayout.of(paths)
        self.mode = mode
        self.netns = netns
        self._sizes = (max_entries, ringbuf_size)
        self._objs: list = []
        self.reader: ChannelReader | None = None

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, object],
        tracepoint: str,
        exprs: Sequence[str],
        *,
        mode: str = "events",
        netns: int | None = None,
        reads: KernelReads | None = None,
        **sizes: int,
    ) -> Reader:
        """The reader (not started) of ``exprs`` on raw tracepoint ``tracepoint``, resolved
        with BTF when ``offsets.source`` means BTF on this kernel, else with the field
        catalogue and the offsets of the ``offsets.*`` settings; ``netns`` (an inode) keeps
        only hits in that namespace (errors name it ``read.netns``); ``reads`` chooses the
        helper that reads kernel memory, ``sizes`` are :meth:`__init__`'s."""
        from nettracer.layout import source

        btf = offsets = None
        if source.uses_btf(str(cfg["offsets.source"])):
            from nettracer.kernel.btf import Btf

            btf = Btf.vmlinux()
        else:
            offsets = source.from_config(cfg)
        paths = resolve_exprs(exprs, tracepoint, btf=btf, offsets=offsets)
        flt = None
        if netns is not None:
            expr = netns_expr(tracepoint, btf)
            flt = (resolve_exprs([expr], tracepoint, btf=btf, offsets=offsets)[0], netns)
        reader = cls(tracepoint, paths, mode, flt, reads=reads, **sizes)
        if offsets is not None:
            reader.source = offsets.source
        return reader

    def start(self) -> Reader:
        """Create the maps, load the program and attach it."""
        from nettracer.bpf import prog
        from nettracer.bpf.channel import channel_kind
        from nettracer.bpf.maps import hash_map
        from nettracer.kernel import features
        from nettracer.kernel.features import kernel_reads

        max_entries, ringbuf_size = self._sizes
        try:
            self.lost_map: Map = lost_counter("lost")
            self._objs.append(self.lost_map)
            kind = channel_kind(features.current().use("ringbuf"))
            if self.mode == "events":
                self.reader = event_channel("out", "lost", kind).open(ringbuf_size, self.lost_map)
                maps = self.reader.maps
            else:
                self.out = hash_map(key_type(self.record), ctypes.c_uint64, max_entries, "out")
                self._objs.append(self.out)
                maps = {"out": self.out, "lost": self.lost_map}
            flt = (RecordLayout.of([self.netns[0]]), self.netns[1]) if self.netns else None
            paths = self.paths + ([self.netns[0]] if self.netns else [])
            args = raw_args(self.tracepoint, paths).for_kernel()
            reads = self.reads if self.reads is not None else kernel_reads()
            insns = build_program(
                self.record, self.mode, flt, reads=reads, args=args, channel=kind
            ).insns
            self.prog = prog.load(insns, prog_type=args.prog_type, maps=maps, name="nt_read")
            self._objs.append(self.prog)
            self.link = args.attach(self.prog)
            self._objs.append(self.link)
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> Reader:
        return self.start()

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
