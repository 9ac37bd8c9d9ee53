"""The drop monitor's eBPF program, built from offsets, and the records it shares with user space.

One raw tracepoint program on ``kfree_skb``, whose context is the ``TP_PROTO``
array ``(struct sk_buff *skb, void *location, enum skb_drop_reason reason, struct
sock *rx_sk)`` (``reason`` since Linux 5.17, ``rx_sk`` since 6.11; 4.17-5.16 have
only the first two), reads with ``bpf_probe_read_kernel``:

* ``skb->dev`` (``struct net_device *``) and ``skb->protocol`` (``__be16``), in one
  read when they lie close together (they are 160 bytes apart on 6.x), plus
  ``skb->sk`` when it is in the same span;
* ``dev->ifindex`` (``int``) and ``dev->nd_net`` (``possible_net_t``, a ``struct net *``
  with ``CONFIG_NET_NS``), again in one read where possible, then
  ``net->ns.inum`` (``unsigned int``);
* for drops without a device, the namespace of ``skb->sk``
  (``sk->__sk_common.skc_net``), so that ``--netns`` also sees socket-level drops.

It then bumps a per-CPU counter keyed by :class:`DropKey` (location, reason,
ifindex, netns inode, protocol, stack id).  The hot path is: three or four helper
reads, one hash lookup, one non-atomic add (a raw tracepoint program cannot nest on
its CPU: ``bpf_trace_run*()`` counts a nested run as a recursion miss instead, which
we report as lost).  Only when a key is seen for the first time does the program
read ``dev->name`` and store it in the side map ``devnames`` keyed by
(netns, ifindex): a device that keeps dropping costs nothing extra.  A device
renamed after its first drop keeps its old name until its counters are evicted.

Filters (``--device``, ``--netns``, ``--reason``, ``--protocol``) are compiled into
the program as constants: ``--device`` compares the bytes of ``dev->name`` up to and
including its NUL (``strscpy`` does not clear the bytes after it on a rename), so
the same name in several namespaces matches in each.

``--events`` programs reserve a :class:`DropEvent` in a ring buffer instead of
counting; a failed reservation increments ``lost[0]``, as does a full counter map.
"""

from __future__ import annotations

import ctypes
import errno

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
from nettracer.bpf.syscall import BPF_ANY, BPF_NOEXIST
from nettracer.value import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.layout.offsets import Offsets

IFNAMSIZ = 16
#: bytes copied from ``skb->head + skb->network_header`` into each event: enough for
#: an IPv4 header with options (60) or IPv6 with a few extension headers, plus ports
HEADER_BYTES = 128
#: ``DropKey.stack_id`` when no stack was taken (``--stack`` off) or it could not be
STACK_NONE = 0xFFFF
#: largest span of a struct read with one ``bpf_probe_read_kernel``
MAX_SPAN = 192
#: ``(u16)~0U``: ``skb_reset_*_header`` was never called
HEADER_UNSET = 0xFFFF


class DropKey(ctypes.Structure):
    """Key of the ``counts`` map: one drop site, reason, device, namespace, protocol, stack.

    ``protocol`` is ``skb->protocol`` as it lies in memory (``__be16``); ``stack_id``
    is the ``BPF_MAP_TYPE_STACK_TRACE`` id (< 65535) or :data:`STACK_NONE`.
    """

    _fields_ = (
        ("location", ctypes.c_uint64),
        ("reason", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("netns", ctypes.c_uint32),
        ("protocol", ctypes.c_uint16),
        ("stack_id", ctypes.c_uint16),
    )


class DevKey(ctypes.Structure):
    """Key of the ``devnames`` side map."""

    _fields_ = (("netns", ctypes.c_uint32), ("ifindex", ctypes.c_uint32))


class DevName(ctypes.Structure):
    """``char name[IFNAMSIZ]`` of ``struct net_device``."""

    _fields_ = (("name", ctypes.c_char * IFNAMSIZ),)


class DropEvent(ctypes.Structure):
    """One ring-buffer record per dropped packet (``--events``)."""

    _fields_ = (
        ("ts_ns", ctypes.c_uint64),  # bpf_ktime_get_ns(): CLOCK_MONOTONIC
        ("location", ctypes.c_uint64),
        ("pid_tgid", ctypes.c_uint64),
        ("reason", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("netns", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("len", ctypes.c_uint32),  # skb->len
        ("protocol", ctypes.c_uint16),  # __be16 as in memory
        ("stack_id", ctypes.c_uint16),
        ("network_header", ctypes.c_uint16),
        ("transport_header", ctypes.c_uint16),
        ("header_len", ctypes.c_uint16),  # bytes of header[] that were read, 0 if none
        ("_pad", ctypes.c_uint16),
        ("comm", ctypes.c_char * 16),
        ("devname", ctypes.c_char * IFNAMSIZ),
        ("header", ctypes.c_uint8 * HEADER_BYTES),
    )


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


class KfreeSkbArgs(Value):
    """The ``TP_PROTO`` arguments ``kfree_skb`` has on this kernel, in order."""

    __slots__ = ("names",)

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    @property
    def has_reason(self) -> bool:
        return "reason" in self.names

    def index(self, name: str) -> int:
        return self.names.index(name)


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


class _Span(Value):
    __slots__ = ("start", "size", "buf")  # noqa: RUF023 - field order

    def __init__(self, start: int, size: int, buf: int) -> None:
        self.start = start  # offset in the struct
        self.size = size
        self.buf = buf  # offset of the copy from the frame pointer (negative)


class _Reads:
    """Fields of one struct, grouped into as few bounded reads as possible."""

    __slots__ = ("fields", "spans", "where")

    def __init__(self, fields: dict[str, tuple[int, int]]) -> None:
        self.fields = fields  # name -> (offset, size)
        self.spans: list[_Span] = []
        self.where: dict[str, int] = {}  # name -> fp offset of the copy

    def plan(self, frame_top: int, max_span: int = MAX_SPAN) -> int:
        """Lay the copies out below ``frame_top`` (a negative fp offset); returns the new top."""
        top = frame_top
        groups: list[list[tuple[str, int, int]]] = []
        for name, (off, size) in sorted(self.fields.items(), key=lambda kv: kv[1][0]):
            if groups and off + size - groups[-1][0][1] <= max_span:
                groups[-1].append((name, off, size))
            else:
                groups.append([(name, off, size)])
        for group in groups:
            start = group[0][1]
            end = max(o + s for _, o, s in group)
            size = end - start
            top -= (size + 7) & ~7
            self.spans.append(_Span(start, size, top))
            for name, off, _ in group:
                self.where[name] = top + off - start
        return top

    def emit(self, base: Reg) -> list[Insn]:
        """``bpf_probe_read_kernel`` of every span from the struct at ``base``."""
        out: list[Insn] = []
        for span in self.spans:
            out += probe_read(span.buf, span.size, base, span.start)
        return out


def probe_read(dst_fp: int, size: int, src: Reg, src_off: int) -> list[Insn]:
    """``bpf_probe_read_kernel(fp + dst_fp, size, src + src_off)``; clobbers R0-R5
    (on failure the kernel zeroes the destination)."""
    insns = [mov64(R1, FP), add64(R1, dst_fp), mov64(R2, size), mov64(R3, src)]
    if src_off:
        insns.append(add64(R3, src_off))
    insns.append(call(Helper.probe_read_kernel))
    return insns


# frame layout (offsets from the frame pointer)
_KEY = -ctypes.sizeof(DropKey)  # -24
_ONE = _KEY - 8
_DEVKEY = _ONE - 8
_NAME = _DEVKEY - IFNAMSIZ
_TMP = _NAME - 8
_FRAME_TOP = _TMP
_K = {name: _KEY + getattr(DropKey, name).offset for name, _ in DropKey._fields_}
_E = {name: getattr(DropEvent, name).offset for name, *_ in DropEvent._fields_}

# registers kept across helper calls
_CTX, _SKB, _DEV, _NETNS = R6, R7, R8, R9


class DropSpec(Value):
    """Everything that shapes the generated program."""

    __slots__ = ("layout", "args", "filters", "stack", "events")  # noqa: RUF023 - field order

    def __init__(
        self,
        layout: DropLayout,
        args: KfreeSkbArgs,
        filters: Filters | None = None,
        stack: bool = False,
        events: bool = False,
    ) -> None:
        self.layout = layout
        self.args = args
        self.filters = Filters() if filters is None else filters
        self.stack = stack
        self.events = events


def build(spec: DropSpec) -> Program:
    """The instructions for ``spec``; maps referenced by name: ``counts``, ``devnames``,
    ``lost``, and ``stacks`` (with ``stack``) or ``events`` (with ``events``)."""
    lay, flt = spec.layout, spec.filters
    skb_fields = {
        "dev": (lay.sk_buff_dev, 8),
        "protocol": (lay.sk_buff_protocol, 2),
    }
    sk_fallback = lay.sk_buff_sk is not None and lay.sock_common_skc_net is not None
    if sk_fallback:
        assert lay.sk_buff_sk is not None
        # only worth it when the read is free (same span as dev/protocol)
        lo = min(lay.sk_buff_dev, lay.sk_buff_protocol, lay.sk_buff_sk)
        hi = max(lay.sk_buff_dev + 8, lay.sk_buff_protocol + 2, lay.sk_buff_sk + 8)
        if hi - lo <= MAX_SPAN or spec.events or flt.netns is not None:
            skb_fields["sk"] = (lay.sk_buff_sk, 8)
        else:
            sk_fallback = False
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
    dev_fields = {
        "ifindex": (lay.net_device_ifindex, 4),
        "nd_net": (lay.net_device_nd_net, 8),
    }
    if flt.device is not None:
        dev_fields["name"] = (lay.net_device_name, IFNAMSIZ)
    skb_reads = _Reads(skb_fields)
    top = skb_reads.plan(_FRAME_TOP)
    dev_reads = _Reads(dev_fields)
    top = dev_reads.plan(top)
    if top < -512:
        raise ValueError(f"drop program needs {-top} bytes of stack (the limit is 512)")
    sk_ = skb_reads.where
    dv = dev_reads.where

    p = Program()
    p += [
        mov64(_CTX, R1),
        ldx(8, _SKB, _CTX, 8 * spec.args.index("skb")),
        ldx(8, R1, _CTX, 8 * spec.args.index("location")),
        stx(8, FP, _K["location"], R1),
        st(8, FP, _K["reason"], 0),  # reason and ifindex
        st(8, FP, _K["netns"], 0),  # netns, protocol, stack_id
    ]
    if spec.args.has_reason:
        p += [ldx(8, R1, _CTX, 8 * spec.args.index("reason")), stx(4, FP, _K["reason"], R1)]
        if flt.reason is not None:
            p += jmp32(JmpOp.JNE, R1, flt.reason, "out")
    elif flt.reason is not None:
        raise ValueError("this kernel's kfree_skb has no reason argument to filter on")
    # struct sk_buff
    p += skb_reads.emit(_SKB)
    p += [ldx(2, R1, FP, sk_["protocol"]), stx(2, FP, _K["protocol"], R1)]
    if flt.protocol is not None:
        be = int.from_bytes(flt.protocol.to_bytes(2, "big"), "little")
        p += jmp32(JmpOp.JNE, R1, be, "out")
    # struct net_device and its struct net
    p += [
        ldx(8, _DEV, FP, sk_["dev"]),
        mov64(_NETNS, 0),
        jeq(_DEV, 0, "out" if flt.device is not None else "nodev"),
    ]
    p += dev_reads.emit(_DEV)
    p += [
        ldx(4, R1, FP, dv["ifindex"]),
        stx(4, FP, _K["ifindex"], R1),
        ldx(8, R3, FP, dv["nd_net"]),
        jeq(R3, 0, "nodev"),
    ]
    p += _read_u32(_NETNS, R3, lay.net_ns_inum)
    p.label("nodev")
    if sk_fallback:
        assert lay.sock_common_skc_net is not None
        p += [jne(_NETNS, 0, "havens"), ldx(8, R3, FP, sk_["sk"]), jeq(R3, 0, "havens")]
        p += probe_read(_TMP, 8, R3, lay.sock_common_skc_net)
        p += [ldx(8, R3, FP, _TMP), jeq(R3, 0, "havens")]
        p += _read_u32(_NETNS, R3, lay.net_ns_inum)
        p.label("havens")
    p += stx(4, FP, _K["netns"], _NETNS)
    if flt.netns is not None:
        p += jmp32(JmpOp.JNE, _NETNS, flt.netns, "out")
    if flt.device is not None:
        p += _compare_name(dv["name"], flt.device, "out")
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
        p += _emit_event(sk_, lay)
    else:
        p += _count(dv if flt.device is not None else None, lay)
    p.label("out")
    p += [mov64(R0, 0), exit_()]
    return p


def _read_u32(dst: Reg, base: Reg, off: int) -> list[Insn]:
    """``dst = *(u32 *)(base + off)`` through the scratch slot."""
    return [*probe_read(_TMP, 4, base, off), ldx(4, dst, FP, _TMP)]


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


def _count(dev_copy: dict[str, int] | None, lay: DropLayout) -> list[Insn]:
    """Bump ``counts[key]``; on a new key, remember the device's name."""
    key = [ld_map_fd(R1, "counts"), mov64(R2, FP), add64(R2, _KEY)]
    insns: list[Insn] = [
        *key,
        call(Helper.map_lookup_elem),
        jeq(R0, 0, "new"),
        ldx(8, R1, R0, 0),
        add64(R1, 1),
        stx(8, R0, 0, R1),
        ja("out"),
        st(8, FP, _ONE, 1).at("new"),
        *key,
        mov64(R3, FP),
        add64(R3, _ONE),
        mov64(R4, BPF_NOEXIST),
        call(Helper.map_update_elem),
        jeq(R0, 0, "created"),
        jne(R0, -errno.EEXIST, "full"),
        # another CPU created it between our lookup and update
        *key,
        call(Helper.map_lookup_elem),
        jeq(R0, 0, "out"),
        ldx(8, R1, R0, 0),
        add64(R1, 1),
        stx(8, R0, 0, R1),
        ja("out"),
        *_lost_inc("full"),
        ja("out"),
        # first drop of this key: store the device name for (netns, ifindex)
        ldx(4, R1, FP, _K["ifindex"]).at("created"),
        jeq(R1, 0, "out"),
        stx(4, FP, _DEVKEY + DevKey.ifindex.offset, R1),
        stx(4, FP, _DEVKEY + DevKey.netns.offset, _NETNS),
    ]
    if dev_copy is not None:
        name = dev_copy["name"]
    else:
        name = _NAME
        insns += probe_read(_NAME, IFNAMSIZ, _DEV, lay.net_device_name)
    insns += [
        ld_map_fd(R1, "devnames"),
        mov64(R2, FP),
        add64(R2, _DEVKEY),
        mov64(R3, FP),
        add64(R3, name),
        mov64(R4, BPF_ANY),
        call(Helper.map_update_elem),
    ]
    return insns


def _lost_inc(label: str) -> list[Insn]:
    """``lost[0] += 1`` (per-CPU), starting at ``label``."""
    return [
        st(4, FP, _TMP, 0).at(label),
        ld_map_fd(R1, "lost"),
        mov64(R2, FP),
        add64(R2, _TMP),
        call(Helper.map_lookup_elem),
        jeq(R0, 0, "out"),
        ldx(8, R1, R0, 0),
        add64(R1, 1),
        stx(8, R0, 0, R1),
    ]


def _emit_event(skb: dict[str, int], lay: DropLayout) -> list[Insn]:
    """Fill and submit one :class:`DropEvent`; R6 (the context) becomes the record."""
    from nettracer.bpf.ringbuf import reserve

    rec = R6
    out: list[Insn] = reserve(rec, "events", ctypes.sizeof(DropEvent), "lost", "out", _TMP)
    out += [
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
        ldx(8, R1, FP, _K["location"]),
        stx(8, rec, _E["location"], R1),
        ldx(4, R1, FP, _K["reason"]),
        stx(4, rec, _E["reason"], R1),
        ldx(4, R1, FP, _K["ifindex"]),
        stx(4, rec, _E["ifindex"], R1),
        stx(4, rec, _E["netns"], _NETNS),
        ldx(2, R1, FP, _K["protocol"]),
        stx(2, rec, _E["protocol"], R1),
        ldx(2, R1, FP, _K["stack_id"]),
        stx(2, rec, _E["stack_id"], R1),
        ldx(4, R1, FP, skb["len"]),
        stx(4, rec, _E["len"], R1),
        ldx(2, R1, FP, skb["transport_header"]),
        stx(2, rec, _E["transport_header"], R1),
        st(2, rec, _E["header_len"], 0),
        st(8, rec, _E["devname"], 0),
        st(8, rec, _E["devname"] + 8, 0),
        ldx(4, R1, FP, _K["ifindex"]),
        jeq(R1, 0, "ev_noname"),
        mov64(R1, rec),
        add64(R1, _E["devname"]),
        mov64(R2, IFNAMSIZ),
        mov64(R3, _DEV),
        add64(R3, lay.net_device_name),
        call(Helper.probe_read_kernel),
        ldx(2, R1, FP, skb["network_header"]).at("ev_noname"),
        stx(2, rec, _E["network_header"], R1),
        jeq(R1, HEADER_UNSET, "ev_submit"),
        ldx(8, R3, FP, skb["head"]),
        jeq(R3, 0, "ev_submit"),
        add64(R3, R1),
        mov64(R1, rec),
        add64(R1, _E["header"]),
        mov64(R2, HEADER_BYTES),
        call(Helper.probe_read_kernel),
        jne(R0, 0, "ev_submit"),
        st(2, rec, _E["header_len"], HEADER_BYTES),
        mov64(R1, rec).at("ev_submit"),
        mov64(R2, 0),
        call(Helper.ringbuf_submit),
    ]
    return out
