"""The guesser's eBPF side: tracepoint programs that copy whole chunks of kernel
structs into an event channel for user space to search.

Every program is generated here (no compiler) from a :class:`ProbeSpec`:

* it runs only in the guessing thread: ``bpf_get_current_pid_tgid()``'s low half
  must equal ``ctl[0].tid`` (so the host's traffic, other tracers and other
  tests never reach user space), and copies ``ctl[0].step`` into the record so
  user space knows which of its actions caused the event;
* it reserves one fixed-size record in the event channel (the ring buffer, or a perf
  event array where there is none: :func:`channel`): a :class:`RecordHeader`,
  then one *snapshot* per struct pointer argument (:func:`nettracer.bpf.memory.read`
  in 512-byte chunks, so a fault near the end of an object zeroes only that chunk), then
  optionally the *dereferenced* blocks: for each 8-byte slot of a snapshot that
  holds a kernel address (>= ``KERNEL_MIN``) the bytes it points to, with a bit
  per followed slot in ``RecordHeader.followed`` (a block whose bit is clear holds
  stale bytes and must be ignored).

A raw tracepoint's context is the array of its ``TP_PROTO`` arguments as u64; the
number of arguments each tracepoint has is part of the kernel's ABI and listed in
:data:`TRACEPOINTS` with the kernel that introduced it. Without raw tracepoints
(before 4.17, or ``kernel.without: [raw_tracepoint]``) the programs attach to the
classic tracepoints and read each argument from the record at the offset its
``format`` file gives (:class:`nettracer.kernel.tracepoints.TracepointArgs`); a pointer
the record lacks is read through a :class:`Via` slot, or the probe is left out
(:attr:`ProbeSet.lacking`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
from collections.abc import Callable
from dataclasses import dataclass

from nettracer.bpf import link, maps, prog
from nettracer.bpf.channel import (
    ChannelReader,
    EventChannel,
    PerfEventChannel,
    channel_kind,
    event_channel,
)
from nettracer.bpf.counters import lost_inc
from nettracer.bpf.helpers import Helper
from nettracer.bpf.insn import (
    FP,
    R0,
    R1,
    R2,
    R3,
    R6,
    R7,
    R8,
    R9,
    Insn,
    Program,
    add64,
    call,
    exit_,
    ja,
    jeq,
    jge,
    jlt,
    jne,
    ld_imm64,
    ld_map_fd,
    ldx,
    lsh64,
    mov32,
    mov64,
    or64,
    st,
    stx,
)
from nettracer.bpf.memory import KernelReads, read
from nettracer.bpf.syscall import BpfSyscallError
from nettracer.errors import NotSupported
from nettracer.errors import require_root as _require_root
from nettracer.kernel import features as kernel_features
from nettracer.kernel.features import KernelFeatures, kernel_reads
from nettracer.kernel.tracepoints import TracepointArgs

#: lowest value treated as a kernel address worth following (x86-64 and arm64 kernel
#: halves, 4- and 5-level paging); the read helper rejects the rest itself
KERNEL_MIN = 0xFF00_0000_0000_0000
#: bytes per kernel read (one helper call) when taking a snapshot
CHUNK = 512
#: u64 context arguments copied into every record header
MAX_ARGS = 4


@dataclass(frozen=True)
class Tracepoint:
    """A raw tracepoint: its ``TP_PROTO`` argument names (in order) and the kernel that
    added it. Only the leading arguments the guesser reads are listed where later
    kernels appended more (``udp_fail_queue_rcv_skb`` gained ``skb`` in 6.10)."""

    name: str
    args: tuple[str, ...]
    since: str

    def index(self, arg: str) -> int:
        return self.args.index(arg)


TRACEPOINTS: dict[str, Tracepoint] = {
    t.name: t
    for t in (
        # include/trace/events/sock.h
        Tracepoint("inet_sock_set_state", ("sk", "oldstate", "newstate"), "4.16"),
        Tracepoint("sock_rcvqueue_full", ("sk", "skb"), "3.0"),
        Tracepoint("sock_send_length", ("sk", "ret", "flags"), "6.3"),
        Tracepoint("sock_recv_length", ("sk", "ret", "flags"), "6.3"),
        # include/trace/events/tcp.h (tcp_rcv_space_adjust: called after every copy in
        # tcp_recvmsg, MSG_PEEK included)
        Tracepoint("tcp_rcv_space_adjust", ("sk",), "4.20"),
        # include/trace/events/udp.h: (int rc, struct sock *sk[, struct sk_buff *skb])
        Tracepoint("udp_fail_queue_rcv_skb", ("rc", "sk"), "3.9"),
        # include/trace/events/net.h
        Tracepoint("net_dev_start_xmit", ("skb", "dev"), "4.3"),
        Tracepoint("netif_rx", ("skb",), "3.0"),
    )
}


class RecordHeader(ctypes.Structure):
    """The start of every record. ``kind`` says which :class:`ProbeSpec` wrote it,
    ``step`` is ``ctl[0].step`` at the time, ``args`` the tracepoint's first u64
    arguments, ``followed`` a bit per dereferenced slot."""

    _fields_ = (
        ("kind", ctypes.c_uint32),
        ("step", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * MAX_ARGS),
        ("followed", ctypes.c_uint64),
    )


HDR = ctypes.sizeof(RecordHeader)


#: ``Ctl.slot`` entries: offsets user space has found, for :class:`Via` arguments
SLOTS = 2


class Ctl(ctypes.Structure):
    """``ctl[0]``: which thread to record and the action it is doing now; ``slot[i]``
    the offset of :class:`Via` slot ``i`` once user space knows it (0: not yet)."""

    _fields_ = (
        ("tid", ctypes.c_uint32),
        ("step", ctypes.c_uint32),
        ("slot", ctypes.c_uint32 * SLOTS),
    )


@dataclass(frozen=True)
class Snapshot:
    """Copy ``size`` bytes from the struct the tracepoint argument ``arg`` points to."""

    arg: str
    size: int


@dataclass(frozen=True)
class Deref:
    """For each of the first ``slots`` 8-byte slots of snapshot ``snapshot`` (its
    index in ``ProbeSpec.snapshots``) that holds a kernel address, copy ``size``
    bytes from that address."""

    snapshot: int
    slots: int
    size: int


@dataclass(frozen=True)
class Via:
    """A pointer argument the classic tracepoint's record lacks (``net_dev_start_xmit``
    has ``skbaddr`` but no ``dev``), read instead from the struct argument ``of``
    points to, at the offset user space puts in ``ctl[0].slot[slot]`` once a round has
    found it (``sk_buff.dev``); until then the argument is 0 and the snapshots of it
    are not taken. A kernel address or 0, like every argument in the header."""

    name: str
    of: str
    slot: int


@dataclass(frozen=True)
class ProbeSpec:
    """One program: attach to ``tracepoint``, write records of kind ``kind``."""

    kind: int
    tracepoint: str
    snapshots: tuple[Snapshot, ...]
    deref: Deref | None = None
    required: bool = True
    via: tuple[Via, ...] = ()

    @property
    def tp(self) -> Tracepoint:
        return TRACEPOINTS[self.tracepoint]

    @property
    def arg_names(self) -> tuple[str, ...]:
        """The arguments in the record header: the tracepoint's, then the :class:`Via`
        ones it does not have."""
        names = self.tp.args
        return (names + tuple(v.name for v in self.via if v.name not in names))[:MAX_ARGS]

    def derived(self, arg: str) -> bool:
        """Whether ``arg`` is read through a :class:`Via` slot, not given."""
        return any(v.name == arg for v in self.via)

    def snapshot_index(self, arg: str) -> int:
        return next(i for i, snap in enumerate(self.snapshots) if snap.arg == arg)

    def snapshot_offset(self, i: int) -> int:
        return HDR + sum(s.size for s in self.snapshots[:i])

    @property
    def deref_offset(self) -> int:
        return self.snapshot_offset(len(self.snapshots))

    @property
    def record_size(self) -> int:
        extra = self.deref.slots * self.deref.size if self.deref else 0
        return (self.deref_offset + extra + 7) & ~7


#: the largest record a probe may write: the perf event array builds records in a
#: per-CPU array value (at most 32 KiB, ``PCPU_MIN_UNIT_SIZE``), and a perf sample's
#: ``u16`` size would stop a record at 64 KiB anyway
RECORD_MAX = 32 << 10


@functools.cache
def channel(kind: str = "ringbuf") -> EventChannel:
    """The channel the probe programs write to (maps ``events`` and ``lost``, and the
    record slot of a perf event array): ``kind`` as :func:`channel_kind` says."""
    return event_channel("events", "lost", kind, record_max=RECORD_MAX)


@functools.cache
def build(
    spec: ProbeSpec,
    reads: KernelReads | None = None,
    kind: str = "ringbuf",
    args: TracepointArgs | None = None,
) -> tuple[Insn, ...]:
    """The instructions of ``spec``'s program (maps ``ctl``, ``events``, ``lost``)."""
    return tuple(program(spec, reads, kind, args).insns)


def raw_args(spec: ProbeSpec) -> TracepointArgs:
    """The raw tracepoint context of ``spec``'s tracepoint (``TP_PROTO``, Linux 4.17)."""
    return TracepointArgs.raw_args(spec.tracepoint, spec.tp.args)


def program(
    spec: ProbeSpec,
    reads: KernelReads | None = None,
    kind: str = "ringbuf",
    args: TracepointArgs | None = None,
) -> Program:
    """``spec``'s program: R6 the context, R7 the tid then the struct pointer, R8 the
    record, R9 the ``followed`` bits; ``reads`` chooses the read helper
    (:mod:`nettracer.bpf.memory`), ``kind`` the event channel (:func:`channel`),
    ``args`` the context's layout (default :func:`raw_args`; a classic tracepoint's
    record from its format file: :meth:`TracepointArgs.for_kernel`)."""
    if spec.record_size > RECORD_MAX:
        raise ValueError(
            f"{spec.tracepoint}: a {spec.record_size}-byte record exceeds {RECORD_MAX}"
        )
    ch = channel(kind)
    args = args if args is not None else raw_args(spec)
    p = Program(reads=reads)
    p += [
        mov64(R6, R1),
        call(Helper.get_current_pid_tgid),
        mov32(R7, R0),  # tid = low 32 bits, upper half zeroed
        st(4, FP, -4, 0),
        ld_map_fd(R1, "ctl"),
        mov64(R2, FP),
        add64(R2, -4),
        call(Helper.map_lookup_elem),
        jeq(R0, 0, "out"),
        ldx(4, R1, R0, Ctl.tid.offset),
        jne(R1, R7, "out"),
        ldx(4, R1, R0, Ctl.step.offset),
        stx(4, FP, -8, R1),
    ]
    for v in spec.via:
        p += [ldx(4, R1, R0, Ctl.slot.offset + 4 * v.slot), stx(4, FP, _slot_fp(v), R1)]
    _reserve(p, spec, ch)
    p += [
        st(4, R8, RecordHeader.kind.offset, spec.kind),
        ldx(4, R1, FP, -8),
        stx(4, R8, RecordHeader.step.offset, R1),
        stx(4, R8, RecordHeader.tid.offset, R7),
        call(Helper.get_smp_processor_id),
        stx(4, R8, RecordHeader.cpu.offset, R0),
    ]
    names = spec.arg_names
    for i in range(MAX_ARGS):
        off = _arg_off(i)
        if i < len(names) and not spec.derived(names[i]) and args.has(names[i]):
            p += [args.load(R1, R6, names[i]), stx(8, R8, off, R1)]
        else:
            p += st(8, R8, off, 0)
    for v in spec.via:
        _via(p, spec, args, v)
    for i, snap in enumerate(spec.snapshots):
        base = spec.snapshot_offset(i)
        skip = None
        if spec.derived(snap.arg):
            skip = p.new_label("no_" + snap.arg)
            p += [ldx(8, R7, R8, _arg_off(names.index(snap.arg))), jeq(R7, 0, skip)]
        else:
            p += args.load(R7, R6, snap.arg)
        for chunk in range(0, snap.size, CHUNK):
            read(p, R8, base + chunk, min(CHUNK, snap.size - chunk), R7, chunk)
        if skip is not None:
            p.label(skip)
    p += mov64(R9, 0)
    if spec.deref is not None:
        _follow(p, spec, spec.deref)
    p += stx(8, R8, RecordHeader.followed.offset, R9)
    ch.submit(p, R8, ctx=R6, size=spec.record_size, scratch_off=-12)
    if isinstance(ch, PerfEventChannel):
        p += st(4, R8, RecordHeader.kind.offset, 0)  # the slot is free again
    p.label("out")
    p += [mov64(R0, 0), exit_()]
    return p


def _reserve(p: Program, spec: ProbeSpec, ch: EventChannel) -> None:
    """R8 = the record. A perf event array's record is this CPU's one slot: a program
    that interrupted another one's record there (a softirq sending one of our packets
    while our thread is in a probe; raw tracepoints do not stop different programs
    nesting, Linux 5.4 not even one) finds its ``kind`` set and counts its own record
    lost; the slot's ``kind`` is 0 again after each submit."""
    ch.reserve(p, R8, spec.record_size, on_fail="out", scratch_off=-12)
    if isinstance(ch, PerfEventChannel):
        free = p.new_label("free")
        p += [ldx(4, R1, R8, RecordHeader.kind.offset), jeq(R1, 0, free)]
        lost_inc(p, ch.lost, -12)
        p += ja("out")
        p.label(free)


def _arg_off(i: int) -> int:
    return RecordHeader.args.offset + 8 * i


def _slot_fp(v: Via) -> int:
    """The stack slot (below the ctl key, step and channel scratch) of ``ctl.slot``."""
    return -16 - 4 * v.slot


def _via(p: Program, spec: ProbeSpec, args: TracepointArgs, v: Via) -> None:
    """Header argument ``v.name`` = the pointer at ``ctl.slot[v.slot]`` bytes into the
    struct ``v.of`` points to, when that slot is known and the value is a kernel
    address; else it stays 0."""
    off = _arg_off(spec.arg_names.index(v.name))
    done = p.new_label("via")
    p += [ldx(4, R3, FP, _slot_fp(v)), jeq(R3, 0, done)]
    p += [args.load(R1, R6, v.of), add64(R3, R1)]
    read(p, R8, off, 8, R3)
    p += [ldx(8, R1, R8, off), ld_imm64(R2, KERNEL_MIN), jge(R1, R2, done)]
    p += st(8, R8, off, 0)
    p.label(done)


def _follow(p: Program, spec: ProbeSpec, d: Deref) -> None:
    """Copy what each kernel address among the first ``d.slots`` slots of snapshot
    ``d.snapshot`` points to; set bit ``j`` of R9 for each slot ``j`` followed."""
    src = spec.snapshot_offset(d.snapshot)
    p += ld_imm64(R7, KERNEL_MIN)
    for j in range(d.slots):
        skip = p.new_label("skip")
        p += [ldx(8, R3, R8, src + 8 * j), jlt(R3, R7, skip)]
        read(p, R8, spec.deref_offset + d.size * j, d.size, R3)
        p += [mov64(R1, 1), lsh64(R1, j), or64(R9, R1)]
        p.label(skip)
    p += mov64(R0, 0)


@dataclass
class Record:
    """One decoded record: its header and the raw bytes after it."""

    spec: ProbeSpec
    header: RecordHeader
    data: bytes

    @property
    def step(self) -> int:
        return self.header.step

    def arg(self, name: str) -> int:
        return self.header.args[self.spec.arg_names.index(name)]

    def snapshot(self, i: int = 0) -> bytes:
        off = self.spec.snapshot_offset(i)
        return self.data[off : off + self.spec.snapshots[i].size]

    def derefs(self) -> dict[int, bytes]:
        """Slot offset (bytes from the start of the snapshot) -> the bytes it points to,
        for the slots that were followed."""
        cached = self.__dict__.get("_derefs")
        if cached is not None:
            return cached
        d = self.spec.deref
        out: dict[int, bytes] = {}
        self.__dict__["_derefs"] = out
        if d is None:
            return out
        mask = self.header.followed
        for j in range(d.slots):
            if mask >> j & 1:
                off = self.spec.deref_offset + d.size * j
                out[8 * j] = self.data[off : off + d.size]
        return out


class ProbeSet:
    """Programs sharing ``ctl``/``events``/``lost``, added one by one with :meth:`add`;
    ``close()`` detaches everything. ``missing`` names optional tracepoints this kernel
    lacks, ``lacking`` the classic tracepoints whose record lacks a pointer a probe
    needs.

    ``features`` (default :func:`nettracer.kernel.features.current`) chooses, here and
    nowhere else, the event channel (ring buffer, Linux 5.8, else a perf event array)
    and the attachment (raw tracepoints, 4.17, else classic ones)."""

    def __init__(
        self,
        ringbuf_size: int = 4 << 20,
        reads: KernelReads | None = None,
        features: KernelFeatures | None = None,
    ) -> None:
        kf = self.features = features if features is not None else kernel_features.current()
        self.reads = reads if reads is not None else kernel_reads(kf)
        self.kind = channel_kind(kf.use("ringbuf"))
        self.raw = kf.use("raw_tracepoint")
        self._objs: list = []
        self.by_kind: dict[int, ProbeSpec] = {}
        self.missing: list[str] = []
        self.lacking: list[str] = []
        self.reader: ChannelReader | None = None
        self._ctl = Ctl()
        try:
            self.ctl = maps.array(Ctl, 1, "ntg_ctl")
            self._objs.append(self.ctl)
            self.reader = channel(self.kind).open(ringbuf_size, prefix="ntg_")
        except BaseException:
            self.close()
            raise
        self._maps = {"ctl": self.ctl, **self.reader.maps}

    def add(self, spec: ProbeSpec) -> bool:
        """Load ``spec``'s program and attach it; False when its tracepoint does not exist
        and it is optional (:class:`NotSupported` when it is required), or when the
        classic tracepoint's record lacks a pointer ``spec`` takes a snapshot of."""
        try:
            args = raw_args(spec).for_kernel(self.features)
        except link.UnknownTracepoint:
            return self._missing(spec)
        absent = [s.arg for s in spec.snapshots if not (spec.derived(s.arg) or args.has(s.arg))]
        if absent:
            self.lacking.append(f"{spec.tracepoint} (no {', '.join(absent)})")
            return False
        insns = build(spec, self.reads, self.kind, args)
        p = prog.load(
            insns, prog_type=args.prog_type, maps=self._maps, name=f"ntg_{spec.tracepoint}"[:15]
        )
        self._objs.append(p)
        try:
            self._objs.append(args.attach(p))
        except link.UnknownTracepoint:
            p.close()
            return self._missing(spec)
        except BpfSyscallError as exc:
            if exc.errno == errno.EINVAL and exc.cmd == "RAW_TRACEPOINT_OPEN":
                raise NotSupported("raw tracepoints", since="4.17") from None
            raise
        self.by_kind[spec.kind] = spec
        return True

    def _missing(self, spec: ProbeSpec) -> bool:
        if spec.required:
            raise NotSupported(f"tracepoint {spec.tracepoint}", since=spec.tp.since) from None
        self.missing.append(spec.tracepoint)
        return False

    def point(self, slot: int, offset: int) -> None:
        """Tell the programs the offset of :class:`Via` slot ``slot`` (from now on)."""
        self._ctl.slot[slot] = offset
        self.ctl.update(0, self._ctl)

    def arm(self, tid: int, step: int) -> None:
        """Record events of thread ``tid`` from now on, tagged ``step``."""
        self._ctl.tid, self._ctl.step = tid, step
        self.ctl.update(0, self._ctl)

    def disarm(self) -> None:
        self.arm(0, 0)

    @property
    def lost(self) -> int:
        return self.reader.lost if self.reader is not None else 0

    def drain(self, sink: Callable[[Record], None], wait_s: float = 0.0) -> int:
        """Decode every record now in the event channel into ``sink``, first waiting up
        to ``wait_s`` for one when there is none."""

        def one(view: memoryview) -> None:
            hdr = RecordHeader.from_buffer_copy(view[:HDR])
            spec = self.by_kind.get(hdr.kind)
            if spec is not None:
                sink(Record(spec, hdr, bytes(view)))

        assert self.reader is not None
        return self.reader.poll(wait_s, one) if wait_s > 0 else self.reader.consume(one)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        # links first, then programs, then maps
        order = {"link": 0, "perf_event": 1, "program": 2, "map": 3}
        for obj in sorted(self._objs, key=lambda o: order.get(getattr(o, "kind", ""), 9)):
            obj.close()
        self._objs.clear()

    def __enter__(self) -> ProbeSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def require_root() -> None:
    """:class:`PermissionError_` unless we can load programs and create namespaces."""
    _require_root(
        "guessing offsets",
        "eBPF programs, tracepoints and a private network namespace",
        instead="offsets.source btf",
    )
