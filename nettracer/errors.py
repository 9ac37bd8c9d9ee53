"""The error types a user can cause, and the exit codes they map to.

Every error that is the user's or the environment's (not root, a missing file, a
bad option, a kernel that lacks a feature) derives from :class:`NettracerError`;
the command line prints ``nettracer: <message>`` on one line on stderr and exits
with :attr:`NettracerError.exit_code` (2).  Anything else is an internal failure
(exit code 1).

Below the command line an error names *settings*, never flags: the configuration key
(``offsets.source``, ``drops.group_by``) or, for what only a caller knows, the
tracer's own name for it (``drops.device``), and carries them in
:attr:`NettracerError.settings`.  Each command maps the settings it has flags for to
those flags when it prints the error (``FLAGS`` in ``nettracer/cli/<command>.py``).
"""

from __future__ import annotations


class NettracerError(Exception):
    """An error the user can act on. ``str(err)`` is one line saying what and what to do.

    ``setting`` names the setting(s) the message mentions (as spelled in it), so that a
    command can say its flag instead.
    """

    exit_code: int = 2

    def __init__(self, *args: object, setting: str | tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.settings: tuple[str, ...] = (setting,) if isinstance(setting, str) else setting


class PermissionError_(NettracerError):
    """Not root / a capability is missing (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)."""


def require_root(
    what: str, why: str = "CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN", instead: str = ""
) -> None:
    """:class:`PermissionError_` unless the effective user is root: "``what`` needs root
    (``why``); run it with sudo", then "or use ``instead``" (a setting and its value,
    e.g. ``offsets.source btf``, whose first word the error carries)."""
    import os

    if os.geteuid() != 0:
        msg = f"{what} needs root ({why}); run it with sudo"
        if instead:
            msg += f" or use {instead}"
        raise PermissionError_(msg, setting=instead.split(" ", 1)[0] if instead else ())


class NotSupported(NettracerError):
    """The running kernel lacks a feature.

    ``what`` names the feature, ``since`` the kernel version that introduced it
    (when known), so the message reads "ring buffer maps not supported by this
    kernel (needs Linux 5.8)".
    """

    def __init__(self, what: str, since: str | None = None, detail: str | None = None) -> None:
        self.what = what
        self.since = since
        self.detail = detail
        msg = f"{what} not supported by this kernel"
        if since:
            msg += f" (needs Linux {since})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class ConfigError(NettracerError):
    """Invalid configuration: names the key path, what was expected, found, and where."""


class UsageError(NettracerError):
    """A bad value of a setting (``setting`` names it), or settings that exclude each other."""


class Mismatch(NettracerError):
    """``offsets --verify`` found a guessed offset that differs from BTF (exit code 3)."""

    exit_code = 3
