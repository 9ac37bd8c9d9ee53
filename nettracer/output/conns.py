"""Output of ``nettracer conns``: one JSON object or one pair of tables per interval.

The JSON object has the shape the command promises::

    {"time": ISO-8601, "interval_s": float,
     "conns":  [CONN, ...],      open connections, stats and "delta" since the last interval
     "closed": [CONN, ...],      closed during the interval, final stats, each reported once
     "evicted": int, "lost": int}                         (+ "stats" with --stats)

    CONN = {"pid", "comm", "proto": "tcp"|"udp", "family": 4|6, "saddr", "sport", "daddr",
            "dport", "netns", "direction": "outgoing"|"incoming"|"local"|"unknown", "state",
            "bytes_sent", "bytes_received", "segs_in", "segs_out", "retransmits",
            "rtt_us", "rtt_var_us", "duration_ms",
            "gateway": {"via", "dev", "ifindex", "subnet"} | null,
            "start_time", "states": [TCP states, oldest first], "opened", "partial",
            "delta": {"bytes_sent", "bytes_received", "segs_in", "segs_out", "retransmits"}}
            (+ "end": "closed"|"reused"|"expired" in "closed")

``pid``/``comm`` are null/"" until the owner was seen in process context; ``rtt_*`` are
null for UDP; ``partial`` means the connection was open before the tracer saw it.
The text tables use rich (imported when the first table is printed).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from nettracer.output.jsonlines import clock_time, iso_time
from nettracer.tracers.conns_model import Conn
from nettracer.tracers.conns_table import Interval


def conn_json(c: Conn, now_ns: int, mono_to_epoch_ns: int, closed: bool = False) -> dict[str, Any]:
    """One connection as JSON (``now_ns`` on the monotonic clock, for open durations)."""
    out: dict[str, Any] = {
        "pid": c.pid,
        "comm": c.comm,
        "proto": c.proto,
        "family": c.family,
        "saddr": c.saddr,
        "sport": c.sport,
        "daddr": c.daddr,
        "dport": c.dport,
        "netns": c.netns,
        "direction": c.direction,
        "state": c.state,
        "bytes_sent": c.bytes_sent,
        "bytes_received": c.bytes_received,
        "segs_in": c.segs_in,
        "segs_out": c.segs_out,
        "retransmits": c.retransmits,
        "rtt_us": c.rtt_us,
        "rtt_var_us": c.rtt_var_us,
        "duration_ms": round(c.duration_ms(now_ns), 3),
        "gateway": c.gateway,
        "start_time": iso_time((c.start_ns + mono_to_epoch_ns) / 1e9, "microseconds"),
        "states": c.states,
        "opened": c.opened,
        "partial": c.partial,
        "delta": c.delta(),
    }
    if closed:
        out["end"] = c.end
    return out


def interval_json(
    iv: Interval,
    end_epoch_s: float,
    seconds: float,
    now_ns: int,
    mono_to_epoch_ns: int,
    stats: dict[str, object] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "time": iso_time(end_epoch_s),
        "interval_s": round(seconds, 3),
        "conns": [conn_json(c, now_ns, mono_to_epoch_ns) for c in iv.conns],
        "closed": [conn_json(c, now_ns, mono_to_epoch_ns, closed=True) for c in iv.closed],
        "evicted": iv.evicted,
        "lost": iv.lost,
    }
    if stats is not None:
        out["stats"] = stats
    return out


def human_bytes(n: int) -> str:
    """``950``, ``1.5K``, ``12M`` (powers of 1024)."""
    if n < 1024:
        return str(n)
    for unit in "KMGTP":
        n_f = n / 1024
        if n_f < 1024 or unit == "P":
            return f"{n_f:.1f}{unit}" if n_f < 10 else f"{n_f:.0f}{unit}"
        n = int(n_f)
    return str(n)


def _endpoint(addr: str, port: int, family: int) -> str:
    return f"[{addr}]:{port}" if family == 6 else f"{addr}:{port}"


def _gateway_text(gw: dict[str, object] | None) -> str:
    if gw is None:
        return ""
    via = gw.get("via")
    return f"{via} {gw['dev']}" if via else f"on-link {gw['dev']}"


def _activity(c: Conn) -> int:
    d = c.delta()
    return d["bytes_sent"] + d["bytes_received"]


def print_interval(
    iv: Interval,
    end_epoch_s: float,
    now_ns: int,
    top: int = 40,
    stats: dict[str, object] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Two tables: the ``top`` most active open connections and the ``top`` closed ones
    (most bytes first), with a line saying how many were left out."""
    from rich.console import Console
    from rich.table import Table

    stream = stream or sys.stdout
    console = Console(file=stream, width=None if stream.isatty() else 200, highlight=False)
    head = (
        f"{clock_time(end_epoch_s)}  {len(iv.conns)} open, {len(iv.closed)} closed, "
        f"evicted {iv.evicted}, lost {iv.lost}"
    )
    console.print(head, style="bold")
    for title, rows, closed in (("open", iv.conns, False), ("closed", iv.closed, True)):
        if not rows:
            continue
        shown = sorted(rows, key=_activity if not closed else _total, reverse=True)[:top]
        table = Table(title=title, title_justify="left", box=None, pad_edge=False)
        for name, right in (
            ("PID", True), ("COMM", False), ("PROTO", False), ("LOCAL", False),
            ("REMOTE", False), ("DIR", False), ("STATE", False), ("SENT", True),
            ("RECV", True), ("ΔSENT", True), ("ΔRECV", True), ("SEGS IN/OUT", True),
            ("RETR", True), ("RTT µs", True), ("AGE s", True), ("GATEWAY", False),
        ):  # fmt: skip
            table.add_column(name, justify="right" if right else "left", no_wrap=True)
        for c in shown:
            d = c.delta()
            rtt = "" if c.rtt_us is None else f"{c.rtt_us}±{c.rtt_var_us}"
            table.add_row(
                "" if c.pid is None else str(c.pid),
                c.comm,
                f"{c.proto}{c.family}",
                _endpoint(c.saddr, c.sport, c.family),
                _endpoint(c.daddr, c.dport, c.family),
                c.direction,
                c.state if not closed or c.end == "closed" else f"{c.state} ({c.end})",
                human_bytes(c.bytes_sent),
                human_bytes(c.bytes_received),
                human_bytes(d["bytes_sent"]),
                human_bytes(d["bytes_received"]),
                f"{c.segs_in}/{c.segs_out}",
                str(c.retransmits),
                rtt,
                f"{c.duration_ms(now_ns) / 1e3:.1f}",
                _gateway_text(c.gateway),
            )
        console.print(table)
        if len(rows) > len(shown):
            console.print(f"  ... and {len(rows) - len(shown)} more {title}")
    if stats is not None:
        console.print("stats: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    stream.flush()


def _total(c: Conn) -> int:
    return c.bytes_sent + c.bytes_received
