"""``nettracer kernel``: what this kernel offers (identity, BTF, tracefs, eBPF features)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "kernel",
        help="show what this kernel offers",
        description="Show the running kernel's identity, BTF, tracefs and the eBPF features "
        "nettracer uses, each probed by asking the kernel, and which path each takes "
        "(the feature, or its fallback when the kernel lacks it or kernel.without names it).",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--config",
        metavar="PATH",
        help="YAML configuration file (default: /etc/nettracer/nettracer.yaml if present)",
    )
    return p


def report() -> dict[str, object]:
    """The facts ``nettracer kernel`` shows, as one JSON-ready dict; ``paths`` says, per
    feature with a fallback, which one nettracer takes under :func:`features.current`."""
    from nettracer.kernel import features, identity, tracefs
    from nettracer.kernel.btf import Btf

    kf = features.current()
    ident = identity.current()
    btf: dict[str, object] = {"present": features.has_btf(), "path": features.BTF_VMLINUX}
    if btf["present"]:
        b = Btf.vmlinux()
        btf.update(
            types=len(b), sha256=ident.btf_sha256, size=os.path.getsize(features.BTF_VMLINUX)
        )
    return {
        "kernel": ident.to_json(),
        "btf": btf,
        "tracefs": tracefs.tracefs_state(),
        "features": features.probe_all(),
        "paths": {
            name: kf.path(name) for name, f in features.FEATURES.items() if f.fallback is not None
        },
    }


def run(args: argparse.Namespace) -> int:
    from nettracer.errors import require_root

    require_root("nettracer kernel", "it loads eBPF programs to probe features")
    from nettracer.cli.args import load_settings
    from nettracer.kernel import features

    load_settings(args.config, {}, {})
    kf = features.current()
    facts = report()
    if args.json:
        json.dump(facts, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="this kernel", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("value")
    k = facts["kernel"]
    assert isinstance(k, dict)
    for key in ("release", "version", "machine"):
        table.add_row(key, str(k[key]))
    btf = facts["btf"]
    assert isinstance(btf, dict)
    if btf["present"]:
        table.add_row(
            "BTF", f"yes: {btf['path']} ({btf['types']} types, sha256 {str(btf['sha256'])[:16]}…)"
        )
    else:
        table.add_row("BTF", "no (offsets will be guessed)")
    tr = facts["tracefs"]
    assert isinstance(tr, dict)
    if tr["mounted"]:
        table.add_row("tracefs", str(tr["path"]))
    elif tr["available"]:
        table.add_row("tracefs", "not mounted (commands that trace mount it while they run)")
    else:
        table.add_row("tracefs", "not mounted, and this kernel has no tracefs")
    for name, f in features.FEATURES.items():
        table.add_row(f"feature: {f.title}", kf.describe(name))
    Console(width=120 if not sys.stdout.isatty() else None).print(table)
    return 0
