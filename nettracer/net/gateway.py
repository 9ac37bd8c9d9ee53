"""Gateway lookups: the route a connection to a non-local destination takes.

For a connection seen in network namespace ``netns`` (inode, ``sock_common.skc_net->
ns.inum``) going to ``daddr`` (from ``saddr``, maybe bound to interface ``oif``), ask
that namespace's routing table what ``ip route get DADDR from SADDR oif DEV`` answers
(``RTM_GETROUTE`` over rtnetlink, with pyroute2) and report the next hop, the output
interface and the subnet of the interface address the route uses.

:class:`GatewayResolver` caches answers (LRU with TTL; failures and "no gateway"
answers are kept for a short negative TTL).  :meth:`GatewayResolver.request` answers
from the cache and queues a miss for a worker thread; :meth:`GatewayResolver.resolve`
answers a set of keys within a time budget in the calling thread (what the connection
monitor does once per interval, so that every report carries its gateway) and leaves
what the budget did not cover to the worker.  pyroute2 is imported only when a lookup
is made.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import queue
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nettracer.net.netns import NetnsIndex, netlink_socket_in, open_netns

if TYPE_CHECKING:
    from nettracer.config import Config

#: ``rtm_type`` values from ``<linux/rtnetlink.h>``: only unicast routes have a gateway
RTN_UNICAST = 1
RTN_LOCAL = 2

#: errno of RTM_GETROUTE when the table has no route (``ip route get`` says so too)
_NO_ROUTE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EINVAL})

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Gateway:
    """Where packets to a destination leave: ``via`` the next hop (None when on-link),
    ``dev``/``ifindex`` the output interface, ``subnet`` the CIDR of the interface
    address the route uses (None when the interface has no address in that family)."""

    via: str | None
    dev: str
    ifindex: int
    subnet: str | None

    def as_json(self) -> dict[str, object]:
        return {"via": self.via, "dev": self.dev, "ifindex": self.ifindex, "subnet": self.subnet}


def _address(value: object) -> Address:
    """An IP address from text, bytes (4 or 16, network order) or an ipaddress object;
    IPv4-mapped IPv6 (``::ffff:a.b.c.d``, a v4 peer of a dual-stack socket) becomes IPv4."""
    if isinstance(value, (bytes, bytearray)):
        addr: Address = ipaddress.ip_address(bytes(value))
    elif isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        addr = value
    else:
        addr = ipaddress.ip_address(str(value))
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True)
class RouteKey:
    """What a route depends on: namespace inode, destination, source, bound interface.

    Build it with :meth:`of`, which normalises addresses (``saddr`` of another family
    or unspecified is dropped; ``oif`` 0 means not bound).
    """

    netns: int
    daddr: str
    saddr: str | None = None
    oif: int = 0

    @classmethod
    def of(cls, netns: int, daddr: object, saddr: object = None, oif: int = 0) -> RouteKey:
        dst = _address(daddr)
        src: Address | None = None if saddr is None else _address(saddr)
        if src is not None and (src.version != dst.version or src.is_unspecified):
            src = None
        return cls(int(netns), str(dst), None if src is None else str(src), int(oif or 0))


#: one interface address: (address, its network, ``ifa_scope``)
_Addr = tuple[Address, ipaddress.IPv4Network | ipaddress.IPv6Network, int]
#: one interface: (name, addresses)
_Iface = tuple[str, list[_Addr]]


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


class RouteReader:
    """rtnetlink handles, one per namespace, used by one thread (pyroute2's
    ``IPRoute`` keeps per-thread state, so a reader must stay in its thread).

    Handles are kept for ``idle_s`` seconds and at most ``max_handles`` at a time:
    an open socket keeps its namespace alive.  Interface names and addresses are
    dumped once per ``iface_ttl_s`` seconds per namespace, not once per lookup.
    """

    def __init__(
        self,
        index: NetnsIndex | None = None,
        max_handles: int = 8,
        idle_s: float = 30.0,
        iface_ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = index or NetnsIndex()
        self.max_handles = max_handles
        self.idle_s = idle_s
        self.iface_ttl_s = iface_ttl_s
        self.clock = clock
        self._handles: OrderedDict[int, tuple[Any, float]] = OrderedDict()
        self._ifaces: dict[int, tuple[float, dict[int, _Iface]]] = {}

    def _handle(self, netns: int) -> Any:
        from pyroute2 import IPRoute

        now = self.clock()
        held = self._handles.pop(netns, None)
        if held is not None and now - held[1] <= self.idle_s:
            self._handles[netns] = (held[0], now)
            return held[0]
        if held is not None:
            held[0].close()
            self._ifaces.pop(netns, None)
        path = self.index.path(netns)
        fd = open_netns(path, netns)
        try:
            sock = netlink_socket_in(fd)
        finally:
            os.close(fd)
        try:
            ipr = IPRoute(fileno=sock.detach())
        except BaseException:
            sock.close()
            raise
        self._handles[netns] = (ipr, now)
        while len(self._handles) > self.max_handles:
            old_ns, (old, _) = self._handles.popitem(last=False)
            self._ifaces.pop(old_ns, None)
            old.close()
        return ipr

    def drop(self, netns: int) -> None:
        """Forget the handle of ``netns`` (after an error: the namespace may be gone)."""
        self._ifaces.pop(netns, None)
        held = self._handles.pop(netns, None)
        if held is not None:
            held[0].close()

    def close(self) -> None:
        self._ifaces.clear()
        while self._handles:
            _, (ipr, _) = self._handles.popitem()
            ipr.close()

    def route(self, key: RouteKey) -> Gateway | None:
        """``ip route get`` in ``key.netns``: the Gateway, or None when the destination
        is local (``RTN_LOCAL``), loopback, not unicast, or has no route.

        Raises :class:`NetnsNotFound` or ``OSError`` / pyroute2's ``NetlinkError``
        when the lookup itself fails.
        """
        from pyroute2.netlink.exceptions import NetlinkError

        dst = ipaddress.ip_address(key.daddr)
        if dst.is_loopback or dst.is_unspecified or dst.is_multicast:
            return None
        family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
        ipr = self._handle(key.netns)
        req: dict[str, Any] = {"dst": key.daddr, "family": family}
        if key.saddr is not None:
            req["src"] = key.saddr
        if key.oif:
            req["oif"] = key.oif
        try:
            answer = ipr.route("get", **req)
        except NetlinkError as exc:
            if exc.code in _NO_ROUTE:
                return None
            raise
        if not answer:
            return None
        msg = answer[0]
        if msg["type"] != RTN_UNICAST:
            return None
        oif = _attr(msg, "RTA_OIF")
        if not oif:
            return None
        via = _attr(msg, "RTA_GATEWAY")
        if via is None:
            rtvia = _attr(msg, "RTA_VIA")  # IPv4 route via an IPv6 next hop (Linux 5.2+)
            if isinstance(rtvia, dict) and rtvia.get("addr"):
                via = rtvia["addr"]
        src = key.saddr or _attr(msg, "RTA_PREFSRC")
        ifaces = self._interfaces(key.netns, ipr, int(oif))
        dev, addrs = ifaces.get(int(oif), (str(oif), []))
        subnet = _subnet([a for a in addrs if a[0].version == dst.version], src, via or key.daddr)
        return Gateway(via=via, dev=dev, ifindex=int(oif), subnet=subnet)

    def _interfaces(self, netns: int, ipr: Any, oif: int) -> dict[int, _Iface]:
        """ifindex -> (name, addresses) of ``netns``, dumped at most every
        ``iface_ttl_s`` seconds (sooner when ``oif`` is not in the snapshot)."""
        now = self.clock()
        snap = self._ifaces.get(netns)
        if snap is not None and now < snap[0] and oif in snap[1]:
            return snap[1]
        ifaces: dict[int, _Iface] = {}
        for link in ipr.link("dump"):
            ifaces[link["index"]] = (link.get_attr("IFLA_IFNAME") or str(link["index"]), [])
        for a in ipr.addr("dump"):
            # IFA_LOCAL is the local address (IFA_ADDRESS is the peer on point-to-point
            # links); IPv6 sends only IFA_ADDRESS.
            local = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
            if local is None or a["index"] not in ifaces:
                continue
            iface = ipaddress.ip_interface(f"{local}/{a['prefixlen']}")
            ifaces[a["index"]][1].append((iface.ip, iface.network, a["scope"]))
        self._ifaces[netns] = (now + self.iface_ttl_s, ifaces)
        return ifaces


def _subnet(addrs: list[_Addr], src: str | None, near: str) -> str | None:
    """The network of the interface address a route uses: the one equal to the source
    (``RTA_PREFSRC``), else the one whose network holds the next hop, else the first of
    global scope, else the first; None when the interface has no address of the family."""
    if not addrs:
        return None
    if src is not None:
        s = ipaddress.ip_address(src)
        for ip, net, _ in addrs:
            if ip == s:
                return str(net)
    n = ipaddress.ip_address(near)
    for _, net, _ in addrs:
        if n in net:
            return str(net)
    for _, net, scope in addrs:
        if scope == 0:  # RT_SCOPE_UNIVERSE
            return str(net)
    return str(addrs[0][1])


@dataclass
class _Entry:
    value: Gateway | None
    expires: float


class GatewayResolver:
    """Cached gateway lookups that never stall the caller.

    * :meth:`request` — for the event loop: the cached answer, or None now and a lookup
      queued for the worker thread (started on first use).
    * :meth:`get` — the cached answer only.
    * :meth:`lookup` — synchronous: cached, or looked up in the calling thread.
    * :meth:`resolve` — synchronous for many keys within a time budget (one reader kept
      for the calling thread); keys left over are queued for the worker.

    Counters (:meth:`stats`): ``lookups`` = ``hits`` + ``misses`` (every get, request
    and lookup); ``expiries`` are misses that found an entry past its TTL; ``resolved``
    netlink lookups made, ``errors`` of them failed (cached for ``negative_ttl_s``, as
    are "no gateway" answers); ``queued`` / ``dropped`` requests (queue full);
    ``evictions`` by the LRU bound; ``late`` keys :meth:`resolve` left to the worker
    because its budget was spent.  ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        cache_size: int = 1024,
        ttl_s: float = 300.0,
        negative_ttl_s: float = 5.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        queue_size: int = 4096,
        index: NetnsIndex | None = None,
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be >= 1")
        self.cache_size = cache_size
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.clock = clock
        self.index = index or NetnsIndex()
        self.last_error: str | None = None
        self._cache: OrderedDict[RouteKey, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._pending: set[RouteKey] = set()
        self._queue: queue.Queue[RouteKey | None] = queue.Queue(maxsize=queue_size)
        self._worker: threading.Thread | None = None
        #: the reader of :meth:`resolve` (one thread uses it: pyroute2 keeps per-thread
        #: state)
        self._sync_reader: RouteReader | None = None
        self._closed = False
        self._stats = dict.fromkeys(
            (
                "lookups",
                "hits",
                "misses",
                "expiries",
                "resolved",
                "errors",
                "queued",
                "dropped",
                "evictions",
                "late",
            ),
            0,
        )

    @classmethod
    def from_config(cls, config: Config, **kw: Any) -> GatewayResolver:
        """A resolver sized by the ``gateway_lookup.*`` keys."""
        return cls(
            cache_size=int(config["gateway_lookup.cache_size"]),  # type: ignore[call-overload]
            ttl_s=float(config["gateway_lookup.ttl_s"]),  # type: ignore[arg-type]
            negative_ttl_s=float(config["gateway_lookup.negative_ttl_s"]),  # type: ignore[arg-type]
            **kw,
        )

    # -- cache ---------------------------------------------------------------------------

    def _cached(self, key: RouteKey) -> tuple[bool, Gateway | None]:
        """(found fresh, value); counts the query.  Caller holds the lock."""
        self._stats["lookups"] += 1
        entry = self._cache.get(key)
        if entry is not None:
            if self.clock() < entry.expires:
                self._cache.move_to_end(key)
                self._stats["hits"] += 1
                return True, entry.value
            del self._cache[key]
            self._stats["expiries"] += 1
        self._stats["misses"] += 1
        return False, None

    def _store(self, key: RouteKey, value: Gateway | None, failed: bool) -> None:
        ttl = self.ttl_s if value is not None and not failed else self.negative_ttl_s
        with self._lock:
            self._cache[key] = _Entry(value, self.clock() + ttl)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
                self._stats["evictions"] += 1

    def get(self, key: RouteKey) -> Gateway | None:
        """The cached answer, or None (not cached, expired, or no gateway)."""
        with self._lock:
            return self._cached(key)[1]

    def request(self, key: RouteKey) -> Gateway | None:
        """The cached answer now; on a miss, None and a lookup queued for the worker."""
        with self._lock:
            found, value = self._cached(key)
            if found or key in self._pending or self._closed:
                return value
            try:
                self._queue.put_nowait(key)
            except queue.Full:
                self._stats["dropped"] += 1
                return None
            self._pending.add(key)
            self._stats["queued"] += 1
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._work, name="nettracer-gateway", daemon=True
                )
                self._worker.start()
        return None

    def lookup(self, key: RouteKey) -> Gateway | None:
        """The answer, from the cache or looked up now in the calling thread."""
        with self._lock:
            found, value = self._cached(key)
        if found:
            return value
        reader = RouteReader(self.index)
        try:
            return self._resolve(reader, key)
        finally:
            reader.close()

    def resolve(self, keys: Iterable[RouteKey], budget_s: float) -> dict[RouteKey, Gateway | None]:
        """The answers for ``keys``: cached ones, then lookups in the calling thread
        until ``budget_s`` seconds have passed (``time.monotonic``).  Keys left when the
        budget is spent are absent from the result, counted ``late`` and queued for the
        worker (the next call finds them cached).  Always the same thread."""
        out: dict[RouteKey, Gateway | None] = {}
        misses = []
        with self._lock:
            for key in keys:
                found, value = self._cached(key)
                if found:
                    out[key] = value
                else:
                    misses.append(key)
        if not misses:
            return out
        deadline = time.monotonic() + budget_s
        if self._sync_reader is None:
            self._sync_reader = RouteReader(self.index)
        for i, key in enumerate(misses):
            if time.monotonic() >= deadline:
                with self._lock:
                    self._stats["late"] += len(misses) - i
                for late in misses[i:]:
                    self.request(late)
                break
            out[key] = self._resolve(self._sync_reader, key)
        return out

    def warm(self) -> None:
        """Import what lookups use (pyroute2 takes a few hundred ms to import on a busy
        host: better before tracing starts than out of the first interval's budget)."""
        import pyroute2
        import pyroute2.netlink.exceptions  # noqa: F401

    def _resolve(self, reader: RouteReader, key: RouteKey) -> Gateway | None:
        """Look ``key`` up with ``reader`` and cache the answer.

        Any failure (namespace gone, netlink error, a pyroute2 surprise) is counted,
        kept in :attr:`last_error` and cached as None: a gateway is an enrichment and
        must never stop the worker or the tracer.
        """
        try:
            value = reader.route(key)
        except Exception as exc:
            with contextlib.suppress(Exception):
                reader.drop(key.netns)
            with self._lock:
                self._stats["resolved"] += 1
                self._stats["errors"] += 1
                self.last_error = f"{key}: {type(exc).__name__}: {exc}"
            self._store(key, None, failed=True)
            return None
        with self._lock:
            self._stats["resolved"] += 1
        self._store(key, value, failed=False)
        return value

    # -- worker --------------------------------------------------------------------------

    def _work(self) -> None:
        reader = RouteReader(self.index)
        try:
            while True:
                key = self._queue.get()
                if key is None:
                    return
                try:
                    self._resolve(reader, key)
                finally:
                    with self._lock:
                        self._pending.discard(key)
                    self._queue.task_done()
        finally:
            reader.close()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every queued request has been looked up (for tests and shutdown).

        Returns False if ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._pending:
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def stats(self) -> dict[str, int]:
        """The counters, plus ``size`` (cached entries) and ``pending`` (queued keys)."""
        with self._lock:
            out = dict(self._stats)
            out["size"] = len(self._cache)
            out["pending"] = len(self._pending)
        return out

    def close(self) -> None:
        """Stop the worker (after the lookup it is doing) and close its sockets."""
        with self._lock:
            self._closed = True
            worker = self._worker
        if worker is not None:
            while True:
                try:
                    self._queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    try:  # make room: pending lookups are abandoned
                        self._queue.get_nowait()
                        self._queue.task_done()
                    except queue.Empty:
                        pass
            worker.join()
            with self._lock:
                self._worker = None
                self._pending.clear()
        if self._sync_reader is not None:
            self._sync_reader.close()
            self._sync_reader = None

    def __enter__(self) -> GatewayResolver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
