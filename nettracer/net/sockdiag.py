"""Which UDP sockets exist in a network namespace: ``NETLINK_SOCK_DIAG`` dumps.

The kernel has no tracepoint for closing a UDP socket (``udp_lib_close`` ->
``sk_common_release`` fires none), so the connection tracer asks the kernel which UDP
sockets still exist, once per interval, the way ``ss -u`` does: a
``SOCK_DIAG_BY_FAMILY`` dump (``struct inet_diag_req_v2``, Linux 3.3) per family, over
a netlink socket created inside the namespace (:func:`nettracer.net.netns.netlink_socket_in`).

Written with the standard library rather than pyroute2's ``DiagSocket``: a dump answer
is an array of fixed-size ``struct inet_diag_msg`` headers (no attributes are asked
for, ``idiag_ext`` = 0), which ``struct.iter_unpack`` reads at a small fraction of the
cost of pyroute2's generic message parser, and a socket made in another namespace is
used as it is.

Layouts (``include/uapi/linux/inet_diag.h``, ``sock_diag.h``, ``netlink.h``)::

    struct nlmsghdr        { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }      16
    struct inet_diag_sockid { __be16 sport, dport; __be32 src[4], dst[4];
                              u32 if; u32 cookie[2]; }                            48
    struct inet_diag_req_v2 { u8 family, protocol, ext, pad; u32 states; sockid; }  56
    struct inet_diag_msg   { u8 family, state, timer, retrans; sockid;
                             u32 expires, rqueue, wqueue, uid, inode; }           72
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable

from nettracer.net.netns import NetnsIndex, NetnsNotFound, netlink_socket_in, open_netns

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBxI48x")
#: inet_diag_msg: family, state, sport, dport, src, dst (the rest is skipped)
_MSG = struct.Struct("=BB2x2s2s16s16s")
_MSG_SIZE = 72

#: a UDP socket's identity: (family, local address, local port, remote address, remote
#: port), addresses as the kernel stores them (4 bytes for AF_INET, 16 for AF_INET6),
#: ports in host order
UdpTuple = tuple[int, bytes, int, bytes, int]


def _dump_request(family: int, protocol: int, seq: int) -> bytes:
    body = _REQ.pack(family, protocol, 0, 0xFFFFFFFF)  # every state
    return (
        _NLMSGHDR.pack(16 + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
        + body
    )


def parse_dump(data: bytes, out: set[UdpTuple]) -> bool:
    """Add the sockets of one netlink datagram of a dump answer to ``out``; True when
    the datagram ends the dump (``NLMSG_DONE``).  Raises ``OSError`` on ``NLMSG_ERROR``."""
    pos = 0
    while pos + 16 <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, pos)
        if length < 16:
            return True
        if kind == NLMSG_DONE:
            return True
        if kind == NLMSG_ERROR:
            err = -struct.unpack_from("=i", data, pos + 16)[0]
            if err:
                raise OSError(err, os.strerror(err))
            return True
        if kind == SOCK_DIAG_BY_FAMILY and length >= 16 + _MSG_SIZE:
            fam, _, sport, dport, src, dst = _MSG.unpack_from(data, pos + 16)
            n = 4 if fam == socket.AF_INET else 16
            out.add((fam, src[:n], int.from_bytes(sport), dst[:n], int.from_bytes(dport)))
        pos += (length + 3) & ~3
    return False


class UdpSockets:
    """Dumps of the UDP sockets of network namespaces, by namespace inode.

    One ``NETLINK_SOCK_DIAG`` socket is kept per namespace asked about in the last
    call (an open socket keeps its namespace alive: the others are closed).
    """

    def __init__(self, index: NetnsIndex | None = None) -> None:
        self.index = index or NetnsIndex()
        self._socks: dict[int, socket.socket] = {}
        self._seq = 0

    def _socket(self, netns: int) -> socket.socket:
        sock = self._socks.get(netns)
        if sock is None:
            fd = open_netns(self.index.path(netns), netns)
            try:
                sock = netlink_socket_in(fd, NETLINK_SOCK_DIAG)
            finally:
                os.close(fd)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._socks[netns] = sock
        return sock

    def tuples(self, netns: int, families: Iterable[int]) -> set[UdpTuple] | None:
        """Every UDP socket of ``netns`` in ``families``; None when the namespace is
        gone (no socket of it can exist)."""
        try:
            sock = self._socket(netns)
        except NetnsNotFound:
            return None
        out: set[UdpTuple] = set()
        for family in families:
            self._seq += 1
            sock.send(_dump_request(family, socket.IPPROTO_UDP, self._seq))
            while not parse_dump(sock.recv(1 << 16), out):
                pass
        return out

    def keep_only(self, netns: Iterable[int]) -> None:
        """Close the sockets of namespaces not in ``netns``."""
        wanted = set(netns)
        for ns in [ns for ns in self._socks if ns not in wanted]:
            self._socks.pop(ns).close()

    def close(self) -> None:
        self.keep_only(())
