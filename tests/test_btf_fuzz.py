"""Corrupt BTF never escapes as anything but BtfError / BtfLookupError.

Blobs are the hand-built mini kernel (both byte orders) with bytes or 32-bit
words overwritten, sections truncated, and arbitrary bytes; every public question
is asked of whatever parses.
"""

from __future__ import annotations

import contextlib
import struct

from btfsynth import EXPECTED, mini_kernel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nettracer.kernel.btf import Btf, BtfError, BtfLookupError, Kind
from nettracer.layout.btf_offsets import btf_offsets

ALLOWED = (BtfError, BtfLookupError)
BLOBS = {order: mini_kernel().blob(order=order) for order in ("little", "big")}
KEYS = [k for k, *_ in EXPECTED] + ["sk_buff.nope", "nope.x", "sk_buff.dev.name", "net.ns"]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _ask(call: object, *args: object) -> None:
    with contextlib.suppress(*ALLOWED):
        call(*args)  # type: ignore[operator]


def exercise(data: bytes) -> None:
    """Parse ``data`` and ask everything; only BtfError/BtfLookupError may come out."""
    try:
        btf = Btf(data, source="fuzz")
    except ALLOWED:
        return
    _ask(len, btf)
    for key in KEYS:
        _ask(btf.resolve, key)
    for name in ("skb_drop_reason", "signed_e", "big_e", "sbig_e", "nope"):
        _ask(btf.enum, name)
    for tp in ("kfree_skb", "lonely", "nope"):
        _ask(btf.raw_tracepoint_args, tp)
    for name in ("sk_buff", "int", "counter"):
        _ask(btf.find, name)
        _ask(btf.find, name, Kind.STRUCT)
    _ask(btf.pointer_size)
    for tid in range(0, 90):
        for question in (
            btf.type,
            btf.type_name,
            btf.sizeof,
            btf.strip,
            btf.members,
            btf.params,
            btf.enumerators,
            btf.array,
            btf.int_encoding,
        ):
            _ask(question, tid)
    offsets = btf_offsets(btf)  # catches per field, must not raise at all
    assert set(offsets.fields).isdisjoint(offsets.unresolved)
    assert len(btf.sha256) == 64


def test_mini_blob_is_fine() -> None:
    for blob in BLOBS.values():
        exercise(blob)
        assert len(Btf(blob)) == len(mini_kernel().builder.records)


@FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_bytes(data: bytes) -> None:
    exercise(data)


@FUZZ
@given(st.binary(max_size=600), st.sampled_from(sorted(BLOBS)))
def test_valid_header_arbitrary_body(body: bytes, order: str) -> None:
    """A plausible header over random sections, so the type walk itself is fuzzed."""
    e = "<" if order == "little" else ">"
    split = len(body) // 2 & ~3
    types, strs = body[:split], b"\0" + body[split:] + b"\0"
    hdr = struct.pack(f"{e}HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strs))
    exercise(hdr + types + strs)


@FUZZ
@given(
    st.sampled_from(sorted(BLOBS)),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_byte_mutations(order: str, edits: list[tuple[int, int]]) -> None:
    blob = bytearray(BLOBS[order])
    for pos, value in edits:
        blob[pos % len(blob)] = value
    exercise(bytes(blob))


@FUZZ
@given(
    st.sampled_from(sorted(BLOBS)),
    st.lists(
        st.tuples(
            st.integers(0, 1 << 16),
            st.one_of(
                st.integers(0, 120),  # type ids, string offsets, sizes
                st.integers(0, 31).map(lambda k: k << 24),  # info: a kind, vlen 0
                st.integers(0, 0xFFFF).map(lambda v: Kind.STRUCT << 24 | 1 << 31 | v),
                st.integers(0, 0xFFFFFFFF),
            ),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_word_mutations(order: str, edits: list[tuple[int, int]]) -> None:
    """Overwrite whole 32-bit words of the type section: ids, kinds and vlens go wrong
    in ways that still look like BTF."""
    blob = bytearray(BLOBS[order])
    e = "<" if order == "little" else ">"
    type_len = struct.unpack_from(f"{e}I", blob, 12)[0]
    for pos, value in edits:
        struct.pack_into(f"{e}I", blob, 24 + 4 * (pos % (type_len // 4)), value)
    exercise(bytes(blob))


@FUZZ
@given(st.sampled_from(sorted(BLOBS)), st.integers(0, 4000), st.binary(max_size=16))
def test_truncated_and_extended(order: str, cut: int, tail: bytes) -> None:
    blob = BLOBS[order]
    exercise(blob[: cut % (len(blob) + 1)])
    exercise(blob + tail)
