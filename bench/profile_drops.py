"""Where the drop monitor's in-kernel time goes: variants of its hot path, one read or
step removed or changed at a time, each attached alone, alternating, in one run.

Run as root from the repository: ``python3 bench/profile_drops.py [--drops N]
[--rounds R] [--variants "a;b"]``.  Uses :mod:`bench_drops`'s two namespaces and
blaster (N UDP datagrams to a closed port per measurement) and reports BPF run time
/ run count (``BPF_ENABLE_STATS``) of each variant: median and spread over R rounds.

``real`` is the program ``nettracer drops`` loads (default options,
:class:`~nettracer.tracers.drops.monitor.DropMonitor`: with BTF a ``tp_btf`` program
with plain loads), then the same on an untyped raw tracepoint (helper reads, with and
without the device memo); the other variants are
skeletons of it built from the same shared pieces (:mod:`nettracer.access.plan`,
:mod:`nettracer.bpf.counters`) and this kernel's BTF offsets: the key's location and
reason from the context, then optionally the read of ``struct sk_buff`` (``wide``: one
read from ``dev`` to ``protocol`` as the planner makes it, ``split``: ``dev`` and
``protocol`` apart), of ``struct net_device`` (``ifindex`` and ``nd_net``), of
``net->ns.inum``, and the per-CPU hash count.  Profiling tool: the figures of
BENCHMARKS.md come from ``bench_drops.py``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_drops as bd

from nettracer.access.plan import emit_plan, plan_fields, read_chain
from nettracer.bpf import maps as bpf_maps
from nettracer.bpf import prog as bpf_prog
from nettracer.bpf.counters import count_in_hash, lost_counter
from nettracer.bpf.insn import (
    FP,
    R0,
    R1,
    R3,
    R6,
    R7,
    R8,
    R9,
    Program,
    exit_,
    jeq,
    ldx,
    mov64,
    st,
    stx,
)
from nettracer.bpf.link import attach_raw_tracepoint
from nettracer.tracers.drops.program import DropSpec
from nettracer.tracers.drops.records import DropKey

_KEY = -24
_K = {name: _KEY + getattr(DropKey, name).offset for name, _ in DropKey._fields_}


def skeleton(
    spec: DropSpec, skb: str, dev: bool, ns: bool, count: bool, atomic: bool = False
) -> Program:
    """The hot path of the drop program with parts left out (see the module text)."""
    lay, args = spec.layout, spec.args
    p = Program()
    p += [
        mov64(R6, R1),
        args.load(R7, R6, "skb"),
        args.load(R1, R6, "location"),
        stx(8, FP, _K["location"], R1),
        st(8, FP, _K["reason"], 0),
        st(8, FP, _K["netns"], 0),
        args.load(R1, R6, "reason"),
        stx(4, FP, _K["reason"], R1),
        mov64(R9, 0),
    ]
    fields = {"dev": (lay.sk_buff_dev, 8), "protocol": (lay.sk_buff_protocol, 2)}
    if skb != "none":
        plan = plan_fields(fields, 192 if skb == "wide" else 8)
        buf = -64 - plan.size
        emit_plan(p, plan, buf, R7)
        p += [
            ldx(2, R1, FP, buf + plan.where["protocol"]),
            stx(2, FP, _K["protocol"], R1),
            ldx(8, R8, FP, buf + plan.where["dev"]),
            jeq(R8, 0, "nodev"),
        ]
        if dev:
            dplan = plan_fields(
                {"ifindex": (lay.net_device_ifindex, 4), "nd_net": (lay.net_device_nd_net, 8)},
                192,
            )
            dbuf = buf - dplan.size
            emit_plan(p, dplan, dbuf, R8)
            p += [ldx(4, R1, FP, dbuf + dplan.where["ifindex"]), stx(4, FP, _K["ifindex"], R1)]
            if ns:
                p += ldx(8, R3, FP, dbuf + dplan.where["nd_net"])
                read_chain(p, R3, (), lay.net_ns_inum, 4, -56, null="nodev")
                p += ldx(4, R9, FP, -56)
    p.label("nodev")
    p += stx(4, FP, _K["netns"], R9)
    p += st(2, FP, _K["stack_id"], 0xFFFF)
    if count:
        count_in_hash(
            p, "counts", _KEY, one_off=-32, lost="lost", scratch_off=-40, done="out",
            atomic=atomic,
        )  # fmt: skip
    p.label("out")
    p += [mov64(R0, 0), exit_()]
    return p


def variants(spec: DropSpec) -> dict[str, Callable[[], object]]:
    """name -> a function that loads and attaches it, returning an object with
    ``prog`` (for stats) and ``close()``."""
    from nettracer.tracers.drops.monitor import DropMonitor

    def real() -> object:
        return DropMonitor(spec).start()

    def untyped(memo: bool) -> Callable[[], object]:
        return lambda: DropMonitor(DropSpec(spec.layout, spec.args.untyped(), memo=memo)).start()

    def sk(skb: str, dev: bool, ns: bool, count: bool) -> Callable[[], object]:
        return lambda: Loaded(skeleton(spec, skb, dev, ns, count))

    def shared_hash() -> object:
        return Loaded(skeleton(spec, "wide", True, True, True, atomic=True), shared=True)

    return {
        "real": real,
        "real, helper reads (raw_tp)": untyped(True),
        "real, helper reads, no device memo": untyped(False),
        "empty": lambda: Loaded(Program([mov64(R0, 0), exit_()])),
        "key+count": sk("none", False, False, True),
        "skb wide+count": sk("wide", False, False, True),
        "skb split+count": sk("split", False, False, True),
        "skb wide+dev+count": sk("wide", True, False, True),
        "skb wide+dev+ns+count": sk("wide", True, True, True),
        "skb split+dev+ns+count": sk("split", True, True, True),
        "skb wide+dev+ns, no count": sk("wide", True, True, False),
        "skb wide+dev+ns+count in a hash (atomic add)": shared_hash,
    }


class Loaded:
    """A skeleton program, its maps and its link."""

    def __init__(self, program: Program, shared: bool = False) -> None:
        kind = bpf_maps.hash_map if shared else bpf_maps.percpu_hash
        self.maps = {
            "counts": kind(DropKey, ctypes.c_uint64, 8192, "counts"),
            "lost": lost_counter(),
        }
        self.prog = bpf_prog.load(program.insns, maps=self.maps, name="nt_prof")
        self.link = attach_raw_tracepoint(self.prog, "kfree_skb")

    def close(self) -> None:
        self.link.close()
        self.prog.close()
        for m in self.maps.values():
            m.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drops", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", help="names separated by ; (default: all)")
    args = ap.parse_args()
    from nettracer.config.load import load_config
    from nettracer.tracers.drops.monitor import DropMonitor

    cfg = load_config(None, environ={}, default_path="/nonexistent/nettracer.yaml")
    spec = DropMonitor.from_config(cfg).spec
    arms = variants(spec)
    if args.variants:
        arms = {k: arms[k] for k in args.variants.split(";")}
    print(f"# command: python3 {' '.join(sys.argv)}; load average {os.getloadavg()[0]:.2f}")
    out: dict[str, list[float]] = {k: [] for k in arms}
    bd.setup()
    try:
        with bpf_prog.enable_stats():
            for _ in range(args.rounds):
                for name, make in arms.items():
                    obj = make()
                    try:
                        time.sleep(0.2)
                        s0 = obj.prog.stats()  # type: ignore[attr-defined]
                        bd.blast("count", args.drops)
                        time.sleep(0.2)
                        s1 = obj.prog.stats()  # type: ignore[attr-defined]
                    finally:
                        obj.close()  # type: ignore[attr-defined]
                    runs = max(1, s1.run_cnt - s0.run_cnt)
                    out[name].append((s1.run_time_ns - s0.run_time_ns) / runs)
    finally:
        bd.teardown()
    print(f"ns/event, each variant alone, alternating, {args.rounds} rounds of {args.drops} drops")
    base = statistics.median(out["real"]) if "real" in out else None
    for name, xs in out.items():
        m = statistics.median(xs)
        rel = f"  {m / base:.2f}x real" if base else ""
        print(f"  {name:28} {m:6.1f} ns  {[round(x, 1) for x in xs]}{rel}")


if __name__ == "__main__":
    main()
