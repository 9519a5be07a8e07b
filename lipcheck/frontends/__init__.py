"""Frontends: read a model file and emit lipcheck's Graph."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lipcheck.errors import ModelLoadError
from lipcheck.graph import Graph


def load_graph(path: str | os.PathLike[str], input_shapes: Sequence[str] = (), max_memory: int | None = None) -> Graph:
    """Detect the file's format and load it as a Graph.

    Weights are read lazily; ``max_memory`` (bytes) bounds how many stay loaded (``lipcheck.memory``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx" or _looks_like_onnx(path):
        from lipcheck.frontends.onnx_frontend import load_onnx_model, onnx_to_graph

        model = load_onnx_model(path, load_weights=False)
        return onnx_to_graph(model, input_shapes, name=path.name, base_dir=path.parent, max_memory=max_memory)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    raise ModelLoadError(f"{path}: unsupported model format {suffix or '(no extension)'}; expected .onnx")


def _looks_like_onnx(path: Path) -> bool:
    return path.suffix == "" and path.is_file()
