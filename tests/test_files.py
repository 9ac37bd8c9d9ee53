"""Files the user names are read only when they are regular files, without blocking:
a FIFO with no writer, a socket, a directory and endless devices are refused, each
from the real file system object the test makes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nettracer.files import FileTooLarge, NotRegularFile, read_regular

REPO = Path(__file__).resolve().parent.parent


def specials(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (path, kind in the message) of every non-regular file a user can name."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock_path))
    s.close()  # the socket inode stays on the file system
    return {
        "fifo": (str(fifo), "a FIFO (named pipe)"),
        "socket": (str(sock_path), "a socket"),
        "directory": (str(tmp_path), "a directory"),
        "zero": ("/dev/zero", "a character device"),
        "tty": ("/dev/tty", "a character device"),
    }


def test_read_regular_refuses_what_is_not_a_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for path, kind in specials(tmp_path).values():
        if not os.path.exists(path):
            continue  # /dev/tty where there is no /dev
        with pytest.raises(NotRegularFile) as info:
            read_regular(path)
        assert info.value.kind == kind
        assert kind in info.value.strerror


def test_read_regular_reads_files_and_dev_null(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    assert read_regular(str(f)) == b"abc"
    assert read_regular(os.devnull) == b""
    link = tmp_path / "link"
    link.symlink_to(f)
    assert read_regular(str(link), max_bytes=3) == b"abc"
    with pytest.raises(FileTooLarge) as info:
        read_regular(str(f), max_bytes=2)
    assert info.value.size == 3 and "at most 2" in info.value.strerror
    with pytest.raises(FileNotFoundError):
        read_regular(str(tmp_path / "missing"))


def _nettracer(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETTRACER_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "nettracer", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,  # a blocking open() would hang here, not pass
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("name", ["fifo", "socket", "directory", "zero"])
def test_cli_config_must_be_a_regular_file(tmp_path, name) -> None:  # type: ignore[no-untyped-def]
    path, kind = specials(tmp_path)[name]
    r = _nettracer("config", "show", "--config", path)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"nettracer: config file {path}: expected a YAML file, found {kind}\n"
    assert r.stdout == ""


@pytest.mark.parametrize("name", ["fifo", "socket", "directory", "zero"])
def test_cli_profile_must_be_a_regular_file(tmp_path, name) -> None:  # type: ignore[no-untyped-def]
    path, kind = specials(tmp_path)[name]
    r = _nettracer("offsets", "--profile", path, "--config", os.devnull)
    assert r.returncode == 2, r.stderr
    assert r.stderr == (
        f"nettracer: cannot read profile {path}: it is {kind}, not a regular file\n"
    )


def test_cli_config_too_large(tmp_path) -> None:  # type: ignore[no-untyped-def]
    big = tmp_path / "big.yaml"
    big.write_text("drops:\n  group_by:\n" + "  - device\n" * 5960)
    r = _nettracer("config", "show", "--config", str(big))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "expected a YAML file of at most 64 KiB, found 65579 bytes" in r.stderr
