"""The shared in-kernel pieces of :mod:`nettracer.bpf`: labels, atomics, the read
emitter, the count/lost snippet and the event channel (listings: no root needed;
behaviour: on the running kernel)."""

from __future__ import annotations

import ctypes
import time

import pytest
from golden import check_golden

from nettracer.bpf.counters import count_in_hash, lost_inc
from nettracer.bpf.helpers import Helper
from nettracer.bpf.insn import (
    FP,
    R0,
    R1,
    R2,
    R6,
    R7,
    AsmError,
    Program,
    atomic_fetch_add,
    exit_,
    format_insn,
    jne,
    ldx,
    mov64,
    st,
    stx,
)
from nettracer.bpf.memory import KernelReads, read


def test_atomic_fetch_add_golden_bytes() -> None:
    # BPF_STX | BPF_ATOMIC | BPF_DW (0xdb), BPF_ADD | BPF_FETCH (0x01); as clang emits
    # for __sync_fetch_and_add with -mcpu=v3
    assert atomic_fetch_add(8, R0, 0, R1).encode().hex() == "db10000001000000"
    assert atomic_fetch_add(4, R2, -8, R1).encode().hex() == "c312f8ff01000000"
    assert format_insn(atomic_fetch_add(8, R0, 8, R1)) == (
        "r1 = atomic64_fetch_add((u64 *)(r0 +8), r1)"
    )
    with pytest.raises(AsmError):
        atomic_fetch_add(2, R0, 0, R1)


def test_new_label_is_unique_per_program_and_resolves() -> None:
    p = Program()
    names = [p.new_label("skip") for _ in range(3)] + [p.new_label("out")]
    assert len(set(names)) == 4
    assert names[0].startswith("skip_") and names[3].startswith("out_")
    for name in names:  # each emitted once: assembly finds no duplicate
        p.label(name)
        p += mov64(R0, 0)
    p += exit_()
    assert len(p.assemble()) == 5 * 8
    assert Program().new_label("skip") == names[0]  # serials are per program


def test_read_emitter_chooses_the_helper_once_per_program() -> None:
    for reads, plain, string in (
        (None, Helper.probe_read_kernel, Helper.probe_read_kernel_str),
        (KernelReads(legacy=True), Helper.probe_read, Helper.probe_read_str),
    ):
        p = Program(reads=reads)
        read(p, FP, -16, 4, R7, 8)
        read(p, R6, 0, 16, R7, 0, string=True)
        calls = [i.imm for i in p.insns if i.op == 0x85]
        assert calls == [plain, string]
    assert int(Helper.probe_read) == 4 and int(Helper.probe_read_str) == 45
    p = Program()
    read(p, FP, -16, 4, R7, 8)
    assert p.listing().splitlines() == [
        "   0: r1 = r10",
        "   1: r1 += -16",
        "   2: r2 = 4",
        "   3: r3 = r7",
        "   4: r3 += 8",
        "   5: call probe_read_kernel#113",
    ]
    with pytest.raises(ValueError, match="overwritten"):
        read(p, FP, -16, 4, R2, 0)


def _count_program(atomic: bool) -> Program:
    """``counts[ctx[0]] += 1``, lost counted."""
    p = Program()
    p += [ldx(8, R1, R1, 0), stx(8, FP, -8, R1)]
    count_in_hash(
        p, "counts", -8, one_off=-16, lost="lost", scratch_off=-20, done="out", atomic=atomic
    )
    p.label("out")
    p += [mov64(R0, 0), exit_()]
    return p


def test_count_snippet_listing() -> None:
    check_golden("count_in_hash", _count_program(atomic=True).listing())
    check_golden("count_in_hash_percpu", _count_program(atomic=False).listing())
    p = Program()
    lost_inc(p, "lost", -4)
    p += [mov64(R0, 0), exit_()]
    check_golden("lost_inc", p.listing())


def test_event_channel_listing() -> None:
    from nettracer.bpf.channel import event_channel

    ch = event_channel("events", "lost")
    p = Program()
    p += mov64(R6, R1)
    ch.reserve(p, R7, 64, on_fail="out", scratch_off=-8)
    p += st(8, R7, 0, 1)
    ch.submit(p, R7, ctx=R6, size=64, scratch_off=-8)
    p += st(8, FP, -32, 7)
    ch.output(p, ctx=R6, buf_off=-32, size=8, done="out", scratch_off=-8)
    p.label("out")
    p += [mov64(R0, 0), exit_()]
    check_golden("event_channel", p.listing())


@pytest.mark.kernel
def test_count_snippet_counts_races_nothing_and_counts_a_full_map_as_lost() -> None:
    from nettracer.bpf import maps, prog
    from nettracer.bpf.counters import lost_counter

    for atomic, make in ((True, maps.hash_map), (False, maps.percpu_hash)):
        counts = make(ctypes.c_uint64, ctypes.c_uint64, 2, "counts")
        lost = lost_counter("lost")
        ins = _count_program(atomic).insns
        with (
            counts,
            lost,
            prog.load(ins, maps={"counts": counts, "lost": lost}, name="nt_test_cnt") as pr,
        ):
            for key in (5, 5, 7, 5, 9, 9, 11):  # room for two keys
                pr.test_run([key])
            got = {int(k): v for k, v in counts.items()}
            total = {k: sum(v) if isinstance(v, list) else int(v) for k, v in got.items()}
            assert total == {5: 3, 7: 1}
            assert sum(lost.lookup(0, [0])) == 3


@pytest.mark.kernel
def test_atomic_fetch_add_returns_the_old_value() -> None:
    from nettracer.bpf import maps, prog
    from nettracer.bpf.counters import lookup

    ids = maps.array(ctypes.c_uint64, 1, "ids")
    p = Program()
    p += st(4, FP, -4, 0)
    lookup(p, "ids", -4)
    p += [jne(R0, 0, "ok"), mov64(R0, 0xFFFF), exit_()]
    p.label("ok")
    p += [mov64(R1, 5), atomic_fetch_add(8, R0, 0, R1), mov64(R0, R1), exit_()]
    with ids, prog.load(p.insns, maps={"ids": ids}, name="nt_test_fetch") as pr:
        ids.update(0, 40)
        assert pr.test_run([0]) == 40
        assert pr.test_run([0]) == 45
        assert int(ids.lookup(0)) == 50


#: what the memo program returns on a miss (after storing ctx[1] for tag ctx[0])
MEMO_MISS = 0xFFFF


def _memo_program() -> Program:
    """Return the memoised ``u64`` for tag ``ctx[0]``, or remember ``ctx[1]`` for it and
    return :data:`MEMO_MISS`."""
    from nettracer.bpf.memo import memo_find, memo_store

    p = Program()
    p += [ldx(8, R6, R1, 0), ldx(8, R1, R1, 8), stx(8, FP, -8, R1)]
    memo_find(p, "memo", R6, stamp_off=-16, key_off=-20, out_off=-32, size=8, miss="miss")
    p += [ldx(8, R0, FP, -32), exit_()]
    p.label("miss")
    memo_store(p, "memo", R6, stamp_off=-16, key_off=-20, src_off=-8, size=8)
    p += [mov64(R0, MEMO_MISS), exit_()]
    return p


def test_memo_listing() -> None:
    check_golden("memo", _memo_program().listing())


@pytest.mark.kernel
def test_memo_answers_only_its_own_tag() -> None:
    """A different tag always misses; the same tag hits (once the two runs fall in one
    jiffy: polled with a deadline) with the payload stored for it."""
    from nettracer.bpf import prog
    from nettracer.bpf.memo import memo_map

    with (
        memo_map(8, "memo") as memo,
        prog.load(_memo_program().insns, maps={"memo": memo}, name="nt_test_memo") as pr,
    ):
        deadline = time.monotonic() + 10
        hits, tag = 0, 1
        while hits == 0 and time.monotonic() < deadline:
            a, b, tag = tag, tag + 1, tag + 2  # tags never seen before
            assert pr.test_run([a, 100]) == MEMO_MISS
            assert pr.test_run([b, 300]) == MEMO_MISS
            assert pr.test_run([a, 200]) == MEMO_MISS  # b was last
            got = pr.test_run([a, 900])
            assert got in (MEMO_MISS, 200)  # 200 unless a jiffy began in between
            hits += got == 200
        assert hits == 1
