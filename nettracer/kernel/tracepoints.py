"""Tracepoint arguments as a program reads them: the one argument accessor.

A program on a tracepoint reads its arguments from its context, which is laid out in
one of two ways:

* a **raw tracepoint** program (``BPF_PROG_TYPE_RAW_TRACEPOINT``, Linux 4.17) gets the
  ``TP_PROTO`` arguments as an array of ``u64``: argument *i* at ``ctx + 8 * i``, each
  zero-extended from its own size (``__CAST_TO_U64()`` in include/trace/bpf_probe.h);
* a **classic tracepoint** program (``BPF_PROG_TYPE_TRACEPOINT``, Linux 4.7, attached
  with ``perf_event_open()`` and ``PERF_EVENT_IOC_SET_BPF``) gets the record that
  ``events/<category>/<name>/format`` describes: the fields of ``TP_STRUCT__entry``
  at the offsets and sizes the format file gives (the first 8 bytes, the common
  fields, hold a ``struct pt_regs *`` by then: ``perf_trace_run_bpf_submit()``).

The record's fields are not always named like the arguments: ``skb:kfree_skb`` has
``skbaddr`` for ``skb`` and ``sock:inet_sock_set_state`` ``skaddr`` for ``sk``. An
argument maps to the field of the same name, else to ``<name>addr`` (the kernel's
habit for pointers stored as ``const void *``), else to an alias the caller gives;
offsets always come from the format file. Loading a field of 1, 2 or 4 bytes with
``ldx`` zero-extends as the raw context does, so both layouts give the same value.

:class:`TracepointArgs` holds one layout; builders emit ``args.load(dst, ctx, name)``
and monitors load with ``args.prog_type`` and attach with ``args.attach(prog)``.
:meth:`TracepointArgs.for_kernel` turns a raw layout into the classic one where
:class:`nettracer.kernel.features.KernelFeatures` says not to use raw tracepoints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nettracer.errors import NettracerError
from nettracer.value import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.bpf.insn import Insn, Reg
    from nettracer.bpf.link import Link
    from nettracer.bpf.prog import Prog
    from nettracer.bpf.syscall import ProgType
    from nettracer.kernel.features import KernelFeatures
    from nettracer.kernel.tracefs import TracepointFormat


class TracepointArgs(Value):
    """Where each argument of tracepoint ``category:name`` lies in a program's context.

    ``raw`` says which layout (see the module docstring); ``fields`` holds
    ``(argument name, offset, size)`` in ``TP_PROTO`` order. ``category`` may be empty
    for a raw layout (raw tracepoints are found by name alone).
    """

    __slots__ = ("name", "category", "raw", "fields", "btf_id")  # noqa: RUF023 - field order

    def __init__(
        self,
        name: str,
        category: str,
        raw: bool,
        fields: tuple[tuple[str, int, int], ...],
        btf_id: int | None = None,
    ) -> None:
        self.name = name
        self.category = category
        self.raw = raw
        self.fields = fields
        #: BTF id of ``btf_trace_<name>`` for a ``tp_btf`` program (raw layouts only)
        self.btf_id = btf_id if raw else None

    @classmethod
    def raw_args(
        cls, name: str, names: Sequence[str], category: str = "", btf_id: int | None = None
    ) -> TracepointArgs:
        """The raw tracepoint layout of ``TP_PROTO`` arguments ``names`` (in order);
        ``btf_id`` (:func:`btf_trace_id`) makes it the ``tp_btf`` one."""
        fields = tuple((n, 8 * i, 8) for i, n in enumerate(names))
        return cls(name, category, True, fields, btf_id)

    @property
    def typed(self) -> bool:
        """A ``tp_btf`` layout: the program may read struct pointers with plain loads."""
        return self.btf_id is not None

    @classmethod
    def classic_args(
        cls,
        fmt: TracepointFormat,
        names: Sequence[str],
        aliases: Mapping[str, str] | None = None,
    ) -> TracepointArgs:
        """The classic layout of arguments ``names`` in the record ``fmt`` describes;
        an argument the record does not hold is left out (:meth:`has` is False)."""
        fields = []
        for n in names:
            for candidate in ((aliases or {}).get(n), n, f"{n}addr"):
                if candidate is not None and fmt.has_field(candidate):
                    f = fmt.field(candidate)
                    if f.size in (1, 2, 4, 8) and f.array_len is None and not f.data_loc:
                        fields.append((n, f.offset, f.size))
                    break
        return cls(fmt.name, fmt.category, False, tuple(fields))

    @property
    def names(self) -> tuple[str, ...]:
        """The arguments a program can read, in ``TP_PROTO`` order."""
        return tuple(n for n, _, _ in self.fields)

    def has(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.fields)

    def field(self, name: str) -> tuple[int, int]:
        """``(offset, size)`` of argument ``name`` in the context."""
        for n, off, size in self.fields:
            if n == name:
                return off, size
        where = f"{self.category}:{self.name}" if self.category else self.name
        kind = "raw tracepoint" if self.raw else "tracepoint record"
        raise NettracerError(
            f"{kind} {where} has no argument {name!r} (it has {', '.join(self.names)})"
        )

    def load(self, dst: Reg, ctx: Reg, name: str) -> Insn:
        """``dst = ctx->name``: the one instruction that reads an argument."""
        from nettracer.bpf.insn import ldx

        off, size = self.field(name)
        return ldx(size, dst, ctx, off)

    @property
    def prog_type(self) -> ProgType:
        """The program type whose context this layout describes."""
        from nettracer.bpf.syscall import ProgType

        if self.typed:
            return ProgType.TRACING
        return ProgType.RAW_TRACEPOINT if self.raw else ProgType.TRACEPOINT

    def load_target(self) -> dict[str, int]:
        """The keyword arguments of :func:`nettracer.bpf.prog.load` that say what a
        ``tp_btf`` program attaches to (none for the other layouts)."""
        if not self.typed:
            return {}
        from nettracer.bpf.syscall import BPF_TRACE_RAW_TP

        assert self.btf_id is not None
        return {"expected_attach_type": BPF_TRACE_RAW_TP, "attach_btf_id": self.btf_id}

    def untyped(self) -> TracepointArgs:
        """The same layout without the BTF typing (a plain raw tracepoint program)."""
        return self.replace(btf_id=None)

    def for_kernel(
        self, features: KernelFeatures | None = None, aliases: Mapping[str, str] | None = None
    ) -> TracepointArgs:
        """This layout; without its typing where ``tp_btf`` is not to be used; or the
        classic one when raw tracepoints are not to be used (``features`` defaults to
        :func:`nettracer.kernel.features.current`)."""
        from nettracer.kernel import features as kernel_features

        kf = features if features is not None else kernel_features.current()
        if not self.raw:
            return self
        if kf.use("raw_tracepoint"):
            return self if not self.typed or kf.use("tp_btf") else self.untyped()
        fmt = tracepoint_format(self.name, self.category)
        return TracepointArgs.classic_args(fmt, self.names, aliases)

    def attach(self, prog: Prog) -> Link:
        """Attach ``prog`` (loaded with :attr:`prog_type` and :meth:`load_target`) to
        this tracepoint; a classic one with ``PERF_EVENT_IOC_SET_BPF``, as the kernels
        without raw tracepoints (before 4.17) must, even where a perf-event BPF link
        (5.15) exists."""
        from nettracer.bpf.link import attach_raw_tracepoint, attach_tracepoint

        if self.raw:  # no tracefs import on this path (start-up: tracefs costs ~30 ms)
            return attach_raw_tracepoint(prog, self.name, typed=self.typed)
        from nettracer.kernel.tracefs import open_tracefs

        tp_id = open_tracefs().tracepoint_id(self.category, self.name)
        return attach_tracepoint(prog, tp_id, f"{self.category}/{self.name}", bpf_link=False)


def btf_trace_id(name: str, cache_dir: str | None = None) -> int | None:
    """The BTF type id of ``typedef void (*btf_trace_<name>)(void *, TP_PROTO)`` in the
    kernel's BTF (Linux 5.5, with ``tp_btf`` itself): what a ``tp_btf`` program on
    tracepoint ``name`` is loaded with.  None without BTF or without the typedef.
    Through the BTF cache in ``cache_dir`` (:mod:`nettracer.kernel.btf_cache`): finding
    it in a parse of the BTF takes about 50 ms, start-up's whole budget."""
    import os

    from nettracer.kernel import BTF_VMLINUX

    if not os.path.exists(BTF_VMLINUX):
        return None
    from nettracer.kernel import btf_cache

    def compute() -> int:
        from nettracer.kernel.btf import Btf

        return Btf.vmlinux().typedef_id(f"btf_trace_{name}")

    def decode(rows: list[tuple[str, ...]]) -> int:
        ((tid,),) = rows  # ValueError unless one row of one field
        return int(tid)

    tid = btf_cache.cached(cache_dir, f"btf_trace.{name}", compute, lambda t: [(t,)], decode)
    return tid or None


def tracepoint_format(name: str, category: str = "") -> TracepointFormat:
    """The format of tracepoint ``name``, in ``category`` or, when that is empty, in the
    one category that has it (raw tracepoint names are unique across categories)."""
    from nettracer.kernel.tracefs import open_tracefs

    tfs = open_tracefs()
    if not category:
        category = tracepoint_category(name)
    return tfs.tracepoint_format(category, name)


def tracepoint_category(name: str) -> str:
    """The category of tracepoint ``name`` (``kfree_skb`` -> ``skb``), from the
    ``events/<category>/<name>`` directories of tracefs;
    :class:`~nettracer.bpf.link.UnknownTracepoint` when there is none."""
    import os

    from nettracer.kernel.tracefs import open_tracefs

    events = open_tracefs().path("events")
    for category in sorted(os.listdir(events)):
        if os.path.isdir(os.path.join(events, category, name)):
            return category
    from nettracer.bpf.link import UnknownTracepoint

    raise UnknownTracepoint(f"unknown tracepoint {name!r} (no {events}/*/{name})")
