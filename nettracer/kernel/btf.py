"""A lazy, pure-Python reader for raw BTF blobs (``/sys/kernel/btf/vmlinux``).

BTF (``include/uapi/linux/btf.h``) is a header, a type section of variable-length
records and a string section.  Type ids are implicit (the n-th record is id n, id 0
is ``void``), so finding a type means walking the records; this module does that
walk lazily and only as far as a question needs, over a ``memoryview`` of 32-bit
words (every field of every record is a ``__u32``/``__s32``), and decodes a record
only when asked.  Names are found without an index: the string is located in the
string section with ``bytes.find`` and its offset, as a 4-byte word, is searched for
in the type section; a hit that sits exactly at a record start is a type of that
name.  Resolving the whole field catalogue therefore touches only the first third
of vmlinux's ~130k types.  (A name that only exists as the tail of a longer string,
which pahole and libbpf never emit, is still found, by a slower exhaustive pass.)

``btf_type.info`` is decoded as the uapi header says: vlen in bits 0-15, kind in
bits 24-28, kind_flag in bit 31; the unused bits 16-23 and 29-30 are ignored, as
libbpf ignores them.  Blobs of either byte order are read (the magic tells which).

Kinds (with the kernel that introduced them): INT, PTR, ARRAY, STRUCT, UNION, ENUM,
FWD, TYPEDEF, VOLATILE, CONST, RESTRICT (4.18), FUNC, FUNC_PROTO (5.0), VAR,
DATASEC (5.2), FLOAT (5.13), DECL_TAG (5.16), TYPE_TAG (5.17), ENUM64 (6.0).

Everything that is wrong with the blob raises :class:`BtfError`; a name that is not
there raises :class:`BtfLookupError`.  No other exception escapes the public API.
"""

from __future__ import annotations

import array
import bisect
import enum
import re
import struct
import sys
from typing import NamedTuple

from nettracer.errors import NettracerError
from nettracer.kernel import BTF_VMLINUX

BTF_MAGIC = 0xEB9F
BTF_VERSION = 1
_HDR_MIN = 24  # struct btf_header: magic, version, flags, hdr_len, type/str off+len
_MAX_DEPTH = 64  # longest typedef/qualifier/array chain or anonymous nesting we follow
_MAX_WORK = 100_000  # records one question may visit: corrupt types can fan out and loop
_CHUNK_WORDS = 1 << 15  # how far the lazy walk advances when looking for a type id


class BtfError(NettracerError):
    """The BTF blob is corrupt or not BTF at all (bad magic, truncated, bad kind...)."""


class BtfLookupError(NettracerError, LookupError):
    """A struct, member, enum or tracepoint named by the caller is not in the BTF."""


class NoBtfError(NettracerError):
    """The running kernel exposes no ``/sys/kernel/btf/vmlinux`` (CONFIG_DEBUG_INFO_BTF unset)."""


class Kind(enum.IntEnum):
    """``BTF_KIND_*`` from ``include/uapi/linux/btf.h``."""

    UNKN = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


_KINDS = tuple(Kind)
_BIG = 1 << 60  # record length of an unknown kind: pushes the walk past the end
# Words after the 3-word ``struct btf_type`` header: fixed part, and per vlen item.
_FIXED = {Kind.INT: 1, Kind.ARRAY: 3, Kind.VAR: 1, Kind.DECL_TAG: 1}
_PER_VLEN = {
    Kind.STRUCT: 3,  # struct btf_member {name_off, type, offset}
    Kind.UNION: 3,
    Kind.ENUM: 2,  # struct btf_enum {name_off, val}
    Kind.FUNC_PROTO: 2,  # struct btf_param {name_off, type}
    Kind.DATASEC: 3,  # struct btf_var_secinfo {type, offset, size}
    Kind.ENUM64: 3,  # struct btf_enum64 {name_off, val_lo32, val_hi32}
}
# Indexed by ``info >> 24`` (kind in bits 24-28, kind_flag in bit 31; bits 29-30 unused).
_REC_FIXED = tuple(
    (3 + _FIXED.get(Kind(h & 0x1F), 0)) if 0 < (h & 0x1F) <= Kind.ENUM64 else _BIG
    for h in range(256)
)
_REC_PER = tuple(
    _PER_VLEN.get(Kind(h & 0x1F), 0) if 0 < (h & 0x1F) <= Kind.ENUM64 else 0 for h in range(256)
)
_QUALIFIERS = frozenset({Kind.CONST, Kind.VOLATILE, Kind.RESTRICT, Kind.TYPE_TAG})
_SKIPPABLE = _QUALIFIERS | {Kind.TYPEDEF}
_COMPOSITE = frozenset({Kind.STRUCT, Kind.UNION})
_SIZED = frozenset(
    {Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.DATASEC, Kind.FLOAT}
)


class BtfType(NamedTuple):
    """One decoded ``struct btf_type`` header.

    ``size_or_type`` is the union in the header: a size in bytes for INT, STRUCT,
    UNION, ENUM, ENUM64, DATASEC and FLOAT, a type id for the others.
    """

    id: int
    kind: Kind
    name: str
    vlen: int
    kind_flag: bool
    size_or_type: int


class StructMember(NamedTuple):
    """One ``struct btf_member`` as stored (offsets relative to its own struct)."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int


class Member(NamedTuple):
    """A resolved ``struct.member.path``.

    ``offset``/``size`` are bytes from the start of the outer struct.  For a
    bitfield they describe the naturally aligned load unit that contains it, chosen
    as libbpf's CO-RE does (``BPF_FIELD_BYTE_OFFSET``/``BYTE_SIZE``): load ``size``
    bytes at ``offset`` and take ``bitfield_size`` bits starting at bit
    ``bit_offset - 8 * offset`` (little-endian).  ``bit_offset`` is always the exact
    bit position from the start of the outer struct.  ``type_id``/``type_name`` are
    the member's declared type (``"struct net_device *"``, ``"__be16"``,
    ``"char[16]"``); ``points_to`` is the struct or union a pointer member points to,
    through typedefs and qualifiers.
    """

    key: str
    offset: int
    size: int
    type_id: int
    type_name: str
    bit_offset: int
    bitfield_size: int = 0
    points_to: str | None = None

    @property
    def is_bitfield(self) -> bool:
        return self.bitfield_size != 0


class Btf:
    """A raw BTF blob, decoded on demand.

    >>> btf = Btf.vmlinux()
    >>> btf.resolve("sk_buff.dev").offset
    16
    """

    def __init__(self, data: bytes, source: str = "<bytes>") -> None:
        """Check the header of ``data`` (a raw BTF blob); types are decoded lazily."""
        self.source = source
        self._data = data = bytes(data)
        if len(data) < _HDR_MIN:
            raise BtfError(f"{source}: {len(data)} bytes is too short for a BTF header")
        if data[:2] == b"\x9f\xeb":
            self._order = "little"
        elif data[:2] == b"\xeb\x9f":
            self._order = "big"
        else:
            hint = "; it is an ELF file, extract its .BTF section" if data[:4] == b"\x7fELF" else ""
            raise BtfError(f"{source}: not BTF (magic {data[:2].hex()}, want 0xeb9f){hint}")
        fmt = "<" if self._order == "little" else ">"
        _, version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            fmt + "HBBIIIII", data
        )
        if version != BTF_VERSION:
            raise BtfError(f"{source}: unsupported BTF version {version} (want {BTF_VERSION})")
        if hdr_len < _HDR_MIN or hdr_len > len(data):
            raise BtfError(f"{source}: bad BTF header length {hdr_len}")
        t0, s0 = hdr_len + type_off, hdr_len + str_off
        if t0 + type_len > len(data) or s0 + str_len > len(data):
            raise BtfError(
                f"{source}: truncated: sections end at {max(t0 + type_len, s0 + str_len)} "
                f"but the blob has {len(data)} bytes"
            )
        if type_off % 4 or type_len % 4:
            raise BtfError(f"{source}: type section not 4-byte aligned")
        if str_len == 0 or data[s0] != 0 or data[s0 + str_len - 1] != 0:
            raise BtfError(f"{source}: string section must start and end with NUL")
        self._t0, self._t1 = t0, t0 + type_len
        self._s0, self._s1 = s0, s0 + str_len
        view = memoryview(data)[t0 : t0 + type_len]
        if self._order == sys.byteorder:
            self._words: memoryview | list[int] = view.cast("I")
        else:
            words = array.array("I")
            words.frombytes(view)
            words.byteswap()
            self._words = words  # type: ignore[assignment]
        self._nwords = type_len // 4
        self._starts: list[int] = []  # word index of type id n at [n - 1]
        self._pos = 0  # next word the walk has not looked at
        self._done = self._nwords == 0
        self._first: dict[tuple[str, frozenset[Kind]], int] = {}
        self._sha256: str | None = None
        self._ptr_size: int | None = None
        self._members: dict[int, tuple[StructMember, ...]] = {}

    # -- construction -------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str) -> Btf:
        """Read a raw BTF file: a copy of ``/sys/kernel/btf/vmlinux`` or any raw blob
        (module BTF is split BTF on top of vmlinux and is not supported)."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BtfError(f"cannot read BTF file {path}: {e.strerror or e}") from None
        return cls(data, source=path)

    @classmethod
    def vmlinux(cls, path: str = BTF_VMLINUX) -> Btf:
        """The running kernel's BTF (needs CONFIG_DEBUG_INFO_BTF, Linux 5.4+)."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise NoBtfError(
                f"kernel has no BTF ({path} missing); use offsets.source guess",
                setting="offsets.source",
            ) from None
        except OSError as e:
            raise BtfError(f"cannot read BTF file {path}: {e.strerror or e}") from None
        return cls(data, source=path)

    # -- identity -----------------------------------------------------------------

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the whole blob: identifies the kernel build."""
        if self._sha256 is None:
            import hashlib  # not at module level: its OpenSSL import costs ~3 ms

            self._sha256 = hashlib.sha256(self._data).hexdigest()
        return self._sha256

    def __len__(self) -> int:
        """Number of types (ids 1..len); walks the whole type section."""
        self._walk(self._nwords)
        return len(self._starts)

    def __repr__(self) -> str:
        return f"Btf({self.source!r}, {len(self._data)} bytes)"

    # -- the walk -----------------------------------------------------------------

    def _walk(self, stop: int) -> None:
        """Record where each type starts, up to word ``stop`` (or the end)."""
        if self._done or self._pos >= stop:
            return
        words, starts, n = self._words, self._starts, self._nwords
        fixed, per, add = _REC_FIXED, _REC_PER, starts.append
        i = self._pos
        stop = min(stop, n)
        try:
            while i < stop:
                add(i)
                info = words[i + 1]
                h = info >> 24
                i += fixed[h] + per[h] * (info & 0xFFFF)
        except IndexError:
            i = n + 1  # the last record's header is cut off
        if i > n:
            bad = starts.pop()
            tid = len(starts) + 1
            info = words[bad + 1] if bad + 1 < n else 0
            kind = (info >> 24) & 0x1F
            self._pos = bad
            if kind == 0 or kind > Kind.ENUM64:
                raise BtfError(f"{self.source}: type [{tid}] has unknown kind {kind}")
            raise BtfError(
                f"{self.source}: type [{tid}] ({Kind(kind).name}) runs past the end "
                f"of the type section"
            )
        self._pos = i
        self._done = i >= n

    def _start(self, tid: int) -> int:
        """Word index of type ``tid`` (>= 1); BtfError when out of range."""
        starts = self._starts
        while len(starts) < tid and not self._done:
            self._walk(self._pos + _CHUNK_WORDS)
        if tid < 1 or tid > len(starts):
            if tid == 0:
                raise BtfError(f"{self.source}: type id 0 (void) used where a type is needed")
            raise BtfError(f"{self.source}: type id {tid} out of range ({len(starts)} types)")
        return starts[tid - 1]

    def _id_at(self, word: int) -> int:
        """The type id whose record starts at ``word``, or 0 when none does."""
        self._walk(word + 1)
        starts = self._starts
        j = bisect.bisect_left(starts, word)
        return j + 1 if j < len(starts) and starts[j] == word else 0

    # -- strings ------------------------------------------------------------------

    def _str(self, off: int) -> str:
        s = self._s0 + off
        if off >= self._s1 - self._s0:
            raise BtfError(f"{self.source}: string offset {off} out of range")
        end = self._data.find(b"\0", s, self._s1)  # never -1: the section ends with NUL
        return self._data[s:end].decode("utf-8", "backslashreplace")

    def _name_offsets(self, name: str) -> list[int]:
        """Every offset in the string section that holds exactly ``name``."""
        if not name:
            return []
        needle = b"\0" + name.encode("utf-8", "replace") + b"\0"
        data, s0, s1 = self._data, self._s0, self._s1
        found = []
        pos = data.find(needle, s0, s1)
        while pos >= 0:
            found.append(pos + 1 - s0)
            pos = data.find(needle, pos + 1, s1)
        return found

    # -- finding types by name ------------------------------------------------------

    def _scan(self, name: str, kinds: frozenset[Kind], first: bool) -> list[int]:
        """Ids of types named ``name`` with a kind in ``kinds`` (only the lowest if
        ``first``), found by searching the type section for the name's string offset
        followed by an ``info`` word of the right kind, at a record start."""
        data, t0, t1 = self._data, self._t0, self._t1
        kind_bytes = b"".join(
            re.escape(bytes([k | flags])) for k in sorted(kinds) for flags in range(0, 256, 32)
        )
        ids: list[int] = []
        for off in self._name_offsets(name):
            needle = re.escape(off.to_bytes(4, self._order))  # type: ignore[arg-type]
            if self._order == "little":  # info's top byte (kind, kind_flag) is its last
                pat = re.compile(needle + b".{3}[" + kind_bytes + b"]", re.S)
            else:
                pat = re.compile(needle + b"[" + kind_bytes + b"].{3}", re.S)
            pos = t0
            while (hit := pat.search(data, pos, t1)) is not None:
                pos = hit.start()
                if not (pos - t0) & 3 and (tid := self._id_at((pos - t0) >> 2)):
                    ids.append(tid)
                    if first:
                        break
                pos += 1
        if not ids:  # a name_off may point into the middle of another string
            ids = [t for t in self._named_anywhere(name) if self.type(t).kind in kinds]
        ids = sorted(set(ids))
        return ids[:1] if first else ids

    def _named_anywhere(self, name: str) -> list[int]:
        """Ids of all types named ``name``, including names that are the tail of a
        longer string: the slow, exhaustive path (walks every type)."""
        data, s0, s1 = self._data, self._s0, self._s1
        needle = name.encode("utf-8", "replace") + b"\0"
        offs = set()
        pos = data.find(needle, s0 + 1, s1)
        while pos >= 0:
            offs.add(pos - s0)
            pos = data.find(needle, pos + 1, s1)
        if not offs:
            return []
        self._walk(self._nwords)
        words = self._words
        return [tid for tid, w in enumerate(self._starts, 1) if words[w] in offs]

    def _first_of(self, name: str, kinds: frozenset[Kind]) -> int:
        """Lowest type id named ``name`` whose kind is in ``kinds``, or 0."""
        key = (name, kinds)
        tid = self._first.get(key)
        if tid is None:
            found = self._scan(name, kinds, first=True)
            tid = self._first[key] = found[0] if found else 0
        return tid

    def typedef_id(self, name: str) -> int:
        """Type id of ``typedef ... name``, or 0."""
        return self._first_of(name, frozenset({Kind.TYPEDEF}))

    def find(self, name: str, kind: Kind | None = None) -> list[int]:
        """All type ids named ``name`` (of ``kind`` when given), lowest first."""
        kinds = frozenset(_KINDS[1:]) if kind is None else frozenset({Kind(kind)})
        return self._scan(name, kinds, first=False)

    def find_struct(self, name: str) -> int:
        """Type id of ``struct name`` (or ``union name``, or a typedef of either)."""
        name = _strip_tag(name)
        tid = self._first_of(name, _COMPOSITE)
        if not tid:
            td = self._first_of(name, frozenset({Kind.TYPEDEF}))
            if td and self.type(self.strip(td)).kind in _COMPOSITE:
                tid = td
        if not tid:
            raise BtfLookupError(f"struct {name} not found in BTF ({self.source})")
        return tid

    # -- decoding -------------------------------------------------------------------

    def type(self, tid: int) -> BtfType:
        """The header of type ``tid`` (0 is ``void``)."""
        if tid == 0:
            return BtfType(0, Kind.UNKN, "void", 0, False, 0)
        w = self._start(tid)
        words = self._words
        info = words[w + 1]
        return BtfType(
            tid,
            _KINDS[(info >> 24) & 0x1F],
            self._str(words[w]),
            info & 0xFFFF,
            bool(info >> 31),
            words[w + 2],
        )

    def _expect(self, tid: int, kinds: frozenset[Kind] | set[Kind]) -> tuple[int, int]:
        """(word index, info) of ``tid``, checking its kind."""
        w = self._start(tid)
        info = self._words[w + 1]
        if (info >> 24) & 0x1F not in kinds:
            want = "/".join(sorted(k.name for k in kinds))
            raise BtfError(
                f"{self.source}: type [{tid}] is {_KINDS[(info >> 24) & 0x1F].name}, not {want}"
            )
        return w, info

    def members(self, tid: int) -> tuple[StructMember, ...]:
        """Members of STRUCT/UNION ``tid`` as stored (bitfields decoded per ``kind_flag``)."""
        cached = self._members.get(tid)
        if cached is not None:
            return cached
        w, info = self._expect(tid, _COMPOSITE)
        words, kflag, name = self._words, info >> 31, self._str
        out = []
        for j in range(w + 3, w + 3 + 3 * (info & 0xFFFF), 3):
            off = words[j + 2]
            if kflag:
                out.append(StructMember(name(words[j]), words[j + 1], off & 0xFFFFFF, off >> 24))
            else:
                out.append(StructMember(name(words[j]), words[j + 1], off, 0))
        result = self._members[tid] = tuple(out)
        return result

    def params(self, tid: int) -> list[tuple[str, int]]:
        """(name, type id) of each FUNC_PROTO parameter; type 0 last means ``...``."""
        w, info = self._expect(tid, {Kind.FUNC_PROTO})
        words = self._words
        return [
            (self._str(words[j]), words[j + 1])
            for j in range(w + 3, w + 3 + 2 * (info & 0xFFFF), 2)
        ]

    def enumerators(self, tid: int) -> list[tuple[str, int]]:
        """(name, value) of ENUM/ENUM64 ``tid`` in declaration order.

        Since Linux 6.0 ``kind_flag`` says the values are signed and a clear flag means
        unsigned; before 6.0 ``struct btf_enum.val`` was ``__s32`` and the flag unused,
        so a negative value in old BTF reads as its unsigned 32-bit pattern here.
        """
        w, info = self._expect(tid, {Kind.ENUM, Kind.ENUM64})
        words, signed, vlen = self._words, info >> 31, info & 0xFFFF
        out = []
        if (info >> 24) & 0x1F == Kind.ENUM:
            for j in range(w + 3, w + 3 + 2 * vlen, 2):
                v = words[j + 1]
                if signed and v & 0x80000000:
                    v -= 1 << 32
                out.append((self._str(words[j]), v))
        else:
            for j in range(w + 3, w + 3 + 3 * vlen, 3):
                v = words[j + 1] | words[j + 2] << 32
                if signed and v & (1 << 63):
                    v -= 1 << 64
                out.append((self._str(words[j]), v))
        return out

    def array(self, tid: int) -> tuple[int, int, int]:
        """(element type id, index type id, number of elements) of ARRAY ``tid``."""
        w, _ = self._expect(tid, {Kind.ARRAY})
        words = self._words
        return words[w + 3], words[w + 4], words[w + 5]

    def int_encoding(self, tid: int) -> tuple[int, int, int]:
        """(encoding bits, bit offset, nr_bits) of INT ``tid`` (``BTF_INT_SIGNED`` = 1)."""
        w, _ = self._expect(tid, {Kind.INT})
        v = self._words[w + 3]
        return (v >> 24) & 0x0F, (v >> 16) & 0xFF, v & 0xFF

    # -- type arithmetic ------------------------------------------------------------

    def strip(self, tid: int) -> int:
        """Follow typedefs and const/volatile/restrict/type_tag qualifiers."""
        words = self._words
        for _ in range(_MAX_DEPTH):
            if tid == 0:
                return 0
            w = self._start(tid)
            if (words[w + 1] >> 24) & 0x1F not in _SKIPPABLE:
                return tid
            tid = words[w + 2]
        raise BtfError(f"{self.source}: typedef/qualifier chain too long at type [{tid}]")

    def pointer_size(self) -> int:
        """Size of a pointer: BTF does not record it, so it is the size of ``long``."""
        if self._ptr_size is None:
            self._ptr_size = 8
            for name in ("long unsigned int", "long int"):
                tid = self._first_of(name, frozenset({Kind.INT}))
                if tid:
                    self._ptr_size = self.type(tid).size_or_type
                    break
        return self._ptr_size

    def sizeof(self, tid: int) -> int:
        """Size in bytes of type ``tid``; BtfError for void, functions and forward decls."""
        mult = 1
        for _ in range(_MAX_DEPTH):
            t = self.type(tid)
            if t.kind in _SIZED:
                return mult * t.size_or_type
            if t.kind == Kind.PTR:
                return mult * self.pointer_size()
            if t.kind in _SKIPPABLE or t.kind == Kind.VAR:
                tid = t.size_or_type
            elif t.kind == Kind.ARRAY:
                tid, _, n = self.array(tid)
                mult *= n
            else:
                raise BtfError(f"{self.source}: type [{tid}] ({t.kind.name}) has no size")
        raise BtfError(f"{self.source}: type chain too long at type [{tid}]")

    def type_name(self, tid: int) -> str:
        """C spelling of type ``tid``: ``"struct sk_buff *"``, ``"char[16]"``,
        ``"int (*)(struct sock *)"``.  TYPE_TAG (``__user``, ``__rcu``) is left out."""
        return self._decl(tid, "", 0, [_MAX_WORK])

    def _tick(self, tid: int, depth: int, work: list[int]) -> None:
        """Bound recursion over types that corrupt data can make cyclic or explosive."""
        work[0] -= 1
        if depth > _MAX_DEPTH or work[0] < 0:
            raise BtfError(f"{self.source}: type [{tid}] is nested too deep or cyclic")

    def _decl(self, tid: int, inner: str, depth: int, work: list[int]) -> str:
        self._tick(tid, depth, work)
        t = self.type(tid)
        k = t.kind
        if k == Kind.PTR:
            target = self.type(self.strip(t.size_or_type)) if t.size_or_type else None
            star = "*" + inner
            if target is not None and target.kind in (Kind.ARRAY, Kind.FUNC_PROTO):
                star = f"({star})"
            return self._decl(t.size_or_type, star, depth + 1, work)
        if k in (Kind.CONST, Kind.VOLATILE, Kind.RESTRICT):
            q = k.name.lower()
            if self.type(t.size_or_type).kind == Kind.PTR:
                return self._decl(t.size_or_type, f"{q} {inner}".rstrip(), depth + 1, work)
            return f"{q} " + self._decl(t.size_or_type, inner, depth + 1, work)
        if k == Kind.TYPE_TAG:
            return self._decl(t.size_or_type, inner, depth + 1, work)
        if k == Kind.ARRAY:
            elem, _, n = self.array(tid)
            return self._decl(elem, f"{inner}[{n}]", depth + 1, work)
        if k == Kind.FUNC_PROTO:
            ps = self.params(tid)
            args = ", ".join(
                "..." if p == 0 and i == len(ps) - 1 else self._decl(p, n, depth + 1, work)
                for i, (n, p) in enumerate(ps)
            )
            return self._decl(t.size_or_type, f"{inner}({args or 'void'})", depth + 1, work)
        if k in (Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.FWD):
            if k == Kind.FWD:
                tag = "union" if t.kind_flag else "struct"
            else:
                tag = "enum" if k in (Kind.ENUM, Kind.ENUM64) else k.name.lower()
            base = f"{tag} {t.name or '{...}'}"
        else:  # void, INT, FLOAT, TYPEDEF, FUNC, VAR, DATASEC, DECL_TAG: their name
            base = t.name or f"<{k.name.lower()}>"
        if not inner:
            return base
        return base + inner if inner[0] == "[" else f"{base} {inner}"

    # -- what nettracer asks ----------------------------------------------------------

    def resolve(self, key: str) -> Member:
        """Offset, size and type of ``struct.member.path`` from the start of ``struct``.

        Typedefs and qualifiers are looked through, anonymous structs/unions are
        transparent as in C (``sk_buff.dev`` lives in an anonymous union), and a named
        struct member can be walked into (``net.ns.inum``); pointers are not followed.
        """
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise BtfLookupError(f"cannot resolve {key!r}: want struct.member[.member...]")
        sname = _strip_tag(parts[0])
        cur = self.strip(self.find_struct(sname))
        where = f"struct {sname}"
        bit = 0
        m = StructMember("", 0, 0, 0)
        for depth, part in enumerate(parts[1:], start=1):
            if depth > 1:
                prefix = ".".join(parts[:depth])
                t = self.type(self.strip(m.type_id))
                if t.kind == Kind.PTR:
                    raise BtfLookupError(
                        f"{prefix} is a pointer ({self.type_name(m.type_id)}); offsets do "
                        f"not follow pointers, resolve the pointed-to struct's member instead"
                    )
                if t.kind not in _COMPOSITE:
                    raise BtfLookupError(
                        f"{prefix} is {self.type_name(m.type_id)}, not a struct or union; "
                        f"it has no member {part!r}"
                    )
                cur = t.id
                where = f"{_tag(t)} ({prefix})"
            found = self._find_member(cur, part, 0, [_MAX_WORK])
            if found is None:
                names = ", ".join(self._member_names(cur, 0, [_MAX_WORK])) or "none"
                raise BtfLookupError(f"{where} has no member {part!r} (members: {names})")
            m, rel = found
            bit += rel
        bits, bsize = bit, m.bitfield_size
        if not bsize:  # pre-kind_flag BTF encodes bitfields in the INT (pahole < 1.13)
            it = self.type(self.strip(m.type_id))
            if it.kind == Kind.INT:
                _, ioff, nbits = self.int_encoding(it.id)
                if ioff or nbits != 8 * it.size_or_type:
                    bits, bsize = bit + ioff, nbits
        if bsize:
            offset, size = _bitfield_unit(bits, bsize, self.sizeof(m.type_id))
        else:
            offset, size = bits // 8, self.sizeof(m.type_id)
        target = self.type(self.strip(m.type_id))
        points_to = None
        if target.kind == Kind.PTR:
            pointee = self.type(self.strip(target.size_or_type))
            if pointee.kind in _COMPOSITE or pointee.kind == Kind.FWD:
                points_to = pointee.name or None
        return Member(
            key=key,
            offset=offset,
            size=size,
            type_id=m.type_id,
            type_name=self.type_name(m.type_id),
            bit_offset=bits,
            bitfield_size=bsize,
            points_to=points_to,
        )

    def _find_member(
        self, tid: int, name: str, depth: int, work: list[int]
    ) -> tuple[StructMember, int] | None:
        """(member, bit offset from the start of ``tid``), searching anonymous members."""
        self._tick(tid, depth, work)
        anon = []
        for m in self.members(tid):
            if m.name == name:
                return m, m.bit_offset
            if not m.name:
                anon.append(m)
        for m in anon:
            inner = self.strip(m.type_id)
            if inner and self.type(inner).kind in _COMPOSITE:
                found = self._find_member(inner, name, depth + 1, work)
                if found is not None:
                    return found[0], m.bit_offset + found[1]
        return None

    def _member_names(self, tid: int, depth: int, work: list[int]) -> list[str]:
        """Names visible in C in ``tid``: its own and those of anonymous members."""
        self._tick(tid, depth, work)
        out = []
        for m in self.members(tid):
            if m.name:
                out.append(m.name)
            else:
                inner = self.strip(m.type_id)
                if inner and self.type(inner).kind in _COMPOSITE:
                    out.extend(self._member_names(inner, depth + 1, work))
        return out

    def find_enum(self, name: str) -> int:
        """Type id of ``enum name`` (ENUM or ENUM64)."""
        name = _strip_tag(name)
        tid = self._first_of(name, frozenset({Kind.ENUM, Kind.ENUM64}))
        if not tid:
            raise BtfLookupError(f"enum {name} not found in BTF ({self.source})")
        return tid

    def enum(self, name: str) -> dict[int, str]:
        """Value -> name of ``enum name`` (e.g. ``skb_drop_reason``); the first name
        declared for a value wins, as ``enum_name()`` style switches do."""
        out: dict[int, str] = {}
        for n, v in self.enumerators(self.find_enum(name)):
            out.setdefault(v, n)
        return out

    def raw_tracepoint_args(self, name: str) -> list[tuple[str, str]]:
        """(name, C type) of each ``TP_PROTO`` argument of tracepoint ``name``.

        The types come from ``typedef void (*btf_trace_<name>)(void *__data, proto)``
        (Linux 5.5+), minus the leading ``void *`` context.  That typedef's
        parameters have no names, so they are taken from the per-tracepoint stub
        ``__probestub_<name>`` (6.6+) or iterator ``__traceiter_<name>`` (5.10+), or
        from ``__bpf_trace_<name>`` for events that are their own class, when those
        exist with the same parameter types; otherwise the names are empty.
        """
        td = self.typedef_id(f"btf_trace_{name}")
        if not td:
            raise BtfLookupError(
                f"no raw tracepoint {name!r} in BTF (typedef btf_trace_{name} not found)"
            )
        ptr = self.type(self.strip(td))
        proto = self.type(self.strip(ptr.size_or_type)) if ptr.kind == Kind.PTR else ptr
        if proto.kind != Kind.FUNC_PROTO:
            raise BtfError(
                f"{self.source}: btf_trace_{name} is not a pointer to a function prototype"
            )
        args = self.params(proto.id)[1:]
        types = [t for _, t in args]
        names = [n for n, _ in args]
        if not all(names):
            for fname in (f"__probestub_{name}", f"__traceiter_{name}", f"__bpf_trace_{name}"):
                fn = self._first_of(fname, frozenset({Kind.FUNC}))
                if not fn:
                    continue
                fproto = self.type(self.type(fn).size_or_type)
                if fproto.kind != Kind.FUNC_PROTO:
                    continue
                fargs = self.params(fproto.id)[1:]
                if [t for _, t in fargs] == types and all(n for n, _ in fargs):
                    names = [n for n, _ in fargs]
                    break
        return [(n, self.type_name(t)) for n, t in zip(names, types, strict=True)]


def _strip_tag(name: str) -> str:
    for tag in ("struct ", "union ", "enum "):
        if name.startswith(tag):
            return name[len(tag) :].strip()
    return name


def _tag(t: BtfType) -> str:
    kind = t.kind.name.lower()
    return f"{kind} {t.name}" if t.name else f"anonymous {kind}"


def _bitfield_unit(bit_off: int, bit_sz: int, type_sz: int) -> tuple[int, int]:
    """(byte offset, byte size) of the aligned load covering a bitfield, as libbpf's
    ``bpf_core_calc_field_relo`` computes it; minimal covering bytes if that fails."""
    byte_sz = type_sz
    if byte_sz in (1, 2, 4, 8):
        byte_off = bit_off // 8 // byte_sz * byte_sz
        while bit_off + bit_sz - byte_off * 8 > byte_sz * 8:
            if byte_sz >= 8:
                break
            byte_sz *= 2
            byte_off = bit_off // 8 // byte_sz * byte_sz
        else:
            return byte_off, byte_sz
    first = bit_off // 8
    return first, (bit_off + bit_sz + 7) // 8 - first
