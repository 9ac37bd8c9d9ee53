"""Finding a field in struct snapshots: every offset where an expected value sits, in
every observation, and the rule that makes an answer trustworthy.

An *observation* is a snapshot of one struct (bytes copied by the kernel) together
with what the guesser knows about that object (a socket's address, ``TCP_INFO``, a
device's ifindex). For each field, each observation yields the set of offsets where
its expected value is found; a field is resolved only when

* at least two observations disagree on the expected value (a value that never
  changes cannot be told apart from a constant that happens to equal it), and
* exactly one offset is in the intersection of all observations' sets.

Anything else is *unresolved*, with the reason; there is no "best guess".
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class Matcher:
    """What one observation expects a field to hold; :meth:`offsets` finds it."""

    size: int
    align: int

    def offsets(self, buf: bytes, limit: int | None = None) -> set[int]:
        raise NotImplementedError

    def matches(self, buf: bytes, off: int) -> bool:
        """Whether the expected value sits at ``off`` in ``buf``."""
        raise NotImplementedError

    def rarity(self) -> int:
        """Higher for values less likely to appear by chance (searched first)."""
        return 0

    def key(self) -> object:
        """Identity of the expected value, for the "at least two values" rule."""
        raise NotImplementedError


@dataclass(frozen=True)
class Exact(Matcher):
    """The field's bytes equal ``pattern`` (at an offset that is a multiple of ``align``)."""

    pattern: bytes
    align: int = 1

    @property
    def size(self) -> int:  # type: ignore[override]
        return len(self.pattern)

    def offsets(self, buf: bytes, limit: int | None = None) -> set[int]:
        end = len(buf) if limit is None else min(len(buf), limit)
        out = set()
        i = buf.find(self.pattern, 0, end)
        while i >= 0:
            if i % self.align == 0:
                out.add(i)
            i = buf.find(self.pattern, i + 1, end)
        return out

    def matches(self, buf: bytes, off: int) -> bool:
        return buf[off : off + len(self.pattern)] == self.pattern

    def rarity(self) -> int:
        """How unlikely a chance hit is (long patterns with few zero bytes search first)."""
        return len(self.pattern) * 4 - self.pattern.count(0) * 3

    def key(self) -> object:
        return self.pattern


def u16(v: int) -> Exact:
    return Exact(struct.pack("<H", v), 2)


def be16(v: int) -> Exact:
    return Exact(struct.pack(">H", v), 2)


def u32(v: int) -> Exact:
    return Exact(struct.pack("<I", v & 0xFFFFFFFF), 4)


def u64(v: int) -> Exact:
    return Exact(struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF), 8)


@dataclass(frozen=True)
class Shifted(Matcher):
    """A u32 field ``f`` with ``f >> shift == value``: how ``TCP_INFO`` reports
    ``tcp_sock.srtt_us`` (``tcpi_rtt = srtt_us >> 3``) and ``mdev_us``
    (``tcpi_rttvar = mdev_us >> 2``)."""

    value: int
    shift: int
    size: int = 4
    align: int = 4

    def offsets(self, buf: bytes, limit: int | None = None) -> set[int]:
        n = (len(buf) if limit is None else min(len(buf), limit)) // 4
        words = memoryview(buf)[: 4 * n].cast("I")
        lo, hi = self.value << self.shift, (self.value + 1) << self.shift
        return {4 * i for i, w in enumerate(words) if lo <= w < hi}

    def matches(self, buf: bytes, off: int) -> bool:
        if off + 4 > len(buf):
            return False
        return self.value == struct.unpack_from("<I", buf, off)[0] >> self.shift

    def rarity(self) -> int:
        return 8 if self.value else 0

    def key(self) -> object:
        return (self.value, self.shift)


@dataclass
class Observation:
    """One snapshot and what is expected in it, field by field."""

    buf: bytes
    expect: dict[str, Matcher]
    what: str = ""


@dataclass(frozen=True)
class Verdict:
    """``offset`` when resolved, else ``why``; ``n`` observations were used."""

    offset: int | None
    why: str
    n: int
    values: int = 0

    @property
    def ok(self) -> bool:
        return self.offset is not None


def _fmt(offsets: Iterable[int], limit: int = 6) -> str:
    s = sorted(offsets)
    text = ", ".join(str(o) for o in s[:limit])
    return text + (", ..." if len(s) > limit else "")


def decide(key: str, candidates: Sequence[set[int]], values: set[object]) -> Verdict:
    """Apply the uniqueness rule to per-observation candidate sets."""
    n = len(candidates)
    if n == 0:
        return Verdict(None, "no observation of this field", 0)
    if len(values) < 2:
        return Verdict(
            None,
            f"all {n} observations expected the same value; it cannot be told apart "
            f"from a constant",
            n,
            len(values),
        )
    common = set(candidates[0])
    for c in candidates[1:]:
        common &= c
        if not common:
            break
    if not common:
        return Verdict(None, f"no offset matches all {n} observations", n, len(values))
    if len(common) > 1:
        return Verdict(
            None,
            f"ambiguous: offsets {_fmt(common)} match all {n} observations",
            n,
            len(values),
        )
    return Verdict(next(iter(common)), "", n, len(values))


def resolve(key: str, observations: Iterable[Observation], limit: int | None = None) -> Verdict:
    """Resolve ``key`` from every observation that expects something of it; offsets are
    searched below ``limit`` (the whole snapshot by default).

    The rarest expected value is searched in full; every other observation only checks
    the offsets still in the running, which is what keeps this fast."""
    pairs = [(obs.expect[key], obs.buf) for obs in observations if key in obs.expect]
    if not pairs:
        return decide(key, [], set())
    values = {m.key() for m, _ in pairs}
    pairs.sort(key=lambda p: -p[0].rarity())
    first, buf = pairs[0]
    common = first.offsets(buf, limit)
    for m, b in pairs[1:]:
        if not common:
            break
        common = {o for o in common if m.matches(b, o)}
    return decide(key, [common] * len(pairs), values)
