"""Tiny ONNX models built with ``onnx.helper`` and dense references computed with onnxruntime.

Used by ``tests/test_rules.py``: every rule is checked against the explicit Jacobian of a one-op
(or few-op) model, obtained by evaluating the model with onnxruntime on the zero input and on each
basis vector.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
Dims = Sequence[int | str | None]


def rng_for(tag: str) -> np.random.Generator:
    """A generator seeded from a readable tag: every case has its own reproducible weights."""
    return np.random.default_rng(zlib.crc32(tag.encode()))


def node(
    op: str, inputs: Sequence[str], outputs: Sequence[str], name: str | None = None, domain: str | None = None, **attrs
) -> onnx.NodeProto:
    """A node named after its first output unless ``name`` is given."""
    return helper.make_node(op, list(inputs), list(outputs), name=name or f"{op}_{outputs[0]}", domain=domain, **attrs)


def model(
    nodes: Sequence[onnx.NodeProto],
    inputs: dict[str, Dims],
    outputs: Sequence[str] = ("y",),
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = 17,
    extra_opsets: dict[str, int] | None = None,
) -> onnx.ModelProto:
    """A model with float32 inputs (``None``/str dims are symbolic) and outputs of unknown shape."""
    inits = [numpy_helper.from_array(np.asarray(v), name=k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(
        list(nodes),
        "test",
        [helper.make_tensor_value_info(n, FLOAT, list(s)) for n, s in inputs.items()],
        [helper.make_tensor_value_info(o, FLOAT, None) for o in outputs],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    result = helper.make_model(graph, opset_imports=opsets)
    result.ir_version = min(result.ir_version, 10)  # onnxruntime may lag behind onnx
    return result


def save_nodes(
    directory: Path,
    nodes: Sequence[onnx.NodeProto],
    x: np.ndarray,
    initializers: dict | None = None,
    opset: int = 21,
    x_type: int = TensorProto.FLOAT,
    outputs: Sequence[str] = ("y",),
) -> str:
    """A model of ``nodes`` on one input ``x`` of x's shape, outputs of unknown type and shape, saved."""
    graph = helper.make_graph(
        list(nodes),
        "test",
        [helper.make_tensor_value_info("x", x_type, list(x.shape))],
        [onnx.ValueInfoProto(name=o) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), name=k) for k, v in (initializers or {}).items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10
    path = str(Path(directory) / "model.onnx")
    onnx.save(proto, path)
    return path


def save(proto: onnx.ModelProto, directory: Path, name: str = "model.onnx") -> Path:
    path = Path(directory) / name
    onnx.save(proto, str(path))
    return path


class Runner:
    """An onnxruntime session for a single-input model; returns all outputs flattened, float64."""

    def __init__(self, path: Path | str):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3  # no shape-mismatch warnings (ceil-mode pooling, see test_rules)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        outputs = self.session.run(None, {self.input: np.asarray(x, dtype=np.float32)})
        return np.concatenate([np.asarray(o, dtype=np.float64).reshape(-1) for o in outputs])

    def outputs(self, x: np.ndarray) -> list[np.ndarray]:
        return [
            np.asarray(o, dtype=np.float64)
            for o in self.session.run(None, {self.input: np.asarray(x, dtype=np.float32)})
        ]


def ort_jacobian(path: Path | str, input_shape: Sequence[int]) -> np.ndarray:
    """J[:, i] = f(e_i) - f(0) for a model that is affine in its (single) input."""
    run = Runner(path)
    n = math.prod(input_shape)
    base = run(np.zeros(input_shape))
    columns = []
    for i in range(n):
        e = np.zeros(n)
        e[i] = 1.0
        columns.append(run(e.reshape(input_shape)) - base)
    return np.stack(columns, axis=1)


def sigma_max(matrix: np.ndarray) -> float:
    if matrix.size == 0:
        return 0.0
    return float(np.linalg.svd(matrix, compute_uv=False)[0])


def dense_conv_weight(weight: np.ndarray, groups: int, dilation: Sequence[int]) -> np.ndarray:
    """``[c_out, c_in/g, *k]`` -> ``[c_out, c_in, *k_eff]``: block-diagonal groups, dilated taps."""
    c_out, cig, *kernel = weight.shape
    d = len(kernel)
    eff = [(k - 1) * dl + 1 for k, dl in zip(kernel, dilation, strict=True)]
    full = np.zeros((c_out, cig * groups, *eff))
    cog = c_out // groups
    for g in range(groups):
        index = (
            slice(g * cog, (g + 1) * cog),
            slice(g * cig, (g + 1) * cig),
            *[slice(0, e, dl) for e, dl in zip(eff, dilation, strict=True)],
        )
        full[index] = weight[g * cog : (g + 1) * cog]
    assert full.ndim == d + 2
    return full


def circular_embedding_norm(
    weight: np.ndarray, grid: Sequence[int], groups: int = 1, dilation: Sequence[int] | None = None
) -> float:
    """Norm of the stride-1 circular convolution on ``grid``: FFT of the kernel + per-frequency SVD."""
    d = weight.ndim - 2
    full = dense_conv_weight(np.asarray(weight, dtype=np.float64), groups, dilation or [1] * d)
    spectrum = np.fft.fftn(full, s=list(grid), axes=list(range(2, d + 2)))  # [co, ci, *grid]
    blocks = np.moveaxis(spectrum, (0, 1), (-2, -1))  # [*grid, co, ci]
    return float(np.linalg.svd(blocks, compute_uv=False).max())
