"""Where ``nettracer conns`` spends its CPU under :mod:`bench_conns`'s load.

Run as root from the repository: ``python3 bench/profile_conns.py [--rate R]
[--seconds S] [--top N] [--tracer-arg ARG ...]``.  One traced round of
:mod:`bench_conns` (short TCP connections on loopback in a namespace of its own) with
the tracer run under ``cProfile`` and ``BPF_ENABLE_STATS`` on; prints the tracer's CPU
time (``wait4``), whether every connection was reported exactly, each of its programs'
run count and run time (``bpftool prog show``: name, ``run_cnt``, ``run_time_ns``) and
the ``cProfile`` functions with the most own time and the most cumulative time.
Profiling tool: the figures of BENCHMARKS.md come from ``bench_conns.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_conns as bc

from nettracer.bpf.prog import enable_stats

#: name prefixes of the programs ``nettracer conns`` loads
PREFIXES = ("conn_", "peer_")


def prog_stats() -> dict[str, tuple[int, int]]:
    """name -> (run_cnt, run_time_ns) of the loaded connection tracer's programs."""
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
    ).stdout
    got: dict[str, tuple[int, int]] = {}
    for p in json.loads(out):
        name = p.get("name", "")
        if name.startswith(PREFIXES):
            got[name] = (p.get("run_cnt", 0), p.get("run_time_ns", 0))
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rate", type=float, default=10000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--top", type=int, default=30, help="cProfile rows in each listing")
    ap.add_argument("--tracer-arg", action="append", default=[], help="extra nettracer argument")
    ap.add_argument("--no-cprofile", action="store_true", help="run the tracer without cProfile")
    args = ap.parse_args()
    args.max_conns, args.routed = 60000, False
    ns = f"ntcprof{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    prof = tempfile.NamedTemporaryFile(prefix="profile_conns_", suffix=".prof", delete=False)  # noqa: SIM115
    prof.close()
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        inode = os.stat(f"/run/netns/{ns}").st_ino
        with enable_stats():
            t = _traced(inode, args.tracer_arg, None if args.no_cprofile else prof.name)
            before, cpu0 = prog_stats(), proc_cpu(t.p.pid)
            load = bc.run_load(ns, args)
            time.sleep(1.5)
            after, cpu1 = prog_stats(), proc_cpu(t.p.pid)
            ok, peak, cpu = t.stop(load)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    print(f"load: {load['completed']} conns at {load['rate']:.0f}/s; tracer CPU {cpu:.2f} s, "
          f"{ok['reported_ends']}/{ok['expected_ends']} ends, {ok['wrong_bytes']} wrong bytes, "
          f"lost {ok['lost']}, peak RSS {peak / 1024:.1f} MiB")  # fmt: skip
    print(f"tracer CPU while the load ran (start-up excluded): user {cpu1[0] - cpu0[0]:.2f} s, "
          f"system {cpu1[1] - cpu0[1]:.2f} s")  # fmt: skip
    print("program          runs   ns/run   ms total")
    for name, (cnt, ns_) in sorted(after.items()):
        cnt -= before.get(name, (0, 0))[0]
        ns_ -= before.get(name, (0, 0))[1]
        print(f"{name:<14} {cnt:>8} {ns_ / max(cnt, 1):>8.0f} {ns_ / 1e6:>10.1f}")
    if not args.no_cprofile:
        st = pstats.Stats(prof.name)
        st.sort_stats("tottime").print_stats(args.top)
        st.sort_stats("cumulative").print_stats(args.top)
    os.unlink(prof.name)
    return 0


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid`` so far (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    hz = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / hz, int(fields[12]) / hz


def _traced(inode: int, extra: list[str], out: str | None) -> bc.Traced:
    """bench_conns's tracer, run as ``python -m cProfile -o out -m nettracer ...``
    (``out`` None: as it is)."""
    if out is None:
        return bc.Traced(inode, extra, routed=False)
    orig = subprocess.Popen

    def popen(cmd: list[str], *a: object, **kw: object) -> subprocess.Popen[str]:
        if cmd[:3] == [sys.executable, "-m", "nettracer"]:
            cmd = [sys.executable, "-m", "cProfile", "-o", out, *cmd[1:]]
        return orig(cmd, *a, **kw)  # type: ignore[call-overload, no-any-return]

    subprocess.Popen = popen  # type: ignore[assignment, misc]
    try:
        return bc.Traced(inode, extra, routed=False)
    finally:
        subprocess.Popen = orig  # type: ignore[misc]


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    raise SystemExit(main())
