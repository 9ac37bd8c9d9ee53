"""Shared test plumbing.

Kernel-facing tests are marked ``@pytest.mark.kernel``; they need root and the
running kernel.  When they cannot run they skip with the reason, and
``NETTRACER_REQUIRE_KERNEL_TESTS=1`` (set by CI) turns every such skip into a
failure.  Use :func:`kernel_skip` instead of ``pytest.skip`` for any skip that
is about the kernel or the machine.
"""

from __future__ import annotations

import os

import pytest

REQUIRE = os.environ.get("NETTRACER_REQUIRE_KERNEL_TESTS") == "1"


def kernel_skip(reason: str) -> None:
    """Skip a kernel test with ``reason``, or fail when kernel tests are required."""
    if REQUIRE:
        pytest.fail(f"kernel test could not run (NETTRACER_REQUIRE_KERNEL_TESTS=1): {reason}")
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is not None and os.geteuid() != 0:
        kernel_skip("needs root (eBPF, tracefs and network namespaces)")


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _our_bpf_objects() -> list[str]:
    """Programs and links that this process still holds, as bpftool reports them."""
    import json
    import shutil
    import subprocess

    if shutil.which("bpftool") is None:
        return []
    held = []
    for kind in ("prog", "link"):
        out = subprocess.run(
            ["bpftool", "-j", kind, "show"], capture_output=True, text=True, check=False
        ).stdout
        try:
            objs = json.loads(out or "[]")
        except ValueError:
            continue
        for obj in objs:
            if any(p.get("pid") == os.getpid() for p in obj.get("pids", [])):
                held.append(f"{kind} {obj.get('id')} {obj.get('name', '')}")
    return held


@pytest.fixture(scope="session", autouse=True)
def no_leaks_at_session_end():
    """The session ends with the fds it started with, and no program or link of ours."""
    import gc

    before = _open_fds()
    yield
    gc.collect()
    leaked = sorted(_open_fds() - before)
    details = {
        fd: os.path.realpath(f"/proc/self/fd/{fd}")
        for fd in leaked
        if os.path.exists(f"/proc/self/fd/{fd}")
    }
    held = _our_bpf_objects() if os.geteuid() == 0 else []
    assert not held, f"bpf objects still held at the end of the session: {held}"
    assert not details, f"file descriptors leaked by the test session: {details}"
