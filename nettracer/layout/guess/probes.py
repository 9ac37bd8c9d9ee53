"""The guesser's eBPF side: raw-tracepoint programs that copy whole chunks of kernel
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
  stale ring-buffer bytes and must be ignored).

A raw tracepoint's context is the array of its ``TP_PROTO`` arguments as u64; the
number of arguments each tracepoint has is part of the kernel's ABI and listed in
:data:`TRACEPOINTS` with the kernel that introduced it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
from collections.abc import Callable
from dataclasses import dataclass

from nettracer.bpf import link, maps, prog
from nettracer.bpf.channel import ChannelReader, EventChannel, channel_kind, event_channel
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
    jeq,
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


class Ctl(ctypes.Structure):
    """``ctl[0]``: which thread to record and the action it is doing now."""

    _fields_ = (("tid", ctypes.c_uint32), ("step", ctypes.c_uint32))


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
class ProbeSpec:
    """One program: attach to ``tracepoint``, write records of kind ``kind``."""

    kind: int
    tracepoint: str
    snapshots: tuple[Snapshot, ...]
    deref: Deref | None = None
    required: bool = True

    @property
    def tp(self) -> Tracepoint:
        return TRACEPOINTS[self.tracepoint]

    @property
    def nargs(self) -> int:
        return min(MAX_ARGS, len(self.tp.args))

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
    spec: ProbeSpec, reads: KernelReads | None = None, kind: str = "ringbuf"
) -> tuple[Insn, ...]:
    """The instructions of ``spec``'s program (maps ``ctl``, ``events``, ``lost``)."""
    return tuple(program(spec, reads, kind).insns)


def program(spec: ProbeSpec, reads: KernelReads | None = None, kind: str = "ringbuf") -> Program:
    """``spec``'s program: R6 the context, R7 the tid then the struct pointer, R8 the
    record, R9 the ``followed`` bits; ``reads`` chooses the read helper
    (:mod:`nettracer.bpf.memory`), ``kind`` the event channel (:func:`channel`)."""
    if spec.record_size > RECORD_MAX:
        raise ValueError(
            f"{spec.tracepoint}: a {spec.record_size}-byte record exceeds {RECORD_MAX}"
        )
    ch = channel(kind)
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
    ch.reserve(p, R8, spec.record_size, on_fail="out", scratch_off=-12)
    p += [
        st(4, R8, RecordHeader.kind.offset, spec.kind),
        ldx(4, R1, FP, -8),
        stx(4, R8, RecordHeader.step.offset, R1),
        stx(4, R8, RecordHeader.tid.offset, R7),
        call(Helper.get_smp_processor_id),
        stx(4, R8, RecordHeader.cpu.offset, R0),
    ]
    for i in range(MAX_ARGS):
        off = RecordHeader.args.offset + 8 * i
        if i < spec.nargs:
            p += [ldx(8, R1, R6, 8 * i), stx(8, R8, off, R1)]
        else:
            p += st(8, R8, off, 0)
    for i, snap in enumerate(spec.snapshots):
        base = spec.snapshot_offset(i)
        p += ldx(8, R7, R6, 8 * spec.tp.index(snap.arg))
        for chunk in range(0, snap.size, CHUNK):
            read(p, R8, base + chunk, min(CHUNK, snap.size - chunk), R7, chunk)
    p += mov64(R9, 0)
    if spec.deref is not None:
        _follow(p, spec, spec.deref)
    p += stx(8, R8, RecordHeader.followed.offset, R9)
    ch.submit(p, R8, ctx=R6, size=spec.record_size, scratch_off=-12)
    p.label("out")
    p += [mov64(R0, 0), exit_()]
    return p


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
        return self.header.args[self.spec.tp.index(name)]

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
    lacks."""

    def __init__(
        self,
        ringbuf_size: int = 4 << 20,
        reads: KernelReads | None = None,
        features: KernelFeatures | None = None,
    ) -> None:
        kf = features if features is not None else kernel_features.current()
        self.reads = reads if reads is not None else kernel_reads(kf)
        #: the event channel's kind: the one place it is chosen (ring buffer, 5.8)
        self.kind = channel_kind(kf.use("ringbuf"))
        self._objs: list = []
        self.by_kind: dict[int, ProbeSpec] = {}
        self.missing: list[str] = []
        self.reader: ChannelReader | None = None
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
        and it is optional (:class:`NotSupported` when it is required)."""
        insns = build(spec, self.reads, self.kind)
        p = prog.load(insns, maps=self._maps, name=f"ntg_{spec.tracepoint}"[:15])
        self._objs.append(p)
        try:
            self._objs.append(link.attach_raw_tracepoint(p, spec.tracepoint))
        except link.UnknownTracepoint:
            if spec.required:
                raise NotSupported(
                    f"raw tracepoint {spec.tracepoint}", since=spec.tp.since
                ) from None
            self.missing.append(spec.tracepoint)
            p.close()
            return False
        except BpfSyscallError as exc:
            if exc.errno == errno.EINVAL and exc.cmd == "RAW_TRACEPOINT_OPEN":
                raise NotSupported("raw tracepoints", since="4.17") from None
            raise
        self.by_kind[spec.kind] = spec
        return True

    def arm(self, tid: int, step: int) -> None:
        """Record events of thread ``tid`` from now on, tagged ``step``."""
        self.ctl.update(0, Ctl(tid, step))

    def disarm(self) -> None:
        self.ctl.update(0, Ctl(0, 0))

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
        "eBPF programs, raw tracepoints and a private network namespace",
        instead="offsets.source btf",
    )
