"""Feature probes against what this machine is known to have (design.md: Linux 6.18,
raw tracepoints and ring buffers, BTF present, no kprobes) — each cross-checked with
an independent source."""

from __future__ import annotations

import os

import pytest

from nettracer.errors import NotSupported
from nettracer.kernel import features

pytestmark = pytest.mark.kernel


def test_raw_tracepoint_and_ringbuf_present() -> None:
    assert features.has_raw_tracepoint()
    assert features.has_tracepoint_programs()
    assert features.has_ringbuf()


def test_btf_matches_the_file() -> None:
    assert features.has_btf() == os.path.exists("/sys/kernel/btf/vmlinux")


def test_kprobes_matches_kallsyms() -> None:
    # kprobes built in <=> the kprobe machinery's own symbols exist
    with open("/proc/kallsyms") as f:
        has_register_kprobe = any(line.rstrip().endswith(" register_kprobe") for line in f)
    assert features.has_kprobes() == has_register_kprobe


def test_require_raises_typed_not_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(features.FEATURES, "ringbuf", (lambda: False, "5.8"))
    with pytest.raises(
        NotSupported, match=r"ringbuf not supported by this kernel \(needs Linux 5.8\)"
    ):
        features.require("ringbuf")
    features.require("raw_tracepoint")


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
