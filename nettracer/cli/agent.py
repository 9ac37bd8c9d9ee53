"""``nettracer agent``: drops and connections as Prometheus metrics on ``/metrics``.

Attaches the drop monitor and the connection tracer (each can be left out), serves
cumulative counters on ``--listen`` (``agent.listen``, 127.0.0.1:9410) and runs until
SIGINT/SIGTERM or ``--duration``; then detaches everything and exits 0.  SIGHUP reloads
the configuration file (``--config``): the monitors are rebuilt from it and the counters
go on; a configuration that does not load or attach is refused in one line on stderr and
the old one stays.  ``agent.listen`` takes effect at the next start.  The metrics and
how they are read are described in :mod:`nettracer.agent` and
:mod:`nettracer.output.prometheus`.
"""

from __future__ import annotations

import argparse
import sys

from nettracer.cli.args import OFFSETS_SOURCES, load_settings, seconds
from nettracer.errors import NettracerError, UsageError, require_root

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.agent import Agent
    from nettracer.config import Config

#: setting -> the flag that sets it here (errors below the CLI name settings)
FLAGS = {"offsets.source": "--offsets", "agent.listen": "--listen"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "agent",
        help="serve drop and connection metrics for Prometheus",
        description="Trace packet drops and TCP/UDP connections in every network namespace "
        "and serve them as Prometheus metrics on http://HOST:PORT/metrics until Ctrl-C or "
        "SIGTERM.",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address of the metrics endpoint (default: agent.listen, 127.0.0.1:9410)",
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help="YAML configuration file (default: /etc/nettracer/nettracer.yaml if present)",
    )
    p.add_argument("--no-conns", action="store_true", help="do not trace connections")
    p.add_argument("--no-drops", action="store_true", help="do not count packet drops")
    p.add_argument(
        "--offsets",
        choices=OFFSETS_SOURCES,
        help="where struct offsets come from: BTF, guessed at run time, or auto (offsets.source)",
    )
    p.add_argument("--duration", type=seconds, metavar="S", help="stop after S seconds")
    return p


def run(args: argparse.Namespace) -> int:
    from nettracer.config.schema import parse_address

    if args.no_conns and args.no_drops:
        raise UsageError("--no-conns and --no-drops together leave nothing to trace")
    config = _load(args, notices=True)
    listen = str(config["agent.listen"])
    address = parse_address(listen)
    if address is None:  # the schema checked it; never trust a second parser blindly
        raise UsageError(f"--listen {listen}: expected HOST:PORT or [IPV6]:PORT")
    require_root("nettracer agent")
    return _run(args, config, address, listen)


def _load(args: argparse.Namespace, notices: bool = False) -> Config:
    """The configuration: the file (``--config``), the environment, the flags."""
    values = {"offsets.source": args.offsets, "agent.listen": args.listen}
    return load_settings(args.config, values, FLAGS, notices=notices)


def _reload(args: argparse.Namespace, agent: Agent, listen: str) -> None:
    """SIGHUP: the monitors rebuilt from the configuration as it is now, or one line
    saying why the old one stays."""
    from nettracer.cli.main import as_flags

    try:
        cfg = _load(args)
        agent.reload(cfg)
    except NettracerError as exc:
        sys.stderr.write(
            f"nettracer: configuration not reloaded, the old one stays: {as_flags(exc, FLAGS)}\n"
        )
        return
    for notice in cfg.notices:
        sys.stderr.write(f"nettracer: notice: {notice}\n")
    if str(cfg["agent.listen"]) != listen:
        sys.stderr.write("nettracer: notice: agent.listen changes take effect at the next start\n")
    sys.stderr.write(f"nettracer: configuration reloaded (offsets: {agent.offsets_source})\n")
    sys.stderr.flush()


def _run(args: argparse.Namespace, cfg: Config, address: tuple[str, int], listen: str) -> int:
    from nettracer import __version__
    from nettracer.agent import Agent, kernel_release
    from nettracer.output.prometheus import AgentCollector, serve

    # bind first: a busy port fails before anything is loaded into the kernel
    agent = Agent(None, None, interval=float(cfg["drops.interval_s"]))  # type: ignore[arg-type]
    collector = AgentCollector(agent, __version__, kernel_release())
    server, _thread = serve(collector, *address)
    try:
        agent.load(cfg, drops=not args.no_drops, conns=not args.no_conns)
        for notice in agent.notices:
            sys.stderr.write(f"nettracer: notice: {notice}\n")
        what = " and ".join(
            w for w, on in (("drops", agent.drops), ("connections", agent.conns)) if on
        )
        host, port = address
        shown = f"[{host}]" if ":" in host else host
        sys.stderr.write(
            f"nettracer: agent tracing {what} (offsets: {agent.offsets_source}); metrics on "
            f"http://{shown}:{port}/metrics, Ctrl-C to stop\n"
        )
        sys.stderr.flush()
        agent.run(args.duration, on_hup=lambda: _reload(args, agent, listen))
    finally:
        agent.close()
        server.shutdown()
        server.server_close()
    return 0
