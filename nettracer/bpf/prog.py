"""Loading programs, surfacing the verifier, and run-time statistics.

:func:`load` assembles instructions (labels and map names resolved), loads them
with ``BPF_PROG_LOAD`` and, when the verifier refuses, raises
:class:`VerifierError` whose message is a short summary (the failing
instruction and the verifier's last meaningful line) and which keeps the whole
log. The log buffer grows until the log fits.
"""

from __future__ import annotations

import ctypes
import errno
import re
import struct
from collections.abc import Iterable, Mapping

from nettracer.bpf import syscall
from nettracer.bpf.fd import FdObject
from nettracer.bpf.insn import Insn, format_insn, listing, resolve
from nettracer.bpf.maps import Map
from nettracer.bpf.syscall import BpfSyscallError, ProgType
from nettracer.errors import NettracerError
from nettracer.value import Value

_LOG_START = 1 << 16
_LOG_MAX = (1 << 30) - 1  # the kernel caps log_size at UINT_MAX >> 2


class VerifierError(NettracerError):
    """The verifier refused a program. ``log`` is its whole log, ``listing`` ours.

    ``str(err)`` is one line: the program, the failing instruction and the
    verifier's last meaningful line.
    """

    exit_code = 1  # a refused generated program is our bug, not the user's

    def __init__(self, name: str, log: str, insns: list[Insn], err: int) -> None:
        self.name = name
        self.log = log
        self.errno = err
        self.listing = listing(insns)
        self.insn_index, self.reason = summarize_log(log)
        where = ""
        if self.insn_index is not None:
            where = f" at insn {self.insn_index}"
            insn = _insn_at(insns, self.insn_index)
            if insn is not None:
                where += f" ({format_insn(insn)})"
        super().__init__(
            f"verifier rejected program {name!r}{where}: {self.reason or errno.errorcode.get(err, err)}"
        )


def _insn_at(insns: list[Insn], slot: int) -> Insn | None:
    pos = 0
    for insn in insns:
        if pos == slot:
            return insn
        pos += insn.slots
    return None


_NOISE = re.compile(
    r"^(processed \d+ insns|verification time|stack depth|mark_precise|max_states_per_insn|"
    r"peak_states|func#|last_idx|regs=|parent |from \d+ to \d+|\s*$|;)"
)
_INSN_LINE = re.compile(r"^(\d+): \(([0-9a-f]{2})\)")
_STATE_LINE = re.compile(r"^(\d+: )?(frame\d+: )?R\d+(_\w+)?=")


def summarize_log(log: str) -> tuple[int | None, str]:
    """(index of the last instruction the verifier looked at, its last meaningful line)."""
    lines = log.splitlines()
    reason = ""
    for line in reversed(lines):
        if not (_NOISE.match(line) or _INSN_LINE.match(line) or _STATE_LINE.match(line)):
            reason = line.strip()
            break
    index = None
    for line in reversed(lines):
        m = _INSN_LINE.match(line)
        if m:
            index = int(m.group(1))
            break
    return index, reason


class ProgStats(Value):
    """Run count and total run time from ``struct bpf_prog_info`` (needs BPF_ENABLE_STATS)."""

    __slots__ = ("run_cnt", "run_time_ns", "recursion_misses")  # noqa: RUF023

    def __init__(self, run_cnt: int, run_time_ns: int, recursion_misses: int) -> None:
        self.run_cnt = run_cnt
        self.run_time_ns = run_time_ns
        self.recursion_misses = recursion_misses

    @property
    def ns_per_run(self) -> float:
        return self.run_time_ns / self.run_cnt if self.run_cnt else 0.0


class Prog(FdObject):
    """A loaded program; ``insns`` are the resolved instructions (for listings)."""

    kind = "program"

    def __init__(
        self, fd: int, name: str, prog_type: ProgType, insns: list[Insn], log: str
    ) -> None:
        super().__init__(fd)
        self.name = name
        self.prog_type = prog_type
        self.insns = insns
        self.log = log

    def info(self) -> syscall.ProgInfo:
        """``struct bpf_prog_info``; members a kernel does not fill stay zero."""
        info = syscall.ProgInfo()
        syscall.obj_get_info(self.fd, info)
        return info

    @property
    def id(self) -> int:
        return self.info().id

    def stats(self) -> ProgStats:
        info = self.info()
        return ProgStats(
            run_cnt=info.run_cnt,
            run_time_ns=info.run_time_ns,
            recursion_misses=info.recursion_misses,
        )

    def test_run(self, args: Iterable[int] = ()) -> int:
        """BPF_PROG_TEST_RUN on a raw tracepoint program with ``args`` as its u64 context
        (Linux 5.10); returns the program's return value."""
        ctx = b"".join(struct.pack("<Q", a & 0xFFFFFFFFFFFFFFFF) for a in args) or b"\0" * 8
        retval, _ = syscall.prog_test_run(self.fd, ctx)
        return retval

    def listing(self) -> str:
        return listing(self.insns)


def load(
    insns: Iterable[Insn | Iterable[Insn]],
    prog_type: ProgType = ProgType.RAW_TRACEPOINT,
    maps: Mapping[str, Map | int] | None = None,
    name: str = "nettracer",
    license: str = "GPL",
    log_level: int = 0,
    *,
    expected_attach_type: int = 0,
    attach_btf_id: int = 0,
) -> Prog:
    """Assemble and load a program. On refusal the load is retried with a verbose log,
    grown until it fits, and :class:`VerifierError` is raised.  ``expected_attach_type``
    and ``attach_btf_id`` say what a ``BPF_PROG_TYPE_TRACING`` program attaches to (a
    ``tp_btf`` program: ``BPF_TRACE_RAW_TP`` and the BTF id of ``btf_trace_<name>``)."""
    target = (expected_attach_type, attach_btf_id)
    fds = {k: (m.fd if isinstance(m, Map) else int(m)) for k, m in (maps or {}).items()}
    resolved = resolve(insns, fds)
    code = b"".join(i.encode() for i in resolved)
    log = ""
    try:
        if log_level:
            fd, log = _load_with_log(prog_type, code, license, name, log_level, target)
        else:
            fd = syscall.prog_load(prog_type, code, license, name, 0, None, *target)
    except BpfSyscallError as exc:
        if exc.errno not in (errno.EINVAL, errno.EACCES, errno.E2BIG, errno.ENOSPC, errno.EFAULT):
            raise
        try:
            _load_with_log(prog_type, code, license, name, max(log_level, 1), target)
        except _Refused as refused:
            raise VerifierError(name, refused.log, resolved, refused.errno) from None
        raise  # loaded with a log but not without: report the original error
    except _Refused as refused:
        raise VerifierError(name, refused.log, resolved, refused.errno) from None
    return Prog(fd, name, prog_type, resolved, log)


class _Refused(Exception):
    def __init__(self, log: str, err: int) -> None:
        self.log = log
        self.errno = err


def _load_with_log(
    prog_type: int, code: bytes, license: str, name: str, level: int, target: tuple[int, int]
) -> tuple[int, str]:
    size = _LOG_START
    while True:
        buf = ctypes.create_string_buffer(size)
        try:
            fd = syscall.prog_load(prog_type, code, license, name, level, buf, *target)
            return fd, buf.value.decode(errors="replace")
        except BpfSyscallError as exc:
            if exc.errno == errno.ENOSPC and size < _LOG_MAX:
                size = min(size * 4, _LOG_MAX)
                continue
            raise _Refused(buf.value.decode(errors="replace"), exc.errno) from None


class StatsSession(FdObject):
    """While open, the kernel counts run time and run count of every program (5.8)."""

    kind = "stats"

    def __init__(self) -> None:
        super().__init__(syscall.enable_stats())


def enable_stats() -> StatsSession:
    """Turn on BPF run-time statistics until the returned object is closed."""
    return StatsSession()
