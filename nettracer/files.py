"""Reading a file the user named (``--config``, ``--profile``) without trusting what it is.

``open()`` on a FIFO blocks until a writer comes, and a device may never end
(``/dev/zero``) or wait for a terminal: :func:`read_regular` refuses anything that is
not a regular file, and never blocks doing so. The kind is checked with ``stat(2)``
before any open, and again with ``fstat(2)`` on the descriptor, which is opened
``O_NONBLOCK`` (a FIFO swapped in between does not block either). ``/dev/null`` is
read as an empty file: it is the usual way to say "no file".
"""

from __future__ import annotations

import os
import stat

#: stat.S_IFMT kinds, as a user would name them
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
#: /dev/null (drivers/char/mem.c: MEM_MAJOR 1, minor 3)
_DEV_NULL = os.makedev(1, 3)


class NotRegularFile(OSError):
    """The path names something other than a regular file; ``kind`` says what."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{path} is {kind}, not a regular file")
        self.kind = kind
        self.strerror = f"it is {kind}, not a regular file"
        self.filename = path


class FileTooLarge(OSError):
    """A regular file larger than the caller accepts."""

    def __init__(self, path: str, size: int, limit: int) -> None:
        super().__init__(f"{path} has {size} bytes, more than {limit}")
        self.strerror = f"it has {size} bytes; expected at most {limit}"
        self.filename = path
        self.size, self.limit = size, limit


def _check(path: str, st: os.stat_result, max_bytes: int | None) -> bool:
    """True for a regular file, False for /dev/null; else NotRegularFile/FileTooLarge."""
    if stat.S_ISREG(st.st_mode):
        if max_bytes is not None and st.st_size > max_bytes:
            raise FileTooLarge(path, st.st_size, max_bytes)
        return True
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == _DEV_NULL:
        return False
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a file")
    raise NotRegularFile(path, kind)


def read_regular(path: str, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (``b""`` for ``/dev/null``).

    Raises :class:`NotRegularFile` for a FIFO, socket, device or directory,
    :class:`FileTooLarge` past ``max_bytes``, and the usual :class:`OSError`
    (``FileNotFoundError``, ``PermissionError``) otherwise; never blocks."""
    if not _check(path, os.stat(path), max_bytes):
        return b""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not _check(path, os.fstat(fd), max_bytes):
            return b""
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:  # it grew meanwhile
        raise FileTooLarge(path, len(data), max_bytes)
    return data
