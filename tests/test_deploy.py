"""deploy/: every file checked by the real tool that will read it.

- the systemd unit by ``systemd-analyze verify`` (any complaint fails: it exits 0 on
  unknown keys) and ``systemd-analyze security --offline`` (exposure bound), its
  capability names against ``systemd-analyze capability``;
- the Kubernetes manifests by ``kubernetes-validate --strict``; the PodMonitor (a CRD
  the validator has no schema for) by its fields' agreement with the DaemonSet (its
  selector picks the DaemonSet's pods, its port names a container port) and, given the
  operator's CRD file (``NETTRACER_PODMONITOR_CRD``), by that CRD's schema, strictly;
- the alert rules by ``promtool check rules`` and ``promtool test rules`` (they fire on
  synthetic series, and only then), and each expression on a real Prometheus;
- the Grafana dashboard: every PromQL expression runs on a real Prometheus scraping a
  real ``nettracer agent`` (with the unit's capabilities only) while a process in a
  Docker-named cgroup and its own network namespace causes drops and TCP traffic;
  each returns exactly what that process caused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import kernel_skip

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "nettracer-agent.service"
K8S = DEPLOY / "kubernetes"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "nettracer.json"
#: the unit's `systemd-analyze security` exposure must stay at or below this
MAX_EXPOSURE = 4.0


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        kernel_skip(f"needs {tool} (scripts/install-test-deps)")
    assert path is not None
    return path


def unit_directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def unit_capabilities() -> list[str]:
    (caps,) = unit_directives(UNIT.read_text())["CapabilityBoundingSet"]
    return caps.split()


def verify_unit(text: str, tmp_path: Path) -> str:
    """``systemd-analyze verify`` of ``text`` with ExecStart's binary made to exist (a
    stub: the real one is installed elsewhere here); everything it printed."""
    tool = need("systemd-analyze")
    stub = tmp_path / "bin" / "nettracer"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit = tmp_path / "nettracer-agent.service"
    unit.write_text(text.replace("/usr/local/bin/nettracer", str(stub)))
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True)
    return f"{r.returncode} {r.stdout}{r.stderr}".strip()


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert verify_unit(text, tmp_path) == "0"
    # the check can fail: a bad value and an unknown key are reported
    assert "sometimes" in verify_unit(text.replace("=on-failure", "=sometimes"), tmp_path)
    assert "ProtectHom" in verify_unit(text.replace("ProtectHome=", "ProtectHom="), tmp_path)
    d = unit_directives(text)
    assert d["Restart"] == ["on-failure"] and d["ProtectSystem"] == ["strict"]
    assert d["ProtectHome"] == ["yes"] and d["LimitMEMLOCK"] == ["infinity"]
    assert d["CacheDirectory"] == ["nettracer"]  # the only writable place: offsets cache
    assert d["AmbientCapabilities"] == d["CapabilityBoundingSet"]


def test_systemd_unit_capabilities_and_exposure(tmp_path: Path) -> None:
    tool = need("systemd-analyze")
    known = subprocess.run([tool, "capability"], capture_output=True, text=True, check=True)
    names = {line.split()[0].upper() for line in known.stdout.splitlines()[1:] if line.strip()}
    caps = unit_capabilities()
    assert set(caps) <= names, set(caps) - names
    assert set(caps) == {
        "CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SYS_PTRACE",
        "CAP_SYSLOG",
    }  # fmt: skip
    for cap in caps:  # each one says why it is there
        assert re.search(rf"^#\s+{cap}\s+\S", UNIT.read_text(), re.M), cap
    unit = tmp_path / "nettracer-agent.service"
    unit.write_text(UNIT.read_text())
    r = subprocess.run(
        [tool, "security", "--offline=yes", str(unit)], capture_output=True, text=True
    )
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE


def k8s_docs() -> dict[str, dict[str, Any]]:
    out = {}
    for f in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            out[doc["kind"]] = doc
    return out


def test_kubernetes_manifests_validate() -> None:
    tool = need("kubernetes-validate")
    files = sorted(K8S.glob("*.yaml"))
    r = subprocess.run([tool, "--strict", *map(str, files)], capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for f in files:
        if f.name != "podmonitor.yaml":
            assert re.search(rf"{f.name} passed for resource", out), out
    # a mistake is caught: an unknown field under --strict
    ds = (K8S / "daemonset.yaml").read_text().replace("hostPID: true", "hostPIDs: true")
    r = subprocess.run([tool, "--strict", "-"], input=ds, capture_output=True, text=True)
    assert r.returncode != 0 and "hostPIDs" in r.stdout + r.stderr


def test_kubernetes_daemonset_matches_unit_and_podmonitor() -> None:
    from nettracer.config.schema import SCHEMA

    docs = k8s_docs()
    ds, pm, svc = docs["DaemonSet"], docs["PodMonitor"], docs["Service"]
    pod = ds["spec"]["template"]
    spec = pod["spec"]
    assert spec["hostNetwork"] and spec["hostPID"]
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["privileged"]
    assert {f"CAP_{n}" for n in sc["capabilities"]["add"]} == set(unit_capabilities())
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    paths = {v["name"]: v.get("hostPath", {}).get("path") for v in spec["volumes"]}
    for where in ("/sys/kernel/btf", "/sys/kernel/tracing", "/var/cache/nettracer"):
        assert paths[mounts[where]] == where
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    assert set(env) <= {k.env_var for k in SCHEMA.values()}
    assert env["NETTRACER_OFFSETS__CACHE_DIR"] == "/var/cache/nettracer"
    profiles = next(
        v for v in spec["volumes"] if v["name"] == mounts[env["NETTRACER_OFFSETS__PROFILE_DIR"]]
    )
    assert profiles["configMap"]["optional"] is True
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    # the PodMonitor (monitoring.coreos.com/v1, no schema in kubernetes-validate) and
    # the Service select the DaemonSet's pods and name its metrics port
    labels = pod["metadata"]["labels"]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    assert pm["spec"]["namespaceSelector"]["matchNames"] == [ds["metadata"]["namespace"]]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert svc["spec"]["ports"][0]["targetPort"] in ports
    assert c["args"][:3] == ["agent", "--listen", f"0.0.0.0:{ports['metrics']}"]
    unknown = set(pm["spec"]) - {"selector", "namespaceSelector", "podMetricsEndpoints"}
    assert not unknown
    for ep in pm["spec"]["podMetricsEndpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "relabelings"}


def test_alert_rules_check_and_fire() -> None:
    tool = need("promtool")
    r = subprocess.run([tool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS: 5 rules found" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(
        [tool, "test", "rules", "alerts.test.yaml"],
        capture_output=True,
        text=True,
        cwd=ALERTS.parent,
    )
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard."""
    d = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]


def test_dashboard_shape() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert {v["name"] for v in d["templating"]["list"]} == {"datasource", "instance", "container"}
    targets = dashboard_targets()
    assert len(targets) == 18
    for title, expr in targets:
        assert "nettracer_" in expr, title
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))


# -- the dashboard on a real Prometheus scraping a real agent ---------------------------
N_WARM, N_DROPS = 1, 40
W_BYTES, B_BYTES = 1000, 123_457


class Worker:
    """``tests/fleet_worker.py`` in network namespace ``netns`` and cgroup ``cgroup``."""

    def __init__(self, netns: str, cgroup: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, str(ROOT / "tests/fleet_worker.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}"),
        )
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(self.proc.pid))  # before it does anything: `ip netns exec` execs
        self.cid = ""  # set by docker_container()
        self.netns = 0

    def ask(self, line: str) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, f"worker died on {line!r}"
        return int(answer)

    def close(self) -> None:
        self.proc.kill()
        self.proc.communicate()  # reaps it and closes our ends of its pipes


def agent_with_unit_caps(port: int) -> subprocess.Popen[str]:
    """``nettracer agent`` as the unit runs it: root, with the unit's capabilities only."""
    from test_agent import LAUNCH

    caps = ",".join(f"+{c.removeprefix('CAP_').lower()}" for c in unit_capabilities())
    return subprocess.Popen(
        [
            need("setpriv"),
            f"--bounding-set=-all,{caps}",
            "--",
            sys.executable,
            "-c",
            LAUNCH,
            "agent",
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=ROOT,
    )


def wait_agent(port: int, cid: str, drops: int, sent: int, closed: int) -> None:
    """Until the agent itself reports these totals for container ``cid``."""
    from test_agent import scrape, value

    deadline = time.monotonic() + 60
    while True:
        m = scrape(port)
        got = (
            value(m, "nettracer_drops_total", container_id=cid),
            value(m, "nettracer_tcp_bytes_sent_total", container_id=cid),
            value(m, "nettracer_connections_closed_total", proto="tcp", container_id=cid),
        )
        if got == (drops, sent, closed):
            return
        assert time.monotonic() < deadline, f"agent shows {got}, want {(drops, sent, closed)}"
        time.sleep(0.2)


def scrape_after(prom: Any, wall: float) -> int:
    """The timestamp (ms) of Prometheus' first scrape that started after ``wall``."""
    deadline = time.monotonic() + 60
    while True:
        for _, samples in prom.samples('up{job="nettracer"}', "30s"):
            later = [t for t, v in samples if t > wall and v == 1]
            if later:
                return round(later[0] * 1000)
        assert time.monotonic() < deadline, "Prometheus did not scrape the agent"
        time.sleep(0.2)


def instant(prom: Any, expr: str, at_ms: int, window_ms: int, target: str, cid: str) -> Any:
    """``expr`` with the dashboard's variables set: this agent, this container, and a
    range that starts and ends on a scrape (so rate/increase do not extrapolate)."""
    for var, val in (
        ("$__rate_interval", f"{window_ms}ms"),
        ("$__range", f"{window_ms}ms"),
        ("$instance", target),  # a regex matching itself (dots match dots too)
        ("$container", cid),
    ):
        expr = expr.replace(var, val)
    assert "$" not in expr, expr
    return prom.query(expr, at=at_ms / 1000)


@contextlib.contextmanager
def docker_container() -> Iterator[Worker]:
    """A worker in a cgroup named like a Docker container's (``docker-<id>.scope`` under
    the cgroup v2 mount) and a network namespace of its own; all removed afterwards.
    The worker has ``cid`` (the container id) and ``netns`` (the namespace inode)."""
    from test_cgroup import cgroup_dir

    from nettracer.kernel.cgroup import cgroup2_mount

    need("ip")
    root = cgroup2_mount()
    if root is None:
        kernel_skip("no cgroup v2 hierarchy mounted")
    assert root is not None
    cid = secrets.token_hex(32)
    name = f"ntfleet{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        slice_ = f"nettracer-fleet-{os.getpid()}.slice"
        with cgroup_dir(root, slice_, f"docker-{cid}.scope") as cg:
            worker = Worker(name, cg)
            worker.cid, worker.netns = cid, os.stat(f"/run/netns/{name}").st_ino
            try:
                yield worker
            finally:
                worker.close()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.kernel
def test_dashboard_on_real_prometheus(tmp_path: Path) -> None:
    from prom import prometheus
    from test_agent import free_port, stop, wait_ready

    port = free_port()
    target = f"127.0.0.1:{port}"
    agent = agent_with_unit_caps(port)
    try:
        wait_ready(agent, port)
        with (
            docker_container() as worker,
            prometheus(tmp_path, target, rules=ALERTS) as prom,
        ):
            t1 = check_dashboard(prom, worker, port, target, worker.cid, worker.netns)
            check_alert_rules(prom, t1, worker.cid)
    finally:
        code, err = stop(agent)
    assert code == 0, err


def per_second(expr: str) -> bool:
    """Whether a query is a rate (a sum of ``rate()``), not a ratio, quantile or total."""
    return "rate(" in expr and " / " not in expr and "histogram_quantile" not in expr


def check_alert_rules(prom: Any, at_ms: int, cid: str) -> None:
    """Prometheus loaded and evaluated every rule of alerts.yaml without an error; each
    expression runs at ``at_ms``, and the container drop rule's rate (its threshold
    taken off) has our container."""
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    deadline = time.monotonic() + 30
    while True:
        loaded = prom.rules()
        if all(r["lastEvaluation"] > "1970-01-02" for r in loaded) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {r["name"] for r in loaded} == {r["alert"] for r in rules}
    assert all(r["health"] == "ok" and not r.get("lastError") for r in loaded), loaded
    for rule in rules:
        prom.query(rule["expr"], at=at_ms / 1000)
    (container_rule,) = [r for r in rules if r["alert"] == "NettracerContainerPacketDrops"]
    rate = container_rule["expr"].rsplit(" > ", 1)[0]
    got = {ls.get("container_id"): v for ls, v in prom.query(rate, at=at_ms / 1000)}
    assert got.get(cid, 0) > 0, got


def check_dashboard(prom: Any, worker: Worker, port: int, target: str, cid: str, ns: int) -> int:
    """Warm up (so that every series of ours exists before the window), cause the
    traffic the window is about, then run every dashboard query over that window; the
    time (ms) of the window's end."""
    worker.ask("keep")  # stays open: two ends, direction local
    worker.ask(f"tcp {W_BYTES}")
    assert worker.ask(f"drops {N_WARM}") == N_WARM
    retrans0 = worker.ask("retrans")
    wait_agent(port, cid, N_WARM, 2 * W_BYTES, 2)
    t0 = scrape_after(prom, time.time())
    worker.ask(f"tcp {B_BYTES}")
    assert worker.ask(f"drops {N_DROPS}") == N_DROPS  # each one refused: really dropped
    retrans = worker.ask("retrans") - retrans0
    wait_agent(port, cid, N_WARM + N_DROPS, 2 * (W_BYTES + B_BYTES), 4)
    t1 = scrape_after(prom, time.time())
    window = t1 - t0
    got = []
    for _, expr in dashboard_targets():
        scale = window / 1000 if per_second(expr) else 1
        got.append([(ls, v * scale) for ls, v in instant(prom, expr, t1, window, target, cid)])

    # rates are multiplied by the window: counts over it, like increase()

    def one(i: int) -> tuple[dict[str, str], Any]:
        ((labels, v),) = got[i]
        return labels, pytest.approx(v, rel=1e-9)

    cl = {"container_id": cid}  # pod_uid is empty: Prometheus drops empty labels
    assert one(0) == ({"reason": "NO_SOCKET"}, N_DROPS)
    location, n = one(1)
    assert n == N_DROPS and location["location"]
    assert one(2) == ({"device": "lo", "netns": str(ns)}, N_DROPS)
    assert one(3) == (cl, N_DROPS)
    assert one(4) == (cl | {"reason": "NO_SOCKET", "device": "lo"} | location, N_DROPS)
    assert one(5) == (cl, 2 * B_BYTES)  # each end sent B and received B
    assert one(6) == (cl, 2 * B_BYTES)
    assert one(7) == (cl, retrans)  # the namespace's own Tcp RetransSegs
    (p50, p99, mean) = (one(i)[1].expected for i in (8, 9, 10))
    assert 0 < p50 <= p99 <= 2.5 and 0 < mean <= 2.5
    rtts = f'sum(increase(nettracer_tcp_rtt_seconds_count{{container_id="{cid}"}}[{window}ms]))'
    assert prom.query(rtts, at=t1 / 1000) == [({}, 2)]  # one RTT per closed end
    open_now = {(labels["proto"], labels["direction"]): v for labels, v in got[11] if v}
    assert open_now.pop(("tcp", "local")) == 2  # the kept connection's two ends
    # closed UDP sockets count as open until network.udp_conn_timeout_s (no close event);
    # each `drops` made two (one bound, one connected)
    assert set(open_now) <= {("udp", "local")} and open_now.get(("udp", "local"), 0) <= 4
    closed = {labels["proto"]: pytest.approx(v, rel=1e-9) for labels, v in got[12]}
    assert closed["tcp"] == 2
    assert one(13) == (cl, 2 * B_BYTES)
    assert one(14) == (cl, 2 * B_BYTES)
    assert {labels["tracer"] for labels, _ in got[15]} == {"drops", "conns"}
    assert all(v >= 0 for _, v in got[15])
    assert one(16)[1].expected >= 0 and one(17)[1].expected > 0
    return t1


def closed(schema: Any) -> None:
    """Make every object schema with properties reject unknown members, as the API server's
    structural-schema pruning (and ``kubernetes-validate --strict``) would refuse them."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema:
            schema.setdefault("additionalProperties", False)
        for v in schema.values():
            closed(v)
    elif isinstance(schema, list):
        for v in schema:
            closed(v)


def test_podmonitor_against_the_operator_crd() -> None:
    """The PodMonitor against the prometheus-operator's own CRD schema (its
    ``monitoring.coreos.com_podmonitors.yaml``, which this repository does not ship),
    given as ``NETTRACER_PODMONITOR_CRD=PATH``; strict: unknown fields fail."""
    import jsonschema

    path = os.environ.get("NETTRACER_PODMONITOR_CRD")
    if not path:
        pytest.skip("NETTRACER_PODMONITOR_CRD not set (path of the operator's PodMonitor CRD)")
    crd = yaml.safe_load(Path(path).read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = v1["schema"]["openAPIV3Schema"]
    closed(schema)
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: validated above
    doc = k8s_docs()["PodMonitor"]
    jsonschema.validate(doc, schema)
    typo = dict(doc, spec=dict(doc["spec"], podMetricEndpoints=[]))
    with pytest.raises(jsonschema.ValidationError, match="podMetricEndpoints"):
        jsonschema.validate(typo, schema)
