"""Every Lipschitz rule against a dense reference computed independently with onnxruntime.

Linear ops: the exact constant is sigma_max of the explicit Jacobian (J[:, i] = f(e_i) - f(0), the
model evaluated by onnxruntime in float32, the differences and the SVD in float64). Certified means
``bound >= exact * (1 - 1e-6)`` (the slack covers float32 evaluation noise only); where lipcheck
claims exactness, or the case is known to be tight, the bound must land within 1e-5 relative.
Stride-1 zero-padded convolutions must also stay below the circular embedding on the padded grid
(an FFT + per-frequency SVD computed here with numpy).
Nonlinear ops: the reference is the largest Jacobian norm found numerically (a fine grid for
elementwise activations, random search and gradient ascent with torch autograd for Softmax,
LogSoftmax and MaxPool), which is a lower bound of the true constant.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from lipcheck import ops
from lipcheck.errors import UnsupportedOpsError
from lipcheck.frontends import load_graph
from lipcheck.interpret import interpret, unsupported_ops
from lipcheck.ops import LocalBound, registered_rules, rule
from lipcheck.passes import prepare
from lipcheck.pipeline import analyse
from lipcheck.report import Report
from tests.onnx_builders import (
    Runner,
    circular_embedding_norm,
    model,
    node,
    ort_jacobian,
    rng_for,
    save,
    sigma_max,
)

CERT_SLACK = 1e-6  # float32 evaluation noise of the onnxruntime Jacobian
EXACT_TOL = 1e-5  # rules that claim exactness must be this close (relative)
SLOPE_TOL = 1e-3  # max-slope constants must be this close to the numeric maximum


def run_analyse(path, shape=None, **kwargs) -> Report:
    specs = [",".join(map(str, shape))] if shape is not None else []
    return analyse(path, input_shapes=specs, device="cpu", **kwargs)


def randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Linear ops: dense Jacobian via onnxruntime


@dataclass
class Linear:
    """A model affine in its input: ``build(rng)`` returns (nodes, initializers)."""

    id: str
    shape: tuple[int, ...]
    build: Callable[[np.random.Generator], tuple[list, dict]]
    exact: bool = False  # the bound must equal the exact constant (the rule is tight here)
    opset: int = 17
    dims: tuple | None = None  # declared input dims when not the fixed shape (symbolic sizes)
    circulant: dict | None = None  # stride-1 zero-padded conv: {"pads", "groups", "dilation"} of weight W
    layers: int | None = None  # expected number of report layers (after folding)
    runtimes_differ: str | None = None  # why onnxruntime computes another map than the ONNX reference


def single(
    op: str,
    weights: dict[str, tuple[int, ...]] | None = None,
    *,
    inputs: list[str] | None = None,
    consts: dict[str, np.ndarray] | None = None,
    **attrs,
):
    """Build function for one node ``op(x, *weights)`` with random normal weights."""

    def build(rng):
        inits = {name: randn(rng, *shape) for name, shape in (weights or {}).items()}
        inits.update(consts or {})
        names = inputs if inputs is not None else ["x", *inits]
        return [node(op, names, ["y"], **attrs)], inits

    return build


def conv(
    cid: str,
    x: tuple[int, ...],
    w: tuple[int, ...],
    *,
    bias: bool = False,
    exact: bool = False,
    circulant: bool = False,
    dims=None,
    **attrs,
) -> Linear:
    d = len(w) - 2
    weights = {"W": w, **({"B": (w[0],)} if bias else {})}
    spec = None
    if circulant:
        k, dl = w[2:], attrs.get("dilations", [1] * d)
        if attrs.get("auto_pad") in ("SAME_UPPER", "SAME_LOWER"):
            total = [(kk - 1) * dd for kk, dd in zip(k, dl, strict=True)]  # stride 1
            pads = [t // 2 for t in total] + [t - t // 2 for t in total]
        elif attrs.get("auto_pad") == "VALID":
            pads = [0] * (2 * d)
        else:
            pads = attrs.get("pads", [0] * (2 * d))
        spec = {"pads": pads, "groups": attrs.get("group", 1), "dilation": dl}
    return Linear(cid, x, single("Conv", weights, **attrs), exact=exact, circulant=spec, dims=dims)


def conv_t(cid: str, x: tuple[int, ...], w: tuple[int, ...], **attrs) -> Linear:
    return Linear(cid, x, single("ConvTranspose", {"W": w}, **attrs))


def bn_params(rng, c: int, prefix: str = "bn") -> dict[str, np.ndarray]:
    return {
        f"{prefix}_scale": randn(rng, c) * 2,
        f"{prefix}_bias": randn(rng, c),
        f"{prefix}_mean": randn(rng, c),
        f"{prefix}_var": (rng.uniform(0.2, 3.0, c)).astype(np.float32),
    }


def bn_node(x: str, y: str, prefix: str = "bn", eps: float = 1e-3):
    names = [x] + [f"{prefix}_{p}" for p in ("scale", "bias", "mean", "var")]
    return node("BatchNormalization", names, [y], name=prefix, epsilon=eps)


def chain(*steps):
    """Build function for a few nodes; each step is (op, inputs, output, weights, attrs)."""

    def build(rng):
        nodes, inits = [], {}
        for op, ins, out, weights, attrs in steps:
            for name, value in weights.items():
                inits[name] = value(rng) if callable(value) else randn(rng, *value)
            nodes.append(node(op, ins, [out], **attrs))
        return nodes, inits

    return build


def conv_bn(rng):
    inits = {"W": randn(rng, 4, 3, 3, 3), "B": randn(rng, 4), **bn_params(rng, 4)}
    return [node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]), bn_node("c", "y")], inits


def bn_conv(kernel: int, pads: int, groups: int = 1):
    def build(rng):
        inits = {"W": randn(rng, 4, 4 // groups, kernel, kernel), **bn_params(rng, 4)}
        return [bn_node("x", "b"), node("Conv", ["b", "W"], ["y"], pads=[pads] * 4, group=groups)], inits

    return build


def convt_bn(rng):
    inits = {"W": randn(rng, 4, 3, 3, 3), **bn_params(rng, 6)}
    return [
        node("ConvTranspose", ["x", "W"], ["c"], group=2, strides=[2, 2], pads=[1, 1, 1, 1]),
        bn_node("c", "y"),
    ], inits


def gemm_bn(trans_b: int):
    def build(rng):
        inits = {"W": randn(rng, *((6, 8) if trans_b else (8, 6))), "C": randn(rng, 6), **bn_params(rng, 6)}
        return [node("Gemm", ["x", "W", "C"], ["g"], transB=trans_b, alpha=0.5, beta=2.0), bn_node("g", "y")], inits

    return build


def bn_gemm(rng):
    inits = {"W": randn(rng, 8, 5), "C": randn(rng, 5), **bn_params(rng, 8)}
    return [bn_node("x", "b"), node("Gemm", ["b", "W", "C"], ["y"], alpha=1.5, beta=0.5)], inits


def gemm_variable_c(broadcast: bool):
    def build(rng):
        inits = {"W": randn(rng, 4, 4)}
        if broadcast:
            nodes = [node("ReduceMean", ["x"], ["c"], axes=[0], keepdims=1)]
        else:
            nodes = [node("Transpose", ["x"], ["c"], perm=[1, 0])]
        nodes.append(node("Gemm", ["x", "W", "c"], ["y"], alpha=0.8, beta=-0.5))
        return nodes, inits

    return build


def two_branches(join: str):
    """Conv 3x3 and Conv 1x1 branches of the same input, joined by ``join``."""

    def build(rng):
        inits = {"W1": randn(rng, 4, 3, 3, 3), "W2": randn(rng, 4 if join != "Concat" else 2, 3, 1, 1)}
        extra = {"axis": 1} if join == "Concat" else {}
        return [
            node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]),
            node("Conv", ["x", "W2"], ["b"]),
            node(join, ["a", "b"], ["y"], **extra),
        ], inits

    return build


def residual(rng):
    inits = {"W": randn(rng, 3, 3, 3, 3) * 0.3}
    return [node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), node("Add", ["x", "c"], ["y"])], inits


def const(value) -> Callable:
    return lambda rng: np.asarray(value)


I64 = np.int64


def resize(cid: str, shape, *, scales=None, sizes=None, roi=None, exact=True, opset=19, differ=None, **attrs):
    """A Resize of constant scales or sizes (a linear map of its input) as a Linear case."""
    consts = {"roi": np.array(roi or [], np.float32), "scales": np.array(scales or [], np.float32)}
    if sizes is not None:
        consts["sizes"] = np.array(sizes, I64)
    build = single("Resize", consts=consts, **attrs)
    return Linear(cid, shape, build, exact=exact, opset=opset, runtimes_differ=differ)


def grid_sample(cid: str, shape, grid_shape, *, opset: int = 16, exact: bool = True, **attrs):
    """GridSample of its input at a constant random grid (a linear map of the input) as a Linear case."""

    def build(rng):
        grid = rng.uniform(-1.25, 1.25, size=grid_shape).astype(np.float32)
        return [node("GridSample", ["x", "grid"], ["y"], **attrs)], {"grid": grid}

    return Linear(cid, shape, build, exact=exact, opset=opset)


LINEAR = [
    # dense layers
    Linear("gemm", (3, 8), single("Gemm", {"W": (8, 5), "C": (5,)}), exact=True),
    Linear(
        "gemm-transB-alpha-beta",
        (3, 8),
        single("Gemm", {"W": (5, 8), "C": (3, 5)}, transB=1, alpha=0.7, beta=0.3),
        exact=True,
    ),
    Linear("gemm-transA-neg-alpha", (8, 3), single("Gemm", {"W": (8, 5)}, transA=1, alpha=-2.0), exact=True),
    Linear("gemm-const-A", (6, 3), single("Gemm", {"A": (4, 6)}, inputs=["A", "x"], alpha=1.3), exact=True),
    Linear("gemm-const-A-transB", (3, 6), single("Gemm", {"A": (4, 6)}, inputs=["A", "x"], transB=1), exact=True),
    Linear("gemm-variable-C", (4, 4), gemm_variable_c(broadcast=False)),
    Linear("gemm-variable-C-broadcast", (3, 4), gemm_variable_c(broadcast=True)),
    Linear("matmul-right", (2, 3, 6), single("MatMul", {"W": (6, 4)}), exact=True),
    Linear("matmul-left", (6, 4), single("MatMul", {"W": (5, 6)}, inputs=["W", "x"]), exact=True),
    Linear("matmul-batched-3d", (3, 4, 6), single("MatMul", {"W": (3, 6, 5)}), exact=True),
    Linear("matmul-broadcast-batch", (4, 6), single("MatMul", {"W": (3, 6, 5)}), exact=True),
    Linear("matmul-left-broadcast-batch", (6, 4), single("MatMul", {"W": (3, 5, 6)}, inputs=["W", "x"]), exact=True),
    Linear("matmul-vector", (2, 6), single("MatMul", {"w": (6,)}), exact=True),
    Linear("matmul-1d-input", (6,), single("MatMul", {"W": (6, 4)}), exact=True),
    Linear("matmul-1d-input-batched-weight", (6,), single("MatMul", {"W": (3, 6, 4)}), exact=True),
    Linear("matmul-left-1d-input", (6,), single("MatMul", {"W": (2, 5, 6)}, inputs=["W", "x"]), exact=True),
    Linear("matmul-4d-input-3d-weight", (2, 3, 2, 4), single("MatMul", {"W": (3, 4, 5)}), exact=True),
    Linear("matmul-broadcast-batch-of-one", (1, 2, 4), single("MatMul", {"W": (3, 4, 5)}), exact=True),
    # convolutions
    conv("conv1d-k3-pad1", (1, 3, 10), (4, 3, 3), pads=[1, 1], circulant=True),
    conv("conv1d-stride2-dil2", (1, 3, 12), (4, 3, 3), bias=True, strides=[2], dilations=[2], pads=[2, 1]),
    conv("conv1d-k3-unknown-size", (1, 3, 10), (4, 3, 3), pads=[1, 1], dims=(1, 3, "L")),
    conv("conv2d-k3-pad1", (1, 3, 6, 6), (4, 3, 3, 3), bias=True, pads=[1, 1, 1, 1], circulant=True),
    conv("conv2d-same-upper-k2", (1, 3, 5, 5), (4, 3, 2, 2), auto_pad="SAME_UPPER", circulant=True),
    conv("conv2d-same-lower-k2", (1, 3, 5, 5), (4, 3, 2, 2), auto_pad="SAME_LOWER", circulant=True),
    conv("conv2d-same-upper-k4-s2", (1, 3, 7, 7), (4, 3, 4, 4), auto_pad="SAME_UPPER", strides=[2, 2]),
    conv("conv2d-same-lower-k3-s2", (1, 3, 6, 6), (4, 3, 3, 3), auto_pad="SAME_LOWER", strides=[2, 2]),
    conv("conv2d-valid", (1, 3, 6, 6), (4, 3, 3, 3), auto_pad="VALID", circulant=True),
    conv("conv2d-asym-pads", (1, 3, 6, 5), (4, 3, 3, 3), pads=[0, 1, 2, 0], circulant=True),
    conv("conv2d-groups2", (1, 4, 6, 6), (6, 2, 3, 3), group=2, pads=[1, 1, 1, 1], circulant=True),
    conv("conv2d-depthwise", (1, 4, 6, 6), (4, 1, 3, 3), group=4, pads=[1, 1, 1, 1], circulant=True),
    conv("conv2d-dilation2", (1, 2, 7, 7), (3, 2, 3, 3), dilations=[2, 2], pads=[2, 2, 2, 2], circulant=True),
    conv("conv2d-stride2", (1, 3, 7, 7), (4, 3, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1]),
    conv(
        "conv2d-stride2-groups2-dil2",
        (1, 4, 8, 8),
        (4, 2, 3, 3),
        strides=[2, 2],
        group=2,
        dilations=[2, 2],
        pads=[2, 1, 2, 1],
    ),
    conv("conv2d-stride-equals-kernel", (1, 3, 6, 6), (5, 3, 2, 2), strides=[2, 2]),
    conv("conv2d-1x1", (1, 5, 4, 4), (3, 5, 1, 1), bias=True, exact=True),
    conv("conv2d-1x1-groups", (1, 6, 3, 3), (4, 3, 1, 1), group=2, exact=True),
    conv("conv2d-k3-unknown-size", (1, 2, 5, 5), (3, 2, 3, 3), pads=[1, 1, 1, 1], dims=(1, 2, "H", "W")),
    conv(
        "conv2d-s2-unknown-size", (1, 2, 6, 6), (3, 2, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1], dims=(1, 2, "H", "W")
    ),
    conv("conv3d-k3-pad1", (1, 2, 4, 4, 4), (3, 2, 3, 3, 3), pads=[1] * 6, circulant=True),
    conv("conv3d-same-upper-k2", (1, 2, 3, 4, 3), (2, 2, 2, 2, 2), auto_pad="SAME_UPPER", circulant=True),
    conv("conv1d-same-lower-k4-s3", (1, 2, 10), (3, 2, 4), auto_pad="SAME_LOWER", strides=[3]),
    conv("conv3d-stride-mixed", (1, 2, 5, 4, 5), (3, 2, 3, 2, 3), strides=[2, 1, 2], pads=[1, 0, 1, 1, 1, 0]),
    conv_t("convtranspose1d-s2-outpad", (1, 3, 6), (3, 2, 3), strides=[2], pads=[1, 1], output_padding=[1]),
    conv_t("convtranspose1d-k4-s3", (1, 2, 5), (2, 3, 4), strides=[3], pads=[0, 2]),
    conv_t(
        "convtranspose2d-s2-outpad",
        (1, 3, 4, 4),
        (3, 2, 3, 3),
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        output_padding=[1, 1],
    ),
    conv_t("convtranspose2d-groups2", (1, 4, 4, 4), (4, 3, 3, 3), group=2, pads=[1, 1, 1, 1]),
    conv_t("convtranspose2d-dilation2-s2", (1, 2, 4, 3), (2, 3, 3, 2), strides=[2, 2], dilations=[2, 2]),
    conv_t("convtranspose2d-groups2-s2", (1, 4, 3, 3), (4, 1, 2, 2), strides=[2, 2], group=2),
    conv_t("convtranspose2d-same-upper-s2", (1, 2, 3, 4), (2, 2, 3, 3), strides=[2, 2], auto_pad="SAME_UPPER"),
    conv_t("convtranspose2d-output-shape", (1, 2, 3, 3), (2, 2, 3, 3), strides=[2, 2], output_shape=[8, 7]),
    Linear(
        "convtranspose2d-unknown-size",
        (1, 2, 4, 4),
        single("ConvTranspose", {"W": (2, 3, 3, 3)}, strides=[2, 2], pads=[1, 1, 1, 1]),
        dims=(1, 2, "H", "W"),
    ),
    # BatchNormalization, alone and folded
    Linear("batchnorm", (1, 3, 2, 3), lambda rng: ([bn_node("x", "y")], bn_params(rng, 3)), exact=True),
    Linear("conv-bn", (1, 3, 5, 5), conv_bn, layers=1),
    Linear("bn-conv3x3-padded", (1, 4, 5, 5), bn_conv(3, 1), layers=1),
    Linear("bn-conv3x3-groups2", (1, 4, 5, 5), bn_conv(3, 1, groups=2), layers=1),
    Linear("bn-conv1x1", (1, 4, 4, 4), bn_conv(1, 0), exact=True, layers=1),
    Linear("convtranspose-groups-bn", (1, 4, 3, 3), convt_bn, layers=1),
    Linear("gemm-transB-bn", (2, 8), gemm_bn(1), exact=True, layers=1),
    Linear("gemm-bn", (2, 8), gemm_bn(0), exact=True, layers=1),
    Linear("bn-gemm", (2, 8), bn_gemm, exact=True, layers=1),
    # pooling and reductions
    Linear(
        "avgpool-k3-s2-pad1-exclude",
        (1, 2, 7, 7),
        single("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        exact=True,
    ),
    Linear(
        "avgpool-k3-s2-pad1-include",
        (1, 2, 7, 7),
        single("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
        exact=True,
    ),
    Linear(
        "avgpool-ceil-exclude",
        (1, 1, 8, 6),
        single("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 0], ceil_mode=1),
        exact=True,
    ),
    Linear(
        "avgpool-ceil-include",
        (1, 1, 8, 6),
        single("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 0], ceil_mode=1, count_include_pad=1),
        exact=True,
    ),
    Linear(
        "avgpool-ceil-window-in-right-pad",
        (1, 1, 4, 4),
        single("AveragePool", kernel_shape=[3, 3], strides=[3, 3], pads=[2, 2, 2, 2], ceil_mode=1, count_include_pad=1),
        exact=True,
    ),
    Linear(
        "avgpool-ceil-window-in-right-pad-exclude",
        (1, 1, 4, 4),
        single("AveragePool", kernel_shape=[3, 3], strides=[3, 3], pads=[2, 2, 2, 2], ceil_mode=1),
        exact=True,
    ),
    Linear(
        "avgpool-same-lower-s2",
        (1, 1, 7, 6),
        single("AveragePool", kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_LOWER"),
        exact=True,
    ),
    Linear("avgpool-k2-s2", (1, 3, 4, 6), single("AveragePool", kernel_shape=[2, 2], strides=[2, 2]), exact=True),
    Linear(
        "avgpool1d-k3-s1-same", (1, 2, 9), single("AveragePool", kernel_shape=[3], auto_pad="SAME_UPPER"), exact=True
    ),
    Linear(
        "avgpool-dilation2-opset19",
        (1, 1, 9, 7),
        single("AveragePool", kernel_shape=[2, 3], dilations=[2, 2], pads=[1, 1, 1, 1]),
        exact=True,
        opset=19,
    ),
    Linear(
        "avgpool-unknown-size-include",
        (1, 1, 7, 7),
        single("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
        dims=(1, 1, "H", "W"),
    ),
    Linear(
        "avgpool-unknown-size-ceil",
        (1, 1, 8, 8),
        single("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
        dims=(1, 1, "H", "W"),
    ),
    Linear("globalavgpool", (1, 3, 4, 5), single("GlobalAveragePool"), exact=True),
    Linear("reducemean-spatial", (1, 3, 4, 5), single("ReduceMean", axes=[2, 3], keepdims=1), exact=True),
    Linear(
        "reducemean-opset18-axes-input",
        (1, 3, 4, 5),
        single("ReduceMean", consts={"axes": np.array([-1, 1], I64)}, keepdims=0),
        exact=True,
        opset=18,
    ),
    Linear(
        "reducesum-spatial",
        (1, 3, 4, 5),
        single("ReduceSum", consts={"axes": np.array([2, 3], I64)}, keepdims=1),
        exact=True,
    ),
    Linear("reducesum-all", (2, 3, 4), single("ReduceSum", keepdims=0), exact=True),
    # padding and resizing
    Linear(
        "pad-constant",
        (1, 2, 3, 4),
        single("Pad", consts={"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], I64), "value": np.array(0.5, np.float32)}),
        exact=True,
    ),
    Linear(
        "pad-edge",
        (1, 2, 3, 4),
        single("Pad", consts={"pads": np.array([0, 0, 2, 3, 0, 0, 2, 1], I64)}, mode="edge"),
        exact=True,
    ),
    Linear(
        "pad-reflect",
        (1, 2, 4, 5),
        single("Pad", consts={"pads": np.array([0, 0, 3, 2, 0, 0, 2, 4], I64)}, mode="reflect"),
        exact=True,
    ),
    Linear(
        "pad-reflect-crop",
        (1, 2, 4, 5),
        single("Pad", consts={"pads": np.array([0, 0, 2, -1, 0, 0, -1, 3], I64)}, mode="reflect"),
        exact=True,
    ),
    Linear(
        "pad-edge-axes-opset18",
        (1, 2, 3, 4),
        single(
            "Pad",
            consts={
                "pads": np.array([2, 1, 0, 3], I64),
                "value": np.array(0.0, np.float32),
                "axes": np.array([-1, 2], I64),
            },
            inputs=["x", "pads", "value", "axes"],
            mode="edge",
        ),
        exact=True,
        opset=18,
    ),
    Linear(
        "pad-wrap-opset19",
        (1, 1, 3, 4),
        single("Pad", consts={"pads": np.array([0, 0, 2, 5, 0, 0, 1, 1], I64)}, mode="wrap"),
        exact=True,
        opset=19,
    ),
    Linear(
        "resize-nearest-x2",
        (1, 2, 3, 4),
        single(
            "Resize",
            consts={"roi": np.array([], np.float32), "scales": np.array([1, 1, 2, 2], np.float32)},
            mode="nearest",
        ),
        exact=True,
    ),
    Linear(
        "resize-nearest-x1.5",
        (1, 1, 4, 6),
        single(
            "Resize",
            consts={"roi": np.array([], np.float32), "scales": np.array([1, 1, 1.5, 1.5], np.float32)},
            mode="nearest",
        ),
        exact=True,
    ),
    Linear(
        "resize-nearest-x1.5-opset11",
        (1, 1, 4, 6),
        single(
            "Resize",
            consts={"roi": np.array([], np.float32), "scales": np.array([1, 1, 1.5, 1.5], np.float32)},
            mode="nearest",
        ),
        exact=True,
        opset=11,
    ),
    Linear(
        "resize-nearest-sizes-asymmetric-floor",
        (1, 1, 4, 5),
        single(
            "Resize",
            consts={
                "roi": np.array([], np.float32),
                "scales": np.array([], np.float32),
                "sizes": np.array([1, 1, 7, 13], I64),
            },
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        ),
        exact=True,
    ),
    Linear(
        "resize-nearest-x3-round-prefer-ceil",
        (1, 1, 3, 3),
        single(
            "Resize",
            consts={"roi": np.array([], np.float32), "scales": np.array([1, 1, 3, 3], np.float32)},
            mode="nearest",
            nearest_mode="round_prefer_ceil",
        ),
        exact=True,
    ),
    Linear(  # ONNX's test_resize_upsample_sizes_nearest_ceil_half_pixel: an edge input is read 3 times per axis
        "resize-nearest-sizes-half-pixel-ceil",
        (1, 1, 4, 4),
        single(
            "Resize",
            consts={
                "roi": np.array([], np.float32),
                "scales": np.array([], np.float32),
                "sizes": np.array([1, 1, 8, 8], I64),
            },
            mode="nearest",
            coordinate_transformation_mode="half_pixel",
            nearest_mode="ceil",
        ),
        exact=True,
    ),
    Linear(
        "resize-nearest-x2-size-unknown",
        (1, 1, 3, 4),
        single(
            "Resize",
            consts={"roi": np.array([], np.float32), "scales": np.array([1, 1, 2, 2], np.float32)},
            mode="nearest",
            nearest_mode="ceil",
        ),
        dims=(1, 1, "h", "w"),
    ),
    Linear(
        "resize-nearest-align-corners",
        (1, 1, 3, 4),
        single(
            "Resize",
            consts={
                "roi": np.array([], np.float32),
                "scales": np.array([], np.float32),
                "sizes": np.array([1, 1, 7, 9], I64),
            },
            mode="nearest",
            coordinate_transformation_mode="align_corners",
        ),
        exact=True,
    ),
    Linear(
        "resize-nearest-align-corners-size-1",
        (1, 1, 1, 3),
        single(
            "Resize",
            consts={
                "roi": np.array([], np.float32),
                "scales": np.array([], np.float32),
                "sizes": np.array([1, 1, 5, 5], I64),
            },
            mode="nearest",
            coordinate_transformation_mode="align_corners",
        ),
        exact=True,
    ),
    Linear(
        "resize-nearest-tf-crop-zoom",
        (1, 1, 4, 4),
        single(
            "Resize",
            consts={
                "roi": np.array([0, 0, 0, 0, 1, 1, 0.25, 0.25], np.float32),
                "scales": np.array([1, 1, 2, 2], np.float32),
            },
            mode="nearest",
            coordinate_transformation_mode="tf_crop_and_resize",
        ),
    ),
    Linear(
        "resize-nearest-tf-crop-flip-axes-opset18",
        (1, 1, 5, 6),
        single(
            "Resize",
            consts={"roi": np.array([0.1, 0.7, 0.9, 0.2], np.float32), "scales": np.array([1.5, 2], np.float32)},
            mode="nearest",
            axes=[2, 3],
            coordinate_transformation_mode="tf_crop_and_resize",
        ),
        opset=18,
    ),
    Linear(
        "resize-nearest-axes-opset18",
        (1, 1, 3, 4),
        single(
            "Resize",
            consts={"roi": np.array([], np.float32), "scales": np.array([2, 1.5], np.float32)},
            mode="nearest",
            axes=[2, 3],
        ),
        exact=True,
        opset=18,
    ),
    # linear and cubic resize: the product of the axes' interpolation norms, against onnxruntime's Jacobian
    resize("resize-linear-x2", (1, 2, 3, 4), scales=[1, 1, 2, 2], mode="linear"),
    resize("resize-linear-down-half-pixel", (1, 1, 5, 7), scales=[1, 1, 0.6, 0.45], mode="linear"),
    # onnxruntime divides by the integer size, the ONNX reference by scale * n: the larger norm of the two
    resize(
        "resize-linear-down-align-corners-scales",
        (1, 1, 2, 4),
        scales=[1, 1, 0.6, 0.6],
        exact=False,
        mode="linear",
        coordinate_transformation_mode="align_corners",
        differ="onnxruntime divides by the integer size, the reference by scale * n",
    ),
    resize(
        "resize-linear-down-align-corners-sizes",
        (1, 1, 6, 9),
        sizes=[1, 1, 4, 5],
        mode="linear",
        coordinate_transformation_mode="align_corners",
    ),
    resize(
        "resize-linear-pytorch-half-pixel",
        (1, 1, 4, 8),
        sizes=[1, 1, 1, 3],
        mode="linear",
        coordinate_transformation_mode="pytorch_half_pixel",
    ),
    resize(
        "resize-linear-asymmetric",
        (1, 1, 3, 5),
        scales=[1, 1, 2.5, 1.4],
        exact=False,
        mode="linear",
        coordinate_transformation_mode="asymmetric",
        differ="5 * 1.4 is 7 outputs in onnxruntime's float32, 6 in the reference's float64",
    ),
    resize(
        "resize-linear-half-pixel-symmetric",
        (1, 1, 4, 5),
        scales=[1, 1, 0.6, 1.7],
        mode="linear",
        coordinate_transformation_mode="half_pixel_symmetric",
    ),
    resize(
        "resize-linear-tf-crop-extrapolate",
        (1, 1, 4, 5),
        sizes=[1, 1, 6, 7],
        roi=[0, 0, -0.2, 0.1, 1, 1, 1.3, 0.8],
        mode="linear",
        coordinate_transformation_mode="tf_crop_and_resize",
        extrapolation_value=10.0,
    ),
    resize("resize-linear-antialias-down", (1, 1, 8, 9), sizes=[1, 1, 3, 4], mode="linear", antialias=1, opset=18),
    resize("resize-cubic-up", (1, 1, 4, 4), scales=[1, 1, 2, 1.5], mode="cubic"),
    resize("resize-cubic-down", (1, 1, 7, 8), sizes=[1, 1, 3, 5], mode="cubic"),
    resize(
        "resize-cubic-align-corners",
        (1, 1, 4, 5),
        scales=[1, 1, 1.5, 0.8],
        exact=False,
        mode="cubic",
        coordinate_transformation_mode="align_corners",
    ),
    resize(
        "resize-cubic-a-exclude-outside",
        (1, 1, 4, 4),
        scales=[1, 1, 2.5, 0.75],
        mode="cubic",
        cubic_coeff_a=-0.5,
        exclude_outside=1,
    ),
    resize(
        "resize-cubic-asymmetric",
        (1, 1, 4, 4),
        scales=[1, 1, 2, 3],
        mode="cubic",
        coordinate_transformation_mode="asymmetric",
    ),
    resize("resize-cubic-antialias-down", (1, 1, 9, 8), sizes=[1, 1, 4, 3], mode="cubic", antialias=1, opset=18),
    resize("resize-cubic-axes-opset18", (1, 2, 5, 3), scales=[0.8, 2], mode="cubic", axes=[3, 2], opset=18),
    # GridSample with a constant grid (points beyond [-1, 1] exercise the padding): max_n ||M_n||
    grid_sample("gridsample-bilinear-zeros", (2, 2, 4, 5), (2, 3, 6, 2)),
    grid_sample("gridsample-bilinear-border-align", (1, 2, 5, 4), (1, 7, 3, 2), padding_mode="border", align_corners=1),
    grid_sample("gridsample-bilinear-reflection", (2, 1, 4, 4), (2, 5, 5, 2), padding_mode="reflection"),
    grid_sample("gridsample-nearest-zeros", (2, 1, 4, 5), (2, 6, 7, 2), mode="nearest"),
    grid_sample(
        "gridsample-nearest-reflection-align",
        (1, 1, 3, 4),
        (1, 8, 8, 2),
        mode="nearest",
        padding_mode="reflection",
        align_corners=1,
    ),
    grid_sample("gridsample-bicubic-zeros", (2, 1, 4, 5), (2, 4, 3, 2), mode="bicubic"),
    grid_sample("gridsample-bicubic-border", (1, 2, 5, 4), (1, 3, 6, 2), mode="bicubic", padding_mode="border"),
    grid_sample(
        "gridsample-bicubic-reflection-align",
        (1, 1, 4, 4),
        (1, 5, 5, 2),
        mode="bicubic",
        padding_mode="reflection",
        align_corners=1,
    ),
    grid_sample("gridsample-linear-opset20", (1, 1, 4, 5), (1, 3, 3, 2), mode="linear", opset=20),
    grid_sample("gridsample-cubic-opset20", (1, 1, 4, 5), (1, 3, 3, 2), mode="cubic", opset=20),
    grid_sample("gridsample-linear-volume-opset20", (1, 2, 3, 4, 3), (1, 2, 3, 4, 3), mode="linear", opset=20),
    grid_sample("gridsample-nearest-volume-opset20", (2, 1, 3, 3, 4), (2, 4, 2, 3, 3), mode="nearest", opset=20),
    Linear(  # Upsample-9 with a constant scales input: asymmetric linear interpolation
        "upsample-linear-opset9",
        (1, 1, 3, 4),
        single("Upsample", consts={"scales": np.array([1, 1, 2, 1.5], np.float32)}, mode="linear"),
        exact=True,
        opset=9,
    ),
    Linear(
        "resize-nearest-x2-opset10",
        (1, 1, 3, 4),
        single("Resize", consts={"scales": np.array([1, 1, 2, 2], np.float32)}, mode="nearest"),
        exact=True,
        opset=10,
    ),
    Linear(
        "upsample-nearest-x3x2-opset8",
        (1, 1, 3, 4),
        single("Upsample", scales=[1.0, 1.0, 3.0, 2.0]),
        exact=True,
        opset=8,
    ),
    Linear(
        "upsample-nearest-x2-opset9",
        (1, 2, 3, 4),
        single("Upsample", consts={"scales": np.array([1, 1, 2, 2], np.float32)}, mode="nearest"),
        exact=True,
        opset=9,
    ),
    # branches and arithmetic with constants
    Linear("concat-two-convs", (1, 3, 4, 4), two_branches("Concat")),
    Linear("add-two-convs", (1, 3, 4, 4), two_branches("Add")),
    Linear("sub-two-convs", (1, 3, 4, 4), two_branches("Sub")),
    Linear("residual-add", (1, 3, 5, 5), residual),
    Linear(
        "concat-input-with-itself", (2, 3), lambda rng: ([node("Concat", ["x", "x"], ["y"], axis=0)], {}), exact=True
    ),
    Linear(
        "sum-mean-of-branches",
        (2, 3),
        chain(
            ("MatMul", ["x", "W1"], "a", {"W1": (3, 3)}, {}),
            ("Neg", ["x"], "b", {}, {}),
            ("Sum", ["a", "b", "x"], "s", {}, {}),
            ("Mean", ["a", "s"], "y", {}, {}),
        ),
    ),
    Linear("add-const-broadcast-input", (1, 3, 1, 4), single("Add", {"c": (1, 1, 5, 1)}), exact=True),
    Linear("mul-const-per-channel", (1, 3, 2, 4), single("Mul", {"c": (3, 1, 1)}), exact=True),
    Linear("mul-const-broadcast-input", (1, 3, 1, 4), single("Mul", {"c": (1, 1, 5, 1)})),
    Linear("mul-const-left", (2, 5), single("Mul", {"c": (5,)}, inputs=["c", "x"]), exact=True),
    Linear(
        "div-const",
        (1, 3, 2, 4),
        chain(("Div", ["x", "c"], "y", {"c": const(np.array([[[0.5]], [[-4.0]], [[2.5]]], np.float32))}, {})),
        exact=True,
    ),
    Linear("neg", (2, 3), single("Neg"), exact=True),
    # rearrangements, selections, copies
    Linear("transpose", (2, 3, 4), single("Transpose", perm=[2, 0, 1]), exact=True),
    Linear("reshape", (2, 3, 4), single("Reshape", consts={"s": np.array([4, -1], I64)}), exact=True),
    Linear("flatten", (1, 3, 2, 2), single("Flatten", axis=2), exact=True),
    Linear(
        "slice-steps",
        (1, 4, 6),
        single(
            "Slice",
            consts={
                "st": np.array([1, 5], I64),
                "en": np.array([4, 0], I64),
                "ax": np.array([1, 2], I64),
                "sp": np.array([2, -2], I64),
            },
        ),
        exact=True,
    ),
    Linear(
        "split-3",
        (2, 6),
        lambda rng: ([node("Split", ["x", "s"], ["y0", "y1", "y2"], axis=1)], {"s": np.array([1, 2, 3], I64)}),
    ),
    Linear(
        "gather-repeated",
        (2, 4, 3),
        single("Gather", consts={"i": np.array([[0, 2], [2, -2], [1, 3]], I64)}, axis=1),
        exact=True,
    ),
    Linear("gather-scalar-index", (4, 3), single("Gather", consts={"i": np.array(2, I64)}), exact=True),
    Linear("expand", (1, 3, 1, 4), single("Expand", consts={"s": np.array([2, 3, 5, 4], I64)}), exact=True),
    Linear("tile", (1, 2, 3), single("Tile", consts={"r": np.array([2, 1, 3], I64)}), exact=True),
    Linear("depth-to-space", (1, 8, 2, 3), single("DepthToSpace", blocksize=2), exact=True),
    Linear("space-to-depth", (1, 2, 4, 6), single("SpaceToDepth", blocksize=2), exact=True),
    Linear(
        "squeeze-unsqueeze",
        (1, 3, 1, 4),
        chain(
            ("Squeeze", ["x", "a"], "s", {"a": const(np.array([2], I64))}, {}),
            ("Unsqueeze", ["s", "b"], "y", {"b": const(np.array([0], I64))}, {}),
        ),
    ),
    # weights reached through constant subgraphs (folded by the frontend)
    Linear(
        "weight-from-constant-node",
        (3, 8),
        lambda rng: (
            [
                helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(randn(rng, 8, 5), "W")),
                node("Gemm", ["x", "W"], ["y"]),
            ],
            {},
        ),
        exact=True,
        layers=1,
    ),
    Linear(
        "weight-through-transpose",
        (3, 8),
        chain(("Transpose", ["W0"], "W", {"W0": (5, 8)}, {}), ("MatMul", ["x", "W"], "y", {}, {})),
        exact=True,
        layers=1,
    ),
    Linear(
        "weight-through-reshape",
        (1, 3, 5, 5),
        chain(
            ("Reshape", ["W0", "s"], "W", {"W0": (4, 27), "s": const(np.array([4, 3, 3, 3], I64))}, {}),
            ("Conv", ["x", "W"], "y", {}, {"pads": [1, 1, 1, 1]}),
        ),
        layers=1,
    ),
    Linear(
        "weight-through-identity",
        (3, 8),
        chain(("Identity", ["W0"], "W", {"W0": (8, 5)}, {}), ("Gemm", ["x", "W"], "y", {}, {})),
        exact=True,
        layers=1,
    ),
    Linear(
        "weight-cast-from-float16",
        (3, 8),
        chain(
            ("Cast", ["W0"], "W", {"W0": lambda rng: randn(rng, 8, 5).astype(np.float16)}, {"to": TensorProto.FLOAT}),
            ("MatMul", ["x", "W"], "y", {}, {}),
        ),
        exact=True,
        layers=1,
    ),
    Linear(
        "weight-dequantize-int8",
        (3, 8),
        chain(
            (
                "DequantizeLinear",
                ["Wq", "sc", "zp"],
                "W",
                {
                    "Wq": lambda rng: rng.integers(-128, 128, (8, 5)).astype(np.int8),
                    "sc": const(np.array(0.02, np.float32)),
                    "zp": const(np.array(3, np.int8)),
                },
                {},
            ),
            ("MatMul", ["x", "W"], "y", {}, {}),
        ),
        exact=True,
        layers=1,
    ),
    Linear(
        "weight-dequantize-int8-per-channel-conv",
        (1, 3, 4, 4),
        chain(
            (
                "DequantizeLinear",
                ["Wq", "sc", "zp"],
                "W",
                {
                    "Wq": lambda rng: rng.integers(-128, 128, (4, 3, 1, 1)).astype(np.int8),
                    "sc": const(np.array([0.01, 0.02, 0.03, 0.05], np.float32)),
                    "zp": const(np.array([0, 1, -2, 5], np.int8)),
                },
                {"axis": 0},
            ),
            ("Conv", ["x", "W"], "y", {}, {}),
        ),
        exact=True,
        layers=1,
    ),
]


def _outputs(nodes) -> list[str]:
    produced = [o for n in nodes for o in n.output]
    consumed = {i for n in nodes for i in n.input}
    return [o for o in produced if o not in consumed]


@pytest.mark.parametrize("case", LINEAR, ids=lambda c: c.id)
def test_linear_rule_against_dense_jacobian(case: Linear, tmp_path) -> None:
    rng = rng_for(case.id)
    nodes, inits = case.build(rng)
    proto = model(nodes, {"x": case.dims or case.shape}, _outputs(nodes), inits, opset=case.opset)
    path = save(proto, tmp_path)
    report = run_analyse(path, None if case.dims else case.shape)
    assert report.upper_bound is not None, report.unbounded_reasons
    jac = ort_jacobian(path, case.shape)
    exact = sigma_max(jac)
    bound = report.upper_bound
    assert bound >= exact * (1 - CERT_SLACK), f"{case.id}: certified {bound!r} < exact {exact!r}"
    assert all(layer.certified for layer in report.layers)
    if case.layers is not None:
        assert len(report.layers) == case.layers, [(la.name, la.op) for la in report.layers]
    claims_exact = len(report.layers) == 1 and report.layers[0].exact
    if case.exact or claims_exact:
        assert bound == pytest.approx(exact, rel=EXACT_TOL), f"{case.id}: {bound} vs exact {exact}"
    if case.circulant is not None:
        weight = inits["W"]
        d = weight.ndim - 2
        grid = [n + case.circulant["pads"][i] + case.circulant["pads"][i + d] for i, n in enumerate(case.shape[2:])]
        circular = circular_embedding_norm(weight, grid, case.circulant["groups"], case.circulant["dilation"])
        assert bound <= circular * (1 + 1e-9), f"{case.id}: {bound} above the circular embedding {circular}"


# ---------------------------------------------------------------------------------------------
# Elementwise activations: max |f'| on a fine grid, from the float64 formula checked against ORT

T64 = torch.float64
GRID = np.concatenate([np.linspace(-12.0, 12.0, 240_001), [-60.0, -30.0, 30.0, 60.0]])
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _softplus(t):
    return torch.nn.functional.softplus(t, beta=1.0, threshold=1e9)


@dataclass
class Activation:
    id: str
    op: str
    formula: Callable[[torch.Tensor], torch.Tensor]  # float64 reference
    attrs: dict = field(default_factory=dict)
    consts: dict = field(default_factory=dict)  # extra constant inputs, in order
    opset: int = 17


def f32(value: float) -> float:
    """A constant as the float32 attribute onnxruntime computes with."""
    return float(np.float32(value))


def _clip(lo, hi):
    return lambda t: t.clamp(lo, hi)


ACTIVATIONS = [
    Activation("relu", "Relu", torch.relu),
    Activation("leakyrelu-0.1", "LeakyRelu", lambda t: torch.where(t >= 0, t, f32(0.1) * t), {"alpha": 0.1}),
    Activation("leakyrelu-2.5", "LeakyRelu", lambda t: torch.where(t >= 0, t, 2.5 * t), {"alpha": 2.5}),
    Activation("leakyrelu--1.5", "LeakyRelu", lambda t: torch.where(t >= 0, t, -1.5 * t), {"alpha": -1.5}),
    Activation(
        "prelu-0.25",
        "PRelu",
        lambda t: torch.where(t >= 0, t, 0.25 * t),
        consts={"slope": np.array([0.25], np.float32)},
    ),
    Activation(
        "prelu--2", "PRelu", lambda t: torch.where(t >= 0, t, -2.0 * t), consts={"slope": np.array([-2.0], np.float32)}
    ),
    Activation("elu", "Elu", lambda t: torch.where(t > 0, t, torch.expm1(t))),
    Activation("elu-2", "Elu", lambda t: torch.where(t > 0, t, 2.0 * torch.expm1(t)), {"alpha": 2.0}),
    Activation("elu-0.5", "Elu", lambda t: torch.where(t > 0, t, 0.5 * torch.expm1(t)), {"alpha": 0.5}),
    Activation(
        "selu",
        "Selu",
        lambda t: f32(1.0507009873554805) * torch.where(t > 0, t, f32(1.6732632423543772) * torch.expm1(t)),
    ),
    Activation(
        "selu-custom", "Selu", lambda t: 1.5 * torch.where(t > 0, t, 0.5 * torch.expm1(t)), {"alpha": 0.5, "gamma": 1.5}
    ),
    Activation("celu", "Celu", lambda t: t.clamp_min(0) + (torch.expm1(t)).clamp_max(0)),
    Activation(
        "celu-0.5", "Celu", lambda t: t.clamp_min(0) + (0.5 * torch.expm1(t / 0.5)).clamp_max(0), {"alpha": 0.5}
    ),
    Activation("tanh", "Tanh", torch.tanh),
    Activation("sigmoid", "Sigmoid", torch.sigmoid),
    Activation("hardsigmoid", "HardSigmoid", lambda t: (0.2 * t + 0.5).clamp(0, 1)),
    Activation(
        "hardsigmoid-1/6", "HardSigmoid", lambda t: (f32(1 / 6) * t + 0.5).clamp(0, 1), {"alpha": 1 / 6, "beta": 0.5}
    ),
    Activation(
        "hardsigmoid--0.7",
        "HardSigmoid",
        lambda t: (f32(-0.7) * t + f32(0.2)).clamp(0, 1),
        {"alpha": -0.7, "beta": 0.2},
    ),
    Activation("hardswish", "HardSwish", lambda t: t * (t / 6 + 0.5).clamp(0, 1), opset=14),
    Activation("gelu", "Gelu", lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))), opset=20),
    Activation(
        "gelu-tanh",
        "Gelu",
        lambda t: 0.5 * t * (1 + torch.tanh(SQRT_2_OVER_PI * (t + 0.044715 * t**3))),
        {"approximate": "tanh"},
        opset=20,
    ),
    Activation("softplus", "Softplus", _softplus),
    Activation("mish", "Mish", lambda t: t * torch.tanh(_softplus(t)), opset=18),
    Activation("swish", "Swish", lambda t: t * torch.sigmoid(t), opset=24),
    Activation("swish-2.5", "Swish", lambda t: t * torch.sigmoid(f32(2.5) * t), {"alpha": 2.5}, opset=24),
    Activation("swish--0.4", "Swish", lambda t: t * torch.sigmoid(f32(-0.4) * t), {"alpha": -0.4}, opset=24),
    Activation("swish-0", "Swish", lambda t: t * 0.5, {"alpha": 0.0}, opset=24),
    Activation(
        "clip", "Clip", _clip(-1.0, 2.0), consts={"lo": np.array(-1.0, np.float32), "hi": np.array(2.0, np.float32)}
    ),
    Activation("clip-opset6", "Clip", _clip(-0.5, 0.5), {"min": -0.5, "max": 0.5}, opset=6),
    Activation("softsign", "Softsign", lambda t: t / (1 + t.abs())),
    Activation("sin", "Sin", torch.sin),
    Activation("cos", "Cos", torch.cos),
    Activation("atan", "Atan", torch.atan),
    Activation("asinh", "Asinh", torch.asinh, opset=9),
    Activation("erf", "Erf", torch.erf),
    Activation("abs", "Abs", torch.abs),
    Activation("max-const", "Max", lambda t: t.clamp_min(0.5), consts={"c": np.array([0.5], np.float32)}),
    Activation("min-const", "Min", lambda t: t.clamp_max(-0.5), consts={"c": np.array(-0.5, np.float32)}),
]


def max_slope(formula: Callable[[torch.Tensor], torch.Tensor], h: float = 1e-5) -> float:
    """max |f'| over GRID by central differences in float64 (truncation and rounding < 1e-9)."""
    t = torch.as_tensor(GRID, dtype=T64)
    upper, lower = t + h, t - h
    return float(((formula(upper) - formula(lower)) / (upper - lower)).abs().max())


def check_formula(path, formula: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """The float64 formula must be the function onnxruntime computes (float32), to 1e-5."""
    x = np.linspace(-8, 8, 4001).astype(np.float32)
    got = Runner(path)(x)
    want = formula(torch.as_tensor(x, dtype=T64)).numpy()
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max())), "formula differs from ORT"


@pytest.mark.parametrize("case", ACTIVATIONS, ids=lambda c: c.id)
def test_activation_constant_is_max_slope(case: Activation, tmp_path) -> None:
    proto = model(
        [node(case.op, ["x", *case.consts], ["y"], **case.attrs)], {"x": ["N"]}, ["y"], case.consts, opset=case.opset
    )
    path = save(proto, tmp_path)
    check_formula(path, case.formula)
    numeric = max_slope(case.formula)
    report = run_analyse(path, (16,))
    (layer,) = report.layers
    assert layer.certified and report.upper_bound == layer.lipschitz
    assert layer.lipschitz >= numeric * (1 - 1e-9), f"{case.id}: {layer.lipschitz} < max slope {numeric}"
    assert layer.lipschitz <= numeric * (1 + SLOPE_TOL), f"{case.id}: {layer.lipschitz} vs max slope {numeric}"


def slope_range(formula: Callable[[torch.Tensor], torch.Tensor], h: float = 1e-5) -> tuple[float, float]:
    """(min f', max f') over GRID by central differences in float64."""
    t = torch.as_tensor(GRID, dtype=T64)
    quotients = (formula(t + h) - formula(t - h)) / (2 * h)
    return float(quotients.min()), float(quotients.max())


@pytest.mark.parametrize("case", ACTIVATIONS, ids=lambda c: c.id)
def test_activation_slope_interval_holds_every_derivative(case: Activation, tmp_path) -> None:
    """The chain bounds' slope facet: every f'(x) (hence every difference quotient) lies in [low, high]."""
    proto = model(
        [node(case.op, ["x", *case.consts], ["y"], **case.attrs)], {"x": ["N"]}, ["y"], case.consts, opset=case.opset
    )
    graph = load_graph(save(proto, tmp_path), ["16"])
    (layer,) = graph.nodes
    op = ops.get(layer.op)
    slope = op.slope(layer, graph) if op is not None else None
    if slope is None:
        pytest.skip(f"{case.op} has no slope interval (not used in chain bounds)")
    low, high = slope_range(case.formula)
    tolerance = 1e-7 * max(1.0, abs(low), abs(high))
    assert slope.low <= low + tolerance and high <= slope.high + tolerance, (case.id, slope, low, high)
    assert slope.lipschitz >= max(abs(low), abs(high)) - tolerance


# ---------------------------------------------------------------------------------------------
# Softmax, LogSoftmax, MaxPool, LpPool, GlobalMaxPool: search for the largest Jacobian norm


@dataclass
class Vector:
    id: str
    shape: tuple[int, ...]
    op: str
    attrs: dict
    torch_fn: Callable[[torch.Tensor], torch.Tensor]  # the same function, float64
    opset: int = 17
    tight: bool = True  # the search must reach the bound (to 1e-3)


def _window_norm(x: torch.Tensor, k: int, s: int, p: float, pad: int = 0) -> torch.Tensor:
    windows = F.pad(x, (pad, pad)).unfold(-1, k, s)
    return windows.abs().pow(p).sum(-1).pow(1 / p)


VECTOR = [
    Vector("softmax", (2, 5), "Softmax", {"axis": -1}, lambda t: torch.softmax(t, -1)),
    Vector("softmax-axis0", (4, 3), "Softmax", {"axis": 0}, lambda t: torch.softmax(t, 0)),
    Vector(
        "softmax-opset11-coerce",
        (1, 2, 3),
        "Softmax",
        {"axis": 1},
        lambda t: torch.softmax(t.reshape(1, -1), -1).reshape(t.shape),
        opset=11,
    ),
    Vector("logsoftmax", (1, 5), "LogSoftmax", {"axis": -1}, lambda t: torch.log_softmax(t, -1), tight=False),
    Vector("logsoftmax-n2", (3, 2), "LogSoftmax", {"axis": 1}, lambda t: torch.log_softmax(t, 1), tight=False),
    Vector(
        "maxpool2d-k3-s1-pad1",
        (1, 1, 6, 6),
        "MaxPool",
        {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
        lambda t: F.max_pool2d(t, 3, 1, 1),
    ),
    Vector(
        "maxpool2d-k3-s2",
        (1, 1, 7, 7),
        "MaxPool",
        {"kernel_shape": [3, 3], "strides": [2, 2]},
        lambda t: F.max_pool2d(t, 3, 2),
    ),
    Vector(
        "maxpool2d-k2-s2",
        (1, 2, 4, 4),
        "MaxPool",
        {"kernel_shape": [2, 2], "strides": [2, 2]},
        lambda t: F.max_pool2d(t, 2, 2),
    ),
    Vector(
        "maxpool2d-k3-s1-dil2",
        (1, 1, 9, 9),
        "MaxPool",
        {"kernel_shape": [3, 3], "dilations": [2, 2]},
        lambda t: F.max_pool2d(t, 3, 1, dilation=2),
    ),
    Vector(
        "maxpool1d-k3-s2-pad1-ceil",
        (1, 2, 8),
        "MaxPool",
        {"kernel_shape": [3], "strides": [2], "pads": [1, 1], "ceil_mode": 1},
        lambda t: F.max_pool1d(t, 3, 2, 1, ceil_mode=True),
    ),
    Vector("globalmaxpool", (1, 3, 3, 4), "GlobalMaxPool", {}, lambda t: t.amax(dim=(2, 3), keepdim=True)),
    Vector(
        "lppool1d-p2-k3-s1", (1, 2, 8), "LpPool", {"kernel_shape": [3], "p": 2}, lambda t: _window_norm(t, 3, 1, 2.0)
    ),
    Vector(
        "lppool1d-p1-k4-s4",
        (1, 2, 8),
        "LpPool",
        {"kernel_shape": [4], "strides": [4], "p": 1},
        lambda t: _window_norm(t, 4, 4, 1.0),
    ),
    Vector(
        "lppool1d-p1-k3-s2-pad1",
        (1, 1, 9),
        "LpPool",
        {"kernel_shape": [3], "strides": [2], "pads": [1, 1], "p": 1},
        lambda t: _window_norm(t, 3, 2, 1.0, pad=1),
        tight=False,
    ),
    Vector(
        "lppool1d-p3-k2-s2",
        (1, 2, 6),
        "LpPool",
        {"kernel_shape": [2], "strides": [2], "p": 3},
        lambda t: _window_norm(t, 2, 2, 3.0),
    ),
    Vector("globallppool-p1", (1, 2, 2, 3), "GlobalLpPool", {"p": 1}, lambda t: t.abs().sum(dim=(2, 3), keepdim=True)),
    Vector(
        "globallppool-p2",
        (1, 2, 2, 3),
        "GlobalLpPool",
        {"p": 2},
        lambda t: t.pow(2).sum(dim=(2, 3), keepdim=True).sqrt(),
    ),
    Vector("reducel1", (2, 5), "ReduceL1", {"axes": [1], "keepdims": 0}, lambda t: t.abs().sum(1)),
    Vector("reducel1-all", (2, 3), "ReduceL1", {"keepdims": 1}, lambda t: t.abs().sum().reshape(1, 1)),
    Vector("reducelogsumexp", (3, 4), "ReduceLogSumExp", {"axes": [0], "keepdims": 1},
           lambda t: torch.logsumexp(t, 0, keepdim=True)),
]  # fmt: skip


def jacobian_norm(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, create_graph=False) -> torch.Tensor:
    jac = torch.autograd.functional.jacobian(fn, x, create_graph=create_graph, vectorize=True)
    if not torch.isfinite(jac).all():  # a point where fn is not differentiable (|t| at 0, p-norm at 0)
        return torch.zeros((), dtype=T64)
    return torch.linalg.matrix_norm(jac.reshape(fn(x).numel(), x.numel()), ord=2)


def largest_jacobian_norm(fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...], tag: str) -> float:
    """A lower bound of the Lipschitz constant: random points, spikes, then gradient ascent."""
    gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    n = math.prod(shape)
    candidates = [
        torch.randn(shape, generator=gen, dtype=T64) * scale for scale in (0.1, 1.0, 3.0, 10.0) for _ in range(10)
    ]
    for i in range(n):  # one entry far above the others: the max-pool worst case
        spike = torch.randn(n, generator=gen, dtype=T64) * 0.01
        spike[i] = 10.0
        candidates.append(spike.reshape(shape))
    for i in range(n):  # two equal large entries: the softmax worst case
        pair = torch.zeros(n, dtype=T64)
        pair[i] = pair[(i + 1) % n] = 20.0
        candidates.append(pair.reshape(shape))
    candidates.append(torch.ones(shape, dtype=T64))
    values = [float(jacobian_norm(fn, x)) for x in candidates]
    best = max(values)
    for start in sorted(range(len(values)), key=values.__getitem__)[-3:]:
        x = candidates[start].clone().requires_grad_(True)
        optimiser = torch.optim.Adam([x], lr=0.05)
        for _ in range(40):
            optimiser.zero_grad()
            value = jacobian_norm(fn, x, create_graph=True)
            best = max(best, float(value.detach()))
            if not value.requires_grad:  # piecewise-constant Jacobian (max pooling): nothing to climb
                break
            (-value).backward()
            optimiser.step()
    return best


@pytest.mark.parametrize("case", VECTOR, ids=lambda c: c.id)
def test_vector_op_bound_beats_search(case: Vector, tmp_path) -> None:
    proto = model([node(case.op, ["x"], ["y"], **case.attrs)], {"x": case.shape}, ["y"], opset=case.opset)
    path = save(proto, tmp_path)
    x = np.random.default_rng(1).standard_normal(case.shape).astype(np.float32)
    got = Runner(path).outputs(x)[0]
    want = case.torch_fn(torch.as_tensor(x, dtype=T64)).numpy()
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-5), "torch twin differs from ORT"
    report = run_analyse(path, case.shape)
    found = largest_jacobian_norm(case.torch_fn, case.shape, case.id)
    bound = report.upper_bound
    assert bound is not None and bound >= found * (1 - 1e-9), f"{case.id}: bound {bound} < found {found}"
    if case.tight or report.layers[0].exact:
        assert bound <= found * (1 + SLOPE_TOL), f"{case.id}: bound {bound}, search found {found}"


# ---------------------------------------------------------------------------------------------
# Normalisations with epsilon: max|scale| / sqrt(eps), the slope at a constant input


@dataclass
class Normalisation:
    id: str
    shape: tuple[int, ...]
    op: str
    attrs: dict
    consts: dict  # the scale and bias inputs, in order
    torch_fn: Callable[[torch.Tensor], torch.Tensor]
    opset: int = 17


def _t(value: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(value, dtype=T64)


_G8 = np.array([2.5, -0.5, 1.0, 0.75, -1.25, 0.5, 1.5, -2.0], np.float32)
_B8 = np.linspace(-1, 1, 8).astype(np.float32)
_G3 = np.array([0.5, -2.0, 1.5], np.float32)
_B3 = np.array([0.1, 0.0, -0.3], np.float32)
EPS32 = float(np.float32(1e-3))


def _group_norm(t: torch.Tensor, groups: int, scale: np.ndarray, bias: np.ndarray) -> torch.Tensor:
    grouped = t.reshape(t.shape[0], groups, -1)
    centred = grouped - grouped.mean(-1, keepdim=True)
    normalised = (centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + EPS32)).reshape(t.shape)
    shape = (1, -1, *([1] * (t.dim() - 2)))
    return normalised * _t(scale).reshape(shape) + _t(bias).reshape(shape)


def _lrn(t: torch.Tensor, size: int, alpha: float, beta: float, bias: float) -> torch.Tensor:
    """ONNX's LRN: the window of channel c is [c - floor((size-1)/2), c + ceil((size-1)/2)]."""
    channels = t.shape[1]
    sums = torch.stack(
        [t[:, max(0, c - (size - 1) // 2) : c + size // 2 + 1].pow(2).sum(1) for c in range(channels)], 1
    )
    return t / (bias + alpha / size * sums).pow(beta)


NORMALISATIONS = [
    Normalisation("layernorm", (2, 8), "LayerNormalization", {"axis": -1, "epsilon": 1e-3},
                  {"g": _G8, "b": _B8}, lambda t: F.layer_norm(t, (8,), _t(_G8), _t(_B8), EPS32)),
    Normalisation("layernorm-2d", (1, 2, 4), "LayerNormalization", {"axis": 1, "epsilon": 1e-3},
                  {"g": _G8.reshape(2, 4), "b": _B8.reshape(2, 4)},
                  lambda t: F.layer_norm(t, (2, 4), _t(_G8.reshape(2, 4)), _t(_B8.reshape(2, 4)), EPS32)),
    Normalisation("instancenorm", (1, 3, 2, 2), "InstanceNormalization", {"epsilon": 1e-3},
                  {"g": _G3, "b": _B3}, lambda t: F.instance_norm(t, weight=_t(_G3), bias=_t(_B3), eps=EPS32)),
    Normalisation("groupnorm", (1, 4, 3), "GroupNormalization", {"epsilon": 1e-3, "num_groups": 2},
                  {"g": _G8[:4], "b": _B8[:4]},
                  lambda t: _group_norm(t, 2, _G8[:4], _B8[:4]), opset=21),
    Normalisation("rmsnorm", (2, 8), "RMSNormalization", {"axis": -1, "epsilon": 1e-3}, {"g": _G8},
                  lambda t: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + EPS32) * _t(_G8), opset=23),
    Normalisation("mvn", (1, 2, 3, 2), "MeanVarianceNormalization", {"axes": [2, 3]}, {},
                  lambda t: (t - t.mean((2, 3), keepdim=True))
                  / (t.var((2, 3), unbiased=False, keepdim=True).sqrt() + float(np.float32(1e-9)))),
    Normalisation("lrn", (1, 5, 2, 1), "LRN", {"size": 3, "alpha": 1.0, "beta": 0.75, "bias": 1.0}, {},
                  lambda t: _lrn(t, 3, 1.0, 0.75, 1.0)),
    Normalisation("lrn-5", (1, 6, 1, 1), "LRN", {"size": 5, "alpha": 2.0, "beta": 0.5, "bias": 0.5}, {},
                  lambda t: _lrn(t, 5, 2.0, 0.5, 0.5)),
]  # fmt: skip


@pytest.mark.parametrize("case", NORMALISATIONS, ids=lambda c: c.id)
def test_normalisation_constant_is_max_jacobian_norm(case: Normalisation, tmp_path) -> None:
    """The bound against a search for the largest Jacobian norm of a float64 twin checked against ORT."""
    proto = model([node(case.op, ["x", *case.consts], ["y"], **case.attrs)], {"x": case.shape}, ["y"],
                  case.consts, opset=case.opset)  # fmt: skip
    path = save(proto, tmp_path)
    x = np.random.default_rng(2).standard_normal(case.shape).astype(np.float32)
    got = Runner(path).outputs(x)[0]
    want = case.torch_fn(torch.as_tensor(x, dtype=T64)).numpy()
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4), "torch twin differs from ORT"
    report = run_analyse(path, case.shape)
    (layer,) = report.layers
    # the constant is reached at (or towards) constant inputs: search there too
    gen = torch.Generator().manual_seed(3)
    near_constant = [
        torch.full(case.shape, 0.7, dtype=T64) + 1e-12 * torch.randn(case.shape, generator=gen, dtype=T64)
        for _ in range(4)
    ]
    found = max(
        largest_jacobian_norm(case.torch_fn, case.shape, case.id),
        *(float(jacobian_norm(case.torch_fn, x)) for x in near_constant),
    )
    assert report.upper_bound is not None and layer.certified
    assert report.upper_bound >= found * (1 - 1e-9), f"{case.id}: bound {report.upper_bound} < found {found}"
    if layer.exact:
        assert report.upper_bound <= found * (1 + SLOPE_TOL), f"{case.id}: {report.upper_bound} vs {found}"


# ---------------------------------------------------------------------------------------------
# Activations as exporters decompose them into primitive ops


def _silu(rng):
    return [node("Sigmoid", ["x"], ["s"]), node("Mul", ["x", "s"], ["y"])], {}


def _silu_div(rng):
    return [
        node("Neg", ["x"], ["n"]),
        node("Exp", ["n"], ["e"]),
        node("Add", ["e", "one"], ["d"]),
        node("Div", ["x", "d"], ["y"]),
    ], {"one": np.array(1.0, np.float32)}


def _hardswish(rng):
    return [node("HardSigmoid", ["x"], ["h"], alpha=1 / 6, beta=0.5), node("Mul", ["x", "h"], ["y"])], {}


def _mish(rng):
    return [node("Softplus", ["x"], ["sp"]), node("Tanh", ["sp"], ["t"]), node("Mul", ["x", "t"], ["y"])], {}


def _gelu_erf(rng):
    return [
        node("Div", ["x", "r2"], ["d"]),
        node("Erf", ["d"], ["e"]),
        node("Add", ["e", "one"], ["a"]),
        node("Mul", ["x", "a"], ["m"]),
        node("Mul", ["m", "half"], ["y"]),
    ], {"r2": np.array(1.4142135, np.float32), "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32)}


def _gelu_tanh(rng):
    return [
        node("Pow", ["x", "three"], ["p"]),
        node("Mul", ["p", "c"], ["pc"]),
        node("Add", ["x", "pc"], ["s"]),
        node("Mul", ["s", "k"], ["sk"]),
        node("Tanh", ["sk"], ["t"]),
        node("Add", ["t", "one"], ["a"]),
        node("Mul", ["x", "a"], ["m"]),
        node("Mul", ["m", "half"], ["y"]),
    ], {
        "three": np.array(3.0, np.float32),
        "c": np.array(0.044715, np.float32),
        "k": np.array(SQRT_2_OVER_PI, np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
    }


DECOMPOSED = [
    ("silu", _silu, "SiLU", lambda t: t * torch.sigmoid(t)),
    ("silu-div-exp", _silu_div, "SiLU", lambda t: t * torch.sigmoid(t)),
    ("hardswish", _hardswish, "HardSwish", lambda t: t * (f32(1 / 6) * t + 0.5).clamp(0, 1)),
    ("mish", _mish, "Mish", lambda t: t * torch.tanh(_softplus(t))),
    ("gelu-erf", _gelu_erf, "GELU", lambda t: 0.5 * t * (1 + torch.erf(t / f32(1.4142135)))),
    (
        "gelu-tanh-pow",
        _gelu_tanh,
        "GELU (tanh)",
        lambda t: 0.5 * t * (1 + torch.tanh(f32(SQRT_2_OVER_PI) * (t + f32(0.044715) * t**3))),
    ),
]


@pytest.mark.parametrize(("build", "name", "formula"), [c[1:] for c in DECOMPOSED], ids=[c[0] for c in DECOMPOSED])
def test_decomposed_activation_is_recognised(build, name, formula, tmp_path) -> None:
    nodes, inits = build(None)
    path = save(model(nodes, {"x": ["N"]}, ["y"], inits), tmp_path)
    check_formula(path, formula)
    numeric = max_slope(formula)
    report = run_analyse(path, (16,))
    assert report.upper_bound is not None, report.unbounded_reasons
    assert name in [layer.op for layer in report.layers], [(la.op, la.method) for la in report.layers]
    assert report.upper_bound >= numeric * (1 - 1e-9)
    assert report.upper_bound <= numeric * (1 + SLOPE_TOL), f"{report.upper_bound} vs max slope {numeric}"


def _softplus_dynamo(beta: float, threshold: float):
    """How torch.onnx's dynamo exporter writes nn.Softplus(beta, threshold)."""

    def build(rng):
        return [
            node("Mul", ["x", "beta"], ["bx"]),
            node("Softplus", ["bx"], ["sp"]),
            node("Div", ["sp", "beta"], ["soft"]),
            node("Greater", ["bx", "threshold"], ["above"]),
            node("Where", ["above", "x", "soft"], ["y"], name="switch"),
        ], {"beta": np.array(beta, np.float32), "threshold": np.array(threshold, np.float32)}

    return build


def _relu_where(rng):
    return [node("Greater", ["x", "zero"], ["pos"]), node("Where", ["pos", "x", "zero"], ["y"], name="switch")], {
        "zero": np.array(0.0, np.float32)
    }


SWITCHES = [
    ("softplus-dynamo-beta2", _softplus_dynamo(2.0, 20.0), lambda t: torch.where(2 * t > 20, t, _softplus(2 * t) / 2)),
    (
        "softplus-dynamo-beta0.5-threshold30",
        _softplus_dynamo(0.5, 30.0),
        lambda t: torch.where(t > 60, t, 2 * _softplus(t / 2)),
    ),
    ("relu-as-where", _relu_where, torch.relu),
]


@pytest.mark.parametrize(("build", "formula"), [c[1:] for c in SWITCHES], ids=[c[0] for c in SWITCHES])
def test_switch_whose_pieces_meet_is_the_larger_piece_constant(build, formula, tmp_path) -> None:
    nodes, inits = build(None)
    path = save(model(nodes, {"x": ["N"]}, ["y"], inits), tmp_path)
    numeric = max_slope(formula)
    report = run_analyse(path, (16,))
    assert [layer.op for layer in report.layers] == ["Piecewise"], report.unbounded_reasons
    assert numeric * (1 - 1e-9) <= report.upper_bound <= numeric * (1 + SLOPE_TOL)
    function = interpret(prepare(load_graph(str(path), ["16"])))
    x = np.linspace(-30, 30, 16).astype(np.float32)
    np.testing.assert_allclose(function(torch.as_tensor(x)).numpy(), Runner(path)(x), rtol=1e-6, atol=1e-6)


def _pieces_apart(rng):
    """x + 1 above 0 and x below: a jump of 1."""
    return [
        node("Greater", ["x", "zero"], ["pos"]),
        node("Add", ["x", "one"], ["up"]),
        node("Where", ["pos", "up", "x"], ["y"], name="switch"),
    ], {"zero": np.array(0.0, np.float32), "one": np.array(1.0, np.float32)}


def _hidden_switches(rng):
    """u = x + 1e6 * a tent on [40.0001, 40.0002], between the grid's points, crosses 50 inside the tent too:
    x above and 100 - x below meet at 50 but not there (a jump of 20 that no grid point sees)."""
    shifts = [node("Sub", ["x", f"k{i}"], [f"s{i}"]) for i in range(3)]
    relus = [node("Relu", [f"s{i}"], [f"r{i}"]) for i in range(3)]
    return [
        *shifts,
        *relus,
        node("Mul", ["r1", "two"], ["r1x2"]),
        node("Sub", ["r0", "r1x2"], ["d"]),
        node("Add", ["d", "r2"], ["tent"]),
        node("Mul", ["tent", "big"], ["bump"]),
        node("Add", ["x", "bump"], ["u"]),
        node("Greater", ["u", "t"], ["above"]),
        node("Sub", ["hundred", "x"], ["mirror"]),
        node("Where", ["above", "x", "mirror"], ["y"], name="switch"),
    ], {
        "k0": np.array(40.0001, np.float32),
        "k1": np.array(40.00015, np.float32),
        "k2": np.array(40.0002, np.float32),
        "two": np.array(2.0, np.float32),
        "big": np.array(1e6, np.float32),
        "t": np.array(50.0, np.float32),
        "hundred": np.array(100.0, np.float32),
    }


APART = [
    ("pieces-apart", _pieces_apart, "Greater_pos"),
    ("switch-not-affine", _hidden_switches, "Greater_above"),
    # torch's Softplus(beta=0.5, threshold=3) jumps by 2 softplus(3) - 6 = 0.097 at x = 6
    ("softplus-dynamo-threshold3", _softplus_dynamo(0.5, 3.0), "Greater_above"),
]


@pytest.mark.parametrize(("build", "comparison"), [c[1:] for c in APART], ids=[c[0] for c in APART])
def test_switch_whose_pieces_may_not_meet_is_not_lipschitz(build, comparison, tmp_path) -> None:
    nodes, inits = build(None)
    path = save(model(nodes, {"x": ["N"]}, ["y"], inits), tmp_path)
    report = run_analyse(path, (16,))
    assert report.upper_bound is None
    assert [(r.node, r.op) for r in report.unbounded_reasons] == [(comparison, "Greater")]
    assert "pieces meet" in report.unbounded_reasons[0].reason


def _x_times_relu(rng):
    return [node("Relu", ["x"], ["r"]), node("Mul", ["x", "r"], ["y"], name="gate")], {}


def _two_linear_branches(rng):
    return [
        node("MatMul", ["x", "W1"], ["a"]),
        node("MatMul", ["x", "W2"], ["b"]),
        node("Mul", ["a", "b"], ["y"], name="gate"),
    ], {"W1": randn(rng, 4, 4), "W2": randn(rng, 4, 4)}


def _x_times_sigmoid_of_other(rng):  # a gated unit: Linear_a(x) * sigmoid(Linear_b(x))
    return [
        node("MatMul", ["x", "W1"], ["a"]),
        node("MatMul", ["x", "W2"], ["b"]),
        node("Sigmoid", ["b"], ["s"]),
        node("Mul", ["a", "s"], ["y"], name="gate"),
    ], {"W1": randn(rng, 4, 4), "W2": randn(rng, 4, 4)}


def _layernorm(rng):
    return [
        node("LayerNormalization", ["x", "g", "b"], ["n"], name="gate", axis=-1),
        node("MatMul", ["n", "W"], ["y"]),
    ], {"g": randn(rng, 4), "b": randn(rng, 4), "W": randn(rng, 4, 3)}


def _lpnormalization(rng):
    return [
        node("LpNormalization", ["x"], ["n"], name="gate", axis=-1, p=2),
        node("MatMul", ["n", "W"], ["y"]),
    ], {"W": randn(rng, 4, 3)}


def _exp(rng):
    return [node("MatMul", ["x", "W"], ["a"]), node("Exp", ["a"], ["e"], name="gate"), node("Relu", ["e"], ["y"])], {
        "W": randn(rng, 4, 4)
    }


def _div_by_activation(rng):
    return [
        node("MatMul", ["x", "W1"], ["a"]),
        node("MatMul", ["x", "W2"], ["b"]),
        node("Sigmoid", ["b"], ["s"]),
        node("Div", ["a", "s"], ["y"], name="gate"),
    ], {"W1": randn(rng, 4, 4), "W2": randn(rng, 4, 4)}


def _attention_scores(rng):
    return [
        node("MatMul", ["x", "Wq"], ["q"]),
        node("Transpose", ["x"], ["xt"], perm=[1, 0]),
        node("MatMul", ["q", "xt"], ["s"], name="gate"),
        node("Softmax", ["s"], ["y"]),
    ], {"Wq": randn(rng, 4, 4)}


def _unary_gate(op: str, shift: float = 0.0):
    """MatMul, Sigmoid (so the inverse functions stay in their domains), + shift, then ``op``."""

    def build(rng):
        return [
            node("MatMul", ["x", "W"], ["a"]),
            node("Sigmoid", ["a"], ["s"]),
            node("Add", ["s", "shift"], ["u"]),
            node(op, ["u"], ["y"], name="gate"),
        ], {"W": randn(rng, 4, 4), "shift": np.array(shift, np.float32)}

    return build


NOT_LIPSCHITZ = [
    ("x-times-relu", _x_times_relu, "Mul"),
    ("product-of-two-linear-branches", _two_linear_branches, "Mul"),
    ("gated-linear-unit", _x_times_sigmoid_of_other, "Mul"),
    ("lpnormalization", _lpnormalization, "LpNormalization"),
    ("exp", _exp, "Exp"),
    ("div-by-activation", _div_by_activation, "Div"),
    ("matmul-of-two-activations", _attention_scores, "MatMul"),
    *((op.lower(), _unary_gate(op), op) for op in ("Asin", "Acos", "Atanh", "Tan", "Sinh")),
    ("acosh", _unary_gate("Acosh", 1.0), "Acosh"),
    ("reducesumsquare", _unary_gate("ReduceSumSquare"), "ReduceSumSquare"),
    ("reducelogsum", _unary_gate("ReduceLogSum"), "ReduceLogSum"),
    ("reduceprod", _unary_gate("ReduceProd"), "ReduceProd"),
]


@pytest.mark.parametrize(("build", "op"), [c[1:] for c in NOT_LIPSCHITZ], ids=[c[0] for c in NOT_LIPSCHITZ])
def test_not_globally_lipschitz_is_named(build, op, tmp_path) -> None:
    nodes, inits = build(rng_for("unbounded"))
    path = save(model(nodes, {"x": (3, 4)}, ["y"], inits), tmp_path)
    report = run_analyse(path)
    assert report.upper_bound is None and not report.bounded
    assert [(r.node, r.op) for r in report.unbounded_reasons] == [("gate", op)]
    assert report.unbounded_reasons[0].reason
    # every node still has its line, in order, including those after the unbounded one
    assert [layer.name for layer in report.layers] == [n.name for n in nodes]
    gate = next(layer for layer in report.layers if layer.name == "gate")
    assert math.isinf(gate.lipschitz) or math.isinf(gate.running)


@pytest.mark.parametrize("indices_out", [True, False], ids=["indices-returned", "indices-unused"])
def test_integer_output_moved_by_the_input_is_unbounded(indices_out, tmp_path) -> None:
    """MaxPool's argmax jumps from one index to another: a network that returns it has no constant."""
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if indices_out:
        outputs.append(helper.make_tensor_value_info("i", TensorProto.INT64, None))
    graph = helper.make_graph(
        [node("MaxPool", ["x"], ["y", "i"], name="pool", kernel_shape=[2, 2], strides=[2, 2])],
        "argmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        outputs,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    report = run_analyse(save(proto, tmp_path))
    if indices_out:
        assert report.upper_bound is None
        assert [(r.node, r.op) for r in report.unbounded_reasons] == [("pool", "MaxPool")]
        assert "jump" in report.unbounded_reasons[0].reason
    else:
        assert report.upper_bound == pytest.approx(1.0)


@pytest.mark.parametrize("training", [False, True, None], ids=["inference", "training", "decided-at-run-time"])
def test_dropout_drops_only_in_training_mode(training, tmp_path) -> None:
    """Dropout is the identity unless training_mode may be true: then it is random (no constant, no run)."""
    consts = {"ratio": np.array(0.5, np.float32)}
    if training is not None:
        consts["mode"] = np.array(training)
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])]
    if training is None:
        graph_inputs.append(helper.make_tensor_value_info("mode", TensorProto.BOOL, []))
    graph = helper.make_graph(
        [node("Dropout", ["x", "ratio", "mode"], ["y"], name="drop")],
        "dropout",
        graph_inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    path = save(proto, tmp_path)
    report = run_analyse(path)
    unsupported = interpret_unsupported(path)
    if training is False:
        assert report.upper_bound == 1.0 and not unsupported
    else:
        assert report.upper_bound is None and [r.node for r in report.unbounded_reasons] == ["drop"]
        assert unsupported == {"Dropout(training_mode)": ["drop"]}


def interpret_unsupported(path) -> dict[str, list[str]]:
    return unsupported_ops(load_graph(str(path)))


# ---------------------------------------------------------------------------------------------
# Inputs that depend on the network input where a constant is usual


def _conv_variable_bias(rng):
    return [
        node("ReduceMean", ["x"], ["b"], axes=[0, 2, 3], keepdims=0),
        node("Conv", ["x", "W", "b"], ["y"], pads=[1, 1, 1, 1]),
    ], {"W": randn(rng, 3, 3, 3, 3) * 0.01}


def _convtranspose_variable_bias(rng):
    return [
        node("ReduceMean", ["x"], ["b"], axes=[0, 2, 3], keepdims=0),
        node("ConvTranspose", ["x", "W", "b"], ["y"], strides=[2, 2]),
    ], {"W": randn(rng, 3, 3, 2, 2) * 0.01}


def _clip_variable_min(rng):
    return [node("ReduceMax", ["x"], ["lo"], keepdims=0), node("Clip", ["x", "lo"], ["y"])], {}


def _shape_of_unknown_size(rng):
    return [node("Shape", ["x"], ["s"]), node("MatMul", ["x", "W"], ["m"]), node("Reshape", ["m", "s"], ["y"])], {
        "W": randn(rng, 4, 4)
    }


@pytest.mark.parametrize("build", [_conv_variable_bias, _convtranspose_variable_bias], ids=["conv", "convtranspose"])
def test_bias_computed_from_the_input(build, tmp_path) -> None:
    nodes, inits = build(rng_for(build.__name__))
    path = save(model(nodes, {"x": (1, 3, 4, 4)}, ["y"], inits), tmp_path)
    report = run_analyse(path)
    exact = sigma_max(ort_jacobian(path, (1, 3, 4, 4)))
    assert report.upper_bound >= exact * (1 - CERT_SLACK), f"certified {report.upper_bound} < exact {exact}"


def test_clip_with_bounds_computed_from_the_input(tmp_path) -> None:
    nodes, _ = _clip_variable_min(None)
    path = save(model(nodes, {"x": (1, 16)}, ["y"]), tmp_path)
    report = run_analyse(path)
    run = Runner(path)
    x, y = np.zeros((1, 16)), np.zeros((1, 16))
    y[0, 0] = 1.0  # the max rises by 1 and every output is clamped up to it: ||dy|| = 4
    ratio = float(np.linalg.norm(run(y) - run(x)))
    assert ratio == pytest.approx(4.0)
    assert report.upper_bound >= ratio


def test_shape_of_an_input_of_unknown_size_is_not_a_variable(tmp_path) -> None:
    nodes, inits = _shape_of_unknown_size(rng_for("shape"))
    path = save(model(nodes, {"x": (1, "n", 4)}, ["y"], inits), tmp_path)
    report = run_analyse(path)
    exact = sigma_max(ort_jacobian(path, (1, 3, 4)))
    assert report.upper_bound == pytest.approx(exact, rel=EXACT_TOL)


# ---------------------------------------------------------------------------------------------
# Unknown ops and assumptions


def _unknown_ops_model(rng, variant: bool = True) -> onnx.ModelProto:
    nodes = [node("RandomNormalLike", ["x"], ["e"]), node("Foo", ["e"], ["f"], domain="my.domain")]
    if variant:  # a known op with attributes lipcheck has no rule for
        nodes.append(node("Reshape", ["f", "volume"], ["v"]))
        nodes.append(node("GridSample", ["v", "grid"], ["y"], mode="cubic"))
    else:
        nodes.append(node("Relu", ["f"], ["y"]))
    inits = {
        "volume": np.array([1, 1, 1, 3, 4], I64),
        "grid": rng.uniform(-1, 1, size=(1, 1, 2, 2, 3)).astype(np.float32),
    }
    return model(nodes, {"x": (3, 4)}, ["y"], inits, opset=20, extra_opsets={"my.domain": 1})


def test_unknown_ops_are_listed_together(tmp_path) -> None:
    path = save(_unknown_ops_model(rng_for("unknown")), tmp_path)
    with pytest.raises(UnsupportedOpsError) as caught:
        run_analyse(path)
    assert set(caught.value.ops) == {"RandomNormalLike", "my.domain:Foo", "GridSample(mode=cubic) of a volume"}
    assert caught.value.ops["RandomNormalLike"] == ["RandomNormalLike_e"]
    message = str(caught.value)
    assert all(op in message for op in ("RandomNormalLike", "my.domain:Foo", "GridSample(mode=cubic) of a volume"))


def test_assumed_constants_make_an_uncertified_bound(tmp_path) -> None:
    path = save(_unknown_ops_model(rng_for("unknown"), variant=False), tmp_path)
    with pytest.raises(UnsupportedOpsError) as caught:  # assuming one of two unknown ops is not enough
        run_analyse(path, assume={"RandomNormalLike": 2.0})
    assert set(caught.value.ops) == {"my.domain:Foo"}
    report = run_analyse(path, assume={"RandomNormalLike": 2.0, "my.domain:Foo": 1.5, "Softmax": 9.0})
    assert report.upper_bound == pytest.approx(2.0 * 1.5)
    assert report.certified is False
    assert report.assumptions == {"RandomNormalLike": 2.0, "my.domain:Foo": 1.5}  # only those used
    assert [(layer.op, layer.certified) for layer in report.layers] == [
        ("RandomNormalLike", False),
        ("my.domain:Foo", False),
        ("Relu", True),
    ]


# ---------------------------------------------------------------------------------------------
# The registry


def test_registry_has_one_rule_per_op() -> None:
    ops = [registered.op for registered in registered_rules()]
    assert len(ops) == len(set(ops)) and ops == sorted(ops)
    assert {"Conv", "Gemm", "MatMul", "Relu", "Softmax", "MaxPool", "Add", "Concat"} <= set(ops)
    assert all(registered.summary for registered in registered_rules())


def test_registering_an_existing_op_is_refused() -> None:
    before = [(r.op, r.function) for r in registered_rules()]

    def fake(ctx) -> LocalBound:
        """A rule that must never be registered."""
        return LocalBound(1.0, "fake")

    with pytest.raises(ValueError, match="Relu"):
        rule("Relu")(fake)
    with pytest.raises(ValueError, match="Relu"):
        rule("NotAnOpZZ", "Relu")(fake)
    assert [(r.op, r.function) for r in registered_rules()] == before
