"""The traffic the guesser makes in its private namespaces
(:mod:`nettracer.layout.guess.netns`), step by step, and the log of what each step did.

A round builds a few dozen sockets (TCP with data both ways, retransmissions by
drop-and-SACK and by tail loss probe, UDP connected/unconnected/broadcast/corked/
multicast-bound, raw, IPv6 and v4-mapped, AF_UNIX), then, each step tagged for the
kernel side: one marked packet through each device, and one snapshot-making
``recv(MSG_PEEK|MSG_DONTWAIT)`` per socket. Ground truth (:mod:`nettracer.layout.guess.expected`)
is read from each socket right before its step; ``TCP_INFO`` also right after, and a
moving value that changed meanwhile is not used. A :class:`TrafficThread` runs it all
in the thread that owns the namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nettracer.layout.guess.expected import sock_expectations, tcp_expectations, tcp_info, v4_of
from nettracer.layout.guess.matchers import Exact, Matcher
from nettracer.layout.guess.netns import (
    VETH_A,
    VETH_B,
    VETH_NOBODY,
    Device,
    NamespaceError,
    PrivateNet,
)

RAW_PROTO = 253  # IANA "use for experimentation and testing"
SO_NO_CHECK, SO_ATTACH_FILTER, SO_DETACH_FILTER = 11, 26, 27
TCP_DEFER_ACCEPT = 9
IP_PKTINFO = 8  # include/uapi/linux/in.h
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
ETH_HLEN = 14
SOCKET_TIMEOUT_S = 1.0


@dataclass
class Sock:
    """A socket of ours and the namespace ("A"/"B") it was created in."""

    name: str
    sock: socket.socket
    ns: str
    peer: tuple | None = None  # what connect() was given, for raw sockets (no getpeername)


@dataclass
class SockProbe:
    """Step ``step`` took a snapshot of ``sock`` (recv(MSG_PEEK|MSG_DONTWAIT), or an
    overflowing receive queue); ``expect`` is the ground truth."""

    step: int
    sock: Sock
    expect: dict[str, Matcher]
    tcp_stable: bool = True


@dataclass
class MarkerSend:
    """Step ``step`` sent one UDP datagram carrying ``marker`` through ``device`` (or
    one TCP segment, known by its addresses and ports: its headroom differs)."""

    step: int
    sender: Sock
    device: Device
    marker: bytes
    ip_len: int
    family: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    #: IPPROTO_UDP (found by ``marker``) or IPPROTO_TCP (by addresses and ports)
    proto: int = socket.IPPROTO_UDP
    #: the sender's struct sock as the sender sees it (sock_common and sock fields, for
    #: the copies the kernel makes from behind skb->sk)
    expect: dict[str, Matcher] = field(default_factory=dict)


@dataclass
class StateStep:
    """(fallback) Step ``step`` made ``inet_sock_set_state`` fire: ``roles`` maps the
    old state to the socket whose snapshot that is."""

    step: int
    roles: dict[int, Sock]
    expect: dict[int, dict[str, Matcher]] = field(default_factory=dict)


@dataclass
class RoundLog:
    """What one round of traffic did, for the analysis to compare with the records."""

    probes: list[SockProbe] = field(default_factory=list)
    markers: list[MarkerSend] = field(default_factory=list)
    states: list[StateStep] = field(default_factory=list)
    #: steps that made an ARP request for VETH_NOBODY go out of veth/A
    arp_steps: list[int] = field(default_factory=list)
    netns_inode: dict[str, int] = field(default_factory=dict)
    devices: dict[str, Device] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _drop_all_filter() -> tuple[bytes, ctypes.Array]:
    """``struct sock_fprog`` for the classic BPF program ``ret #0`` (drop everything);
    the returned buffer must outlive its use."""
    insns = ctypes.create_string_buffer(struct.pack("<HBBI", 0x06, 0, 0, 0))  # BPF_RET|BPF_K
    return struct.pack("@HxxxxxxP", 1, ctypes.addressof(insns)), insns


class Traffic:
    """The sockets of one round and the steps that make the kernel show them to us."""

    def __init__(self, net: PrivateNet, arm: Callable[[int], None], fallback: bool) -> None:
        self.net = net
        self.arm = arm  # arm(step): record this thread's events tagged step (0: stop)
        self.fallback = fallback
        self.socks: list[Sock] = []
        self.log = RoundLog(
            netns_inode=dict(net.inode), devices=dict(net.devices), notes=list(net.notes)
        )
        self.step = 0
        self.rnd = random.Random()
        self.has_v6 = True

    # -- helpers -------------------------------------------------------------
    def next_step(self) -> int:
        self.step += 1
        self.arm(self.step)
        return self.step

    def add(self, name: str, sock: socket.socket, ns: str = "A") -> socket.socket:
        # nothing may block the thread for good; kernel-side timeouts, because Python's
        # own (settimeout) would wait for readability even with MSG_DONTWAIT
        tv = struct.pack("@ll", int(SOCKET_TIMEOUT_S), int(SOCKET_TIMEOUT_S % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self.socks.append(Sock(name, sock, ns))
        return sock

    def udp(self, name: str, fam: int, bind: tuple, ns: str = "A") -> socket.socket:
        s = socket.socket(fam, socket.SOCK_DGRAM)
        self.add(name, s, ns)
        if self.fallback:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        s.bind(bind)
        return s

    def close(self) -> None:
        for s in self.socks:
            s.sock.close()
        self.socks.clear()

    # -- building the sockets --------------------------------------------------
    def build(self) -> None:
        """Every socket of the round, connections established and data exchanged."""
        self._udp_and_raw()
        self._tcp()

    def _udp_and_raw(self) -> None:
        v4, v6 = socket.AF_INET, socket.AF_INET6
        with self.net.inside("B"):
            self.ub1 = self.udp("udp-b-veth", v4, (VETH_B, 0), "B") if self.net.has_veth else None
            self.ub3 = self.udp("udp-b-lo-rx", v4, ("127.0.0.2", 0), "B")
            self.ub2 = self.udp("udp-b-lo-tx", v4, ("127.0.0.1", 0), "B")
            self.ub2.connect(self.ub3.getsockname())
        self.u2 = self.udp("udp-rx", v4, ("127.0.0.2", 0))
        self.u1 = self.udp("udp-tx", v4, ("127.0.0.1", 0))
        self.u1.connect(self.u2.getsockname())
        # no UDP checksum: CHECKSUM_NONE, so skb->csum_start cannot pass for transport_header
        self.u1.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
        self.u3 = self.udp("udp-bcast", v4, ("127.255.255.255", 0))
        # unconnected, but a corked send (MSG_MORE) left its destination in
        # inet->cork.fl: that copy of an address is not skc_daddr
        corked = self.corked = self.udp("udp-corked", v4, ("127.0.0.12", 0))
        corked.sendto(b"cork", socket.MSG_MORE, self.u2.getsockname())
        corked.sendto(b"ed", self.u2.getsockname())
        if self.ub1 is not None:
            self.u4 = self.udp("udp-veth", v4, (VETH_A, 0))
            self.u4.connect(self.ub1.getsockname())
            self.ub1.connect(self.u4.getsockname())

            self.u5 = self.udp("udp-arp", v4, (VETH_A, 0))
        try:
            self.u7 = self.udp("udp6-rx", v6, ("::1", 0))
        except OSError as exc:
            self.has_v6 = False
            self.log.notes.append(f"no IPv6 ({exc.strerror})")
        if self.has_v6:
            self.u6 = self.udp("udp6-tx", v6, ("::1", 0))
            self.u6.connect(self.u7.getsockname()[:2])
            self.u8 = self.udp("udp6-mapped", v6, ("::ffff:127.0.0.8", 0))
            self.u8.connect(("::ffff:" + self.u2.getsockname()[0], self.u2.getsockname()[1]))
            # bound to a multicast group: sk_v6_rcv_saddr is the group, while
            # ipv6_pinfo.saddr (np->saddr, in the same allocation) stays ::
            group = f"ff0e::{self.rnd.getrandbits(16):x}:{self.rnd.getrandbits(16):x}"
            self.u9 = self.udp("udp6-mcast", v6, (group, 0))
        self.r2 = self.add("raw-rx", socket.socket(v4, socket.SOCK_RAW, RAW_PROTO))
        self.r2.bind(("127.0.0.10", 0))
        self.r1 = self.add("raw-tx", socket.socket(v4, socket.SOCK_RAW, RAW_PROTO))
        self.r1.bind(("127.0.0.9", 0))
        self.r1.connect(("127.0.0.10", 0))
        self.socks[-1].peer = ("127.0.0.10", 0)
        if self.fallback:
            for r in (self.r1, self.r2):
                r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        if self.has_v6 and not self.fallback:
            r6 = self.add("raw6", socket.socket(v6, socket.SOCK_RAW, RAW_PROTO - 1))
            r6.bind(("::1", 0))
        if not self.fallback:  # AF_UNIX: skc_family takes a value no inet socket has
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.add("unix-a", a)
            self.add("unix-b", b)

    def _listener(
        self, name: str, fam: int, addr: tuple, defer: bool = False, ns: str = "A"
    ) -> Sock:
        s = self.add(name, socket.socket(fam, socket.SOCK_STREAM), ns)
        sk = self.socks[-1]
        s.bind(addr)
        if defer:
            s.setsockopt(socket.IPPROTO_TCP, TCP_DEFER_ACCEPT, 1)
        if self.fallback:
            st = StateStep(self.next_step(), {7: sk})
            s.listen(8)
            self.arm(0)
            st.expect[7] = {
                k: v for k, v in sock_expectations(s).items() if k not in ("sock_common.skc_state",)
            }
            st.expect[7]["sock_common.skc_state"] = Exact(bytes([7]))
            self.log.states.append(st)
        else:
            s.listen(8)
        return sk

    def _connect(
        self,
        name: str,
        listener: Sock,
        fam: int,
        bind: tuple,
        defer: bool = False,
        cc: str | None = None,
        ns: str = "A",
    ) -> tuple[socket.socket, socket.socket]:
        c = socket.socket(fam, socket.SOCK_STREAM)
        self.add(f"{name}-client", c, ns)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if cc is not None:  # a different congestion control: different icsk_ca_priv
            with contextlib.suppress(OSError):
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
        c.bind(bind)
        step = self.next_step() if self.fallback else 0
        c.connect(listener.sock.getsockname()[:2])
        if defer:  # the child is made when data comes: its SYN-ACK RTT is this pause
            time.sleep(0.0008 + self.rnd.random() * 0.0008)
            c.send(b"d")
        if step:
            self.arm(0)
        s, _ = listener.sock.accept()
        self.add(f"{name}-server", s, ns)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if defer:
            s.recv(1)
        if step:
            client, server = self.socks[-2], self.socks[-1]
            st = StateStep(step, {2: client, 3: server})
            for old, sk in st.roles.items():
                e = sock_expectations(sk.sock)
                e["sock_common.skc_state"] = Exact(bytes([old]))
                st.expect[old] = e
            self.log.states.append(st)
        return c, s

    def _exchange(self, c: socket.socket, s: socket.socket, up: int, down: int) -> None:
        c.sendall(os.urandom(up))
        _recv_exactly(s, up)
        s.sendall(os.urandom(down))
        _recv_exactly(c, down)

    def _retransmit(self, c: socket.socket, s: socket.socket, episodes: int) -> None:
        """Make ``c`` retransmit ``episodes`` times without waiting for a timer: the
        receiver drops one segment (a classic BPF socket filter, ``ret #0``), three
        later segments are SACKed and the sender fast-retransmits the hole at once."""
        fprog, keep = _drop_all_filter()
        for _ in range(episodes):
            s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
            c.send(b"lost..")
            s.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
            for _ in range(4):
                c.send(b"sacked")
        del keep
        _recv_exactly(s, episodes * 30)

    def _tail_loss(self, c: socket.socket, s: socket.socket) -> None:
        """Start a retransmission that is not a loss: the receiver drops two segments,
        and ~2 jiffies later the tail loss probe (RFC 8985) resends the second one,
        which counts in ``total_retrans`` but not in ``tcp_sock.lost``. A byte waits in
        ``c`` for MSG_PEEK. :meth:`_finish_tail_loss` waits for the probe."""
        s.send(b"p")
        _recv_peek(c)
        fprog, keep = _drop_all_filter()
        s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        c.send(b"tail-1")
        c.send(b"tail-2")
        s.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        del keep
        self.tlp = (c, s)

    def _finish_tail_loss(self, limit_s: float = 0.1) -> bool:
        """Wait until the tail loss probe went out (and, briefly, for its recovery)."""
        c, _ = self.tlp
        end = time.perf_counter() + limit_s
        fired = 0.0
        while time.perf_counter() < end:
            info = tcp_info(c)
            if info.get("total_retrans", 0) >= 1:
                if info.get("unacked") == 0:
                    return True
                fired = fired or time.perf_counter()
                if time.perf_counter() - fired > 0.002:
                    return True  # stalled until the RTO: stable all the same
            time.sleep(0.0002)
        self.log.notes.append(f"tail loss probe did not fire in time ({tcp_info(c)})")
        return False

    def _tcp(self) -> None:
        v4, v6 = socket.AF_INET, socket.AF_INET6
        l1 = self._listener("tcp-listen", v4, ("127.0.0.2", 0))
        # first, so that its timer runs while everything else is built
        self._tail_loss(*self._connect("tcp-tlp", l1, v4, ("127.0.0.11", 0), cc="reno"))
        l2 = self._listener("tcp-listen-defer", v4, ("127.0.0.4", 0), defer=True)
        self.tcp1 = self._connect("tcp1", l1, v4, ("127.0.0.1", 0))
        conns = [
            (self.tcp1, 0),
            (self._connect("tcp2", l2, v4, ("127.0.0.3", 0), defer=True), 1),
            (self._connect("tcp3", l1, v4, ("127.0.0.5", 0), cc="reno"), 2),
        ]
        if self.has_v6:
            l6 = self._listener("tcp6-listen", v6, ("::1", 0))
            l7 = self._listener("tcp6-mapped-listen", v6, ("::ffff:127.0.0.7", 0))
            conns.append((self._connect("tcp6", l6, v6, ("::1", 0)), 0))
            conns.append((self._connect("tcp6-mapped", l7, v6, ("::ffff:127.0.0.6", 0)), 1))
        if self.fallback:
            # a connection in B: without raw tracepoints TCP sockets are the only ones
            # seen whole, and skc_net (net.ns.inum) needs two namespaces' values
            with self.net.inside("B"):
                lb = self._listener("tcp-b-listen", v4, ("127.0.0.2", 0), ns="B")
                self.tcp_b = self._connect("tcp-b", lb, v4, ("127.0.0.1", 0), ns="B")
            conns.append((self.tcp_b, 0))
        else:
            self.add("tcp-closed", socket.socket(v4, socket.SOCK_STREAM))
        for i, ((c, s), episodes) in enumerate(conns):
            self._exchange(c, s, 100 + 37 * i + self.rnd.randrange(30), 50 + 91 * i)
            if episodes:
                self._retransmit(c, s, episodes)
            # one byte waiting on each side: what MSG_PEEK copies (tcp_rcv_space_adjust)
            s.send(b"p")
            c.send(b"q")
            _recv_peek(c)
            _recv_peek(s)

    # -- the recorded steps ----------------------------------------------------
    def markers(self) -> None:
        """One marked UDP datagram through each device, in both namespaces, an ARP
        request out of veth/A and one TCP segment."""
        sends: list[tuple[socket.socket, str, str, tuple | None]] = [
            (self.u1, "udp-tx", "lo/A", None)
        ]
        if self.ub1 is not None:
            sends.append((self.u4, "udp-veth", "veth/A", None))
            sends.append((self.ub1, "udp-b-veth", "veth/B", None))
        sends.append((self.ub2, "udp-b-lo-tx", "lo/B", None))
        if self.has_v6:
            sends.append((self.u6, "udp6-tx", "lo/A", None))
            sends.append((self.u8, "udp6-mapped", "lo/A", None))
            # bound to a multicast group, it sends from ::1 (np->saddr stays ::)
            sends.append((self.u9, "udp6-mcast", "lo/A", ("::1", self.u7.getsockname()[1])))
        if self.ub1 is not None:
            # an ARP request (skb->protocol ETH_P_ARP) for an address nobody has; the
            # datagram waits in the neighbour queue and goes away with the namespace
            step = self.next_step()
            self.u5.sendto(b"arp", (VETH_NOBODY, 9))
            self.log.arp_steps.append(step)
        if self.fallback:
            # seen only behind skb->sk without raw tracepoints: the two sockets whose
            # addresses differ from their copies (inet->cork.fl, inet_saddr)
            u2 = self.u2.getsockname()
            sends.append((self.corked, "udp-corked", "lo/A", u2))
            sends.append((self.u3, "udp-bcast", "lo/A", u2))
        for i, (sock, name, dev, to) in enumerate(sends):
            self._udp_marker(i, sock, name, dev, to)
        self._tcp_marker(self.tcp1, "tcp1-client", "lo/A")
        if self.fallback:  # a second sk_buff.sk value for kernels without raw tracepoints
            self._tcp_marker(self.tcp_b, "tcp-b-client", "lo/B")
        self.arm(0)

    def _udp_marker(
        self, i: int, sock: socket.socket, name: str, dev: str, to: tuple | None
    ) -> None:
        """The ``i``-th marked datagram: 16 random bytes, then a length of its own."""
        marker = os.urandom(16)
        payload = marker + b"\xa5" * (5 + 11 * i + self.rnd.randrange(7))
        local, peer = sock.getsockname(), to or sock.getpeername()
        cmsg = []
        if local[0].endswith(".255"):  # bound to a broadcast address: say where from
            local = ("127.0.0.1", local[1])
            cmsg = [(socket.IPPROTO_IP, IP_PKTINFO, _in_pktinfo(local[0]))]
        src4, dst4 = v4_of(local[0]), v4_of(peer[0])
        if src4 is not None and dst4 is not None:
            fam, src, dst, iphl = socket.AF_INET, src4, dst4, 20
        else:
            fam, iphl = socket.AF_INET6, 40
            dst = socket.inet_pton(fam, peer[0])
            src = dst if to else socket.inet_pton(fam, local[0])  # lo: from ::1 to ::1
        sender = self._sock(name)
        expect = sock_expectations(sock, sender.peer)
        step = self.next_step()
        if cmsg:
            sock.sendmsg([payload], cmsg, 0, to)
        elif to:
            sock.sendto(payload, to)
        else:
            sock.send(payload)
        self.log.markers.append(
            MarkerSend(
                step,
                sender,
                self.net.devices[dev],
                marker,
                iphl + 8 + len(payload),
                fam,
                src,
                dst,
                local[1],
                peer[1],
                expect=expect,
            )
        )

    def _tcp_marker(self, conn: tuple[socket.socket, socket.socket], name: str, dev: str) -> None:
        """A TCP segment from ``conn``'s client ``name`` through ``dev``: MAX_TCP_HEADER of
        headroom, so network_header and transport_header take values no UDP datagram
        gives them (IPv4 only included)."""
        c, _ = conn
        local, peer = c.getsockname(), c.getpeername()
        expect = sock_expectations(c)
        step = self.next_step()
        c.send(b"m")
        self.log.markers.append(
            MarkerSend(
                step,
                self._sock(name),
                self.net.devices[dev],
                b"",
                0,
                socket.AF_INET,
                socket.inet_aton(local[0]),
                socket.inet_aton(peer[0]),
                local[1],
                peer[1],
                proto=socket.IPPROTO_TCP,
                expect=expect,
            )
        )

    def probes(self) -> None:
        """A snapshot of every socket: ``recv(MSG_PEEK|MSG_DONTWAIT)`` fires
        sock_recv_length (6.3) and, with data waiting on TCP, tcp_rcv_space_adjust."""
        tlp = [sk for sk in self.socks if sk.name.startswith("tcp-tlp")]
        rest = [sk for sk in self.socks if not sk.name.startswith("tcp-tlp")]
        for sk in rest + tlp:
            if tlp and sk is tlp[0] and not self._finish_tail_loss():
                break
            s = sk.sock
            is_tcp = s.type == socket.SOCK_STREAM
            if self.fallback and not is_tcp:
                self._overflow(sk)
                continue
            expect = sock_expectations(s, sk.peer)
            before = tcp_info(s) if is_tcp else None
            step = self.next_step()
            with contextlib.suppress(OSError):
                s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            self.arm(0)
            probe = SockProbe(step, sk, expect)
            if before is not None:
                after = tcp_info(s)
                if after == before and after.get("state") == 1:
                    probe.expect.update(tcp_expectations(after))
                else:
                    probe.tcp_stable = False
            self.log.probes.append(probe)

    def _overflow(self, sk: Sock) -> None:
        """(fallback, before 6.3) Snapshot a datagram socket by overfilling its receive
        queue (SO_RCVBUF is minimal): udp_fail_queue_rcv_skb / sock_rcvqueue_full."""
        s = sk.sock
        if s.family == socket.AF_INET6 and s.getsockname()[0].startswith("ff"):
            return  # a multicast group on lo: shown behind skb->sk of its marker instead
        try:
            peer = s.getpeername()
        except OSError:
            peer = None
        sender = None
        if s.type == socket.SOCK_RAW:
            sender = self.r1 if s is self.r2 else self.r2
            if peer is None and s is not self.r2:
                return
            dst = (s.getsockname()[0], 0)
        else:
            for other in self.socks:
                o = other.sock
                if o is s or o.type != socket.SOCK_DGRAM or other.ns != sk.ns:
                    continue
                if peer is not None and o.getsockname()[:2] != peer[:2]:
                    continue
                if o.family != s.family and peer is None:
                    continue
                sender = o
                break
            dst = s.getsockname()[:2]
        if sender is None:
            return
        expect = sock_expectations(s, sk.peer)
        step = self.next_step()
        with contextlib.suppress(OSError):
            if dst[0].startswith("127.255"):
                sender.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            for _ in range(4):
                sender.sendto(b"\x5a" * 1200, dst)
        self.arm(0)
        self.log.probes.append(SockProbe(step, sk, expect))

    def _sock(self, name: str) -> Sock:
        for s in self.socks:
            if s.name == name:
                return s
        raise KeyError(name)


def _in_pktinfo(spec_dst: str) -> bytes:
    """``struct in_pktinfo`` (include/uapi/linux/in.h) for ``IP_PKTINFO`` on sendmsg():
    ``ipi_spec_dst`` becomes the datagram's source address."""
    return struct.pack("@i4s4s", 0, socket.inet_aton(spec_dst), bytes(4))


def _recv_exactly(s: socket.socket, n: int) -> None:
    while n > 0:
        got = s.recv(n)
        if not got:
            raise NamespaceError("a guessing connection closed early")
        n -= len(got)


def _recv_peek(s: socket.socket) -> None:
    """Wait until a byte is readable on ``s`` (without taking it)."""
    for _ in range(1000):
        with contextlib.suppress(BlockingIOError):
            if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                return
        time.sleep(0.0001)
    raise NamespaceError("a guessing connection stalled")


class TrafficThread(threading.Thread):
    """Owns the private namespaces and runs functions in this thread when asked.

    :meth:`submit` queues ``fn(net, *args)`` (``net`` is the :class:`PrivateNet`),
    :meth:`result` waits for its outcome; :meth:`stop` closes everything (the
    namespaces vanish with the thread's last reference)."""

    def __init__(self) -> None:
        super().__init__(name="nettracer-guess", daemon=True)
        self._requests: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self.tid = 0

    def run(self) -> None:
        self.tid = threading.get_native_id()
        try:
            net = PrivateNet()
        except BaseException as exc:
            self._results.put((False, exc))
            return
        try:
            while True:
                req = self._requests.get()
                if req is None:
                    return
                fn, args = req
                try:
                    self._results.put((True, fn(net, *args)))
                except BaseException as exc:
                    self._results.put((False, exc))
        finally:
            net.close()

    def submit(self, fn: Callable, *args: object) -> None:
        self._requests.put((fn, args))

    def result(self, timeout: float) -> object:
        """The outcome of the oldest submitted call: its value, or what it raised;
        TimeoutError when none came within ``timeout`` seconds."""
        try:
            ok, value = self._results.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            raise TimeoutError from None
        if not ok:
            raise value
        return value

    def stop(self, timeout: float = 5.0) -> None:
        self._requests.put(None)
        self.join(timeout)
