"""Bad input as a new user gives it (issue 12): each case with its exit code and its
one-line message, bounded in time (a timeout) and memory (``RLIMIT_AS``)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest
from conftest import kernel_skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: address space a run may use (Python and the BTF of 6.18 fit well in it)
MEMORY_LIMIT = 1 << 30


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def nettracer(*args: str, timeout: float = 60, root: bool = False) -> subprocess.CompletedProcess:
    """``nettracer ARGS`` (the worktree's package), at most ``timeout`` seconds and
    :data:`MEMORY_LIMIT` bytes; ``root`` skips the test where we are not root."""
    if root and os.geteuid() != 0:
        kernel_skip("needs root")
    return subprocess.run(
        [sys.executable, "-m", "nettracer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT,
        preexec_fn=_limit,
    )


def one_line_error(out: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single stderr line of a failed run (after checking the exit code)."""
    assert out.returncode == code, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("nettracer: "), out.stderr
    assert "Traceback" not in out.stderr
    return out.stderr.strip()


# -- intervals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("drops", "--interval", "1e-9", "--duration", "1"),
        ("conns", "--interval", "0.01"),
        ("read", "kfree_skb", "skb->len", "--count", "--interval", "0.001"),
    ],
    ids=["drops", "conns", "read"],
)
def test_interval_below_the_bound_is_refused(args: tuple[str, ...]) -> None:
    line = one_line_error(nettracer(*args))
    assert "--interval: expected a number of seconds >= 0.1" in line
    assert f"see 'nettracer {args[0]} --help'" in line
    assert "at least 0.1" in nettracer(args[0], "--help").stdout


def test_interval_setting_below_the_bound_is_refused() -> None:
    env = dict(os.environ, NETTRACER_DROPS__INTERVAL_S="0.01", PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-m", "nettracer", "config", "show"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert "drops.interval_s: expected a number in 0.1..86400, found 0.01" in one_line_error(out)


@pytest.mark.kernel
@pytest.mark.parametrize(
    "args",
    [
        ("drops", "--json"),
        ("conns", "--json", "--no-gateway"),
        ("read", "kfree_skb", "skb->len", "--count", "--json"),
    ],
    ids=["drops", "conns", "read"],
)
def test_duration_ends_on_time_at_the_shortest_interval(args: tuple[str, ...]) -> None:
    """``--interval 0.1 --duration 1``: at most one report per interval and the last
    (partial) one -- never a catch-up burst -- and it ends by itself (the timeout)."""
    out = nettracer(*args, "--interval", "0.1", "--duration", "1", timeout=60, root=True)
    assert out.returncode == 0, out.stderr
    reports = [json.loads(line) for line in out.stdout.splitlines()]
    assert 1 <= len(reports) <= 11, len(reports)
