"""A connection as user space sees it, decoded from a :class:`ConnValue` record.

Direction: ``local`` when the peer is this host (a loopback address, or the remote
address equals the local one), else ``outgoing`` for a TCP ``connect()`` / a UDP flow
whose first datagram was sent, ``incoming`` for an accepted TCP connection / a UDP flow
that started with a received datagram, ``unknown`` for a connection that was already
open when the tracer started.  ``opened`` keeps who opened it even for local ones.

Byte counts come from ``sock:sock_send_length``/``sock_recv_length`` (exact application
bytes, Linux 6.3+).  On older kernels TCP bytes come from ``tcp_sock.bytes_acked`` /
``bytes_received``, which count the SYN (``bytes_acked`` of the side that connected)
and the FINs in sequence space; :func:`tcp_data_bytes` takes them out again from the
state history (RFC 4898 ``tcpEStatsAppHCThruOctetsAcked`` semantics, net/ipv4/tcp_input.c
``tcp_snd_una_update``/``tcp_rcv_nxt_update``).
"""

from __future__ import annotations

import itertools
import socket
from dataclasses import dataclass, field

from nettracer.tracers.conns_record import (
    AF_INET6,
    END_NAMES,
    IDX,
    IPPROTO_TCP,
    STATE_NAMES,
    Flag,
    Opened,
    TcpState,
    history_states,
)

_I = IDX
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"
_V6_LOOPBACK = b"\0" * 15 + b"\x01"

#: counters whose change since the previous interval is reported as ``delta``
COUNTERS: tuple[str, ...] = ("bytes_sent", "bytes_received", "segs_in", "segs_out", "retransmits")


@dataclass(slots=True)
class Conn:
    """One connection (TCP) or flow (UDP socket) with its stats."""

    id: int
    sk: int
    pid: int | None
    comm: str
    proto: str
    family: int
    saddr: str
    sport: int
    daddr: str
    dport: int
    netns: int
    direction: str
    opened: str
    state: str
    states: list[str]
    bytes_sent: int
    bytes_received: int
    segs_in: int
    segs_out: int
    retransmits: int
    rtt_us: int | None
    rtt_var_us: int | None
    start_ns: int
    last_ns: int
    end_ns: int
    partial: bool
    end: str | None
    #: raw addresses (network order) for route lookups
    saddr_raw: bytes = b""
    daddr_raw: bytes = b""
    #: counters at the previous report, for deltas
    prev: tuple[int, ...] = field(default=(0, 0, 0, 0, 0))
    gateway: dict[str, object] | None = None

    def counters(self) -> tuple[int, int, int, int, int]:
        return (self.bytes_sent, self.bytes_received, self.segs_in, self.segs_out, self.retransmits)

    def delta(self) -> dict[str, int]:
        return {
            k: now - before
            for k, now, before in zip(COUNTERS, self.counters(), self.prev, strict=True)
        }

    def duration_ms(self, now_ns: int) -> float:
        end = self.end_ns or now_ns
        return max(0, end - self.start_ns) / 1e6


def is_local(family: int, saddr: bytes, daddr: bytes) -> bool:
    """The peer is this host: loopback destination, or destination == source."""
    if family == 4:
        return daddr[0] == 127 or (daddr == saddr and daddr != b"\0\0\0\0")
    return daddr == _V6_LOOPBACK or (daddr == saddr and daddr != b"\0" * 16)


def _state_name(proto: int, state: int) -> str:
    if proto != IPPROTO_TCP:
        # UDP sockets use TCP_ESTABLISHED once connect()ed, TCP_CLOSE otherwise (ss: UNCONN)
        return "ESTABLISHED" if state == TcpState.ESTABLISHED else "UNCONN"
    return STATE_NAMES.get(state, str(state))


def tcp_data_bytes(acked: int, received: int, opened: int, states: list[int]) -> tuple[int, int]:
    """Application bytes from ``tcp_sock.bytes_acked``/``bytes_received``.

    ``bytes_acked`` counts our SYN when we connected and our FIN once acked;
    ``bytes_received`` counts the peer's FIN.  Both are inferred from the state
    history: FIN acked = we reached FIN_WAIT2, or left CLOSING/LAST_ACK for CLOSE;
    FIN received = CLOSE_WAIT/CLOSING/LAST_ACK, or FIN_WAIT2 -> CLOSE (TIME_WAIT).
    A FIN_WAIT2 that timed out without a FIN is indistinguishable from TIME_WAIT and
    is under-counted by one byte.
    """
    S = TcpState
    seen = set(states)
    pairs = set(itertools.pairwise(states))
    sent = acked
    if opened == Opened.ACTIVE and S.ESTABLISHED in seen:
        sent -= 1
    if S.FIN_WAIT2 in seen or (S.CLOSING, S.CLOSE) in pairs or (S.LAST_ACK, S.CLOSE) in pairs:
        sent -= 1
    got = received
    if seen & {S.CLOSE_WAIT, S.CLOSING, S.LAST_ACK} or (S.FIN_WAIT2, S.CLOSE) in pairs:
        got -= 1
    return max(0, sent), max(0, got)


def decode(rec: tuple, bytes_from_tcp_sock: bool = False) -> Conn:
    """A :class:`Conn` from an unpacked record (:data:`~conns_record.RECORD`)."""
    proto = rec[_I["proto"]]
    fam = rec[_I["family"]]
    if fam == AF_INET6:
        s_raw, d_raw = rec[_I["saddr6"]], rec[_I["daddr6"]]
        if d_raw.startswith(_V4_MAPPED) and (
            s_raw.startswith(_V4_MAPPED) or s_raw == b"\0" * 16
        ):  # an IPv4 peer of a dual-stack socket: IPv4 on the wire
            family, s_raw, d_raw = 4, s_raw[12:], d_raw[12:]
        else:
            family = 6
    else:
        family, s_raw, d_raw = 4, rec[_I["saddr4"]], rec[_I["daddr4"]]
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    opened = rec[_I["opened"]]
    flags = rec[_I["flags"]]
    hist = history_states(rec[_I["history"]])
    tcp = proto == IPPROTO_TCP
    if tcp and bytes_from_tcp_sock:
        sent, got = tcp_data_bytes(
            rec[_I["tcp_bytes_acked"]], rec[_I["tcp_bytes_received"]], opened, hist
        )
    else:
        sent, got = rec[_I["bytes_sent"]], rec[_I["bytes_received"]]
    if is_local(family, s_raw, d_raw):
        direction = "local"
    else:
        direction = ("unknown", "outgoing", "incoming")[opened if opened < 3 else 0]
    dport = rec[_I["dport"]]
    return Conn(
        id=rec[_I["id"]],
        sk=rec[_I["sk"]],
        pid=rec[_I["pid"]] if flags & Flag.PID_KNOWN else None,
        comm=rec[_I["comm"]].split(b"\0", 1)[0].decode(errors="replace")
        if flags & Flag.PID_KNOWN
        else "",
        proto="tcp" if tcp else "udp",
        family=family,
        saddr=socket.inet_ntop(af, s_raw),
        sport=rec[_I["sport"]],
        daddr=socket.inet_ntop(af, d_raw),
        dport=((dport & 0xFF) << 8) | (dport >> 8),
        netns=rec[_I["netns"]],
        direction=direction,
        opened=("unknown", "active", "passive")[opened if opened < 3 else 0],
        state=_state_name(proto, rec[_I["state"]]),
        states=[STATE_NAMES.get(s, str(s)) for s in hist] if tcp else [],
        bytes_sent=sent,
        bytes_received=got,
        segs_in=rec[_I["segs_in"]],
        segs_out=rec[_I["segs_out"]],
        retransmits=rec[_I["total_retrans"]] if tcp else 0,
        rtt_us=rec[_I["srtt_us"]] >> 3 if tcp else None,
        rtt_var_us=rec[_I["mdev_us"]] >> 2 if tcp else None,
        start_ns=rec[_I["start_ns"]],
        last_ns=rec[_I["last_ns"]],
        end_ns=rec[_I["end_ns"]],
        partial=bool(flags & Flag.PARTIAL),
        end=END_NAMES.get(rec[_I["end_reason"]]),
        saddr_raw=bytes(s_raw),
        daddr_raw=bytes(d_raw),
    )
