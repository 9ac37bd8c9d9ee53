"""``nettracer read``: read struct-path expressions on every hit of a tracepoint.

``nettracer read kfree_skb 'skb->dev->name' 'skb->len'`` prints one line (``--json``:
one object ``{"time", "values": {expr: value}}``) per hit through a ring buffer, and
``# N events, L lost`` (``{"events", "lost"}``) when the lost count grows and at the
end.  With ``--count`` the kernel counts hits per distinct tuple of values in a hash
map (bpftrace's ``@[skb->dev->name, skb->len] = count()``) and every interval the
counts are printed, most frequent first, and cleared (``--json``: ``{"time",
"interval_s", "counts": [{"values", "count"}], "lost"}``).  A NULL pointer on the
way shows as ``null``.  Values are shown by name where the kernel has one
(:mod:`nettracer.output.read`: ``location=kfree_skb_reason+0x1a``,
``reason=SKB_DROP_REASON_NO_SOCKET``, ``newstate=TCP_CLOSE``); JSON times are ISO 8601.
Runs until Ctrl-C/SIGTERM or ``--duration``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from nettracer.cli.args import (
    OFFSETS_SOURCES,
    interval_seconds,
    load_settings,
    netns_inode,
    seconds,
)
from nettracer.errors import UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any, TextIO

    from nettracer.access.reader import Reader
    from nettracer.bpf.fd import StopRequest
    from nettracer.output.read import ValueNames

#: setting -> the flag that sets it here (errors below the CLI name settings)
FLAGS = {"offsets.source": "--offsets", "read.netns": "--netns"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "read",
        help="read kernel struct members (skb->dev->name) on every hit of a tracepoint",
        description="Attach to a raw tracepoint and read C struct-path expressions rooted "
        "at its arguments (skb->len, skb->dev->name, sk->__sk_common.skc_dport, "
        'skb->cb[0], ((struct tcp_sock *)skb->sk)->srtt_us, @cast(skb->sk, "struct '
        'tcp_sock")->srtt_us) on each hit: print them per event, or count hits per '
        "distinct tuple of values.",
    )
    p.add_argument("tracepoint", help="tracepoint, e.g. kfree_skb or skb:kfree_skb")
    p.add_argument("exprs", nargs="+", metavar="EXPR", help="e.g. 'skb->dev->name'")
    p.add_argument("--count", action="store_true", help="count hits per distinct tuple of values")
    p.add_argument("--duration", type=seconds, metavar="S", help="stop after S seconds")
    p.add_argument(
        "--interval",
        type=interval_seconds,
        default=5.0,
        metavar="S",
        help="seconds between counts, at least 0.1 (5)",
    )
    p.add_argument("--json", action="store_true", help="JSON lines")
    p.add_argument(
        "--netns",
        metavar="INUM|PATH",
        help="only hits in this network namespace: its inode, or a path such as "
        "/run/netns/NAME or /proc/PID/ns/net",
    )
    p.add_argument("--filter-netns", dest="netns", help=argparse.SUPPRESS)  # first spelling
    p.add_argument(
        "--offsets",
        choices=OFFSETS_SOURCES,
        help="resolve with BTF (auto: when present) or with the field catalogue and "
        "guessed offsets (default: offsets.source, auto)",
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help="YAML configuration file (default: /etc/nettracer/nettracer.yaml if present)",
    )
    return p


def _now() -> str:
    """The time now in ISO 8601, as the other commands' JSON has it."""
    from nettracer.output.jsonlines import iso_time

    return iso_time(time.time())


def _text(v: Any) -> str:
    return "null" if v is None else str(v)


class _Printer:
    """What ``nettracer read`` prints: events, lost lines, counts per interval."""

    def __init__(self, reader: Reader, json: bool, out: TextIO, names: ValueNames) -> None:
        self.reader = reader
        self.exprs = [p.expr for p in reader.paths]
        self.names = names
        self.json = json
        self.out = out
        self.events = 0
        self.shown_lost = 0

    def _values(self, values: list) -> str:
        return "  ".join(f"{e}={_text(v)}" for e, v in zip(self.exprs, values, strict=True))

    def event(self, values: list, _statuses: list[str]) -> None:
        self.events += 1
        values = self.names.row(values)
        if self.json:
            obj = {"time": _now(), "values": dict(zip(self.exprs, values, strict=True))}
            self.out.write(json.dumps(obj) + "\n")
        else:
            self.out.write(self._values(values) + "\n")

    def lost_line(self, force: bool) -> None:
        lost = self.reader.lost
        if force or lost > self.shown_lost:
            self.shown_lost = lost
            if self.json:
                obj = {"time": _now(), "events": self.events, "lost": lost}
                self.out.write(json.dumps(obj) + "\n")
            else:
                self.out.write(f"# {self.events} events shown, {lost} lost\n")

    def counts(self, elapsed: float) -> None:
        rows = [(self.names.row(v), s, n) for v, s, n in self.reader.pop_counts()]
        lost = self.reader.lost
        if self.json:
            counts = [
                {"values": dict(zip(self.exprs, v, strict=True)), "count": n} for v, _s, n in rows
            ]
            obj = {"time": _now(), "interval_s": round(elapsed, 3), "counts": counts}
            self.out.write(json.dumps({**obj, "lost": lost}) + "\n")
        else:
            hits = sum(n for *_, n in rows)
            self.out.write(f"{time.strftime('%H:%M:%S')}  {hits} hits, {lost} lost\n")
            for v, _s, n in rows:
                self.out.write(f"{n:>10}  {self._values(v)}\n")
        self.out.flush()


def _check_category(text: str, tp: str) -> None:
    """``CATEGORY:NAME``: UsageError unless tracefs has ``events/CATEGORY/NAME`` (the raw
    tracepoint has no category of its own: the one the user wrote would be ignored).
    Without tracefs (not root) the category cannot be checked and is let through."""
    if ":" not in text:
        return
    from nettracer.errors import NettracerError
    from nettracer.kernel.tracefs import tracefs_mounted

    category = text.rsplit(":", 1)[0].strip()
    try:
        with tracefs_mounted() as fs:
            if fs.has_event(category, tp):
                return
            real = sorted(c for c in os.listdir(fs.path("events")) if fs.has_event(c, tp))
    except (NettracerError, OSError):
        return
    where = f"it is {real[0]}:{tp}" if real else f"tracefs has no event {tp}"
    raise UsageError(f"tracepoint {text}: not in category {category!r} ({where})")


def run(args: argparse.Namespace) -> int:
    from nettracer.access.reader import Reader, tracepoint_name
    from nettracer.bpf.fd import StopRequest, ignore_stop_signals
    from nettracer.output.table import plural

    tp = tracepoint_name(args.tracepoint)
    if not tp:
        raise UsageError(f"bad tracepoint {args.tracepoint!r} (want e.g. kfree_skb)")
    _check_category(args.tracepoint.strip(), tp)
    config = load_settings(args.config, {"offsets.source": args.offsets}, FLAGS)
    inum = netns_inode(args.netns, FLAGS["read.netns"])
    mode = "count" if args.count else "events"
    reader = Reader.from_config(config, tp, args.exprs, mode=mode, netns=inum)
    with reader:
        # ready to report before saying so: a signal after "attached" gets the last report
        printer = _Printer(reader, args.json, sys.stdout, _value_names(reader, tp))
        stop = StopRequest().install()
        how = "btf" if reader.source == "btf" else f"catalogue, {reader.source} offsets"
        if not stop.signum:  # stopped while starting: no "attached" line
            sys.stderr.write(
                f"nettracer: attached to raw tracepoint {tp} "
                f"({plural(len(reader.paths), 'expression')}, {how}); Ctrl-C to stop\n"
            )
            sys.stderr.flush()
        try:
            _loop(args, reader, printer, stop)
        finally:
            ignore_stop_signals()  # later signals are ignored: the end is printed
            if not args.count:
                reader.poll(0, printer.event)
                printer.lost_line(True)
            sys.stdout.flush()
    return 0


def _value_names(reader: Reader, tp: str) -> ValueNames:
    """Names for the values: kallsyms for addresses (as ``drops`` names locations), BTF
    enums when the expressions were resolved with BTF, the event's ``print fmt``."""
    from nettracer.output.read import ValueNames, tracepoint_format
    from nettracer.tracers.drops.groups import Names

    btf = None
    if reader.source == "btf":
        from nettracer.kernel.btf import Btf

        btf = Btf.vmlinux()
    symbols = Names(None, lambda netns, ifindex: None)
    return ValueNames(
        reader.paths, btf, tracepoint_format(tp), lambda a: symbols.location(a).described
    )


def _loop(args: argparse.Namespace, reader: Reader, printer: _Printer, stop: StopRequest) -> None:
    """Print until ``--duration`` (forever without) or a stop signal (which only sets a
    flag: a signal in the middle of reading the counts would lose them); the last counts
    at the end, too."""
    start = last = time.monotonic()
    end = start + args.duration if args.duration else None
    try:
        while not stop.signum:
            now = time.monotonic()
            if end is not None and now >= end:
                return
            if not args.count:
                wait = 0.5 if end is None else max(0.0, min(0.5, end - now))
                reader.poll(wait, printer.event)
                printer.lost_line(False)
                printer.out.flush()
                continue
            due = last + args.interval
            stop.sleep(max(0.0, min(due, end or due) - now))
            if stop.signum:
                return  # the final report covers it
            now = time.monotonic()
            if end is not None and now >= end:
                return  # the final report covers it
            if now >= due:
                printer.counts(now - last)
                last = now
    finally:
        if args.count:
            printer.counts(time.monotonic() - last)
