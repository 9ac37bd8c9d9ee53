"""Feature probes: what this kernel lets nettracer do.

Each ``has_*`` probe is conclusive (True/False) by asking the kernel itself
(loading a one-instruction program, creating a map) — never by version
numbers — or raises when it cannot tell (e.g. not permitted). ``require`` turns
a False into a typed :class:`~nettracer.errors.NotSupported` naming the kernel
version that introduced the feature.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from nettracer.bpf import prog as bpf_prog
from nettracer.bpf import syscall
from nettracer.bpf.insn import R0, exit_, mov64
from nettracer.bpf.link import UnknownTracepoint, attach_raw_tracepoint
from nettracer.bpf.ringbuf import RingBuf
from nettracer.bpf.syscall import BpfSyscallError, MapType, MemlockError, ProgType
from nettracer.errors import NotSupported
from nettracer.kernel import BTF_VMLINUX

#: the perf PMU that exists exactly when the kernel has CONFIG_KPROBES (and kprobe events)
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"

_UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, 524, errno.E2BIG)


def _load_minimal(prog_type: ProgType) -> bpf_prog.Prog | None:
    """A two-instruction program of ``prog_type``, or None when the kernel refuses the type."""
    try:
        return bpf_prog.load([mov64(R0, 0), exit_()], prog_type=prog_type, name="nt_probe")
    except bpf_prog.VerifierError:
        return None
    except BpfSyscallError as exc:
        if exc.errno in _UNSUPPORTED:
            return None
        raise


def has_raw_tracepoint() -> bool:
    """Raw tracepoint programs load and attach (Linux 4.17)."""
    prog = _load_minimal(ProgType.RAW_TRACEPOINT)
    if prog is None:
        return False
    with prog:
        try:
            attach_raw_tracepoint(prog, "kfree_skb").close()
        except UnknownTracepoint:
            return False
    return True


def has_tracepoint_programs() -> bool:
    """Classic (perf) tracepoint programs load (Linux 4.7)."""
    prog = _load_minimal(ProgType.TRACEPOINT)
    if prog is None:
        return False
    prog.close()
    return True


def has_ringbuf() -> bool:
    """``BPF_MAP_TYPE_RINGBUF`` maps can be created (Linux 5.8)."""
    try:
        RingBuf(4096, "nt_probe").close()
    except BpfSyscallError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    return True


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


#: feature name -> (probe, kernel version that introduced it)
FEATURES: dict[str, tuple[Callable[[], bool], str]] = {
    "raw_tracepoint": (has_raw_tracepoint, "4.17"),
    "tracepoint_programs": (has_tracepoint_programs, "4.7"),
    "ringbuf": (has_ringbuf, "5.8"),
    "btf": (has_btf, "5.4"),
    "memcg_accounting": (has_memcg_accounting, "5.11"),
    "kprobes": (has_kprobes, "2.6.9"),
}


def probe_all() -> dict[str, bool]:
    """Every feature's probe result."""
    return {name: probe() for name, (probe, _) in FEATURES.items()}


def require(name: str) -> None:
    """Raise :class:`NotSupported` unless feature ``name`` is present."""
    probe, since = FEATURES[name]
    if not probe():
        raise NotSupported(name.replace("_", " "), since=since)
