"""Checks of the test VM itself, run by tests/vm/guest-init inside the guest.

The file name does not match pytest's ``test_*.py``, so the host's test run does not
collect it; the harness runs it explicitly.  Outside the VM (``NETTRACER_IN_VM``
unset) the whole module is skipped: that is about where it runs, not the kernel.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import subprocess
from pathlib import Path

import pytest

if os.environ.get("NETTRACER_IN_VM") != "1":
    pytest.skip("guest checks run only inside tests/vm/run's VM", allow_module_level=True)

#: the release the harness booted (from the kernel package name) and its series ("5.10")
BOOTED = os.environ["NETTRACER_VM_KVER"]
SERIES = os.environ["NETTRACER_VM_SERIES"]
BTF_HIDDEN = os.environ.get("NETTRACER_VM_NO_BTF") == "1"
REPO = Path(os.environ["NETTRACER_VM_REPO"])

#: x86-64 syscall number of bpf(2); BPF_MAP_CREATE = 0, BPF_MAP_TYPE_ARRAY = 2
SYS_bpf = 321
BTF_MAGIC = 0xEB9F


def test_kernel_is_the_booted_series() -> None:
    release = os.uname().release
    assert release == BOOTED
    assert release.startswith(f"{SERIES}.")


def test_root_and_writable_overlay(tmp_path: Path) -> None:
    assert os.geteuid() == 0
    probe = REPO / f".nettracer-vm-probe-{os.getpid()}"
    probe.write_text("overlay upper is tmpfs\n")  # lands in the guest's tmpfs, not the host
    probe.unlink()
    (tmp_path / "x").write_text("tmp")


def test_btf_vmlinux_present_or_hidden() -> None:
    """Debian builds 5.10, 6.1 and 6.12 with CONFIG_DEBUG_INFO_BTF=y: struct btf_header
    starts with its magic.  With --no-btf a tmpfs hides it and a copy is kept aside."""
    btf = Path("/sys/kernel/btf/vmlinux")
    if BTF_HIDDEN:
        assert not btf.exists()
        assert _mounts().get("/sys/kernel/btf") == "tmpfs"
        btf = Path(os.environ["NETTRACER_VM_HIDDEN_BTF"])
    assert btf.exists()
    with btf.open("rb") as f:
        magic, version = struct.unpack("<HB", f.read(3))
    assert magic == BTF_MAGIC
    assert version == 1
    assert btf.stat().st_size > 1024


def test_import_nettracer_from_repo() -> None:
    import nettracer

    assert Path(nettracer.__file__).resolve().is_relative_to(REPO.resolve())


def _mounts() -> dict[str, str]:
    """Mount point -> file system type, from /proc/mounts (the last mount wins)."""
    return {
        line.split()[1]: line.split()[2] for line in Path("/proc/mounts").read_text().splitlines()
    }


def test_mounts() -> None:
    mounts = _mounts()
    assert mounts.get("/") == "overlay"
    assert mounts.get("/sys/kernel/tracing") == "tracefs"
    assert mounts.get("/sys/fs/bpf") == "bpf"
    assert mounts.get("/tmp") == "tmpfs"
    assert Path("/sys/kernel/tracing/events/skb/kfree_skb/format").exists()
    assert Path("/sys/kernel/tracing/events/sock/inet_sock_set_state/format").exists()


def test_loopback_is_up() -> None:
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client.connect(server.getsockname())
        conn, peer = server.accept()
        conn.close()
        assert peer == client.getsockname()


def test_bpf_map_create() -> None:
    """bpf(BPF_MAP_CREATE) of a 1-entry array: eBPF works under TCG."""
    libc = ctypes.CDLL(None, use_errno=True)
    # union bpf_attr, map_create: map_type, key_size, value_size, max_entries (u32 each)
    attr = ctypes.create_string_buffer(struct.pack("<IIII", 2, 4, 8, 1), 128)
    fd = libc.syscall(SYS_bpf, 0, attr, ctypes.sizeof(attr))
    assert fd >= 0, os.strerror(ctypes.get_errno())
    os.close(fd)


def test_netns_and_module_autoload() -> None:
    """A veth pair in a fresh netns makes the kernel modprobe veth from the booted module tree
    (decompressed from .ko.xz on 6.12)."""
    ns = f"nettracer-vm-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(
            ["ip", "-n", ns, "link", "add", "vm0", "type", "veth", "peer", "name", "vm1"],
            check=True,
        )
        out = subprocess.run(
            ["ip", "-n", ns, "-o", "link", "show", "vm0"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert "vm0@vm1" in out
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_nftables_available() -> None:
    """nf_tables is a module in Debian's kernels; nft's netlink request autoloads it."""
    ns = f"nettracer-vm-nft-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "add", "table", "inet", "nettracer_vm"], check=True
        )
        out = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "list", "tables"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert "nettracer_vm" in out
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
