"""Plain-text tables: columns padded to their widest cell, numbers right-aligned.

Used by every command that prints rows (drops, connections); no third-party
dependency, so printing costs no import time.
"""

from __future__ import annotations

from collections.abc import Sequence

from nettracer.value import Value


class Column(Value):
    """A column: ``header`` text and whether cells are right-aligned (numbers)."""

    __slots__ = ("header", "right")

    def __init__(self, header: str, right: bool = False) -> None:
        self.header = header
        self.right = right


def render(
    columns: Sequence[Column], rows: Sequence[Sequence[object]], indent: str = ""
) -> list[str]:
    """The header line and one line per row; ``None`` cells print as ``-``.

    The last column is not padded, so lines carry no trailing blanks.
    """
    cells = [[c.header for c in columns]] + [
        ["-" if v is None else str(v) for v in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for r in cells:
        parts = []
        for i, (col, text) in enumerate(zip(columns, r, strict=True)):
            last = i == len(columns) - 1
            if col.right:
                parts.append(text.rjust(widths[i]))
            else:
                parts.append(text if last else text.ljust(widths[i]))
        lines.append((indent + "  ".join(parts)).rstrip())
    return lines


def plural(n: int, word: str, plural_word: str | None = None) -> str:
    """``"1 drop"``, ``"2 drops"``."""
    return f"{n} {word if n == 1 else (plural_word or word + 's')}"
