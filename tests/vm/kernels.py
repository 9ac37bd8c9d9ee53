"""Debian kernel packages for the test VM: which ones, where apt finds them, the cache.

Three series are booted, each Debian's generic ``amd64`` flavour (the ``cloud-amd64``
kernels are built without ``CONFIG_NET_9P``, and the guest's root comes over 9p):

- **5.10**, Debian 11 (``linux-image-5.10.0-N-amd64``, suite ``bullseye``): the machine's
  apt does not list bullseye, so a *private* apt configuration (its own sources file,
  lists and cache under ``<cache>/apt/bullseye/``) fetches it from the same Debian archive
  the machine uses; the system's lists stay as they are.
- **6.1**, Debian 12 (``linux-image-6.1.0-N-amd64``) from the configured suites.
- **6.12**, Debian 12 (``linux-image-6.12.N+deb12-amd64``, bookworm-security) from the
  configured suites.  Its modules are ``.ko.xz``, which busybox's ``insmod`` and
  ``modprobe`` cannot load: they are decompressed when the package is unpacked.

Debian's ``.deb`` has no ``modules.dep``; busybox's ``depmod`` writes one.  Layout of the
cache (``$NETTRACER_VM_CACHE``, default ``/var/cache/nettracer-vm``)::

    busybox/busybox                      from Debian's busybox-static
    apt/<suite>/{sources.list,lists,cache}   private apt configuration of a suite
    <release>/boot/vmlinuz-<release>     from linux-image-<release>
    <release>/lib/modules/<release>/     the module tree (plain .ko), with modules.dep
    <release>/.complete                  written last: the name of the .deb

Only the standard library is used.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

EXIT_SETUP = 125

#: where the machine's apt sources are (deb822 ``.sources`` and one-line ``.list`` files)
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
KEYRINGS = Path("/usr/share/keyrings")

#: decompressors for the module suffixes Debian uses (6.12: xz); busybox loads only .ko
MODULE_DECOMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    ".xz": lzma.decompress,
    ".gz": gzip.decompress,
}


class VMError(Exception):
    """The VM could not be prepared or started; the message is one line."""

    def __init__(self, message: str, exit_code: int = EXIT_SETUP) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def log(message: str) -> None:
    """Print a harness message (stderr, so the guest's output stays on stdout)."""
    sys.stderr.write(f"nettracer-vm: {message}\n")
    sys.stderr.flush()


def run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    """Run ``cmd``; its stdout, or a one-line VMError with the last line of its stderr."""
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise VMError(f"{what}: {cmd[0]} not found ({exc.strerror})") from None
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise VMError(f"{what} failed: {' '.join(cmd)}: {detail}")
    return done.stdout


@dataclass(frozen=True)
class Series:
    """One kernel series the VM boots: Debian's generic amd64 image of it."""

    name: str  # what --kernel takes: "5.10", "6.1", "6.12"
    #: the package name, as an ERE apt-cache understands and Python's re too;
    #: group 1 is the release (``uname -r``), group 2 the number that orders builds
    package: str
    suite: str | None  # a Debian suite fetched with a private apt configuration; None: the system's
    distribution: str  # for messages: "Debian 11 (bullseye)"
    pattern: str  # for messages: "linux-image-5.10.0-N-amd64"

    def match(self, name: str) -> re.Match[str] | None:
        return re.fullmatch(self.package, name)


SERIES = {
    s.name: s
    for s in (
        Series(
            "5.10", r"linux-image-(5\.10\.0-([0-9]+)-amd64)", "bullseye",
            "Debian 11 (bullseye)", "linux-image-5.10.0-N-amd64",
        ),
        Series(
            "6.1", r"linux-image-(6\.1\.0-([0-9]+)-amd64)", None,
            "Debian 12 (bookworm)", "linux-image-6.1.0-N-amd64",
        ),
        Series(
            "6.12", r"linux-image-(6\.12\.([0-9]+)\+deb12-amd64)", None,
            "Debian 12 (bookworm-security)", "linux-image-6.12.N+deb12-amd64",
        ),
    )
}  # fmt: skip
DEFAULT_SERIES = "6.1"


def series_of_package(package: str) -> Series:
    """The series whose package name ``package`` is (``linux-image-5.10.0-32-amd64``)."""
    for series in SERIES.values():
        if series.match(package):
            return series
    raise VMError(
        f"kernel package {package!r} is none of "
        + ", ".join(s.pattern for s in SERIES.values())
        + " (generic amd64 only: the cloud flavour has no 9p)"
    )


@dataclass(frozen=True)
class Kernel:
    """An extracted Debian kernel in the cache."""

    release: str  # e.g. "6.1.0-56-amd64", what uname -r says in the guest
    root: Path  # holds boot/ and lib/modules/<release>/
    series: Series

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.release


# --- apt ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Apt:
    """apt-cache / apt-get with the system's configuration, or a private one (``options``)."""

    options: tuple[str, ...] = ()

    def search(self, series: Series) -> list[str]:
        """Package names of ``series`` apt knows, oldest build first."""
        try:
            out = subprocess.run(
                ["apt-cache", *self.options, "search", "--names-only", f"^{series.package}$"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
        except FileNotFoundError:
            return []
        found = [
            m for m in map(series.match, (ln.split(" ", 1)[0] for ln in out.splitlines())) if m
        ]
        return [m.group(0) for m in sorted(found, key=lambda m: int(m.group(2)))]

    def download(self, package: str, into: Path) -> Path:
        """``apt-get download package`` into ``into``; the path of the .deb."""
        into.mkdir(parents=True, exist_ok=True)
        into.chmod(0o755)  # apt's download sandbox user (_apt) writes there
        run(["apt-get", *self.options, "download", "-q", package], f"downloading {package}", into)
        debs = sorted(into.glob(f"{package}_*.deb"))
        if not debs:
            raise VMError(f"apt-get download {package} left no .deb in {into}")
        return debs[-1]


def debian_archive_uri() -> str:
    """The URI of the Debian archive the machine's apt uses (not debian-security)."""
    files: list[Path] = []
    for where in APT_SOURCES:
        files += sorted(where.glob("*")) if where.is_dir() else [where]
    for path in files:
        if path.suffix not in (".sources", ".list") or not path.is_file():
            continue
        for uri in re.findall(r"(?:^URIs:|^deb(?:\s+\[[^]]*\])?)\s+(\S+)", path.read_text(), re.M):
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    raise VMError("no Debian archive (a URI ending in /debian) in /etc/apt/sources.list{,.d}")


def private_apt(cache: Path, suite: str) -> Apt:
    """apt configured for ``suite`` alone, its sources, lists and cache under ``cache/apt``.

    Its lists are fetched once (``apt-get update``) and kept: a later run needs no network.
    """
    keys = sorted(KEYRINGS.glob(f"debian-archive-{suite}-*.gpg"))
    if not keys:
        raise VMError(
            f"no {KEYRINGS}/debian-archive-{suite}-*.gpg: install debian-archive-keyring "
            f"(it holds the keys of Debian's {suite})"
        )
    home = cache / "apt" / suite
    lists = home / "lists"
    sources = home / "sources.list"
    options = (
        "-o", f"Dir::Etc::sourcelist={sources}", "-o", "Dir::Etc::sourceparts=-",
        "-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={home / 'cache'}",
    )  # fmt: skip
    apt = Apt(options)
    if any(lists.glob("*_Packages*")):
        return apt
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (home / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    signed_by = ",".join(str(k) for k in keys)
    sources.write_text(f"deb [signed-by={signed_by}] {debian_archive_uri()} {suite} main\n")
    started = time.monotonic()
    run(["apt-get", *options, "-q", "update"], f"apt-get update of {suite} (private lists)")
    log(f"fetched {suite}'s package lists into {lists} in {time.monotonic() - started:.1f} s")
    return apt


# --- cache ----------------------------------------------------------------------------------


def cached_kernels(cache: Path, series: Series) -> list[str]:
    """Releases of ``series`` fully extracted in ``cache``, newest first."""
    if not cache.is_dir():
        return []
    found = [
        m
        for p in cache.iterdir()
        if (p / ".complete").exists() and (m := series.match(f"linux-image-{p.name}"))
    ]
    return [m.group(1) for m in sorted(found, key=lambda m: int(m.group(2)), reverse=True)]


def ensure_busybox(cache: Path) -> Path:
    """A static busybox from Debian's busybox-static (the system's apt), cached."""
    target = cache / "busybox" / "busybox"
    if target.exists():
        return target
    work = Path(tempfile.mkdtemp(prefix="busybox.", dir=cache))
    try:
        deb = Apt().download("busybox-static", work)
        run(["dpkg-deb", "-x", str(deb), str(work / "x")], "extracting busybox-static")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        shutil.copy2(work / "x" / "bin" / "busybox", tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def choose_package(cache: Path, series: Series, package: str | None) -> tuple[str, Apt | None]:
    """The package to boot (newest of the series apt knows) and the apt to fetch it with.

    When apt knows none (no lists, no network) the newest cached release is used; the
    returned apt is then None.
    """
    try:
        apt = private_apt(cache, series.suite) if series.suite else Apt()
    except VMError as exc:
        apt = None
        reason = str(exc)
    if package is not None:
        if series.match(package) is None:
            raise VMError(f"kernel package {package!r} is not of the {series.name} series")
        if apt is None and not (cache / series.match(package).group(1) / ".complete").exists():
            raise VMError(reason)
        return package, apt
    known = apt.search(series) if apt else []
    if known:
        return known[-1], apt
    cached = cached_kernels(cache, series)
    if not cached:
        where = f"{series.distribution}'s lists" if apt else reason
        raise VMError(
            f"no {series.pattern} package known ({where}) and none cached in {cache}: "
            "run 'apt-get update'"
        )
    log(f"apt knows no {series.name} kernel package; using the cached {cached[0]}")
    return f"linux-image-{cached[0]}", None


def ensure_kernel(cache: Path, series: Series, package: str | None, busybox: Path) -> Kernel:
    """Download and extract the kernel ``package`` (default: newest of ``series``) once."""
    package, apt = choose_package(cache, series, package)
    release = series.match(package).group(1)
    kernel = Kernel(release, cache / release, series)
    if (kernel.root / ".complete").exists():
        return kernel
    assert apt is not None  # choose_package returns no apt only for a cached release
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"{release}.", dir=cache))
    try:
        deb = apt.download(package, work / "deb")
        downloaded = time.monotonic()
        tree = work / "tree"
        run(["dpkg-deb", "-x", str(deb), str(tree)], f"extracting {deb.name}")
        decompressed = decompress_modules(tree / "lib" / "modules" / release)
        run([str(busybox), "depmod", "-b", str(tree), release], "depmod")
        for unused in ("usr", "lib/firmware"):  # docs, not needed by the guest
            shutil.rmtree(tree / unused, ignore_errors=True)
        (tree / ".complete").write_text(f"{deb.name}\n")
        shutil.rmtree(kernel.root, ignore_errors=True)
        tree.rename(kernel.root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(
        f"cached {package} in {kernel.root} (download {downloaded - started:.1f} s, "
        f"extract+depmod {time.monotonic() - downloaded:.1f} s"
        + (f", {decompressed} modules decompressed)" if decompressed else ")")
    )
    return kernel


def decompress_modules(modules: Path) -> int:
    """Replace every ``*.ko.xz`` (``.ko.gz``) under ``modules`` by the plain ``.ko``.

    Debian's 6.12 packages compress modules with xz (``CONFIG_MODULE_COMPRESS_XZ``);
    busybox's insmod and modprobe read only plain ELF.  Returns how many were replaced.
    """
    count = 0
    for root, _dirs, names in os.walk(modules):
        for name in names:
            stem, suffix = os.path.splitext(name)
            if stem.endswith(".ko") and suffix in MODULE_DECOMPRESSORS:
                packed = Path(root) / name
                packed.with_name(stem).write_bytes(
                    MODULE_DECOMPRESSORS[suffix](packed.read_bytes())
                )
                packed.unlink()
                count += 1
            elif stem.endswith(".ko"):
                raise VMError(f"{name}: no decompressor for {suffix} modules")
    return count
