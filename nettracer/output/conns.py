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
            "start_time", "states": [TCP states, oldest first], "opened", "partial", "id",
            "delta": {"bytes_sent", "bytes_received", "segs_in", "segs_out", "retransmits"},
            "container": {"id", "runtime", "pod_uid"} | null, "cgroup": str | null}
            (+ "peers": [{"addr", "port", "bytes_sent", "bytes_received",
                          "datagrams_sent", "datagrams_received"}, ...],
               "unattributed": {"bytes_sent", "bytes_received", "datagrams_sent",
                                "datagrams_received"}  for an unconnected UDP socket)
            (+ "end": "closed"|"reused"|"idle" in "closed")

``id`` is the tracer's number for the connection (the same in every interval);
``pid``/``comm`` are null/"" until the owner was seen in process context; ``rtt_*`` are
null for UDP; ``partial`` means the connection was open before the tracer saw it.
``container``/``cgroup`` (:mod:`nettracer.output.containers`) are those of the owner
process, else of the network namespace, found by the ``containers`` resolver the
writers are given (null without one).
The text tables fit the terminal (:func:`fit_columns`): addresses and ports are never
cut; the least needed columns are left out first, and the table says which (``--wide``
shows every column).
"""

from __future__ import annotations

import io
import json
import sys
import time
from itertools import repeat
from typing import Any, TextIO

from nettracer.output.containers import container_json, container_text
from nettracer.output.jsonlines import clock_time, iso_time
from nettracer.tracers.conns.model import (
    Conn,
    addr_text,
    comm_text,
    history,
    is_local,
    tcp_data_bytes,
    wire_addresses,
)
from nettracer.tracers.conns.records import (
    END_NAMES,
    FIELDS,
    IDX,
    IPPROTO_TCP,
    STATE_NAMES,
    Flag,
)
from nettracer.tracers.conns.table import Interval

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.kernel.cgroup import ContainerResolver


def conn_json(
    c: Conn,
    now_ns: int,
    mono_to_epoch_ns: int,
    closed: bool = False,
    containers: ContainerResolver | None = None,
) -> dict[str, Any]:
    """One connection as a JSON-ready dict (``now_ns`` on the monotonic clock, for the
    duration of open connections)."""
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
        "duration_ms": c.duration_ms(now_ns),
        "gateway": None if c.gateway is None else c.gateway.as_json(),
        "start_time": _start_time(c.start_ns + mono_to_epoch_ns),
        "states": list(c.states),
        "opened": c.opened,
        "partial": c.partial,
        "id": c.id,
        "delta": c.delta(),
        **container_json(containers.of(c.pid, c.netns) if containers else None),
    }
    out.update(c.peer_fields())
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
    containers: ContainerResolver | None = None,
) -> dict[str, Any]:
    """The interval as a JSON-ready dict (see :func:`interval_line` for the fast path)."""
    out: dict[str, Any] = {
        "time": iso_time(end_epoch_s),
        "interval_s": round(seconds, 3),
        "conns": [conn_json(c, now_ns, mono_to_epoch_ns, False, containers) for c in iv.conns],
        "closed": [json.loads(t) for t in iv.closed_text]
        + [conn_json(c, now_ns, mono_to_epoch_ns, True, containers) for c in iv.closed],
        "evicted": iv.evicted,
        "lost": iv.lost,
    }
    if stats is not None:
        out["stats"] = stats
    return out


# -- the fast path: the same JSON, written with one format string per connection --------
# (a busy host closes tens of thousands of connections a second; json.dumps of a dict
# per connection costs several times more than this)

_CONN = (
    '{"pid":%s,"comm":%s,"proto":"%s","family":%d,"saddr":"%s","sport":%d,"daddr":"%s",'
    '"dport":%d,"netns":%d,"direction":"%s","state":"%s","bytes_sent":%d,'
    '"bytes_received":%d,"segs_in":%d,"segs_out":%d,"retransmits":%d,"rtt_us":%s,'
    '"rtt_var_us":%s,"duration_ms":%r,"gateway":%s,"start_time":"%s","states":%s,'
    '"opened":"%s","partial":%s,"id":%d,"delta":{"bytes_sent":%d,"bytes_received":%d,"segs_in":%d,'
    '"segs_out":%d,"retransmits":%d}%s%s}'
)
_END = {
    None: ',"end":null',
    "closed": ',"end":"closed"',
    "reused": ',"end":"reused"',
    "idle": ',"end":"idle"',
}
_json_strings: dict[object, str] = {}
_seconds: dict[int, tuple[str, str]] = {}
#: [second, text before the fraction, text after it] of the last start time written
_last_second: list[Any] = [None, "", ""]


def _cached_json(value: object, key: object = None) -> str:
    """``json.dumps(value)`` remembered by ``key`` (default: the value itself)."""
    k = value if key is None else key
    text = _json_strings.get(k)
    if text is None:
        if len(_json_strings) >= 8192:
            _json_strings.clear()
        text = _json_strings[k] = json.dumps(value, ensure_ascii=False)
    return text


def _gateway_json(gw: Any) -> str:
    """A :class:`~nettracer.net.gateway.Gateway` as JSON text, remembered by value."""
    return _cached_json(gw.as_json(), gw)


def _start_time(epoch_ns: int) -> str:
    """ISO-8601 local time with microseconds, as ``iso_time(..., "microseconds")`` gives,
    with the second's text computed once per second (the last second is checked first:
    records arrive about in time order)."""
    sec, ns = divmod(epoch_ns, 1_000_000_000)
    last = _last_second
    if last[0] != sec:
        last[1], last[2] = _second_parts(sec)
        last[0] = sec
    return f"{last[1]}.{ns // 1000:06d}{last[2]}"


def _second_parts(sec: int) -> tuple[str, str]:
    """The local time of second ``sec`` (epoch) in ISO-8601, as the text before the
    fraction of a second and the text after it (the UTC offset), remembered (bounded)."""
    parts = _seconds.get(sec)
    if parts is None:
        if len(_seconds) >= 4096:
            _seconds.clear()
        text = iso_time(float(sec), "seconds")
        parts = _seconds[sec] = (text[:19], text[19:])
    return parts


def conn_line(
    c: Conn,
    now_ns: int,
    mono_to_epoch_ns: int,
    closed: bool = False,
    containers: ContainerResolver | None = None,
) -> str:
    """:func:`conn_json` as compact JSON text, without building the dict."""
    p = c.prev
    gw = c.gateway
    end = ""
    if closed:
        end = _END.get(c.end) or f',"end":{json.dumps(c.end)}'
    if c.peers is not None:
        end = "," + json.dumps(c.peer_fields(), separators=(",", ":"))[1:-1] + end
    return _CONN % (
        "null" if c.pid is None else c.pid,
        _cached_json(c.comm),
        c.proto,
        c.family,
        c.saddr,
        c.sport,
        c.daddr,
        c.dport,
        c.netns,
        c.direction,
        c.state,
        c.bytes_sent,
        c.bytes_received,
        c.segs_in,
        c.segs_out,
        c.retransmits,
        "null" if c.rtt_us is None else c.rtt_us,
        "null" if c.rtt_var_us is None else c.rtt_var_us,
        c.duration_ms(now_ns),
        "null" if gw is None else _json_strings.get(gw) or _gateway_json(gw),
        _start_time(c.start_ns + mono_to_epoch_ns),
        _cached_json(list(c.states), c.states),
        c.opened,
        "true" if c.partial else "false",
        c.id,
        c.bytes_sent - p[0],
        c.bytes_received - p[1],
        c.segs_in - p[2],
        c.segs_out - p[3],
        c.retransmits - p[4],
        container_text(containers.of(c.pid, c.netns) if containers else None),
        end,
    )


# record positions for RecordLines
(_R_HIST, _R_RETRANS, _R_SRTT, _R_MDEV, _R_PID, _R_NETNS, _R_SPORT, _R_DPORT, _R_PROTO,
 _R_STATE, _R_OPENED, _R_FLAGS, _R_END_REASON, _R_COMM) = (
    IDX[n] for n in (
        "history", "total_retrans", "srtt_us", "mdev_us", "pid", "netns", "sport", "dport",
        "proto", "state", "opened", "flags", "end_reason", "comm",
    )
)  # fmt: skip
_OPENED = ("unknown", "active", "passive")
_DIRECTION = ("unknown", "outgoing", "incoming")


_END_BY_REASON = (',"end":null', ',"end":"closed"', ',"end":"reused"', ',"end":"idle"')
_comm_json: dict[bytes, str] = {}
_STATE_TEXT = tuple(STATE_NAMES.get(i, str(i)) for i in range(256))


class RecordLines:
    """The JSON text (:func:`conn_line` of ``decode(rec)``, ``closed=True``) of records
    of connections that were never reported open (so their delta is their totals), with
    their gateways, without building a :class:`Conn`: the hot path of a host closing
    thousands of connections a second.

    What the records of one flow share (owner, addresses, state, history, end, gateway,
    container: the record slices ``_KEY_*``, its history and gateway) is rendered once
    into a template that keeps the conversions of the values each record has of its
    own; a record then costs a key, a lookup and one format of 19 values.  A template
    is kept :attr:`TEMPLATE_S` seconds at most (its container is the resolver's answer
    when it was made), and at most :attr:`TEMPLATES` of them.  The tests check the
    text against :func:`conn_json` for every kind of record."""

    TEMPLATE_S = 1.0
    TEMPLATES = 4096

    def __init__(
        self,
        bytes_from_tcp_sock: bool,
        mono_to_epoch_ns: int,
        containers: ContainerResolver | None = None,
    ) -> None:
        self.bytes_from_tcp_sock = bytes_from_tcp_sock
        self.mono_to_epoch_ns = mono_to_epoch_ns
        self.containers = containers
        self._templates: dict[tuple[Any, ...], tuple[str, list[int]]] = {}
        self._since = 0.0

    def lines(self, recs: list[tuple[Any, ...]], gateways: list[Any] | None = None) -> list[str]:
        """The text of each of ``recs`` (unpacked records) with ``gateways[i]`` (a
        :class:`~nettracer.net.gateway.Gateway` or None; ``gateways`` None: none)."""
        now = time.monotonic()
        templates = self._templates
        if now - self._since > self.TEMPLATE_S or len(templates) >= self.TEMPLATES:
            templates.clear()
            self._since = now
        tcp_sock = self.bytes_from_tcp_sock
        m2e = self.mono_to_epoch_ns
        last_sec, head, tail = None, "", ""
        out = []
        for rec, gw in zip(recs, gateways or repeat(None, len(recs)), strict=True):
            key = rec[_KEY_A] + rec[_KEY_B] + rec[_KEY_C] + (rec[_R_HIST], gw)
            t = templates.get(key)
            if t is None:
                t = templates[key] = self._template(rec, gw)
            _, cid, start, _, end_ns, sent, got, acked, tcp_got, _, segs_in, segs_out = rec[:12]
            if rec[_R_PROTO] == IPPROTO_TCP:
                retrans, rtt, rtt_var = rec[_R_RETRANS], rec[_R_SRTT] >> 3, rec[_R_MDEV] >> 2
                if tcp_sock:
                    sent, got = tcp_data_bytes(acked, tcp_got, rec[_R_OPENED], t[1])
            else:
                retrans, rtt, rtt_var = 0, "null", "null"
            sec, ns = divmod(start + m2e, 1_000_000_000)
            if sec != last_sec:
                last_sec = sec
                head, tail = _second_parts(sec)
            dport = rec[_R_DPORT]
            own = (
                rec[_R_SPORT], ((dport & 0xFF) << 8) | (dport >> 8), sent, got, segs_in,
                segs_out, retrans, rtt, rtt_var,
                ((end_ns - start + 500) // 1000 if end_ns > start else 0) / 1000,
                head, ns // 1000, tail, cid, sent, got, segs_in, segs_out, retrans,
            )  # fmt: skip
            out.append(t[0] % own)
        return out

    def _template(self, rec: tuple[Any, ...], gateway: Any) -> tuple[str, list[int]]:
        """(:data:`_CONN` with ``rec``'s shared values in it, ``%`` doubled, and ``%s``
        for the values :meth:`lines` gives each record (ints and floats: ``%s`` writes
        what ``%d`` and ``%r`` write, faster); the states of its history)."""
        family, s_raw, d_raw = wire_addresses(rec)
        opened = rec[_R_OPENED]
        if opened > 2:
            opened = 0
        flags = rec[_R_FLAGS]
        pid_known = flags & Flag.PID_KNOWN
        hist: list[int] = []
        if rec[_R_PROTO] == IPPROTO_TCP:
            hist, states = history(rec[_R_HIST])
            proto, state, states_json = "tcp", _STATE_TEXT[rec[_R_STATE]], json.dumps(states)
        else:
            proto, state, states_json = "udp", _UDP_STATE[rec[_R_STATE] == 1], "[]"
        reason = rec[_R_END_REASON]
        pid = rec[_R_PID] if pid_known else None
        cg = self.containers.of(pid, rec[_R_NETNS]) if self.containers else None
        shared = (
            "null" if pid is None else pid,
            _comm_text_json(rec[_R_COMM]) if pid_known else '""',
            proto, family, addr_text(s_raw), "%s", addr_text(d_raw), "%s", rec[_R_NETNS],
            "local" if is_local(family, s_raw, d_raw) else _DIRECTION[opened], state,
            "%s", "%s", "%s", "%s", "%s", "%s", "%s", "%s",
            "null" if gateway is None else _gateway_json(gateway), "%s.%06d%s", states_json,
            _OPENED[opened], "true" if flags & Flag.PARTIAL else "false",
            "%s", "%s", "%s", "%s", "%s", "%s", container_text(cg),
            _END_BY_REASON[reason] if reason < 4 else f',"end":{json.dumps(END_NAMES.get(reason))}',
        )  # fmt: skip
        escaped = tuple(
            v.replace("%", "%%") if i not in _VARIABLE and isinstance(v, str) else v
            for i, v in enumerate(shared)
        )
        return _CONN_S % escaped, hist


#: _CONN with every conversion ``%s``: RecordLines' templates are made with it
_CONN_S = _CONN.replace("%d", "%s").replace("%r", "%s")
#: the positions in _CONN of the values each record has of its own
_VARIABLE = frozenset((5, 7, 11, 12, 13, 14, 15, 16, 17, 18, 20, 24, 25, 26, 27, 28, 29))
#: the record slices in a template's key: pid .. daddr4, family .. end_reason, saddr6 ..
#: comm (not sport, dport, peers)
_KEY_A = slice(IDX["pid"], IDX["daddr4"] + 1)
_KEY_B = slice(IDX["family"], IDX["end_reason"] + 1)
_KEY_C = slice(IDX["saddr6"], IDX["comm"] + 1)
_UDP_STATE = ("UNCONN", "ESTABLISHED")
#: RecordLines.lines unpacks the first fields by position
assert FIELDS[:12] == (
    "sk", "id", "start_ns", "last_ns", "end_ns", "bytes_sent", "bytes_received",
    "tcp_bytes_acked", "tcp_bytes_received", "history", "segs_in", "segs_out",
)  # fmt: skip


def record_line(
    rec: tuple[Any, ...],
    bytes_from_tcp_sock: bool,
    mono_to_epoch_ns: int,
    containers: ContainerResolver | None = None,
    gateway: Any = None,
) -> str:
    """:class:`RecordLines`' text of one record."""
    return RecordLines(bytes_from_tcp_sock, mono_to_epoch_ns, containers).lines([rec], [gateway])[0]


def _comm_text_json(raw: bytes) -> str:
    """``comm`` (``char[16]``, NUL-padded) as a JSON string, remembered by value."""
    comm = _comm_json.get(raw)
    if comm is None:
        if len(_comm_json) >= 4096:
            _comm_json.clear()
        comm = _comm_json[raw] = json.dumps(comm_text(raw), ensure_ascii=False)
    return comm


def interval_line(
    iv: Interval,
    end_epoch_s: float,
    seconds: float,
    now_ns: int,
    mono_to_epoch_ns: int,
    stats: dict[str, object] | None = None,
    containers: ContainerResolver | None = None,
) -> str:
    """:func:`interval_json` as one line of compact JSON (no trailing newline)."""
    buf = io.StringIO()
    write_interval(
        buf, iv, end_epoch_s, seconds, now_ns, mono_to_epoch_ns, stats, containers=containers
    )
    return buf.getvalue()[:-1]


def write_interval(
    stream: TextIO,
    iv: Interval,
    end_epoch_s: float,
    seconds: float,
    now_ns: int,
    mono_to_epoch_ns: int,
    stats: dict[str, object] | None = None,
    chunk: int = 2048,
    containers: ContainerResolver | None = None,
) -> None:
    """Write :func:`interval_line` and a newline to ``stream`` piece by piece (an interval
    of a busy host holds tens of thousands of connections: no second copy of it all),
    then flush."""
    w = stream.write
    w(f'{{"time":{json.dumps(iso_time(end_epoch_s))},"interval_s":{round(seconds, 3)!r},"conns":[')
    w(",".join([conn_line(c, now_ns, mono_to_epoch_ns, False, containers) for c in iv.conns]))
    w('],"closed":[')
    sep = ""
    texts = iv.closed_text
    for i in range(0, len(texts), chunk):
        w(sep + ",".join(texts[i : i + chunk]))
        sep = ","
    for i in range(0, len(iv.closed), chunk):
        part = iv.closed[i : i + chunk]
        w(sep + ",".join([conn_line(c, now_ns, mono_to_epoch_ns, True, containers) for c in part]))
        sep = ","
    tail = "" if stats is None else ',"stats":' + json.dumps(stats, separators=(",", ":"))
    w(f'],"evicted":{iv.evicted},"lost":{iv.lost}{tail}}}\n')
    stream.flush()


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


def _gateway_text(gw: Any) -> str:
    if gw is None:
        return ""
    return f"{gw.via} {gw.dev}" if gw.via else f"on-link {gw.dev}"


def _activity(c: Conn) -> int:
    d = c.delta()
    return d["bytes_sent"] + d["bytes_received"]


#: the table's columns in display order: (header, right-aligned, rank); the columns
#: that fit the terminal are taken by rank, lowest first (rank 0 always: addresses and
#: ports are never cut, a line that cannot fit wraps as ``ss``'s do)
CONN_COLUMNS: tuple[tuple[str, bool, int], ...] = (
    ("PID", True, 3),
    ("COMM", False, 6),
    ("PROTO", False, 1),
    ("LOCAL", False, 0),
    ("REMOTE", False, 0),
    ("DIR", False, 9),
    ("STATE", False, 2),
    ("SENT", True, 4),
    ("RECV", True, 4),
    ("ΔSENT", True, 8),
    ("ΔRECV", True, 8),
    ("SEGS IN/OUT", True, 11),
    ("RETR", True, 10),
    ("RTT µs", True, 7),
    ("AGE s", True, 7),
    ("GATEWAY", False, 5),
)


def _cells(c: Conn, closed: bool, now_ns: int) -> list[str]:
    """One row of :data:`CONN_COLUMNS`."""
    d = c.delta()
    return [
        "" if c.pid is None else str(c.pid),
        c.comm,
        f"{c.proto}{c.family}",
        _endpoint(c.saddr, c.sport, c.family),
        _endpoint(c.daddr, c.dport, c.family) if c.peers is None else _peers_text(c.peers),
        c.direction,
        c.state if not closed or c.end == "closed" else f"{c.state} ({c.end})",
        human_bytes(c.bytes_sent),
        human_bytes(c.bytes_received),
        human_bytes(d["bytes_sent"]),
        human_bytes(d["bytes_received"]),
        f"{c.segs_in}/{c.segs_out}",
        str(c.retransmits),
        "" if c.rtt_us is None else f"{c.rtt_us}±{c.rtt_var_us}",
        f"{c.duration_ms(now_ns) / 1e3:.1f}",
        _gateway_text(c.gateway),
    ]


def _peers_text(peers: list[tuple[Any, ...]]) -> str:
    """REMOTE of an unconnected UDP socket: its one peer, or how many it has."""
    if len(peers) == 1:
        family, addr, port = peers[0][:3]
        return _endpoint(addr_text(addr), port, 4 if family == 2 else 6)
    return f"* ({len(peers)} peers)"


def fit_columns(rows: list[list[str]], width: int | None) -> list[int]:
    """Indices of the :data:`CONN_COLUMNS` to show so that a line of ``rows`` fits in
    ``width`` characters (two blanks between columns): the rank-0 columns, then each
    other column by rank (lowest first) if it still fits; every column when ``width``
    is None (``--wide``)."""
    every = range(len(CONN_COLUMNS))
    if width is None:
        return list(every)
    widths = [max([len(CONN_COLUMNS[i][0])] + [len(r[i]) for r in rows]) for i in every]
    keep = [i for i in every if CONN_COLUMNS[i][2] == 0]
    used = sum(widths[i] for i in keep) + 2 * (len(keep) - 1)
    for i in sorted(every, key=lambda i: (CONN_COLUMNS[i][2], i)):
        if i not in keep and used + 2 + widths[i] <= width:
            keep.append(i)
            used += 2 + widths[i]
    return sorted(keep)


def conn_table(
    rows: list[Conn], closed: bool, now_ns: int, width: int | None
) -> tuple[list[str], list[str]]:
    """The lines of one table of connections fitted to ``width`` (None: every column),
    and the headers of the columns left out."""
    from nettracer.output.table import Column, render

    cells = [_cells(c, closed, now_ns) for c in rows]
    keep = fit_columns(cells, width)
    cols = [Column(CONN_COLUMNS[i][0], CONN_COLUMNS[i][1]) for i in keep]
    lines = render(cols, [[r[i] for i in keep] for r in cells], indent="")
    hidden = [CONN_COLUMNS[i][0] for i in range(len(CONN_COLUMNS)) if i not in keep]
    return lines, hidden


def print_interval(
    iv: Interval,
    end_epoch_s: float,
    now_ns: int,
    top: int = 40,
    stats: dict[str, object] | None = None,
    stream: TextIO | None = None,
    width: int | None = None,
) -> None:
    """Two tables: the ``top`` most active open connections and the ``top`` closed ones
    (most bytes first), with a line saying how many were left out.  Columns are chosen
    to fit ``width`` (None: all of them) as ``ss`` and ``top`` do; a line says which
    were left out."""
    stream = stream or sys.stdout
    w = stream.write
    w(
        f"{clock_time(end_epoch_s)}  {len(iv.conns)} open, "
        f"{len(iv.closed) + len(iv.closed_text)} closed, "
        f"evicted {iv.evicted}, lost {iv.lost}\n"
    )
    for title, rows, closed in (("open", iv.conns, False), ("closed", iv.closed, True)):
        if not rows:
            continue
        shown = sorted(rows, key=_activity if not closed else _total, reverse=True)[:top]
        lines, hidden = conn_table(shown, closed, now_ns, width)
        w(title + (f" (not shown: {', '.join(hidden)}; --wide)" if hidden else "") + "\n")
        w("".join(line + "\n" for line in lines))
        if len(rows) > len(shown):
            w(f"  ... and {len(rows) - len(shown)} more {title}\n")
    if stats is not None:
        w("stats: " + " ".join(f"{k}={v}" for k, v in _flat(stats)) + "\n")
    stream.flush()


def _flat(d: dict[str, object], prefix: str = "") -> list[tuple[str, object]]:
    """``{"a": 1, "gateway": {"hits": 2}}`` -> ``[("a", 1), ("gateway.hits", 2)]``."""
    out: list[tuple[str, object]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.extend(_flat(v, f"{prefix}{k}."))
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _total(c: Conn) -> int:
    return c.bytes_sent + c.bytes_received
