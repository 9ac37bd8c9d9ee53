"""The BTF cache: facts computed once per BTF, recomputed whenever the BTF, the catalogue
or the file is not what they were, never wrong; offsets, kfree_skb's arguments and the
drop reasons from the cache agree with BTF read afresh."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nettracer.layout import btf_cache


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    """Each test starts without what another read (the process memo)."""
    btf_cache.forget()
    yield
    btf_cache.forget()


def _fake_btf(path: Path, body: bytes = b"types and strings") -> str:
    # struct btf_header: magic 0xeb9f, version 1, flags 0, hdr_len 24, then offsets/lengths
    header = (0xEB9F).to_bytes(2, "little") + bytes([1, 0]) + (24).to_bytes(4, "little")
    path.write_bytes(header + bytes(16) + body)
    return str(path)


class Counter:
    """A fact that counts how often it was computed."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        return self.value


def _get(cache: str | None, btf: str, compute: Callable[[], Any], **kw: Any) -> Any:
    return btf_cache.cached(
        cache, "fact", compute, kw.get("encode", list), kw.get("decode", list), btf_path=btf
    )


def test_computed_once_per_btf(tmp_path: Path) -> None:
    btf = _fake_btf(tmp_path / "vmlinux")
    fact = Counter([1, 2, 3])
    assert _get(str(tmp_path / "cache"), btf, fact) == [1, 2, 3]
    btf_cache.forget()  # as another process would
    assert _get(str(tmp_path / "cache"), btf, fact) == [1, 2, 3]
    assert fact.calls == 1
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].startswith("btf-") and files[0].endswith(".json")


def test_another_btf_is_read_again(tmp_path: Path) -> None:
    btf = _fake_btf(tmp_path / "vmlinux")
    cache = str(tmp_path / "cache")
    assert _get(cache, btf, Counter(["old"])) == ["old"]
    btf_cache.forget()
    _fake_btf(tmp_path / "vmlinux", b"other types, same size")  # new content, times, size
    assert _get(cache, btf, Counter(["new"])) == ["new"]
    btf_cache.forget()
    st = os.stat(btf)  # same size and content, other mtime: a new boot's sysfs file
    os.utime(btf, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    again = Counter(["again"])
    assert _get(cache, btf, again) == ["again"] and again.calls == 1


def test_the_stamp_names_kernel_btf_and_catalogue(tmp_path: Path) -> None:
    btf = _fake_btf(tmp_path / "vmlinux")
    st = btf_cache.stamp(btf)
    assert st is not None
    u = os.uname()
    assert (st["release"], st["version"], st["machine"]) == (u.release, u.version, u.machine)
    assert st["btf"]["size"] == os.path.getsize(btf) and st["btf"]["header"].startswith("9feb01")
    assert st["catalogue"]
    assert btf_cache.stamp(str(tmp_path / "none")) is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b"\xff{not json"),
        lambda p: p.write_text("[]"),
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "version": 99})),
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "facts": []})),
        lambda p: p.write_text(
            json.dumps({**json.loads(p.read_text()), "facts": {"fact": "not a list"}})
        ),
        lambda p: p.write_text(p.read_text().replace('"catalogue":"', '"catalogue":"x')),
    ],
)
def test_damaged_cache_is_recomputed_and_rewritten(tmp_path: Path, damage: Any) -> None:
    btf = _fake_btf(tmp_path / "vmlinux")
    cache = tmp_path / "cache"

    def strict(data: Any) -> list[int]:
        if not isinstance(data, list):
            raise TypeError("not a list")
        return data

    assert _get(str(cache), btf, Counter([7]), decode=strict) == [7]
    (path,) = cache.iterdir()
    damage(path)
    btf_cache.forget()
    fact = Counter([7])
    assert _get(str(cache), btf, fact, decode=strict) == [7] and fact.calls == 1
    btf_cache.forget()
    assert _get(str(cache), btf, fact, decode=strict) == [7] and fact.calls == 1  # rewritten


def test_without_cache_dir_or_btf_it_computes(tmp_path: Path) -> None:
    btf = _fake_btf(tmp_path / "vmlinux")
    fact = Counter([1])
    _get(None, btf, fact)
    _get(None, btf, fact)
    assert fact.calls == 2
    _get(str(tmp_path / "cache"), str(tmp_path / "no-btf"), fact)
    assert fact.calls == 3 and not (tmp_path / "cache").exists()


def test_unwritable_cache_dir_still_answers(tmp_path: Path) -> None:
    btf = _fake_btf(tmp_path / "vmlinux")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert _get(str(blocker / "cache"), btf, Counter([5])) == [5]
    assert not list(tmp_path.glob("**/*.tmp"))


# -- on the running kernel's BTF -----------------------------------------------------------


def _need_btf() -> None:
    from conftest import kernel_skip

    if not os.path.exists(btf_cache.BTF_VMLINUX):
        kernel_skip(f"no BTF ({btf_cache.BTF_VMLINUX})")


@pytest.mark.kernel
def test_cached_offsets_are_btf_offsets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_btf()
    import nettracer.layout.btf_offsets as btf_offsets_mod
    from nettracer.layout.source import offsets_for

    fresh = btf_offsets_mod.btf_offsets()
    first = offsets_for("btf", cache_dir=str(tmp_path))
    assert first.to_json() == fresh.to_json() and first.unresolved == fresh.unresolved

    def no_parse(*a: object, **k: object) -> None:
        raise AssertionError("BTF parsed although its offsets were cached")

    monkeypatch.setattr(btf_offsets_mod, "btf_offsets", no_parse)
    btf_cache.forget()
    for source in ("btf", "auto"):
        o = offsets_for(source, cache_dir=str(tmp_path))
        assert o.source == "btf"
        assert o.to_json() == fresh.to_json() and o.unresolved == fresh.unresolved


@pytest.mark.kernel
def test_cached_offsets_missing_a_field_are_read_again(tmp_path: Path) -> None:
    _need_btf()
    from nettracer.layout.btf_offsets import btf_offsets
    from nettracer.layout.source import offsets_for

    fresh = btf_offsets()
    offsets_for("btf", cache_dir=str(tmp_path))
    (path,) = tmp_path.iterdir()
    data = json.loads(path.read_text())
    data["facts"]["offsets"]["fields"].pop("sk_buff.dev")
    data["facts"]["offsets"]["fields"]["net.ns.inum"]["size"] = 8
    path.write_text(json.dumps(data))
    btf_cache.forget()
    o = offsets_for("btf", cache_dir=str(tmp_path))
    assert o.to_json() == fresh.to_json() and o.offset("sk_buff.dev") == fresh.offset("sk_buff.dev")


@pytest.mark.kernel
def test_kfree_skb_args_and_reasons_from_the_cache_match_btf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _need_btf()
    from nettracer.kernel.btf import Btf
    from nettracer.tracers import drops

    btf = Btf.vmlinux()
    args = drops.kfree_skb_args(btf)
    reasons = drops.reason_names(btf) if args.has_reason else None
    assert drops.cached_kfree_skb_args(str(tmp_path)) == args
    if reasons is not None:
        assert drops.cached_reason_names(str(tmp_path)) == reasons

    def no_btf(*a: object, **k: object) -> None:
        raise AssertionError("BTF read although the answer was cached")

    monkeypatch.setattr(Btf, "vmlinux", no_btf)
    btf_cache.forget()
    assert drops.cached_kfree_skb_args(str(tmp_path)) == args
    if reasons is not None:
        assert drops.cached_reason_names(str(tmp_path)) == reasons
