"""The offset guesser against BTF on the running kernel, its matching rules without a
kernel, its clean-up and its command line.

Ground truth: ``btf_offsets()`` (the BTF of the running kernel) for every guessed field;
the guesser itself never reads BTF.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import subprocess
import sys
import threading

import pytest
from conftest import kernel_before, kernel_skip
from golden import check_golden

from nettracer.layout.catalogue import BY_KEY, CATALOGUE
from nettracer.layout.guess.matchers import Exact, Shifted, u16, u32
from nettracer.layout.guess.verdicts import Observation, decide, resolve

#: how long a test lets one guess take before it gives up: a deadline against a hang,
#: not a timing goal (one guess takes ~1 s here, 4-20 s in a QEMU TCG guest)
DEADLINE_MS = 60_000

pytestmark = []


# -- matching rules (no kernel) --------------------------------------------------------
def test_exact_offsets_respect_alignment() -> None:
    buf = b"\x00\x07\x00\x00\x07\x00\x00\x00"
    assert Exact(b"\x07").offsets(buf) == {1, 4}
    assert u16(7).offsets(buf) == {4}
    assert u32(7).offsets(buf) == {4}
    assert u32(7).offsets(buf, limit=4) == set()


def test_shifted_matches_srtt_as_tcp_info_reports_it() -> None:
    # tcpi_rtt = srtt_us >> 3: srtt_us 8*37+5 is reported as 37
    buf = (0).to_bytes(4, "little") + (8 * 37 + 5).to_bytes(4, "little")
    m = Shifted(37, 3)
    assert m.offsets(buf) == {4}
    assert m.matches(buf, 4) and not m.matches(buf, 0)


def test_unique_offset_across_different_values_is_resolved() -> None:
    a = bytes([0, 0, 5, 0, 9, 0])
    b = bytes([0, 0, 6, 0, 9, 0])
    obs = [Observation(a, {"f": Exact(b"\x05")}), Observation(b, {"f": Exact(b"\x06")})]
    v = resolve("f", obs)
    assert v.ok and v.offset == 2 and v.n == 2


def test_same_value_everywhere_is_not_enough() -> None:
    a = bytes([0, 0, 5, 0])
    obs = [Observation(a, {"f": Exact(b"\x05")}), Observation(a, {"f": Exact(b"\x05")})]
    v = resolve("f", obs)
    assert not v.ok and "same value" in v.why


def test_ambiguous_and_contradictory_observations_are_unresolved() -> None:
    a = bytes([5, 0, 5, 0])
    b = bytes([6, 0, 6, 0])
    obs = [Observation(a, {"f": Exact(b"\x05")}), Observation(b, {"f": Exact(b"\x06")})]
    v = resolve("f", obs)
    assert not v.ok and v.why.startswith("ambiguous: offsets 0, 2")
    c = bytes([7, 0, 0, 0])
    v = resolve("f", [*obs, Observation(c, {"f": Exact(b"\x08")})])
    assert not v.ok and v.why.startswith("no offset matches all 3")
    assert not decide("f", [], set()).ok


def _probe_specs() -> list:
    from nettracer.layout.guess import run as guess

    return [guess.SOCK_RECV, guess.START_XMIT, guess.NETIF_RX, *guess.FALLBACK]


@pytest.mark.parametrize("spec", _probe_specs(), ids=lambda s: s.tracepoint)
def test_probe_program_listings(spec) -> None:  # type: ignore[no-untyped-def]
    from nettracer.layout.guess import probes

    check_golden(f"guess_{spec.tracepoint}", probes.program(spec).listing())
    assert probes.build(spec) == tuple(probes.program(spec).insns)
    assert spec.record_size % 8 == 0
    assert spec.deref_offset + (spec.deref.slots * spec.deref.size if spec.deref else 0) <= (
        spec.record_size
    )


@pytest.mark.parametrize("spec", _probe_specs(), ids=lambda s: s.tracepoint)
def test_probe_program_listings_perf_event_array(spec) -> None:  # type: ignore[no-untyped-def]
    """Without a ring buffer (before 5.8) the same program builds its record in the perf
    event array's per-CPU slot, which every record fits (a perf sample is at most 64 KiB)."""
    from nettracer.layout.guess import probes

    check_golden(
        f"guess_{spec.tracepoint}_perf", probes.program(spec, None, "perf_event_array").listing()
    )
    assert spec.record_size <= probes.RECORD_MAX < 65_500


#: the classic tracepoint records the guesser reads, laid out as Linux 6.18's
#: events/<category>/<name>/format files say: (argument, offset, size)
CLASSIC_6_18 = {
    "sock_recv_length": ("sock", (("sk", 8, 8), ("ret", 20, 4), ("flags", 24, 4))),
    "tcp_rcv_space_adjust": ("tcp", (("sk", 8, 8),)),
    "inet_sock_set_state": ("sock", (("sk", 8, 8), ("oldstate", 16, 4), ("newstate", 20, 4))),
    "net_dev_start_xmit": ("net", (("skb", 16, 8),)),
    "netif_rx": ("net", (("skb", 8, 8),)),
}


def _classic_specs() -> list:
    from nettracer.layout.guess import run as guess

    specs = [guess.SOCK_RECV, guess.START_XMIT_CLASSIC, guess.NETIF_RX, *guess.FALLBACK]
    return [s for s in specs if s.tracepoint in CLASSIC_6_18]


@pytest.mark.parametrize("spec", _classic_specs(), ids=lambda s: s.tracepoint)
def test_probe_program_listings_classic_tracepoints(spec) -> None:  # type: ignore[no-untyped-def]
    """Without raw tracepoints (before 4.17) each argument comes from the classic
    record at the offset its format file gives; ``net_dev_start_xmit`` has no ``dev``,
    read instead through ``ctl.slot`` once a round has found ``sk_buff.dev``."""
    from nettracer.kernel.tracepoints import TracepointArgs
    from nettracer.layout.guess import probes

    category, fields = CLASSIC_6_18[spec.tracepoint]
    args = TracepointArgs(spec.tracepoint, category, False, fields)
    listing = probes.program(spec, None, "ringbuf", args).listing()
    check_golden(f"guess_{spec.tracepoint}_classic", listing)
    assert spec.record_size <= probes.RECORD_MAX
    if spec.via:  # and both fallbacks at once
        perf = probes.program(spec, None, "perf_event_array", args).listing()
        check_golden(f"guess_{spec.tracepoint}_classic_perf", perf)


def test_probe_programs_follow_the_read_helper_choice() -> None:
    from nettracer.bpf.memory import KernelReads
    from nettracer.layout.guess import probes
    from nettracer.layout.guess import run as guess

    modern = probes.program(guess.SOCK_RECV).listing()
    legacy = probes.program(guess.SOCK_RECV, KernelReads(legacy=True)).listing()
    assert "probe_read_kernel" in modern
    assert legacy == modern.replace("call probe_read_kernel#113", "call probe_read#4")


def test_rtnetlink_attributes_are_padded() -> None:
    from nettracer.layout.guess.rtnl import attr

    a = attr(3, b"lo\0")
    assert a == b"\x07\x00\x03\x00lo\x00\x00" and len(a) % 4 == 0


# -- the real kernel ---------------------------------------------------------------------
def _btf() -> dict:
    from nettracer.layout.btf_offsets import btf_offsets

    try:
        b = btf_offsets()
    except Exception as exc:  # no BTF: nothing to compare with
        kernel_skip(f"no BTF to compare guessed offsets with ({exc})")
    assert not b.unresolved, b.unresolved
    return b.to_json()


def _check(result, btf: dict) -> list[str]:  # type: ignore[no-untyped-def]
    got = result.offsets.to_json()
    problems = [
        f"{k}: unresolved ({result.offsets.unresolved[k]})" for k in result.offsets.unresolved
    ]
    problems += [f"{k}: guessed {got[k]} BTF {btf[k]}" for k in got if got[k] != btf.get(k)]
    return problems


def _our_bpf_programs(settle_s: float = 3.0) -> list[str]:
    """Names of loaded programs the guesser makes (``ntg_*``), from bpftool when present;
    the kernel frees a closed program after an RCU grace period, so wait for that."""
    import time

    end = time.monotonic() + settle_s
    while True:
        names = _bpftool_ntg()
        if not names or time.monotonic() > end:
            return names
        time.sleep(0.05)


def _bpftool_ntg() -> list[str]:
    try:
        out = subprocess.run(
            ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    with contextlib.suppress(ValueError):
        return [
            p.get("name", "")
            for p in json.loads(out.stdout or "[]")
            if p.get("name", "").startswith("ntg_")
        ]
    return []


def _assert_cleaned_up(result) -> None:  # type: ignore[no-untyped-def]
    from nettracer.bpf.fd import live_objects

    assert not [o for o in live_objects() if o.kind in ("link", "program")]
    assert not [t for t in threading.enumerate() if t.name == "nettracer-guess"]
    # our threads are all back in the host namespace; the private ones are unreachable
    ours = set()
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/ns/net"):
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            ours.add(os.stat(path).st_ino)
    assert not ours & set(result.netns_inodes)
    host = set(socket.if_nameindex())
    assert not [n for _, n in host if n in result.devices]


@pytest.mark.kernel
def test_guess_equals_btf_twenty_times() -> None:
    from nettracer.layout.guess import guess

    btf = _btf()
    failures = []
    for i in range(20):
        r = guess(timeout_ms=DEADLINE_MS)
        failures += [f"run {i}: {p}" for p in _check(r, btf)]
        _assert_cleaned_up(r)
    assert not failures, failures
    assert set(btf) == {f.key for f in CATALOGUE}


@pytest.mark.kernel
def test_guess_equals_btf_under_background_load() -> None:
    """Threads in the host namespace open and close TCP connections and send UDP to
    closed ports while guessing: none of it may reach the guesser."""
    from nettracer.layout.guess import guess

    btf = _btf()
    stop = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)

    def accept() -> None:
        while not stop.is_set():
            try:
                s, _ = listener.accept()
            except OSError:
                return
            s.close()

    def tcp() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                c = socket.create_connection(listener.getsockname(), timeout=1)
                c.send(b"x" * 100)
                c.close()

    def udp() -> None:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()  # nobody listens there any more: ICMP port unreachable, kfree_skb
        while not stop.is_set():
            with contextlib.suppress(OSError):
                u.sendto(b"y" * 64, ("127.0.0.1", port))
        u.close()

    threads = [threading.Thread(target=f, daemon=True) for f in (accept, tcp, tcp, udp, udp)]
    for t in threads:
        t.start()
    failures = []
    try:
        for i in range(8):
            r = guess(timeout_ms=DEADLINE_MS)
            failures += [f"run {i}: {p}" for p in _check(r, btf)]
    finally:
        stop.set()
        listener.close()
        for t in threads:
            t.join(5)
    assert not failures, failures


@pytest.mark.kernel
def test_pre_6_3_tracepoints_give_the_same_offsets() -> None:
    """The path for kernels without sock_recv_length (receive-queue overflows,
    tcp_rcv_space_adjust, inet_sock_set_state), forced here."""
    from nettracer.layout.guess import guess

    btf = _btf()
    failures = []
    for i in range(3):
        r = guess(timeout_ms=DEADLINE_MS, force_fallback=True)
        assert r.fallback
        failures += [f"run {i}: {p}" for p in _check(r, btf)]
        _assert_cleaned_up(r)
    assert not failures, failures


@contextlib.contextmanager
def _kernel_without(*names: str):  # type: ignore[no-untyped-def]
    """``kernel.without`` as the CLI sets it, for the duration of the block."""
    from nettracer.kernel import features

    before = features.current().without
    features.configure({*before, *names})
    try:
        yield
    finally:
        features.configure(before)


ALL_FALLBACKS = ("ringbuf", "raw_tracepoint", "probe_read_kernel", "atomic_fetch", "batch_ops")


@pytest.mark.kernel
@pytest.mark.parametrize("fallback", [False, True], ids=["modern", "pre-6.3"])
@pytest.mark.parametrize(
    "without",
    [("ringbuf",), ("raw_tracepoint",), ("ringbuf", "raw_tracepoint"), ALL_FALLBACKS],
    ids=["ringbuf", "raw_tracepoint", "ringbuf+raw_tracepoint", "all"],
)
def test_guess_without_kernel_features_equals_btf(without: tuple, fallback: bool) -> None:
    """Every fallback forced (``kernel.without``): records through the perf event array
    (before 5.8), the programs on classic tracepoints (before 4.17), ``bpf_probe_read``
    (before 5.5); the guess equals BTF field by field."""
    from nettracer.kernel import features
    from nettracer.layout.guess import guess

    btf = _btf()
    failures = []
    with _kernel_without(*without):
        for i in range(3):
            r = guess(timeout_ms=DEADLINE_MS, force_fallback=fallback)
            # "modern" is the pre-6.3 path too on a kernel without sock_send_length
            assert r.fallback == (fallback or kernel_before(6, 3))
            # before 6.3 without raw tracepoints: two probes' records hold no socket
            lacking = r.fallback and not features.current().use("raw_tracepoint")
            assert any("udp_fail_queue_rcv_skb (no sk)" in n for n in r.notes) == lacking
            failures += [f"run {i}: {p}" for p in _check(r, btf)]
            _assert_cleaned_up(r)
    assert not failures, failures


@pytest.mark.kernel
def test_classic_start_xmit_copies_dev_and_sk_through_their_slots() -> None:
    """Once user space gives the slots (here BTF's sk_buff.dev and sk_buff.sk), the
    classic net_dev_start_xmit program copies the net_device and the sending socket:
    a datagram of ours on lo shows lo's name and ifindex and our port and protocol."""
    from nettracer.layout.guess import probes
    from nettracer.layout.guess import run as guess

    btf = _btf()
    off = {k: v["offset"] for k, v in btf.items()}
    spec = guess.START_XMIT_CLASSIC
    records: list = []
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with _kernel_without("raw_tracepoint"), probes.ProbeSet(1 << 20) as ps, rx, tx:
        assert ps.add(spec) and not ps.raw
        ps.point(guess.VIA_DEV.slot, off["sk_buff.dev"])
        ps.point(guess.VIA_SK.slot, off["sk_buff.sk"])
        rx.bind(("127.0.0.1", 0))
        tx.bind(("127.0.0.1", 0))
        ps.arm(threading.get_native_id(), 1)
        tx.sendto(b"slots", rx.getsockname())
        ps.disarm()
        port = tx.getsockname()[1]
        ps.drain(records.append)
    ours = [r for r in records if r.step == 1]
    assert ours, "no record of our datagram"
    lo = socket.if_nametoindex("lo")
    for r in ours:
        assert r.arg("dev") and r.arg("sk")
        dev = r.snapshot(spec.snapshot_index("dev"))
        sk = r.snapshot(spec.snapshot_index("sk"))
        name = off["net_device.name"]
        assert dev[name : name + 16] == b"lo".ljust(16, b"\0")
        assert int.from_bytes(dev[off["net_device.ifindex"] :][:4], "little") == lo
        assert int.from_bytes(sk[off["sock_common.skc_num"] :][:2], "little") == port
        proto = off["sock.sk_protocol"]
        assert int.from_bytes(sk[proto : proto + 2], "little") == socket.IPPROTO_UDP


@pytest.mark.kernel
@pytest.mark.parametrize("without", [(), ("raw_tracepoint",)], ids=["raw", "classic"])
def test_without_tcp_rcv_space_adjust_tcp_sock_fields_are_said_not_guessed(
    monkeypatch: pytest.MonkeyPatch, without: tuple
) -> None:
    """Before 4.20 (every kernel without raw tracepoints among them) there is no
    tcp_rcv_space_adjust: tcp_sock fields are left out with one notice, every other
    field equals BTF (sk_buff.sk then from the senders' ports behind the sk_buff)."""
    from nettracer.bpf import link
    from nettracer.layout.guess import probes
    from nettracer.layout.guess import run as guess

    real = probes.raw_args

    def before_4_20(spec):  # type: ignore[no-untyped-def]
        if spec.tracepoint == "tcp_rcv_space_adjust":
            raise link.UnknownTracepoint("unknown tracepoint 'tcp_rcv_space_adjust'")
        return real(spec)

    btf = _btf()
    monkeypatch.setattr(probes, "raw_args", before_4_20)
    tcp = {f.key for f in CATALOGUE if f.struct == "tcp_sock"}
    with _kernel_without(*without):
        for _ in range(2):
            r = guess.guess(timeout_ms=DEADLINE_MS, force_fallback=True)
            _never_wrong(r, btf)
            assert set(r.offsets.unresolved) == tcp
            why = set(r.offsets.unresolved.values())
            assert len(why) == 1 and "no tracepoint tcp_rcv_space_adjust (Linux 4.20)" in why.pop()
            assert sum(n.startswith("not guessed: tcp_sock.") for n in r.notes) == 1


def _never_wrong(r, btf: dict) -> None:  # type: ignore[no-untyped-def]
    """Every resolved field equals BTF (unresolved ones are allowed, with a reason)."""
    got = r.offsets.to_json()
    assert {k: v for k, v in got.items() if v != btf[k]} == {}
    assert all(r.offsets.unresolved.values())


@pytest.mark.kernel
def test_without_veth_name_and_ifindex_are_unresolved_not_wrong(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    from nettracer.layout.guess import rtnl
    from nettracer.layout.guess import run as guess

    def no_veth(self, *args) -> None:  # type: ignore[no-untyped-def]
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    btf = _btf()
    monkeypatch.setattr(rtnl.Rtnl, "add_veth", no_veth)
    for _ in range(3):
        r = guess.guess(timeout_ms=DEADLINE_MS)
        _never_wrong(r, btf)
        assert set(r.offsets.unresolved) == {"net_device.name", "net_device.ifindex"}
        assert "no veth pair" in r.offsets.unresolved["net_device.ifindex"]


@pytest.mark.kernel
def test_without_ipv6_nothing_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    from nettracer.layout.guess import run as guess
    from nettracer.layout.guess import traffic

    real = traffic.Traffic.udp

    def v4_only(self, name, fam, bind, ns="A"):  # type: ignore[no-untyped-def]
        if fam == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real(self, name, fam, bind, ns)

    btf = _btf()
    monkeypatch.setattr(traffic.Traffic, "udp", v4_only)
    for _ in range(3):
        r = guess.guess(timeout_ms=DEADLINE_MS)
        _never_wrong(r, btf)
        v6 = {"sock_common.skc_v6_daddr", "sock_common.skc_v6_rcv_saddr"}
        # IPv4 and ARP tell sk_buff.protocol, UDP and TCP headroom network_header,
        # AF_UNIX skc_family (AF_UNIX needs sock_recv_length, Linux 6.3)
        assert v6 <= set(r.offsets.unresolved) <= v6 | {"sock_common.skc_family"}
        if not r.fallback:
            assert set(r.offsets.unresolved) == v6
        assert "no IPv6" in r.offsets.unresolved["sock_common.skc_v6_daddr"]


@pytest.mark.kernel
def test_timeout_leaves_nothing_behind() -> None:
    from nettracer.layout.guess import GuessTimeout, guess

    with pytest.raises(GuessTimeout, match="timed out after 1 ms"):
        guess(timeout_ms=1)
    from nettracer.bpf.fd import live_objects

    assert not [o for o in live_objects() if o.kind in ("link", "program")]
    assert not [t for t in threading.enumerate() if t.name == "nettracer-guess"]
    assert not _our_bpf_programs()


@pytest.mark.kernel
def test_unknown_required_tracepoint_is_not_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    from nettracer.errors import NotSupported
    from nettracer.layout.guess import probes

    tp = probes.Tracepoint("no_such_tracepoint_ntg", ("sk",), "99.0")
    monkeypatch.setitem(probes.TRACEPOINTS, tp.name, tp)
    spec = probes.ProbeSpec(9, tp.name, (probes.Snapshot("sk", 64),))
    with probes.ProbeSet(1 << 16) as ps, pytest.raises(NotSupported, match=r"needs Linux 99\.0"):
        ps.add(spec)
    optional = probes.ProbeSpec(9, tp.name, (probes.Snapshot("sk", 64),), required=False)
    with probes.ProbeSet(1 << 16) as ps:
        assert ps.add(optional) is False and ps.missing == [tp.name]


@pytest.mark.kernel
def test_namespace_failure_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from nettracer.bpf.fd import live_objects
    from nettracer.layout.guess import netns
    from nettracer.layout.guess import run as guess

    def refuse(flags: int) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(netns, "unshare", refuse)
    with pytest.raises(netns.NamespaceError, match="cannot create a network namespace") as exc:
        guess.guess(timeout_ms=5000)
    assert "\n" not in str(exc.value)
    assert not [o for o in live_objects() if o.kind in ("link", "program")]
    assert not [t for t in threading.enumerate() if t.name == "nettracer-guess"]


def test_not_root_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from nettracer.errors import PermissionError_
    from nettracer.layout.guess import run as guess

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionError_, match="needs root"):
        guess.guess()


# -- the command line --------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nettracer", "offsets", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.kernel
def test_cli_json_shape_and_verify(tmp_path) -> None:  # type: ignore[no-untyped-def]
    btf = _btf()
    p = _cli("--source", "guess", "--verify", "--json", "--cache-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    obj = json.loads(p.stdout)
    assert set(obj) == {"kernel", "source", "elapsed_ms", "fields", "unresolved", "verified"}
    assert set(obj["kernel"]) == {"release", "version", "machine", "btf_sha256"}
    assert obj["kernel"]["release"] == os.uname().release
    assert obj["source"] == "guess" and isinstance(obj["elapsed_ms"], float)
    assert obj["fields"] == btf and obj["unresolved"] == {}
    assert obj["verified"] == dict.fromkeys(BY_KEY, True)


@pytest.mark.kernel
def test_cli_verify_exits_3_on_a_wrong_profile(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _btf()
    good = tmp_path / "good.json"
    p = _cli("--source", "btf", "--save", str(good), "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(good.read_text())
    data["fields"]["sk_buff.len"]["offset"] += 8
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    p = _cli("--profile", str(bad), "--verify", "--json")
    assert p.returncode == 3
    assert json.loads(p.stdout)["verified"]["sk_buff.len"] is False
    assert p.stderr.count("\n") == 1 and "sk_buff.len" in p.stderr
    p = _cli("--profile", str(good), "--verify")
    assert p.returncode == 0, p.stderr
    assert "sk_buff.len" in p.stdout


def test_cli_usage_errors_are_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = _cli("--force")
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    p = _cli("--profile", str(tmp_path / "missing.json"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "missing.json" in p.stderr
    p = _cli("--timeout-ms", "0")
    assert p.returncode == 2 and p.stderr.count("\n") == 1
