"""The one place a generated program reads kernel memory: :func:`read` emits the helper
call, and :class:`KernelReads` says which helper.

``bpf_probe_read_kernel`` / ``bpf_probe_read_kernel_str`` (helpers 113 and 115) exist
since Linux 5.5; older kernels have only ``bpf_probe_read`` / ``bpf_probe_read_str``
(4 and 45), which read kernel or user memory alike on the architectures we run on.
The choice is made once per program build (``Program(reads=KernelReads(legacy=True))``)
and every read of that program follows it.  Struct-level planning (which fields in
one read, NULL checks) lives above, in :mod:`nettracer.access.plan`.

A program on a BTF-typed raw tracepoint (``tp_btf``, Linux 5.5) may read the structs
its arguments point to, and the struct pointers it loads from them, with plain loads:
the verifier checks each load against BTF and the JIT turns it into one instruction
with an exception-table entry (``BPF_PROBE_MEM``: a fault gives 0).  That is
``KernelReads(direct=True)``: the planner then emits :func:`load` instead of
:func:`read` for struct fields; strings, and memory reached by pointer arithmetic
(scalars to the verifier), are still read with the helper.
"""

from __future__ import annotations

from nettracer.bpf.helpers import Helper
from nettracer.bpf.insn import R0, R1, R2, R3, Program, Reg, add64, call, ldx, mov64, stx
from nettracer.value import Value


class KernelReads(Value):
    """Which helpers read kernel memory: the 5.5 ``bpf_probe_read_kernel`` family, or
    with ``legacy`` the older ``bpf_probe_read`` family; with ``direct``, struct fields
    reached from a ``tp_btf`` program's arguments are loaded without a helper."""

    __slots__ = ("legacy", "direct")  # noqa: RUF023 - field order

    def __init__(self, legacy: bool = False, direct: bool = False) -> None:
        self.legacy = legacy
        self.direct = direct

    def helper(self, string: bool = False) -> int:
        """The helper for a plain read, or for a NUL-terminated string with ``string``."""
        if self.legacy:
            return Helper.probe_read_str if string else Helper.probe_read
        return Helper.probe_read_kernel_str if string else Helper.probe_read_kernel


#: the default: ``bpf_probe_read_kernel`` (Linux 5.5)
MODERN = KernelReads()


def read(
    p: Program,
    dst: Reg,
    dst_off: int,
    size: int,
    src: Reg,
    src_off: int = 0,
    *,
    string: bool = False,
) -> None:
    """Append ``R0 = bpf_probe_read_kernel(dst + dst_off, size, src + src_off)``.

    ``dst`` is usually ``FP`` (a stack buffer) or a register holding a map value or
    ring-buffer record; ``src`` holds a kernel address.  R0 is 0 or ``-EFAULT``; on
    failure the kernel zeroes the ``size`` bytes at the destination.  With ``string``
    the ``_str`` variant copies up to and including the first NUL (R0 = bytes copied)
    and leaves the rest of the destination as it was.  Clobbers R0-R5; ``src`` may be
    R3 and ``dst`` R1 (no copy is emitted then).  Example, ``u32`` at ``ptr + 8`` into
    ``fp-16``::

        read(p, FP, -16, 4, R7, 8)
    """
    if src in (R1, R2):
        raise ValueError(f"read: the source r{int(src)} is overwritten before the call")
    if dst != R1:
        p += mov64(R1, dst)
    if dst_off:
        p += add64(R1, dst_off)
    p += mov64(R2, size)
    if src != R3:
        p += mov64(R3, src)
    if src_off:
        p += add64(R3, src_off)
    reads = p.reads if p.reads is not None else MODERN
    p += call(reads.helper(string))


def load(p: Program, dst: Reg, dst_off: int, size: int, src: Reg, src_off: int = 0) -> None:
    """Append plain loads of ``size`` bytes at ``src + src_off`` into ``dst + dst_off``,
    8, 4, 2 or 1 bytes at a time: a ``tp_btf`` program's read of a field of the struct
    that ``src`` (a BTF-typed pointer to the verifier) points to; a struct pointer
    keeps its BTF type through the stack.  A fault gives zeroes, as a failed helper
    read does.  Clobbers R0."""
    pos = 0
    while pos < size:
        w = next(w for w in (8, 4, 2, 1) if size - pos >= w)
        p += [ldx(w, R0, src, src_off + pos), stx(w, dst, dst_off + pos, R0)]
        pos += w


def copy(p: Program, dst: Reg, dst_off: int, src: Reg, src_off: int, size: int) -> None:
    """Append a copy of ``size`` bytes from ``src + src_off`` to ``dst + dst_off`` (both
    readable by the program: stack, map value, record) with the widest loads both
    offsets' alignment allows; clobbers R1."""
    pos = 0
    while pos < size:
        for w in (8, 4, 2, 1):
            if size - pos >= w and (dst_off + pos) % w == 0 and (src_off + pos) % w == 0:
                break
        p += [ldx(w, R1, src, src_off + pos), stx(w, dst, dst_off + pos, R1)]
        pos += w
