"""Run nettracer's tests on Debian's 6.1 kernel under QEMU (TCG).

The host's root is shared read-only with the guest over virtio-9p, so the guest
runs the host's Python, its site-packages and the repository at the same path;
a tmpfs-backed overlayfs makes it writable.  Debian's generic ``amd64`` 6.1
kernel is used, not the ``cloud-amd64`` flavour: the cloud kernel is built
without ``CONFIG_NET_9P``, the generic one has 9p, virtio and overlayfs as
modules.  Debian's ``.deb`` has no ``modules.dep``; busybox's ``depmod`` makes
one, and busybox's ``modprobe`` serves the guest's ``request_module()`` since
the host may have no kmod.

Layout of the cache (``$NETTRACER_VM_CACHE``, default ``/var/cache/nettracer-vm``)::

    busybox/busybox                      from Debian's busybox-static
    <release>/boot/vmlinuz-<release>     from linux-image-<release>
    <release>/lib/modules/<release>/     the module tree, with modules.dep
    <release>/.complete                  written last

Exit status: the guest's (first non-zero among the guest checks, pytest and
``nettracer offsets``), or 124 when the VM timed out, 125 when the VM could not
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

EXIT_TIMEOUT = 124
EXIT_SETUP = 125
EXIT_NO_STATUS = 126

#: apt package name of Debian's generic 6.1 kernel (signed image, same content as -unsigned)
KERNEL_PACKAGE_RE = re.compile(r"^linux-image-(6\.1\.0-(\d+)-amd64)$")

#: modules the initramfs loads before it can mount the host's root (dependencies added)
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")

#: default pytest selection: the kernel tests, without this harness's own directory
DEFAULT_PYTEST_ARGS = ("-m", "kernel", "tests", "--ignore=tests/vm")

MARKER_RE = re.compile(r"NETTRACER_VM_EXIT=(\d+)")

#: terminal control sequences SeaBIOS and the kernel write to the serial console
ESCAPE_RE = re.compile(rb"\x1b(\[[0-9;?]*[A-Za-z]|[c78])")


class VMError(Exception):
    """The VM could not be prepared or started; the message is one line."""

    def __init__(self, message: str, exit_code: int = EXIT_SETUP) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def log(message: str) -> None:
    """Print a harness message (stderr, so the guest's output stays on stdout)."""
    sys.stderr.write(f"nettracer-vm: {message}\n")
    sys.stderr.flush()


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise VMError(f"{what}: {cmd[0]} not found ({exc.strerror})") from None
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise VMError(f"{what} failed: {' '.join(cmd)}: {detail}")
    return done.stdout


# --- kernel package -------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """An extracted Debian kernel in the cache."""

    release: str  # e.g. "6.1.0-56-amd64", what uname -r says in the guest
    root: Path  # holds boot/ and lib/modules/<release>/

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.release


def _abi(release: str) -> int:
    return int(release.split("-")[1])


def newest_kernel_package() -> str | None:
    """Name of the newest ``linux-image-6.1.0-N-amd64`` apt knows, or None."""
    try:
        out = subprocess.run(
            ["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except FileNotFoundError:
        return None
    names = [line.split(" ", 1)[0] for line in out.splitlines()]
    found = [m for m in map(KERNEL_PACKAGE_RE.match, names) if m]
    if not found:
        return None
    return max(found, key=lambda m: int(m.group(2))).group(0)


def cached_kernels(cache: Path) -> list[str]:
    """Releases fully extracted in ``cache``, newest first."""
    if not cache.is_dir():
        return []
    releases = [
        p.name
        for p in cache.iterdir()
        if (p / ".complete").exists() and KERNEL_PACKAGE_RE.match(f"linux-image-{p.name}")
    ]
    return sorted(releases, key=_abi, reverse=True)


def apt_download(package: str, into: Path) -> Path:
    """``apt-get download package`` into ``into``; the path of the .deb."""
    into.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", "-q", package], f"downloading {package}", cwd=into)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if not debs:
        raise VMError(f"apt-get download {package} left no .deb in {into}")
    return debs[-1]


def ensure_busybox(cache: Path) -> Path:
    """A static busybox from Debian's busybox-static, cached."""
    target = cache / "busybox" / "busybox"
    if target.exists():
        return target
    work = Path(tempfile.mkdtemp(prefix="busybox.", dir=cache))
    try:
        deb = apt_download("busybox-static", work)
        _run(["dpkg-deb", "-x", str(deb), str(work / "x")], "extracting busybox-static")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        shutil.copy2(work / "x" / "bin" / "busybox", tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def ensure_kernel(cache: Path, package: str | None, busybox: Path) -> Kernel:
    """Download and extract the kernel ``package`` (default: newest generic 6.1) once."""
    if package is None:
        package = newest_kernel_package()
        if package is None:
            cached = cached_kernels(cache)
            if not cached:
                raise VMError(
                    "no Debian linux-image-6.1.0-*-amd64 package known to apt and none cached "
                    f"in {cache}: run 'apt-get update' (Debian bookworm sources needed)"
                )
            log(f"apt knows no 6.1 kernel package; using the cached {cached[0]}")
            return Kernel(cached[0], cache / cached[0])
    match = KERNEL_PACKAGE_RE.match(package)
    if not match:
        raise VMError(
            f"kernel package {package!r} is not a generic 6.1 amd64 image "
            "(linux-image-6.1.0-N-amd64; the cloud flavour has no 9p)"
        )
    kernel = Kernel(match.group(1), cache / match.group(1))
    if (kernel.root / ".complete").exists():
        return kernel
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"{kernel.release}.", dir=cache))
    try:
        deb = apt_download(package, work / "deb")
        downloaded = time.monotonic()
        tree = work / "tree"
        _run(["dpkg-deb", "-x", str(deb), str(tree)], f"extracting {deb.name}")
        _run([str(busybox), "depmod", "-b", str(tree), kernel.release], "depmod")
        for unused in ("usr", "lib/firmware"):  # docs, not needed by the guest
            shutil.rmtree(tree / unused, ignore_errors=True)
        (tree / ".complete").write_text(f"{deb.name}\n")
        shutil.rmtree(kernel.root, ignore_errors=True)
        tree.rename(kernel.root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(
        f"cached {package} in {kernel.root} (download {downloaded - started:.1f} s, "
        f"extract+depmod {time.monotonic() - downloaded:.1f} s)"
    )
    return kernel


# --- initramfs ------------------------------------------------------------------------------


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """Relative paths of ``wanted`` modules and their dependencies, dependencies first.

    Reads ``modules.dep`` (``kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko ...``).
    Module names compare with ``-`` and ``_`` equal, as the kernel does.
    """
    deps: dict[str, list[str]] = {}
    path_of: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        name = _module_name(mod)
        path_of[name] = mod
        deps[name] = [_module_name(d) for d in rest.split()]
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order:
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
        qemu, "-accel", "tcg", "-cpu", os.environ.get("NETTRACER_VM_CPU", "max"), "-m", str(memory), "-smp", str(smp),
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
            pending += ESCAPE_RE.sub(b"", chunk)
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                raw = raw.rstrip(b"\r").rsplit(b"\r", 1)[-1]  # what a terminal would show
                line = raw.decode("utf-8", "replace")
                if first_guest_line is None and line.startswith("nettracer-vm:"):
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
        description="Boot Debian's 6.1 kernel under QEMU (TCG) with the host's root over 9p "
        "and run nettracer's tests in it as root. Arguments after the options (or after "
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
        "--kernel-package",
        default=os.environ.get("NETTRACER_VM_KERNEL_PACKAGE"),
        help="apt package to boot, e.g. linux-image-6.1.0-56-amd64 (default: newest such)",
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


def write_job(rundir: Path, args: argparse.Namespace, kernel: Kernel) -> None:
    """The run directory the guest sees as /.nettracer-vm/results."""
    env = {
        "NETTRACER_VM_REPO": str(REPO),
        "NETTRACER_VM_PYTHON": args.python,
        "NETTRACER_VM_KVER": kernel.release,
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
    cache: Path = args.cache
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VMError(f"cannot create the cache {cache}: {exc.strerror}") from None
    t0 = time.monotonic()
    with (cache / ".lock").open("w") as lock:  # one download at a time; others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        busybox = ensure_busybox(cache)
        kernel = ensure_kernel(cache, args.kernel_package, busybox)
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
        offsets = (rundir / "offsets").read_text().strip() if (rundir / "offsets").exists() else ""
    boot = f"{result.boot_seconds:.1f} s" if result.boot_seconds is not None else "never"
    if result.exit_code == EXIT_TIMEOUT:
        log(f"error: the VM did not finish within {args.timeout:.0f} s; stopped it")
    elif result.exit_code == EXIT_NO_STATUS:
        log("error: the guest stopped without reporting an exit status (see its console above)")
    if offsets == "missing":
        log("'nettracer offsets' does not exist yet; it was not run")
    log(
        f"kernel {kernel.release}: exit status {result.exit_code} "
        f"(boot to guest-init {boot}, VM total {result.total_seconds:.1f} s)"
    )
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
