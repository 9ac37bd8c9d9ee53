"""Counting in maps from a program: ``counts[key] += 1`` in a hash map and ``lost[0] += 1``.

:func:`count_in_hash` is the one way a program counts per key: look the key up; when
it is missing, create it with ``BPF_NOEXIST`` holding 1; if another CPU created it in
between (``-EEXIST``) look it up again and add; any other failure (the map is full,
``-E2BIG``) bumps ``lost[0]`` with :func:`lost_inc`, so nothing is dropped silently.
``lost`` is the per-CPU ``u64`` array that :func:`lost_counter` creates; user space
sums its CPUs.
"""

from __future__ import annotations

import ctypes
import errno

from nettracer.bpf.helpers import Helper
from nettracer.bpf.insn import (
    FP,
    R0,
    R1,
    R2,
    R3,
    R4,
    Program,
    Reg,
    add64,
    atomic_add,
    call,
    ja,
    jeq,
    jne,
    ld_map_fd,
    ldx,
    mov64,
    st,
    stx,
)
from nettracer.bpf.syscall import BPF_ANY, BPF_NOEXIST

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.bpf.maps import Map


def lost_counter(name: str = "lost") -> Map:
    """The per-CPU ``u64`` counter (index 0) of what did not fit (records, keys)."""
    from nettracer.bpf.maps import percpu_array

    return percpu_array(ctypes.c_uint64, 1, name)


def counted(lost: Map) -> int:
    """What ``lost[0]`` (a :func:`lost_counter`) holds: the sum over CPUs."""
    v = lost.lookup(0, 0)
    return sum(v) if isinstance(v, list) else int(v)


def lookup(p: Program, map_name: str, key_off: int) -> None:
    """``R0 = bpf_map_lookup_elem(&map_name, fp + key_off)``; clobbers R0-R5."""
    p += [ld_map_fd(R1, map_name), mov64(R2, FP), add64(R2, key_off)]
    p += call(Helper.map_lookup_elem)


def lost_inc(p: Program, lost: str, scratch_off: int) -> None:
    """``lost[0] += 1`` (atomically: a per-CPU value may still be shared with a program
    of another type interrupting this one). Uses the ``u32`` at ``fp + scratch_off`` as
    the key; clobbers R0-R5 and falls through. Example::

        lost_inc(p, "lost", -8)
    """
    skip = p.new_label("lost_skip")
    p += st(4, FP, scratch_off, 0)
    lookup(p, lost, scratch_off)
    p += [jeq(R0, 0, skip), mov64(R1, 1), atomic_add(8, R0, 0, R1)]
    p.label(skip)


def _add_one(p: Program, atomic: bool) -> None:
    """``*(u64 *)R0 += 1``."""
    if atomic:
        p += [mov64(R1, 1), atomic_add(8, R0, 0, R1)]
    else:
        p += [ldx(8, R1, R0, 0), add64(R1, 1), stx(8, R0, 0, R1)]


def count_in_hash(
    p: Program,
    counts: str,
    key_off: int,
    *,
    one_off: int,
    lost: str,
    scratch_off: int,
    done: str,
    created: str | None = None,
    atomic: bool = True,
) -> None:
    """``counts[key] += 1`` for the key at ``fp + key_off`` in a hash map of ``u64``.

    ``one_off`` is an 8-byte stack slot the snippet fills with 1 for a new entry;
    ``scratch_off`` a 4-byte slot for the key of ``lost``. Every path ends with a jump:
    to ``created`` (default ``done``) when this call created the entry, else to ``done``.
    ``atomic=False`` adds with a plain load/add/store: right for a per-CPU hash updated
    only by raw tracepoint programs, which do not nest on one CPU (``bpf_trace_run*``
    counts a nested run as a recursion miss). Clobbers R0-R5. Example::

        count_in_hash(p, "counts", -24, one_off=-32, lost="lost", scratch_off=-40,
                      done="out")
    """
    new, full = p.new_label("new"), p.new_label("full")
    lookup(p, counts, key_off)
    p += jeq(R0, 0, new)
    _add_one(p, atomic)
    p += ja(done)
    p.label(new)
    p += st(8, FP, one_off, 1)
    create_entry(p, counts, key_off, FP, one_off, created=created or done, gone=done, full=full)
    _add_one(p, atomic)
    p += ja(done)
    p.label(full)
    lost_inc(p, lost, scratch_off)
    p += ja(done)


def update_elem(
    p: Program, map_name: str, key_off: int, value: Reg, value_off: int = 0, flags: int = BPF_ANY
) -> None:
    """``R0 = bpf_map_update_elem(&map_name, fp + key_off, value + value_off, flags)``
    (``value`` is ``FP`` for a value on the stack, or a register holding a map value's
    address); clobbers R0-R5."""
    p += [ld_map_fd(R1, map_name), mov64(R2, FP), add64(R2, key_off), mov64(R3, value)]
    if value_off:
        p += add64(R3, value_off)
    p += [mov64(R4, flags), call(Helper.map_update_elem)]


def create_entry(
    p: Program,
    map_name: str,
    key_off: int,
    value: Reg,
    value_off: int = 0,
    *,
    created: str,
    gone: str,
    full: str | None = None,
) -> None:
    """Create the entry of the key at ``fp + key_off`` from ``value + value_off``
    (``BPF_NOEXIST``) and jump to ``created``; when another CPU created it between the
    caller's lookup and this update (``-EEXIST``), fall through with R0 = that entry,
    or jump to ``gone`` if it was deleted again meanwhile.  Any other failure (a full
    hash map, ``-E2BIG``) jumps to ``full``, or without it is taken like ``-EEXIST``
    (an LRU map evicts instead of filling up).  Clobbers R0-R5."""
    update_elem(p, map_name, key_off, value, value_off, BPF_NOEXIST)
    p += jeq(R0, 0, created)
    if full is not None:
        p += jne(R0, -errno.EEXIST, full)
    # another CPU created it between our lookup and update
    lookup(p, map_name, key_off)
    p += jeq(R0, 0, gone)
