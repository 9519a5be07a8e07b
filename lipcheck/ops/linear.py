"""Dense layers: Gemm and MatMul with a constant operand. Their constant is sigma_max of the weight."""

from __future__ import annotations

import numpy as np
import torch

from lipcheck.graph import Graph, Node
from lipcheck.ops.arithmetic import PRODUCT_REASON, same_float
from lipcheck.ops.base import (
    AffineContext,
    EvalContext,
    LocalBound,
    NotFoldable,
    Op,
    RuleContext,
    node_attrs,
    register,
    replace_parameters,
    unbounded,
    variable_inputs,
)
from lipcheck.spectral import dense_sigma_max


def folded_note(node: Node) -> str:
    """Only BatchNorms are folded into layers; the report's ``folded`` field names them."""
    return "; BatchNorm folded" if node.folded else ""


def matrix_bound(matrix: torch.Tensor) -> LocalBound:
    """sigma_max of a matrix, or the max over a batch of matrices (a block-diagonal operator)."""
    if matrix.dim() == 1:
        matrix = matrix.reshape(-1, 1)
    if matrix.dim() > 2:
        flat = matrix.reshape(-1, *matrix.shape[-2:])
        values = [dense_sigma_max(m) for m in flat]
        return LocalBound(max(v.value for v in values), values[0].method, exact=True)
    spectral = dense_sigma_max(matrix)
    return LocalBound(spectral.value, spectral.method, exact=spectral.exact)


def _constant_operand_index(node: Node, graph: Graph) -> int | None:
    constant = [i for i, v in enumerate(node.inputs[:2]) if v and v in graph.constants]
    return constant[0] if len(constant) == 1 else None


@register
class Gemm(Op):
    """alpha * A' B' + beta * C: |alpha| sigma_max(constant operand) (+ |beta| for a variable C)."""

    attributes = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        alpha, beta = float(ctx.attrs["alpha"]), float(ctx.attrs["beta"])
        if ctx.is_variable(0) and ctx.is_variable(1):
            return unbounded(PRODUCT_REASON)
        weight_index = 1 if ctx.is_variable(0) else 0
        if not ctx.is_variable(0) and not ctx.is_variable(1):
            local = LocalBound(0.0, "constant")
            base = 0.0
        else:
            if ctx.const(weight_index) is None:
                return unbounded("weight is computed from the input", "unknown weight")
            found = matrix_bound(ctx.tensor(weight_index))
            local = LocalBound(abs(alpha) * found.value, found.method + folded_note(ctx.node), exact=found.exact)
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

    def evaluate(
        self, ctx: EvalContext, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None
    ) -> torch.Tensor:
        if int(ctx.attrs["transA"]):
            a = a.transpose(0, 1)
        if int(ctx.attrs["transB"]):
            b = b.transpose(0, 1)
        y = float(ctx.attrs["alpha"]) * (a @ b)
        if c is not None:
            y = y + float(ctx.attrs["beta"]) * c
        return y

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        w, c = ctx.const(1), ctx.const(2)
        if ctx.variable != 0 or w is None or int(ctx.attrs["transA"]) or w.ndim != 2:
            raise NotFoldable("Gemm needs a variable A and a constant B")
        if ctx.has_input(2) and c is None:
            raise NotFoldable("Gemm with a variable C")
        b = ctx.weights(w.T if int(ctx.attrs["transB"]) else w)
        alpha = float(ctx.attrs["alpha"])
        y = x @ b * (abs(alpha) if ctx.absolute else alpha)
        if ctx.shifts and c is not None:
            y = y + float(ctx.attrs["beta"]) * torch.from_numpy(c)
        return y.reshape(x.shape[0], *ctx.out_shape[1:])

    def rounding_terms(self, node: Node, graph: Graph) -> int:
        w = graph.constants.get(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
        if w is None:
            return 1
        return int(w.shape[1] if int(node_attrs(node)["transB"]) else w.shape[0]) + 2

    def weight_input(self, node: Node, graph: Graph) -> int | None:
        return _constant_operand_index(node, graph)

    def bias_scale(self, node: Node) -> float:
        return float(node_attrs(node)["beta"])

    def scale_output_channels(self, node: Node, weight: np.ndarray, multiplier: np.ndarray) -> np.ndarray | None:
        if weight.ndim != 2:
            return None
        trans_b = int(node_attrs(node)["transB"])
        if (weight.shape[0] if trans_b else weight.shape[1]) != multiplier.size:
            return None
        return weight * (multiplier[:, None] if trans_b else multiplier[None, :])

    def fold_output_affine(self, graph: Graph, node: Node, multiplier: np.ndarray, shift: np.ndarray) -> bool:
        """y = m * (alpha A B + beta C) + s: B's output columns scaled, C' = m * beta C + s (beta becomes 1)."""
        if graph.constants.get(node.inputs[0]) is not None:
            return False
        parameters = layer_parameters(graph, node)
        if parameters is None:
            return False
        weight, bias = parameters
        new_weight = self.scale_output_channels(node, weight, multiplier)
        if new_weight is None:
            return False
        c = np.zeros(multiplier.shape[0]) if bias is None else float(node_attrs(node)["beta"]) * bias
        node.attrs["beta"] = 1.0
        replace_parameters(graph, node, new_weight, c * multiplier + shift)
        return True

    def fold_input_affine(self, graph: Graph, node: Node, multiplier: np.ndarray, shift: np.ndarray) -> bool:
        """A (m x + s) B: B's input rows scaled, and alpha s B added to the bias (beta becomes 1)."""
        parameters = layer_parameters(graph, node)
        attrs = node_attrs(node)
        if parameters is None or int(attrs["transA"]) or parameters[0].ndim != 2:
            return False
        w, old_bias = parameters
        trans_b = int(attrs["transB"])
        if (w.shape[1] if trans_b else w.shape[0]) != multiplier.shape[0]:
            return False
        b_matrix = w.T if trans_b else w  # [K, M]
        alpha, beta = float(attrs["alpha"]), float(attrs["beta"])
        new_w = w * (multiplier[None, :] if trans_b else multiplier[:, None])
        c = 0.0 if old_bias is None else beta * old_bias
        node.attrs["beta"] = 1.0
        replace_parameters(graph, node, new_w, np.asarray(c + alpha * (shift @ b_matrix)))
        return True


def layer_parameters(graph: Graph, node: Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(weight, bias) of a layer as float64 arrays: None when the weight or a given bias is not constant."""
    weight = graph.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return None
    has_bias = len(node.inputs) > 2 and bool(node.inputs[2])
    bias = graph.constants.get(node.inputs[2]) if has_bias else None
    if has_bias and bias is None:
        return None  # a variable bias: leave the layer alone
    return np.asarray(weight, dtype=np.float64), None if bias is None else np.asarray(bias, dtype=np.float64)


@register
class MatMul(Op):
    """X @ W or W @ X with a constant W: sigma_max(W) (max over a batch of matrices)."""

    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if ctx.is_variable(0) and ctx.is_variable(1):
            return unbounded("matrix product of two activations, as in attention (not globally Lipschitz)")
        weight_index = 1 if ctx.is_variable(0) else 0
        if ctx.const(weight_index) is None:
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
        found = matrix_bound(w)
        return LocalBound(found.value, found.method + folded_note(ctx.node), exact=found.exact)

    def evaluate(self, ctx: EvalContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(*same_float(a, b))

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        w = ctx.const(1 - ctx.variable)
        if w is None or w.ndim != 2:
            raise NotFoldable("MatMul needs a constant 2-D operand")
        t = ctx.weights(w)
        return (x @ t if ctx.variable == 0 else t @ x).reshape(x.shape[0], *ctx.out_shape[1:])

    def rounding_terms(self, node: Node, graph: Graph) -> int:
        variable = variable_inputs(node, graph)[0]
        w = graph.constants.get(node.inputs[1 - variable])
        if w is None:
            return 1
        return int(w.shape[0] if variable == 0 else w.shape[-1]) + 1

    def weight_input(self, node: Node, graph: Graph) -> int | None:
        return _constant_operand_index(node, graph)


@register
class Det(Op):
    """Determinant of square matrices: a polynomial of degree n, not globally Lipschitz for n > 1."""

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        shape = ctx.shape(0)
        if shape is not None and len(shape) >= 2 and shape[-1] == 1 and shape[-2] == 1:
            return LocalBound(1.0, "determinant of 1 x 1 matrices: the entry", exact=True)
        return unbounded("a determinant is a polynomial of degree n in the entries (its slope grows with them)")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.det(x)
