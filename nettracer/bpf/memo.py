"""A per-CPU one-entry memo: remember what a program computed for the last tag it saw
on this CPU (in this jiffy), and skip the work when the next run has the same tag.

The entry (one ``BPF_MAP_TYPE_PERCPU_ARRAY`` element, :func:`memo_map`) is ``u64 tag;
u64 stamp;`` then the payload.  ``stamp`` is ``bpf_jiffies64()`` (helper 118, Linux
5.6; the verifier inlines it into a load of ``jiffies`` on 64-bit JITs), so an entry
is only used within the clock tick that wrote it: what the payload was read from may
change (a ``struct net_device`` moved to another namespace, a freed object whose
address is reused), and a tick bounds how long a stale payload can be used.  Since
6.10 the verifier inlines the per-CPU array lookup too, so a hit costs no helper call.

Example: a device's ifindex (``u32`` at ``fp-12``) memoised by its ``struct
net_device *`` in R8::

    memo_find(p, "devmemo", R8, stamp_off=-32, key_off=-40, out_off=-12, size=4,
              miss="devmiss")
    p += ja("have")
    p.label("devmiss")
    ...  # read it into fp-12
    memo_store(p, "devmemo", R8, stamp_off=-32, key_off=-40, src_off=-12, size=4)
"""

from __future__ import annotations

import ctypes

from nettracer.bpf.counters import lookup
from nettracer.bpf.helpers import Helper
from nettracer.bpf.insn import FP, R0, R1, R2, Program, Reg, call, jeq, jne, ldx, st, stx
from nettracer.bpf.memory import copy

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.bpf.maps import Map

#: where the payload starts in an entry (after ``tag`` and ``stamp``)
MEMO_PAYLOAD = 16


def memo_map(payload_bytes: int, name: str) -> Map:
    """The per-CPU array of one entry for a memo of ``payload_bytes``."""
    from nettracer.bpf.maps import percpu_array

    return percpu_array(ctypes.c_uint8 * (MEMO_PAYLOAD + payload_bytes), 1, name)


def memo_find(
    p: Program,
    name: str,
    tag: Reg,
    *,
    stamp_off: int,
    key_off: int,
    out_off: int,
    size: int,
    miss: str,
) -> None:
    """Jump to ``miss`` unless this CPU's entry of memo ``name`` holds ``tag`` (R6-R9)
    and this jiffy; on a hit copy its ``size`` payload bytes to ``fp + out_off`` and
    fall through.  Stores the jiffy at ``fp + stamp_off`` (8 bytes, for
    :func:`memo_store`) and uses the ``u32`` at ``fp + key_off`` as the array key.
    Clobbers R0-R5."""
    p += [call(Helper.jiffies64), stx(8, FP, stamp_off, R0), st(4, FP, key_off, 0)]
    lookup(p, name, key_off)
    p += [
        jeq(R0, 0, miss),
        ldx(8, R1, R0, 0),
        jne(R1, tag, miss),
        ldx(8, R1, R0, 8),
        ldx(8, R2, FP, stamp_off),
        jne(R1, R2, miss),
    ]
    copy(p, FP, out_off, R0, MEMO_PAYLOAD, size)


def memo_store(
    p: Program, name: str, tag: Reg, *, stamp_off: int, key_off: int, src_off: int, size: int
) -> None:
    """Write ``tag`` (R6-R9), the jiffy :func:`memo_find` stored at ``fp + stamp_off``
    and the ``size`` payload bytes at ``fp + src_off`` into this CPU's entry of memo
    ``name``.  Clobbers R0-R5."""
    skip = p.new_label("memo_skip")
    p += st(4, FP, key_off, 0)
    lookup(p, name, key_off)
    p += [jeq(R0, 0, skip), stx(8, R0, 0, tag), ldx(8, R1, FP, stamp_off), stx(8, R0, 8, R1)]
    copy(p, R0, MEMO_PAYLOAD, FP, src_off, size)
    p.label(skip)
