"""Shared fixtures: paths of the shipped sample models."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
SAMPLE_MODELS = sorted(p.name for p in SAMPLES.glob("*.onnx"))


@pytest.fixture
def samples() -> Path:
    return SAMPLES
