"""nettracer.config: one configuration from defaults, a YAML file, the environment and flags.

Precedence, lowest first: schema defaults, the YAML file (``/etc/nettracer/nettracer.yaml``
or ``--config PATH``), ``NETTRACER_<SECTION>__<KEY>`` environment variables, command-line
flags; then the running kernel may force a value off (IPv6), with a notice.  Every value
remembers where it came from.  PyYAML is imported only when a file is read.
"""

from __future__ import annotations

from nettracer.config.load import DEFAULT_PATH, load_config
from nettracer.config.schema import SCHEMA, SECTIONS, Key
from nettracer.config.settings import Config, Origin, Setting

__all__ = [
    "DEFAULT_PATH",
    "SCHEMA",
    "SECTIONS",
    "Config",
    "Key",
    "Origin",
    "Setting",
    "load_config",
]
