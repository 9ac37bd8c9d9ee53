"""The argument accessor (:mod:`nettracer.kernel.tracepoints`): a classic tracepoint's
record read at the format file's offsets gives the same arguments as the raw
tracepoint's ``u64`` array, checked by attaching one program of each kind at once and
comparing what both saw for the same object (the ``sk_buff`` a real drop freed, the
``sock`` of a real TCP connection)."""

from __future__ import annotations

import ctypes
import socket
import time

import pytest
from conftest import kernel_skip
from test_tracefs import SAMPLE

from nettracer.kernel.tracefs import parse_format
from nettracer.kernel.tracepoints import TracepointArgs


def test_classic_layout_maps_arguments_to_format_fields() -> None:
    """Same name, else ``<name>addr``, else an alias; arrays and ``__data_loc`` fields
    are not arguments; offsets and sizes are the format file's."""
    fmt = parse_format(SAMPLE, "skb")
    names = ["skb", "saddr", "name", "reason", "state", "flags", "nosuch"]
    args = TracepointArgs.classic_args(fmt, names)
    assert not args.raw and args.category == "skb" and args.name == "sample_event"
    assert args.names == ("skb", "reason", "state", "flags")
    assert [args.field(n) for n in args.names] == [(8, 8), (24, 4), (28, 4), (32, 8)]
    aliased = TracepointArgs.classic_args(fmt, ["why"], {"why": "reason"})
    assert aliased.field("why") == (24, 4)
    assert args.load(1, 6, "reason").op == 0x61  # type: ignore[arg-type]  # ldx u32


def test_raw_layout_is_the_u64_array() -> None:
    args = TracepointArgs.raw_args("kfree_skb", ["skb", "location", "reason"])
    assert args.raw and [args.field(n) for n in args.names] == [(0, 8), (8, 8), (16, 8)]
    ins = args.load(1, 6, "reason")  # type: ignore[arg-type]
    assert (ins.off, ins.src, ins.dst) == (16, 6, 1)
    with pytest.raises(Exception, match="has no argument 'sk'"):
        args.load(1, 6, "sk")  # type: ignore[arg-type]


def _recorder(args: TracepointArgs, key: str, values: tuple[str, str]) -> list:
    """``m[ctx->key] = {ctx->values[0], ctx->values[1]}`` (u64 each)."""
    from nettracer.bpf.helpers import Helper
    from nettracer.bpf.insn import (
        FP,
        R0,
        R1,
        R2,
        R3,
        R4,
        R6,
        add64,
        call,
        exit_,
        ld_map_fd,
        mov64,
        stx,
    )

    insns = [mov64(R6, R1), mov64(R1, 0), stx(8, FP, -16, R1), stx(8, FP, -24, R1)]
    for name, off in ((key, -8), (values[0], -24), (values[1], -16)):
        insns += [args.load(R1, R6, name), stx(8, FP, off, R1)]
    insns += [ld_map_fd(R1, "m"), mov64(R2, FP), add64(R2, -8), mov64(R3, FP), add64(R3, -24)]
    insns += [mov64(R4, 0), call(Helper.map_update_elem), mov64(R0, 0), exit_()]
    return insns


def _seen_by_both(raw: TracepointArgs, key: str, values: tuple[str, str], cause) -> dict:
    """Attach a raw and a classic recorder (and, for a ``tp_btf`` layout, an untyped raw
    one as well), run ``cause()``, return what all saw for the same key, and check
    they saw the same values."""
    from nettracer.bpf import maps, prog

    classic = raw.for_kernel(_without_raw())
    assert not classic.raw
    layouts = (raw, raw.untyped(), classic) if raw.typed else (raw, classic)
    pair = ctypes.c_uint64 * 2
    objs: list = []
    try:
        got = []
        for args in layouts:
            m = maps.hash_map(ctypes.c_uint64, pair, 4096, "m")
            objs.append(m)
            p = prog.load(
                _recorder(args, key, values), prog_type=args.prog_type, maps={"m": m},
                name="t", **args.load_target(),
            )  # fmt: skip
            objs.append(p)
            objs.append(args.attach(p))
            got.append(m)
        cause()
        deadline = time.monotonic() + 5
        while True:
            seen = [{k: tuple(v) for k, v in m.items()} for m in got]
            both = set.intersection(*(set(x) for x in seen))
            if both or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for o in reversed(objs):
            o.close()
    assert both, f"no {key} seen by all programs (each saw {[len(x) for x in seen]})"
    for other in seen[1:]:
        assert {k: other[k] for k in both} == {k: seen[0][k] for k in both}
    return {k: seen[0][k] for k in both}


def _without_raw():
    from nettracer.kernel.features import KernelFeatures

    return KernelFeatures(["raw_tracepoint"])


@pytest.mark.kernel
def test_kfree_skb_classic_equals_raw() -> None:
    """A UDP datagram to a closed port is dropped (NO_SOCKET): the three layouts (tp_btf,
    raw, classic) give the same skb, location and reason for it."""
    from nettracer.kernel import features
    from nettracer.kernel.btf import Btf
    from nettracer.tracers.drops.monitor import kfree_skb_args

    if not features.has_btf():
        kernel_skip("needs BTF for the raw argument names")
    raw = kfree_skb_args(Btf.vmlinux())
    assert raw.typed  # BTF has btf_trace_kfree_skb: a tp_btf layout

    def cause() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(5):
                s.sendto(b"x", ("127.0.0.1", 9))

    values = ("location", "reason") if raw.has("reason") else ("location", "location")  # 5.17
    seen = _seen_by_both(raw, "skb", values, cause)
    assert any(loc != 0 for loc, _ in seen.values())


@pytest.mark.kernel
def test_inet_sock_set_state_classic_equals_raw() -> None:
    """A TCP connection on loopback: for its sockets both layouts give the same
    ``sk``, ``oldstate`` and ``newstate`` (``int``s zero-extended in both)."""
    raw = TracepointArgs.raw_args("inet_sock_set_state", ["sk", "oldstate", "newstate"], "sock")

    def cause() -> None:
        with socket.create_server(("127.0.0.1", 0)) as srv:
            c = socket.create_connection(srv.getsockname())
            a, _ = srv.accept()
            c.close()
            a.close()

    seen = _seen_by_both(raw, "sk", ("oldstate", "newstate"), cause)
    states = set(seen.values())
    assert all(0 < old <= 12 and 0 < new <= 12 for old, new in states), states
