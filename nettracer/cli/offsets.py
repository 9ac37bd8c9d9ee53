"""``nettracer offsets``: the kernel struct offsets nettracer uses, from BTF, a saved
profile or a guess made now, optionally checked against BTF.

Text output is a table (field, offset, size, source, check); ``--json`` prints one
object: ``kernel``, ``source``, ``elapsed_ms``, ``fields``, ``unresolved`` and, with
``--verify``, ``verified``. ``--verify`` exits 3 when a field differs from BTF (or could
not be resolved).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from nettracer.cli.args import OFFSETS_SOURCES, load_settings
from nettracer.errors import Mismatch, UsageError

#: setting -> the flag that sets it here (errors below the CLI name settings); the offsets
#: source is ``--offsets`` on every command, and here ``--source`` too (its first name)
FLAGS = {
    "offsets.source": "--offsets",
    "offsets.cache_dir": "--cache-dir",
    "offsets.guess_timeout_ms": "--timeout-ms",
    "offsets.profile": "--profile",
    "offsets.force": "--force",
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "offsets",
        help="struct offsets from BTF, a profile, or guessed from kernel memory",
        description="Show the kernel struct offsets nettracer reads: from BTF, from a "
        "saved profile, or guessed now from kernel memory (no BTF, no kprobes). "
        "--verify compares them with BTF (exit code 3 on a difference).",
    )
    p.add_argument(
        "--offsets",
        "--source",
        dest="source",
        choices=OFFSETS_SOURCES,
        default=None,
        help="btf, guess (now), or auto: BTF if present, else this kernel's cached "
        "profile, else guess (default: offsets.source, auto)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="compare every field with BTF; exit 3 on a difference (implies --offsets "
        "guess unless --offsets or --profile is given)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--save", metavar="FILE", help="also write the offsets as a profile to FILE")
    p.add_argument(
        "--save-dir",
        metavar="DIR",
        help="also write the offsets as this kernel build's profile into DIR, named as "
        "offsets.profile_dir expects (a fleet's profile directory)",
    )
    p.add_argument("--profile", metavar="FILE", help="use the offsets of a saved profile")
    p.add_argument(
        "--force",
        action="store_true",
        help="accept a --profile made on another kernel build",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where guessed profiles are cached (default: offsets.cache_dir, /var/cache/nettracer)",
    )
    p.add_argument(
        "--timeout-ms",
        type=_positive_int,
        metavar="N",
        help="give up guessing after N ms (default: offsets.guess_timeout_ms, 2000)",
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help="YAML configuration file (default: /etc/nettracer/nettracer.yaml if present)",
    )
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive number of milliseconds, not {text!r}"
        )
    return value


def verify(offsets: Any, btf: Any) -> dict[str, bool]:
    """Catalogue key -> whether ``offsets`` has it, at BTF's offset and size."""
    from nettracer.layout.catalogue import CATALOGUE

    out = {}
    for spec in CATALOGUE:
        got, want = offsets.fields.get(spec.key), btf.fields.get(spec.key)
        out[spec.key] = got is not None and want is not None and got == want
    return out


def report(identity: Any, offsets: Any, verified: dict[str, bool] | None) -> dict[str, Any]:
    """The ``--json`` object."""
    obj: dict[str, Any] = {
        "kernel": identity.to_json(),
        "source": offsets.source,
        "elapsed_ms": round(float(offsets.elapsed_ms), 3),
        "fields": offsets.to_json(),
        "unresolved": dict(sorted(offsets.unresolved.items())),
    }
    if verified is not None:
        obj["verified"] = verified
    return obj


def _mismatch_message(offsets: Any, btf: Any, verified: dict[str, bool]) -> str:
    differ = []
    missing = []
    for key, ok in verified.items():
        if ok:
            continue
        got, want = offsets.fields.get(key), btf.fields.get(key)
        if got is None:
            missing.append(key)
        elif want is None:
            differ.append(f"{key}: {got.offset}, not in BTF")
        else:
            differ.append(f"{key}: {got.offset}, BTF {want.offset}")
    parts = []
    if differ:
        parts.append(f"{len(differ)} field(s) differ from BTF ({'; '.join(differ)})")
    if missing:
        parts.append(f"{len(missing)} unresolved ({', '.join(missing)})")
    return "offsets verification failed: " + " and ".join(parts)


def run(args: argparse.Namespace) -> int:

    values = {
        "offsets.source": args.source,
        "offsets.cache_dir": args.cache_dir,
        "offsets.guess_timeout_ms": args.timeout_ms,
    }
    config = load_settings(args.config, values, FLAGS)
    source = str(config["offsets.source"])
    if args.verify and args.source is None and args.profile is None:
        source = "guess"
    if args.force and args.profile is None:
        raise UsageError("--force only applies to --profile FILE")
    from nettracer.kernel.identity import current
    from nettracer.layout.profile import cache_path, save_dir

    identity = current()
    saves = [args.save] if args.save else []
    if args.save_dir:
        saves.append(cache_path(args.save_dir, identity))
    for path in saves:
        save_dir(path)  # refused before any work is done
    from nettracer.layout.source import offsets_for, profile_dir

    btf = None
    if args.verify:
        from nettracer.kernel.btf import NoBtfError
        from nettracer.layout.btf_offsets import btf_offsets

        try:
            btf = btf_offsets()
        except NoBtfError:
            from nettracer.kernel import BTF_VMLINUX

            raise UsageError(
                f"--verify compares with BTF, and this kernel has none ({BTF_VMLINUX})"
            ) from None
    offsets = offsets_for(
        source,
        cache_dir=str(config["offsets.cache_dir"]),
        timeout_ms=int(config["offsets.guess_timeout_ms"]),  # type: ignore[call-overload]
        profile=args.profile,
        force=args.force,
        identity=identity,
        profile_dir=profile_dir(config, str(config["offsets.cache_dir"]) or None),
    )
    from nettracer.layout.profile import save_profile

    for path in saves:
        save_profile(path, offsets, identity)
    verified = verify(offsets, btf) if btf is not None else None
    if args.json:
        json.dump(report(identity, offsets, verified), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _table(identity, offsets, verified, btf)
    if verified is not None and not all(verified.values()):
        raise Mismatch(_mismatch_message(offsets, btf, verified))
    return 0


def _table(identity: Any, offsets: Any, verified: dict[str, bool] | None, btf: Any) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from nettracer.layout.catalogue import CATALOGUE

    title = (
        f"struct offsets on {identity} ({offsets.source}, {offsets.elapsed_ms:.1f} ms, "
        f"{len(offsets.fields)}/{len(CATALOGUE)} resolved)"
    )
    table = Table(title=title, title_justify="left")
    for name, justify in (
        ("field", "left"),
        ("offset", "right"),
        ("size", "right"),
        ("source", "left"),
        ("check", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name != "check")  # type: ignore[arg-type]
    for spec in CATALOGUE:
        f = offsets.fields.get(spec.key)
        if f is None:
            check = Text(offsets.unresolved.get(spec.key, "unresolved"), style="yellow")
            table.add_row(spec.key, "-", str(spec.size), "unresolved", check)
            continue
        check = Text("")
        if verified is not None:
            if verified[spec.key]:
                check = Text("= BTF", style="green")
            else:
                want = btf.fields.get(spec.key)
                check = Text(
                    f"BTF says {want.offset}" if want is not None else "not in BTF",
                    style="bold red",
                )
        table.add_row(spec.key, str(f.offset), str(f.size), offsets.source, check)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
