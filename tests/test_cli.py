"""The command line as a user runs it: version, help, `nettracer kernel`, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nettracer import __version__


def nettracer(*args: str, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the CLI; ``unprivileged`` runs it in a fresh user namespace (uid 65534, no
    capabilities in the host's namespace), which is what a non-root user has."""
    prefix = ["unshare", "--user"] if unprivileged else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "nettracer", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version_and_help() -> None:
    out = nettracer("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"nettracer {__version__}"
    out = nettracer("--help")
    assert out.returncode == 0
    for command in ("drops", "conns", "read", "agent", "offsets", "kernel", "config"):
        assert command in out.stdout


def test_bad_option_is_one_line_exit_2() -> None:
    out = nettracer("kernel", "--no-such-option")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "unrecognized arguments" in out.stderr
    assert "Traceback" not in out.stderr


def test_errors_name_the_commands_flags() -> None:
    """Below the command line errors name settings (offsets.profile, offsets.source); the
    command prints its flags for them.  ``nettracer offsets`` takes the offsets source
    as ``--offsets`` like every command, and as ``--source`` (its first spelling)."""
    for flag in ("--offsets", "--source"):
        out = nettracer("offsets", flag, "btf", "--profile", "/nonexistent")
        assert out.returncode == 2
        assert out.stderr == "nettracer: --profile and --offsets btf exclude each other\n"


@pytest.mark.kernel
def test_kernel_json_matches_uname_and_probes() -> None:
    out = nettracer("kernel", "--json")
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    uname = os.uname()
    assert facts["kernel"]["release"] == uname.release
    assert facts["kernel"]["version"] == uname.version
    assert facts["kernel"]["machine"] == uname.machine
    assert facts["btf"]["present"] == os.path.exists("/sys/kernel/btf/vmlinux")
    assert facts["features"]["raw_tracepoint"] is True
    from nettracer.kernel.tracefs import find_tracefs

    found = find_tracefs()  # reported as it is: the command mounts nothing
    assert facts["tracefs"]["mounted"] is (found is not None)
    assert facts["tracefs"].get("path") == found


@pytest.mark.kernel
def test_kernel_table() -> None:
    out = nettracer("kernel")
    assert out.returncode == 0, out.stderr
    assert os.uname().release in out.stdout and "raw tracepoint" in out.stdout


@pytest.mark.kernel
def test_kernel_shows_the_path_kernel_without_forces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETTRACER_KERNEL__WITHOUT", "ringbuf,raw_tracepoint")
    out = nettracer("kernel", "--json")
    assert out.returncode == 0, out.stderr
    paths = json.loads(out.stdout)["paths"]
    assert paths["ringbuf"] == {
        "present": True,
        "since": "5.8",
        "forced": True,
        "uses": "perf event array",
    }
    assert paths["raw_tracepoint"]["uses"] == "classic tracepoints"
    assert paths["batch_ops"] == {
        "present": True,
        "since": "5.6",
        "forced": False,
        "uses": "batch map operations",
    }
    text = nettracer("kernel").stdout
    assert "yes (5.8) -> perf event array (forced by kernel.without)" in text
    monkeypatch.setenv("NETTRACER_KERNEL__WITHOUT", "ringbuf,nosuch")
    out = nettracer("kernel")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "unknown item 'nosuch'" in out.stderr and "batch_ops" in out.stderr


@pytest.mark.kernel
def test_not_root_is_one_line_exit_2() -> None:
    out = nettracer("kernel", unprivileged=True)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("nettracer: ") and out.stderr.count("\n") == 1
    assert "root" in out.stderr
