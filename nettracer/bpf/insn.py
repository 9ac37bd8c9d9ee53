"""eBPF instructions and an assembler with named labels, without a compiler.

An :class:`Insn` is one value (``op, dst, src, off, imm``) as in
``struct bpf_insn`` (include/uapi/linux/bpf.h); the 64-bit immediate load
(``BPF_LD | BPF_IMM | BPF_DW``) is one :class:`Insn` that occupies two slots.
Jumps may name a label instead of an offset; :func:`assemble` resolves labels
and map references and returns the bytes the kernel loads. :func:`listing`
numbers instructions by slot, so its indices match the verifier log's.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from enum import IntEnum

from nettracer.bpf.helpers import Helper, helper_name
from nettracer.value import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from nettracer.bpf.memory import KernelReads

# instruction classes
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
# sizes
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
SIZE_BYTES = {W: 4, H: 2, B: 1, DW: 8}
BYTES_SIZE = {v: k for k, v in SIZE_BYTES.items()}
# modes
IMM, ABS, IND, MEM, MEMSX, ATOMIC = 0x00, 0x20, 0x40, 0x60, 0x80, 0xC0
# source
K, X = 0x00, 0x08
#: ``imm`` bit of a ``BPF_ATOMIC`` instruction: also load the old value into ``src``
#: (Linux 5.12; 5.10 knows only ``BPF_ADD`` without it)
BPF_FETCH = 0x01


class AluOp(IntEnum):
    ADD = 0x00
    SUB = 0x10
    MUL = 0x20
    DIV = 0x30
    OR = 0x40
    AND = 0x50
    LSH = 0x60
    RSH = 0x70
    NEG = 0x80
    MOD = 0x90
    XOR = 0xA0
    MOV = 0xB0
    ARSH = 0xC0
    END = 0xD0


class JmpOp(IntEnum):
    JA = 0x00
    JEQ = 0x10
    JGT = 0x20
    JGE = 0x30
    JSET = 0x40
    JNE = 0x50
    JSGT = 0x60
    JSGE = 0x70
    CALL = 0x80
    EXIT = 0x90
    JLT = 0xA0
    JLE = 0xB0
    JSLT = 0xC0
    JSLE = 0xD0


class Reg(IntEnum):
    """R0 return value, R1-R5 arguments, R6-R9 callee-saved, R10 read-only frame pointer."""

    R0 = 0
    R1 = 1
    R2 = 2
    R3 = 3
    R4 = 4
    R5 = 5
    R6 = 6
    R7 = 7
    R8 = 8
    R9 = 9
    R10 = 10


R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = Reg
FP = Reg.R10

#: ``src`` of a 64-bit immediate load whose imm is a map fd (BPF_PSEUDO_MAP_FD)
PSEUDO_MAP_FD = 1
#: ``src`` of a 64-bit immediate load: map fd + offset into its value (BPF_PSEUDO_MAP_VALUE)
PSEUDO_MAP_VALUE = 2
LD_IMM64 = LD | IMM | DW


class AsmError(ValueError):
    """An instruction stream that cannot be assembled (bad label, out-of-range value)."""


class Insn(Value):
    """One ``struct bpf_insn``; a 64-bit immediate load spans two slots.

    ``target`` names the label a jump goes to (resolved by :func:`assemble`);
    ``map`` names the map whose fd a ``ld_map_fd`` loads; ``label`` marks this
    instruction as a jump target. Treat it as immutable: :meth:`replace` copies.
    """

    __slots__ = ("op", "dst", "src", "off", "imm", "target", "map", "label")  # noqa: RUF023

    def __init__(
        self,
        op: int,
        dst: int = 0,
        src: int = 0,
        off: int = 0,
        imm: int = 0,
        target: str | None = None,
        map: str | None = None,
        label: str | None = None,
    ) -> None:
        self.op = op
        self.dst = dst
        self.src = src
        self.off = off
        self.imm = imm
        self.target = target
        self.map = map
        self.label = label

    @property
    def slots(self) -> int:
        return 2 if self.op == LD_IMM64 else 1

    @property
    def cls(self) -> int:
        return self.op & 0x07

    def encode(self) -> bytes:
        """The kernel's bytes for this instruction (8, or 16 for a 64-bit immediate)."""
        if not -(1 << 15) <= self.off < (1 << 15):
            raise AsmError(f"offset {self.off} out of range in {self}")
        regs = (self.src << 4) | (self.dst & 0x0F)
        if self.op == LD_IMM64:
            imm = self.imm & 0xFFFFFFFFFFFFFFFF
            lo, hi = imm & 0xFFFFFFFF, imm >> 32
            return struct.pack("<BBhI", self.op, regs, self.off, lo) + struct.pack(
                "<BBhI", 0, 0, 0, hi
            )
        if not -(1 << 31) <= self.imm < (1 << 32):
            raise AsmError(f"immediate {self.imm} out of range in {self}")
        return struct.pack("<BBhI", self.op, regs, self.off, self.imm & 0xFFFFFFFF)

    def at(self, label: str) -> Insn:
        """This instruction, marked as the target of jumps to ``label``."""
        return self.replace(label=label)


def _alu(cls: int, op: AluOp, dst: Reg, src: Reg | int) -> Insn:
    if isinstance(src, Reg):
        return Insn(cls | op | X, dst, src)
    return Insn(cls | op | K, dst, 0, 0, src)


def alu64(op: AluOp, dst: Reg, src: Reg | int) -> Insn:
    """64-bit ``dst op= src`` (register or 32-bit signed immediate)."""
    return _alu(ALU64, op, dst, src)


def alu32(op: AluOp, dst: Reg, src: Reg | int) -> Insn:
    """32-bit ``dst op= src``; the upper half of ``dst`` is zeroed."""
    return _alu(ALU, op, dst, src)


def mov64(dst: Reg, src: Reg | int) -> Insn:
    return alu64(AluOp.MOV, dst, src)


def mov32(dst: Reg, src: Reg | int) -> Insn:
    return alu32(AluOp.MOV, dst, src)


def add64(dst: Reg, src: Reg | int) -> Insn:
    return alu64(AluOp.ADD, dst, src)


def sub64(dst: Reg, src: Reg | int) -> Insn:
    return alu64(AluOp.SUB, dst, src)


def and64(dst: Reg, src: Reg | int) -> Insn:
    return alu64(AluOp.AND, dst, src)


def or64(dst: Reg, src: Reg | int) -> Insn:
    return alu64(AluOp.OR, dst, src)


def lsh64(dst: Reg, src: Reg | int) -> Insn:
    return alu64(AluOp.LSH, dst, src)


def rsh64(dst: Reg, src: Reg | int) -> Insn:
    return alu64(AluOp.RSH, dst, src)


def neg64(dst: Reg) -> Insn:
    return Insn(ALU64 | AluOp.NEG | K, dst)


def endian(dst: Reg, bits: int, big: bool = True) -> Insn:
    """Byte-swap the low ``bits`` (16, 32, 64) of ``dst`` to big (``to_be``) or little endian."""
    if bits not in (16, 32, 64):
        raise AsmError(f"endian width must be 16, 32 or 64, not {bits}")
    return Insn(ALU | AluOp.END | (X if big else K), dst, 0, 0, bits)


def ldx(size: int, dst: Reg, src: Reg, off: int) -> Insn:
    """``dst = *(size *)(src + off)``; ``size`` is 1, 2, 4 or 8 bytes."""
    return Insn(LDX | MEM | _size(size), dst, src, off)


def stx(size: int, dst: Reg, off: int, src: Reg) -> Insn:
    """``*(size *)(dst + off) = src``."""
    return Insn(STX | MEM | _size(size), dst, src, off)


def st(size: int, dst: Reg, off: int, imm: int) -> Insn:
    """``*(size *)(dst + off) = imm``."""
    return Insn(ST | MEM | _size(size), dst, 0, off, imm)


def atomic_add(size: int, dst: Reg, off: int, src: Reg) -> Insn:
    """``lock *(size *)(dst + off) += src`` (BPF_ATOMIC | BPF_ADD); size 4 or 8."""
    if size not in (4, 8):
        raise AsmError(f"atomic add needs a 4- or 8-byte operand, not {size}")
    return Insn(STX | ATOMIC | _size(size), dst, src, off, AluOp.ADD)


def atomic_fetch_add(size: int, dst: Reg, off: int, src: Reg) -> Insn:
    """``src = atomic_fetch_add((size *)(dst + off), src)``: add and load the old value
    (BPF_ATOMIC | BPF_ADD | BPF_FETCH, Linux 5.12); size 4 or 8.

    >>> atomic_fetch_add(8, R0, 0, R1).encode().hex()
    'db10000001000000'
    """
    if size not in (4, 8):
        raise AsmError(f"atomic fetch-add needs a 4- or 8-byte operand, not {size}")
    return Insn(STX | ATOMIC | _size(size), dst, src, off, AluOp.ADD | BPF_FETCH)


def ld_imm64(dst: Reg, value: int) -> Insn:
    """``dst = value`` for any 64-bit value (two slots)."""
    return Insn(LD_IMM64, dst, 0, 0, value)


def ld_map_fd(dst: Reg, map_name: str) -> Insn:
    """``dst = &map`` (BPF_PSEUDO_MAP_FD); the fd is filled in by :func:`assemble`."""
    return Insn(LD_IMM64, dst, PSEUDO_MAP_FD, 0, 0, map=map_name)


def _jmp(cls: int, op: JmpOp, dst: Reg, src: Reg | int, target: str | int) -> Insn:
    code = cls | op | (X if isinstance(src, Reg) else K)
    if cls == JMP and not isinstance(src, Reg) and src >= 1 << 31:
        # a 64-bit compare sign-extends its 32-bit immediate: 0x80000000 would compare
        # as 0xffffffff80000000 and never equal a u32 read from memory
        raise AsmError(
            f"immediate {src:#x} would be sign-extended by a 64-bit jump: use jmp32 for "
            f"a u32 compare, or load the value into a register with ld_imm64"
        )
    s, imm = (int(src), 0) if isinstance(src, Reg) else (0, src)
    if isinstance(target, str):
        return Insn(code, dst, s, 0, imm, target=target)
    return Insn(code, dst, s, target, imm)


def jmp(op: JmpOp, dst: Reg, src: Reg | int, target: str | int) -> Insn:
    """64-bit conditional jump to a label (or a relative offset in slots)."""
    return _jmp(JMP, op, dst, src, target)


def jmp32(op: JmpOp, dst: Reg, src: Reg | int, target: str | int) -> Insn:
    """32-bit conditional jump (compares the low halves)."""
    return _jmp(JMP32, op, dst, src, target)


def jeq(dst: Reg, src: Reg | int, target: str | int) -> Insn:
    return jmp(JmpOp.JEQ, dst, src, target)


def jne(dst: Reg, src: Reg | int, target: str | int) -> Insn:
    return jmp(JmpOp.JNE, dst, src, target)


def jgt(dst: Reg, src: Reg | int, target: str | int) -> Insn:
    return jmp(JmpOp.JGT, dst, src, target)


def jge(dst: Reg, src: Reg | int, target: str | int) -> Insn:
    return jmp(JmpOp.JGE, dst, src, target)


def jlt(dst: Reg, src: Reg | int, target: str | int) -> Insn:
    return jmp(JmpOp.JLT, dst, src, target)


def ja(target: str | int) -> Insn:
    """Unconditional jump."""
    if isinstance(target, str):
        return Insn(JMP | JmpOp.JA, target=target)
    return Insn(JMP | JmpOp.JA, off=target)


def call(helper: Helper | int) -> Insn:
    """Call a BPF helper by id (``Helper.map_lookup_elem``)."""
    return Insn(JMP | JmpOp.CALL, 0, 0, 0, int(helper))


def exit_() -> Insn:
    return Insn(JMP | JmpOp.EXIT)


def _size(nbytes: int) -> int:
    try:
        return BYTES_SIZE[nbytes]
    except KeyError:
        raise AsmError(f"memory access size must be 1, 2, 4 or 8 bytes, not {nbytes}") from None


def _flatten(insns: Iterable[Insn | Iterable[Insn]]) -> list[Insn]:
    out: list[Insn] = []
    for item in insns:
        if isinstance(item, Insn):
            out.append(item)
        else:
            out.extend(_flatten(item))
    return out


class Program:
    """A growing list of instructions with labels; ``+=`` accepts an Insn or a list of them.

    ``p.label("out")`` marks the next instruction added as the target ``out``.
    Snippets that need private jump targets take ``p`` and ask :meth:`new_label`, so
    the same snippet can be emitted any number of times in one program::

        skip = p.new_label("skip")      # "skip_0", then "skip_1", ...
        p += jeq(R0, 0, skip)
        ...
        p.label(skip)

    ``reads`` is how this program reads kernel memory
    (:class:`nettracer.bpf.memory.KernelReads`, decided once per build; None means
    ``bpf_probe_read_kernel``): :func:`nettracer.bpf.memory.read` follows it.
    """

    def __init__(self, insns: Iterable[Insn] = (), reads: KernelReads | None = None) -> None:
        self.insns: list[Insn] = list(insns)
        self._pending: list[str] = []
        self._serial = 0
        self.reads = reads

    def new_label(self, stem: str) -> str:
        """A label name no other :meth:`new_label` call of this program returns:
        ``{stem}_{n}`` with a per-program serial ``n`` (hand-written labels must not end
        in ``_<digits>``; a clash is still caught by :func:`resolve`)."""
        name = f"{stem}_{self._serial}"
        self._serial += 1
        return name

    def __iadd__(self, other: Insn | Iterable[Insn]) -> Program:
        for insn in _flatten([other]):
            for name in self._pending:
                if insn.label is not None:
                    self.insns.append(ja(0).at(name))  # two labels on one insn: a no-op hop
                else:
                    insn = insn.at(name)
            self._pending.clear()
            self.insns.append(insn)
        return self

    def label(self, name: str) -> None:
        self._pending.append(name)

    def __len__(self) -> int:
        return sum(i.slots for i in self.insns)

    def assemble(self, maps: Mapping[str, int] | None = None) -> bytes:
        if self._pending:
            raise AsmError(f"label {self._pending[0]!r} is not followed by an instruction")
        return assemble(self.insns, maps)

    def listing(self) -> str:
        return listing(self.insns)


def resolve(
    insns: Iterable[Insn | Iterable[Insn]], maps: Mapping[str, int] | None = None
) -> list[Insn]:
    """Instructions with jump targets turned into slot offsets and map names into fds."""
    flat = _flatten(insns)
    where: dict[str, int] = {}
    slot = 0
    for insn in flat:
        if insn.label is not None:
            if insn.label in where:
                raise AsmError(f"label {insn.label!r} defined twice")
            where[insn.label] = slot
        slot += insn.slots
    out: list[Insn] = []
    slot = 0
    for insn in flat:
        if insn.target is not None:
            if insn.target not in where:
                raise AsmError(f"jump to undefined label {insn.target!r}")
            insn = insn.replace(off=where[insn.target] - slot - 1, target=None)
        if insn.map is not None:
            if maps is None or insn.map not in maps:
                raise AsmError(f"reference to unknown map {insn.map!r}")
            insn = insn.replace(imm=maps[insn.map])
        out.append(insn)
        slot += insn.slots
    return out


def assemble(
    insns: Iterable[Insn | Iterable[Insn]], maps: Mapping[str, int] | None = None
) -> bytes:
    """Bytes to load: labels resolved to offsets, map names to fds."""
    return b"".join(i.encode() for i in resolve(insns, maps))


_JMP_SYMBOLS = {
    JmpOp.JEQ: "==", JmpOp.JGT: ">", JmpOp.JGE: ">=", JmpOp.JSET: "&", JmpOp.JNE: "!=",
    JmpOp.JSGT: "s>", JmpOp.JSGE: "s>=", JmpOp.JLT: "<", JmpOp.JLE: "<=", JmpOp.JSLT: "s<",
    JmpOp.JSLE: "s<=",
}  # fmt: skip
_SIZE_C = {W: "u32", H: "u16", B: "u8", DW: "u64"}


def format_insn(insn: Insn) -> str:
    """One instruction in the verifier's own notation (``r1 = *(u64 *)(r1 +8)``)."""
    cls, op = insn.cls, insn.op
    d, s = f"r{insn.dst}", f"r{insn.src}"
    if op == LD_IMM64:
        if insn.src == PSEUDO_MAP_FD:
            return f"{d} = map[{insn.map or f'fd:{insn.imm}'}]"
        return f"{d} = {insn.imm:#x} ll"
    if cls in (ALU, ALU64):
        w = "w" if cls == ALU else "r"
        d = f"{w}{insn.dst}"
        src = f"{w}{insn.src}" if op & X else str(insn.imm)
        code = op & 0xF0
        if code == AluOp.END:
            return f"{d} = {'be' if op & X else 'le'}{insn.imm} {d}"
        if code == AluOp.NEG:
            return f"{d} = -{d}"
        if code == AluOp.MOV:
            return f"{d} = {src}"
        sym = {
            AluOp.ADD: "+=", AluOp.SUB: "-=", AluOp.MUL: "*=", AluOp.DIV: "/=",
            AluOp.OR: "|=", AluOp.AND: "&=", AluOp.LSH: "<<=", AluOp.RSH: ">>=",
            AluOp.MOD: "%=", AluOp.XOR: "^=", AluOp.ARSH: "s>>=",
        }[AluOp(code)]  # fmt: skip
        return f"{d} {sym} {src}"
    if cls in (JMP, JMP32):
        code = op & 0xF0
        if code == JmpOp.CALL:
            name = helper_name(insn.imm)
            return f"call {name}#{insn.imm}" if name else f"call #{insn.imm}"
        if code == JmpOp.EXIT:
            return "exit"
        tgt = insn.target if insn.target is not None else f"{insn.off:+d}"
        if code == JmpOp.JA:
            return f"goto {tgt}"
        w = "w" if cls == JMP32 else "r"
        src = f"{w}{insn.src}" if op & X else str(insn.imm)
        return f"if {w}{insn.dst} {_JMP_SYMBOLS[JmpOp(code)]} {src} goto {tgt}"
    size = _SIZE_C[op & 0x18]
    if cls == LDX:
        return f"{d} = *({size} *)({s} {insn.off:+d})"
    if cls == STX and (op & 0xE0) == ATOMIC:
        if insn.imm == AluOp.ADD | BPF_FETCH:
            s, bits = (s, "64") if op & 0x18 == DW else (f"w{insn.src}", "")
            return f"{s} = atomic{bits}_fetch_add(({size} *)({d} {insn.off:+d}), {s})"
        return f"lock *({size} *)({d} {insn.off:+d}) += {s}"
    if cls == STX:
        return f"*({size} *)({d} {insn.off:+d}) = {s}"
    if cls == ST:
        return f"*({size} *)({d} {insn.off:+d}) = {insn.imm}"
    return f"op={op:#04x} dst={insn.dst} src={insn.src} off={insn.off} imm={insn.imm}"


def listing(insns: Iterable[Insn | Iterable[Insn]]) -> str:
    """Numbered listing; indices count slots, as the verifier log does."""
    lines = []
    slot = 0
    for insn in _flatten(insns):
        if insn.label is not None:
            lines.append(f"{insn.label}:")
        lines.append(f"{slot:4d}: {format_insn(insn)}")
        slot += insn.slots
    return "\n".join(lines)
