"""The tracers' one contract (nettracer/tracers/__init__.py): built from configuration by
``from_config(cfg, **overrides)`` and nothing else, then start/close or ``with``."""

from __future__ import annotations

import os

import pytest
from conftest import ANY_OFFSETS, kernel_skip, settings

from nettracer.access.reader import Reader
from nettracer.errors import UsageError
from nettracer.kernel import BTF_VMLINUX
from nettracer.tracers.conns.monitor import ConnMonitor
from nettracer.tracers.drops.monitor import DropMonitor

TRACERS = (DropMonitor, ConnMonitor, Reader)


@pytest.mark.parametrize("tracer", TRACERS, ids=lambda t: t.__name__)
def test_every_tracer_keeps_the_contract(tracer: type) -> None:
    for name in ("from_config", "start", "close", "__enter__", "__exit__"):
        assert callable(getattr(tracer, name, None)), (tracer, name)
    assert isinstance(tracer.__dict__["from_config"], classmethod)
    for name in ("source", "notices"):
        assert hasattr(tracer, name), (tracer, name)


@pytest.fixture
def btf() -> None:
    if not os.path.exists(BTF_VMLINUX):
        kernel_skip(f"no BTF ({BTF_VMLINUX})")


def test_drops_from_config_takes_settings_and_overrides(btf: None) -> None:
    cfg = settings(offsets__source=ANY_OFFSETS, drops__group_by=["device", "reason"])
    mon = DropMonitor.from_config(cfg, events=True, device="lo", protocol="IPv6")
    assert (mon.source, mon.group_by, mon.notices) == ("btf", ("device", "reason"), [])
    spec = mon.spec
    assert (spec.events, spec.stack, spec.filters.device, spec.filters.protocol) == (
        True, False, b"lo", 0x86DD,
    )  # fmt: skip
    assert mon.prog is None  # built, not loaded
    # the offsets of offsets.source btf (through the BTF cache) are BTF's own
    from nettracer.layout.btf_offsets import btf_offsets
    from nettracer.tracers.drops.program import DropLayout

    assert spec.layout == DropLayout.from_offsets(btf_offsets(), events=True)
    with pytest.raises(UsageError) as exc:
        DropMonitor.from_config(cfg, device="x" * 16)
    assert exc.value.settings == ("drops.device",)


def test_conns_from_config_takes_settings_and_overrides(btf: None) -> None:
    cfg = settings(
        offsets__source=ANY_OFFSETS,
        network__collect_udp=False,
        network__max_tracked_connections=1024,
        network__tcp_conn_timeout_s=7,
        gateway_lookup__enabled=False,
    )
    mon = ConnMonitor.from_config(cfg, netns=4026531840, pid=1)
    spec = mon.tracer.opts
    assert (spec.collect_tcp, spec.collect_udp, spec.netns) == (True, False, 4026531840)
    assert (mon.tracer.max_conns, mon.tcp_timeout_s, mon.pid) == (1024, 7.0, 1)
    assert mon.resolver is None and mon.source == "btf"
    mon = ConnMonitor.from_config(settings(offsets__source=ANY_OFFSETS), gateway=True)
    try:
        assert mon.resolver is not None  # gateway_lookup.enabled by default
    finally:
        mon.close()  # never started: closes the resolver


def test_reader_from_config_resolves_as_offsets_source_says(btf: None) -> None:
    reader = Reader.from_config(settings(offsets__source=ANY_OFFSETS), "kfree_skb", ["skb->len"])
    assert reader.source == "btf" and [p.expr for p in reader.paths] == ["skb->len"]
    assert not hasattr(reader, "prog") and reader.reader is None  # nothing loaded yet
