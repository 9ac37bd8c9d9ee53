"""Network namespaces by inode, and netlink sockets opened inside them.

The kernel names a network namespace by the inode of its nsfs file (``struct net``'s
``ns.inum``, what ``readlink /proc/<pid>/ns/net`` shows as ``net:[4026531840]``); that
is what an eBPF program reads from ``sock_common.skc_net->ns.inum``.  To act inside the
namespace we need a path to open: the host's own (``/proc/self/ns/net``), a named one
bind-mounted by ``ip netns add`` under ``/run/netns``, or ``/proc/<pid>/ns/net`` of a
process living in it.  :class:`NetnsIndex` finds one.

:func:`netlink_socket_in` creates a socket inside a namespace without moving the
calling thread: ``setns(2)`` with ``CLONE_NEWNET`` changes only the calling thread
(Linux 3.0+), so a short-lived helper thread enters the namespace, creates the socket
(a socket stays in the namespace it was created in) and ends.
"""

from __future__ import annotations

import os
import socket
import threading

from nettracer.bpf.syscall import CLONE_NEWNET, setns

#: where ``ip netns add`` bind-mounts named namespaces (``/var/run`` is usually ``/run``)
NETNS_RUN_DIRS: tuple[str, ...] = ("/run/netns", "/var/run/netns")


def netns_inode(path: str = "/proc/self/ns/net") -> int:
    """The inode of the namespace file at ``path`` (its ``ns.inum``)."""
    return os.stat(path).st_ino


class NetnsNotFound(LookupError):
    """No namespace file with the inode could be found (the namespace is gone, or only
    a process we cannot see holds it)."""


class NetnsIndex:
    """Find a namespace file by its inode.

    Named namespaces and our own are preferred over ``/proc/<pid>/ns/net`` because they
    outlive processes.  Paths are remembered and checked again (by inode) before use;
    a miss rescans.
    """

    def __init__(self, proc: str = "/proc", run_dirs: tuple[str, ...] = NETNS_RUN_DIRS) -> None:
        self.proc = proc
        self.run_dirs = run_dirs
        self._paths: dict[int, str] = {}
        self._lock = threading.Lock()

    def path(self, inode: int) -> str:
        """A path whose namespace has ``inode``; raises :class:`NetnsNotFound`."""
        with self._lock:
            known = self._paths.get(inode)
            if known is not None and _inode_or_none(known) == inode:
                return known
            self._paths = self._scan()
            found = self._paths.get(inode)
        if found is None:
            raise NetnsNotFound(f"no network namespace with inode {inode}")
        return found

    def paths(self) -> dict[int, str]:
        """inode -> a path of every network namespace visible now."""
        with self._lock:
            self._paths = self._scan()
            return dict(self._paths)

    def _scan(self) -> dict[int, str]:
        """inode -> path for every namespace visible now, stable paths first."""
        paths: dict[int, str] = {}

        def note(path: str) -> None:
            ino = _inode_or_none(path)
            if ino is not None:
                paths.setdefault(ino, path)

        note(f"{self.proc}/self/ns/net")
        seen_dirs: set[str] = set()
        for d in self.run_dirs:
            real = os.path.realpath(d)
            if real in seen_dirs:
                continue
            seen_dirs.add(real)
            try:
                names = sorted(os.listdir(d))
            except OSError:
                continue
            for name in names:
                note(os.path.join(d, name))
        try:
            pids = [p for p in os.listdir(self.proc) if p.isdigit()]
        except OSError:
            pids = []
        for pid in sorted(pids, key=int):
            note(f"{self.proc}/{pid}/ns/net")
        return paths


def _inode_or_none(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def open_netns(path: str, inode: int | None = None) -> int:
    """Open a namespace file; with ``inode``, check it still is that namespace."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if inode is not None and os.fstat(fd).st_ino != inode:
        os.close(fd)
        raise NetnsNotFound(f"{path} no longer is network namespace {inode}")
    return fd


def netlink_socket_in(
    ns_fd: int, protocol: int = socket.NETLINK_ROUTE, sock_type: int = socket.SOCK_DGRAM
) -> socket.socket:
    """A ``AF_NETLINK`` socket created inside the namespace ``ns_fd`` refers to.

    The calling thread never changes namespace: a helper thread does ``setns`` and
    ``socket`` and ends (if ``setns`` back failed, it would end in the wrong namespace,
    harming nothing).
    """
    result: list[socket.socket | BaseException] = []

    def enter() -> None:
        try:
            setns(ns_fd, CLONE_NEWNET)
            result.append(socket.socket(socket.AF_NETLINK, sock_type, protocol))
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=enter, name="nettracer-setns", daemon=True)
    t.start()
    t.join()
    out = result[0]
    if isinstance(out, BaseException):
        raise out
    return out


#: ``ioctl(fd, NS_GET_NSTYPE)`` on a namespace file: its ``CLONE_NEW*`` type (Linux 4.11,
#: include/uapi/linux/nsfs.h: ``_IO(0xb7, 0x3)``)
NS_GET_NSTYPE = 0xB703


def is_netns_file(path: str) -> bool:
    """True when ``path`` is a network namespace file (nsfs, ``NS_GET_NSTYPE`` is
    ``CLONE_NEWNET``); False for any other file, including other namespace types.
    Opened without blocking (a FIFO answers False at once)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False
    finally:
        os.close(fd)


def interface_names(index: NetnsIndex | None = None, limit: int = 4096) -> set[str]:
    """The names of the interfaces of every network namespace visible now (at most
    ``limit`` namespaces), each listed from a helper thread that enters it (``setns``:
    the calling thread never changes namespace)."""
    paths = list((index or NetnsIndex()).paths().values())[:limit]
    names: set[str] = set()

    def enter() -> None:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                setns(fd, CLONE_NEWNET)
                names.update(name for _, name in socket.if_nameindex())
            except OSError:
                continue
            finally:
                os.close(fd)

    t = threading.Thread(target=enter, name="nettracer-setns", daemon=True)
    t.start()
    t.join()
    return names
