"""tracefs: the format parser on sample text, and the running kernel with BTF as oracle."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import kernel_skip
from hypothesis import given
from hypothesis import strategies as st

from nettracer.bpf import syscall
from nettracer.errors import NettracerError
from nettracer.kernel.tracefs import (
    Tracefs,
    eval_c_expr,
    find_tracefs,
    mount_tracefs,
    open_tracefs,
    parse_format,
    parse_trace_line,
)

SAMPLE = """\
name: sample_event
ID: 1234
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:16;\tsize:4;\tsigned:0;
\tfield:__data_loc char[] name;\toffset:20;\tsize:4;\tsigned:0;
\tfield:enum skb_drop_reason reason;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int state;\toffset:28;\tsize:4;\tsigned:1;
\tfield:unsigned long flags;\toffset:32;\tsize:8;\tsigned:0;

print fmt: "skb=%p name=%s reason=%s, state=%s\\nflags=%s \\"q\\"", REC->skbaddr, \
__get_str(name), __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 0x3, "NO_SOCKET" }, \
{ (4), "A, {B}" }, { ((((1UL))) << (4)), "SHIFTED" }, { SOME_ENUM, "UNKNOWN_NAME" }), \
REC->state ? __print_symbolic(REC->state, { -1, "MINUS" }, { 1, "ONE" }) : "none", \
__print_flags(REC->flags, "|", { (1UL << 0), "F0" }, { 0x2, "F1" })
"""


def test_parse_fields() -> None:
    fmt = parse_format(SAMPLE, "cat")
    assert (fmt.category, fmt.name, fmt.id) == ("cat", "sample_event", 1234)
    assert [f.name for f in fmt.common_fields] == [
        "common_type",
        "common_flags",
        "common_preempt_count",
        "common_pid",
    ]
    assert fmt.field("common_pid").signed
    skb = fmt.field("skbaddr")
    assert (skb.ctype, skb.offset, skb.size, skb.signed) == ("void *", 8, 8, False)
    saddr = fmt.field("saddr")
    assert (saddr.ctype, saddr.array_len, saddr.size) == ("__u8[4]", 4, 4)
    name = fmt.field("name")
    assert name.data_loc and name.ctype == "__data_loc char[]"
    assert fmt.field("reason").ctype == "enum skb_drop_reason"
    assert fmt.size == 40
    assert fmt.has_field("state") and not fmt.has_field("nope")
    with pytest.raises(NettracerError, match="has no field 'nope'"):
        fmt.field("nope")


def test_parse_print_fmt() -> None:
    fmt = parse_format(SAMPLE, "cat")
    assert fmt.fmt == 'skb=%p name=%s reason=%s, state=%s\nflags=%s "q"'
    assert fmt.args[:2] == ("REC->skbaddr", "__get_str(name)")
    assert len(fmt.args) == 5


def test_parse_symbolic_tables() -> None:
    fmt = parse_format(SAMPLE, "cat")
    assert fmt.symbolic("reason") == {
        2: "NOT_SPECIFIED",
        3: "NO_SOCKET",
        4: "A, {B}",
        16: "SHIFTED",
    }
    reason = next(t for t in fmt.tables if t.field == "reason")
    assert reason.unresolved == (("SOME_ENUM", "UNKNOWN_NAME"),)
    assert fmt.symbolic("state") == {-1: "MINUS", 1: "ONE"}  # inside a ?: argument
    assert fmt.flags("flags") == {1: "F0", 2: "F1"}
    assert next(t for t in fmt.tables if t.kind == "flags").delimiter == "|"
    with pytest.raises(NettracerError, match="no __print_symbolic"):
        fmt.symbolic("skbaddr")


def test_parse_symbolic_with_constants() -> None:
    fmt = parse_format(SAMPLE, "cat", constants={"SOME_ENUM": 99})
    assert fmt.symbolic("reason")[99] == "UNKNOWN_NAME"


def test_multiline_print_fmt() -> None:
    # ext4:ext4_fc_stats' format string holds a raw newline.
    text = (
        'name: x\nID: 1\nformat:\n\nprint fmt: "a\nb=%s", __print_symbolic(REC->v, { 1, "ONE"})\n'
    )
    fmt = parse_format(text)
    assert fmt.fmt == "a\nb=%s"
    assert fmt.symbolic("v") == {1: "ONE"}


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("42", 42),
        ("0x2a", 42),
        ("052", 42),
        ("2ULL", 2),
        ("(-1)", -1),
        ("((((1UL))) << (31))", 1 << 31),
        ("((u32)((((1UL))) << (31)))", 1 << 31),
        ("(u8)-1", 255),
        ("(int)0xffffffff", -1),
        ("(unsigned long)5", 5),
        ("0x040 + 3", 0x43),
        ("(1 << 0) | (1 << 2)", 5),
        ("(0x0001 | 0x0010)", 0x11),
        ("~0 & 0xff", 0xFF),
        ("7 / 2 * 2 + 7 % 2", 7),
        ("-7 / 2", -3),
        ("1 ? 2 : 3", 2),
        ("!0 && 1 || 0", 1),
        ("3 > 2 == 1", 1),
    ],
)
def test_eval_c_expr(expr: str, value: int) -> None:
    assert eval_c_expr(expr) == value


@pytest.mark.parametrize("expr", ["NAME", "1 +", "(1", "1 / 0", "1 << 1000", "a.b", ""])
def test_eval_c_expr_rejects(expr: str) -> None:
    with pytest.raises(ValueError):
        eval_c_expr(expr)


def test_eval_c_expr_constants() -> None:
    assert eval_c_expr("(1 << A) | B", {"A": 3, "B": 1}) == 9


def test_parse_trace_line() -> None:
    line = parse_trace_line(
        "     ksoftirqd/1-22      [001] ..s1.   394.570531: kfree_skb: skbaddr=00000000e87e64e8 "
        "location=__udp4_lib_rcv+0x4bc/0xd00 reason: NO_SOCKET"
    )
    assert line is not None
    assert (line.task, line.pid, line.cpu, line.flags) == ("ksoftirqd/1", 22, 1, "..s1.")
    assert line.timestamp == 394.570531 and line.event == "kfree_skb"
    assert line.values()["location"] == "__udp4_lib_rcv+0x4bc/0xd00"
    # task names may hold dashes and spaces; the tgid column is optional
    line = parse_trace_line("  my-task name-1234  (   1200) [000] d..2.  5.000001: ev: x=1")
    assert line is not None and (line.task, line.pid, line.event) == ("my-task name", 1234, "ev")
    # older kernels print no flags column
    line = parse_trace_line("  bash-1 [003]  10.5: sys_enter: NR 0")
    assert line is not None and (line.flags, line.event, line.body) == ("", "sys_enter", "NR 0")
    assert parse_trace_line("# tracer: nop") is None
    assert parse_trace_line("garbage") is None


def test_find_tracefs_from_mounts_file(tmp_path: Path) -> None:
    where = tmp_path / "my tracing"
    (where / "events").mkdir(parents=True)
    mounts = tmp_path / "mounts"
    escaped = str(where).replace(" ", "\\040")
    mounts.write_text(f"proc /proc proc rw 0 0\nnodev {escaped} tracefs rw,relatime 0 0\n")
    assert find_tracefs(str(mounts)) == str(where)
    dbg = tmp_path / "debug"
    (dbg / "tracing" / "events").mkdir(parents=True)
    mounts.write_text(f"debugfs {dbg} debugfs rw 0 0\n")
    assert find_tracefs(str(mounts)) == str(dbg / "tracing")
    mounts.write_text("proc /proc proc rw 0 0\n")
    assert find_tracefs(str(mounts)) is None
    assert find_tracefs(str(tmp_path / "none")) is None


# -- the running kernel -------------------------------------------------------------


@pytest.fixture(scope="module")
def tracefs() -> Tracefs:
    return open_tracefs()


@pytest.mark.kernel
def test_open_tracefs_is_mounted(tracefs: Tracefs) -> None:
    assert os.path.isdir(tracefs.path("events", "skb"))
    assert find_tracefs() == tracefs.root


@pytest.mark.kernel
def test_mount_tracefs_with_libc(tmp_path: Path) -> None:
    """Mount a second tracefs with mount(2) and unmount it again."""
    target = tmp_path / "tracing"
    target.mkdir()
    try:
        assert mount_tracefs(str(target)) == str(target)
        assert (target / "events" / "skb" / "kfree_skb" / "format").exists()
        mounts = Path("/proc/mounts").read_text()
        assert re.search(rf"^\S+ {re.escape(str(target))} tracefs ", mounts, re.M)
    finally:
        syscall.umount2(str(target), syscall.MNT_DETACH)


def _btf_raw() -> str:
    btf = "/sys/kernel/btf/vmlinux"
    if not os.path.exists(btf):
        kernel_skip("no BTF at /sys/kernel/btf/vmlinux")
    bpftool = shutil.which("bpftool")
    if bpftool is None:
        kernel_skip("bpftool is not installed")
    out = subprocess.run(
        [str(bpftool), "btf", "dump", "file", btf, "format", "raw"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout


def _btf_block(raw: str, header: str) -> list[str]:
    """Member lines of the BTF type whose header line matches ``header``."""
    lines = raw.splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"^\[\d+\] {header} ", line):
            out = []
            for member in lines[i + 1 :]:
                if not member.startswith("\t"):
                    break
                out.append(member.strip())
            return out
    kernel_skip(f"BTF has no {header}")
    raise AssertionError  # unreachable


@pytest.fixture(scope="module")
def btf_raw() -> str:
    return _btf_raw()


@pytest.mark.kernel
def test_kfree_skb_fields_match_btf(tracefs: Tracefs, btf_raw: str) -> None:
    """The record layout equals BTF's ``struct trace_event_raw_kfree_skb``."""
    fmt = tracefs.tracepoint_format("skb", "kfree_skb")
    for name in ("skbaddr", "location", "protocol", "reason"):
        assert fmt.has_field(name)
    members = {}
    for line in _btf_block(btf_raw, "STRUCT 'trace_event_raw_kfree_skb'"):
        m = re.match(r"'(\w+)' type_id=\d+ bits_offset=(\d+)", line)
        assert m, line
        members[m.group(1)] = int(m.group(2)) // 8
    for f in fmt.event_fields:
        assert members[f.name] == f.offset, f
    entry = {}
    for line in _btf_block(btf_raw, "STRUCT 'trace_entry'"):
        m = re.match(r"'(\w+)' type_id=\d+ bits_offset=(\d+)", line)
        assert m, line
        entry["common_" + m.group(1)] = int(m.group(2)) // 8 + members["ent"]
    assert {f.name: f.offset for f in fmt.common_fields} == entry


@pytest.mark.kernel
def test_kfree_skb_reason_table_matches_btf_enum(tracefs: Tracefs, btf_raw: str) -> None:
    """The ``__print_symbolic`` drop reasons are ``enum skb_drop_reason`` minus its prefix."""
    table = tracefs.tracepoint_format("skb", "kfree_skb").symbolic("reason")
    assert "NO_SOCKET" in table.values()
    enum = {}
    for line in _btf_block(btf_raw, "ENUM(?:64)? 'skb_drop_reason'"):
        m = re.match(r"'SKB_DROP_REASON_(\w+)' val=(-?\d+)", line)
        if m:
            enum[int(m.group(2))] = m.group(1)
    top = max(v for v, n in enum.items() if n == "MAX")
    assert table == {v: n for v, n in enum.items() if v <= top}


@pytest.mark.kernel
def test_tracepoint_id_matches_format(tracefs: Tracefs) -> None:
    for cat, name in (("skb", "kfree_skb"), ("sock", "inet_sock_set_state")):
        ident = tracefs.tracepoint_id(cat, name)
        assert ident == tracefs.tracepoint_format(cat, name).id > 0
        assert f"{cat}:{name}" in tracefs.available_events()


@pytest.mark.kernel
def test_available_events_are_event_dirs(tracefs: Tracefs) -> None:
    events = tracefs.available_events()
    assert "skb:kfree_skb" in events
    for ev in events[:: max(1, len(events) // 50)]:
        cat, name = ev.split(":", 1)
        assert tracefs.has_event(cat, name), ev


@pytest.mark.kernel
def test_every_format_parses(tracefs: Tracefs) -> None:
    """Every format file: field count equals its field: lines; tables equal calls."""
    for ev in tracefs.available_events():
        cat, name = ev.split(":", 1)
        text = tracefs.read("events", cat, name, "format")
        fmt = tracefs.tracepoint_format(cat, name)
        assert len(fmt.fields) == len(re.findall(r"^\s*field:", text, re.M)), ev
        calls = re.findall(r"__print_(?:symbolic|flags)(?:_u64)?\(", text)
        assert len(fmt.tables) == len(calls), ev


@pytest.mark.kernel
def test_unknown_tracepoint(tracefs: Tracefs) -> None:
    msg = (
        rf"unknown tracepoint skb:no_such_event \(see {re.escape(tracefs.root)}/available_events\)"
    )
    with pytest.raises(NettracerError, match=msg):
        tracefs.tracepoint_id("skb", "no_such_event")
    with pytest.raises(NettracerError, match="unknown tracepoint"):
        tracefs.tracepoint_format("..", "skb")
    with pytest.raises(NettracerError, match="unknown tracepoint"):
        tracefs.buffer(None).enable("nope", "nope")


def _udp_to_closed_port() -> int:
    """Send one datagram to a closed port on loopback; returns that port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.sendto(b"x", ("127.0.0.1", port))
    return port


@pytest.mark.kernel
def test_trace_instance_sees_udp_drop(tracefs: Tracefs) -> None:
    with tracefs.buffer() as buf:
        instance = buf.path
        buf.enable("skb", "kfree_skb")
        _udp_to_closed_port()
        lines = [line for line in buf.lines("kfree_skb") if line.body.endswith("reason: NO_SOCKET")]
    assert lines
    assert lines[0].values()["protocol"] == str(0x0800)  # ETH_P_IP
    assert not os.path.exists(instance)


@pytest.mark.kernel
def test_top_level_buffer_is_restored(tracefs: Tracefs) -> None:
    enable = tracefs.path("events", "skb", "kfree_skb", "enable")
    before = Path(enable).read_text()
    on_before = Path(tracefs.path("tracing_on")).read_text()
    with tracefs.buffer(None) as buf:
        buf.enable("skb", "kfree_skb")
        assert Path(enable).read_text().startswith("1")
        _udp_to_closed_port()
        assert any(line.body.endswith("NO_SOCKET") for line in buf.lines("kfree_skb"))
    assert Path(enable).read_text() == before
    assert Path(tracefs.path("tracing_on")).read_text() == on_before


@pytest.mark.kernel
def test_trace_pipe(tracefs: Tracefs) -> None:
    with tracefs.buffer() as buf:
        buf.enable("skb", "kfree_skb")
        _udp_to_closed_port()
        got = [
            line
            for raw in buf.pipe(timeout=1.0)
            if (line := parse_trace_line(raw)) and line.event == "kfree_skb"
        ]
        assert any(line.body.endswith("reason: NO_SOCKET") for line in got)
        assert buf.lines("kfree_skb") == []  # trace_pipe consumed them


_IN_PRIVATE_NS = """
import os, sys
from nettracer.bpf import syscall
from nettracer.errors import NettracerError
from nettracer.kernel.tracefs import find_tracefs, mount_tracefs, open_tracefs
def umount_all(fstype):
    for line in reversed(open("/proc/mounts").read().splitlines()):
        if line.split()[2] == fstype:
            syscall.umount2(line.split()[1], syscall.MNT_DETACH)
umount_all("tracefs")
umount_all("debugfs")  # its tracing/ would automount tracefs again
assert find_tracefs() is None
try:
    mount_tracefs("/nonexistent-nettracer")
except NettracerError as e:
    print("ERROR", e)
t = open_tracefs()
print("OPENED", t.root, t.tracepoint_id("skb", "kfree_skb"))
"""


@pytest.mark.kernel
def test_mount_when_unmounted_in_private_mount_namespace(tracefs: Tracefs) -> None:
    """In a mount namespace without tracefs: a bad target errors, open_tracefs mounts."""
    unshare = shutil.which("unshare")
    if unshare is None:
        kernel_skip("unshare (util-linux) is not installed")
    out = subprocess.run(
        [str(unshare), "-m", "--propagation", "private", sys.executable, "-c", _IN_PRIVATE_NS],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout.splitlines()
    assert out[0] == (
        "ERROR tracefs is not mounted and could not be mounted at /nonexistent-nettracer: "
        "ENOENT (No such file or directory); mount it or run as root"
    )
    ident = tracefs.tracepoint_id("skb", "kfree_skb")
    assert out[1] in (
        f"OPENED /sys/kernel/tracing {ident}",
        f"OPENED /sys/kernel/debug/tracing {ident}",
    )


_SIDE_EFFECTS = """
import json, os, subprocess, sys
from nettracer.bpf import syscall
from nettracer.kernel.tracefs import tracefs_mounted
def umount_all(fstype):
    for line in reversed(open("/proc/mounts").read().splitlines()):
        if line.split()[2] == fstype:
            syscall.umount2(line.split()[1], syscall.MNT_DETACH)
def mounts():
    return open("/proc/self/mounts").read()
def nettracer(*args):
    return subprocess.run([sys.executable, "-m", "nettracer", *args], capture_output=True,
                          text=True, timeout=60)
umount_all("tracefs")
umount_all("debugfs")  # its tracing/ would automount tracefs again
out = {}
before = mounts()
k = nettracer("kernel", "--json")
out["kernel"] = [k.returncode, k.stderr, json.loads(k.stdout or "{}").get("tracefs"),
                 mounts() == before]
t = nettracer("kernel")
out["kernel_table"] = [t.returncode, t.stdout.count("not mounted (commands that trace"),
                       mounts() == before]
with tracefs_mounted() as tr:
    out["inside"] = [tr.root, tr.tracepoint_id("skb", "kfree_skb") > 0, mounts() != before]
out["after_with"] = mounts() == before
# a kernel without BTF: drops reads kfree_skb's arguments and reasons from tracefs
syscall.mount("tmpfs", "/sys/kernel/btf", "tmpfs")
before = mounts()
cfg = sys.argv[1]
d = nettracer("drops", "--duration", "0.5", "--json", "--config", cfg)
out["drops"] = [d.returncode, d.stderr, mounts() == before]
print(json.dumps(out))
"""


@pytest.mark.kernel
def test_commands_leave_the_mount_table_as_they_found_it(tmp_path: Path) -> None:
    """In a mount namespace without tracefs: ``nettracer kernel`` reports it not mounted
    and mounts nothing; ``drops`` on a kernel without BTF mounts it to read the
    kfree_skb format and unmounts it before it exits."""
    unshare = shutil.which("unshare")
    if unshare is None:
        kernel_skip("unshare (util-linux) is not installed")
    cfg = tmp_path / "nettracer.yaml"
    # the guess (no BTF) may take long on a busy machine: this test is not about it
    cfg.write_text(f"offsets:\n  cache_dir: {tmp_path}\n  guess_timeout_ms: 30000\n")
    import json

    r = subprocess.run(
        [unshare, "-m", "--propagation", "private", sys.executable, "-c", _SIDE_EFFECTS, str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["kernel"] == [0, "", {"mounted": False, "available": True}, True]
    assert out["kernel_table"] == [0, 1, True]
    assert out["inside"] == ["/sys/kernel/tracing", True, True]
    assert out["after_with"] is True
    assert out["drops"][0] == 0, out["drops"][1]
    assert out["drops"][2] is True


def _c_exprs() -> st.SearchStrategy[str]:
    """Integer expressions on which C and Python agree (no division, small shifts)."""
    leaf = st.integers(0, 1000).map(str) | st.integers(0, 0xFFFF).map(hex)
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.tuples(inner, st.sampled_from(["+", "-", "*", "|", "&", "^"]), inner).map(" ".join),
            # parenthesized, so that an outer "+ 128" cannot become the shift count
            st.tuples(inner, st.sampled_from(["<<", ">>"]), st.integers(0, 8).map(str)).map(
                lambda t: f"({' '.join(t)})"
            ),
            inner.map(lambda e: f"({e})"),
            inner.map(lambda e: f"~{e}"),
            inner.map(lambda e: f"-({e})"),
        ),
        max_leaves=12,
    )


@given(_c_exprs())
def test_eval_c_expr_agrees_with_python_precedence(expr: str) -> None:
    assert eval_c_expr(expr) == eval(expr)  # same precedence for these operators
