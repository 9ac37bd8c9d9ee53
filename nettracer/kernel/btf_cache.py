"""What the tracers read from BTF, cached so that start-up need not parse BTF again.

Reading ``/sys/kernel/btf/vmlinux`` (5.5 MB on 6.18) and resolving the catalogue costs
some 30 ms of a command's start-up, for answers that cannot change while the kernel
runs.  This module keeps such answers ("facts": the catalogue's offsets, a raw
tracepoint's argument names, an enum) in one file per kernel build under the offsets
cache directory (``offsets.cache_dir``, default ``/var/cache/nettracer``), as lines
of tab-separated fields (``\\``, tab, newline and carriage return escaped as ``\\\\``,
``\\t``, ``\\n``, ``\\r``; no JSON parser to import at start-up)::

    nettracer-btf-cache 1
    release=6.18.44  version=#1 SMP ...  machine=x86_64  catalogue=3f7abee4  btf_path=...
        btf_size=5516713  btf_mtime_ns=...  btf_ctime_ns=...  btf_ino=...  btf_dev=...
        btf_header=9feb0100...                                   (one line: the stamp)
    @offsets
    field   sk_buff.dev     16      8
    unresolved      sock.sk_protocol        is a 8-bit bitfield ...
    @tracepoint_args.kfree_skb
    skb     location        reason  rx_sk
    #crc32=0123abcd                      (CRC-32 of every byte above, newlines included)

The stamp is cheap to take (``uname``, one ``stat`` and the 24-byte ``struct
btf_header``; no hash of the 5.5 MB blob) and sound: sysfs creates the
``/sys/kernel/btf/vmlinux`` inode in the running kernel, so its times differ after
every boot (and whenever the inode is recreated), while its content cannot change
during one boot; another kernel build also differs in ``uname -v``.  For a BTF file
given by path the stamp is the usual one of build tools (size, times, inode).  The
``catalogue`` entry is a digest of :data:`nettracer.layout.catalogue.CATALOGUE`, so
that a nettracer with other fields never reads an older list.

The last line is a CRC-32 of the rest of the file: a file damaged on disk or edited
by hand (one offset changed: every device then read as ``-``) no longer matches it.
It guards against accidents, not against someone who may write the cache directory
(root's) and recomputes it; a keyed hash would need a key kept elsewhere, and hashlib
alone costs 20 ms of start-up.

A file whose stamp or checksum differs, or that is unreadable, corrupt or not what
the caller's ``decode`` accepts, is ignored: the fact is computed from BTF again and the file
rewritten (atomically).  A cache directory that cannot be written only costs the
saving: errors writing it are not reported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from nettracer.kernel import BTF_VMLINUX

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from typing import TypeVar

    T = TypeVar("T")

FORMAT = "nettracer-btf-cache 2"  # 2: the checksum line
#: the last line: ``#crc32=`` and 8 hex digits
CHECKSUM = "#crc32="
_HEADER_BYTES = 24  # struct btf_header: magic, version, flags, hdr_len, type/str off+len

#: a fact as stored: rows of text fields
Rows = list[tuple[str, ...]]

#: facts files read by this process: path -> (stamp line, facts)
_loaded: dict[str, tuple[str, dict[str, Rows]]] = {}

_ESCAPES = (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r"))
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def escape(text: str) -> str:
    """``text`` as one field of a line (no tab, newline or carriage return left)."""
    for raw, escaped in _ESCAPES:
        if raw in text:
            text = text.replace(raw, escaped)
    return text


def unescape(field: str) -> str:
    """The inverse of :func:`escape`; ValueError for a stray backslash."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        c = field[i]
        if c == "\\":
            try:
                out.append(_UNESCAPES[field[i + 1]])
            except (IndexError, KeyError):
                raise ValueError(f"bad escape in {field!r}") from None
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _catalogue_digest() -> str:
    import zlib

    from nettracer.layout.catalogue import CATALOGUE

    text = ";".join(f"{f.key}:{f.size}:{f.points_to}" for f in CATALOGUE)
    return f"{zlib.crc32(text.encode()):08x}"


def stamp(btf_path: str = BTF_VMLINUX) -> dict[str, str] | None:
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
        "btf_path": btf_path,
        "btf_size": str(st.st_size),
        "btf_mtime_ns": str(st.st_mtime_ns),
        "btf_ctime_ns": str(st.st_ctime_ns),
        "btf_ino": str(st.st_ino),
        "btf_dev": str(st.st_dev),
        "btf_header": header.hex(),
    }


def _stamp_line(st: dict[str, str]) -> str:
    return "\t".join(f"{k}={escape(v)}" for k, v in st.items())


def cache_file(cache_dir: str, st: dict[str, str]) -> str:
    """The facts file for stamp ``st``: one per kernel build (and BTF path)."""
    import re
    import zlib

    release = re.sub(r"[^\w.+-]", "_", st["release"])
    what = f"{st['version']}\0{st['btf_path']}".encode()
    return os.path.join(cache_dir, f"btf-{release}-{st['machine']}-{zlib.crc32(what):08x}.tsv")


def _checksum(body: str) -> str:
    """The checksum line of a file whose other lines are ``body``."""
    import zlib

    return f"{CHECKSUM}{zlib.crc32(body.encode()):08x}"


def _parse(text: str, line: str) -> dict[str, Rows]:
    """The facts in ``text`` when its stamp line is ``line`` and its checksum line
    matches the rest; ValueError otherwise."""
    lines = text.split("\n")
    if len(lines) < 4 or lines[0] != FORMAT or lines[1] != line or lines[-1] != "":
        raise ValueError("not this kernel's facts file, or cut short")
    if lines[-2] != _checksum(text[: len(text) - len(lines[-2]) - 1]):
        raise ValueError("the content does not match its checksum")
    facts: dict[str, Rows] = {}
    rows: Rows | None = None
    for row in lines[2:-2]:
        if row.startswith("@"):
            rows = facts.setdefault(row[1:], [])
        elif rows is None:
            raise ValueError("row outside a fact")
        else:
            rows.append(tuple(unescape(f) for f in row.split("\t")))
    return facts


def _read(path: str, st: dict[str, str]) -> dict[str, Rows]:
    """The facts of ``path`` when its stamp is ``st``, else {}."""
    line = _stamp_line(st)
    memo = _loaded.get(path)
    if memo is not None and memo[0] == line:
        return memo[1]
    try:
        with open(path, encoding="utf-8", newline="") as f:
            facts = _parse(f.read(), line)
    except (OSError, ValueError):  # UnicodeDecodeError too
        return {}
    _loaded[path] = (line, facts)
    return facts


def _write(path: str, st: dict[str, str], facts: dict[str, Rows]) -> None:
    line = _stamp_line(st)
    out = [FORMAT, line]
    for name, rows in facts.items():
        out.append(f"@{escape(name)}")
        out += ["\t".join(escape(f) for f in row) for row in rows]
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        body = "\n".join(out) + "\n"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(body + _checksum(body) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return
    _loaded[path] = (line, facts)


def cached(
    cache_dir: str | None,
    name: str,
    compute: Callable[[], T],
    encode: Callable[[T], Rows],
    decode: Callable[[Rows], T],
    btf_path: str = BTF_VMLINUX,
) -> T:
    """Fact ``name`` of the BTF at ``btf_path``: from the cache when it holds one for this
    very BTF and ``decode`` accepts its rows (``decode`` raises ValueError, KeyError,
    IndexError or TypeError for rows it does not), else ``compute()``, then stored as
    the rows of text fields ``encode`` makes.  ``cache_dir`` None, or no file at
    ``btf_path``, just computes; ``compute``'s errors (no BTF, say) are the caller's."""
    st = stamp(btf_path) if cache_dir is not None else None
    if st is None or cache_dir is None:
        return compute()
    path = cache_file(cache_dir, st)
    facts = _read(path, st)
    if name in facts:
        try:
            return decode(facts[name])
        except (ValueError, KeyError, IndexError, TypeError):
            pass
    value = compute()
    rows = [tuple(str(f) for f in row) for row in encode(value)]
    _write(path, st, {**facts, name: rows})
    return value


def forget() -> None:
    """Drop what this process has read (tests)."""
    _loaded.clear()
