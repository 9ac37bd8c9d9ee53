"""A connection as user space sees it, decoded from a :class:`ConnValue` record.

Direction: ``local`` when the peer is this host (a loopback address, or the remote
address equals the local one), else ``outgoing`` for a TCP ``connect()`` / a UDP flow
whose first datagram was sent, ``incoming`` for an accepted TCP connection / a UDP flow
that started with a received datagram, ``unknown`` for a connection that was already
open when the tracer started.  ``opened`` keeps who opened it even for local ones.

A UDP "connection" is a socket: its state is ESTABLISHED once ``connect()``ed
(``sk_state`` is TCP_ESTABLISHED) and UNCONN otherwise, like ``ss`` shows it.

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
from typing import Any

from nettracer.tracers.conns.records import (
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
    states: tuple[str, ...]
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
    #: the route to a non-local peer (a :class:`nettracer.net.gateway.Gateway`)
    gateway: Any = None
    #: an unconnected UDP socket's peers: (family, address, port, bytes sent, received,
    #: datagrams sent, received) each (:mod:`nettracer.tracers.conns.peers`); None for
    #: other connections or when peers are not counted
    peers: list[tuple[Any, ...]] | None = None

    def peer_fields(self) -> dict[str, Any]:
        """``{"peers": [...], "unattributed": {...}}`` for an unconnected UDP socket whose
        peers are counted (else ``{}``): each peer's address, port, bytes and datagrams
        each way, and what the socket's totals hold beyond the sum over its peers."""
        if self.peers is None:
            return {}
        names = ("bytes_sent", "bytes_received", "datagrams_sent", "datagrams_received")
        totals = (self.bytes_sent, self.bytes_received, self.segs_out, self.segs_in)
        shown = []
        sums = [0, 0, 0, 0]
        for _family, addr, port, *counts in sorted(self.peers):
            shown.append(
                {"addr": addr_text(addr), "port": port, **dict(zip(names, counts, strict=True))}
            )
            sums = [a + b for a, b in zip(sums, counts, strict=True)]
        rest = {n: max(0, t - s) for n, t, s in zip(names, totals, sums, strict=True)}
        return {"peers": shown, "unattributed": rest}

    def counters(self) -> tuple[int, int, int, int, int]:
        return (self.bytes_sent, self.bytes_received, self.segs_in, self.segs_out, self.retransmits)

    def delta(self) -> dict[str, int]:
        return {
            k: now - before
            for k, now, before in zip(COUNTERS, self.counters(), self.prev, strict=True)
        }

    def duration_ms(self, now_ns: int) -> float:
        """Milliseconds with µs resolution (rounded half up) until the end or ``now_ns``."""
        end = self.end_ns or now_ns
        return ((end - self.start_ns + 500) // 1000 if end > self.start_ns else 0) / 1000


def is_local(family: int, saddr: bytes, daddr: bytes) -> bool:
    """The peer is this host: loopback destination, or destination == source."""
    if family == 4:
        return daddr[0] == 127 or (daddr == saddr and daddr != b"\0\0\0\0")
    return daddr == _V6_LOOPBACK or (daddr == saddr and daddr != b"\0" * 16)


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


# record field positions, resolved once
(_SK, _ID, _START, _LAST, _END, _SENT, _RECV, _ACKED, _TCPRECV, _HIST, _SEGS_IN, _SEGS_OUT,
 _RETRANS, _SRTT, _MDEV, _PID, _NETNS, _SADDR4, _DADDR4, _SPORT, _DPORT, _FAMILY, _PROTO,
 _STATE, _OPENED, _FLAGS, _END_REASON, _SADDR6, _DADDR6, _COMM) = (
    _I[n] for n in (
        "sk", "id", "start_ns", "last_ns", "end_ns", "bytes_sent", "bytes_received",
        "tcp_bytes_acked", "tcp_bytes_received", "history", "segs_in", "segs_out",
        "total_retrans", "srtt_us", "mdev_us", "pid", "netns", "saddr4", "daddr4", "sport",
        "dport", "family", "proto", "state", "opened", "flags", "end_reason", "saddr6",
        "daddr6", "comm",
    )
)  # fmt: skip

_OPENED_NAMES = ("unknown", "active", "passive")
_DIRECTIONS = ("unknown", "outgoing", "incoming")
_ZERO16 = b"\0" * 16


class _Cache(dict):  # type: ignore[type-arg]
    """A dict that empties itself when it reaches ``limit`` entries (decoding caches)."""

    def __init__(self, limit: int = 65536) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: object, value: object) -> None:
        if len(self) >= self.limit:
            self.clear()
        self[key] = value


#: address bytes -> text (shared with the output's fast path)
ADDR_TEXT = _Cache()
_comms = _Cache(4096)
_histories = _Cache(4096)


def addr_text(raw: bytes) -> str:
    """``inet_ntop`` of 4 or 16 network-order bytes (cached)."""
    text = ADDR_TEXT.get(raw)
    if text is None:
        text = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
        ADDR_TEXT.put(raw, text)
    return text


def comm_text(raw: bytes) -> str:
    """``task->comm`` bytes as text (cached)."""
    text = _comms.get(raw)
    if text is None:
        text = raw.split(b"\0", 1)[0].decode(errors="replace")
        _comms.put(raw, text)
    return text


def history(value: int) -> tuple[list[int], tuple[str, ...]]:
    """``ConnValue.history`` as states and their names, oldest first (cached)."""
    got = _histories.get(value)
    if got is None:
        states = history_states(value)
        got = (states, tuple(STATE_NAMES.get(s, str(s)) for s in states))
        _histories.put(value, got)
    return got


def wire_addresses(rec: tuple) -> tuple[int, bytes, bytes]:
    """(family, source bytes, destination bytes) of an unpacked record as on the wire:
    an IPv4 peer of a dual-stack socket (v4-mapped ``::ffff:a.b.c.d``) is IPv4."""
    if rec[_FAMILY] == AF_INET6:
        s_raw, d_raw = rec[_SADDR6], rec[_DADDR6]
        if d_raw.startswith(_V4_MAPPED) and (s_raw.startswith(_V4_MAPPED) or s_raw == _ZERO16):
            return 4, s_raw[12:], d_raw[12:]
        return 6, s_raw, d_raw
    return 4, rec[_SADDR4], rec[_DADDR4]


def udp_tuple(rec: tuple) -> tuple[int, bytes, int, bytes, int]:
    """A record's socket as NETLINK_SOCK_DIAG lists it (:data:`nettracer.net.sockdiag.
    UdpTuple`): family, local address, local port, remote address, remote port (host
    order), addresses of the socket's own family (v4-mapped stays IPv6)."""
    dport = rec[_DPORT]
    dport = ((dport & 0xFF) << 8) | (dport >> 8)
    if rec[_FAMILY] == AF_INET6:
        return AF_INET6, rec[_SADDR6], rec[_SPORT], rec[_DADDR6], dport
    return 2, rec[_SADDR4], rec[_SPORT], rec[_DADDR4], dport


def route_of(rec: tuple) -> tuple[int, bytes, bytes] | None:
    """(namespace inode, source, destination) of a record whose peer is another host
    (what its gateway depends on), None for a local peer or no peer (unconnected UDP)."""
    family, s_raw, d_raw = wire_addresses(rec)
    if is_local(family, s_raw, d_raw) or not d_raw.strip(b"\0"):
        return None
    return rec[_NETNS], s_raw, d_raw


def decode(rec: tuple, bytes_from_tcp_sock: bool = False) -> Conn:
    """A :class:`Conn` from an unpacked record (:data:`~conns_record.RECORD`)."""
    proto = rec[_PROTO]
    family, s_raw, d_raw = wire_addresses(rec)
    opened = rec[_OPENED]
    if opened > 2:
        opened = 0
    flags = rec[_FLAGS]
    tcp = proto == IPPROTO_TCP
    if tcp:
        hist, states = history(rec[_HIST])
        if bytes_from_tcp_sock:
            sent, got = tcp_data_bytes(rec[_ACKED], rec[_TCPRECV], opened, hist)
        else:
            sent, got = rec[_SENT], rec[_RECV]
        state = STATE_NAMES.get(rec[_STATE], str(rec[_STATE]))
    else:
        states = ()
        sent, got = rec[_SENT], rec[_RECV]
        state = "ESTABLISHED" if rec[_STATE] == TcpState.ESTABLISHED else "UNCONN"
    known = flags & Flag.PID_KNOWN
    dport = rec[_DPORT]
    return Conn(
        rec[_ID],
        rec[_SK],
        rec[_PID] if known else None,
        comm_text(rec[_COMM]) if known else "",
        "tcp" if tcp else "udp",
        family,
        addr_text(s_raw),
        rec[_SPORT],
        addr_text(d_raw),
        ((dport & 0xFF) << 8) | (dport >> 8),
        rec[_NETNS],
        "local" if is_local(family, s_raw, d_raw) else _DIRECTIONS[opened],
        _OPENED_NAMES[opened],
        state,
        states,
        sent,
        got,
        rec[_SEGS_IN],
        rec[_SEGS_OUT],
        rec[_RETRANS] if tcp else 0,
        rec[_SRTT] >> 3 if tcp else None,
        rec[_MDEV] >> 2 if tcp else None,
        rec[_START],
        rec[_LAST],
        rec[_END],
        bool(flags & Flag.PARTIAL),
        END_NAMES.get(rec[_END_REASON]),
        s_raw,
        d_raw,
    )
