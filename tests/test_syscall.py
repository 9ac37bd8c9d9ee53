"""``bpf/syscall.py``: the attr structures against the UAPI and the running kernel's BTF,
golden bytes equal to the ``struct.pack`` layouts they replaced (no root needed), and
the ``RLIMIT_MEMLOCK`` handling of Linux < 5.11 in subprocesses (root)."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
from conftest import kernel_skip

from nettracer.bpf import syscall
from nettracer.bpf.syscall import (
    EnableStatsAttr,
    LinkCreateAttr,
    MapBatchAttr,
    MapCreateAttr,
    MapElemAttr,
    ObjGetInfoAttr,
    PerfEventAttr,
    ProgInfo,
    ProgLoadAttr,
    ProgTestRunAttr,
    RawTracepointAttr,
)

# -- offsets: include/uapi/linux/bpf.h and perf_event.h, written out by hand -----------

#: structure -> (size we pass, {member: offset}) from the UAPI headers
UAPI: dict[type[ctypes.Structure], tuple[int, dict[str, int]]] = {
    MapCreateAttr: (72, {
        "map_type": 0, "key_size": 4, "value_size": 8, "max_entries": 12, "map_flags": 16,
        "inner_map_fd": 20, "numa_node": 24, "map_name": 28, "map_ifindex": 44, "btf_fd": 48,
        "btf_key_type_id": 52, "btf_value_type_id": 56, "btf_vmlinux_value_type_id": 60,
        "map_extra": 64,
    }),
    MapElemAttr: (32, {"map_fd": 0, "key": 8, "value": 16, "flags": 24}),
    MapBatchAttr: (56, {
        "in_batch": 0, "out_batch": 8, "keys": 16, "values": 24, "count": 32, "map_fd": 36,
        "elem_flags": 40, "flags": 48,
    }),
    ProgLoadAttr: (144, {
        "prog_type": 0, "insn_cnt": 4, "insns": 8, "license": 16, "log_level": 24,
        "log_size": 28, "log_buf": 32, "kern_version": 40, "prog_flags": 44, "prog_name": 48,
        "prog_ifindex": 64, "expected_attach_type": 68, "prog_btf_fd": 72,
        "func_info_rec_size": 76, "func_info": 80, "func_info_cnt": 88,
        "line_info_rec_size": 92, "line_info": 96, "line_info_cnt": 104,
        "attach_btf_id": 108, "attach_prog_fd": 112, "core_relo_cnt": 116, "fd_array": 120,
        "core_relos": 128, "core_relo_rec_size": 136, "log_true_size": 140,
    }),
    ProgTestRunAttr: (80, {
        "prog_fd": 0, "retval": 4, "data_size_in": 8, "data_size_out": 12, "data_in": 16,
        "data_out": 24, "repeat": 32, "duration": 36, "ctx_size_in": 40, "ctx_size_out": 44,
        "ctx_in": 48, "ctx_out": 56, "flags": 64, "cpu": 68, "batch_size": 72,
    }),
    ObjGetInfoAttr: (16, {"bpf_fd": 0, "info_len": 4, "info": 8}),
    RawTracepointAttr: (16, {"name": 0, "prog_fd": 8}),
    LinkCreateAttr: (64, {
        "prog_fd": 0, "target_fd": 4, "attach_type": 8, "flags": 12, "bpf_cookie": 16,
    }),
    EnableStatsAttr: (4, {"type": 0}),
    PerfEventAttr: (128, {
        "type": 0, "size": 4, "config": 8, "sample_period": 16, "sample_type": 24,
        "read_format": 32, "wakeup_events": 48, "bp_type": 52, "config1": 56, "config2": 64,
        "branch_sample_type": 72, "sample_regs_user": 80, "sample_stack_user": 88,
        "clockid": 92, "sample_regs_intr": 96, "aux_watermark": 104, "sample_max_stack": 108,
        "__reserved_2": 110, "aux_sample_size": 112, "__reserved_3": 116, "sig_data": 120,
    }),
    ProgInfo: (216, {
        "type": 0, "id": 4, "tag": 8, "jited_prog_len": 16, "xlated_prog_len": 20,
        "jited_prog_insns": 24, "xlated_prog_insns": 32, "load_time": 40,
        "created_by_uid": 48, "nr_map_ids": 52, "map_ids": 56, "name": 64, "ifindex": 80,
        "netns_dev": 88, "netns_ino": 96, "nr_jited_ksyms": 104, "nr_jited_func_lens": 108,
        "jited_ksyms": 112, "jited_func_lens": 120, "btf_id": 128, "func_info_rec_size": 132,
        "func_info": 136, "nr_func_info": 144, "nr_line_info": 148, "line_info": 152,
        "jited_line_info": 160, "nr_jited_line_info": 168, "line_info_rec_size": 172,
        "jited_line_info_rec_size": 176, "nr_prog_tags": 180, "prog_tags": 184,
        "run_time_ns": 192, "run_cnt": 200, "recursion_misses": 208,
    }),
}  # fmt: skip

#: ``struct perf_event_attr`` bitfields: bit from the start of the struct (word at 40)
PERF_BITS = {
    "disabled": 320, "inherit": 321, "exclude_kernel": 325, "freq": 330, "watermark": 334,
    "precise_ip": 335,
}  # fmt: skip

#: how a structure is reached in BTF: ``union bpf_attr``'s named member, or a struct
BTF_PATH: dict[type[ctypes.Structure], str] = {
    MapCreateAttr: "bpf_attr",
    MapElemAttr: "bpf_attr",
    MapBatchAttr: "bpf_attr.batch",
    ProgLoadAttr: "bpf_attr",
    ProgTestRunAttr: "bpf_attr.test",
    ObjGetInfoAttr: "bpf_attr.info",
    RawTracepointAttr: "bpf_attr.raw_tracepoint",
    LinkCreateAttr: "bpf_attr.link_create",
    EnableStatsAttr: "bpf_attr.enable_stats",
    PerfEventAttr: "perf_event_attr",
    ProgInfo: "bpf_prog_info",
}
#: members that sit deeper in BTF than in our flat structure
BTF_MEMBER = {(LinkCreateAttr, "bpf_cookie"): "perf_event.bpf_cookie"}


def _named(cls: type[ctypes.Structure]) -> list[str]:
    """The structure's members named after the kernel's (not our padding)."""
    return [f[0] for f in cls._fields_ if not f[0].startswith("_") or f[0].startswith("__")]


def _bit(field: ctypes._CField) -> tuple[int, int]:  # type: ignore[name-defined]
    """(bit offset from the start of the struct, bit size) of a ctypes bitfield; the
    field's ``size`` packs ``bits << 16 | bit offset in the unit`` (CPython 3.11)."""
    return field.offset * 8 + (field.size & 0xFFFF), field.size >> 16


@pytest.mark.parametrize("cls", list(UAPI), ids=lambda c: c.__name__)
def test_structure_matches_the_uapi(cls: type[ctypes.Structure]) -> None:
    size, offsets = UAPI[cls]
    assert ctypes.sizeof(cls) == size
    assert {n: getattr(cls, n).offset for n in offsets} == offsets
    bits = {n for n in _named(cls) if getattr(cls, n).size >> 16}
    assert set(offsets) | bits == set(_named(cls)), "every member has its UAPI offset"


def test_perf_event_attr_bitfields() -> None:
    assert {n: _bit(getattr(PerfEventAttr, n))[0] for n in PERF_BITS} == PERF_BITS
    attr = PerfEventAttr(disabled=1, watermark=1, precise_ip=3)
    assert struct.unpack_from("<Q", bytes(attr), 40)[0] == 1 | 1 << 14 | 3 << 15


@pytest.mark.parametrize("cls", list(BTF_PATH), ids=lambda c: c.__name__)
def test_structure_matches_the_kernel_btf(cls: type[ctypes.Structure]) -> None:
    """Every member's offset (and bitfield position) equals the running kernel's BTF."""
    from nettracer.kernel.btf import Btf

    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        kernel_skip("no BTF at /sys/kernel/btf/vmlinux")
    btf = Btf.vmlinux()
    base = BTF_PATH[cls]
    head = btf.resolve(base + "." + _named(cls)[0]).offset if "." in base else 0
    ours, theirs = {}, {}
    for name in _named(cls):
        if name.startswith("__"):
            continue  # reserved members: kernels put them to use under new names (6.13)
        m = btf.resolve(f"{base}.{BTF_MEMBER.get((cls, name), name)}")
        field = getattr(cls, name)
        if m.bitfield_size:
            ours[name], theirs[name] = _bit(field), (m.bit_offset, m.bitfield_size)
        else:
            ours[name], theirs[name] = field.offset, m.offset - head
    assert ours == theirs


# -- golden bytes: what the struct.pack layouts before the structures produced --------

GOLDEN: list[tuple[str, ctypes.Structure, bytes]] = [
    (
        "map_create",
        MapCreateAttr(map_type=9, key_size=16, value_size=24, max_entries=4096, map_flags=1,
                      map_name=b"conns"),
        struct.pack("<7I16s5IQ", 9, 16, 24, 4096, 1, 0, 0, b"conns", 0, 0, 0, 0, 0, 0),
    ),
    (
        "map_elem",
        MapElemAttr(map_fd=7, key=0x7F0011223340, value=0x7F0011223380, flags=1),
        struct.pack("<IxxxxQQQ", 7, 0x7F0011223340, 0x7F0011223380, 1),
    ),
    (
        "map_batch",
        MapBatchAttr(in_batch=0x1000, out_batch=0x2000, keys=0x3000, values=0x4000,
                     count=256, map_fd=9),
        struct.pack("<QQQQIIQQ", 0x1000, 0x2000, 0x3000, 0x4000, 256, 9, 0, 0),
    ),
    (
        "prog_load",
        ProgLoadAttr(prog_type=17, insn_cnt=2, insns=0x5000, license=0x6000, log_level=1,
                     log_size=65536, log_buf=0x7000, prog_name=b"drops",
                     expected_attach_type=3),
        struct.pack("<IIQQIIQII16sII", 17, 2, 0x5000, 0x6000, 1, 65536, 0x7000, 0, 0,
                    b"drops", 0, 3).ljust(144, b"\0"),
    ),
    (
        "raw_tracepoint_open",
        RawTracepointAttr(name=0x8000, prog_fd=11),
        struct.pack("<QIxxxx", 0x8000, 11),
    ),
    (
        "link_create",
        LinkCreateAttr(prog_fd=11, target_fd=12, attach_type=41),
        struct.pack("<IIII", 11, 12, 41, 0) + b"\0" * 48,
    ),
    (
        "prog_test_run",  # the old buffer was these 76 bytes and a NUL, 77 in all
        ProgTestRunAttr(prog_fd=11, repeat=0, ctx_size_in=16, ctx_in=0x9000),
        struct.pack("<IIIIQQIIIIQQIII", 11, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0x9000, 0, 0, 0, 0)
        .ljust(80, b"\0"),
    ),
    (
        "obj_get_info",
        ObjGetInfoAttr(bpf_fd=11, info_len=216, info=0xA000),
        struct.pack("<IIQ", 11, 216, 0xA000),
    ),
    ("enable_stats", EnableStatsAttr(type=0), struct.pack("<I", 0)),
    (
        "perf_event_open_tracepoint",
        PerfEventAttr(type=syscall.PERF_TYPE_TRACEPOINT, size=128, config=1337,
                      sample_period=1, sample_type=syscall.PERF_SAMPLE_RAW),
        struct.pack("<IIQQQQQ", 2, 128, 1337, 1, 1 << 10, 0, 0).ljust(128, b"\0"),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("attr", "old"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_golden_bytes(attr: ctypes.Structure, old: bytes) -> None:
    assert bytes(attr) == old


def test_golden_bytes_hex() -> None:
    """One layout spelled out byte by byte, independent of ``struct``."""
    attr = MapElemAttr(map_fd=7, key=0x1122334455667788, value=0x10, flags=2)
    assert bytes(attr).hex() == (
        "07000000" "00000000" "8877665544332211" "1000000000000000" "0200000000000000"
    )  # fmt: skip


def test_names_are_cut_to_fifteen_bytes_and_a_nul() -> None:
    attr = MapCreateAttr(map_name=b"a_name_longer_than_sixteen"[: syscall.BPF_OBJ_NAME_LEN - 1])
    assert bytes(attr)[28:44] == b"a_name_longer_t\0"


# -- RLIMIT_MEMLOCK (Linux < 5.11 charges BPF memory to it) -----------------------------

#: as root (or not): RLIMIT_MEMLOCK 0, then a map (unless argv[1] is "prog") and a program
_CREATE_WITH_MEMLOCK_ZERO = """
import json, resource, sys
from nettracer.bpf import maps, prog
from nettracer.bpf.insn import R0, exit_, mov64
from nettracer.bpf.syscall import MapType, ProgType
import ctypes
resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
out = {}
try:
    if sys.argv[1:] != ["prog"]:
        maps.Map(MapType.ARRAY, ctypes.c_uint32, ctypes.c_uint64, 1024, "nt_memlock").close()
    prog.load([mov64(R0, 0), exit_()], prog_type=ProgType.RAW_TRACEPOINT, name="nt_memlock").close()
    out["ok"] = True
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
out["limit"] = resource.getrlimit(resource.RLIMIT_MEMLOCK)
print(json.dumps(out))
"""


def _charges_memlock() -> bool:
    """Linux < 5.11 charges BPF maps and programs to RLIMIT_MEMLOCK; 5.11 moved them to
    memory cgroup accounting (commit "bpf: eliminate rlimit-based memory accounting")."""
    release = re.match(r"(\d+)\.(\d+)", os.uname().release)
    assert release is not None
    return (int(release[1]), int(release[2])) < (5, 11)


def _run(*prefix: str, arg: str = "") -> dict:
    """Run the script (after ``prefix``, e.g. setpriv) with this tree's nettracer."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = [*prefix, sys.executable, "-c", _CREATE_WITH_MEMLOCK_ZERO, *([arg] if arg else [])]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=True)
    return json.loads(out.stdout)


@pytest.mark.kernel
def test_memlock_zero_map_and_program_load() -> None:
    """With RLIMIT_MEMLOCK 0 (soft and hard) a map and a program load as root. On a
    kernel that charges memlock (< 5.11) that is because nettracer raised the limit to
    infinity; on one that does not, it left the limit alone (0 proves no charge)."""
    import resource

    got = _run()
    assert got.get("ok"), got
    inf = resource.RLIM_INFINITY
    assert tuple(got["limit"]) == ((inf, inf) if _charges_memlock() else (0, 0))


@pytest.mark.kernel
def test_memlock_not_raisable_names_the_limit() -> None:
    """Without CAP_SYS_RESOURCE the limit cannot be raised: on a charging kernel the error
    is one line naming RLIMIT_MEMLOCK and how to raise it; elsewhere the loads succeed."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        kernel_skip("setpriv (util-linux) is not installed")
    got = _run(setpriv, "--bounding-set=-sys_resource")
    if not _charges_memlock():
        assert got.get("ok"), got
        return
    assert got["limit"] == [0, 0]
    assert got["error"].startswith("MemlockError: bpf(MAP_CREATE) not permitted: ")
    assert "RLIMIT_MEMLOCK (0 bytes here)" in got["error"]
    assert "ulimit -l unlimited" in got["error"] and "\n" not in got["error"]


@pytest.mark.kernel
def test_not_root_says_run_as_root() -> None:
    """As an unprivileged user a raw tracepoint program (CAP_BPF + CAP_PERFMON whatever
    ``kernel.unprivileged_bpf_disabled`` says) is refused with the root message, and the
    memlock limit is not touched."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        kernel_skip("setpriv (util-linux) is not installed")
    nobody = ("--reuid=65534", "--regid=65534", "--clear-groups")
    got = _run(setpriv, *nobody, arg="prog")
    assert got["error"] == (
        "PermissionError_: bpf(PROG_LOAD) not permitted: run as root (needs CAP_BPF, "
        "CAP_PERFMON and CAP_SYS_ADMIN)"
    )
    assert got["limit"] == [0, 0]
