"""Where the tracers' offsets come from: the single entry point for ``--offsets``.

``btf``
    read from ``/sys/kernel/btf/vmlinux`` (:func:`nettracer.layout.btf_offsets.btf_offsets`);
``guess``
    guessed now (:func:`nettracer.layout.guess.guess`); a complete guess refreshes the
    cache of this kernel;
``auto``
    BTF when the kernel has it, else the cached profile of this exact kernel build, else
    a guess (which is then cached). A corrupt cache file is ignored with a warning.

A profile file given explicitly (``--profile``) is used instead of BTF or a guess,
after checking it was made on this kernel (``force`` skips that check).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from nettracer.errors import UsageError
from nettracer.kernel.identity import BTF_VMLINUX, KernelIdentity, current
from nettracer.layout.offsets import Offsets
from nettracer.layout.profile import (
    DEFAULT_CACHE_DIR,
    ProfileError,
    load_cached,
    load_profile,
    store_cached,
)

SOURCES = ("auto", "btf", "guess")
DEFAULT_TIMEOUT_MS = 2000


def _stderr_warning(message: str) -> None:
    sys.stderr.write(f"nettracer: warning: {message}\n")


def offsets_for(
    source: str = "auto",
    cache_dir: str | None = DEFAULT_CACHE_DIR,
    timeout_ms: int = DEFAULT_TIMEOUT_MS,
    profile: str | None = None,
    force: bool = False,
    warn: Callable[[str], None] = _stderr_warning,
    identity: KernelIdentity | None = None,
    btf_path: str = BTF_VMLINUX,
) -> Offsets:
    """The offsets for ``source`` (``auto``, ``btf`` or ``guess``); see the module docstring.

    ``cache_dir`` None disables the cache; ``btf_path`` is where ``auto`` looks for BTF.
    Errors are :class:`NettracerError`\\ s: no BTF
    for ``btf``, a foreign or corrupt ``profile``, the guesser's errors.
    """
    if source not in SOURCES:
        raise UsageError(f"unknown offsets source {source!r} (expected auto, btf or guess)")
    if profile is not None:
        if source == "btf":
            raise UsageError("--profile and --source btf exclude each other")
        return load_profile(profile, identity or current(), force)
    if source == "btf" or (source == "auto" and os.path.exists(btf_path)):
        from nettracer.kernel.btf import Btf
        from nettracer.layout.btf_offsets import btf_offsets

        return btf_offsets(None if btf_path == BTF_VMLINUX else Btf.vmlinux(btf_path))
    ident = identity or current()
    if source == "auto" and cache_dir is not None:
        try:
            cached = load_cached(cache_dir, ident)
        except ProfileError as exc:
            warn(f"ignoring the cached offsets ({exc}); guessing again")
            cached = None
        if cached is not None:
            return cached
    from nettracer.layout.guess import guess

    offsets = guess(timeout_ms).offsets
    if cache_dir is not None and not offsets.unresolved:
        try:
            store_cached(cache_dir, ident, offsets)
        except ProfileError as exc:
            warn(f"could not cache the guessed offsets: {exc}")
    return offsets
