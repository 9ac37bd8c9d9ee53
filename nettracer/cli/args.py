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

__all__ = ["OFFSETS_SOURCES", "container_id", "load_settings", "netns_inode", "seconds"]


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
    features.configure(config["kernel.without"])  # type: ignore[arg-type]
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
    (``/run/netns/NAME``, ``/proc/PID/ns/net``); None when not given."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        return os.stat(text).st_ino
    except OSError as exc:
        raise UsageError(
            f"{flag} {text}: expected an inode number or a namespace path "
            f"(/run/netns/NAME, /proc/PID/ns/net): {exc.strerror}"
        ) from None


def container_id(text: str) -> str:
    """``--container``: a container id or its prefix (``docker ps`` shows 12 of the 64 hex
    digits), lowercase hex (argparse type)."""
    t = text.strip().lower()
    if not 1 <= len(t) <= 64 or any(ch not in "0123456789abcdef" for ch in t):
        raise argparse.ArgumentTypeError(
            f"expected a container id (up to 64 hex digits, or a prefix), found {text!r}"
        )
    return t
