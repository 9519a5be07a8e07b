"""Rules for linear and affine ops: dense layers, convolutions, BatchNorm, arithmetic with constants."""

from __future__ import annotations

import math

import numpy as np
import torch

from lipcheck.graph import Graph, Node
from lipcheck.rules.registry import LocalBound, RuleContext, rule, unbounded
from lipcheck.spectral import (
    ConvGeometry,
    conv_operator_norm,
    conv_transpose_operator_norm,
    dense_sigma_max,
)

PRODUCT_REASON = "product of two activations (not globally Lipschitz)"


def _folded_note(ctx: RuleContext) -> str:
    """Only BatchNorms are folded into linear ops; the report's ``folded`` field names them."""
    return "; BatchNorm folded" if ctx.node.folded else ""


def _matrix_bound(matrix: torch.Tensor) -> LocalBound:
    """sigma_max of a matrix, or the max over a batch of matrices (a block-diagonal operator)."""
    if matrix.dim() == 1:
        matrix = matrix.reshape(-1, 1)
    if matrix.dim() > 2:
        flat = matrix.reshape(-1, *matrix.shape[-2:])
        values = [dense_sigma_max(m) for m in flat]
        return LocalBound(max(v.value for v in values), values[0].method, exact=True)
    spectral = dense_sigma_max(matrix)
    return LocalBound(spectral.value, spectral.method, exact=spectral.exact)


@rule("Gemm")
def gemm(ctx: RuleContext) -> LocalBound:
    """alpha * A' B' + beta * C: |alpha| sigma_max(constant operand) (+ |beta| for a variable C)."""
    alpha, beta = float(ctx.attrs.get("alpha", 1.0)), float(ctx.attrs.get("beta", 1.0))
    if ctx.is_variable(0) and ctx.is_variable(1):
        return unbounded(PRODUCT_REASON)
    weight_index = 1 if ctx.is_variable(0) else 0
    if not ctx.is_variable(0) and not ctx.is_variable(1):
        local = LocalBound(0.0, "constant")
        base = 0.0
    else:
        if ctx.const(weight_index) is None:
            return unbounded("weight is computed from the input", "unknown weight")
        found = _matrix_bound(ctx.tensor(weight_index))
        local = LocalBound(abs(alpha) * found.value, found.method + _folded_note(ctx), exact=found.exact)
        base = local.value * ctx.input_lipschitz[1 - weight_index]
    if ctx.is_variable(2):
        factor = ctx.broadcast_factor(2)
        if factor is None:
            return unbounded("bias broadcast to an unknown size; give --input-shape", "unknown shape")
        return LocalBound(
            local.value,
            local.method + " + variable C",
            exact=False,
            output_lipschitz=base + abs(beta) * factor * ctx.input_lipschitz[2],
        )
    return local


@rule("MatMul")
def matmul(ctx: RuleContext) -> LocalBound:
    """X @ W or W @ X with a constant W: sigma_max(W) (max over a batch of matrices)."""
    if ctx.is_variable(0) and ctx.is_variable(1):
        return unbounded("matrix product of two activations, as in attention (not globally Lipschitz)")
    weight_index = 1 if ctx.is_variable(0) else 0
    weight = ctx.const(weight_index)
    if weight is None:
        return unbounded("weight is computed from the input", "unknown weight")
    w = ctx.tensor(weight_index)
    var_shape = ctx.shape(1 - weight_index)
    batch = tuple(w.shape[:-2])
    if batch and (var_shape is None or tuple(var_shape[:-2])[-len(batch) :] != batch):
        # the activation may be broadcast against a batch of weights, each copy going to a new
        # output block: bound the concatenated operator [W_1 ... W_B] (or its stacked form)
        if weight_index == 1:
            w = w.reshape(-1, *w.shape[-2:]).transpose(0, 1).reshape(w.shape[-2], -1)
        else:
            w = w.reshape(-1, w.shape[-1])
    found = _matrix_bound(w)
    return LocalBound(found.value, found.method + _folded_note(ctx), exact=found.exact)


def _conv_geometry(ctx: RuleContext, weight: torch.Tensor) -> ConvGeometry:
    d = weight.dim() - 2
    in_shape = ctx.shape(0)
    spatial = None
    pads = ctx.attrs.get("pads")
    if in_shape is not None and len(in_shape) == d + 2 and all(n is not None for n in in_shape[2:]):
        spatial = tuple(int(n) for n in in_shape[2:])
    if pads is None:  # auto_pad SAME with an unknown size
        spatial, pads = None, [0] * (2 * d)
    return ConvGeometry(
        stride=tuple(ctx.attrs["strides"]),
        dilation=tuple(ctx.attrs["dilations"]),
        pads=tuple(pads),
        groups=int(ctx.attrs.get("group", 1)),
        input_size=spatial,
    )


@rule("Conv")
def conv(ctx: RuleContext) -> LocalBound:
    """Convolution operator norm: circular embedding on the known input size, else size-independent."""
    if ctx.is_variable(1):
        return unbounded("convolution weight computed from the input (product of two activations)")
    if ctx.const(1) is None:
        return unbounded("convolution weight is not a known constant", "unknown weight")
    weight = ctx.tensor(1)
    found = conv_operator_norm(weight, _conv_geometry(ctx, weight))
    return _with_variable_bias(ctx, LocalBound(found.value, found.method + _folded_note(ctx), exact=found.exact))


@rule("ConvTranspose")
def conv_transpose(ctx: RuleContext) -> LocalBound:
    """Transposed convolution: the norm of its adjoint convolution (uncropped output)."""
    if ctx.is_variable(1):
        return unbounded("weight computed from the input (product of two activations)")
    if ctx.const(1) is None:
        return unbounded("weight is not a known constant", "unknown weight")
    weight = ctx.tensor(1)
    found = conv_transpose_operator_norm(weight, _conv_geometry(ctx, weight))
    return _with_variable_bias(ctx, LocalBound(found.value, "adjoint conv: " + found.method + _folded_note(ctx)))


def _with_variable_bias(ctx: RuleContext, local: LocalBound) -> LocalBound:
    """conv(x) + b(x): each bias entry is added at every position of its output channel."""
    if not ctx.is_variable(2):
        return local
    out = ctx.output_shape()
    if out is None or len(out) < 2 or any(d is None for d in out):
        return unbounded(
            "bias computed from the input, added over an unknown size; give --input-shape", "unknown shape"
        )
    copies = math.prod(out) // max(1, int(out[1]))
    total = local.value * ctx.input_lipschitz[0] + math.sqrt(copies) * ctx.input_lipschitz[2]
    return LocalBound(local.value, local.method + " + variable bias", certified=local.certified, output_lipschitz=total)


def batchnorm_affine(graph: Graph, bn: Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(multiplier, shift) of an inference BatchNorm with constant parameters: y = multiplier * x + shift.

    Used by this rule and by the pass that folds BatchNorm into its neighbouring linear op.
    """
    if int(bn.attrs.get("training_mode", 0)):
        return None
    params = [graph.constants.get(v) for v in bn.inputs[1:5]]
    if len(params) < 4 or any(p is None for p in params):
        return None
    scale, bias, mean, var = (np.asarray(p, dtype=np.float64) for p in params)
    multiplier = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return multiplier, bias - mean * multiplier


@rule("BatchNormalization")
def batch_norm(ctx: RuleContext) -> LocalBound:
    """Inference BatchNorm not next to a linear op: a per-channel scaling, max |scale/sqrt(var+eps)|."""
    if int(ctx.attrs.get("training_mode", 0)):
        return unbounded("BatchNormalization in training mode uses batch statistics", "training mode")
    if any(ctx.is_variable(i) for i in range(1, 5)):
        return unbounded("BatchNorm parameters computed from the input")
    affine = batchnorm_affine(ctx.graph, ctx.node)
    if affine is None:
        return unbounded("BatchNorm parameters are not known constants", "unknown weight")
    return LocalBound(float(np.abs(affine[0]).max()) * (1 + 1e-15), "per-channel scale", exact=True)


@rule("Mul")
def mul(ctx: RuleContext) -> LocalBound:
    """x * c with a constant c: max |c| (times sqrt(copies) if x is broadcast)."""
    variables = ctx.variable_inputs()
    if len(variables) == 2:
        return unbounded(PRODUCT_REASON)
    (var,) = variables
    factor = ctx.const(1 - var)
    if factor is None:
        return unbounded("multiplied by a value lipschitz cannot know before running", "unknown factor")
    copies = ctx.broadcast_factor(var)
    if copies is None:
        return unbounded("input broadcast to an unknown size; give --input-shape", "unknown shape")
    value = float(np.abs(np.asarray(factor, dtype=np.float64)).max(initial=0.0)) * copies
    return LocalBound(value, "scale by constant", exact=copies == 1.0)


@rule("Div")
def div(ctx: RuleContext) -> LocalBound:
    """x / c with a constant c: 1 / min |c|; division by an activation is not Lipschitz."""
    if ctx.is_variable(1):
        return unbounded("division by an activation (not globally Lipschitz)")
    divisor = ctx.const(1)
    if divisor is None:
        return unbounded("divided by a value lipschitz cannot know before running", "unknown factor")
    smallest = float(np.abs(np.asarray(divisor, dtype=np.float64)).min())
    if smallest == 0.0:
        return unbounded("division by zero")
    copies = ctx.broadcast_factor(0)
    if copies is None:
        return unbounded("input broadcast to an unknown size; give --input-shape", "unknown shape")
    # the float32 division rounds 1/c at most half an ulp up
    return LocalBound(copies / smallest * (1 + 2**-23), "scale by 1/constant", exact=copies == 1.0)


@rule("Add", "Sub", "Sum", "Max", "Min", "Mean")
def add(ctx: RuleContext) -> LocalBound:
    """Sum of branches: L = sum of the branches' L (AutoLip); Max/Min: sqrt of the sum of squares."""
    op = ctx.node.op
    variables = ctx.variable_inputs()
    copies = [ctx.broadcast_factor(i) for i in variables]
    if any(c is None for c in copies):
        return unbounded("input broadcast to an unknown size; give --input-shape", "unknown shape")
    if len(variables) == 1 and op in ("Add", "Sub", "Sum", "Max", "Min"):
        method = "bias (constant shift)" if op in ("Add", "Sub", "Sum") else "clamp by constant"
        return LocalBound(copies[0], method, exact=copies[0] == 1.0 and op != "Max" and op != "Min")
    terms = [c * ctx.input_lipschitz[i] for c, i in zip(copies, variables, strict=True)]
    if op in ("Max", "Min"):
        total = math.sqrt(sum(t * t for t in terms))
        return LocalBound(1.0, "elementwise max/min: sqrt(sum L_i^2)", output_lipschitz=total)
    scale = 1.0 / len([i for i in ctx.node.inputs if i]) if op == "Mean" else 1.0
    return LocalBound(scale, "sum of branches (L_a + L_b)", output_lipschitz=scale * sum(terms))


@rule("Neg", "Abs")
def negate(ctx: RuleContext) -> LocalBound:
    """-x and |x|: 1."""
    return LocalBound(1.0, "isometry" if ctx.node.op == "Neg" else "1-Lipschitz", exact=True)
