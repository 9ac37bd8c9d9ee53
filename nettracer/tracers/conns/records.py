"""The connection record shared by the kernel programs and user space.

One :class:`ConnValue` is the value of the kernel's connection map (an LRU hash keyed
by the ``struct sock *`` address) and, when a connection ends, the ring buffer record
that carries its final stats.  The program builder takes field offsets from it
(``ConnValue.bytes_sent.offset``) and the decoder unpacks it with :data:`RECORD`, a
``struct.Struct`` derived from the same ``_fields_``, so the layout is written once.

Kernel constants used here come from the UAPI headers: TCP states from
``include/net/tcp_states.h``, ``AF_INET``/``AF_INET6``, ``IPPROTO_TCP``/``IPPROTO_UDP``,
``MSG_PEEK`` from ``include/linux/socket.h``.
"""

from __future__ import annotations

import ctypes
import struct
from enum import IntEnum

#: low bits of an entry id that name its stream (``cpu << 2 | nesting level``) where ids
#: come from per-CPU counters (no ``BPF_FETCH`` before Linux 5.12); see ``table.py``
STREAM_BITS = 16


class ConnValue(ctypes.Structure):
    """``struct conn`` as the programs write it (176 bytes, naturally aligned).

    Addresses are kept as the kernel stores them (network order); ``sport`` is
    ``skc_num`` (host order), ``dport`` is ``skc_dport`` (``__be16``, swapped in user
    space).  ``history`` holds the last 16 TCP states, newest in the low nibble.
    ``tcp_*``/``segs``/``total_retrans``/``srtt_us``/``mdev_us`` are copies of the
    ``struct tcp_sock`` fields taken at state changes, at destruction and on refresh;
    for UDP ``segs_in``/``segs_out`` count datagrams; ``peers`` counts the peers of an
    unconnected UDP socket in the ``peers`` hash (:mod:`nettracer.tracers.conns.peers`).
    """

    _fields_ = [
        ("sk", ctypes.c_uint64),
        ("id", ctypes.c_uint64),
        ("start_ns", ctypes.c_uint64),
        ("last_ns", ctypes.c_uint64),
        ("end_ns", ctypes.c_uint64),
        ("bytes_sent", ctypes.c_uint64),
        ("bytes_received", ctypes.c_uint64),
        ("tcp_bytes_acked", ctypes.c_uint64),
        ("tcp_bytes_received", ctypes.c_uint64),
        ("history", ctypes.c_uint64),
        ("segs_in", ctypes.c_uint32),
        ("segs_out", ctypes.c_uint32),
        ("total_retrans", ctypes.c_uint32),
        ("srtt_us", ctypes.c_uint32),
        ("mdev_us", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("netns", ctypes.c_uint32),
        ("saddr4", ctypes.c_uint8 * 4),
        ("daddr4", ctypes.c_uint8 * 4),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("state", ctypes.c_uint8),
        ("opened", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("end_reason", ctypes.c_uint8),
        ("peers", ctypes.c_uint8),
        ("saddr6", ctypes.c_uint8 * 16),
        ("daddr6", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * 16),
    ]


def _struct_format(ctype: type[ctypes.Structure]) -> tuple[str, tuple[str, ...]]:
    """A ``struct`` format equivalent to ``ctype`` (arrays of bytes become ``Ns``) and the
    field names in order; checked against ctypes' own layout."""
    codes = {
        ctypes.c_uint64: "Q",
        ctypes.c_uint32: "I",
        ctypes.c_uint16: "H",
        ctypes.c_uint8: "B",
    }
    fmt = "<"
    names = []
    pos = 0
    for name, t in ctype._fields_:
        off = getattr(ctype, name).offset
        if off != pos:
            fmt += f"{off - pos}x"
        if t in codes:
            fmt += codes[t]
        else:  # byte arrays and char arrays
            fmt += f"{ctypes.sizeof(t)}s"
        names.append(name)
        pos = off + ctypes.sizeof(t)
    if pos != ctypes.sizeof(ctype):
        fmt += f"{ctypes.sizeof(ctype) - pos}x"
    if struct.calcsize(fmt) != ctypes.sizeof(ctype):
        raise AssertionError(f"{fmt} does not match {ctype.__name__}")
    return fmt, tuple(names)


_FMT, FIELDS = _struct_format(ConnValue)
#: unpacks one record (a ring buffer record or a map value) into a tuple in FIELDS order
RECORD = struct.Struct(_FMT)
RECORD_SIZE = RECORD.size
#: index of each field in an unpacked record
IDX = {name: i for i, name in enumerate(FIELDS)}


def off(name: str) -> int:
    """Byte offset of ``name`` in :class:`ConnValue` (for the program builder)."""
    return int(getattr(ConnValue, name).offset)


def size(name: str) -> int:
    return int(getattr(ConnValue, name).size)


class TcpState(IntEnum):
    """``enum { TCP_ESTABLISHED = 1, ... }`` (include/net/tcp_states.h); BOUND_INACTIVE
    since Linux 6.10."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12
    BOUND_INACTIVE = 13


STATE_NAMES: dict[int, str] = {s.value: s.name for s in TcpState}

AF_INET = 2
AF_INET6 = 10
IPPROTO_TCP = 6
IPPROTO_UDP = 17
MSG_PEEK = 2


class Opened(IntEnum):
    """How the tracer first saw the connection (``ConnValue.opened``)."""

    UNKNOWN = 0  #: already open when first seen
    ACTIVE = 1  #: TCP connect() (CLOSE -> SYN_SENT) / UDP: first datagram sent
    PASSIVE = 2  #: TCP accepted (LISTEN -> SYN_RECV) / UDP: first datagram received


class Flag(IntEnum):
    """Bits of ``ConnValue.flags``."""

    PID_KNOWN = 1  #: ``pid``/``comm`` were read in the owner's process context
    PARTIAL = 2  #: first seen after it opened: byte counts start at that moment


class EndReason(IntEnum):
    """Why a record left the kernel map (``ConnValue.end_reason``)."""

    OPEN = 0
    DESTROYED = 1  #: tcp:tcp_destroy_sock; UDP: no longer listed by NETLINK_SOCK_DIAG
    REUSED = 2  #: the socket got a new tuple (UDP connect/rebind, TCP reconnect)
    IDLE = 3  #: open but idle longer than the timeout (set by user space)


END_NAMES = {
    EndReason.OPEN: None,
    EndReason.DESTROYED: "closed",
    EndReason.REUSED: "reused",
    EndReason.IDLE: "idle",
}


def history_states(history: int) -> list[int]:
    """The states in ``ConnValue.history`` (4-bit nibbles, newest lowest), oldest first."""
    out = []
    while history:
        out.append(history & 0xF)
        history >>= 4
    out.reverse()
    return out
