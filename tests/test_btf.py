"""The BTF reader against a hand-built blob (offsets known by construction) and
against the running kernel's BTF with ``bpftool btf dump ... format raw`` as oracle."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field

import pytest
from btfsynth import DROP_REASONS, EXPECTED, BtfBuilder, mini_kernel
from conftest import kernel_skip

from nettracer.errors import NettracerError
from nettracer.kernel import BTF_VMLINUX as VMLINUX
from nettracer.kernel.btf import (
    Btf,
    BtfError,
    BtfLookupError,
    Kind,
    NoBtfError,
)
from nettracer.layout.btf_offsets import btf_offsets
from nettracer.layout.catalogue import CATALOGUE, FieldSpec

# -- the hand-built blob -------------------------------------------------------------


@pytest.fixture(scope="module", params=["little", "big"])
def mini(request: pytest.FixtureRequest) -> Btf:
    """The mini kernel in both byte orders, with a longer header and a section gap."""
    return Btf(mini_kernel().blob(order=request.param, hdr_pad=8, gap=4), source="mini")


@pytest.mark.parametrize("key,offset,size,ctype,bit,bsize", EXPECTED)
def test_resolve_known_layout(
    mini: Btf, key: str, offset: int, size: int, ctype: str, bit: int, bsize: int
) -> None:
    m = mini.resolve(key)
    assert (m.offset, m.size, m.type_name, m.bit_offset, m.bitfield_size) == (
        offset,
        size,
        ctype,
        bit,
        bsize,
    )
    assert m.key == key
    assert m.is_bitfield == bool(bsize)


def test_points_to(mini: Btf) -> None:
    assert mini.resolve("sk_buff.dev").points_to == "net_device"  # through a FWD
    assert mini.resolve("sk_buff.sk").points_to == "sock"  # through a TYPE_TAG (__rcu)
    assert mini.resolve("sk_buff.head").points_to is None
    assert mini.resolve("sk_buff.len").points_to is None


def test_struct_prefix_accepted(mini: Btf) -> None:
    assert mini.resolve("struct sk_buff.len").offset == 80


def test_missing_struct(mini: Btf) -> None:
    with pytest.raises(BtfLookupError, match=r"^struct no_such_struct not found in BTF \(mini\)$"):
        mini.resolve("no_such_struct.x")


def test_missing_member_lists_members(mini: Btf) -> None:
    with pytest.raises(BtfLookupError) as e:
        mini.resolve("sk_buff.nope")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("struct sk_buff has no member 'nope' (members: ")
    # members of anonymous unions/structs are listed as C sees them
    listed = msg.split("(members: ", 1)[1].rstrip(")").split(", ")
    assert listed[:5] == ["next", "prev", "dev", "dev_scratch", "rbnode"]
    assert "len" in listed and "old_bits" in listed


def test_missing_nested_member(mini: Btf) -> None:
    with pytest.raises(BtfLookupError, match=r"^struct ns_common \(net\.ns\) has no member 'x' "):
        mini.resolve("net.ns.x")


def test_path_through_pointer_or_scalar(mini: Btf) -> None:
    with pytest.raises(BtfLookupError, match=r"sk_buff\.dev is a pointer \(struct net_device \*\)"):
        mini.resolve("sk_buff.dev.name")
    with pytest.raises(BtfLookupError, match=r"sk_buff\.len is unsigned int, not a struct"):
        mini.resolve("sk_buff.len.x")


@pytest.mark.parametrize("key", ["sk_buff", "sk_buff.", ".len", "", "sk_buff..len"])
def test_bad_key(mini: Btf, key: str) -> None:
    with pytest.raises(BtfLookupError, match=r"want struct\.member"):
        mini.resolve(key)


def test_errors_are_nettracer_errors() -> None:
    for cls in (BtfError, BtfLookupError, NoBtfError):
        assert issubclass(cls, NettracerError)


def test_enum(mini: Btf) -> None:
    first: dict[int, str] = {}
    for name, value in DROP_REASONS:
        first.setdefault(value, name)
    assert mini.enum("skb_drop_reason") == first
    assert mini.enum("enum skb_drop_reason") == first
    assert mini.enumerators(mini.find_enum("skb_drop_reason")) == DROP_REASONS
    assert mini.enum("signed_e") == {-1: "NEG", 5: "POS"}
    assert mini.enum("big_e") == {1 << 40: "HUGE", (1 << 64) - 1: "TOP"}
    assert mini.enum("sbig_e") == {-(1 << 40): "MINUS"}
    with pytest.raises(BtfLookupError, match=r"^enum nope not found in BTF"):
        mini.enum("nope")


def test_raw_tracepoint_args(mini: Btf) -> None:
    assert mini.raw_tracepoint_args("kfree_skb") == [
        ("skb", "struct sk_buff *"),
        ("location", "void *"),
        ("reason", "enum skb_drop_reason"),
        ("rx_sk", "struct sock *"),
    ]
    # the stub's parameter types differ, so its names are not borrowed
    assert mini.raw_tracepoint_args("lonely") == [("", "int")]
    with pytest.raises(BtfLookupError, match=r"no raw tracepoint 'nope' in BTF"):
        mini.raw_tracepoint_args("nope")


def test_type_names_and_kinds(mini: Btf) -> None:
    assert mini.type_name(0) == "void"
    varargs = mini_kernel().ids["varargs"]
    assert mini.type_name(varargs) == "int (const char *fmt, ...)"
    assert mini.type(varargs).kind == Kind.FUNC_PROTO
    (counter,) = mini.find("counter")
    assert mini.type(counter).kind == Kind.VAR and mini.sizeof(counter) == 4
    (double,) = mini.find("double")
    assert mini.type(double).kind == Kind.FLOAT and mini.sizeof(double) == 8
    assert [mini.type(t).kind for t in mini.find("net_device")] == [Kind.FWD, Kind.STRUCT]
    assert mini.find("net_device", Kind.STRUCT) == [mini.find_struct("net_device")]
    (tag,) = mini.find("bpf_kfunc")
    assert mini.type(tag).kind == Kind.DECL_TAG
    (stub,) = mini.find("__probestub_kfree_skb")
    with pytest.raises(BtfError, match="has no size"):
        mini.sizeof(stub)
    assert mini.pointer_size() == 8


def test_len_and_sha256() -> None:
    blob = mini_kernel().blob()
    btf = Btf(blob)
    assert len(btf) == len(mini_kernel().builder.records)
    assert btf.sha256 == hashlib.sha256(blob).hexdigest()


def test_name_inside_another_string() -> None:
    """A name_off may point into the middle of a longer string (legal, if unusual)."""
    b = BtfBuilder()
    i = b.int_("int", 4, signed=True)
    b.struct("prefix_tail", 4, [("x", i, 0, 0)])
    b.struct("prefix_tail", 8, [("y", i, 32, 0)])
    tid = b.struct("", 4, [("z", i, 0, 0)])
    b.records[tid - 1][0] = b.s("prefix_tail") + len("prefix_")
    btf = Btf(b.blob())
    assert btf.resolve("tail.z").offset == 0
    assert btf.find("prefix_tail") == [2, 3]
    assert btf.resolve("prefix_tail.x").offset == 0  # the first of two same-named structs


def test_duplicate_strings_lowest_id_wins() -> None:
    b = BtfBuilder()
    i = b.int_("int", 4, signed=True)
    b.struct("dup", 8, [("b", i, 32, 0)])
    b.struct("dup", 4, [("a", i, 0, 0)])
    b.strings += b"dup\0"  # a second copy of the name, used by the lower id
    b.records[1][0] = len(b.strings) - 4
    btf = Btf(b.blob())
    assert btf.find("dup") == [2, 3]
    assert btf.resolve("dup.b").bit_offset == 32
    with pytest.raises(BtfLookupError, match=r"members: b\)"):
        btf.resolve("dup.a")


# -- corrupt blobs ---------------------------------------------------------------------


def _header(blob: bytes) -> list[int]:
    return list(struct.unpack_from("<HBBIIIII", blob))


def _with_header(blob: bytes, **kw: int) -> bytes:
    names = ["magic", "version", "flags", "hdr_len", "type_off", "type_len", "str_off", "str_len"]
    h = dict(zip(names, _header(blob), strict=True))
    h.update(kw)
    return struct.pack("<HBBIIIII", *h.values()) + blob[24:]


def test_corrupt_headers() -> None:
    blob = mini_kernel().blob()
    cases = {
        "too short": blob[:10],
        "not BTF": b"\0" * 64,
        "ELF": b"\x7fELF" + b"\0" * 60,
        "unsupported BTF version": _with_header(blob, version=2),
        "bad BTF header length": _with_header(blob, hdr_len=8),
        "truncated": blob[:-1],
        "not 4-byte aligned": _with_header(blob, type_len=_header(blob)[5] - 2),
        "must start and end with NUL": _with_header(blob, str_len=_header(blob)[7] - 1),
    }
    for why, data in cases.items():
        with pytest.raises(BtfError) as e:
            Btf(data)
        assert "\n" not in str(e.value)
        if why not in ("too short", "not BTF", "ELF", "truncated"):
            assert why in str(e.value)
    with pytest.raises(BtfError, match="ELF file"):
        Btf(cases["ELF"])


def test_bad_kind_and_overrun() -> None:
    b = BtfBuilder()
    i = b.int_("int", 4, signed=True)
    b.struct("s", 4, [("x", i, 0, 0)])
    b.add(25, "weird", 0, False, 0, [])
    with pytest.raises(BtfError, match=r"type \[3\] has unknown kind 25"):
        len(Btf(b.blob()))
    # the struct resolves: the bad record is past it and never looked at
    assert Btf(b.blob()).resolve("s.x").size == 4
    b.records[-1] = [b.s("big"), (Kind.STRUCT << 24) | 100, 4]
    with pytest.raises(BtfError, match=r"type \[3\] \(STRUCT\) runs past the end"):
        len(Btf(b.blob()))


def test_type_id_and_string_out_of_range() -> None:
    b = BtfBuilder()
    b.struct("s", 4, [("x", 99, 0, 0)])
    btf = Btf(b.blob())
    with pytest.raises(BtfError, match=r"type id 99 out of range \(1 types\)"):
        btf.resolve("s.x")
    b.records[0][0] = 10_000
    with pytest.raises(BtfError, match="string offset 10000 out of range"):
        Btf(b.blob()).type(1)


def test_cyclic_types() -> None:
    b = BtfBuilder()
    b.qual(Kind.CONST, 1)  # const const const ...
    b.struct("a", 4, [("", 3, 0, 0)])  # struct a { struct a; };  (anonymous member)
    b.add(Kind.STRUCT, "", 1, False, 4, [b.s(""), 3, 0])
    btf = Btf(b.blob())
    with pytest.raises(BtfError, match="chain too long"):
        btf.sizeof(1)
    with pytest.raises(BtfError, match="nested too deep or cyclic"):
        btf.type_name(1)
    with pytest.raises(BtfError, match="nested too deep or cyclic"):
        btf.resolve("a.x")


def test_vmlinux_missing(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(tmp_path, "vmlinux")
    with pytest.raises(NoBtfError) as e:
        Btf.vmlinux(missing)
    assert str(e.value) == f"kernel has no BTF ({missing} missing); use offsets.source guess"
    assert e.value.settings == ("offsets.source",)
    with pytest.raises(BtfError, match="cannot read BTF file"):
        Btf.from_file(str(tmp_path))  # a directory


# -- btf_offsets on the mini blob -------------------------------------------------------


def test_btf_offsets_reasons(mini: Btf) -> None:
    specs = (
        FieldSpec("sk_buff.len", 4, "unsigned int"),
        FieldSpec("sk_buff.dev", 8, "struct net_device *", points_to="net_device"),
        FieldSpec("sk_buff.protocol", 4, "__be32"),  # wrong size
        FieldSpec("sock_common.skc_reuse", 1, "unsigned char"),  # a bitfield
        FieldSpec("sk_buff.sk", 8, "struct sock *", points_to="net"),  # wrong target
        FieldSpec("sock.sk_protocol", 2, "u16"),  # absent
        FieldSpec("nope.x", 4, "int"),
    )
    off = btf_offsets(mini, specs)
    assert off.source == "btf"
    assert off.to_json() == {
        "sk_buff.dev": {"offset": 16, "size": 8},
        "sk_buff.len": {"offset": 80, "size": 4},
    }
    why = off.unresolved
    assert why["sk_buff.protocol"] == "size 2 in BTF (__be16), catalogue expects 4 (__be32)"
    assert why["sock_common.skc_reuse"].startswith("is a 4-bit bitfield (unsigned char)")
    assert why["sk_buff.sk"] == "points to struct sock in BTF, catalogue expects struct net"
    assert why["sock.sk_protocol"].startswith("struct sock has no member 'sk_protocol'")
    assert why["nope.x"].startswith("struct nope not found")


# -- the running kernel, with bpftool as oracle -----------------------------------------


@dataclass
class RawType:
    """One type as ``bpftool btf dump format raw`` prints it."""

    id: int
    kind: str
    name: str
    attrs: dict[str, str]
    items: list[tuple[str, dict[str, str]]] = field(default_factory=list)


_HEAD = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_ITEM = re.compile(r"^\t'([^']*)' ?(.*)$")
_ATTR = re.compile(r"(\w+)=([^\s,]+)")


class Bpftool:
    """An independent reading of vmlinux BTF, from bpftool's raw dump."""

    def __init__(self, text: str) -> None:
        self.types: dict[int, RawType] = {}
        cur: RawType | None = None
        for line in text.splitlines():
            if m := _HEAD.match(line):
                cur = RawType(int(m[1]), m[2], m[3], dict(_ATTR.findall(m[4])))
                self.types[cur.id] = cur
            elif (m := _ITEM.match(line)) and cur is not None:
                cur.items.append((m[1], dict(_ATTR.findall(m[2]))))
        self.by_name: dict[str, list[RawType]] = {}
        for t in self.types.values():
            self.by_name.setdefault(t.name, []).append(t)

    def ref(self, t: RawType) -> int:
        return int(t.attrs["type_id"])

    def strip(self, tid: int) -> int:
        while tid and self.types[tid].kind in {
            "TYPEDEF",
            "CONST",
            "VOLATILE",
            "RESTRICT",
            "TYPE_TAG",
        }:
            tid = self.ref(self.types[tid])
        return tid

    def size(self, tid: int) -> int:
        t = self.types[tid]
        if t.kind == "PTR":
            return 8
        if t.kind == "ARRAY":
            return int(t.attrs["nr_elems"]) * self.size(self.ref(t))
        if "size" in t.attrs:
            return int(t.attrs["size"])
        return self.size(self.ref(t))

    def struct(self, name: str) -> RawType:
        return next(t for t in self.by_name[name] if t.kind in ("STRUCT", "UNION"))

    def find(self, t: RawType, name: str) -> tuple[dict[str, str], int] | None:
        """(member attrs, bit offset) of ``name`` in ``t``, depth-first through anonymous
        members."""
        for mname, a in t.items:
            if mname == name:
                return a, int(a["bits_offset"])
            inner = self.types.get(self.strip(int(a["type_id"])))
            if mname == "(anon)" and inner is not None and inner.kind in ("STRUCT", "UNION"):
                found = self.find(inner, name)
                if found is not None:
                    return found[0], int(a["bits_offset"]) + found[1]
        return None

    def resolve(self, key: str) -> tuple[int, int, int, int]:
        """(bit offset, bitfield size, type id, size) of ``key``."""
        sname, *path = key.split(".")
        t = self.struct(sname)
        bit = 0
        attrs: dict[str, str] = {}
        for i, part in enumerate(path):
            if i:
                t = self.types[self.strip(int(attrs["type_id"]))]
            found = self.find(t, part)
            assert found is not None, key
            attrs, rel = found
            bit += rel
        tid = int(attrs["type_id"])
        return bit, int(attrs.get("bitfield_size", 0)), tid, self.size(tid)

    def c_type(self, tid: int) -> str:
        """Enough C spelling for tracepoint arguments (pointers, qualifiers, tags)."""
        if tid == 0:
            return "void"
        t = self.types[tid]
        if t.kind == "PTR":
            inner = self.c_type(self.ref(t))
            return inner + ("*" if inner.endswith("*") else " *")
        if t.kind in ("CONST", "VOLATILE"):
            return f"{t.kind.lower()} {self.c_type(self.ref(t))}"
        if t.kind == "TYPE_TAG":
            return self.c_type(self.ref(t))
        if t.kind in ("STRUCT", "UNION"):
            return f"{t.kind.lower()} {t.name}"
        if t.kind in ("ENUM", "ENUM64"):
            return f"enum {t.name}"
        return t.name


@pytest.fixture(scope="module")
def kbtf() -> Btf:
    if not os.path.exists(VMLINUX):
        kernel_skip(f"{VMLINUX} missing: the kernel has no BTF")
    return Btf.vmlinux()


@pytest.fixture(scope="module")
def bpftool(kbtf: Btf) -> Bpftool:
    exe = shutil.which("bpftool")
    if exe is None:
        kernel_skip("bpftool not installed: it is the oracle for BTF offsets")
    out = subprocess.run(
        [exe, "btf", "dump", "file", VMLINUX, "format", "raw"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return Bpftool(out)


def _compare(kbtf: Btf, bpftool: Bpftool, key: str) -> None:
    m = kbtf.resolve(key)
    bit, bsize, tid, size = bpftool.resolve(key)
    assert (m.bit_offset, m.bitfield_size, m.type_id) == (bit, bsize, tid), key
    if not bsize:
        assert (m.offset, m.size) == (bit // 8, size), key
    else:
        assert m.offset * 8 <= bit and bit + bsize <= (m.offset + m.size) * 8, key


@pytest.mark.kernel
@pytest.mark.parametrize("spec", CATALOGUE, ids=lambda s: s.key)
def test_catalogue_matches_bpftool(kbtf: Btf, bpftool: Bpftool, spec: FieldSpec) -> None:
    _compare(kbtf, bpftool, spec.key)


@pytest.mark.kernel
def test_btf_offsets_match_bpftool(kbtf: Btf, bpftool: Bpftool) -> None:
    off = btf_offsets(kbtf)
    assert off.source == "btf"
    assert set(off.fields) | set(off.unresolved) == {s.key for s in CATALOGUE}
    for spec in CATALOGUE:
        bit, bsize, _, size = bpftool.resolve(spec.key)
        if spec.key in off.fields:
            assert off[spec.key].offset == bit // 8 and off[spec.key].size == size == spec.size
        else:  # only when this kernel really differs from the catalogue
            assert bsize or size != spec.size, off.unresolved[spec.key]
    assert btf_offsets().fields == off.fields  # reading /sys/kernel/btf/vmlinux itself


def _random_key(bpftool: Bpftool, rng: random.Random, unique: list[RawType]) -> str | None:
    t = rng.choice(unique)
    path = [t.name]
    for _ in range(8):
        if not t.items:
            return None
        name, a = rng.choice(t.items)
        inner = bpftool.types.get(bpftool.strip(int(a["type_id"])))
        is_comp = inner is not None and inner.kind in ("STRUCT", "UNION")
        if name == "(anon)":
            if not is_comp:
                return None  # unnamed padding bitfield
            t = inner  # type: ignore[assignment]
            continue
        path.append(name)
        if is_comp and inner is not None and rng.random() < 0.3:
            t = inner
            continue
        return ".".join(path)
    return None


@pytest.mark.kernel
def test_random_members_match_bpftool(kbtf: Btf, bpftool: Bpftool) -> None:
    rng = random.Random(20240601)
    unique = [
        t
        for name, ts in bpftool.by_name.items()
        if name != "(anon)"
        for t in ts
        if len([u for u in ts if u.kind in ("STRUCT", "UNION")]) == 1
        and t.kind in ("STRUCT", "UNION")
        and t.items
    ]
    keys: set[str] = set()
    while len(keys) < 400:
        key = _random_key(bpftool, rng, unique)
        if key is not None and key.count(".") >= 1:
            keys.add(key)
    for key in sorted(keys):
        _compare(kbtf, bpftool, key)


@pytest.mark.kernel
def test_len_matches_bpftool(kbtf: Btf, bpftool: Bpftool) -> None:
    assert len(kbtf) == max(bpftool.types)


@pytest.mark.kernel
def test_sha256_of_vmlinux(kbtf: Btf) -> None:
    with open(VMLINUX, "rb") as f:
        assert kbtf.sha256 == hashlib.sha256(f.read()).hexdigest()


@pytest.mark.kernel
def test_skb_drop_reason_matches_bpftool(kbtf: Btf, bpftool: Bpftool) -> None:
    """The enum as bpftool dumps it; before 5.17 (no enum, kfree_skb without a reason
    argument) a lookup error, as bpftool finds none either."""
    if "skb_drop_reason" not in bpftool.by_name:
        with pytest.raises(BtfLookupError, match="enum skb_drop_reason not found"):
            kbtf.enum("skb_drop_reason")
        assert "reason" not in [n for n, _ in kbtf.raw_tracepoint_args("kfree_skb")]
        return
    (raw,) = [t for t in bpftool.by_name["skb_drop_reason"] if t.kind in ("ENUM", "ENUM64")]
    expected: dict[int, str] = {}
    for name, a in raw.items:
        expected.setdefault(int(a["val"]), name)
    assert kbtf.enum("skb_drop_reason") == expected
    assert expected[0] == "SKB_NOT_DROPPED_YET"


@pytest.mark.kernel
@pytest.mark.parametrize(
    "tp",
    [
        "kfree_skb",
        "inet_sock_set_state",
        "sock_send_length",
        "tcp_retransmit_skb",
        "net_dev_xmit",
        "netif_receive_skb",
        "fib_table_lookup",
    ],
)
def test_raw_tracepoint_args_match_bpftool(kbtf: Btf, bpftool: Bpftool, tp: str) -> None:
    if f"btf_trace_{tp}" not in bpftool.by_name:
        # not on this kernel (sock_send_length is Linux 6.3+): we must say so, as bpftool does
        with pytest.raises(BtfLookupError):
            kbtf.raw_tracepoint_args(tp)
        return
    (td,) = [t for t in bpftool.by_name[f"btf_trace_{tp}"] if t.kind == "TYPEDEF"]
    proto = bpftool.types[bpftool.ref(bpftool.types[bpftool.ref(td)])]
    assert proto.kind == "FUNC_PROTO"
    want_types = [bpftool.c_type(int(a["type_id"])) for _, a in proto.items[1:]]
    stubs = [t for t in bpftool.by_name.get(f"__probestub_{tp}", []) if t.kind == "FUNC"]
    got = kbtf.raw_tracepoint_args(tp)
    assert [t for _, t in got] == want_types
    if stubs:  # Linux 6.6+: the per-tracepoint stub carries the TP_PROTO names
        named = bpftool.types[bpftool.ref(stubs[0])]
        assert [n for n, _ in got] == [n for n, _ in named.items[1:]]
    if tp == "kfree_skb":
        assert got[0] == ("skb", "struct sk_buff *")


@pytest.mark.kernel
def test_kernel_lookup_errors(kbtf: Btf) -> None:
    with pytest.raises(BtfLookupError, match=r"^struct no_such_struct_xyz not found in BTF"):
        kbtf.resolve("no_such_struct_xyz.len")
    with pytest.raises(BtfLookupError) as e:
        kbtf.resolve("sk_buff.no_such_member")
    msg = str(e.value)
    assert msg.startswith("struct sk_buff has no member 'no_such_member' (members: ")
    listed = msg.split("(members: ", 1)[1].rstrip(")").split(", ")
    assert {"dev", "len", "sk", "protocol", "head"} <= set(listed)
    with pytest.raises(BtfLookupError, match="no raw tracepoint 'no_such_tp'"):
        kbtf.raw_tracepoint_args("no_such_tp")
