"""JSON lines: one compact object per line, flushed, and ISO-8601 timestamps.

Every JSON-emitting command writes through :func:`write` so that a consumer
reading the pipe sees each object as soon as it is complete.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from typing import TextIO


def write(obj: object, stream: TextIO) -> None:
    """``obj`` as one line of compact JSON, then flush."""
    import json  # here, not at start-up: text output never needs it

    stream.write(json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n")
    stream.flush()


def iso_time(epoch_s: float, timespec: str = "milliseconds") -> str:
    """Local time with UTC offset: ``2026-11-22T01:30:11.123+00:00``."""
    import datetime

    return datetime.datetime.fromtimestamp(epoch_s).astimezone().isoformat(timespec=timespec)


def clock_time(epoch_s: float, micro: bool = False) -> str:
    """Local wall-clock time of day: ``01:30:11`` (``01:30:11.123456`` with ``micro``)."""
    import datetime  # at the first report, not at start-up

    t = datetime.datetime.fromtimestamp(epoch_s)
    return t.strftime("%H:%M:%S.%f" if micro else "%H:%M:%S")
