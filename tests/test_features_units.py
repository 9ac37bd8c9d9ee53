"""``kernel.without`` and :class:`KernelFeatures` without the kernel: names, errors, and
that a forced-away feature is never probed."""

from __future__ import annotations

import pytest

from nettracer.config import load_config
from nettracer.errors import ConfigError, UsageError
from nettracer.kernel import features

NOWHERE = "/nonexistent/nettracer.yaml"


def test_forceable_features_are_known_and_have_a_fallback() -> None:
    for name in features.FORCEABLE:
        assert features.FEATURES[name].fallback


def test_unknown_feature_is_a_usage_error_listing_the_known_ones() -> None:
    with pytest.raises(UsageError) as err:
        features.KernelFeatures(["ringbuf", "kprobes"])
    msg = str(err.value)
    assert "\n" not in msg and "'kprobes'" in msg
    assert all(name in msg for name in features.FORCEABLE)


def test_forced_feature_is_not_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> bool:
        raise AssertionError("probed")

    monkeypatch.setattr(features, "_probed", {})
    monkeypatch.setitem(
        features.FEATURES, "ringbuf", features.FEATURES["ringbuf"].replace(probe=boom)
    )
    assert features.KernelFeatures(["ringbuf"]).use("ringbuf") is False


def test_configure_replaces_the_process_object(monkeypatch: pytest.MonkeyPatch) -> None:
    from nettracer.bpf import maps

    monkeypatch.setattr(features, "_current", None)
    monkeypatch.setattr(maps, "_batch_policy", maps._batch_policy)
    assert features.current().without == ()
    kf = features.configure(["batch_ops"])
    assert features.current() is kf and kf.forced("batch_ops")
    assert maps.use_batch_ops() is False  # forced: not even probed


def test_environment_variable_sets_kernel_without() -> None:
    env = {
        "NETTRACER_KERNEL__WITHOUT": (
            "ringbuf,probe_read_kernel,atomic_fetch,raw_tracepoint,batch_ops,tp_btf"
        )
    }
    cfg = load_config(None, environ=env, default_path=NOWHERE)
    assert cfg["kernel.without"] == list(features.FORCEABLE)
    assert cfg.source("kernel.without") == "env NETTRACER_KERNEL__WITHOUT"
    assert load_config(None, environ={}, default_path=NOWHERE)["kernel.without"] == []


def test_unknown_name_in_environment_is_one_line_listing_the_known_ones() -> None:
    env = {"NETTRACER_KERNEL__WITHOUT": "ringbuf,fentry"}
    with pytest.raises(ConfigError) as err:
        load_config(None, environ=env, default_path=NOWHERE)
    msg = str(err.value)
    assert msg.startswith("kernel.without: expected a list of items among ringbuf, ")
    assert "unknown item 'fentry'" in msg and "NETTRACER_KERNEL__WITHOUT" in msg
    assert "\n" not in msg


def test_kernel_reads_follow_kernel_without() -> None:
    """``probe_read_kernel`` forced away: programs read with ``bpf_probe_read`` (the
    helper before 5.5); not forced, the probe decides (never probed when forced)."""
    assert features.kernel_reads(features.KernelFeatures(["probe_read_kernel"])).legacy
