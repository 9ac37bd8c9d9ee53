"""nettracer.config: one configuration from defaults, a YAML file, the environment and flags.

Precedence, lowest first: schema defaults, the YAML file (``/etc/nettracer/nettracer.yaml``
or ``--config PATH``), ``NETTRACER_<SECTION>__<KEY>`` environment variables, command-line
flags; then the running kernel may force a value off (IPv6), with a notice.  Every value
remembers where it came from.  PyYAML is imported only when a file is read.

The file must be a regular file of at most 64 KiB (a FIFO, socket, device or directory
is refused without being opened for reading; ``/dev/null`` reads as empty). YAML
anchors and aliases are allowed, but all aliases together may add at most 1000
values once expanded, and an alias inside its own anchor is refused: a config of
sections and keys needs no more, and a "billion laughs" file stops there.
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
