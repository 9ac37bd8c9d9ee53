"""The effective configuration: every key's value and where that value came from."""

from __future__ import annotations

from collections.abc import Iterator

from nettracer.config.schema import SCHEMA, SECTIONS, Key
from nettracer.value import Value

#: kinds of origin, in rising precedence (``kernel`` overrides everything it touches)
ORIGIN_KINDS: tuple[str, ...] = ("default", "file", "env", "flag", "kernel")


class Origin(Value):
    """Where a value came from.

    ``kind`` is one of :data:`ORIGIN_KINDS`; ``where`` is the file and line
    (``/etc/nettracer/nettracer.yaml:12``), the environment variable's name, the flag
    (``--max-conns``) or, for ``kernel``, why the kernel forced the value.
    """

    __slots__ = ("kind", "where")

    def __init__(self, kind: str, where: str = "") -> None:
        self.kind = kind
        self.where = where

    def __str__(self) -> str:
        return self.kind if not self.where else f"{self.kind} {self.where}"

    def phrase(self) -> str:
        """The tail of an error message: "in /x.yaml line 3", "in environment variable X"."""
        if self.kind == "file":
            path, _, line = self.where.rpartition(":")
            return f"in {path} line {line}" if line.isdigit() else f"in {self.where}"
        if self.kind == "env":
            return f"in environment variable {self.where}"
        if self.kind == "flag":
            return f"from flag {self.where}"
        if self.kind == "kernel":
            return f"forced by the kernel ({self.where})"
        return "by default"


DEFAULT = Origin("default")


class Setting(Value):
    """One key's effective value and its origin."""

    __slots__ = ("key", "value", "origin")  # noqa: RUF023 - field order (repr, equality)

    def __init__(self, key: Key, value: object, origin: Origin) -> None:
        self.key = key
        self.value = value
        self.origin = origin


class Config:
    """The effective configuration.

    ``cfg["network.collect_tcp"]`` and ``cfg.network.collect_tcp`` give the value,
    ``cfg.source("network.collect_tcp")`` where it came from, :meth:`as_json` both.
    ``notices`` lists what was adjusted to the running kernel (the CLI prints them on
    stderr).
    """

    def __init__(
        self,
        settings: dict[str, Setting],
        notices: list[str] | None = None,
        file: str | None = None,
    ) -> None:
        self.settings = settings
        self.notices: list[str] = [] if notices is None else notices
        #: the YAML file that was read, if any
        self.file = file

    def __eq__(self, other: object) -> bool:
        if type(other) is not Config:
            return NotImplemented
        return (self.settings, self.notices, self.file) == (
            other.settings,
            other.notices,
            other.file,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass was

    def __repr__(self) -> str:
        return f"Config(settings={self.settings!r}, notices={self.notices!r}, file={self.file!r})"

    def __getitem__(self, path: str) -> object:
        return self.settings[path].value

    def __contains__(self, path: object) -> bool:
        return path in self.settings

    def __getattr__(self, section: str) -> _Section:
        if section.startswith("_") or section not in SECTIONS:
            raise AttributeError(section)
        return _Section(self, section)

    def setting(self, path: str) -> Setting:
        return self.settings[path]

    def source(self, path: str) -> str:
        """Where ``path``'s value came from, as ``config show`` prints it."""
        return str(self.settings[path].origin)

    def __iter__(self) -> Iterator[str]:
        return iter(self.settings)

    def items(self) -> Iterator[tuple[str, Setting]]:
        return iter(self.settings.items())

    def as_json(self) -> dict[str, dict[str, object]]:
        """``{key: {"value": ..., "source": ...}}`` in schema order."""
        return {
            path: {"value": s.value, "source": str(s.origin)} for path, s in self.settings.items()
        }

    def values(self) -> dict[str, object]:
        """``{key: value}`` in schema order."""
        return {path: s.value for path, s in self.settings.items()}


class _Section:
    """Attribute access to one section: ``cfg.network.max_tracked_connections``."""

    __slots__ = ("_config", "_section")

    def __init__(self, config: Config, section: str) -> None:
        self._config = config
        self._section = section

    def __getattr__(self, name: str) -> object:
        path = f"{self._section}.{name}"
        if path not in SCHEMA:
            raise AttributeError(path)
        return self._config[path]
