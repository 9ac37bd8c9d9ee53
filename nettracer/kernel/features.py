"""Feature probes: what this kernel lets nettracer do, and which path each feature takes.

Each ``has_*`` probe is conclusive (True/False) by asking the kernel itself
(loading a small program, creating a map) — never by version numbers — or raises
when it cannot tell (e.g. not permitted, or a refusal for another reason).
``require`` turns a False into a typed :class:`~nettracer.errors.NotSupported`
naming the kernel version that introduced the feature.

:class:`KernelFeatures` is the one object the rest of nettracer asks "use feature X?":
probed (lazily, each probe once per process) and not listed in the configuration's
``kernel.without``, which forces the fallback on any kernel (:data:`FORCEABLE`).
:func:`current` is the process's object, :func:`configure` replaces it.

The bpf modules are imported inside the probes: the configuration schema imports
this module for :data:`FORCEABLE` on every start.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable

from nettracer.errors import NotSupported, UsageError
from nettracer.kernel import BTF_VMLINUX
from nettracer.value import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.bpf import prog as bpf_prog
    from nettracer.bpf.insn import Insn
    from nettracer.bpf.memory import KernelReads
    from nettracer.bpf.syscall import ProgType

#: the perf PMU that exists exactly when the kernel has CONFIG_KPROBES (and kprobe events)
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"

_UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, 524, errno.E2BIG)


def _load_probe(
    prog_type: ProgType,
    body: list[Insn] | None = None,
    refusals: tuple[str, ...] = (),
    **target: int,
) -> bpf_prog.Prog | None:
    """``body`` (default nothing) then ``return 0`` as a program of ``prog_type`` (and
    ``target``: :func:`nettracer.bpf.prog.load`'s attach type and BTF id); None when
    the kernel refuses the type, or the verifier refuses the program with a log line
    containing one of ``refusals`` (what an older kernel says about the one
    instruction being probed). Any other refusal is raised: the probe cannot tell."""
    from nettracer.bpf import prog as bpf_prog
    from nettracer.bpf.insn import R0, exit_, mov64
    from nettracer.bpf.syscall import BpfSyscallError

    insns = [*(body or []), mov64(R0, 0), exit_()]
    try:
        return bpf_prog.load(insns, prog_type=prog_type, name="nt_probe", **target)
    except bpf_prog.VerifierError as exc:
        if body is None or any(r in exc.log for r in refusals):
            return None
        raise
    except BpfSyscallError as exc:
        if exc.errno in _UNSUPPORTED:
            return None
        raise


def _loads(
    prog_type: ProgType,
    body: list[Insn] | None = None,
    refusals: tuple[str, ...] = (),
    **target: int,
) -> bool:
    prog = _load_probe(prog_type, body, refusals, **target)
    if prog is None:
        return False
    prog.close()
    return True


def has_raw_tracepoint() -> bool:
    """Raw tracepoint programs load (Linux 4.17: ``BPF_PROG_TYPE_RAW_TRACEPOINT`` came
    with ``BPF_RAW_TRACEPOINT_OPEN`` in one commit, so the load is conclusive).

    The probe does not attach: a tracepoint's probe removed by closing a link is freed
    after an RCU grace period, and the tracer's own attach to that tracepoint right
    after would wait for it (5-15 ms of start-up on 6.18)."""
    from nettracer.bpf.syscall import ProgType

    return _loads(ProgType.RAW_TRACEPOINT)


def has_tracepoint_programs() -> bool:
    """Classic (perf) tracepoint programs load (Linux 4.7)."""
    from nettracer.bpf.syscall import ProgType

    return _loads(ProgType.TRACEPOINT)


def has_ringbuf() -> bool:
    """``BPF_MAP_TYPE_RINGBUF`` maps can be created (Linux 5.8)."""
    from nettracer.bpf.ringbuf import RingBuf
    from nettracer.bpf.syscall import BpfSyscallError

    try:
        RingBuf(4096, "nt_probe").close()
    except BpfSyscallError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    return True


#: what the verifier says about a call to a helper it does not know (4.x-6.x wordings)
_UNKNOWN_HELPER = ("invalid func", "unknown func")


def has_probe_read_kernel() -> bool:
    """``bpf_probe_read_kernel()`` (helper 113, Linux 5.5) is known to tracing programs.

    Conclusive: a classic tracepoint program (4.7) calling it with a stack buffer
    loads, or the verifier answers "invalid func unknown#113"."""
    from nettracer.bpf.insn import FP, R3, Program, mov64
    from nettracer.bpf.memory import KernelReads, read
    from nettracer.bpf.syscall import ProgType

    p = Program(reads=KernelReads(legacy=False))
    p += mov64(R3, 0)
    read(p, FP, -8, 8, R3)  # the one read emitter, told to use the 5.5 helper
    return _loads(ProgType.TRACEPOINT, p.insns, _UNKNOWN_HELPER)


def has_jiffies64() -> bool:
    """``bpf_jiffies64()`` (helper 118, Linux 5.6) is known to tracing programs.

    Conclusive: a classic tracepoint program calling it loads, or the verifier answers
    "invalid func unknown#118"."""
    from nettracer.bpf.helpers import Helper
    from nettracer.bpf.insn import call
    from nettracer.bpf.syscall import ProgType

    return _loads(ProgType.TRACEPOINT, [call(Helper.jiffies64)], _UNKNOWN_HELPER)


def has_atomic_fetch() -> bool:
    """``BPF_ATOMIC`` with ``BPF_FETCH`` (fetch-and-add and friends, Linux 5.12).

    Conclusive: ``r1 = atomic_fetch_add((u64 *)(r10 - 8), r1)`` loads, or the verifier
    answers "BPF_XADD uses reserved fields" (before 5.12, where the opcode was XADD
    and its immediate had to be 0) or "unknown atomic op"."""
    from nettracer.bpf.insn import ATOMIC, DW, FP, R1, STX, AluOp, Insn, mov64, st
    from nettracer.bpf.syscall import ProgType

    bpf_fetch = 0x01  # include/uapi/linux/bpf.h
    fetch_add = Insn(STX | ATOMIC | DW, FP, R1, -8, int(AluOp.ADD) | bpf_fetch)
    body = [st(8, FP, -8, 0), mov64(R1, 1), fetch_add]
    return _loads(ProgType.TRACEPOINT, body, ("reserved fields", "unknown atomic"))


def has_batch_ops() -> bool:
    """``BPF_MAP_LOOKUP_BATCH`` and friends on hash maps (Linux 5.6).

    Conclusive: a batch lookup on an empty hash map answers ``ENOENT`` (the end of the
    map) where the command exists, ``EINVAL`` where it does not."""
    import ctypes

    from nettracer.bpf import syscall
    from nettracer.bpf.syscall import BpfSyscallError, Cmd, MapType

    fd = syscall.map_create(MapType.HASH, 4, 4, 1, name="nt_probe")
    keys, values, out = (ctypes.create_string_buffer(4) for _ in range(3))
    try:
        syscall.map_batch(Cmd.MAP_LOOKUP_BATCH, fd, None, out, keys, values, 1)
    except BpfSyscallError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    finally:
        os.close(fd)
    return True


def has_tp_btf() -> bool:
    """BTF-typed raw tracepoint programs (``tp_btf``: ``BPF_PROG_TYPE_TRACING`` attached
    with ``BPF_TRACE_RAW_TP``, Linux 5.5) load, typed for ``kfree_skb``.

    Conclusive: the ``btf_trace_<name>`` typedefs came with tp_btf, so without BTF or
    without the typedef there is nothing to type a program with; with them, the trivial
    program loads or the kernel refuses the program type.  The typedef's id comes
    through the BTF cache of :func:`configure`'s ``cache_dir``."""
    from nettracer.bpf.syscall import ProgType
    from nettracer.kernel.tracepoints import TracepointArgs, btf_trace_id

    tid = btf_trace_id("kfree_skb", _btf_cache_dir)
    if tid is None:
        return False
    target = TracepointArgs.raw_args("kfree_skb", (), btf_id=tid).load_target()
    return _loads(ProgType.TRACING, **target)


def has_btf() -> bool:
    """The kernel exposes its own BTF (CONFIG_DEBUG_INFO_BTF, Linux 5.4)."""
    return os.path.exists(BTF_VMLINUX)


def has_memcg_accounting() -> bool:
    """BPF memory is charged to the memory cgroup, not to ``RLIMIT_MEMLOCK`` (Linux 5.11).

    Conclusive: a one-element array map is created with the soft ``RLIMIT_MEMLOCK`` at
    0. A kernel that charges memlock refuses it (``EPERM``) and
    :func:`nettracer.bpf.syscall.bpf` then raises the limit to infinity and retries, so
    the limit afterwards says which happened; it is restored unless it was raised.
    """
    import resource  # only here and on bpf's EPERM path

    from nettracer.bpf import syscall
    from nettracer.bpf.syscall import MapType, MemlockError

    before = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, before[1]))
    try:
        os.close(syscall.map_create(MapType.ARRAY, 4, 4, 1, name="nt_probe"))
    except MemlockError:
        return False
    finally:
        raised = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] == resource.RLIM_INFINITY
        if not raised:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, before)
    return not raised


def has_kprobes() -> bool:
    """CONFIG_KPROBES: the kprobe perf PMU is registered. nettracer never needs it."""
    return os.path.isdir(KPROBE_PMU)


class Feature(Value):
    """One kernel feature: its probe, the version that brought it, what nettracer uses
    it for (``title``) and what it does without it (``fallback``, None when nothing)."""

    __slots__ = ("name", "probe", "since", "title", "fallback")  # noqa: RUF023 - field order

    def __init__(
        self,
        name: str,
        probe: Callable[[], bool],
        since: str,
        title: str,
        fallback: str | None = None,
    ) -> None:
        self.name = name
        self.probe = probe
        self.since = since
        self.title = title
        self.fallback = fallback


def _features(*features: Feature) -> dict[str, Feature]:
    return {f.name: f for f in features}


#: every feature nettracer probes, in the order ``nettracer kernel`` lists them
FEATURES: dict[str, Feature] = _features(
    Feature("raw_tracepoint", has_raw_tracepoint, "4.17", "raw tracepoints", "classic tracepoints"),
    Feature("tracepoint_programs", has_tracepoint_programs, "4.7", "classic tracepoints"),
    Feature("ringbuf", has_ringbuf, "5.8", "ring buffer", "perf event array"),
    Feature(
        "probe_read_kernel",
        has_probe_read_kernel,
        "5.5",
        "bpf_probe_read_kernel",
        "bpf_probe_read",
    ),
    Feature(
        "atomic_fetch", has_atomic_fetch, "5.12", "atomic fetch-and-add", "per-CPU id counters"
    ),
    Feature("batch_ops", has_batch_ops, "5.6", "batch map operations", "per-key map walk"),
    Feature("jiffies64", has_jiffies64, "5.6", "bpf_jiffies64", "drops without the device memo"),
    Feature("btf", has_btf, "5.4", "BTF", "guessed offsets"),
    Feature(
        "tp_btf",
        has_tp_btf,
        "5.5",
        "typed raw tracepoints (tp_btf)",
        "bpf_probe_read_kernel calls",
    ),
    Feature(
        "memcg_accounting",
        has_memcg_accounting,
        "5.11",
        "memcg accounting",
        "RLIMIT_MEMLOCK raised",
    ),
    Feature("kprobes", has_kprobes, "2.6.9", "kprobes (never used)"),
)

#: the features ``kernel.without`` can take away (their fallbacks run on any kernel)
FORCEABLE: tuple[str, ...] = (
    "ringbuf",
    "probe_read_kernel",
    "atomic_fetch",
    "raw_tracepoint",
    "batch_ops",
    "tp_btf",
)

#: probe results of this process: each probe runs at most once
_probed: dict[str, bool] = {}
#: the BTF cache the probes use (``offsets.cache_dir``; :func:`configure`); None: none
_btf_cache_dir: str | None = None


def probe(name: str) -> bool:
    """Feature ``name``'s probe result, probed on first use."""
    if name not in _probed:
        _probed[name] = FEATURES[name].probe()
    return _probed[name]


def probe_all() -> dict[str, bool]:
    """Every feature's probe result."""
    return {name: probe(name) for name in FEATURES}


def require(name: str) -> None:
    """Raise :class:`NotSupported` unless feature ``name`` is present."""
    if not probe(name):
        raise NotSupported(FEATURES[name].title, since=FEATURES[name].since)


class KernelFeatures:
    """Which path nettracer takes for each feature: the feature's own where the kernel
    has it (:func:`probe`) and ``without`` does not name it, else its fallback.

    ``without`` names features of :data:`FORCEABLE` (the ``kernel.without`` setting);
    an unknown name is a :class:`UsageError` listing the known ones.
    """

    def __init__(self, without: Iterable[str] = ()) -> None:
        self.without = tuple(without)
        for name in self.without:
            if name not in FORCEABLE:
                raise UsageError(
                    f"kernel.without: unknown feature {name!r} (known: {', '.join(FORCEABLE)})"
                )

    def __repr__(self) -> str:
        return f"KernelFeatures(without={self.without!r})"

    def forced(self, name: str) -> bool:
        """``kernel.without`` names ``name``."""
        return name in self.without

    def use(self, name: str) -> bool:
        """Use feature ``name``? (A forced-away feature is not even probed.)"""
        return not self.forced(name) and probe(name)

    def path(self, name: str) -> dict[str, object]:
        """What ``nettracer kernel --json`` says about ``name``: ``present`` (probed),
        ``since``, ``forced``, and ``uses`` (the feature's title or its fallback)."""
        f = FEATURES[name]
        present = probe(name)
        uses = f.title if present and not self.forced(name) else f.fallback
        return {"present": present, "since": f.since, "forced": self.forced(name), "uses": uses}

    def describe(self, name: str) -> str:
        """One line for ``nettracer kernel``: ``yes (5.8)``, ``no (needs 5.8) -> perf
        event array``, ``yes (5.8) -> perf event array (forced by kernel.without)``."""
        f = FEATURES[name]
        if probe(name):
            text = f"yes ({f.since})"
            if self.forced(name):
                text += f" -> {f.fallback} (forced by kernel.without)"
        else:
            text = f"no (needs {f.since})"
            if f.fallback is not None:
                text += f" -> {f.fallback}"
        return text


_current: KernelFeatures | None = None


def kernel_reads(features: KernelFeatures | None = None) -> KernelReads:
    """The helpers that read kernel memory: ``bpf_probe_read_kernel`` (5.5) where
    ``features`` (default :func:`current`) uses it, else ``bpf_probe_read``."""
    from nettracer.bpf.memory import KernelReads

    kf = features if features is not None else current()
    return KernelReads(legacy=not kf.use("probe_read_kernel"))


def current() -> KernelFeatures:
    """The process's :class:`KernelFeatures` (none forced until :func:`configure`)."""
    global _current
    if _current is None:
        _current = KernelFeatures()
    return _current


def configure(without: Iterable[str], cache_dir: str | None = None) -> KernelFeatures:
    """Make ``KernelFeatures(without)`` the process's object (from ``kernel.without``),
    and its "use batch_ops?" the map walks' choice (:func:`nettracer.bpf.maps.use_batch_ops`);
    ``cache_dir`` is the BTF cache the probes may use (``offsets.cache_dir``)."""
    from nettracer.bpf import maps

    global _current, _btf_cache_dir
    _btf_cache_dir = cache_dir
    kf = _current = KernelFeatures(without)
    maps.set_batch_policy(lambda: kf.use("batch_ops"))
    return kf
