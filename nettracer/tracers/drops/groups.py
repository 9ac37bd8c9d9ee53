"""What the drop monitor's reports are made of: counts, names and groups.

:meth:`nettracer.tracers.drops.monitor.DropMonitor.collect` returns a :class:`Sample` of
:class:`DropCount`\\ s (one per kernel key); :func:`group_counts` sums them over the
keys the user asked for (``--by``) into :class:`DropGroup`\\ s, named with
:class:`Names` (kallsyms for locations, the kernel's own ``enum skb_drop_reason`` for
reasons, the side map for device names).  Nothing here is needed to attach the
program, so :mod:`nettracer.tracers.drops` imports this module only when the first
report is made (start-up).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

from nettracer.tracers.packet import ethertype_name
from nettracer.value import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)

if TYPE_CHECKING:
    from typing import Protocol

    class SymbolSource(Protocol):
        """What :class:`Names` needs of a symbol table (``SymbolCache``, ``Kallsyms``)."""

        def lookup(self, addr: int) -> Symbol | None: ...

    from nettracer.kernel.cgroup import Cgroup, ContainerResolver
    from nettracer.kernel.kallsyms import Symbol


class DropCount(Value):
    """Drops of one kernel key during one interval. ``protocol`` is the ETH_P_* value
    in host order; ``stack_id`` is :data:`STACK_NONE` without ``--stack``."""

    __slots__ = ("location", "reason", "ifindex", "netns", "protocol", "stack_id", "count")  # noqa: RUF023 - field order

    def __init__(
        self,
        location: int,
        reason: int,
        ifindex: int,
        netns: int,
        protocol: int,
        stack_id: int,
        count: int,
    ) -> None:
        self.location = location
        self.reason = reason
        self.ifindex = ifindex
        self.netns = netns
        self.protocol = protocol
        self.stack_id = stack_id
        self.count = count


class Sample(Value):
    """What :meth:`DropMonitor.collect` returns: the counts since the last call and the
    drops that could not be counted (map full, recursion, ring buffer full)."""

    __slots__ = ("counts", "lost")

    def __init__(self, counts: list[DropCount], lost: int) -> None:
        self.counts = counts
        self.lost = lost

    @property
    def total(self) -> int:
        return sum(c.count for c in self.counts)


class Location(Value):
    """A drop location as ``%pS`` names it. ``symbol``/``offset``/``module`` are None when
    no symbol covers the address (``text`` is then ``0x...``)."""

    __slots__ = ("address", "text", "symbol", "offset", "module")  # noqa: RUF023 - field order

    def __init__(
        self, address: int, text: str, symbol: str | None, offset: int | None, module: str | None
    ) -> None:
        self.address = address
        self.text = text
        self.symbol = symbol
        self.offset = offset
        self.module = module

    @property
    def described(self) -> str:
        """``sym+0x1a``, with `` [module]`` for a module's address (stacks, ``read``)."""
        return self.text + (f" [{self.module}]" if self.module not in (None, "kernel") else "")


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

    @property
    def has_reasons(self) -> bool:
        """Whether the kernel gives drop reasons (``kfree_skb``'s reason: 5.17)."""
        return self._reasons is not None

    @functools.cached_property
    def containers(self) -> ContainerResolver:
        """Which container a network namespace belongs to (``--by container``)."""
        from nettracer.kernel.cgroup import ContainerResolver

        return ContainerResolver()

    def cgroup(self, netns: int) -> Cgroup | None:
        """The cgroup (and container) of namespace ``netns``'s processes, if any."""
        return self.containers.by_netns(netns) if netns else None

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
            out.append(loc.described)
        return out


def _is_tracing_frame(loc: Location) -> bool:
    s = loc.symbol or ""
    return (
        loc.module == "bpf"
        or s.startswith(("bpf_trace_run", "__traceiter_", "__bpf_trace_", "bpf_prog_"))
        or s.startswith(("bpf_get_stackid", "__bpf_get_stackid"))
        or loc.symbol is None
    )


class DropGroup(Value):
    """One output line: the drops of a group, with every key the grouping determines
    (the others None)."""

    __slots__ = (  # noqa: RUF023 - field order
        "count",
        "location",
        "module",
        "device",
        "ifindex",
        "netns",
        "reason",
        "protocol",
        "stack",
        "cgroup",
    )

    def __init__(
        self,
        count: int,
        location: Location | None,
        module: str | None,
        device: str | None,
        ifindex: int | None,
        netns: int | None,
        reason: str | None,
        protocol: str | None,
        stack: tuple[str, ...] | None = None,
        cgroup: Cgroup | None = None,
    ) -> None:
        self.count = count
        self.location = location
        self.module = module
        self.device = device
        self.ifindex = ifindex
        self.netns = netns
        self.reason = reason
        self.protocol = protocol
        self.stack = stack
        #: of the group's network namespace, when the grouping determines one (device,
        #: netns) or the container itself (container)
        self.cgroup = cgroup

    def to_json(self) -> dict[str, object]:
        from nettracer.output.containers import container_json

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
            **container_json(self.cgroup),
        }
        if self.stack is not None:
            out["stack"] = list(self.stack)
        return out


def group_counts(
    counts: Iterable[DropCount],
    by: Sequence[str],
    names: Names,
    stacks: Callable[[int], list[int]] | None = None,
    container: str | None = None,
) -> list[DropGroup]:
    """Sum ``counts`` over the keys in ``by``; most frequent first.

    ``device`` means the device itself, (netns, ifindex): two ``eth0`` in two
    namespaces are two groups; ``container`` the container of the namespace (all
    namespaces outside containers are one group).  With ``stacks`` (``--stack``) every
    distinct kernel stack is its own group and carries its symbolized frames.
    ``container`` (an id or its prefix) keeps only the drops in that container's
    network namespace.
    """
    byset = set(by)
    counts = list(counts)
    if container is not None:
        res = names.containers
        counts = [c for c in counts if res.matches(names.cgroup(c.netns), container)]
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
        if "container" in byset:
            cg = names.cgroup(c.netns)
            k.append(cg.container if cg is not None else None)
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
                cgroup=names.cgroup(c.netns) if byset & {"device", "netns", "container"} else None,
            )
        )
    groups.sort(key=lambda g: (-g.count, g.location.text if g.location else "", g.device or ""))
    return groups
