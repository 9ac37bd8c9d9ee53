"""Build small BTF blobs by hand, for tests that must not depend on the running kernel.

:class:`BtfBuilder` writes ``struct btf_type`` records exactly as
``include/uapi/linux/btf.h`` lays them out; :func:`mini_kernel` uses it to make a
blob that imitates the parts of vmlinux nettracer reads (anonymous unions in
``sock_common`` and ``sk_buff``, bitfields, qualifiers, a tracepoint typedef and its
``__probestub_``), with every offset known by construction.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC = 9, 10, 11, 12, 13, 14, 15
FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = 16, 17, 18, 19


@dataclass
class BtfBuilder:
    """Appends types (ids from 1) and strings; :meth:`blob` serialises them."""

    records: list[list[int]] = field(default_factory=list)
    strings: bytearray = field(default_factory=lambda: bytearray(b"\0"))
    offsets: dict[str, int] = field(default_factory=lambda: {"": 0})

    @property
    def next_id(self) -> int:
        return len(self.records) + 1

    def s(self, name: str) -> int:
        """String offset of ``name`` (deduplicated, as libbpf does)."""
        if name not in self.offsets:
            self.offsets[name] = len(self.strings)
            self.strings += name.encode() + b"\0"
        return self.offsets[name]

    def add(
        self, kind: int, name: str, vlen: int, kflag: bool, size_or_type: int, extra: list[int]
    ) -> int:
        info = (kind << 24) | (int(kflag) << 31) | vlen
        self.records.append([self.s(name), info, size_or_type, *extra])
        return len(self.records)

    # one method per kind
    def int_(self, name: str, size: int, signed: bool = False, bits: int = 0, off: int = 0) -> int:
        enc = (1 if signed else 0) << 24 | off << 16 | (bits or size * 8)
        return self.add(INT, name, 0, False, size, [enc])

    def ptr(self, t: int) -> int:
        return self.add(PTR, "", 0, False, t, [])

    def array(self, elem: int, index: int, n: int) -> int:
        return self.add(ARRAY, "", 0, False, 0, [elem, index, n])

    def struct(
        self,
        name: str,
        size: int,
        members: list[tuple[str, int, int, int]],
        union: bool = False,
        kflag: bool | None = None,
    ) -> int:
        """``members`` are (name, type, bit offset, bitfield size)."""
        if kflag is None:
            kflag = any(m[3] for m in members)
        extra: list[int] = []
        for mname, t, bit, bsize in members:
            extra += [self.s(mname), t, (bsize << 24 | bit) if kflag else bit]
        return self.add(UNION if union else STRUCT, name, len(members), kflag, size, extra)

    def enum(
        self, name: str, size: int, values: list[tuple[str, int]], signed: bool = False
    ) -> int:
        extra: list[int] = []
        for vname, v in values:
            extra += [self.s(vname), v & 0xFFFFFFFF]
        return self.add(ENUM, name, len(values), signed, size, extra)

    def enum64(self, name: str, values: list[tuple[str, int]], signed: bool = False) -> int:
        extra: list[int] = []
        for vname, v in values:
            v &= (1 << 64) - 1
            extra += [self.s(vname), v & 0xFFFFFFFF, v >> 32]
        return self.add(ENUM64, name, len(values), signed, 8, extra)

    def fwd(self, name: str, union: bool = False) -> int:
        return self.add(FWD, name, 0, union, 0, [])

    def typedef(self, name: str, t: int) -> int:
        return self.add(TYPEDEF, name, 0, False, t, [])

    def qual(self, kind: int, t: int, name: str = "") -> int:
        """VOLATILE, CONST, RESTRICT or TYPE_TAG (which has a name: ``"rcu"``)."""
        return self.add(kind, name, 0, False, t, [])

    def func_proto(self, ret: int, params: list[tuple[str, int]]) -> int:
        extra: list[int] = []
        for pname, t in params:
            extra += [self.s(pname), t]
        return self.add(FUNC_PROTO, "", len(params), False, ret, extra)

    def func(self, name: str, proto: int, linkage: int = 0) -> int:
        return self.add(FUNC, name, linkage, False, proto, [])

    def var(self, name: str, t: int, linkage: int = 1) -> int:
        return self.add(VAR, name, 0, False, t, [linkage])

    def datasec(self, name: str, size: int, vars_: list[tuple[int, int, int]]) -> int:
        extra: list[int] = []
        for t, off, sz in vars_:
            extra += [t, off, sz]
        return self.add(DATASEC, name, len(vars_), False, size, extra)

    def float_(self, name: str, size: int) -> int:
        return self.add(FLOAT, name, 0, False, size, [])

    def decl_tag(self, name: str, t: int, component: int = -1) -> int:
        return self.add(DECL_TAG, name, 0, False, t, [component & 0xFFFFFFFF])

    def blob(self, order: str = "little", hdr_pad: int = 0, gap: int = 0) -> bytes:
        """The raw blob; ``hdr_pad`` extra header bytes (a newer, longer ``btf_header``),
        ``gap`` bytes between the type and string sections."""
        e = "<" if order == "little" else ">"
        types = b"".join(struct.pack(f"{e}{len(r)}I", *r) for r in self.records)
        hdr_len = 24 + hdr_pad
        hdr = struct.pack(
            f"{e}HBBIIIII",
            0xEB9F,
            1,
            0,
            hdr_len,
            0,
            len(types),
            len(types) + gap,
            len(self.strings),
        )
        return hdr + b"\0" * hdr_pad + types + b"\0" * gap + bytes(self.strings)


@dataclass
class MiniKernel:
    """The blob plus what the test knows about it."""

    builder: BtfBuilder
    ids: dict[str, int]

    def blob(self, **kw: object) -> bytes:
        return self.builder.blob(**kw)  # type: ignore[arg-type]


# (key, byte offset, size, C type, bit offset, bitfield size) known by construction
EXPECTED: list[tuple[str, int, int, str, int, int]] = [
    ("sock_common.skc_daddr", 0, 4, "__be32", 0, 0),
    ("sock_common.skc_rcv_saddr", 4, 4, "__be32", 32, 0),
    ("sock_common.skc_hash", 8, 4, "unsigned int", 64, 0),
    ("sock_common.skc_u16hashes", 8, 4, "__u16[2]", 64, 0),
    ("sock_common.skc_dport", 12, 2, "__be16", 96, 0),
    ("sock_common.skc_num", 14, 2, "__u16", 112, 0),
    ("sock_common.skc_family", 16, 2, "short unsigned int", 128, 0),
    ("sock_common.skc_state", 18, 1, "volatile unsigned char", 144, 0),
    # bitfields: unsigned char skc_reuse:4 at bit 152, skc_reuseport:1 at 156
    ("sock_common.skc_reuse", 19, 1, "unsigned char", 152, 4),
    ("sock_common.skc_reuseport", 19, 1, "unsigned char", 156, 1),
    # unsigned int wide:12 at bit 220 straddles a 4-byte unit: libbpf widens to 8
    ("sock_common.wide", 24, 8, "unsigned int", 220, 12),
    # unsigned int straddle:12 at bit 60 crosses an 8-byte boundary: minimal bytes
    ("bf.straddle", 7, 2, "unsigned int", 60, 12),
    ("sock_common.skc_net", 48, 8, "possible_net_t", 384, 0),
    ("sock_common.skc_net.net", 48, 8, "struct net *", 384, 0),
    ("sock_common.skc_v6_daddr", 56, 16, "struct in6_addr", 448, 0),
    ("net.ns.inum", 28, 4, "unsigned int", 224, 0),
    ("net.ns", 8, 24, "struct ns_common", 64, 0),
    ("sk_buff.next", 0, 8, "struct sk_buff *", 0, 0),
    ("sk_buff.dev", 16, 8, "struct net_device *", 128, 0),
    ("sk_buff.dev_scratch", 16, 8, "long unsigned int", 128, 0),
    ("sk_buff.sk", 24, 8, "struct sock *", 192, 0),
    ("sk_buff.cb", 32, 48, "char[48]", 256, 0),
    ("sk_buff.len", 80, 4, "unsigned int", 640, 0),
    ("sk_buff.protocol", 84, 2, "__be16", 672, 0),
    ("sk_buff.head", 88, 8, "unsigned char *restrict", 704, 0),
    ("sk_buff.destructor", 96, 8, "void (*)(struct sk_buff *)", 768, 0),
    ("sk_buff.name", 104, 8, "const char *const", 832, 0),
    ("sk_buff.old_bits", 112, 1, "unsigned char", 899, 3),
    ("net_device.name", 0, 16, "char[16]", 0, 0),
    ("net_device.ifindex", 16, 4, "int", 128, 0),
    ("net_device.nd_net", 24, 8, "possible_net_t", 192, 0),
    ("net_device.ptrs", 32, 16, "int *[2]", 256, 0),
    ("net_device.rows", 48, 8, "int (*)[4]", 384, 0),
    ("u.a", 0, 4, "int", 0, 0),
    ("u.b", 0, 8, "long unsigned int", 0, 0),
    ("possible_net_t.net", 0, 8, "struct net *", 0, 0),
]

DROP_REASONS = [
    ("SKB_NOT_DROPPED_YET", 0),
    ("SKB_CONSUMED", 1),
    ("SKB_DROP_REASON_NOT_SPECIFIED", 2),
    ("SKB_DROP_REASON_ALIAS", 2),
    ("SKB_DROP_REASON_NO_SOCKET", 3),
    ("SKB_DROP_REASON_MAX", 200),
]


def mini_kernel() -> MiniKernel:
    """A BTF blob shaped like the vmlinux structs nettracer reads."""
    b = BtfBuilder()
    ids: dict[str, int] = {}
    i_int = b.int_("int", 4, signed=True)
    i_uint = b.int_("unsigned int", 4)
    i_uchar = b.int_("unsigned char", 1)
    i_ulong = b.int_("long unsigned int", 8)
    i_ushort = b.int_("short unsigned int", 2)
    i_char = b.int_("char", 1, signed=True)
    u16 = b.typedef("__u16", i_ushort)
    be16 = b.typedef("__be16", u16)
    be32 = b.typedef("__be32", i_uint)
    # struct ns_common { long unsigned int stashed; unsigned int pad[3]; unsigned int inum; }
    pad3 = b.array(i_uint, i_int, 3)
    ns_common = b.struct(
        "ns_common",
        24,
        [("stashed", i_ulong, 0, 0), ("pad", pad3, 64, 0), ("inum", i_uint, 160, 0)],
    )
    net = b.struct("net", 40, [("refcnt", i_ulong, 0, 0), ("ns", ns_common, 64, 0)])
    ids["net"] = net
    net_ptr = b.ptr(net)
    pnet_anon = b.struct("", 8, [("net", net_ptr, 0, 0)])
    possible_net_t = b.typedef("possible_net_t", pnet_anon)
    in6 = b.struct("in6_addr", 16, [("s6_addr", b.array(i_uchar, i_int, 16), 0, 0)])
    # sock_common: anonymous union { __addrpair; struct { __be32 daddr, rcv_saddr; } }
    addr = b.struct("", 8, [("skc_daddr", be32, 0, 0), ("skc_rcv_saddr", be32, 32, 0)])
    addrpair = b.typedef("__addrpair", b.int_("long long unsigned int", 8))
    u_addr = b.struct("", 8, [("skc_addrpair", addrpair, 0, 0), ("", addr, 0, 0)], union=True)
    u_hash = b.struct(
        "",
        4,
        [("skc_hash", i_uint, 0, 0), ("skc_u16hashes", b.array(u16, i_int, 2), 0, 0)],
        union=True,
    )
    ports = b.struct("", 4, [("skc_dport", be16, 0, 0), ("skc_num", u16, 16, 0)])
    u_ports = b.struct("", 4, [("skc_portpair", i_uint, 0, 0), ("", ports, 0, 0)], union=True)
    vuchar = b.qual(VOLATILE, i_uchar)
    # bitfields in an anonymous struct at byte 24 (bit 192): wide:12 at bit 28 of it
    bits = b.struct("", 4, [("wide", i_uint, 28, 12)])
    sock_common = b.struct(
        "sock_common",
        88,
        [
            ("", u_addr, 0, 0),
            ("", u_hash, 64, 0),
            ("", u_ports, 96, 0),
            ("skc_family", i_ushort, 128, 0),
            ("skc_state", vuchar, 144, 0),
            ("skc_reuse", i_uchar, 152, 4),
            ("skc_reuseport", i_uchar, 156, 1),
            ("", bits, 192, 0),
            ("skc_net", possible_net_t, 384, 0),
            ("skc_v6_daddr", in6, 448, 0),
        ],
        kflag=True,
    )
    ids["sock_common"] = sock_common
    sock = b.struct("sock", 88, [("__sk_common", sock_common, 0, 0)])
    ids["sock"] = sock
    # struct sk_buff refers to itself and to net_device: forward-declare via ids
    sk_buff_id = b.next_id
    ids["sk_buff"] = sk_buff_id
    # placeholder, filled in below once pointer ids exist
    b.records.append([])
    skb_ptr = b.ptr(sk_buff_id)
    nd_fwd = b.fwd("net_device")
    nd_ptr = b.ptr(nd_fwd)
    rcu_tag = b.qual(TYPE_TAG, sock, "rcu")
    sock_rcu_ptr = b.ptr(rcu_tag)
    uchar_ptr = b.ptr(i_uchar)
    cb = b.array(i_char, i_int, 48)
    destructor_proto = b.func_proto(0, [("", skb_ptr)])
    destructor = b.ptr(destructor_proto)
    const_char = b.qual(CONST, i_char)
    name_ptr = b.qual(CONST, b.ptr(const_char))
    # struct { struct sk_buff *next, *prev; union { struct net_device *dev; ulong dev_scratch; }; }
    dev_u = b.struct("", 8, [("dev", nd_ptr, 0, 0), ("dev_scratch", i_ulong, 0, 0)], union=True)
    list_s = b.struct(
        "", 24, [("next", skb_ptr, 0, 0), ("prev", skb_ptr, 64, 0), ("", dev_u, 128, 0)]
    )
    top_u = b.struct(
        "", 24, [("", list_s, 0, 0), ("rbnode", b.array(i_ulong, i_int, 3), 0, 0)], True
    )
    restrict_head = b.qual(RESTRICT, uchar_ptr)
    # old-style (pre kind_flag) bitfield: an INT with nr_bits 3 at int offset 3
    old_bits_int = b.int_("unsigned char", 1, bits=3, off=3)
    old = b.struct("", 1, [("old_bits", old_bits_int, 0, 0)], kflag=False)
    sk_buff_rec_members = [
        ("", top_u, 0, 0),
        ("sk", sock_rcu_ptr, 192, 0),
        ("cb", cb, 256, 0),
        ("len", i_uint, 640, 0),
        ("protocol", be16, 672, 0),
        ("head", restrict_head, 704, 0),
        ("destructor", destructor, 768, 0),
        ("name", name_ptr, 832, 0),
        ("", old, 896, 0),
    ]
    tmp = BtfBuilder(strings=b.strings, offsets=b.offsets)
    tmp.struct("sk_buff", 120, sk_buff_rec_members, kflag=False)
    b.records[sk_buff_id - 1] = tmp.records[0]
    # net_device, complete, after its FWD
    int_ptr = b.ptr(i_int)
    rows_ptr = b.ptr(b.array(i_int, i_int, 4))
    net_device = b.struct(
        "net_device",
        56,
        [
            ("name", b.array(i_char, i_int, 16), 0, 0),
            ("ifindex", i_int, 128, 0),
            ("nd_net", possible_net_t, 192, 0),
            ("ptrs", b.array(int_ptr, i_int, 2), 256, 0),
            ("rows", rows_ptr, 384, 0),
        ],
    )
    ids["net_device"] = net_device
    b.struct("u", 8, [("a", i_int, 0, 0), ("b", i_ulong, 0, 0)], union=True)
    b.struct("bf", 16, [("lo", i_uint, 0, 0), ("straddle", i_uint, 60, 12)])
    reason = b.enum("skb_drop_reason", 4, DROP_REASONS)
    ids["skb_drop_reason"] = reason
    b.enum("signed_e", 4, [("NEG", -1), ("POS", 5)], signed=True)
    b.enum64("big_e", [("HUGE", 1 << 40), ("TOP", (1 << 64) - 1)])
    b.enum64("sbig_e", [("MINUS", -(1 << 40))], signed=True)
    void_ptr = b.ptr(0)
    # typedef void (*btf_trace_kfree_skb)(void *, struct sk_buff *, void *, enum, struct sock *);
    tp_args = [void_ptr, skb_ptr, void_ptr, reason, b.ptr(sock)]
    proto = b.func_proto(0, [("", t) for t in tp_args])
    b.typedef("btf_trace_kfree_skb", b.ptr(proto))
    named = b.func_proto(
        0, list(zip(["__data", "skb", "location", "reason", "rx_sk"], tp_args, strict=True))
    )
    b.func("__probestub_kfree_skb", named)
    # a tracepoint whose stub has different types: names stay empty
    proto2 = b.func_proto(0, [("", void_ptr), ("", i_int)])
    b.typedef("btf_trace_lonely", b.ptr(proto2))
    b.func("__probestub_lonely", b.func_proto(0, [("__data", void_ptr), ("x", i_uint)]))
    b.func_proto(i_int, [("fmt", b.ptr(const_char)), ("", 0)])  # int (const char *fmt, ...)
    ids["varargs"] = len(b.records)
    counter = b.var("counter", i_int)
    b.datasec(".data", 4, [(counter, 0, 4)])
    b.float_("double", 8)
    b.decl_tag("bpf_kfunc", net_device, -1)
    return MiniKernel(b, ids)
