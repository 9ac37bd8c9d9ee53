"""What the subcommands share: argument types (seconds, network namespaces, containers)
and loading the configuration with their flags."""

from __future__ import annotations

import argparse
import os
import sys

from nettracer.errors import UsageError
from nettracer.layout import SOURCES as OFFSETS_SOURCES

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.config import Config

__all__ = [
    "OFFSETS_SOURCES",
    "container_id",
    "interval_seconds",
    "load_settings",
    "netns_inode",
    "process_id",
    "seconds",
]


def load_settings(
    path: str | None, values: dict[str, object], flags: dict[str, str], *, notices: bool = True
) -> Config:
    """The configuration: the file ``path`` (``--config``), the environment, then the
    flags' ``values`` by setting (None: not given), each remembered as its flag in
    ``flags`` (the command's ``FLAGS``); its notices on stderr unless ``notices`` is
    false. Its ``kernel.without`` becomes this process's
    (:func:`nettracer.kernel.features.configure`): the fallbacks it names are taken."""
    from nettracer.config import load_config
    from nettracer.kernel import features

    config = load_config(path, {k: (v, flags[k]) for k, v in values.items()})
    if notices:
        for notice in config.notices:
            sys.stderr.write(f"nettracer: notice: {notice}\n")
    cache_dir = str(config["offsets.cache_dir"]) or None
    features.configure(config["kernel.without"], cache_dir)  # type: ignore[arg-type]
    return config


def seconds(text: str) -> float:
    """``--duration``: a number of seconds > 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, found {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, found {text!r}")
    return value


def interval_seconds(text: str) -> float:
    """``--interval``: a number of seconds >= :data:`~nettracer.config.schema.MIN_INTERVAL_S`
    (argparse type)."""
    from nettracer.config.schema import MIN_INTERVAL_S

    value = seconds(text)
    if value < MIN_INTERVAL_S:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds >= {MIN_INTERVAL_S:g} (shorter intervals cost more "
            f"than they show), found {text!r}"
        )
    return value


def netns_inode(text: str | None, flag: str = "--netns") -> int | None:
    """A network namespace inode from a number or a namespace file path
    (``/run/netns/NAME``, ``/proc/PID/ns/net``); None when not given.  A path must be a
    network namespace file, a number the inode of a namespace that exists now (when we
    are root and can see them all): a filter that can never match is refused."""
    if text is None:
        return None
    from nettracer.net.netns import NetnsIndex, NetnsNotFound, is_netns_file

    hint = "expected an inode number or a namespace path (/run/netns/NAME, /proc/PID/ns/net)"
    if text.isdigit():
        inode = int(text)
        if os.geteuid() == 0:
            try:
                NetnsIndex().path(inode)
            except NetnsNotFound:
                raise UsageError(
                    f"{flag} {text}: no network namespace has inode {text} "
                    f"(lsns -t net lists them); {hint}"
                ) from None
        return inode
    try:
        inode = os.stat(text).st_ino
    except OSError as exc:
        raise UsageError(f"{flag} {text}: {hint}: {exc.strerror}") from None
    if not is_netns_file(text):
        raise UsageError(f"{flag} {text}: not a network namespace file; {hint}")
    return inode


def process_id(text: str) -> int:
    """``--pid``: the id of a process that exists now (argparse type)."""
    try:
        pid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a process id, found {text!r}") from None
    if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
        raise argparse.ArgumentTypeError(f"no process has id {text}")
    return pid


def container_id(text: str) -> str:
    """``--container``: a container id or its prefix (``docker ps`` shows 12 of the 64 hex
    digits), lowercase hex (argparse type)."""
    t = text.strip().lower()
    if not 1 <= len(t) <= 64 or any(ch not in "0123456789abcdef" for ch in t):
        raise argparse.ArgumentTypeError(
            f"expected a container id (up to 64 hex digits, or a prefix), found {text!r}"
        )
    return t
