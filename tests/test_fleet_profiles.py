"""``offsets.profile_dir``: one guess per kernel build for a fleet.

``nettracer offsets --save-dir DIR`` writes this kernel build's profile into DIR under the
name ``offsets.profile_dir`` looks for; ``auto`` without BTF (here: BTF looked for at a
path that does not exist) takes it from there before the cache and before guessing; a
profile of another kernel, under its own name or under this kernel's, is never used.
BTF's offsets are the oracle (the profile is saved from them).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nettracer.config import load_config
from nettracer.kernel.identity import current
from nettracer.layout.offsets import Field, Offsets
from nettracer.layout.profile import cache_path, save_profile
from nettracer.layout.source import offsets_for, profile_dir

ROOT = Path(__file__).resolve().parent.parent
NO_BTF = "/nonexistent/vmlinux"


def test_profile_dir_defaults_under_the_cache_dir() -> None:
    cfg = load_config(None, {}, environ={})
    assert profile_dir(cfg, "/var/cache/nettracer") == "/var/cache/nettracer/profiles"
    assert profile_dir(cfg, None) is None
    cfg = load_config(None, {}, environ={"NETTRACER_OFFSETS__PROFILE_DIR": "/etc/p"})
    assert profile_dir(cfg, "/var/cache/nettracer") == "/etc/p"


def save_dir_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nettracer", "offsets", "--offsets", "btf", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=ROOT,
    )


@pytest.mark.kernel
def test_saved_profile_is_used_before_the_cache_and_a_guess(tmp_path: Path) -> None:
    from conftest import kernel_skip

    from nettracer.layout.btf_offsets import btf_offsets

    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        kernel_skip("needs BTF (the oracle the profile is saved from)")
    shared, cache = tmp_path / "profiles", tmp_path / "cache"
    shared.mkdir()
    r = save_dir_cli("--save-dir", str(shared), "--json", "--cache-dir", str(tmp_path / "c0"))
    assert r.returncode == 0, r.stderr
    ident = current()
    (saved,) = shared.iterdir()
    assert str(saved) == cache_path(str(shared), ident)
    btf = btf_offsets()
    warnings: list[str] = []
    got = offsets_for(
        "auto", cache_dir=str(cache), profile_dir=str(shared), btf_path=NO_BTF,
        warn=warnings.append, identity=ident,
    )  # fmt: skip
    assert got.fields == btf.fields and got.source == "profile" and not warnings
    assert not cache.exists()  # nothing was guessed (a guess is cached there)

    # another kernel's profile, under its own name and under ours: never used
    other = dataclasses.replace(ident, version=ident.version + " other build")
    moved = {k: Field(f.offset + 8, f.size) for k, f in btf.fields.items()}
    wrong = Offsets("guess", moved)
    save_profile(cache_path(str(shared), other), wrong, other)
    save_profile(str(saved), wrong, other)  # under this kernel's name
    save_profile(cache_path(str(cache), ident), btf, ident, make_dirs=True)
    got = offsets_for(
        "auto", cache_dir=str(cache), profile_dir=str(shared), btf_path=NO_BTF,
        warn=warnings.append, identity=ident,
    )  # fmt: skip
    assert got.fields == btf.fields
    assert len(warnings) == 1 and "another kernel" in warnings[0] and str(shared) in warnings[0]


def test_save_dir_must_exist(tmp_path: Path) -> None:
    r = save_dir_cli("--save-dir", str(tmp_path / "missing"))
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert "does not exist" in line and "missing" in line
