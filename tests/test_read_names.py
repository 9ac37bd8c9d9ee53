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
