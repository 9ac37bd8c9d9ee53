"""BPF ring buffer (``BPF_MAP_TYPE_RINGBUF``, Linux 5.8): the map and its reader.

Programs and tracers use it through :mod:`nettracer.bpf.channel` (reserve, submit,
lost counting); this module is the mechanism underneath.

Layout (kernel/bpf/ringbuf.c): the consumer position page is mapped read-write
at offset 0; the producer position page followed by the data area, mapped twice
back to back so records never wrap, is mapped read-only at offset PAGE_SIZE.
Each record starts with an 8-byte header: ``u32 len`` (bit 31 BUSY, bit 30
DISCARD) and ``u32 pg_off``; records are 8-byte aligned.
"""

from __future__ import annotations

import contextlib
import mmap
import select
import struct
from collections.abc import Callable

from nettracer.bpf.counters import counted, lost_counter
from nettracer.bpf.maps import Map
from nettracer.bpf.syscall import MapType

BUSY = 1 << 31
DISCARD = 1 << 30
HDR = 8


class RingBuf(Map):
    """A ring buffer map of ``size`` bytes (a power of two, multiple of the page size)."""

    def __init__(self, size: int, name: str = "events") -> None:
        page = mmap.PAGESIZE
        size = max(size, page)
        if size & (size - 1):
            raise ValueError(f"ring buffer size must be a power of two, not {size}")
        super().__init__(MapType.RINGBUF, None, None, size, name)


class RingBufReader:
    """Reads records from a :class:`RingBuf` with mmap and epoll.

    ``lost_map`` is the per-CPU u64 array (index 0) that programs increment when
    ``bpf_ringbuf_reserve`` fails; ``lost`` is its sum, so nothing is silently dropped.
    """

    def __init__(self, rb: RingBuf, lost_map: Map | None = None) -> None:
        self.rb = rb
        self.lost_map = lost_map
        page = mmap.PAGESIZE
        self.mask = rb.max_entries - 1
        self._cons = mmap.mmap(
            rb.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
        )
        self._prod = mmap.mmap(
            rb.fd, page + 2 * rb.max_entries, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )
        self._data_off = page
        self._ep = select.epoll()
        self._ep.register(rb.fd, select.EPOLLIN)
        self.records = 0

    def close(self) -> None:
        for res in (self._ep, self._cons, self._prod):
            with contextlib.suppress(OSError, ValueError, BufferError):
                res.close()

    @property
    def lost(self) -> int:
        return 0 if self.lost_map is None else counted(self.lost_map)

    def consume(self, callback: Callable[[memoryview], None]) -> int:
        """Hand every committed record to ``callback`` (a memoryview valid only during the
        call); returns how many."""
        cons = struct.unpack_from("<Q", self._cons, 0)[0]
        n = 0
        view = memoryview(self._prod)
        try:
            while True:
                prod = struct.unpack_from("<Q", self._prod, 0)[0]
                if cons >= prod:
                    break
                off = self._data_off + (cons & self.mask)
                hdr = struct.unpack_from("<I", self._prod, off)[0]
                if hdr & BUSY:
                    break
                length = hdr & ~(BUSY | DISCARD)
                if not hdr & DISCARD:
                    callback(view[off + HDR : off + HDR + length])
                    n += 1
                cons += (length + HDR + 7) & ~7
                struct.pack_into("<Q", self._cons, 0, cons)
        finally:
            view.release()
        self.records += n
        return n

    def poll(self, timeout_s: float, callback: Callable[[memoryview], None]) -> int:
        """Wait up to ``timeout_s`` for data, then consume; returns records handled."""
        n = self.consume(callback)
        if n:
            return n
        self._ep.poll(timeout_s)
        return self.consume(callback)


__all__ = ["BUSY", "DISCARD", "HDR", "RingBuf", "RingBufReader", "lost_counter"]
