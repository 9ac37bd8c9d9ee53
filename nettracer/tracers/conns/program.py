"""Program builder for the connection tracer: raw tracepoint programs, no kprobes.

The programs share one LRU hash ``conns`` (``struct sock *`` -> :class:`ConnValue`):

``state``   ``sock:inet_sock_set_state (const struct sock *sk, int oldstate, int newstate)``
            creates TCP entries (CLOSE->SYN_SENT is a connect(), LISTEN->SYN_RECV an
            accepted child, anything else an already-open connection) and records every
            transition; the tuple is read when the entry is created and again on
            ESTABLISHED (a connecting socket gets its port after entering SYN_SENT).
``send``/``recv``  ``sock:sock_send_length`` / ``sock_recv_length`` ``(struct sock *sk,
            int ret, int flags)`` (Linux 6.3): exact application byte counts for TCP and
            UDP, and the owning process (they run in the caller's context).  They create
            UDP entries, and TCP entries for connections open before the tracer started.
``owner``   without those (Linux 6.1): ``tcp:tcp_rcv_space_adjust (struct sock *sk)``,
            which ``tcp_recvmsg`` calls in the reader's context, names the owner of an
            accepted connection; bytes then come from ``tcp_sock``.
``destroy`` ``tcp:tcp_destroy_sock (struct sock *sk)``: final ``tcp_sock`` stats, the
            record goes to the event channel (or, when it refuses it, to the
            ``ended`` hash), the entry is deleted.
``refresh`` not attached: run with ``BPF_PROG_TEST_RUN`` (args ``[sk]``) once per open
            TCP entry per interval to copy the current ``tcp_sock`` stats (RTT, segments,
            retransmits, bytes acked/received) into the entry.  Nothing runs per packet.

Every struct field comes from an :class:`~nettracer.layout.offsets.Offsets`; fields that
lie close together are read with one helper call
(:func:`nettracer.access.plan.plan_reads`).
Entry ids come from one counter (``ids[0]``, atomic fetch-and-add) so that user space
can account for every entry the LRU map evicted (:mod:`nettracer.tracers.conns.table`);
before Linux 5.12 (no ``BPF_FETCH``; ``ConnSpec.atomic_fetch`` false) from per-CPU
counters, one per nesting level (:meth:`_Builder.next_id`).

Closed connections go to the event channel of ``ConnSpec.channel``
(:func:`channel_for`): the ring buffer (Linux 5.8), or before it a perf event array,
whose ``bpf_perf_event_output`` needs the program's context: the programs that send
keep it at FP+:data:`CTX` (a spilled ``ctx`` stays the context pointer for the
verifier; for a classic tracepoint it is the tracepoint's record) and their buffers
start below it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field, replace

from nettracer.access.plan import ReadPlan, emit_plan, plan_reads
from nettracer.bpf import memory
from nettracer.bpf.channel import EventChannel, PerfEventChannel, event_channel
from nettracer.bpf.counters import create_entry, lookup, lost_inc, update_elem
from nettracer.bpf.helpers import Helper
from nettracer.bpf.insn import (
    FP,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R7,
    R8,
    R9,
    Insn,
    JmpOp,
    Program,
    Reg,
    add64,
    and64,
    atomic_add,
    atomic_fetch_add,
    call,
    exit_,
    ja,
    jeq,
    jge,
    jmp,
    jmp32,
    jne,
    ld_map_fd,
    ldx,
    lsh64,
    mov32,
    mov64,
    or64,
    rsh64,
    st,
    stx,
)
from nettracer.bpf.memory import KernelReads, read
from nettracer.bpf.syscall import BPF_NOEXIST
from nettracer.kernel.tracepoints import TracepointArgs
from nettracer.layout.offsets import Offsets
from nettracer.tracers.conns.records import (
    AF_INET,
    AF_INET6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    MSG_PEEK,
    STREAM_BITS,
    ConnValue,
    EndReason,
    Flag,
    Opened,
    TcpState,
    off,
    size,
)

#: the tracer's maps, by the names the programs use
MAP_CONNS = "conns"
MAP_EVENTS = "events"
MAP_LOST = "lost"
MAP_IDS = "ids"
MAP_ENDED = "ended"
#: the perf event array channel's count of refused outputs (every failed attempt)
MAP_REFUSED = "refused"
#: entries of the ``ended`` overflow hash (records the ring buffer refused)
ENDED_ENTRIES = 4096

VALUE_SIZE = ctypes.sizeof(ConnValue)

#: sock_common fields that make the tuple; v6 ones only when IPv6 is collected
TUPLE_V4 = (
    "sock_common.skc_family",
    "sock_common.skc_daddr",
    "sock_common.skc_rcv_saddr",
    "sock_common.skc_dport",
    "sock_common.skc_num",
    "sock_common.skc_state",
    "sock_common.skc_net",
)
TUPLE_V6 = ("sock_common.skc_v6_daddr", "sock_common.skc_v6_rcv_saddr")
#: the fields the UDP reuse check compares on every datagram
REUSE_KEYS = ("sock_common.skc_daddr", "sock_common.skc_dport", "sock_common.skc_num")

#: ``struct tcp_sock`` field -> ConnValue field it is copied to
TCP_STATS: dict[str, str] = {
    "tcp_sock.srtt_us": "srtt_us",
    "tcp_sock.mdev_us": "mdev_us",
    "tcp_sock.bytes_received": "tcp_bytes_received",
    "tcp_sock.bytes_acked": "tcp_bytes_acked",
    "tcp_sock.total_retrans": "total_retrans",
    "tcp_sock.segs_in": "segs_in",
    "tcp_sock.segs_out": "segs_out",
}

#: every catalogue field the tracer reads (for Offsets checks and guessing)
NEEDED_FIELDS: tuple[str, ...] = (
    *TUPLE_V4,
    "net.ns.inum",
    "sock.sk_protocol",
    *TCP_STATS,
)
IPV6_FIELDS: tuple[str, ...] = TUPLE_V6


#: nesting levels a CPU can run the programs at (task, softirq, hardirq, NMI)
NEST_LEVELS = 4


class StreamIds(ctypes.Structure):
    """The per-CPU value of ``ids`` without ``BPF_FETCH``: the nesting level being
    handed an id, and one counter per level."""

    _fields_ = (("nest", ctypes.c_uint64), ("count", ctypes.c_uint64 * NEST_LEVELS))


@dataclass(frozen=True)
class ConnSpec:
    """What the programs collect; baked into the instructions as constants."""

    collect_tcp: bool = True
    collect_udp: bool = True
    collect_ipv6: bool = True
    #: only create entries for sockets in this network namespace (inode), 0 = all
    netns: int = 0
    #: which helper reads kernel memory (:mod:`nettracer.bpf.memory`; None: the 5.5 one)
    reads: KernelReads | None = None
    #: ids from one fetch-and-add counter (5.12), else from per-CPU, per-level ones
    atomic_fetch: bool = True
    #: the event channel's kind (:func:`nettracer.bpf.channel.channel_kind`): the ring
    #: buffer, or a perf event array before Linux 5.8
    channel: str = "ringbuf"


def channel_for(opts: ConnSpec) -> EventChannel:
    """Where closed connections go: ``events``, of kind ``opts.channel``. ``lost``
    (:data:`MAP_LOST`) counts the records that fit nowhere (channel and ``ended`` hash
    full); a perf event array's own lost counter is :data:`MAP_REFUSED`, every output
    it refused (the ``ended`` hash may still take the record), so that the records its
    kernel reports lost (``PERF_RECORD_LOST``) beyond those are the ones the program
    never heard of (before Linux 5.4 ``bpf_perf_event_output`` returned 0 on a full
    buffer). Records are copied from the map value: the channel's record slot (unused)
    is kept to one record's size."""
    if opts.channel == PerfEventChannel.kind:
        return event_channel(MAP_EVENTS, MAP_REFUSED, opts.channel, record_max=VALUE_SIZE)
    return event_channel(MAP_EVENTS, MAP_LOST, opts.channel)


def jsle32(dst: Reg, imm: int, target: str) -> Insn:
    return jmp32(JmpOp.JSLE, dst, imm, target)


def jset(dst: Reg, imm: int, target: str) -> Insn:
    return jmp(JmpOp.JSET, dst, imm, target)


# stack layout shared by all programs (offsets from FP)
KEY = -8  #: u64 key: the struct sock pointer
TMP = -16  #: u64 scratch (old state)
TMP2 = -24  #: u32/u64 scratch (array index, netns inode, id)
#: ``ctx`` kept by programs that send through a perf event array (buffers start below)
CTX = -32
#: stack bytes below the slots for tcp_sock reads in programs without a tuple buffer
STATS_BUF = 480


#: the tracepoints the programs run on, with the kernel that introduced them
TP_STATE: tuple[str, str | None] = ("inet_sock_set_state", "4.16")
TP_DESTROY: tuple[str, str | None] = ("tcp_destroy_sock", None)
TP_SEND = ("sock_send_length", "6.3")
TP_RECV = ("sock_recv_length", "6.3")
TP_OWNER: tuple[str, str | None] = ("tcp_rcv_space_adjust", None)

#: ``TP_PROTO`` argument names of each (include/trace/events/sock.h and tcp.h)
TP_ARGS: dict[str, tuple[str, ...]] = {
    TP_STATE[0]: ("sk", "oldstate", "newstate"),
    TP_DESTROY[0]: ("sk",),
    TP_SEND[0]: ("sk", "ret", "flags"),
    TP_RECV[0]: ("sk", "ret", "flags"),
    TP_OWNER[0]: ("sk",),
}


def tracepoint_args(tp: tuple[str, str | None]) -> TracepointArgs:
    """The raw tracepoint layout of tracepoint ``tp`` (one of the ``TP_*``);
    :meth:`~TracepointArgs.for_kernel` gives the one this kernel is to use."""
    return TracepointArgs.raw_args(tp[0], TP_ARGS[tp[0]])


@dataclass
class _Builder:
    """Snippet emitters over one :class:`Program`; all snippets clobber R0-R5. ``args``
    reads the tracepoint's arguments from the context (R1 at entry)."""

    offsets: Offsets
    opts: ConnSpec
    name: str
    args: TracepointArgs
    #: the program sends closed connections (``refresh`` and ``owner`` do not)
    sends: bool = True
    p: Program = field(default_factory=Program)

    def __post_init__(self) -> None:
        self.p.reads = self.opts.reads
        self.channel = channel_for(self.opts)

    @property
    def keeps_ctx(self) -> bool:
        """Whether the program keeps ``ctx`` at FP+CTX (its channel needs it)."""
        return self.sends and self.channel.kind == PerfEventChannel.kind

    @property
    def base(self) -> int:
        """Where the program's buffers start (they grow down from here)."""
        return CTX if self.keeps_ctx else TMP2

    def keep_ctx(self) -> None:
        """At entry (R1 = ctx): ``*(u64 *)(fp + CTX) = ctx`` when it is needed."""
        if self.keeps_ctx:
            self.p += stx(8, FP, CTX, R1)

    def copy(self, dst: Reg, dst_off: int, src: Reg, src_off: int, n: int) -> None:
        """:func:`nettracer.bpf.memory.copy` into this program (via R1)."""
        memory.copy(self.p, dst, dst_off, src, src_off, n)

    def now(self, value: Reg, field_name: str) -> None:
        self.p += [call(Helper.ktime_get_ns), stx(8, value, off(field_name), R0)]

    def pid_comm(self, value: Reg) -> None:
        """``value->pid = tgid``; ``value->comm = current->comm``; sets PID_KNOWN."""
        self.p += [
            call(Helper.get_current_pid_tgid),
            rsh64(R0, 32),
            stx(4, value, off("pid"), R0),
            mov64(R1, value),
            add64(R1, off("comm")),
            mov64(R2, 16),
            call(Helper.get_current_comm),
            ldx(1, R1, value, off("flags")),
            or64(R1, Flag.PID_KNOWN),
            stx(1, value, off("flags"), R1),
        ]

    def next_id(self, value: Reg, fail: str) -> None:
        """``value->id = atomic_fetch_add(&ids[0], 1)``, or without ``BPF_FETCH`` (before
        5.12) :meth:`next_stream_id`."""
        if not self.opts.atomic_fetch:
            self.next_stream_id(value, fail)
            return
        self.p += st(4, FP, TMP2, 0)
        lookup(self.p, MAP_IDS, TMP2)
        self.p += [
            jeq(R0, 0, fail),
            mov64(R1, 1),
            atomic_fetch_add(8, R0, 0, R1),
            stx(8, value, off("id"), R1),
        ]

    def next_stream_id(self, value: Reg, fail: str) -> None:
        """``value->id = seq << STREAM_BITS | cpu << 2 | level`` from ``ids``, a per-CPU
        :class:`StreamIds`: ``level = nest; nest = level + 1; seq = count[level]++;
        nest = level``. No atomics: the programs run with preemption off (the tracepoint
        disables it), so on one CPU a program only ever interrupts another and finishes
        before it resumes (last in, first out). One interrupting before ``nest`` is
        raised uses ``count[level]`` and is done before this one does; one interrupting
        after it uses ``count[level + 1]``. Deeper than :data:`NEST_LEVELS`: ``fail``."""
        p = self.p
        p += call(Helper.get_smp_processor_id)
        p += [lsh64(R0, 2), stx(8, value, off("id"), R0), st(4, FP, TMP2, 0)]
        lookup(p, MAP_IDS, TMP2)
        p += [
            jeq(R0, 0, fail),
            ldx(8, R1, R0, StreamIds.nest.offset),
            jge(R1, NEST_LEVELS, fail),
            mov64(R2, R1),
            add64(R2, 1),
            stx(8, R0, StreamIds.nest.offset, R2),
            mov64(R2, R1),
            lsh64(R2, 3),
            add64(R2, R0),
            ldx(8, R3, R2, StreamIds.count.offset),
            mov64(R4, R3),
            add64(R4, 1),
            stx(8, R2, StreamIds.count.offset, R4),
            stx(8, R0, StreamIds.nest.offset, R1),
            lsh64(R3, STREAM_BITS),
            or64(R3, R1),
            ldx(8, R1, value, off("id")),
            or64(R3, R1),
            stx(8, value, off("id"), R3),
        ]

    def netns(self, buf: int, plan: ReadPlan, dst: Reg, fail: str) -> None:
        """``dst = sk->__sk_common.skc_net.net->ns.inum`` (from the tuple buffer); jumps
        to ``fail`` when a netns filter is set and does not match."""
        net = self.offsets.offset("net.ns.inum")
        self.p += [ldx(8, R3, FP, buf + plan.where["sock_common.skc_net"]), st(4, FP, TMP2, 0)]
        read(self.p, FP, TMP2, 4, R3, net)
        self.p += ldx(4, dst, FP, TMP2)
        if self.opts.netns:
            # a 32-bit compare: a 64-bit one would sign-extend the immediate (inodes of
            # namespaces are above 2**31)
            self.p += jmp32(JmpOp.JNE, dst, self.opts.netns, fail)

    def zero(self, base: int, n: int) -> None:
        self.p += [st(8, FP, base + i, 0) for i in range(0, n, 8)]

    def tuple_to_value(self, value: Reg, buf: int, plan: ReadPlan) -> None:
        """Copy addresses and ports from the tuple buffer into ``value``.

        The local side is copied only while ``skc_num`` is set: a connecting socket
        enters SYN_SENT before ``inet_hash_connect`` picks its port, and
        ``tcp_set_state(TCP_CLOSE)`` releases the port (``inet_put_port`` zeroes
        ``inet_num``) before ``inet_sk_state_store`` fires the tracepoint.
        """
        w = plan.where
        done = self.p.new_label("local_done")
        self.copy(value, off("daddr4"), FP, buf + w["sock_common.skc_daddr"], 4)
        self.copy(value, off("dport"), FP, buf + w["sock_common.skc_dport"], 2)
        v6 = "sock_common.skc_v6_daddr" in w
        if v6:
            self.copy(value, off("daddr6"), FP, buf + w["sock_common.skc_v6_daddr"], 16)
        self.p += [ldx(2, R1, FP, buf + w["sock_common.skc_num"]), jeq(R1, 0, done)]
        self.p += stx(2, value, off("sport"), R1)
        self.copy(value, off("saddr4"), FP, buf + w["sock_common.skc_rcv_saddr"], 4)
        if v6:
            self.copy(value, off("saddr6"), FP, buf + w["sock_common.skc_v6_rcv_saddr"], 16)
        self.p.label(done)
        self.p += mov64(R0, 0)

    def snapshot_tcp(self, value: Reg, sk: Reg, buf_bytes: int = 0) -> None:
        """Copy the ``struct tcp_sock`` stats of ``sk`` into ``value``: through a stack
        buffer of up to ``buf_bytes`` below :attr:`base` with few reads when the fields lie close
        enough together to fit, else one read per field."""
        plan = plan_reads(self.offsets, TCP_STATS, max_span=384)
        if plan.size > buf_bytes or len(plan.reads) >= len(TCP_STATS):
            for key, name in TCP_STATS.items():
                f = self.offsets[key]
                read(self.p, value, off(name), min(f.size, size(name)), sk, f.offset)
            return
        buf = self.base - plan.size
        emit_plan(self.p, plan, buf, sk)
        for key, name in TCP_STATS.items():
            n = min(self.offsets[key].size, size(name))
            self.copy(value, off(name), FP, buf + plan.where[key], n)

    def emit_closed(
        self, value: Reg, reason: EndReason, attempts: int = 3, at_last: bool = False
    ) -> None:
        """:meth:`stamp_end` then :meth:`send_closed`."""
        self.stamp_end(value, reason, at_last)
        self.send_closed(value, attempts)

    def stamp_end(self, value: Reg, reason: EndReason, at_last: bool = False) -> None:
        """``value->end_reason = reason``; ``value->end_ns`` = now, or with ``at_last``
        the time it was last active (``last_ns``)."""
        self.p += st(1, value, off("end_reason"), int(reason))
        if at_last:
            self.p += [ldx(8, R1, value, off("last_ns")), stx(8, value, off("end_ns"), R1)]
        else:
            self.now(value, "end_ns")

    def send_closed(self, value: Reg, attempts: int = 3) -> None:
        """Send ``*value`` (a map value, stamped) to the event channel, and delete it.

        ``bpf_ringbuf_output`` fails (-EAGAIN) when the ring is full and, since Linux
        6.15 made the ring's lock a resilient spinlock, now and then under contention
        too.  It is tried ``attempts`` times; then the record goes to the ``ended`` hash
        (keyed by id, drained by user space every interval); only when that is full as
        well is it counted lost.  The reader polls on a timer: no wakeups.  Through a
        perf event array (``bpf_perf_event_output``: -ENOSPC on a full buffer since
        Linux 5.4, -EBUSY nested too deep) the same, with ``ctx`` reloaded from FP+CTX
        for each attempt and each refusal counted in :data:`MAP_REFUSED`.
        """
        ok = self.p.new_label("emitted")
        assert self.sends, f"{self.name} was built as a program that sends nothing"
        perf = self.keeps_ctx
        for _ in range(attempts):
            if perf:
                self.p += ldx(8, R1, FP, CTX)
            self.channel.try_output(
                self.p, ctx=R1 if perf else None, src=value, size=VALUE_SIZE, ok=ok, wakeup=False
            )
            if perf:
                lost_inc(self.p, self.channel.lost, TMP2)
        self.p += [ldx(8, R1, value, off("id")), stx(8, FP, TMP2, R1)]
        update_elem(self.p, MAP_ENDED, TMP2, value)
        self.p += jeq(R0, 0, ok)
        lost_inc(self.p, MAP_LOST, TMP2)
        self.p.label(ok)
        self.p += [ld_map_fd(R1, MAP_CONNS), mov64(R2, FP), add64(R2, KEY)]
        self.p += call(Helper.map_delete_elem)

    def family_ok(self, fam: Reg, ok: str, fail: str) -> None:
        self.p += jeq(fam, AF_INET, ok)
        if self.opts.collect_ipv6:
            self.p += jeq(fam, AF_INET6, ok)
        self.p += ja(fail)

    def out(self) -> None:
        self.p.label("out")
        self.p += [mov64(R0, 0), exit_()]


def tuple_plan(offsets: Offsets, opts: ConnSpec) -> ReadPlan:
    keys = [*TUPLE_V4, "sock.sk_protocol"]
    if opts.collect_ipv6:
        keys += TUPLE_V6
    return plan_reads(offsets, keys)


def _layout(plan: ReadPlan, base: int) -> tuple[int, int]:
    """(buffer offset, value offset) from FP for a program with a tuple buffer below
    ``base`` (:attr:`_Builder.base`)."""
    buf = base - plan.size
    buf -= buf % 8 if buf % 8 else 0
    val = buf - VALUE_SIZE
    if val < -512:
        raise ValueError(f"stack too small for a {plan.size}-byte tuple buffer")
    return buf, val


def build_state(offsets: Offsets, opts: ConnSpec, args: TracepointArgs | None = None) -> Program:
    """The ``inet_sock_set_state`` program (see the module docstring); ``args`` its
    context's layout (default: raw tracepoint, :func:`tracepoint_args`)."""
    args = args or tracepoint_args(TP_STATE)
    b = _Builder(offsets, opts, "state", args)
    p = b.p
    plan = tuple_plan(offsets, opts)
    buf, val = _layout(plan, b.base)
    b.keep_ctx()
    p += [
        mov64(R6, R1),
        args.load(R9, R6, "newstate"),
        args.load(R1, R6, "oldstate"),
        stx(8, FP, TMP, R1),
        args.load(R6, R6, "sk"),
        stx(8, FP, KEY, R6),
        jeq(R9, TcpState.LISTEN, "out"),
        jne(R1, TcpState.LISTEN, "not_listener"),
        jne(R9, TcpState.SYN_RECV, "out"),  # a listener closing
    ]
    p.label("not_listener")
    lookup(b.p, MAP_CONNS, KEY)
    p += [jeq(R0, 0, "new"), mov64(R7, R0)]
    _state_known(b, buf, plan)
    p.label("new")
    _state_new(b, buf, val, plan)
    update_elem(p, MAP_CONNS, KEY, R7, flags=BPF_NOEXIST)  # lost a race: theirs stays
    b.out()
    return p


def _state_known(b: _Builder, buf: int, plan: ReadPlan) -> None:
    """R7 = a tracked socket's entry: a CLOSE -> SYN_SENT on it is connect() again on
    the same socket (the old connection ends as reused, jump to ``new``); else record
    the transition.  The tuple is re-read only when the socket becomes ESTABLISHED (a
    connecting socket gets its port after entering SYN_SENT); nothing else changes it."""
    p = b.p
    p += [ldx(8, R1, FP, TMP), jne(R1, TcpState.CLOSE, "known")]
    p += jne(R9, TcpState.SYN_SENT, "known")
    b.snapshot_tcp(R7, R6)
    b.emit_closed(R7, EndReason.REUSED)
    p += ja("new")
    p.label("known")
    p += jne(R9, TcpState.ESTABLISHED, "known_no_tuple")
    emit_plan(b.p, plan, buf, R6)
    _apply_transition(b, buf, plan)
    p += ja("out")
    p.label("known_no_tuple")
    _apply_transition(b, buf, None)
    p += ja("out")


def _state_new(b: _Builder, buf: int, val: int, plan: ReadPlan) -> None:
    """An untracked TCP socket changing state: build its entry at FP+``val`` (R7) with
    how it was opened (CLOSE -> SYN_SENT active, SYN_RECV passive, else partial)."""
    p = b.p
    w = plan.where
    emit_plan(b.p, plan, buf, R6)
    p += [ldx(2, R1, FP, buf + w["sock.sk_protocol"]), jne(R1, IPPROTO_TCP, "out")]
    p += ldx(2, R1, FP, buf + w["sock_common.skc_family"])
    b.family_ok(R1, "create", "out")
    p.label("create")
    p += jeq(R9, TcpState.CLOSE, "out")
    b.netns(buf, plan, R8, "out")
    p += [mov64(R7, FP), add64(R7, val)]
    b.zero(val, VALUE_SIZE)
    p += stx(4, R7, off("netns"), R8)
    b.next_id(R7, "out")
    p += stx(8, R7, off("sk"), R6)
    b.now(R7, "start_ns")
    p += [
        ldx(2, R1, FP, buf + w["sock_common.skc_family"]),
        stx(2, R7, off("family"), R1),
        st(1, R7, off("proto"), IPPROTO_TCP),
        ldx(8, R1, FP, TMP),
        jne(R1, TcpState.CLOSE, "not_active"),
        jne(R9, TcpState.SYN_SENT, "not_active"),
        st(1, R7, off("opened"), Opened.ACTIVE),
    ]
    b.pid_comm(R7)
    p += ja("apply_new")
    p.label("not_active")
    p += [jne(R9, TcpState.SYN_RECV, "not_passive"), st(1, R7, off("opened"), Opened.PASSIVE)]
    p += ja("apply_new")
    p.label("not_passive")
    p += st(1, R7, off("flags"), Flag.PARTIAL)
    p.label("apply_new")
    _apply_transition(b, buf, plan)


def _apply_transition(b: _Builder, buf: int, plan: ReadPlan | None) -> None:
    """R7 = value (stack or map), R9 = new state, FP+TMP = old state: record the
    transition, the time and (with ``plan``) the tuple from the buffer; take the owner
    from a close()/shutdown() in process context when it is not known yet."""
    p = b.p
    skip = b.p.new_label("pid_done")
    take = b.p.new_label("pid_take")
    cw = b.p.new_label("pid_close_wait")
    p += [
        stx(1, R7, off("state"), R9),
        ldx(8, R1, R7, off("history")),
        lsh64(R1, 4),
        mov64(R2, R9),
        and64(R2, 0xF),
        or64(R1, R2),
        stx(8, R7, off("history"), R1),
    ]
    b.now(R7, "last_ns")
    if plan is not None:
        b.tuple_to_value(R7, buf, plan)
    p += [
        ldx(1, R1, R7, off("flags")),
        jset(R1, Flag.PID_KNOWN, skip),
        ldx(8, R1, FP, TMP),
        jne(R1, TcpState.ESTABLISHED, cw),
    ]
    p += [jeq(R9, TcpState.FIN_WAIT1, take), ja(skip)]
    p.label(cw)
    p += [jne(R1, TcpState.CLOSE_WAIT, skip), jne(R9, TcpState.LAST_ACK, skip)]
    p.label(take)
    b.pid_comm(R7)
    p.label(skip)
    p += mov64(R0, 0)


def build_length(
    offsets: Offsets, opts: ConnSpec, send: bool, args: TracepointArgs | None = None
) -> Program:
    """The ``sock_send_length`` (``send``) or ``sock_recv_length`` program."""
    args = args or tracepoint_args(TP_SEND if send else TP_RECV)
    return _build_socket_event(offsets, opts, "send" if send else "recv", args)


def build_owner(offsets: Offsets, opts: ConnSpec, args: TracepointArgs | None = None) -> Program:
    """The ``tcp:tcp_rcv_space_adjust (struct sock *sk)`` program, for kernels without
    ``sock_recv_length``: ``tcp_recvmsg`` calls it in the reader's process context, so
    it names the owner of an accepted connection (and creates entries for TCP
    connections that were open before the tracer started).  It counts no bytes."""
    args = args or tracepoint_args(TP_OWNER)
    return _build_socket_event(offsets, replace(opts, collect_udp=False), "owner", args)


@dataclass(frozen=True)
class _Event:
    """Which socket-owner tracepoint a program runs on: ``send`` and ``recv`` count
    bytes (``ret``) and datagrams, ``owner`` only records the owner."""

    kind: str

    @property
    def send(self) -> bool:
        return self.kind == "send"

    @property
    def counts(self) -> bool:
        return self.kind != "owner"

    @property
    def nbytes(self) -> str:
        """The ConnValue field ``ret`` is added to."""
        return "bytes_sent" if self.send else "bytes_received"

    @property
    def segs(self) -> str:
        """The ConnValue field a UDP datagram is counted in."""
        return "segs_out" if self.send else "segs_in"


def _build_socket_event(
    offsets: Offsets, opts: ConnSpec, kind: str, args: TracepointArgs
) -> Program:
    """Programs on tracepoints that run in the socket owner's context: ``send``/``recv``
    count bytes (``ret``) and datagrams; ``owner`` only records the owner.

    R6 = sk, R7 = its entry, R8 = bytes (0 for ``owner``), R9 = protocol (on a miss)."""
    b = _Builder(offsets, opts, kind, args, sends=opts.collect_udp)  # see _udp_reused
    ev = _Event(kind)
    plan = tuple_plan(offsets, opts)
    buf, val = _layout(plan, b.base)
    b.keep_ctx()
    _event_args(b, ev)
    lookup(b.p, MAP_CONNS, KEY)
    b.p += [jeq(R0, 0, "miss"), mov64(R7, R0)]
    if opts.collect_udp:
        _udp_reused(b, buf)
    _event_add(b, ev)
    b.p.label("miss")
    _event_classify(b, buf, plan)
    b.p.label("create")
    _event_create(b, ev, buf, val, plan)
    _event_insert(b)
    b.out()
    return b.p


def _event_args(b: _Builder, ev: _Event) -> None:
    """R6 = sk (also at FP+KEY), R8 = ``ret`` as u32; leave on ``ret <= 0`` and on
    ``recv(MSG_PEEK)`` (the same bytes are read again later)."""
    p = b.p
    p += mov64(R6, R1)
    if ev.counts:
        p += [
            b.args.load(R8, R6, "ret"),  # int
            jsle32(R8, 0, "out"),
            mov32(R8, R8),
        ]
    else:
        p += mov64(R8, 0)
    if ev.kind == "recv":
        p += [b.args.load(R1, R6, "flags"), jset(R1, MSG_PEEK, "out")]
    p += [b.args.load(R6, R6, "sk"), stx(8, FP, KEY, R6)]


def _udp_reused(b: _Builder, buf: int) -> None:
    """A UDP entry whose socket now has another tuple is a new flow; go to ``miss``
    after ending the old entry.  Another local port means another socket: a UDP
    socket keeps its port once bound, so the ``struct sock`` was freed and reused and
    the old one closed (``closed``, ending at its last datagram, as user space ends a
    closed socket found by NETLINK_SOCK_DIAG).  The same port with another peer is
    the same socket connected elsewhere (``reused``).  Anything else continues at
    ``add``."""
    p = b.p
    rplan = plan_reads(b.offsets, REUSE_KEYS)
    rw = rplan.where
    p += [ldx(1, R1, R7, off("proto")), jne(R1, IPPROTO_UDP, "add")]
    emit_plan(b.p, rplan, buf, R6)
    p += [
        ldx(2, R1, FP, buf + rw["sock_common.skc_num"]),
        ldx(2, R2, R7, off("sport")),
        jne(R1, R2, "freed"),
        ldx(2, R1, FP, buf + rw["sock_common.skc_dport"]),
        ldx(2, R2, R7, off("dport")),
        jne(R1, R2, "reused"),
        ldx(4, R1, FP, buf + rw["sock_common.skc_daddr"]),
        ldx(4, R2, R7, off("daddr4")),
        jeq(R1, R2, "add"),
    ]
    p.label("freed")
    b.stamp_end(R7, EndReason.DESTROYED, at_last=True)
    p += ja("ended")
    p.label("reused")
    b.stamp_end(R7, EndReason.REUSED)
    p.label("ended")
    b.send_closed(R7)
    p += ja("miss")


def _event_add(b: _Builder, ev: _Event) -> None:
    """``add``: count R8 bytes (and one datagram for UDP) into the entry R7, bump
    ``last_ns``, take the owner when it is not known yet; then ``out``."""
    p = b.p
    p.label("add")
    if ev.counts:
        p += atomic_add(8, R7, off(ev.nbytes), R8)
    if b.opts.collect_udp:
        p += [
            ldx(1, R1, R7, off("proto")),
            jne(R1, IPPROTO_UDP, "segs_done"),
            mov64(R1, 1),
            atomic_add(4, R7, off(ev.segs), R1),
        ]
        p.label("segs_done")
    b.now(R7, "last_ns")
    p += [ldx(1, R1, R7, off("flags")), jset(R1, Flag.PID_KNOWN, "out")]
    b.pid_comm(R7)
    p += ja("out")


def _event_classify(b: _Builder, buf: int, plan: ReadPlan) -> None:
    """No entry: a UDP socket's first datagram, or a TCP connection older than us (not
    closed, not a listener).  Read the tuple; R9 = protocol; go to ``create`` or
    ``out``."""
    p = b.p
    w = plan.where
    emit_plan(b.p, plan, buf, R6)
    p += ldx(2, R1, FP, buf + w["sock_common.skc_family"])
    b.family_ok(R1, "family_ok", "out")
    p.label("family_ok")
    p += ldx(2, R9, FP, buf + w["sock.sk_protocol"])
    if b.opts.collect_tcp:
        p += [
            jne(R9, IPPROTO_TCP, "not_tcp"),
            ldx(1, R1, FP, buf + w["sock_common.skc_state"]),
            jeq(R1, TcpState.CLOSE, "out"),
            jeq(R1, TcpState.LISTEN, "out"),
            ja("create"),
        ]
        p.label("not_tcp")
    if b.opts.collect_udp:
        p += jeq(R9, IPPROTO_UDP, "create")
    p += ja("out")


def _event_create(b: _Builder, ev: _Event, buf: int, val: int, plan: ReadPlan) -> None:
    """Build the new entry at FP+``val`` (R7) from the tuple buffer: UDP is opened by
    its first datagram's direction, TCP is partial (open before the tracer)."""
    p = b.p
    w = plan.where
    b.netns(buf, plan, R1, "out")
    p += stx(4, FP, TMP, R1)
    p += [mov64(R7, FP), add64(R7, val)]
    b.zero(val, VALUE_SIZE)
    p += [ldx(4, R1, FP, TMP), stx(4, R7, off("netns"), R1)]
    b.next_id(R7, "out")
    p += [
        stx(8, R7, off("sk"), R6),
        ldx(2, R1, FP, buf + w["sock_common.skc_family"]),
        stx(2, R7, off("family"), R1),
        stx(1, R7, off("proto"), R9),
        ldx(1, R1, FP, buf + w["sock_common.skc_state"]),
        stx(1, R7, off("state"), R1),
        stx(8, R7, off(ev.nbytes), R8),
    ]
    b.now(R7, "start_ns")
    p += stx(8, R7, off("last_ns"), R0)
    b.tuple_to_value(R7, buf, plan)
    b.pid_comm(R7)
    p += [jne(R9, IPPROTO_UDP, "tcp_partial")]
    p += [
        st(1, R7, off("opened"), Opened.ACTIVE if ev.send else Opened.PASSIVE),
        st(4, R7, off(ev.segs), 1),
        ja("insert"),
    ]
    p.label("tcp_partial")
    p += [
        ldx(1, R1, FP, buf + w["sock_common.skc_state"]),
        stx(8, R7, off("history"), R1),
        ldx(1, R1, R7, off("flags")),
        or64(R1, Flag.PARTIAL),
        stx(1, R7, off("flags"), R1),
    ]


def _event_insert(b: _Builder) -> None:
    """``insert``: add the new entry R7 unless another CPU created one meanwhile; then
    count into that one (``add``)."""
    b.p.label("insert")
    create_entry(b.p, MAP_CONNS, KEY, R7, created="out", gone="out")
    b.p += [mov64(R7, R0), ja("add")]


def build_destroy(offsets: Offsets, opts: ConnSpec, args: TracepointArgs | None = None) -> Program:
    """The ``tcp_destroy_sock`` program: final stats to the event channel, entry
    deleted."""
    args = args or tracepoint_args(TP_DESTROY)
    b = _Builder(offsets, opts, "destroy", args)
    p = b.p
    b.keep_ctx()
    p += [args.load(R6, R1, "sk"), stx(8, FP, KEY, R6)]
    lookup(b.p, MAP_CONNS, KEY)
    p += [jeq(R0, 0, "out"), mov64(R7, R0)]
    b.snapshot_tcp(R7, R6, STATS_BUF)
    b.emit_closed(R7, EndReason.DESTROYED)
    b.out()
    return p


def build_refresh(offsets: Offsets, opts: ConnSpec) -> Program:
    """Run by user space (``BPF_PROG_TEST_RUN``, args ``[sk]``): copy the current
    ``tcp_sock`` stats into the entry; bump ``last_ns`` when segments moved.  Returns 1
    when the entry exists, 0 when it is gone."""
    b = _Builder(offsets, opts, "refresh", TracepointArgs.raw_args("", ["sk"]), sends=False)
    p = b.p
    p += [b.args.load(R6, R1, "sk"), stx(8, FP, KEY, R6)]
    lookup(b.p, MAP_CONNS, KEY)
    p += [jeq(R0, 0, "out"), mov64(R7, R0)]
    p += [ldx(1, R1, R7, off("proto")), jne(R1, IPPROTO_TCP, "done")]
    p += [
        ldx(4, R8, R7, off("segs_in")),
        ldx(4, R1, R7, off("segs_out")),
        add64(R8, R1),
    ]
    b.snapshot_tcp(R7, R6, STATS_BUF)
    p += [
        ldx(4, R1, R7, off("segs_in")),
        ldx(4, R2, R7, off("segs_out")),
        add64(R1, R2),
        jeq(R1, R8, "done"),
    ]
    b.now(R7, "last_ns")
    p.label("done")
    p += [mov64(R0, 1), exit_()]
    b.out()
    return p


def needed_fields(opts: ConnSpec) -> tuple[str, ...]:
    """The catalogue keys the programs read with these options."""
    return NEEDED_FIELDS + (IPV6_FIELDS if opts.collect_ipv6 else ())
