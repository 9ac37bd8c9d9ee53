"""Matchers: what one struct field is expected to hold, and where in a snapshot (the
bytes the kernel copied) such a value sits.

:class:`Exact` is a byte pattern (``u16``/``be16``/``u32``/``u64`` build the usual
ones); :class:`Shifted` is a u32 that ``TCP_INFO`` reports shifted right. The rule
that turns the offsets they find into an answer is in
:mod:`nettracer.layout.guess.verdicts`.
"""

from __future__ import annotations

import struct
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
