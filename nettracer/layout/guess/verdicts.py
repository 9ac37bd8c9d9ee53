"""Verdicts: the rule that makes a guessed offset trustworthy.

An *observation* is a snapshot of one struct (bytes copied by the kernel) together
with what the guesser knows about that object (a socket's address, ``TCP_INFO``, a
device's ifindex), as :mod:`nettracer.layout.guess.matchers` matchers. For each field,
each observation yields the set of offsets where its expected value is found; a field
is resolved only when

* at least two observations disagree on the expected value (a value that never
  changes cannot be told apart from a constant that happens to equal it), and
* exactly one offset is in the intersection of all observations' sets.

Anything else is *unresolved*, with the reason; there is no "best guess".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nettracer.layout.guess.matchers import Matcher


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
