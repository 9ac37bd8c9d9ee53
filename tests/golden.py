"""Golden files: generated text compared with a file under ``tests/golden/``.

``NETTRACER_UPDATE_GOLDEN=1`` rewrites the files instead of comparing (review the
``git diff`` of ``tests/golden/`` before committing it).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE = os.environ.get("NETTRACER_UPDATE_GOLDEN") == "1"


def check_golden(name: str, text: str) -> None:
    """Fail with a unified diff unless ``text`` equals ``tests/golden/<name>``."""
    path = GOLDEN_DIR / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        pytest.fail(f"{path} does not exist: run with NETTRACER_UPDATE_GOLDEN=1 to write it")
    want = path.read_text()
    if text != want:
        diff = difflib.unified_diff(
            want.splitlines(), text.splitlines(), str(path), "generated", lineterm="", n=2
        )
        pytest.fail(f"{name} differs from its golden file:\n" + "\n".join(diff), pytrace=False)
