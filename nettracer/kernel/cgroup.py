"""Which container a process or a network namespace belongs to, from its cgroups.

``/proc/PID/cgroup`` has one line per hierarchy, ``ID:CONTROLLERS:PATH``
(``kernel/cgroup/cgroup.c`` ``proc_cgroup_show``): ``0::PATH`` for the cgroup v2
(unified) hierarchy, ``N:cpu,cpuacct:PATH`` or ``N:name=systemd:PATH`` for v1 ones.  A
hybrid host (systemd's "hybrid" mode: v2 mounted at ``/sys/fs/cgroup/unified``, the
controllers as v1) shows both.  Paths are relative to the reader's cgroup namespace
root (Linux 4.6+), so inside a container they may start with ``/..``; only their last
components matter here.

Container runtimes name the cgroup of a container after its 64-hex-digit id:

=========================  ==========================================  ============
runtime                    systemd cgroup driver                        cgroupfs
=========================  ==========================================  ============
Docker (``docker``)        ``docker-<id>.scope``                        ``/docker/<id>``
containerd CRI             ``cri-containerd-<id>.scope``                ``.../pod<uid>/<id>``
CRI-O (``crio``)           ``crio-<id>.scope``                          ``.../pod<uid>/<id>``
Podman (``podman``)        ``libpod-<id>.scope``                        ``/libpod_parent/libpod-<id>``
=========================  ==========================================  ============

The kubelet puts a pod's containers under ``kubepods[-QOS]-pod<UID>.slice`` (systemd
driver: the UID's dashes are written as underscores, since ``-`` separates slice
levels) or ``kubepods/[QOS/]pod<UID>`` (cgroupfs driver).  A container id under a pod
found only through the cgroupfs layout has runtime ``cri`` (the runtime is not named).
The runtimes' monitor processes (``crio-conmon-<id>.scope``, ``libpod-conmon-<id>``)
are not the container and are not recognised.

A network namespace has no cgroup; its container is the one of its lowest-numbered
process (the first started there, normally: the container's init, or a pod's sandbox
"pause" process, whose pod UID is the pod's), found by ``stat(2)`` of every
``/proc/PID/ns/net`` (the inode of the nsfs file is the namespace's; reading another
process's needs ``ptrace_may_access``, i.e. CAP_SYS_PTRACE for processes with more
capabilities).  Only thread-group leaders are scanned: a thread that ``setns``-ed
elsewhere is not seen.  :class:`ContainerResolver` caches both lookups, bounded.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

#: the 64 lowercase hex digits of a container id (Docker, containerd, CRI-O, Podman)
_ID = r"[0-9a-f]{64}"
#: systemd driver scopes, prefix -> runtime
_SCOPE = re.compile(rf"^(docker|cri-containerd|crio|libpod)-({_ID})\.scope$")
_SCOPE_RUNTIME = {
    "docker": "docker",
    "cri-containerd": "containerd",
    "crio": "crio",
    "libpod": "podman",
}
_BARE_ID = re.compile(rf"^(?:libpod-)?({_ID})$")
#: ``kubepods-burstable-pod<uid>.slice`` (uid with ``_``) or cgroupfs ``pod<uid>``
_POD_SLICE = re.compile(r"^kubepods(?:-[a-z]+)*-pod([0-9a-fA-F_-]{32,36})\.slice$")
_POD_DIR = re.compile(r"^pod([0-9a-fA-F-]{32,36})$")

#: bounds of :class:`ContainerResolver`'s caches
MAX_CACHED = 4096


@dataclass(frozen=True, slots=True)
class Container:
    """A container: its id (64 hex), the runtime that named its cgroup, its pod's UID."""

    id: str
    runtime: str
    pod_uid: str | None = None

    def as_json(self) -> dict[str, str | None]:
        return {"id": self.id, "runtime": self.runtime, "pod_uid": self.pod_uid}


@dataclass(frozen=True, slots=True)
class Cgroup:
    """Where a process lives: its cgroup path (see :func:`main_path`) and container."""

    path: str
    container: Container | None


def parse_proc_cgroup(text: str) -> list[tuple[int, tuple[str, ...], str]]:
    """The lines of ``/proc/PID/cgroup``: (hierarchy id, controllers, path); the v2
    line has id 0 and no controllers.  Malformed lines are skipped."""
    out = []
    for line in text.splitlines():
        hid, sep, rest = line.partition(":")
        ctrl, sep2, path = rest.partition(":")
        if not (sep and sep2 and hid.isdigit()):
            continue
        out.append((int(hid), tuple(c for c in ctrl.split(",") if c), path))
    return out


def main_path(entries: list[tuple[int, tuple[str, ...], str]]) -> str:
    """The one path that says where a process is: the v2 path unless it is ``/`` (a
    hybrid host whose unified hierarchy is unused), else systemd's ``name=systemd`` v1
    path, else the deepest v1 path; ``/`` when every hierarchy says so."""
    v2 = [p for hid, ctrl, p in entries if hid == 0 and not ctrl]
    if v2 and v2[0] != "/":
        return v2[0]
    named = [p for _, ctrl, p in entries if "name=systemd" in ctrl and p != "/"]
    if named:
        return named[0]
    v1 = sorted((p for hid, _, p in entries if hid != 0 and p != "/"), key=len)
    return v1[-1] if v1 else "/"


def container_of_path(path: str) -> Container | None:
    """The container a cgroup path names (the innermost one), or None."""
    parts = [p for p in path.split("/") if p]
    pod_uid = None
    found: Container | None = None
    for i, part in enumerate(parts):
        m = _POD_SLICE.match(part)
        if m:
            pod_uid = m.group(1).replace("_", "-")
            continue
        m = _POD_DIR.match(part)
        if m and any(p.startswith("kubepods") for p in parts[:i]):
            pod_uid = m.group(1)
            continue
        m = _SCOPE.match(part)
        if m:
            found = Container(m.group(2), _SCOPE_RUNTIME[m.group(1)], pod_uid)
            continue
        m = _BARE_ID.match(part)
        if m:
            runtime = _bare_runtime(parts[:i], part, pod_uid)
            if runtime is not None:
                found = Container(m.group(1), runtime, pod_uid)
    return found


def _bare_runtime(parents: list[str], part: str, pod_uid: str | None) -> str | None:
    """The runtime of a cgroupfs-layout id component, from its parents."""
    if part.startswith("libpod-"):
        return "podman"
    if parents and parents[-1] == "docker":
        return "docker"
    if pod_uid is not None:
        return "cri"
    return None


def read_cgroup(pid: int, proc: str = "/proc") -> Cgroup | None:
    """Process ``pid``'s cgroup and container; None when it is gone."""
    try:
        with open(f"{proc}/{pid}/cgroup") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    path = main_path(parse_proc_cgroup(text))
    return Cgroup(path, container_of_path(path))


def cgroup2_mount(mounts: str = "/proc/mounts") -> str | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` on a unified host,
    ``/sys/fs/cgroup/unified`` on a hybrid one), from ``/proc/mounts``; None if not."""
    with open(mounts) as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return fields[1].replace("\\040", " ")
    return None


def netns_owners(proc: str = "/proc") -> dict[int, int]:
    """Network namespace inode -> its lowest-numbered process, over every process whose
    ``ns/net`` can be read (processes that exit meanwhile or deny access are skipped)."""
    owners: dict[int, int] = {}
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            ino = os.stat(f"{proc}/{name}/ns/net").st_ino
        except OSError:
            continue
        pid = int(name)
        if pid < owners.get(ino, 1 << 62):
            owners[ino] = pid
    return owners


class ContainerResolver:
    """Cached :func:`read_cgroup` by pid and by network namespace inode.

    A pid's answer is kept ``ttl_s`` seconds (pids get reused).  A namespace seen for the
    first time that is not in the last scan of ``/proc`` rescans it; an expired answer
    rescans at most once per ``rescan_s``.  Each cache holds at most ``max_entries``
    answers and is emptied when full (the next lookups read ``/proc`` again).
    """

    def __init__(
        self,
        proc: str = "/proc",
        ttl_s: float = 10.0,
        rescan_s: float = 2.0,
        max_entries: int = MAX_CACHED,
    ) -> None:
        self.proc = proc
        self.ttl_s = ttl_s
        self.rescan_s = rescan_s
        self.max_entries = max_entries
        self._pids: dict[int, tuple[float, Cgroup | None]] = {}
        self._netns: dict[int, tuple[float, Cgroup | None]] = {}
        self._owners: dict[int, int] = {}
        self._scanned = float("-inf")
        self.scans = 0

    def by_pid(self, pid: int) -> Cgroup | None:
        now = time.monotonic()
        hit = self._pids.get(pid)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        got = read_cgroup(pid, self.proc)
        if len(self._pids) >= self.max_entries:
            self._pids.clear()
        self._pids[pid] = (now, got)
        return got

    def by_netns(self, inode: int) -> Cgroup | None:
        """The cgroup of namespace ``inode``'s owner (see the module docstring); None when
        no process is in it (any more)."""
        now = time.monotonic()
        hit = self._netns.get(inode)
        # "no process in it" is kept only rescan_s: namespace inodes are reused at once
        # (proc_alloc_inum), and a new namespace must not inherit a dead one's answer
        if hit is not None and now - hit[0] < (self.ttl_s if hit[1] else self.rescan_s):
            return hit[1]
        pid = self._owners.get(inode)
        # a namespace never asked about is looked up at once (its first drops must not
        # go to "no container" because a scan ran a moment before it got its process);
        # one asked about before rescans at most once per rescan_s
        first = hit is None and pid is None
        if first or (hit is not None and now - self._scanned >= self.rescan_s):
            self._owners = netns_owners(self.proc)
            self._scanned = now
            self.scans += 1
            pid = self._owners.get(inode)
        got = self.by_pid(pid) if pid is not None else None
        if len(self._netns) >= self.max_entries:
            self._netns.clear()
        self._netns[inode] = (now, got)
        return got

    def of(self, pid: int | None, netns: int | None) -> Cgroup | None:
        """Where a socket's owner lives: process ``pid``'s cgroup, else (no pid, or the
        process is gone) the one of network namespace ``netns``'s owner."""
        got = self.by_pid(pid) if pid else None
        if got is None and netns:
            got = self.by_netns(netns)
        return got

    def matches(self, cg: Cgroup | None, container: str) -> bool:
        """Whether ``cg`` is container ``container`` (its id, or a prefix of at least
        one digit, like ``docker ps`` shows 12)."""
        return cg is not None and cg.container is not None and cg.container.id.startswith(container)
