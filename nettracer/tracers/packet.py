"""Decoding a dropped packet's own addresses from the bytes at its network header.

The drop monitor's ``--events`` program copies a fixed number of bytes starting at
``skb->head + skb->network_header`` (``unsigned char *head``, ``__u16
network_header``, offsets from BTF or guessed) into each ring-buffer record; this
module turns those bytes into addresses, ports and the ICMP type, with nothing but
the header formats of the RFCs:

* IPv4 (RFC 791): IHL in the low nibble of byte 0, protocol at 9, addresses at 12/16;
  the L4 header starts at ``IHL * 4``.  Fragments other than the first carry no L4
  header (fragment offset != 0).
* IPv6 (RFC 8200): next header at 6, addresses at 8/24; extension headers
  hop-by-hop (0), routing (43), destination options (60) are ``(len + 1) * 8`` bytes,
  the fragment header (44) is 8 bytes, AH (51) ``(len + 2) * 4``.
* ARP (RFC 826) for Ethernet/IPv4: sender and target protocol addresses.

Ethertype names: ``skb->protocol`` holds an ``ETH_P_*`` value in network order
(``include/uapi/linux/if_ether.h``, UAPI, so stable across kernels); the kernel has no
table of their names, so :data:`ETHERTYPES` is a small one of its own, for the
ones a drop monitor meets.  Values below ``ETH_P_802_3_MIN`` (0x0600) are Linux's
pseudo protocols, not ethertypes.
"""

from __future__ import annotations

import struct
import sys

from nettracer.value import Value

#: ETH_P_* (include/uapi/linux/if_ether.h) -> the name nettracer prints
ETHERTYPES: dict[int, str] = {
    0x0001: "802.3",  # ETH_P_802_3 (pseudo: raw 802.3 frames)
    0x0003: "ALL",  # ETH_P_ALL
    0x0004: "802.2",  # ETH_P_802_2
    0x0800: "IPv4",  # ETH_P_IP
    0x0806: "ARP",  # ETH_P_ARP
    0x0842: "WOL",  # ETH_P_WOL
    0x22F0: "TSN",  # ETH_P_TSN
    0x6558: "TEB",  # ETH_P_TEB (transparent Ethernet bridging)
    0x8035: "RARP",  # ETH_P_RARP
    0x8100: "802.1Q",  # ETH_P_8021Q
    0x86DD: "IPv6",  # ETH_P_IPV6
    0x8808: "PAUSE",  # ETH_P_PAUSE
    0x8847: "MPLS",  # ETH_P_MPLS_UC
    0x8848: "MPLS-MC",  # ETH_P_MPLS_MC
    0x8863: "PPPoE-D",  # ETH_P_PPP_DISC
    0x8864: "PPPoE",  # ETH_P_PPP_SES
    0x888E: "EAPOL",  # ETH_P_PAE
    0x88A8: "802.1AD",  # ETH_P_8021AD
    0x88CC: "LLDP",  # ETH_P_LLDP
    0x88E5: "MACsec",  # ETH_P_MACSEC
    0x88F7: "PTP",  # ETH_P_1588
    0x8906: "FCoE",  # ETH_P_FCOE
    0x894F: "NSH",  # ETH_P_NSH
    0x9000: "LOOP",  # ETH_P_LOOPBACK
}
_BY_NAME = {v.lower(): k for k, v in ETHERTYPES.items()}
_BY_NAME.update({"ip": 0x0800, "ip4": 0x0800, "ip6": 0x86DD, "vlan": 0x8100})

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806

#: IP protocol numbers (IANA; include/uapi/linux/in.h) nettracer names
IPPROTO_NAMES: dict[int, str] = {
    1: "ICMP",
    2: "IGMP",
    4: "IPIP",
    6: "TCP",
    17: "UDP",
    41: "IPv6",
    47: "GRE",
    50: "ESP",
    51: "AH",
    58: "ICMPv6",
    103: "PIM",
    112: "VRRP",
    132: "SCTP",
    136: "UDPLite",
}
_PORTS = frozenset({6, 17, 132, 136})  # TCP, UDP, SCTP, UDP-Lite: ports in the first 4 bytes
_V6_EXT = {0: "hop", 43: "routing", 60: "dstopts"}


def ethertype_name(value: int) -> str | None:
    """``"IPv4"`` for 0x0800; ``None`` for 0 (no protocol set); ``"0x1234"`` when unknown."""
    if value == 0:
        return None
    return ETHERTYPES.get(value, f"{value:#06x}")


def parse_ethertype(name: str) -> int:
    """The ETH_P_* value for a name (``IPv4``, ``ipv6``, ``arp``) or a number (``0x86dd``).

    Raises ValueError naming the known names."""
    key = name.strip().lower()
    if key in _BY_NAME:
        return _BY_NAME[key]
    try:
        value = int(key, 0)
    except ValueError:
        known = ", ".join(sorted(set(ETHERTYPES.values()), key=str.lower))
        raise ValueError(f"unknown protocol {name!r} (known: {known}, or a number)") from None
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"protocol {name!r} is not a 16-bit ethertype")
    return value


def ethertype_from_skb(raw: int) -> int:
    """``skb->protocol`` (``__be16``) as read into a little-endian u16 -> host order."""
    return int.from_bytes((raw & 0xFFFF).to_bytes(2, sys.byteorder), "big")  # ntohs


class Packet(Value):
    """What the header bytes say. Fields are None when the headers did not tell."""

    __slots__ = ("family", "src", "dst", "proto", "sport", "dport", "icmp_type", "icmp_code")  # noqa: RUF023 - field order

    def __init__(
        self,
        family: str | None = None,
        src: str | None = None,
        dst: str | None = None,
        proto: str | None = None,
        sport: int | None = None,
        dport: int | None = None,
        icmp_type: int | None = None,
        icmp_code: int | None = None,
    ) -> None:
        self.family = family  # "IPv4", "IPv6", "ARP"
        self.src = src
        self.dst = dst
        self.proto = proto  # "TCP", "UDP", "ICMP", ...
        self.sport = sport
        self.dport = dport
        self.icmp_type = icmp_type
        self.icmp_code = icmp_code

    def endpoints(self) -> str:
        """``10.0.0.1:5000 -> 10.0.0.2:53`` (IPv6 addresses in brackets when a port follows)."""
        if self.src is None or self.dst is None:
            return "-"
        return f"{_hostport(self.src, self.sport)} -> {_hostport(self.dst, self.dport)}"

    def describe(self) -> str:
        """One short phrase: ``UDP 10.0.0.1:5000 -> 10.0.0.2:53`` or ``ICMP type 8 ...``."""
        if self.family is None:
            return "-"
        parts = [self.proto or self.family]
        if self.icmp_type is not None:
            parts.append(f"type {self.icmp_type} code {self.icmp_code}")
        parts.append(self.endpoints())
        return " ".join(parts)

    def to_json(self) -> dict[str, object]:
        return {
            "family": self.family,
            "src": self.src,
            "dst": self.dst,
            "proto": self.proto,
            "sport": self.sport,
            "dport": self.dport,
            "icmp_type": self.icmp_type,
            "icmp_code": self.icmp_code,
        }


def _hostport(addr: str, port: int | None) -> str:
    if port is None:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def decode(ethertype: int, data: bytes) -> Packet:
    """Decode ``data`` (bytes from the network header on) of a packet of ``ethertype``.

    Short or malformed headers give a :class:`Packet` with what could be read;
    this never raises on bad input.
    """
    if ethertype == ETH_P_IP:
        return _ipv4(data)
    if ethertype == ETH_P_IPV6:
        return _ipv6(data)
    if ethertype == ETH_P_ARP:
        return _arp(data)
    return Packet()


def _ipv4(data: bytes) -> Packet:
    import ipaddress

    if len(data) < 20 or data[0] >> 4 != 4:
        return Packet(family="IPv4")
    ihl = (data[0] & 0x0F) * 4
    frag_off = struct.unpack_from("!H", data, 6)[0] & 0x1FFF
    proto = data[9]
    src = str(ipaddress.IPv4Address(data[12:16]))
    dst = str(ipaddress.IPv4Address(data[16:20]))
    l4 = data[ihl:] if ihl >= 20 and frag_off == 0 else b""
    return _l4(Packet(family="IPv4", src=src, dst=dst), proto, l4, icmp=1)


def _ipv6(data: bytes) -> Packet:
    import ipaddress

    if len(data) < 40 or data[0] >> 4 != 6:
        return Packet(family="IPv6")
    nxt = data[6]
    src = str(ipaddress.IPv6Address(data[8:24]))
    dst = str(ipaddress.IPv6Address(data[24:40]))
    off = 40
    for _ in range(8):  # a bounded walk over extension headers
        if nxt in _V6_EXT and off + 2 <= len(data):
            nxt, off = data[off], off + (data[off + 1] + 1) * 8
        elif nxt == 44 and off + 8 <= len(data):  # fragment header
            frag = struct.unpack_from("!H", data, off + 2)[0] >> 3
            nxt, off = data[off], off + 8
            if frag:
                return _l4(Packet(family="IPv6", src=src, dst=dst), nxt, b"", icmp=58)
        elif nxt == 51 and off + 2 <= len(data):  # AH
            nxt, off = data[off], off + (data[off + 1] + 2) * 4
        else:
            break
    return _l4(Packet(family="IPv6", src=src, dst=dst), nxt, data[off:], icmp=58)


def _l4(base: Packet, proto: int, l4: bytes, icmp: int) -> Packet:
    name = IPPROTO_NAMES.get(proto, str(proto))
    sport = dport = itype = icode = None
    if proto in _PORTS and len(l4) >= 4:
        sport, dport = struct.unpack_from("!HH", l4, 0)
    elif proto == icmp and len(l4) >= 2:
        itype, icode = l4[0], l4[1]
    return Packet(
        family=base.family,
        src=base.src,
        dst=base.dst,
        proto=name,
        sport=sport,
        dport=dport,
        icmp_type=itype,
        icmp_code=icode,
    )


def _arp(data: bytes) -> Packet:
    import ipaddress

    # struct arphdr: hrd, pro, hln, pln, op; then sha, spa, tha, tpa
    if len(data) < 8:
        return Packet(family="ARP")
    _hrd, pro, hln, pln, op = struct.unpack_from("!HHBBH", data, 0)
    if pro != ETH_P_IP or pln != 4 or len(data) < 8 + 2 * hln + 8:
        return Packet(family="ARP", proto=f"op {op}")
    spa = data[8 + hln : 12 + hln]
    tpa = data[12 + 2 * hln : 16 + 2 * hln]
    return Packet(
        family="ARP",
        src=str(ipaddress.IPv4Address(spa)),
        dst=str(ipaddress.IPv4Address(tpa)),
        proto={1: "request", 2: "reply"}.get(op, f"op {op}"),
    )


def original_length(ethertype: int, data: bytes, fallback: int) -> int:
    """The packet's length from its own network header: IPv4's total length (RFC 791),
    IPv6's payload length + 40 (RFC 8200); ``fallback`` (``skb->len``, which counts
    from ``skb->data`` and so may include a link-layer header) for anything else or a
    header too short to say."""
    if ethertype == 0x0800 and len(data) >= 4 and data[0] >> 4 == 4:
        return int.from_bytes(data[2:4], "big")
    if ethertype == 0x86DD and len(data) >= 6 and data[0] >> 4 == 6:
        return 40 + int.from_bytes(data[4:6], "big")
    return fallback
