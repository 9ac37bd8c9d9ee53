"""``nettracer drops --pcap``: the dropped packets, read back by Debian's tshark.

The writer is checked alone first (packets the test builds, no root), then the command
on drops the test causes in its own namespaces (the topology and traffic of
``test_drops.py``): every packet tshark reads is one the client sent and the server's
namespace dropped, with its addresses, ports and length, on an interface named after
its device, with a comment naming the reason and the location; the number of packets
of each kind equals what was sent (and, for the receive-buffer overflow, what the
server could not read).  The same through ``--pcap - | tshark -r -``, and from
guessed offsets with BTF hidden.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import kernel_skip
from test_drops import (
    BURST,
    CLIENT,
    F4_ICMP,
    F4_UDP,
    F6,
    REPO,
    SERVER,
    SRC_PORT,
    T4,
    T6,
    TCP_SRC_PORT,
    U4,
    U6,
    Topo,
    run,
    topo,  # noqa: F401 - the fixture
)

from nettracer.output.pcapng import SLL_HEADER, PcapngWriter

FIELDS = (
    "frame.interface_name",
    "frame.interface_description",
    "ip.src",
    "ip.dst",
    "ipv6.src",
    "ipv6.dst",
    "udp.srcport",
    "udp.dstport",
    "tcp.srcport",
    "tcp.dstport",
    "tcp.flags.syn",
    "icmp.type",
    "frame.len",
    "frame.cap_len",
    "frame.comment",
)


def tshark() -> str:
    path = shutil.which("tshark")
    if path is None:
        kernel_skip("tshark (Debian package tshark) is not installed")
    assert path is not None
    return path


def tshark_fields(source: str | Path, stdin: int | None = None) -> list[dict[str, str]]:
    """Each packet tshark reads from ``source`` (``-`` with ``stdin``) as field -> value."""
    cmd = [tshark(), "-r", str(source), "-T", "fields", "-E", "separator=\t", "-E", "occurrence=f"]
    for f in FIELDS:
        cmd += ["-e", f]
    r = subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [dict(zip(FIELDS, line.split("\t"), strict=True)) for line in r.stdout.splitlines()]


# -- the writer alone ---------------------------------------------------------------------


def ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload
    return (
        struct.pack(
            ">BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(udp),
            1,
            0,
            64,
            17,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )
        + udp
    )


def ipv6_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload
    addrs = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
    return struct.pack(">IHBB", 6 << 28, len(udp), 17, 64) + addrs + udp


def isb_comments(data: bytes) -> list[str]:
    """The comments of the Interface Statistics Blocks (tshark does not print them)."""
    out, pos = [], 0
    while pos < len(data):
        kind, total = struct.unpack_from("=II", data, pos)
        if kind == 5:
            opt = pos + 20
            while opt < pos + total - 4:
                code, length = struct.unpack_from("=HH", data, opt)
                if code == 0:
                    break
                if code == 1:
                    out.append(data[opt + 4 : opt + 4 + length].decode())
                opt += 4 + length + (-length % 4)
        pos += total
    return out


def test_writer_read_by_tshark(tmp_path: Path) -> None:
    """Interfaces by (netns, device), IPv4/IPv6/ARP in one interface, snap length,
    original length, comments, nanosecond timestamps, and the statistics' comment."""
    buf = io.BytesIO()
    w = PcapngWriter(buf, snaplen=40)
    a = w.interface(4026531840, "veth0", 3)
    b = w.interface(4026532000, "veth0", 3)
    assert w.interface(4026531840, "veth0", 3) == a != b
    p4 = ipv4_udp("10.0.0.1", "10.0.0.2", 5000, 9, b"x" * 300)
    p6 = ipv6_udp("fd00::1", "fd00::2", 5001, 53, b"y" * 10)
    arp = bytes.fromhex("00010800060400010202020202020a0000010000000000000a000009")
    t0 = 1_700_000_000_123_456_789
    assert w.packet(a, t0, 0x0800, p4, len(p4), "reason=NO_SOCKET one")
    assert w.packet(b, t0 + 1, 0x86DD, p6, len(p6), "reason=NETFILTER_DROP two")
    assert w.packet(a, t0 + 2, 0x0806, arp, len(arp), "reason=NOT_SPECIFIED three")
    w.statistics(t0 + 10, lost=7)
    path = tmp_path / "w.pcapng"
    path.write_bytes(buf.getvalue())
    rows = tshark_fields(path)
    assert [r["frame.interface_name"] for r in rows] == ["veth0", "veth0", "veth0"]
    assert [r["frame.interface_description"] for r in rows] == [
        "netns 4026531840 ifindex 3",
        "netns 4026532000 ifindex 3",
        "netns 4026531840 ifindex 3",
    ]
    assert (rows[0]["ip.src"], rows[0]["ip.dst"], rows[0]["udp.dstport"]) == (
        "10.0.0.1", "10.0.0.2", "9"
    )  # fmt: skip
    # the snap length (40) keeps IPv6's header, not its UDP header
    assert (rows[1]["ipv6.src"], rows[1]["ipv6.dst"], rows[1]["udp.srcport"]) == (
        "fd00::1", "fd00::2", ""
    )  # fmt: skip
    assert [int(r["frame.len"]) for r in rows] == [SLL_HEADER + n for n in (328, 58, 28)]
    assert [int(r["frame.cap_len"]) for r in rows] == [SLL_HEADER + n for n in (40, 40, 28)]
    assert [r["frame.comment"] for r in rows] == [
        "reason=NO_SOCKET one",
        "reason=NETFILTER_DROP two",
        "reason=NOT_SPECIFIED three",
    ]
    epoch = subprocess.run(
        [tshark(), "-r", str(path), "-T", "fields", "-e", "frame.time_epoch"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert epoch[0] == "1700000000.123456789"
    assert (
        isb_comments(buf.getvalue()) == ["nettracer: 7 dropped packets are not in this capture"] * 2
    )


def test_writer_size_limit_stops_and_says_so() -> None:
    buf = io.BytesIO()
    w = PcapngWriter(buf, snaplen=128, max_bytes=1000)
    iface = w.interface(1, "eth0", 2)
    p4 = ipv4_udp("10.0.0.1", "10.0.0.2", 1, 2, b"z" * 100)
    results = [w.packet(iface, i, 0x0800, p4, len(p4), "c") for i in range(20)]
    assert results == [True] * results.count(True) + [False] * results.count(False)
    assert w.full and w.left_out == results.count(False) > 0
    assert w.written <= 1000
    w.statistics(99, lost=0)
    assert isb_comments(buf.getvalue()) == [
        f"nettracer: {w.left_out} dropped packets are not in this capture "
        f"({w.left_out} after the size limit was reached)"
    ]


def test_empty_capture_still_says_what_it_misses(tmp_path: Path) -> None:
    buf = io.BytesIO()
    w = PcapngWriter(buf, snaplen=128)
    w.statistics(5, lost=3)
    path = tmp_path / "empty.pcapng"
    path.write_bytes(buf.getvalue())
    assert tshark_fields(path) == []
    assert isb_comments(buf.getvalue()) == ["nettracer: 3 dropped packets are not in this capture"]


# -- the command on drops we cause ----------------------------------------------------------


class Lines:
    """Lines of a binary pipe, read with a deadline (select, no blocking read)."""

    def __init__(self, stream: io.BufferedReader) -> None:
        self.fd = stream.fileno()
        self.buf = b""
        self.seen: list[str] = []

    def until(self, want: object, deadline: float) -> str:
        """The first line for which ``want(line)`` is true; AssertionError at the deadline."""
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                self.seen.append(text)
                if want(text):  # type: ignore[operator]
                    return text
            left = deadline - time.monotonic()
            ready = select.select([self.fd], [], [], max(left, 0))[0] if left > 0 else []
            chunk = os.read(self.fd, 65536) if ready else b""
            if not chunk:
                raise AssertionError("no such line before the deadline: " + "\n".join(self.seen))
            self.buf += chunk

    def rest(self, deadline: float) -> str:
        """Everything until the end of the stream (or the deadline)."""
        with contextlib.suppress(AssertionError):
            self.until(lambda line: False, deadline)
        return "\n".join([*self.seen, self.buf.decode(errors="replace")])


def expected_total(counts: dict[str, int]) -> int:
    """Drops the client causes in the server's namespace (test_drops.py's traffic)."""
    rcvbuf = 2 * BURST - counts["rcv4"] - counts["rcv6"]
    return U4 + U6 + T4 + T6 + F4_UDP + F4_ICMP + F6 + rcvbuf


def capture(t: Topo, args: list[str], prefix: tuple[str, ...] = (), pipe: bool = False):  # type: ignore[no-untyped-def]
    """Start the server, the command (``--pcap -`` into tshark when ``pipe``, else
    ``--pcap`` to a file named in ``args``), run the client, wait until the command's
    JSON reports have counted every drop caused, stop it with SIGINT.
    Returns (tshark rows when ``pipe``, the server's counts, the command's stderr)."""
    import json

    server = subprocess.Popen(
        ["ip", "netns", "exec", t.server, sys.executable, "-c", SERVER,
         *(str(n) for n in (U4, U6, BURST))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    proc = reader = None
    try:
        assert server.stdout is not None and server.stdin is not None
        assert server.stdout.readline().strip() == "ready"
        cmd = [*prefix, sys.executable, "-m", "nettracer", "drops", "--netns", str(t.inode),
               "--json", "--interval", "0.2", *args]  # fmt: skip
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        if pipe:
            reader = subprocess.Popen(
                [tshark(), "-r", "-", "-T", "fields", "-E", "separator=\t", "-E", "occurrence=f",
                 *[x for f in FIELDS for x in ("-e", f)]],
                stdin=proc.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            proc.stdout.close()  # tshark's alone: ours must not read the capture
        errs = Lines(proc.stderr)
        reports = errs if pipe else Lines(proc.stdout)
        errs.until(lambda line: "attached" in line, time.monotonic() + 120)
        run([sys.executable, "-c", CLIENT], ns=t.client)
        server.stdin.write("drain\n")
        server.stdin.flush()
        counts = json.loads(server.stdout.readline())
        want, seen = expected_total(counts), 0

        def all_counted(line: str) -> bool:
            nonlocal seen
            if line.startswith("{"):
                drops = json.loads(line)["drops"]
                seen += sum(d["count"] for d in drops if d["symbol"] != MULTICAST_NOISE)
            return seen >= want

        reports.until(all_counted, time.monotonic() + 30)
        proc.send_signal(signal.SIGINT)
        if not pipe:
            reports.rest(time.monotonic() + 60)
        stderr = errs.rest(time.monotonic() + 60)
        assert proc.wait(timeout=60) == 0, stderr
        rows = None
        if reader is not None:
            rout, rerr = reader.communicate(timeout=120)
            assert reader.returncode == 0, rerr
            stderr += "\ntshark: " + rerr
            rows = [dict(zip(FIELDS, x.split("\t"), strict=True)) for x in rout.splitlines()]
        return rows, counts, stderr
    finally:
        for p in (proc, reader):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
        server.kill()
        server.wait()


#: where the kernel drops for each reason the test causes (symbols of the location)
LOCATIONS = {
    "NO_SOCKET": ("__udp4_lib_rcv", "__udp6_lib_rcv", "tcp_v4_rcv", "tcp_v6_rcv"),
    "NETFILTER_DROP": ("nft_do_chain", "nf_hook_slow"),
    "SOCKET_RCVBUFF": ("__udp_queue_rcv_skb", "udp_queue_rcv_one_skb",
                       "udp_queue_rcv_skb", "__udpv6_queue_rcv_skb",
                       "udpv6_queue_rcv_one_skb", "udpv6_queue_rcv_skb"),
}  # fmt: skip


def kind(row: dict[str, str]) -> tuple[str, str, str]:
    """(interface, what the packet is, the reason in its comment); before 5.17 (no
    reasons, no ``reason=`` in the comment) the reason whose locations hold the drop's."""
    comment = row["frame.comment"]
    if "reason=" in comment:
        reason = comment.split("reason=", 1)[1].split()[0]
    else:
        symbol = comment.split("location=", 1)[1].split("+", 1)[0]
        reason = next((r for r, syms in LOCATIONS.items() if symbol in syms), "?")
    if row["udp.dstport"]:
        what = f"udp{'6' if row['ipv6.src'] else '4'}:{row['udp.dstport']}"
    elif row["tcp.dstport"]:
        what = f"tcp{'6' if row['ipv6.src'] else '4'}:{row['tcp.dstport']}"
    elif row["icmp.type"]:
        what = f"icmp:{row['icmp.type']}"
    else:
        what = "other"
    return row["frame.interface_name"], what, reason


#: fresh veths send IPv6 multicast (MLD, router solicitations) that the other end drops
#: in ``ip6_mc_input`` at times the test does not choose: real drops, told apart here
MULTICAST_NOISE = "ip6_mc_input"


def check_packets(t: Topo, rows: list[dict[str, str]], counts: dict[str, int]) -> None:
    """Exactly the packets caused, each with its addresses, ports, length and comment
    (besides IPv6 multicast dropped in ``ip6_mc_input``, which must be just that)."""
    noise = [r for r in rows if f"location={MULTICAST_NOISE}+" in r["frame.comment"]]
    assert all(r["ipv6.dst"].startswith("ff02:") for r in noise), noise
    rows = [r for r in rows if r not in noise]
    got = Counter(kind(r) for r in rows)
    assert got == Counter({
        (t.s1, "udp4:9", "NO_SOCKET"): U4,
        (t.s1, "udp6:9", "NO_SOCKET"): U6,
        (t.s1, "tcp4:5", "NO_SOCKET"): T4,
        (t.s1, "tcp6:5", "NO_SOCKET"): T6,
        (t.s2, "udp4:7777", "NETFILTER_DROP"): F4_UDP,
        (t.s2, "icmp:8", "NETFILTER_DROP"): F4_ICMP,
        (t.s2, "udp6:7777", "NETFILTER_DROP"): F6,
        (t.s1, "udp4:8888", "SOCKET_RCVBUFF"): BURST - counts["rcv4"],
        (t.s1, "udp6:8888", "SOCKET_RCVBUFF"): BURST - counts["rcv6"],
    }), got  # fmt: skip
    for r in rows:
        iface, what, reason = kind(r)
        assert r["frame.interface_description"].startswith(f"netns {t.inode} ifindex ")
        assert f" netns={t.inode} " in r["frame.comment"]
        assert f" device={iface} " in r["frame.comment"]
        if what.startswith("udp4"):
            assert (r["ip.src"], r["udp.srcport"]) == (f"10.201.{1 if iface == t.s1 else 2}.1",
                                                       str(SRC_PORT))  # fmt: skip
            size = 1000 if what.endswith(":8888") else 1
            assert int(r["frame.len"]) == SLL_HEADER + 20 + 8 + size
        if what.startswith("udp6"):
            assert r["ipv6.src"] == f"fd01:{1 if iface == t.s1 else 2}::1"
            size = 1000 if what.endswith(":8888") else 1
            assert int(r["frame.len"]) == SLL_HEADER + 40 + 8 + size
        if what.startswith("tcp"):
            assert r["tcp.flags.syn"] in ("1", "True")
            assert TCP_SRC_PORT <= int(r["tcp.srcport"]) < TCP_SRC_PORT + max(T4, T6)
        assert int(r["frame.cap_len"]) <= SLL_HEADER + 128
        location = r["frame.comment"].split("location=", 1)[1].split()[0]
        symbol = location.split("+", 1)[0]
        assert symbol in LOCATIONS[reason], r["frame.comment"]
        assert "+0x" in location


@pytest.mark.kernel
def test_pcap_file_has_exactly_the_drops(topo: Topo, tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "drops.pcapng"
    _, counts, stderr = capture(topo, ["--pcap", str(path)])
    check_packets(topo, tshark_fields(path), counts)
    assert (
        isb_comments(path.read_bytes())
        == ["nettracer: 0 dropped packets are not in this capture"] * 2
    ), stderr


@pytest.mark.kernel
def test_pcap_to_stdout_into_tshark(topo: Topo) -> None:  # noqa: F811
    rows, counts, stderr = capture(topo, ["--pcap", "-", "--snaplen", "64"], pipe=True)
    assert stderr.count('"interval_s"') >= 2, stderr  # the reports, on stderr, and the last
    assert rows is not None
    check_packets(topo, rows, counts)
    assert max(int(r["frame.cap_len"]) for r in rows) == SLL_HEADER + 64


@pytest.mark.kernel
def test_pcap_without_btf_from_guessed_offsets(topo: Topo, tmp_path: Path) -> None:  # noqa: F811
    """BTF hidden by a tmpfs over /sys/kernel/btf in a private mount namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        kernel_skip("unshare (util-linux) is not installed")
    hide = 'mount -t tmpfs nobtf /sys/kernel/btf && exec "$@"'
    prefix = (str(unshare), "-m", "--propagation", "private", "sh", "-c", hide, "sh")
    path = tmp_path / "guessed.pcapng"
    cache = tmp_path / "cache"
    args = ["--pcap", str(path), "--offsets", "guess"]
    _, counts, stderr = capture(
        topo, [*args], prefix=(*prefix, "env", f"NETTRACER_OFFSETS__CACHE_DIR={cache}")
    )
    assert "offsets: guess" in stderr
    check_packets(topo, tshark_fields(path), counts)


def test_capture_flag_errors(tmp_path: Path) -> None:
    """Capture flags that make no sense: one line, exit 2, nothing attached."""
    cases = [
        (["--snaplen", "64"], "--snaplen and --pcap-max-mb go with --pcap FILE"),
        (["--pcap", str(tmp_path / "x"), "--snaplen", "129"], "--snaplen 129: expected 1 to 128"),
        (["--pcap", str(tmp_path / "x"), "--pcap-max-mb", "0"], "--pcap-max-mb 0: expected"),
        (["--pcap", str(tmp_path / "no" / "x")], "No such file or directory"),
    ]
    for args, message in cases:
        r = subprocess.run(
            [sys.executable, "-m", "nettracer", "drops", *args],
            capture_output=True, text=True, timeout=60, cwd=REPO,
            env=dict(os.environ, PYTHONPATH=REPO),
        )  # fmt: skip
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
