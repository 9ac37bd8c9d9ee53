"""The one module that issues raw system calls: ``bpf(2)``, ``perf_event_open(2)``,
``ioctl(2)``, ``mount(2)``/``umount2(2)``, ``setns(2)`` and ``unshare(2)``, through ctypes.

Each ``bpf(2)`` command's member of ``union bpf_attr`` (include/uapi/linux/bpf.h)
is a :class:`ctypes.Structure` here, with the kernel's member names, holding the
members up to the last one we set and zero-padded to the size we pass; the
kernel accepts a shorter or longer attr as long as the bytes it does not know
are zero (``bpf_check_uarg_tail_zero``). ``struct perf_event_attr`` and
``struct bpf_prog_info`` are structures too. ``tests/test_syscall.py`` checks
every offset against the UAPI and against the running kernel's BTF.

Before Linux 5.11 the kernel charges BPF maps and programs to the caller's
``RLIMIT_MEMLOCK`` (5.11 moved them to memory cgroup accounting): as libbpf
does, an ``EPERM`` from ``BPF_MAP_CREATE``/``BPF_PROG_LOAD`` as root with a
finite limit raises the limit to ``RLIM_INFINITY`` and retries once.
"""

from __future__ import annotations

import ctypes
import errno
import os
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
#: ``enum bpf_attach_type`` of a BTF-typed raw tracepoint program (``tp_btf``, Linux 5.5)
BPF_TRACE_RAW_TP = 23
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

#: ``BPF_OBJ_NAME_LEN``: map and program names, NUL included
BPF_OBJ_NAME_LEN = 16
#: ``MNT_DETACH`` umount2 flag (include/linux/fs.h): lazy unmount
MNT_DETACH = 2
#: ``CLONE_NEWNET`` (include/uapi/linux/sched.h): a new network namespace
CLONE_NEWNET = 0x40000000

_u8, _u16, _u32, _u64, _s32 = (
    ctypes.c_uint8,
    ctypes.c_uint16,
    ctypes.c_uint32,
    ctypes.c_uint64,
    ctypes.c_int32,
)
_NAME = ctypes.c_char * BPF_OBJ_NAME_LEN


def _padded(fields: list[tuple], size: int) -> list[tuple]:
    """``fields`` followed by zero bytes up to ``size`` (the attr size we pass)."""
    end = ctypes.sizeof(type("_Probe", (ctypes.Structure,), {"_fields_": fields}))
    return [*fields, ("_pad", _u8 * (size - end))] if size > end else fields


# -- union bpf_attr members (include/uapi/linux/bpf.h) ------------------------------


class MapCreateAttr(ctypes.Structure):
    """``BPF_MAP_CREATE``: the first anonymous struct of ``union bpf_attr``;
    ``map_extra`` is 5.16, a zero there is accepted by every kernel (72 bytes)."""

    _fields_ = [
        ("map_type", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("inner_map_fd", _u32),
        ("numa_node", _u32),
        ("map_name", _NAME),
        ("map_ifindex", _u32),
        ("btf_fd", _u32),
        ("btf_key_type_id", _u32),
        ("btf_value_type_id", _u32),
        ("btf_vmlinux_value_type_id", _u32),
        ("map_extra", _u64),
    ]


class MapElemAttr(ctypes.Structure):
    """``BPF_MAP_{LOOKUP,UPDATE,DELETE}_ELEM``, ``GET_NEXT_KEY``, ``LOOKUP_AND_DELETE_ELEM``:
    ``{map_fd, key, value | next_key, flags}`` (32 bytes); ``value`` is ``next_key``
    for ``GET_NEXT_KEY``."""

    _fields_ = [("map_fd", _u32), ("key", _u64), ("value", _u64), ("flags", _u64)]


class MapBatchAttr(ctypes.Structure):
    """``BPF_MAP_*_BATCH`` (Linux 5.6): ``union bpf_attr``'s ``batch``; the kernel
    writes the number of elements done back into ``count`` (56 bytes)."""

    _fields_ = [
        ("in_batch", _u64),
        ("out_batch", _u64),
        ("keys", _u64),
        ("values", _u64),
        ("count", _u32),
        ("map_fd", _u32),
        ("elem_flags", _u64),
        ("flags", _u64),
    ]


class ProgLoadAttr(ctypes.Structure):
    """``BPF_PROG_LOAD`` up to ``log_true_size`` (144 bytes), which 6.4+ writes back:
    the log size the verifier needed."""

    _fields_ = [
        ("prog_type", _u32),
        ("insn_cnt", _u32),
        ("insns", _u64),
        ("license", _u64),
        ("log_level", _u32),
        ("log_size", _u32),
        ("log_buf", _u64),
        ("kern_version", _u32),
        ("prog_flags", _u32),
        ("prog_name", _NAME),
        ("prog_ifindex", _u32),
        ("expected_attach_type", _u32),
        ("prog_btf_fd", _u32),
        ("func_info_rec_size", _u32),
        ("func_info", _u64),
        ("func_info_cnt", _u32),
        ("line_info_rec_size", _u32),
        ("line_info", _u64),
        ("line_info_cnt", _u32),
        ("attach_btf_id", _u32),
        ("attach_prog_fd", _u32),  # union with attach_btf_obj_fd
        ("core_relo_cnt", _u32),
        ("fd_array", _u64),
        ("core_relos", _u64),
        ("core_relo_rec_size", _u32),
        ("log_true_size", _u32),
    ]


class ProgTestRunAttr(ctypes.Structure):
    """``BPF_PROG_TEST_RUN``: ``union bpf_attr``'s ``test``; the kernel writes
    ``retval``, ``duration`` and the ``*_size_out`` members back (80 bytes)."""

    _fields_ = [
        ("prog_fd", _u32),
        ("retval", _u32),
        ("data_size_in", _u32),
        ("data_size_out", _u32),
        ("data_in", _u64),
        ("data_out", _u64),
        ("repeat", _u32),
        ("duration", _u32),
        ("ctx_size_in", _u32),
        ("ctx_size_out", _u32),
        ("ctx_in", _u64),
        ("ctx_out", _u64),
        ("flags", _u32),
        ("cpu", _u32),
        ("batch_size", _u32),
    ]


class ObjGetInfoAttr(ctypes.Structure):
    """``BPF_OBJ_GET_INFO_BY_FD``: ``union bpf_attr``'s ``info``; the kernel writes back
    in ``info_len`` how many bytes of the info struct it filled (16 bytes)."""

    _fields_ = [("bpf_fd", _u32), ("info_len", _u32), ("info", _u64)]


class RawTracepointAttr(ctypes.Structure):
    """``BPF_RAW_TRACEPOINT_OPEN`` (Linux 4.17): ``union bpf_attr``'s ``raw_tracepoint``
    (16 bytes; ``cookie`` at 16 is 6.10 and left out)."""

    _fields_ = [("name", _u64), ("prog_fd", _u32)]


class LinkCreateAttr(ctypes.Structure):
    """``BPF_LINK_CREATE`` (Linux 5.7; perf-event links 5.15): ``union bpf_attr``'s
    ``link_create`` with its ``perf_event.bpf_cookie`` (5.15), zeroed to 64 bytes."""

    _fields_ = _padded(
        [
            ("prog_fd", _u32),
            ("target_fd", _u32),
            ("attach_type", _u32),
            ("flags", _u32),
            ("bpf_cookie", _u64),
        ],
        64,
    )


class EnableStatsAttr(ctypes.Structure):
    """``BPF_ENABLE_STATS`` (Linux 5.8): ``union bpf_attr``'s ``enable_stats`` (4 bytes)."""

    _fields_ = [("type", _u32)]


#: the one-bit flags that open ``perf_event_attr``'s bitfield word, in order
_PERF_FLAG_BITS = (
    "disabled", "inherit", "pinned", "exclusive", "exclude_user", "exclude_kernel",
    "exclude_hv", "exclude_idle", "mmap", "comm", "freq", "inherit_stat", "enable_on_exec",
    "task", "watermark",
)  # fmt: skip


class PerfEventAttr(ctypes.Structure):
    """``struct perf_event_attr`` (include/uapi/linux/perf_event.h) up to ``sig_data``:
    ``PERF_ATTR_SIZE_VER7`` (128 bytes, Linux 5.13; older kernels accept it while the
    members they do not know are zero). Unions are named by their first member
    (``sample_period``/``sample_freq``, ``wakeup_events``/``wakeup_watermark``,
    ``config1``/``bp_addr``, ``config2``/``bp_len``)."""

    _fields_ = [
        ("type", _u32),
        ("size", _u32),
        ("config", _u64),
        ("sample_period", _u64),
        ("sample_type", _u64),
        ("read_format", _u64),
        *((bit, _u64, 1) for bit in _PERF_FLAG_BITS),
        ("precise_ip", _u64, 2),
        ("_more_flags", _u64, 47),  # mmap_data ... sigtrap, __reserved_1
        ("wakeup_events", _u32),
        ("bp_type", _u32),
        ("config1", _u64),
        ("config2", _u64),
        ("branch_sample_type", _u64),
        ("sample_regs_user", _u64),
        ("sample_stack_user", _u32),
        ("clockid", _s32),
        ("sample_regs_intr", _u64),
        ("aux_watermark", _u32),
        ("sample_max_stack", _u16),
        ("__reserved_2", _u16),
        ("aux_sample_size", _u32),
        ("__reserved_3", _u32),
        ("sig_data", _u64),
    ]


class ProgInfo(ctypes.Structure):
    """``struct bpf_prog_info`` up to ``recursion_misses`` (216 bytes, Linux 5.12);
    ``run_time_ns``/``run_cnt`` (5.1) count only while stats are enabled."""

    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("tag", _u8 * 8),
        ("jited_prog_len", _u32),
        ("xlated_prog_len", _u32),
        ("jited_prog_insns", _u64),
        ("xlated_prog_insns", _u64),
        ("load_time", _u64),
        ("created_by_uid", _u32),
        ("nr_map_ids", _u32),
        ("map_ids", _u64),
        ("name", _NAME),
        ("ifindex", _u32),
        ("gpl_compatible", _u32, 1),
        ("netns_dev", _u64),
        ("netns_ino", _u64),
        ("nr_jited_ksyms", _u32),
        ("nr_jited_func_lens", _u32),
        ("jited_ksyms", _u64),
        ("jited_func_lens", _u64),
        ("btf_id", _u32),
        ("func_info_rec_size", _u32),
        ("func_info", _u64),
        ("nr_func_info", _u32),
        ("nr_line_info", _u32),
        ("line_info", _u64),
        ("jited_line_info", _u64),
        ("nr_jited_line_info", _u32),
        ("line_info_rec_size", _u32),
        ("jited_line_info_rec_size", _u32),
        ("nr_prog_tags", _u32),
        ("prog_tags", _u64),
        ("run_time_ns", _u64),
        ("run_cnt", _u64),
        ("recursion_misses", _u64),
    ]


#: what :func:`bpf` accepts as attr: a structure above, or a raw buffer
Attr = ctypes.Structure | ctypes.Array

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.restype = ctypes.c_int
_libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)


class BpfSyscallError(NettracerError):
    """A ``bpf(2)`` call failed; ``errno`` and the command are kept."""

    def __init__(self, cmd: str, err: int, what: str = "") -> None:
        self.cmd = cmd
        self.errno = err
        detail = f" ({what})" if what else ""
        super().__init__(
            f"bpf({cmd}){detail} failed: {os.strerror(err)} [{errno.errorcode.get(err, err)}]"
        )


class MemlockError(PermissionError_):
    """``EPERM`` because the kernel charges BPF memory to ``RLIMIT_MEMLOCK`` (Linux < 5.11)
    and the process may not raise the limit."""


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
#: the commands whose memory Linux < 5.11 charges to RLIMIT_MEMLOCK
_CHARGED = frozenset({Cmd.MAP_CREATE, Cmd.PROG_LOAD})


def _errno_of(ret: int) -> int:
    return ctypes.get_errno() if ret < 0 else 0


def bpf(cmd: Cmd, attr: Attr, what: str = "") -> int:
    """Issue ``bpf(cmd, &attr, sizeof(attr))``; returns the result, raises on failure.

    The kernel may write results back into ``attr``. An ``EPERM`` from a command
    charged to ``RLIMIT_MEMLOCK`` (Linux < 5.11) raises the limit and retries once.
    """
    if _BPF_NR is None:
        syscall_number("bpf")
    size = ctypes.c_uint(ctypes.sizeof(attr))
    ret = _libc.syscall(_BPF_NR, ctypes.c_int(cmd), ctypes.byref(attr), size)
    err = _errno_of(ret)
    if err == errno.EPERM and cmd in _CHARGED and raise_memlock(cmd.name):
        ret = _libc.syscall(_BPF_NR, ctypes.c_int(cmd), ctypes.byref(attr), size)
        err = _errno_of(ret)
    if ret < 0:
        raise _bpf_error(cmd, err, what)
    return ret


def _kib(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} bytes"


def raise_memlock(cmd: str = "MAP_CREATE") -> bool:
    """After an ``EPERM`` from ``bpf(cmd)``: raise ``RLIMIT_MEMLOCK`` to ``RLIM_INFINITY``
    (soft and hard) as libbpf does, and say whether a retry may now succeed.

    False when the limit cannot be the cause (not root, or already unlimited). Before
    Linux 5.11 BPF maps and programs are charged to ``RLIMIT_MEMLOCK`` (8 MiB or 64 KiB
    by default) and root gets ``EPERM`` past it; since 5.11 memory cgroups account them
    and the limit does not matter. Raises :class:`MemlockError` naming the limit
    when the process may not raise it (no ``CAP_SYS_RESOURCE``).
    """
    import resource  # only on this error path

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if os.geteuid() != 0 or soft == resource.RLIM_INFINITY:
        return False
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, unlimited)
    except (ValueError, OSError):
        raise MemlockError(
            f"bpf({cmd}) not permitted: this kernel charges BPF memory to RLIMIT_MEMLOCK "
            f"({_kib(soft)} here) and nettracer may not raise it: run `ulimit -l unlimited` "
            f"first (systemd: LimitMEMLOCK=infinity)"
        ) from None
    return True


def _bpf_error(cmd: Cmd, err: int, what: str) -> NettracerError:
    if err == errno.EPERM:
        who = "run as root" if os.geteuid() != 0 else "root lacks a capability"
        return PermissionError_(
            f"bpf({cmd.name}) not permitted: {who} (needs CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)"
        )
    if err == errno.ENOSYS:
        return NotSupported("the bpf() system call", since="3.18")
    return BpfSyscallError(cmd.name, err, what)


def addr(buf: ctypes.Array | ctypes.Structure | None) -> int:
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
    attr = MapCreateAttr(
        map_type=map_type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_flags=flags,
        map_name=name.encode()[: BPF_OBJ_NAME_LEN - 1],
    )
    return bpf(Cmd.MAP_CREATE, attr, f"map {name!r} type {map_type}")


def map_elem(
    cmd: Cmd, fd: int, key: ctypes.Array | None, value: ctypes.Array | None, flags: int = 0
) -> int:
    """MAP_LOOKUP/UPDATE/DELETE/GET_NEXT_KEY/LOOKUP_AND_DELETE: ``{map_fd, key, value, flags}``."""
    return bpf(cmd, MapElemAttr(map_fd=fd, key=addr(key), value=addr(value), flags=flags))


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
    attr = MapBatchAttr(
        in_batch=addr(in_batch),
        out_batch=addr(out_batch),
        keys=addr(keys),
        values=addr(values),
        count=count,
        map_fd=fd,
    )
    try:
        bpf(cmd, attr)
        err = 0
    except BpfSyscallError as exc:
        if exc.errno != errno.ENOENT:
            raise
        err = exc.errno
    return attr.count, err


def prog_load(
    prog_type: int,
    insns: bytes,
    license: str,
    name: str,
    log_level: int,
    log: ctypes.Array | None,
    expected_attach_type: int = 0,
    attach_btf_id: int = 0,
) -> int:
    insn_buf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    attr = ProgLoadAttr(
        prog_type=prog_type,
        insn_cnt=len(insns) // 8,
        insns=addr(insn_buf),
        license=addr(lic),
        log_level=log_level,
        log_size=len(log) if log is not None else 0,
        log_buf=addr(log),
        prog_name=name.encode()[: BPF_OBJ_NAME_LEN - 1],
        expected_attach_type=expected_attach_type,
        attach_btf_id=attach_btf_id,
    )
    return bpf(Cmd.PROG_LOAD, attr, f"program {name!r}")


def raw_tracepoint_open(name: str | None, prog_fd: int) -> int:
    """Attach to raw tracepoint ``name``; None for a ``tp_btf`` program, whose
    tracepoint is the one its ``attach_btf_id`` names (the kernel refuses a name then)."""
    cname = ctypes.create_string_buffer(name.encode()) if name is not None else None
    attr = RawTracepointAttr(name=addr(cname), prog_fd=prog_fd)
    return bpf(Cmd.RAW_TRACEPOINT_OPEN, attr, f"raw tracepoint {name or 'of the program'!r}")


def link_create(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> int:
    attr = LinkCreateAttr(
        prog_fd=prog_fd, target_fd=target_fd, attach_type=attach_type, flags=flags
    )
    return bpf(Cmd.LINK_CREATE, attr)


def prog_test_run(prog_fd: int, ctx_in: bytes, repeat: int = 0) -> tuple[int, int]:
    """Run a program once on ``ctx_in`` (raw tracepoint args); returns (retval, duration ns)."""
    ctx = ctypes.create_string_buffer(ctx_in, len(ctx_in))
    attr = ProgTestRunAttr(
        prog_fd=prog_fd, repeat=repeat, ctx_size_in=len(ctx_in), ctx_in=addr(ctx)
    )
    bpf(Cmd.PROG_TEST_RUN, attr)
    return attr.retval, attr.duration


def obj_get_info(fd: int, info: ctypes.Structure | ctypes.Array) -> int:
    """``OBJ_GET_INFO_BY_FD`` into ``info`` (a ``struct bpf_{prog,map,link}_info``);
    returns how many bytes the kernel filled (older kernels fill fewer)."""
    attr = ObjGetInfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=addr(info))
    bpf(Cmd.OBJ_GET_INFO_BY_FD, attr)
    return attr.info_len


def enable_stats(stats_type: int = BPF_STATS_RUN_TIME) -> int:
    """``ENABLE_STATS``: run-time stats are collected while the returned fd is open (5.8)."""
    return bpf(Cmd.ENABLE_STATS, EnableStatsAttr(type=stats_type))


def perf_event_open(attr: PerfEventAttr, pid: int = -1, cpu: int = 0, group_fd: int = -1) -> int:
    """``perf_event_open(&attr, pid, cpu, group_fd, PERF_FLAG_FD_CLOEXEC)``; ``attr.size``
    is set to ``sizeof(attr)``."""
    nr = syscall_number("perf_event_open")
    attr.size = ctypes.sizeof(attr)
    fd = _libc.syscall(nr, ctypes.byref(attr), ctypes.c_int(pid), ctypes.c_int(cpu),
                       ctypes.c_int(group_fd), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))  # fmt: skip
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.EPERM, errno.EACCES):
            raise PermissionError_("perf_event_open not permitted: run as root (CAP_PERFMON)")
        raise NettracerError(
            f"perf_event_open(type {attr.type}, config {attr.config}) failed: {os.strerror(err)}"
        )
    return fd


def perf_event_open_tracepoint(tp_id: int, cpu: int = 0, pid: int = -1) -> int:
    """Open a ``PERF_TYPE_TRACEPOINT`` event for tracepoint id ``tp_id``, one sample
    (``PERF_SAMPLE_RAW``) per hit."""
    attr = PerfEventAttr(
        type=PERF_TYPE_TRACEPOINT, config=tp_id, sample_period=1, sample_type=PERF_SAMPLE_RAW
    )
    return perf_event_open(attr, pid, cpu)


def ioctl(fd: int, request: int, arg: int = 0) -> int:
    ret = _libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), ctypes.c_ulong(arg))
    if ret < 0:
        err = ctypes.get_errno()
        raise NettracerError(f"ioctl({request:#x}) on fd {fd} failed: {os.strerror(err)}")
    return ret


def _os_error(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int = 0) -> None:
    """``mount(source, target, fstype, flags, NULL)``; raises OSError with the errno."""
    if _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags, None) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def umount2(target: str, flags: int = 0) -> None:
    """``umount2(target, flags)`` (``MNT_DETACH``: lazily); raises OSError with the errno."""
    if _libc.umount2(os.fsencode(target), flags) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def unshare(flags: int) -> None:
    """``unshare(2)`` for the calling thread (``os.unshare`` is Python 3.12+).

    With ``CLONE_NEWNET`` only the calling thread moves to a new network namespace;
    raises OSError with the errno (EPERM without CAP_SYS_ADMIN).
    """
    if _libc.unshare(flags) < 0:
        raise _os_error(f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    """``setns(2)``: move the calling thread into the namespace ``fd`` refers to
    (glibc 2.14, Linux 3.0; ``os.setns`` is Python 3.12+); raises OSError with the errno."""
    if _libc.setns(fd, nstype) < 0:
        raise _os_error(f"setns({fd}, {nstype:#x})")
