"""Golden files: compared byte for byte; ``LIPCHECK_UPDATE_GOLDEN=1`` rewrites them and fails the test.

Failing after a rewrite keeps an update from ever passing as a green run: rerun without the variable,
and review the diff of the rewritten files before committing them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"
UPDATE = bool(os.environ.get("LIPCHECK_UPDATE_GOLDEN"))


def rewrite(path: Path, text: str) -> None:
    """Update mode: write the golden file, and fail when that changed it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else None
    path.write_text(text)
    if old != text:
        pytest.fail(f"golden file {path.name} rewritten (LIPCHECK_UPDATE_GOLDEN set); rerun without it")


def write_or_compare(path: Path, text: str) -> None:
    """Compare ``text`` with the golden file, or rewrite the file (then fail) in update mode."""
    if UPDATE:
        rewrite(path, text)
        return
    assert path.exists(), f"no golden file {path.name}: run once with LIPCHECK_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} differs from the golden file"
