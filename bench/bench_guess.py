"""Time to guess the whole field catalogue, and how often the guess equals BTF.

Two modes, 50 consecutive runs each by default:

* ``in-process``: ``nettracer.layout.guess.guess()`` called repeatedly in this
  process (generated programs are cached after the first run, as in a long-running
  tracer that re-guesses);
* ``cli``: ``nettracer offsets --source guess --json`` as a new process each time,
  its reported ``elapsed_ms`` (guessing only) and the process wall time (interpreter
  start-up and imports included).

A run is *correct* when every catalogue field is resolved and equals the running
kernel's BTF. For comparison, the classic design (Datadog system-probe) waits 200 ms
for TCP values to be stable before its first check, on top of one round trip per
candidate offset.

    sudo python bench/bench_guess.py [-n 50] [--mode in-process|cli|both]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _summary(name: str, ms: list[float], correct: int, n: int, extra: str = "") -> str:
    return (
        f"{name:10s} runs {n}  elapsed_ms median {statistics.median(ms):6.1f}  "
        f"max {max(ms):6.1f}  min {min(ms):6.1f}  correct {correct}/{n}{extra}"
    )


def in_process(n: int, btf: dict) -> str:
    from nettracer.layout.guess import guess

    ms, correct, rounds = [], 0, []
    for _ in range(n):
        r = guess()
        ms.append(r.offsets.elapsed_ms)
        rounds.append(r.rounds)
        correct += not r.offsets.unresolved and r.offsets.to_json() == btf
    extra = f"  rounds max {max(rounds)}"
    return _summary("in-process", ms, correct, n, extra)


def cli(n: int, btf: dict) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    argv = [sys.executable, "-m", "nettracer", "offsets", "--source", "guess", "--json"]
    argv += ["--cache-dir", os.path.join("/tmp", f"ntg-bench-{os.getpid()}")]
    ms, wall, correct = [], [], 0
    for _ in range(n):
        start = time.perf_counter()
        p = subprocess.run(argv, env=env, capture_output=True, text=True)
        wall.append((time.perf_counter() - start) * 1e3)
        if p.returncode != 0:
            sys.stderr.write(p.stderr)
            continue
        obj = json.loads(p.stdout)
        ms.append(obj["elapsed_ms"])
        correct += not obj["unresolved"] and obj["fields"] == btf
    extra = f"  wall median {statistics.median(wall):6.1f} max {max(wall):6.1f}"
    return _summary("cli", ms or [0.0], correct, n, extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=50, help="consecutive runs per mode (default 50)")
    ap.add_argument("--mode", choices=("in-process", "cli", "both"), default="both")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nettracer.layout.btf_offsets import btf_offsets

    btf = btf_offsets().to_json()
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"kernel: {os.uname().release} {os.uname().machine}, {os.cpu_count()} CPUs")
    if args.mode in ("in-process", "both"):
        print(in_process(args.n, btf), flush=True)
    if args.mode in ("cli", "both"):
        print(cli(args.n, btf), flush=True)


if __name__ == "__main__":
    main()
