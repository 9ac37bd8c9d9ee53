"""Catalogue offsets read from BTF: the ``offsets.source btf`` source.

Every field of :data:`nettracer.layout.catalogue.CATALOGUE` is resolved with
:meth:`nettracer.kernel.btf.Btf.resolve`; a field BTF does not have, or whose
size differs from the catalogue's (e.g. ``sock.sk_protocol`` was an 8-bit
bitfield before Linux 5.6), goes to ``Offsets.unresolved`` with the reason
instead of being guessed at.
"""

from __future__ import annotations

import time

from nettracer.kernel.btf import Btf, BtfError, BtfLookupError
from nettracer.layout.catalogue import CATALOGUE, FieldSpec
from nettracer.layout.offsets import Field, Offsets


def btf_offsets(btf: Btf | None = None, fields: tuple[FieldSpec, ...] = CATALOGUE) -> Offsets:
    """``Offsets(source="btf")`` for ``fields`` (the whole catalogue by default).

    With ``btf`` None the running kernel's ``/sys/kernel/btf/vmlinux`` is read
    (:class:`nettracer.kernel.btf.NoBtfError` when it has none).  ``elapsed_ms``
    covers reading the file and resolving every field.
    """
    start = time.perf_counter()
    if btf is None:
        btf = Btf.vmlinux()
    out = Offsets(source="btf")
    for spec in fields:
        try:
            m = btf.resolve(spec.key)
        except (BtfLookupError, BtfError) as e:
            out.unresolved[spec.key] = str(e)
            continue
        if m.is_bitfield:
            out.unresolved[spec.key] = (
                f"is a {m.bitfield_size}-bit bitfield ({m.type_name}) in BTF, "
                f"catalogue expects {spec.ctype}"
            )
        elif m.size != spec.size:
            out.unresolved[spec.key] = (
                f"size {m.size} in BTF ({m.type_name}), catalogue expects {spec.size} ({spec.ctype})"
            )
        elif m.points_to is not None and spec.points_to not in (None, m.points_to):
            out.unresolved[spec.key] = (
                f"points to struct {m.points_to} in BTF, catalogue expects struct {spec.points_to}"
            )
        else:
            out.fields[spec.key] = Field(m.offset, m.size)
    out.elapsed_ms = (time.perf_counter() - start) * 1e3
    return out
