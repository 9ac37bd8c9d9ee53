"""The error types a user can cause, and the exit codes they map to.

Every error that is the user's or the environment's (not root, a missing file, a
bad option, a kernel that lacks a feature) derives from :class:`NettracerError`;
the command line prints ``nettracer: <message>`` on one line on stderr and exits
with :attr:`NettracerError.exit_code` (2).  Anything else is an internal failure
(exit code 1).
"""

from __future__ import annotations


class NettracerError(Exception):
    """An error the user can act on. ``str(err)`` is one line saying what and what to do."""

    exit_code: int = 2


class PermissionError_(NettracerError):
    """Not root / a capability is missing (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)."""


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
    """A bad command-line argument."""


class Mismatch(NettracerError):
    """``offsets --verify`` found a guessed offset that differs from BTF (exit code 3)."""

    exit_code = 3
