"""Building the effective configuration: defaults < file < environment < flags < kernel."""

from __future__ import annotations

import os
from collections.abc import Mapping

from nettracer.config.kernel import ipv6_disabled
from nettracer.config.schema import SCHEMA, Invalid, check
from nettracer.config.settings import DEFAULT, Config, Origin, Setting
from nettracer.config.sources import Raw, read_env, read_file, read_flags
from nettracer.errors import ConfigError

#: the file read when no ``--config`` is given (its absence is fine)
DEFAULT_PATH = "/etc/nettracer/nettracer.yaml"


def load_config(
    path: str | None = None,
    overrides: Mapping[str, tuple[object, str]] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    default_path: str = DEFAULT_PATH,
    proc: str = "/proc",
) -> Config:
    """The effective configuration.

    ``path`` is an explicit YAML file (``--config``; it must exist) or None for
    :data:`DEFAULT_PATH` when present.  ``overrides`` maps keys to ``(value, "--flag")``
    from the command line; a value of None means the flag was not given.  ``environ``
    defaults to ``os.environ``; ``proc`` is where the kernel is asked about IPv6.
    Raises :class:`ConfigError` naming the key, what was expected, what was found and
    where.
    """
    settings = {k: Setting(key, key.default, DEFAULT) for k, key in SCHEMA.items()}
    file = path
    if path is None and os.path.exists(default_path):
        file = default_path
    layers: list[Raw] = []
    if file is not None:
        layers.append(read_file(file))
    layers.append(read_env(os.environ if environ is None else environ))
    layers.append(read_flags(overrides or {}))
    for layer in layers:
        for k, (raw, origin, text) in layer.items():
            key = SCHEMA[k]
            try:
                value = check(key, raw, text=text)
            except Invalid as exc:
                raise ConfigError(
                    f"{k}: expected {key.expected()}, found {exc.found} ({origin.phrase()})"
                ) from None
            settings[k] = Setting(key, value, origin)
    config = Config(settings, file=file)
    _adjust_to_kernel(config, proc)
    _check_conflicts(config)
    return config


def _force(config: Config, path: str, value: object, why: str) -> None:
    old = config.settings[path]
    config.settings[path] = Setting(old.key, value, Origin("kernel", why))
    shown = str(value).lower() if isinstance(value, bool) else value
    config.notices.append(f"{path} set to {shown} (was {old.origin}): {why}")


def _adjust_to_kernel(config: Config, proc: str) -> None:
    if config["network.collect_ipv6"]:
        why = ipv6_disabled(proc)
        if why is not None:
            _force(config, "network.collect_ipv6", False, f"IPv6 is disabled: {why}")


def _conflict(config: Config, paths: tuple[str, ...], expected: str, found: str) -> ConfigError:
    wheres = []
    for p in paths:
        origin = config.settings[p].origin
        wheres.append(f"{p} {origin.phrase()}")
    return ConfigError(
        f"{' and '.join(paths)}: expected {expected}, found {found} ({'; '.join(wheres)})"
    )


def _check_conflicts(config: Config) -> None:
    if not config["network.collect_tcp"] and not config["network.collect_udp"]:
        raise _conflict(
            config,
            ("network.collect_tcp", "network.collect_udp"),
            "at least one of them true",
            "both false",
        )
    if config["gateway_lookup.enabled"] and config["gateway_lookup.cache_size"] == 0:
        raise _conflict(
            config,
            ("gateway_lookup.cache_size", "gateway_lookup.enabled"),
            "a cache size >= 1 while gateway lookups are enabled (or enabled: false)",
            "cache_size 0 with enabled true",
        )
