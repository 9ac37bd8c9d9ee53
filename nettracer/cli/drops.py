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

from nettracer.cli.args import (
    OFFSETS_SOURCES,
    container_id,
    interval_seconds,
    load_settings,
    netns_inode,
    seconds,
)
from nettracer.errors import UsageError, require_root

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.output.drops import EventView
    from nettracer.output.pcapng import PcapngWriter
    from nettracer.tracers.drops.monitor import DropMonitor
    from nettracer.tracers.drops.records import DropEvent

#: the most bytes of a packet the kernel side copies (DropEvent.header)
SNAPLEN_MAX = 128

#: setting -> the flag that sets it here (errors below the CLI name settings)
FLAGS = {
    "drops.interval_s": "--interval",
    "drops.group_by": "--by",
    "output.format": "--json",
    "offsets.source": "--offsets",
    "drops.device": "--device",
    "drops.netns": "--netns",
    "drops.reason": "--reason",
    "drops.protocol": "--protocol",
}


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
        type=interval_seconds,
        metavar="S",
        help="seconds between reports, at least 0.1 (default: drops.interval_s, 5)",
    )
    p.add_argument("--duration", type=seconds, metavar="S", help="stop after S seconds")
    p.add_argument("--json", action="store_true", help="one JSON object per interval (or event)")
    p.add_argument(
        "--offsets",
        choices=OFFSETS_SOURCES,
        help="where struct offsets come from: BTF, guessed at run time, or auto (BTF if "
        "present; offsets.source)",
    )
    p.add_argument(
        "--by",
        metavar="KEYS",
        help="group by these comma-separated keys: location, device, module, reason, protocol, "
        "netns, container (default: drops.group_by, location,device,reason,protocol)",
    )
    p.add_argument("--device", metavar="NAME", help="only drops on this interface (any netns)")
    p.add_argument(
        "--netns",
        metavar="INUM|PATH",
        help="only drops in this network namespace: its inode, or a path such as "
        "/run/netns/NAME or /proc/PID/ns/net",
    )
    p.add_argument(
        "--container",
        type=container_id,
        metavar="ID",
        help="only drops in the network namespace of this container (id or prefix)",
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
        "--pcap",
        metavar="FILE",
        help="also write each dropped packet to FILE as pcapng for Wireshark/tshark, with a "
        "comment naming the drop ('-': standard output, e.g. | tshark -r -; the reports then "
        "go to standard error)",
    )
    p.add_argument(
        "--snaplen",
        type=int,
        metavar="N",
        help=f"bytes of each packet to capture from its network header, 1 to {SNAPLEN_MAX} "
        f"(the most the kernel side copies; default {SNAPLEN_MAX})",
    )
    p.add_argument(
        "--pcap-max-mb",
        type=float,
        metavar="MB",
        help="stop writing the capture before it passes MB MiB (counting goes on; the "
        "capture's statistics say how many packets it misses)",
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help="YAML configuration file (default: /etc/nettracer/nettracer.yaml if present)",
    )
    return p


def run(args: argparse.Namespace) -> int:

    values = {
        "drops.interval_s": args.interval,
        "drops.group_by": args.by.split(",") if args.by else None,
        "output.format": "json" if args.json else None,
        "offsets.source": args.offsets,
    }
    config = load_settings(args.config, values, FLAGS)
    fmt = str(config["output.format"])
    if fmt not in ("text", "json"):
        raise UsageError(f"nettracer drops prints text or json, not {fmt} (output.format)")
    netns = netns_inode(args.netns)
    require_root("nettracer drops")
    from nettracer.tracers.drops.monitor import DropMonitor

    capture = _open_capture(args)
    monitor = DropMonitor.from_config(
        config,
        events=args.events or capture is not None,
        counts=not args.events,
        stack=args.stack,
        device=args.device,
        netns=netns,
        reason=args.reason,
        protocol=args.protocol,
    )
    if args.device is not None:
        _warn_unknown_device(args.device)
    interval = float(config["drops.interval_s"])  # type: ignore[arg-type]
    session = _Session(args, monitor, interval, fmt == "json")
    session.capture = capture
    if args.pcap == "-":
        session.out = sys.stderr
    return session.run()


def _open_capture(args: argparse.Namespace) -> PcapngWriter | None:
    """The pcapng writer of ``--pcap`` (its file created now, before attaching), or None;
    UsageError for capture flags that make no sense."""
    if args.pcap is None:
        if args.snaplen is not None or args.pcap_max_mb is not None:
            raise UsageError("--snaplen and --pcap-max-mb go with --pcap FILE")
        return None
    snaplen = SNAPLEN_MAX if args.snaplen is None else args.snaplen
    if not 0 < snaplen <= SNAPLEN_MAX:
        raise UsageError(
            f"--snaplen {snaplen}: expected 1 to {SNAPLEN_MAX} (the kernel side copies at most "
            f"{SNAPLEN_MAX} bytes from each packet's network header)"
        )
    if args.pcap_max_mb is not None and not args.pcap_max_mb > 0:
        raise UsageError(f"--pcap-max-mb {args.pcap_max_mb:g}: expected a size above 0")
    from nettracer.output.pcapng import PcapngWriter

    max_bytes = None if args.pcap_max_mb is None else int(args.pcap_max_mb * (1 << 20))
    if args.pcap == "-":
        if sys.stdout.isatty():
            raise UsageError("--pcap -: standard output is a terminal; pipe it (| tshark -r -)")
        return PcapngWriter(sys.stdout.buffer, snaplen, max_bytes)
    try:
        stream = open(args.pcap, "wb")  # noqa: SIM115 - closed by the session
    except OSError as exc:
        raise UsageError(f"--pcap {args.pcap}: {exc.strerror}") from None
    return PcapngWriter(stream, snaplen, max_bytes)


def _warn_unknown_device(name: str) -> None:
    """One line on stderr when no network namespace has an interface ``name`` now (it
    may appear later: the filter stays)."""
    from nettracer.net.netns import interface_names

    if name not in interface_names():
        sys.stderr.write(
            f"nettracer: warning: --device {name}: no interface has this name in any "
            f"network namespace now; its drops are counted if one appears\n"
        )


class _Session:
    """One run of the command: attaching, the reporting loop, the last report."""

    def __init__(
        self, args: argparse.Namespace, monitor: DropMonitor, interval: float, json: bool
    ) -> None:
        self.args = args
        self.monitor = monitor
        self.interval = interval
        self.by = monitor.group_by
        self.json = json
        self.out = sys.stdout
        self.events_seen = 0
        self.capture: PcapngWriter | None = None
        self._lost_shown = 0
        self.mono_to_epoch = time.time_ns() - time.monotonic_ns()

    def run(self) -> int:
        from nettracer.bpf.fd import StopRequest, ignore_stop_signals
        from nettracer.tracers.drops.monitor import TRACEPOINT

        args = self.args
        with self.monitor as monitor:
            self.names = monitor.names()
            what = "events" if args.events else f"every {self.interval:g} s"
            # said in the attached line itself: no drop reasons before 5.17
            notices = "".join(f"; notice: {n}" for n in monitor.notices)
            sys.stderr.write(
                f"nettracer: attached to {TRACEPOINT} (offsets: {monitor.source}{notices}); "
                f"printing {what}, Ctrl-C to stop\n"
            )
            sys.stderr.flush()
            self.stop = StopRequest().install()
            start = time.monotonic()
            try:
                self._loop(start)
                ignore_stop_signals()
                if self.stop.signum:  # the last (partial) report
                    self._report(time.monotonic(), final=True)
            finally:
                self._close_capture()
        return 0

    # -- the loop -----------------------------------------------------------------------
    def _loop(self, start: float) -> None:
        self.last = start
        end = start + self.args.duration if self.args.duration else float("inf")
        tick = start + self.interval
        self.mono_to_epoch = time.time_ns() - time.monotonic_ns()
        while not self.stop.signum:
            now = time.monotonic()
            wake = min(tick, end)
            if now < wake:
                if self.monitor.spec.events:  # short polls: a signal only sets a flag
                    self.monitor.poll_events(min(wake - now, 0.2), self._on_event)
                else:
                    self.stop.sleep(wake - now)
                continue
            final = now >= end
            self._report(now, final=final)
            if final:
                return
            tick += self.interval * ((now - tick) // self.interval + 1)  # no catch-up

    def _report(self, now: float, final: bool) -> None:
        if self.args.events:
            self._report_events(final)
        else:
            if final and self.capture is not None:  # what is still in the ring buffer
                while self.monitor.poll_events(0, self._on_event):
                    pass
            self._report_counts(now)
        self.last = now

    def _report_counts(self, now: float) -> None:
        from nettracer.output import drops as out
        from nettracer.output.jsonlines import write
        from nettracer.tracers.drops.monitor import group_counts

        sample = self.monitor.collect()
        stacks = self.monitor.stack if self.args.stack else None
        groups = group_counts(
            sample.counts, self.by, self.names, stacks, container=self.args.container
        )
        iv = out.DropInterval(
            time.time(), now - self.last, groups, sample.total, sample.lost,
            reasons=self.monitor.has_reason,
        )  # fmt: skip
        if self.json:
            write(out.interval_json(iv), self.out)
        else:
            self.out.write(out.interval_text(iv, self.by) + "\n\n")
            self.out.flush()

    # -- events -------------------------------------------------------------------------
    def _on_event(self, ev: DropEvent) -> None:
        from nettracer.output import drops as out
        from nettracer.output.jsonlines import write

        want = self.args.container
        if want and not self.names.containers.matches(self.names.cgroup(ev.netns), want):
            return
        stack = self.monitor.stack(ev.stack_id) if self.args.stack else None
        view = out.view_event(ev, self.names, self.mono_to_epoch, stack)
        if self.capture is not None:
            self._capture(ev, view)
        if not self.args.events:
            return
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
            summary: dict[str, object] = {
                "time": iso_time(time.time()), "events": self.events_seen, "lost": lost
            }  # fmt: skip
            if not self.monitor.has_reason:
                summary["reasons"] = False
            write(summary, self.out)
        else:
            self.out.write(out.lost_text(lost, self.events_seen) + "\n")
            self.out.flush()

    # -- the capture (--pcap) ------------------------------------------------------------
    def _capture(self, ev: DropEvent, view: EventView) -> None:
        from nettracer.output import drops as out

        assert self.capture is not None
        full = self.capture.full
        out.write_packet(self.capture, ev, view, ev.ts_ns + self.mono_to_epoch)
        if self.capture.full and not full:
            sys.stderr.write(
                "nettracer: the capture reached --pcap-max-mb: no more packets are written "
                "to it (counting goes on)\n"
            )
        try:
            self.capture.flush()
        except BrokenPipeError:  # the reader of --pcap - went away: stop writing to it
            self.capture.full = True

    def _close_capture(self) -> None:
        """Statistics (packets per interface, what the capture misses), then close."""
        capture, self.capture = self.capture, None
        if capture is None:
            return
        import contextlib

        with contextlib.suppress(BrokenPipeError):
            capture.statistics(time.time_ns(), self.monitor.events_lost())
            capture.flush()
        if capture.stream is not sys.stdout.buffer:
            capture.stream.close()
