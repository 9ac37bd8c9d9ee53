"""Bad input as a new user gives it (issue 12): each case with its exit code and its
one-line message, bounded in time (a timeout) and memory (``RLIMIT_AS``)."""

from __future__ import annotations

import json
import os
import resource
import socket
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


# -- filters that can never match ------------------------------------------------------


def _unused_inode() -> int:
    """An inode no network namespace has: the inode of a regular file."""
    return os.stat(__file__).st_ino


@pytest.mark.kernel
@pytest.mark.parametrize(
    ("flag", "command"),
    [
        ("--netns", ("drops",)),
        ("--netns", ("conns",)),
        ("--netns", ("read", "kfree_skb", "skb->len")),
        ("--filter-netns", ("read", "kfree_skb", "skb->len")),  # read's first spelling
    ],
    ids=["drops", "conns", "read", "read-alias"],
)
def test_netns_that_is_no_network_namespace_is_refused(flag: str, command: tuple[str, ...]) -> None:
    for value, wanted in [
        ("/etc/hostname", "not a network namespace file"),
        ("/proc/self/ns/pid", "not a network namespace file"),
        (str(_unused_inode()), "no network namespace has inode"),
    ]:
        out = nettracer(*command, flag, value, "--duration", "1", root=True)
        line = one_line_error(out)
        assert line.startswith(f"nettracer: --netns {value}: {wanted}"), line


@pytest.mark.kernel
def test_netns_of_a_real_namespace_is_taken() -> None:
    inode = os.stat("/proc/self/ns/net").st_ino
    for value in ("/proc/self/ns/net", str(inode)):
        out = nettracer("drops", "--netns", value, "--duration", "0.2", root=True)
        assert out.returncode == 0, out.stderr


def test_pid_of_no_process_is_refused() -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        beyond = int(f.read()) + 1  # no process can have it
    line = one_line_error(nettracer("conns", "--pid", str(beyond)))
    assert (
        line
        == f"nettracer: argument --pid: no process has id {beyond} (see 'nettracer conns --help')"
    )


@pytest.mark.kernel
def test_device_that_no_namespace_has_warns_once() -> None:
    """It may appear later: a warning, not an error; the filter stays."""
    name = "nt-nodev-" + str(os.getpid() % 100000)
    assert name not in {n for _, n in socket.if_nameindex()}
    out = nettracer("drops", "--device", name, "--duration", "0.3", root=True)
    assert out.returncode == 0, out.stderr
    warnings = [x for x in out.stderr.splitlines() if "warning" in x]
    assert warnings == [
        f"nettracer: warning: --device {name}: no interface has this name in any network "
        f"namespace now; its drops are counted if one appears"
    ]


@pytest.mark.kernel
def test_device_in_another_namespace_does_not_warn() -> None:
    ns = f"nt-input-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(
            ["ip", "-n", ns, "link", "add", "ntveth0", "type", "veth", "peer", "ntveth1"],
            check=True,
        )
        out = nettracer("drops", "--device", "ntveth1", "--duration", "0.3", root=True)
        assert out.returncode == 0, out.stderr
        assert "warning" not in out.stderr, out.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.mark.kernel
def test_read_refuses_a_category_the_tracepoint_is_not_in() -> None:
    line = one_line_error(nettracer("read", "tcp:kfree_skb", "skb->len", root=True))
    assert (
        line == "nettracer: tracepoint tcp:kfree_skb: not in category 'tcp' (it is skb:kfree_skb)"
    )
    out = nettracer("read", "skb:kfree_skb", "skb->len", "--duration", "0.2", root=True)
    assert out.returncode == 0, out.stderr
    assert "(1 expression, " in out.stderr  # not "1 expressions"


# -- small ones ------------------------------------------------------------------------


def test_every_command_takes_config() -> None:
    from nettracer.cli.main import COMMANDS

    for command in COMMANDS:
        assert "--config" in nettracer(command, "--help").stdout, command


def test_by_keeps_the_users_order() -> None:
    from nettracer.output.drops import _columns

    def headers(by: tuple[str, ...]) -> list[str]:
        return [c.header for c, _ in _columns(by)]

    assert headers(("reason", "location")) == ["COUNT", "REASON", "LOCATION", "MODULE"]
    assert headers(("protocol", "device", "reason")) == ["COUNT", "PROTOCOL", "DEVICE", "REASON"]
    assert headers(("location", "device", "reason", "protocol")) == [
        "COUNT", "LOCATION", "DEVICE", "MODULE", "REASON", "PROTOCOL",
    ]  # fmt: skip
    assert headers(("module", "location")) == ["COUNT", "MODULE", "LOCATION"]


def test_none_lost_is_not_phrased_like_an_error() -> None:
    from nettracer.output.drops import lost_text

    assert lost_text(0, 1) == "# 1 event shown, 0 lost"
    assert lost_text(2, 5) == "# 5 events shown, 2 lost (ring buffer full or program busy)"
