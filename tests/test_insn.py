"""Golden bytes for every instruction builder (no root needed).

The expected bytes are the encodings LLVM's BPF backend emits for the same
instructions (``llvm-objdump -d`` of clang-built objects), written out by hand.
"""

from __future__ import annotations

import pytest

from nettracer.bpf.helpers import Helper
from nettracer.bpf.insn import (
    FP,
    R0,
    R1,
    R2,
    R6,
    AluOp,
    AsmError,
    Insn,
    JmpOp,
    Program,
    add64,
    alu32,
    alu64,
    and64,
    assemble,
    atomic_add,
    call,
    endian,
    exit_,
    ja,
    jeq,
    jge,
    jgt,
    jlt,
    jmp,
    jmp32,
    jne,
    ld_imm64,
    ld_map_fd,
    ldx,
    listing,
    lsh64,
    mov32,
    mov64,
    neg64,
    or64,
    rsh64,
    st,
    stx,
    sub64,
)

GOLDEN: list[tuple[Insn, str]] = [
    (mov64(R0, 0), "b700000000000000"),
    (mov64(R6, R1), "bf16000000000000"),
    (mov32(R1, 7), "b401000007000000"),
    (mov32(R1, R2), "bc21000000000000"),
    (add64(R2, -4), "07020000fcffffff"),
    (add64(R1, R2), "0f21000000000000"),
    (sub64(R1, 3), "1701000003000000"),
    (and64(R1, 0xFF), "57010000ff000000"),
    (or64(R1, R2), "4f21000000000000"),
    (lsh64(R1, 32), "6701000020000000"),
    (rsh64(R1, 32), "7701000020000000"),
    (neg64(R1), "8701000000000000"),
    (alu64(AluOp.XOR, R1, R1), "af11000000000000"),
    (alu64(AluOp.ARSH, R1, 3), "c701000003000000"),
    (alu32(AluOp.ADD, R1, 1), "0401000001000000"),
    (endian(R1, 16), "dc01000010000000"),
    (endian(R1, 32, big=False), "d401000020000000"),
    (ldx(1, R1, R6, 3), "7161030000000000"),
    (ldx(2, R1, R6, 12), "69610c0000000000"),
    (ldx(4, R1, R6, 16), "6161100000000000"),
    (ldx(8, R1, R6, 8), "7961080000000000"),
    (stx(1, FP, -1, R1), "731affff00000000"),
    (stx(2, FP, -2, R1), "6b1afeff00000000"),
    (stx(4, FP, -4, R1), "631afcff00000000"),
    (stx(8, R0, 0, R1), "7b10000000000000"),
    (st(1, FP, -1, 9), "720affff09000000"),
    (st(2, FP, -2, 9), "6a0afeff09000000"),
    (st(4, FP, -4, 1), "620afcff01000000"),
    (st(8, FP, -8, 0), "7a0af8ff00000000"),
    (atomic_add(8, R0, 0, R1), "db10000000000000"),
    (atomic_add(4, R0, 4, R1), "c310040000000000"),
    (ld_imm64(R1, 0x1122334455667788), "1801000088776655" + "0000000044332211"),
    (jeq(R0, 0, 3), "1500030000000000"),
    (jne(R1, R2, 1), "5d21010000000000"),
    (jgt(R1, 5, 2), "2501020005000000"),
    (jge(R1, R2, 2), "3d21020000000000"),
    (jlt(R1, 5, 2), "a501020005000000"),
    (jmp(JmpOp.JSET, R1, 1, 4), "4501040001000000"),
    (jmp32(JmpOp.JNE, R1, 5, 1), "5601010005000000"),
    (ja(2), "0500020000000000"),
    (call(Helper.map_lookup_elem), "8500000001000000"),
    (call(Helper.probe_read_kernel), "8500000071000000"),
    (exit_(), "9500000000000000"),
]


@pytest.mark.parametrize(("insn", "hexbytes"), GOLDEN, ids=[h for _, h in GOLDEN])
def test_golden_bytes(insn: Insn, hexbytes: str) -> None:
    assert insn.encode().hex() == hexbytes


def test_ld_map_fd_resolves_fd_and_takes_two_slots() -> None:
    code = assemble([ld_map_fd(R1, "counts"), exit_()], {"counts": 7})
    assert code.hex() == "181100000700000000000000000000009500000000000000"


def test_labels_resolve_forward_and_backward_in_slots() -> None:
    p = Program()
    p.label("top")
    p += mov64(R0, 0)
    p += ld_imm64(R1, 1)  # two slots: the forward jump must skip them both
    p += jeq(R0, 0, "out")
    p += ja("top")
    p.label("out")
    p += exit_()
    code = p.assemble()
    insns = [code[i : i + 8] for i in range(0, len(code), 8)]
    assert insns[3].hex() == "1500010000000000"  # slot 3 -> slot 5: off +1
    assert insns[4].hex() == "0500fbff00000000"  # slot 4 -> slot 0: off -5


def test_listing_indices_count_slots() -> None:
    text = listing([ld_imm64(R1, 5), mov64(R0, 0), exit_()])
    assert text.splitlines() == ["   0: r1 = 0x5 ll", "   2: r0 = 0", "   3: exit"]


def test_asm_errors() -> None:
    with pytest.raises(AsmError, match="undefined label"):
        assemble([ja("nowhere")])
    with pytest.raises(AsmError, match="unknown map"):
        assemble([ld_map_fd(R1, "m")])
    with pytest.raises(AsmError, match="size"):
        ldx(3, R1, R1, 0)
    with pytest.raises(AsmError, match="defined twice"):
        assemble([exit_().at("a"), exit_().at("a")])


def test_64bit_jump_refuses_immediates_it_would_sign_extend() -> None:
    with pytest.raises(AsmError, match="sign-extended"):
        jeq(R1, 0x80000000, "out")
    assert jmp32(JmpOp.JEQ, R1, 0x80000000, 1).encode().hex() == "1601010000000080"
    assert jeq(R1, 0x7FFFFFFF, 1).encode().hex() == "15010100ffffff7f"
