"""A minimal rtnetlink client (standard library only) for the guesser's private
network namespaces: bring a link up, add an IPv4 address, create a veth pair whose
far end lives in another namespace, add a permanent neighbour.

Messages follow include/uapi/linux/rtnetlink.h, if_link.h, if_addr.h and veth.h:
``struct nlmsghdr`` (16 bytes), then ``struct ifinfomsg`` (16) or ``struct
ifaddrmsg`` (8), then 4-byte-aligned ``struct nlattr`` TLVs. Every request asks
for an ACK and a non-zero ``NLMSG_ERROR`` becomes an :class:`OSError`.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_NEWNEIGH = 28
NLM_F_REPLACE = 0x100
# enum NDA_* and NUD_PERMANENT (include/uapi/linux/neighbour.h)
NDA_DST = 1
NDA_LLADDR = 2
NUD_PERMANENT = 0x80
NLA_F_NESTED = 0x8000
# enum IFLA_*
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_LINKINFO = 18
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
# enum IFA_*
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFF_UP = 0x1


def attr(kind: int, payload: bytes) -> bytes:
    """One ``struct nlattr`` with its payload, padded to 4 bytes."""
    length = 4 + len(payload)
    return struct.pack("<HH", length, kind) + payload + b"\0" * (-length % 4)


def ifinfomsg(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return struct.pack("<BxHiII", socket.AF_UNSPEC, 0, index, flags, change)


class Rtnl:
    """A NETLINK_ROUTE socket bound to the network namespace of the thread that made it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, msg_type: int, body: bytes, flags: int = 0) -> None:
        """Send one request and wait for its ACK; OSError(errno) on failure."""
        self.seq += 1
        hdr = struct.pack(
            "<IHHII", 16 + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK | flags, self.seq, 0
        )
        self.sock.send(hdr + body)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, kind, _, seq, _ = struct.unpack_from("<IHHII", data, off)
                if kind == NLMSG_ERROR and seq == self.seq:
                    (err,) = struct.unpack_from("<i", data, off + 16)
                    if err:
                        raise OSError(-err, os.strerror(-err))
                    return
                off += max(16, (length + 3) & ~3)

    def link_up(self, index: int) -> None:
        """``ip link set dev <index> up``."""
        self.request(RTM_NEWLINK, ifinfomsg(index, IFF_UP, IFF_UP))

    def add_ipv4(self, index: int, address: str, prefixlen: int) -> None:
        """``ip addr add <address>/<prefixlen> dev <index>``."""
        packed = socket.inet_aton(address)
        body = struct.pack("<BBBBI", socket.AF_INET, prefixlen, 0, 0, index)
        body += attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed)
        self.request(RTM_NEWADDR, body, NLM_F_CREATE | NLM_F_EXCL)

    def add_neigh(self, index: int, address: str, lladdr: bytes) -> None:
        """``ip neigh replace <address> lladdr <lladdr> dev <index> nud permanent``."""
        body = struct.pack("<BxxxiHBB", socket.AF_INET, index, NUD_PERMANENT, 0, 0)
        body += attr(NDA_DST, socket.inet_aton(address)) + attr(NDA_LLADDR, lladdr)
        self.request(RTM_NEWNEIGH, body, NLM_F_CREATE | NLM_F_REPLACE)

    def add_veth(
        self,
        name: str,
        index: int,
        peer_name: str,
        peer_index: int,
        peer_netns_fd: int,
        mac: bytes | None = None,
        peer_mac: bytes | None = None,
    ) -> None:
        """``ip link add <name> index <index> [address <mac>] type veth peer name
        <peer_name> index <peer_index> [address <peer_mac>] netns <fd>`` (veth: Linux
        2.6.24; chosen ifindex: 3.7)."""
        peer = ifinfomsg(peer_index) + attr(IFLA_IFNAME, peer_name.encode() + b"\0")
        peer += attr(IFLA_NET_NS_FD, struct.pack("<I", peer_netns_fd))
        if peer_mac is not None:
            peer += attr(IFLA_ADDRESS, peer_mac)
        info = attr(IFLA_INFO_KIND, b"veth\0")
        info += attr(IFLA_INFO_DATA | NLA_F_NESTED, attr(VETH_INFO_PEER | NLA_F_NESTED, peer))
        body = ifinfomsg(index) + attr(IFLA_IFNAME, name.encode() + b"\0")
        if mac is not None:
            body += attr(IFLA_ADDRESS, mac)
        body += attr(IFLA_LINKINFO | NLA_F_NESTED, info)
        try:
            self.request(RTM_NEWLINK, body, NLM_F_CREATE | NLM_F_EXCL)
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                raise OSError(exc.errno, "veth devices not supported (CONFIG_VETH)") from None
            raise
