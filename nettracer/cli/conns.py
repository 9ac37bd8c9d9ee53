"""``nettracer conns``: TCP and UDP connections with their stats, state and gateway.

Every interval (5 s by default) the open connections with their stats and what changed
since the last interval, and the connections that closed during the interval with their
final stats (each exactly once, even one that opened and closed within the interval).
``--json`` prints one object per interval.  Runs until Ctrl-C/SIGTERM or ``--duration``,
prints the last (partial) interval, detaches and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

from nettracer.cli.args import (
    OFFSETS_SOURCES,
    container_id,
    interval_seconds,
    load_settings,
    netns_inode,
    process_id,
    seconds,
)
from nettracer.errors import UsageError, require_root

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.tracers.conns.monitor import ConnMonitor

#: setting -> the flag that sets it here (errors below the CLI name settings)
FLAGS = {
    "offsets.source": "--offsets",
    "output.format": "--json",
    "gateway_lookup.enabled": "--no-gateway",
    "network.udp_peers": "--udp-peers",
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "conns",
        help="TCP and UDP connections with bytes, segments, retransmits, RTT and gateway",
        description="Trace TCP and UDP connections (IPv4 and IPv6, every network namespace) "
        "from kernel tracepoints and print them every interval: owner, tuple, direction, "
        "state, bytes, segments, retransmits, RTT, duration and the gateway they use.",
    )
    p.add_argument(
        "--interval",
        type=interval_seconds,
        default=5.0,
        metavar="S",
        help="seconds between reports, at least 0.1 (5)",
    )
    p.add_argument("--duration", type=seconds, metavar="S", help="stop after S seconds")
    p.add_argument("--json", action="store_true", help="one JSON object per interval")
    p.add_argument("--pid", type=process_id, metavar="PID", help="only connections of this process")
    p.add_argument(
        "--netns",
        metavar="INUM|PATH",
        help="only connections in this network namespace: its inode, or a path such as "
        "/run/netns/NAME or /proc/PID/ns/net",
    )
    p.add_argument(
        "--container",
        type=container_id,
        metavar="ID",
        help="only connections of processes in this container (id or prefix; processes "
        "gone: their network namespace's container)",
    )
    p.add_argument(
        "--no-gateway", action="store_true", help="do not look up gateways (gateway_lookup.enabled)"
    )
    p.add_argument(
        "--udp-peers",
        action="store_true",
        help="count each peer of unconnected UDP sockets (network.udp_peers; runs a "
        "program on every packet sent and received)",
    )
    p.add_argument(
        "--offsets",
        choices=OFFSETS_SOURCES,
        help="where struct offsets come from: BTF, guessed at run time, or auto (offsets.source)",
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help="YAML configuration file (default: /etc/nettracer/nettracer.yaml if present)",
    )
    p.add_argument(
        "--stats",
        action="store_true",
        help="also print the tracer's and the gateway cache's counters every interval",
    )
    p.add_argument(
        "--top",
        type=int,
        default=40,
        metavar="N",
        help="text tables show the N most active connections (40); JSON shows all",
    )
    p.add_argument(
        "--wide",
        action="store_true",
        help="text tables show every column; by default the columns that fit the terminal "
        "(COLUMNS, else 80 when not a terminal) are chosen, addresses and ports are never cut",
    )
    p.add_argument(
        "--bytes-source",
        choices=("auto", "length", "tcp_sock"),
        default="auto",
        help="byte counts from the sock:sock_send_length/sock_recv_length tracepoints "
        "(Linux 6.3, exact, TCP and UDP) or from struct tcp_sock (TCP only); auto picks "
        "the tracepoints when the kernel has them",
    )
    return p


def run(args: argparse.Namespace) -> int:

    values = {
        "offsets.source": args.offsets,
        "output.format": "json" if args.json else None,
        "gateway_lookup.enabled": False if args.no_gateway else None,
        "network.udp_peers": True if args.udp_peers else None,
    }
    config = load_settings(args.config, values, FLAGS)
    fmt = str(config["output.format"])
    if fmt not in ("text", "json"):
        raise UsageError(f"nettracer conns prints text or json, not {fmt} (output.format)")
    if args.top < 1:
        raise UsageError(f"--top {args.top}: expected a number of rows >= 1")
    netns = netns_inode(args.netns) or 0
    require_root("nettracer conns")
    from nettracer.tracers.conns.monitor import ConnMonitor

    monitor = ConnMonitor.from_config(
        config, netns=netns, pid=args.pid, bytes_source=args.bytes_source
    )
    return _Session(args, monitor, fmt == "json").run()


class _Session:
    """One run: attaching, the reporting loop, the last report."""

    def __init__(self, args: argparse.Namespace, monitor: ConnMonitor, json: bool) -> None:
        self.args = args
        self.monitor = monitor
        self.json = json
        self.out = sys.stdout
        from nettracer.kernel.cgroup import ContainerResolver

        self.containers = ContainerResolver()

    def run(self) -> int:
        from nettracer.bpf.fd import StopRequest, ignore_stop_signals

        self.stop = StopRequest()
        with self.monitor as monitor:
            for notice in monitor.notices:
                sys.stderr.write(f"nettracer: notice: {notice}\n")
            self.mono_to_epoch = time.time_ns() - time.monotonic_ns()
            # tens of thousands of short-lived tuples a second and no reference cycles:
            # the start-up objects leave the collector's view, and it runs less often
            gc.freeze()
            gc.set_threshold(100_000, 50, 100)
            use_length = monitor.tracer.use_length
            if self.json and not self.args.container:  # the filter needs every Conn
                from nettracer.output.conns import RecordLines

                monitor.render_closed = RecordLines(
                    bytes_from_tcp_sock=not use_length,
                    mono_to_epoch_ns=self.mono_to_epoch,
                    containers=self.containers,
                )
            sys.stderr.write(
                f"nettracer: tracing connections (offsets: {monitor.source}, bytes from "
                f"{'sock_*_length' if use_length else 'tcp_sock'}); printing every "
                f"{self.args.interval:g} s, Ctrl-C to stop\n"
            )
            sys.stderr.flush()
            # from here on a signal only asks the loop to stop: an exception in the
            # middle of reading the ring buffer would drop records already consumed
            self.stop.install()
            start = time.monotonic()
            self.last = start
            self._loop(start)
            ignore_stop_signals()
            self._report(time.monotonic())  # the last (partial) interval
        return 0

    def _loop(self, start: float) -> None:
        """Report every interval until ``--duration`` or a signal; the caller prints the
        last, partial, interval."""
        args = self.args
        end = start + args.duration if args.duration else float("inf")
        tick = start + args.interval
        while not self.stop.signum:
            now = time.monotonic()
            if now >= end:
                return
            if now >= tick:
                self._report(now)
                tick += args.interval
                if tick <= now:
                    tick = now + args.interval
                continue
            self.monitor.poll(min(0.05, min(tick, end) - now))

    def _report(self, now: float) -> None:
        from nettracer.output import conns as out

        iv = self.monitor.interval()
        if self.args.container:
            cs, want = self.containers, self.args.container
            iv.conns = [c for c in iv.conns if cs.matches(cs.of(c.pid, c.netns), want)]
            iv.closed = [c for c in iv.closed if cs.matches(cs.of(c.pid, c.netns), want)]
        self.monitor.refresh_gateways(iv)
        seconds = now - self.last
        self.last = now
        now_ns = time.monotonic_ns()
        epoch = (now_ns + self.mono_to_epoch) / 1e9
        stats = self.monitor.stats() if self.args.stats else None
        if self.json:
            out.write_interval(
                self.out,
                iv,
                epoch,
                seconds,
                now_ns,
                self.mono_to_epoch,
                stats,
                containers=self.containers,
            )
        else:
            import shutil

            width = None if self.args.wide else shutil.get_terminal_size((80, 24)).columns
            out.print_interval(
                iv, epoch, now_ns, top=self.args.top, stats=stats, stream=self.out, width=width
            )
