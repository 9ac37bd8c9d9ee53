"""Expected values: ground truth about our own sockets, as the kernel tells it to their
owner (``getsockname``/``getpeername``, ``SO_TYPE``/``SO_PROTOCOL`` and ``TCP_INFO``),
turned into what each catalogue field must hold, as
:mod:`nettracer.layout.guess.matchers` matchers keyed by catalogue key.
"""

from __future__ import annotations

import socket
import struct

from nettracer.layout.guess.matchers import Exact, Matcher, Shifted, be16, u16, u32, u64

#: ``struct tcp_info`` (include/uapi/linux/tcp.h): field -> (offset, struct format)
TCP_INFO_FIELDS: dict[str, tuple[int, str]] = {
    "state": (0, "B"),
    "unacked": (24, "I"),
    "rtt": (68, "I"),  # srtt_us >> 3
    "rttvar": (72, "I"),  # mdev_us >> 2
    "total_retrans": (100, "I"),
    "bytes_acked": (120, "Q"),  # Linux 4.1
    "bytes_received": (128, "Q"),  # Linux 4.1
    "segs_out": (136, "I"),  # Linux 4.2
    "segs_in": (140, "I"),  # Linux 4.2
}


def tcp_info(sock: socket.socket) -> dict[str, int]:
    """The :data:`TCP_INFO_FIELDS` this kernel reports for ``sock``."""
    buf = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    out = {}
    for name, (off, fmt) in TCP_INFO_FIELDS.items():
        if off + struct.calcsize(fmt) <= len(buf):
            out[name] = struct.unpack_from("<" + fmt, buf, off)[0]
    return out


def tcp_expectations(info: dict[str, int]) -> dict[str, Matcher]:
    """What ``TCP_INFO`` says about ``struct tcp_sock`` (tcp_get_info() in net/ipv4/tcp.c)."""
    exp: dict[str, Matcher] = {}
    if info.get("rtt"):
        exp["tcp_sock.srtt_us"] = Shifted(info["rtt"], 3)
        exp["tcp_sock.mdev_us"] = Shifted(info["rttvar"], 2)
    for key, name in (
        ("tcp_sock.bytes_received", "bytes_received"),
        ("tcp_sock.bytes_acked", "bytes_acked"),
    ):
        if name in info:
            exp[key] = u64(info[name])
    for key, name in (
        ("tcp_sock.total_retrans", "total_retrans"),
        ("tcp_sock.segs_in", "segs_in"),
        ("tcp_sock.segs_out", "segs_out"),
    ):
        if name in info:
            exp[key] = u32(info[name])
    return exp


def v4_of(addr: str) -> bytes | None:
    """The IPv4 address of an AF_INET or v4-mapped AF_INET6 sockaddr host, else None."""
    if ":" not in addr:
        return socket.inet_aton(addr)
    packed = socket.inet_pton(socket.AF_INET6, addr.split("%")[0])
    if packed[:12] == b"\0" * 10 + b"\xff\xff":
        return packed[12:]
    return None


def sock_expectations(sock: socket.socket, peer_hint: tuple | None = None) -> dict[str, Matcher]:
    """What a socket's own view of itself says about ``struct sock`` (net/ipv4/af_inet.c
    inet_getname(), net/ipv6/af_inet6.c inet6_getname())."""
    fam = sock.family
    typ = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    proto = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
    exp: dict[str, Matcher] = {
        "sock_common.skc_family": u16(fam),
        "sock.sk_type": u16(typ),
        "sock.sk_protocol": u16(proto),
    }
    if fam not in (socket.AF_INET, socket.AF_INET6):
        return exp  # AF_UNIX: a third family; addresses and ports do not apply
    local = sock.getsockname()
    try:
        peer = sock.getpeername()
    except OSError:
        peer = peer_hint
    # datagram sockets: TCP_ESTABLISHED after connect(), else TCP_CLOSE
    state = tcp_info(sock)["state"] if typ == socket.SOCK_STREAM else (1 if peer else 7)
    exp["sock_common.skc_state"] = Exact(bytes([state]))
    if typ != socket.SOCK_RAW:  # raw sockets keep the protocol in inet_num/inet_sport
        exp["sock_common.skc_num"] = u16(local[1])
        exp["sock_common.skc_dport"] = be16(peer[1] if peer else 0)
    loc4 = v4_of(local[0])
    peer4 = v4_of(peer[0]) if peer else b"\0" * 4
    if loc4 is not None and peer4 is not None:
        exp["sock_common.skc_rcv_saddr"] = Exact(loc4, 4)
        exp["sock_common.skc_daddr"] = Exact(peer4, 4)
    if fam == socket.AF_INET6:
        exp["sock_common.skc_v6_rcv_saddr"] = Exact(socket.inet_pton(fam, local[0]), 4)
        exp["sock_common.skc_v6_daddr"] = Exact(
            socket.inet_pton(fam, peer[0]) if peer else b"\0" * 16, 4
        )
    return exp
