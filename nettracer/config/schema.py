"""The configuration schema: every key, its type, default, allowed values and meaning.

Keys are ``section.name``; the YAML file nests them (``network: {collect_tcp: true}``),
environment variables spell them ``NETTRACER_<SECTION>__<NAME>``
(``NETTRACER_NETWORK__MAX_TRACKED_CONNECTIONS=1000``).  The schema is data, not code:
:func:`check` turns a raw value from any source into the typed value or says, in the
words of :class:`nettracer.errors.ConfigError`, what was expected and what was found.
"""

from __future__ import annotations

import math

from nettracer.kernel.features import FORCEABLE
from nettracer.layout import SOURCES
from nettracer.value import Value

#: the shortest reporting interval (seconds): below it the reports cost more CPU than
#: they show, and a terminal cannot follow them
MIN_INTERVAL_S = 0.1

#: the value types a key can have
TYPES: tuple[str, ...] = ("bool", "int", "float", "str", "list", "address")

#: what the drop monitor can group its counts by
DROP_GROUP_KEYS: tuple[str, ...] = (
    "location",
    "device",
    "module",
    "reason",
    "protocol",
    "netns",
    "container",
)


class Key(Value):
    """One configuration key.

    ``type`` is one of :data:`TYPES`; ``choices`` limits a ``str`` (or, for a ``list``,
    each item); ``min``/``max`` bound an ``int`` or ``float`` (``min_exclusive`` makes
    the lower bound strict, as for intervals that must be > 0).
    """

    __slots__ = (  # noqa: RUF023 - field order (repr, equality)
        "path",
        "type",
        "default",
        "doc",
        "choices",
        "min",
        "max",
        "min_exclusive",
        "absolute_path",
        "unique_items",
        "min_items",
    )

    def __init__(
        self,
        path: str,
        type: str,
        default: object,
        doc: str,
        choices: tuple[str, ...] | None = None,
        min: float | None = None,
        max: float | None = None,
        min_exclusive: bool = False,
        absolute_path: bool = False,
        unique_items: bool = False,
        min_items: int = 0,
    ) -> None:
        self.path = path
        self.type = type
        self.default = default
        self.doc = doc
        self.choices = choices
        self.min = min
        self.max = max
        self.min_exclusive = min_exclusive
        self.absolute_path = absolute_path
        self.unique_items = unique_items
        self.min_items = min_items

    @property
    def section(self) -> str:
        return self.path.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.path.split(".", 1)[1]

    @property
    def env_var(self) -> str:
        """The environment variable that sets this key."""
        return f"NETTRACER_{self.section.upper()}__{self.name.upper()}"

    def expected(self) -> str:
        """What a valid value looks like, as the middle of "expected ..."."""
        if self.type == "bool":
            return "true or false"
        if self.type in ("int", "float"):
            kind = "an integer" if self.type == "int" else "a number"
            return f"{kind} {self._range()}".rstrip()
        if self.type == "list":
            items = f"items among {', '.join(self.choices)}" if self.choices else "strings"
            extra = ", at least one" if self.min_items else ""
            extra += ", no repeats" if self.unique_items else ""
            return f"a list of {items}{extra}"
        if self.type == "address":
            return "HOST:PORT (e.g. 127.0.0.1:9410 or [::1]:9410)"
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.absolute_path:
            return "an absolute path"
        return "a string"

    def _range(self) -> str:
        def fmt(x: float) -> str:
            return f"{int(x):_}" if self.type == "int" else f"{x:g}"

        if self.min is not None and self.max is not None:
            if self.min_exclusive:
                return f"> {fmt(self.min)} and <= {fmt(self.max)}"
            return f"in {fmt(self.min)}..{fmt(self.max)}"
        if self.min is not None:
            return f"> {fmt(self.min)}" if self.min_exclusive else f">= {fmt(self.min)}"
        if self.max is not None:
            return f"<= {fmt(self.max)}"
        return ""


class Invalid(ValueError):
    """A value does not fit its key; ``found`` describes what was there."""

    def __init__(self, found: str) -> None:
        super().__init__(found)
        self.found = found


#: longest repr of a value quoted in a message
MAX_REPR = 60


def short_repr(value: object, limit: int = MAX_REPR) -> str:
    """``repr(value)`` cut to about ``limit`` characters, built without ever making the
    whole repr (a list may share itself a million times through YAML aliases)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 3, 6, 4, limit, limit
    return shorten(r.repr(value), limit)


def shorten(text: str, limit: int = MAX_REPR) -> str:
    """``text`` cut to ``limit`` characters, the cut marked by ``...``."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: object) -> str:
    """Describe a raw value for "found ...": its (shortened) repr and, when not
    obvious, its type."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        text = short_repr(value)
        return f"a list {text}" if "..." not in text else "a list"
    if isinstance(value, str):
        return f"the string {short_repr(value)}"
    return short_repr(value)


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def check(key: Key, raw: object, *, text: bool) -> object:
    """Return ``raw`` as a value of ``key``'s type or raise :class:`Invalid`.

    ``text`` says the value came as a string (an environment variable or a flag given
    as text), so "false", "1000" and "a,b" are parsed; values from YAML must already
    have the right type (YAML's own ``true``, ``1000``, ``[a, b]``).
    """
    value = _convert(key, raw, text=text)
    _check_bounds(key, value, value if text and key.type in ("int", "float") else raw)
    return value


def _convert(key: Key, raw: object, *, text: bool) -> object:
    found = describe(raw)
    if key.type == "bool":
        if isinstance(raw, bool):
            return raw
        if text and isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise Invalid(found)
    if key.type == "int":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if text and isinstance(raw, str):
            try:
                return int(raw.strip().replace("_", ""), 0)
            except ValueError:
                pass
        raise Invalid(found)
    if key.type == "float":
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        elif text and isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise Invalid(found) from None
        else:
            raise Invalid(found)
        if not math.isfinite(value):
            raise Invalid(found)
        return value
    if key.type == "list":
        if text and isinstance(raw, str):
            s = raw.strip()
            if s.startswith("[") and s.endswith("]"):
                s = s[1:-1]
            raw = [item.strip() for item in s.split(",") if item.strip()]
        if isinstance(raw, (list, tuple)) and all(isinstance(x, str) for x in raw):
            return list(raw)
        raise Invalid(found)
    # str and address
    if isinstance(raw, str):
        return raw.strip() if text else raw
    raise Invalid(found)


def _check_bounds(key: Key, value: object, raw: object) -> None:
    if key.type in ("int", "float"):
        assert isinstance(value, (int, float))
        low_bad = key.min is not None and (
            value <= key.min if key.min_exclusive else value < key.min
        )
        if low_bad or (key.max is not None and value > key.max):
            raise Invalid(describe(raw))
    elif key.type == "str":
        assert isinstance(value, str)
        if key.choices is not None and value not in key.choices:
            raise Invalid(describe(raw))
        if key.absolute_path and not value.startswith("/"):
            raise Invalid(describe(raw))
    elif key.type == "list":
        assert isinstance(value, list)
        if key.choices is not None:
            bad = [x for x in value if x not in key.choices]
            if bad:
                raise Invalid(f"{describe(raw)} with unknown item {short_repr(bad[0])}")
        if len(value) < key.min_items:
            raise Invalid(describe(raw) if value else "an empty list")
        if key.unique_items and len(set(value)) != len(value):
            raise Invalid(f"{describe(raw)} with {short_repr(_first_repeat(value))} twice")
    elif key.type == "address":
        assert isinstance(value, str)
        if parse_address(value) is None:
            raise Invalid(describe(raw))


def _first_repeat(items: list[str]) -> str:
    """The first item of ``items`` that appears again later."""
    from collections import Counter

    counts = Counter(items)
    return next(x for x in items if counts[x] > 1)


def parse_address(text: str) -> tuple[str, int] | None:
    """Split ``HOST:PORT`` / ``[V6]:PORT`` into (host, port), or None when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        import ipaddress

        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    elif ":" in host:
        return None
    return host, int(port)


def _keys(*keys: Key) -> dict[str, Key]:
    return {k.path: k for k in keys}


#: every key nettracer knows, in the order ``config show`` lists them
SCHEMA: dict[str, Key] = _keys(
    Key(
        "offsets.source",
        "str",
        "auto",
        "where struct offsets come from: BTF when the kernel has it (auto), only BTF, "
        "or guessed at run time",
        choices=SOURCES,
    ),
    Key(
        "offsets.cache_dir",
        "str",
        "/var/cache/nettracer",
        "directory that keeps guessed offset profiles, one per kernel build",
        absolute_path=True,
    ),
    Key(
        "offsets.profile_dir",
        "str",
        "",
        "directory of offset profiles made elsewhere, one per kernel build as `nettracer "
        "offsets --save-dir` names them (a fleet's nodes with the same kernel share one "
        "guess); read before guessing, a profile of another kernel is never used; empty: "
        "offsets.cache_dir/profiles",
        absolute_path=True,
    ),
    Key(
        "offsets.guess_timeout_ms",
        "int",
        2000,
        "give up guessing offsets after this many milliseconds",
        min=1,
        max=600_000,
    ),
    Key("network.collect_tcp", "bool", True, "track TCP connections"),
    Key("network.collect_udp", "bool", True, "track UDP flows"),
    Key(
        "network.udp_peers",
        "bool",
        False,
        "count each peer of unconnected UDP sockets (runs a program on every packet sent "
        "and received, TCP's too)",
    ),
    Key(
        "network.collect_ipv6",
        "bool",
        True,
        "track IPv6 connections (forced off when the kernel has IPv6 disabled)",
    ),
    Key(
        "network.max_tracked_connections",
        "int",
        65536,
        "size of the kernel connection map; connections beyond it are counted as dropped",
        min=1,
        max=10_000_000,
    ),
    Key(
        "network.tcp_conn_timeout_s",
        "float",
        120.0,
        "forget a TCP connection with no activity for this many seconds",
        min=0,
        max=7 * 86400,
        min_exclusive=True,
    ),
    Key(
        "network.udp_conn_timeout_s",
        "float",
        30.0,
        "forget a UDP flow with no activity for this many seconds",
        min=0,
        max=7 * 86400,
        min_exclusive=True,
    ),
    Key(
        "gateway_lookup.enabled",
        "bool",
        True,
        "resolve the next-hop gateway and output interface of non-local destinations",
    ),
    Key(
        "gateway_lookup.cache_size",
        "int",
        1024,
        "routes kept in the gateway lookup cache (LRU)",
        min=0,
        max=1_000_000,
    ),
    Key(
        "gateway_lookup.ttl_s",
        "float",
        300.0,
        "seconds a resolved route stays in the cache",
        min=0,
        max=86400,
        min_exclusive=True,
    ),
    Key(
        "gateway_lookup.negative_ttl_s",
        "float",
        5.0,
        "seconds a failed or empty lookup stays in the cache before it is retried",
        min=0,
        max=86400,
        min_exclusive=True,
    ),
    Key(
        "drops.interval_s",
        "float",
        5.0,
        "print and clear the drop counts every this many seconds",
        min=MIN_INTERVAL_S,
        max=86400,
    ),
    Key(
        "drops.group_by",
        "list",
        ["location", "device", "reason", "protocol"],
        "what a drop count is keyed by",
        choices=DROP_GROUP_KEYS,
        unique_items=True,
        min_items=1,
    ),
    Key(
        "output.format",
        "str",
        "text",
        "how results are written: tables, JSON lines, or Prometheus exposition",
        choices=("text", "json", "prometheus"),
    ),
    Key(
        "agent.listen",
        "address",
        "127.0.0.1:9410",
        "address the metrics endpoint listens on",
    ),
    Key(
        "kernel.without",
        "list",
        [],
        "behave as if the kernel lacked these features: their fallbacks run instead "
        "(to test them, or to work around a kernel bug); 'nettracer kernel' shows each path",
        choices=FORCEABLE,
        unique_items=True,
    ),
)

#: sections, in schema order
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(k.section for k in SCHEMA.values()))
