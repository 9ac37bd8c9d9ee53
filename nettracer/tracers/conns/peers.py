"""Per-peer counts for unconnected UDP sockets (a DNS server, a client using sendto).

An unconnected socket has no peer in ``struct sock``; each datagram's IP and UDP
headers name it.  Three raw tracepoint programs count them in the ``peers`` hash, keyed
by (``struct sock *``, family, peer port, peer address) -> :class:`PeerValue`:

``peer_tx``     ``net:net_dev_start_xmit (struct sk_buff *skb, struct net_device *dev)``:
                ``skb->sk`` is the sending socket (``skb_set_owner_w``); the destination
                of the headers at ``skb->head + network_header`` / ``transport_header``
                is counted, the UDP length minus its 8-byte header as bytes (a
                fragmented datagram once, at its first fragment, which has the UDP
                header).
``peer_rx``     ``net:netif_receive_skb (struct sk_buff *skb)``: the source of a UDP
                datagram goes to a per-CPU slot; delivery to the socket follows on the
                same CPU in the same softirq (``ip_rcv`` ... ``__udp_enqueue_schedule_skb``)
``peer_ready``  ``sock:sk_data_ready (const struct sock *sk)`` (newer than 6.1; without
                it a notice and no peers), fired by that enqueue: the slot's datagram
                is counted for ``sk``.  (UDP's ``recvmsg`` fires no tracepoint with
                the skb on 6.18: a linear skb is copied by ``copy_linear_skb`` and
                freed by ``skb_attempt_defer_free``.)

``peer_tx`` and ``peer_rx`` run on every packet the host sends and receives (a TCP
packet costs one ``sk_buff`` read and a hash lookup on send, two reads on receive:
about 5% of a CPU at 100,000 packets a second each way on the bench machine), so the
programs are attached only with ``network.udp_peers`` (``--udp-peers``).

Sockets known to the tracer as TCP or connected UDP are skipped.  Each socket counts at
most :data:`MAX_PEERS` peers (``ConnValue.peers``); a datagram of a further peer, one
sent through a queue that transmits later on another CPU, and one received but not
yet read is not (or not yet) attributed: user space reports the difference between the
socket's totals (``sock_send_length`` / ``sock_recv_length``, what the application
sent and read) and the sum over its peers as ``unattributed``.  Every kernel read goes
through :mod:`nettracer.access.plan` and :func:`nettracer.bpf.memory.read`.
"""

from __future__ import annotations

import ctypes

from nettracer.access.plan import emit_plan, plan_reads
from nettracer.bpf.counters import create_entry, lookup
from nettracer.bpf.insn import (
    FP,
    R0,
    R1,
    R3,
    R6,
    R7,
    R8,
    R9,
    Program,
    add64,
    and64,
    atomic_add,
    endian,
    exit_,
    ja,
    jeq,
    jge,
    jlt,
    jne,
    ldx,
    mov64,
    rsh64,
    st,
    stx,
    sub64,
)
from nettracer.bpf.memory import KernelReads, read
from nettracer.kernel.tracepoints import TracepointArgs
from nettracer.layout.offsets import Offsets
from nettracer.tracers.conns.records import AF_INET, AF_INET6, IPPROTO_UDP, off

#: the raw tracepoints besides ``sock_recv_length``
TP_TX = "net_dev_start_xmit"
TP_RX = "netif_receive_skb"
TP_READY = "sk_data_ready"
#: their ``TP_PROTO`` argument names (include/trace/events/net.h, sock.h)
TP_ARGS: dict[str, tuple[str, ...]] = {
    TP_TX: ("skb", "dev"),
    TP_RX: ("skb",),
    TP_READY: ("sk",),
}


def tracepoint_args(name: str) -> TracepointArgs:
    """The raw tracepoint layout of ``name`` (one of the ``TP_*``);
    :meth:`~TracepointArgs.for_kernel` gives the one this kernel is to use."""
    return TracepointArgs.raw_args(name, TP_ARGS[name])


MAP_PEERS = "peers"
MAP_SLOT = "peer_slot"
MAP_CONNS = "conns"
#: peers counted per socket (``ConnValue.peers`` is a u8)
MAX_PEERS = 64
#: entries of the ``peers`` hash (all sockets together)
PEER_ENTRIES = 16384

SKB_FIELDS = ("sk_buff.sk", "sk_buff.head", "sk_buff.network_header", "sk_buff.transport_header")
ETH_IPV4, ETH_IPV6 = 4, 6  #: IP version nibbles


class PeerKey(ctypes.Structure):
    """``struct peer_key``: the ``struct sock *``, family, peer port (``__be16``),
    peer address (network order; IPv4 in the first 4 bytes).  ``len`` is 0 in the
    ``peers`` hash; in the per-CPU slot it carries the datagram's payload length."""

    _fields_ = [
        ("sk", ctypes.c_uint64),
        ("family", ctypes.c_uint16),
        ("port", ctypes.c_uint16),
        ("len", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * 16),
    ]


class PeerValue(ctypes.Structure):
    """``struct peer_value``: bytes and datagrams each way."""

    _fields_ = [
        ("bytes_sent", ctypes.c_uint64),
        ("bytes_received", ctypes.c_uint64),
        ("datagrams_sent", ctypes.c_uint64),
        ("datagrams_received", ctypes.c_uint64),
    ]


# stack layout (offsets from FP)
KEY = -8  #: u64 struct sock * (conns key)
TMP = -24  #: u64 scratch (pid_tgid)
PKEY = -64  #: struct peer_key
PVAL = -96  #: struct peer_value
HDR = -144  #: 40 bytes of IP header (IPv6's fixed header)
UDPH = -152  #: 8 bytes of UDP header
SKB = -160  #: the sk_buff fields read (grows down)


def _skb_fields(p: Program, offsets: Offsets, args: TracepointArgs) -> tuple[int, dict[str, int]]:
    """R6 = the tracepoint's skb; read :data:`SKB_FIELDS` into the stack below SKB;
    (buffer offset, field positions)."""
    plan = plan_reads(offsets, SKB_FIELDS)
    buf = SKB - plan.size
    buf -= buf % 8
    p += args.load(R6, R1, "skb")
    emit_plan(p, plan, buf, R6)
    return buf, dict(plan.where)


def _peer_of(p: Program, buf: int, where: dict[str, int], source: bool) -> None:
    """From the headers of the skb whose fields are at ``buf``: fill PKEY's family, port
    and address with the packet's ``source`` (else destination) and set R9 = UDP
    payload length; jump to ``out`` unless it is the first (or only) fragment of a UDP
    datagram over IPv4 or IPv6 without extension headers.  Keeps R6 and R7."""
    p += [ldx(8, R8, FP, buf + where["sk_buff.head"]), jeq(R8, 0, "out")]
    p += [ldx(2, R1, FP, buf + where["sk_buff.network_header"]), mov64(R3, R8), add64(R3, R1)]
    read(p, FP, HDR, 40, R3)
    for i in range(0, 16, 8):
        p += st(8, FP, PKEY + 16 + i, 0)
    p += st(4, FP, PKEY + 12, 0)
    p += [ldx(1, R1, FP, HDR), rsh64(R1, 4), jeq(R1, ETH_IPV6, "v6"), jne(R1, ETH_IPV4, "out")]
    p += [ldx(1, R1, FP, HDR + 9), jne(R1, IPPROTO_UDP, "out")]
    p += [ldx(2, R1, FP, HDR + 6), endian(R1, 16), and64(R1, 0x1FFF), jne(R1, 0, "out")]
    p += [st(2, FP, PKEY + 8, AF_INET), ldx(4, R1, FP, HDR + (12 if source else 16))]
    p += [stx(4, FP, PKEY + 16, R1), ja("ports")]
    p.label("v6")
    p += [ldx(1, R1, FP, HDR + 6), jne(R1, IPPROTO_UDP, "out"), st(2, FP, PKEY + 8, AF_INET6)]
    for i in range(0, 16, 8):
        p += [ldx(8, R1, FP, HDR + (8 if source else 24) + i), stx(8, FP, PKEY + 16 + i, R1)]
    p.label("ports")  # a UDP datagram: its header (not read for TCP's packets)
    p += [ldx(2, R1, FP, buf + where["sk_buff.transport_header"]), add64(R8, R1)]
    read(p, FP, UDPH, 8, R8)
    p += [ldx(2, R1, FP, UDPH + (0 if source else 2)), stx(2, FP, PKEY + 10, R1)]
    # a UDP length below its own header's is not a datagram
    p += [ldx(2, R9, FP, UDPH + 4), endian(R9, 16), jlt(R9, 8, "out"), sub64(R9, 8)]


def _skip_known(p: Program) -> None:
    """R0 = conns entry of the sk at FP+KEY or NULL: jump to ``out`` when it is TCP or
    connected UDP; R7 = the entry (0 when unknown); the sk into PKEY."""
    p += [mov64(R7, R0), ldx(8, R1, FP, KEY), stx(8, FP, PKEY, R1), jeq(R7, 0, "known")]
    p += [ldx(1, R1, R7, off("proto")), jne(R1, IPPROTO_UDP, "out")]
    p += [ldx(2, R1, R7, off("dport")), jne(R1, 0, "out")]
    p.label("known")


def _count(p: Program, send: bool) -> None:
    """``peers[PKEY] += (R9 bytes, 1 datagram)`` in the direction; a new peer only while
    the socket's entry (R7, if any) has fewer than :data:`MAX_PEERS`."""
    nbytes = "bytes_sent" if send else "bytes_received"
    dgrams = "datagrams_sent" if send else "datagrams_received"
    b_off, d_off = getattr(PeerValue, nbytes).offset, getattr(PeerValue, dgrams).offset
    lookup(p, MAP_PEERS, PKEY)
    p += [jne(R0, 0, "add"), jeq(R7, 0, "create")]
    p += [ldx(1, R1, R7, off("peers")), jge(R1, MAX_PEERS, "out")]
    p += [add64(R1, 1), stx(1, R7, off("peers"), R1)]
    p.label("create")
    for i in range(0, 32, 8):
        p += st(8, FP, PVAL + i, 0)
    p += [stx(8, FP, PVAL + b_off, R9), st(8, FP, PVAL + d_off, 1)]
    create_entry(p, MAP_PEERS, PKEY, FP, PVAL, created="out", gone="out")
    p.label("add")
    p += [atomic_add(8, R0, b_off, R9), mov64(R1, 1), atomic_add(8, R0, d_off, R1)]
    p += ja("out")


def _out(p: Program) -> None:
    p.label("out")
    p += [mov64(R0, 0), exit_()]


def build_tx(
    offsets: Offsets, args: TracepointArgs | None = None, reads: KernelReads | None = None
) -> Program:
    """``net_dev_start_xmit``: count the destination of a UDP datagram for its socket.
    ``args`` is the context's layout (default: the raw tracepoint's), ``reads`` the
    helper that reads kernel memory."""
    p = Program(reads=reads)
    buf, where = _skb_fields(p, offsets, args or tracepoint_args(TP_TX))
    p += [ldx(8, R1, FP, buf + where["sk_buff.sk"]), jeq(R1, 0, "out"), stx(8, FP, KEY, R1)]
    lookup(p, MAP_CONNS, KEY)
    _skip_known(p)
    _peer_of(p, buf, where, source=False)
    _count(p, send=True)
    _out(p)
    return p


def build_rx(
    offsets: Offsets, args: TracepointArgs | None = None, reads: KernelReads | None = None
) -> Program:
    """``netif_receive_skb``: the source and length of a UDP datagram to this CPU's
    slot (emptied first: a packet that is not one leaves no stale peer)."""
    p = Program(reads=reads)
    p += [mov64(R6, R1), st(4, FP, TMP, 0)]
    lookup(p, MAP_SLOT, TMP)
    p += [jeq(R0, 0, "out"), st(2, R0, 8, 0), mov64(R1, R6)]
    buf, where = _skb_fields(p, offsets, args or tracepoint_args(TP_RX))
    _peer_of(p, buf, where, source=True)
    p += [stx(4, FP, PKEY + 12, R9), st(8, FP, PKEY, 0)]
    p += st(4, FP, TMP, 0)
    lookup(p, MAP_SLOT, TMP)
    p += jeq(R0, 0, "out")
    for i in range(0, 32, 8):
        p += [ldx(8, R1, FP, PKEY + i), stx(8, R0, i, R1)]
    _out(p)
    return p


def build_ready(
    offsets: Offsets, args: TracepointArgs | None = None, reads: KernelReads | None = None
) -> Program:
    """``sk_data_ready``: count this CPU's slot (if full) for ``sk``, and empty it."""
    del reads  # reads no kernel memory
    p = Program()
    args = args or tracepoint_args(TP_READY)
    p += [args.load(R1, R1, "sk"), stx(8, FP, KEY, R1), st(4, FP, TMP, 0)]
    lookup(p, MAP_SLOT, TMP)
    p += [jeq(R0, 0, "out"), ldx(2, R1, R0, 8), jeq(R1, 0, "out")]
    for i in range(0, 32, 8):
        p += [ldx(8, R1, R0, i), stx(8, FP, PKEY + i, R1)]
    p += [st(2, R0, 8, 0), ldx(4, R9, FP, PKEY + 12), st(4, FP, PKEY + 12, 0)]
    lookup(p, MAP_CONNS, KEY)
    _skip_known(p)
    _count(p, send=False)
    _out(p)
    return p


__all__ = ["MAX_PEERS", "PeerKey", "PeerValue", "build_ready", "build_rx", "build_tx"]
