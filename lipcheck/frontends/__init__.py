"""Frontends: read a model file and emit lipcheck's Graph."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lipcheck.errors import ModelLoadError
from lipcheck.graph import Graph

if TYPE_CHECKING:
    from lipcheck.frontends.torch_frontend import TorchOptions, WeightTensors


def load_model(
    path: str | os.PathLike[str],
    input_shapes: Sequence[str] = (),
    torch_options: TorchOptions | None = None,
    max_memory: int | None = None,
) -> Graph | WeightTensors:
    """Detect the file's format and load it: a Graph, or bare weights for a state_dict without --model.

    ONNX weights are read lazily; ``max_memory`` (bytes) bounds how many stay loaded (``lipcheck.memory``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx" or _looks_like_onnx(path):
        if torch_options is not None and torch_options.model is not None:
            raise ModelLoadError(f"{path}: --model is for PyTorch state_dicts; an ONNX file carries its own graph")
        from lipcheck.frontends.onnx_frontend import load_onnx_model, onnx_to_graph

        model = load_onnx_model(path, load_weights=False)
        return onnx_to_graph(model, input_shapes, name=path.name, base_dir=path.parent, max_memory=max_memory)
    from lipcheck.frontends.torch_frontend import is_torch_file, load_torch

    if path.exists() and (is_torch_file(path) or _looks_like_pickle(path)):
        return load_torch(path, input_shapes, torch_options)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    raise ModelLoadError(
        f"{path}: unsupported model format {suffix or '(no extension)'}; expected .onnx, a PyTorch file "
        "(.pt, .pth, .ckpt, .pt2, TorchScript) or .safetensors"
    )


def load_graph(path: str | os.PathLike[str], input_shapes: Sequence[str] = (), max_memory: int | None = None) -> Graph:
    """Load a model whose file carries its architecture (ONNX, TorchScript, .pt2, pickled module)."""
    loaded = load_model(path, input_shapes, max_memory=max_memory)
    if not isinstance(loaded, Graph):
        raise ModelLoadError(f"{path}: holds weights only; a graph needs the architecture (--model)")
    return loaded


def _looks_like_onnx(path: Path) -> bool:
    """Files without a suffix: ONNX unless the first bytes say pickle or zip (PyTorch)."""
    return path.suffix == "" and path.is_file() and not _looks_like_pickle(path) and not _is_zip(path)


def _looks_like_pickle(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(1) == b"\x80"  # PROTO opcode


def _is_zip(path: Path) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)
