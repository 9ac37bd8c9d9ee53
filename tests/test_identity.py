"""Kernel identity: compared with ``uname`` and ``sha256sum`` run as separate programs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from nettracer.errors import NettracerError
from nettracer.kernel.identity import (
    BTF_VMLINUX,
    KernelIdentity,
    btf_sha256,
    current,
    kernel_arch,
    machine,
)


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def test_current_matches_uname() -> None:
    ident = current()
    assert ident.release == _run("uname", "-r")
    assert ident.version == _run("uname", "-v")
    assert ident.machine == _run("uname", "-m") == machine()
    assert ident.key() == (ident.release, ident.version, ident.machine)


def test_btf_hash_matches_sha256sum() -> None:
    ident = current()
    if not os.path.exists(BTF_VMLINUX):
        assert ident.btf_sha256 is None
        return
    assert ident.btf_sha256 == _run("sha256sum", BTF_VMLINUX).split()[0]


def test_btf_hash_of_file_and_missing(tmp_path: Path) -> None:
    blob = tmp_path / "vmlinux"
    blob.write_bytes(bytes(range(256)) * 100)
    assert btf_sha256(str(blob)) == _run("sha256sum", str(blob)).split()[0]
    assert btf_sha256(str(tmp_path / "none")) is None
    assert current(str(tmp_path / "none")).btf_sha256 is None


def test_json_round_trip() -> None:
    ident = KernelIdentity("6.18.0", "#1 SMP PREEMPT_DYNAMIC", "x86_64", "ab" * 32)
    data = json.loads(json.dumps(ident.to_json()))
    assert KernelIdentity.from_json(data) == ident
    none = KernelIdentity("6.1.0-13-amd64", "#1 SMP Debian", "x86_64", None)
    assert KernelIdentity.from_json(none.to_json()) == none
    assert "no BTF" in str(none)
    with pytest.raises(NettracerError, match="bad kernel identity"):
        KernelIdentity.from_json({"release": "x"})


def test_cache_name_is_a_file_name() -> None:
    a = KernelIdentity("6.18.44-fc/v669", "#1 SMP @0", "x86_64", None)
    b = KernelIdentity("6.18.44-fc/v669", "#2 SMP @0", "x86_64", None)
    assert "/" not in a.cache_name() and " " not in a.cache_name()
    assert a.cache_name() != b.cache_name()
    assert a.cache_name().startswith("6.18.44-fc_v669-x86_64-")


@pytest.mark.parametrize(
    ("uname_m", "arch"),
    [
        ("x86_64", "x86"),
        ("i686", "x86"),
        ("aarch64", "arm64"),
        ("armv7l", "arm"),
        ("s390x", "s390"),
        ("ppc64le", "powerpc"),
        ("riscv64", "riscv"),
        ("loongarch64", "loongarch"),
        ("mips64", "mips"),
        ("weird", "weird"),
    ],
)
def test_kernel_arch(uname_m: str, arch: str) -> None:
    assert kernel_arch(uname_m) == arch


def test_kernel_arch_of_this_machine() -> None:
    assert kernel_arch() == kernel_arch(_run("uname", "-m"))
