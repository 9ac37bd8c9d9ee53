"""Struct-path expressions rooted at a tracepoint argument: parse and resolve.

An expression is C's member access on a raw tracepoint's ``TP_PROTO`` argument::

    skb->len    skb->dev->name    sk->__sk_common.skc_dport
    skb->dev->nd_net.net->ns.inum

``->`` follows a pointer (one ``bpf_probe_read_kernel`` of 8 bytes), ``.`` selects a
member of a struct or union held by value (an offset added, no read); anonymous
structs and unions are transparent, as in C.  ``[N]`` indexes an array member
(``skb->cb[0]``) or a pointer; a pointer (or an address in a u64) is cast to point to
a struct in C's spelling, ``((struct tcp_sock *)skb->sk)->srtt_us``, or SystemTap's,
``@cast(skb->sk, "struct tcp_sock")->srtt_us`` -- with BTF any struct, without BTF the
catalogue's; indexing needs BTF.  :func:`resolve_btf` resolves with BTF
(any member, any tracepoint); :func:`resolve_offsets` without BTF, through the field
catalogue (:mod:`nettracer.layout.catalogue`) and an :class:`~nettracer.layout.offsets.Offsets`
object, for the tracepoints in :data:`KNOWN_ARGS`.

The result, an :class:`AccessPath`, is what :func:`nettracer.access.compile.compile_reads`
turns into instructions and what :meth:`AccessPath.decode` turns back into a value.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nettracer.errors import NettracerError

if TYPE_CHECKING:
    from nettracer.kernel.btf import Btf, BtfType
    from nettracer.layout.catalogue import FieldSpec
    from nettracer.layout.offsets import Offsets

#: largest value one expression may read (bytes); a struct larger than this is refused
MAX_VALUE_SIZE = 64
#: longest chain of ``->`` in one expression (each is a helper call in the program)
MAX_DEREFS = 8

#: how a value's bytes are shown
DECODES = ("uint", "int", "str", "ptr", "be", "bytes")


class AccessError(NettracerError):
    """A struct-path expression that does not parse or does not resolve."""


@dataclass(frozen=True)
class Token:
    """``op`` is ``""`` for the root name, ``"->"`` or ``"."`` (``name`` a member),
    ``"[]"`` (``name`` the index, decimal) or ``"cast"`` (``name`` the struct the value
    so far now points to); ``pos`` its column."""

    op: str
    name: str
    pos: int


_NAME = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_SPACE = re.compile(r"\s*")


class _Parser:
    """Recursive descent over one expression (see :func:`parse` for the grammar)."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.text = expr.rstrip()
        self.pos = 0

    def error(self, want: str) -> AccessError:
        rest = self.text[self.pos :]
        found = repr(rest) if rest else "the end"
        return AccessError(f"{self.expr}: at column {self.pos + 1}: expected {want}, found {found}")

    def skip(self) -> None:
        self.pos = _SPACE.match(self.text, self.pos).end()  # type: ignore[union-attr]

    def take(self, literal: str) -> bool:
        self.skip()
        if self.text.startswith(literal, self.pos):
            self.pos += len(literal)
            return True
        return False

    def name(self, want: str = "a name") -> Token:
        self.skip()
        m = _NAME.match(self.text, self.pos)
        if m is None:
            raise self.error(want)
        self.pos = m.end()
        return Token("", m.group(), m.start())

    def expression(self) -> list[Token]:
        tokens = self.primary()
        while True:
            self.skip()
            at = self.pos
            if self.take("->") or self.take("."):
                op = self.text[at : self.pos].strip()
                member = self.name("'->' or '.' then a member name")
                tokens.append(Token(op, member.name, member.pos))
            elif self.take("["):
                self.skip()
                m = re.compile(r"\d+").match(self.text, self.pos)
                if m is None:
                    raise self.error("an index (a decimal number)")
                self.pos = m.end()
                if not self.take("]"):
                    raise self.error("']'")
                tokens.append(Token("[]", m.group(), at))
            else:
                return tokens

    def primary(self) -> list[Token]:
        self.skip()
        at = self.pos
        if self.take("@cast"):
            if not self.take("("):
                raise self.error("'(' after @cast")
            inner = self.expression()
            if not self.take(","):
                raise self.error(
                    "',' then the type in quotes, as in @cast(skb, \"struct sk_buff\")"
                )
            struct = self.quoted_struct()
            if self.take(","):  # SystemTap's module argument ("kernel")
                self.quoted()
            if not self.take(")"):
                raise self.error("')'")
            return [*inner, Token("cast", struct, at)]
        if self.take("("):
            self.skip()
            if self.take("("):  # ((struct NAME *)EXPR)
                if self.name("'struct'").name != "struct":
                    raise self.error("'struct NAME *' in the cast")
                struct = self.name("a struct name")
                if not self.take("*") or not self.take(")"):
                    raise self.error("'*)': only casts to a pointer to a struct")
                inner = self.expression()
                tokens = [*inner, Token("cast", struct.name, at)]
            else:
                tokens = self.expression()
            if not self.take(")"):
                raise self.error("')'")
            return tokens
        if self.text.startswith(("->", "."), self.pos) or self.pos >= len(self.text):
            raise self.error("a name")
        return [self.name()]

    def quoted(self) -> str:
        self.skip()
        m = re.compile(r'"([^"]*)"').match(self.text, self.pos)
        if m is None:
            raise self.error("a quoted type name")
        self.pos = m.end()
        return m.group(1).strip()

    def quoted_struct(self) -> str:
        words = self.quoted().split()
        if words[:1] == ["struct"]:
            words = words[1:]
        if len(words) != 1 or not _NAME.fullmatch(words[0]):
            raise self.error('"struct NAME"')
        return words[0]


def parse(expr: str) -> list[Token]:
    """Tokens of ``expr``: a root name then ``->name`` / ``.name`` / ``[N]`` steps, and
    casts of the value so far to a pointer to a struct, in C's spelling
    ``((struct tcp_sock *)skb->sk)->srtt_us`` or SystemTap's
    ``@cast(skb->sk, "struct tcp_sock")->srtt_us`` (a ``"cast"`` token after the value).

    >>> [(t.op, t.name) for t in parse("skb->dev->name")]
    [('', 'skb'), ('->', 'dev'), ('->', 'name')]
    """
    if not expr.strip():
        raise AccessError(f"{expr!r}: empty expression (want e.g. skb->dev->name)")
    p = _Parser(expr)
    tokens = p.expression()
    p.skip()
    if p.pos < len(p.text):
        raise p.error("'->' or '.' then a member name")
    if sum(t.op in ("->", "[]") for t in tokens) > MAX_DEREFS:
        raise AccessError(f"{expr}: more than {MAX_DEREFS} '->' in one expression")
    return tokens


@dataclass(frozen=True)
class AccessPath:
    """A resolved expression.

    The program loads argument ``arg_index`` of the raw tracepoint context (a u64),
    then for each offset in ``derefs`` reads the pointer at ``base + offset`` (NULL
    base or NULL result: the value is null), then reads ``size`` bytes at
    ``base + offset``.  With ``offset`` None the value is the argument itself (its
    ``size`` low bytes).  ``bit_shift``/``bit_size`` pick a bitfield out of the
    loaded unit.  ``decode`` is one of :data:`DECODES`.
    """

    expr: str
    arg_index: int
    derefs: tuple[int, ...]
    offset: int | None
    size: int
    ctype: str
    decode: str
    bit_shift: int = 0
    bit_size: int = 0

    @property
    def arg(self) -> str:
        """The tracepoint argument the path starts from (the expression's first name)."""
        return parse(self.expr)[0].name

    @property
    def reads(self) -> int:
        """``bpf_probe_read_kernel`` calls this path costs."""
        return len(self.derefs) + (self.offset is not None)

    def decode_value(self, raw: bytes) -> int | str | None:
        """The value shown for ``raw`` (``size`` bytes as read from the kernel)."""
        raw = bytes(raw[: self.size])
        if self.decode == "str":
            return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
        if self.decode == "bytes":
            return raw.hex()
        order = "big" if self.decode == "be" else "little"
        v = int.from_bytes(raw, order)
        if self.bit_size:
            v = (v >> self.bit_shift) & ((1 << self.bit_size) - 1)
            if self.decode == "int" and v >> (self.bit_size - 1):
                v -= 1 << self.bit_size
            return v
        if self.decode == "int" and v >> (8 * self.size - 1):
            v -= 1 << (8 * self.size)
        if self.decode == "ptr":
            return hex(v)
        return v


def _error(expr: str, tok: Token, msg: str) -> AccessError:
    return AccessError(f"{expr}: at column {tok.pos + 1}: {msg}")


def _did_you_mean(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return f" (did you mean {close[0]}?)"
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return f" (members: {shown or 'none'})"


# -- BTF --------------------------------------------------------------------------


def tracepoint_args_btf(btf: Btf, tracepoint: str) -> list[tuple[str, int]]:
    """(name, BTF type id) of each ``TP_PROTO`` argument of ``tracepoint`` (Linux 5.5+:
    ``typedef void (*btf_trace_<tp>)(void *, proto)``; names as
    :meth:`Btf.raw_tracepoint_args` finds them)."""
    from nettracer.kernel.btf import Kind

    named = btf.raw_tracepoint_args(tracepoint)  # BtfLookupError when missing
    td = btf.find(f"btf_trace_{tracepoint}", Kind.TYPEDEF)[0]
    ptr = btf.type(btf.strip(td))
    proto = btf.type(btf.strip(ptr.size_or_type)) if ptr.kind == Kind.PTR else ptr
    types = [t for _, t in btf.params(proto.id)[1:]]
    return [(n or f"arg{i}", t) for i, ((n, _), t) in enumerate(zip(named, types, strict=True))]


def _visible_members(btf: Btf, tid: int, depth: int = 0) -> list[tuple[str, int, int, int]]:
    """(name, type id, bit offset, bitfield size) of every member visible in C in
    struct/union ``tid``: its own and, recursively, those of anonymous members."""
    from nettracer.kernel.btf import Kind

    out = []
    if depth > 16:
        return out
    for m in btf.members(tid):
        if m.name:
            out.append((m.name, m.type_id, m.bit_offset, m.bitfield_size))
            continue
        inner = btf.strip(m.type_id)
        if inner and btf.type(inner).kind in (Kind.STRUCT, Kind.UNION):
            for n, t, b, s in _visible_members(btf, inner, depth + 1):
                out.append((n, t, m.bit_offset + b, s))
    return out


def _is_be(btf: Btf, tid: int) -> bool:
    """True when a typedef in ``tid``'s chain is ``__be16``/``__be32``/``__be64``."""
    from nettracer.kernel.btf import Kind

    for _ in range(16):
        t = btf.type(tid)
        if t.kind == Kind.TYPEDEF and t.name.startswith("__be"):
            return True
        if t.kind not in (Kind.TYPEDEF, Kind.CONST, Kind.VOLATILE, Kind.RESTRICT, Kind.TYPE_TAG):
            return False
        tid = t.size_or_type
    return False


def _decode_btf(btf: Btf, tid: int, expr: str) -> tuple[str, int]:
    """(decode, size) of a value of type ``tid``."""
    from nettracer.kernel.btf import Kind

    size = btf.sizeof(tid)
    t = btf.type(btf.strip(tid))
    if t.kind == Kind.PTR:
        return "ptr", size
    if t.kind == Kind.ARRAY:
        elem, _, _ = btf.array(t.id)
        e = btf.type(btf.strip(elem))
        if e.kind == Kind.INT and btf.sizeof(e.id) == 1 and "char" in e.name:
            return "str", size
        return "bytes", size
    if size not in (1, 2, 4, 8):
        return "bytes", size
    if _is_be(btf, tid):
        return "be", size
    if t.kind == Kind.INT:
        signed = btf.int_encoding(t.id)[0] & 1
        return ("int" if signed else "uint"), size
    if t.kind in (Kind.ENUM, Kind.ENUM64):
        return ("int" if t.kind_flag else "uint"), size
    return "bytes", size


def _root_arg(expr: str, root: Token, args: list[tuple[str, int]]) -> int:
    """Index of the tracepoint argument ``root`` names."""
    names = [n for n, _ in args]
    if root.name not in names:
        raise _error(
            expr, root, f"no argument {root.name!r} (arguments: {', '.join(names) or 'none'})"
        )
    return names.index(root.name)


def _btf_member(btf: Btf, sid: int, tok: Token, expr: str, where: str) -> tuple[int, int, int]:
    """``(type id, bit offset, bitfield size or 0)`` of member ``tok.name`` of the struct
    or union ``sid`` (anonymous members looked through, as C does)."""
    from nettracer.kernel.btf import Kind

    t = btf.type(sid)
    members = _visible_members(btf, sid)
    found = next((m for m in members if m[0] == tok.name), None)
    if found is None:
        owner = f"{t.kind.name.lower()} {t.name}" if t.name else f"{where}'s type"
        raise AccessError(
            f"{expr}: at column {tok.pos + 1}: {owner} has no member {tok.name!r}"
            + _did_you_mean(tok.name, [m[0] for m in members])
        )
    _, tid, moff, bsize = found
    if not bsize:  # pre-kind_flag BTF keeps bitfields in the INT encoding
        it = btf.type(btf.strip(tid))
        if it.kind == Kind.INT:
            _, ioff, nbits = btf.int_encoding(it.id)
            if ioff or nbits != 8 * it.size_or_type:
                moff, bsize = moff + ioff, nbits
    return tid, moff, bsize


def _bitfield_unit(btf: Btf, tid: int, bit: int, bsize: int) -> tuple[int, int, int]:
    """``(byte offset, size, shift)`` of the smallest read that holds a ``bsize``-bit
    field at bit ``bit``: its declared type's unit, or the bytes it spans when it
    straddles one (packed structs)."""
    size = btf.sizeof(tid)
    unit = bit // (8 * size) * size
    if bit + bsize > 8 * (unit + size):
        unit, size = bit // 8, (bit + bsize + 7) // 8 - bit // 8
    return unit, size, bit - 8 * unit


def _btf_cast(btf: Btf, t: BtfType, tok: Token, expr: str, where: str) -> int:
    """The struct id a value of type ``t`` is cast to point to: the value must be a
    pointer or an 8-byte integer (``unsigned long`` holding an address)."""
    from nettracer.kernel.btf import Kind

    if not (t.kind == Kind.PTR or (t.kind == Kind.INT and t.size_or_type == 8)):
        raise _error(expr, tok, f"{where} is {btf.type_name(t.id)}: only a pointer or an "
                     "8-byte integer can be cast to a pointer")  # fmt: skip
    found = btf.find(tok.name, Kind.STRUCT) or btf.find(tok.name, Kind.UNION)
    if not found:
        raise _error(expr, tok, f"no struct {tok.name} in this kernel's BTF")
    return found[0]


def _btf_index(
    btf: Btf, t: BtfType, tok: Token, expr: str, where: str, cast: int | None
) -> tuple[int, int]:
    """(element type id, byte offset) of ``where[N]``: an array member (N below its
    length) or a pointer (``*(p + N)``, within one page)."""
    from nettracer.kernel.btf import Kind

    n = int(tok.name)
    if cast is None and t.kind == Kind.ARRAY:
        elem, _, count = btf.array(t.id)
        if n >= count:
            raise _error(expr, tok, f"{where} has {count} elements; index {n} is past its end")
        return elem, n * btf.sizeof(elem)
    if cast is None and t.kind == Kind.PTR:
        elem = t.size_or_type
        size = btf.sizeof(elem) if btf.strip(elem) else 0
        if not size or (n + 1) * size > 4096:
            raise _error(
                expr, tok, f"{where}[{n}]: only elements of a sized type within 4096 bytes"
            )
        return elem, n * size
    raise _error(expr, tok, f"{where} is not an array or a pointer; it cannot be indexed")


def resolve_btf(expr: str, btf: Btf, args: list[tuple[str, int]]) -> AccessPath:
    """Resolve ``expr`` against tracepoint arguments ``args`` (from
    :func:`tracepoint_args_btf`) with BTF.  Errors are one-line :class:`AccessError`\\ s."""
    from nettracer.kernel.btf import Kind

    tokens = parse(expr)
    root = tokens[0]
    index = _root_arg(expr, root, args)
    tid = args[index][1]
    where = root.name
    derefs: list[int] = []
    in_mem = False  # False while the value is the argument itself
    bit = 0  # bit offset of the current member from the current base
    bsize = 0
    cast: int | None = None  # struct the value (a pointer) was cast to point to
    for tok in tokens[1:]:
        t = btf.type(btf.strip(tid))
        tname = f"struct {btf.type(cast).name} *" if cast else btf.type_name(tid)
        if tok.op == "cast":
            cast = _btf_cast(btf, t, tok, expr, where)
            where = f"((struct {tok.name} *){where})"
            continue
        if tok.op == "[]":
            tid, offset = _btf_index(btf, t, tok, expr, where, cast)
            if t.kind == Kind.PTR:  # p[N]: *(p + N)
                if in_mem:
                    derefs.append(bit // 8)
                in_mem, bit = True, 0
            bit += 8 * offset
            where = f"{where}[{tok.name}]"
            continue
        if tok.op == "->":
            if t.kind != Kind.PTR and cast is None:
                hint = " (use '.')" if t.kind in (Kind.STRUCT, Kind.UNION) else ""
                raise _error(expr, tok, f"{where} is {tname}, not a pointer{hint}")
            if in_mem:
                derefs.append(bit // 8)
            in_mem, bit = True, 0
            t = btf.type(cast) if cast else btf.type(btf.strip(t.size_or_type))
            if t.kind == Kind.FWD:
                raise _error(expr, tok, f"{where} points to an incomplete type {tname}")
        elif t.kind == Kind.PTR or cast is not None:
            raise _error(expr, tok, f"{where} is a pointer ({tname}); use '->'")
        cast = None
        if t.kind not in (Kind.STRUCT, Kind.UNION):
            raise _error(expr, tok, f"{where} is {tname}, not a struct or union")
        tid, moff, bsize = _btf_member(btf, t.id, tok, expr, where)
        bit += moff
        where = f"{where}{tok.op}{tok.name}"
    decode, size = _decode_btf(btf, tid, expr)
    offset: int | None = bit // 8 if in_mem else None
    shift = 0
    if bsize:
        offset, size, shift = _bitfield_unit(btf, tid, bit, bsize)
        decode = "int" if decode == "int" else "uint"
    if offset is None:
        size = min(size, 8)
    elif size > MAX_VALUE_SIZE:
        raise AccessError(
            f"{expr}: {where} is {btf.type_name(tid)} ({size} bytes); at most "
            f"{MAX_VALUE_SIZE} bytes can be read, name one of its members"
        )
    return AccessPath(
        expr=expr,
        arg_index=index,
        derefs=tuple(derefs),
        offset=offset,
        size=size,
        ctype=f"struct {btf.type(cast).name} *" if cast else btf.type_name(tid),
        decode=decode,
        bit_shift=shift,
        bit_size=bsize,
    )


# -- without BTF: the field catalogue ------------------------------------------------

#: TP_PROTO arguments (name, struct pointed to or None) of tracepoints we know without
#: BTF; only a prefix that is stable across kernels (``kfree_skb`` gained ``reason`` in
#: 5.17 and ``rx_sk`` in 6.12, after ``location``).
KNOWN_ARGS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "kfree_skb": (("skb", "sk_buff"), ("location", None)),
    "consume_skb": (("skb", "sk_buff"),),
    "inet_sock_set_state": (("sk", "sock"), ("oldstate", None), ("newstate", None)),
    "sock_send_length": (("sk", "sock"), ("ret", None), ("flags", None)),
    "sock_recv_length": (("sk", "sock"), ("ret", None), ("flags", None)),
    "tcp_retransmit_skb": (("sk", "sock"), ("skb", "sk_buff")),
    "tcp_probe": (("sk", "sock"), ("skb", "sk_buff")),
    "tcp_destroy_sock": (("sk", "sock"),),
    "net_dev_xmit": (("skb", "sk_buff"), ("rc", None), ("dev", "net_device")),
    "netif_receive_skb": (("skb", "sk_buff"),),
}


#: (tracepoint, argument) of the ``void *`` arguments in :data:`KNOWN_ARGS`: kernel text
#: addresses (``kfree_skb``'s ``location``, the caller of ``kfree_skb_reason()``)
KNOWN_ADDRESS_ARGS = frozenset({("kfree_skb", "location")})


def _catalogue_decode(ctype: str, points_to: str | None, byteorder: str) -> str:
    if points_to is not None or ctype.endswith("*"):
        return "ptr"
    if ctype.startswith("char["):
        return "str"
    if byteorder == "big":
        return "be"
    if ctype.startswith("struct "):
        return "bytes"
    return "int" if ctype == "int" else "uint"


def _catalogue_member(
    expr: str, tokens: list[Token], i: int, struct: str
) -> tuple[int, str, FieldSpec]:
    """The catalogue field named by the ``->`` at ``tokens[i]`` and the ``.`` members
    after it, in ``struct``: (index after them, catalogue key, field).
    ``sk->__sk_common.X`` is ``sock_common.X``; ``possible_net_t`` accepts ``.net``."""
    from nettracer.layout.catalogue import BY_KEY

    j = i + 1
    while j < len(tokens) and tokens[j].op == ".":
        j += 1
    members = [t.name for t in tokens[i:j]]
    cur = struct
    if cur == "sock" and members[0] == "__sk_common" and len(members) > 1:
        cur, members = "sock_common", members[1:]
    key = f"{cur}.{'.'.join(members)}"
    if key not in BY_KEY and members[-1] == "net" and len(members) > 1:
        inner = f"{cur}.{'.'.join(members[:-1])}"
        if inner in BY_KEY and BY_KEY[inner].ctype == "possible_net_t":
            key = inner
    spec = BY_KEY.get(key)
    if spec is None:
        fields = [k.split(".", 1)[1] for k in BY_KEY if k.startswith(cur + ".")]
        raise AccessError(
            f"{expr}: at column {tokens[i].pos + 1}: {key} is not in the field catalogue, "
            f"and without BTF only catalogue fields can be read"
            + _did_you_mean(".".join(members), fields)
        )
    return j, key, spec


def resolve_offsets(expr: str, offsets: Offsets, tracepoint: str) -> AccessPath:
    """Resolve ``expr`` without BTF: every member must be a catalogue field (as
    ``struct.member.path``) whose offset ``offsets`` knows.  ``sk->__sk_common.X``
    is ``sock_common.X`` (``struct sock`` starts with it); ``possible_net_t`` fields
    (``nd_net``, ``skc_net``) accept ``.net``, their only member with CONFIG_NET_NS."""
    from nettracer.layout.catalogue import BY_KEY

    tokens = parse(expr)
    root = tokens[0]
    known = KNOWN_ARGS.get(tracepoint)
    if known is None:
        raise AccessError(
            f"{expr}: without BTF the arguments of tracepoint {tracepoint!r} are unknown "
            f"(known: {', '.join(sorted(KNOWN_ARGS))})"
        )
    names = [n for n, _ in known]
    if root.name not in names:
        raise _error(expr, root, f"no argument {root.name!r} (arguments: {', '.join(names)})")
    index = names.index(root.name)
    struct: str | None = known[index][1]
    derefs: list[int] = []
    base_off: int | None = None
    i = 1
    spec = None
    cast: str | None = None
    where = root.name
    while i < len(tokens):
        tok = tokens[i]
        if tok.op == "cast":  # a pointer (or an address held in a u64) as struct NAME *
            if spec is not None and spec.size != 8:
                raise _error(expr, tok, f"{where} is {spec.ctype}: only a pointer can be cast")
            if not any(k.startswith(f"{tok.name}.") for k in BY_KEY):
                structs = sorted({k.split(".", 1)[0] for k in BY_KEY})
                raise _error(
                    expr, tok, f"without BTF only catalogue structs can be cast to "
                    f"({', '.join(structs)}), not struct {tok.name}"
                )  # fmt: skip
            struct, where, cast = tok.name, f"((struct {tok.name} *){where})", tok.name
            i += 1
            continue
        if tok.op == "[]":
            raise _error(expr, tok, "indexing needs BTF (offsets.source btf)")
        if tok.op != "->" or struct is None:
            raise _error(expr, tok, f"{where} is not a pointer to a struct we know without BTF")
        if base_off is not None:
            derefs.append(base_off)
        j, key, spec = _catalogue_member(expr, tokens, i, struct)
        base_off = offsets.offset(key)  # UnresolvedField names the way out
        struct = spec.points_to
        where = f"{where}->{'.'.join(t.name for t in tokens[i:j])}"
        cast = None
        i = j
    if cast is not None:  # the expression ends with the cast: the pointer itself
        derefs_, off = (tuple(derefs), base_off) if spec is not None else ((), None)
        return AccessPath(expr, index, derefs_, off, 8, f"struct {cast} *", "ptr")
    if spec is None:
        if (tracepoint, root.name) in KNOWN_ADDRESS_ARGS:
            return AccessPath(expr, index, (), None, 8, "void *", "ptr")
        return AccessPath(expr, index, (), None, 8, "u64", "uint" if struct is None else "ptr")
    size = 8 if spec.ctype == "possible_net_t" else spec.size
    decode = _catalogue_decode(spec.ctype, spec.points_to, spec.byteorder)
    return AccessPath(expr, index, tuple(derefs), base_off, size, spec.ctype, decode)
