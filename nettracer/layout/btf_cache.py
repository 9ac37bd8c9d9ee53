"""What the tracers read from BTF, cached so that start-up need not parse BTF again.

Reading ``/sys/kernel/btf/vmlinux`` (5.5 MB on 6.18) and resolving the catalogue costs
some 30 ms of a command's start-up, for answers that cannot change while the kernel
runs.  This module keeps such answers ("facts": the catalogue's offsets, a raw
tracepoint's argument names) in one JSON file per kernel build under the offsets
cache directory (``offsets.cache_dir``, default ``/var/cache/nettracer``)::

    {"format": "nettracer-btf-cache", "version": 1,
     "stamp": {"release": ..., "version": ..., "machine": ..., "catalogue": ...,
               "btf": {"path": ..., "size": ..., "mtime_ns": ..., "ctime_ns": ...,
                       "ino": ..., "dev": ..., "header": ...}},
     "facts": {"offsets": {...}, "tracepoint_args.kfree_skb": [...]}}

The stamp is cheap to take (``uname``, one ``stat`` and the 24-byte ``struct
btf_header``; no hash of the 5.5 MB blob) and sound: sysfs creates the
``/sys/kernel/btf/vmlinux`` inode in the running kernel, so its times differ after
every boot (and whenever the inode is recreated), while its content cannot change
during one boot; another kernel build also differs in ``uname -v``.  For a BTF file
given by path the stamp is the usual one of build tools (size, times, inode).  The
``catalogue`` entry is a digest of :data:`nettracer.layout.catalogue.CATALOGUE`, so
that a nettracer with other fields never reads an older list.

A file whose stamp differs, or that is unreadable, corrupt or not what the caller's
``decode`` accepts, is ignored: the fact is computed from BTF again and the file
rewritten (atomically).  A cache directory that cannot be written only costs the
saving: errors writing it are not reported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any, TypeVar

FORMAT = "nettracer-btf-cache"
VERSION = 1
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"
_HEADER_BYTES = 24  # struct btf_header: magic, version, flags, hdr_len, type/str off+len

T = TypeVar("T")

#: facts files read by this process: path -> (stamp, facts)
_loaded: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}


def _catalogue_digest() -> str:
    import zlib

    from nettracer.layout.catalogue import CATALOGUE

    text = ";".join(f"{f.key}:{f.size}:{f.points_to}" for f in CATALOGUE)
    return f"{zlib.crc32(text.encode()):08x}"


def stamp(btf_path: str = BTF_VMLINUX) -> dict[str, Any] | None:
    """What identifies the BTF at ``btf_path`` and the kernel; None without BTF."""
    try:
        fd = os.open(btf_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        header = os.read(fd, _HEADER_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    u = os.uname()
    return {
        "release": u.release,
        "version": u.version,
        "machine": u.machine,
        "catalogue": _catalogue_digest(),
        "btf": {
            "path": btf_path,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns,
            "ino": st.st_ino,
            "dev": st.st_dev,
            "header": header.hex(),
        },
    }


def cache_file(cache_dir: str, st: dict[str, Any]) -> str:
    """The facts file for stamp ``st``: one per kernel build (and BTF path)."""
    import re
    import zlib

    release = re.sub(r"[^\w.+-]", "_", st["release"])
    what = f"{st['version']}\0{st['btf']['path']}".encode()
    return os.path.join(cache_dir, f"btf-{release}-{st['machine']}-{zlib.crc32(what):08x}.json")


def _read(path: str, st: dict[str, Any]) -> dict[str, Any]:
    """The facts of ``path`` when its stamp is ``st``, else {}."""
    memo = _loaded.get(path)
    if memo is not None and memo[0] == st:
        return memo[1]
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    import json

    try:
        data = json.loads(raw)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError
        return {}
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT
        or data.get("version") != VERSION
        or data.get("stamp") != st
        or not isinstance(data.get("facts"), dict)
    ):
        return {}
    _loaded[path] = (st, data["facts"])
    return data["facts"]


def _write(path: str, st: dict[str, Any], facts: dict[str, Any]) -> None:
    import json

    data = {"format": FORMAT, "version": VERSION, "stamp": st, "facts": facts}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(data, f, separators=(",", ":"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return
    _loaded[path] = (st, facts)


def cached(
    cache_dir: str | None,
    name: str,
    compute: Callable[[], T],
    encode: Callable[[T], Any],
    decode: Callable[[Any], T],
    btf_path: str = BTF_VMLINUX,
) -> T:
    """Fact ``name`` of the BTF at ``btf_path``: from the cache when it holds one for this
    very BTF and ``decode`` accepts it (``decode`` raises ValueError, KeyError or
    TypeError for what it does not), else ``compute()``, then stored as ``encode``
    makes it (JSON-ready).  ``cache_dir`` None, or no file at ``btf_path``, just
    computes; ``compute``'s errors (no BTF, say) are the caller's."""
    st = stamp(btf_path) if cache_dir is not None else None
    if st is None or cache_dir is None:
        return compute()
    path = cache_file(cache_dir, st)
    facts = _read(path, st)
    if name in facts:
        try:
            return decode(facts[name])
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    value = compute()
    new = {**facts, name: encode(value)}
    _write(path, st, new)
    return value


def forget() -> None:
    """Drop what this process has read (tests)."""
    _loaded.clear()
