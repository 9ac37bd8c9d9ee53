"""The read planner (:mod:`nettracer.access.plan`): fields of one struct grouped into
few bounded reads, each field keeping its alignment in the buffer (no kernel needed)."""

from __future__ import annotations

import pytest

from nettracer.access.plan import plan_reads, read_chain
from nettracer.bpf.insn import R7, Program
from nettracer.layout.offsets import Field, Offsets, UnresolvedField


def test_plan_reads_groups_near_fields() -> None:
    o = Offsets(
        "test",
        {
            "a.x": Field(0, 4),
            "a.y": Field(12, 2),
            "a.z": Field(56, 16),
            "a.far": Field(532, 2),
        },
    )
    plan = plan_reads(o, ["a.far", "a.x", "a.z", "a.y"], max_span=128)
    assert plan.reads == ((0, 72, 0), (528, 6, 72))
    assert plan.where == {"a.x": 0, "a.y": 12, "a.z": 56, "a.far": 76}
    assert plan.size == 80
    # every field keeps its alignment in the buffer
    for k, pos in plan.where.items():
        assert pos % 8 == o[k].offset % 8


def test_plan_reads_splits_wide_spans() -> None:
    o = Offsets("test", {"a.x": Field(0, 8), "a.y": Field(200, 8)})
    plan = plan_reads(o, ["a.x", "a.y"], max_span=128)
    assert len(plan.reads) == 2


def test_plan_reads_names_a_missing_key() -> None:
    with pytest.raises(UnresolvedField, match=r"tcp_sock\.srtt_us"):
        plan_reads(Offsets("test", {"a.x": Field(0, 8)}), ["a.x", "tcp_sock.srtt_us"])


def test_read_chain_checks_every_pointer_before_reading() -> None:
    p = Program()
    read_chain(p, R7, (16, 280), 176, 4, -8, null="null", fault="fault")
    lines = p.listing().splitlines()
    assert [x.split(": ", 1)[1] for x in lines if "goto" in x or "call" in x] == [
        "if r7 == 0 goto null",
        "call probe_read_kernel#113",
        "if r0 s< 0 goto fault",
    ] * 3
    # each hop's pointer is loaded back from the slot it was read into
    assert sum("r7 = *(u64 *)(r10 -8)" in x for x in lines) == 2
