"""Attaching programs: raw tracepoints and classic (perf) tracepoints.

A :class:`Link` detaches its program when closed; links are closed on
interpreter exit and, with :func:`nettracer.bpf.fd.install_signal_handlers`,
on SIGINT and SIGTERM.
"""

from __future__ import annotations

import errno

from nettracer.bpf import syscall
from nettracer.bpf.fd import FdObject
from nettracer.bpf.prog import Prog
from nettracer.bpf.syscall import BpfSyscallError
from nettracer.errors import NettracerError


class UnknownTracepoint(NettracerError):
    """No tracepoint of that name on this kernel."""


class Link(FdObject):
    """An attached program; ``close()`` detaches it."""

    kind = "link"

    def __init__(self, fd: int, prog: Prog, target: str, perf_fd: FdObject | None = None) -> None:
        super().__init__(fd)
        self.prog = prog
        self.target = target
        self._perf = perf_fd

    def close(self) -> None:
        super().close()
        if self._perf is not None:
            self._perf.close()

    def __repr__(self) -> str:
        return f"<Link {self.prog.name} -> {self.target} fd={self.fd}>"


class PerfEvent(FdObject):
    kind = "perf_event"


def attach_raw_tracepoint(prog: Prog, name: str, typed: bool = False) -> Link:
    """Attach a raw tracepoint program to tracepoint ``name`` (e.g. ``kfree_skb``), Linux
    4.17; with ``typed``, a ``tp_btf`` program (5.5), whose tracepoint was named by the
    BTF id it was loaded with (``name`` then only names the link)."""
    try:
        fd = syscall.raw_tracepoint_open(None if typed else name, prog.fd)
    except BpfSyscallError as exc:
        if exc.errno == errno.ENOENT:
            raise UnknownTracepoint(
                f"unknown raw tracepoint {name!r} (see the tracefs file available_events)"
            ) from None
        raise
    return Link(fd, prog, f"{'tp_btf' if typed else 'raw_tp'}/{name}")


def attach_tracepoint(prog: Prog, tp_id: int, name: str = "", bpf_link: bool = True) -> Link:
    """Attach a classic tracepoint program to the tracepoint with id ``tp_id``.

    Uses a perf-event BPF link (LINK_CREATE, Linux 5.15) where the kernel has it and
    ``bpf_link`` allows it, else ``PERF_EVENT_IOC_SET_BPF`` on the perf event (Linux
    4.7; the link is then the event). One event on CPU 0 runs the program on every
    CPU: the program hangs off the tracepoint (``trace_event_call.prog_array``).
    """
    perf = PerfEvent(syscall.perf_event_open_tracepoint(tp_id))
    target = f"tp/{name or tp_id}"
    try:
        if bpf_link:
            fd = syscall.link_create(prog.fd, perf.fd, syscall.BPF_PERF_EVENT)
            return Link(fd, prog, target, perf)
    except BpfSyscallError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, 524):
            perf.close()
            raise
    try:
        syscall.ioctl(perf.fd, syscall.PERF_EVENT_IOC_SET_BPF, prog.fd)
        syscall.ioctl(perf.fd, syscall.PERF_EVENT_IOC_ENABLE, 0)
    except BaseException:
        perf.close()
        raise
    # the perf event itself is the attachment: hand its fd to the Link
    fd, perf.fd = perf.fd, -1
    return Link(fd, prog, target)
