"""The one module that issues raw system calls: ``bpf(2)``, ``perf_event_open(2)``,
``ioctl(2)`` and ``mount(2)``, through ctypes.

``union bpf_attr`` layouts follow include/uapi/linux/bpf.h; each command packs
only the members it uses and passes their size, which the kernel accepts as
long as the bytes it does not know are zero.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from enum import IntEnum

from nettracer.errors import NettracerError, NotSupported, PermissionError_

#: syscall numbers per architecture (arch/x86/entry/syscalls, include/uapi/asm-generic/unistd.h)
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"bpf": 321, "perf_event_open": 298},
    "aarch64": {"bpf": 280, "perf_event_open": 241},
}


class Cmd(IntEnum):
    """``enum bpf_cmd``."""

    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    PROG_LOAD = 5
    PROG_TEST_RUN = 10
    OBJ_GET_INFO_BY_FD = 15
    RAW_TRACEPOINT_OPEN = 17
    MAP_LOOKUP_AND_DELETE_ELEM = 21
    MAP_LOOKUP_BATCH = 24
    MAP_LOOKUP_AND_DELETE_BATCH = 25
    MAP_UPDATE_BATCH = 26
    MAP_DELETE_BATCH = 27
    LINK_CREATE = 28
    ENABLE_STATS = 32


class MapType(IntEnum):
    """``enum bpf_map_type``."""

    HASH = 1
    ARRAY = 2
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    STACK_TRACE = 7
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    RINGBUF = 27


class ProgType(IntEnum):
    """``enum bpf_prog_type``."""

    SOCKET_FILTER = 1
    KPROBE = 2
    TRACEPOINT = 5
    RAW_TRACEPOINT = 17
    TRACING = 26


#: ``enum bpf_attach_type`` value for a perf-event link (LINK_CREATE, Linux 5.15)
BPF_PERF_EVENT = 41
#: map update flags
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
#: ``BPF_F_NO_PREALLOC`` map flag for hash maps
BPF_F_NO_PREALLOC = 1
#: ``enum bpf_stats_type``
BPF_STATS_RUN_TIME = 0

PERF_TYPE_TRACEPOINT = 2
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
#: perf ioctls (include/uapi/linux/perf_event.h): _IO('$', 0), _IO('$', 1), _IOW('$', 8, u32)
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401
PERF_EVENT_IOC_SET_BPF = 0x40042408

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.restype = ctypes.c_int
_libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_void_p)


class BpfSyscallError(NettracerError):
    """A ``bpf(2)`` call failed; ``errno`` and the command are kept."""

    def __init__(self, cmd: str, err: int, what: str = "") -> None:
        self.cmd = cmd
        self.errno = err
        detail = f" ({what})" if what else ""
        super().__init__(
            f"bpf({cmd}){detail} failed: {os.strerror(err)} [{errno.errorcode.get(err, err)}]"
        )


def syscall_number(name: str) -> int:
    """The number of syscall ``name`` on this machine; NotSupported elsewhere."""
    machine = os.uname().machine
    try:
        return SYSCALLS[machine][name]
    except KeyError:
        raise NotSupported(
            f"architecture {machine!r}", detail="nettracer supports x86_64 and aarch64"
        ) from None


_BPF_NR = SYSCALLS.get(os.uname().machine, {}).get("bpf")


def bpf(cmd: Cmd, attr: ctypes.Array | bytes, what: str = "") -> int:
    """Issue ``bpf(cmd, attr, sizeof(attr))``; returns the result, raises on failure.

    ``attr`` may be a ctypes buffer, which the kernel can write back into
    (e.g. ``PROG_TEST_RUN`` results), or bytes.
    """
    if _BPF_NR is None:
        syscall_number("bpf")
    buf = attr if isinstance(attr, ctypes.Array) else ctypes.create_string_buffer(attr, len(attr))
    ret = _libc.syscall(_BPF_NR, ctypes.c_int(cmd), buf, ctypes.c_uint(len(buf)))
    if ret < 0:
        err = ctypes.get_errno()
        raise _bpf_error(cmd, err, what)
    return ret


def _bpf_error(cmd: Cmd, err: int, what: str) -> NettracerError:
    if err == errno.EPERM:
        return PermissionError_(
            f"bpf({cmd.name}) not permitted: run as root (needs CAP_BPF, CAP_PERFMON "
            f"and CAP_SYS_ADMIN)"
        )
    if err == errno.ENOSYS:
        return NotSupported("the bpf() system call", since="3.18")
    return BpfSyscallError(cmd.name, err, what)


def addr(buf: ctypes.Array | ctypes.c_void_p | None) -> int:
    """The address of a ctypes buffer as a ``__aligned_u64`` (0 for None)."""
    if buf is None:
        return 0
    return ctypes.addressof(buf)


def map_create(
    map_type: int,
    key_size: int,
    value_size: int,
    max_entries: int,
    flags: int = 0,
    name: str = "",
) -> int:
    attr = struct.pack(
        "<7I16s5IQ",
        map_type, key_size, value_size, max_entries, flags, 0, 0,
        name.encode()[:15], 0, 0, 0, 0, 0, 0,
    )  # fmt: skip
    return bpf(Cmd.MAP_CREATE, attr, f"map {name!r} type {map_type}")


def map_elem(
    cmd: Cmd, fd: int, key: ctypes.Array | None, value: ctypes.Array | None, flags: int = 0
) -> int:
    """MAP_LOOKUP/UPDATE/DELETE/GET_NEXT_KEY/LOOKUP_AND_DELETE: ``{map_fd, key, value, flags}``."""
    attr = struct.pack("<IxxxxQQQ", fd, addr(key), addr(value), flags)
    return bpf(cmd, attr)


def map_batch(
    cmd: Cmd,
    fd: int,
    in_batch: ctypes.Array | None,
    out_batch: ctypes.Array | None,
    keys: ctypes.Array,
    values: ctypes.Array | None,
    count: int,
) -> tuple[int, int]:
    """A batch map command; returns (elements processed, errno or 0).

    ``ENOENT`` means the end of the map was reached: the count is still valid.
    """
    buf = ctypes.create_string_buffer(
        struct.pack("<QQQQIIQQ", addr(in_batch), addr(out_batch), addr(keys), addr(values),
                    count, fd, 0, 0)
    )  # fmt: skip
    try:
        bpf(cmd, buf)
        err = 0
    except BpfSyscallError as exc:
        if exc.errno != errno.ENOENT:
            raise
        err = exc.errno
    done = struct.unpack_from("<I", buf, 32)[0]
    return done, err


def prog_load(
    prog_type: int,
    insns: bytes,
    license: str,
    name: str,
    log_level: int,
    log: ctypes.Array | None,
    expected_attach_type: int = 0,
) -> int:
    insn_buf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    attr = struct.pack(
        "<IIQQIIQII16sII",
        prog_type, len(insns) // 8, addr(insn_buf), addr(lic),
        log_level, len(log) if log is not None else 0, addr(log),
        0, 0, name.encode()[:15], 0, expected_attach_type,
    )  # fmt: skip
    attr += b"\0" * (144 - len(attr))
    return bpf(Cmd.PROG_LOAD, attr, f"program {name!r}")


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    cname = ctypes.create_string_buffer(name.encode())
    attr = struct.pack("<QIxxxx", addr(cname), prog_fd)
    return bpf(Cmd.RAW_TRACEPOINT_OPEN, attr, f"raw tracepoint {name!r}")


def link_create(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> int:
    attr = struct.pack("<IIII", prog_fd, target_fd, attach_type, flags) + b"\0" * 48
    return bpf(Cmd.LINK_CREATE, attr)


def prog_test_run(prog_fd: int, ctx_in: bytes, repeat: int = 0) -> tuple[int, int]:
    """Run a program once on ``ctx_in`` (raw tracepoint args); returns (retval, duration ns)."""
    ctx = ctypes.create_string_buffer(ctx_in, len(ctx_in))
    buf = ctypes.create_string_buffer(
        struct.pack("<IIIIQQIIIIQQIII", prog_fd, 0, 0, 0, 0, 0, repeat, 0,
                    len(ctx_in), 0, addr(ctx), 0, 0, 0, 0)
    )  # fmt: skip
    bpf(Cmd.PROG_TEST_RUN, buf)
    (retval,) = struct.unpack_from("<I", buf, 4)
    (duration,) = struct.unpack_from("<I", buf, 36)
    return retval, duration


def obj_get_info(fd: int, size: int) -> bytes:
    """``OBJ_GET_INFO_BY_FD``: the first ``size`` bytes of ``struct bpf_{prog,map,link}_info``."""
    info = ctypes.create_string_buffer(size)
    bpf(Cmd.OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, size, addr(info)))
    return info.raw


def enable_stats(stats_type: int = BPF_STATS_RUN_TIME) -> int:
    """``ENABLE_STATS``: run-time stats are collected while the returned fd is open (5.8)."""
    return bpf(Cmd.ENABLE_STATS, struct.pack("<I", stats_type))


def perf_event_open_tracepoint(tp_id: int, cpu: int = 0, pid: int = -1) -> int:
    """Open a ``PERF_TYPE_TRACEPOINT`` event for tracepoint id ``tp_id``."""
    nr = syscall_number("perf_event_open")
    # struct perf_event_attr: type, size, config, sample_period, sample_type, read_format, flags..
    attr = struct.pack("<IIQQQQQ", PERF_TYPE_TRACEPOINT, 128, tp_id, 1, PERF_SAMPLE_RAW, 0, 0)
    attr += b"\0" * (128 - len(attr))
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = _libc.syscall(nr, buf, ctypes.c_int(pid), ctypes.c_int(cpu), ctypes.c_int(-1),
                       ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))  # fmt: skip
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.EPERM, errno.EACCES):
            raise PermissionError_("perf_event_open not permitted: run as root (CAP_PERFMON)")
        raise NettracerError(f"perf_event_open(tracepoint id {tp_id}) failed: {os.strerror(err)}")
    return fd


def ioctl(fd: int, request: int, arg: int = 0) -> int:
    ret = _libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), ctypes.c_ulong(arg))
    if ret < 0:
        err = ctypes.get_errno()
        raise NettracerError(f"ioctl({request:#x}) on fd {fd} failed: {os.strerror(err)}")
    return ret


def mount(source: str, target: str, fstype: str, flags: int = 0) -> None:
    """``mount(2)``; raises OSError with the errno."""
    ret = _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, None)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


#: ``CLONE_NEWNET`` (include/uapi/linux/sched.h): a new network namespace
CLONE_NEWNET = 0x40000000
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)


def unshare(flags: int) -> None:
    """``unshare(2)`` for the calling thread (``os.unshare`` is Python 3.12+).

    With ``CLONE_NEWNET`` only the calling thread moves to a new network namespace;
    raises OSError with the errno (EPERM without CAP_SYS_ADMIN).
    """
    if _libc.unshare(flags) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({flags:#x}): {os.strerror(err)}")


def setns(fd: int, nstype: int = 0) -> None:
    """``setns(2)``: move the calling thread into the namespace ``fd`` refers to
    (``os.setns`` is Python 3.12+); raises OSError with the errno."""
    if _libc.setns(fd, nstype) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({fd}, {nstype:#x}): {os.strerror(err)}")
