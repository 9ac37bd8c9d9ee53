"""The drop monitor: where, why and on which interface the kernel drops packets.

:class:`DropMonitor` loads the program of :mod:`nettracer.tracers.drops.program` on
the ``kfree_skb`` raw tracepoint and reads its maps;
:func:`nettracer.tracers.drops.groups.group_counts` turns the per-key counts into the
groups the user asked for (``drops.group_by``), named with
:class:`nettracer.tracers.drops.groups.Names` (kallsyms for locations, the kernel's
own ``enum skb_drop_reason`` for reasons, the side map for device names); both are
also reachable here (``drops.group_counts``), imported when first used.  What is
needed to attach comes first: offsets and the tracepoint's arguments from the BTF
cache (:mod:`nettracer.kernel.btf_cache`), names of reasons and symbols only when
printed (start-up).

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
and, with ``events``, records that did not fit in the ring buffer.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence

from nettracer.bpf import maps as bpf_maps
from nettracer.bpf.fd import FdObject
from nettracer.bpf.link import Link
from nettracer.bpf.prog import Prog, VerifierError, load, summarize_log
from nettracer.bpf.syscall import BPF_F_NO_PREALLOC, MapType
from nettracer.errors import NotSupported, UsageError
from nettracer.kernel import BTF_VMLINUX
from nettracer.kernel.features import current as current_features
from nettracer.kernel.features import kernel_reads
from nettracer.kernel.tracepoints import btf_trace_id
from nettracer.tracers.drops.program import DropLayout, DropSpec, Filters, KfreeSkbArgs, build
from nettracer.tracers.drops.records import STACK_NONE, DevKey, DevName, DropEvent, DropKey

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, TypeVar

    from nettracer.bpf.channel import ChannelReader
    from nettracer.bpf.memory import KernelReads
    from nettracer.kernel.tracefs import TracepointFormat
    from nettracer.layout.offsets import Offsets
    from nettracer.tracers.drops.groups import Names, Sample

    #: ``enum skb_drop_reason`` value -> name, a function reading it, or None (before 5.17)
    Reasons = dict[int, str] | Callable[[], dict[int, str]] | None

    _Obj = TypeVar("_Obj", bound=FdObject)

#: what :mod:`nettracer.tracers.drops.groups` holds, still reachable as ``drops.<name>``
_GROUPS = frozenset(("DropCount", "DropGroup", "Location", "Names", "Sample", "group_counts"))


def __getattr__(name: str) -> Any:
    """The reports' pieces, imported only when first asked for (start-up)."""
    if name in _GROUPS:
        from nettracer.tracers.drops import groups as drops_groups

        return getattr(drops_groups, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


TRACEPOINT = "kfree_skb"
#: ``TP_PROTO`` of ``kfree_skb`` through the kernel's history (include/trace/events/skb.h):
#: (skb, location) since 2.6.x, + reason in 5.17, + rx_sk in 6.11
KFREE_SKB_PROTO = ("skb", "location", "reason", "rx_sk")
#: what ``drops.group_by`` may name
GROUP_KEYS = ("location", "device", "module", "reason", "protocol", "netns", "container")
DEFAULT_BY = ("location", "device", "reason", "protocol")
#: depth of the kernel stacks ``stack`` keeps (frames of u64)
STACK_DEPTH = 64


# -- what the kernel tells us ------------------------------------------------------


def kfree_skb_args(btf: object | None = None) -> KfreeSkbArgs:
    """The ``TP_PROTO`` argument names of ``kfree_skb`` on this kernel.

    From BTF's ``btf_trace_kfree_skb`` prototype when ``btf`` (a
    :class:`nettracer.kernel.btf.Btf`) is given, typed with that typedef's id (a
    ``tp_btf`` program on the kernel ``btf`` describes), else from the tracefs format:
    a ``reason`` field in the record means the third argument is the reason (both came
    with ``kfree_skb_reason()`` in 5.17, include/trace/events/skb.h).
    """
    if btf is not None:
        from nettracer.kernel.btf import Btf

        assert isinstance(btf, Btf)
        args = btf.raw_tracepoint_args(TRACEPOINT)
        names = tuple(n for n, _ in args)
        if not all(names):  # no parameter names in this BTF: the kernel's order
            names = KFREE_SKB_PROTO[: len(args)]
        return KfreeSkbArgs(names, btf.typedef_id(f"btf_trace_{TRACEPOINT}"))
    fmt = _tracefs_format()
    n = 3 if fmt.has_field("reason") else 2
    return KfreeSkbArgs(KFREE_SKB_PROTO[:n])


def no_reason_notice(release: str | None = None) -> str:
    """What a kernel whose ``kfree_skb`` has no ``enum skb_drop_reason`` argument (before
    5.17) means for the user, said once: ``this kernel (5.10) does not report ...``."""
    import os

    version = ".".join((release or os.uname().release).split("-")[0].split(".")[:2])
    return (
        f"this kernel ({version}) does not report drop reasons "
        "(kfree_skb has no reason before 5.17)"
    )


def _tracefs_format() -> TracepointFormat:
    from nettracer.kernel.tracefs import tracefs_mounted

    with tracefs_mounted() as tracefs:
        return tracefs.tracepoint_format("skb", TRACEPOINT)


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


def cached_kfree_skb_args(cache_dir: str | None, btf_path: str = BTF_VMLINUX) -> KfreeSkbArgs:
    """:func:`kfree_skb_args` as start-up wants it: from BTF through the BTF cache
    (:mod:`nettracer.kernel.btf_cache`: no BTF parse when this very BTF was read
    before; ``cache_dir`` None reads BTF), or from the tracefs format on a kernel
    without BTF or without ``btf_trace_kfree_skb`` in it (before 5.5).  From the
    running kernel's BTF, the layout is the ``tp_btf`` one: the typedef's id comes
    from :func:`nettracer.kernel.tracepoints.btf_trace_id`, the cached fact the
    ``tp_btf`` feature probe reads too."""
    if not os.path.exists(btf_path):
        return kfree_skb_args(None)
    from nettracer.kernel import btf_cache

    def compute() -> KfreeSkbArgs:
        from nettracer.kernel.btf import Btf, BtfLookupError

        try:
            return kfree_skb_args(Btf.vmlinux(btf_path))
        except BtfLookupError:
            return kfree_skb_args(None)

    def decode(rows: list[tuple[str, ...]]) -> KfreeSkbArgs:
        (names,) = rows  # ValueError unless one row
        if "skb" not in names or "location" not in names:
            raise ValueError("skb or location missing")
        return KfreeSkbArgs(names)

    args = btf_cache.cached(
        cache_dir,
        f"tracepoint_args.{TRACEPOINT}",
        compute,
        lambda args: [args.names],
        decode,
        btf_path=btf_path,
    )
    if btf_path != BTF_VMLINUX:  # another kernel's BTF: its id would type nothing here
        return args
    return KfreeSkbArgs(args.names, btf_trace_id(TRACEPOINT, cache_dir))


def cached_reason_names(cache_dir: str | None, btf_path: str = BTF_VMLINUX) -> dict[int, str]:
    """:func:`reason_names` from BTF through the BTF cache (which spares the first report
    a BTF parse and its memory), or from the tracefs format without BTF."""
    if not os.path.exists(btf_path):
        return reason_names(None)
    from nettracer.kernel import btf_cache

    def compute() -> dict[int, str]:
        from nettracer.kernel.btf import Btf

        return reason_names(Btf.vmlinux(btf_path))

    def decode(rows: list[tuple[str, ...]]) -> dict[int, str]:
        return {int(value): name for value, name in rows}  # ValueError for other rows

    return btf_cache.cached(
        cache_dir,
        "enum.skb_drop_reason",
        compute,
        lambda names: [(str(value), name) for value, name in names.items()],
        decode,
        btf_path=btf_path,
    )


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
            f"drops.reason: unknown drop reason {name!r}{hint}; the kernel knows "
            f"{len(names)} reasons, e.g. NO_SOCKET, NETFILTER_DROP, SOCKET_RCVBUFF",
            setting="drops.reason",
        ) from None


# -- the monitor -------------------------------------------------------------------


_KeyTuple = tuple[int, int, int, int, int, int]


class DropMonitor:
    """Loads and attaches the drop program; reads its counts, events and names.

    Built by :meth:`from_config` (the contract of :mod:`nettracer.tracers`); use as a
    context manager or call :meth:`start` and :meth:`close`.  Reports
    :meth:`collect` (counts since the last call), with ``events`` :meth:`poll_events`,
    and :meth:`lost`; :meth:`names` names what they hold.
    """

    #: where the offsets came from (``btf``, ``guess``, ``profile``); from_config sets it
    source = ""
    #: what the user should know about how this kernel is traced: before 5.17 that it
    #: reports no drop reasons (:func:`no_reason_notice`); from_config sets it
    notices: list[str] = []  # noqa: RUF012  # replaced, never appended to
    #: reason names, or their loader (read when first printed), or None (before 5.17)
    reasons: Reasons = None
    #: what a report's groups are keyed by (``drops.group_by``)
    group_by: tuple[str, ...] = DEFAULT_BY

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, object],
        *,
        events: bool = False,
        counts: bool | None = None,
        stack: bool = False,
        device: str | None = None,
        netns: int | None = None,
        reason: str | None = None,
        protocol: str | None = None,
        offsets: Offsets | None = None,
        kfree_skb: KfreeSkbArgs | None = None,
        reads: KernelReads | None = None,
        memo: bool | None = None,
        **sizes: int,
    ) -> DropMonitor:
        """The monitor (not started) for the settings of ``cfg`` (``offsets.*``,
        ``drops.group_by``) and what only the caller knows: ``events`` (one record per
        drop), ``counts`` (count as well; by default only without ``events``), ``stack``, the filters (``device``, ``netns`` inode, ``reason`` name,
        ``protocol`` name; errors name them ``drops.<name>``), ``offsets`` already
        loaded (the agent shares them), ``kfree_skb`` to build for another kernel's
        tracepoint arguments, ``reads`` to choose the helper that reads kernel memory
        (:mod:`nettracer.bpf.memory`), ``memo`` (the per-CPU device memo of
        :class:`DropSpec`; by default where the kernel has ``bpf_jiffies64``), and the
        map ``sizes`` of :meth:`__init__`.

        Only what the program needs is read before attaching: the offsets, whether
        ``kfree_skb`` has a reason and, to filter by reason, the reason names; from
        BTF through its cache (:mod:`nettracer.kernel.btf_cache`: no BTF parse once
        this boot's BTF was read), or the tracefs format without BTF.  The names are
        otherwise read when first printed.
        """
        from nettracer.layout import source

        group_by = parse_by(cfg["drops.group_by"])  # type: ignore[arg-type]
        cache = str(cfg["offsets.cache_dir"]) or None
        if offsets is None:
            offsets = source.from_config(cfg)
        if kfree_skb is None:
            kfree_skb = cached_kfree_skb_args(cache)
        reasons: Reasons = None
        if kfree_skb.has_reason:
            if reason is not None:
                reasons = cached_reason_names(cache)
            else:
                reasons = lambda: cached_reason_names(cache)  # noqa: E731
        filters = make_filters(
            device, netns, reason, protocol, reasons if isinstance(reasons, dict) else None
        )
        layout = DropLayout.from_offsets(offsets, events=events)
        if memo is None:
            memo = current_features().use("jiffies64")
        spec = DropSpec(
            layout, kfree_skb, filters, stack=stack, events=events, reads=reads, counts=counts,
            memo=memo,
        )  # fmt: skip
        monitor = cls(spec, **sizes)
        monitor.source = offsets.source
        monitor.reasons = reasons
        monitor.group_by = group_by
        if not kfree_skb.has_reason:  # nothing to group by: no column, no key
            monitor.group_by = tuple(k for k in group_by if k != "reason")
            monitor.notices = [no_reason_notice()]
        return monitor

    @property
    def has_reason(self) -> bool:
        """Whether ``kfree_skb`` gives a drop reason here (Linux 5.17 and later)."""
        return self.spec.args.has("reason")

    def __init__(
        self,
        spec: DropSpec,
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
        #: the spec the loaded program was built from (:meth:`_for_kernel`: the layout,
        #: reads and channel this kernel takes); None until started
        self.kernel_spec: DropSpec | None = None
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
        self.reader: ChannelReader | None = None
        self._seen: dict[_KeyTuple, int] = {}
        self._idle: dict[_KeyTuple, int] = {}
        self._lost_seen = 0
        self._names: dict[tuple[int, int], str] = {}
        self._can_evict = True
        self._namer: Names | None = None

    # -- life cycle --------------------------------------------------------------
    def start(self) -> DropMonitor:
        """Create the maps, load the program and attach it to ``kfree_skb``."""
        max_devices, max_stacks, ringbuf_bytes = self._sizes
        try:
            spec = self._for_kernel()
            maps = self._create_maps(spec, max_devices, max_stacks)
            if spec.events:
                from nettracer.tracers.drops.program import channel_for

                shared = None if spec.counts else self.lost_map
                self.reader = channel_for(spec).open(ringbuf_bytes, lost_map=shared)
                maps |= self.reader.maps
            self.prog = self._keep(self._load(spec, maps))
            assert self.kernel_spec is not None
            self.link = self._keep(self.kernel_spec.args.attach(self.prog))
        except BaseException:
            self.close()
            raise
        return self

    def _create_maps(
        self, spec: DropSpec, max_devices: int, max_stacks: int
    ) -> dict[str, bpf_maps.Map]:
        # entries allocated as keys appear: preallocating 8192 per-CPU ones took 11 ms,
        # a tenth of start-up, and a drop program rarely sees more than a few dozen keys
        self.counts = self._keep(
            bpf_maps.percpu_hash(
                DropKey, ctypes.c_uint64, self.max_keys, "counts", BPF_F_NO_PREALLOC
            )
        )
        self.devnames = self._keep(bpf_maps.hash_map(DevKey, DevName, max_devices, "devnames"))
        self.lost_map = self._keep(bpf_maps.percpu_array(ctypes.c_uint64, 1, "lost"))
        maps = {"counts": self.counts, "devnames": self.devnames, "lost": self.lost_map}
        if spec.memo:
            from nettracer.bpf.memo import memo_map

            maps["devmemo"] = self._keep(memo_map(8, "devmemo"))
        if spec.stack:
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
        return maps

    def _load(self, spec: DropSpec, maps: dict[str, bpf_maps.Map]) -> Prog:
        """The program of ``spec``, loaded; :attr:`kernel_spec` becomes the spec it was
        built from.  A ``tp_btf`` program the verifier refuses (offsets that do not match
        the kernel's BTF: a guess it contradicts) is built again with helper reads
        (without the device memo, whose map was not made), and a notice says so."""

        def attempt(spec: DropSpec) -> Prog:
            args = spec.args
            prog = load(build(spec).insns, prog_type=args.prog_type, maps=maps,
                        name="nt_drops", **args.load_target())  # fmt: skip
            self.kernel_spec = spec
            return prog

        try:
            return attempt(spec)
        except VerifierError as exc:
            if not spec.args.typed:
                raise
            reason = summarize_log(exc.log)[1]
            self.notices = [*self.notices, "reading kernel memory with helper calls: the "
                            f"BTF-typed kfree_skb program was refused ({reason})"]  # fmt: skip
            assert spec.reads is not None
            return attempt(spec.replace(args=spec.args.untyped(),
                                        reads=spec.reads.replace(direct=False)))  # fmt: skip

    def _for_kernel(self) -> DropSpec:
        """The spec as this kernel (and ``kernel.without``) wants it: the tracepoint's
        layout (``tp_btf`` where it can), the reads (plain loads on ``tp_btf``, which
        make the device memo pointless) and the event channel."""
        from nettracer.bpf.channel import channel_kind
        from nettracer.kernel import features

        kf = features.current()
        args = self.spec.args.for_kernel(kf)
        reads = self.spec.reads if self.spec.reads is not None else kernel_reads(kf)
        return self.spec.replace(
            args=args,
            reads=reads.replace(direct=args.typed),
            memo=self.spec.memo and not args.typed,
            channel=channel_kind(kf.use("ringbuf")) if self.spec.events else self.spec.channel,
        )

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
        from nettracer.tracers.drops.groups import DropCount, Sample
        from nettracer.tracers.packet import ethertype_from_skb

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
            except NotSupported:  # before 5.14: no atomic read-and-delete for hashes
                self._can_evict = False
                return
            if per_cpu is not None:
                late = sum(per_cpu) - self._seen.get(kt, 0)
                if late > 0:
                    out[kt] = out.get(kt, 0) + late
            self._seen.pop(kt, None)
            self._idle.pop(kt, None)

    # -- names and stacks --------------------------------------------------------------
    def names(self) -> Names:
        """Names for the numbers this monitor reports (kallsyms, reasons, devices)."""
        if self._namer is None:
            from nettracer.tracers.drops.groups import Names

            self._namer = Names(self.reasons, self.device_name)
        return self._namer

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
        """Drops not counted (or, without counts, events not delivered) so far, in total."""
        if not self.spec.counts:
            return self.events_lost()
        return self._lost_total()

    def events_lost(self) -> int:
        """Events not delivered so far (ring buffer full, or the program busy on its CPU):
        the reader's count, which without counts includes ``lost`` (shared) and, for a
        perf event array, the kernel's ``PERF_RECORD_LOST`` records (written only before
        the next record that fits: a full buffer's last losses show once another event
        arrived on that CPU)."""
        assert self.reader is not None and self.prog is not None
        return self.reader.lost + self.prog.stats().recursion_misses


def parse_by(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"location,device"`` -> ``("location", "device")``; UsageError for unknown keys."""
    items = text.split(",") if isinstance(text, str) else list(text)
    keys = tuple(dict.fromkeys(i.strip().lower() for i in items if i.strip()))
    bad = [k for k in keys if k not in GROUP_KEYS]
    if bad or not keys:
        raise UsageError(
            f"drops.group_by {','.join(items) if not isinstance(text, str) else text}: "
            f"expected a comma-separated list of {', '.join(GROUP_KEYS)}",
            setting="drops.group_by",
        )
    return keys


def make_filters(
    device: str | None,
    netns: int | None,
    reason: str | None,
    protocol: str | None,
    reasons: dict[int, str] | None,
) -> Filters:
    """Filter values -> :class:`Filters`; UsageError (naming ``drops.<filter>``) for bad
    ones."""
    dev = None
    if device is not None:
        dev = device.encode()
        if not 0 < len(dev) < 16:
            raise UsageError(
                f"drops.device {device!r}: interface names are 1 to 15 bytes",
                setting="drops.device",
            )
    reason_value = None
    if reason is not None:
        if reasons is None:
            raise NotSupported("filtering by drop reason", "5.17", "kfree_skb has no reason here")
        reason_value = parse_reason(reason, reasons)
    proto = None
    if protocol is not None:
        from nettracer.tracers.packet import parse_ethertype

        try:
            proto = parse_ethertype(protocol)
        except ValueError as exc:
            raise UsageError(f"drops.protocol: {exc}", setting="drops.protocol") from None
    if netns is not None and not 0 < netns < 1 << 32:
        raise UsageError(
            f"drops.netns {netns}: expected a namespace inode (ls -Li /proc/PID/ns/net)",
            setting="drops.netns",
        )
    return Filters(device=dev, netns=netns, reason=reason_value, protocol=proto)
