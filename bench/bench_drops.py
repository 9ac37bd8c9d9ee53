"""``nettracer drops`` side by side with bpftrace's kfree_skb one-liner, on the same drops.

Run as root from the repository: ``python3 bench/bench_drops.py [--drops N] [--rounds R]
[--seconds S] [--solo R] [--startups K] [--installed VENV] [--other-repo PATH] [--guess]
[--without LIST|all] [--events] [--parts startup,shared,solo,workload]
[--only-startup]``.  It builds two network namespaces (blaster B, target T, one veth
pair with static neighbours; removed at the end) and measures:

1. start-up, command start to attached, for ``nettracer drops`` (with its byte-code
   cached, without, and -- with ``--installed VENV`` -- as ``pip install`` puts it in a
   virtual environment: byte-code compiled at install time, no editable finder, run as
   ``VENV/bin/nettracer drops`` from ``/``) and for
   ``bpftrace -e 'tracepoint:skb:kfree_skb { @[ksym(args->location), args->reason] = count(); }'``,
   all detected the same way, timed from just before the process is spawned: one of
   the command's file descriptors is a program attached to ``kfree_skb``
   (``BPF_TASK_FD_QUERY`` on each descriptor of that pid, what ``bpftool perf list``
   asks for every process; polled every 0.5 ms; ``--detect bpftool`` polls ``bpftool
   perf list`` itself, some 10 ms a round) (median of K starts each, interleaved,
   after one unmeasured start of each); next to the wall time, the CPU time each
   command used until then (all threads, exited ones too: a cgroup v2 leaf per start),
   which other load on a shared machine stretches less;
2. (``shared``) with both attached at once, plus an empty raw_tp program on
   ``kfree_skb`` (the floor), N UDP datagrams from B to a closed port in T: BPF run
   time / run count of each program over exactly that window (``BPF_ENABLE_STATS``),
   and the counts: drops caused, ours for T's namespace, ours summed over every
   namespace at (location, reason) -- the key bpftrace has -- and bpftrace's;
   (``solo``, issue 15's figure) each program attached alone, in turn, R rounds of N
   drops: ours (default options; with ``--guess`` also ``--offsets guess``; with
   ``--other-repo`` also that checkout's; with ``--without LIST`` also ours with those
   kernel features forced away, ``NETTRACER_KERNEL__WITHOUT=LIST``, start-up too; with
   ``--events`` also ``--events`` through the ring buffer and the perf event array),
   each of ours with its counts for T's namespace next to the drops caused, bpftrace
   with our key (location, reason, protocol, ifindex, netns inode) and bpftrace with
   location and reason only;
3. the send rate of the same blaster for S seconds, alternating without / with
   ``nettracer drops`` attached / (``--without``) with it and those features forced
   away / with bpftrace attached (for reference), R rounds in an order that rotates
   from round to round (the ratio of medians, and the median of each round's own
   ratio to the run without, which cancels drift slower than a round), per wall
   second and per CPU second of the blaster (the drop path runs in its sendto() calls,
   so this is the whole cost: run_time_ns leaves out what the kernel does around a
   program, e.g. a classic tracepoint's record; CPU time is
   what other load on a shared machine does not disturb);
4. the peak RSS (``VmHWM``) of ``nettracer drops`` in those runs (``--only-startup``:
   while it prints the drops of an S-second blast, after measuring start-up only).

The cost figure for "ours" is the CLI's own program (found by pid in ``bpftool perf
list``), running with the default options (no filters), so it is what a user runs.
Other processes on the machine may cause drops too: they reach all three programs
alike and do not change the cost ratios; they can make the all-namespace counts exceed
the drops caused, which is why ours is also given for T alone.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BPFTRACE_PROG = "tracepoint:skb:kfree_skb { @[ksym(args->location), args->reason] = count(); }"
BPFTRACE = ["bpftrace", "-e", BPFTRACE_PROG]
#: bpftrace with the key of ``nettracer drops`` (issue 15): location, reason, protocol,
#: device index and network namespace inode
BPFTRACE_SAME_KEY_PROG = (
    "tracepoint:skb:kfree_skb { $s = (struct sk_buff *)args->skbaddr; "
    "@[ksym(args->location), args->reason, args->protocol, $s->dev->ifindex, "
    "$s->dev->nd_net.net->ns.inum] = count(); }"
)
BPFTRACE_SAME_KEY = ["bpftrace", "-e", BPFTRACE_SAME_KEY_PROG]
OURS = [sys.executable, "-m", "nettracer", "drops"]
PID = os.getpid()
BNS, TNS = f"ntbb{PID}", f"ntbt{PID}"
TARGET = "10.203.0.2"

BLASTER = """
import resource, socket, sys, time
mode, amount = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
send, dst, data = s.sendto, ('TARGET', 9), b'x' * 16
if mode == 'count':
    for _ in range(int(amount)):
        send(data, dst)
    print(int(amount))
else:
    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    n, t0, c0 = 0, time.perf_counter(), cpu()
    end = t0 + amount
    while True:
        for _ in range(1000):
            send(data, dst)
        n += 1000
        now = time.perf_counter()
        if now >= end:
            break
    print(n / (now - t0), n / (cpu() - c0))
""".replace("TARGET", TARGET)


def sh(*cmd: str, ns: str | None = None, check: bool = True) -> str:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    r = subprocess.run(full, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(full)}: {r.stderr.strip()}")
    return r.stdout


def setup() -> int:
    """The two namespaces; returns T's namespace inode."""
    for ns in (BNS, TNS):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", BNS, "link", "add", "bb", "address", "02:00:00:00:03:01", "type", "veth",
       "peer", "name", "bt", "address", "02:00:00:00:03:02", "netns", TNS)  # fmt: skip
    for ns, dev, me, peer, mac in ((BNS, "bb", 1, 2, "02:00:00:00:03:02"),
                                   (TNS, "bt", 2, 1, "02:00:00:00:03:01")):  # fmt: skip
        sh("ip", "-n", ns, "addr", "add", f"10.203.0.{me}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "neigh", "replace", f"10.203.0.{peer}", "lladdr", mac, "dev", dev,
           "nud", "permanent")  # fmt: skip
    # ICMP errors cost the target CPU time unrelated to tracing: do not send them
    sh("sysctl", "-qw", "net.ipv4.icmp_ratelimit=1000000", ns=TNS)
    return os.stat(f"/run/netns/{TNS}").st_ino


def teardown() -> None:
    for ns in (BNS, TNS):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    leaf = CpuAccount()  # our cgroup leaves of commands that did not stop normally
    if leaf.path is not None:
        parent = os.path.dirname(leaf.path)
        leaf.remove()
        for name in os.listdir(parent):
            if name.startswith(f"ntbench-{PID}-"):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(parent, name))


def blast(mode: str, amount: float) -> float:
    """``count``: send ``amount`` datagrams, returns how many; ``rate``: send for ``amount``
    seconds, returns datagrams per second of wall time (per CPU second: :func:`blast_rates`)."""
    return blast_rates(mode, amount)[0]


def blast_rates(mode: str, amount: float) -> tuple[float, ...]:
    out = sh(sys.executable, "-c", BLASTER, mode, str(amount), ns=BNS)
    return tuple(float(x) for x in out.split())


def perf_attached(pid: int) -> int | None:
    """The id of the program ``pid`` has attached to kfree_skb (bpftool perf list)."""
    out = subprocess.run(["bpftool", "perf", "list", "--json"], capture_output=True, text=True)
    try:
        entries = json.loads(out.stdout or "[]")
    except json.JSONDecodeError:
        return None
    for e in entries:
        if e.get("pid") == pid and e.get("tracepoint") == "kfree_skb":
            return int(e["prog_id"])
    return None


#: ``BPF_TASK_FD_QUERY`` (include/uapi/linux/bpf.h, Linux 4.18)
_BPF_TASK_FD_QUERY = 20
_SYS_BPF = {"x86_64": 321, "aarch64": 280}[platform.machine()]
_libc = ctypes.CDLL(None, use_errno=True)


class _TaskFdQuery(ctypes.Structure):
    """``union bpf_attr``'s ``task_fd_query`` member."""

    _fields_ = (
        ("pid", ctypes.c_uint32),
        ("fd", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("buf_len", ctypes.c_uint32),
        ("buf", ctypes.c_uint64),
        ("prog_id", ctypes.c_uint32),
        ("fd_type", ctypes.c_uint32),
        ("probe_offset", ctypes.c_uint64),
        ("probe_addr", ctypes.c_uint64),
    )


_NAME = ctypes.create_string_buffer(256)
_ATTR = _TaskFdQuery()


def fd_attached(pid: int) -> int | None:
    """The id of the program ``pid`` has attached to kfree_skb, asked of the kernel for
    each of its file descriptors (what ``bpftool perf list`` does for every process)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for name in fds:
        ctypes.memset(ctypes.addressof(_ATTR), 0, ctypes.sizeof(_ATTR))
        _ATTR.pid, _ATTR.fd = pid, int(name)
        _ATTR.buf, _ATTR.buf_len = ctypes.addressof(_NAME), len(_NAME)
        ret = _libc.syscall(
            _SYS_BPF, ctypes.c_int(_BPF_TASK_FD_QUERY), ctypes.byref(_ATTR),
            ctypes.c_uint(ctypes.sizeof(_ATTR)),
        )  # fmt: skip
        if ret == 0 and _NAME.value == b"kfree_skb":
            return int(_ATTR.prog_id)
    return None


#: how attachment is detected (``--detect``): fdquery (default) or bpftool
DETECT = {"how": "fdquery"}


def attached(pid: int) -> int | None:
    if DETECT["how"] == "bpftool":
        return perf_attached(pid)
    prog_id = fd_attached(pid)
    if prog_id is None:
        time.sleep(0.0005)
    return prog_id


@dataclass
class Started:
    proc: subprocess.Popen[str]
    prog_id: int
    seconds: float  # command start to attached
    cpu: float = float("nan")  # seconds on a CPU until then, all its threads
    account: CpuAccount | None = None


def cpu_seconds(pid: int) -> float:
    """Time the live threads of ``pid`` have run on a CPU (``/proc/PID/task/*/schedstat``,
    nanoseconds).  Threads that have exited are missing: the fallback of
    :class:`CpuAccount`."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return total / 1e9


class CpuAccount:
    """CPU time of one started command, all its threads (exited ones too) and children:
    ``usage_usec`` of a cgroup v2 leaf of its own, made inside the bench's own cgroup
    (which has no controllers enabled for it, so nothing but the accounting changes),
    joined by the child before it executes the command.  Without a cgroup2 mount, or
    when the leaf cannot be made, the live threads' schedstat (:func:`cpu_seconds`)."""

    serial = 0

    def __init__(self) -> None:
        self.path: str | None = None
        root = _cgroup2_root()
        if root is None:
            return
        try:
            with open("/proc/self/cgroup") as f:
                own = next(line[3:].strip() for line in f if line.startswith("0::"))
        except (OSError, StopIteration):
            return
        CpuAccount.serial += 1
        path = os.path.join(root, own.lstrip("/"), f"ntbench-{PID}-{CpuAccount.serial}")
        try:
            os.mkdir(path)
        except OSError:
            return
        self.path = path

    def join(self) -> None:
        """In the child, before exec: move into the leaf."""
        if self.path is not None:
            with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    def seconds(self, pid: int) -> float:
        if self.path is None:
            return cpu_seconds(pid)
        with open(os.path.join(self.path, "cpu.stat")) as f:
            for line in f:
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
        return float("nan")

    def path_and_remove(self) -> str | None:
        """Whether a leaf could be made (and none is left)."""
        path = self.path
        self.remove()
        return path

    def remove(self) -> None:
        """After the command exited (the leaf must be empty)."""
        if self.path is not None:
            for _ in range(100):
                try:
                    os.rmdir(self.path)
                    return
                except OSError:
                    time.sleep(0.01)


def _cgroup2_root() -> str | None:
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == "cgroup2":
                    return fields[1]
    except OSError:
        pass
    return None


#: environment of "installed" runs: byte-code cached (pip compiles it on install), kept
#: outside the checkout
PYC_ENV = {"PYTHONPYCACHEPREFIX": f"/tmp/nettracer-bench-pyc-{os.getuid()}"}


def env(pyc: bool | None, repo: str = REPO) -> dict[str, str]:
    """``pyc`` True/False: the checkout ``repo`` with or without byte-code; None: an
    installed command (no PYTHONPATH, the byte-code pip wrote)."""
    e = dict(os.environ, PYTHONPATH=repo)
    if pyc is None:
        for name in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX"):
            e.pop(name, None)
    elif pyc:
        e.pop("PYTHONDONTWRITEBYTECODE", None)
        e.update(PYC_ENV)
    else:
        e["PYTHONDONTWRITEBYTECODE"] = "1"
        e.pop("PYTHONPYCACHEPREFIX", None)
    return e


def start(
    cmd: list[str],
    timeout: float = 60,
    pyc: bool | None = True,
    repo: str = REPO,
    extra: dict[str, str] | None = None,
    stdout: int | IO[str] = subprocess.PIPE,
) -> Started:
    """Start ``cmd`` (ours: from the checkout ``repo``; ``extra`` added to its
    environment; its output to ``stdout``) and wait until it attached."""
    e = dict(env(pyc, repo), **(extra or {}))
    account = CpuAccount()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=stdout,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd="/" if pyc is None else repo,
        env=e,
        preexec_fn=account.join,
    )
    while time.perf_counter() - t0 < timeout:
        prog_id = attached(proc.pid)
        if prog_id is not None:
            seconds = time.perf_counter() - t0
            return Started(proc, prog_id, seconds, account.seconds(proc.pid), account)
        if proc.poll() is not None:
            account.remove()
            raise SystemExit(f"{shlex.join(cmd)} exited with {proc.returncode} before attaching")
    proc.kill()
    proc.wait()
    account.remove()
    raise SystemExit(f"{shlex.join(cmd)} did not attach within {timeout} s")


def stop(s: Started) -> str:
    """SIGINT, repeated: bpftrace 0.17 loses one that arrives just after it attached."""
    try:
        for _ in range(30):
            s.proc.send_signal(signal.SIGINT)
            try:
                out, _ = s.proc.communicate(timeout=2)
                return out
            except subprocess.TimeoutExpired:
                continue
        s.proc.kill()
        out, _ = s.proc.communicate()
        return out
    finally:
        if s.account is not None:
            s.account.remove()


def prog_stats(prog_id: int) -> tuple[int, int]:
    out = subprocess.run(
        ["bpftool", "prog", "show", "id", str(prog_id), "--json"], capture_output=True, text=True
    )
    info = json.loads(out.stdout)
    return info.get("run_time_ns", 0), info.get("run_cnt", 0)


def vm_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_startup(
    k: int, installed: str | None = None, other: str | None = None, without: str | None = None
) -> dict[str, tuple[list[float], list[float]]]:
    """Start-up of ours with byte-code cached (as installed), ours without (this checkout
    under PYTHONDONTWRITEBYTECODE=1), bpftrace, -- with ``installed`` (a virtual
    environment ``pip install`` put nettracer in) -- its ``bin/nettracer``, and -- with
    ``other`` (another checkout) -- that checkout's, byte-code cached, and -- with
    ``without`` -- this checkout's with those kernel features forced away
    (``NETTRACER_KERNEL__WITHOUT``), byte-code cached, interleaved.
    One unmeasured start of each first (byte-code, caches, page cache).  Returns
    ``{name: (wall seconds, CPU seconds)}``, both until attached."""
    ours = [*OURS, "--interval", "3600"]
    cmds: dict[str, tuple[list[str], bool | None, str, dict[str, str]]] = {
        "pyc": (ours, True, REPO, {}),
        "bpftrace": (BPFTRACE, True, REPO, {}),
        "nopyc": (ours, False, REPO, {}),
    }
    if other:
        cmds["other"] = (ours, True, other, {})
    if without:
        cmds["without"] = (ours, True, REPO, without_env(without))
    if installed:
        cmd = [os.path.join(installed, "bin", "nettracer"), "drops", "--interval", "3600"]
        cmds["installed"] = (cmd, None, REPO, {})
    for cmd, pyc, repo, extra in cmds.values():
        stop(start(cmd, pyc=pyc, repo=repo, extra=extra))
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in cmds}
    for _ in range(k):
        for name, (cmd, pyc, repo, extra) in cmds.items():
            s = start(cmd, pyc=pyc, repo=repo, extra=extra)
            out[name][0].append(s.seconds)
            out[name][1].append(s.cpu)
            stop(s)
    return out


def bench_cost_and_counts(n: int, inode: int) -> dict[str, object]:
    from nettracer.bpf import prog as bpf_prog
    from nettracer.bpf.insn import R0, exit_, mov64
    from nettracer.bpf.link import attach_raw_tracepoint

    stats = bpf_prog.enable_stats()
    empty = bpf_prog.load([mov64(R0, 0), exit_()], name="nt_empty")
    bt = start(BPFTRACE)
    ours = start([*OURS, "--json", "--interval", "1"])
    link = attach_raw_tracepoint(empty, "kfree_skb")
    try:
        time.sleep(0.5)
        o0, b0, e0 = prog_stats(ours.prog_id), prog_stats(bt.prog_id), empty.stats()
        caused = int(blast("count", n))
        time.sleep(1.0)
        o1, b1, e1 = prog_stats(ours.prog_id), prog_stats(bt.prog_id), empty.stats()
    finally:
        link.close()
        empty.close()
        stats.close()
    bt_out = stop(bt)
    our_out = stop(ours)
    # bpftrace prints @[sym, reason]: count
    bt_counts: dict[tuple[str, int], int] = {}
    for m in re.finditer(r"^@\[(\S+), (\d+)\]: (\d+)$", bt_out, re.M):
        bt_counts[(m.group(1), int(m.group(2)))] = int(m.group(3))
    ours_t = ours_all = 0
    for line in our_out.splitlines():
        for d in json.loads(line)["drops"]:
            if d["symbol"] == "__udp4_lib_rcv" and d["reason"] == "NO_SOCKET":
                ours_all += d["count"]
                if d["netns"] == inode:
                    ours_t += d["count"]
    from nettracer.kernel.btf import Btf

    no_socket = next(
        v for v, k in Btf.vmlinux().enum("skb_drop_reason").items() if k.endswith("_NO_SOCKET")
    )
    return {
        "ours_ns": (o1[0] - o0[0]) / max(1, o1[1] - o0[1]),
        "bpftrace_ns": (b1[0] - b0[0]) / max(1, b1[1] - b0[1]),
        "empty_ns": (e1.run_time_ns - e0.run_time_ns) / max(1, e1.run_cnt - e0.run_cnt),
        "runs": (o1[1] - o0[1], b1[1] - b0[1], e1.run_cnt - e0.run_cnt),
        "caused": caused,
        "ours_target_netns": ours_t,
        "ours_all_netns": ours_all,
        "bpftrace": bt_counts.get(("__udp4_lib_rcv", no_socket), 0),
    }


def without_env(without: str) -> dict[str, str]:
    """The environment that forces kernel features away (``kernel.without``)."""
    return {"NETTRACER_KERNEL__WITHOUT": without}


@dataclass
class Arm:
    """One program of :func:`bench_solo`: its command, the checkout it runs from, what
    it adds to the environment, and whether it is ours (counted: ``--json``)."""

    cmd: list[str]
    repo: str = REPO
    extra: dict[str, str] | None = None
    ours: bool = True


#: names of the variants of ours in :func:`bench_solo`
FORCED = "ours, fallbacks forced"
EVENTS_RB = "ours --events (ring buffer)"
EVENTS_PERF = "ours --events, perf event array"
#: what each variant of ours is compared with besides "ours" (default: the bpftraces)
SOLO_REFS = {EVENTS_RB: (), EVENTS_PERF: (EVENTS_RB,)}


def solo_arms(
    guess: bool, other: str | None, without: str | None = None, events: bool = False
) -> dict[str, Arm]:
    """The programs of :func:`bench_solo`, by name."""
    ours = [*OURS, "--json", "--interval", "3600"]
    arms = {"ours": Arm(ours)}
    if without:
        arms[FORCED] = Arm(ours, extra=without_env(without))
    if guess:
        arms["ours --offsets guess"] = Arm([*ours, "--offsets", "guess"])
    if other:
        arms["other checkout"] = Arm(ours, other)
    if events:
        arms[EVENTS_RB] = Arm([*OURS, "--events", "--json"])
        arms[EVENTS_PERF] = Arm([*OURS, "--events", "--json"], extra=without_env("ringbuf"))
    arms["bpftrace same key"] = Arm(BPFTRACE_SAME_KEY, ours=False)
    arms["bpftrace location+reason"] = Arm(BPFTRACE, ours=False)
    return arms


@dataclass
class Solo:
    """Per round: in-kernel ns/event, drops caused, and (ours) what it reported for T's
    namespace at (``__udp4_lib_rcv``, NO_SOCKET): counted, or events shown and lost."""

    ns: list[float]
    caused: list[int]
    counted: list[int]
    lost: list[int]


def our_counts(out: str, inode: int) -> tuple[int, int]:
    """(UDP-to-closed-port drops in T's namespace, events lost) in the ``--json`` output
    of ``nettracer drops``: interval objects (``drops``) or events and their
    ``{"time", "events", "lost"}`` lines."""
    counted = lost = 0
    for line in out.splitlines():
        obj = json.loads(line)
        rows = obj.get("drops", [obj] if "symbol" in obj else [])
        for d in rows:
            ours = d["symbol"] == "__udp4_lib_rcv" and d["reason"] == "NO_SOCKET"
            if ours and d["netns"] == inode:
                counted += d.get("count", 1)
        if "events" in obj:
            lost = max(lost, obj["lost"])
    return counted, lost


def bench_solo(n: int, rounds: int, arms: dict[str, Arm], inode: int) -> dict[str, Solo]:
    """In-kernel ns/event of each program attached alone, in turn, ``rounds`` times
    (alternating: no program profits from another's warm cache lines): run_time_ns /
    run_cnt over ``n`` drops.  The program is the one the command's pid has attached to
    ``kfree_skb`` (a raw tracepoint program, or with ``raw_tracepoint`` forced away a
    classic tracepoint one, perf_event_open + PERF_EVENT_IOC_SET_BPF: both answer
    BPF_TASK_FD_QUERY with the tracepoint's name).  Ours writes to a file (events: one
    line per drop, a pipe would fill and make it lose them)."""
    import tempfile

    from nettracer.bpf import prog as bpf_prog

    out = {name: Solo([], [], [], []) for name in arms}
    with bpf_prog.enable_stats():
        for _ in range(rounds):
            for name, arm in arms.items():
                with tempfile.TemporaryFile("w+") as f:
                    sink = f if arm.ours else subprocess.PIPE
                    s = start(arm.cmd, repo=arm.repo, extra=arm.extra, stdout=sink)
                    time.sleep(0.5)
                    # the program attached now: --offsets guess attaches its probes first
                    prog_id = attached(s.proc.pid) or s.prog_id
                    t0, c0 = prog_stats(prog_id)
                    caused = int(blast("count", n))
                    time.sleep(0.5)
                    t1, c1 = prog_stats(prog_id)
                    stop(s)
                    f.seek(0)
                    counted, lost = our_counts(f.read(), inode) if arm.ours else (0, 0)
                r = out[name]
                r.ns.append((t1 - t0) / max(1, c1 - c0))
                r.caused.append(caused)
                r.counted.append(counted)
                r.lost.append(lost)
    return out


#: one send-rate series of :func:`bench_workload`: (per wall second, per CPU second)
Rates = list[tuple[float, ...]]


def bench_workload(
    rounds: int, seconds: float, without: str | None = None
) -> tuple[dict[str, Rates], float]:
    """Alternating runs without, with ``nettracer drops``, (``without``) with it and
    those kernel features forced away, and with bpftrace; in every arm the blast starts
    2 s after the (would-be) attach, so that the comparison is of the steady state, not
    of start-up.  Each run gives (datagrams per wall second, datagrams per CPU second of
    the blaster): the drops are processed in softirq inside its sendto() calls, so its
    CPU time includes the tracing programs' -- and what the kernel does around them,
    which run_time_ns leaves out (a classic tracepoint's record) -- and the second
    figure is not disturbed by other load on the machine.  Returns the series by arm
    ("without", "nettracer drops", "fallbacks forced", "bpftrace (reference)"), in
    round order, and the peak RSS of ours.  The arms' order rotates from round to
    round."""
    arms: dict[str, tuple[list[str], dict[str, str]] | None] = {
        "without": None,
        "nettracer drops": ([*OURS, "--interval", "1"], {}),
    }
    if without:
        arms["fallbacks forced"] = ([*OURS, "--interval", "1"], without_env(without))
    arms["bpftrace (reference)"] = (BPFTRACE, {})
    out: dict[str, Rates] = {name: [] for name in arms}
    rss = 0.0
    order = list(arms.items())
    for r in range(rounds):
        # each arm takes each place in the order equally often: no arm always follows
        # another (a tracer's exit, bpftrace's memory) or always runs first in a round
        k = r % len(order)
        for name, arm in order[k:] + order[:k]:
            s = start(arm[0], extra=arm[1]) if arm else None
            time.sleep(2)
            out[name].append(blast_rates("rate", seconds))
            if s is not None:
                if name == "nettracer drops":
                    rss = max(rss, vm_hwm_mb(s.proc.pid))
                stop(s)
    return out, rss


PARTS = ("startup", "shared", "solo", "workload")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drops", type=int, default=100_000, help="datagrams per cost run")
    ap.add_argument("--rounds", type=int, default=9, help="alternating workload rounds")
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds per workload run")
    ap.add_argument("--solo", type=int, default=3, help="rounds of one-program-at-a-time cost")
    ap.add_argument("--startups", type=int, default=7, help="start-up measurements per tool")
    ap.add_argument(
        "--installed",
        metavar="VENV",
        help="also time VENV/bin/nettracer (e.g. python3 -m venv VENV && VENV/bin/pip install .)",
    )
    ap.add_argument(
        "--other-repo",
        metavar="PATH",
        help="also measure the nettracer of another checkout (start-up and cost alone), "
        "e.g. a worktree of an older commit",
    )
    ap.add_argument(
        "--guess", action="store_true", help="also measure ours with --offsets guess (cost alone)"
    )
    ap.add_argument(
        "--without",
        metavar="LIST",
        help="also measure ours with these kernel features forced away (start-up and cost "
        "alone, counts): NETTRACER_KERNEL__WITHOUT=LIST, e.g. "
        "ringbuf,probe_read_kernel,atomic_fetch,raw_tracepoint,batch_ops ('all': every one)",
    )
    ap.add_argument(
        "--events",
        action="store_true",
        help="also measure ours --events (cost alone) through the ring buffer and, with "
        "ringbuf forced away, the perf event array",
    )
    ap.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)",
    )
    ap.add_argument(
        "--detect",
        choices=("fdquery", "bpftool"),
        default="fdquery",
        help="how attachment is seen: BPF_TASK_FD_QUERY on the pid's fds every 0.5 ms "
        "(default) or bpftool perf list",
    )
    ap.add_argument(
        "--only-startup", action="store_true", help="measure start-up and peak RSS only"
    )
    args = ap.parse_args()
    args.parts = set(("startup",) if args.only_startup else args.parts.split(","))
    if not args.parts <= set(PARTS):
        ap.error(f"--parts: unknown {','.join(sorted(args.parts - set(PARTS)))}")
    if args.other_repo:
        args.other_repo = os.path.abspath(args.other_repo)
    if args.without == "all":
        from nettracer.kernel.features import FORCEABLE

        args.without = ",".join(FORCEABLE)
    return args


def main() -> None:
    args = parse_args()
    DETECT["how"] = args.detect
    if os.geteuid() != 0:
        raise SystemExit("bench_drops needs root")
    bt_version = subprocess.run(["bpftrace", "--version"], capture_output=True, text=True).stdout
    print(f"# command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"# kernel {platform.release()}, {os.cpu_count()} CPUs, {bt_version.strip()}, "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    if args.other_repo:
        rev = sh("git", "-C", args.other_repo, "rev-parse", "--short", "HEAD").strip()
        own = sh("git", "-C", REPO, "rev-parse", "--short", "HEAD").strip()
        print(f"# this checkout {REPO} at {own}; other checkout {args.other_repo} at {rev}")
    from nettracer.kernel.tracefs import tracefs_mounted

    # bpftrace finds tracepoints in tracefs: mounted for the run if it is not (and then
    # unmounted), as nettracer's own tracing commands do
    with tracefs_mounted():
        inode = setup()
        rss = float("nan")
        try:
            if "startup" in args.parts:
                startup = bench_startup(
                    args.startups, args.installed, args.other_repo, args.without
                )
            if args.only_startup:
                rss = bench_rss(args.seconds)
            if "shared" in args.parts:
                cost = bench_cost_and_counts(args.drops, inode)
            if "solo" in args.parts:
                arms = solo_arms(args.guess, args.other_repo, args.without, args.events)
                solo = bench_solo(args.drops, args.solo, arms, inode)
            if "workload" in args.parts:
                load = os.getloadavg()[0]
                rates, rss = bench_workload(args.rounds, args.seconds, args.without)
        finally:
            teardown()
    print()
    if "shared" in args.parts:
        report_cost(cost)
    if "solo" in args.parts:
        report_solo(args, solo)
    if "workload" in args.parts:
        report_workload(args, load, rates)
    if "startup" in args.parts:
        report_startup(args, startup)
    if rss == rss:
        print(f"peak RSS of nettracer drops (VmHWM): {rss:.1f} MB   (target < 30)")


def bench_rss(seconds: float) -> float:
    """Peak RSS of ``nettracer drops --interval 1`` printing the drops of a blast."""
    s = start([*OURS, "--interval", "1"])
    try:
        blast("rate", seconds)
        time.sleep(1.2)
        return vm_hwm_mb(s.proc.pid)
    finally:
        stop(s)


def report_cost(cost: dict[str, object]) -> None:
    o, b, e = cost["ours_ns"], cost["bpftrace_ns"], cost["empty_ns"]
    assert isinstance(o, float) and isinstance(b, float) and isinstance(e, float)
    print("in-kernel cost per event (run_time_ns / run_cnt, all three attached at once)")
    print(f"  nettracer drops   {o:7.1f} ns   runs {cost['runs'][0]}")  # type: ignore[index]
    print(f"  bpftrace          {b:7.1f} ns   runs {cost['runs'][1]}")  # type: ignore[index]
    print(f"  empty raw_tp      {e:7.1f} ns   runs {cost['runs'][2]}")  # type: ignore[index]
    print(f"  ours / bpftrace   {o / b:7.3f}")
    print(f"  ours / empty      {o / e:7.3f}")
    print(f"  above the floor   ours {o - e:.1f} ns, bpftrace {b - e:.1f} ns, "
          f"ratio {(o - e) / (b - e):.3f}")  # fmt: skip
    print("counts of UDP-to-closed-port drops (__udp4_lib_rcv, NO_SOCKET)")
    print(f"  caused {cost['caused']}, ours in T's netns {cost['ours_target_netns']}, "
          f"ours all netns {cost['ours_all_netns']}, bpftrace {cost['bpftrace']}")  # fmt: skip


#: issue 15's targets, ours / bpftrace's
SOLO_TARGETS = {"bpftrace same key": 0.7, "bpftrace location+reason": 1.0}


def report_solo(args: argparse.Namespace, solo: dict[str, Solo]) -> None:
    """Medians, each round's figure, and ours (and the variants) / each other program:
    the ratio of medians and the spread of the per-round ratios; what ours counted."""
    med = statistics.median
    print(f"in-kernel ns/event, each program attached alone, alternating, {args.solo} rounds "
          f"of {args.drops} drops (median; per round)")  # fmt: skip
    for name, r in solo.items():
        print(f"  {name:34} {med(r.ns):6.1f} ns  {[round(x, 1) for x in r.ns]}")
    if FORCED in solo:
        print(f"  ({FORCED}: NETTRACER_KERNEL__WITHOUT={args.without})")
    if EVENTS_PERF in solo:
        print(f"  ({EVENTS_PERF}: NETTRACER_KERNEL__WITHOUT=ringbuf)")
    ours = [name for name in solo if name.startswith("ours") or name == "other checkout"]
    bpftraces = [name for name in solo if name not in ours]
    for name in ours:
        refs = ([] if name == "ours" else ["ours"]) + list(SOLO_REFS.get(name, bpftraces))
        for ref in refs:
            pairs = [a / b for a, b in zip(solo[name].ns, solo[ref].ns, strict=True)]
            target = f"  (target <= {SOLO_TARGETS[ref]})" if ref in SOLO_TARGETS else ""
            print(f"  {name} / {ref}: {med(solo[name].ns) / med(solo[ref].ns):.3f}{target}; "
                  f"per round {min(pairs):.3f}-{max(pairs):.3f}")  # fmt: skip
    print(
        "counts of UDP-to-closed-port drops in T's netns (__udp4_lib_rcv, NO_SOCKET), "
        "per round: caused / counted (events: shown, lost over every netns)"
    )
    for name in ours:
        r = solo[name]
        rows = zip(r.caused, r.counted, r.lost, strict=True)
        if "--events" in name:
            print(f"  {name:34} " + ", ".join(f"{c}/{k} lost {x}" for c, k, x in rows))
        else:
            exact = all(c == k for c, k, _ in rows)
            print(
                f"  {name:34} {'exact' if exact else 'NOT EXACT'}: "
                + ", ".join(f"{c}/{k}" for c, k in zip(r.caused, r.counted, strict=True))
            )


def report_workload(args: argparse.Namespace, load: float, rates: dict[str, Rates]) -> None:
    print(f"workload: blaster send rate, {args.rounds} alternating rounds of {args.seconds:g} s "
          f"(load average before: {load:.2f})")  # fmt: skip
    if "fallbacks forced" in rates:
        print(f"  (fallbacks forced: NETTRACER_KERNEL__WITHOUT={args.without})")
    for i, what in ((0, "per wall second"), (1, "per CPU second of the blaster")):
        wo = statistics.median(r[i] for r in rates["without"])
        print(f"  {what}: without {wo:.0f}/s")
        for name, arm in rates.items():
            if name == "without":
                continue
            w = statistics.median(r[i] for r in arm)
            pairs = sorted(a[i] / b[i] for a, b in zip(arm, rates["without"], strict=True))
            target = "  (target >= 0.97)" if name == "nettracer drops" else ""
            print(f"    with {name}: {w:.0f}/s; median of the rounds' own ratios "
                  f"{statistics.median(pairs):.3f}{target}; ratio of the medians {w / wo:.3f}; "
                  f"per round {[round(x, 3) for x in pairs]}")  # fmt: skip


def report_startup(
    args: argparse.Namespace, times: dict[str, tuple[list[float], list[float]]]
) -> None:
    def ms(xs: list[float]) -> str:
        return str([round(x * 1000) for x in xs])

    med = statistics.median
    bt_wall, bt_cpu = (med(x) for x in times["bpftrace"])
    how = "BPF_TASK_FD_QUERY" if args.detect == "fdquery" else "bpftool perf list"
    cpu = "cgroup v2 cpu.stat" if CpuAccount().path_and_remove() else "live threads' schedstat"
    print(f"start-up, command start to attached (median of {args.startups}; seen by {how}; "
          f"load average {os.getloadavg()[0]:.2f}); wall time, and CPU time of the "
          f"command until then (all its threads and children; from {cpu})")  # fmt: skip
    print(f"  bpftrace                 {bt_wall * 1000:4.0f} ms {ms(times['bpftrace'][0])}")
    print(f"                       CPU {bt_cpu * 1000:4.0f} ms {ms(times['bpftrace'][1])}")
    rows = (
        ("installed", f"nettracer drops, pip-installed in {args.installed} (byte-code)"),
        ("pyc", "nettracer drops, this checkout, byte-code cached (PYTHONPATH; editable site)"),
        ("other", f"nettracer drops, {args.other_repo}, byte-code cached (PYTHONPATH)"),
        ("without", f"nettracer drops, this checkout, NETTRACER_KERNEL__WITHOUT={args.without}"),
        ("nopyc", "nettracer drops, this checkout without byte-code (PYTHONDONTWRITEBYTECODE=1)"),
    )
    for name, what in rows:
        if name not in times:
            continue
        wall, cpu = times[name]
        target = (
            "   (target <= 0.5)" if name == ("installed" if "installed" in times else "pyc") else ""
        )
        print(f"  {what}")
        print(f"                      wall {med(wall) * 1000:4.0f} ms {ms(wall)}")
        print(f"                       CPU {med(cpu) * 1000:4.0f} ms {ms(cpu)}")
        print(f"      ratio to bpftrace: wall {med(wall) / bt_wall:.3f}{target}, "
              f"CPU {med(cpu) / bt_cpu:.3f}")  # fmt: skip
    for name, what in (("other", "this checkout / other checkout"),
                       ("without", "this checkout / the same with features forced away")):  # fmt: skip
        if name not in times:
            continue
        (w, c), (ow, oc) = times["pyc"], times[name]
        pairs = [a / b for a, b in zip(w, ow, strict=True)]
        print(f"  {what} (byte-code cached): wall {med(w) / med(ow):.3f} "
              f"(per start {min(pairs):.3f}-{max(pairs):.3f}), CPU {med(c) / med(oc):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
