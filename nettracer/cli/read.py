"""``nettracer read``: read struct-path expressions on every hit of a tracepoint.

``nettracer read kfree_skb 'skb->dev->name' 'skb->len'`` prints one line (``--json``:
one object ``{"time", "values": {expr: value}}``) per hit through a ring buffer, and
``# N events, L lost`` (``{"events", "lost"}``) when the lost count grows and at the
end.  With ``--count`` the kernel counts hits per distinct tuple of values in a hash
map (bpftrace's ``@[skb->dev->name, skb->len] = count()``) and every interval the
counts are printed, most frequent first, and cleared (``--json``: ``{"time",
"interval_s", "counts": [{"values", "count"}], "lost"}``).  A NULL pointer on the
way shows as ``null``.  Runs until Ctrl-C/SIGTERM or ``--duration``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from nettracer.cli.args import netns_inode, seconds
from nettracer.errors import UsageError

if TYPE_CHECKING:
    from nettracer.access.path import AccessPath


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "read",
        help="read kernel struct members (skb->dev->name) on every hit of a tracepoint",
        description="Attach to a raw tracepoint and read C struct-path expressions rooted "
        "at its arguments (skb->len, skb->dev->name, sk->__sk_common.skc_dport) on each "
        "hit: print them per event, or count hits per distinct tuple of values.",
    )
    p.add_argument("tracepoint", help="tracepoint, e.g. kfree_skb or skb:kfree_skb")
    p.add_argument("exprs", nargs="+", metavar="EXPR", help="e.g. 'skb->dev->name'")
    p.add_argument("--count", action="store_true", help="count hits per distinct tuple of values")
    p.add_argument("--duration", type=seconds, metavar="S", help="stop after S seconds")
    p.add_argument(
        "--interval", type=seconds, default=5.0, metavar="S", help="seconds between counts (5)"
    )
    p.add_argument("--json", action="store_true", help="JSON lines")
    p.add_argument(
        "--filter-netns",
        metavar="INUM|PATH",
        help="only hits in this network namespace (its inode, or /run/netns/NAME)",
    )
    p.add_argument(
        "--offsets",
        choices=("auto", "btf", "guess"),
        default="auto",
        help="resolve with BTF (auto: when present) or with the field catalogue and "
        "guessed offsets",
    )
    return p


def _resolve(args: argparse.Namespace, tp: str) -> tuple[list[AccessPath], AccessPath | None, str]:
    from nettracer.access.reader import netns_expr, resolve_exprs

    btf = offsets = None
    if args.offsets == "btf" or (
        args.offsets == "auto" and os.path.exists("/sys/kernel/btf/vmlinux")
    ):
        from nettracer.kernel.btf import Btf

        btf = Btf.vmlinux()
        source = "btf"
    else:
        from nettracer.layout.source import offsets_for

        offsets = offsets_for(args.offsets)
        source = f"catalogue, {offsets.source} offsets"
    paths = resolve_exprs(args.exprs, tp, btf=btf, offsets=offsets)
    flt = None
    if args.filter_netns is not None:
        flt = resolve_exprs([netns_expr(tp, btf)], tp, btf=btf, offsets=offsets)[0]
    return paths, flt, source


def _text(v: Any) -> str:
    return "null" if v is None else str(v)


def run(args: argparse.Namespace) -> int:
    from nettracer.access.reader import Reader, tracepoint_name
    from nettracer.bpf.fd import install_signal_handlers

    tp = tracepoint_name(args.tracepoint)
    if not tp:
        raise UsageError(f"bad tracepoint {args.tracepoint!r} (want e.g. kfree_skb)")
    inum = netns_inode(args.filter_netns, "--filter-netns")
    paths, flt, source = _resolve(args, tp)
    install_signal_handlers()
    mode = "count" if args.count else "events"
    netns = (flt, inum) if flt is not None and inum is not None else None
    out = sys.stdout
    exprs = [p.expr for p in paths]
    with Reader(tp, paths, mode, netns) as reader:
        sys.stderr.write(
            f"nettracer: attached to raw tracepoint {tp} ({len(paths)} expressions, "
            f"{source}); Ctrl-C to stop\n"
        )
        sys.stderr.flush()
        start = time.monotonic()
        end = start + args.duration if args.duration else None
        events = 0
        shown_lost = 0

        def event(values: list, _statuses: list[str]) -> None:
            nonlocal events
            events += 1
            if args.json:
                out.write(
                    json.dumps(
                        {"time": time.time(), "values": dict(zip(exprs, values, strict=True))}
                    )
                    + "\n"
                )
            else:
                out.write(
                    "  ".join(f"{e}={_text(v)}" for e, v in zip(exprs, values, strict=True)) + "\n"
                )

        def lost_line(force: bool) -> None:
            nonlocal shown_lost
            lost = reader.lost
            if force or lost > shown_lost:
                shown_lost = lost
                if args.json:
                    out.write(
                        json.dumps({"time": time.time(), "events": events, "lost": lost}) + "\n"
                    )
                else:
                    out.write(f"# {events} events shown, {lost} lost\n")

        def report(elapsed: float) -> None:
            rows = reader.pop_counts()
            if args.json:
                obj = {
                    "time": time.time(),
                    "interval_s": round(elapsed, 3),
                    "counts": [
                        {"values": dict(zip(exprs, v, strict=True)), "count": n}
                        for v, _s, n in rows
                    ],
                    "lost": reader.lost,
                }
                out.write(json.dumps(obj) + "\n")
            else:
                out.write(
                    f"{time.strftime('%H:%M:%S')}  {sum(n for *_, n in rows)} hits, {reader.lost} lost\n"
                )
                for v, _s, n in rows:
                    out.write(
                        f"{n:>10}  "
                        + "  ".join(f"{e}={_text(x)}" for e, x in zip(exprs, v, strict=True))
                        + "\n"
                    )
            out.flush()

        last = start
        try:
            while True:
                now = time.monotonic()
                if end is not None and now >= end:
                    break
                if args.count:
                    due = last + args.interval
                    time.sleep(max(0.0, min(due, end or due) - now))
                    now = time.monotonic()
                    if end is not None and now >= end:
                        break  # the final report covers it
                    if now >= due:
                        report(now - last)
                        last = now
                else:
                    wait = 0.5 if end is None else max(0.0, min(0.5, end - now))
                    reader.poll(wait, event)
                    lost_line(False)
                    out.flush()
        except KeyboardInterrupt:
            pass
        except SystemExit:  # SIGTERM (nettracer.bpf.fd.Terminated)
            pass
        finally:
            if args.count:
                report(time.monotonic() - last)
            else:
                reader.poll(0, event)
                lost_line(True)
            out.flush()
    return 0
