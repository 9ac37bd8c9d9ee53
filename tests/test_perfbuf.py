"""The perf event array channel (kernels before 5.8, or ``kernel.without: [ringbuf]``):
records arrive whole and in order, and what a full buffer could not take is counted
exactly (the kernel's ``PERF_RECORD_LOST``), checked by running a program a known
number of times with ``BPF_PROG_TEST_RUN``."""

from __future__ import annotations

import os
import struct

import pytest

from nettracer.bpf.channel import PerfEventChannel, event_channel

pytestmark = pytest.mark.kernel

#: bytes per record: the run's number, then a pattern derived from it
SIZE = 256


def _program(ch: PerfEventChannel):
    """A raw tracepoint program sending one ``SIZE``-byte record built in place: the
    u64 argument 0, then 31 words of ``arg0 * k``."""
    from nettracer.bpf.insn import R0, R1, R6, R7, R8, Program, add64, exit_, ldx, mov64, stx

    p = Program()
    p += mov64(R6, R1)
    ch.reserve(p, R7, SIZE, on_fail="out", scratch_off=-8)
    p += ldx(8, R8, R6, 0)
    p += [stx(8, R7, 0, R8), mov64(R1, R8)]
    for k in range(1, SIZE // 8):
        p += [add64(R1, R8), stx(8, R7, 8 * k, R1)]
    ch.submit(p, R7, ctx=R6, size=SIZE, scratch_off=-8)
    p.label("out")
    p += [mov64(R0, 0), exit_()]
    return p


def _run(ch: PerfEventChannel, size: int, runs: list[int]) -> tuple[list[int], int]:
    """Send one record per value of ``runs``, then one more after draining (a full buffer
    reports its losses with the next record it takes); the values received and lost."""
    from nettracer.bpf import prog

    got: list[int] = []
    # one CPU: each CPU has its own buffer, and records of two are not ordered between
    # them (a test process moved to the other CPU mid-run read 1..k after k+1..100)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})

    def take(view: memoryview) -> None:
        words = struct.unpack_from(f"<{SIZE // 8}Q", view)
        assert all(words[k] == words[0] * (k + 1) for k in range(len(words))), words[:4]
        got.append(words[0])

    try:
        with ch.open(size) as reader:
            p = prog.load(_program(ch).insns, maps=reader.maps, name="t_perf")
            with p:
                for v in runs:
                    p.test_run((v,))
                reader.consume(take)
                p.test_run((0,))
                reader.poll(1.0, take)
            return got, reader.lost
    finally:
        os.sched_setaffinity(0, cpus)


def test_records_arrive_whole_and_in_order() -> None:
    ch = event_channel("ev", "lost", "perf_event_array")
    assert isinstance(ch, PerfEventChannel)
    got, lost = _run(ch, 1 << 18, list(range(1, 101)))
    assert got == [*range(1, 101), 0] and lost == 0


def test_full_buffer_losses_are_counted_exactly() -> None:
    """One page per CPU holds about 15 records of 264 bytes: of 300 sent on one CPU
    most are lost, and received + lost is exactly what was sent."""
    ch = event_channel("ev", "lost", "perf_event_array")
    got, lost = _run(ch, 4096, list(range(1, 301)))
    assert lost > 0 and got[-1] == 0
    assert len(got) + lost == 301
    assert got[:-1] == sorted(got[:-1])  # in order, the lost ones missing
