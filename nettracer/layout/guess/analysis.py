"""From records and ground truth to offsets: the user-space half of the guesser.

The kernel side (:mod:`nettracer.layout.guess.probes`) hands over snapshots tagged with
the step that caused them; the traffic side (:mod:`nettracer.layout.guess.traffic`) says
what each step did and what is true about it. This module pairs the two and applies
:func:`nettracer.layout.guess.verdicts.decide` field by field:

* ``sock_common``/``sock``/``tcp_sock`` fields: the snapshot of ``struct sock`` taken
  while each socket of ours was asked to ``recv()``; ``skc_net`` and ``net.ns.inum``
  together: the 8-byte slot whose pointee holds our namespace's inode;
* ``sk_buff`` fields: the snapshot of each ``struct sk_buff`` our marked datagrams
  went out in (``net_dev_start_xmit``); ``head``/``network_header``/
  ``transport_header`` together: the pointer and the two u16 offsets from it at which
  our own IP and UDP headers and marker bytes are found;
* ``net_device`` fields: the device argument of the same tracepoint, whose identity
  (name, ifindex, namespace) is known from the route each marked datagram took;
  ``nd_net`` equals the ``skc_net`` of sockets in that namespace.
"""

from __future__ import annotations

import socket
import struct
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from nettracer.layout.catalogue import CATALOGUE
from nettracer.layout.guess.matchers import Exact, Matcher, u16, u32, u64
from nettracer.layout.guess.netns import VETH_A, VETH_NOBODY
from nettracer.layout.guess.probes import Record
from nettracer.layout.guess.traffic import ETH_HLEN, ETH_P_IP, ETH_P_IPV6, MarkerSend, RoundLog
from nettracer.layout.guess.verdicts import Observation, Verdict, decide, resolve

ETH_P_ARP = 0x0806
#: struct arphdr for Ethernet/IPv4 (RFC 826): htype 1, ptype 0x0800, hlen 6, plen 4, request
ARP_REQUEST = bytes.fromhex("0001080006040001")

SOCK_TRACEPOINTS = {
    "sock_recv_length",
    "tcp_rcv_space_adjust",
    "udp_fail_queue_rcv_skb",
    "sock_rcvqueue_full",
}
SOCK_FIELDS = tuple(f.key for f in CATALOGUE if f.struct in ("sock_common", "sock", "tcp_sock"))
V6_FIELDS = ("sock_common.skc_v6_daddr", "sock_common.skc_v6_rcv_saddr")
#: need a device whose name and ifindex differ from lo's
VETH_FIELDS = ("net_device.name", "net_device.ifindex")
#: fields found through a pointer, not by value: resolved by the special cases below
POINTER_FIELDS = {"sock_common.skc_net", "net.ns.inum"}


@dataclass
class SockSnap:
    """One ``struct sock`` snapshot of a known socket."""

    obs: Observation
    record: Record
    sock_name: str
    ns: str


@dataclass
class RoundEvidence:
    """Observations gathered from one round."""

    socks: list[SockSnap] = field(default_factory=list)
    sk_ptr: dict[str, int] = field(default_factory=dict)  # socket name -> struct sock *
    tx: list[tuple[Record, MarkerSend | None]] = field(default_factory=list)
    rx: list[tuple[Record, MarkerSend, int]] = field(default_factory=list)
    arp: list[Record] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def collect(log: RoundLog, records: list[Record]) -> RoundEvidence:
    """Pair each record with the step that caused it and that step's ground truth."""
    ev = RoundEvidence(notes=list(log.notes))
    by_step: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        by_step[r.step].append(r)
    for p in log.probes:
        recs = [r for r in by_step.get(p.step, ()) if r.spec.tracepoint in SOCK_TRACEPOINTS]
        ptrs = {r.arg("sk") for r in recs}
        if len(ptrs) != 1:
            if ptrs:
                ev.notes.append(f"step {p.step} ({p.sock.name}): {len(ptrs)} sockets, skipped")
            continue
        ev.sk_ptr[p.sock.name] = ptrs.pop()
        for r in recs:
            ev.socks.append(
                SockSnap(
                    Observation(r.snapshot(0), p.expect, p.sock.name), r, p.sock.name, p.sock.ns
                )
            )
    for st in log.states:
        for r in by_step.get(st.step, ()):
            if r.spec.tracepoint != "inet_sock_set_state":
                continue
            old = r.arg("oldstate")
            sk = st.roles.get(old)
            if sk is None or old not in st.expect:
                continue
            ev.socks.append(
                SockSnap(Observation(r.snapshot(0), st.expect[old], sk.name), r, sk.name, sk.ns)
            )
    for step in log.arp_steps:
        ev.arp += [
            r
            for r in by_step.get(step, ())
            if r.spec.tracepoint == "net_dev_start_xmit" and _is_our_arp(r)
        ]
    markers = {m.step: m for m in log.markers}
    for step, recs in by_step.items():
        m = markers.get(step)
        # sk_buff * -> the IP length of each packet sent from it (None: not ours). An
        # address freed and reused within the step (a TCP pair's data, then its ACK)
        # maps to several: its receptions cannot be told apart and are left out.
        sent: dict[int, set[int | None]] = defaultdict(set)
        for r in recs:
            if r.spec.tracepoint == "net_dev_start_xmit":
                ev.tx.append((r, m))
                hits = _packet_hits(r, m) if m is not None else []
                lens = {h.ip_len for h in hits}
                sent[r.arg("skb")].add(lens.pop() if len(lens) == 1 else None)
        if m is None:
            continue
        for r in recs:  # the same sk_buff on the receiving side (lo and veth keep it)
            lens = sent.get(r.arg("skb")) if r.spec.tracepoint == "netif_rx" else None
            if lens is not None and len(lens) == 1 and None not in lens:
                ev.rx.append((r, m, next(iter(lens))))
    return ev


def _is_our_arp(r: Record) -> bool:
    """Whether a followed pointer of ``r`` shows our ARP request (who has VETH_NOBODY,
    tell VETH_A)."""
    a, b = _inet(VETH_A), _inet(VETH_NOBODY)
    for block in r.derefs().values():
        i = block.find(ARP_REQUEST)
        while i >= 0:
            if block[i + 14 : i + 18] == a and block[i + 24 : i + 28] == b:
                return True
            i = block.find(ARP_REQUEST, i + 1)
    return False


def _inet(addr: str) -> bytes:
    return socket.inet_aton(addr)


def _pointee(
    keys: tuple[str, str], seen: list[tuple[dict[int, bytes], Matcher, object]], what: str
) -> dict[str, Verdict]:
    """A pointer field and a field of what it points to, together (``keys``): the
    (slot, offset) pairs such that, in every observation ``(followed blocks by slot,
    expected value, its key)`` of ``seen``, the block behind the slot holds the value at
    that offset."""
    if not seen:
        why = f"no snapshot of {what}"
        return {k: Verdict(None, why, 0) for k in keys}
    pairs = [
        {(slot, off) for slot, block in blocks.items() for off in want.offsets(block)}
        for blocks, want, _ in seen
    ]
    common = set.intersection(*pairs)
    n, values = len(pairs), {v for _, _, v in seen}
    if not common:
        why = f"no (pointer, offset) pair leads to the expected value in all {n} snapshots"
        return {k: Verdict(None, why, n) for k in keys}
    return {
        keys[0]: decide(keys[0], [{a for a, _ in common}] * n, values),
        keys[1]: decide(keys[1], [{b for _, b in common}] * n, values),
    }


def _sock_pointer_fields(ev: RoundEvidence, inode: dict[str, int]) -> dict[str, Verdict]:
    """``skc_net`` and ``net.ns.inum``: the struct the slot points to holds the socket's
    namespace inode at that offset, in every snapshot."""
    seen = [(s.record.derefs(), u32(inode[s.ns]), inode[s.ns]) for s in ev.socks]
    return _pointee(("sock_common.skc_net", "net.ns.inum"), seen, "a struct sock of ours")


def _dev_pointer_fields(ev: RoundEvidence) -> dict[str, Verdict]:
    """(classic tracepoints, which give no ``struct net_device *``) ``sk_buff.dev`` and
    ``net_device.name``: the slot of each marked packet's ``sk_buff`` whose pointee holds
    the name of the device the packet went out on."""
    seen = _marked(ev, lambda m: (_name(m.device.name), m.device.key))
    found = _pointee(("sk_buff.dev", "net_device.name"), seen, "a device of ours")
    return {"sk_buff.dev": found["sk_buff.dev"]}  # the name: with the other device fields


def _sk_pointer_field(ev: RoundEvidence, by_value: Verdict) -> Verdict:
    """``sk_buff.sk`` where too few senders' ``struct sock *`` are known (no probe
    showed them: classic tracepoints before 4.20): the slot of each marked packet's
    ``sk_buff`` whose pointee holds the sender's port (``skc_num``, host order)."""
    seen = _marked(ev, lambda m: (u16(m.sport), m.sport))
    found = _pointee(("sk_buff.sk", "sock_common.skc_num"), seen, "a sender of ours")
    return found["sk_buff.sk"] if found["sk_buff.sk"].ok else by_value


def _marked(
    ev: RoundEvidence, want: Callable[[MarkerSend], tuple[Matcher, object]]
) -> list[tuple[dict[int, bytes], Matcher, object]]:
    """For :func:`_pointee`: the followed blocks of each ``sk_buff`` our marked packets
    were seen in, with what ``want`` expects behind one of them (and its key)."""
    return [(r.derefs(), *want(m)) for r, m in ev.tx if m is not None and _packet_hits(r, m)]


def _name(name: str) -> Exact:
    """``char name[IFNAMSIZ]``: the name and NUL padding."""
    return Exact(name.encode().ljust(16, b"\0"))


@dataclass(frozen=True)
class Hit:
    """Where a packet of ours sits behind one followed pointer of an ``sk_buff``:
    ``slot`` is the pointer's offset in the ``sk_buff``, ``nh``/``th`` the offsets of its
    IP and transport headers from that pointer, ``ip_len`` its IP total length."""

    slot: int
    nh: int
    th: int
    ip_len: int


def _packet_hits(r: Record, m: MarkerSend) -> list[Hit]:
    """Every place in the followed blocks of ``r`` where the packet ``m`` is: its
    addresses, IP version/header length and protocol, and its ports; for UDP also
    its length and the random marker after the UDP header."""
    memo = r.__dict__.setdefault("_hits", {})
    if id(m) in memo:
        return memo[id(m)]  # type: ignore[no-any-return]
    v4 = m.family == socket.AF_INET
    iphl = 20 if v4 else 40
    addrs = m.src + m.dst
    at = 12 if v4 else 8  # where the addresses start in the IP header
    ports = struct.pack(">HH", m.sport, m.dport)
    hits = []
    for slot, block in r.derefs().items():
        p = block.find(addrs)
        while p >= 0:
            nh, th = p - at, p - at + iphl
            ok = nh >= 0 and block[th : th + 4] == ports
            if ok and v4:
                ok = block[nh] == 0x45 and block[nh + 9] == m.proto
            elif ok:
                ok = block[nh] >> 4 == 6 and block[nh + 6] == m.proto
            if ok:
                # IPv4 total length at 2; IPv6 payload length at 4
                (length,) = struct.unpack_from(">H", block, nh + (2 if v4 else 4))
                ip_len = length if v4 else length + 40
                if m.proto == socket.IPPROTO_UDP:
                    ok = ip_len == m.ip_len and block[th + 8 : th + 8 + len(m.marker)] == m.marker
            if ok:
                hits.append(Hit(slot, nh, th, ip_len))
            p = block.find(addrs, p + 1)
    memo[id(m)] = hits
    return hits


def _u16_offsets(buf: bytes, value: int) -> set[int]:
    return Exact(struct.pack("<H", value), 2).offsets(buf)


def _skb_pointer_fields(ev: RoundEvidence) -> dict[str, Verdict]:
    """``head``, ``network_header`` and ``transport_header`` from our packets: the
    pointer, and the two u16 fields, such that the IP and transport headers are at
    pointer + field in every packet.

    A packet seen behind one pointer is also where pointer arithmetic puts it for every
    lower pointer of the snapshot, even when that pointer's 256 copied bytes stop
    short of it (TCP leaves MAX_TCP_HEADER, up to 320 bytes, of headroom): those
    (pointer, header offset) pairs are candidates too, so a short copy never rules
    ``head`` out."""
    names = ("head", "network_header", "transport_header")
    rn: list[set[tuple[int, int]]] = []
    rt: list[set[tuple[int, int]]] = []
    seen: list[dict[int, tuple[set[int], set[int], int]]] = []
    for r, m in ev.tx:
        hits = _packet_hits(r, m) if m is not None else []
        if not hits:
            continue
        skb = r.snapshot(0)
        ptr = {slot: struct.unpack_from("<Q", skb, slot)[0] for slot in r.derefs()}
        pn: set[tuple[int, int]] = set()
        pt: set[tuple[int, int]] = set()
        at: dict[int, tuple[set[int], set[int], int]] = {}
        for h in hits:
            for t, vt in ptr.items():
                d = ptr[h.slot] - vt
                if d < 0 or h.th + d > 0xFFFF:
                    continue
                pn |= {(t, o) for o in _u16_offsets(skb, h.nh + d)}
                pt |= {(t, o) for o in _u16_offsets(skb, h.th + d)}
                nhs, ths, _ = at.setdefault(t, (set(), set(), vt))
                nhs.add(h.nh + d)
                ths.add(h.th + d)
        rn.append(pn)
        rt.append(pt)
        seen.append(at)
    if not rn:
        why = "none of our packets seen behind a pointer of struct sk_buff"
        return {k: Verdict(None, why, 0) for k in names}
    cn, ct = set.intersection(*rn), set.intersection(*rt)
    heads = {a for a, _ in cn} & {a for a, _ in ct}
    n = len(rn)
    if len(heads) != 1:
        v = decide("sk_buff.head", [heads] * n, {0, 1})
        why = f"needs sk_buff.head ({v.why})"
        return {
            "head": v,
            "network_header": Verdict(None, why, n),
            "transport_header": Verdict(None, why, n),
        }
    (h,) = heads
    # the values the answer rests on: the header offsets from the head pointer itself
    nvals = {x for at in seen for x in at[h][0]}
    tvals = {x for at in seen for x in at[h][1]}
    hvals = {at[h][2] for at in seen}
    return {
        "head": decide("sk_buff.head", [heads] * n, hvals),
        "network_header": decide(
            "sk_buff.network_header", [{b for a, b in cn if a == h}] * n, nvals
        ),
        "transport_header": decide(
            "sk_buff.transport_header", [{b for a, b in ct if a == h}] * n, tvals
        ),
    }


def _eth_framed(r: Record, hits: list[Hit], family: int) -> bool:
    """The two bytes before our IP header are its EtherType: the frame that
    ``skb->len`` counts starts ``ETH_HLEN`` bytes before the IP header (lo, veth)."""
    ethertype = struct.pack(">H", ETH_P_IP if family == socket.AF_INET else ETH_P_IPV6)
    blocks = r.derefs()
    return any(h.nh >= ETH_HLEN and blocks[h.slot][h.nh - 2 : h.nh] == ethertype for h in hits)


def _skb_verdicts(ev: RoundEvidence) -> dict[str, Verdict]:
    """``struct sk_buff`` fields from every transmitted and received packet."""
    skb_obs: list[Observation] = []
    given_dev = False
    for r, m in ev.tx:
        expect: dict[str, Matcher] = {}
        if not r.spec.derived("dev"):
            expect["sk_buff.dev"] = u64(r.arg("dev"))
            given_dev = True
        hits = _packet_hits(r, m) if m is not None else []
        if m is not None and hits:
            eth = ETH_P_IP if m.family == socket.AF_INET else ETH_P_IPV6
            expect["sk_buff.protocol"] = Exact(struct.pack(">H", eth), 2)
            if _eth_framed(r, hits, m.family) and len({h.ip_len for h in hits}) == 1:
                expect["sk_buff.len"] = u32(ETH_HLEN + hits[0].ip_len)
            ptr = ev.sk_ptr.get(m.sender.name)
            if ptr:
                expect["sk_buff.sk"] = u64(ptr)
        if any(r is a for a in ev.arp):
            expect["sk_buff.protocol"] = Exact(struct.pack(">H", ETH_P_ARP), 2)
        skb_obs.append(Observation(r.snapshot(0), expect, m.sender.name if m else "tx"))
    for r, m, ip_len in ev.rx:
        eth = ETH_P_IP if m.family == socket.AF_INET else ETH_P_IPV6
        expect = {
            "sk_buff.len": u32(ip_len),  # after eth_type_trans(): the IP packet only
            "sk_buff.protocol": Exact(struct.pack(">H", eth), 2),
        }
        skb_obs.append(Observation(r.snapshot(0), expect, f"{m.sender.name} rx"))
    verdicts = {
        key: resolve(key, skb_obs)
        for key in ("sk_buff.dev", "sk_buff.len", "sk_buff.protocol", "sk_buff.sk")
    }
    for name, v in _skb_pointer_fields(ev).items():
        verdicts[f"sk_buff.{name}"] = v
    if not given_dev:
        verdicts.update(_dev_pointer_fields(ev))
    if not verdicts["sk_buff.sk"].ok:
        verdicts["sk_buff.sk"] = _sk_pointer_field(ev, verdicts["sk_buff.sk"])
    return verdicts


def _sock_verdicts(ev: RoundEvidence, log: RoundLog, sk_v: Verdict) -> dict[str, Verdict]:
    """``struct sock`` fields: the recv() snapshots, and the first bytes of each marked
    datagram's sender as the kernel copied them from behind ``skb->sk`` (``sk_v``).

    Those copies hold sock_common only: 256 bytes (384 on classic tracepoints), and
    struct sock_common, the first member of struct sock, is 136 on Linux 6.18; they are
    what tells skc_v6_rcv_saddr from ipv6_pinfo.saddr before 6.3. On classic
    tracepoints a later round copies the whole struct sock through the ``sk`` slot:
    the only view of datagram sockets there (their sk_type and sk_protocol)."""
    sock_obs = [s.obs for s in ev.socks]
    for r, m in ev.tx:
        if m is None or not m.expect or not _packet_hits(r, m):
            continue
        if r.spec.derived("sk") and r.arg("sk"):  # the whole struct sock (classic)
            block, expect = r.snapshot(r.spec.snapshot_index("sk")), m.expect
        elif sk_v.ok:
            block = r.derefs().get(sk_v.offset)  # type: ignore[arg-type]
            expect = {k: v for k, v in m.expect.items() if k.startswith("sock_common.")}
        else:
            continue
        if block is not None:
            sock_obs.append(Observation(block, expect, f"{m.sender.name} skb->sk"))
    verdicts = {key: resolve(key, sock_obs) for key in SOCK_FIELDS if key not in POINTER_FIELDS}
    verdicts.update(_sock_pointer_fields(ev, log.netns_inode))
    return verdicts


def _net_pointers(ev: RoundEvidence, net_v: Verdict) -> dict[str, int]:
    """The ``struct net *`` of each namespace, as ``skc_net`` (``net_v``) holds it."""
    if not net_v.ok:
        return {}
    seen: dict[str, set[int]] = defaultdict(set)
    for s in ev.socks:
        seen[s.ns].add(struct.unpack_from("<Q", s.obs.buf, net_v.offset)[0])
    return {ns: next(iter(v)) for ns, v in seen.items() if len(v) == 1}


def _dev_of(r: Record, dev_v: Verdict) -> tuple[int, bytes] | None:
    """The ``struct net_device *`` a transmission went out on and the bytes copied from
    it: the tracepoint's argument (or, classic, what the ``dev`` slot read) and its
    snapshot, else the pointer at ``sk_buff.dev`` (``dev_v``) and its followed block."""
    if r.arg("dev"):
        return r.arg("dev"), r.snapshot(r.spec.snapshot_index("dev"))
    if not dev_v.ok:
        return None
    off: int = dev_v.offset  # type: ignore[assignment]
    block = r.derefs().get(off)
    return None if block is None else (struct.unpack_from("<Q", r.snapshot(0), off)[0], block)


def _dev_verdicts(
    ev: RoundEvidence, log: RoundLog, dev_v: Verdict, net_v: Verdict
) -> dict[str, Verdict]:
    """``struct net_device`` fields from the device of each transmission whose device
    is known (one device key per pointer: the one our marked packets went out on)."""
    net_ptr = _net_pointers(ev, net_v)
    devs = [(r, m, _dev_of(r, dev_v)) for r, m in ev.tx]
    identity: dict[int, set[str]] = defaultdict(set)
    for r, m, dev in devs:
        if dev is not None and m is not None and _packet_hits(r, m):
            identity[dev[0]].add(m.device.key)
    dev_obs: list[Observation] = []
    for _, _, dev in devs:
        keys = identity.get(dev[0]) if dev is not None else None
        if not keys or len(keys) != 1:
            continue
        d = log.devices[next(iter(keys))]
        expect: dict[str, Matcher] = {
            "net_device.name": _name(d.name),
            "net_device.ifindex": u32(d.ifindex),
        }
        if d.ns in net_ptr:
            expect["net_device.nd_net"] = u64(net_ptr[d.ns])
        dev_obs.append(Observation(dev[1], expect, d.key))  # type: ignore[index]
    verdicts = {
        key: resolve(key, dev_obs)
        for key in ("net_device.name", "net_device.ifindex", "net_device.nd_net")
    }
    if not net_v.ok:
        verdicts["net_device.nd_net"] = Verdict(None, f"needs sock_common.skc_net ({net_v.why})", 0)
    if not dev_obs and not dev_v.ok:
        verdicts = {k: Verdict(None, f"needs sk_buff.dev ({dev_v.why})", 0) for k in verdicts}
    return verdicts


def _explain_missing(verdicts: dict[str, Verdict], notes: list[str]) -> None:
    """Say why nothing was observed where the kernel lacks a feature (no IPv6, no veth)."""
    for note in notes:
        for prefix, keys in (("no IPv6", V6_FIELDS), ("no veth pair", VETH_FIELDS)):
            if note.startswith(prefix):
                for key in keys:
                    if not verdicts[key].ok:
                        verdicts[key] = Verdict(None, f"{verdicts[key].why}: {note}", 0)


def analyse(log: RoundLog, records: list[Record]) -> tuple[dict[str, Verdict], list[str]]:
    """Verdicts for every catalogue field from one round.

    ``struct sk_buff`` comes first: ``skb->sk`` then shows the start of each sender's
    ``struct sock``, whose ``skc_net`` in turn gives ``net_device.nd_net``."""
    ev = collect(log, records)
    verdicts = _skb_verdicts(ev)
    verdicts.update(_sock_verdicts(ev, log, verdicts["sk_buff.sk"]))
    net_v = verdicts["sock_common.skc_net"]
    verdicts.update(_dev_verdicts(ev, log, verdicts["sk_buff.dev"], net_v))
    _explain_missing(verdicts, ev.notes)
    return verdicts, ev.notes
