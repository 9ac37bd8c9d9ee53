"""Which kernel this is: ``uname`` plus a hash of its BTF, for caches keyed on the kernel.

Two boots of the same build share ``release`` and ``version`` (``uname -r`` /
``uname -v``, the latter holding the build number and date); the SHA-256 of
``/sys/kernel/btf/vmlinux`` (Linux 5.4+ with ``CONFIG_DEBUG_INFO_BTF``) pins the
exact struct layouts when BTF is there.  Guessed offset profiles are cached under
:meth:`KernelIdentity.key`.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any

from nettracer.errors import NettracerError
from nettracer.kernel import BTF_VMLINUX

# uname -m -> the kernel's arch/ directory name
_ARCH = (
    (r"x86_64|amd64|i[3-6]86|x86", "x86"),
    (r"aarch64.*|arm64", "arm64"),
    (r"arm.*|sa110", "arm"),
    (r"s390x?", "s390"),
    (r"ppc.*|powerpc.*", "powerpc"),
    (r"riscv.*", "riscv"),
    (r"loongarch.*", "loongarch"),
    (r"mips.*", "mips"),
    (r"sparc.*", "sparc"),
)


def machine() -> str:
    """``uname -m``: ``x86_64``, ``aarch64``, ``s390x``, ..."""
    return os.uname().machine


def kernel_arch(machine_name: str | None = None) -> str:
    """The kernel's name for the architecture (``arch/<name>``): ``x86``, ``arm64``, ...

    ``machine_name`` defaults to :func:`machine`; an unknown one is returned as is.
    """
    m = machine() if machine_name is None else machine_name
    for pattern, arch in _ARCH:
        if re.fullmatch(pattern, m):
            return arch
    return m


def btf_sha256(path: str = BTF_VMLINUX) -> str | None:
    """Hex SHA-256 of the raw BTF blob, or ``None`` when the kernel exposes none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise NettracerError(f"cannot read {path}: {e.strerror}; run as root") from None
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class KernelIdentity:
    """``uname`` release, version and machine, and the SHA-256 of the kernel's BTF."""

    release: str
    version: str
    machine: str
    btf_sha256: str | None

    def key(self) -> tuple[str, str, str]:
        """Cache key: ``(release, version, machine)`` (the same build, any boot)."""
        return (self.release, self.version, self.machine)

    def cache_name(self) -> str:
        """A file-name-safe form of :meth:`key`: ``<release>-<machine>-<hash of version>``."""
        release = re.sub(r"[^\w.+-]", "_", self.release)
        digest = hashlib.sha256(self.version.encode()).hexdigest()[:12]
        return f"{release}-{self.machine}-{digest}"

    def to_json(self) -> dict[str, str | None]:
        """A JSON-ready dict (the inverse of :meth:`from_json`)."""
        return {
            "release": self.release,
            "version": self.version,
            "machine": self.machine,
            "btf_sha256": self.btf_sha256,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KernelIdentity:
        """Build from :meth:`to_json` output; :class:`NettracerError` when a key is missing."""
        try:
            return cls(
                release=str(data["release"]),
                version=str(data["version"]),
                machine=str(data["machine"]),
                btf_sha256=None if data.get("btf_sha256") is None else str(data["btf_sha256"]),
            )
        except (KeyError, TypeError) as e:
            raise NettracerError(
                f"bad kernel identity record ({e}); delete the cached file"
            ) from None

    def __str__(self) -> str:
        btf = f" btf:{self.btf_sha256[:12]}" if self.btf_sha256 else " no BTF"
        return f"Linux {self.release} {self.machine}{btf}"


def current(btf_path: str = BTF_VMLINUX) -> KernelIdentity:
    """The identity of the running kernel."""
    u = os.uname()
    return KernelIdentity(
        release=u.release, version=u.version, machine=u.machine, btf_sha256=btf_sha256(btf_path)
    )
