"""Perf event array (``BPF_MAP_TYPE_PERF_EVENT_ARRAY``, Linux 4.4): the event channel of
kernels without a BPF ring buffer (before 5.8), and its reader.

One perf buffer per CPU: a ``PERF_COUNT_SW_BPF_OUTPUT`` software event opened on that
CPU (``perf_event_open``, pid -1), its fd stored at the CPU's index of the map, and
``1 + 2^n`` pages mapped: the ``struct perf_event_mmap_page`` (``data_head`` at 1024,
``data_tail`` at 1032, include/uapi/linux/perf_event.h), then the data area, in which
records may wrap around. ``bpf_perf_event_output(ctx, &map, BPF_F_CURRENT_CPU, data,
size)`` writes a ``PERF_RECORD_SAMPLE`` (``struct perf_event_header`` then ``u32 size``
and the raw data, padded to 8 bytes) to the buffer of the CPU it runs on; when that
buffer is full the kernel counts the record and later writes a ``PERF_RECORD_LOST``
(``u64 id, u64 lost``), which the reader adds to :attr:`PerfBufReader.lost`.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import select
import struct
from collections.abc import Callable

from nettracer.bpf import syscall
from nettracer.bpf.fd import FdObject
from nettracer.bpf.maps import Map
from nettracer.bpf.ringbuf import RingBufReader
from nettracer.bpf.syscall import MapType

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
#: ``bpf_perf_event_output`` flags: the buffer of the CPU the program runs on
BPF_F_CURRENT_CPU = 0xFFFFFFFF
_DATA_HEAD, _DATA_TAIL = 1024, 1032


def online_cpus() -> list[int]:
    """The online CPUs (``/sys/devices/system/cpu/online``, e.g. ``0-1,4``)."""
    with open("/sys/devices/system/cpu/online") as f:
        text = f.read().strip()
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


class PerfEventArray(Map):
    """A perf event array with one slot per possible CPU."""

    def __init__(self, name: str = "events") -> None:
        from nettracer.bpf.maps import possible_cpus

        super().__init__(
            MapType.PERF_EVENT_ARRAY, ctypes.c_uint32, ctypes.c_uint32, possible_cpus(), name
        )


class _CpuBuffer(FdObject):
    """One CPU's ``PERF_COUNT_SW_BPF_OUTPUT`` event and its mapped buffer."""

    kind = "perf_event"

    def __init__(self, cpu: int, pages: int) -> None:
        attr = syscall.PerfEventAttr(
            type=PERF_TYPE_SOFTWARE,
            config=PERF_COUNT_SW_BPF_OUTPUT,
            sample_period=1,
            sample_type=syscall.PERF_SAMPLE_RAW,
            wakeup_events=1,
        )
        super().__init__(syscall.perf_event_open(attr, -1, cpu))
        self.page = mmap.PAGESIZE
        self.size = pages * self.page
        try:
            self.mem = mmap.mmap(self.fd, self.page + self.size, mmap.MAP_SHARED)
        except BaseException:
            super().close()
            raise

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.mem.close()
        super().close()

    def read(self, callback: Callable[[memoryview], None]) -> tuple[int, int]:
        """Hand each sample's raw data to ``callback``; returns (samples, lost)."""
        head = struct.unpack_from("<Q", self.mem, _DATA_HEAD)[0]
        tail = struct.unpack_from("<Q", self.mem, _DATA_TAIL)[0]
        n = lost = 0
        while tail < head:
            rtype, _misc, size = struct.unpack("<IHH", self._bytes(tail, 8))
            if rtype == PERF_RECORD_SAMPLE:
                body = self._bytes(tail + 8, size - 8)
                (raw,) = struct.unpack_from("<I", body, 0)
                with memoryview(body) as view:
                    callback(view[4 : 4 + raw])
                n += 1
            elif rtype == PERF_RECORD_LOST:
                lost += struct.unpack_from("<Q", self._bytes(tail + 16, 8), 0)[0]
            tail += size
        struct.pack_into("<Q", self.mem, _DATA_TAIL, tail)
        return n, lost

    def _bytes(self, pos: int, length: int) -> bytes:
        """``length`` bytes of the data area from ring position ``pos`` (wrapping)."""
        start = pos % self.size
        first = min(length, self.size - start)
        out = self.mem[self.page + start : self.page + start + first]
        if first < length:
            out += self.mem[self.page : self.page + length - first]
        return out


class PerfBufReader:
    """The per-CPU buffers behind a :class:`PerfEventArray`, read with epoll.

    ``size`` bytes are shared out among the online CPUs (each buffer a power of two
    pages); ``lost_records`` counts the samples the kernel could not write (full buffers).
    """

    def __init__(self, array: PerfEventArray, size: int) -> None:
        cpus = online_cpus()
        pages = 1
        while pages * 2 * mmap.PAGESIZE * len(cpus) <= size:
            pages *= 2
        self.buffers: list[_CpuBuffer] = []
        self._ep = select.epoll()
        self.records = 0
        self.lost_records = 0
        try:
            for cpu in cpus:
                buf = _CpuBuffer(cpu, pages)
                self.buffers.append(buf)
                array.update(cpu, buf.fd)
                syscall.ioctl(buf.fd, syscall.PERF_EVENT_IOC_ENABLE, 0)
                self._ep.register(buf.fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise

    def consume(self, callback: Callable[[memoryview], None]) -> int:
        """Hand every sample now in the buffers to ``callback``; returns how many."""
        n = 0
        for buf in self.buffers:
            got, lost = buf.read(callback)
            n += got
            self.lost_records += lost
        self.records += n
        return n

    #: wait up to ``timeout_s`` for samples, then :meth:`consume` them (the ring
    #: buffer reader's, which uses only ``consume`` and ``_ep``)
    poll = RingBufReader.poll

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._ep.close()
        for buf in self.buffers:
            buf.close()
        self.buffers.clear()


__all__ = ["BPF_F_CURRENT_CPU", "PerfBufReader", "PerfEventArray", "online_cpus"]
