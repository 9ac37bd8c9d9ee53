"""Shared test plumbing.

Kernel-facing tests are marked ``@pytest.mark.kernel``; they need root and the
running kernel.  When they cannot run they skip with the reason, and
``NETTRACER_REQUIRE_KERNEL_TESTS=1`` (set by CI) turns every such skip into a
failure.  Use :func:`kernel_skip` instead of ``pytest.skip`` for any skip that
is about the kernel or the machine.
"""

from __future__ import annotations

import os
import select
import subprocess
import time

import pytest

REQUIRE = os.environ.get("NETTRACER_REQUIRE_KERNEL_TESTS") == "1"


def kernel_before(major: int, minor: int) -> bool:
    """Whether the running kernel is older than ``major.minor`` (``uname -r``)."""
    release = os.uname().release.split("-")[0].split(".")
    return (int(release[0]), int(release[1])) < (major, minor)


#: whether the kernel has BTF (CI's guests also run with it hidden: ``tests/vm/run --no-btf``)
HAS_BTF = os.path.exists("/sys/kernel/btf/vmlinux")
#: the offsets a test uses when it is not about where they come from: BTF, else a guess
ANY_OFFSETS = "btf" if HAS_BTF else "guess"


def check_no_btf_refused(*argv: str) -> None:
    """Without BTF, ``nettracer ARGV... --offsets btf`` exits 2 at once with one line
    that says BTF is missing and what to use instead."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "nettracer", *argv, "--offsets", "btf", "--duration", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    assert "kernel has no BTF" in r.stderr and "--offsets guess" in r.stderr, r.stderr


def kernel_skip(reason: str) -> None:
    """Skip a kernel test with ``reason``, or fail when kernel tests are required."""
    if REQUIRE:
        pytest.fail(f"kernel test could not run (NETTRACER_REQUIRE_KERNEL_TESTS=1): {reason}")
    pytest.skip(reason)


def settings(**values: object):  # -> nettracer.config.Config
    """The configuration a tracer's ``from_config`` takes: defaults plus ``values``
    (``offsets__source="btf"`` sets ``offsets.source``), isolated from the environment
    and from /etc/nettracer but for ``NETTRACER_OFFSETS__GUESS_TIMEOUT_MS`` (the QEMU
    guests' guess-time allowance: tests/vm/guest-init)."""
    from nettracer.config import load_config

    overrides = {k.replace("__", "."): (v, "test") for k, v in values.items()}
    environ = {k: v for k, v in os.environ.items() if k == "NETTRACER_OFFSETS__GUESS_TIMEOUT_MS"}
    return load_config(None, overrides, environ=environ, default_path="/nonexistent/nettracer.yaml")


def poll_until(read, done, timeout_s: float = 10.0, step_s: float = 0.05):  # type: ignore[no-untyped-def]
    """Call ``read()`` until ``done(value)`` or ``timeout_s`` passed; the last value (which
    the caller then asserts exactly: a deadline, never a fixed sleep before a count)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if done(value) or time.monotonic() >= deadline:
            return value
        time.sleep(step_s)


def collect_until(monitor, done, timeout_s: float = 10.0):  # type: ignore[no-untyped-def]
    """``DropMonitor.collect()`` until ``done(sample)`` holds for everything collected so
    far (one ``Sample``: the counts of every call, the lost summed) or the deadline."""
    from nettracer.tracers.drops.groups import Sample

    counts: list = []
    lost = 0

    def read() -> Sample:
        nonlocal lost
        sample = monitor.collect()
        counts.extend(sample.counts)
        lost += sample.lost
        return Sample(list(counts), lost)

    return poll_until(read, done, timeout_s)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is not None and os.geteuid() != 0:
        kernel_skip("needs root (eBPF, tracefs and network namespaces)")


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _describe_fd(fd: int) -> str:
    """What an fd is: its target, plus the BPF program/map/link id from fdinfo."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
        with open(f"/proc/self/fdinfo/{fd}") as f:
            ids = [
                line.strip() for line in f if line.split(":")[0] in ("prog_id", "map_id", "link_id")
            ]
    except OSError:
        return "closed meanwhile"
    return " ".join([target, *ids])


@pytest.fixture(scope="session", autouse=True)
def kernel_without() -> None:
    """``NETTRACER_KERNEL__WITHOUT`` forces fallbacks for the whole session, read as the
    CLI reads it (the ``kernel.without`` setting), for code built without the CLI."""
    from nettracer.config import load_config
    from nettracer.kernel import features

    var = "NETTRACER_KERNEL__WITHOUT"
    env = {var: os.environ[var]} if var in os.environ else {}
    cfg = load_config(None, environ=env, default_path="/nonexistent/nettracer.yaml")
    features.configure(cfg["kernel.without"])  # type: ignore[arg-type]


@pytest.fixture(scope="session", autouse=True)
def tracefs_as_found():
    """Tests mount tracefs where they need it (``open_tracefs``); the session leaves the
    machine's mounts as it found them: a tracefs it mounted is unmounted at the end."""
    from nettracer.kernel.tracefs import find_tracefs

    before = find_tracefs()
    yield
    now = find_tracefs()
    if before is None and now is not None and os.geteuid() == 0:
        from nettracer.bpf import syscall

        syscall.umount2(now, syscall.MNT_DETACH)


@pytest.fixture(scope="session", autouse=True)
def no_leaks_at_session_end():
    """The session ends with the fds it started with: no program, map or link of ours is
    left (we never pin, so an object outlives the session only through an open fd)."""
    import gc

    before = {fd: _describe_fd(fd) for fd in _open_fds()}
    yield
    gc.collect()
    # an fd number may be closed and reused meanwhile: compare what each one is
    now = {fd: _describe_fd(fd) for fd in _open_fds()}
    leaked = {
        fd: what
        for fd, what in now.items()
        if what != before.get(fd) and what != "closed meanwhile" and "/proc/" not in what
    }
    assert not leaked, f"file descriptors leaked by the test session: {leaked}"


def read_stderr_until(proc: subprocess.Popen[str], text: str, timeout_s: float = 120) -> str:
    """``proc``'s stderr until it contains ``text`` (or the process ended, or the
    deadline): all of it so far.

    Read from the pipe's fd, not with ``readline()``: that buffers every line that
    arrived together (a notice, then the "attached" line), and ``select()`` would then
    wait for more data while the line sought sits in Python's buffer."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    seen = b""
    deadline = time.monotonic() + timeout_s
    while text.encode() not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen += chunk
    return seen.decode(errors="replace")
