"""``nettracer agent``: drops and connections as Prometheus metrics on ``/metrics``.

Attaches the drop monitor and the connection tracer (each can be left out), serves
cumulative counters on ``--listen`` (``agent.listen``, 127.0.0.1:9410) and runs until
SIGINT/SIGTERM or ``--duration``; then detaches everything and exits 0.  The metrics and
how they are read are described in :mod:`nettracer.agent` and
:mod:`nettracer.output.prometheus`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from nettracer.cli.args import seconds
from nettracer.errors import NettracerError, UsageError

OFFSET_MODES = ("auto", "btf", "guess")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "agent",
        help="serve drop and connection metrics for Prometheus",
        description="Trace packet drops and TCP/UDP connections in every network namespace "
        "and serve them as Prometheus metrics on http://HOST:PORT/metrics until Ctrl-C or "
        "SIGTERM.",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address of the metrics endpoint (default: agent.listen, 127.0.0.1:9410)",
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help="YAML configuration file (default: /etc/nettracer/nettracer.yaml if present)",
    )
    p.add_argument("--no-conns", action="store_true", help="do not trace connections")
    p.add_argument("--no-drops", action="store_true", help="do not count packet drops")
    p.add_argument(
        "--offsets",
        choices=OFFSET_MODES,
        help="where struct offsets come from: BTF, guessed at run time, or auto (offsets.source)",
    )
    p.add_argument("--duration", type=seconds, metavar="S", help="stop after S seconds")
    return p


def run(args: argparse.Namespace) -> int:
    from nettracer.config import load_config
    from nettracer.config.schema import parse_address

    if args.no_conns and args.no_drops:
        raise UsageError("--no-conns and --no-drops together leave nothing to trace")
    overrides: dict[str, tuple[object, str]] = {
        "offsets.source": (args.offsets, "--offsets"),
        "agent.listen": (args.listen, "--listen"),
    }
    config = load_config(args.config, overrides)
    for notice in config.notices:
        sys.stderr.write(f"nettracer: notice: {notice}\n")
    listen = str(config["agent.listen"])
    address = parse_address(listen)
    if address is None:  # the schema checked it; never trust a second parser blindly
        raise UsageError(f"--listen {listen}: expected HOST:PORT or [IPV6]:PORT")
    if os.geteuid() != 0:
        raise NettracerError(
            "nettracer agent needs root (CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN); run it with sudo"
        )
    return _run(args, config, address)


def _run(args: argparse.Namespace, cfg: object, address: tuple[str, int]) -> int:
    from nettracer import __version__
    from nettracer.agent import Agent, kernel_release
    from nettracer.bpf.fd import install_signal_handlers
    from nettracer.output.prometheus import AgentCollector, serve

    c: Any = cfg
    source, cache_dir = str(c["offsets.source"]), str(c["offsets.cache_dir"])
    timeout_ms = int(c["offsets.guess_timeout_ms"])
    install_signal_handlers()
    # bind first: a busy port fails before anything is loaded into the kernel
    agent = Agent(None, None, offsets_source="", interval=float(c["drops.interval_s"]))
    collector = AgentCollector(agent, __version__, kernel_release())
    server, _thread = serve(collector, *address)
    try:
        from nettracer.tracers.drops import monitor as drops_mod

        offsets = drops_mod.load_offsets(source, cache_dir, timeout_ms)
        agent.offsets_source = offsets.source
        if not args.no_drops:
            agent.drops, agent._reasons = _drop_monitor(offsets, cache_dir)
        if not args.no_conns:
            agent.conns = _conn_monitor(offsets, c)
        agent.start()
        for notice in agent.notices:
            sys.stderr.write(f"nettracer: notice: {notice}\n")
        what = " and ".join(
            w for w, on in (("drops", agent.drops), ("connections", agent.conns)) if on
        )
        host, port = address
        shown = f"[{host}]" if ":" in host else host
        sys.stderr.write(
            f"nettracer: agent tracing {what} (offsets: {offsets.source}); metrics on "
            f"http://{shown}:{port}/metrics, Ctrl-C to stop\n"
        )
        sys.stderr.flush()
        agent.run(args.duration)
    finally:
        agent.close()
        server.shutdown()
        server.server_close()
    return 0


def _drop_monitor(offsets: Any, cache_dir: str) -> tuple[Any, Any]:
    """The drop monitor (not started) with no filters, and its reason names' loader."""
    from nettracer.tracers.drops import monitor as drops
    from nettracer.tracers.drops.program import DropSpec

    cache = cache_dir or None
    kargs = drops.cached_kfree_skb_args(cache)
    reasons = (lambda: drops.cached_reason_names(cache)) if kargs.has_reason else None
    spec = DropSpec(drops.layout_for(offsets, False), kargs)
    return drops.DropMonitor(spec), reasons


def _conn_monitor(offsets: Any, c: Any) -> Any:
    """The connection monitor (not started), every namespace, no gateway lookups (the
    metrics carry no per-connection labels)."""
    from nettracer.tracers.conns import monitor as conns
    from nettracer.tracers.conns import program as conns_prog

    opts = conns_prog.ConnSpec(
        collect_tcp=bool(c["network.collect_tcp"]),
        collect_udp=bool(c["network.collect_udp"]),
        collect_ipv6=bool(c["network.collect_ipv6"]),
        netns=0,
    )
    tracer = conns.ConnTracer(offsets, opts, max_conns=int(c["network.max_tracked_connections"]))
    return conns.ConnMonitor(
        tracer,
        tcp_timeout_s=float(c["network.tcp_conn_timeout_s"]),
        udp_timeout_s=float(c["network.udp_conn_timeout_s"]),
    )
