"""The drop monitor: where, why and on which interface the kernel drops packets.

:class:`DropMonitor` loads the program of :mod:`nettracer.tracers.drops_program` on
the ``kfree_skb`` raw tracepoint and reads its maps; :func:`group_counts` turns the
per-key counts into the groups the user asked for (``--by``), named with
:class:`Names` (kallsyms for locations, the kernel's own ``enum skb_drop_reason``
for reasons, the side map for device names).

Reading each interval without losing counts
-------------------------------------------
The kernel's counters are *cumulative*: nothing in user space ever resets them.
Each interval :meth:`DropMonitor.collect` reads every key (one
``BPF_MAP_LOOKUP_BATCH``), sums the per-CPU values and reports the difference to
what it read last time.  A drop that lands while the map is being read is either
in this read or in the next one, never in neither, and there is no
read-then-reset window in which increments vanish (which ``delete funcs`` has in
the SystemTap script, and a ``LOOKUP_AND_DELETE_BATCH`` per interval would have).
This was chosen over double-buffering with a generation index because it needs no
extra map lookup in the program (the hot path stays one hash lookup) and no
coordination between the program and the reader.

The price is that keys accumulate.  When the map is more than half full, keys that
have not changed for ``evict_after`` intervals are removed one by one with
``BPF_MAP_LOOKUP_AND_DELETE_ELEM`` (hash maps: Linux 5.14), and whatever that
atomic read-and-delete returns beyond the last reading is counted in the current
interval.  The one remaining window -- a program that looked the element up just
before the delete and adds to it just after -- concerns a key that has been idle
for ``evict_after`` intervals, and only under map pressure.  Keys that do not fit
at all (map full) are counted in ``lost``, as are runs the kernel skipped because
the program was already running on that CPU (``bpf_prog_info.recursion_misses``)
and, with ``--events``, records that did not fit in the ring buffer.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from nettracer.bpf import maps as bpf_maps
from nettracer.bpf.fd import FdObject
from nettracer.bpf.link import Link, attach_raw_tracepoint
from nettracer.bpf.prog import Prog, load
from nettracer.bpf.ringbuf import RingBuf, RingBufReader
from nettracer.bpf.syscall import BpfSyscallError, MapType
from nettracer.errors import NettracerError, NotSupported, UsageError
from nettracer.layout.offsets import Offsets
from nettracer.tracers.drops_program import (
    STACK_NONE,
    DevKey,
    DevName,
    DropEvent,
    DropKey,
    DropLayout,
    Filters,
    KfreeSkbArgs,
    ProgramSpec,
    build,
)
from nettracer.tracers.packet import ethertype_from_skb, ethertype_name

if TYPE_CHECKING:
    from nettracer.kernel.kallsyms import Symbol
    from nettracer.kernel.tracefs import TracepointFormat

_Obj = TypeVar("_Obj", bound=FdObject)

TRACEPOINT = "kfree_skb"
#: ``TP_PROTO`` of ``kfree_skb`` through the kernel's history (include/trace/events/skb.h):
#: (skb, location) since 2.6.x, + reason in 5.17, + rx_sk in 6.11
KFREE_SKB_PROTO = ("skb", "location", "reason", "rx_sk")
#: what ``--by`` may name
GROUP_KEYS = ("location", "device", "module", "reason", "protocol", "netns")
DEFAULT_BY = ("location", "device", "reason", "protocol")
#: depth of the kernel stacks ``--stack`` keeps (frames of u64)
STACK_DEPTH = 64


# -- what the kernel tells us ------------------------------------------------------


def kfree_skb_args(btf: object | None = None) -> KfreeSkbArgs:
    """The ``TP_PROTO`` argument names of ``kfree_skb`` on this kernel.

    From BTF's ``btf_trace_kfree_skb`` prototype when ``btf`` (a
    :class:`nettracer.kernel.btf.Btf`) is given, else from the tracefs format: a
    ``reason`` field in the record means the third argument is the reason (both came
    with ``kfree_skb_reason()`` in 5.17, include/trace/events/skb.h).
    """
    if btf is not None:
        from nettracer.kernel.btf import Btf

        assert isinstance(btf, Btf)
        args = btf.raw_tracepoint_args(TRACEPOINT)
        names = tuple(n for n, _ in args)
        if not all(names):  # no parameter names in this BTF: the kernel's order
            names = KFREE_SKB_PROTO[: len(args)]
        return KfreeSkbArgs(names)
    fmt = _tracefs_format()
    n = 3 if fmt.has_field("reason") else 2
    return KfreeSkbArgs(KFREE_SKB_PROTO[:n])


def _tracefs_format() -> TracepointFormat:
    from nettracer.kernel.tracefs import open_tracefs

    return open_tracefs().tracepoint_format("skb", TRACEPOINT)


def reason_names(btf: object | None = None) -> dict[int, str]:
    """``enum skb_drop_reason`` value -> name without the ``SKB_DROP_REASON_`` prefix
    (``NO_SOCKET``), as the tracepoint's ``print fmt`` spells them.

    From BTF when ``btf`` is given, else from the ``__print_symbolic()`` table in the
    tracefs format of ``skb:kfree_skb``.  Never a table of our own.
    """
    if btf is not None:
        from nettracer.kernel.btf import Btf

        assert isinstance(btf, Btf)
        out = {}
        for value, name in btf.enum("skb_drop_reason").items():
            for prefix in ("SKB_DROP_REASON_", "SKB_"):
                if name.startswith(prefix):
                    name = name[len(prefix) :]
                    break
            out[value] = name
        return out
    return _tracefs_format().symbolic("reason")


def parse_reason(name: str, names: dict[int, str]) -> int:
    """The value of reason ``name`` (``NO_SOCKET``, ``no_socket``,
    ``SKB_DROP_REASON_NO_SOCKET`` or a number)."""
    key = name.strip().upper()
    for prefix in ("SKB_DROP_REASON_", "SKB_"):
        if key.startswith(prefix) and key[len(prefix) :] in names.values():
            key = key[len(prefix) :]
    for value, n in names.items():
        if n == key:
            return value
    try:
        return int(name, 0)
    except ValueError:
        close = [n for n in names.values() if key in n][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(
            f"unknown drop reason {name!r}{hint}; the kernel knows {len(names)} reasons, "
            f"e.g. NO_SOCKET, NETFILTER_DROP, SOCKET_RCVBUFF"
        ) from None


def load_offsets(mode: str, cache_dir: str | None = None, timeout_ms: int | None = None) -> Offsets:
    """The offsets the program needs: ``btf``, ``guess``, or ``auto`` (BTF when the
    kernel has it, else this kernel's cached profile, else guessed), from
    :func:`nettracer.layout.source.offsets_for`; ``cache_dir``/``timeout_ms`` default
    to its defaults."""
    from nettracer.layout.source import offsets_for

    kw: dict[str, Any] = {}
    if cache_dir is not None:
        kw["cache_dir"] = cache_dir
    if timeout_ms is not None:
        kw["timeout_ms"] = timeout_ms
    return offsets_for(mode, **kw)


# -- the monitor -------------------------------------------------------------------


@dataclass(frozen=True)
class DropCount:
    """Drops of one kernel key during one interval. ``protocol`` is the ETH_P_* value
    in host order; ``stack_id`` is :data:`STACK_NONE` without ``--stack``."""

    location: int
    reason: int
    ifindex: int
    netns: int
    protocol: int
    stack_id: int
    count: int


@dataclass(frozen=True)
class Sample:
    """What :meth:`DropMonitor.collect` returns: the counts since the last call and the
    drops that could not be counted (map full, recursion, ring buffer full)."""

    counts: list[DropCount]
    lost: int

    @property
    def total(self) -> int:
        return sum(c.count for c in self.counts)


_KeyTuple = tuple[int, int, int, int, int, int]


class DropMonitor:
    """Loads and attaches the drop program; reads its counts, events and names.

    Use as a context manager or call :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        spec: ProgramSpec,
        *,
        max_keys: int = 8192,
        max_devices: int = 4096,
        max_stacks: int = 4096,
        ringbuf_bytes: int = 1 << 20,
        evict_after: int = 12,
    ) -> None:
        if max_stacks > STACK_NONE:
            raise ValueError(f"max_stacks must be below {STACK_NONE}")
        self.spec = spec
        self.max_keys = max_keys
        self.evict_after = evict_after
        self._sizes = (max_devices, max_stacks, ringbuf_bytes)
        self._objs: list[FdObject] = []
        self.prog: Prog | None = None
        self.link: Link | None = None
        self.counts: bpf_maps.Map | None = None
        self.devnames: bpf_maps.Map | None = None
        self.lost_map: bpf_maps.Map | None = None
        self.stacks: bpf_maps.Map | None = None
        self.events: RingBuf | None = None
        self.reader: RingBufReader | None = None
        self._seen: dict[_KeyTuple, int] = {}
        self._idle: dict[_KeyTuple, int] = {}
        self._lost_seen = 0
        self._names: dict[tuple[int, int], str] = {}
        self._can_evict = True

    # -- life cycle --------------------------------------------------------------
    def start(self) -> DropMonitor:
        """Create the maps, load the program and attach it to ``kfree_skb``."""
        max_devices, max_stacks, ringbuf_bytes = self._sizes
        try:
            maps: dict[str, bpf_maps.Map] = {}
            self.counts = self._keep(
                bpf_maps.percpu_hash(DropKey, ctypes.c_uint64, self.max_keys, "counts")
            )
            self.devnames = self._keep(bpf_maps.hash_map(DevKey, DevName, max_devices, "devnames"))
            self.lost_map = self._keep(bpf_maps.percpu_array(ctypes.c_uint64, 1, "lost"))
            maps = {"counts": self.counts, "devnames": self.devnames, "lost": self.lost_map}
            if self.spec.stack:
                self.stacks = self._keep(
                    bpf_maps.Map(
                        MapType.STACK_TRACE,
                        ctypes.c_uint32,
                        ctypes.c_uint64 * STACK_DEPTH,
                        max_stacks,
                        "stacks",
                    )
                )
                maps["stacks"] = self.stacks
            if self.spec.events:
                self.events = self._keep(RingBuf(ringbuf_bytes, "events"))
                maps["events"] = self.events
            program = build(self.spec)
            self.prog = self._keep(load(program.insns, maps=maps, name="nt_drops"))
            if self.events is not None:
                self.reader = RingBufReader(self.events, self.lost_map)
            self.link = self._keep(attach_raw_tracepoint(self.prog, TRACEPOINT))
        except BaseException:
            self.close()
            raise
        return self

    def _keep(self, obj: _Obj) -> _Obj:
        self._objs.append(obj)
        return obj

    def close(self) -> None:
        """Detach and free everything (link first, then program, then maps)."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        for obj in reversed(self._objs):
            obj.close()
        self._objs.clear()

    def __enter__(self) -> DropMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- counts --------------------------------------------------------------------
    def _lost_total(self) -> int:
        assert self.lost_map is not None and self.prog is not None
        lost = sum(self.lost_map.lookup(0, [0]))
        return lost + self.prog.stats().recursion_misses

    def collect(self) -> Sample:
        """Counts since the previous call (see the module docstring for why nothing is lost)."""
        assert self.counts is not None
        out: dict[_KeyTuple, int] = {}
        present = 0
        for k, per_cpu in self.counts.items():
            present += 1
            kt: _KeyTuple = (k.location, k.reason, k.ifindex, k.netns, k.protocol, k.stack_id)
            total = sum(per_cpu)
            delta = total - self._seen.get(kt, 0)
            self._seen[kt] = total
            if delta > 0:
                out[kt] = delta
                self._idle[kt] = 0
            else:
                self._idle[kt] = self._idle.get(kt, 0) + 1
        if present > self.max_keys // 2 and self._can_evict:
            self._evict(out)
        lost_total = self._lost_total()
        lost, self._lost_seen = lost_total - self._lost_seen, lost_total
        counts = [
            DropCount(loc, reason, ifx, ns, ethertype_from_skb(proto), sid, n)
            for (loc, reason, ifx, ns, proto, sid), n in out.items()
        ]
        return Sample(counts, lost)

    def _evict(self, out: dict[_KeyTuple, int]) -> None:
        assert self.counts is not None
        for kt, idle in list(self._idle.items()):
            if idle < self.evict_after:
                continue
            try:
                per_cpu = self.counts.lookup_and_delete(DropKey(*kt))
            except BpfSyscallError:  # before 5.14: no atomic read-and-delete for hashes
                self._can_evict = False
                return
            if per_cpu is not None:
                late = sum(per_cpu) - self._seen.get(kt, 0)
                if late > 0:
                    out[kt] = out.get(kt, 0) + late
            self._seen.pop(kt, None)
            self._idle.pop(kt, None)

    # -- names and stacks --------------------------------------------------------------
    def device_name(self, netns: int, ifindex: int) -> str | None:
        """The name ``skb->dev->name`` had when (netns, ifindex) first dropped."""
        if ifindex == 0:
            return None
        key = (netns, ifindex)
        if key not in self._names and self.devnames is not None:
            for k, v in self.devnames.items():
                self._names[(k.netns, k.ifindex)] = v.name.decode(errors="replace")
        return self._names.get(key)

    def stack(self, stack_id: int) -> list[int]:
        """Return addresses of kernel stack ``stack_id`` (innermost first)."""
        if self.stacks is None or stack_id == STACK_NONE:
            return []
        frames = self.stacks.lookup(stack_id)
        return [int(a) for a in frames if a] if frames is not None else []

    # -- events ----------------------------------------------------------------------
    def poll_events(self, timeout_s: float, callback: Callable[[DropEvent], None]) -> int:
        """Wait up to ``timeout_s`` for events and hand each to ``callback``."""
        assert self.reader is not None, "monitor was not started with events"
        size = ctypes.sizeof(DropEvent)

        def one(view: memoryview) -> None:
            callback(DropEvent.from_buffer_copy(bytes(view[:size]).ljust(size, b"\0")))

        return self.reader.poll(timeout_s, one)

    def lost(self) -> int:
        """Drops not counted (or events not delivered) so far, in total."""
        return self._lost_total()


# -- naming and grouping -------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """A drop location as ``%pS`` names it. ``symbol``/``offset``/``module`` are None when
    no symbol covers the address (``text`` is then ``0x...``)."""

    address: int
    text: str
    symbol: str | None
    offset: int | None
    module: str | None


class SymbolSource(Protocol):
    """What :class:`Names` needs of a symbol table (``SymbolCache``, ``Kallsyms``)."""

    def lookup(self, addr: int) -> Symbol | None: ...


class Names:
    """Names for what the kernel gives as numbers: locations, reasons, protocols, devices.

    ``reasons`` is the value -> name table, ``None`` on kernels whose ``kfree_skb`` has
    no reason, or a function that reads the table when it is first needed (so that
    reading BTF's enum need not delay attaching).  ``kallsyms`` is anything with
    ``lookup(addr) -> Symbol | None`` (and optionally ``prefetch(addrs)``); by default
    a :class:`nettracer.tracers.symbols.SymbolCache`.
    """

    def __init__(
        self,
        reasons: dict[int, str] | Callable[[], dict[int, str]] | None,
        device_name: Callable[[int, int], str | None],
        kallsyms: SymbolSource | None = None,
    ) -> None:
        self._reasons = reasons
        self.device_name = device_name
        self._kallsyms = kallsyms

    @functools.cached_property
    def kallsyms(self) -> SymbolSource:
        if self._kallsyms is None:
            from nettracer.tracers.symbols import SymbolCache

            self._kallsyms = SymbolCache()
        return self._kallsyms

    def prefetch(self, addrs: Iterable[int]) -> None:
        """Name these addresses in one go (one read of kallsyms for all new ones)."""
        prefetch = getattr(self.kallsyms, "prefetch", None)
        if prefetch is not None:
            prefetch(addrs)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one Names per run
    def location(self, addr: int) -> Location:
        sym = self.kallsyms.lookup(addr)
        if sym is None:
            return Location(addr, f"{addr:#x}", None, None, None)
        return Location(addr, sym.format(), sym.name, sym.offset, sym.module)

    @property
    def reasons(self) -> dict[int, str] | None:
        if callable(self._reasons):
            self._reasons = self._reasons()
        return self._reasons

    def reason(self, value: int) -> str | None:
        reasons = self.reasons
        if reasons is None:
            return None
        return reasons.get(value, f"{value:#x}")

    @staticmethod
    def protocol(ethertype: int) -> str | None:
        return ethertype_name(ethertype)

    def frames(self, addrs: Iterable[int]) -> list[str]:
        """Symbolized stack, innermost first, without the tracing machinery on top
        (the BPF program, ``bpf_trace_run*``, ``__traceiter_*``, ``__bpf_trace_*``)."""
        out: list[str] = []
        for a in addrs:
            loc = self.location(a)
            if not out and _is_tracing_frame(loc):
                continue
            mod = f" [{loc.module}]" if loc.module not in (None, "kernel") else ""
            out.append(loc.text + mod)
        return out


def _is_tracing_frame(loc: Location) -> bool:
    s = loc.symbol or ""
    return (
        loc.module == "bpf"
        or s.startswith(("bpf_trace_run", "__traceiter_", "__bpf_trace_", "bpf_prog_"))
        or s.startswith(("bpf_get_stackid", "__bpf_get_stackid"))
        or loc.symbol is None
    )


@dataclass(frozen=True)
class DropGroup:
    """One output line: the drops of a group, with every key the grouping determines
    (the others None)."""

    count: int
    location: Location | None
    module: str | None
    device: str | None
    ifindex: int | None
    netns: int | None
    reason: str | None
    protocol: str | None
    stack: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, object]:
        loc = self.location
        out: dict[str, object] = {
            "count": self.count,
            "location": loc.text if loc else None,
            "symbol": loc.symbol if loc else None,
            "offset": loc.offset if loc else None,
            "module": self.module,
            "device": self.device,
            "ifindex": self.ifindex,
            "netns": self.netns,
            "reason": self.reason,
            "protocol": self.protocol,
        }
        if self.stack is not None:
            out["stack"] = list(self.stack)
        return out


def parse_by(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"location,device"`` -> ``("location", "device")``; UsageError for unknown keys."""
    items = text.split(",") if isinstance(text, str) else list(text)
    keys = tuple(dict.fromkeys(i.strip().lower() for i in items if i.strip()))
    bad = [k for k in keys if k not in GROUP_KEYS]
    if bad or not keys:
        raise UsageError(
            f"--by {','.join(items) if not isinstance(text, str) else text}: "
            f"expected a comma-separated list of {', '.join(GROUP_KEYS)}"
        )
    return keys


def group_counts(
    counts: Iterable[DropCount],
    by: Sequence[str],
    names: Names,
    stacks: Callable[[int], list[int]] | None = None,
) -> list[DropGroup]:
    """Sum ``counts`` over the keys in ``by``; most frequent first.

    ``device`` means the device itself, (netns, ifindex): two ``eth0`` in two
    namespaces are two groups.  With ``stacks`` (``--stack``) every distinct kernel
    stack is its own group and carries its symbolized frames.
    """
    byset = set(by)
    counts = list(counts)
    wanted = {c.location for c in counts} if byset & {"location", "module"} else set()
    stack_frames: dict[int, list[int]] = {}
    if stacks is not None:
        for c in counts:
            if c.stack_id not in stack_frames:
                stack_frames[c.stack_id] = stacks(c.stack_id)
                wanted.update(stack_frames[c.stack_id])
    names.prefetch(wanted)
    sums: dict[tuple[object, ...], int] = {}
    first: dict[tuple[object, ...], tuple[DropCount, Location | None]] = {}
    for c in counts:
        loc = names.location(c.location) if byset & {"location", "module"} else None
        k: list[object] = []
        if "location" in byset:
            k.append(c.location)
        if "module" in byset:
            k.append(loc.module if loc else None)
        if "device" in byset:
            k.append((c.netns, c.ifindex))
        elif "netns" in byset:
            k.append(c.netns)
        if "reason" in byset:
            k.append(c.reason)
        if "protocol" in byset:
            k.append(c.protocol)
        if stacks is not None:
            k.append(c.stack_id)
        key = tuple(k)
        sums[key] = sums.get(key, 0) + c.count
        first.setdefault(key, (c, loc))
    groups: list[DropGroup] = []
    for key, n in sums.items():
        c, loc = first[key]
        has_dev = "device" in byset
        groups.append(
            DropGroup(
                count=n,
                location=loc if "location" in byset else None,
                module=loc.module if loc is not None else None,
                device=names.device_name(c.netns, c.ifindex) if has_dev else None,
                ifindex=(c.ifindex or None) if has_dev else None,
                netns=(c.netns or None) if (has_dev or "netns" in byset) else None,
                reason=names.reason(c.reason) if "reason" in byset else None,
                protocol=names.protocol(c.protocol) if "protocol" in byset else None,
                stack=tuple(names.frames(stack_frames[c.stack_id])) if stacks is not None else None,
            )
        )
    groups.sort(key=lambda g: (-g.count, g.location.text if g.location else "", g.device or ""))
    return groups


def make_filters(
    device: str | None,
    netns: int | None,
    reason: str | None,
    protocol: str | None,
    reasons: dict[int, str] | None,
) -> Filters:
    """Command-line filter values -> :class:`Filters`; UsageError for bad ones."""
    from nettracer.tracers.packet import parse_ethertype

    dev = None
    if device is not None:
        dev = device.encode()
        if not 0 < len(dev) < 16:
            raise UsageError(f"--device {device!r}: interface names are 1 to 15 bytes")
    reason_value = None
    if reason is not None:
        if reasons is None:
            raise NotSupported("filtering by drop reason", "5.17", "kfree_skb has no reason here")
        reason_value = parse_reason(reason, reasons)
    proto = None
    if protocol is not None:
        try:
            proto = parse_ethertype(protocol)
        except ValueError as exc:
            raise UsageError(f"--protocol: {exc}") from None
    if netns is not None and not 0 < netns < 1 << 32:
        raise UsageError(f"--netns {netns}: expected a namespace inode (ls -Li /proc/PID/ns/net)")
    return Filters(device=dev, netns=netns, reason=reason_value, protocol=proto)


def require_root() -> None:
    if os.geteuid() != 0:
        raise NettracerError(
            "nettracer drops needs root (CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN); run it with sudo"
        )


def layout_for(offsets: Offsets, events: bool) -> DropLayout:
    return DropLayout.from_offsets(offsets, events=events)
