"""``nettracer drops`` and ``nettracer conns`` name the container (kernel tests).

A worker process in a cgroup named like a Docker container's and in a network namespace
of its own (``test_deploy.docker_container``) sends UDP datagrams to a closed port and
makes one TCP connection; the JSON of both commands, filtered with ``--container``,
shows exactly those drops and that connection with the container's id.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import read_stderr_until
from test_deploy import ROOT, docker_container

N_DROPS = 7
TCP_BYTES = 4321


def cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "nettracer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=ROOT,
    )


def wait_line(proc: subprocess.Popen[str], word: str, timeout: float = 120) -> None:
    """Until a line of ``proc``'s stderr contains ``word`` (it has attached)."""
    seen = read_stderr_until(proc, word, timeout)
    if word in seen:
        return
    proc.kill()
    raise AssertionError(f"{proc.args} did not start: {seen}{proc.communicate()[1]}")


def finish(proc: subprocess.Popen[str]) -> list[dict[str, object]]:
    """SIGINT (the last report is printed), then every JSON line it wrote."""
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.mark.kernel
def test_drops_and_conns_name_the_container() -> None:
    with docker_container() as worker:
        cid = worker.cid
        drops = cli("drops", "--json", "--by", "container,reason", "--container", cid[:12])
        conns = cli("conns", "--json", "--container", cid, "--no-gateway")
        try:
            wait_line(drops, "attached")
            wait_line(conns, "tracing connections")
            assert worker.ask(f"drops {N_DROPS}") == N_DROPS
            worker.ask(f"tcp {TCP_BYTES}")
        finally:
            got_drops, got_conns = finish(drops), finish(conns)
    groups = [g for iv in got_drops for g in iv["drops"]]  # type: ignore[union-attr]
    container = {"id": cid, "runtime": "docker", "pod_uid": None}
    assert {g["container"]["id"] for g in groups} == {cid}  # type: ignore[index]
    assert sum(g["count"] for g in groups if g["reason"] == "NO_SOCKET") == N_DROPS  # type: ignore[misc]
    assert all(g["container"] == container for g in groups)  # type: ignore[index]
    assert all(g["cgroup"].endswith(f"/docker-{cid}.scope") for g in groups)  # type: ignore[union-attr]
    closed = [c for iv in got_conns for c in iv["closed"]]  # type: ignore[union-attr]
    open_ = [c for iv in got_conns for c in iv["conns"]]  # type: ignore[union-attr]
    tcp = [c for c in closed if c["proto"] == "tcp"]
    assert len(tcp) == 2  # both ends of the one connection, and nothing of anybody else
    assert all(c["container"] == container and c["netns"] == worker.netns for c in closed + open_)
    assert sorted(c["bytes_sent"] for c in tcp) == [TCP_BYTES, TCP_BYTES]
    assert {c["pid"] for c in tcp} == {worker.proc.pid}
