"""Offset profiles: round trip, refusal of another kernel's profile, the per-kernel
cache and its recovery from a corrupt file."""

from __future__ import annotations

import dataclasses
import json

import pytest

from nettracer.kernel.identity import KernelIdentity, current
from nettracer.layout import profile as prof
from nettracer.layout.catalogue import BY_KEY, CATALOGUE
from nettracer.layout.offsets import Field, Offsets
from nettracer.layout.source import offsets_for

ME = KernelIdentity("6.18.0-test", "#1 SMP PREEMPT_DYNAMIC Thu", "x86_64", "ab" * 32)


def _offsets(source: str = "guess") -> Offsets:
    o = Offsets(source=source, elapsed_ms=12.5)
    for i, spec in enumerate(CATALOGUE):
        o.fields[spec.key] = Field(8 * i, spec.size)
    return o


def test_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "p.json")
    o = _offsets()
    o.fields.pop("sk_buff.sk")
    o.unresolved["sk_buff.sk"] = "ambiguous: offsets 24, 32 match all 6 observations"
    prof.save_profile(path, o, ME)
    back = prof.load_profile(path, ME)
    assert back.source == "profile"
    assert back.fields == o.fields
    assert back.unresolved == o.unresolved
    with open(path) as f:
        data = json.load(f)
    assert data["kernel"] == ME.to_json() and data["format"] == prof.FORMAT


def test_foreign_profile_is_refused_unless_forced(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "p.json")
    prof.save_profile(path, _offsets(), ME)
    for other in (
        dataclasses.replace(ME, release="5.10.0-21-amd64"),
        dataclasses.replace(ME, version="#2 SMP Fri"),
        dataclasses.replace(ME, machine="aarch64"),
        dataclasses.replace(ME, btf_sha256="cd" * 32),
    ):
        with pytest.raises(prof.ForeignProfile, match="another kernel"):
            prof.load_profile(path, other)
        assert prof.load_profile(path, other, force=True).fields == _offsets().fields
    # a kernel without BTF accepts a profile from the same build made where BTF was read
    assert prof.load_profile(path, dataclasses.replace(ME, btf_sha256=None)).fields


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format="x"), "not a nettracer offsets profile"),
        (lambda d: d.update(version=99), "version 99"),
        (lambda d: d["fields"].update({"sock.nope": {"offset": 1, "size": 2}}), "unknown field"),
        (lambda d: d["fields"]["sk_buff.len"].update(size=8), "sk_buff.len"),
        (lambda d: d["fields"]["sk_buff.len"].update(offset=-1), "sk_buff.len"),
        (lambda d: d["fields"]["sk_buff.len"].update(offset=True), "sk_buff.len"),
        (lambda d: d.pop("kernel"), "kernel identity"),
        (lambda d: d["kernel"].pop("release"), "kernel identity"),
    ],
)
def test_invalid_profiles_are_rejected(tmp_path, mutate, message) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "p.json"
    prof.save_profile(str(path), _offsets(), ME)
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(prof.ProfileError, match=message):
        prof.load_profile(str(path), ME)


def test_not_json_is_a_profile_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "p.json"
    path.write_bytes(b"\xff{not json")
    with pytest.raises(prof.ProfileError, match="not valid JSON"):
        prof.load_profile(str(path), ME)


def test_cache_is_per_kernel_build(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = str(tmp_path)
    assert prof.load_cached(d, ME) is None
    prof.store_cached(d, ME, _offsets())
    assert prof.load_cached(d, ME).fields == _offsets().fields
    other = dataclasses.replace(ME, version="#2 SMP Fri")
    assert prof.cache_path(d, other) != prof.cache_path(d, ME)
    assert prof.load_cached(d, other) is None


def test_auto_uses_the_cached_profile_without_btf(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import nettracer.layout.guess as guess

    def no_guess(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("guessed although a valid profile was cached")

    monkeypatch.setattr(guess, "guess", no_guess)
    prof.store_cached(str(tmp_path), ME, _offsets())
    o = offsets_for("auto", cache_dir=str(tmp_path), identity=ME, btf_path=str(tmp_path / "no-btf"))
    assert o.source == "profile" and o.fields == _offsets().fields


@pytest.mark.kernel
def test_corrupt_cache_is_ignored_with_a_warning_and_replaced(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from conftest import kernel_skip

    from nettracer.layout.btf_offsets import btf_offsets

    try:
        btf = btf_offsets()
    except Exception as exc:
        kernel_skip(f"no BTF to compare guessed offsets with ({exc})")
    me = current()
    path = prof.cache_path(str(tmp_path), me)
    with open(path, "w") as f:
        f.write('{"format": "nettracer-offsets", "version": 1, "fields": [')
    warnings: list[str] = []
    o = offsets_for(
        "auto",
        cache_dir=str(tmp_path),
        btf_path=str(tmp_path / "no-btf"),
        warn=warnings.append,
        timeout_ms=10000,
    )
    assert o.source == "guess" and o.to_json() == btf.to_json()
    assert len(warnings) == 1 and "guessing again" in warnings[0]
    again = offsets_for("auto", cache_dir=str(tmp_path), btf_path=str(tmp_path / "no-btf"))
    assert again.source == "profile" and again.to_json() == btf.to_json()
    with open(path) as f:
        assert set(json.load(f)["fields"]) == set(BY_KEY)


def test_profile_and_btf_source_exclude_each_other(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nettracer.errors import UsageError

    with pytest.raises(UsageError, match="exclude each other"):
        offsets_for("btf", profile=str(tmp_path / "p.json"))
    with pytest.raises(UsageError, match=r"offsets\.source kprobe: expected"):
        offsets_for("kprobe")


def test_save_never_creates_directories(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    missing = tmp_path / "missing" / "dir"
    with pytest.raises(prof.ProfileError, match=f"directory {missing} does not exist"):
        prof.save_profile(str(missing / "p.json"), _offsets(), ME)
    r = subprocess.run(
        [
            *(sys.executable, "-m", "nettracer", "offsets", "--source", "btf"),
            *("--config", os.devnull, "--save", str(missing / "p.json")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr == (
        f"nettracer: cannot write profile {missing / 'p.json'}: directory {missing} "
        f"does not exist\n"
    )
    assert r.stdout == ""
    assert not (tmp_path / "missing").exists()
    # the cache directory is the one nettracer makes itself
    prof.store_cached(str(missing), ME, _offsets())
    assert prof.load_cached(str(missing), ME).fields == _offsets().fields
