"""tracefs: find or mount it, tracepoint ids and record formats, and a small trace reader.

A classic tracepoint BPF program's context is the record described by
``events/<category>/<name>/format``; :func:`parse_format` turns that file into a
:class:`TracepointFormat` (fields with C type, offset, size and signedness, the
``print fmt`` line, and the value -> name tables of its ``__print_symbolic()`` /
``__print_flags()`` calls, e.g. ``skb:kfree_skb``'s ``enum skb_drop_reason`` names,
so that a kernel without BTF still names its drop reasons).

tracefs lives at ``/sys/kernel/tracing`` since Linux 4.1, and under
``/sys/kernel/debug/tracing`` (an automount inside debugfs) before that and as a
compatibility path after.  It is not always mounted: :func:`tracefs_mounted` mounts it
with ``mount(2)`` (:func:`nettracer.bpf.syscall.mount`, no ``mount`` binary) when it
has to, for as long as it is needed, and unmounts it again.

:class:`TraceBuffer` enables events in a trace instance (``instances/<name>``,
Linux 3.12+, so nothing else's tracing is disturbed) and reads the text the kernel
formats from the ``print fmt`` (the ``trace`` file, or ``trace_pipe``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import operator
import os
import re
import select
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from nettracer.bpf import syscall
from nettracer.errors import NettracerError

TRACEFS_MOUNT = "/sys/kernel/tracing"
DEBUGFS_TRACING = "/sys/kernel/debug/tracing"
PROC_MOUNTS = "/proc/mounts"

_instance_seq = itertools.count()


# -- finding and mounting ---------------------------------------------------------


def _unescape_mount_path(path: str) -> str:
    """``/proc/mounts`` escapes space, tab, newline and backslash as ``\\ooo``."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def find_tracefs(mounts_path: str = PROC_MOUNTS) -> str | None:
    """The directory where tracefs is mounted now, or ``None``.

    Prefers a ``tracefs`` mount (``/sys/kernel/tracing`` first), then the
    ``tracing`` directory of a mounted debugfs.
    """
    try:
        with open(mounts_path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    tracefs: list[str] = []
    debugfs: list[str] = []
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        where = _unescape_mount_path(parts[1])
        if parts[2] == "tracefs":
            tracefs.append(where)
        elif parts[2] == "debugfs":
            debugfs.append(os.path.join(where, "tracing"))
    tracefs.sort(key=lambda p: p != TRACEFS_MOUNT)
    for cand in tracefs + debugfs:
        if os.path.isdir(os.path.join(cand, "events")):
            return cand
    return None


def mount_tracefs(target: str = TRACEFS_MOUNT) -> str:
    """Mount tracefs at ``target`` with ``mount("nodev", target, "tracefs", 0, NULL)``.

    Falls back to ``/sys/kernel/debug/tracing`` when that exists.  Returns the
    directory; raises :class:`NettracerError` when neither works.  The mount stays:
    commands use :func:`tracefs_mounted`, which takes it down again.
    """
    return _mount_or_find(target)[0]


def _mount_or_find(target: str) -> tuple[str, bool]:
    """:func:`mount_tracefs`, and whether the directory returned is our own mount."""
    try:
        syscall.mount("nodev", target, "tracefs")
        err = 0
    except OSError as exc:
        err = exc.errno or 0
    if not err and os.path.isdir(os.path.join(target, "events")):
        return target, True
    # Someone else may have mounted it meanwhile.
    found = find_tracefs()
    if found:
        return found, False
    if os.path.isdir(os.path.join(DEBUGFS_TRACING, "events")):
        return DEBUGFS_TRACING, False
    what = f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})" if err else "no events/"
    raise NettracerError(
        f"tracefs is not mounted and could not be mounted at {target}: {what}; "
        f"mount it or run as root"
    )


def open_tracefs(mount: bool = True) -> Tracefs:
    """The tracefs of this machine, mounting it at ``/sys/kernel/tracing`` if needed
    (and leaving it mounted: commands use :func:`tracefs_mounted`)."""
    found = find_tracefs()
    if found:
        return Tracefs(found)
    if not mount:
        raise NettracerError(
            f"tracefs is not mounted; mount it (mount -t tracefs nodev {TRACEFS_MOUNT}) "
            f"or run as root"
        )
    return Tracefs(mount_tracefs())


@contextlib.contextmanager
def tracefs_mounted(target: str = TRACEFS_MOUNT) -> Iterator[Tracefs]:
    """The tracefs of this machine for the length of a ``with`` block: the one mounted
    already, or one mounted at ``target`` now and unmounted (``MNT_DETACH``) when the
    block ends, so that a command leaves ``/proc/mounts`` as it found it."""
    found = find_tracefs()
    if found:
        yield Tracefs(found)
        return
    root, ours = _mount_or_find(target)
    try:
        yield Tracefs(root)
    finally:
        if ours:
            with contextlib.suppress(OSError):
                syscall.umount2(root, syscall.MNT_DETACH)


def tracefs_state(filesystems: str = "/proc/filesystems") -> dict[str, object]:
    """Whether tracefs is mounted (and where) or could be, without mounting it:
    ``{"mounted": bool, "path": str}`` or ``{"mounted": False, "available": bool}``
    (``available``: the kernel knows the ``tracefs`` file system, Linux 4.1+)."""
    found = find_tracefs()
    if found:
        return {"mounted": True, "path": found}
    try:
        with open(filesystems) as f:
            known = {line.split()[-1] for line in f if line.strip()}
    except OSError:
        known = set()
    return {"mounted": False, "available": "tracefs" in known}


# -- the format file --------------------------------------------------------------


@dataclass(frozen=True)
class FormatField:
    """One field of a tracepoint record, as ``events/<cat>/<name>/format`` lists it.

    ``ctype`` is the declaration without the name (``"void *"``, ``"__u8[4]"``,
    ``"__data_loc char[]"``).  ``array_len`` is set for fixed arrays; a
    ``__data_loc`` field is a ``u32`` holding ``offset | (length << 16)`` of
    dynamic data further in the record.
    """

    name: str
    ctype: str
    offset: int
    size: int
    signed: bool
    array_len: int | None = None
    data_loc: bool = False

    @property
    def is_common(self) -> bool:
        """The ``struct trace_entry`` header every record starts with (``common_*``)."""
        return self.name.startswith("common_")


@dataclass(frozen=True)
class PrintTable:
    """A ``__print_symbolic()`` or ``__print_flags()`` call in a ``print fmt``.

    ``expr`` is its first argument (``REC->reason``), ``field`` the record field it
    reads when there is exactly one.  ``entries`` maps value -> name;
    ``unresolved`` keeps ``(expression, name)`` pairs whose value is a name the
    kernel did not expand (an enum constant not known to us).  ``delimiter`` is
    ``__print_flags()``' separator.
    """

    kind: str  # "symbolic" or "flags"
    expr: str
    field: str | None
    entries: dict[int, str]
    unresolved: tuple[tuple[str, str], ...] = ()
    delimiter: str | None = None


@dataclass(frozen=True)
class TracepointFormat:
    """A parsed ``events/<category>/<name>/format``.

    ``print_fmt`` is the raw text after ``print fmt:``; ``fmt`` the decoded format
    string literal and ``args`` its arguments.
    """

    category: str
    name: str
    id: int
    fields: tuple[FormatField, ...]
    print_fmt: str
    fmt: str
    args: tuple[str, ...]
    tables: tuple[PrintTable, ...] = ()

    def field(self, name: str) -> FormatField:
        """The field ``name``; :class:`NettracerError` when the record has none."""
        for f in self.fields:
            if f.name == name:
                return f
        raise NettracerError(
            f"tracepoint {self.category}:{self.name} has no field {name!r} "
            f"(fields: {', '.join(f.name for f in self.fields)})"
        )

    def has_field(self, name: str) -> bool:
        return any(f.name == name for f in self.fields)

    @property
    def common_fields(self) -> tuple[FormatField, ...]:
        return tuple(f for f in self.fields if f.is_common)

    @property
    def event_fields(self) -> tuple[FormatField, ...]:
        return tuple(f for f in self.fields if not f.is_common)

    @property
    def size(self) -> int:
        """Bytes up to the end of the last fixed field (dynamic data may follow)."""
        return max((f.offset + f.size for f in self.fields), default=0)

    def _table(self, kind: str, field_name: str) -> PrintTable:
        for t in self.tables:
            if t.kind == kind and t.field == field_name:
                return t
        call = "__print_symbolic" if kind == "symbolic" else "__print_flags"
        raise NettracerError(
            f"tracepoint {self.category}:{self.name} has no {call}() table for field "
            f"{field_name!r} in its print fmt"
        )

    def symbolic(self, field_name: str) -> dict[int, str]:
        """Value -> name of the first ``__print_symbolic(REC-><field_name>, ...)``."""
        return dict(self._table("symbolic", field_name).entries)

    def flags(self, field_name: str) -> dict[int, str]:
        """Bit -> name of the first ``__print_flags(REC-><field_name>, ...)``."""
        return dict(self._table("flags", field_name).entries)


_FIELD_LINE = re.compile(
    r"^\s*field:(?P<decl>.*?);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
    r"(?:\s*signed:(?P<signed>-?\d+);)?"
)


def _parse_decl(decl: str) -> tuple[str, str, int | None, bool]:
    """``"__u8 saddr[4]"`` -> ``("saddr", "__u8[4]", 4, False)``."""
    decl = decl.strip()
    data_loc = decl.startswith("__data_loc ") or decl.startswith("__rel_loc ")
    m = re.match(r"^(?P<type>.*?)(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]*\])*)$", decl)
    if not m:
        return decl, decl, None, data_loc
    ctype = m.group("type").strip()
    name = m.group("name")
    dims = m.group("dims")
    array_len = None
    if data_loc:
        # "__data_loc char[] name": the brackets belong to the type
        pass
    elif dims:
        ctype = f"{ctype}{dims}"
        first = re.match(r"\[(\d+)\]", dims)
        array_len = int(first.group(1)) if first else None
    return name, ctype, array_len, data_loc


def parse_format(
    text: str, category: str = "", constants: Mapping[str, int] | None = None
) -> TracepointFormat:
    """Parse the text of an ``events/<category>/<name>/format`` file.

    ``constants`` resolves names the kernel left unexpanded in ``__print_symbolic``
    values (e.g. enum constants); without it such entries land in
    :attr:`PrintTable.unresolved`.
    """
    name = ""
    ident = -1
    fields: list[FormatField] = []
    print_fmt = ""
    head, sep, tail = text.partition("\nprint fmt:")
    if sep:
        # The format string may hold raw newlines (ext4:ext4_fc_stats): the rest is it.
        print_fmt = tail.strip()
    elif text.startswith("print fmt:"):
        head, print_fmt = "", text[len("print fmt:") :].strip()
    for line in head.splitlines():
        if line.startswith("name:"):
            name = line[5:].strip()
        elif line.startswith("ID:"):
            ident = int(line[3:].strip())
        else:
            m = _FIELD_LINE.match(line)
            if m:
                fname, ctype, alen, dloc = _parse_decl(m.group("decl"))
                fields.append(
                    FormatField(
                        name=fname,
                        ctype=ctype,
                        offset=int(m.group("offset")),
                        size=int(m.group("size")),
                        signed=m.group("signed") not in (None, "0"),
                        array_len=alen,
                        data_loc=dloc,
                    )
                )
    fmt, args = _split_print_fmt(print_fmt)
    tables = tuple(t for a in args for t in _find_tables(a, constants or {}))
    return TracepointFormat(
        category=category,
        name=name,
        id=ident,
        fields=tuple(fields),
        print_fmt=print_fmt,
        fmt=fmt,
        args=tuple(args),
        tables=tables,
    )


# -- print fmt: C literals and argument lists -------------------------------------

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


def _read_string(s: str, i: int) -> tuple[str, int]:
    """Decode the C string literal starting at ``s[i] == '"'``; returns (text, end index)."""
    quote = s[i]
    out = []
    i += 1
    while i < len(s) and s[i] != quote:
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            nxt = s[i + 1]
            if nxt in "01234567":
                digits = re.match(r"[0-7]{1,3}", s[i + 1 : i + 4])
                assert digits is not None
                out.append(chr(int(digits.group(0), 8)))
                i += 1 + len(digits.group(0))
                continue
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out), i + 1


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split ``s`` at ``sep`` outside brackets, string and char literals."""
    parts: list[str] = []
    depth = 0
    start = 0
    i = 0
    while i < len(s):
        c = s[i]
        if c in "\"'":
            _, i = _read_string(s, i)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(s[start:i].strip())
            start = i + 1
        i += 1
    tail = s[start:].strip()
    if tail or parts:
        parts.append(tail)
    return parts


def _split_print_fmt(print_fmt: str) -> tuple[str, list[str]]:
    """``"a=%d b=%s", REC->a, f(REC->b)`` -> (``"a=%d b=%s"``, [``REC->a``, ``f(REC->b)``])."""
    parts = _split_top(print_fmt)
    if not parts:
        return "", []
    fmt = ""
    head = parts[0]
    i = 0
    while i < len(head) and head[i] == '"':  # adjacent literals concatenate
        text, i = _read_string(head, i)
        fmt += text
        while i < len(head) and head[i].isspace():
            i += 1
    return fmt, parts[1:]


def _matching_paren(s: str, i: int) -> int:
    """Index of the ``)`` closing the ``(`` at ``s[i]``, or -1."""
    depth = 0
    while i < len(s):
        c = s[i]
        if c in "\"'":
            _, i = _read_string(s, i)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


_TABLE_CALL = re.compile(r"\b__print_(symbolic|flags)(?:_u64)?\s*\(")


def _find_tables(arg: str, constants: Mapping[str, int]) -> list[PrintTable]:
    tables = []
    pos = 0
    while True:
        m = _TABLE_CALL.search(arg, pos)
        if not m:
            return tables
        open_at = m.end() - 1
        close = _matching_paren(arg, open_at)
        if close < 0:
            return tables
        inner = _split_top(arg[open_at + 1 : close])
        pos = close + 1
        if not inner:
            continue
        kind = m.group(1)
        expr = inner[0]
        rest = inner[1:]
        delimiter = None
        if kind == "flags" and rest and rest[0].startswith('"'):
            delimiter, _ = _read_string(rest[0], 0)
            rest = rest[1:]
        entries: dict[int, str] = {}
        unresolved: list[tuple[str, str]] = []
        for ent in rest:
            ent = ent.strip()
            if not (ent.startswith("{") and ent.endswith("}")):
                continue
            pair = _split_top(ent[1:-1])
            if len(pair) != 2 or not pair[1].startswith('"'):
                continue
            label, _ = _read_string(pair[1], 0)
            try:
                value = eval_c_expr(pair[0], constants)
            except ValueError:
                unresolved.append((pair[0], label))
                continue
            entries.setdefault(value, label)
        recs = set(re.findall(r"REC->(\w+)", expr))
        tables.append(
            PrintTable(
                kind=kind,
                expr=expr,
                field=recs.pop() if len(recs) == 1 else None,
                entries=entries,
                unresolved=tuple(unresolved),
                delimiter=delimiter,
            )
        )


# -- C integer constant expressions -----------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<num>0[xX][0-9a-fA-F]+|\d+)[uUlL]*|(?P<id>[A-Za-z_]\w*)"
    r"|(?P<op><<|>>|&&|\|\||==|!=|<=|>=|[-+*/%&|^~!()<>?:]))"
)

# C type words a cast may use -> (bits, signed); None: keep the value
_CAST_TYPES: dict[str, tuple[int, bool] | None] = {
    "u8": (8, False),
    "__u8": (8, False),
    "s8": (8, True),
    "__s8": (8, True),
    "u16": (16, False),
    "__u16": (16, False),
    "s16": (16, True),
    "__s16": (16, True),
    "u32": (32, False),
    "__u32": (32, False),
    "s32": (32, True),
    "__s32": (32, True),
    "u64": (64, False),
    "__u64": (64, False),
    "s64": (64, True),
    "__s64": (64, True),
    "size_t": (64, False),
    "gfp_t": (32, False),
}
_TYPE_WORDS = frozenset({"unsigned", "signed", "int", "long", "short", "char", "const"})


def _cast(words: list[str], value: int) -> int:
    if len(words) == 1 and words[0] in _CAST_TYPES:
        spec = _CAST_TYPES[words[0]]
    else:
        unsigned = "unsigned" in words
        if "char" in words:
            bits = 8
        elif "short" in words:
            bits = 16
        elif "long" in words:
            bits = 64
        else:
            bits = 32
        spec = (bits, not unsigned)
    if spec is None:
        return value
    bits, signed = spec
    value &= (1 << bits) - 1
    if signed and value >> (bits - 1):
        value -= 1 << bits
    return value


# binary operator -> precedence (C's, higher binds tighter) and what it computes
_BINARY_PREC = {
    "||": 1,
    "&&": 2,
    "|": 3,
    "^": 4,
    "&": 5,
    "==": 6,
    "!=": 6,
    "<": 7,
    ">": 7,
    "<=": 7,
    ">=": 7,
    "<<": 8,
    ">>": 8,
    "+": 9,
    "-": 9,
    "*": 10,
    "/": 10,
    "%": 10,
}
_BINARY_FN: dict[str, Callable[[int, int], int]] = {
    "||": lambda a, b: int(bool(a) or bool(b)),
    "&&": lambda a, b: int(bool(a) and bool(b)),
    "|": operator.or_,
    "^": operator.xor,
    "&": operator.and_,
    "==": lambda a, b: int(a == b),
    "!=": lambda a, b: int(a != b),
    "<": lambda a, b: int(a < b),
    ">": lambda a, b: int(a > b),
    "<=": lambda a, b: int(a <= b),
    ">=": lambda a, b: int(a >= b),
    "<<": operator.lshift,
    ">>": operator.rshift,
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
}


class _Parser:
    """Precedence climbing over C integer constant expressions (no side effects)."""

    def __init__(self, text: str, constants: Mapping[str, int]) -> None:
        self.toks: list[tuple[str, str]] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise ValueError(f"bad token at {text[pos:]!r}")
            pos = m.end()
            kind = m.lastgroup or ""
            self.toks.append((kind, m.group(kind)))
        self.i = 0
        self.constants = constants

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise ValueError("unexpected end")
        self.i += 1
        return tok

    def expect(self, op: str) -> None:
        if self.take() != ("op", op):
            raise ValueError(f"expected {op!r}")

    def parse(self) -> int:
        value = self.ternary()
        if self.peek() is not None:
            raise ValueError(f"trailing {self.peek()}")
        return value

    def ternary(self) -> int:
        cond = self.binary(1)
        if self.peek() == ("op", "?"):
            self.take()
            a = self.ternary()
            self.expect(":")
            b = self.ternary()
            return a if cond else b
        return cond

    def binary(self, min_prec: int) -> int:
        left = self.unary()
        while True:
            tok = self.peek()
            if tok is None or tok[0] != "op" or tok[1] not in _BINARY_PREC:
                return left
            prec = _BINARY_PREC[tok[1]]
            if prec < min_prec:
                return left
            self.take()
            right = self.binary(prec + 1)
            left = self._apply(tok[1], left, right)

    @staticmethod
    def _apply(op: str, a: int, b: int) -> int:
        if op in ("/", "%"):
            if b == 0:
                raise ValueError("division by zero")
            q = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)  # C truncates
            return q if op == "/" else a - q * b
        if op in ("<<", ">>") and not 0 <= b < 128:
            raise ValueError("shift out of range")
        return _BINARY_FN[op](a, b)

    def _cast_words(self) -> list[str] | None:
        """If a ``(type)`` cast starts here, consume it and return its words."""
        j = self.i + 1
        words = []
        while j < len(self.toks) and self.toks[j][0] == "id":
            words.append(self.toks[j][1])
            j += 1
        if (
            words
            and j < len(self.toks)
            and self.toks[j] == ("op", ")")
            and all(w in _TYPE_WORDS or w in _CAST_TYPES for w in words)
            and words[-1] != "const"
        ):
            self.i = j + 1
            return words
        return None

    def unary(self) -> int:
        kind, text = self.take()
        if kind == "num":
            if text[:2] in ("0x", "0X"):
                return int(text, 16)
            return int(text, 8) if len(text) > 1 and text[0] == "0" else int(text)
        if kind == "id":
            if text in self.constants:
                return int(self.constants[text])
            raise ValueError(f"unknown name {text}")
        if text == "(":
            self.i -= 1
            words = self._cast_words()
            if words is not None:
                return _cast(words, self.unary())
            self.i += 1
            value = self.ternary()
            self.expect(")")
            return value
        if text == "-":
            return -self.unary()
        if text == "+":
            return self.unary()
        if text == "~":
            return ~self.unary()
        if text == "!":
            return int(not self.unary())
        raise ValueError(f"unexpected {text!r}")


def eval_c_expr(text: str, constants: Mapping[str, int] | None = None) -> int:
    """Value of a C integer constant expression as the kernel leaves it in a ``print fmt``.

    Handles decimal/hex/octal literals with ``U``/``L`` suffixes, casts to integer
    types, unary ``- + ~ !``, binary arithmetic, shifts, bitwise and logical
    operators, comparisons and ``?:``.  Names come from ``constants``; any other
    name, or anything else, raises :class:`ValueError`.
    """
    return _Parser(text, constants or {}).parse()


# -- tracefs itself ---------------------------------------------------------------


class Tracefs:
    """A mounted tracefs at ``root`` (use :func:`open_tracefs` to find or mount one)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"Tracefs({self.root!r})"

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def read(self, *parts: str) -> str:
        path = self.path(*parts)
        try:
            with open(path) as f:
                return f.read()
        except OSError as e:
            raise NettracerError(f"cannot read {path}: {e.strerror}; run as root") from None

    def available_events(self) -> list[str]:
        """``category:name`` of every event, from ``available_events``."""
        return [line.strip() for line in self.read("available_events").splitlines() if line]

    def has_event(self, category: str, name: str) -> bool:
        return os.path.isdir(self.path("events", category, name))

    def _event_file(self, category: str, name: str, leaf: str) -> str:
        if not (
            re.fullmatch(r"[\w.-]+", category)
            and re.fullmatch(r"[\w.-]+", name)
            and self.has_event(category, name)
        ):
            raise NettracerError(
                f"unknown tracepoint {category}:{name} (see {self.path('available_events')})"
            )
        return self.read("events", category, name, leaf)

    def tracepoint_id(self, category: str, name: str) -> int:
        """The event id (``events/<cat>/<name>/id``) perf_event_open's ``config`` wants."""
        return int(self._event_file(category, name, "id").strip())

    def tracepoint_format(
        self, category: str, name: str, constants: Mapping[str, int] | None = None
    ) -> TracepointFormat:
        """The parsed ``events/<cat>/<name>/format`` (see :func:`parse_format`)."""
        text = self._event_file(category, name, "format")
        return parse_format(text, category, constants)

    def buffer(self, instance: str | None = "") -> TraceBuffer:
        """A :class:`TraceBuffer` for reading events, used as a context manager.

        ``instance=""`` (default) makes a private instance ``instances/nettracer-<pid>-<n>``
        that is removed on exit; ``None`` uses the top-level buffer, whose state
        (events we enabled, ``tracing_on``) is restored and which is cleared on exit.
        """
        if instance is None:
            return TraceBuffer(self, self.root, owned=False)
        if not instance:
            instance = f"nettracer-{os.getpid()}-{next(_instance_seq)}"
        path = self.path("instances", instance)
        try:
            os.mkdir(path)
        except OSError as e:
            raise NettracerError(
                f"cannot create trace instance {path}: {e.strerror}; run as root"
            ) from None
        return TraceBuffer(self, path, owned=True)


@dataclass(frozen=True)
class TraceLine:
    """One line of the ``trace`` / ``trace_pipe`` text.

    ``  <idle>-0       [001] ..s1.   123.456789: kfree_skb: skbaddr=... reason: NO_SOCKET``
    """

    task: str
    pid: int
    cpu: int
    flags: str
    timestamp: float
    event: str
    body: str

    def values(self) -> dict[str, str]:
        """``key=value`` pairs of the body (values end at whitespace)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.body))


_TRACE_LINE = re.compile(
    r"^\s*(?P<task>.*?)-(?P<pid>\d+)\s+(?:\(\s*[\d-]+\)\s+)?\[(?P<cpu>\d+)\]\s+"
    r"(?:(?P<flags>[^\s\d][^\s]*)\s+)?(?P<ts>\d+\.\d+):\s+(?P<event>[\w.-]+):\s?(?P<body>.*)$"
)


def parse_trace_line(line: str) -> TraceLine | None:
    """Parse one event line of the trace text (``None`` for comments and other lines)."""
    if line.startswith("#"):
        return None
    m = _TRACE_LINE.match(line)
    if not m:
        return None
    return TraceLine(
        task=m.group("task"),
        pid=int(m.group("pid")),
        cpu=int(m.group("cpu")),
        flags=m.group("flags") or "",
        timestamp=float(m.group("ts")),
        event=m.group("event"),
        body=m.group("body"),
    )


class TraceBuffer:
    """Enable events in one trace buffer and read what the kernel prints for them.

    Use as a context manager: on exit the events this object enabled are disabled
    again and the buffer is removed (private instance) or cleared with
    ``tracing_on`` restored (top-level buffer).
    """

    def __init__(self, tracefs: Tracefs, path: str, owned: bool) -> None:
        self.tracefs = tracefs
        self.path = path
        self.owned = owned
        self._enabled: dict[tuple[str, str], str] = {}  # event -> its enable file before
        self._tracing_on = self._read("tracing_on").strip()

    def __enter__(self) -> TraceBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, leaf: str) -> str:
        with open(os.path.join(self.path, leaf)) as f:
            return f.read()

    def _write(self, leaf: str, text: str) -> None:
        path = os.path.join(self.path, leaf)
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError as e:
            raise NettracerError(f"cannot write {path}: {e.strerror}; run as root") from None

    def enable(self, category: str, name: str) -> None:
        """Enable ``category:name`` in this buffer (and turn ``tracing_on`` on)."""
        self.tracefs.tracepoint_id(category, name)  # unknown -> NettracerError
        leaf = os.path.join("events", category, name, "enable")
        self._enabled.setdefault((category, name), self._read(leaf).strip())
        self._write(leaf, "1")
        self.tracing_on = True

    def disable(self, category: str, name: str) -> None:
        """Disable ``category:name`` (back to how it was, if we enabled it)."""
        before = self._enabled.pop((category, name), "0")
        self._write(os.path.join("events", category, name, "enable"), before[:1] or "0")

    @property
    def tracing_on(self) -> bool:
        return self._read("tracing_on").strip() == "1"

    @tracing_on.setter
    def tracing_on(self, on: bool) -> None:
        self._write("tracing_on", "1" if on else "0")

    def clear(self) -> None:
        """Empty the ring buffer (truncating ``trace``)."""
        self._write("trace", "")

    def text(self) -> str:
        """The ``trace`` file: a non-consuming snapshot of the buffer, formatted."""
        return self._read("trace")

    def lines(self, event: str | None = None) -> list[TraceLine]:
        """Parsed event lines of :meth:`text`, optionally only those of ``event`` (a name)."""
        out = []
        for raw in self.text().splitlines():
            line = parse_trace_line(raw)
            if line and (event is None or line.event == event):
                out.append(line)
        return out

    def pipe(self, timeout: float) -> Iterator[str]:
        """Consume lines from ``trace_pipe`` until ``timeout`` seconds pass with nothing new."""
        fd = os.open(os.path.join(self.path, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
        try:
            pending = b""
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                ready, _, _ = select.select([fd], [], [], left)
                if not ready:
                    break
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                pending += chunk
                *done, pending = pending.split(b"\n")
                for raw in done:
                    yield raw.decode("utf-8", "replace")
                deadline = time.monotonic() + timeout
        finally:
            os.close(fd)

    def close(self) -> None:
        """Disable our events; remove (instance) or clear and restore (top level)."""
        for category, name in list(self._enabled):  # back to their state before
            with contextlib.suppress(NettracerError):
                self.disable(category, name)
        if self.owned:
            for _ in range(50):
                try:
                    os.rmdir(self.path)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise NettracerError(
                            f"cannot remove trace instance {self.path}: {e.strerror}"
                        ) from None
                    time.sleep(0.01)
        else:
            with contextlib.suppress(NettracerError):
                self.clear()
                self._write("tracing_on", self._tracing_on or "1")


# -- module-level conveniences ----------------------------------------------------


def tracepoint_id(category: str, name: str) -> int:
    """``open_tracefs().tracepoint_id(category, name)``."""
    return open_tracefs().tracepoint_id(category, name)


def tracepoint_format(
    category: str, name: str, constants: Mapping[str, int] | None = None
) -> TracepointFormat:
    """:meth:`Tracefs.tracepoint_format` of this machine's tracefs (mounted for the
    call when it was not)."""
    with tracefs_mounted() as tracefs:
        return tracefs.tracepoint_format(category, name, constants)


def available_events() -> list[str]:
    """:meth:`Tracefs.available_events` of this machine's tracefs (mounted for the
    call when it was not)."""
    with tracefs_mounted() as tracefs:
        return tracefs.available_events()
