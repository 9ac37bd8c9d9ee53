"""``nettracer drops``: where, why and on which interface the kernel drops packets.

Every interval (5 s by default) one table of the drops counted in the kernel, most
frequent first; ``--json`` one object per interval; ``--events`` one line (object) per
dropped packet, a ``# N events shown, L lost`` line (``{"time", "events", "lost"}``)
whenever the lost count grows and at the end.  Runs until Ctrl-C/SIGTERM or
``--duration``, prints the last (partial) interval, detaches and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from nettracer.cli.args import netns_inode, seconds
from nettracer.errors import UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.tracers.drops.program import DropEvent, DropSpec

OFFSET_MODES = ("auto", "btf", "guess")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "drops",
        help="where, why and on which interface the kernel drops packets",
        description="Count packet drops (the skb:kfree_skb tracepoint) in the kernel by "
        "location, reason, device, namespace and protocol, and print them every interval, "
        "most frequent first.",
    )
    p.add_argument(
        "--interval",
        type=seconds,
        metavar="S",
        help="seconds between reports (default: drops.interval_s, 5)",
    )
    p.add_argument("--duration", type=seconds, metavar="S", help="stop after S seconds")
    p.add_argument("--json", action="store_true", help="one JSON object per interval (or event)")
    p.add_argument(
        "--offsets",
        choices=OFFSET_MODES,
        help="where struct offsets come from: BTF, guessed at run time, or auto (BTF if "
        "present; offsets.source)",
    )
    p.add_argument(
        "--by",
        metavar="KEYS",
        help="group by these comma-separated keys: location, device, module, reason, protocol, "
        "netns (default: drops.group_by, location,device,reason,protocol)",
    )
    p.add_argument("--device", metavar="NAME", help="only drops on this interface (any netns)")
    p.add_argument(
        "--netns",
        metavar="INUM|PATH",
        help="only drops in this network namespace: its inode, or a path such as "
        "/run/netns/NAME or /proc/PID/ns/net",
    )
    p.add_argument("--reason", metavar="NAME", help="only drops with this reason (e.g. NO_SOCKET)")
    p.add_argument(
        "--protocol", metavar="NAME", help="only this ethertype (IPv4, IPv6, ARP, 0x...)"
    )
    p.add_argument(
        "--events",
        action="store_true",
        help="print each dropped packet (with its addresses and ports) instead of counts",
    )
    p.add_argument("--stack", action="store_true", help="show the kernel stack of each group")
    p.add_argument(
        "--config",
        metavar="PATH",
        help="YAML configuration file (default: /etc/nettracer/nettracer.yaml if present)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from nettracer.config import load_config

    overrides: dict[str, tuple[object, str]] = {
        "drops.interval_s": (args.interval, "--interval"),
        "drops.group_by": (args.by.split(",") if args.by else None, "--by"),
        "output.format": ("json" if args.json else None, "--json"),
        "offsets.source": (args.offsets, "--offsets"),
    }
    config = load_config(args.config, overrides)
    for notice in config.notices:
        sys.stderr.write(f"nettracer: {notice}\n")
    fmt = str(config["output.format"])
    if fmt not in ("text", "json"):
        raise UsageError(f"nettracer drops prints text or json, not {fmt} (output.format)")
    from nettracer.tracers.drops import monitor as drops

    interval = float(config["drops.interval_s"])  # type: ignore[arg-type]
    by = drops.parse_by(config["drops.group_by"])  # type: ignore[arg-type]
    netns = netns_inode(args.netns)
    drops.require_root()
    session = _Session(args, interval, by, fmt == "json", netns)
    session.offsets = (
        str(config["offsets.source"]),
        str(config["offsets.cache_dir"]),
        int(config["offsets.guess_timeout_ms"]),  # type: ignore[call-overload]
    )
    return session.run()


class _Session:
    """One run of the command: set-up, the reporting loop, the last report."""

    def __init__(
        self,
        args: argparse.Namespace,
        interval: float,
        by: tuple[str, ...],
        json: bool,
        netns: int | None,
    ) -> None:
        self.args = args
        self.interval = interval
        self.by = by
        self.json = json
        self.netns = netns
        self.out = sys.stdout
        self.events_seen = 0
        self.offsets: tuple[str, str, int] = ("auto", "", 0)
        self._lost_shown = 0
        self.mono_to_epoch = time.time_ns() - time.monotonic_ns()

    def _prepare(
        self,
    ) -> tuple[DropSpec, dict[int, str] | Callable[[], dict[int, str]] | None, str]:
        """(program spec, reason names or their loader, offsets source).

        Only what the program needs is read before attaching: the offsets, whether
        ``kfree_skb`` has a reason and, for ``--reason``, the reason names; from BTF
        through its cache (:mod:`nettracer.kernel.btf_cache`: no BTF parse once this
        boot's BTF was read), or the tracefs format without BTF.  The names are
        otherwise read when first printed.
        """
        from nettracer.tracers.drops import monitor as drops
        from nettracer.tracers.drops.program import DropSpec

        args = self.args
        source, cache_dir, timeout_ms = self.offsets
        cache = cache_dir or None
        offsets = drops.load_offsets(source, cache_dir, timeout_ms)
        kargs = drops.cached_kfree_skb_args(cache)
        reasons: dict[int, str] | Callable[[], dict[int, str]] | None = None
        if kargs.has_reason:
            if args.reason is not None:
                reasons = drops.cached_reason_names(cache)
            else:
                reasons = lambda: drops.cached_reason_names(cache)  # noqa: E731
        filters = drops.make_filters(
            args.device,
            self.netns,
            args.reason,
            args.protocol,
            reasons if isinstance(reasons, dict) else None,
        )
        spec = DropSpec(
            drops.layout_for(offsets, args.events),
            kargs,
            filters,
            stack=args.stack,
            events=args.events,
        )
        return spec, reasons, offsets.source

    def run(self) -> int:
        from nettracer.bpf.fd import Terminated, install_signal_handlers
        from nettracer.tracers.drops import monitor as drops

        args = self.args
        spec, reasons, source = self._prepare()
        install_signal_handlers()
        monitor = drops.DropMonitor(spec)
        try:
            monitor.start()
            self.names = drops.Names(reasons, monitor.device_name)
            self.monitor = monitor
            what = "events" if args.events else f"every {self.interval:g} s"
            sys.stderr.write(
                f"nettracer: attached to {drops.TRACEPOINT} (offsets: {source}); "
                f"printing {what}, Ctrl-C to stop\n"
            )
            sys.stderr.flush()
            start = time.monotonic()
            try:
                self._loop(start)
            except (KeyboardInterrupt, Terminated):
                import signal

                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_IGN)
                self._report(time.monotonic(), final=True)
        finally:
            monitor.close()
        return 0

    # -- the loop -----------------------------------------------------------------------
    def _loop(self, start: float) -> None:
        self.last = start
        end = start + self.args.duration if self.args.duration else float("inf")
        tick = start + self.interval
        self.mono_to_epoch = time.time_ns() - time.monotonic_ns()
        while True:
            now = time.monotonic()
            wake = min(tick, end)
            if now < wake:
                if self.args.events:
                    self.monitor.poll_events(wake - now, self._on_event)
                else:
                    time.sleep(wake - now)
                continue
            final = now >= end
            self._report(now, final=final)
            if final:
                return
            while tick <= now:
                tick += self.interval

    def _report(self, now: float, final: bool) -> None:
        if self.args.events:
            self._report_events(final)
        else:
            self._report_counts(now)
        self.last = now

    def _report_counts(self, now: float) -> None:
        from nettracer.output import drops as out
        from nettracer.output.jsonlines import write
        from nettracer.tracers.drops.monitor import group_counts

        sample = self.monitor.collect()
        stacks = self.monitor.stack if self.args.stack else None
        groups = group_counts(sample.counts, self.by, self.names, stacks)
        iv = out.Interval(time.time(), now - self.last, groups, sample.total, sample.lost)
        if self.json:
            write(out.interval_json(iv), self.out)
        else:
            self.out.write(out.interval_text(iv, self.by) + "\n\n")
            self.out.flush()

    # -- events -------------------------------------------------------------------------
    def _on_event(self, ev: DropEvent) -> None:
        from nettracer.output import drops as out
        from nettracer.output.jsonlines import write

        stack = self.monitor.stack(ev.stack_id) if self.args.stack else None
        view = out.view_event(ev, self.names, self.mono_to_epoch, stack)
        self.events_seen += 1
        if self.json:
            write(out.event_json(view), self.out)
        else:
            self.out.write(out.event_text(view) + "\n")
            self.out.flush()

    def _report_events(self, final: bool) -> None:
        from nettracer.output import drops as out
        from nettracer.output.jsonlines import iso_time, write

        if final:  # what is still in the ring buffer
            while self.monitor.poll_events(0, self._on_event):
                pass
        lost = self.monitor.lost()
        if not final and lost == self._lost_shown:
            return
        self._lost_shown = lost
        if self.json:
            write(
                {"time": iso_time(time.time()), "events": self.events_seen, "lost": lost}, self.out
            )
        else:
            self.out.write(out.lost_text(lost, self.events_seen) + "\n")
            self.out.flush()
