"""``nettracer agent``: the drop monitor and the connection tracer behind a Prometheus endpoint.

One :class:`Agent` owns a :class:`~nettracer.tracers.drops.monitor.DropMonitor` and a
:class:`~nettracer.tracers.conns.monitor.ConnMonitor` and turns what they report into
cumulative :class:`Totals`; :mod:`nettracer.output.prometheus` exposes them.

Who reads the monitors, and when
--------------------------------
Neither monitor is thread-safe, and the connection tracer's ring buffer must be drained
continuously (every ~50 ms) whether or not anybody scrapes.  So the monitors belong to
one thread, the main one (which also receives SIGINT/SIGTERM), running :meth:`Agent.run`:
it drains the ring buffer every 50 ms and *refreshes* the totals (one
``DropMonitor.collect`` and one ``ConnMonitor.interval``) every ``interval`` seconds and
whenever a scrape asks for it.  A scrape (in the HTTP server's thread) asks for a
refresh and waits for it (at most ``scrape_wait_s``; a refresh younger than
``min_refresh_s`` is served as it is), then reads a snapshot of the totals under a lock.
Scrapes therefore see the kernel's counts as of the scrape, never race the monitors, and
several scrapers cost at most one map walk per ``min_refresh_s``.

Counters and their bounds
-------------------------
Every counter is a sum of per-refresh deltas, so it never decreases.  Drop series are
keyed by (location, symbol, module, reason, device, protocol, netns, container_id,
pod_uid); at most
``max_drop_series`` (:data:`MAX_DROP_SERIES`) label sets are ever created and they are
never removed (a counter that vanished would reset).  Drops of any further label set are
added to the single series whose labels are all ``"other"``; ``folded_keys`` counts the
distinct label sets that went there (tracked exactly up to :data:`MAX_FOLDED_TRACKED`,
beyond which it stops growing, so it is then a lower bound).

TCP bytes and retransmits are the increase of each connection's counters between
refreshes (the first refresh that sees a connection counts all it has); connections
already open when the agent started may thus bring bytes from before it (with
``tcp_sock`` byte counts only: the ``sock_*_length`` tracepoints count from attach).

Containers
----------
A drop is labelled with the container of its network namespace, a connection with the
container of its process (of its network namespace when the pid is unknown or gone),
both through one :class:`~nettracer.kernel.cgroup.ContainerResolver`; outside any
container both labels are empty.  Connection series (open, closed, TCP bytes,
retransmits, RTT) are kept per (container_id, pod_uid) for at most
``max_container_series`` (:data:`MAX_CONTAINER_SERIES`) containers; further ones are
summed under ``("other", "other")``.  The RTT histogram observes, once per TCP
connection when it closes, its last smoothed RTT (``tcp_sock.srtt_us >> 3``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from nettracer.bpf.fd import StopRequest
from nettracer.errors import NettracerError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from nettracer.kernel.cgroup import Cgroup
    from nettracer.tracers.conns.monitor import ConnMonitor
    from nettracer.tracers.drops.groups import Names
    from nettracer.tracers.drops.monitor import DropMonitor

#: drop label sets kept as their own series before the rest is folded into "other"
MAX_DROP_SERIES = 1000
#: folded label sets remembered to count distinct ones
MAX_FOLDED_TRACKED = 65536
#: label names that say which container a series is about
CONTAINER_LABELS = ("container_id", "pod_uid")
#: label names of ``nettracer_drops_total``, in order
DROP_LABELS = (
    "location",
    "symbol",
    "module",
    "reason",
    "device",
    "protocol",
    "netns",
    *CONTAINER_LABELS,
)
OTHER = ("other",) * len(DROP_LABELS)
#: containers kept as their own connection series before the rest is summed in "other"
MAX_CONTAINER_SERIES = 1000
OTHER_CONTAINER = ("other", "other")
#: upper bounds in seconds of the TCP RTT histogram's buckets (+Inf follows)
RTT_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5,
)  # fmt: skip

DropLabels = tuple[str, ...]
#: (container_id, pod_uid), both empty outside any container
ContainerKey = tuple[str, str]


@dataclasses.dataclass
class TcpTotals:
    """TCP counters of one container; ``rtt_buckets[i]`` counts RTTs up to
    ``RTT_BUCKETS[i]`` but above the previous bound (the last one: above all)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    retransmits: int = 0
    rtt_buckets: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(RTT_BUCKETS) + 1))
    rtt_sum: float = 0.0

    def observe_rtt(self, seconds: float) -> None:
        import bisect

        self.rtt_buckets[bisect.bisect_left(RTT_BUCKETS, seconds)] += 1
        self.rtt_sum += seconds


@dataclasses.dataclass
class Totals:
    """Everything the endpoint reports, cumulative since the agent started."""

    drops: dict[DropLabels, int] = dataclasses.field(default_factory=dict)
    drops_lost: int = 0
    #: distinct drop label sets folded into the "other" series
    folded_keys: int = 0
    #: (proto, family, direction, container_id, pod_uid) -> open at the last refresh
    conns_open: dict[tuple[str, ...], int] = dataclasses.field(default_factory=dict)
    #: (proto, family, container_id, pod_uid) -> connections closed (or expired)
    conns_closed: dict[tuple[str, ...], int] = dataclasses.field(default_factory=dict)
    #: (container_id, pod_uid) -> its TCP counters
    tcp: dict[ContainerKey, TcpTotals] = dataclasses.field(default_factory=dict)
    conns_evicted: int = 0
    conns_lost: int = 0
    refreshes: int = 0
    refresh_seconds: float = 0.0

    def copy(self) -> Totals:
        return dataclasses.replace(
            self,
            drops=dict(self.drops),
            conns_open=dict(self.conns_open),
            conns_closed=dict(self.conns_closed),
            tcp={
                k: dataclasses.replace(v, rtt_buckets=list(v.rtt_buckets))
                for k, v in self.tcp.items()
            },
        )


def family_name(family: int) -> str:
    return "ipv6" if family == 6 else "ipv4"


class Agent:
    """Drives the monitors (each optional) and keeps :class:`Totals`.

    ``drops`` and ``conns`` are monitors already built but not started, or None until
    :meth:`load` builds them from the configuration; ``offsets_source`` says where their
    offsets came from (empty until known).
    """

    def __init__(
        self,
        drops: DropMonitor | None,
        conns: ConnMonitor | None,
        *,
        offsets_source: str = "",
        interval: float = 5.0,
        max_drop_series: int = MAX_DROP_SERIES,
        max_container_series: int = MAX_CONTAINER_SERIES,
        scrape_wait_s: float = 5.0,
        min_refresh_s: float = 0.1,
    ) -> None:
        self.drops = drops
        self.conns = conns
        self.offsets_source = offsets_source
        self.interval = interval
        self.max_drop_series = max_drop_series
        self.max_container_series = max_container_series
        from nettracer.kernel.cgroup import ContainerResolver

        self.containers = ContainerResolver()
        self.scrape_wait_s = scrape_wait_s
        self.min_refresh_s = min_refresh_s
        self.names: Names | None = None
        self.totals = Totals()
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._wanted = 0
        self._done = 0
        self._last_refresh = 0.0
        self._folded: set[DropLabels] = set()
        self.running = False
        self.stop = StopRequest()
        self.errors = 0

    # -- life cycle ---------------------------------------------------------------------
    def load(self, cfg: Mapping[str, object], *, drops: bool = True, conns: bool = True) -> None:
        """Build the monitors asked for from ``cfg`` (their ``from_config``, sharing one
        load of the offsets), then :meth:`start` them.  The drop monitor has no filters;
        the connection monitor traces every namespace without gateway lookups (the
        metrics carry no per-connection labels)."""
        from nettracer.layout import source

        offsets = source.from_config(cfg)
        self.offsets_source = offsets.source
        if drops:
            from nettracer.tracers.drops.monitor import DropMonitor

            self.drops = DropMonitor.from_config(cfg, offsets=offsets)
        if conns:
            from nettracer.tracers.conns.monitor import ConnMonitor

            self.conns = ConnMonitor.from_config(cfg, offsets=offsets, gateway=False)
        self.interval = float(cfg["drops.interval_s"])  # type: ignore[arg-type]
        self.start()

    def reload(self, cfg: Mapping[str, object]) -> None:
        """Replace the monitors by ones built from ``cfg`` (SIGHUP), keeping the totals:
        what the old ones counted is added first; when the new ones cannot be built
        or attached the old ones stay and the error is raised (main thread only)."""
        self.refresh()
        old = (self.drops, self.conns, self.offsets_source)
        self.drops = self.conns = None
        try:
            self.load(cfg, drops=old[0] is not None, conns=old[1] is not None)
        except BaseException:
            self.close()  # what was built of the new ones
            self.drops, self.conns, self.offsets_source = old
            self.names = self.drops.names() if self.drops is not None else None
            raise
        for monitor in (old[1], old[0]):
            if monitor is not None:
                monitor.close()

    def start(self) -> None:
        """Load and attach the monitors' programs."""
        if self.drops is not None:
            self.drops.start()
            self.names = self.drops.names()
        if self.conns is not None:
            self.conns.start()

    def close(self) -> None:
        """Detach everything (idempotent)."""
        try:
            if self.conns is not None:
                self.conns.close()
        finally:
            if self.drops is not None:
                self.drops.close()

    @property
    def notices(self) -> list[str]:
        drops = list(self.drops.notices) if self.drops is not None else []
        return drops + (list(self.conns.notices) if self.conns is not None else [])

    def run(self, duration: float | None = None, on_hup: Callable[[], None] | None = None) -> None:
        """The main loop, in the main thread, until SIGINT/SIGTERM or ``duration``;
        SIGHUP calls ``on_hup`` from the loop (a reload), or stops it without one.

        Signals only set flags (an exception in the middle of reading the ring buffer
        would drop records already consumed), like ``nettracer conns``.
        """
        from nettracer.bpf.fd import ignore_stop_signals

        self.stop = StopRequest(reload=on_hup is not None).install()
        start = time.monotonic()
        end = start + duration if duration else float("inf")
        tick = start + self.interval
        self.running = True
        try:
            self.refresh()
            while not self.stop.signum:
                now = time.monotonic()
                if now >= end:
                    break
                if self.stop.reload_wanted and on_hup is not None:
                    self.stop.reload_wanted = False
                    on_hup()
                    continue
                with self._cond:
                    wanted = self._wanted > self._done
                if wanted or now >= tick:
                    self.refresh()
                    if now >= tick:
                        tick = now + self.interval
                    continue
                if self.conns is not None:
                    self.conns.poll(0)
                with self._cond:
                    if self._wanted <= self._done:
                        self._cond.wait(min(0.05, tick - now, end - now))
        finally:
            self.running = False
            with self._cond:
                self._done = self._wanted
                self._cond.notify_all()
            ignore_stop_signals()

    # -- scrapes ----------------------------------------------------------------------
    def snapshot(self) -> Totals:
        """The totals as of now: asks the main loop for a refresh and waits for it (unless
        one is younger than ``min_refresh_s`` or the loop is not running)."""
        if self.running and time.monotonic() - self._last_refresh > self.min_refresh_s:
            with self._cond:
                self._wanted += 1
                ticket = self._wanted
                self._cond.notify_all()
                self._cond.wait_for(
                    lambda: self._done >= ticket or not self.running, self.scrape_wait_s
                )
        with self._lock:
            return self.totals.copy()

    # -- refreshing -------------------------------------------------------------------
    def refresh(self) -> None:
        """Read both monitors and add what changed to the totals (main thread only)."""
        with self._cond:
            ticket = self._wanted
        t0 = time.perf_counter()
        try:
            drops = self._read_drops() if self.drops is not None else None
            conns = self._read_conns() if self.conns is not None else None
        except NettracerError:
            raise
        except OSError as exc:  # a map read failing must not take the endpoint down
            self.errors += 1
            sys.stderr.write(f"nettracer: agent: reading the monitors failed: {exc}\n")
            drops = conns = None
        with self._lock:
            t = self.totals
            if drops is not None:
                self._add_drops(t, *drops)
            if conns is not None:
                self._add_conns(t, conns)
            t.refreshes += 1
            t.refresh_seconds += time.perf_counter() - t0
        self._last_refresh = time.monotonic()
        with self._cond:
            self._done = max(self._done, ticket)
            self._cond.notify_all()

    def _read_drops(self) -> tuple[dict[DropLabels, int], int]:
        from nettracer.tracers.drops.groups import group_counts

        assert self.drops is not None and self.names is not None
        sample = self.drops.collect()
        by = ("location", "module", "device", "netns", "reason", "protocol")
        out: dict[DropLabels, int] = {}
        for g in group_counts(sample.counts, by, self.names):
            loc = g.location
            cg = self.containers.by_netns(g.netns) if g.netns else None
            labels: DropLabels = (
                loc.text if loc is not None else "",
                (loc.symbol or "") if loc is not None else "",
                g.module or "",
                g.reason or "",
                g.device or (str(g.ifindex) if g.ifindex else ""),
                g.protocol or "",
                str(g.netns) if g.netns else "",
                *container_labels(cg),
            )
            out[labels] = out.get(labels, 0) + g.count
        return out, sample.lost

    def _add_drops(self, t: Totals, counts: dict[DropLabels, int], lost: int) -> None:
        for labels, n in counts.items():
            if labels in t.drops:
                t.drops[labels] += n
            elif len(t.drops) - (OTHER in t.drops) < self.max_drop_series:
                t.drops[labels] = n
            else:
                t.drops[OTHER] = t.drops.get(OTHER, 0) + n
                if labels not in self._folded and len(self._folded) < MAX_FOLDED_TRACKED:
                    self._folded.add(labels)
                    t.folded_keys += 1
        t.drops_lost += max(0, lost)

    def _read_conns(self) -> Any:
        assert self.conns is not None
        return self.conns.interval()

    def _container(self, t: Totals, c: Any) -> ContainerKey:
        """The (bounded) container labels of connection ``c``: its process's, else its
        network namespace's."""
        key = container_labels(self.containers.of(c.pid, c.netns))
        if key in t.tcp or len(t.tcp) - (OTHER_CONTAINER in t.tcp) < self.max_container_series:
            t.tcp.setdefault(key, TcpTotals())
            return key
        return OTHER_CONTAINER

    def _add_conns(self, t: Totals, iv: Any) -> None:
        every = (*iv.conns, *iv.closed)
        memo: dict[tuple[int | None, int], ContainerKey] = {}  # one lookup per owner
        keys = []
        for c in every:
            owner = (c.pid, c.netns)
            key = memo.get(owner)
            if key is None:
                key = memo[owner] = self._container(t, c)
            keys.append(key)
        if OTHER_CONTAINER in keys:
            t.tcp.setdefault(OTHER_CONTAINER, TcpTotals())
        opened: dict[tuple[str, ...], int] = {}
        for c, ck in zip(iv.conns, keys, strict=False):
            k = (c.proto, family_name(c.family), c.direction, *ck)
            opened[k] = opened.get(k, 0) + 1
        # every label set seen once stays, at 0 when nothing is open
        t.conns_open = {k: 0 for k in t.conns_open} | opened
        for c, ck in zip(iv.closed, keys[len(iv.conns) :], strict=True):
            k2 = (c.proto, family_name(c.family), *ck)
            t.conns_closed[k2] = t.conns_closed.get(k2, 0) + 1
            if c.proto == "tcp" and c.rtt_us is not None:
                t.tcp[ck].observe_rtt(c.rtt_us / 1e6)
        for c, ck in zip(every, keys, strict=True):
            if c.proto != "tcp":
                continue
            tcp, prev = t.tcp[ck], c.prev
            tcp.bytes_sent += max(0, c.bytes_sent - prev[0])
            tcp.bytes_received += max(0, c.bytes_received - prev[1])
            tcp.retransmits += max(0, c.retransmits - prev[4])
        t.conns_evicted += max(0, iv.evicted)
        t.conns_lost += max(0, iv.lost)


def container_labels(cg: Cgroup | None) -> ContainerKey:
    """(container_id, pod_uid) of a cgroup, empty strings where there is none."""
    ct = cg.container if cg is not None else None
    if ct is None:
        return ("", "")
    return (ct.id, ct.pod_uid or "")


def kernel_release() -> str:
    return os.uname().release
