"""The drop monitor's eBPF program, built from offsets (its records: :mod:`.records`).

One program on the ``kfree_skb`` tracepoint, whose context is the ``TP_PROTO``
array ``(struct sk_buff *skb, void *location, enum skb_drop_reason reason, struct
sock *rx_sk)`` (``reason`` since Linux 5.17, ``rx_sk`` since 6.11; 4.17-5.16 have
only the first two), reads kernel memory through :mod:`nettracer.access.plan`:

* ``skb->dev`` (``struct net_device *``) and ``skb->protocol`` (``__be16``), plus
  ``skb->sk``;
* ``dev->ifindex`` (``int``) and ``dev->nd_net`` (``possible_net_t``, a ``struct net *``
  with ``CONFIG_NET_NS``), then ``net->ns.inum`` (``unsigned int``);
* for drops without a device, the namespace of ``skb->sk``
  (``sk->__sk_common.skc_net``), so that ``--netns`` also sees socket-level drops.

Where the kernel has BTF (and ``tp_btf``, 5.5) the program is a BTF-typed raw
tracepoint program and each of those reads is one plain load (``BPF_PROBE_MEM``,
:class:`nettracer.bpf.memory.KernelReads` ``direct``): the hot path is then a handful
of loads, one hash lookup and one non-atomic add.  Elsewhere (no BTF, or
``kernel.without: [tp_btf]``) it is a raw tracepoint program (a classic one before
4.17) whose reads are ``bpf_probe_read_kernel`` calls: ``skb->dev`` and
``skb->protocol`` in one call when they lie close together (160 bytes apart on
6.x), ``skb->sk`` when it is in the same span, ``ifindex`` and ``nd_net`` again in
one; there the device memo (:mod:`nettracer.bpf.memo`, a per-CPU array of one
entry, needs ``bpf_jiffies64``, 5.6) holds the ifindex and netns inode of the last
``struct net_device *`` this CPU saw, valid for the jiffy that read them: drops
come in bursts on one device, so most drops skip the two calls that read the
device and its namespace (profile: ``bench/profile_drops.py``).  A device moved to
another namespace can then be counted in its old one for the rest of that tick (at
most 1-10 ms), on the CPU that last saw it, and only if no drop on another device
came in between.

The count is a per-CPU counter keyed by :class:`DropKey` (location, reason, ifindex,
netns inode, protocol, stack id), added to without an atomic (a raw tracepoint
program cannot nest on its CPU: ``bpf_trace_run*()`` counts a nested run as a
recursion miss instead, which we report as lost).  Only when a key is seen for the
first time does the program read ``dev->name`` and store it in the side map
``devnames`` keyed by (netns, ifindex): a device that keeps dropping costs nothing
extra.  A device renamed after its first drop keeps its old name until its counters
are evicted.

Filters (``--device``, ``--netns``, ``--reason``, ``--protocol``) are compiled into
the program as constants: ``--device`` compares the bytes of ``dev->name`` up to and
including its NUL (``strscpy`` does not clear the bytes after it on a rename), so
the same name in several namespaces matches in each.

``--events`` programs reserve a :class:`DropEvent` in a ring buffer instead of
counting; a failed reservation increments ``lost[0]``, as does a full counter map.
"""

from __future__ import annotations

import ctypes

from nettracer.access.plan import ReadPlan, emit_plan, plan_fields, read_chain
from nettracer.bpf.channel import EventChannel, event_channel
from nettracer.bpf.counters import count_in_hash, update_elem
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
    JmpOp,
    Program,
    add64,
    and64,
    call,
    exit_,
    ja,
    jeq,
    jmp,
    jmp32,
    jne,
    ld_imm64,
    ld_map_fd,
    ldx,
    mov64,
    st,
    stx,
)
from nettracer.bpf.memo import memo_find, memo_store
from nettracer.bpf.memory import read
from nettracer.kernel.tracepoints import TracepointArgs
from nettracer.tracers.drops.records import (
    HEADER_BYTES,
    IFNAMSIZ,
    STACK_NONE,
    DevKey,
    DropEvent,
    DropKey,
)
from nettracer.value import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.bpf.memory import KernelReads
    from nettracer.layout.offsets import Offsets

#: largest span of a struct read with one helper call
MAX_SPAN = 192
#: ``(u16)~0U``: ``skb_reset_*_header`` was never called
HEADER_UNSET = 0xFFFF


def channel_for(spec: DropSpec) -> EventChannel:
    """The event channel of a program built from ``spec`` (which has ``events``): maps
    ``events`` and ``lost``, or ``events_lost`` when the program also counts (``--pcap``
    next to the periodic counts: a full channel is not a lost count); of the kind
    ``spec.channel`` (a ring buffer, or a perf event array before 5.8)."""
    return event_channel("events", "events_lost" if spec.counts else "lost", spec.channel)


class Filters(Value):
    """In-kernel filters. ``device`` is the interface name as bytes (< IFNAMSIZ);
    ``protocol`` an ETH_P_* value in host order; ``reason`` an ``enum skb_drop_reason``
    value; ``netns`` a network namespace inode."""

    __slots__ = ("device", "netns", "reason", "protocol")  # noqa: RUF023 - field order

    def __init__(
        self,
        device: bytes | None = None,
        netns: int | None = None,
        reason: int | None = None,
        protocol: int | None = None,
    ) -> None:
        if device is not None and not 0 < len(device) < IFNAMSIZ:
            raise ValueError(f"device name must be 1 to {IFNAMSIZ - 1} bytes")
        self.device = device
        self.netns = netns
        self.reason = reason
        self.protocol = protocol


class KfreeSkbArgs(TracepointArgs):
    """The arguments ``kfree_skb`` has on this kernel, as the program reads them: built
    from the ``TP_PROTO`` names in order (the raw tracepoint layout);
    :meth:`~TracepointArgs.for_kernel` gives the classic record's layout (``skbaddr``,
    ``location``, ``reason`` from ``events/skb/kfree_skb/format``)."""

    __slots__ = ()

    def __init__(self, names: tuple[str, ...], btf_id: int | None = None) -> None:
        raw = TracepointArgs.raw_args("kfree_skb", names, "skb", btf_id)
        super().__init__(raw.name, raw.category, raw.raw, raw.fields, raw.btf_id)

    @property
    def has_reason(self) -> bool:
        return self.has("reason")


class DropLayout(Value):
    """The offsets the program bakes in (bytes from the start of each struct).

    ``sk_buff_sk``/``sock_common_skc_net`` are None when unknown: socket-level drops
    without a device then have no namespace.  The event fields are needed only by
    ``--events``.
    """

    __slots__ = (  # noqa: RUF023 - field order
        "sk_buff_dev",
        "sk_buff_protocol",
        "net_device_ifindex",
        "net_device_nd_net",
        "net_device_name",
        "net_ns_inum",
        "sk_buff_sk",
        "sock_common_skc_net",
        "sk_buff_len",
        "sk_buff_head",
        "sk_buff_network_header",
        "sk_buff_transport_header",
    )

    def __init__(
        self,
        sk_buff_dev: int,
        sk_buff_protocol: int,
        net_device_ifindex: int,
        net_device_nd_net: int,
        net_device_name: int,
        net_ns_inum: int,
        sk_buff_sk: int | None = None,
        sock_common_skc_net: int | None = None,
        sk_buff_len: int | None = None,
        sk_buff_head: int | None = None,
        sk_buff_network_header: int | None = None,
        sk_buff_transport_header: int | None = None,
    ) -> None:
        self.sk_buff_dev = sk_buff_dev
        self.sk_buff_protocol = sk_buff_protocol
        self.net_device_ifindex = net_device_ifindex
        self.net_device_nd_net = net_device_nd_net
        self.net_device_name = net_device_name
        self.net_ns_inum = net_ns_inum
        self.sk_buff_sk = sk_buff_sk
        self.sock_common_skc_net = sock_common_skc_net
        self.sk_buff_len = sk_buff_len
        self.sk_buff_head = sk_buff_head
        self.sk_buff_network_header = sk_buff_network_header
        self.sk_buff_transport_header = sk_buff_transport_header

    @classmethod
    def from_offsets(cls, offsets: Offsets, events: bool = False) -> DropLayout:
        """Raises :class:`nettracer.layout.offsets.UnresolvedField` for a missing field
        the program cannot do without."""

        def opt(key: str) -> int | None:
            return offsets.offset(key) if key in offsets else None

        layout = cls(
            sk_buff_dev=offsets.offset("sk_buff.dev"),
            sk_buff_protocol=offsets.offset("sk_buff.protocol"),
            net_device_ifindex=offsets.offset("net_device.ifindex"),
            net_device_nd_net=offsets.offset("net_device.nd_net"),
            net_device_name=offsets.offset("net_device.name"),
            net_ns_inum=offsets.offset("net.ns.inum"),
            sk_buff_sk=opt("sk_buff.sk"),
            sock_common_skc_net=opt("sock_common.skc_net"),
            sk_buff_len=opt("sk_buff.len"),
            sk_buff_head=opt("sk_buff.head"),
            sk_buff_network_header=opt("sk_buff.network_header"),
            sk_buff_transport_header=opt("sk_buff.transport_header"),
        )
        if events:
            for key in (
                "sk_buff.len",
                "sk_buff.head",
                "sk_buff.network_header",
                "sk_buff.transport_header",
            ):
                offsets.offset(key)  # raises UnresolvedField with the reason
        return layout


# frame layout (offsets from the frame pointer)
_KEY = -ctypes.sizeof(DropKey)  # -24
_ONE = _KEY - 8
_DEVKEY = _ONE - 8
_NAME = _DEVKEY - IFNAMSIZ
_TMP = _NAME - 8
_FRAME_TOP = _TMP
# the device memo's jiffy and array key, in slots used only after it (when counting)
_STAMP, _MEMOKEY = _DEVKEY, _ONE
_K = {name: _KEY + getattr(DropKey, name).offset for name, _ in DropKey._fields_}
_E = {name: getattr(DropEvent, name).offset for name, *_ in DropEvent._fields_}

# registers kept across helper calls
_CTX, _SKB, _DEV, _NETNS = R6, R7, R8, R9


class DropSpec(Value):
    """Everything that shapes the generated program."""

    __slots__ = (  # noqa: RUF023 - field order
        "layout",
        "args",
        "filters",
        "stack",
        "events",
        "reads",
        "counts",
        "memo",
        "channel",
    )

    def __init__(
        self,
        layout: DropLayout,
        args: TracepointArgs,
        filters: Filters | None = None,
        stack: bool = False,
        events: bool = False,
        reads: KernelReads | None = None,
        counts: bool | None = None,
        memo: bool = True,
        channel: str = "ringbuf",
    ) -> None:
        self.layout = layout
        self.args = args
        self.filters = Filters() if filters is None else filters
        self.stack = stack
        self.events = events
        #: which helper reads kernel memory (:mod:`nettracer.bpf.memory`; None: the 5.5 one)
        self.reads = reads
        #: count in ``counts`` (by default unless ``events``; both for ``--pcap`` with counts)
        self.counts = not events if counts is None else counts
        #: remember each CPU's last device's ifindex and netns for the rest of the jiffy
        #: (map ``devmemo``, :mod:`nettracer.bpf.memo`; needs ``bpf_jiffies64``, 5.6);
        #: never with ``--device``, which reads the device's name anyway
        self.memo = memo and self.filters.device is None
        #: the event channel's kind (:func:`nettracer.bpf.channel.event_channel`)
        self.channel = channel


class _Plans(Value):
    """The reads of ``struct sk_buff`` and ``struct net_device`` and where their copies
    lie (fp offsets); ``sk_fallback`` when the namespace of ``skb->sk`` is read for drops
    without a device."""

    __slots__ = ("skb", "dev", "sk_fallback", "skb_buf", "dev_buf")  # noqa: RUF023

    def __init__(self, skb: ReadPlan, dev: ReadPlan, sk_fallback: bool) -> None:
        self.skb = skb
        self.dev = dev
        self.sk_fallback = sk_fallback
        self.skb_buf = _FRAME_TOP - skb.size
        self.dev_buf = self.skb_buf - dev.size
        if self.dev_buf < -512:
            raise ValueError(f"drop program needs {-self.dev_buf} bytes of stack (limit 512)")

    def sk(self, name: str) -> int:
        return self.skb_buf + self.skb.where[name]

    def dv(self, name: str) -> int:
        return self.dev_buf + self.dev.where[name]


def _plans(spec: DropSpec) -> _Plans:
    lay, flt = spec.layout, spec.filters
    skb_fields = {"dev": (lay.sk_buff_dev, 8), "protocol": (lay.sk_buff_protocol, 2)}
    if spec.events:
        assert lay.sk_buff_len is not None and lay.sk_buff_head is not None
        assert lay.sk_buff_network_header is not None
        assert lay.sk_buff_transport_header is not None
        skb_fields |= {
            "len": (lay.sk_buff_len, 4),
            "head": (lay.sk_buff_head, 8),
            "network_header": (lay.sk_buff_network_header, 2),
            "transport_header": (lay.sk_buff_transport_header, 2),
        }
    skb = plan_fields(skb_fields, MAX_SPAN)
    sk_fallback = lay.sk_buff_sk is not None and lay.sock_common_skc_net is not None
    if sk_fallback:
        assert lay.sk_buff_sk is not None
        with_sk = plan_fields(skb_fields | {"sk": (lay.sk_buff_sk, 8)}, MAX_SPAN)
        # only worth it when the read is free (no extra helper call)
        if len(with_sk.reads) == len(skb.reads) or spec.events or flt.netns is not None:
            skb = with_sk
        else:
            sk_fallback = False
    dev_fields = {"ifindex": (lay.net_device_ifindex, 4), "nd_net": (lay.net_device_nd_net, 8)}
    if flt.device is not None:
        dev_fields["name"] = (lay.net_device_name, IFNAMSIZ)
    return _Plans(skb, plan_fields(dev_fields, MAX_SPAN), sk_fallback)


def build(spec: DropSpec) -> Program:
    """The instructions for ``spec``; maps referenced by name: ``counts``, ``devnames``,
    ``lost``, ``devmemo`` (with ``memo``), ``stacks`` (with ``stack``), ``events`` (with ``events``) and
    ``events_lost`` (with both ``events`` and ``counts``: each drop is sent as a record,
    then counted)."""
    flt = spec.filters
    plans = _plans(spec)
    p = Program(reads=spec.reads)
    _key(p, spec)
    # struct sk_buff
    emit_plan(p, plans.skb, plans.skb_buf, _SKB)
    p += [ldx(2, R1, FP, plans.sk("protocol")), stx(2, FP, _K["protocol"], R1)]
    if flt.protocol is not None:
        be = int.from_bytes(flt.protocol.to_bytes(2, "big"), "little")
        p += jmp32(JmpOp.JNE, R1, be, "out")
    _netns(p, spec, plans)
    if flt.device is not None:
        p += _compare_name(plans.dv("name"), flt.device, "out")
    if spec.stack:
        p += [
            mov64(R1, _CTX),
            ld_map_fd(R2, "stacks"),
            mov64(R3, 0),
            call(Helper.get_stackid),
            jmp(JmpOp.JSGE, R0, 0, "stack_ok"),
            mov64(R0, STACK_NONE),
            stx(2, FP, _K["stack_id"], R0).at("stack_ok"),
        ]
    else:
        p += st(2, FP, _K["stack_id"], STACK_NONE)
    if spec.events:
        _emit_event(p, plans, spec, done="count" if spec.counts else "out")
    if spec.counts:
        if spec.events:
            p.label("count")
        _count(p, plans.dv("name") if flt.device is not None else None, spec.layout)
    p.label("out")
    p += [mov64(R0, 0), exit_()]
    return p


def _key(p: Program, spec: DropSpec) -> None:
    """Keep the context and ``skb``; fill the key's location and reason (filtered)."""
    p += [
        mov64(_CTX, R1),
        spec.args.load(_SKB, _CTX, "skb"),
        spec.args.load(R1, _CTX, "location"),
        stx(8, FP, _K["location"], R1),
        st(8, FP, _K["reason"], 0),  # reason and ifindex
        st(8, FP, _K["netns"], 0),  # netns, protocol, stack_id
    ]
    reason = spec.filters.reason
    if spec.args.has("reason"):
        p += [spec.args.load(R1, _CTX, "reason"), stx(4, FP, _K["reason"], R1)]
        if reason is not None:
            p += jmp32(JmpOp.JNE, R1, reason, "out")
    elif reason is not None:
        raise ValueError("this kernel's kfree_skb has no reason argument to filter on")


def _netns(p: Program, spec: DropSpec, plans: _Plans) -> None:
    """``_DEV = skb->dev``, the key's ifindex, ``_NETNS = dev->nd_net.net->ns.inum`` (or
    that of ``skb->sk`` for drops without a device), filtered on ``--netns``.  With
    ``spec.memo`` the ifindex and netns of the device this CPU saw last in this jiffy
    are taken from the memo instead of read (drops come in bursts on one device)."""
    lay, flt = spec.layout, spec.filters
    p += [
        ldx(8, _DEV, FP, plans.sk("dev")),
        mov64(_NETNS, 0),
        jeq(_DEV, 0, "out" if flt.device is not None else "nodev"),
    ]
    # the key's ifindex and netns lie together: the memo's payload
    memo = {"stamp_off": _STAMP, "key_off": _MEMOKEY, "size": 8}
    if spec.memo:
        memo_find(p, "devmemo", _DEV, out_off=_K["ifindex"], miss="devread", **memo)
        p += [ldx(4, _NETNS, FP, _K["netns"]), ja("nodev")]
        p.label("devread")
    emit_plan(p, plans.dev, plans.dev_buf, _DEV)
    p += [
        ldx(4, R1, FP, plans.dv("ifindex")),
        stx(4, FP, _K["ifindex"], R1),
        ldx(8, R3, FP, plans.dv("nd_net")),
    ]
    read_chain(p, R3, (), lay.net_ns_inum, 4, _TMP, null="nodev")
    p += ldx(4, _NETNS, FP, _TMP)
    if spec.memo:
        p += stx(4, FP, _K["netns"], _NETNS)
        memo_store(p, "devmemo", _DEV, src_off=_K["ifindex"], **memo)
    p.label("nodev")
    if plans.sk_fallback:
        assert lay.sock_common_skc_net is not None
        p += [jne(_NETNS, 0, "havens"), ldx(8, R3, FP, plans.sk("sk"))]
        read_chain(p, R3, (lay.sock_common_skc_net,), lay.net_ns_inum, 4, _TMP, null="havens")
        p += ldx(4, _NETNS, FP, _TMP)
        p.label("havens")
    p += stx(4, FP, _K["netns"], _NETNS)
    if flt.netns is not None:
        p += jmp32(JmpOp.JNE, _NETNS, flt.netns, "out")


def _compare_name(name_fp: int, want: bytes, miss: str) -> list[Insn]:
    """Jump to ``miss`` unless the ``char[16]`` at ``fp + name_fp`` holds ``want`` + NUL.

    Only the bytes up to and including the terminating NUL are compared, 8 at a time
    with a mask for the last word."""
    data = want + b"\0"
    out: list[Insn] = []
    for word in range(0, len(data), 8):
        chunk = data[word : word + 8]
        value = int.from_bytes(chunk.ljust(8, b"\0"), "little")
        mask = (1 << (8 * len(chunk))) - 1
        out += [ldx(8, R1, FP, name_fp + word)]
        if len(chunk) < 8:
            out += [ld_imm64(R2, mask), and64(R1, R2)]
        out += [ld_imm64(R2, value), jne(R1, R2, miss)]
    return out


def _count(p: Program, name_copy: int | None, lay: DropLayout) -> None:
    """Bump ``counts[key]`` (per-CPU hash: a plain add); on a new key, remember the
    device's name (already read when ``name_copy``, its fp offset, is given)."""
    count_in_hash(
        p, "counts", _KEY, one_off=_ONE, lost="lost", scratch_off=_TMP, done="out",
        created="created", atomic=False,
    )  # fmt: skip
    # first drop of this key: store the device name for (netns, ifindex)
    p.label("created")
    p += [
        ldx(4, R1, FP, _K["ifindex"]),
        jeq(R1, 0, "out"),
        stx(4, FP, _DEVKEY + DevKey.ifindex.offset, R1),
        stx(4, FP, _DEVKEY + DevKey.netns.offset, _NETNS),
    ]
    if name_copy is None:
        name_copy = _NAME
        read(p, FP, _NAME, IFNAMSIZ, _DEV, lay.net_device_name)
    update_elem(p, "devnames", _DEVKEY, FP, name_copy)


def _emit_event(p: Program, plans: _Plans, spec: DropSpec, done: str) -> None:
    """Fill and submit one :class:`DropEvent` in R7 (``skb`` is no longer needed), then
    go on at ``done`` (also when the channel had no room)."""
    rec = R7
    size = ctypes.sizeof(DropEvent)
    lay = spec.layout
    channel = channel_for(spec)
    channel.reserve(p, rec, size, on_fail=done, scratch_off=_TMP)
    p += [
        call(Helper.ktime_get_ns),
        stx(8, rec, _E["ts_ns"], R0),
        call(Helper.get_current_pid_tgid),
        stx(8, rec, _E["pid_tgid"], R0),
        call(Helper.get_smp_processor_id),
        stx(4, rec, _E["cpu"], R0),
        mov64(R1, rec),
        add64(R1, _E["comm"]),
        mov64(R2, 16),
        call(Helper.get_current_comm),
    ]
    for name, width in (("location", 8), ("reason", 4), ("ifindex", 4)):
        p += [ldx(width, R1, FP, _K[name]), stx(width, rec, _E[name], R1)]
    p += stx(4, rec, _E["netns"], _NETNS)
    for name in ("protocol", "stack_id"):
        p += [ldx(2, R1, FP, _K[name]), stx(2, rec, _E[name], R1)]
    p += [
        ldx(4, R1, FP, plans.sk("len")),
        stx(4, rec, _E["len"], R1),
        ldx(2, R1, FP, plans.sk("transport_header")),
        stx(2, rec, _E["transport_header"], R1),
        st(2, rec, _E["header_len"], 0),
        st(8, rec, _E["devname"], 0),
        st(8, rec, _E["devname"] + 8, 0),
        ldx(4, R1, FP, _K["ifindex"]),
        jeq(R1, 0, "ev_noname"),
    ]
    read(p, rec, _E["devname"], IFNAMSIZ, _DEV, lay.net_device_name)
    p.label("ev_noname")
    p += [
        ldx(2, R1, FP, plans.sk("network_header")),
        stx(2, rec, _E["network_header"], R1),
        jeq(R1, HEADER_UNSET, "ev_submit"),
        ldx(8, R3, FP, plans.sk("head")),
        jeq(R3, 0, "ev_submit"),
        add64(R3, R1),
    ]
    read(p, rec, _E["header"], HEADER_BYTES, R3)
    p += [jne(R0, 0, "ev_submit"), st(2, rec, _E["header_len"], HEADER_BYTES)]
    p.label("ev_submit")
    channel.submit(p, rec, ctx=_CTX, size=size, scratch_off=_TMP)
