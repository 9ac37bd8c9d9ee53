"""Connection tracer parts that need no kernel: the generated programs (golden
listings), record decoding, TCP byte corrections, the connection table's accounting,
and the JSON writers."""

from __future__ import annotations

import ctypes
import json
import socket

import pytest
from golden import check_golden
from hypothesis import given
from hypothesis import strategies as st

from nettracer.bpf.insn import JMP32, Program
from nettracer.layout.catalogue import CATALOGUE
from nettracer.layout.offsets import Field, Offsets
from nettracer.output import conns as out
from nettracer.tracers.conns import peers
from nettracer.tracers.conns import program as cp
from nettracer.tracers.conns.model import Conn, decode, tcp_data_bytes
from nettracer.tracers.conns.records import (
    RECORD,
    STREAM_BITS,
    ConnValue,
    EndReason,
    Flag,
    Opened,
    TcpState,
    history_states,
)
from nettracer.tracers.conns.table import ConnTable, IdCounts

S = TcpState


def fake_offsets(shift: int = 0) -> Offsets:
    """Every catalogue field at a made-up offset (sizes from the catalogue)."""
    fields = {}
    pos = 0
    for spec in CATALOGUE:
        fields[spec.key] = Field(pos + shift, spec.size)
        pos += (spec.size + 7) & ~7
    return Offsets(source="test", fields=fields)


def test_record_layout_is_shared() -> None:
    assert RECORD.size == ctypes.sizeof(ConnValue) == 176
    v = ConnValue(id=7, sk=0x1234, bytes_sent=99, sport=4242, family=2, proto=6)
    rec = RECORD.unpack(bytes(v))
    c = decode(rec)
    assert (c.id, c.sk, c.bytes_sent, c.sport, c.proto) == (7, 0x1234, 99, 4242, "tcp")


#: every program the tracer builds, by the name of its golden file
PROGRAMS = {
    "state": lambda o, spec: cp.build_state(o, spec),
    "send": lambda o, spec: cp.build_length(o, spec, True),
    "recv": lambda o, spec: cp.build_length(o, spec, False),
    "owner": lambda o, spec: cp.build_owner(o, spec),
    "destroy": lambda o, spec: cp.build_destroy(o, spec),
    "refresh": lambda o, spec: cp.build_refresh(o, spec),
}
#: the ConnSpec variants whose programs differ (inode above 2**31, as real ones are)
SPECS = {
    "default": cp.ConnSpec(),
    "netns": cp.ConnSpec(netns=4026532178),
    "no_ipv6": cp.ConnSpec(collect_ipv6=False),
    "no_udp": cp.ConnSpec(collect_udp=False),
}
MAPS = {
    cp.MAP_CONNS: 3,
    cp.MAP_EVENTS: 4,
    cp.MAP_LOST: 5,
    cp.MAP_IDS: 6,
    cp.MAP_ENDED: 7,
    peers.MAP_PEERS: 8,
    peers.MAP_SLOT: 9,
    cp.MAP_REFUSED: 10,
}

#: offsets shaped like Linux 6.18's (written out here, so no kernel is asked): the
#: ``tcp_sock`` stats lie 664 bytes apart, wider than one read, unlike fake_offsets'
SPREAD_OFFSETS = Offsets(
    "test",
    {
        "sock_common.skc_daddr": Field(0, 4),
        "sock_common.skc_rcv_saddr": Field(4, 4),
        "sock_common.skc_dport": Field(12, 2),
        "sock_common.skc_num": Field(14, 2),
        "sock_common.skc_family": Field(16, 2),
        "sock_common.skc_state": Field(18, 1),
        "sock_common.skc_net": Field(48, 8),
        "sock_common.skc_v6_daddr": Field(56, 16),
        "sock_common.skc_v6_rcv_saddr": Field(72, 16),
        "net.ns.inum": Field(176, 4),
        "sock.sk_protocol": Field(532, 2),
        "tcp_sock.segs_out": Field(1536, 4),
        "tcp_sock.mdev_us": Field(1588, 4),
        "tcp_sock.srtt_us": Field(1680, 4),
        "tcp_sock.bytes_received": Field(1752, 8),
        "tcp_sock.segs_in": Field(1760, 4),
        "tcp_sock.bytes_acked": Field(1824, 8),
        "tcp_sock.total_retrans": Field(2200, 4),
    },
)


def _check_listing(name: str, prog: Program) -> None:
    """The listing matches its golden file, and the program assembles to that many slots."""
    assert len(prog.assemble(MAPS)) == 8 * len(prog)
    check_golden(f"conns/{name}", prog.listing())


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("prog", PROGRAMS)
def test_program_listing(prog: str, spec: str) -> None:
    """Each program, per ConnSpec variant, instruction by instruction."""
    _check_listing(f"{prog}-{spec}", PROGRAMS[prog](fake_offsets(), SPECS[spec]))


@pytest.mark.parametrize("prog", PROGRAMS)
def test_program_listing_spread_offsets(prog: str) -> None:
    """The same programs where the fields lie as on a real kernel (one read per
    ``tcp_sock`` field group, the tuple and ``sk_protocol`` in separate reads)."""
    _check_listing(f"{prog}-spread", PROGRAMS[prog](SPREAD_OFFSETS, cp.ConnSpec()))


@pytest.mark.parametrize("prog", ["state", "send", "recv", "destroy"])
def test_program_listing_perf_event_array(prog: str) -> None:
    """Without a ring buffer (before 5.8) closed connections go to the perf event
    array: ``ctx`` kept at FP-32 and reloaded for each ``bpf_perf_event_output``, each
    refusal counted in ``refused``."""
    built = PROGRAMS[prog](fake_offsets(), cp.ConnSpec(channel="perf_event_array"))
    _check_listing(f"{prog}-perf", built)
    listing = built.listing()
    assert "ringbuf" not in listing and "perf_event_output" in listing
    assert f"map[{cp.MAP_REFUSED}]" in listing


@pytest.mark.parametrize(
    ("prog", "spec"), [("refresh", {}), ("owner", {}), ("send", {"collect_udp": False})]
)
def test_programs_that_send_nothing_keep_no_ctx(prog: str, spec: dict[str, bool]) -> None:
    """A program that never sends a record is the same whatever the channel."""
    perf = PROGRAMS[prog](fake_offsets(), cp.ConnSpec(channel="perf_event_array", **spec))
    assert perf.listing() == PROGRAMS[prog](fake_offsets(), cp.ConnSpec(**spec)).listing()


@pytest.mark.parametrize("prog", ["tx", "rx", "ready"])
def test_peer_program_listing(prog: str) -> None:
    """The per-peer programs of unconnected UDP sockets, instruction by instruction."""
    build = {"tx": peers.build_tx, "rx": peers.build_rx, "ready": peers.build_ready}[prog]
    _check_listing(f"peer_{prog}", build(fake_offsets()))


def test_peer_fields() -> None:
    """Peers sorted by address and port, with what the socket's totals hold beyond
    their sum as unattributed (never negative: a datagram received but not yet read
    is counted for its peer before the socket's total)."""
    c = decode(_rec(id=1, family=2, proto=17, bytes_sent=100, bytes_received=5, segs_out=4,
                    segs_in=1))  # fmt: skip
    assert c.peer_fields() == {}
    c.peers = [
        (2, socket.inet_aton("10.0.0.2"), 53, 30, 7, 2, 2),
        (2, socket.inet_aton("10.0.0.1"), 53, 50, 0, 1, 0),
    ]
    got = c.peer_fields()
    assert [(p["addr"], p["bytes_sent"]) for p in got["peers"]] == [
        ("10.0.0.1", 50),
        ("10.0.0.2", 30),
    ]
    assert got["unattributed"] == {
        "bytes_sent": 20, "bytes_received": 0, "datagrams_sent": 1, "datagrams_received": 0,
    }  # fmt: skip
    assert out._cells(c, False, 0)[4] == "* (2 peers)"
    line = json.loads(out.conn_line(c, 0, 0, closed=True))
    assert line == out.conn_json(c, 0, 0, closed=True)
    assert line["peers"] == got["peers"]


@pytest.mark.parametrize("prog", ["state", "send"])
def test_program_listing_stream_ids(prog: str) -> None:
    """Without BPF_FETCH (before 5.12) the programs that create entries take their ids
    from the per-CPU, per-level counters: no fetch-and-add (a plain locked add, which
    older kernels have as BPF_XADD, remains for the lost counter)."""
    built = PROGRAMS[prog](fake_offsets(), cp.ConnSpec(atomic_fetch=False))
    _check_listing(f"{prog}-stream_ids", built)
    assert "fetch" not in built.listing()
    assert "fetch_add" in PROGRAMS[prog](fake_offsets(), cp.ConnSpec()).listing()


def test_program_without_field_says_which() -> None:
    o = fake_offsets()
    del o.fields["tcp_sock.srtt_us"]
    with pytest.raises(Exception, match=r"tcp_sock\.srtt_us"):
        cp.build_destroy(o, cp.ConnSpec())


def test_history_nibbles() -> None:
    h = 0
    for s in (S.SYN_SENT, S.ESTABLISHED, S.FIN_WAIT1, S.FIN_WAIT2, S.CLOSE):
        h = (h << 4) | s
    assert history_states(h) == [2, 1, 4, 5, 7]


@pytest.mark.parametrize(
    ("acked", "received", "opened", "states", "expected"),
    [
        # the side that connected and closed first: SYN + FIN acked, peer FIN received
        (1002, 2001, Opened.ACTIVE, [S.SYN_SENT, S.ESTABLISHED, S.FIN_WAIT1, S.FIN_WAIT2,
                                      S.CLOSE], (1000, 2000)),
        # the accepting side that closed second
        (2001, 1001, Opened.PASSIVE, [S.SYN_RECV, S.ESTABLISHED, S.CLOSE_WAIT, S.LAST_ACK,
                                       S.CLOSE], (2000, 1000)),
        # still open
        (1001, 2000, Opened.ACTIVE, [S.SYN_SENT, S.ESTABLISHED], (1000, 2000)),
        (2000, 1000, Opened.PASSIVE, [S.SYN_RECV, S.ESTABLISHED], (2000, 1000)),
    ],
)  # fmt: skip
def test_tcp_data_bytes(
    acked: int, received: int, opened: int, states: list[int], expected: tuple[int, int]
) -> None:
    """The corrections match what TCP_INFO shows on loopback (tcpi_bytes_acked counts
    the SYN of the connecting side and each acked FIN, tcpi_bytes_received the FIN)."""
    assert tcp_data_bytes(acked, received, opened, states) == expected


def _rec(**kw: object) -> tuple:
    v = ConnValue()
    for k, val in kw.items():
        if k in ("saddr4", "daddr4", "saddr6", "daddr6"):
            getattr(v, k)[:] = list(val)  # type: ignore[call-overload]
        else:
            setattr(v, k, val)
    return RECORD.unpack(bytes(v))


def test_decode_ipv4_tcp_outgoing() -> None:
    rec = _rec(
        id=1,
        family=socket.AF_INET,
        proto=6,
        saddr4=socket.inet_aton("10.0.0.2"),
        daddr4=socket.inet_aton("192.0.2.1"),
        sport=40000,
        dport=socket.htons(443),
        opened=Opened.ACTIVE,
        flags=Flag.PID_KNOWN,
        pid=42,
        comm=b"curl",
        state=S.ESTABLISHED,
        history=(S.SYN_SENT << 4) | S.ESTABLISHED,
        srtt_us=800,
        mdev_us=400,
        netns=4026531840,
    )
    c = decode(rec)
    assert (c.family, c.saddr, c.sport, c.daddr, c.dport) == (
        4,
        "10.0.0.2",
        40000,
        "192.0.2.1",
        443,
    )
    assert (c.pid, c.comm, c.direction, c.state, c.states) == (
        42,
        "curl",
        "outgoing",
        "ESTABLISHED",
        ("SYN_SENT", "ESTABLISHED"),
    )
    assert (c.rtt_us, c.rtt_var_us) == (100, 100)  # srtt_us >> 3, mdev_us >> 2 as TCP_INFO


def test_decode_ipv6_and_v4_mapped() -> None:
    v6 = _rec(
        family=socket.AF_INET6,
        proto=6,
        saddr6=socket.inet_pton(socket.AF_INET6, "fd00::1"),
        daddr6=socket.inet_pton(socket.AF_INET6, "fd00::2"),
        opened=Opened.PASSIVE,
    )
    c = decode(v6)
    assert (c.family, c.saddr, c.daddr, c.direction, c.pid) == (
        6,
        "fd00::1",
        "fd00::2",
        "incoming",
        None,
    )
    mapped = _rec(
        family=socket.AF_INET6,
        proto=17,
        saddr6=socket.inet_pton(socket.AF_INET6, "::ffff:10.1.1.1"),
        daddr6=socket.inet_pton(socket.AF_INET6, "::ffff:10.1.1.2"),
        state=S.ESTABLISHED,
    )
    c = decode(mapped)
    assert (c.family, c.saddr, c.daddr, c.proto, c.state) == (
        4,
        "10.1.1.1",
        "10.1.1.2",
        "udp",
        "ESTABLISHED",
    )
    assert (c.rtt_us, c.states) == (None, ())


def test_decode_local_direction() -> None:
    lo = _rec(family=2, proto=6, saddr4=b"\x7f\0\0\x01", daddr4=b"\x7f\0\0\x01", opened=1)
    assert decode(lo).direction == "local"
    own = _rec(family=2, proto=6, saddr4=b"\x0a\0\0\x05", daddr4=b"\x0a\0\0\x05", opened=2)
    assert decode(own).direction == "local"
    assert decode(own).opened == "passive"


def _conn(cid: int, sent: int = 0, end: int = 0) -> Conn:
    return decode(
        _rec(id=cid, family=2, proto=6, bytes_sent=sent, end_reason=end, start_ns=1, last_ns=2)
    )


def test_table_reports_closed_once_with_deltas() -> None:
    t = ConnTable(max_conns=100)
    iv = t.update(3, [_conn(0, 10), _conn(1, 5)], [_conn(2, 7, EndReason.DESTROYED)], 0)
    assert [c.id for c in iv.conns] == [0, 1]
    assert [c.id for c in iv.closed] == [2]
    assert iv.closed[0].delta()["bytes_sent"] == 7
    assert (iv.evicted, iv.lost) == (0, 0)
    # 0 grows, 1 closes (its record also still seen by the walk: closed after it)
    iv = t.update(3, [_conn(0, 25), _conn(1, 6)], [_conn(1, 9, EndReason.DESTROYED)], 0)
    assert [c.id for c in iv.conns] == [0]
    assert iv.conns[0].delta()["bytes_sent"] == 15
    assert [(c.id, c.delta()["bytes_sent"]) for c in iv.closed] == [(1, 4)]
    assert iv.evicted == 0


def test_table_counts_evictions_exactly() -> None:
    t = ConnTable(max_conns=100)
    t.update(2, [_conn(0), _conn(1)], [], 0)
    # 1 vanished without a record; ids 2..5 were created, 3 was seen, 2/4/5 never
    iv = t.update(6, [_conn(0), _conn(3)], [], 0)
    assert iv.evicted == 1 + 3
    # an id created after the counter was read and seen early is not a gap later
    iv = t.update(6, [_conn(0), _conn(3), _conn(6)], [], 0)
    assert iv.evicted == 0
    iv = t.update(8, [_conn(0), _conn(3), _conn(6), _conn(7)], [], 0)
    assert iv.evicted == 0
    # a lost ring buffer record is not an eviction
    iv = t.update(8, [_conn(3), _conn(6), _conn(7)], [], 1)
    assert (iv.evicted, iv.lost) == (0, 1)
    assert t.evicted_total == 4


def test_table_counts_evictions_exactly_per_stream() -> None:
    """Ids from per-CPU, per-level counters (no BPF_FETCH, before 5.12): the same
    accounting as the dense counter, stream by stream (id = seq << 16 | cpu << 2 | lvl)."""

    def sid(seq: int, cpu: int, level: int = 0) -> int:
        return seq << STREAM_BITS | cpu << 2 | level

    def counts(**streams: int) -> IdCounts:
        return IdCounts({int(k[1:]): n for k, n in streams.items()}, STREAM_BITS)

    t = ConnTable(max_conns=100)
    iv = t.update(counts(s0=2, s4=1), [_conn(sid(0, 0)), _conn(sid(1, 0)), _conn(sid(0, 1))], [], 0)
    assert iv.evicted == 0
    # cpu 1 made ids 1..3, 2 was seen; cpu 0 level 1 (softirq) made one, seen closing;
    # sid(0, 0) vanished; an id created after the read (cpu 0 seq 2) is seen early
    live = [_conn(sid(1, 0)), _conn(sid(0, 1)), _conn(sid(2, 1)), _conn(sid(2, 0))]
    closed = [_conn(sid(0, 0, 1), end=EndReason.DESTROYED)]
    iv = t.update(counts(s0=2, s4=4, s1=1), live, closed, 0)
    assert iv.evicted == 1 + 2  # sid(0, 0), and cpu 1's seq 1 and 3
    iv = t.update(counts(s0=3, s4=4, s1=1), live, [], 0)
    assert iv.evicted == 0 and t.created.total == 8


@given(
    st.lists(st.integers(0, 40), max_size=30),
    st.integers(0, 20),
    st.integers(0, 20),
    st.booleans(),
)
def test_id_counts_partition_is_has(ids: list[int], lo: int, hi: int, streams: bool) -> None:
    """partition() says what has() says id by id, for the dense counter and streams."""
    bits = 2 if streams else 0
    before = IdCounts({0: lo, 1: lo // 2} if streams else lo, bits)
    now = IdCounts({0: max(lo, hi), 1: hi, 3: 1} if streams else max(lo, hi), bits)
    new, later = now.partition(ids, before)
    assert new == [i for i in ids if now.has(i) and not before.has(i)]
    assert later == [i for i in ids if not now.has(i)]


def test_table_user_space_bound() -> None:
    t = ConnTable(max_conns=2)
    iv = t.update(3, [_conn(0), _conn(1), _conn(2)], [], 0)
    assert len(iv.conns) == 2
    assert iv.evicted == 1


def test_json_line_equals_dict() -> None:
    conns = [
        decode(_rec(id=1, family=2, proto=6, comm=b'a"b\\c', flags=1, pid=3, start_ns=10**9)),
        decode(_rec(id=2, family=10, proto=17, saddr6=b"\0" * 15 + b"\1", start_ns=2 * 10**9)),
    ]
    conns[0].prev = (1, 0, 0, 0, 0)
    closed = [decode(_rec(id=3, family=2, proto=6, end_reason=EndReason.REUSED, end_ns=5))]
    t = ConnTable(10)
    iv = t.update(4, conns, closed, 0)

    class Gw:
        def as_json(self) -> dict[str, object]:
            return {"via": "10.0.0.1", "dev": "eth0", "ifindex": 2, "subnet": "10.0.0.0/24"}

    iv.conns[0].gateway = Gw()
    line = out.interval_line(iv, 1700000000.5, 1.25, 3 * 10**9, 10**15, {"x": 1})
    d = out.interval_json(iv, 1700000000.5, 1.25, 3 * 10**9, 10**15, {"x": 1})
    assert json.loads(line) == d
    assert d["closed"][0]["end"] == "reused"
    assert d["conns"][0]["comm"] == 'a"b\\c'
    assert d["conns"][0]["delta"]["bytes_sent"] == -1


def test_human_bytes() -> None:
    assert [out.human_bytes(n) for n in (0, 1023, 1536, 20 * 1024, 5 << 30)] == [
        "0",
        "1023",
        "1.5K",
        "20K",
        "5.0G",
    ]


_ADDRS4 = [b"\x7f\0\0\x01", b"\x0a\0\0\x01", b"\x0a\0\0\x02", b"\0\0\0\0"]
_ADDRS6 = [
    b"\0" * 15 + b"\1",
    socket.inet_pton(socket.AF_INET6, "fd00::1"),
    socket.inet_pton(socket.AF_INET6, "::ffff:10.0.0.1"),
    b"\0" * 16,
]


@given(
    st.fixed_dictionaries(
        {
            "id": st.integers(0, 2**40),
            "start_ns": st.integers(1, 2**50),
            "end_ns": st.integers(0, 2**50),
            "bytes_sent": st.integers(0, 2**40),
            "bytes_received": st.integers(0, 2**40),
            "tcp_bytes_acked": st.integers(0, 2**40),
            "tcp_bytes_received": st.integers(0, 2**40),
            "history": st.integers(0, 2**64 - 1),
            "segs_in": st.integers(0, 2**32 - 1),
            "segs_out": st.integers(0, 2**32 - 1),
            "total_retrans": st.integers(0, 2**32 - 1),
            "srtt_us": st.integers(0, 2**32 - 1),
            "mdev_us": st.integers(0, 2**32 - 1),
            "pid": st.integers(0, 2**22),
            "netns": st.integers(0, 2**32 - 1),
            "saddr4": st.sampled_from(_ADDRS4),
            "daddr4": st.sampled_from(_ADDRS4),
            "saddr6": st.sampled_from(_ADDRS6),
            "daddr6": st.sampled_from(_ADDRS6),
            "sport": st.integers(0, 65535),
            "dport": st.integers(0, 65535),
            "family": st.sampled_from([2, 10]),
            "proto": st.sampled_from([6, 17]),
            "state": st.integers(0, 15),
            "opened": st.integers(0, 4),
            "flags": st.integers(0, 3),
            "end_reason": st.integers(0, 4),
            "comm": st.binary(max_size=16),
        }
    ),
    st.booleans(),
)
def test_record_line_equals_decoded(fields: dict[str, object], tcp_sock: bool) -> None:
    """The hot-path writer says exactly what decoding and conn_json say."""
    rec = _rec(**fields)
    fast = json.loads(out.record_line(rec, tcp_sock, 10**18))
    slow = out.conn_json(decode(rec, tcp_sock), 0, 10**18, closed=True)
    assert fast == slow


@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "id": st.integers(0, 2**64 - 1),
                "start_ns": st.integers(0, 2**40),
                "end_ns": st.integers(0, 2**40),
                "bytes_sent": st.integers(0, 2**64 - 1),
                "segs_in": st.integers(0, 2**32 - 1),
                "total_retrans": st.integers(0, 2**32 - 1),
                "srtt_us": st.integers(0, 2**32 - 1),
                "sport": st.integers(0, 65535),
                "dport": st.integers(0, 65535),
                "flow": st.integers(0, 3),
            }
        ),
        max_size=12,
    ),
    st.booleans(),
)
def test_record_lines_share_templates_exactly(fields: list[dict[str, int]], tcp_sock: bool) -> None:
    """Records of a few flows (owner, addresses, history, end and gateway shared; ports,
    counters and times their own) rendered together: each says exactly what decoding
    and conn_json say, a comm with ``%`` in it too."""
    from nettracer.net.gateway import Gateway

    flows = [
        {"family": 2, "proto": 6, "state": 7, "history": 0x1234, "flags": 1, "pid": 7,
         "comm": b"a%sb%%", "saddr4": _ADDRS4[1], "daddr4": _ADDRS4[2], "end_reason": 1},
        {"family": 10, "proto": 17, "state": 1, "flags": 3, "pid": 8, "comm": b"%d",
         "saddr6": _ADDRS6[1], "daddr6": _ADDRS6[2], "end_reason": 4},
        {"family": 2, "proto": 6, "state": 7, "history": 0x12, "opened": 2, "netns": 5},
        {"family": 2, "proto": 6, "state": 7, "history": 0x1234, "flags": 1, "pid": 7,
         "comm": b"a%sb%%", "saddr4": _ADDRS4[1], "daddr4": _ADDRS4[2], "end_reason": 1},
    ]  # fmt: skip
    gws = [None, None, None, Gateway("10.0.0.1", "eth%d", 2, "10.0.0.0/8")]
    recs, want, flow_of = [], [], []
    for f in fields:
        flow = f.pop("flow")
        flow_of.append(flow)
        rec = _rec(**f, **flows[flow])
        recs.append(rec)
        c = decode(rec, tcp_sock)
        c.gateway = gws[flow]
        want.append(out.conn_json(c, 0, 10**18, closed=True))
    lines = out.RecordLines(tcp_sock, 10**18).lines(recs, [gws[flow] for flow in flow_of])
    assert [json.loads(t) for t in lines] == want


def test_netns_filter_is_a_32_bit_compare() -> None:
    """Namespace inodes are above 2**31: a 64-bit compare would sign-extend them."""
    inode = 4026532178
    prog = cp.build_state(fake_offsets(), cp.ConnSpec(netns=inode))
    [cmp] = [i for i in prog.insns if i.imm == inode]
    assert cmp.cls == JMP32


def test_container_of_a_connection_in_both_writers(tmp_path) -> None:
    """The owner's container by pid; without a known pid, the namespace's."""
    from test_drops_units import fake_proc

    from nettracer.kernel.cgroup import ContainerResolver

    cid = "c" * 64
    ino = fake_proc(
        tmp_path,
        {3: f"/kubepods/besteffort/pod{'1' * 8}-{'2' * 4}-{'3' * 4}-{'4' * 4}-{'5' * 12}/{cid}"},
    )
    res = ContainerResolver(proc=str(tmp_path))
    for fields in ({"pid": 3, "flags": 1, "netns": 1}, {"pid": 0, "flags": 0, "netns": ino[3]}):
        rec = _rec(id=1, family=2, proto=6, **fields)
        fast = json.loads(out.record_line(rec, False, 10**18, containers=res))
        slow = out.conn_json(decode(rec, False), 0, 10**18, closed=True, containers=res)
        line = json.loads(out.conn_line(decode(rec, False), 0, 10**18, True, containers=res))
        assert fast == slow == line
        assert slow["container"] == {
            "id": cid, "runtime": "cri", "pod_uid": "11111111-2222-3333-4444-555555555555",
        }  # fmt: skip
        assert slow["cgroup"].endswith(cid)
    rec = _rec(id=1, family=2, proto=6, pid=4, flags=1, netns=1)  # nobody: null
    assert out.conn_json(decode(rec, False), 0, 0, containers=res)["container"] is None


# -- the text table at fixed widths ---------------------------------------------------------


def _table_conns() -> list[Conn]:
    """An IPv4 TCP connection through a gateway and an IPv6 UDP flow with long addresses."""
    from nettracer.net.gateway import Gateway

    tcp = decode(
        _rec(id=1, family=socket.AF_INET, proto=6, saddr4=socket.inet_aton("10.200.1.2"),
             daddr4=socket.inet_aton("198.51.100.200"), sport=54321, dport=socket.htons(443),
             opened=Opened.ACTIVE, flags=Flag.PID_KNOWN, pid=123456, comm=b"python3.11",
             state=S.ESTABLISHED, bytes_sent=5 << 20, bytes_received=123, srtt_us=800,
             start_ns=1, netns=1)
    )  # fmt: skip
    tcp.gateway = Gateway("10.200.1.1", "vc", 7, "10.200.1.0/24")
    udp = decode(
        _rec(id=2, family=socket.AF_INET6, proto=17,
             saddr6=socket.inet_pton(socket.AF_INET6, "fd00:1234:5678:9abc::2"),
             daddr6=socket.inet_pton(socket.AF_INET6, "2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff"),
             sport=65535, dport=socket.htons(53), opened=Opened.ACTIVE, state=1,
             start_ns=1, netns=1)
    )  # fmt: skip
    return [tcp, udp]


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("width", [80, 120, 200, None])
def test_table_fits_the_width(width: int | None, v6: bool) -> None:
    """Columns are chosen to fit 80, 120 and 200 columns (None: ``--wide``, all of
    them): every address and port is shown whole, each column left out would not have
    fitted, and the table says which columns it left out."""
    import io

    conns = _table_conns()[: 2 if v6 else 1]
    iv = ConnTable(10).update(3, conns, [], 0)
    buf = io.StringIO()
    out.print_interval(iv, 1700000000.0, 2 * 10**9, stream=buf, width=width)
    text = buf.getvalue()
    lines = text.splitlines()
    [header] = [line for line in lines if "LOCAL" in line]
    table = lines[lines.index(header) :]
    heads = [h for h, _, _ in out.CONN_COLUMNS if h in header]
    ends = ["10.200.1.2:54321", "198.51.100.200:443"]
    if v6:
        ends += ["[fd00:1234:5678:9abc::2]:65535", "[2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff]:53"]
    assert all(e in text for e in ends)
    if width is None:
        assert heads == [h for h, _, _ in out.CONN_COLUMNS] and "not shown" not in text
        return
    used = max(len(line) for line in table)
    assert used <= width, table
    hidden = [h for h, _, _ in out.CONN_COLUMNS if h not in heads]
    assert (f"(not shown: {', '.join(hidden)}; --wide)" in text) == bool(hidden)
    cells = out._cells(conns[-1], False, 2 * 10**9)
    for i, (h, _, _) in enumerate(out.CONN_COLUMNS):
        if h in hidden:  # it would not have fitted
            need = max(len(h), *(len(out._cells(c, False, 2 * 10**9)[i]) for c in conns))
            assert used + 2 + need > width, (h, cells[i])
    if width == 80 and not v6:
        assert heads == ["PID", "PROTO", "LOCAL", "REMOTE", "STATE", "SENT", "RECV"]
    if width >= 120 and not v6:
        assert "GATEWAY" in heads and "10.200.1.1 vc" in text
    if width == 200:
        assert not hidden


def test_table_never_cuts_an_address() -> None:
    """Narrower than the addresses themselves: every optional column goes, the
    endpoints stay whole and the line is longer than asked."""
    conns = _table_conns()
    lines, hidden = out.conn_table(conns, False, 0, 30)
    assert hidden == [h for h, _, r in out.CONN_COLUMNS if r > 0]
    assert "[2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff]:53" in lines[2]
