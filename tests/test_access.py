"""nettracer.access: struct-path expressions, their compilation, and ``nettracer read``.

Offsets are checked against ``Btf.resolve`` and against bpftool's raw BTF dump; the
kernel tests read packets the test sends itself, in network namespaces of its own,
through a veth pair whose names it chose, to a UDP port nobody listens on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import HAS_BTF, check_no_btf_refused, kernel_skip, read_stderr_until
from golden import check_golden

from nettracer.access.compile import FAULT, NULL, OK, RecordLayout, compile_reads
from nettracer.access.path import (
    AccessError,
    AccessPath,
    parse,
    resolve_btf,
    resolve_offsets,
    tracepoint_args_btf,
)
from nettracer.access.reader import build_program, netns_expr, resolve_exprs, tracepoint_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PID = os.getpid()
VMLINUX = "/sys/kernel/btf/vmlinux"


@pytest.fixture(scope="module")
def btf():
    if not os.path.exists(VMLINUX):
        kernel_skip("kernel has no BTF")
    from nettracer.kernel.btf import Btf

    return Btf.vmlinux()


@pytest.fixture(scope="module")
def kfree_args(btf):
    return tracepoint_args_btf(btf, "kfree_skb")


# -- parsing ------------------------------------------------------------------------


def test_parse_tokens() -> None:
    toks = parse("skb->dev->nd_net.net -> ns.inum")
    assert [(t.op, t.name) for t in toks] == [
        ("", "skb"),
        ("->", "dev"),
        ("->", "nd_net"),
        (".", "net"),
        ("->", "ns"),
        (".", "inum"),
    ]
    assert toks[1].pos == 5


@pytest.mark.parametrize("expr", ["", "  ", "->dev", "skb->", "skb..len", "skb->1x", "skb dev"])
def test_parse_errors_are_one_line(expr: str) -> None:
    with pytest.raises(AccessError) as exc:
        parse(expr)
    assert "\n" not in str(exc.value)


def test_tracepoint_name() -> None:
    assert tracepoint_name("skb:kfree_skb") == tracepoint_name("kfree_skb") == "kfree_skb"


# -- resolution with BTF -------------------------------------------------------------


def test_resolve_against_btf_resolve(btf, kfree_args) -> None:
    r = btf.resolve

    def res(e: str) -> AccessPath:
        return resolve_btf(e, btf, kfree_args)

    p = res("skb->len")
    assert (p.arg_index, p.derefs, p.offset, p.size) == (0, (), r("sk_buff.len").offset, 4)
    assert p.decode == "uint"
    p = res("skb->dev->name")
    assert p.derefs == (r("sk_buff.dev").offset,)
    assert (p.offset, p.size, p.decode) == (r("net_device.name").offset, 16, "str")
    p = res("skb->dev->nd_net.net->ns.inum")
    assert p.derefs == (r("sk_buff.dev").offset, r("net_device.nd_net.net").offset)
    assert (p.offset, p.size) == (r("net.ns.inum").offset, 4)
    p = res("skb->sk->__sk_common.skc_dport")
    assert p.derefs == (r("sk_buff.sk").offset,)
    assert p.offset == r("sock.__sk_common.skc_dport").offset == r("sock_common.skc_dport").offset
    assert (p.size, p.decode, p.ctype) == (2, "be", "__be16")
    p = res("skb->protocol")
    assert (p.offset, p.decode) == (r("sk_buff.protocol").offset, "be")
    p = res("skb->dev->ifindex")
    assert (p.offset, p.decode) == (r("net_device.ifindex").offset, "int")
    # the arguments themselves
    p = res("location")
    assert (p.arg_index, p.offset, p.decode) == (1, None, "ptr")
    names = [n for n, _ in kfree_args]
    if "reason" in names:
        p = res("reason")
        assert p.arg_index == names.index("reason") and p.offset is None
        assert p.ctype == "enum skb_drop_reason"


def test_resolve_bitfield(btf, kfree_args) -> None:
    m = btf.resolve("sk_buff.pkt_type")
    assert m.is_bitfield
    p = resolve_btf("skb->pkt_type", btf, kfree_args)
    assert (p.offset, p.size, p.bit_size) == (m.offset, m.size, m.bitfield_size)
    assert 8 * p.offset + p.bit_shift == m.bit_offset


def _bpftool_members(struct: str) -> dict[str, int]:
    """Direct members of ``struct`` -> bit offset, from bpftool's raw dump (the oracle)."""
    if shutil.which("bpftool") is None:
        kernel_skip("bpftool not installed")
    out = subprocess.run(
        ["bpftool", "btf", "dump", "file", VMLINUX, "format", "raw"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(rf"^\[\d+\] STRUCT '{struct}' size=\d+ vlen=\d+\n((?:\t.*\n)*)", out, re.M)
    assert m, f"bpftool shows no struct {struct}"
    return {
        mm.group(1): int(mm.group(2))
        for mm in re.finditer(r"'(\w+)' type_id=\d+ bits_offset=(\d+)", m.group(1))
    }


def test_offsets_against_bpftool(btf, kfree_args) -> None:
    skb = _bpftool_members("sk_buff")
    dev = _bpftool_members("net_device")
    ns = _bpftool_members("ns_common")
    net = _bpftool_members("net")
    assert resolve_btf("skb->len", btf, kfree_args).offset * 8 == skb["len"]
    assert resolve_btf("skb->sk->sk_type", btf, kfree_args).derefs[0] * 8 == skb["sk"]
    name = resolve_btf("skb->dev->name", btf, kfree_args)
    if "name" in dev:  # a direct member of struct net_device
        assert name.offset * 8 == dev["name"]
    inum = resolve_btf("skb->dev->nd_net.net->ns.inum", btf, kfree_args)
    assert inum.offset * 8 == net["ns"] + ns["inum"]


def test_sock_paths(btf) -> None:
    args = tracepoint_args_btf(btf, "inet_sock_set_state")
    p = resolve_btf("sk->__sk_common.skc_dport", btf, args)
    assert p.offset == btf.resolve("sock_common.skc_dport").offset and p.decode == "be"
    p = resolve_btf("sk->__sk_common.skc_net.net->ns.inum", btf, args)
    assert p.derefs == (btf.resolve("sock_common.skc_net").offset,)
    assert netns_expr("inet_sock_set_state", btf) == "sk->__sk_common.skc_net.net->ns.inum"
    assert netns_expr("kfree_skb", btf) == "skb->dev->nd_net.net->ns.inum"


@pytest.mark.parametrize(
    ("expr", "wanted"),
    [
        ("skb->dve", "struct sk_buff has no member 'dve' (did you mean dev?)"),
        ("skb->zzzzzz", "members: "),
        ("skb.len", "use '->'"),
        ("skb->dev.name", "skb->dev is a pointer (struct net_device *); use '->'"),
        ("skb->len->x", "skb->len is unsigned int, not a pointer"),
        ("sbk->len", "no argument 'sbk' (arguments: skb, location"),
        ("skb->dev->name.x", "not a struct or union"),
    ],
)
def test_resolve_errors(btf, kfree_args, expr: str, wanted: str) -> None:
    with pytest.raises(AccessError) as exc:
        resolve_btf(expr, btf, kfree_args)
    msg = str(exc.value)
    assert msg.startswith(expr + ": ") and wanted in msg and "\n" not in msg


def test_too_large_value_is_refused(btf) -> None:
    args = tracepoint_args_btf(btf, "inet_sock_set_state")
    with pytest.raises(AccessError, match="at most 64 bytes"):
        resolve_btf("sk->__sk_common", btf, args)


# -- without BTF: the catalogue ------------------------------------------------------


def test_catalogue_paths_equal_btf(btf, kfree_args) -> None:
    from nettracer.layout.btf_offsets import btf_offsets

    offsets = btf_offsets()
    for expr in (
        "skb->len",
        "skb->dev->name",
        "skb->dev->ifindex",
        "skb->protocol",
        "skb->dev->nd_net.net->ns.inum",
        "skb->sk->__sk_common.skc_dport",
        "skb->sk->sk_protocol",
        "skb",
    ):
        a, b = resolve_offsets(expr, offsets, "kfree_skb"), resolve_btf(expr, btf, kfree_args)
        assert (a.arg_index, a.derefs, a.offset, a.size, a.decode) == (
            b.arg_index,
            b.derefs,
            b.offset,
            b.size,
            b.decode,
        ), expr
    with pytest.raises(AccessError, match="not in the field catalogue"):
        resolve_offsets("skb->data_len", offsets, "kfree_skb")
    with pytest.raises(AccessError, match="did you mean dev"):
        resolve_offsets("skb->dve", offsets, "kfree_skb")
    with pytest.raises(AccessError, match="arguments of tracepoint"):
        resolve_offsets("skb->len", offsets, "no_such_tp")


# -- decoding -------------------------------------------------------------------------


def test_decode_values() -> None:
    def p(decode: str, size: int, **kw: int) -> AccessPath:
        return AccessPath("x", 0, (), 0, size, "t", decode, **kw)

    assert p("be", 2).decode_value(b"\x1f\x90") == 8080
    assert p("int", 4).decode_value((-5).to_bytes(4, "little", signed=True)) == -5
    assert p("uint", 4).decode_value((2**32 - 5).to_bytes(4, "little")) == 2**32 - 5
    assert p("str", 16).decode_value(b"veth0\0garbage\0\0\0") == "veth0"
    assert p("ptr", 8).decode_value((0xFFFF888012345678).to_bytes(8, "little")) == (
        "0xffff888012345678"
    )
    assert p("uint", 1, bit_shift=1, bit_size=3).decode_value(bytes([0b1010])) == 0b101
    rec = RecordLayout.of([p("uint", 4), p("str", 16)])
    assert rec.slots == (8, 16) and rec.size == 32
    raw = bytes([OK, NULL]) + bytes(6) + (7).to_bytes(8, "little") + bytes(16)
    assert rec.decode(raw) == [7, None]
    assert rec.statuses(raw) == ["ok", "null"]


def test_record_too_large() -> None:
    big = AccessPath("skb->cb", 0, (), 40, 48, "char[48]", "str")
    with pytest.raises(AccessError, match="at most 256"):
        RecordLayout.of([big] * 6)


# -- generated programs (listings) ----------------------------------------------------

#: fixed paths (the offsets of 6.x, written out) so the listings do not follow the kernel
NAME = AccessPath("skb->dev->name", 0, (16,), 304, 16, "char[16]", "str")
LEN = AccessPath("skb->len", 0, (), 112, 4, "unsigned int", "uint")
INUM = AccessPath("skb->dev->nd_net.net->ns.inum", 0, (16, 280), 176, 4, "unsigned int", "uint")


@pytest.mark.parametrize("mode", ["count", "events"])
def test_read_program_listing(mode: str) -> None:
    prog = build_program(RecordLayout.of([NAME, LEN]), mode)
    check_golden(f"read_{mode}", prog.listing())


def test_read_program_shares_pointer_hops_and_coalesces_members() -> None:
    """skb->len and skb->protocol in one read; skb->dev followed once for the name (a
    string: read alone) and the ifindex."""
    proto = AccessPath("skb->protocol", 0, (), 180, 2, "__be16", "be")
    ifindex = AccessPath("skb->dev->ifindex", 0, (16,), 224, 4, "int", "int")
    prog = build_program(RecordLayout.of([NAME, LEN, proto, ifindex]), "events")
    check_golden("read_events_shared", prog.listing())
    calls = prog.listing().count("call probe_read_kernel")
    assert calls == 4  # skb->{len,protocol}; skb->dev; dev->name; dev->ifindex


def test_read_program_with_netns_filter_listing() -> None:
    prog = build_program(RecordLayout.of([LEN]), "count", (RecordLayout.of([INUM]), 4026531840))
    check_golden("read_count_netns", prog.listing())


# -- compiled programs, run by the kernel -------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize("legacy", [False, True], ids=["probe_read_kernel", "probe_read"])
def test_null_and_fault_markers_by_test_run(btf, kfree_args, legacy: bool) -> None:
    """A NULL ``skb`` gives null, an unmapped one a fault; the argument itself is read.
    The same with the read helpers of kernels before 5.5."""
    import ctypes

    from nettracer.access.reader import key_type
    from nettracer.bpf import prog
    from nettracer.bpf.counters import lost_counter
    from nettracer.bpf.maps import hash_map
    from nettracer.bpf.memory import KernelReads

    paths = [resolve_btf(e, btf, kfree_args) for e in ("skb->dev->name", "skb->len", "location")]
    rec = RecordLayout.of(paths)
    program = build_program(rec, "count", reads=KernelReads(legacy=legacy))
    assert ("call probe_read_str#45" in program.listing()) is legacy
    with (
        hash_map(key_type(rec), ctypes.c_uint64, 16, "out") as out,
        lost_counter("lost") as lost,
        prog.load(program.insns, maps={"out": out, "lost": lost}) as p,
    ):
        p.test_run([0, 0x1234, 0, 0])
        p.test_run([0, 0x1234, 0, 0])
        p.test_run([0x10, 0x5678, 0, 0])  # the first page is never mapped
        rows = {}
        for key, n in out.items():
            raw = bytes(key.raw)
            rows[tuple(rec.statuses(raw))] = (rec.decode(raw), n)
    assert rows == {
        ("null", "null", "ok"): ([None, None, "0x1234"], 2),
        ("fault", "fault", "ok"): ([None, None, "0x5678"], 1),
    }
    assert FAULT == 2 and NULL == 1


@pytest.mark.kernel
def test_compile_reads_twice_in_one_program(btf, kfree_args) -> None:
    """Two records in one program get labels of their own, assemble and load."""
    from nettracer.bpf import prog
    from nettracer.bpf.insn import R0, R1, R6, Program, exit_, mov64

    a = RecordLayout.of([resolve_btf("skb->dev->name", btf, kfree_args)])
    b = RecordLayout.of([resolve_btf("skb->sk->__sk_common.skc_dport", btf, kfree_args)])
    p = Program([mov64(R6, R1)])
    compile_reads(p, a, -a.size)
    compile_reads(p, b, -a.size - b.size)
    p += [mov64(R0, 0), exit_()]
    with prog.load(p.insns, name="acc_twice") as pr:
        assert pr.test_run([0]) == 0
    with pytest.raises(ValueError):
        compile_reads(Program(), a, -4)


# -- nettracer read, on traffic the test sends ----------------------------------------


@dataclass
class Topo:
    sender: str
    receiver: str
    tx: str  # veth in the sender namespace
    rx: str  # its peer in the receiver namespace
    inode: int = 0


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}"


def _nsexec(ns: str, *cmd: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=60, **kw
    )


@pytest.fixture(scope="module")
def topo() -> Iterator[Topo]:
    if os.geteuid() != 0:
        kernel_skip("needs root to build network namespaces")
    t = Topo(f"ntacs{PID}", f"ntacr{PID}", f"acs{PID % 100000}", f"acr{PID % 100000}")
    try:
        for ns in (t.sender, t.receiver):
            _ip("netns", "add", ns)
            # no IPv6 (router solicitations, MLD): the receiver sees only our datagrams
            _nsexec(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            _nsexec(ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        smac, rmac = "02:00:00:00:a5:01", "02:00:00:00:a5:02"
        _ip("link", "add", t.tx, "address", smac, "netns", t.sender, "type", "veth",
            "peer", "name", t.rx, "address", rmac, "netns", t.receiver)  # fmt: skip
        for ns, dev, me, peer, peer_mac in (
            (t.sender, t.tx, 1, 2, rmac),
            (t.receiver, t.rx, 2, 1, smac),
        ):
            _ip("addr", "add", f"10.233.7.{me}/24", "dev", dev, ns=ns)
            _ip("link", "set", dev, "up", ns=ns)
            _ip("neigh", "replace", f"10.233.7.{peer}", "lladdr", peer_mac, "dev", dev,
                "nud", "permanent", ns=ns)  # fmt: skip
        t.inode = os.stat(f"/run/netns/{t.receiver}").st_ino
        yield t
    finally:
        for ns in (t.sender, t.receiver):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _no_ports(t: Topo) -> int:
    """``Udp: NoPorts`` of the receiver namespace: the datagrams it had no socket for."""
    lines = _nsexec(t.receiver, "cat", "/proc/net/snmp").stdout.splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("Udp:"):
            return dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=True))[
                "NoPorts"
            ]
    raise AssertionError("no Udp line in /proc/net/snmp")


_CLI = (
    "import sys; from nettracer.cli import main; "
    "main.COMMANDS = (*main.COMMANDS, 'read') if 'read' not in main.COMMANDS else main.COMMANDS; "
    "raise SystemExit(main.main(sys.argv[1:]))"
)


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CLI, "read", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
        cwd=REPO,
    )


def _wait_attached(proc: subprocess.Popen[str]) -> None:
    seen = read_stderr_until(proc, "attached")
    if "attached" in seen:
        return
    proc.kill()
    _out, err = proc.communicate()
    if "offset guesser" in seen + err or "could not guess" in seen + err:
        kernel_skip(f"offsets could not be guessed here: {seen}{err}")
    raise AssertionError(f"nettracer read did not attach: {seen}{err}")


def _send_and_collect(t: Topo, n: int, payload: int, *args: str) -> tuple[str, str]:
    """Run ``nettracer read`` filtered to the receiver namespace, send ``n`` datagrams
    of ``payload`` bytes to a closed port, wait until the receiver counted them as
    NoPorts, stop the command with SIGINT and return its output."""
    before = _no_ports(t)
    proc = _cli(*args, "--netns", str(t.inode), "--duration", "300")
    try:
        _wait_attached(proc)
        send = (
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for i in range({n}): s.sendto(b'x' * {payload}, ('10.233.7.2', 9))"
        )
        r = _nsexec(t.sender, sys.executable, "-c", send)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 60
        while _no_ports(t) < before + n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _no_ports(t) == before + n
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    return out, err


@pytest.mark.kernel
@pytest.mark.parametrize("offsets", ["btf", "guess"])
def test_read_count_json(topo: Topo, offsets: str) -> None:
    if offsets == "btf" and not HAS_BTF:
        return check_no_btf_refused("read", "kfree_skb", "skb->len")
    n, payload = 7, 33
    exprs = ("skb->dev->name", "skb->len", "skb->sk->__sk_common.skc_dport")
    out, _err = _send_and_collect(
        topo, n, payload, "kfree_skb", *exprs, "--count", "--json", "--interval", "0.5",
        "--offsets", offsets,
    )  # fmt: skip
    reports = [json.loads(line) for line in out.splitlines()]
    assert reports and all(r["lost"] == 0 for r in reports)
    rows = [row for r in reports for row in r["counts"]]
    # everything dropped in the receiver namespace is ours
    assert {row["values"]["skb->dev->name"] for row in rows} == {topo.rx}
    assert sum(row["count"] for row in rows) == n
    for row in rows:
        assert row["values"]["skb->len"] == 8 + payload  # UDP header + payload
        assert row["values"]["skb->sk->__sk_common.skc_dport"] is None  # no socket: null


@pytest.mark.kernel
def test_read_events_json(topo: Topo) -> None:
    n, payload = 5, 10
    out, _err = _send_and_collect(
        topo, n, payload, "skb:kfree_skb", "skb->dev->name", "skb->sk", "skb->len",
        "skb->dev->nd_net.net->ns.inum", "skb->protocol", "skb->dev->ifindex", "--json",
    )  # fmt: skip
    link = subprocess.run(
        ["ip", "-j", "-n", topo.receiver, "link", "show", "dev", topo.rx],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    ifindex = json.loads(link.stdout)[0]["ifindex"]
    lines = [json.loads(line) for line in out.splitlines()]
    events = [e["values"] for e in lines if "values" in e]
    assert len(events) == n
    for e in events:
        # len and protocol: one read; dev followed once for name, ifindex and nd_net
        assert e["skb->protocol"] == 0x0800  # ETH_P_IP
        assert e["skb->dev->ifindex"] == ifindex
        assert e["skb->dev->name"] == topo.rx
        assert e["skb->sk"] == "0x0"  # the pointer itself, not followed
        assert e["skb->len"] == 8 + payload
        assert e["skb->dev->nd_net.net->ns.inum"] == topo.inode
    assert lines[-1]["events"] == n and lines[-1]["lost"] == 0


@pytest.mark.kernel
def test_read_count_text(topo: Topo) -> None:
    n = 3
    out, _err = _send_and_collect(topo, n, 1, "kfree_skb", "skb->dev->name", "--count")
    rows = re.findall(r"^\s+(\d+)\s+skb->dev->name=(\S+)$", out, re.M)
    assert rows == [(str(n), topo.rx)]


@pytest.mark.parametrize(
    ("args", "wanted"),
    [
        (["kfree_skb", "skb->dve"], "did you mean dev?"),
        (["kfree_skb", "skb->len", "skb."], "expected"),
        (["kfree_skb", "skb->len->x"], "not a pointer"),
        (["no_such_tracepoint_x", "skb->len"], "no_such_tracepoint_x"),
        # --filter-netns is read's first spelling of --netns; errors say --netns
        (["kfree_skb", "skb->len", "--filter-netns", "/nonexistent/ns"], "--netns /nonexist"),
        # access names the setting (read.netns); the command says its flag
        (
            ["sys_enter", "id", "--netns", "/proc/self/ns/net"],
            "find the network namespace of; drop --netns",
        ),
    ],
)
def test_read_user_errors(args: list[str], wanted: str) -> None:
    if not os.path.exists(VMLINUX):
        kernel_skip("kernel has no BTF")
    proc = _cli(*args, "--duration", "1")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("nettracer: ") and wanted in err, err
    assert out == ""


def test_resolve_exprs_needs_a_source() -> None:
    with pytest.raises(ValueError):
        resolve_exprs(["skb->len"], "kfree_skb")
