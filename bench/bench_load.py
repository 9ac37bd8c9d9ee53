"""Program load time: assemble + BPF_PROG_LOAD (verifier included) for generated programs.

Run as root: ``python3 bench/bench_load.py [--runs N]``. Prints one line per program with
median and max milliseconds over N loads, and the reference: the time of the empty
program (two instructions) in the same run.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

from nettracer.bpf import maps, prog
from nettracer.bpf.helpers import Helper
from nettracer.bpf.insn import (
    FP,
    R0,
    R1,
    R2,
    R3,
    R6,
    Program,
    add64,
    call,
    exit_,
    jeq,
    ld_map_fd,
    ldx,
    mov64,
    st,
    stx,
)


def empty() -> list:
    return [mov64(R0, 0), exit_()]


def probe_reads(n: int) -> list:
    """``n`` chained bpf_probe_read_kernel calls, like a struct-path read."""
    p = Program()
    p += ldx(8, R6, R1, 0)
    for i in range(n):
        p += [mov64(R1, FP), add64(R1, -8), mov64(R2, 8), mov64(R3, R6), add64(R3, 8 * i)]
        p += [call(Helper.probe_read_kernel), ldx(8, R6, FP, -8)]
    p += [st(4, FP, -12, 0), ld_map_fd(R1, "m"), mov64(R2, FP), add64(R2, -12)]
    p += [call(Helper.map_lookup_elem), jeq(R0, 0, "out"), stx(8, R0, 0, R6)]
    p.label("out")
    p += [mov64(R0, 0), exit_()]
    return p.insns


def measure(insns: list, runs: int, m: maps.Map) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        prog.load(insns, maps={"m": m}, name="nt_bench").close()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    with maps.array(ctypes.c_uint64, 1, "m") as m:
        for name, insns in [
            ("empty", empty()),
            ("probe_read x4", probe_reads(4)),
            ("probe_read x64", probe_reads(64)),
        ]:
            ms = measure(insns, args.runs, m)
            print(
                f"{name:16s} {len(Program(insns)):5d} insns  load median {statistics.median(ms):7.3f} ms"
                f"  max {max(ms):7.3f} ms  (n={args.runs})"
            )


if __name__ == "__main__":
    main()
