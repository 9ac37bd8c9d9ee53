"""The ``nettracer`` command line.

Each subcommand lives in ``nettracer/cli/<name>.py`` and exposes
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``.
Those modules import heavy dependencies inside ``run`` only, so ``--help`` stays fast.
Errors the user can cause (:class:`nettracer.errors.NettracerError`) are printed
as one line on stderr with their exit code, the settings they name said as the
command's flags (its ``FLAGS`` table, setting -> flag); anything else is an internal
failure (exit code 1, traceback only with ``NETTRACER_DEBUG=1``).

Signals: from the start of :func:`main`, the first SIGINT, SIGTERM or SIGHUP unwinds
the command (every ``finally`` runs, everything attached is detached) and later ones
are ignored; a monitor (:data:`MONITORS`) stopped that way exits 0, at start-up as
while running (as bpftrace does), any other command ``128 + signum``.  ``nettracer
agent`` reloads its configuration on SIGHUP once it runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from nettracer import __version__
from nettracer.errors import NettracerError

#: subcommand modules, in the order ``--help`` lists them
COMMANDS: tuple[str, ...] = ("drops", "conns", "read", "agent", "offsets", "kernel", "config")
#: the commands that run until stopped: a signal that stops them is a normal end (exit 0)
MONITORS: tuple[str, ...] = ("drops", "conns", "read", "agent")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"nettracer: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)

    def _get_formatter(self) -> argparse.HelpFormatter:
        """argparse's, given the width: without one it imports ``shutil`` (and with it
        ``bz2``, ``lzma``, ``zlib``, ``fnmatch``: 5 ms of start-up) for
        ``get_terminal_size``, and ``add_argument`` makes a formatter for every option."""
        return self.formatter_class(prog=self.prog, width=_columns() - 2)  # type: ignore[call-arg]


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` finds it: ``$COLUMNS``, else
    standard output's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand's module is imported (start-up)."""
    parser = _Parser(
        prog="nettracer",
        description="Linux network tracer: packet drops, connections and kernel struct "
        "offsets, from eBPF tracepoints, with no compiler and no kprobes.",
    )
    parser.add_argument("--version", action="version", version=f"nettracer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in (only,) if only in COMMANDS else COMMANDS:
        try:
            module = importlib.import_module(f"nettracer.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"nettracer.cli.{name}":
                continue  # command not built yet
            raise
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run, _flags=getattr(module, "FLAGS", {}))
    return parser


def as_flags(exc: NettracerError, flags: dict[str, str]) -> str:
    """The error's message with each setting it names that the command has a flag for
    said as that flag (``drops.group_by x`` -> ``--by x``)."""
    message = str(exc)
    for setting in exc.settings:
        flag = flags.get(setting)
        if flag is not None:
            message = message.replace(setting, flag)
    return message


def main(argv: list[str] | None = None) -> int:
    from nettracer.bpf.fd import Terminated, install_signal_handlers

    install_signal_handlers()
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    try:
        return _dispatch(argv, chosen)
    except Terminated as exc:
        return 0 if chosen in MONITORS else int(exc.code)  # type: ignore[arg-type]


def _dispatch(argv: list[str], chosen: str | None) -> int:
    """Parse ``argv`` and run the command; errors as one line and their exit code."""
    parser = build_parser(chosen)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except NettracerError as exc:
        sys.stderr.write(f"nettracer: {as_flags(exc, args._flags)}\n")
        return exc.exit_code
    except BrokenPipeError:
        return 0
    except Exception as exc:  # internal failure
        if os.environ.get("NETTRACER_DEBUG") == "1":
            raise
        sys.stderr.write(
            f"nettracer: internal error: {type(exc).__name__}: {exc} "
            f"(rerun with NETTRACER_DEBUG=1 for a traceback, and report it)\n"
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
