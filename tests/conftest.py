"""Shared fixtures: paths of the shipped sample models."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
SAMPLE_MODELS = sorted(p.name for p in SAMPLES.glob("*.onnx"))


@pytest.fixture(autouse=True, scope="session")
def _private_config_home(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The cache's signing key is made under $XDG_CONFIG_HOME: in a temporary folder, never the real home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
        yield


@pytest.fixture
def one_thread() -> Any:
    """Small dense eigenproblems are much faster on one thread on a shared machine (``usefixtures``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def samples() -> Path:
    return SAMPLES


def assert_close_json(actual: Any, expected: Any, path: str = "") -> None:
    """Same structure and strings; numbers equal to 1e-9 relative or 1e-12 absolute (0% changes may be 1e-16)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), path
        for key in expected:
            assert_close_json(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_close_json(a, e, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert isinstance(actual, (int, float)) and math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-12), path
    else:
        assert actual == expected, path
