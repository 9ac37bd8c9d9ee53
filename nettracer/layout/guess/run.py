"""The offset guesser: every catalogue field from kernel memory, without BTF and
without kprobes, in a handful of round trips.

How it beats the classic one-offset-per-round-trip state machine:

1. the programs (:mod:`nettracer.layout.guess.probes`) are loaded and attached in this
   thread while a second one (:class:`nettracer.layout.guess.traffic.TrafficThread`) builds
   two private network namespaces, a veth pair between them and a few dozen sockets
   whose every address, port, state, counter and namespace it knows;
2. one round of traffic: a ``recv(MSG_PEEK|MSG_DONTWAIT)`` on every socket (the kernel
   copies 4 KiB of its ``struct sock`` and 512 bytes behind each pointer in its first
   256 bytes) and one marked UDP datagram through each device (the kernel copies the
   ``sk_buff``, 256 bytes behind each of its pointers and the ``net_device``);
3. user space (:mod:`nettracer.layout.guess.analysis`) searches all offsets at once
   and keeps a field only when a single offset agrees with every observation and the
   observations disagree on the value. Values that move (RTT, counters) are only used
   when ``TCP_INFO`` read before and after the snapshot is unchanged.

Fields still unresolved after a round get another round (fresh sockets) while time
remains; what is left is reported with the reason, never defaulted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nettracer.errors import NettracerError
from nettracer.layout.catalogue import CATALOGUE
from nettracer.layout.guess.analysis import analyse
from nettracer.layout.guess.netns import PrivateNet
from nettracer.layout.guess.probes import (
    TRACEPOINTS,
    Deref,
    ProbeSet,
    ProbeSpec,
    Record,
    Snapshot,
    Via,
    require_root,
)
from nettracer.layout.guess.traffic import RoundLog, Traffic, TrafficThread
from nettracer.layout.guess.verdicts import Verdict
from nettracer.layout.offsets import Field, Offsets

DEFAULT_TIMEOUT_MS = 2000
MAX_ROUNDS = 4

SOCK = (Snapshot("sk", 4096),)
SOCK_DEREF = Deref(0, 32, 512)  # every pointer in the first 256 bytes (sock_common)

#: Linux 6.3+: every socket shows itself on recv()
SOCK_RECV = ProbeSpec(1, "sock_recv_length", SOCK, SOCK_DEREF, required=False)
#: the sk_buff, 256 bytes behind each of its first 48 slots, and the net_device
START_XMIT = ProbeSpec(
    2, "net_dev_start_xmit", (Snapshot("skb", 512), Snapshot("dev", 4096)), Deref(0, 48, 256)
)
#: the same sk_buff after eth_type_trans() pulled the Ethernet header: len == IP length
NETIF_RX = ProbeSpec(7, "netif_rx", (Snapshot("skb", 512),))
#: the classic tracepoint's record (before 4.17, or kernel.without raw_tracepoint) has
#: ``skbaddr`` but no ``dev``: 384 bytes behind each slot of the sk_buff show which one
#: points to a device of ours by its name (``net_device.name`` is at 280 on 6.18, at 0
#: before 6.8); once a round has found sk_buff.dev and sk_buff.sk, later rounds copy the
#: net_device and the sender's struct sock from behind them
VIA_DEV, VIA_SK = Via("dev", "skb", 0), Via("sk", "skb", 1)
START_XMIT_CLASSIC = ProbeSpec(
    2,
    "net_dev_start_xmit",
    (Snapshot("skb", 512), Snapshot("dev", 4096), Snapshot("sk", 4096)),
    Deref(0, 48, 384),
    via=(VIA_DEV, VIA_SK),
)
#: the catalogue field whose offset each :class:`Via` slot takes
VIA_FIELDS = {VIA_DEV.slot: "sk_buff.dev", VIA_SK.slot: "sk_buff.sk"}
#: before Linux 6.3: TCP sockets show up in tcp_rcv_space_adjust (MSG_PEEK with data
#: waiting) and inet_sock_set_state, datagram sockets when their receive queue overflows
FALLBACK: tuple[ProbeSpec, ...] = (
    ProbeSpec(3, "tcp_rcv_space_adjust", SOCK, SOCK_DEREF, required=False),
    ProbeSpec(4, "udp_fail_queue_rcv_skb", SOCK, SOCK_DEREF),
    ProbeSpec(5, "sock_rcvqueue_full", SOCK, SOCK_DEREF),
    ProbeSpec(6, "inet_sock_set_state", SOCK, SOCK_DEREF, required=False),
)


class GuessTimeout(NettracerError):
    """The guess did not finish within ``offsets.guess_timeout_ms``."""


class RoundFailed(NettracerError):
    """A round of traffic could not be made (a socket call failed)."""


@dataclass
class GuessResult:
    """What :func:`guess` found, with how it went."""

    offsets: Offsets
    rounds: int
    fallback: bool
    notes: list[str] = field(default_factory=list)
    #: inodes of the private namespaces used (gone by the time this is returned)
    netns_inodes: tuple[int, ...] = ()
    #: names of the devices made in them
    devices: tuple[str, ...] = ()


class _Sync:
    """Hand-over between the loading thread and the traffic thread."""

    def __init__(self) -> None:
        self.mode = threading.Event()
        self.fallback = False
        self.ready = threading.Event()
        self.cancel = threading.Event()

    def wait(self, event: threading.Event) -> None:
        while not event.wait(0.002):
            if self.cancel.is_set():
                raise GuessTimeout("cancelled")


def _attach(ps: ProbeSet, sync: _Sync, force_fallback: bool) -> None:
    modern = not force_fallback and ps.add(SOCK_RECV)
    sync.fallback = not modern
    sync.mode.set()
    ps.add(START_XMIT if ps.raw else START_XMIT_CLASSIC)
    ps.add(NETIF_RX)
    if not modern:
        for spec in FALLBACK:
            ps.add(spec)
    sync.ready.set()


def _round(net: PrivateNet, arm: Callable[[int], None], sync: _Sync) -> RoundLog:
    """One round of traffic (runs in the traffic thread). On Linux 6.3+ the sockets are
    built while the programs are still being attached; nothing is recorded before."""

    def guarded(step: int) -> None:
        if sync.cancel.is_set():
            raise GuessTimeout("cancelled")
        arm(step)

    sync.wait(sync.mode)
    t = Traffic(net, guarded, sync.fallback)
    try:
        if not sync.fallback:
            t.build()
        sync.wait(sync.ready)
        if sync.fallback:
            t.build()
        t.markers()
        t.probes()
        return t.log
    except OSError as exc:
        raise RoundFailed(f"the guessing traffic failed: {exc}") from None
    finally:
        arm(0)
        t.close()


@dataclass
class _Rounds:
    """What the rounds so far found: the best verdict per field, notes, the last log."""

    verdicts: dict[str, Verdict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    count: int = 0
    log: RoundLog = field(default_factory=RoundLog)

    def merge(self, got: dict[str, Verdict]) -> None:
        """Keep a resolved verdict; replace an unresolved one with this round's."""
        for key, v in got.items():
            if not (key in self.verdicts and self.verdicts[key].ok):
                self.verdicts[key] = v
                if not v.ok:
                    self.notes.append(f"round {self.count}: {key} unresolved: {v.why}")

    def done(self, hidden: frozenset[str] = frozenset()) -> bool:
        """Every field resolved but the ``hidden`` ones (no probe shows them), or the
        last round made."""
        pending = [v for k, v in self.verdicts.items() if k not in hidden and not v.ok]
        return not pending or self.count >= MAX_ROUNDS


def _run_rounds(
    ps: ProbeSet,
    worker: TrafficThread,
    resubmit: Callable[[], None],
    timeout_ms: int,
    remaining: Callable[[], float],
) -> _Rounds:
    """Collect the rounds the traffic thread makes (the first one already submitted)
    until every field is resolved, :data:`MAX_ROUNDS` or a quarter of the time is left."""
    rs = _Rounds()
    hidden = frozenset(k for tp in ps.missing for k in ONLY_FROM.get(tp, ((), ""))[0])
    while True:
        rs.count += 1
        records: list[Record] = []
        try:
            rs.log = _await_round(ps, worker, remaining, records)
        except TimeoutError:
            raise _timeout(timeout_ms, f"round {rs.count} of traffic") from None
        except RoundFailed as exc:
            rs.notes.append(f"round {rs.count}: {exc}")
            if rs.count >= MAX_ROUNDS or remaining() < 0.25 * timeout_ms / 1000:
                raise
            ps.drain(lambda r: None)
            resubmit()
            continue
        ps.drain(records.append)
        got, round_notes = analyse(rs.log, records)
        rs.notes += [f"round {rs.count}: {n}" for n in round_notes]
        if ps.lost:
            rs.notes.append(f"round {rs.count}: {ps.lost} records did not fit the event channel")
        rs.merge(got)
        if rs.done(hidden) or remaining() < 0.25 * timeout_ms / 1000:
            return rs
        _point(ps, rs.verdicts)
        resubmit()


def _point(ps: ProbeSet, verdicts: dict[str, Verdict]) -> None:
    """Tell the programs each :class:`Via` slot's offset that a round has found."""
    for slot, key in VIA_FIELDS.items():
        v = verdicts.get(key)
        if v is not None and v.ok and v.offset is not None:
            ps.point(slot, v.offset)


def _await_round(
    ps: ProbeSet, worker: TrafficThread, remaining: Callable[[], float], records: list[Record]
) -> RoundLog:
    """The log of the round under way, its records taken out of the event channel while
    it runs: a round writes megabytes, more than a perf event array's per-CPU buffer
    (kernels before 5.8) holds. TimeoutError when the time is up first."""
    while True:
        try:
            return worker.result(0.0)  # type: ignore[return-value]
        except TimeoutError:
            if remaining() <= 0:
                raise
        ps.drain(records.append, wait_s=min(0.005, remaining()))


#: fields only an optional tracepoint shows, and how: said instead of "not observed"
#: where the kernel lacks it (tcp_rcv_space_adjust came in 4.20, after raw tracepoints)
ONLY_FROM = {
    "tcp_rcv_space_adjust": (
        tuple(f.key for f in CATALOGUE if f.struct == "tcp_sock"),
        "the snapshot of a TCP socket whose TCP_INFO is known comes from recv() hitting it",
    ),
}


def _explain_absent(verdicts: dict[str, Verdict], missing: list[str], notes: list[str]) -> None:
    """One note, and the reason of each field, for what a missing tracepoint hides."""
    for tracepoint in missing:
        keys, how = ONLY_FROM.get(tracepoint, ((), ""))
        lost = [k for k in keys if not verdicts.get(k, Verdict(None, "", 0)).ok]
        if not lost:
            continue
        since = TRACEPOINTS[tracepoint].since
        why = f"this kernel has no tracepoint {tracepoint} (Linux {since}): {how}"
        notes.insert(0, f"not guessed: {', '.join(lost)}: {why}")
        for key in lost:
            verdicts[key] = Verdict(None, why, 0)


def _offsets(verdicts: dict[str, Verdict]) -> Offsets:
    """Every catalogue field: its offset where resolved, else why not."""
    out = Offsets(source="guess")
    for spec in CATALOGUE:
        v = verdicts.get(spec.key)
        if v is not None and v.ok and v.offset is not None:
            out.fields[spec.key] = Field(v.offset, spec.size)
        else:
            out.unresolved[spec.key] = v.why if v is not None else "not observed"
    return out


def guess(timeout_ms: int = DEFAULT_TIMEOUT_MS, force_fallback: bool = False) -> GuessResult:
    """Guess every catalogue field on the running kernel (see the module docstring).

    Raises :class:`nettracer.errors.PermissionError_` when not root,
    :class:`nettracer.errors.NotSupported` without a tracepoint it needs,
    :class:`nettracer.layout.guess.netns.NamespaceError` when the private namespaces
    cannot be made and :class:`GuessTimeout` after ``timeout_ms``; in every case nothing
    stays attached and the namespaces are gone. ``force_fallback`` uses the pre-6.3
    tracepoints even where ``sock_recv_length`` exists (to test that path).
    """
    require_root()
    start = time.perf_counter()
    deadline = start + timeout_ms / 1000

    def remaining() -> float:
        return deadline - time.perf_counter()

    sync = _Sync()
    probes: list[ProbeSet] = []
    worker = TrafficThread()

    def arm(step: int) -> None:
        if step:
            probes[0].arm(worker.tid, step)
        elif probes:
            probes[0].disarm()

    def resubmit() -> None:
        worker.submit(_round, arm, sync)

    worker.start()
    resubmit()
    try:
        ps = ProbeSet()
        probes.append(ps)
        _attach(ps, sync, force_fallback)
        if remaining() <= 0:  # attaching can wait for RCU grace periods
            raise _timeout(timeout_ms, "loading and attaching the programs")
        rs = _run_rounds(ps, worker, resubmit, timeout_ms, remaining)
        _explain_absent(rs.verdicts, ps.missing, rs.notes)
        if ps.lacking:
            rs.notes.insert(
                0,
                f"classic tracepoints without the socket pointer: {', '.join(ps.lacking)}; "
                f"datagram sockets are seen behind skb->sk instead",
            )
        out = _offsets(rs.verdicts)
        out.elapsed_ms = (time.perf_counter() - start) * 1e3
        return GuessResult(
            out,
            rs.count,
            sync.fallback,
            rs.notes,
            tuple(rs.log.netns_inode.values()),
            tuple(d.name for d in rs.log.devices.values() if d.name != "lo"),
        )
    finally:
        sync.cancel.set()
        for ps in probes:
            ps.close()
        worker.stop()


def guess_offsets(timeout_ms: int = DEFAULT_TIMEOUT_MS) -> Offsets:
    """:func:`guess`, the offsets only."""
    return guess(timeout_ms).offsets


def _timeout(timeout_ms: int, during: str) -> GuessTimeout:
    return GuessTimeout(
        f"guessing offsets timed out after {timeout_ms} ms ({during}); raise "
        f"offsets.guess_timeout_ms or use offsets.source btf",
        setting=("offsets.guess_timeout_ms", "offsets.source"),
    )
