"""Kernel objects held by file descriptor, and their release on every way out.

Every program, map, link and perf event nettracer creates is an :class:`FdObject`.
All live ones are closed on interpreter exit (``atexit``); :func:`install_signal_handlers`
turns SIGINT, SIGTERM and SIGHUP into :class:`Terminated` (once: later ones are ignored,
so the clean-up the first one started is not cut short) so ``finally`` blocks and
context managers run on a signal as they do on a normal exit.
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


#: the signals that stop a command (``nettracer agent`` reloads on SIGHUP while running)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(SystemExit):
    """Raised in the main thread when SIGINT, SIGTERM or SIGHUP arrives; its exit code
    is ``128 + signum`` (the command line makes it 0 for the monitors, as bpftrace)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def _ignore(signum: int, frame: object) -> None:
    """A handler that does nothing.  Not ``SIG_IGN``: a signal that arrived just before
    would then make Python raise ``OSError: Signal N ignored due to race condition``
    wherever the main thread is."""


def ignore_stop_signals() -> None:
    """Ignore SIGINT, SIGTERM and SIGHUP from now on (the main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _ignore)


def _on_signal(signum: int, frame: object) -> None:
    ignore_stop_signals()
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """The first of SIGINT/SIGTERM/SIGHUP raises :class:`Terminated`; later ones are
    ignored (the unwinding the first one started runs to its end)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)


class StopRequest:
    """While a monitor's loop runs, SIGINT/SIGTERM/SIGHUP only set :attr:`signum` (an
    exception in the middle of reading a map or a ring buffer would lose what was
    already taken out of it); :meth:`sleep` is the one place a signal interrupts.  Used
    by the loops of ``drops``, ``conns`` and ``agent`` (whose SIGHUP, with ``reload``,
    only sets :attr:`reload_wanted`)."""

    def __init__(self, reload: bool = False) -> None:
        self.signum = 0
        #: with ``reload``, SIGHUP sets this instead of stopping (``nettracer agent``)
        self.reload_wanted = False
        self._reload = reload
        self._sleeping = False

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._reload and signum == signal.SIGHUP:
            self.reload_wanted = True
            return
        self.signum = self.signum or signum
        if self._sleeping:
            self._sleeping = False
            raise Terminated(signum)

    def sleep(self, seconds: float) -> None:
        """``time.sleep`` that a stop signal ends at once (PEP 475 would resume it)."""
        import time

        if self.signum:
            return
        self._sleeping = True
        try:
            time.sleep(seconds)
        except Terminated:
            pass
        finally:
            self._sleeping = False
