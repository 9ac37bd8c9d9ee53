"""Golden listings: a generated program's :meth:`Program.listing` compared with
``tests/golden/<name>.txt``.

``NETTRACER_UPDATE_GOLDEN=1`` rewrites the files instead of comparing (review the
diff with ``git diff tests/golden`` before committing); a mismatch fails with a
unified diff of the listing.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("NETTRACER_UPDATE_GOLDEN") == "1"


def check_golden(name: str, listing: str) -> None:
    """Fail with a readable diff unless ``listing`` equals ``tests/golden/<name>.txt``."""
    path = GOLDEN / f"{name}.txt"
    text = listing.rstrip("\n") + "\n"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        pytest.fail(f"{path} does not exist: run with NETTRACER_UPDATE_GOLDEN=1", pytrace=False)
    want = path.read_text()
    if want != text:
        diff = "".join(
            difflib.unified_diff(
                want.splitlines(keepends=True),
                text.splitlines(keepends=True),
                f"{path.name} (golden)",
                f"{path.name} (generated)",
            )
        )
        pytest.fail(
            f"listing {name} differs from {path} (NETTRACER_UPDATE_GOLDEN=1 rewrites it):\n{diff}",
            pytrace=False,
        )
