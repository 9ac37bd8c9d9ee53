"""Argument types shared by the subcommands (seconds, network namespaces)."""

from __future__ import annotations

import argparse
import os

from nettracer.errors import UsageError
from nettracer.layout import SOURCES as OFFSETS_SOURCES

__all__ = ["OFFSETS_SOURCES", "container_id", "netns_inode", "seconds"]


def seconds(text: str) -> float:
    """``--interval``/``--duration``: a number of seconds > 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, found {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, found {text!r}")
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
