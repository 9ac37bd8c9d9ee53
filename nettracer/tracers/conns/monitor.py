"""The connection tracer: TCP and UDP, IPv4 and IPv6, in every network namespace.

:class:`ConnTracer` owns the kernel side (maps, the programs of
:mod:`nettracer.tracers.conns.program`, their links) and hands out raw records;
:class:`ConnMonitor` turns them into one :class:`~nettracer.tracers.conns.table.Interval`
per interval: open connections with their deltas, connections closed during the
interval (each exactly once), evictions and lost records, gateways from a
:class:`~nettracer.net.gateway.GatewayResolver`.

How a connection ends (``end`` of a closed one):

* ``closed`` -- TCP: ``tcp:tcp_destroy_sock``.  UDP: the kernel has no tracepoint for
  closing a UDP socket, so once per interval the monitor dumps the UDP sockets of every
  namespace that has UDP entries (``NETLINK_SOCK_DIAG``, :mod:`nettracer.net.sockdiag`)
  and ends the entries whose tuple is no longer listed.  Their end time is the last
  moment they were known open (the last datagram, or the previous dump that listed
  them): the true close lies after it and before the dump that missed it, within one
  interval.  When the freed ``struct sock`` is reused by another socket (another
  local port) before that, the programs end the entry as closed at its last datagram.
* ``reused`` -- the socket got another tuple (UDP connect/rebind, TCP connect again).
* ``idle`` -- open, but nothing moved for ``network.tcp_conn_timeout_s`` /
  ``network.udp_conn_timeout_s``: ended by user space to bound the table (a later
  datagram starts a new flow).

Closed connections come through the ring buffer (:class:`RecordReader`, one bulk copy),
or on kernels without one (before 5.8, or ``kernel.without: [ringbuf]``) through a perf
event array (:class:`PerfRecordReader`).

Typical use (:meth:`ConnMonitor.from_config` is the contract of
:mod:`nettracer.tracers`)::

    with ConnMonitor.from_config(load_config()) as monitor:
        while ...:
            monitor.poll(0.05)         # drain the event channel (never blocks on lookups)
            iv = monitor.interval()    # every interval
"""

from __future__ import annotations

import ctypes
import errno
import struct
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from nettracer.bpf import maps, prog, ringbuf, syscall
from nettracer.bpf.channel import EventChannel, channel_kind
from nettracer.bpf.counters import counted, lost_counter
from nettracer.bpf.link import Link, UnknownTracepoint, attach_raw_tracepoint
from nettracer.bpf.syscall import BpfSyscallError, Cmd, ProgType
from nettracer.errors import NotSupported
from nettracer.kernel import features
from nettracer.kernel.features import kernel_reads
from nettracer.kernel.tracepoints import TracepointArgs
from nettracer.layout.offsets import Offsets
from nettracer.tracers.conns import peers
from nettracer.tracers.conns import program as cp
from nettracer.tracers.conns.model import Conn, decode, route_of, udp_tuple
from nettracer.tracers.conns.records import IDX, RECORD, RECORD_SIZE, STREAM_BITS, EndReason, Flag
from nettracer.tracers.conns.table import ConnTable, IdCounts, Interval

if TYPE_CHECKING:
    from collections.abc import Mapping

    from nettracer.bpf.channel import ChannelReader
    from nettracer.net.gateway import GatewayResolver


#: bytes sources: the sock_*_length tracepoints, or struct tcp_sock counters
BYTES_SOURCES = ("auto", "length", "tcp_sock")

_PID = IDX["pid"]
_ID = IDX["id"]
_FLAGS = IDX["flags"]
_SK = IDX["sk"]
_PROTO = IDX["proto"]
_LAST = IDX["last_ns"]
_NETNS = IDX["netns"]
_FAMILY = IDX["family"]
_DPORT = IDX["dport"]
#: a route not looked up yet
_UNKNOWN = object()


class ClosedRenderer(Protocol):
    """What renders the records of closed connections never reported open
    (:class:`nettracer.output.conns.RecordLines`)."""

    def lines(self, recs: list[tuple[Any, ...]], gateways: list[Any] | None) -> list[str]:
        """One text per record, with ``gateways[i]`` (None: no gateways)."""
        ...


@dataclass
class Collected:
    """One read of the kernel side: the id counter read first, then the map's entries
    (the event channel is drained last, into :meth:`ConnTracer.take_closed`)."""

    created: IdCounts
    live: list[tuple[Any, ...]]
    lost: int


class RecordReader(ringbuf.RingBufReader):
    """A ring buffer reader for records that all have :class:`ConnValue`'s size.

    Every record then takes the same ``8 + 176`` bytes, so everything committed is read
    with one copy and unpacked with ``struct.iter_unpack`` instead of one Python call per
    record; the length words are checked in bulk (a record still being written, BUSY,
    ends the batch).  Anything unexpected falls back to the generic reader.
    """

    STEP = (ringbuf.HDR + RECORD_SIZE + 7) & ~7
    _UNPACK = struct.Struct("<" + "8x" + RECORD.format.lstrip("<@=!>"))

    def consume_records(self) -> list[tuple[Any, ...]]:
        cons = struct.unpack_from("<Q", self._cons, 0)[0]
        prod = struct.unpack_from("<Q", self._prod, 0)[0]
        avail = prod - cons
        if avail <= 0:
            return []
        step = self.STEP
        n = avail // step
        if avail % step:
            return self._generic()
        off = self._data_off + (cons & self.mask)
        data = self._prod[off : off + n * step]
        lens = memoryview(data).cast("I")[:: step // 4].tolist()
        if lens.count(RECORD_SIZE) != n:
            for k, word in enumerate(lens):
                if word != RECORD_SIZE:
                    if word & ~ringbuf.BUSY != RECORD_SIZE:
                        return self._generic()  # not one of ours (or discarded): go slowly
                    n = k
                    break
        if n == 0:
            return []
        out = list(self._UNPACK.iter_unpack(data[: n * step]))
        struct.pack_into("<Q", self._cons, 0, cons + n * step)
        self.records += n
        return out

    def _generic(self) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        unpack = RECORD.unpack_from

        def take(view: memoryview) -> None:
            if len(view) == RECORD_SIZE:
                out.append(unpack(view))

        self.consume(take)
        return out


class PerfRecordReader:
    """Records from the perf event array of :func:`~nettracer.tracers.conns.program.
    channel_for` (kernels without a ring buffer), with :class:`RecordReader`'s calls.

    ``lost`` is ``lost_map`` (records that fit nowhere) plus the records the kernel
    reported lost (``PERF_RECORD_LOST``) beyond the outputs the programs saw refused
    (the channel's own counter, ``refused``): every refusal since Linux 5.4 returns
    -ENOSPC, and the record then went on to the ``ended`` hash, so only before 5.4
    (where ``bpf_perf_event_output`` returned 0 on a full buffer) does that add any.
    """

    def __init__(self, channel: ChannelReader, lost_map: maps.Map) -> None:
        self.channel = channel
        self.lost_map = lost_map

    @property
    def records(self) -> int:
        return self.channel.records

    @property
    def lost(self) -> int:
        reported = self.channel.kernel_lost  # first: a refusal is counted before it is
        unseen = reported - counted(self.channel.lost_map)  # reported, never after
        return counted(self.lost_map) + max(0, unseen)

    def consume_records(self) -> list[tuple[Any, ...]]:
        """Every record now in the perf buffers, unpacked (a sample's raw data is the
        record padded to 8 bytes with its ``u32`` size)."""
        out: list[tuple[Any, ...]] = []
        unpack = RECORD.unpack_from

        def take(view: memoryview) -> None:
            if len(view) >= RECORD_SIZE:
                out.append(unpack(view))

        self.channel.consume(take)
        return out

    def close(self) -> None:
        self.channel.close()


class ConnTracer:
    """The kernel side of the connection tracer.

    ``bytes_source``: ``length`` needs ``sock:sock_send_length``/``sock_recv_length``
    (Linux 6.3) and gives exact application bytes for TCP and UDP; ``tcp_sock`` reads
    ``tcp_sock.bytes_acked``/``bytes_received`` (TCP only: UDP is then off);
    ``auto`` takes ``length`` when the kernel has the tracepoints.

    ``peers``: count each peer of unconnected UDP sockets (:mod:`~nettracer.tracers.
    conns.peers`: programs on every packet sent and received, at 100,000 packets a
    second each way about 5% of a CPU; off: a notice when UDP flows are collected).
    """

    def __init__(
        self,
        offsets: Offsets,
        opts: cp.ConnSpec | None = None,
        *,
        max_conns: int = 65536,
        bytes_source: str = "auto",
        ring_bytes: int = 1 << 22,
        peers: bool = False,
    ) -> None:
        if bytes_source not in BYTES_SOURCES:
            raise ValueError(f"bytes_source must be one of {BYTES_SOURCES}")
        self.offsets = offsets
        self.opts = opts or cp.ConnSpec()
        self.max_conns = max_conns
        self.bytes_source = bytes_source
        self.ring_bytes = ring_bytes
        self.notices: list[str] = []
        self.links: list[Link] = []
        self.progs: dict[str, prog.Prog] = {}
        self._pending: list[tuple[Any, ...]] = []
        self._reader: RecordReader | PerfRecordReader | None = None
        self.records = 0
        self.refreshes = 0
        #: records the event channel refused that came through the ``ended`` hash
        self.overflowed = 0
        self._walk_bufs: tuple[Any, ...] | None = None
        #: count per-peer flows of unconnected UDP sockets (with the length tracepoints)
        self.with_peers = peers
        self.peers_on = False

    # -- set-up ---------------------------------------------------------------------------
    def start(self) -> None:
        """Create maps, build, load and attach the programs."""
        opts = self.opts
        if opts.collect_ipv6 and any(k not in self.offsets for k in cp.IPV6_FIELDS):
            opts = replace(opts, collect_ipv6=False)
            self.notices.append(
                "IPv6 connections are not collected: the IPv6 address fields of struct "
                "sock_common are not known on this kernel"
            )
        kf = features.current()
        channel = channel_kind(kf.use("ringbuf"))
        self.opts = opts = replace(opts, atomic_fetch=kf.use("atomic_fetch"), channel=channel)
        m = self._create_maps()
        use_length = self.bytes_source in ("auto", "length")
        tps = {
            tp: _tracepoint(tp)
            for tp in (cp.TP_STATE, cp.TP_DESTROY, cp.TP_SEND, cp.TP_RECV, cp.TP_OWNER)
        }
        if use_length and not (tps[cp.TP_SEND] and tps[cp.TP_RECV]):
            if self.bytes_source == "length":
                raise NotSupported(f"tracepoint sock:{cp.TP_SEND[0]}", since=cp.TP_SEND[1])
            use_length = False
        if not use_length:
            if opts.collect_udp:
                opts = replace(opts, collect_udp=False)
                why = (
                    f"this kernel has no sock:{cp.TP_SEND[0]} tracepoint (Linux {cp.TP_SEND[1]})"
                    if self.bytes_source == "auto"
                    else "bytes are read from struct tcp_sock"
                )
                self.notices.append(f"UDP flows are not collected: {why}")
            if not opts.collect_tcp:
                raise NotSupported(
                    "UDP flows",
                    since=cp.TP_SEND[1],
                    detail=f"no sock:{cp.TP_SEND[0]} tracepoint and network.collect_tcp is "
                    "false: nothing to trace",
                )
        self.use_length = use_length
        if opts.reads is None:
            opts = replace(opts, reads=kernel_reads())
        self.opts = opts
        for tp in (cp.TP_STATE, cp.TP_DESTROY):
            if tps[tp] is None:
                self.close()
                raise NotSupported(f"tracepoint {tp[0]}", since=tp[1])
        state, destroy = tps[cp.TP_STATE], tps[cp.TP_DESTROY]
        assert state is not None and destroy is not None
        builds = {
            "conn_destroy": (cp.build_destroy(self.offsets, opts, destroy), destroy),
            "conn_state": (cp.build_state(self.offsets, opts, state), state),
            "conn_refresh": (cp.build_refresh(self.offsets, opts), None),
        }
        send, recv, owner = tps[cp.TP_SEND], tps[cp.TP_RECV], tps[cp.TP_OWNER]
        if use_length and send is not None and recv is not None:
            builds["conn_send"] = (cp.build_length(self.offsets, opts, True, send), send)
            builds["conn_recv"] = (cp.build_length(self.offsets, opts, False, recv), recv)
        elif owner is not None:
            builds["conn_owner"] = (cp.build_owner(self.offsets, opts, owner), owner)
        peer_progs = self._peer_programs(m) if use_length and recv is not None else {}
        for name, (program, args) in builds.items():
            # conn_refresh is run by BPF_PROG_TEST_RUN: a raw tracepoint program always
            kind = args.prog_type if args is not None else ProgType.RAW_TRACEPOINT
            self.progs[name] = prog.load(program.insns, prog_type=kind, maps=m, name=name)
        for name, (_, args) in builds.items():
            if args is not None:
                self.links.append(args.attach(self.progs[name]))
        for name, (program, args) in peer_progs.items():
            self.progs[name] = prog.load(program.insns, prog_type=args.prog_type, maps=m, name=name)
            self.links.append(args.attach(self.progs[name]))

    def _create_maps(self) -> dict[str, Any]:
        """The maps of the programs built from ``opts``, by the programs' names."""
        self.conns = maps.lru_hash(ctypes.c_uint64, cp.ConnValue, self.max_conns, cp.MAP_CONNS)
        self.lost = lost_counter(cp.MAP_LOST)
        if self.opts.atomic_fetch:
            self.ids = maps.array(ctypes.c_uint64, 1, cp.MAP_IDS)
        else:  # before 5.12: per-CPU, per-nesting-level counters (cp.StreamIds)
            self.ids = maps.percpu_array(cp.StreamIds, 1, cp.MAP_IDS)
        self.ended = maps.hash_map(ctypes.c_uint64, cp.ConnValue, cp.ENDED_ENTRIES, cp.MAP_ENDED)
        m = {
            cp.MAP_CONNS: self.conns,
            cp.MAP_LOST: self.lost,
            cp.MAP_IDS: self.ids,
            cp.MAP_ENDED: self.ended,
        }
        self._reader = self._open_channel(m)
        return m

    def _open_channel(self, m: dict[str, Any]) -> RecordReader | PerfRecordReader:
        """The reader of closed connections for ``opts.channel``, its maps added to
        ``m``: the ring buffer read in bulk, or the perf event array's buffers (of
        ``ring_bytes`` in all)."""
        if self.opts.channel == EventChannel.kind:
            self.events = ringbuf.RingBuf(self.ring_bytes, cp.MAP_EVENTS)
            m[cp.MAP_EVENTS] = self.events
            return RecordReader(self.events, self.lost)
        reader = cp.channel_for(self.opts).open(self.ring_bytes)
        m |= reader.maps
        return PerfRecordReader(reader, self.lost)

    def _peer_programs(self, m: dict[str, Any]) -> dict[str, tuple[Any, TracepointArgs]]:
        """The programs of :mod:`nettracer.tracers.conns.peers` and their tracepoints'
        layouts, their maps added to ``m``; none (and a notice) when UDP is off or a
        tracepoint is missing."""
        if not self.opts.collect_udp:
            return {}
        if not self.with_peers:
            self.notices.append(
                "peers of unconnected UDP sockets are not counted: network.udp_peers is "
                "off (--udp-peers; it runs a program on every packet)"
            )
            return {}
        tps = (peers.TP_TX, peers.TP_RX, peers.TP_READY)
        found = {tp: _available(peers.tracepoint_args(tp)) for tp in tps}
        missing = [tp for tp, args in found.items() if args is None]
        if missing:
            self.notices.append(
                "peers of unconnected UDP sockets are not counted: no raw tracepoint "
                + ", ".join(missing)
            )
            return {}
        self.peers = maps.hash_map(
            peers.PeerKey, peers.PeerValue, peers.PEER_ENTRIES, peers.MAP_PEERS
        )
        self.slot = maps.percpu_array(peers.PeerKey, 1, peers.MAP_SLOT)
        m[peers.MAP_PEERS] = self.peers
        m[peers.MAP_SLOT] = self.slot
        self.peers_on = True
        tx, rx, ready = (found[tp] for tp in tps)
        assert tx is not None and rx is not None and ready is not None
        reads = self.opts.reads
        return {
            "peer_tx": (peers.build_tx(self.offsets, tx, reads), tx),
            "peer_rx": (peers.build_rx(self.offsets, rx, reads), rx),
            "peer_ready": (peers.build_ready(self.offsets, ready, reads), ready),
        }

    def take_peers(self, keep: set[int]) -> dict[int, list[tuple[Any, ...]]]:
        """``struct sock *`` -> the peers counted for it: (family, address bytes, port,
        bytes sent, received, datagrams sent, received).  Entries of sockets not in
        ``keep`` (the unconnected UDP entries still open) are removed from the map
        once read: their counts are final, or belong to no flow we report."""
        out: dict[int, list[tuple[Any, ...]]] = {}
        if not self.peers_on:
            return out
        for k, v in self.peers.items():
            n = 4 if k.family == 2 else 16
            port = ((k.port & 0xFF) << 8) | (k.port >> 8)
            out.setdefault(k.sk, []).append(
                (k.family, bytes(k.addr)[:n], port, v.bytes_sent, v.bytes_received,
                 v.datagrams_sent, v.datagrams_received)
            )  # fmt: skip
            if k.sk not in keep:
                self.peers.delete(k)
        return out

    # -- reading --------------------------------------------------------------------------
    def drain(self) -> int:
        """Move the records waiting in the event channel to the pending list; returns
        how many."""
        assert self._reader is not None
        got = self._reader.consume_records()
        self._pending.extend(got)
        self.records += len(got)
        return len(got)

    def take_closed(self) -> list[tuple[Any, ...]]:
        out, self._pending = self._pending, []
        return out

    def lost_total(self) -> int:
        return self._reader.lost if self._reader is not None else 0

    def created(self) -> IdCounts:
        """The id counters (:class:`~nettracer.tracers.conns.table.IdCounts`)."""
        if self.opts.atomic_fetch:
            return IdCounts(int(self.ids.lookup(0, 0)))
        per_cpu = self.ids.lookup(0)
        counts = {
            cpu << 2 | level: int(v.count[level])
            for cpu, v in enumerate(per_cpu)
            for level in range(cp.NEST_LEVELS)
        }
        return IdCounts(counts, STREAM_BITS)

    def collect(self) -> Collected:
        """Read the id counter, refresh the TCP entries' stats, walk the map, drain."""
        created = self.created()
        live = self.walk()
        refresh = self.progs["conn_refresh"]
        tcp = [r[_SK] for r in live if r[_PROTO] == cp.IPPROTO_TCP]
        for sk in tcp:
            refresh.test_run((sk,))
        self.refreshes += len(tcp)
        if tcp:
            live = self.walk()
        self.drain()  # records of connections that ended during the walk: take_closed()
        self.take_overflow()
        return Collected(created, live, self.lost_total())

    def take_overflow(self) -> int:
        """Move the records the event channel refused (kept in the ``ended`` hash) to the
        pending list; returns how many."""
        n = 0
        for key in list(self.ended.keys()):
            v = self.ended.pop(key)
            if v is not None:
                self._pending.append(RECORD.unpack(bytes(v)))
                n += 1
        self.overflowed += n
        return n

    def walk(self) -> list[tuple[Any, ...]]:
        """Every entry of the connection map, unpacked (batched, 4096 at a time)."""
        chunk = min(4096, self.max_conns)
        if self._walk_bufs is None:
            self._walk_bufs = (
                ctypes.create_string_buffer(8 * chunk),
                ctypes.create_string_buffer(RECORD_SIZE * chunk),
                ctypes.create_string_buffer(8),
            )
        keys, values, out_batch = self._walk_bufs
        unpack = RECORD.unpack_from
        result: list[tuple[Any, ...]] = []
        in_batch = None
        try:
            while maps.use_batch_ops():
                n, err = syscall.map_batch(
                    Cmd.MAP_LOOKUP_BATCH, self.conns.fd, in_batch, out_batch, keys, values, chunk
                )
                result.extend(unpack(values, i * RECORD_SIZE) for i in range(n))
                if err == errno.ENOENT or n == 0:
                    return result
                in_batch = ctypes.create_string_buffer(out_batch.raw, 8)
        except BpfSyscallError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, 524):
                raise
        return [RECORD.unpack(bytes(v)) for _, v in self.conns.items()]

    def end(self, ends: Mapping[int, int], reason: EndReason) -> list[tuple[Any, ...]]:
        """Remove the entries of ``ends`` (sk -> end time, ns) from the map; their
        final records with that end time and ``reason``."""
        out = []
        end = IDX["end_ns"]
        why = IDX["end_reason"]
        for sk, end_ns in ends.items():
            v = self.conns.pop(sk)  # a lookup, then a delete before 5.14
            if v is None:
                continue  # gone meanwhile: its record is in the event channel
            rec = list(RECORD.unpack(bytes(v)))
            rec[end] = end_ns
            rec[why] = reason
            out.append(tuple(rec))
        return out

    def close(self) -> None:
        for link in self.links:
            link.close()
        self.links.clear()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        for p in self.progs.values():
            p.close()
        for name in ("conns", "events", "lost", "ids", "ended", "peers", "slot"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()


def _vm_hwm() -> int:
    """This process's peak RSS in KiB (``VmHWM``: per address space, unlike
    ``ru_maxrss``, which exec inherits from the process that forked us)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tracepoint(tp: tuple[str, str | None]) -> TracepointArgs | None:
    """The layout of tracepoint ``tp`` (a ``cp.TP_*``) this kernel is to use, or None
    when the kernel lacks the tracepoint."""
    return _available(cp.tracepoint_args(tp))


def _available(raw: TracepointArgs) -> TracepointArgs | None:
    """The layout of ``raw``'s tracepoint this kernel is to use, or None when the
    kernel lacks the tracepoint."""
    try:
        args = raw.for_kernel()
    except UnknownTracepoint:
        return None
    if args.raw and not _has_raw_tp(raw.name):
        return None
    return args


def _text_ranges(names: tuple[str, ...]) -> list[tuple[int, int]]:
    """[start, end) of the kernel functions ``names`` that /proc/kallsyms shows (with
    addresses: root); empty when none is readable."""
    from nettracer.errors import NettracerError
    from nettracer.kernel.kallsyms import Kallsyms

    syms = Kallsyms()
    out = []
    for name in names:
        try:
            addr = syms.lookup_name(name)
        except (NettracerError, OSError):
            continue
        sym = syms.lookup(addr)
        if addr and sym is not None and sym.size:
            out.append((addr, addr + sym.size))
    return out


def _has_raw_tp(name: str) -> bool:
    """Whether raw tracepoint ``name`` exists: attach a trivial program and detach it."""
    from nettracer.bpf.insn import R0, exit_, mov64

    p = prog.load([mov64(R0, 0), exit_()], name="probe_tp")
    try:
        with attach_raw_tracepoint(p, name):
            return True
    except UnknownTracepoint:
        return False
    finally:
        p.close()


@dataclass
class ConnMonitor:
    """User space of the tracer: decoding, the connection table, expiry, gateways.

    ``pid`` restricts what is reported (accounting covers everything the kernel saw).

    ``render_closed`` (e.g. :class:`nettracer.output.conns.RecordLines`; called as
    ``render_closed.lines(records, gateways: list[Gateway | None] | None)``) turns the
    record of a connection that closed before any interval saw it open into its final
    output as soon as it is read (when its gateway is not known yet, at the interval's
    lookups); the interval then carries that output in ``closed_text`` instead of a
    :class:`Conn`.  A host that closes thousands of connections a second is reported
    this way at a fraction of the cost (and memory).

    Gateways: every report of a connection to a routed destination carries its gateway,
    the single report of one that lived less than an interval too.  Once per interval
    the monitor asks the resolver for every (namespace, source, destination) it needs,
    synchronously and cached (:meth:`GatewayResolver.resolve`), within
    ``gateway_budget_s``; what the budget leaves (a first interval with thousands of
    new destinations) is looked up in the background and counted ``late``.
    """

    tracer: ConnTracer
    tcp_timeout_s: float = 120.0
    udp_timeout_s: float = 30.0
    resolver: GatewayResolver | None = None
    pid: int | None = None
    render_closed: ClosedRenderer | None = None
    table: ConnTable = field(init=False)
    closed: list[Conn] = field(default_factory=list)
    rendered: list[str] = field(default_factory=list)
    rendered_ids: list[int] = field(default_factory=list)
    #: seconds an interval may spend on synchronous gateway lookups
    gateway_budget_s: float = 2.0
    _route_keys: dict[tuple[int, bytes, bytes], Any] = field(default_factory=dict)
    #: the last interval's answers by (netns, source, destination): gateway or None
    _routes: dict[tuple[int, bytes, bytes], Any] = field(default_factory=dict)
    #: records of closed connections that wait for the interval's gateway lookups
    _held: list[tuple[Any, ...]] = field(default_factory=list)
    #: UDP sockets (sk) listed by the last NETLINK_SOCK_DIAG dumps, and when
    _udp_seen: dict[int, int] = field(default_factory=dict)
    _diag: Any = None
    diag_errors: int = 0
    last_diag_error: str | None = None
    last_collect_ms: float = 0.0

    def __post_init__(self) -> None:
        self.table = ConnTable(self.tracer.max_conns)

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, object],
        *,
        offsets: Offsets | None = None,
        netns: int = 0,
        pid: int | None = None,
        bytes_source: str = "auto",
        gateway: bool | None = None,
        ring_bytes: int = 1 << 22,
    ) -> ConnMonitor:
        """The monitor (not started) for the settings of ``cfg`` (``offsets.*``,
        ``network.*``, ``gateway_lookup.*``) and what only the caller knows: ``offsets``
        already loaded (the agent shares them), the ``netns`` inode to trace (0: all),
        the ``pid`` to report, ``bytes_source`` (:class:`ConnTracer`), ``gateway``
        lookups (None: ``gateway_lookup.enabled``) and the event channel's size (the
        ring buffer's, or the perf buffers' together)."""
        from nettracer.layout import source

        if offsets is None:
            offsets = source.from_config(cfg)
        spec = cp.ConnSpec(
            collect_tcp=bool(cfg["network.collect_tcp"]),
            collect_udp=bool(cfg["network.collect_udp"]),
            collect_ipv6=bool(cfg["network.collect_ipv6"]),
            netns=netns,
        )
        tracer = ConnTracer(
            offsets,
            spec,
            max_conns=int(cfg["network.max_tracked_connections"]),  # type: ignore[call-overload]
            bytes_source=bytes_source,
            ring_bytes=ring_bytes,
            peers=bool(cfg["network.udp_peers"]),
        )
        resolver = None
        if cfg["gateway_lookup.enabled"] if gateway is None else gateway:
            from nettracer.net.gateway import GatewayResolver

            resolver = GatewayResolver.from_config(cfg)  # type: ignore[arg-type]
        return cls(
            tracer,
            tcp_timeout_s=float(cfg["network.tcp_conn_timeout_s"]),  # type: ignore[arg-type]
            udp_timeout_s=float(cfg["network.udp_conn_timeout_s"]),  # type: ignore[arg-type]
            resolver=resolver,
            pid=pid,
        )

    def start(self) -> ConnMonitor:
        """Load and attach the programs (and get the gateway lookups ready)."""
        if self.resolver is not None:
            self.resolver.warm()
        self.tracer.start()
        return self

    def close(self) -> None:
        """Detach everything and stop the gateway resolver."""
        try:
            self.tracer.close()
        finally:
            if self._diag is not None:
                self._diag.close()
            if self.resolver is not None:
                self.resolver.close()

    def __enter__(self) -> ConnMonitor:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def source(self) -> str:
        """Where the offsets came from (``btf``, ``guess``, ``profile``)."""
        return self.tracer.offsets.source

    @property
    def notices(self) -> list[str]:
        return self.tracer.notices

    def poll(self, timeout_s: float) -> int:
        """Drain the event channel, then sleep ``timeout_s`` (records are written without
        wake-ups; draining every ~50 ms keeps up with hundreds of thousands a second)."""
        n = self.tracer.drain()
        if n:
            self._take_pending()
        if timeout_s > 0:
            time.sleep(timeout_s)
        return n

    def _take_pending(self, walked: set[int] | frozenset[int] = frozenset()) -> list[Conn]:
        """Decode (or render) the records drained so far; the decoded ones are returned
        (and kept for the interval).  A record is rendered at once when its connection
        was never reported open: not in the table, nor among ``walked``, the ids the map
        walk of this interval saw (a record drained after the walk may be one of them).
        One that needs a gateway not known yet is held until the interval's lookups."""
        tcp_sock = not self.tracer.use_length
        render = self.render_closed is not None
        open_ids = self.table.open
        routes = self._routes if self.resolver is not None else None
        peers_on = self.tracer.peers_on
        now: list[tuple[Any, ...]] = []
        gateways: list[Any] = []
        for rec in self.tracer.take_closed():
            cid = rec[_ID]
            if (
                render
                and cid not in open_ids
                and cid not in walked
                and not (peers_on and rec[_PROTO] == cp.IPPROTO_UDP and rec[_DPORT] == 0)
            ):
                if routes is not None:
                    k = route_of(rec)
                    gw = None if k is None else routes.get(k, _UNKNOWN)
                    if gw is _UNKNOWN:
                        self._held.append(rec)
                        continue
                    gateways.append(gw)
                now.append(rec)
                continue
            self.closed.append(decode(rec, tcp_sock))
        if now:
            self._render(now, gateways if routes is not None else None)
        return self.closed

    def _render(self, recs: list[tuple[Any, ...]], gateways: list[Any] | None) -> None:
        """Render closed connections' records now (``pid`` filter applied), with
        ``gateways[i]`` (None: none)."""
        assert self.render_closed is not None
        self.rendered_ids.extend([rec[_ID] for rec in recs])
        if self.pid is not None:
            pid = self.pid
            keep = [
                i for i, rec in enumerate(recs) if rec[_FLAGS] & Flag.PID_KNOWN and rec[_PID] == pid
            ]
            recs = [recs[i] for i in keep]
            gateways = None if gateways is None else [gateways[i] for i in keep]
        self.rendered.extend(self.render_closed.lines(recs, gateways))

    def interval(self) -> Interval:
        """Everything since the last call: open connections (with deltas), closed ones."""
        t0 = time.perf_counter()
        self.tracer.drain()
        self._take_pending()
        got = self.tracer.collect()
        closed = self._take_pending({rec[_ID] for rec in got.live})
        self.closed = []
        tcp_sock = not self.tracer.use_length
        now = time.monotonic_ns()
        tcp_idle = int(self.tcp_timeout_s * 1e9)
        udp_idle = int(self.udp_timeout_s * 1e9)
        gone = self._udp_gone(got.live, now)
        stale = {}
        live = []
        for rec in got.live:
            if rec[_SK] in gone:
                continue
            idle = now - rec[_LAST]
            if idle > (tcp_idle if rec[_PROTO] == cp.IPPROTO_TCP else udp_idle):
                stale[rec[_SK]] = now
            else:
                live.append(rec)
        for rec in self.tracer.end(gone, EndReason.DESTROYED):
            closed.append(decode(rec, tcp_sock))
        for rec in self.tracer.end(stale, EndReason.IDLE):
            closed.append(decode(rec, tcp_sock))
        conns = [decode(rec, tcp_sock) for rec in live]
        self._peers(live, conns, closed)
        self._gateways(conns, closed)
        rendered, self.rendered = self.rendered, []
        ids, self.rendered_ids = self.rendered_ids, []
        iv = self.table.update(got.created, conns, closed, got.lost, seen=ids)
        room = max(0, self.table.max_conns - len(iv.closed))
        if len(rendered) > room:
            iv.evicted += len(rendered) - room
            self.table.evicted_total += len(rendered) - room
            del rendered[room:]
        iv.closed_text = rendered
        if self.pid is not None:
            iv.conns = [c for c in iv.conns if c.pid == self.pid]
            iv.closed = [c for c in iv.closed if c.pid == self.pid]
        self.last_collect_ms = (time.perf_counter() - t0) * 1e3
        return iv

    def _peers(self, live: list[tuple[Any, ...]], conns: list[Conn], closed: list[Conn]) -> None:
        """Give the unconnected UDP sockets among ``conns`` and ``closed`` their peers
        (:meth:`ConnTracer.take_peers`; ``live`` are the records still open)."""
        if not self.tracer.peers_on:
            return
        keep = {r[_SK] for r in live if r[_PROTO] == cp.IPPROTO_UDP and r[_DPORT] == 0}
        counted = self.tracer.take_peers(keep)
        for c in (*conns, *closed):
            if c.proto == "udp" and c.dport == 0:
                c.peers = counted.get(c.sk, [])

    def _udp_gone(self, live: list[tuple[Any, ...]], now: int) -> dict[int, int]:
        """The UDP entries of ``live`` whose socket is closed (sk -> end time): those
        whose tuple no NETLINK_SOCK_DIAG dump of their namespace lists any more.

        The end time is the last moment the socket was known open: its last datagram,
        or the previous dump that listed it; the close happened between that and now,
        within one interval.  A socket that was connect()ed to another peer since its
        last datagram is not listed under its old tuple either: it ends as closed and
        its next datagram starts a new flow."""
        udp = [rec for rec in live if rec[_PROTO] == cp.IPPROTO_UDP]
        if not udp:
            self._udp_seen.clear()
            return {}
        if self._diag is None:
            from nettracer.net.sockdiag import UdpSockets

            self._diag = UdpSockets()
        by_ns: dict[int, set[int]] = {}
        for rec in udp:
            by_ns.setdefault(rec[_NETNS], set()).add(rec[_FAMILY])
        self._diag.keep_only(by_ns)
        listed: dict[int, set[Any] | None] = {}
        failed = set()
        for ns, families in by_ns.items():
            try:
                listed[ns] = self._diag.tuples(ns, sorted(families))
            except OSError as exc:  # unknown: close nothing there
                failed.add(ns)
                self.diag_errors += 1
                self.last_diag_error = f"netns {ns}: {exc}"
        gone: dict[int, int] = {}
        seen = {}
        for rec in udp:
            sk, ns = rec[_SK], rec[_NETNS]
            if ns in failed:
                seen[sk] = self._udp_seen.get(sk, 0)
                continue
            sockets = listed[ns]
            if sockets is not None and udp_tuple(rec) in sockets:
                seen[sk] = now
            else:  # listed nowhere, or its namespace is gone
                gone[sk] = max(rec[_LAST], self._udp_seen.get(sk, 0))
        self._udp_seen = seen
        return gone

    def _gateways(self, conns: list[Conn], closed: list[Conn]) -> None:
        """The interval's gateway lookups, synchronous and bounded: every (namespace,
        source, destination) that an open or closed connection or a held record needs
        is answered from the resolver's cache or looked up now, within
        ``gateway_budget_s``; a connection the table already knows keeps its gateway.
        Held records are rendered.  Keys the budget did not cover (counted ``late``)
        are looked up by the resolver's worker for the next interval; their reports
        say null meanwhile."""
        held, self._held = self._held, []
        if self.resolver is None:
            return
        known = self.table.open
        need: dict[tuple[int, bytes, bytes], list[Conn]] = {}
        for c in (*conns, *closed):
            if c.gateway is None and c.direction != "local" and c.daddr_raw.strip(b"\0"):
                prev = known.get(c.id)
                if prev is not None and prev.gateway is not None:
                    continue  # carried over by the table
                need.setdefault((c.netns, c.saddr_raw, c.daddr_raw), []).append(c)
        for rec in held:
            k = route_of(rec)
            if k is not None:
                need.setdefault(k, [])
        if len(self._route_keys) > 4096:
            self._route_keys.clear()
        keys = {k: self._route_key(k) for k in need}
        answers = self.resolver.resolve(keys.values(), self.gateway_budget_s)
        routes: dict[tuple[int, bytes, bytes], Any] = {}
        for k, rk in keys.items():
            gw = answers.get(rk, _UNKNOWN)
            if gw is _UNKNOWN:
                gw = None  # late: the worker looks it up for the next interval
            elif len(routes) < 4096:
                routes[k] = gw
            for c in need[k]:
                c.gateway = gw
        self._routes = routes
        if held:
            held_keys = [route_of(rec) for rec in held]
            self._render(held, [None if k is None else routes.get(k) for k in held_keys])

    def _route_key(self, k: tuple[int, bytes, bytes]) -> Any:
        """The resolver's key for (namespace inode, source bytes, destination bytes)."""
        key = self._route_keys.get(k)
        if key is None:
            from nettracer.net.gateway import RouteKey

            key = self._route_keys[k] = RouteKey.of(k[0], k[2], k[1])
        return key

    def refresh_gateways(self, iv: Interval, wait_s: float = 0.0) -> None:
        """Look up the gateways still missing from ``iv`` (left over by the interval's
        budget), within ``wait_s`` seconds."""
        if self.resolver is None:
            return
        missing = [c for c in (*iv.conns, *iv.closed) if c.gateway is None]
        need = {
            (c.netns, c.saddr_raw, c.daddr_raw): c
            for c in missing
            if c.direction != "local" and c.daddr_raw.strip(b"\0")
        }
        if not need:
            return
        answers = self.resolver.resolve({self._route_key(k) for k in need}, wait_s)
        for c in missing:
            k = (c.netns, c.saddr_raw, c.daddr_raw)
            if k in need:
                c.gateway = answers.get(self._route_key(k))

    def stats(self) -> dict[str, object]:
        """Counters for ``--stats``."""
        t = self.tracer
        out: dict[str, object] = {
            "records": t.records,
            "lost_total": self.table.lost_total,
            "evicted_total": self.table.evicted_total,
            "created_total": self.table.created.total,
            "open": len(self.table.open),
            "refreshes": t.refreshes,
            "overflowed": t.overflowed,
            "sock_diag_errors": self.diag_errors,
            "collect_ms": round(self.last_collect_ms, 3),
            "bytes_source": "sock_length" if t.use_length else "tcp_sock",
            "channel": t.opts.channel,
            "peak_rss_kib": _vm_hwm(),
            "offsets": t.offsets.source,
        }
        if self.resolver is not None:
            out["gateway"] = self.resolver.stats()
        return out


__all__ = [
    "ConnMonitor",
    "ConnTracer",
    "Interval",
]
