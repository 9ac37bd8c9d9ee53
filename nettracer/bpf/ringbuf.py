"""BPF ring buffer (``BPF_MAP_TYPE_RINGBUF``, Linux 5.8): map, reader and the
program-side snippet that counts what did not fit.

Layout (kernel/bpf/ringbuf.c): the consumer position page is mapped read-write
at offset 0; the producer position page followed by the data area, mapped twice
back to back so records never wrap, is mapped read-only at offset PAGE_SIZE.
Each record starts with an 8-byte header: ``u32 len`` (bit 31 BUSY, bit 30
DISCARD) and ``u32 pg_off``; records are 8-byte aligned.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import select
import struct
from collections.abc import Callable

from nettracer.bpf.helpers import Helper
from nettracer.bpf.insn import (
    FP,
    R0,
    R1,
    R2,
    R3,
    Insn,
    Reg,
    add64,
    atomic_add,
    call,
    ja,
    jne,
    ld_map_fd,
    mov64,
    st,
)
from nettracer.bpf.maps import Map, percpu_array
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
        if self.lost_map is None:
            return 0
        v = self.lost_map.lookup(0, 0)
        return sum(v) if isinstance(v, list) else int(v)

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


def lost_counter(name: str = "lost") -> Map:
    """The per-CPU u64 counter (index 0) for records that did not fit."""
    return percpu_array(ctypes.c_uint64, 1, name)


def reserve(
    dst: Reg, ringbuf: str, size: int, lost: str, on_fail: str, scratch_off: int = -8
) -> list[Insn]:
    """``dst = bpf_ringbuf_reserve(&ringbuf, size, 0)``; on NULL, ``lost[0] += 1`` and jump
    to ``on_fail``. Clobbers R0-R5; uses ``*(u32 *)(fp + scratch_off)`` as the key."""
    ok = f"__rb_ok_{ringbuf}_{id(dst)}_{scratch_off}_{size}"
    return [
        ld_map_fd(R1, ringbuf),
        mov64(R2, size),
        mov64(R3, 0),
        call(Helper.ringbuf_reserve),
        jne(R0, 0, ok),
        st(4, FP, scratch_off, 0),
        ld_map_fd(R1, lost),
        mov64(R2, FP),
        add64(R2, scratch_off),
        call(Helper.map_lookup_elem),
        jne(R0, 0, f"{ok}_inc"),
        ja(on_fail),
        mov64(R1, 1).at(f"{ok}_inc"),
        atomic_add(8, R0, 0, R1),
        ja(on_fail),
        mov64(dst, R0).at(ok),
    ]
