"""The BTF cache: facts computed once per BTF, recomputed whenever the BTF, the catalogue
or the file is not what they were, never wrong; offsets, kfree_skb's arguments and the
drop reasons from the cache agree with BTF read afresh."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nettracer.kernel import btf_cache


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


def _rows(value: list[int]) -> list[tuple[str, ...]]:
    return [tuple(str(v) for v in value)]


def _value(rows: list[tuple[str, ...]]) -> list[int]:
    (row,) = rows
    return [int(v) for v in row]


def _get(cache: str | None, btf: str, compute: Callable[[], Any], **kw: Any) -> Any:
    return btf_cache.cached(
        cache, "fact", compute, kw.get("encode", _rows), kw.get("decode", _value), btf_path=btf
    )


def test_computed_once_per_btf(tmp_path: Path) -> None:
    btf = _fake_btf(tmp_path / "vmlinux")
    fact = Counter([1, 2, 3])
    assert _get(str(tmp_path / "cache"), btf, fact) == [1, 2, 3]
    btf_cache.forget()  # as another process would
    assert _get(str(tmp_path / "cache"), btf, fact) == [1, 2, 3]
    assert fact.calls == 1
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].startswith("btf-") and files[0].endswith(".tsv")


def test_another_btf_is_read_again(tmp_path: Path) -> None:
    btf = _fake_btf(tmp_path / "vmlinux")
    cache = str(tmp_path / "cache")
    assert _get(cache, btf, Counter([1])) == [1]
    btf_cache.forget()
    _fake_btf(tmp_path / "vmlinux", b"other types, other size")  # new content, times, size
    assert _get(cache, btf, Counter([2])) == [2]
    btf_cache.forget()
    st = os.stat(btf)  # same size and content, other mtime: a new boot's sysfs file
    os.utime(btf, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    again = Counter([3])
    assert _get(cache, btf, again) == [3] and again.calls == 1


def test_the_stamp_names_kernel_btf_and_catalogue(tmp_path: Path) -> None:
    btf = _fake_btf(tmp_path / "vmlinux")
    st = btf_cache.stamp(btf)
    assert st is not None
    u = os.uname()
    assert (st["release"], st["version"], st["machine"]) == (u.release, u.version, u.machine)
    assert st["btf_size"] == str(os.path.getsize(btf)) and st["btf_header"].startswith("9feb01")
    assert st["btf_path"] == btf and st["catalogue"]
    assert btf_cache.stamp(str(tmp_path / "none")) is None


def test_fields_survive_tabs_newlines_and_backslashes(tmp_path: Path) -> None:
    btf = _fake_btf(tmp_path / "vmlinux")
    odd = ["a\tb", "c\nd\r", "back\\slash\\t", "", "@not a fact"]

    def get(fact: Counter) -> Any:
        return btf_cache.cached(
            str(tmp_path), "odd", fact, lambda v: [tuple(v)], lambda rows: list(rows[0]), btf
        )

    assert get(Counter(odd)) == odd
    btf_cache.forget()
    fact = Counter(None)
    assert get(fact) == odd and fact.calls == 0


def _replace_line(path: Path, index: int, line: str) -> None:
    lines = path.read_text().split("\n")
    lines[index] = line
    path.write_text("\n".join(lines))


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b"\xff{not text"),
        lambda p: p.write_text(""),
        lambda p: p.write_text(p.read_text()[:-1]),  # cut short
        lambda p: _replace_line(p, 0, "nettracer-btf-cache 99"),
        lambda p: _replace_line(
            p, 1, p.read_text().split("\n")[1].replace("catalogue=", "catalogue=x")
        ),
        lambda p: _replace_line(p, 2, "no fact name"),
        lambda p: _replace_line(p, 3, "1\t2\tnot a number"),
        lambda p: _replace_line(p, 3, "1\tbad \\q escape"),
        lambda p: p.write_text(p.read_text() + "1\t2\t3\n"),  # two rows
        lambda p: _replace_line(p, 3, "7\t9"),  # a value decode accepts: the checksum
        lambda p: _replace_line(p, 4, "#crc32=00000000"),
        lambda p: _replace_line(p, 4, ""),
    ],
)
def test_damaged_cache_is_recomputed_and_rewritten(tmp_path: Path, damage: Any) -> None:
    btf = _fake_btf(tmp_path / "vmlinux")
    cache = tmp_path / "cache"
    assert _get(str(cache), btf, Counter([7, 8])) == [7, 8]
    (path,) = cache.iterdir()
    damage(path)
    btf_cache.forget()
    fact = Counter([7, 8])
    assert _get(str(cache), btf, fact) == [7, 8] and fact.calls == 1
    btf_cache.forget()
    assert _get(str(cache), btf, fact) == [7, 8] and fact.calls == 1  # rewritten


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
    text = path.read_text()
    dev = f"field\tsk_buff.dev\t{fresh.offset('sk_buff.dev')}\t8\n"
    inum = f"field\tnet.ns.inum\t{fresh.offset('net.ns.inum')}\t4\n"
    assert dev in text and inum in text
    for damaged in (
        text.replace(dev, ""),  # a field missing
        text.replace(inum, inum.replace("\t4\n", "\t8\n")),  # a wrong size
        text.replace(dev, dev.replace("\t8\n", "\t8\textra\n")),  # a bad row
    ):
        path.write_text(damaged)
        btf_cache.forget()
        o = offsets_for("btf", cache_dir=str(tmp_path))
        assert o.to_json() == fresh.to_json() and o.unresolved == fresh.unresolved
        assert path.read_text() == text  # rewritten
    btf_cache.forget()
    o = offsets_for("btf", cache_dir=str(tmp_path))
    assert o.offset("sk_buff.dev") == fresh.offset("sk_buff.dev")


@pytest.mark.kernel
def test_kfree_skb_args_and_reasons_from_the_cache_match_btf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _need_btf()
    from nettracer.kernel.btf import Btf
    from nettracer.tracers.drops import monitor as drops

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


@pytest.mark.kernel
def test_one_offset_edited_in_a_real_cache_gives_btf_again(tmp_path: Path) -> None:
    """The report behind the checksum: one offset changed by hand in the cache made
    every device ``-`` while the source still said btf. The edited file is refused by
    the function and by the command, which answer BTF's value and rewrite the file."""
    _need_btf()
    import json
    import subprocess
    import sys

    from nettracer.layout.btf_offsets import btf_offsets
    from nettracer.layout.source import offsets_for

    want = btf_offsets().offset("sk_buff.dev")
    offsets_for("btf", cache_dir=str(tmp_path))
    (path,) = tmp_path.iterdir()
    good = path.read_text()
    row = f"field\tsk_buff.dev\t{want}\t8\n"
    assert row in good
    edited = good.replace(row, f"field\tsk_buff.dev\t{want + 8}\t8\n")

    path.write_text(edited)
    btf_cache.forget()
    o = offsets_for("btf", cache_dir=str(tmp_path))
    assert o.source == "btf" and o.offset("sk_buff.dev") == want
    assert path.read_text() == good

    path.write_text(edited)
    r = subprocess.run(
        [
            *(sys.executable, "-m", "nettracer", "offsets", "--source", "btf", "--json"),
            *("--cache-dir", str(tmp_path), "--config", os.devnull),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    out = json.loads(r.stdout)
    assert out["source"] == "btf" and out["fields"]["sk_buff.dev"]["offset"] == want
    assert path.read_text() == good
