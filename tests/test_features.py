"""Feature probes against what this machine is known to have (design.md: Linux 6.18,
raw tracepoints and ring buffers, BTF present, no kprobes) — each cross-checked with
an independent source."""

from __future__ import annotations

import os

import pytest
from conftest import kernel_before

from nettracer.errors import NotSupported
from nettracer.kernel import features

pytestmark = pytest.mark.kernel


def test_raw_tracepoint_and_ringbuf_present() -> None:
    assert features.has_raw_tracepoint()
    assert features.has_tracepoint_programs()
    assert features.has_ringbuf()


def test_btf_matches_the_file() -> None:
    assert features.has_btf() == os.path.exists("/sys/kernel/btf/vmlinux")


def test_tp_btf_matches_btf() -> None:
    """A ``tp_btf`` program loads exactly where BTF has ``btf_trace_kfree_skb`` (5.5: the
    typedefs came with tp_btf), and the typedef's id through the BTF cache is the one
    a parse of BTF gives."""
    from nettracer.kernel.tracepoints import btf_trace_id

    if not features.has_btf():
        assert features.has_tp_btf() is False
        return
    from nettracer.kernel.btf import Btf

    tid = Btf.vmlinux().typedef_id("btf_trace_kfree_skb")
    assert features.has_tp_btf() == bool(tid)
    assert btf_trace_id("kfree_skb") == (tid or None)


def test_kprobes_matches_kallsyms() -> None:
    # kprobes built in <=> the kprobe machinery's own symbols exist
    with open("/proc/kallsyms") as f:
        has_register_kprobe = any(line.rstrip().endswith(" register_kprobe") for line in f)
    assert features.has_kprobes() == has_register_kprobe


def _kallsyms_has(symbol: str) -> bool:
    with open("/proc/kallsyms") as f:
        return any(line.rstrip().endswith(f" {symbol}") for line in f)


def test_require_raises_typed_not_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "_probed", {"ringbuf": False})
    with pytest.raises(
        NotSupported, match=r"ring buffer not supported by this kernel \(needs Linux 5.8\)"
    ):
        features.require("ringbuf")
    features.require("raw_tracepoint")


def test_probe_read_kernel_matches_kallsyms() -> None:
    """The helper's implementation ``bpf_probe_read_kernel`` came with it (5.5)."""
    assert features.has_probe_read_kernel() == _kallsyms_has("bpf_probe_read_kernel")


def test_batch_ops_match_kallsyms() -> None:
    """``generic_map_lookup_batch`` (kernel/bpf/syscall.c) came with the commands (5.6)."""
    assert features.has_batch_ops() == _kallsyms_has("generic_map_lookup_batch")


def test_jiffies64_matches_kallsyms() -> None:
    """``bpf_jiffies64`` (kernel/bpf/helpers.c) is the helper's own function (5.6)."""
    assert features.has_jiffies64() == _kallsyms_has("bpf_jiffies64")


def test_atomic_fetch_on_this_kernel() -> None:
    """BPF_FETCH came with 5.12 (6.18 has it, 5.10 answers "BPF_STX uses reserved
    fields"); the probe's own program is the fetch-and-add."""
    assert features.has_atomic_fetch() is not kernel_before(5, 12)


def test_forced_features_take_their_fallback() -> None:
    """``kernel.without`` takes a present feature away; the others stay."""
    kf = features.KernelFeatures(["ringbuf", "batch_ops"])
    assert not kf.use("ringbuf") and not kf.use("batch_ops")
    assert kf.use("raw_tracepoint") and kf.use("probe_read_kernel")
    assert kf.describe("ringbuf") == "yes (5.8) -> perf event array (forced by kernel.without)"
    assert kf.describe("raw_tracepoint") == "yes (4.17)"
    assert kf.path("ringbuf") == {
        "present": True,
        "since": "5.8",
        "forced": True,
        "uses": "perf event array",
    }
    assert kf.path("batch_ops")["uses"] == "per-key map walk"
    assert features.KernelFeatures().path("ringbuf")["uses"] == "ring buffer"


def test_memcg_accounting_matches_kallsyms() -> None:
    """Before 5.11 programs are charged to RLIMIT_MEMLOCK by ``__bpf_prog_charge()``
    (kernel/bpf/syscall.c; removed with rlimit accounting in 5.11), so the function
    exists exactly when memcg accounting does not."""
    import resource

    before = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    with open("/proc/kallsyms") as f:
        charges = any(line.rstrip().endswith(" __bpf_prog_charge") for line in f)
    assert features.has_memcg_accounting() == (not charges)
    after = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    inf = resource.RLIM_INFINITY
    assert after == ((inf, inf) if charges else before)  # raised only where it matters


def test_forced_batch_ops_walk_key_by_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``batch_ops`` forced away, map walks give the same pairs and never issue a
    batch command (the walk nettracer does before 5.6)."""
    import ctypes

    from nettracer.bpf import maps, syscall

    with maps.hash_map(ctypes.c_uint32, ctypes.c_uint64, 64, "nt_t") as m:
        for k in range(40):
            m[k] = k * k
        batched = sorted(m.items())
        assert batched == [(k, k * k) for k in range(40)]
        before = features.current().without
        features.configure(["batch_ops"])
        try:

            def no_batch(*args: object) -> None:
                raise AssertionError("batch command issued")

            monkeypatch.setattr(syscall, "map_batch", no_batch)
            assert sorted(m.items()) == batched
            assert sorted(m.pop_items()) == batched
            assert m.items() == []
        finally:
            features.configure(before)


def test_kernel_reads_on_this_kernel() -> None:
    assert not features.kernel_reads(features.KernelFeatures()).legacy
