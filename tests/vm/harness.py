"""Run nettracer's tests on Debian's 5.10, 6.1 or 6.12 kernel under QEMU (TCG).

The host's root is shared read-only with the guest over virtio-9p, so the guest
runs the host's Python, its site-packages and the repository at the same path;
a tmpfs-backed overlayfs makes it writable.  Which kernel packages, where apt
finds them and how they are cached: ``kernels.py``.  Busybox's ``modprobe``
serves the guest's ``request_module()`` since the host may have no kmod.

With ``--no-btf`` the guest mounts a tmpfs over ``/sys/kernel/btf`` before any
test, so nettracer sees a kernel without BTF and guesses its offsets.

Exit status: the guest's (first non-zero among the guest checks,
``nettracer offsets`` and pytest), or 124 when the VM timed out, 125 when the VM could not
be started (no QEMU, no kernel package), 126 when the guest stopped without
reporting a status.

Only the standard library is used; run it as ``tests/vm/run [options] [pytest args]``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kernels import (
    DEFAULT_SERIES,
    SERIES,
    Kernel,
    Series,
    VMError,
    ensure_busybox,
    ensure_kernel,
    log,
    series_of_package,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

EXIT_TIMEOUT = 124
EXIT_NO_STATUS = 126

#: modules the initramfs loads before it can mount the host's root (dependencies added)
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")

#: default pytest selection: the kernel tests, without this harness's own directory
DEFAULT_PYTEST_ARGS = ("-m", "kernel", "tests", "--ignore=tests/vm")

MARKER_RE = re.compile(r"NETTRACER_VM_EXIT=(\d+)")

#: terminal control sequences SeaBIOS and the kernel write to the serial console
ESCAPE_RE = re.compile(rb"\x1b(\[[0-9;?]*[A-Za-z]|[c78])")


# --- initramfs ------------------------------------------------------------------------------


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """Relative paths of ``wanted`` modules and their dependencies, dependencies first.

    Reads ``modules.dep`` (``kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko ...``); modules
    listed in ``modules.builtin`` are part of the kernel image and left out (6.12 builds
    ``virtio_pci`` in).  Module names compare with ``-`` and ``_`` equal, as the kernel does.
    """
    deps: dict[str, list[str]] = {}
    path_of: dict[str, str] = {}
    builtin_file = modules_dir / "modules.builtin"
    builtin = (
        {_module_name(m) for m in builtin_file.read_text().split()}
        if builtin_file.exists()
        else set()
    )
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        name = _module_name(mod)
        path_of[name] = mod
        deps[name] = [_module_name(d) for d in rest.split()]
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order or (name in builtin and name not in path_of):
            return
        if name not in path_of:
            raise VMError(f"module {name} is not in {modules_dir}/modules.dep")
        if name in chain:
            raise VMError(f"module dependency loop: {' -> '.join((*chain, name))}")
        for dep in deps[name]:
            visit(dep, (*chain, name))
        order.append(name)

    for name in wanted:
        visit(_module_name(name), ())
    return [Path(path_of[name]) for name in order]


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


class Cpio:
    """Writer of the ``newc`` cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ino = 1

    def _entry(self, name: str, mode: int, body: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        encoded = name.encode() + b"\0"
        fields = (
            self.ino, mode, 0, 0, 1, 0, len(body), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        )  # fmt: skip
        self.ino += 1
        self.data += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        self.data += b"\0" * (-len(self.data) % 4) + body
        self.data += b"\0" * (-len(self.data) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, body: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, body)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.data) + b"\0" * (-len(self.data) % 512)


def build_initramfs(kernel: Kernel, busybox: Path, out: Path) -> None:
    """Write an uncompressed initramfs: busybox, tests/vm/initramfs-init as /init, modules."""
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "host", "newroot", "rw", "modules"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", (HERE / "initramfs-init").read_bytes(), 0o755)
    names = []
    for rel in module_load_order(kernel.modules, INITRAMFS_MODULES):
        name = _module_name(rel.name)
        if not rel.name.endswith(".ko"):
            raise VMError(f"{rel} is compressed; busybox insmod in the initramfs needs plain .ko")
        cpio.file(f"modules/{name}.ko", (kernel.modules / rel).read_bytes())
        names.append(name)
    cpio.file("modules/order", "".join(f"{n}\n" for n in names).encode())
    out.write_bytes(cpio.finish())


# --- QEMU -----------------------------------------------------------------------------------


#: QEMU's TCG threading: ``single`` runs every vCPU on one host thread. With ``multi`` (one
#: thread per vCPU) a 6.12 guest died of "Oops: int3" in netif_rx_internal while a test
#: enabled the netif_rx tracepoint and another vCPU sent on loopback: the other vCPU ran a
#: stale translation of the int3 the kernel's text_poke_bp() had already removed (QEMU
#: 7.2's cross-modifying code under MTTCG). One host thread makes code patching coherent.
TCG_THREAD = os.environ.get("NETTRACER_VM_TCG_THREAD", "single")


def qemu_command(
    qemu: str, kernel: Kernel, initrd: Path, rundir: Path, memory: int, smp: int, quiet: bool
) -> list[str]:
    """The QEMU command line: TCG, serial console on stdio, three 9p shares, no network."""
    # no_hash_pointers (5.12): tracepoints whose print fmt is a plain %p (kfree_skb's
    # location before 6.2) print the real address, which the kallsyms test compares with
    append = "console=ttyS0 panic=-1 oops=panic mitigations=off no_hash_pointers"
    if quiet:
        append += " quiet loglevel=3"

    def share(tag: str, path: Path, readonly: bool) -> list[str]:
        fsdev = f"local,id={tag},path={path},security_model=none,multidevs=remap"
        if readonly:
            fsdev += ",readonly=on"
        return ["-fsdev", fsdev, "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}"]

    return [
        qemu, "-accel", f"tcg,thread={TCG_THREAD}", "-cpu", os.environ.get("NETTRACER_VM_CPU", "max"), "-m", str(memory), "-smp", str(smp),
        "-nographic", "-no-reboot", "-nic", "none",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd), "-append", append,
        *share("hostroot", Path("/"), True),
        *share("modules", kernel.modules, True),
        *share("results", rundir, False),
    ]  # fmt: skip


@dataclass
class GuestResult:
    exit_code: int
    marker: int | None  # from the console's NETTRACER_VM_EXIT=<n>
    boot_seconds: float | None  # until the guest's first line of its own
    total_seconds: float


def run_qemu(cmd: list[str], rundir: Path, timeout: float, interactive: bool) -> GuestResult:
    """Run QEMU, copy its console to stdout, and return the guest's exit status."""
    started = time.monotonic()
    deadline = started + timeout
    stdin = None if interactive else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=None)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    marker: int | None = None
    first_guest_line: float | None = None
    pending = b""
    out = sys.stdout.buffer
    timed_out = False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                # what a terminal would show (a sequence may span two reads: whole lines only)
                raw = ESCAPE_RE.sub(b"", raw).rstrip(b"\r").rsplit(b"\r", 1)[-1]
                line = raw.decode("utf-8", "replace")
                if first_guest_line is None and "nettracer-vm: guest-init" in line:
                    first_guest_line = time.monotonic()
                m = MARKER_RE.search(line)
                if m:
                    marker = int(m.group(1))
                out.write(raw + b"\n")
            out.flush()
    finally:
        if pending.strip():
            out.write(pending.rstrip(b"\r") + b"\n")
            out.flush()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    total = time.monotonic() - started
    boot = first_guest_line - started if first_guest_line is not None else None
    if timed_out:
        return GuestResult(EXIT_TIMEOUT, marker, boot, total)
    status_file = rundir / "exit"
    if status_file.exists():
        try:
            return GuestResult(int(status_file.read_text().strip()), marker, boot, total)
        except ValueError:
            pass
    if marker is not None:
        return GuestResult(marker, marker, boot, total)
    return GuestResult(EXIT_NO_STATUS, None, boot, total)


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tests/vm/run",
        description="Boot a Debian kernel (5.10, 6.1 or 6.12) under QEMU (TCG) with the host's "
        "root over 9p and run nettracer's tests in it as root. Arguments after the options (or after "
        "'--') are pytest's; default: " + " ".join(DEFAULT_PYTEST_ARGS) + ", or "
        "$NETTRACER_VM_PYTEST_ARGS.",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("NETTRACER_VM_CACHE", "/var/cache/nettracer-vm")),
        help="where the kernel and busybox are kept (default $NETTRACER_VM_CACHE or "
        "/var/cache/nettracer-vm)",
    )
    parser.add_argument(
        "--kernel",
        metavar="|".join(SERIES),
        default=os.environ.get("NETTRACER_VM_KERNEL"),
        help=f"kernel series to boot (default $NETTRACER_VM_KERNEL or {DEFAULT_SERIES}): "
        + "; ".join(f"{s.name}: {s.pattern}, {s.distribution}" for s in SERIES.values()),
    )
    parser.add_argument(
        "--kernel-package",
        default=os.environ.get("NETTRACER_VM_KERNEL_PACKAGE"),
        help="apt package to boot, e.g. linux-image-6.1.0-56-amd64 (default: the newest of "
        "the series)",
    )
    parser.add_argument(
        "--no-btf",
        action="store_true",
        help="hide BTF in the guest (a tmpfs over /sys/kernel/btf) so nettracer guesses offsets",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("NETTRACER_VM_TIMEOUT", "780")),
        help="seconds the VM may run, boot included (default 780)",
    )
    parser.add_argument("--memory", type=int, default=2048, help="guest MiB (default 2048)")
    parser.add_argument("--smp", type=int, default=2, help="guest CPUs (default 2)")
    parser.add_argument(
        "--python",
        default=os.environ.get("NETTRACER_VM_PYTHON", sys.executable),
        help="host Python the guest runs (default: the one running this script)",
    )
    parser.add_argument("--no-pytest", action="store_true", help="skip the pytest selection")
    parser.add_argument(
        "--no-offsets", action="store_true", help="skip 'nettracer offsets --source guess'"
    )
    parser.add_argument(
        "--no-guest-checks", action="store_true", help="skip tests/vm/guest_checks.py"
    )
    parser.add_argument(
        "--shell", action="store_true", help="open an interactive shell in the guest instead"
    )
    parser.add_argument("--verbose", action="store_true", help="show the kernel's boot messages")
    parser.add_argument("--prepare-only", action="store_true", help="download and cache only")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="pytest arguments")
    args = parser.parse_args(argv)
    if args.pytest_args and args.pytest_args[0] == "--":
        args.pytest_args = args.pytest_args[1:]
    if not args.pytest_args:
        env = os.environ.get("NETTRACER_VM_PYTEST_ARGS")
        args.pytest_args = shlex.split(env) if env else list(DEFAULT_PYTEST_ARGS)
    return args


def chosen_series(args: argparse.Namespace) -> Series:
    """The series of ``--kernel``, or of ``--kernel-package``, or the default (6.1)."""
    if args.kernel is not None and args.kernel not in SERIES:
        raise VMError(f"unknown kernel series {args.kernel!r}: choose one of {', '.join(SERIES)}")
    if args.kernel_package is None:
        return SERIES[args.kernel or DEFAULT_SERIES]
    series = series_of_package(args.kernel_package)
    if args.kernel is not None and args.kernel != series.name:
        raise VMError(
            f"--kernel {args.kernel} but {args.kernel_package} is of the {series.name} series"
        )
    return series


def write_job(rundir: Path, args: argparse.Namespace, kernel: Kernel) -> None:
    """The run directory the guest sees as /.nettracer-vm/results."""
    env = {
        "NETTRACER_VM_REPO": str(REPO),
        "NETTRACER_VM_PYTHON": args.python,
        "NETTRACER_VM_KVER": kernel.release,
        "NETTRACER_VM_SERIES": kernel.series.name,
        "NETTRACER_VM_NO_BTF": "1" if args.no_btf else "0",
        "NETTRACER_VM_GUEST_CHECKS": "0" if args.no_guest_checks else "1",
        "NETTRACER_VM_PYTEST": "0" if args.no_pytest else "1",
        "NETTRACER_VM_OFFSETS": "0" if args.no_offsets else "1",
        "NETTRACER_VM_SHELL": "1" if args.shell else "0",
        "NETTRACER_REQUIRE_KERNEL_TESTS": os.environ.get("NETTRACER_REQUIRE_KERNEL_TESTS", ""),
    }
    (rundir / "job.env").write_text(
        "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    )
    (rundir / "pytest-args").write_text("".join(f"{a}\n" for a in args.pytest_args))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _main(args)
    except VMError as exc:
        log(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _main(args: argparse.Namespace) -> int:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VMError("qemu-system-x86_64 not found: install Debian's qemu-system-x86")
    if not Path(args.python).exists():
        raise VMError(f"python {args.python} not found on the host")
    series = chosen_series(args)
    cache: Path = args.cache
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VMError(f"cannot create the cache {cache}: {exc.strerror}") from None
    t0 = time.monotonic()
    with (cache / ".lock").open("w") as lock:  # one download at a time; others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        busybox = ensure_busybox(cache)
        kernel = ensure_kernel(cache, series, args.kernel_package, busybox)
    prepared = time.monotonic() - t0
    log(f"kernel {kernel.release} from {kernel.root} (ready in {prepared:.1f} s)")
    if args.prepare_only:
        return 0
    with tempfile.TemporaryDirectory(prefix="nettracer-vm.") as tmp:
        rundir = Path(tmp) / "results"
        rundir.mkdir()
        initrd = Path(tmp) / "initramfs.cpio"
        build_initramfs(kernel, busybox, initrd)
        write_job(rundir, args, kernel)
        cmd = qemu_command(
            qemu, kernel, initrd, rundir, args.memory, args.smp, quiet=not args.verbose
        )
        log(f"booting: {' '.join(shlex.quote(c) for c in cmd)}")
        result = run_qemu(cmd, rundir, args.timeout, args.shell)
    boot = f"{result.boot_seconds:.1f} s" if result.boot_seconds is not None else "never"
    if result.exit_code == EXIT_TIMEOUT:
        log(f"error: the VM did not finish within {args.timeout:.0f} s; stopped it")
    elif result.exit_code == EXIT_NO_STATUS:
        log("error: the guest stopped without reporting an exit status (see its console above)")
    log(
        f"kernel {kernel.release}{' (BTF hidden)' if args.no_btf else ''}: "
        f"exit status {result.exit_code} "
        f"(boot to guest-init {boot}, VM total {result.total_seconds:.1f} s)"
    )
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
