"""How ``nettracer drops`` prints: interval tables and JSON objects, event lines.

The JSON object per interval has the shape the command promises::

    {"time": ISO-8601, "interval_s": float,
     "drops": [{"count", "location", "symbol", "offset", "module", "device",
                "ifindex", "netns", "reason", "protocol",
                "container", "cgroup"}],   (+ "stack" with --stack)
     "total": int, "lost": int}

On a kernel whose ``kfree_skb`` has no reason (before 5.17) the rows and events have no
``reason`` key, and each interval object (with ``--events`` each summary object) says
``"reasons": false`` instead.

``container``/``cgroup`` (:mod:`nettracer.output.containers`) are those of the group's
network namespace when the grouping determines it (device, netns or container), else
null.
"""

from __future__ import annotations

from collections.abc import Sequence

from nettracer.output.jsonlines import clock_time, iso_time
from nettracer.output.table import Column, plural, render
from nettracer.tracers.drops.monitor import DropGroup, Names
from nettracer.tracers.drops.records import DropEvent
from nettracer.tracers.packet import Packet, decode, ethertype_from_skb, original_length
from nettracer.value import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.output.pcapng import PcapngWriter


class DropInterval(Value):
    """One reporting interval: when it ended, how long it was, its groups and totals."""

    __slots__ = ("end", "seconds", "groups", "total", "lost", "reasons")  # noqa: RUF023 - field order

    def __init__(
        self,
        end: float,
        seconds: float,
        groups: list[DropGroup],
        total: int,
        lost: int,
        reasons: bool = True,
    ) -> None:
        self.end = end  # epoch seconds
        self.seconds = seconds
        self.groups = groups
        self.total = total
        self.lost = lost
        #: whether the kernel reports drop reasons (kfree_skb's reason: Linux 5.17)
        self.reasons = reasons


def interval_json(iv: DropInterval) -> dict[str, object]:
    out: dict[str, object] = {
        "time": iso_time(iv.end),
        "interval_s": round(iv.seconds, 3),
        "drops": [_without_reason(g.to_json(), iv.reasons) for g in iv.groups],
        "total": iv.total,
        "lost": iv.lost,
    }
    if not iv.reasons:
        out["reasons"] = False
    return out


def _without_reason(row: dict[str, object], reasons: bool) -> dict[str, object]:
    """``row`` without its ``reason`` key where the kernel has no reasons (before 5.17)."""
    if not reasons:
        del row["reason"]
    return row


#: the column of each grouping key: (header, right-aligned, DropGroup attribute)
_COLUMNS = {
    "location": ("LOCATION", False, "location"),
    "device": ("DEVICE", False, "device"),
    "netns": ("NETNS", True, "netns"),
    "container": ("CONTAINER", False, "container"),
    "module": ("MODULE", False, "module"),
    "reason": ("REASON", False, "reason"),
    "protocol": ("PROTOCOL", False, "protocol"),
}


def _columns(by: Sequence[str]) -> list[tuple[Column, str]]:
    """(column, DropGroup attribute) for the grouping keys, in the user's order.

    ``location`` brings a MODULE column (unless ``module`` is asked for itself) right
    after it, or after DEVICE when that follows: ``symbol@device (module)``, the order
    of SystemTap's dropwatch and of the default ``location,device,...``."""
    keys = list(by)
    if "location" in keys and "module" not in keys:
        at = keys.index("location") + 1
        at += at < len(keys) and keys[at] == "device"
        keys.insert(at, "module")
    cols: list[tuple[Column, str]] = [(Column("COUNT", right=True), "count")]
    for key in keys:
        header, right, attr = _COLUMNS[key]
        cols.append((Column(header, right=right), attr))
    return cols


def _cell(g: DropGroup, attr: str) -> object:
    if attr == "location":
        return g.location.text if g.location else None
    if attr == "container":
        ct = g.cgroup.container if g.cgroup is not None else None
        return ct.id[:12] if ct is not None else "-"
    if attr == "device" and g.device is None and g.ifindex:
        return f"if{g.ifindex}"  # a device whose name did not fit in the side map
    return getattr(g, attr)


def interval_text(iv: DropInterval, by: Sequence[str]) -> str:
    """Header line, table (with stacks under their rows), summary line."""
    lines = [f"{clock_time(iv.end)}  drops in the last {iv.seconds:.1f} s"]
    cols = _columns(by)
    table = render(
        [c for c, _ in cols], [[_cell(g, a) for _, a in cols] for g in iv.groups], indent="  "
    )
    if iv.groups:
        lines.append(table[0])
        width = len(table[1]) - len(table[1].lstrip()) if len(table) > 1 else 2
        for g, line in zip(iv.groups, table[1:], strict=True):
            lines.append(line)
            if g.stack is not None:
                pad = " " * (width + 8)
                lines += [pad + f for f in g.stack] or [pad + "(no stack)"]
    lines.append(
        f"  total {plural(iv.total, 'drop')} in {plural(len(iv.groups), 'group')}, {iv.lost} lost"
    )
    return "\n".join(lines)


# -- events ---------------------------------------------------------------------------


class EventView(Value):
    """A decoded :class:`DropEvent` with names."""

    __slots__ = (  # noqa: RUF023 - field order
        "time",
        "cpu",
        "pid",
        "comm",
        "netns",
        "device",
        "ifindex",
        "location",
        "symbol",
        "offset",
        "module",
        "reason",
        "protocol",
        "length",
        "packet",
        "stack",
        "reasons",
    )

    def __init__(
        self,
        time: float,
        cpu: int,
        pid: int,
        comm: str,
        netns: int | None,
        device: str | None,
        ifindex: int | None,
        location: str,
        symbol: str | None,
        offset: int | None,
        module: str | None,
        reason: str | None,
        protocol: str | None,
        length: int,
        packet: Packet,
        stack: tuple[str, ...] | None = None,
        reasons: bool = True,
    ) -> None:
        self.time = time  # epoch seconds
        self.cpu = cpu
        self.pid = pid
        self.comm = comm
        self.netns = netns
        self.device = device
        self.ifindex = ifindex
        self.location = location
        self.symbol = symbol
        self.offset = offset
        self.module = module
        self.reason = reason
        self.protocol = protocol
        self.length = length
        self.packet = packet
        self.stack = stack
        #: whether the kernel reports drop reasons (kfree_skb's reason: Linux 5.17)
        self.reasons = reasons


def view_event(
    ev: DropEvent, names: Names, mono_to_epoch_ns: int, stack: list[int] | None = None
) -> EventView:
    """Names and decoded headers for one event; ``mono_to_epoch_ns`` is
    ``time_ns() - monotonic_ns()`` (``bpf_ktime_get_ns`` is CLOCK_MONOTONIC)."""
    names.prefetch([ev.location, *(stack or ())])
    loc = names.location(ev.location)
    ethertype = ethertype_from_skb(ev.protocol)
    header = bytes(ev.header)[: ev.header_len]
    return EventView(
        time=(ev.ts_ns + mono_to_epoch_ns) / 1e9,
        cpu=ev.cpu,
        pid=ev.pid_tgid >> 32,
        comm=ev.comm.decode(errors="replace"),
        netns=ev.netns or None,
        device=ev.devname.decode(errors="replace") if ev.ifindex else None,
        ifindex=ev.ifindex or None,
        location=loc.text,
        symbol=loc.symbol,
        offset=loc.offset,
        module=loc.module,
        reason=names.reason(ev.reason),
        protocol=names.protocol(ethertype),
        length=ev.len,
        packet=decode(ethertype, header),
        stack=tuple(names.frames(stack)) if stack is not None else None,
        reasons=names.has_reasons,
    )


def event_json(e: EventView) -> dict[str, object]:
    out: dict[str, object] = {
        "time": iso_time(e.time, "microseconds"),
        "cpu": e.cpu,
        "pid": e.pid,
        "comm": e.comm,
        "netns": e.netns,
        "device": e.device,
        "ifindex": e.ifindex,
        "location": e.location,
        "symbol": e.symbol,
        "offset": e.offset,
        "module": e.module,
        "reason": e.reason,
        "protocol": e.protocol,
        "len": e.length,
        "packet": e.packet.to_json(),
    }
    if e.stack is not None:
        out["stack"] = list(e.stack)
    return _without_reason(out, e.reasons)


def event_text(e: EventView) -> str:
    """``01:30:11.123456 cpu1 4242/python3 netns 4026531833 veth0 __udp4_lib_rcv+0x4bc
    (kernel) NO_SOCKET IPv4 UDP 10.0.0.1:5000 -> 10.0.0.2:9 len 29``"""
    reason = f"{e.reason or '-'} " if e.reasons else ""
    text = (
        f"{clock_time(e.time, micro=True)} cpu{e.cpu} {e.pid}/{e.comm} "
        f"netns {e.netns or '-'} {e.device or '-'} {e.location} ({e.module or '?'}) "
        f"{reason}{e.protocol or '-'} {e.packet.describe()} len {e.length}"
    )
    if e.stack is not None:
        text += "".join(f"\n        {f}" for f in e.stack)
    return text


def lost_text(lost: int, events: int) -> str:
    """``# 3 events shown, 0 lost``; why events were lost only when some were."""
    why = " (ring buffer full or program busy)" if lost else ""
    return f"# {plural(events, 'event')} shown, {lost} lost{why}"


# -- captures (--pcap) ------------------------------------------------------------------


def drop_comment(e: EventView) -> str:
    """The pcapng packet comment naming a drop, ``key=value`` words that Wireshark's
    ``frame.comment contains "reason=NO_SOCKET"`` finds."""
    return (
        "nettracer drop: "
        + (f"reason={e.reason or '-'} " if e.reasons else "")
        + f"location={e.location} "
        f"module={e.module or '-'} device={e.device or '-'} netns={e.netns or '-'} "
        f"pid={e.pid} comm={e.comm}"
    )


def write_packet(writer: PcapngWriter, ev: DropEvent, e: EventView, epoch_ns: int) -> bool:
    """The dropped packet of ``ev`` (named by its view ``e``) as one pcapng packet on the
    interface of its (namespace, device); False once the capture's size limit is reached."""
    iface = writer.interface(ev.netns, e.device, ev.ifindex)
    header = bytes(ev.header)[: ev.header_len]
    ethertype = ethertype_from_skb(ev.protocol)
    length = original_length(ethertype, header, ev.len)
    # the kernel side copies a fixed number of bytes: past the packet's end they are not its
    data = header[:length] if length else header
    return writer.packet(iface, epoch_ns, ethertype, data, length, drop_comment(e))
