"""``nettracer config show``: the effective configuration and where each value came from."""

from __future__ import annotations

import argparse
import json
import sys

from nettracer.errors import UsageError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "config",
        help="show the effective configuration",
        description="Show the effective configuration (defaults < YAML file < "
        "NETTRACER_<SECTION>__<KEY> environment variables < flags) and where each value "
        "came from.",
    )
    actions = p.add_subparsers(dest="config_action", metavar="ACTION")
    show = actions.add_parser("show", help="print every key, its value and its source")
    for parser in (p, show):
        parser.add_argument(
            "--config",
            metavar="PATH",
            default=argparse.SUPPRESS,
            help="YAML configuration file (default: /etc/nettracer/nettracer.yaml if present)",
        )
        parser.add_argument(
            "--json",
            action="store_true",
            default=argparse.SUPPRESS,
            help='print {key: {"value": ..., "source": ...}} as JSON',
        )
        parser.add_argument(
            "--set",
            metavar="KEY=VALUE",
            action="append",
            default=argparse.SUPPRESS,
            help="override one key, as a flag would (repeatable)",
        )
    return p


def parse_sets(items: list[str]) -> dict[str, tuple[object, str]]:
    """``["network.collect_udp=false"]`` -> ``{"network.collect_udp": ("false", "--set ...")}``."""
    out: dict[str, tuple[object, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item}: expected KEY=VALUE (e.g. network.collect_udp=false)")
        out[key.strip()] = (value, f"--set {item}")
    return out


def format_value(value: object) -> str:
    """A value as the text table shows it (YAML spelling)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run(args: argparse.Namespace) -> int:
    from nettracer.config import load_config

    overrides = parse_sets(getattr(args, "set", None) or [])
    config = load_config(getattr(args, "config", None), overrides)
    for notice in config.notices:
        sys.stderr.write(f"nettracer: notice: {notice}\n")
    if getattr(args, "json", False):
        json.dump(config.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    title = f"configuration ({config.file})" if config.file else "configuration (no file)"
    table = Table(title=title, title_justify="left")
    table.add_column("key", no_wrap=True)
    table.add_column("value")
    table.add_column("source")
    for path, setting in config.items():
        table.add_row(Text(path), Text(format_value(setting.value)), Text(str(setting.origin)))
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    return 0
