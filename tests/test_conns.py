"""``nettracer conns`` against connections the test opens itself, in namespaces it builds.

Every test runs the CLI in a subprocess (``--json``, stopped with SIGINT so the last
partial interval is printed) and a traffic script inside its own network namespace
(``ip netns exec``).  The script is the ground truth: its pid, ``/proc/self/comm``, its
namespace inode, the ports the kernel gave its sockets, the bytes it sent and read, and
``getsockopt(TCP_INFO)`` read once the connection is quiet (every segment sent has
arrived and the counters stay unchanged for half a second).  The tracer filters on the
test's namespace (``--netns``) or the test filters on its inodes, so the connections of
other tests running on this machine never count.

Topology of the gateway test (names carry the pid; every namespace is deleted)::

    client C  vc 10.77.1.2/24 ---- vr1 10.77.1.1/24  router R  vr2 10.77.2.1/24 ---- vs 10.77.2.2/24  server S
              default via 10.77.1.1                  (forwarding)                     default via 10.77.2.1
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ANY_OFFSETS, HAS_BTF, check_no_btf_refused, kernel_skip, settings

PID = os.getpid()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: bound on how long any single wait may take before the test gives up (not asserted)
PATIENCE_S = 60.0

pytestmark = pytest.mark.kernel


def sh(cmd: list[str], **kw: Any) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout


class Netns:
    """A named network namespace with loopback up, deleted on exit."""

    def __init__(self, tag: str) -> None:
        self.name = f"ntc{PID}{tag}"
        self.inode = 0

    def __enter__(self) -> Netns:
        sh(["ip", "netns", "add", self.name])
        try:
            sh(["ip", "-n", self.name, "link", "set", "lo", "up"])
            self.inode = os.stat(f"/run/netns/{self.name}").st_ino
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def ip(self, *args: str) -> str:
        return sh(["ip", "-n", self.name, *args])

    def ifindex(self, dev: str) -> int:
        return int(json.loads(self.ip("-j", "link", "show", "dev", dev))[0]["ifindex"])


# -- the traffic script (runs inside a namespace; JSON lines on stdout, commands on stdin) --

TRAFFIC = textwrap.dedent(r"""
    import json, os, socket, struct, sys, time
    args = json.loads(sys.argv[1])
    FAM = socket.AF_INET6 if args["family"] == 6 else socket.AF_INET

    def say(obj):
        print(json.dumps(obj), flush=True)

    def tcp_info(s):
        b = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
        rtt, rttvar = struct.unpack_from("<II", b, 68)
        acked, received = struct.unpack_from("<QQ", b, 120)
        segs_out, segs_in = struct.unpack_from("<II", b, 136)
        return {"state": b[0], "unacked": struct.unpack_from("<I", b, 24)[0],
                "rtt": rtt, "rttvar": rttvar,
                "total_retrans": struct.unpack_from("<I", b, 100)[0],
                "bytes_acked": acked, "bytes_received": received,
                "segs_out": segs_out, "segs_in": segs_in}

    def recv_exact(s, n):
        got = 0
        while got < n:
            b = s.recv(min(65536, n - got))
            if not b:
                raise SystemExit("peer closed early")
            got += len(b)

    def ends(s):
        a, b = s.getsockname()[:2], s.getpeername()[:2]
        return {"saddr": a[0], "sport": a[1], "daddr": b[0], "dport": b[1]}

    def quiet(pairs):
        # everything sent is acked and no counter moves for half a second (longer than
        # a delayed ACK waits)
        last = None
        for _ in range(200):
            now = [(tcp_info(c), tcp_info(s)) for c, s in pairs]
            settled = all(ci["unacked"] == 0 and si["unacked"] == 0 for ci, si in now)
            if settled and now == last:
                return now
            last = now
            time.sleep(0.5)
        raise SystemExit("connections never became quiet")

    def gone(port):
        # no socket of ours is left but listeners and TIME_WAIT (06) ones
        for _ in range(1000):
            busy = False
            for f in ("/proc/net/tcp", "/proc/net/tcp6"):
                for line in open(f).read().splitlines()[1:]:
                    p = line.split()
                    lport, rport = int(p[1].split(":")[1], 16), int(p[2].split(":")[1], 16)
                    if port in (lport, rport) and p[3] not in ("06", "0A"):
                        busy = True
            if not busy:
                return
            time.sleep(0.01)
        raise SystemExit("sockets did not go away")

    if "cpu" in args:  # run on one CPU (and so do the tracer's programs it triggers)
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    me = {"pid": os.getpid(), "comm": open("/proc/self/comm").read().strip(),
          "netns": os.stat("/proc/self/ns/net").st_ino}
    mode = args["mode"]
    if mode == "tcp":
        ls = socket.socket(FAM)
        ls.bind((args.get("listen", args["host"]), 0))
        ls.listen(64)
        port = ls.getsockname()[1]
        pairs = []
        for i in range(args["n"]):
            c = socket.socket(FAM)
            c.connect((args["host"], port))
            s, _ = ls.accept()
            c.sendall(b"c" * args["send"])
            recv_exact(s, args["send"])
            s.sendall(b"s" * args["reply"])
            recv_exact(c, args["reply"])
            pairs.append((c, s))
        infos = quiet(pairs) if args.get("quiet", True) else [(None, None)] * len(pairs)
        say(dict(me, port=port, pairs=[{"client": dict(ends(c), info=ci),
                                         "server": dict(ends(s), info=si)}
                                        for (c, s), (ci, si) in zip(pairs, infos)]))
        while True:
            cmd = sys.stdin.readline().strip()
            if cmd == "info":
                say({"infos": [[tcp_info(c), tcp_info(s)] for c, s in pairs]})
            elif cmd == "close":
                for c, s in pairs:
                    c.close()
                    if s.recv(10):
                        raise SystemExit("unexpected data")
                    s.close()
                gone(port)
                say({"closed": True})
            else:
                break
    elif mode == "connect":  # a client only: connect to a server elsewhere, hold, close
        c = socket.create_connection((args["host"], args["port"]))
        c.sendall(b"c" * args["send"])
        recv_exact(c, args["reply"])
        say(dict(me, conn=ends(c)))
        sys.stdin.readline()
        c.close()
        say({"closed": True})
        sys.stdin.readline()
    elif mode == "serve":  # a server only: answer args["count"] connections, then wait
        ls = socket.socket(FAM)
        ls.bind((args["host"], args["port"]))
        ls.listen(64)
        say(dict(me, port=args["port"]))
        for _ in range(args["count"]):
            s, _ = ls.accept()
            recv_exact(s, args["send"])
            s.sendall(b"s" * args["reply"])
            if s.recv(10):
                raise SystemExit("unexpected data")
            s.close()
        sys.stdin.readline()
    elif mode == "short":  # connections that open and close at once
        ls = socket.socket(FAM)
        ls.bind((args["host"], 0))
        ls.listen(64)
        port = ls.getsockname()[1]
        out = []
        for i in range(args["n"]):
            c = socket.create_connection((args["host"], port))
            s, _ = ls.accept()
            c.sendall(b"c" * (100 + i))
            recv_exact(s, 100 + i)
            s.sendall(b"s" * (200 + i))
            recv_exact(c, 200 + i)
            out.append({"client": ends(c), "server": ends(s), "send": 100 + i, "reply": 200 + i})
            c.close()
            s.recv(10)
            s.close()
        gone(port)
        say(dict(me, port=port, conns=out))
        sys.stdin.readline()
    elif mode == "udp":
        srv = socket.socket(FAM, socket.SOCK_DGRAM)
        srv.bind((args["host"], 0))
        cli = socket.socket(FAM, socket.SOCK_DGRAM)
        cli.connect(srv.getsockname()[:2])
        sizes = args["sizes"]
        for n in sizes:
            cli.send(b"u" * n)
            data, peer = srv.recvfrom(65536)
            assert len(data) == n
            srv.sendto(b"r" * args["reply"], peer)
            assert len(cli.recv(65536)) == args["reply"]
        a = srv.getsockname()[:2]
        say(dict(me, server={"saddr": a[0], "sport": a[1]}, client=ends(cli)))
        sys.stdin.readline()
    elif mode == "udp_peers":  # an unconnected server answering three unconnected clients
        srv = socket.socket(FAM, socket.SOCK_DGRAM)
        srv.bind((args["host"], 0))
        clients = [socket.socket(FAM, socket.SOCK_DGRAM) for _ in range(3)]
        for i, c in enumerate(clients):
            for _ in range(i + 1):
                c.sendto(b"q" * (10 * (i + 1)), srv.getsockname()[:2])
                data, peer = srv.recvfrom(65536)
                srv.sendto(b"a" * (100 * (i + 1)), peer)
                c.recv(65536)
        a = srv.getsockname()[:2]
        say(dict(me, server={"saddr": a[0], "sport": a[1]},
                 clients=[c.getsockname()[1] for c in clients]))
        sys.stdin.readline()
    elif mode == "udp_close":  # a connected client closed after N datagrams, one kept idle
        srv = socket.socket(FAM, socket.SOCK_DGRAM)
        srv.bind((args["host"], 0))
        idle = socket.socket(FAM, socket.SOCK_DGRAM)
        idle.connect(srv.getsockname()[:2])
        idle.send(b"i")
        cli = socket.socket(FAM, socket.SOCK_DGRAM)
        cli.connect(srv.getsockname()[:2])
        first = time.monotonic_ns()
        for i in range(args["n"]):
            last = time.monotonic_ns()
            cli.send(b"d" * args["size"])
            first_after = first_after if i else time.monotonic_ns()
        time.sleep(0.05)
        c = ends(cli)
        cli.close()
        closed = time.monotonic_ns()
        for i in range(args["n"] + 1):
            srv.recv(65536)
        say(dict(me, client=c, idle=ends(idle), first_ns=first, first_after_ns=first_after,
                 last_ns=last, closed_ns=closed))
        sys.stdin.readline()
""")


@pytest.fixture(scope="module", autouse=True)
def traffic_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    path = tmp_path_factory.mktemp("conns") / "traffic.py"
    path.write_text(TRAFFIC)
    Script.path = str(path)
    yield


class Script:
    """The traffic script running in a namespace."""

    path = ""

    def __init__(self, ns: Netns, **args: Any) -> None:
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, sys.executable, self.path, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out = Lines(self.p.stdout)

    def read(self) -> dict[str, Any]:
        line = self.out.get()
        if not line:
            if self.p.poll() is None:
                self.p.kill()
            self.p.wait()
            err = self.p.stderr.read()  # type: ignore[union-attr]
            self._close_pipes()
            raise AssertionError(f"traffic script said nothing: {err}")
        return json.loads(line)  # type: ignore[no-any-return]

    def _close_pipes(self) -> None:
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    def send(self, cmd: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.send("quit")
                self.p.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.p.kill()
                self.p.wait()
        self._close_pipes()


class Lines:
    """Lines of a pipe, read by a thread (``select`` on a buffered pipe misses lines
    already in its buffer); ``get`` returns "" at the end or after ``timeout``."""

    def __init__(self, f: Any) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        self.t = threading.Thread(target=self._run, args=(f,), daemon=True)
        self.t.start()

    def _run(self, f: Any) -> None:
        try:
            for line in f:
                self.q.put(line)
        except (OSError, ValueError):
            pass
        self.q.put("")

    def get(self, timeout: float = PATIENCE_S) -> str:
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return ""

    def rest(self) -> str:
        out = []
        while True:
            try:
                out.append(self.q.get_nowait())
            except queue.Empty:
                return "".join(out)


class Tracer:
    """``nettracer conns --json`` in a subprocess; its reports arrive on a queue."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        e = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
        e.pop("NETTRACER_OUTPUT__FORMAT", None)
        self.p = subprocess.Popen(
            [sys.executable, "-m", "nettracer", "conns", "--json", "--duration", "300", *args],
            cwd=REPO,
            env=e,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reports: list[dict[str, Any]] = []
        self.q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stderr = ""
        self._t: threading.Thread | None = None
        self.err = Lines(self.p.stderr)
        deadline = time.monotonic() + PATIENCE_S
        while time.monotonic() < deadline:
            line = self.err.get(1.0)
            self.stderr += line
            if "tracing connections" in line:
                break
            if self.p.poll() is not None and not line:
                self.stderr += self.err.rest()
                self.close()
                raise AssertionError(f"tracer exited {self.p.returncode}: {self.stderr}")
        else:
            self.close()
            raise AssertionError(f"tracer did not start: {self.stderr}")
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            obj = json.loads(line)
            self.reports.append(obj)
            self.q.put(obj)
        self.q.put(None)

    def next(self) -> dict[str, Any]:
        obj = self.q.get(timeout=PATIENCE_S)
        if obj is None:
            raise AssertionError(f"tracer ended early: {self.stderr}")
        return obj

    def skip(self, n: int) -> dict[str, Any]:
        """The report ``n`` reports from now (so that its interval began after now)."""
        while not self.q.empty():
            self.q.get_nowait()
        obj = {}
        for _ in range(n):
            obj = self.next()
        return obj

    def stop(self) -> list[dict[str, Any]]:
        """SIGINT (the last partial interval is printed), then every report."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
        try:
            self.p.wait(PATIENCE_S)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        if self._t is not None:
            self._t.join(10)
        self.err.t.join(10)
        self.stderr += self.err.rest()
        self.close()
        assert self.p.returncode == 0, self.stderr
        return self.reports

    def close(self) -> None:
        """Kill the tracer if it still runs and close the pipes."""
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        if self._t is not None:
            self._t.join(10)
        for f in (self.p.stdout, self.p.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


@pytest.fixture
def ns() -> Iterator[Netns]:
    with Netns("a") as n:
        yield n


def start_tracer(*args: str, env: dict[str, str] | None = None) -> Tracer:
    try:
        return Tracer(*args, env=env)
    except AssertionError as exc:
        if "offset guesser is not in this build" in str(exc):
            kernel_skip("the offset guesser is not in this build")
        raise


def find(conns: list[dict[str, Any]], ends: dict[str, Any], netns: int) -> list[dict[str, Any]]:
    """Entries with this tuple in this namespace."""
    return [
        c
        for c in conns
        if c["netns"] == netns
        and c["sport"] == ends["sport"]
        and c["dport"] == ends.get("dport", 0)
        and c["saddr"] == ends["saddr"]
        and c["daddr"] == ends.get("daddr", c["daddr"])
    ]


def all_closed(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for r in reports for c in r["closed"]]


def no_loss(reports: list[dict[str, Any]]) -> None:
    assert all(r["evicted"] == 0 and r["lost"] == 0 for r in reports), [
        (r["evicted"], r["lost"]) for r in reports
    ]


def traced_script(
    tracer: Tracer, ns: Netns, **args: Any
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Run the traffic script with ``args`` in ``ns`` under ``tracer``: its first line,
    the second report after it (an interval that began after), and every report."""
    script = Script(ns, **args)
    try:
        truth = script.read()
        report = tracer.skip(2)
        reports = tracer.stop()
    finally:
        script.close()
        tracer.close()
    return truth, report, reports


def udp_tracer(ns: Netns, *args: str, env: dict[str, str] | None = None) -> Tracer | None:
    """The tracer on ``ns`` every 0.5 s (and ``args``); None where the kernel has no UDP
    flows (before 6.3: no sock:sock_send_length), after checking the notice the user
    gets there.  Without ``--udp-peers`` a notice says peers are not counted."""
    tracer = start_tracer("--interval", "0.5", "--netns", str(ns.inode), *args, env=env)
    if "UDP flows are not collected" in tracer.stderr:
        tracer.close()
        notice = "nettracer: notice: UDP flows are not collected: this kernel has no "
        assert f"{notice}sock:sock_send_length tracepoint (Linux 6.3)" in tracer.stderr
        return None
    peers_off = "nettracer: notice: peers of unconnected UDP sockets are not counted"
    assert (peers_off in tracer.stderr) == ("--udp-peers" not in args), tracer.stderr
    return tracer


# -- TCP ----------------------------------------------------------------------------------

TCP_SEND, TCP_REPLY = 3000, 70000


@pytest.mark.parametrize("offsets", ["btf", "guess"])
@pytest.mark.parametrize("family", [4, 6])
def test_tcp(ns: Netns, family: int, offsets: str) -> None:
    """Tuple, pid, comm, netns, direction, bytes, segments, retransmits and RTT of open
    connections against TCP_INFO; then each closed connection once, with its final bytes."""
    if offsets == "btf" and not HAS_BTF:
        return check_no_btf_refused("conns")
    host = "::1" if family == 6 else "127.0.0.1"
    tracer = start_tracer("--interval", "0.5", "--netns", str(ns.inode), "--offsets", offsets)
    script = Script(ns, mode="tcp", family=family, host=host, n=2, send=TCP_SEND, reply=TCP_REPLY)
    try:
        truth = script.read()
        report = tracer.skip(2)  # an interval that began after the connections were quiet
        script.send("info")
        again = script.read()["infos"]
        script.send("close")
        assert script.read() == {"closed": True}
        reports = tracer.stop()
    finally:
        script.close()
        tracer.close()
    assert truth["netns"] == ns.inode
    for pair, (ci, si) in zip(truth["pairs"], again, strict=True):
        assert (pair["client"]["info"], pair["server"]["info"]) == (ci, si), "not quiet"
        for side, sent, got, opened in (
            ("client", TCP_SEND, TCP_REPLY, "active"),
            ("server", TCP_REPLY, TCP_SEND, "passive"),
        ):
            ends, info = pair[side], pair[side]["info"]
            [c] = find(report["conns"], ends, ns.inode)
            assert (c["proto"], c["family"], c["daddr"], c["dport"]) == (
                "tcp",
                family,
                ends["daddr"],
                ends["dport"],
            )
            assert (c["pid"], c["comm"], c["netns"]) == (truth["pid"], truth["comm"], ns.inode)
            assert (c["direction"], c["opened"], c["state"]) == ("local", opened, "ESTABLISHED")
            assert (c["bytes_sent"], c["bytes_received"]) == (sent, got)
            # TCP_INFO: bytes_acked counts the connecting side's SYN
            syn = 1 if side == "client" else 0
            assert (info["bytes_acked"] - syn, info["bytes_received"]) == (sent, got)
            assert (c["segs_in"], c["segs_out"]) == (info["segs_in"], info["segs_out"])
            assert c["retransmits"] == info["total_retrans"]
            assert (c["rtt_us"], c["rtt_var_us"]) == (info["rtt"], info["rttvar"])
            assert c["partial"] is False
            # closed exactly once, with the final bytes and the whole state history
            [f] = find(all_closed(reports), ends, ns.inode)
            assert (f["bytes_sent"], f["bytes_received"]) == (sent, got)
            assert f["id"] == c["id"]
            assert f["state"] == "CLOSE"
            assert f["end"] == "closed"
            expect = (
                ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]
                if side == "client"
                else ["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"]
            )
            assert f["states"] == expect
            assert f["segs_out"] >= info["segs_out"]
            assert f["duration_ms"] > 0
    no_loss(reports)
    # nothing of ours is left open in the last report
    assert not [c for c in reports[-1]["conns"] if c["netns"] == ns.inode and c["proto"] == "tcp"]


def test_tcp_bytes_from_tcp_sock(ns: Netns) -> None:
    """Without the sock_*_length tracepoints (as on Linux 6.1) TCP bytes come from
    tcp_sock.bytes_acked/bytes_received, SYN and FINs taken out: still exact."""
    tracer = start_tracer(
        "--interval", "0.5", "--netns", str(ns.inode), "--bytes-source", "tcp_sock"
    )
    script = Script(ns, mode="tcp", family=4, host="127.0.0.1", n=2, send=1234, reply=4321)
    try:
        truth = script.read()
        report = tracer.skip(2)
        script.send("close")
        assert script.read() == {"closed": True}
        reports = tracer.stop()
    finally:
        script.close()
        tracer.close()
    assert "UDP flows are not collected" in tracer.stderr
    for pair in truth["pairs"]:
        for side, sent, got in (("client", 1234, 4321), ("server", 4321, 1234)):
            [c] = find(report["conns"], pair[side], ns.inode)
            assert (c["bytes_sent"], c["bytes_received"]) == (sent, got)
            # the accepting side's owner comes from tcp:tcp_rcv_space_adjust (recvmsg)
            assert (c["pid"], c["comm"]) == (truth["pid"], truth["comm"])
            [f] = find(all_closed(reports), pair[side], ns.inode)
            assert (f["bytes_sent"], f["bytes_received"]) == (sent, got)
    no_loss(reports)


def test_tcp_retransmits(ns: Netns) -> None:
    """A data segment dropped on input (nftables: the first 20000-byte segment fits the
    quota, its retransmission does not; an output drop would be no retransmission) is
    retransmitted; the tracer's count equals tcpi_total_retrans."""
    rules = textwrap.dedent(f"""
        table inet ntc{PID} {{
            chain in {{
                type filter hook input priority 0; policy accept;
                tcp flags & (syn | fin | rst) == 0 meta length > 1000 quota until 30000 bytes drop
            }}
        }}
    """)
    sh(["ip", "netns", "exec", ns.name, "nft", "-f", "-"], input=rules)
    tracer = start_tracer("--interval", "0.5", "--netns", str(ns.inode))
    script = Script(ns, mode="tcp", family=4, host="127.0.0.1", n=1, send=20000, reply=100)
    try:
        truth = script.read()
        report = tracer.skip(2)
        script.send("close")
        assert script.read() == {"closed": True}
        reports = tracer.stop()
    finally:
        script.close()
        tracer.close()
    [pair] = truth["pairs"]
    info = pair["client"]["info"]
    assert info["total_retrans"] >= 1, "the nftables rule dropped nothing"
    [c] = find(report["conns"], pair["client"], ns.inode)
    assert c["retransmits"] == info["total_retrans"]
    assert (c["segs_out"], c["bytes_sent"]) == (info["segs_out"], 20000)
    [f] = find(all_closed(reports), pair["client"], ns.inode)
    assert f["retransmits"] >= info["total_retrans"]


@pytest.mark.parametrize("perf", [False, True], ids=["default", "perf_event_array"])
def test_short_lived_reported_once(ns: Netns, perf: bool) -> None:
    """Connections that open and close within one interval: each in "closed" exactly once,
    never in "conns", with exact bytes.  Also with ``kernel.without: [ringbuf]`` (as
    before Linux 5.8), where the tracer says it sends through the perf event array."""
    env = None
    if perf:
        forced = os.environ.get("NETTRACER_KERNEL__WITHOUT", "").split(",")
        env = {"NETTRACER_KERNEL__WITHOUT": ",".join({*filter(None, forced), "ringbuf"})}
    tracer = start_tracer("--interval", "3", "--netns", str(ns.inode), "--stats", env=env)
    script = Script(ns, mode="short", family=4, host="127.0.0.1", n=8)
    try:
        truth = script.read()
        reports = tracer.stop()
    finally:
        script.close()
        tracer.close()
    if perf:
        assert {r["stats"]["channel"] for r in reports} == {"perf_event_array"}
    closed = all_closed(reports)
    opened = [c for r in reports for c in r["conns"]]
    for conn in truth["conns"]:
        for side, sent, got in (
            ("client", conn["send"], conn["reply"]),
            ("server", conn["reply"], conn["send"]),
        ):
            [f] = find(closed, conn[side], ns.inode)
            assert (f["bytes_sent"], f["bytes_received"], f["pid"]) == (sent, got, truth["pid"])
            assert not find(opened, conn[side], ns.inode)
    assert len({c["id"] for c in closed if c["netns"] == ns.inode}) == 2 * len(truth["conns"])
    no_loss(reports)


# -- UDP ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_udp(ns: Netns, family: int) -> None:
    """A connected client and an unconnected server socket: datagrams and bytes each way."""
    host = "::1" if family == 6 else "127.0.0.1"
    sizes, reply = [100, 1, 1400, 60000], 321
    tracer = start_tracer("--interval", "0.5", "--netns", str(ns.inode))
    degraded = "UDP flows are not collected" in tracer.stderr
    truth, report, reports = traced_script(
        tracer, ns, mode="udp", family=family, host=host, sizes=sizes, reply=reply
    )
    if degraded:
        # a kernel without sock:sock_send_length (Linux 6.1): said so, and nothing made up
        assert "sock_send_length" in tracer.stderr and "Linux 6.3" in tracer.stderr
        assert not [c for r in reports for c in r["conns"] + r["closed"] if c["proto"] == "udp"]
        return
    k = len(sizes)
    [c] = find(report["conns"], truth["client"], ns.inode)
    assert (c["proto"], c["family"], c["state"], c["direction"]) == (
        "udp",
        family,
        "ESTABLISHED",
        "local",
    )
    assert (c["bytes_sent"], c["segs_out"], c["bytes_received"], c["segs_in"]) == (
        sum(sizes),
        k,
        k * reply,
        k,
    )
    assert (c["pid"], c["comm"], c["rtt_us"]) == (truth["pid"], truth["comm"], None)
    unspecified = "::" if family == 6 else "0.0.0.0"
    [s] = find(report["conns"], dict(truth["server"], daddr=unspecified, dport=0), ns.inode)
    assert (s["state"], s["opened"]) == ("UNCONN", "passive")
    assert (s["bytes_received"], s["segs_in"], s["bytes_sent"], s["segs_out"]) == (
        sum(sizes),
        k,
        k * reply,
        k,
    )
    assert s["pid"] == truth["pid"]
    no_loss(reports)


def test_udp_close_and_idle(ns: Netns) -> None:
    """A connected UDP socket closed after N datagrams is reported once, ``"end":
    "closed"`` (found by NETLINK_SOCK_DIAG, long before the idle timeout), its duration
    between its first and last datagram and its close; a socket open but idle past the
    timeout ends ``"idle"``; neither is reported open after its end."""
    n, size = 3, 700
    tracer = udp_tracer(ns, env={"NETTRACER_NETWORK__UDP_CONN_TIMEOUT_S": "3"})
    if tracer is None:  # before 6.3: the notice, checked
        return
    script = Script(ns, mode="udp_close", family=4, host="127.0.0.1", n=n, size=size)
    try:
        truth = script.read()
        deadline = time.monotonic() + PATIENCE_S
        while time.monotonic() < deadline:
            report = tracer.next()
            if find(report["closed"], truth["idle"], ns.inode):
                break
        tracer.skip(1)
        reports = tracer.stop()
    finally:
        script.close()
        tracer.close()
    [c] = find(all_closed(reports), truth["client"], ns.inode)
    assert (c["end"], c["state"], c["segs_out"], c["bytes_sent"]) == (
        "closed",
        "ESTABLISHED",
        n,
        n * size,
    )
    # the kernel's start is after the first send began, its end after the last one began
    # and before the close (the script's clock is the kernel's: CLOCK_MONOTONIC)
    lo = (truth["last_ns"] - truth["first_after_ns"]) / 1e6
    hi = (truth["closed_ns"] - truth["first_ns"]) / 1e6
    assert lo - 0.001 <= c["duration_ms"] <= hi + 0.001, (lo, c["duration_ms"], hi)
    [i] = find(all_closed(reports), truth["idle"], ns.inode)
    assert (i["end"], i["segs_out"], i["bytes_sent"]) == ("idle", 1, 1)
    for ends, final in ((truth["client"], c), (truth["idle"], i)):
        at = next(k for k, r in enumerate(reports) if final in r["closed"])
        assert not [x for r in reports[at:] for x in find(r["conns"], ends, ns.inode)]
    no_loss(reports)


def test_udp_peers_of_unconnected_sockets(ns: Netns) -> None:
    """An unconnected UDP server answers three unconnected clients: client i sends i+1
    datagrams of 10(i+1) bytes and gets as many of 100(i+1) back.  The server's flow
    lists the three peers with exact bytes and datagrams each way, each client's flow
    the server; nothing is unattributed.  (``--udp-peers``: off by default.)"""
    tracer = udp_tracer(ns, "--udp-peers")
    if tracer is None:  # before 6.3: the notice, checked
        return
    truth, report, reports = traced_script(tracer, ns, mode="udp_peers", family=4, host="127.0.0.1")
    zero = dict.fromkeys(
        ("bytes_sent", "bytes_received", "datagrams_sent", "datagrams_received"), 0
    )
    srv_port = truth["server"]["sport"]
    [s] = find(report["conns"], dict(truth["server"], daddr="0.0.0.0", dport=0), ns.inode)
    assert s["peers"] == sorted(
        (
            {"addr": "127.0.0.1", "port": port, "bytes_sent": 100 * (i + 1) * (i + 1),
             "bytes_received": 10 * (i + 1) * (i + 1), "datagrams_sent": i + 1,
             "datagrams_received": i + 1}
            for i, port in enumerate(truth["clients"])
        ),
        key=lambda p: p["port"],
    )  # fmt: skip
    assert s["unattributed"] == zero
    for i, port in enumerate(truth["clients"]):
        [c] = [
            c for c in report["conns"]
            if c["netns"] == ns.inode and c["sport"] == port and c["proto"] == "udp"
        ]  # fmt: skip
        assert c["peers"] == [
            {"addr": "127.0.0.1", "port": srv_port, "bytes_sent": 10 * (i + 1) * (i + 1),
             "bytes_received": 100 * (i + 1) * (i + 1), "datagrams_sent": i + 1,
             "datagrams_received": i + 1}
        ]  # fmt: skip
        assert c["unattributed"] == zero
    no_loss(reports)


def test_sock_diag_lists_the_udp_sockets(ns: Netns) -> None:
    """UdpSockets: the UDP sockets a process in the namespace holds (a bound IPv4 one,
    a connected IPv6 one), as its getsockname/getpeername say; one it closed is gone."""
    from nettracer.net.sockdiag import UdpSockets

    code = textwrap.dedent("""
        import json, socket, sys
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.bind(("127.0.0.1", 0))
        b = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); b.connect(("::1", 53))
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in (a, b, c)]
        c.close()
        print(json.dumps(ports), flush=True)
        sys.stdin.readline()
    """)
    p = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, sys.executable, "-c", code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    diag = UdpSockets()
    try:
        a, b, c = json.loads(p.stdout.readline())  # type: ignore[union-attr]
        got = diag.tuples(ns.inode, [socket.AF_INET, socket.AF_INET6])
    finally:
        diag.close()
        p.kill()
        p.wait()
    lo6 = socket.inet_pton(socket.AF_INET6, "::1")
    assert got == {
        (socket.AF_INET, socket.inet_aton("127.0.0.1"), a, b"\0" * 4, 0),
        (socket.AF_INET6, lo6, b, lo6, 53),
    }
    assert c not in {t[2] for t in got}


# -- namespaces and gateways ------------------------------------------------------------


@pytest.fixture
def routed() -> Iterator[dict[str, Netns]]:
    with Netns("c") as c, Netns("r") as r, Netns("s") as s:
        c.ip("link", "add", "vc", "type", "veth", "peer", "name", "vr1", "netns", r.name)
        s.ip("link", "add", "vs", "type", "veth", "peer", "name", "vr2", "netns", r.name)
        for n, dev, addr in (
            (c, "vc", "10.77.1.2/24"),
            (r, "vr1", "10.77.1.1/24"),
            (r, "vr2", "10.77.2.1/24"),
            (s, "vs", "10.77.2.2/24"),
        ):
            n.ip("addr", "add", addr, "dev", dev)
            n.ip("link", "set", dev, "up")
        c.ip("route", "add", "default", "via", "10.77.1.1")
        s.ip("route", "add", "default", "via", "10.77.2.1")
        sh(["ip", "netns", "exec", r.name, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        yield {"c": c, "r": r, "s": s}


def test_gateway_through_router(routed: dict[str, Netns]) -> None:
    """A connection from C to S goes via R: gateway 10.77.1.1 on vc, subnet 10.77.1.0/24;
    one from C to R itself is on-link: no gateway, same interface and subnet, in every
    report.  Directions are outgoing in C and incoming in S."""
    c, r, s = routed["c"], routed["r"], routed["s"]
    vc = c.ifindex("vc")
    tracer = start_tracer("--interval", "0.5")
    servers = [
        Script(s, mode="serve", family=4, host="10.77.2.2", port=8080, count=1, send=10, reply=20),
        Script(r, mode="serve", family=4, host="10.77.1.1", port=8081, count=1, send=10, reply=20),
    ]
    clients = []
    try:
        for srv in servers:
            srv.read()
        clients = [
            Script(c, mode="connect", family=4, host="10.77.2.2", port=8080, send=10, reply=20),
            Script(c, mode="connect", family=4, host="10.77.1.1", port=8081, send=10, reply=20),
        ]
        far, near = (cl.read() for cl in clients)
        report = tracer.skip(2)  # an interval that began after both connected
        for cl in clients:
            cl.send("close")
            assert cl.read() == {"closed": True}
        tracer.skip(2)
        reports = tracer.stop()
    finally:
        for sc in clients + servers:
            sc.close()
        tracer.close()
    via = {"via": "10.77.1.1", "dev": "vc", "ifindex": vc, "subnet": "10.77.1.0/24"}
    onlink = dict(via, via=None)
    # every report shows the route, the first one included
    for t, gw in ((far, via), (near, onlink)):
        shown = {
            json.dumps(x["gateway"])
            for r in reports
            for x in find(r["conns"] + r["closed"], t["conn"], c.inode)
        }
        assert shown == {json.dumps(gw)}, shown
    for truth, gw in ((far, via), (near, onlink)):
        [open_] = find(report["conns"], truth["conn"], c.inode)
        assert (open_["direction"], open_["pid"], open_["gateway"]) == (
            "outgoing",
            truth["pid"],
            gw,
        )
        [final] = find(all_closed(reports), truth["conn"], c.inode)
        assert (final["bytes_sent"], final["bytes_received"], final["gateway"]) == (10, 20, gw)
    # the server end in S: incoming, its route back goes via R's other side
    back = {
        "saddr": "10.77.2.2",
        "sport": 8080,
        "daddr": "10.77.1.2",
        "dport": far["conn"]["sport"],
    }
    [srv_end] = find(all_closed(reports), back, s.inode)
    assert srv_end["direction"] == "incoming"
    assert srv_end["gateway"] == {
        "via": "10.77.2.1",
        "dev": "vs",
        "ifindex": s.ifindex("vs"),
        "subnet": "10.77.2.0/24",
    }
    assert (srv_end["bytes_sent"], srv_end["bytes_received"]) == (20, 10)


# -- bounds and the command line ----------------------------------------------------------


def test_evictions_counted(ns: Netns) -> None:
    """More connections than network.max_tracked_connections: never more than that many
    reported open, and what the kernel map evicted is counted."""
    limit, n = 4, 10
    tracer = start_tracer(
        "--interval",
        "0.5",
        "--netns",
        str(ns.inode),
        "--stats",
        env={"NETTRACER_NETWORK__MAX_TRACKED_CONNECTIONS": str(limit)},
    )
    script = Script(ns, mode="tcp", family=4, host="127.0.0.1", n=n, send=10, reply=10, quiet=False)
    try:
        script.read()
        tracer.skip(2)
        reports = tracer.stop()
    finally:
        script.close()
        tracer.close()
    assert all(len(r["conns"]) <= limit for r in reports)
    evicted = sum(r["evicted"] for r in reports)
    seen = {c["id"] for r in reports for c in r["conns"] + r["closed"]}
    created = reports[-1]["stats"]["created_total"]
    assert created >= 2 * n
    # every connection the kernel saw was either reported or counted as evicted
    assert len(seen) + evicted >= created
    assert evicted >= created - len(seen) > 0
    assert all(r["lost"] == 0 for r in reports)


def test_text_output(ns: Netns) -> None:
    """The default table shows the connection's endpoints and gateway column."""
    e = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.Popen(
        [sys.executable, "-m", "nettracer", "conns", "--interval", "0.5", "--netns",
         str(ns.inode), "--no-gateway", "--stats", "--wide"],
        cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    script = None
    err = Lines(p.stderr)
    try:
        started = ""
        while "tracing connections" not in started:
            line = err.get()
            assert line, f"tracer did not start: {started}"
            started += line
        script = Script(ns, mode="tcp", family=4, host="127.0.0.1", n=1, send=5, reply=7)
        truth = script.read()
        script.send("close")
        assert script.read() == {"closed": True}
        p.send_signal(signal.SIGINT)
        out = p.stdout.read()  # type: ignore[union-attr]
        p.wait(PATIENCE_S)
    finally:
        if script is not None:
            script.close()
        if p.poll() is None:
            p.kill()
            p.wait()
        for f in (p.stdout, p.stderr):
            f.close()  # type: ignore[union-attr]
    assert p.returncode == 0, err.rest()
    client = truth["pairs"][0]["client"]
    assert f"127.0.0.1:{client['sport']}" in out
    assert "closed" in out and "GATEWAY" in out and "stats:" in out


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--netns", "/nonexistent/ns"], {}, "--netns /nonexistent/ns"),
        (["--top", "0"], {}, "--top 0"),
        ([], {"NETTRACER_NETWORK__MAX_TRACKED_CONNECTIONS": "0"}, "network.max_tracked_connections"),
        ([], {"NETTRACER_NETWORK__COLLECT_TCP": "false", "NETTRACER_NETWORK__COLLECT_UDP": "no"},
         "network.collect_tcp"),
    ],
)  # fmt: skip
def test_usage_errors(argv: list[str], env: dict[str, str], message: str) -> None:
    e = dict(os.environ, PYTHONPATH=REPO, **env)
    r = subprocess.run(
        [sys.executable, "-m", "nettracer", "conns", "--duration", "1", *argv],
        cwd=REPO, env=e, capture_output=True, text=True, timeout=PATIENCE_S,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


@contextlib.contextmanager
def channel_forced(kind: str) -> Iterator[None]:
    """Tracers started inside use the event channel ``kind``: ``kernel.without`` gains
    ``ringbuf`` for the perf event array, or loses it for the ring buffer."""
    from nettracer.kernel import features

    before = features.current().without
    if kind == "ringbuf":
        if not features.probe("ringbuf"):
            kernel_skip("this kernel has no BPF ring buffer (Linux 5.8)")
        features.configure([f for f in before if f != "ringbuf"])
    else:
        features.configure({*before, "ringbuf"})
    try:
        yield
    finally:
        features.configure(before)


def closed_exactly(truth: dict[str, Any], closed: list[Any]) -> None:
    """Each end of the "short" script's connections closed once, with its bytes."""
    for conn in truth["conns"]:
        for side, sent, got in (
            ("client", conn["send"], conn["reply"]),
            ("server", conn["reply"], conn["send"]),
        ):
            [c] = [
                c
                for c in closed
                if (c.saddr, c.sport, c.daddr, c.dport)
                == tuple(conn[side][k] for k in ("saddr", "sport", "daddr", "dport"))
            ]
            assert (c.bytes_sent, c.bytes_received, c.pid) == (sent, got, truth["pid"])


@pytest.mark.parametrize("channel", ["ringbuf", "perf_event_array"])
def test_full_ring_buffer_loses_nothing(ns: Netns, channel: str) -> None:
    """A one-page ring buffer (22 records), or one-page perf buffers (21 records each),
    and 40 connections (80 records) closed on one CPU between two reads: what the
    channel refused comes through the overflow hash, nothing is lost or evicted.  Then
    one more connection: the perf buffer has room again and the kernel reports every
    refused output lost (``PERF_RECORD_LOST``), which still loses nothing."""
    from nettracer.bpf.counters import counted
    from nettracer.tracers.conns.monitor import ConnMonitor

    cfg = settings(offsets__source=ANY_OFFSETS)
    monitor = ConnMonitor.from_config(cfg, netns=ns.inode, gateway=False, ring_bytes=4096)
    tracer = monitor.tracer
    scripts = []
    try:
        with channel_forced(channel):
            monitor.start()
        assert tracer.opts.channel == channel
        scripts.append(Script(ns, mode="short", family=4, host="127.0.0.1", n=40, cpu=0))
        truth = scripts[-1].read()
        iv = monitor.interval()
        overflowed = tracer.overflowed
        scripts.append(Script(ns, mode="short", family=4, host="127.0.0.1", n=1, cpu=0))
        more = scripts[-1].read()
        after = monitor.interval()
        reported = getattr(tracer._reader, "channel", None)
        if reported is not None:
            refused = counted(reported.lost_map)
            reported = reported.kernel_lost
    finally:
        for script in scripts:
            script.close()
        monitor.close()
    assert overflowed > 0
    assert (iv.lost, iv.evicted, after.lost, after.evicted) == (0, 0, 0, 0)
    closed_exactly(truth, iv.closed)
    closed_exactly(more, after.closed)
    if channel == "perf_event_array":
        assert 0 < reported <= refused  # type: ignore[operator]


def test_pid_filter(ns: Netns) -> None:
    """``--pid``: the server's end is reported, the client's (another process) is not."""
    server = Script(
        ns, mode="serve", family=4, host="127.0.0.1", port=9099, count=1, send=3, reply=4
    )
    client = None
    tracer = None
    try:
        spid = server.read()["pid"]
        tracer = start_tracer("--interval", "0.5", "--netns", str(ns.inode), "--pid", str(spid))
        client = Script(ns, mode="connect", family=4, host="127.0.0.1", port=9099, send=3, reply=4)
        conn = client.read()["conn"]
        client.send("close")
        assert client.read() == {"closed": True}
        tracer.skip(2)
        reports = tracer.stop()
    finally:
        for sc in (client, server):
            if sc is not None:
                sc.close()
        if tracer is not None:
            tracer.close()
    every = [c for r in reports for c in r["conns"] + r["closed"]]
    back = {"saddr": "127.0.0.1", "sport": 9099, "daddr": "127.0.0.1", "dport": conn["sport"]}
    mine = find(every, back, ns.inode)
    assert mine and all(c["pid"] == spid for c in mine)
    assert (mine[-1]["bytes_sent"], mine[-1]["bytes_received"]) == (4, 3)
    assert not find(every, conn, ns.inode)
    assert all(c["pid"] == spid for c in every)
