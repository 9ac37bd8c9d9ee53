"""What we observe: one package per tracer, one contract for all of them.

A tracer is a package (``drops/``, ``conns/``) holding ``records`` (what the kernel
and user space share), ``program`` (the eBPF program, built from a spec) and
``monitor`` (the class that loads it and reads what it counts); ``nettracer read``'s
:class:`nettracer.access.reader.Reader` keeps the same contract.  The command line,
the agent and the tests build and drive every tracer the same way, :class:`Tracer`:

``T.from_config(cfg, **overrides)``
    The only way to build one (nothing is loaded into the kernel yet).  ``cfg`` is
    what :func:`nettracer.config.load_config` returns (anything with ``cfg["key"]``);
    it supplies the offsets (``offsets.*``, through
    :func:`nettracer.layout.source.from_config`) and the tracer's own settings.  The
    keyword ``overrides`` are what only a caller knows: one record per event, filters,
    the namespace or process to watch, offsets already loaded (the agent loads them
    once for two tracers), map sizes.
``start() -> T``, ``close()``, ``with T.from_config(cfg) as t:``
    Create the maps, load and attach the programs; detach and free everything
    (``close`` is idempotent, and a failed ``start`` leaves nothing behind).
``source``
    Where the struct offsets came from (``btf``, ``guess``, ``profile``), for the
    "attached" line.
``notices``
    What the user should know about how this kernel is traced (e.g. "UDP flows are
    not collected: ..."), to print after ``start``.
What it reports
    ``DropMonitor.collect() -> Sample`` (counts since the last call) and, with
    ``events=True``, ``poll_events``; ``ConnMonitor.interval() -> Interval`` (open and
    closed connections since the last call) after draining with ``poll``;
    ``Reader.poll`` (events) or ``Reader.pop_counts`` (counts).  Rendering lives in
    :mod:`nettracer.output`.

Errors name settings, never flags (:mod:`nettracer.errors`): a configuration key
(``drops.group_by``) or, for an override, ``<tracer>.<override>`` (``drops.device``,
``read.netns``); each command says them as its flags.

Adding a tracer therefore means one new package with a monitor that keeps this
contract, plus ``nettracer/cli/<name>.py`` (its flags, its ``FLAGS`` table, and
``Monitor.from_config(config, ...)``).
"""

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, Protocol, Self

    class Tracer(Protocol):
        """The contract above, for type checkers."""

        @property
        def source(self) -> str: ...

        @property
        def notices(self) -> list[str]: ...

        @classmethod
        def from_config(cls, cfg: Mapping[str, object], /, *args: Any, **overrides: Any) -> Self:
            """Build from configuration (not started)."""
            ...

        def start(self) -> Self:
            """Load and attach."""
            ...

        def close(self) -> None:
            """Detach and free everything (idempotent)."""
            ...

        def __enter__(self) -> Self: ...

        def __exit__(self, *exc: object) -> None: ...
