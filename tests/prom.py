"""A real Prometheus server for tests: started on a free loopback port, queried over HTTP.

:func:`prometheus` starts Debian's ``prometheus`` (2.42) with a private storage directory
under the test's ``tmp_path`` and a 1 s scrape interval, scraping the one target it is
given (job ``nettracer``), waits for ``/-/ready`` with a deadline and always stops the
process it started (SIGTERM, then SIGKILL after a deadline; by its pid, never by name).
:meth:`Prometheus.query` runs an instant PromQL query through ``/api/v1/query`` with
urllib only.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from conftest import kernel_skip

#: seconds to wait for the server to be ready, and for it to exit after SIGTERM
START_DEADLINE_S = 60.0
STOP_DEADLINE_S = 30.0

Vector = list[tuple[dict[str, str], float]]


class PromError(Exception):
    """Prometheus answered a query with an error (a bad expression, say)."""


def free_port() -> int:
    """A loopback TCP port nobody listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A running server: its base URL and the log file its stderr goes to."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    def _get(self, path: str, params: dict[str, str]) -> object:
        q = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{q}", timeout=30) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 400/422: the error is in the JSON body
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PromError(f"{params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> Vector:
        """An instant query at time ``at`` (now if None): [(labels, value)] of a vector,
        or one unlabelled value for a scalar.  A range vector result is an error."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", params)
        assert isinstance(data, dict)
        kind, result = data["resultType"], data["result"]
        if kind == "scalar":
            return [({}, float(result[1]))]
        if kind != "vector":
            raise PromError(f"{expr}: a {kind}, not an instant vector")
        return [(r["metric"], float(r["value"][1])) for r in result]

    def samples(
        self, selector: str, window: str, at: float | None = None
    ) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
        """The raw samples of ``selector[window]``: [(labels, [(timestamp, value)])]."""
        params = {"query": f"{selector}[{window}]"}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", params)
        assert isinstance(data, dict) and data["resultType"] == "matrix"
        return [
            (r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in data["result"]
        ]

    def rules(self) -> list[dict[str, object]]:
        """Every rule the server loaded, with its ``health`` and ``lastEvaluation``."""
        data = self._get("/api/v1/rules", {})
        assert isinstance(data, dict)
        return [r for g in data["groups"] for r in g["rules"]]

    def targets_up(self) -> bool:
        """Whether the last scrape of every target succeeded."""
        got = self.query('up{job="nettracer"}')
        return bool(got) and all(v == 1 for _, v in got)


def _config(target: str, interval: str, rules: Path | None) -> str:
    return (
        "global:\n"
        f"  scrape_interval: {interval}\n"
        f"  evaluation_interval: {interval}\n"
        + (f"rule_files: ['{rules}']\n" if rules is not None else "")
        + "scrape_configs:\n"
        "  - job_name: nettracer\n"
        f"    scrape_timeout: {interval}\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )


def _wait_ready(prom: Prometheus, deadline: float) -> None:
    while time.monotonic() < deadline:
        if prom.proc.poll() is not None:
            raise RuntimeError(
                f"prometheus exited {prom.proc.returncode}: {prom.log.read_text()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"prometheus not ready in time: {prom.log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def prometheus(
    tmp_path: Path, target: str, interval: str = "1s", rules: Path | None = None
) -> Iterator[Prometheus]:
    """A Prometheus scraping ``target`` (``HOST:PORT``) every ``interval`` and evaluating
    the rule file ``rules`` as often; stopped on exit."""
    binary = shutil.which("prometheus")
    if binary is None:
        kernel_skip("needs Debian's prometheus (scripts/install-test-deps)")
    assert binary is not None
    root = tmp_path / "prometheus"
    (root / "data").mkdir(parents=True)
    (root / "prometheus.yml").write_text(_config(target, interval, rules))
    log = root / "prometheus.log"
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    try:
        prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
        _wait_ready(prom, time.monotonic() + START_DEADLINE_S)
        yield prom
    finally:
        _stop(proc)
