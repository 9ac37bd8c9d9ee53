"""The read planner (:mod:`nettracer.access.plan`): fields of one struct grouped into
few bounded reads, each field keeping its alignment in the buffer (no kernel needed)."""

from __future__ import annotations

from nettracer.access.plan import plan_reads
from nettracer.layout.offsets import Field, Offsets


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
