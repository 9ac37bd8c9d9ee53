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
