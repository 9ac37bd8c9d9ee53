"""Kallsyms: parser on sample text, and the running kernel's own symbol printing as oracle."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import kernel_skip

from nettracer.errors import NettracerError
from nettracer.kernel.kallsyms import CORE, Kallsyms

SAMPLE = """\
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81000010 t foo
ffffffff81000010 W foo_alias
ffffffff81000040 T bar
ffffffff81000040 t bar
ffffffff81000100 T _etext
ffffffff82000000 D some_data
ffffffff83000000 T _sinittext
ffffffff83000020 t init_fn
ffffffff83000100 T _einittext
ffffffffc0001000 t mod_fn\t[mymod]
ffffffffc0001080 t mod_fn2\t[mymod]
ffffffffc0002000 t bpf_prog_0123456789abcdef_x\t[bpf]
ffffffffc0002100 t ftrace_trampoline\t[__builtin__ftrace]
"""


@pytest.fixture
def sample(tmp_path: Path) -> Kallsyms:
    p = tmp_path / "kallsyms"
    p.write_text(SAMPLE)
    return Kallsyms(str(p))


def test_sample_core_symbol(sample: Kallsyms) -> None:
    sym = sample.lookup(0xFFFFFFFF81000015)
    assert sym is not None
    assert (sym.name, sym.offset, sym.size, sym.module, sym.type) == ("foo", 5, 0x30, CORE, "t")
    assert sym.format() == "foo+0x5"
    assert sym.format_ps() == "foo+0x5/0x30"


def test_sample_zero_offset_prints_0x0(sample: Kallsyms) -> None:
    assert sample.format(0xFFFFFFFF81000010) == "foo+0x0"
    assert sample.format_ps(0xFFFFFFFF81000010) == "foo+0x0/0x30"


def test_sample_last_text_symbol_ends_at_etext(sample: Kallsyms) -> None:
    # bar's next symbol is _etext itself; the alias 't bar' does not end it.
    assert sample.format_ps(0xFFFFFFFF810000FF) == "bar+0xbf/0xc0"


def test_sample_outside_text_is_hex(sample: Kallsyms) -> None:
    assert sample.lookup(0xFFFFFFFF81000100) is None  # _etext is past the text
    assert sample.format_ps(0xFFFFFFFF82000008) == "0xffffffff82000008"
    assert sample.format(0xFFFFFFFF80000000) == "0xffffffff80000000"


def test_sample_init_text_ends_at_einittext(sample: Kallsyms) -> None:
    assert sample.format_ps(0xFFFFFFFF83000021) == "init_fn+0x1/0xe0"


def test_sample_module_symbols(sample: Kallsyms) -> None:
    sym = sample.lookup(0xFFFFFFFFC0001005)
    assert sym is not None and sym.module == "mymod" and sym.is_module
    assert sym.format_ps() == "mod_fn+0x5/0x80 [mymod]"
    assert sym.format() == "mod_fn+0x5"
    assert sample.modules == ["mymod", "bpf", "__builtin__ftrace"]


def test_sample_bpf_and_builtin_print_without_module(sample: Kallsyms) -> None:
    sym = sample.lookup(0xFFFFFFFFC0002004)
    assert sym is not None and sym.module == "bpf" and not sym.is_module
    assert sym.format_ps() == "bpf_prog_0123456789abcdef_x+0x4/0x100"


def test_sample_lookup_name(sample: Kallsyms) -> None:
    assert sample.lookup_name("foo_alias") == 0xFFFFFFFF81000010
    assert sample.lookup_name("mod_fn2", module="mymod") == 0xFFFFFFFFC0001080
    assert sample.addresses("bar") == [0xFFFFFFFF81000040, 0xFFFFFFFF81000040]
    assert "foo" in sample and "nope" not in sample
    with pytest.raises(NettracerError, match="no kernel symbol 'nope'"):
        sample.lookup_name("nope")
    with pytest.raises(NettracerError, match=r"in \[kernel\]"):
        sample.lookup_name("mod_fn", module=CORE)


def test_unsorted_file_is_sorted_stably(tmp_path: Path) -> None:
    lines = SAMPLE.splitlines()
    p = tmp_path / "kallsyms"
    p.write_text("\n".join(lines[4:] + lines[:4]) + "\n")
    k = Kallsyms(str(p))
    assert k.format_ps(0xFFFFFFFF81000015) == "foo+0x5/0x30"
    assert len(k) == len(lines)


def test_hidden_addresses(tmp_path: Path) -> None:
    p = tmp_path / "kallsyms"
    p.write_text("0000000000000000 T _stext\n0000000000000000 t foo\n")
    with pytest.raises(NettracerError, match=r"addresses are hidden \(kptr_restrict="):
        Kallsyms(str(p)).lookup(0x10)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NettracerError, match="cannot read"):
        Kallsyms(str(tmp_path / "nope")).load()


def test_lazy(tmp_path: Path) -> None:
    """Constructing reads nothing; the first query reads the file, once."""
    p = tmp_path / "kallsyms"
    k = Kallsyms(str(p))  # the file does not exist yet
    p.write_text(SAMPLE)
    assert len(k) == len(SAMPLE.splitlines())
    p.unlink()  # what the first query read is kept
    assert k.format_ps(0xFFFFFFFF81000015) == "foo+0x5/0x30"


# -- the running kernel -------------------------------------------------------------


@pytest.fixture(scope="module")
def kallsyms() -> Kallsyms:
    return Kallsyms()


def _unique(k: Kallsyms, *names: str) -> str:
    for name in names:
        if len(k.addresses(name)) == 1:
            return name
    kernel_skip(f"none of {names} is a unique symbol in /proc/kallsyms")
    raise AssertionError  # unreachable


@pytest.mark.kernel
def test_round_trip_known_symbols(kallsyms: Kallsyms) -> None:
    for name in (
        # the function behind kfree_skb: sk_skb_reason_drop (6.11), kfree_skb_reason (5.17),
        # kfree_skb itself before
        _unique(kallsyms, "sk_skb_reason_drop", "kfree_skb_reason", "kfree_skb"),
        _unique(kallsyms, "tcp_v4_rcv"),
        _unique(kallsyms, "__udp4_lib_rcv", "udp_rcv"),
    ):
        addr = kallsyms.lookup_name(name)
        sym = kallsyms.lookup(addr + 5)
        assert sym is not None
        assert sym.size is not None and sym.size > 5
        assert kallsyms.format(addr + 5) == f"{name}+0x5"
        assert sym.module == CORE and sym.type in "tTwW"


def _stack_of_sleeper() -> list[str]:
    """``/proc/PID/stack`` of a child blocked in nanosleep (printed with ``%pB``)."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        for _ in range(500):
            stat = Path(f"/proc/{child.pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "S":
                lines = Path(f"/proc/{child.pid}/stack").read_text().splitlines()
                if lines:
                    return lines
            time.sleep(0.01)
        kernel_skip("the child never went to sleep")
        raise AssertionError  # unreachable
    finally:
        child.kill()
        child.wait()


@pytest.mark.kernel
def test_matches_proc_pid_stack(kallsyms: Kallsyms) -> None:
    """The kernel prints return addresses as ``sym+0xoff/0xsize``: ours must agree.

    ``%pB`` looks the symbol up at ``addr - 1`` (a call at the end of a function
    returns past it), so compare with the lookup of ``addr - 1`` plus one.
    """
    if not Path("/proc/self/stack").exists():
        kernel_skip("/proc/PID/stack is absent (CONFIG_STACKTRACE unset)")
    lines = _stack_of_sleeper()
    checked = 0
    for line in lines:
        m = re.search(r"\] (\S+)\+(0x[0-9a-f]+)/(0x[0-9a-f]+)(?: \[(\S+)\])?$", line)
        assert m, line
        name, off, size = m.group(1), int(m.group(2), 16), int(m.group(3), 16)
        if len(kallsyms.addresses(name)) != 1:
            continue
        addr = kallsyms.lookup_name(name) + off
        sym = kallsyms.lookup(addr - 1)
        assert sym is not None and sym.name == name, line
        assert (sym.offset + 1, sym.size) == (off, size), line
        checked += 1
    assert checked >= 2, lines


@pytest.mark.kernel
def test_module_symbols_show_module(tmp_path: Path) -> None:
    """Every ``[mod]`` line of /proc/kallsyms resolves to its own module.

    A program of our own is loaded first, so that at least its JIT image
    (``bpf_prog_<tag>_<name> [bpf]``) is there on a kernel without modules."""
    from nettracer.bpf.insn import R0, exit_, mov64
    from nettracer.bpf.prog import load

    with load([mov64(R0, 0), exit_()], name="nt_ksym_test"):
        text = Path("/proc/kallsyms").read_text()
    snapshot = tmp_path / "kallsyms"
    snapshot.write_text(text)
    kallsyms = Kallsyms(str(snapshot))
    rows = re.findall(r"^([0-9a-f]+) \S (\S+)\t\[(\S+)\]$", text, re.M)
    if not rows:
        kernel_skip("no module, BPF or ftrace symbols in /proc/kallsyms")
    addr, name, mod = rows[0]
    real = [r for r in rows if r[2] != "bpf" and not r[2].startswith("__builtin__")]
    if real:
        addr, name, mod = real[0]
    sym = kallsyms.lookup(int(addr, 16) + 1)
    assert sym is not None
    assert (sym.name, sym.module, sym.offset) == (name, mod, 1)
    assert sym.format_ps().endswith(f" [{mod}]") == bool(real)


@pytest.mark.kernel
def test_matches_kfree_skb_location_in_trace(kallsyms: Kallsyms) -> None:
    """``skb:kfree_skb`` prints ``location=%pS``: cause a drop, read it, and agree with it.

    The trace text has only the symbol form, so take ``sym+0xoff/0xsize`` from it,
    rebuild the address from our ``lookup_name(sym) + off`` and format it back.
    """
    from nettracer.kernel.tracefs import open_tracefs

    tracefs = open_tracefs()
    if not tracefs.has_event("skb", "kfree_skb"):
        kernel_skip("no skb:kfree_skb tracepoint")
    with tracefs.buffer() as buf:
        buf.enable("skb", "kfree_skb")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.sendto(b"x", ("127.0.0.1", port))  # closed port: a NO_SOCKET drop
        locations = [line.values().get("location", "") for line in buf.lines("kfree_skb")]
    assert locations
    checked = 0
    for text in locations:
        if re.fullmatch(r"[0-9a-f]{16}", text):
            # print fmt "location=%p" (before Linux 6.2): a raw address, readable only
            # with no_hash_pointers. A UDP datagram to a closed port is dropped in
            # __udp4_lib_rcv (net/ipv4/udp.c), so that is where it must resolve.
            addr = int(text, 16)
            if addr < 1 << 63 or text.startswith("00000000"):
                kernel_skip("kfree_skb prints a hashed %p location (boot with no_hash_pointers)")
            sym = kallsyms.lookup(addr)
            assert sym is not None and sym.name == "__udp4_lib_rcv", (text, sym)
            checked += 1
            continue
        m = re.fullmatch(r"(\S+)\+(0x[0-9a-f]+)/0x[0-9a-f]+", text)
        assert m, text
        addrs = kallsyms.addresses(m.group(1))
        assert addrs, text
        formatted = [kallsyms.format_ps(a + int(m.group(2), 16)) for a in addrs]
        assert text in formatted
        checked += 1
    assert checked
