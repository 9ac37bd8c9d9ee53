"""The user-space connection table: deltas between intervals, closed connections reported
once, and exact accounting of what the kernel's LRU map evicted.

Every entry the programs create gets an id from a kernel counter (``ids[0]``, fetched
and incremented atomically), so the ids are dense: ``0 .. created-1``.  At each interval
the tracer reads the counter *first* (``created``), then walks the map (``live``), then
drains the ring buffer (``closed``).  An entry that left the map by any way but LRU
eviction left a record in the ring buffer before it was deleted, so after the drain:

* an id below ``created`` that was never seen (not live, never closed) was evicted
  before any walk saw it;
* an id that was live at the previous walk and is neither live nor closed now was
  evicted since.

Records that did not fit in the ring buffer (``lost``, counted by the programs) look
the same, so ``evicted`` is what is missing minus what was lost.  Nothing is silent.

Before Linux 5.12 there is no atomic fetch-and-add (``BPF_FETCH``); the programs then
count per *stream* instead, a CPU and the nesting level of the program on it (task,
softirq, hardirq, NMI), and an id is ``seq << STREAM_BITS | stream``
(:data:`STREAM_BITS`): dense per stream, so the same accounting holds stream by stream.
:class:`IdCounts` holds the counters; the single counter is the case of one stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from nettracer.tracers.conns.model import Conn


class IdCounts:
    """How many ids each stream has handed out: ``counts[stream]``; an id is
    ``seq << bits | stream`` (``bits`` 0: the one dense counter ``0 .. n-1``)."""

    __slots__ = ("bits", "counts")

    def __init__(self, counts: dict[int, int] | int = 0, bits: int = 0) -> None:
        self.counts = {0: counts} if isinstance(counts, int) else dict(counts)
        self.bits = bits

    def __repr__(self) -> str:
        return f"IdCounts({self.counts!r}, bits={self.bits})"

    def has(self, cid: int) -> bool:
        """Id ``cid`` was handed out before these counts were read."""
        mask = (1 << self.bits) - 1
        return cid >> self.bits < self.counts.get(cid & mask, 0)

    def partition(self, ids: list[int], before: IdCounts) -> tuple[list[int], list[int]]:
        """(the ``ids`` handed out by these counts and not by ``before``, the ``ids`` not
        handed out by these counts): :meth:`has` for many ids, with one compare per id
        for the dense counter (``bits`` 0; tens of thousands of ids an interval)."""
        if self.bits == 0 and before.bits == 0:
            n, lo = self.counts.get(0, 0), before.counts.get(0, 0)
            return [i for i in ids if lo <= i < n], [i for i in ids if i >= n]
        new = [i for i in ids if self.has(i) and not before.has(i)]
        return new, [i for i in ids if not self.has(i)]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def union(self, other: IdCounts) -> IdCounts:
        """Stream by stream the larger count (a counter never goes back)."""
        keys = self.counts.keys() | other.counts.keys()
        merged = {k: max(self.counts.get(k, 0), other.counts.get(k, 0)) for k in keys}
        return IdCounts(merged, other.bits)


@dataclass
class Interval:
    """What one interval reports."""

    conns: list[Conn]
    closed: list[Conn]
    #: entries the kernel LRU map evicted during this interval (or dropped for the
    #: user-space bound)
    evicted: int
    #: records lost because the ring buffer was full during this interval
    lost: int
    #: closed connections already rendered for output (never seen open, no gateway)
    closed_text: list[str] = field(default_factory=list)


@dataclass
class ConnTable:
    """Open connections by id, with the id accounting described in the module docstring.

    ``max_conns`` bounds the open table and the closed connections kept per interval;
    what does not fit is counted as evicted.
    """

    max_conns: int
    open: dict[int, Conn] = field(default_factory=dict)
    created: IdCounts = field(default_factory=IdCounts)
    lost_total: int = 0
    evicted_total: int = 0
    #: ids not yet in ``created`` already seen (created after the counter was read)
    _early: set[int] = field(default_factory=set)

    def update(
        self,
        created: IdCounts | int,
        live: list[Conn],
        closed: list[Conn],
        lost_total: int,
        seen: Iterable[int] = (),
    ) -> Interval:
        """Account one interval: ``created`` the id counter read before the walk,
        ``live`` the map's entries, ``closed`` the ring buffer's records since the last
        update (including entries user space expired), ``lost_total`` the lost counter,
        ``seen`` the ids of more closed connections (never seen open) reported elsewhere."""
        if isinstance(created, int):
            created = IdCounts(created)
        seen_new = {i for i in self._early if created.has(i)}
        early = {i for i in self._early if not created.has(i)}
        new, later = created.partition(list(seen), self.created)
        seen_new.update(new)
        early.update(later)
        closed_ids = set()
        reported_closed: list[Conn] = []
        for c in closed:
            if c.id in closed_ids:
                continue  # the same record twice cannot happen, but never report twice
            closed_ids.add(c.id)
            self._carry(c, self.open.pop(c.id, None))
            self._see(c.id, created, seen_new, early)
            reported_closed.append(c)
        live_now: dict[int, Conn] = {}
        for c in live:
            if c.id in closed_ids:
                continue  # closed after the walk: reported as closed only
            self._carry(c, self.open.get(c.id))
            self._see(c.id, created, seen_new, early)
            live_now[c.id] = c
        vanished = sum(1 for i in self.open if i not in live_now)
        never_seen = max(0, created.total - self.created.total) - len(seen_new)
        missing = vanished + never_seen
        lost = max(0, lost_total - self.lost_total)
        evicted = max(0, missing - lost)
        # the user-space bound
        conns = sorted(live_now.values(), key=lambda c: c.id)
        if len(conns) > self.max_conns:
            evicted += len(conns) - self.max_conns
            conns = conns[-self.max_conns :]
        if len(reported_closed) > self.max_conns:
            evicted += len(reported_closed) - self.max_conns
            reported_closed = reported_closed[: self.max_conns]
        self.open = {c.id: c for c in conns}
        self.created = self.created.union(created)
        self._early = early
        self.lost_total = max(self.lost_total, lost_total)
        self.evicted_total += evicted
        return Interval(conns=conns, closed=reported_closed, evicted=evicted, lost=lost)

    @staticmethod
    def _carry(c: Conn, prev: Conn | None) -> None:
        """``c`` continues ``prev`` (the same id at the last interval): its delta starts
        from ``prev``'s counters and it keeps ``prev``'s gateway when it has none."""
        if prev is not None:
            c.prev = prev.counters()
            c.gateway = c.gateway or prev.gateway

    def _see(self, cid: int, created: IdCounts, seen_new: set[int], early: set[int]) -> None:
        if not created.has(cid):
            early.add(cid)
        elif not self.created.has(cid):
            seen_new.add(cid)
