"""Cold-start cost of resolving the whole field catalogue from BTF.

Each run is a new interpreter that imports the reader, reads the BTF file and
resolves every catalogue field.  Prints one line per mode:

* ``pyc``: bytecode cached (in a temporary ``PYTHONPYCACHEPREFIX``, warmed by one
  uncounted run), as an installed nettracer runs;
* ``no-pyc``: ``PYTHONDONTWRITEBYTECODE=1``, every import compiled from source.

``wall`` is the whole process as the caller sees it (interpreter start-up
included; ``python -c pass`` is given for comparison), ``in-proc`` is import + read +
resolve measured inside the child, ``read+resolve`` excludes the import.

    python bench/bench_btf.py [-n 20] [--btf /sys/kernel/btf/vmlinux]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import sys, time
t0 = time.perf_counter()
from nettracer.kernel.btf import Btf
from nettracer.layout.catalogue import CATALOGUE
t1 = time.perf_counter()
btf = Btf.from_file(sys.argv[1])
for spec in CATALOGUE:
    btf.resolve(spec.key)
t2 = time.perf_counter()
print((t2 - t0) * 1e3, (t2 - t1) * 1e3, len(CATALOGUE))
"""


def _runs(argv: list[str], env: dict[str, str], n: int) -> list[tuple[float, str]]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
        out.append(((time.perf_counter() - start) * 1e3, proc.stdout))
    return out


def _fmt(xs: list[float]) -> str:
    return f"median {statistics.median(xs):6.1f} max {max(xs):6.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20, help="runs per mode (default 20)")
    ap.add_argument("--btf", default="/sys/kernel/btf/vmlinux", help="raw BTF file")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = dict(os.environ)
    base["PYTHONPATH"] = root + os.pathsep + base.get("PYTHONPATH", "")
    size = os.path.getsize(args.btf)
    with tempfile.TemporaryDirectory(prefix="bench_btf_pyc.") as cache:
        modes = {
            "pyc": {**base, "PYTHONPYCACHEPREFIX": cache},
            "no-pyc": {**base, "PYTHONDONTWRITEBYTECODE": "1"},
        }
        modes["pyc"].pop("PYTHONDONTWRITEBYTECODE", None)
        bare = [w for w, _ in _runs([sys.executable, "-c", "pass"], modes["pyc"], args.n)]
        for mode, env in modes.items():
            argv = [sys.executable, "-c", CHILD, args.btf]
            _runs(argv, env, 1)  # warm the page cache (and the pyc cache)
            runs = _runs(argv, env, args.n)
            wall = [w for w, _ in runs]
            inproc = [float(out.split()[0]) for _, out in runs]
            work = [float(out.split()[1]) for _, out in runs]
            fields = int(runs[0][1].split()[2])
            print(
                json.dumps({"mode": mode, "n": args.n}),
                f"cold resolve of {fields} catalogue fields from {args.btf} ({size} bytes):",
                f"wall {_fmt(wall)} ms | in-proc {_fmt(inproc)} ms |",
                f"read+resolve {_fmt(work)} ms | python -c pass {_fmt(bare)} ms",
            )


if __name__ == "__main__":
    main()
