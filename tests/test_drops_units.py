"""Unit tests of the drop monitor's pure parts: header decoding, grouping, output, the
program builder's read planning and name comparison (no root needed), plus kernel
tests that every program variant passes the verifier and that the in-kernel
``--device`` comparison survives a rename."""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ANY_OFFSETS, collect_until, kernel_skip, settings
from golden import check_golden

from nettracer.access.plan import plan_fields
from nettracer.bpf.memory import KernelReads
from nettracer.errors import UsageError
from nettracer.kernel import features
from nettracer.output import drops as out
from nettracer.output.table import Column, render
from nettracer.tracers.drops import monitor as drops
from nettracer.tracers.drops.program import (
    MAX_SPAN,
    DropLayout,
    DropSpec,
    Filters,
    KfreeSkbArgs,
    build,
)
from nettracer.tracers.drops.records import DropEvent, DropKey
from nettracer.tracers.packet import (
    Packet,
    decode,
    ethertype_from_skb,
    ethertype_name,
    parse_ethertype,
)

# -- packet decoding ---------------------------------------------------------------------


def ipv4(
    proto: int, payload: bytes, src: str = "10.0.0.1", dst: str = "10.0.0.2", opts: bytes = b""
) -> bytes:
    ihl = (20 + len(opts)) // 4
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(opts) + len(payload), 1, 0, 64, proto, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    return hdr + opts + payload


def ipv6(nxt: int, payload: bytes, src: str = "fd00::1", dst: str = "fd00::2") -> bytes:
    return (
        struct.pack("!IHBB", 6 << 28, len(payload), nxt, 64)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + payload
    )


def test_decode_ipv4_udp_with_options() -> None:
    p = decode(0x0800, ipv4(17, struct.pack("!HHHH", 5000, 53, 8, 0), opts=b"\x01" * 8))
    assert p == Packet("IPv4", "10.0.0.1", "10.0.0.2", "UDP", 5000, 53)
    assert p.describe() == "UDP 10.0.0.1:5000 -> 10.0.0.2:53"


def test_decode_ipv4_icmp_and_fragment() -> None:
    p = decode(0x0800, ipv4(1, bytes([8, 0, 0, 0])))
    assert (p.proto, p.icmp_type, p.icmp_code, p.sport) == ("ICMP", 8, 0, None)
    frag = bytearray(ipv4(6, struct.pack("!HH", 1, 2)))
    frag[6:8] = struct.pack("!H", 100)  # fragment offset 100: no L4 header here
    p = decode(0x0800, bytes(frag))
    assert (p.proto, p.sport, p.dport) == ("TCP", None, None)


def test_decode_ipv6_tcp_after_extension_headers() -> None:
    tcp = struct.pack("!HH", 40000, 443) + b"\0" * 16
    dstopts = bytes([6, 0]) + b"\0" * 6  # next header TCP, 8 bytes
    hop = bytes([60, 0]) + b"\0" * 6  # next header dstopts
    p = decode(0x86DD, ipv6(0, hop + dstopts + tcp))
    assert p == Packet("IPv6", "fd00::1", "fd00::2", "TCP", 40000, 443)
    assert p.endpoints() == "[fd00::1]:40000 -> [fd00::2]:443"


def test_decode_icmpv6_arp_and_garbage() -> None:
    p = decode(0x86DD, ipv6(58, bytes([135, 0, 0, 0])))
    assert (p.proto, p.icmp_type) == ("ICMPv6", 135)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, b"\1" * 6,
                      bytes([10, 0, 0, 1]), b"\0" * 6, bytes([10, 0, 0, 2]))  # fmt: skip
    p = decode(0x0806, arp)
    assert (p.family, p.src, p.dst, p.proto) == ("ARP", "10.0.0.1", "10.0.0.2", "request")
    for ethertype, data in (
        (0x0800, b"\x45\x00"),
        (0x86DD, b"\x60" * 10),
        (0x0806, b""),
        (0x88CC, b"x"),
    ):
        decode(ethertype, data)  # never raises
    assert decode(0x0800, b"\x60" + b"\0" * 40).src is None  # not IPv4 after all
    assert Packet().describe() == "-"


def test_ethertypes() -> None:
    assert ethertype_name(0x0800) == "IPv4" and ethertype_name(0x86DD) == "IPv6"
    assert ethertype_name(0) is None and ethertype_name(0x1234) == "0x1234"
    assert parse_ethertype("ipv6") == 0x86DD and parse_ethertype("ARP") == 0x0806
    assert parse_ethertype("0x88cc") == 0x88CC
    with pytest.raises(ValueError, match="unknown protocol"):
        parse_ethertype("ipv5")
    # skb->protocol is __be16: 0x0800 lies in memory as 08 00, read little-endian as 0x0008
    assert ethertype_from_skb(int.from_bytes(b"\x08\x00", "little")) == 0x0800


# -- reasons, filters, --by ------------------------------------------------------------------

NAMES = {2: "NOT_SPECIFIED", 3: "NO_SOCKET", 6: "SOCKET_RCVBUFF"}  # a sample, as BTF gives them


def test_parse_reason() -> None:
    assert drops.parse_reason("NO_SOCKET", NAMES) == 3
    assert drops.parse_reason("no_socket", NAMES) == 3
    assert drops.parse_reason("SKB_DROP_REASON_SOCKET_RCVBUFF", NAMES) == 6
    assert drops.parse_reason("6", NAMES) == 6
    with pytest.raises(UsageError, match="did you mean NO_SOCKET"):
        drops.parse_reason("SOCKET", NAMES)


def test_make_filters_and_by() -> None:
    f = drops.make_filters("eth0", 4026531840, "no_socket", "ipv4", NAMES)
    assert f == Filters(device=b"eth0", netns=4026531840, reason=3, protocol=0x0800)
    with pytest.raises(UsageError, match=r"^drops\.device 'aaaa") as exc:
        drops.make_filters("a" * 16, None, None, None, NAMES)
    assert exc.value.settings == ("drops.device",)
    with pytest.raises(UsageError, match=r"^drops\.protocol: "):
        drops.make_filters(None, None, None, "nope", NAMES)
    with pytest.raises(drops.NotSupported):
        drops.make_filters(None, None, "NO_SOCKET", None, None)
    assert drops.parse_by("Location, device") == ("location", "device")
    with pytest.raises(UsageError, match=r"^drops\.group_by location,colour: expected") as by:
        drops.parse_by("location,colour")
    # below the command line errors name the setting; each command says its flag
    from nettracer.cli import agent
    from nettracer.cli import drops as drops_cli
    from nettracer.cli.main import as_flags

    assert as_flags(by.value, drops_cli.FLAGS).startswith("--by location,colour: expected")
    assert as_flags(by.value, agent.FLAGS).startswith("drops.group_by location,colour")


# -- grouping and output ------------------------------------------------------------------------


class FakeSymbol:
    def __init__(self, name: str, offset: int, module: str) -> None:
        self.name, self.offset, self.module = name, offset, module

    def format(self) -> str:
        return f"{self.name}+{self.offset:#x}"


class FakeKallsyms:
    """Two functions at 0x1000 (core) and 0x2000 (module "nf")."""

    def lookup(self, addr: int) -> FakeSymbol | None:
        if 0x1000 <= addr < 0x2000:
            return FakeSymbol("udp_rcv", addr - 0x1000, "kernel")
        if 0x2000 <= addr < 0x3000:
            return FakeSymbol("nft_thing", addr - 0x2000, "nf_tables")
        return None


def names() -> drops.Names:
    devs = {(1, 2): "eth0", (9, 2): "eth0", (1, 3): "eth1"}
    return drops.Names(NAMES, lambda ns, ifx: devs.get((ns, ifx)), FakeKallsyms())


def counts() -> list[drops.DropCount]:
    return [
        drops.DropCount(0x1010, 3, 2, 1, 0x0800, 0xFFFF, 5),
        drops.DropCount(0x1010, 3, 2, 9, 0x0800, 0xFFFF, 2),  # same device name, other netns
        drops.DropCount(0x1010, 3, 3, 1, 0x86DD, 0xFFFF, 1),
        drops.DropCount(0x2004, 2, 0, 0, 0, 0xFFFF, 7),  # no device, no protocol
        drops.DropCount(0x9999, 6, 3, 1, 0x0800, 0xFFFF, 1),  # no symbol
    ]


def test_group_by_default_keeps_devices_of_each_netns_apart() -> None:
    groups = drops.group_counts(counts(), drops.DEFAULT_BY, names())
    assert [g.count for g in groups] == [7, 5, 2, 1, 1]
    top = groups[0].to_json()
    assert top == {
        "count": 7, "location": "nft_thing+0x4", "symbol": "nft_thing", "offset": 4,
        "module": "nf_tables", "device": None, "ifindex": None, "netns": None,
        "reason": "NOT_SPECIFIED", "protocol": None, "container": None, "cgroup": None,
    }  # fmt: skip
    assert (groups[1].device, groups[1].netns, groups[1].ifindex) == ("eth0", 1, 2)
    assert (groups[2].device, groups[2].netns) == ("eth0", 9)
    nosym = next(g for g in groups if g.location and g.location.symbol is None)
    assert nosym.location.text == "0x9999" and nosym.to_json()["offset"] is None


def test_group_by_module_and_reason() -> None:
    groups = drops.group_counts(counts(), ("module", "reason"), names())
    got = {(g.module, g.reason): g.count for g in groups}
    assert got == {
        ("kernel", "NO_SOCKET"): 8,
        ("nf_tables", "NOT_SPECIFIED"): 7,
        (None, "SOCKET_RCVBUFF"): 1,
    }
    assert all(g.location is None and g.device is None for g in groups)
    groups = drops.group_counts(counts(), ("netns",), names())
    assert {g.netns: g.count for g in groups} == {1: 7, 9: 2, None: 7}


def fake_proc(root: Path, pids: dict[int, str]) -> dict[int, int]:
    """A /proc tree of ``pid -> cgroup path`` whose ``ns/net`` are plain files: their
    inodes stand for the namespaces (one per pid); pid -> that inode."""
    inodes = {}
    for pid, path in pids.items():
        (root / str(pid) / "ns").mkdir(parents=True)
        (root / str(pid) / "cgroup").write_text(f"0::{path}\n")
        (root / str(pid) / "ns" / "net").write_text("")
        inodes[pid] = (root / str(pid) / "ns" / "net").stat().st_ino
    return inodes


def test_group_by_container_and_filter(tmp_path: Path) -> None:
    from nettracer.kernel.cgroup import Container, ContainerResolver

    a, b = "a" * 64, "b" * 64
    ino = fake_proc(
        tmp_path,
        {10: f"/system.slice/docker-{a}.scope", 20: f"/machine.slice/libpod-{b}.scope", 30: "/"},
    )
    n = names()
    n.__dict__["containers"] = ContainerResolver(proc=str(tmp_path))
    got = [
        drops.DropCount(0x1010, 3, 2, ino[10], 0x0800, 0xFFFF, 5),
        drops.DropCount(0x2004, 3, 1, ino[10], 0x0800, 0xFFFF, 1),
        drops.DropCount(0x1010, 3, 2, ino[20], 0x0800, 0xFFFF, 2),
        drops.DropCount(0x1010, 3, 2, ino[30], 0x0800, 0xFFFF, 4),
    ]
    groups = drops.group_counts(got, ("container",), n)
    assert [(g.cgroup.container if g.cgroup else None, g.count) for g in groups] == [
        (Container(a, "docker"), 6),
        (None, 4),
        (Container(b, "podman"), 2),
    ]
    assert groups[0].to_json()["container"] == {"id": a, "runtime": "docker", "pod_uid": None}
    assert groups[0].to_json()["cgroup"] == f"/system.slice/docker-{a}.scope"
    assert groups[1].to_json()["cgroup"] == "/" and groups[1].to_json()["container"] is None
    text = out.interval_text(out.DropInterval(time.time(), 1.0, groups, 12, 0), ("container",))
    assert [line.split() for line in text.splitlines()[1:4]] == [
        ["COUNT", "CONTAINER"], ["6", a[:12]], ["4", "-"],
    ]  # fmt: skip
    only = drops.group_counts(got, ("reason",), n, container=b[:12])
    assert [(g.reason, g.count, g.cgroup) for g in only] == [("NO_SOCKET", 2, None)]
    assert drops.group_counts(got, ("reason",), n, container="c") == []


def test_stack_frames_skip_tracing_machinery() -> None:
    class K(FakeKallsyms):
        def lookup(self, addr: int) -> FakeSymbol | None:
            table = {1: ("bpf_prog_abc_nt_drops", "bpf"), 2: ("bpf_trace_run4", "kernel"),
                     3: ("__traceiter_kfree_skb", "kernel"), 4: ("sk_skb_reason_drop", "kernel"),
                     5: ("nft_thing", "nf_tables")}  # fmt: skip
            name, mod = table[addr]
            return FakeSymbol(name, 0x10, mod)

    n = drops.Names(NAMES, lambda a, b: None, K())
    assert n.frames([1, 2, 3, 4, 5]) == ["sk_skb_reason_drop+0x10", "nft_thing+0x10 [nf_tables]"]


def test_interval_text_and_json() -> None:
    groups = drops.group_counts(counts(), drops.DEFAULT_BY, names())
    iv = out.DropInterval(time.time(), 5.0, groups, 16, 3)
    text = out.interval_text(iv, drops.DEFAULT_BY).splitlines()
    assert "drops in the last 5.0 s" in text[0]
    assert text[1].split() == ["COUNT", "LOCATION", "DEVICE", "MODULE", "REASON", "PROTOCOL"]
    assert text[2].split() == ["7", "nft_thing+0x4", "-", "nf_tables", "NOT_SPECIFIED", "-"]
    assert text[3].split() == ["5", "udp_rcv+0x10", "eth0", "kernel", "NO_SOCKET", "IPv4"]
    assert text[-1].strip() == "total 16 drops in 5 groups, 3 lost"
    obj = json.loads(json.dumps(out.interval_json(iv)))
    assert set(obj) == {"time", "interval_s", "drops", "total", "lost"}
    assert obj["total"] == 16 and obj["lost"] == 3 and obj["interval_s"] == 5.0
    assert len(obj["drops"]) == 5
    empty = out.interval_text(out.DropInterval(time.time(), 1.0, [], 0, 0), drops.DEFAULT_BY)
    assert empty.splitlines()[-1].strip() == "total 0 drops in 0 groups, 0 lost"


def test_without_reasons_no_column_no_key_one_notice() -> None:
    """Before 5.17 (kfree_skb without a reason): no REASON column, no ``reason`` key in
    rows and events, ``"reasons": false`` once per object, the notice names the kernel."""
    by = tuple(k for k in drops.DEFAULT_BY if k != "reason")
    groups = drops.group_counts(counts(), by, drops.Names(None, lambda a, b: None, FakeKallsyms()))
    iv = out.DropInterval(time.time(), 5.0, groups, 16, 0, reasons=False)
    text = out.interval_text(iv, by).splitlines()
    assert text[1].split() == ["COUNT", "LOCATION", "DEVICE", "MODULE", "PROTOCOL"]
    obj = json.loads(json.dumps(out.interval_json(iv)))
    assert obj["reasons"] is False and all("reason" not in d for d in obj["drops"])
    assert "reasons" not in out.interval_json(out.DropInterval(time.time(), 1.0, [], 0, 0))
    ev = DropEvent()
    ev.location, ev.ifindex, ev.protocol = 0x1010, 2, int.from_bytes(b"\x08\x00", "little")
    ev.devname = b"eth0"
    v = out.view_event(ev, drops.Names(None, lambda a, b: None, FakeKallsyms()), 0)
    assert "reason" not in out.event_json(v) and "reason=" not in out.drop_comment(v)
    assert ") IPv4 " in out.event_text(v)
    assert drops.no_reason_notice("5.10.0-32-amd64") == (
        "this kernel (5.10) does not report drop reasons (kfree_skb has no reason before 5.17)"
    )


def test_table_render() -> None:
    lines = render(
        [Column("N", right=True), Column("NAME"), Column("X")], [[1, "a", None], [100, "bbb", "z"]]
    )
    assert lines == ["  N  NAME  X", "  1  a     -", "100  bbb   z"]


def test_event_view() -> None:
    ev = DropEvent()
    ev.ts_ns, ev.location, ev.pid_tgid, ev.reason, ev.ifindex, ev.netns = (
        10**9,
        0x1010,
        42 << 32 | 43,
        3,
        2,
        1,
    )
    ev.cpu, ev.len, ev.protocol = 1, 29, int.from_bytes(b"\x08\x00", "little")
    ev.comm, ev.devname = b"python3", b"eth0"
    hdr = ipv4(17, struct.pack("!HHHH", 40001, 9, 9, 0))
    ctypes.memmove(ctypes.addressof(ev) + DropEvent.header.offset, hdr, len(hdr))
    ev.header_len = len(hdr)
    v = out.view_event(ev, names(), 0)
    assert (v.pid, v.comm, v.device, v.location, v.reason, v.protocol) == (
        42, "python3", "eth0", "udp_rcv+0x10", "NO_SOCKET", "IPv4")  # fmt: skip
    assert "UDP 10.0.0.1:40001 -> 10.0.0.2:9 len 29" in out.event_text(v)
    assert out.event_json(v)["packet"]["dport"] == 9


# -- program builder ------------------------------------------------------------------------------

LAYOUT = DropLayout(
    sk_buff_dev=16, sk_buff_protocol=176, net_device_ifindex=224, net_device_nd_net=264,
    net_device_name=280, net_ns_inum=176, sk_buff_sk=24, sock_common_skc_net=48,
    sk_buff_len=112, sk_buff_head=192, sk_buff_network_header=180, sk_buff_transport_header=178,
)  # fmt: skip


def test_records_have_the_sizes_the_program_assumes() -> None:
    assert ctypes.sizeof(DropKey) == 24
    assert DropEvent.header.offset % 8 == 0


def test_read_planning_merges_close_fields_and_splits_far_ones() -> None:
    r = plan_fields({"dev": (16, 8), "protocol": (176, 2), "sk": (24, 8)}, MAX_SPAN)
    assert r.reads == ((16, 162, 0),) and r.size == 168
    assert r.where["protocol"] - r.where["dev"] == 160
    far = plan_fields({"a": (0, 8), "b": (4000, 4)}, MAX_SPAN)
    assert far.reads == ((0, 8, 0), (4000, 4, 8))


A4 = KfreeSkbArgs(("skb", "location", "reason", "rx_sk"))
VARIANTS = {
    "none": DropSpec(LAYOUT, A4),
    "no_memo": DropSpec(LAYOUT, A4, memo=False),
    "device": DropSpec(LAYOUT, A4, Filters(device=b"eth0")),
    "device_long": DropSpec(LAYOUT, A4, Filters(device=b"averylongname12")),
    "netns": DropSpec(LAYOUT, A4, Filters(netns=4026531840)),
    "reason": DropSpec(LAYOUT, A4, Filters(reason=3)),
    "protocol": DropSpec(LAYOUT, A4, Filters(protocol=0x86DD)),
    "stack": DropSpec(LAYOUT, A4, stack=True),
    "events": DropSpec(LAYOUT, A4, events=True),
    "no_reason_arg": DropSpec(LAYOUT, KfreeSkbArgs(("skb", "location"))),
    "legacy_reads": DropSpec(LAYOUT, A4, events=True, reads=KernelReads(legacy=True)),
    # tp_btf: plain loads (the monitor turns the memo off there)
    "typed": DropSpec(LAYOUT, A4, memo=False, reads=KernelReads(direct=True)),
    "typed_events": DropSpec(LAYOUT, A4, events=True, memo=False, reads=KernelReads(direct=True)),
    "typed_device": DropSpec(LAYOUT, A4, Filters(device=b"eth0"), reads=KernelReads(direct=True)),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_drop_program_listing(name: str) -> None:
    check_golden(f"drops_{name}", build(VARIANTS[name]).listing())


def test_hot_path_has_three_reads_and_one_lookup() -> None:
    """Without the device memo, up to the first exit of the counting path: the reads of
    skb, dev and the netns inode (plus sk's namespace when there is no netns), one hash
    lookup."""
    hot = build(VARIANTS["no_memo"]).listing().split("goto out\n")[0]
    assert hot.count("call probe_read_kernel#113") == 5  # skb, dev, inum; sk->net, inum
    assert hot.count("call map_lookup_elem#1") == 1
    assert "call" not in hot.split("havens:")[1].replace("call map_lookup_elem#1", "")


def test_typed_hot_path_calls_only_the_hash_lookup() -> None:
    """On ``tp_btf`` the reads of skb, device, namespace (and sk's namespace) are plain
    loads: up to the first exit of the counting path the only call is the lookup."""
    hot = build(VARIANTS["typed"]).listing().split("goto out\n")[0]
    assert [line.split("call ")[1] for line in hot.splitlines() if "call " in line] == [
        "map_lookup_elem#1"
    ]
    assert "devmemo" not in hot


def test_device_memo_hit_reads_only_the_skb() -> None:
    """With the memo (the default), a drop on the device this CPU saw last in this jiffy
    costs one read (skb), the jiffy (inlined by the verifier) and two lookups (the memo's
    per-CPU array, inlined since 6.10; the counts); the device is read on a miss only."""
    listing = build(VARIANTS["none"]).listing()
    hit = listing.split("devread:\n")[0]
    assert hit.count("call probe_read_kernel#113") == 1
    assert hit.count("call jiffies64#118") == 1 and "map[devmemo]" in hit
    counting = listing.split("havens:\n")[1].split("goto out\n")[0]
    assert counting.count("call ") == 1 and "call map_lookup_elem#1" in counting
    miss = listing.split("devread:\n")[1].split("nodev:\n")[0]
    assert miss.count("call probe_read_kernel#113") == 2 and "map[devmemo]" in miss
    assert "devmemo" not in build(VARIANTS["device"]).listing()


def test_reason_filter_needs_the_reason_argument() -> None:
    with pytest.raises(ValueError, match="no reason"):
        build(DropSpec(LAYOUT, KfreeSkbArgs(("skb", "location")), Filters(reason=3)))


# -- kernel -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel_spec_parts() -> tuple[DropLayout, KfreeSkbArgs, dict[int, str] | None]:
    if os.geteuid() != 0:
        kernel_skip("needs root to load BPF programs")
    from nettracer.kernel.btf import Btf

    btf = Btf.vmlinux()
    args = drops.kfree_skb_args(btf)
    mon = drops.DropMonitor.from_config(settings(offsets__source=ANY_OFFSETS), events=True)
    return mon.spec.layout, args, drops.reason_names(btf) if args.has_reason else None


@pytest.mark.kernel
def test_reason_names_agree_with_the_tracepoint_print_fmt(kernel_spec_parts) -> None:  # type: ignore[no-untyped-def]
    """BTF's enum and tracefs' __print_symbolic table give the same names."""
    _, args, from_btf = kernel_spec_parts
    if not args.has_reason:
        kernel_skip("kfree_skb has no reason on this kernel (before 5.17)")
    from_tracefs = drops.reason_names(None)
    assert from_btf is not None
    assert {v: n for v, n in from_btf.items() if v in from_tracefs} == from_tracefs
    assert drops.kfree_skb_args(None).names == args.names[:3]


@pytest.mark.kernel
@pytest.mark.parametrize("events", [False, True])
@pytest.mark.parametrize("stack", [False, True])
@pytest.mark.parametrize("filtered", [False, True])
@pytest.mark.parametrize("legacy", [False, True], ids=["probe_read_kernel", "probe_read"])
def test_every_variant_passes_the_verifier(
    kernel_spec_parts, events: bool, stack: bool, filtered: bool, legacy: bool
) -> None:  # type: ignore[no-untyped-def]
    """Each filter, stack and events, with the 5.5 read helpers and the older ones."""
    _layout, args, reasons = kernel_spec_parts
    filters: dict[str, object] = {}
    if filtered:
        filters = {"device": "eth0", "netns": 4026531840, "protocol": "IPv4"}
        if reasons:
            filters["reason"] = "NO_SOCKET"
    mon = drops.DropMonitor.from_config(
        settings(offsets__source=ANY_OFFSETS),
        events=events,
        stack=stack,
        reads=KernelReads(legacy=legacy),
        **filters,  # type: ignore[arg-type]
    )
    want = Filters()
    if filtered:
        reason = drops.parse_reason("NO_SOCKET", reasons) if reasons else None
        want = Filters(device=b"eth0", netns=4026531840, reason=reason, protocol=0x0800)
    assert (mon.spec.filters, mon.spec.args) == (want, args)
    kf = features.current()
    typed = kf.use("raw_tracepoint") and kf.use("tp_btf")
    with mon:
        assert mon.link is not None and mon.prog is not None
        loaded = mon.kernel_spec
        assert loaded is not None and loaded.args.typed == typed
        assert not [n for n in mon.notices if "refused" in n]  # no fallback to helper reads
        assert mon.prog.prog_type == loaded.args.prog_type
        assert loaded.reads is not None and loaded.reads.direct == typed


@pytest.mark.kernel
def test_device_filter_matches_after_a_rename() -> None:
    """``strscpy`` leaves the old name's tail after the NUL: the filter ignores it."""
    if os.geteuid() != 0:
        kernel_skip("needs root to build network namespaces")
    pid = os.getpid()
    a, b = f"ntra{pid}", f"ntrb{pid}"
    long_name, short = f"longname{pid}"[:15], f"rb{pid}"
    try:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", a, "link", "add", "va", "type", "veth", "peer", "name",
                        long_name, "netns", b], check=True)  # fmt: skip
        subprocess.run(["ip", "-n", b, "link", "set", long_name, "name", short], check=True)
        for ns, dev, addr in ((a, "va", "10.202.0.1/24"), (b, short, "10.202.0.2/24")):
            subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        inode = os.stat(f"/run/netns/{b}").st_ino
        cfg = settings(offsets__source=ANY_OFFSETS)
        with drops.DropMonitor.from_config(cfg, device=short, netns=inode) as mon:
            assert mon.spec.filters == Filters(device=short.encode(), netns=inode)
            names = mon.names()

            def groups(sample: drops.Sample) -> list[drops.DropGroup]:
                return drops.group_counts(sample.counts, ("location", "device"), names)

            def udp(sample: drops.Sample) -> list[int]:
                return [
                    g.count
                    for g in groups(sample)
                    if g.location and g.location.symbol == "__udp4_lib_rcv"
                ]

            client = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            client += "for _ in range(6): s.sendto(b'x', ('10.202.0.2', 9))\n"
            # the first datagram may wait for ARP; all of them reach b in the end
            subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", client], check=True)
            sample = collect_until(mon, lambda s: sum(udp(s)) >= 6)
        assert {g.device for g in groups(sample)} == {short}, groups(sample)
        assert udp(sample) == [6], groups(sample)
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# -- symbols ------------------------------------------------------------------------------

SYNTHETIC_KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81000000 T startup_64
ffffffff81000100 t alias_b
ffffffff81000100 T alias_a
ffffffff81000200 T udp_rcv
ffffffff81000300 T _etext
ffffffff82000000 d some_data
ffffffff82000100 b some_bss
ffffffff82001000 B _end
ffffffffc0002000 t nft_do_chain\t[nf_tables]
ffffffffc0002100 t nft_other\t[nf_tables]
ffffffffc0001000 t mod_first\t[mymod]
ffffffffc0001080 t mod_second\t[mymod]
ffffffffa0000000 t bpf_prog_1234_nt_drops\t[bpf]
"""


def test_symbol_cache_matches_kallsyms_on_an_unsorted_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nettracer.kernel.kallsyms import Kallsyms
    from nettracer.tracers.symbols import SymbolCache

    path = tmp_path / "kallsyms"
    path.write_text(SYNTHETIC_KALLSYMS)
    full = Kallsyms(str(path))
    queries = [0, 0xFFFFFFFF81000000, 0xFFFFFFFF81000150, 0xFFFFFFFF81000210, 0xFFFFFFFF810002FF,
               0xFFFFFFFF81000300, 0xFFFFFFFF82000050, 0xFFFFFFFFC0001010, 0xFFFFFFFFC0001090,
               0xFFFFFFFFC0002004, 0xFFFFFFFFC0002110, 0xFFFFFFFFA0000010, 2**64 - 1]  # fmt: skip
    cache = SymbolCache(str(path))
    cache.prefetch(queries)
    assert cache.passes == 1
    for q in queries:
        a, b = full.lookup(q), cache.lookup(q)
        assert (a and (a.format_ps(), a.module)) == (b and (b.format_ps(), b.module)), hex(q)
    assert cache.format(0xFFFFFFFF81000150) == "alias_b+0x50"
    assert cache.lookup(0xFFFFFFFFC0002004).module == "nf_tables"
    cache.lookup(0xFFFFFFFF81000150)
    assert cache.passes == 1  # cached


@pytest.mark.kernel
def test_symbol_cache_matches_kallsyms_on_this_kernel(tmp_path: Path) -> None:
    import random

    from nettracer.kernel.kallsyms import Kallsyms
    from nettracer.tracers.symbols import SymbolCache

    if os.geteuid() != 0:
        kernel_skip("needs root to read kallsyms addresses")
    # one snapshot for both: BPF programs (their [bpf] symbols) come and go meanwhile
    snapshot = tmp_path / "kallsyms"
    with open("/proc/kallsyms", "rb") as f:
        snapshot.write_bytes(f.read())
    full = Kallsyms(str(snapshot)).load()
    addrs = list(full._addrs)
    rng = random.Random(7)
    queries = {a + d for a in rng.sample(addrs, 1500) for d in (-1, 0, 1, 0x41)}
    queries |= set(addrs[:3]) | set(addrs[-3:])
    cache = SymbolCache(str(snapshot))
    cache.prefetch(queries)
    for q in queries:
        a, b = full.lookup(q), cache.lookup(q)
        assert (a and (a.format_ps(), a.module)) == (b and (b.format_ps(), b.module)), hex(q)
