"""The guesser's private network namespaces: *A*, where most of its sockets live,
and *B*, for a second ``struct net``, joined by a veth pair whose names, ifindexes and
MAC addresses we pick, with permanent neighbours (no ARP to wait for).

A thread calls ``unshare(CLONE_NEWNET)`` twice and keeps an fd of each namespace;
sockets keep the namespace they were made in, so the thread makes B's while in B
(:meth:`PrivateNet.inside`) and returns to A. Nothing of the host is touched; when
the thread's namespace fds and sockets are closed and it ends, both namespaces and the
veth pair go away with them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from nettracer.bpf.syscall import CLONE_NEWNET, setns, unshare
from nettracer.errors import NettracerError
from nettracer.layout.guess.rtnl import Rtnl

LOOPBACK_IFINDEX = 1  # include/net/flow.h: lo is ifindex 1 in every namespace
VETH_A, VETH_B = "192.0.2.1", "192.0.2.2"  # TEST-NET-1, only ever inside our namespaces
VETH_NOBODY = "192.0.2.5"  # on the veth subnet (/29), but no host: ARP asks for it
VETH_PREFIX = 29


class NamespaceError(NettracerError):
    """A private network namespace (or its devices) could not be set up."""


@dataclass(frozen=True)
class Device:
    """A device we send through: its name, ifindex and namespace."""

    key: str
    name: str
    ifindex: int
    ns: str


def _ns_inode(fd: int) -> int:
    return os.fstat(fd).st_ino


class PrivateNet:
    """Namespaces A and B of the calling thread, linked by a veth pair (when the kernel
    has veth). Must be created and closed by the same thread."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.rtnl: dict[str, Rtnl] = {}
        self.devices: dict[str, Device] = {}
        self.notes: list[str] = []
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for ns in ("A", "B"):
                try:
                    unshare(CLONE_NEWNET)
                except OSError as exc:
                    raise NamespaceError(
                        f"cannot create a network namespace ({exc.strerror}); guessing "
                        f"offsets needs CAP_SYS_ADMIN and CONFIG_NET_NS"
                    ) from None
                self.fds[ns] = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                self.rtnl[ns] = Rtnl()
                self.rtnl[ns].link_up(LOOPBACK_IFINDEX)
                self.devices[f"lo/{ns}"] = Device(f"lo/{ns}", "lo", LOOPBACK_IFINDEX, ns)
            setns(self.fds["A"], CLONE_NEWNET)
            self.inode = {ns: _ns_inode(fd) for ns, fd in self.fds.items()}
            self._veth()
        except BaseException:
            self.close()
            raise

    def _veth(self) -> None:
        rnd = random.Random()
        tag = f"{rnd.getrandbits(24):06x}"
        ia, ib = rnd.sample(range(1000, 60000), 2)
        na, nb = f"ntg{tag}a", f"ntg{tag}b"
        # locally administered unicast MACs, and permanent neighbours: no ARP to wait for
        ma, mb = (bytes([0x02, *rnd.randbytes(5)]) for _ in range(2))
        try:
            self.rtnl["A"].add_veth(na, ia, nb, ib, self.fds["B"], ma, mb)
            self.rtnl["A"].add_ipv4(ia, VETH_A, VETH_PREFIX)
            self.rtnl["B"].add_ipv4(ib, VETH_B, VETH_PREFIX)
            self.rtnl["A"].link_up(ia)
            self.rtnl["B"].link_up(ib)
            self.rtnl["A"].add_neigh(ia, VETH_B, mb)
            self.rtnl["B"].add_neigh(ib, VETH_A, ma)
            self._wait_veth()
        except OSError as exc:
            self.notes.append(f"no veth pair ({exc.strerror})")
            return
        self.devices["veth/A"] = Device("veth/A", na, ia, "A")
        self.devices["veth/B"] = Device("veth/B", nb, ib, "B")

    def _wait_veth(self, limit_s: float = 1.0) -> None:
        """Wait until datagrams cross the veth pair both ways. The end brought up first
        gets its queue from the link watcher (a workqueue, net/core/link_watch.c), and
        until then the noop qdisc drops what is sent through it."""
        with self.inside("B"):
            b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            b.bind((VETH_B, 0))
            a.bind((VETH_A, 0))
            a.connect(b.getsockname())
            b.connect(a.getsockname())
            end = time.perf_counter() + limit_s
            for tx, rx in ((a, b), (b, a)):
                while True:
                    tx.send(b"ready?")
                    got = _wait_readable(rx, 0.003)
                    if got:
                        break
                    if time.perf_counter() > end:
                        raise OSError(errno.ETIMEDOUT, "the veth pair does not pass traffic")
        finally:
            a.close()
            b.close()

    @property
    def has_veth(self) -> bool:
        return "veth/A" in self.devices

    @contextlib.contextmanager
    def inside(self, ns: str) -> Iterator[None]:
        """Run the block with the thread in namespace ``ns`` (sockets made there stay)."""
        if ns == "A":
            yield
            return
        setns(self.fds[ns], CLONE_NEWNET)
        try:
            yield
        finally:
            setns(self.fds["A"], CLONE_NEWNET)

    def close(self) -> None:
        for r in self.rtnl.values():
            r.close()
        self.rtnl.clear()
        with contextlib.suppress(OSError):
            setns(self._home, CLONE_NEWNET)
        for fd in [*self.fds.values(), self._home]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        self._home = -1


def _wait_readable(s: socket.socket, timeout_s: float) -> bool:
    """Whether a datagram arrived on ``s`` within ``timeout_s`` (it is consumed)."""
    end = time.perf_counter() + timeout_s
    while True:
        with contextlib.suppress(BlockingIOError):
            s.recv(64, socket.MSG_DONTWAIT)
            return True
        if time.perf_counter() > end:
            return False
        time.sleep(0.0001)
