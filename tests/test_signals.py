"""Exit codes after signals, as a user meets them: one rule for every monitor.

A monitor (drops, conns, read, agent) stopped by SIGINT or SIGTERM exits 0 -- during
start-up as while running, and a second signal does not change it; ``nettracer agent``
reloads its configuration on SIGHUP.  "Start-up" is after the command line has installed
its handlers (``SigCgt`` in ``/proc/PID/status`` shows SIGTERM caught) and before the
command says it is attached; "running" is after that line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import kernel_skip, poll_until, read_stderr_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: what each monitor prints on stderr once attached
ATTACHED = "Ctrl-C to stop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(*args: str) -> subprocess.Popen[str]:
    """``nettracer ARGS`` with the worktree's package."""
    if os.geteuid() != 0:
        kernel_skip("monitors need root")
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "nettracer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def catches_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def read_until(proc: subprocess.Popen[str], text: str, timeout_s: float = 120) -> str:
    return read_stderr_until(proc, text, timeout_s)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"did not stop within 60 s: {err}")
    return proc.returncode, out, err


MONITORS = {
    "drops": ("drops", "--interval", "1"),
    "conns": ("conns", "--interval", "1", "--no-gateway"),
    "read": ("read", "kfree_skb", "skb->len"),
    "agent": ("agent", "--no-drops"),
}


def command(name: str) -> tuple[str, ...]:
    args = MONITORS[name]
    if name == "agent":
        args = (*args, "--listen", f"127.0.0.1:{free_port()}")
    return args


@pytest.mark.kernel
@pytest.mark.parametrize("name", sorted(MONITORS))
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_signal_during_start_up_exits_0(name: str, sig: int) -> None:
    proc = start(*command(name))
    caught = poll_until(lambda: proc.poll() is None and catches_sigterm(proc.pid), bool, 60, 0.001)
    assert caught, "the command line never installed its handlers"
    proc.send_signal(sig)
    code, _, err = finish(proc)
    assert code == 0, err
    assert ATTACHED not in err, err  # stopped before it attached
    assert "Traceback" not in err and "internal error" not in err, err


@pytest.mark.kernel
@pytest.mark.parametrize("name", sorted(MONITORS))
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_signal_while_running_exits_0_and_a_second_one_too(name: str, sig: int) -> None:
    proc = start(*command(name))
    seen = read_until(proc, ATTACHED)
    assert ATTACHED in seen, seen
    proc.send_signal(sig)
    proc.send_signal(signal.SIGTERM if sig == signal.SIGINT else signal.SIGINT)
    code, _, err = finish(proc)
    assert code == 0, seen + err
    assert "Traceback" not in err and "internal error" not in err, err


@pytest.mark.kernel
def test_two_signals_during_start_up_exit_0() -> None:
    proc = start(*command("drops"))
    assert poll_until(lambda: proc.poll() is None and catches_sigterm(proc.pid), bool, 60, 0.001)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    assert code == 0, err


@pytest.mark.kernel
def test_agent_reloads_its_configuration_on_sighup(tmp_path: object) -> None:
    """SIGHUP: a new setting (network.collect_udp) takes effect on /metrics; a bad file
    is refused in one line and the old configuration stays."""
    from test_agent import scrape, value, wait_ready

    path = os.path.join(str(tmp_path), "nettracer.yaml")

    def write(text: str) -> None:
        with open(path + ".new", "w") as f:
            f.write(text)
        os.replace(path + ".new", path)

    def udp_open(port: int) -> float:
        return value(scrape(port), "nettracer_connections_open", proto="udp")

    def udp_flow() -> socket.socket:
        """A UDP socket that sent one datagram over lo (to a socket that receives it)."""
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.sendto(b"x" * 100, rx.getsockname())
        assert rx.recv(200) == b"x" * 100
        rx.close()
        return tx

    write("network:\n  collect_udp: false\n")
    port = free_port()
    proc = start("agent", "--no-drops", "--listen", f"127.0.0.1:{port}", "--config", path)
    try:
        wait_ready(proc, port)
        assert ATTACHED in read_until(proc, ATTACHED)
        with udp_flow():
            assert udp_open(port) == 0  # a scrape refreshes first: UDP is not traced

        write("network:\n  collect_udp: true\n")
        proc.send_signal(signal.SIGHUP)
        seen = read_until(proc, "configuration reloaded", 60)
        assert "nettracer: configuration reloaded" in seen, seen
        with udp_flow():
            assert poll_until(lambda: udp_open(port), lambda n: n >= 1, 30, 0.2) >= 1

        write("network:\n  collect_udp: maybe\n")
        proc.send_signal(signal.SIGHUP)
        seen = read_until(proc, "not reloaded", 60)
        (line,) = [x for x in seen.splitlines() if "not reloaded" in x]
        assert line.startswith("nettracer: configuration not reloaded, the old one stays: ")
        assert "network.collect_udp" in line and "maybe" in line
        with udp_flow():  # UDP is still traced
            assert poll_until(lambda: udp_open(port), lambda n: n >= 1, 30, 0.2) >= 1
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc)
    assert code == 0, err
    assert "Traceback" not in err, err
