"""Dropped packets as pcapng, for Wireshark and tshark (``nettracer drops --pcap FILE``).

A small writer of our own, with nothing but :mod:`struct`: the format is a handful of
blocks (draft-ietf-opsawg-pcapng), and the alternatives are heavy to import (scapy
takes longer to import than the drop monitor takes to start) or unmaintained
(python-pcapng).  What is written:

* one Section Header Block (byte order of this machine, ``shb_userappl``);
* one Interface Description Block per (network namespace, device) the drops came
  from, in the order they first appear: ``if_name`` is the device's name (``-``
  for drops without a device), ``if_description`` names the namespace inode and the
  ifindex, ``if_tsresol`` is nanoseconds, the link type is ``LINKTYPE_LINUX_SLL``
  (113): a 16-byte pseudo header carrying ``skb->protocol``, so that IPv4, IPv6, ARP
  and any other ethertype the kernel holds decode in one interface;
* one Enhanced Packet Block per dropped packet: the wall-clock time of the drop,
  the bytes copied from the packet's network header (at most the snap length), the
  original length, and an ``opt_comment`` naming the drop (reason, location, module,
  device, namespace, task), so that ``frame.comment contains "NO_SOCKET"`` finds them;
* at the end, one Interface Statistics Block per interface with the packets written
  and, as its comment, the number of drops the capture misses (events lost by the
  kernel side, or packets left out once ``--pcap-max-mb`` was reached).
"""

from __future__ import annotations

import struct
from typing import BinaryIO

#: LINKTYPE_LINUX_SLL (https://www.tcpdump.org/linktypes/LINKTYPE_LINUX_SLL.html)
LINKTYPE_LINUX_SLL = 113
#: sll_pkttype: we do not know the direction of a dropped packet; PACKET_HOST (0) is
#: what most drops are (received for this host)
PACKET_HOST = 0
#: sll_hatype ARPHRD_NONE: no link-layer address is carried
ARPHRD_NONE = 0xFFFE
SLL_HEADER = 16

_SHB, _IDB, _ISB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000005, 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_END, _OPT_COMMENT = 0, 1
_SHB_USERAPPL = 4
_IF_NAME, _IF_DESCRIPTION, _IF_TSRESOL = 2, 3, 9
_ISB_STARTTIME, _ISB_ENDTIME, _ISB_IFRECV = 2, 3, 4


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("=HH", code, len(value)) + _pad4(value)


def _options(opts: list[tuple[int, bytes]]) -> bytes:
    if not opts:
        return b""
    return b"".join(_option(c, v) for c, v in opts) + struct.pack("=HH", _OPT_END, 0)


def _block(kind: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("=II", kind, total) + body + struct.pack("=I", total)


def _ts(epoch_ns: int) -> bytes:
    """A 64-bit timestamp in units of ``if_tsresol`` (ns) as two u32, high first."""
    return struct.pack("=II", (epoch_ns >> 32) & 0xFFFFFFFF, epoch_ns & 0xFFFFFFFF)


def sll_header(ethertype: int) -> bytes:
    """The ``LINKTYPE_LINUX_SLL`` pseudo header for a packet of ``ethertype``."""
    return struct.pack(">HHH8sH", PACKET_HOST, ARPHRD_NONE, 0, b"", ethertype)


class PcapngWriter:
    """Writes a pcapng section to ``stream`` (a binary file or pipe), block by block.

    ``snaplen`` bounds the bytes kept of each packet (after the pseudo header).
    ``max_bytes`` (None: no limit) stops the capture before the file would pass it;
    packets left out are counted in :attr:`left_out` and said in the statistics.
    """

    def __init__(
        self, stream: BinaryIO, snaplen: int, max_bytes: int | None = None, app: str = "nettracer"
    ) -> None:
        self.stream = stream
        self.snaplen = snaplen
        self.max_bytes = max_bytes
        self.written = 0
        self.left_out = 0
        self.full = False
        self._ifaces: dict[tuple[int, str], int] = {}
        self._counts: list[int] = []
        self._first_ns: int | None = None
        self._last_ns = 0
        body = struct.pack("=IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1)
        self._write(_block(_SHB, body + _options([(_SHB_USERAPPL, app.encode())])))

    def _write(self, data: bytes) -> None:
        self.stream.write(data)
        self.written += len(data)

    def interface(self, netns: int, device: str | None, ifindex: int) -> int:
        """The interface id of (``netns``, ``device``); its IDB is written when first seen."""
        key = (netns, device or "")
        if key in self._ifaces:
            return self._ifaces[key]
        opts = [
            (_IF_NAME, (device or "-").encode()),
            (_IF_DESCRIPTION, f"netns {netns or '-'} ifindex {ifindex or '-'}".encode()),
            (_IF_TSRESOL, bytes([9])),
        ]
        body = struct.pack("=HHI", LINKTYPE_LINUX_SLL, 0, self.snaplen + SLL_HEADER)
        self._write(_block(_IDB, body + _options(opts)))
        self._ifaces[key] = len(self._counts)
        self._counts.append(0)
        return self._ifaces[key]

    def packet(
        self,
        iface: int,
        epoch_ns: int,
        ethertype: int,
        data: bytes,
        orig_len: int,
        comment: str,
    ) -> bool:
        """One EPB; False (and counted in :attr:`left_out`) once the size limit is reached."""
        captured = sll_header(ethertype) + data[: self.snaplen]
        body = struct.pack("=I", iface) + _ts(epoch_ns)
        body += struct.pack("=II", len(captured), max(orig_len, len(data)) + SLL_HEADER)
        block = _block(_EPB, body + _pad4(captured) + _options([(_OPT_COMMENT, comment.encode())]))
        if self.full or (self.max_bytes is not None and self.written + len(block) > self.max_bytes):
            self.full = True
            self.left_out += 1
            return False
        self._write(block)
        self._counts[iface] += 1
        if self._first_ns is None:
            self._first_ns = epoch_ns
        self._last_ns = max(self._last_ns, epoch_ns)
        return True

    def statistics(self, now_ns: int, lost: int) -> None:
        """One ISB per interface: packets written, and what the capture misses (an
        interface ``-`` is described first when nothing was written, so that even an
        empty capture says how many it misses)."""
        if not self._counts:
            self.interface(0, None, 0)
        missing = lost + self.left_out
        note = f"nettracer: {missing} dropped packets are not in this capture"
        if self.left_out:
            note += f" ({self.left_out} after the size limit was reached)"
        for iface, count in enumerate(self._counts):
            opts = [
                (_ISB_STARTTIME, _ts(self._first_ns or now_ns)),
                (_ISB_ENDTIME, _ts(now_ns)),
                (_ISB_IFRECV, struct.pack("=Q", count)),
                (_OPT_COMMENT, note.encode()),
            ]
            body = struct.pack("=I", iface) + _ts(now_ns)
            self._write(_block(_ISB, body + _options(opts)))

    def flush(self) -> None:
        self.stream.flush()
