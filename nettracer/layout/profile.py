"""Offset profiles: a guess saved to a file, tied to the kernel it was made on.

A profile is one JSON object::

    {"format": "nettracer-offsets", "version": 1,
     "kernel": {"release": ..., "version": ..., "machine": ..., "btf_sha256": ...},
     "source": "guess", "elapsed_ms": 31.2, "created": "2026-...Z",
     "fields": {"sk_buff.dev": {"offset": 16, "size": 8}, ...},
     "unresolved": {...}}

Profiles are only valid on the kernel build that made them (same ``uname -r``, ``uname
-v`` and machine, and the same BTF hash when both sides have BTF): struct layouts change
with every configuration. :func:`load_profile` refuses another kernel's profile unless
forced. The cache keeps one profile per kernel build under the cache directory
(``offsets.cache_dir``, default ``/var/cache/nettracer``), written atomically.
"""

from __future__ import annotations

import os
import time

from nettracer.errors import NettracerError
from nettracer.layout.catalogue import BY_KEY
from nettracer.layout.offsets import Field, Offsets

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from typing import Any

    from nettracer.kernel.identity import KernelIdentity

FORMAT = "nettracer-offsets"
VERSION = 1
DEFAULT_CACHE_DIR = "/var/cache/nettracer"
#: largest profile read (one is about 3 KiB)
MAX_PROFILE_BYTES = 1 << 20


class ProfileError(NettracerError):
    """A profile file is missing, unreadable or not a valid profile."""


class ForeignProfile(NettracerError):
    """A profile made on another kernel (refused unless forced)."""


def to_json(offsets: Offsets, identity: KernelIdentity) -> dict[str, Any]:
    import datetime

    return {
        "format": FORMAT,
        "version": VERSION,
        "kernel": identity.to_json(),
        "source": offsets.source,
        "elapsed_ms": round(offsets.elapsed_ms, 3),
        "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "fields": offsets.to_json(),
        "unresolved": dict(sorted(offsets.unresolved.items())),
    }


def save_dir(path: str) -> str:
    """The existing directory a profile saved as ``path`` goes to; ProfileError when it
    does not exist (a profile the user names never creates directories)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ProfileError(f"cannot write profile {path}: directory {directory} does not exist")
    return directory


def save_profile(
    path: str, offsets: Offsets, identity: KernelIdentity, *, make_dirs: bool = False
) -> None:
    """Write ``offsets`` as a profile for ``identity`` to ``path`` (atomically); the
    directory must exist unless ``make_dirs`` (the cache directory is made on demand)."""
    import contextlib
    import json
    import tempfile

    data = json.dumps(to_json(offsets, identity), indent=2, sort_keys=False) + "\n"
    try:
        if make_dirs:
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
        else:
            directory = save_dir(path)
        fd, tmp = tempfile.mkstemp(prefix=".offsets-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise ProfileError(f"cannot write profile {path}: {exc.strerror}") from None


def parse_profile(data: Any, where: str) -> tuple[KernelIdentity, Offsets]:
    """Check a decoded profile; ProfileError says what is wrong with it."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ProfileError(f"{where} is not a nettracer offsets profile")
    if data.get("version") != VERSION:
        raise ProfileError(
            f"{where}: profile version {data.get('version')!r} not supported (expected {VERSION})"
        )
    kernel = data.get("kernel")
    if not isinstance(kernel, dict):
        raise ProfileError(f"{where}: no kernel identity")
    from nettracer.kernel.identity import KernelIdentity

    identity = KernelIdentity.from_json(kernel)
    out = parse_fields(data.get("fields"), data.get("unresolved", {}), where)
    return identity, out


def parse_fields(
    fields: Any, unresolved: Any, where: str, source: str = "profile", complete: bool = False
) -> Offsets:
    """``Offsets(source)`` from a profile's ``fields`` and ``unresolved`` objects, checked
    against the catalogue (known keys, its sizes, offsets 0..65535); catalogue keys in
    neither are unresolved as "not in the profile", or a ProfileError with ``complete``."""
    if not isinstance(fields, dict) or not isinstance(unresolved, dict):
        raise ProfileError(f"{where}: 'fields' and 'unresolved' must be objects")
    out = Offsets(source=source, elapsed_ms=0.0)
    for key, value in fields.items():
        spec = BY_KEY.get(key)
        if spec is None:
            raise ProfileError(f"{where}: unknown field {key!r}")
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("offset"), int)
            or isinstance(value.get("offset"), bool)
            or not 0 <= value["offset"] < 1 << 16
            or value.get("size") != spec.size
        ):
            raise ProfileError(
                f"{where}: field {key} must be {{'offset': 0..65535, 'size': {spec.size}}}"
            )
        out.fields[key] = Field(value["offset"], spec.size)
    for key, why in unresolved.items():
        if key not in BY_KEY or key in out.fields:
            raise ProfileError(f"{where}: bad unresolved entry {key!r}")
        out.unresolved[key] = str(why)
    for key in BY_KEY:
        if key not in out.fields and key not in out.unresolved:
            if complete:
                raise ProfileError(f"{where}: field {key} is missing")
            out.unresolved[key] = "not in the profile"
    return out


def same_kernel(a: KernelIdentity, b: KernelIdentity) -> bool:
    """Same build: same key, and the same BTF when both have BTF."""
    if a.key() != b.key():
        return False
    return a.btf_sha256 is None or b.btf_sha256 is None or a.btf_sha256 == b.btf_sha256


def load_profile(path: str, identity: KernelIdentity, force: bool = False) -> Offsets:
    """Read the profile at ``path`` for the kernel ``identity``.

    :class:`ProfileError` when it cannot be read or is not a profile;
    :class:`ForeignProfile` when it was made on another kernel and ``force`` is False.
    """
    from nettracer.files import read_regular

    start = time.perf_counter()
    try:
        raw = read_regular(path, MAX_PROFILE_BYTES)
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror}") from None
    import json

    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path} is not valid JSON ({exc})") from None
    try:
        made_on, offsets = parse_profile(data, path)
    except ProfileError:
        raise
    except NettracerError as exc:  # KernelIdentity.from_json
        raise ProfileError(f"{path}: {exc}") from None
    if not same_kernel(made_on, identity) and not force:
        raise ForeignProfile(
            f"profile {path} was made on another kernel ({made_on}, version "
            f"{made_on.version!r}); this is {identity} ({identity.version!r}): its offsets "
            f"would be wrong here; guess again, or use offsets.force if you know they match",
            setting="offsets.force",
        )
    offsets.elapsed_ms = (time.perf_counter() - start) * 1e3
    return offsets


def cache_path(cache_dir: str, identity: KernelIdentity) -> str:
    """Where the cached profile of ``identity`` lives."""
    return os.path.join(cache_dir, f"offsets-{identity.cache_name()}.json")


def load_cached(cache_dir: str, identity: KernelIdentity) -> Offsets | None:
    """The cached profile of this kernel, None when there is none.

    :class:`ProfileError` when the file exists but is corrupt (the caller warns and
    guesses again); a cached profile of another kernel under this kernel's name is
    treated as corrupt too.
    """
    path = cache_path(cache_dir, identity)
    if not os.path.exists(path):
        return None
    try:
        return load_profile(path, identity)
    except ForeignProfile as exc:
        raise ProfileError(str(exc)) from None


def store_cached(cache_dir: str, identity: KernelIdentity, offsets: Offsets) -> str:
    """Cache ``offsets`` for ``identity``; returns the path (ProfileError on failure)."""
    path = cache_path(cache_dir, identity)
    save_profile(path, offsets, identity, make_dirs=True)
    return path
