#!/usr/bin/env python3
"""Benchmark of ``nettracer conns``: short TCP connections on loopback.

Each connection: the client connects, sends 1 KiB, receives 1 KiB and closes; the server
accepts, receives 1 KiB, sends 1 KiB and closes.  ``--procs`` client processes (and as
many single-connection-at-a-time server processes, one port each) offer ``--rate``
connections a second in total for ``--seconds`` seconds (paced; ``--rate 0`` runs
unpaced, as fast as they can); a run is bounded in count (rate x seconds, or
``--max-conns`` unpaced) and in time (3 x seconds + 10).

Everything runs in a network namespace of its own (``ntcbench<pid>``, deleted at the
end), so the ports, TIME_WAIT sockets and the tracer's ``--netns`` filter concern only
this load.  Rounds alternate without and with ``nettracer conns --json --interval 1
--netns <inode> --no-gateway --stats`` attached; for each traced round it checks that
every connection was reported closed exactly once on both ends with exactly 1024 bytes
each way, and reads the tracer's peak RSS and CPU time (``wait4``).

``--routed`` puts the servers in a second namespace behind a veth and a gateway
(clients connect to 10.97.2.1 via 10.97.1.2) and runs the tracer with gateway lookups:
every client end must then be reported with gateway 10.97.1.2 (the server ends are in
the other namespace, not traced).

Prints one line per round, then medians and the ratio traced/untraced.  Run as root:

    python3 bench/bench_conns.py --rate 10000 --seconds 5 --rounds 3
    python3 bench/bench_conns.py --rate 10000 --seconds 5 --rounds 3 --routed
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAYLOAD = b"x" * 1024
BASE_PORT = 20000
#: --routed: the servers' address, the clients' gateway to it
ROUTED_SERVER, ROUTED_VIA = "10.97.2.1", "10.97.1.2"


# -- the load (runs inside the namespace) --------------------------------------------------


def _recv_exact(s: socket.socket, n: int) -> int:
    got = 0
    while got < n:
        b = s.recv(n - got)
        if not b:
            break
        got += len(b)
    return got


def _server(port: int, ready: Any, stop: Any, counts: Any, idx: int, ns: str | None) -> None:
    if ns:  # --routed: serve from the other namespace (setns(2), CLONE_NEWNET)
        import ctypes

        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        os.close(fd)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((ROUTED_SERVER if ns else "127.0.0.1", port))
    ls.listen(4096)
    ls.settimeout(0.2)
    ready.release()
    served = 0
    while not stop.is_set():
        try:
            s, _ = ls.accept()
        except TimeoutError:
            continue
        s.settimeout(None)
        if _recv_exact(s, 1024) == 1024:
            s.sendall(PAYLOAD)
        s.close()
        served += 1
    counts[idx] = served


def _client(
    host: str, port: int, count: int, rate: float, start: float, deadline: float, q: Any
) -> None:
    done = errors = 0
    now = time.monotonic()
    if now < start:
        time.sleep(start - now)
    t_first = time.monotonic()
    for i in range(count):
        now = time.monotonic()
        if now > deadline:
            break
        if rate > 0:
            due = start + i / rate
            if now < due:
                time.sleep(due - now)
        try:
            c = socket.create_connection((host, port))
            c.sendall(PAYLOAD)
            ok = _recv_exact(c, 1024) == 1024
            c.close()
        except OSError:
            ok = False
        if ok:
            done += 1
        else:
            errors += 1
    q.put((done, errors, t_first, time.monotonic()))


def worker(args: argparse.Namespace) -> None:
    """Run one load round; print {"completed", "errors", "elapsed", "rate", "ports"}."""
    procs = args.procs
    ready = mp.Semaphore(0)
    stop = mp.Event()
    counts = mp.Array("l", procs)
    ports = [BASE_PORT + i for i in range(procs)]
    servers = [
        mp.Process(target=_server, args=(p, ready, stop, counts, i, args.server_ns))
        for i, p in enumerate(ports)
    ]
    for s in servers:
        s.start()
    for _ in servers:
        ready.acquire()
    host = ROUTED_SERVER if args.server_ns else "127.0.0.1"
    total = args.rate * args.seconds if args.rate > 0 else args.max_conns
    per = int(total) // procs
    q: Any = mp.Queue()
    start = time.monotonic() + 0.2
    deadline = start + 3 * args.seconds + 10
    clients = [
        mp.Process(target=_client, args=(host, p, per, args.rate / procs, start, deadline, q))
        for p in ports
    ]
    for c in clients:
        c.start()
    results = [q.get() for _ in clients]
    for c in clients:
        c.join()
    stop.set()
    for s in servers:
        s.join()
    first = min(r[2] for r in results)
    last = max(r[3] for r in results)
    done = sum(r[0] for r in results)
    print(
        json.dumps(
            {
                "completed": done,
                "errors": sum(r[1] for r in results),
                "served": list(counts),
                "elapsed": last - first,
                "rate": done / (last - first),
                "ports": ports,
            }
        ),
        flush=True,
    )


# -- the driver ------------------------------------------------------------------------------


def run_load(ns: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--worker",
           "--rate", str(args.rate), "--seconds", str(args.seconds), "--procs", str(args.procs),
           "--max-conns", str(args.max_conns)]  # fmt: skip
    if args.routed:
        cmd += ["--server-ns", ns + "s"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3 * args.seconds + 60)
    if r.returncode != 0:
        raise SystemExit(f"load failed: {r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


class Traced:
    """``nettracer conns`` attached for one round; its output goes to a file."""

    def __init__(self, inode: int, extra: list[str], routed: bool) -> None:
        self.out = tempfile.NamedTemporaryFile("w+", prefix="bench_conns_", suffix=".json")  # noqa: SIM115
        self.routed = routed
        self.cmd = [sys.executable, "-m", "nettracer", "conns", "--json", "--interval", "1",
                    "--netns", str(inode), "--stats", *extra]  # fmt: skip
        if not routed:
            self.cmd.append("--no-gateway")
        env = dict(os.environ, PYTHONPATH=REPO)
        self.p = subprocess.Popen(
            self.cmd, cwd=REPO, env=env, stdout=self.out, stderr=subprocess.PIPE, text=True
        )
        self.err: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.p.stderr is not None
            for line in self.p.stderr:
                self.err.append(line)
                if "tracing connections" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or self.p.poll() is not None:
            raise SystemExit(f"tracer did not start: {''.join(self.err)}")
        self.rss_samples: list[int] = []
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        """The tracer's VmHWM (peak RSS, KiB) every 50 ms until it exits.

        Not ``wait4``'s ``ru_maxrss``: after fork+exec it starts from the forking
        process's peak (``signal->maxrss``), here this driver's."""
        path = f"/proc/{self.p.pid}/status"
        while self.p.returncode is None:
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.rss_samples.append(int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.05)

    def stop(self, load: dict[str, Any]) -> tuple[dict[str, Any], int, float]:
        """SIGINT; (check() of its reports, peak RSS KiB, CPU seconds)."""
        self.p.send_signal(signal.SIGINT)
        # the zombie keeps /proc/PID/status readable until it is reaped: last VmHWM first
        os.waitid(os.P_PID, self.p.pid, os.WEXITED | os.WNOWAIT)
        hwm = _vm_hwm(self.p.pid)
        _, status, usage = os.wait4(self.p.pid, 0)
        self.p.returncode = os.waitstatus_to_exitcode(status)
        if self.p.returncode != 0:
            raise SystemExit(f"tracer failed ({self.p.returncode}): {''.join(self.err)}")
        self.out.seek(0)
        ok = check(self.out, load, self.routed)
        self.out.close()
        peak = max([hwm, ok["peak_rss_kib"], *self.rss_samples])
        return ok, peak, usage.ru_utime + usage.ru_stime


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def check(lines: Any, load: dict[str, Any], routed: bool = False) -> dict[str, Any]:
    """Every connection closed exactly once on each end (``routed``: the client's end,
    with its gateway) with 1024 bytes each way (the reports are read one line at a
    time)."""
    ports = set(load["ports"])
    ends: dict[tuple[str, int, str, int], int] = {}
    wrong = evicted = lost = records = peak = 0
    no_gateway = 0
    gateway: dict[str, Any] = {}
    for line in lines:
        if not line.strip():
            continue
        r = json.loads(line)
        evicted += r["evicted"]
        lost += r["lost"]
        records = r["stats"]["records"]
        peak = max(peak, r["stats"].get("peak_rss_kib", 0))
        for c in r["closed"]:
            if c["proto"] != "tcp" or not ({c["sport"], c["dport"]} & ports):
                continue
            key = (c["saddr"], c["sport"], c["daddr"], c["dport"])
            ends[key] = ends.get(key, 0) + 1
            if (c["bytes_sent"], c["bytes_received"]) != (1024, 1024):
                wrong += 1
            if routed and (c["gateway"] or {}).get("via") != ROUTED_VIA:
                no_gateway += 1
        if "gateway" in r["stats"]:
            gateway = r["stats"]["gateway"]
    # a client port may be reused for a later connection: count reports, not tuples
    reported = sum(ends.values())
    return {
        "expected_ends": (1 if routed else 2) * load["completed"],
        "reported_ends": reported,
        "wrong_bytes": wrong,
        "evicted": evicted,
        "lost": lost,
        "records": records,
        "peak_rss_kib": peak,
        "gateway": gateway,
        "without_gateway": no_gateway,
    }


def _routed_setup(ns: str) -> None:
    """A second namespace ``ns``+s with the servers' address, reached via a gateway."""
    srv = ns + "s"
    for cmd in (
        ["ip", "netns", "add", srv],
        ["ip", "-n", srv, "link", "set", "lo", "up"],
        ["ip", "-n", ns, "link", "add", "vb0", "type", "veth", "peer", "name", "vb1",
         "netns", srv],
        ["ip", "-n", ns, "addr", "add", "10.97.1.1/24", "dev", "vb0"],
        ["ip", "-n", srv, "addr", "add", ROUTED_VIA + "/24", "dev", "vb1"],
        ["ip", "-n", srv, "addr", "add", ROUTED_SERVER + "/32", "dev", "lo"],
        ["ip", "-n", ns, "link", "set", "vb0", "up"],
        ["ip", "-n", srv, "link", "set", "vb1", "up"],
        ["ip", "-n", ns, "route", "add", "10.97.2.0/24", "via", ROUTED_VIA],
    ):  # fmt: skip
        subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rate", type=float, default=10000, help="connections/s offered (0: unpaced)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3, help="pairs of untraced/traced rounds")
    ap.add_argument("--procs", type=int, default=2, help="client (and server) processes")
    ap.add_argument("--max-conns", type=int, default=60000, help="connections per unpaced round")
    ap.add_argument("--tracer-arg", action="append", default=[], help="extra nettracer argument")
    ap.add_argument(
        "--routed", action="store_true", help="servers behind a gateway, gateway lookups on"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--server-ns", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    if os.geteuid() != 0:
        print("bench_conns: needs root (eBPF and network namespaces)", file=sys.stderr)
        return 2
    ns = f"ntcbench{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"machine: {os.cpu_count()} CPUs, Linux {os.uname().release}")
    base: list[float] = []
    traced: list[float] = []
    rss: list[int] = []
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        if args.routed:
            _routed_setup(ns)
        inode = os.stat(f"/run/netns/{ns}").st_ino
        for rnd in range(args.rounds):
            load = run_load(ns, args)
            base.append(load["rate"])
            print(f"round {rnd + 1} untraced: {load['completed']} conns in {load['elapsed']:.2f} s "
                  f"= {load['rate']:.0f}/s, errors {load['errors']}")  # fmt: skip
            t = Traced(inode, args.tracer_arg, args.routed)
            load = run_load(ns, args)
            time.sleep(1.5)  # let the last interval pass
            ok, maxrss, cpu = t.stop(load)
            traced.append(load["rate"])
            rss.append(maxrss)
            verdict = (
                "all reported, exact bytes"
                if ok["reported_ends"] == ok["expected_ends"] and ok["wrong_bytes"] == 0
                else "MISMATCH"
            )
            print(f"round {rnd + 1} traced:   {load['completed']} conns in {load['elapsed']:.2f} s "
                  f"= {load['rate']:.0f}/s, errors {load['errors']}; tracer: "
                  f"{ok['reported_ends']}/{ok['expected_ends']} ends reported, "
                  f"{ok['wrong_bytes']} with wrong bytes, evicted {ok['evicted']}, "
                  f"lost {ok['lost']} ({verdict}); peak RSS {maxrss / 1024:.1f} MiB, "
                  f"CPU {cpu:.2f} s")  # fmt: skip
            if args.routed:
                print(f"  {ok['without_gateway']} client ends without gateway {ROUTED_VIA}; "
                      f"lookups: {ok['gateway']}")  # fmt: skip
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns + "s"], capture_output=True)
    mb, mt = statistics.median(base), statistics.median(traced)
    print(f"median untraced {mb:.0f}/s, traced {mt:.0f}/s, ratio {mt / mb:.3f}; "
          f"per-pair ratios {', '.join(f'{t / b:.3f}' for b, t in zip(base, traced, strict=True))}; "
          f"tracer peak RSS max {max(rss) / 1024:.1f} MiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
