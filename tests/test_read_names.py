"""``nettracer read`` speaks names as SystemTap's dropwatch does, checked against what the
kernel says about drops and state changes the tests cause in private namespaces: the
location as the kernel's own ``%pS`` prints it (the tracefs trace of ``skb:kfree_skb``),
the reason as BTF's ``enum skb_drop_reason`` names it, TCP states by the transitions a
connect to a closed port makes, ISO 8601 times."""

from __future__ import annotations

import datetime
import json
import signal
import sys
import time

import pytest
from conftest import kernel_skip
from test_access import VMLINUX, Topo, _cli, _no_ports, _nsexec, _wait_attached, topo

__all__ = ["topo"]  # the fixture, shared with test_access


def _run(t: Topo, *args: str, cause: str, done, netns: str) -> tuple[list[dict], str]:  # type: ignore[no-untyped-def]
    """``nettracer read ARGS --json`` in namespace ``netns`` while ``cause`` runs in the
    sender's, until ``done()``; its JSON lines and the kfree_skb trace meanwhile."""
    from nettracer.kernel.tracefs import open_tracefs

    proc = _cli(*args, "--json", "--netns", f"/run/netns/{netns}", "--duration", "300")
    try:
        _wait_attached(proc)
        with open_tracefs().buffer() as trace:
            trace.enable("skb", "kfree_skb")
            r = _nsexec(t.sender, sys.executable, "-c", cause)
            assert r.returncode == 0, r.stderr
            deadline = time.monotonic() + 60
            while not done() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert done()
            text = trace.text()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()], text


@pytest.mark.kernel
def test_read_names_location_and_reason_as_the_kernel(topo: Topo) -> None:
    from nettracer.kernel.btf import Btf
    from nettracer.kernel.tracefs import parse_trace_line

    n = 3
    before = _no_ports(topo)
    send = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for i in range({n}): s.sendto(b'x', ('10.233.7.2', 9))"
    )
    lines, trace = _run(
        topo,
        "kfree_skb",
        "location",
        "reason",
        "skb->dev->name",
        cause=send,
        done=lambda: _no_ports(topo) >= before + n,
        netns=topo.receiver,
    )
    events = [x["values"] for x in lines if "values" in x]
    ours = [e for e in events if e["location"].startswith("__udp4_lib_rcv+")]
    assert len(ours) == n, events  # the receiver had no socket for each datagram
    # the kernel's own %pS of the same drops ("sym+0xoff/0xsize"), from the trace
    kernel = set()
    for line in trace.splitlines():
        tl = parse_trace_line(line)
        if tl and tl.event == "kfree_skb":
            loc = tl.values().get("location", "").split("/")[0]
            if loc.startswith("__udp4_lib_rcv+"):
                kernel.add(loc)
    assert {e["location"] for e in ours} == kernel, (ours, trace)
    names = set(Btf.vmlinux().enum("skb_drop_reason").values()) if VMLINUX else set()
    for e in ours:
        assert e["skb->dev->name"] == topo.rx  # char[16] as a string
        assert e["reason"] == "SKB_DROP_REASON_NO_SOCKET" and e["reason"] in names
    for obj in lines:  # ISO 8601, as the other commands
        assert datetime.datetime.fromisoformat(obj["time"]).tzinfo is not None


@pytest.mark.kernel
def test_read_names_tcp_states(topo: Topo) -> None:
    """A connect to a closed port: CLOSE -> SYN_SENT, then the RST: SYN_SENT -> CLOSE;
    ``int oldstate``/``newstate`` named by the event's ``print fmt`` table."""
    import os

    if not os.path.exists(VMLINUX):
        kernel_skip("kernel has no BTF (inet_sock_set_state's arguments need it)")
    connect = (
        "import socket\n"
        "s = socket.socket()\n"
        "try: s.connect(('10.233.7.2', 9))\n"
        "except ConnectionRefusedError: pass\n"
        "else: raise SystemExit('connected')\n"
    )
    lines, _ = _run(
        topo,
        "inet_sock_set_state",
        "oldstate",
        "newstate",
        "sk->__sk_common.skc_dport",
        cause=connect,
        done=lambda: True,  # connect() returns after the RST changed the state
        netns=topo.sender,
    )
    seen = [x["values"] for x in lines if "values" in x]
    assert [(v["oldstate"], v["newstate"], v["sk->__sk_common.skc_dport"]) for v in seen] == [
        ("TCP_CLOSE", "TCP_SYN_SENT", 9),
        ("TCP_SYN_SENT", "TCP_CLOSE", 9),
    ]


@pytest.mark.kernel
def test_read_casts_and_indexing(topo: Topo) -> None:
    """C's cast, SystemTap's ``@cast`` and ``[N]`` read what the test knows: the
    datagram's length, the receiving device's ifindex and the first letter of its name."""
    import os

    from test_access import _send_and_collect

    if not os.path.exists(VMLINUX):
        kernel_skip("kernel has no BTF (casts to any struct and indexing need it)")
    ifindex = int(_nsexec(topo.receiver, "cat", f"/sys/class/net/{topo.rx}/ifindex").stdout.strip())
    n, payload = 4, 21
    exprs = (
        '@cast(skb, "struct sk_buff")->len',
        "((struct net_device *)skb->dev)->ifindex",
        "skb->dev->name[0]",
        '@cast(skb->dev, "net_device")->name',
    )
    out, _err = _send_and_collect(topo, n, payload, "kfree_skb", *exprs, "--count", "--json")
    rows = [row for line in out.splitlines() for row in json.loads(line)["counts"]]
    assert [row["values"] for row in rows] == [
        {exprs[0]: 8 + payload, exprs[1]: ifindex, exprs[2]: ord(topo.rx[0]), exprs[3]: topo.rx}
    ]
    assert rows[0]["count"] == n


def test_casts_without_btf_reach_catalogue_structs_only() -> None:
    """Without BTF a cast names a catalogue struct; the offsets are the catalogue's (BTF
    is the oracle here); indexing needs BTF."""
    import os

    from nettracer.access.path import AccessError, resolve_btf, resolve_offsets, tracepoint_args_btf

    if not os.path.exists(VMLINUX):
        kernel_skip("kernel has no BTF (the oracle of this test)")
    from nettracer.kernel.btf import Btf
    from nettracer.layout.btf_offsets import btf_offsets

    btf = Btf.vmlinux()
    offsets = btf_offsets(btf)
    args = tracepoint_args_btf(btf, "kfree_skb")
    for expr in (
        "((struct tcp_sock *)skb->sk)->srtt_us",
        '@cast(skb->sk, "struct tcp_sock")->srtt_us',
        "((struct sock *)location)->sk_protocol",
        '@cast(skb->sk, "struct sock")',
    ):
        a, b = resolve_offsets(expr, offsets, "kfree_skb"), resolve_btf(expr, btf, args)
        assert (a.arg_index, a.derefs, a.offset, a.size) == (
            b.arg_index,
            b.derefs,
            b.offset,
            b.size,
        )
    for expr, wanted in (
        ("((struct inode *)skb->sk)->i_ino", "only catalogue structs can be cast to"),
        ("skb->cb[0]", "not in the field catalogue"),
        ("((struct tcp_sock *)skb->len)->srtt_us", "only a pointer can be cast"),
    ):
        with pytest.raises(AccessError, match=wanted.replace("(", r"\(")):
            resolve_offsets(expr, offsets, "kfree_skb")


@pytest.mark.parametrize(
    ("expr", "wanted"),
    [
        ("skb->cb[48]", "skb->cb has 48 elements; index 48 is past its end"),
        ("((struct no_such_struct *)skb)->x", "no struct no_such_struct in this kernel's BTF"),
        ("((struct tcp_sock *)skb->len)->srtt_us", "only a pointer or an 8-byte integer"),
        ('@cast(skb->sk, "struct tcp_sock").srtt_us', "use '->'"),
        ("skb->len[0]", "cannot be indexed"),
        ("((struct tcp_sock)skb)->x", "only casts to a pointer to a struct"),
        ('@cast(skb, "unsigned int")->x', 'expected "struct NAME"'),
    ],
)
def test_cast_and_index_errors(expr: str, wanted: str) -> None:
    import os

    from nettracer.access.path import AccessError, resolve_btf, tracepoint_args_btf

    if not os.path.exists(VMLINUX):
        kernel_skip("kernel has no BTF (the oracle of this test)")
    from nettracer.kernel.btf import Btf

    btf = Btf.vmlinux()
    with pytest.raises(AccessError) as exc:
        resolve_btf(expr, btf, tracepoint_args_btf(btf, "kfree_skb"))
    assert wanted in str(exc.value) and "\n" not in str(exc.value)
