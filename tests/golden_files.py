"""Golden files: compared byte for byte (JSON reports: floats to 1e-9 relative, see ``FLOAT_REL``);
``LIPCHECK_UPDATE_GOLDEN=1`` rewrites them and fails the test.

Failing after a rewrite keeps an update from ever passing as a green run: rerun without the variable,
and review the diff of the rewritten files before committing them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

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


FLOAT_REL = 1e-9  # FFTs and eigensolvers differ between CPUs in the last bits, the SDP solver (LipSDP) by ~1e-11


def write_or_compare_json(path: Path, text: str) -> None:
    """As ``write_or_compare`` for a JSON document: every string, integer and key exactly, floats to FLOAT_REL."""
    if UPDATE:
        rewrite(path, text)
        return
    assert path.exists(), f"no golden file {path.name}: run once with LIPCHECK_UPDATE_GOLDEN=1"
    difference = _first_difference(json.loads(path.read_text()), json.loads(text), "")
    assert difference is None, f"{path.name} differs from the golden file at {difference}"


def _first_difference(want: Any, got: Any, where: str) -> str | None:
    if isinstance(want, float) and isinstance(got, float) and not isinstance(want, bool):
        same = want == got or math.isclose(want, got, rel_tol=FLOAT_REL, abs_tol=0.0)
        return None if same else f"{where}: {got!r} != {want!r}"
    if type(want) is not type(got):
        return f"{where}: {got!r} != {want!r}"
    if isinstance(want, dict):
        if want.keys() != got.keys():
            return f"{where}: keys {sorted(got)} != {sorted(want)}"
        return next((d for k in want if (d := _first_difference(want[k], got[k], f"{where}.{k}"))), None)
    if isinstance(want, list):
        if len(want) != len(got):
            return f"{where}: {len(got)} entries != {len(want)}"
        return next(
            (
                d
                for i, (w, g) in enumerate(zip(want, got, strict=True))
                if (d := _first_difference(w, g, f"{where}[{i}]"))
            ),
            None,
        )
    return None if want == got else f"{where}: {got!r} != {want!r}"
