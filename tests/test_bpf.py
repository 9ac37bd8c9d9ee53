"""The eBPF core against the real kernel: maps, program load and test runs,
attachment to kfree_skb, the ring buffer, the verifier summary, statistics."""

from __future__ import annotations

import ctypes
import socket
import threading
import time

import pytest
from conftest import kernel_before

from nettracer.bpf import maps, prog
from nettracer.bpf.channel import event_channel
from nettracer.bpf.helpers import Helper
from nettracer.bpf.insn import (
    FP,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R7,
    R8,
    Program,
    add64,
    atomic_add,
    call,
    exit_,
    jeq,
    jne,
    ld_map_fd,
    ldx,
    mov64,
    st,
    stx,
)
from nettracer.bpf.link import UnknownTracepoint, attach_raw_tracepoint, attach_tracepoint
from nettracer.bpf.syscall import MapType, ProgType
from nettracer.errors import NotSupported
from nettracer.kernel import tracefs

pytestmark = pytest.mark.kernel


def _update_from_args(map_name: str) -> Program:
    """Program: ``map[ctx[0]] = ctx[1]`` via bpf_map_update_elem (keys/values on the stack)."""
    p = Program()
    p += [
        ldx(8, R6, R1, 0),
        ldx(8, R7, R1, 8),
        stx(4, FP, -4, R6),
        stx(8, FP, -16, R7),
        ld_map_fd(R1, map_name),
        mov64(R2, FP),
        add64(R2, -4),
        mov64(R3, FP),
        add64(R3, -16),
        mov64(R4, 0),
        call(Helper.map_update_elem),
        mov64(R0, 0),
        exit_(),
    ]
    return p


@pytest.mark.parametrize(
    "map_type",
    [MapType.ARRAY, MapType.PERCPU_ARRAY, MapType.HASH, MapType.LRU_HASH, MapType.PERCPU_HASH],
)
def test_program_writes_known_values_into_each_map_type(map_type: MapType) -> None:
    with maps.Map(map_type, ctypes.c_uint32, ctypes.c_uint64, 8, "vals") as m:
        p = prog.load(_update_from_args("vals").insns, maps={"vals": m}, name="nt_test_upd")
        with p:
            for k, v in [(1, 0xDEADBEEF12), (3, 42), (5, 2**63 + 1)]:
                assert p.test_run([k, v]) == 0
        got = dict(m.items())
        if map_type in (MapType.PERCPU_ARRAY, MapType.PERCPU_HASH):
            # test runs execute on one CPU: exactly one slot holds the value
            got = {k: sum(v) for k, v in got.items()}
        if map_type in (MapType.ARRAY, MapType.PERCPU_ARRAY):
            assert got == {0: 0, 1: 0xDEADBEEF12, 2: 0, 3: 42, 4: 0, 5: 2**63 + 1, 6: 0, 7: 0}
        else:
            assert got == {1: 0xDEADBEEF12, 3: 42, 5: 2**63 + 1}


def test_hash_map_operations_from_user_space() -> None:
    class Key(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint16), ("pad", ctypes.c_uint16)]

    with maps.hash_map(Key, ctypes.c_uint64, 1024, "kv") as m:
        for i in range(300):
            m[Key(i, i % 7)] = i * 10
        assert m.lookup(Key(5, 5)) == 50
        assert m.lookup(Key(5, 6)) is None
        assert m.delete(Key(5, 5)) and not m.delete(Key(5, 5))
        assert len(list(m.keys())) == 299
        items = {(k.a, k.b): v for k, v in m.items()}
        assert len(items) == 299 and items[(7, 0)] == 70
        if kernel_before(5, 14):  # hash maps have no LOOKUP_AND_DELETE_ELEM: said so
            with pytest.raises(NotSupported, match=r"hash map element .* \(needs Linux 5.14\)"):
                m.lookup_and_delete(Key(7, 0))
            assert m.delete(Key(7, 0))
        else:
            assert m.lookup_and_delete(Key(7, 0)) == 70 and m.lookup(Key(7, 0)) is None
        popped = m.pop_items()
        assert len(popped) == 298 and list(m.keys()) == []


def test_map_full_is_a_clear_error() -> None:
    with maps.hash_map(ctypes.c_uint32, ctypes.c_uint32, 2, "small") as m:
        m[1] = 1
        m[2] = 2
        with pytest.raises(maps.MapFullError, match="full"):
            m[3] = 3


def _count_own_thread(map_name: str) -> Program:
    """``map[0] += 1`` when the current thread is this one (works on any tracepoint)."""
    tid = threading.get_native_id()
    p = Program()
    p += [
        call(Helper.get_current_pid_tgid),
        stx(4, FP, -8, R0),  # the lower 32 bits are the thread id
        ldx(4, R6, FP, -8),
        jne(R6, tid, "out"),
        st(4, FP, -4, 0),
        ld_map_fd(R1, map_name),
        mov64(R2, FP),
        add64(R2, -4),
        call(Helper.map_lookup_elem),
        jeq(R0, 0, "out"),
        mov64(R1, 1),
        atomic_add(8, R0, 0, R1),
    ]
    p.label("out")
    p += [mov64(R0, 0), exit_()]
    return p


def _drop_udp(n: int) -> None:
    """Send ``n`` datagrams to a closed loopback port: on loopback the drop happens in the
    sender's own softirq, so in this thread."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed_port = _closed_udp_port()
    for _ in range(n):
        s.sendto(b"x", ("127.0.0.1", closed_port))
    s.close()
    time.sleep(0.05)


def test_raw_tracepoint_kfree_skb_counts_exactly_the_drops_we_cause() -> None:
    counts = maps.array(ctypes.c_uint64, 1, "drops")
    loaded = prog.load(_count_own_thread("drops").insns, maps={"drops": counts}, name="nt_test_cnt")
    with counts, loaded, attach_raw_tracepoint(loaded, "kfree_skb"):
        _drop_udp(25)
        assert counts[0] == 25


def test_classic_tracepoint_kfree_skb_counts_exactly_the_drops_we_cause() -> None:
    tp_id = tracefs.tracepoint_id("skb", "kfree_skb")
    counts = maps.array(ctypes.c_uint64, 1, "drops")
    loaded = prog.load(
        _count_own_thread("drops").insns,
        prog_type=ProgType.TRACEPOINT,
        maps={"drops": counts},
        name="nt_test_tp",
    )
    with counts, loaded:
        link = attach_tracepoint(loaded, tp_id, "skb/kfree_skb")
        with link:
            _drop_udp(13)
            assert counts[0] == 13
        _drop_udp(5)  # detached: no longer counted
        assert counts[0] == 13


def _closed_udp_port() -> int:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def test_unknown_raw_tracepoint_is_a_clear_error() -> None:
    with (
        prog.load([mov64(R0, 0), exit_()], name="nt_test_nop") as p,
        pytest.raises(UnknownTracepoint, match="no_such_tracepoint"),
    ):
        attach_raw_tracepoint(p, "no_such_tracepoint")


def test_verifier_error_is_short_and_keeps_the_log() -> None:
    bad = [ldx(8, R0, R2, 0), exit_()]  # R2 is not initialised
    with pytest.raises(prog.VerifierError) as info:
        prog.load(bad, name="nt_test_bad")
    err = info.value
    assert "\n" not in str(err)
    assert "insn 0" in str(err) and "R2 !read_ok" in str(err)
    assert "R2 !read_ok" in err.log and "processed" in err.log
    assert err.listing.splitlines()[0].endswith("r0 = *(u64 *)(r2 +0)")


def test_verifier_log_grows_for_long_programs() -> None:
    body = [mov64(R0, 0)] * 3000 + [ldx(8, R0, R2, 0), exit_()]
    with pytest.raises(prog.VerifierError) as info:
        prog.load(body, name="nt_test_long", log_level=2)
    assert "R2 !read_ok" in info.value.log
    assert len(info.value.log) > 1 << 16  # more than the first buffer


def test_stats_count_runs() -> None:
    with prog.enable_stats(), prog.load([mov64(R0, 0), exit_()], name="nt_test_stat") as p:
        for _ in range(17):
            p.test_run([0])
        stats = p.stats()
    assert stats.run_cnt == 17
    assert stats.run_time_ns > 0


def test_event_channel_delivers_records_and_counts_what_did_not_fit() -> None:
    ch = event_channel("events", "lost")
    size = 1024  # 1024 + 8-byte header: three fit in 4 KiB, the rest are lost
    p = Program()
    p += [mov64(R6, R1), ldx(8, R8, R1, 0)]
    ch.reserve(p, R7, size, on_fail="out", scratch_off=-8)
    p += stx(8, R7, 0, R8)
    ch.submit(p, R7, ctx=R6, size=size, scratch_off=-8)
    p.label("out")
    p += [mov64(R0, 0), exit_()]
    got: list[int] = []
    with ch.open(4096) as reader, prog.load(p.insns, maps=reader.maps, name="nt_test_rb") as pr:
        for i in range(10):
            pr.test_run([1000 + i])
        reader.poll(0.1, lambda rec: got.append(int.from_bytes(rec[:8], "little")))
        assert got == [1000, 1001, 1002]
        assert reader.lost == 7
        for i in range(2):  # space was freed by consuming
            pr.test_run([2000 + i])
        reader.poll(0.1, lambda rec: got.append(int.from_bytes(rec[:8], "little")))
        assert got[3:] == [2000, 2001]
        assert reader.records == 5
