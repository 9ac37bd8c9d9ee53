"""Kernel objects held by file descriptor, and their release on every way out.

Every program, map, link and perf event nettracer creates is an :class:`FdObject`.
All live ones are closed on interpreter exit (``atexit``); :func:`install_signal_handlers`
turns SIGTERM (and SIGHUP) into :class:`Terminated` so ``finally`` blocks and
context managers run on SIGINT and SIGTERM as they do on a normal exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import weakref

TYPE_CHECKING = False  # typing is not imported at run time (start-up)
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

_live: weakref.WeakSet[FdObject] = weakref.WeakSet()
_lock = threading.Lock()


class FdObject:
    """Owns one file descriptor; ``close()`` is idempotent; usable as a context manager."""

    kind = "object"

    def __init__(self, fd: int) -> None:
        self.fd = fd
        with _lock:
            _live.add(self)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with _lock:
                _live.discard(self)
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "fd"):  # a constructor that failed never set it
            self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fd={self.fd}>"


def live_objects() -> list[FdObject]:
    """The objects not yet closed (links first, so programs detach before maps go)."""
    with _lock:
        objs = list(_live)
    order = {"link": 0, "perf_event": 1, "program": 2, "map": 3}
    return sorted(objs, key=lambda o: order.get(o.kind, 9))


def close_all() -> None:
    """Close every live object: links, then programs, then maps."""
    for obj in live_objects():
        obj.close()


atexit.register(close_all)


class Terminated(SystemExit):
    """Raised in the main thread when SIGTERM or SIGHUP arrives."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def _on_signal(signum: int, frame: object) -> None:
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP raise :class:`Terminated`; SIGINT raises KeyboardInterrupt (default)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)
