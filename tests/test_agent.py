"""``nettracer agent`` on the real kernel: what /metrics says against traffic the test makes.

The agent runs in a subprocess on 127.0.0.1 with a free port.  Ground truth: in a
network namespace of our own (only ``lo``), N UDP datagrams to a closed port, each one
confirmed dropped by the ICMP port unreachable its connected socket gets back
(``ECONNREFUSED``: ``__udp4_lib_rcv`` sends it right before it frees the skb with
``NO_SOCKET``), and one TCP connection carrying B bytes each way, opened and closed.
Other tests run at the same time, so drops are compared exactly for our namespace only
and the aggregate connection counters by how much they grew.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from conftest import kernel_skip

N_DROPS = 25
TCP_BYTES = 100_000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = (
    "import sys; from nettracer.cli import main; "
    "main.COMMANDS = (*main.COMMANDS, 'agent') if 'agent' not in main.COMMANDS else "
    "main.COMMANDS; sys.exit(main.main(sys.argv[1:]))"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "agent", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] of one scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(m: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(
        v for ls, v in m.get(name, []) if all(ls.get(k) == want for k, want in labels.items())
    )


def wait_ready(proc: subprocess.Popen[str], port: int, timeout: float = 120) -> None:
    """Until the agent has attached and read the maps once, or has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"agent exited {proc.returncode}: {proc.stderr.read()}")  # type: ignore[union-attr]
        try:
            if value(scrape(port), "nettracer_refreshes_total") >= 1:
                return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail("agent did not start serving metrics")


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


def progs() -> tuple[set[int], set[int]]:
    """(ids of the loaded BPF programs, pids bpftool says hold one: empty when bpftool
    was built without its pid iterator, as Debian's 7.1 is)."""
    if shutil.which("bpftool") is None:
        kernel_skip("needs bpftool")
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out or "[]")
    return {p["id"] for p in loaded}, {x["pid"] for p in loaded for x in p.get("pids", [])}


def held_prog_ids(pid: int) -> set[int]:
    """Programs process ``pid`` holds, from its fds' ``prog_id:`` lines (programs and links)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


@pytest.fixture
def netns() -> Iterator[str]:
    if shutil.which("ip") is None:
        kernel_skip("needs iproute2 (ip netns)")
    name = f"ntagent{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(
            ["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def in_netns(name: str, fn, *args):  # type: ignore[no-untyped-def]
    """Run ``fn`` in a thread that has entered namespace ``name`` (setns is per thread)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    result: list[object] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            result.append(fn(*args))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result[0]


def udp_to_closed_port(n: int) -> int:
    """``n`` datagrams to a port nobody listens on; how many came back refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # bound by us, released below: nobody has it
    refused = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.1", closed))
        s.settimeout(5)
        for _ in range(n):
            s.send(b"x")
            try:
                s.recv(16)
            except ConnectionRefusedError:
                refused += 1
            except TimeoutError:
                pass
    return refused


def tcp_exchange(nbytes: int) -> None:
    """One TCP connection over lo: ``nbytes`` each way, then closed by both ends."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        c = socket.create_connection(srv.getsockname())
        a, _ = srv.accept()
        with c, a:
            c.sendall(b"c" * nbytes)
            got = 0
            while got < nbytes:
                got += len(a.recv(65536))
            a.sendall(b"s" * nbytes)
            got = 0
            while got < nbytes:
                got += len(c.recv(65536))
            c.shutdown(socket.SHUT_WR)
            assert a.recv(1) == b""
            a.shutdown(socket.SHUT_WR)
            assert c.recv(1) == b""


@pytest.mark.kernel
def test_agent_metrics(netns: str) -> None:
    port = free_port()
    inode = os.stat(f"/run/netns/{netns}").st_ino
    proc = agent("--listen", f"127.0.0.1:{port}")
    try:
        wait_ready(proc, port)
        pid = proc.pid
        held = held_prog_ids(pid)
        assert held and held <= progs()[0]  # the check after exit below means something
        before = scrape(port)
        assert value(before, "nettracer_drops_total", netns=str(inode)) == 0
        refused = in_netns(netns, udp_to_closed_port, N_DROPS)
        assert refused == N_DROPS  # every datagram reached the port and was dropped
        tcp_exchange_in = in_netns(netns, tcp_exchange, TCP_BYTES)
        assert tcp_exchange_in is None

        deadline = time.monotonic() + 30
        while True:
            after = scrape(port)
            drops = value(after, "nettracer_drops_total", netns=str(inode))
            closed = value(
                after, "nettracer_connections_closed_total", proto="tcp", family="ipv4"
            ) - value(before, "nettracer_connections_closed_total", proto="tcp", family="ipv4")
            sent = value(after, "nettracer_tcp_bytes_sent_total") - value(
                before, "nettracer_tcp_bytes_sent_total"
            )
            got = value(after, "nettracer_tcp_bytes_received_total") - value(
                before, "nettracer_tcp_bytes_received_total"
            )
            done = drops >= N_DROPS and closed >= 2 and sent >= 2 * TCP_BYTES
            if (done and got >= 2 * TCP_BYTES) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert drops == N_DROPS
        ours = [ls for ls, _ in after["nettracer_drops_total"] if ls["netns"] == str(inode)]
        assert {ls["reason"] for ls in ours} <= {"NO_SOCKET", ""}
        assert {ls["protocol"] for ls in ours} == {"IPv4"}
        assert {ls["device"] for ls in ours} == {"lo"}
        # both ends of our connection closed; each side sent TCP_BYTES and received them
        assert closed >= 2
        assert sent >= 2 * TCP_BYTES and got >= 2 * TCP_BYTES
        for name in (
            "nettracer_drops_lost_total",
            "nettracer_tcp_retransmits_total",
            "nettracer_connections_evicted_total",
        ):
            assert name in after
        assert {ls["tracer"] for ls, _ in after["nettracer_events_lost_total"]} == {
            "drops",
            "conns",
        }
        (info,) = after["nettracer_build_info"]
        assert info[0]["kernel"] == os.uname().release and info[1] == 1
        (offsets,) = after["nettracer_offsets_info"]
        assert offsets[0]["source"] in ("btf", "guess", "profile") and offsets[1] == 1
        # counters never go down between scrapes
        again = scrape(port)
        for labels, v in after["nettracer_drops_total"]:
            assert value(again, "nettracer_drops_total", **labels) >= v
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert "Traceback" not in err
    loaded, pids = progs()
    assert not held & loaded and pid not in pids


@pytest.mark.kernel
def test_agent_without_conns_and_duration() -> None:
    port = free_port()
    proc = agent("--listen", f"127.0.0.1:{port}", "--no-conns", "--duration", "600")
    try:
        wait_ready(proc, port)
        m = scrape(port)
        assert "nettracer_drops_total" in m or "nettracer_drops_lost_total" in m
        assert "nettracer_connections_closed_total" not in m
        assert {ls["tracer"] for ls, _ in m["nettracer_events_lost_total"]} == {"drops"}
    finally:
        code, err = stop(proc)
    assert code == 0, err


@pytest.mark.kernel
def test_agent_duration_ends_it() -> None:
    port = free_port()
    proc = agent("--listen", f"127.0.0.1:{port}", "--no-drops", "--duration", "1")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "metrics on http://127.0.0.1:" in err


@pytest.mark.kernel
def test_agent_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = agent("--listen", f"127.0.0.1:{port}")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "in use" in lines[0] and str(port) in lines[0], err


@pytest.mark.kernel
def test_agent_usage_errors() -> None:
    for args, what in (
        (["--listen", "nonsense"], "listen"),
        (["--no-conns", "--no-drops"], "nothing to trace"),
    ):
        proc = agent(*args)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert what in err and "Traceback" not in err


@pytest.mark.kernel
def test_agent_sigint_exits_0() -> None:
    port = free_port()
    proc = agent("--listen", f"127.0.0.1:{port}", "--no-conns")
    try:
        wait_ready(proc, port)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            stop(proc)
    assert proc.returncode == 0, err


@pytest.mark.parametrize("bound", [1, 3])
def test_drop_series_beyond_the_bound_fold_into_other(bound: int) -> None:
    """No kernel: the totals' bookkeeping (label sets kept, "other", counters monotonic)."""
    from nettracer.agent import OTHER, Agent, Totals

    a = Agent(None, None, offsets_source="btf", max_drop_series=bound)
    t = Totals()
    keys = [
        (f"f{i}+0x1", f"f{i}", "kernel", "NO_SOCKET", "lo", "IPv4", "1", "", "") for i in range(5)
    ]
    a._add_drops(t, {k: 1 for k in keys}, 0)
    a._add_drops(t, {k: 2 for k in keys}, 3)
    kept = [k for k in t.drops if k != OTHER]
    assert kept == keys[:bound]
    assert all(t.drops[k] == 3 for k in kept)
    assert t.drops[OTHER] == 3 * (5 - bound)
    assert t.folded_keys == 5 - bound
    assert sum(t.drops.values()) == 15 and t.drops_lost == 3


def test_connection_series_per_container_are_bounded() -> None:
    """No kernel: connections of more containers than the bound are summed in "other";
    RTTs land in the bucket whose bound is the first at or above them."""
    from types import SimpleNamespace

    from nettracer.agent import OTHER_CONTAINER, RTT_BUCKETS, Agent, Totals
    from nettracer.kernel.cgroup import Cgroup, Container

    a = Agent(None, None, offsets_source="btf", max_container_series=2)
    ids = [f"{i:064x}" for i in range(4)]
    by_pid = {
        100 + i: Cgroup(f"/docker/{cid}", Container(cid, "docker")) for i, cid in enumerate(ids)
    }
    a.containers.by_pid = by_pid.get  # type: ignore[method-assign]

    def conn(pid: int, sent: int, rtt_us: int) -> SimpleNamespace:
        return SimpleNamespace(
            pid=pid, netns=0, proto="tcp", family=4, direction="local", bytes_sent=sent,
            bytes_received=0, retransmits=0, rtt_us=rtt_us, prev=(0, 0, 0, 0, 0),
        )  # fmt: skip

    t = Totals()
    closed = [conn(100 + i, 10 * (i + 1), 100) for i in range(4)]
    a._add_conns(t, SimpleNamespace(conns=[], closed=closed, evicted=0, lost=0))
    assert list(t.tcp) == [(ids[0], ""), (ids[1], ""), OTHER_CONTAINER]
    assert [v.bytes_sent for v in t.tcp.values()] == [10, 20, 30 + 40]
    assert t.conns_closed[("tcp", "ipv4", "other", "other")] == 2
    at = RTT_BUCKETS.index(0.0001)
    assert (
        t.tcp[OTHER_CONTAINER].rtt_buckets[at] == 2 and sum(t.tcp[OTHER_CONTAINER].rtt_buckets) == 2
    )
    assert t.tcp[OTHER_CONTAINER].rtt_sum == 2 * 0.0001


@pytest.mark.kernel
def test_busy_port_is_one_line_naming_the_flag() -> None:
    """The endpoint's error names the setting (agent.listen); the command says --listen."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = agent("--listen", f"127.0.0.1:{port}", "--duration", "1")
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert err == (
        f"nettracer: cannot listen on 127.0.0.1:{port}: the address is in use; choose "
        "another with --listen HOST:PORT\n"
    )
