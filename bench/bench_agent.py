#!/usr/bin/env python3
"""Benchmark of ``nettracer agent``: scrape time, RSS and CPU with many series.

Phases, each against one real agent (``nettracer agent --listen 127.0.0.1:PORT``):

1. idle: RSS and the time of a scrape (a scrape asks for a refresh: one walk of the
   connection map and one of the drop counts, then the exposition text);
2. ``--conns`` open TCP connections (loopback pairs held by a helper process in a
   network namespace of its own, ``ntabench<pid>``): the same figures;
3. ``--drop-series`` drop series: that many network namespaces, each made by a thread
   with ``unshare(CLONE_NEWNET)`` and freed when it ends, each dropping one UDP datagram
   to a closed port (``netns`` label differs: one series each);
4. connection churn: ``bench_conns.py``'s load (short 1 KiB TCP connections at
   ``--rate`` per second for ``--seconds``) in the namespace while the agent refreshes
   every 5 s and is scraped every second; the agent's CPU time (utime+stime of all its
   threads, /proc/PID/stat) over the load, per second of load.

Scrape times are the median and maximum of ``--scrapes`` scrapes, measured by the
client (urllib, connection included).  Run as root:

    python3 bench/bench_agent.py --conns 10000 --drop-series 1000 --rate 10000 --seconds 5
"""

from __future__ import annotations

import argparse
import fcntl
import os
import resource
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
        text = r.read().decode()
    return time.perf_counter() - t0, text


def metric_sum(text: str, name: str) -> tuple[float, int]:
    """(sum of the samples of ``name``, how many samples)."""
    vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    return sum(vals), len(vals)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(label: str, pid: int, port: int, n: int) -> None:
    times, size = [], 0
    for _ in range(n):
        t, text = scrape(port)
        times.append(t)
        size = len(text)
        time.sleep(0.1)  # a refresh younger than 0.1 s would be served as it is
    print(
        f"{label}: RSS {rss_kib(pid) / 1024:.1f} MiB; scrape median "
        f"{statistics.median(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms "
        f"({n} scrapes, {size / 1024:.0f} KiB of text)",
        flush=True,
    )


def wait_for(port: int, name: str, want: int, count: bool = False, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            total, samples = metric_sum(scrape(port)[1], name)
        except OSError:  # not listening yet
            total, samples = 0, 0
        if (samples if count else total) >= want:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the agent shows {total} ({samples} series) of {name}, want {want}")
        time.sleep(0.5)


def hold(pairs: int) -> None:
    """(In the namespace) keep ``pairs`` loopback TCP connections open until stdin ends."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (2 * pairs + 100,) * 2)
    srv = socket.create_server(("127.0.0.1", 0), backlog=1024)
    kept = []
    for _ in range(pairs):
        kept.append(socket.create_connection(srv.getsockname()))
        kept.append(srv.accept()[0])
    print("ready", flush=True)
    sys.stdin.read()


def drop_in_new_netns() -> None:
    """(In a thread of its own) a new network namespace with lo up, one datagram to a port
    nobody listens on: one NO_SOCKET drop there; the namespace goes with the thread."""
    from nettracer.bpf.syscall import CLONE_NEWNET, unshare

    unshare(CLONE_NEWNET)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
        flags = struct.unpack("16sH14x", ifr)[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
        s.sendto(b"x", ("127.0.0.1", 9))


def churn(ns: str, pid: int, port: int, args: argparse.Namespace) -> None:
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import bench_conns

    stop = threading.Event()

    def scraper() -> None:
        while not stop.wait(1.0):
            scrape(port)

    t = threading.Thread(target=scraper)
    load_args = argparse.Namespace(rate=args.rate, seconds=args.seconds, procs=2, max_conns=0)
    c0, w0 = cpu_s(pid), time.monotonic()
    t.start()
    try:
        load = bench_conns.run_load(ns, load_args)
    finally:
        stop.set()
        t.join()
    cpu, wall = cpu_s(pid) - c0, time.monotonic() - w0
    print(
        f"churn: {load['completed']} connections in {load['elapsed']:.2f} s "
        f"= {load['rate']:.0f}/s; agent CPU {cpu:.2f} s over {wall:.1f} s "
        f"= {100 * cpu / wall:.0f}% of one CPU; RSS after {rss_kib(pid) / 1024:.1f} MiB",
        flush=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--conns", type=int, default=10000, help="open connections (both ends)")
    ap.add_argument("--drop-series", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=10000, help="connections/s of the churn")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of the churn")
    ap.add_argument("--scrapes", type=int, default=20)
    ap.add_argument("--hold", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hold is not None:
        hold(args.hold)
        return 0
    if os.geteuid() != 0:
        print("bench_agent: needs root (eBPF and network namespaces)", file=sys.stderr)
        return 2
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"machine: {os.cpu_count()} CPUs, Linux {os.uname().release}")
    port = free_port()
    ns = f"ntabench{os.getpid()}"
    agent = subprocess.Popen(
        [sys.executable, "-m", "nettracer", "agent", "--listen", f"127.0.0.1:{port}"],
        env=dict(os.environ, PYTHONPATH=REPO),
        stderr=subprocess.DEVNULL,
    )
    holder = None
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        wait_for(port, "nettracer_refreshes_total", 1)
        measure("idle", agent.pid, port, args.scrapes)
        holder = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, __file__, "--hold", str(args.conns // 2)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        wait_for(port, "nettracer_connections_open{", args.conns)
        measure(f"{args.conns} open connections", agent.pid, port, args.scrapes)
        for _ in range(args.drop_series):
            t = threading.Thread(target=drop_in_new_netns)
            t.start()
            t.join()
        wait_for(port, "nettracer_drops_total{", args.drop_series, count=True)
        measure(
            f"{args.conns} open connections and {args.drop_series} more drop series",
            agent.pid,
            port,
            args.scrapes,
        )
        churn(ns, agent.pid, port, args)
    finally:
        if holder is not None:
            holder.communicate("")
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
