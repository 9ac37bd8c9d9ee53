"""Where the tracers' offsets come from: the single entry point for ``offsets.source``.

``btf``
    read from ``/sys/kernel/btf/vmlinux`` (:func:`nettracer.layout.btf_offsets.btf_offsets`),
    or what that gave before on this very BTF (:mod:`nettracer.kernel.btf_cache`,
    under the cache directory: no BTF parse at start-up);
``guess``
    guessed now (:func:`nettracer.layout.guess.guess`); a complete guess refreshes the
    cache of this kernel;
``auto``
    BTF when the kernel has it, else the profile of this exact kernel build in the
    profile directory (``offsets.profile_dir``: profiles made elsewhere, shared by a
    fleet; by default ``profiles/`` under the cache directory), else the cached profile
    of this build, else a guess (which is then cached).  A corrupt profile, or one of
    another kernel under this kernel's name, is ignored with a warning.

A profile file given explicitly (``offsets.profile``, which only ``nettracer offsets``
has) is used instead of BTF or a guess, after checking it was made on this kernel
(``force`` skips that check).  :func:`from_config` is how a tracer asks, with the
``offsets.*`` settings.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from nettracer.errors import UsageError
from nettracer.kernel import BTF_VMLINUX
from nettracer.layout import SOURCES
from nettracer.layout.profile import DEFAULT_CACHE_DIR, ProfileError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from nettracer.kernel.identity import KernelIdentity
    from nettracer.layout.offsets import Offsets

DEFAULT_TIMEOUT_MS = 2000


def _stderr_warning(message: str) -> None:
    sys.stderr.write(f"nettracer: warning: {message}\n")


def uses_btf(source: str, btf_path: str = BTF_VMLINUX) -> bool:
    """Whether ``source`` means BTF here: ``btf``, or ``auto`` on a kernel that has it."""
    return source == "btf" or (source == "auto" and os.path.exists(btf_path))


def from_config(cfg: Mapping[str, object]) -> Offsets:
    """:func:`offsets_for` with the settings ``offsets.source``, ``offsets.cache_dir``
    (empty: no caches), ``offsets.profile_dir`` and ``offsets.guess_timeout_ms`` of
    ``cfg`` (what :func:`nettracer.config.load_config` returns)."""
    cache_dir = str(cfg["offsets.cache_dir"]) or None
    return offsets_for(
        str(cfg["offsets.source"]),
        cache_dir=cache_dir,
        timeout_ms=int(cfg["offsets.guess_timeout_ms"]),  # type: ignore[call-overload]
        profile_dir=profile_dir(cfg, cache_dir),
    )


def profile_dir(cfg: Mapping[str, object], cache_dir: str | None) -> str | None:
    """``offsets.profile_dir``, or ``profiles`` under the cache directory when empty."""
    configured = str(cfg["offsets.profile_dir"])
    if configured:
        return configured
    return os.path.join(cache_dir, "profiles") if cache_dir else None


def offsets_for(
    source: str = "auto",
    cache_dir: str | None = DEFAULT_CACHE_DIR,
    timeout_ms: int = DEFAULT_TIMEOUT_MS,
    profile: str | None = None,
    force: bool = False,
    warn: Callable[[str], None] = _stderr_warning,
    identity: KernelIdentity | None = None,
    btf_path: str = BTF_VMLINUX,
    profile_dir: str | None = None,
) -> Offsets:
    """The offsets for ``source`` (``auto``, ``btf`` or ``guess``); see the module docstring.

    ``cache_dir`` None disables the caches (of guessed profiles and of BTF offsets);
    ``profile_dir`` is where ``auto`` looks first for a profile of this kernel build;
    ``btf_path`` is where ``auto`` and ``btf`` look for BTF.
    Errors are :class:`NettracerError`\\ s: no BTF
    for ``btf``, a foreign or corrupt ``profile``, the guesser's errors.
    """
    if source not in SOURCES:
        raise UsageError(
            f"offsets.source {source}: expected auto, btf or guess", setting="offsets.source"
        )
    if profile is not None:
        if source == "btf":
            raise UsageError(
                "offsets.profile and offsets.source btf exclude each other",
                setting=("offsets.profile", "offsets.source"),
            )
        from nettracer.kernel.identity import current
        from nettracer.layout.profile import load_profile

        return load_profile(profile, identity or current(), force)
    if uses_btf(source, btf_path):
        return _btf(btf_path, cache_dir)
    from nettracer.kernel.identity import current
    from nettracer.layout.profile import load_cached, store_cached

    ident = identity or current()
    dirs = [d for d in (profile_dir, cache_dir) if d is not None] if source == "auto" else []
    for i, directory in enumerate(dirs):
        try:
            cached = load_cached(directory, ident)
        except ProfileError as exc:
            then = f"looking in {dirs[i + 1]}" if i + 1 < len(dirs) else "guessing again"
            warn(f"ignoring the cached offsets in {directory} ({exc}); {then}")
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


def _btf(btf_path: str, cache_dir: str | None) -> Offsets:
    """The catalogue's offsets from the BTF at ``btf_path``, through the BTF cache."""
    from nettracer.kernel import btf_cache

    start = time.perf_counter()
    computed: list[Offsets] = []

    def compute() -> Offsets:
        from nettracer.kernel.btf import Btf
        from nettracer.layout.btf_offsets import btf_offsets

        computed.append(btf_offsets(None if btf_path == BTF_VMLINUX else Btf.vmlinux(btf_path)))
        return computed[0]

    offsets = btf_cache.cached(
        cache_dir, "offsets", compute, _encode_btf, _decode_btf, btf_path=btf_path
    )
    if not computed:
        offsets.elapsed_ms = (time.perf_counter() - start) * 1e3
    return offsets


def _encode_btf(offsets: Offsets) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [
        ("field", key, str(f.offset), str(f.size)) for key, f in sorted(offsets.fields.items())
    ]
    rows += [("unresolved", key, why) for key, why in sorted(offsets.unresolved.items())]
    return rows


def _decode_btf(rows: list[tuple[str, ...]]) -> Offsets:
    """Cached BTF offsets, checked as a profile's are, with every catalogue field."""
    from nettracer.layout.profile import parse_fields

    fields: dict[str, Any] = {}
    unresolved: dict[str, str] = {}
    for row in rows:
        if row[0] == "field" and len(row) == 4:
            fields[row[1]] = {"offset": int(row[2]), "size": int(row[3])}
        elif row[0] == "unresolved" and len(row) == 3:
            unresolved[row[1]] = row[2]
        else:
            raise ValueError(f"bad row {row!r}")
    try:
        return parse_fields(fields, unresolved, "cached BTF offsets", "btf", complete=True)
    except ProfileError as exc:
        raise ValueError(str(exc)) from None
