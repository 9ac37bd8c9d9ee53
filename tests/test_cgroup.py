"""Containers from cgroups: path parsing (no kernel) and real cgroups the tests create.

The kernel tests make a cgroup named like a runtime's (``docker-<64 hex>.scope`` under
the cgroup v2 mount found in ``/proc/mounts``, ``/docker/<id>`` in the v1 ``name=systemd``
hierarchy of a hybrid host), move a child process into it and check that its pid and
its network namespace resolve to that container.  The cgroups are always removed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import kernel_skip

from nettracer.kernel.cgroup import (
    Cgroup,
    Container,
    ContainerResolver,
    cgroup2_mount,
    container_of_path,
    main_path,
    parse_proc_cgroup,
    read_cgroup,
)

ID = "0123456789abcdef" * 4
UID = "1c9f34d2-5b7e-4a3f-9d2e-0f1e2d3c4b5a"


@pytest.mark.parametrize(
    ("path", "want"),
    [
        (f"/system.slice/docker-{ID}.scope", Container(ID, "docker")),
        (f"/docker/{ID}", Container(ID, "docker")),
        (
            f"/system.slice/containerd.service/cri-containerd-{ID}.scope",
            Container(ID, "containerd"),
        ),
        (f"/machine.slice/crio-{ID}.scope", Container(ID, "crio")),
        (f"/machine.slice/libpod-{ID}.scope", Container(ID, "podman")),
        (f"/machine.slice/libpod-{ID}.scope/container", Container(ID, "podman")),
        (f"/libpod_parent/libpod-{ID}", Container(ID, "podman")),
        (
            f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope",
            Container(ID, "podman"),
        ),
        (
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{UID.replace('-', '_')}.slice/cri-containerd-{ID}.scope",
            Container(ID, "containerd", UID),
        ),
        (
            f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{ID}.scope",
            Container(ID, "crio", UID),
        ),
        (f"/kubepods/besteffort/pod{UID}/{ID}", Container(ID, "cri", UID)),
        (f"/kubepods/pod{UID}/{ID}", Container(ID, "cri", UID)),
        # inside a container's own cgroup namespace (Linux 4.6+) the path climbs up
        (f"/../../system.slice/docker-{ID}.scope", Container(ID, "docker")),
        # systemd running in a container: the innermost id wins, inner scopes are not ids
        (f"/system.slice/docker-{ID}.scope/init.scope", Container(ID, "docker")),
        # the runtimes' monitors, a pod without a container, plain services: none
        (f"/machine.slice/crio-conmon-{ID}.scope", None),
        (f"/machine.slice/libpod-conmon-{ID}.scope", None),
        (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice", None),
        (f"/system.slice/{ID}", None),  # a bare id with no runtime or pod above it
        (f"/system.slice/docker-{ID[:-1]}.scope", None),  # 63 digits
        (f"/system.slice/docker-{ID.upper()}.scope", None),
        ("/system.slice/docker.service", None),
        ("/", None),
    ],
)
def test_container_of_path(path: str, want: Container | None) -> None:
    assert container_of_path(path) == want


V1_HYBRID = f"""12:pids:/system.slice/docker-{ID}.scope
11:cpu,cpuacct:/system.slice/docker-{ID}.scope
1:name=systemd:/system.slice/docker-{ID}.scope
0::/
"""


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (f"0::/system.slice/docker-{ID}.scope\n", f"/system.slice/docker-{ID}.scope"),
        (V1_HYBRID, f"/system.slice/docker-{ID}.scope"),  # hybrid, v2 unused
        ("1:name=systemd:/\n0::/user.slice/x.scope\n", "/user.slice/x.scope"),
        (f"3:memory:/docker/{ID}\n2:cpu:/\n", f"/docker/{ID}"),  # v1 only, no systemd
        ("2:cpu:/\n0::/\n", "/"),
    ],
)
def test_main_path(text: str, want: str) -> None:
    assert main_path(parse_proc_cgroup(text)) == want


def test_parse_proc_cgroup_fields() -> None:
    got = parse_proc_cgroup("11:cpu,cpuacct:/a:b\n0::/c\nnonsense\n1:name=systemd:/\n")
    assert got == [(11, ("cpu", "cpuacct"), "/a:b"), (0, (), "/c"), (1, ("name=systemd",), "/")]


def test_container_json() -> None:
    assert Container(ID, "crio", UID).as_json() == {"id": ID, "runtime": "crio", "pod_uid": UID}


def test_cgroup2_mount_from_a_mounts_file(tmp_path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
        "cgroup2 /sys/fs/cgroup/uni\\040fied cgroup2 rw 0 0\n"
    )
    assert cgroup2_mount(str(mounts)) == "/sys/fs/cgroup/uni fied"
    mounts.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n")
    assert cgroup2_mount(str(mounts)) is None


# -- the kernel: real cgroups and processes --------------------------------------------
def _v1_systemd_mount() -> str | None:
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[2] == "cgroup" and "name=systemd" in fields[3].split(","):
                return fields[1]
    return None


@contextlib.contextmanager
def cgroup_dir(root: str, *parts: str) -> Iterator[str]:
    """``root/parts...`` created (parents too); what was created is removed afterwards."""
    made = []
    path = root
    try:
        for part in parts:
            path = os.path.join(path, part)
            if not os.path.isdir(path):  # a runtime's own "docker" may be there already
                os.mkdir(path)
                made.append(path)
        yield path
    finally:
        for d in reversed(made):
            deadline = time.monotonic() + 10
            while True:
                try:
                    os.rmdir(d)
                    break
                except OSError:  # EBUSY until the exited child has left it
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


@contextlib.contextmanager
def child(*argv: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(list(argv) or ["sleep", "600"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def move(pid: int, cgroup: str) -> None:
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def own_netns(pid: int) -> int:
    """The inode of ``pid``'s network namespace once it differs from ours (unshare
    switches after the fork we saw)."""
    ours = os.stat("/proc/self/ns/net").st_ino
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        if ino != ours:
            return ino
        time.sleep(0.01)
    pytest.fail("the child never entered a network namespace of its own")


@pytest.mark.kernel
def test_docker_scope_in_cgroup_v2() -> None:
    root = cgroup2_mount()
    if root is None:
        kernel_skip("no cgroup v2 hierarchy mounted")
    if shutil.which("unshare") is None:
        kernel_skip("needs unshare (util-linux)")
    cid = secrets.token_hex(32)
    test_slice = f"nettracer-test-{os.getpid()}.slice"
    with (
        cgroup_dir(root, test_slice, f"docker-{cid}.scope") as cg,
        child("unshare", "--net", "sleep", "600") as proc,
    ):
        move(proc.pid, cg)
        rel = "/" + os.path.relpath(cg, root)
        want = Cgroup(rel, Container(cid, "docker"))
        assert read_cgroup(proc.pid) == want
        resolver = ContainerResolver()
        assert resolver.by_pid(proc.pid) == want
        ino = own_netns(proc.pid)
        assert resolver.by_netns(ino) == want
        # our own namespace is the host's: its lowest pid is in no container
        host = resolver.by_netns(os.stat("/proc/self/ns/net").st_ino)
        assert host is not None and host.container is None
        assert resolver.by_netns(ino) == want and resolver.scans == 1  # cached
    assert read_cgroup(proc.pid) is None  # gone
    assert not os.path.exists(os.path.join(root, test_slice))


@pytest.mark.kernel
def test_docker_cgroupfs_in_v1_of_a_hybrid_host() -> None:
    """``/docker/<id>`` in the v1 ``name=systemd`` hierarchy while the v2 path is ``/``."""
    root = _v1_systemd_mount()
    if root is None or cgroup2_mount() is None:
        kernel_skip("not a hybrid cgroup host (v1 name=systemd and v2 both mounted)")
    cid = secrets.token_hex(32)
    with cgroup_dir(root, "docker", cid) as cg, child() as proc:
        move(proc.pid, cg)
        with open(f"/proc/{proc.pid}/cgroup") as f:
            entries = parse_proc_cgroup(f.read())
        assert (0, (), "/") in entries or not any(hid == 0 for hid, _, _ in entries)
        assert read_cgroup(proc.pid) == Cgroup(f"/docker/{cid}", Container(cid, "docker"))
    assert not os.path.exists(os.path.join(root, "docker", cid))


@pytest.mark.kernel
@pytest.mark.parametrize(
    ("runtime", "scope"),
    [
        ("containerd", "cri-containerd-{}.scope"),
        ("crio", "crio-{}.scope"),
        ("podman", "libpod-{}.scope"),
    ],
)
def test_kubernetes_pod_slices_in_cgroup_v2(runtime: str, scope: str) -> None:
    """A pod's cgroups as the kubelet's systemd driver names them (the pod UID's dashes
    written as underscores), a process of ours inside: its container and pod UID."""
    import uuid

    root = cgroup2_mount()
    if root is None:
        kernel_skip("no cgroup v2 hierarchy mounted")
    cid, uid = secrets.token_hex(32), str(uuid.uuid4())
    parts = (
        f"nettracer-test-{os.getpid()}.slice",
        "kubepods-burstable.slice",
        f"kubepods-burstable-pod{uid.replace('-', '_')}.slice",
        scope.format(cid),
    )
    with cgroup_dir(root, *parts) as cg, child() as proc:
        move(proc.pid, cg)
        got = read_cgroup(proc.pid)
        assert got == Cgroup("/" + "/".join(parts), Container(cid, runtime, uid))
