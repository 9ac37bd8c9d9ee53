"""Gateway lookups against namespaces, veths and routes the test builds itself.

Topology (namespace names carry the pid; all removed at the end)::

    client C                      router R                      server S
    vc  10.200.1.2/24 fd00:1::2 -- vr  10.200.1.1 fd00:1::1
                                  vr2 10.200.2.1 fd00:2::1 ---- vs 10.200.2.2 fd00:2::2
    vc2 10.200.4.2/24 ----------- vr3 10.200.4.1
    default via 10.200.1.1 / fd00:1::1; "from 10.200.4.2" uses table 100: default via 10.200.4.1
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import ANY_OFFSETS, kernel_skip, poll_until

from nettracer.net.gateway import Gateway, GatewayResolver, RouteKey
from nettracer.net.netns import NetnsIndex, netns_inode

PID = os.getpid()


def ip(*args: str, ns: str | None = None) -> str:
    cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout


def ip_json(*args: str, ns: str | None = None) -> list[dict]:
    return json.loads(ip("-j", *args, ns=ns) or "[]")


def route_get(ns: str | None, dst: str, *extra: str) -> dict | None:
    """The kernel's answer through iproute2 — the oracle; None when unreachable."""
    try:
        return ip_json("route", "get", dst, *extra, ns=ns)[0]
    except RuntimeError:
        return None


def ifindex(ns: str, dev: str) -> int:
    return ip_json("link", "show", "dev", dev, ns=ns)[0]["ifindex"]


def subnet_of(ns: str, dev: str, local: str) -> str:
    """The network of address ``local`` on ``dev``, from ``ip -j addr``."""
    for link in ip_json("addr", "show", "dev", dev, ns=ns):
        for a in link["addr_info"]:
            if a["local"] == local:
                return str(ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network)
    raise AssertionError(f"{local} not on {dev} in {ns}")


@dataclass
class Topo:
    client: str
    router: str
    server: str

    @property
    def inode(self) -> int:
        """The client namespace's inode, as a process inside it sees it."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.client, "readlink", "/proc/self/ns/net"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return int(out.removeprefix("net:[").removesuffix("]"))


@pytest.fixture(scope="module")
def topo() -> Iterator[Topo]:
    if os.geteuid() != 0:
        kernel_skip("needs root to create network namespaces")
    t = Topo(f"ntgwc{PID}", f"ntgwr{PID}", f"ntgws{PID}")
    made: list[str] = []
    try:
        for ns in (t.client, t.router, t.server):
            ip("netns", "add", ns)
            made.append(ns)
            ip("link", "set", "lo", "up", ns=ns)
        c, r, s = t.client, t.router, t.server
        ip("link", "add", "vc", "type", "veth", "peer", "name", "vr", "netns", r, ns=c)
        ip("link", "add", "vc2", "type", "veth", "peer", "name", "vr3", "netns", r, ns=c)
        ip("link", "add", "vr2", "type", "veth", "peer", "name", "vs", "netns", s, ns=r)
        for ns, dev, addrs in (
            (c, "vc", ("10.200.1.2/24", "fd00:1::2/64")),
            (c, "vc2", ("10.200.4.2/24",)),
            (r, "vr", ("10.200.1.1/24", "fd00:1::1/64")),
            (r, "vr3", ("10.200.4.1/24",)),
            (r, "vr2", ("10.200.2.1/24", "fd00:2::1/64")),
            (s, "vs", ("10.200.2.2/24", "fd00:2::2/64")),
        ):
            for a in addrs:
                ip("addr", "add", a, "dev", dev, *(["nodad"] if ":" in a else []), ns=ns)
            ip("link", "set", dev, "up", ns=ns)
        ip("route", "add", "default", "via", "10.200.1.1", ns=c)
        ip("-6", "route", "add", "default", "via", "fd00:1::1", ns=c)
        ip("route", "add", "default", "via", "10.200.4.1", "dev", "vc2", "table", "100", ns=c)
        ip("rule", "add", "from", "10.200.4.2", "table", "100", ns=c)
        ip("route", "add", "default", "via", "10.200.2.1", ns=s)
        yield t
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def resolver() -> Iterator[GatewayResolver]:
    r = GatewayResolver(cache_size=64, ttl_s=60.0, negative_ttl_s=5.0)
    try:
        yield r
    finally:
        r.close()


class FakeClock:
    """An injectable clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- lookups -----------------------------------------------------------------------------


@pytest.mark.kernel
def test_route_via_router(topo, resolver):
    g = resolver.lookup(RouteKey.of(topo.inode, "10.200.2.2"))
    assert g == Gateway(
        via="10.200.1.1",
        dev="vc",
        ifindex=ifindex(topo.client, "vc"),
        subnet=subnet_of(topo.client, "vc", "10.200.1.2"),
    )
    assert g.subnet == "10.200.1.0/24"
    oracle = route_get(topo.client, "10.200.2.2")
    assert oracle is not None
    assert (g.via, g.dev) == (oracle["gateway"], oracle["dev"])
    assert g.as_json() == {
        "via": "10.200.1.1",
        "dev": "vc",
        "ifindex": ifindex(topo.client, "vc"),
        "subnet": "10.200.1.0/24",
    }


@pytest.mark.kernel
def test_on_link_destination_has_no_via(topo, resolver):
    g = resolver.lookup(RouteKey.of(topo.inode, "10.200.1.1"))
    assert g == Gateway(None, "vc", ifindex(topo.client, "vc"), "10.200.1.0/24")


@pytest.mark.kernel
@pytest.mark.parametrize("dst", ["10.200.1.2", "10.200.4.2", "127.0.0.1", "::1", "fd00:1::2"])
def test_local_and_loopback_destinations_give_none(topo, resolver, dst):
    assert resolver.lookup(RouteKey.of(topo.inode, dst)) is None
    assert resolver.stats()["errors"] == 0


@pytest.mark.kernel
def test_ipv6_route(topo, resolver):
    g = resolver.lookup(RouteKey.of(topo.inode, "fd00:2::2"))
    oracle = route_get(topo.client, "fd00:2::2")
    assert oracle is not None
    assert g == Gateway(
        via="fd00:1::1",
        dev="vc",
        ifindex=ifindex(topo.client, "vc"),
        subnet=subnet_of(topo.client, "vc", oracle["prefsrc"]),
    )
    on_link = resolver.lookup(RouteKey.of(topo.inode, "fd00:1::1"))
    assert on_link is not None
    assert (on_link.via, on_link.dev) == (None, "vc")


@pytest.mark.kernel
def test_ipv4_mapped_destination_is_looked_up_as_ipv4(topo, resolver):
    g = resolver.lookup(RouteKey.of(topo.inode, "::ffff:10.200.2.2"))
    assert g is not None
    assert (g.via, g.dev, g.subnet) == ("10.200.1.1", "vc", "10.200.1.0/24")


@pytest.mark.kernel
def test_source_address_selects_policy_route(topo, resolver):
    g = resolver.lookup(RouteKey.of(topo.inode, "10.200.2.2", saddr="10.200.4.2"))
    assert g == Gateway("10.200.4.1", "vc2", ifindex(topo.client, "vc2"), "10.200.4.0/24")
    oracle = route_get(topo.client, "10.200.2.2", "from", "10.200.4.2")
    assert oracle is not None
    assert (g.via, g.dev) == (oracle["gateway"], oracle["dev"])


@pytest.mark.kernel
def test_output_interface_is_respected(topo, resolver):
    vc2 = ifindex(topo.client, "vc2")
    g = resolver.lookup(RouteKey.of(topo.inode, "10.200.2.2", oif=vc2))
    oracle = route_get(topo.client, "10.200.2.2", "oif", "vc2")
    assert oracle is not None
    assert g is not None
    assert (g.dev, g.ifindex) == ("vc2", vc2)
    assert g.via == oracle.get("gateway")
    assert g.subnet == "10.200.4.0/24"


@pytest.mark.kernel
def test_host_namespace_matches_iproute2(resolver):
    host = netns_inode("/proc/self/ns/net")
    dst = "10.200.77.77"
    g = resolver.lookup(RouteKey.of(host, dst))
    oracle = route_get(None, dst)
    if oracle is None or oracle.get("type", "unicast") != "unicast":
        assert g is None
        return
    assert g is not None
    assert (g.via, g.dev, g.ifindex) == (
        oracle.get("gateway"),
        oracle["dev"],
        socket_ifindex(oracle["dev"]),
    )


def socket_ifindex(dev: str) -> int:
    import socket

    return socket.if_nametoindex(dev)


@pytest.mark.kernel
def test_unnamed_namespace_found_through_a_process():
    """A namespace with no name under /run/netns, held only by a process."""
    if os.geteuid() != 0:
        kernel_skip("needs root to create network namespaces")
    proc = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    try:
        path = f"/proc/{proc.pid}/ns/net"
        for _ in range(1000):  # until unshare has exec'd sleep in the new namespace
            if os.readlink(path) != os.readlink("/proc/self/ns/net"):
                break
            threading.Event().wait(0.01)
        inode = netns_inode(path)
        assert inode != netns_inode("/proc/self/ns/net")
        enter = ["nsenter", "-t", str(proc.pid), "-n", "ip"]
        for args in (
            ["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
            ["addr", "add", "10.200.9.2/24", "dev", "d0"],
            ["link", "set", "d0", "up"],
            ["link", "set", "d1", "up"],
            ["route", "add", "default", "via", "10.200.9.1"],
        ):
            subprocess.run(enter + args, check=True, capture_output=True)
        d0 = json.loads(
            subprocess.run(
                [*enter, "-j", "link", "show", "d0"], check=True, capture_output=True
            ).stdout
        )[0]["ifindex"]
        assert NetnsIndex().path(inode).startswith("/proc/")
        with GatewayResolver() as r:
            g = r.lookup(RouteKey.of(inode, "10.200.50.1"))
        assert g == Gateway("10.200.9.1", "d0", d0, "10.200.9.0/24")
    finally:
        proc.kill()
        proc.wait()


# -- cache -------------------------------------------------------------------------------


@pytest.mark.kernel
def test_cache_hit_and_expiry(topo):
    clock = FakeClock()
    key = RouteKey.of(topo.inode, "10.200.2.2")
    with GatewayResolver(cache_size=8, ttl_s=30.0, negative_ttl_s=5.0, clock=clock) as r:
        first = r.lookup(key)
        assert first is not None
        s = r.stats()
        assert (s["lookups"], s["hits"], s["misses"], s["resolved"]) == (1, 0, 1, 1)
        assert r.lookup(key) == first
        assert r.get(key) == first
        s = r.stats()
        assert (s["lookups"], s["hits"], s["misses"], s["resolved"]) == (3, 2, 1, 1)
        clock.now += 29.0
        assert r.get(key) == first
        clock.now += 2.0  # past the TTL
        assert r.get(key) is None
        s = r.stats()
        assert (s["expiries"], s["misses"], s["size"]) == (1, 2, 0)
        assert r.lookup(key) == first
        s = r.stats()
        assert (s["resolved"], s["expiries"], s["errors"]) == (2, 1, 0)


@pytest.mark.kernel
def test_errors_are_counted_and_cached_briefly(topo, tmp_path):
    clock = FakeClock()
    f = tmp_path / "not-a-namespace"
    f.write_text("")
    bogus = os.stat(f).st_ino  # an inode that is no network namespace
    key = RouteKey.of(bogus, "10.200.2.2")
    with GatewayResolver(ttl_s=30.0, negative_ttl_s=5.0, clock=clock) as r:
        assert r.lookup(key) is None
        assert r.stats()["errors"] == 1
        assert r.last_error is not None
        assert str(bogus) in r.last_error
        assert r.lookup(key) is None  # negative entry: no second attempt
        s = r.stats()
        assert (s["errors"], s["resolved"], s["hits"]) == (1, 1, 1)
        clock.now += 6.0
        assert r.lookup(key) is None
        s = r.stats()
        assert (s["errors"], s["resolved"], s["expiries"]) == (2, 2, 1)


@pytest.mark.kernel
def test_lru_eviction(topo):
    with GatewayResolver(cache_size=2) as r:
        keys = [RouteKey.of(topo.inode, f"10.200.2.{i}") for i in (2, 3, 4)]
        for k in keys:
            assert r.lookup(k) is not None
        s = r.stats()
        assert (s["size"], s["evictions"]) == (2, 1)
        assert r.get(keys[0]) is None  # the oldest went
        assert r.get(keys[2]) is not None


@pytest.mark.kernel
def test_request_is_answered_by_the_worker(topo):
    key = RouteKey.of(topo.inode, "10.200.2.2")
    r = GatewayResolver()
    try:
        assert r.request(key) is None  # queued, not looked up in this thread
        assert r.request(key) is None  # already pending: not queued twice
        assert r.wait_idle(timeout=30)
        g = r.request(key)
        assert g is not None
        assert (g.via, g.dev) == ("10.200.1.1", "vc")
        s = r.stats()
        assert (s["queued"], s["resolved"], s["pending"], s["hits"]) == (1, 1, 0, 1)
        assert any(t.name == "nettracer-gateway" for t in threading.enumerate())
    finally:
        r.close()
    assert not any(t.name == "nettracer-gateway" for t in threading.enumerate())
    assert r.request(RouteKey.of(topo.inode, "10.200.2.9")) is None  # closed: not queued
    assert r.stats()["queued"] == 1


@pytest.mark.kernel
def test_resolve_within_budget(topo):
    """``resolve`` answers in the calling thread; with no budget left the keys are
    late, absent from the answer and looked up by the worker."""
    r = GatewayResolver(cache_size=16, ttl_s=60.0)
    try:
        far, near = RouteKey.of(topo.inode, "10.200.2.2"), RouteKey.of(topo.inode, "10.200.1.1")
        assert r.resolve([far], 0.0) == {}
        assert r.stats()["late"] == 1
        assert r.wait_idle(10.0)
        got = r.resolve([far, near], 5.0)
        assert got[far] is not None and got[far].via == "10.200.1.1"
        assert got[near] is not None and got[near].via is None
        assert r.stats()["late"] == 1
    finally:
        r.close()


# -- connections through the router, under CPU load ----------------------------------------

SERVER = """
import socket, sys
ls = socket.socket()
ls.bind(("10.200.2.2", 0))
ls.listen(64)
print(ls.getsockname()[1], flush=True)
while True:
    s, _ = ls.accept()
    s.sendall(s.recv(100))
    s.close()
"""

CLIENT = """
import json, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
held, ends = [], []
for i in range(n):
    c = socket.create_connection(("10.200.2.2", port))
    c.sendall(b"x" * 10)
    c.recv(100)
    ends.append(c.getsockname()[1])
    (held.append(c) if i % 2 else c.close())
print(json.dumps(ends), flush=True)
sys.stdin.readline()
for c in held:
    c.close()
print("closed", flush=True)
sys.stdin.readline()
"""


def _netns_python(ns: str, code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def cpu_load() -> Iterator[None]:
    """One busy process per CPU for the length of the test."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        yield
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def _one_run(topo: Topo, port: int, n: int, want: dict[str, object]) -> None:
    """``n`` connections from the client to the server through the router, every
    second one held open across an interval; every report of each (open, then closed,
    or only closed) carries the gateway, in the fast JSON path too."""
    from conftest import settings

    from nettracer.output.conns import RecordLines
    from nettracer.tracers.conns.monitor import ConnMonitor

    monitor = ConnMonitor.from_config(settings(offsets__source=ANY_OFFSETS), netns=topo.inode)
    client = None
    try:
        monitor.start()
        monitor.render_closed = RecordLines(
            bytes_from_tcp_sock=not monitor.tracer.use_length, mono_to_epoch_ns=0
        )
        client = _netns_python(topo.client, CLIENT, str(port), str(n))
        assert client.stdout is not None and client.stdin is not None
        ports = set(json.loads(client.stdout.readline()))
        reports = [monitor.interval()]
        client.stdin.write("close\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "closed"
        shown: dict[int, list[object]] = {p: [] for p in ports}
        closed: set[int] = set()

        def take(iv: Any) -> set[int]:
            for c in iv.conns + iv.closed:
                if c.sport in ports and c.dport == port:
                    shown[c.sport].append(None if c.gateway is None else c.gateway.as_json())
                    if c in iv.closed:
                        closed.add(c.sport)
            for text in iv.closed_text:
                d = json.loads(text)
                if d["sport"] in ports and d["dport"] == port:
                    shown[d["sport"]].append(d["gateway"])
                    closed.add(d["sport"])
            return closed

        take(reports[0])
        poll_until(lambda: take(monitor.interval()), lambda got: got == ports, 30.0, 0.1)
    finally:
        if client is not None:
            client.kill()
            client.wait()
        monitor.close()
    assert closed == ports
    assert all(shown[p] and all(g == want for g in shown[p]) for p in ports), shown


@pytest.mark.kernel
def test_every_report_has_its_gateway_under_load(topo, cpu_load):
    """5 runs in a row of 20 connections through the router, with every CPU busy: each
    connection's every report (the first one included, and the only one of those that
    closed within an interval) has gateway 10.200.1.1 on vc."""
    want = {
        "via": "10.200.1.1",
        "dev": "vc",
        "ifindex": ifindex(topo.client, "vc"),
        "subnet": "10.200.1.0/24",
    }
    ip("netns", "exec", topo.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    server = _netns_python(topo.server, SERVER)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        for _ in range(5):
            _one_run(topo, port, 20, want)
    finally:
        server.kill()
        server.wait()


# -- keys (no kernel) --------------------------------------------------------------------


def test_route_key_normalisation():
    assert RouteKey.of(5, "::ffff:10.0.0.1") == RouteKey(5, "10.0.0.1")
    assert RouteKey.of(5, bytes([10, 0, 0, 1]), saddr="fd00::1") == RouteKey(5, "10.0.0.1")
    assert RouteKey.of(5, "fd00:0:0::1", saddr="::").saddr is None
    assert RouteKey.of(5, ipaddress.ip_address("fd00::1"), "fd00::2", 3) == RouteKey(
        5, "fd00::1", "fd00::2", 3
    )
