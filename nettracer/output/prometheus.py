"""The agent's metrics in the Prometheus exposition format (prometheus-client, imported lazily).

:class:`AgentCollector` is a custom collector: each scrape calls
:meth:`nettracer.agent.Agent.snapshot` (fresh totals, see :mod:`nettracer.agent`) and
turns it into metric families; nothing is kept in prometheus-client's own metric objects.
:func:`serve` binds the listening address and serves ``/metrics`` from a daemon thread.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from nettracer.errors import NettracerError

if TYPE_CHECKING:
    from nettracer.agent import Agent, Totals

#: every metric family, with its type and help, in exposition order
METRICS: tuple[tuple[str, str, str], ...] = (
    (
        "nettracer_drops_total",
        "counter",
        "packets the kernel dropped (skb:kfree_skb) by location, reason, device, protocol, "
        "network namespace and its container; label sets beyond the bound are summed in the "
        'series whose labels are all "other"',
    ),
    (
        "nettracer_drops_lost_total",
        "counter",
        "drops that could not be counted (map full, recursion)",
    ),
    (
        "nettracer_drops_folded_series",
        "gauge",
        'distinct drop label sets summed into the "other" series (a lower bound past 65536)',
    ),
    ("nettracer_connections_open", "gauge", "connections open at the last refresh"),
    ("nettracer_connections_closed_total", "counter", "connections closed or expired"),
    ("nettracer_tcp_bytes_sent_total", "counter", "bytes sent on TCP connections"),
    ("nettracer_tcp_bytes_received_total", "counter", "bytes received on TCP connections"),
    ("nettracer_tcp_retransmits_total", "counter", "TCP segments retransmitted"),
    (
        "nettracer_tcp_rtt_seconds",
        "histogram",
        "smoothed round-trip time of each TCP connection when it closed",
    ),
    (
        "nettracer_connections_evicted_total",
        "counter",
        "connections the kernel map or the agent's bound evicted before they were reported",
    ),
    (
        "nettracer_events_lost_total",
        "counter",
        "records a tracer could not deliver (ring buffer or map full)",
    ),
    ("nettracer_refreshes_total", "counter", "reads of the kernel maps"),
    ("nettracer_refresh_seconds_total", "counter", "time spent reading the kernel maps"),
    ("nettracer_offsets_info", "gauge", "where the struct offsets came from (btf, guess, profile)"),
    ("nettracer_build_info", "gauge", "nettracer version and kernel release"),
)


class AgentCollector:
    """A prometheus-client collector reading :class:`~nettracer.agent.Agent` at scrape time."""

    def __init__(self, agent: Agent, version: str, kernel: str) -> None:
        self.agent = agent
        self.version = version
        self.kernel = kernel

    def describe(self) -> list[Any]:
        return []  # no describe-time checks: the families depend on what is enabled

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from nettracer.agent import DROP_LABELS

        a = self.agent
        t = a.snapshot()
        helps = {name: text for name, _, text in METRICS}

        def counter(name: str, labels: tuple[str, ...] = ()) -> Any:
            return CounterMetricFamily(name, helps[name], labels=list(labels))

        def gauge(name: str, labels: tuple[str, ...] = ()) -> Any:
            return GaugeMetricFamily(name, helps[name], labels=list(labels))

        if a.drops is not None:
            m = counter("nettracer_drops_total", DROP_LABELS)
            for labels, n in sorted(t.drops.items()):
                m.add_metric(list(labels), n)
            yield m
            m = counter("nettracer_drops_lost_total")
            m.add_metric([], t.drops_lost)
            yield m
            m = gauge("nettracer_drops_folded_series")
            m.add_metric([], t.folded_keys)
            yield m
        if a.conns is not None:
            yield from _conn_families(t, counter, gauge, helps["nettracer_tcp_rtt_seconds"])
        m = counter("nettracer_events_lost_total", ("tracer",))
        if a.drops is not None:
            m.add_metric(["drops"], t.drops_lost)
        if a.conns is not None:
            m.add_metric(["conns"], t.conns_lost)
        yield m
        m = counter("nettracer_refreshes_total")
        m.add_metric([], t.refreshes)
        yield m
        m = counter("nettracer_refresh_seconds_total")
        m.add_metric([], t.refresh_seconds)
        yield m
        if a.offsets_source:  # known once the offsets are loaded
            m = gauge("nettracer_offsets_info", ("source",))
            m.add_metric([a.offsets_source], 1)
            yield m
        m = gauge("nettracer_build_info", ("version", "kernel"))
        m.add_metric([self.version, self.kernel], 1)
        yield m


def _conn_families(t: Totals, counter: Any, gauge: Any, rtt_help: str) -> Iterator[Any]:
    """The connection tracer's families, per container (see :mod:`nettracer.agent`)."""
    from prometheus_client.core import HistogramMetricFamily

    from nettracer.agent import CONTAINER_LABELS, RTT_BUCKETS

    m = gauge("nettracer_connections_open", ("proto", "family", "direction", *CONTAINER_LABELS))
    for k, n in sorted(t.conns_open.items()):
        m.add_metric(list(k), n)
    yield m
    m = counter("nettracer_connections_closed_total", ("proto", "family", *CONTAINER_LABELS))
    for k2, n in sorted(t.conns_closed.items()):
        m.add_metric(list(k2), n)
    yield m
    for name, field in (
        ("nettracer_tcp_bytes_sent_total", "bytes_sent"),
        ("nettracer_tcp_bytes_received_total", "bytes_received"),
        ("nettracer_tcp_retransmits_total", "retransmits"),
    ):
        m = counter(name, CONTAINER_LABELS)
        for ck, tcp in sorted(t.tcp.items()):
            m.add_metric(list(ck), getattr(tcp, field))
        yield m
    h = HistogramMetricFamily("nettracer_tcp_rtt_seconds", rtt_help, labels=list(CONTAINER_LABELS))
    bounds = [*(repr(b) for b in RTT_BUCKETS), "+Inf"]
    for ck, tcp in sorted(t.tcp.items()):
        cumulative = list(itertools.accumulate(tcp.rtt_buckets))
        h.add_metric(list(ck), list(zip(bounds, cumulative, strict=True)), tcp.rtt_sum)
    yield h
    m = counter("nettracer_connections_evicted_total")
    m.add_metric([], t.conns_evicted)
    yield m


class ListenError(NettracerError):
    """The metrics address cannot be listened on."""


def serve(collector: AgentCollector, host: str, port: int) -> tuple[Any, Any]:
    """Serve ``/metrics`` on (host, port) from a daemon thread; (server, thread).

    Only our collector is registered (plus the process collector: CPU, memory, fds).
    ``server.shutdown()`` and ``server.server_close()`` stop it.
    """
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.process_collector import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    ProcessCollector(registry=registry)
    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(
                f"cannot listen on {host}:{port}: the address is in use; choose another "
                f"with agent.listen HOST:PORT",
                setting="agent.listen",
            ) from None
        raise ListenError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; check agent.listen HOST:PORT",
            setting="agent.listen",
        ) from None
