"""Dense layers: Gemm and MatMul with a constant operand. Their constant is sigma_max of the weight."""

from __future__ import annotations

import functools
import math
from collections import Counter

import numpy as np
import torch

from lipcheck.graph import Graph, Node
from lipcheck.ops.arithmetic import PRODUCT_REASON, copy_gain, same_float
from lipcheck.ops.base import (
    AffineContext,
    EvalContext,
    Interval,
    LocalBound,
    NotFoldable,
    Op,
    RuleContext,
    UnsupportedVariant,
    node_attrs,
    register,
    replace_parameters,
    unbounded,
    variable_inputs,
)
from lipcheck.spectral import dense_sigma_max
from lipcheck.spectral.dense import batched_sigma_max_upper


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

    piecewise_linear = uses_ranges = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if ctx.is_variable(0) and ctx.is_variable(1):
            found = matmul_on_ranges(ctx, ctx.input_range(0), ctx.input_range(1))
            return found or unbounded("matrix product of two activations, as in attention (not globally Lipschitz)")
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

    def value_range(self, ctx: RuleContext, *ranges: Interval | None) -> Interval | None:
        """Centre and radius: A B in Ac Bc +- (|Ac| Br + Ar |Bc| + Ar Br), plus rounding."""
        a, b = ranges
        if a is None or b is None or a.exact and b.exact or a.lo.dim() < 2 or b.lo.dim() < 2:
            return None
        if not a.lo.is_floating_point() or not b.lo.is_floating_point():
            return None
        centre = a.centre @ b.centre
        radius = a.centre.abs() @ b.radius + a.radius @ b.centre.abs() + a.radius @ b.radius
        scale = a.magnitude @ b.magnitude
        slack = 2 * (a.lo.shape[-1] + 4) * 2.0**-53 * scale
        return Interval(centre - radius - slack, centre + radius + slack)

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


def matmul_on_ranges(ctx: RuleContext, a: Interval | None, b: Interval | None) -> LocalBound | None:
    """A B on a domain: d(AB) = dA B + A' dB, and per matrix of a batch ||dA_k B_k|| <= ||dA_k|| ||B_k||_2 with
    ||B_k||_2 <= sigma_max(|B_k|), |B_k| the entries' largest magnitudes; a matrix broadcast over a batch meets
    every partner it is multiplied with (``copy_gain`` over the batch axes)."""
    if a is None or b is None or a.lo.dim() < 2 or b.lo.dim() < 2:
        return None
    if not a.lo.is_floating_point() or not b.lo.is_floating_point():
        return None
    norms_a = batched_sigma_max_upper(a.magnitude)
    norms_b = batched_sigma_max_upper(b.magnitude)
    batch = torch.broadcast_shapes(tuple(norms_a.shape), tuple(norms_b.shape))
    gain_a = copy_gain(norms_a, norms_b, batch)
    gain_b = copy_gain(norms_b, norms_a, batch)
    together = math.hypot(gain_a, gain_b)
    if not math.isfinite(together):
        return None
    lip_a, lip_b = ctx.input_lipschitz[0], ctx.input_lipschitz[1]
    return LocalBound(
        together, "matrix product on the input domain's ranges", output_lipschitz=gain_a * lip_a + gain_b * lip_b
    )


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


# ---------------------------------------------------------------------------------------------
# Einsum: a linear map of its one variable operand, taken apart into independent blocks

BILINEAR_EINSUM = "Einsum of two activations (or one used twice): bilinear, not globally Lipschitz"
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def einsum_terms(equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """The operands' subscripts and the output's, with each ellipsis spelled out in fresh letters
    (aligned from the right, as broadcasting aligns them) and an implicit output made explicit."""
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise UnsupportedVariant(f"Einsum({equation}: {len(terms)} terms for {len(ranks)} operands)")
    fresh = [c for c in _LETTERS if c not in equation]
    widest = max((rank - len(term.replace("...", "")) for term, rank in zip(terms, ranks, strict=True)), default=0)
    spelled = "".join(fresh[:widest])
    expanded = [
        t.replace("...", spelled[widest - (r - len(t.replace("...", ""))) :]) for t, r in zip(terms, ranks, strict=True)
    ]
    if arrow:
        output = rhs.replace("...", spelled)
    else:
        counts = Counter("".join(terms).replace("...", ""))
        output = spelled + "".join(sorted(c for c, n in counts.items() if n == 1))
    return expanded, output


@register
class Einsum(Op):
    """Einsum linear in one variable operand: its exact norm, max over independent blocks of sigma_max.

    With the constants contracted into one tensor W, Y[b, k, o] = sum_{c, s} W[b, c, o] X[b, k, c, s]:
    b (in X, W and Y) indexes independent blocks, k (X and Y only) identical ones, c is contracted with
    W, s (X only) is summed (norm sqrt(|s|)), o (W and Y only) spans the output. A repeated index of X
    reads its diagonal (a coordinate selection): the norm is the map's on that diagonal. So the norm is
    sqrt(|s|) max_b sigma_max(W[b] as a c x o matrix). Two variable operands: bilinear.
    """

    attributes = {"equation": ""}
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        variables = ctx.variable_inputs()
        if not variables:
            return LocalBound(0.0, "constant")
        if len(variables) > 1:
            return unbounded(BILINEAR_EINSUM)
        v = variables[0]
        constants = [ctx.const(i) for i in range(len(ctx.node.inputs))]
        shapes = [ctx.shape(i) if i == v else getattr(c, "shape", None) for i, c in enumerate(constants)]
        if any(shape is None for shape in shapes):
            return unbounded("the input's shape or a weight is unknown; give --input-shape", "unknown shape")
        terms, output = einsum_terms(str(ctx.attrs["equation"]), [len(s) for s in shapes])  # type: ignore[arg-type]
        x_term, x_shape = _diagonal(terms[v], shapes[v])  # type: ignore[arg-type]
        weights = [(terms[i], ctx.tensor(i)) for i in range(len(terms)) if i != v]
        return _einsum_norm(x_term, x_shape, weights, output)

    def evaluate(self, ctx: EvalContext, *operands: torch.Tensor) -> torch.Tensor:
        floats = [t.dtype for t in operands if t.is_floating_point()]
        if floats:
            dtype = functools.reduce(torch.promote_types, floats)
            operands = tuple(t.to(dtype) for t in operands)
        return torch.einsum(str(ctx.attrs["equation"]).replace(" ", ""), *operands)


def _diagonal(term: str, shape: tuple[int | None, ...]) -> tuple[str, dict[str, int | None]]:
    """The variable's subscripts with repeats removed (its diagonal) and the size of each letter."""
    sizes: dict[str, int | None] = {}
    for letter, size in zip(term, shape, strict=True):
        sizes[letter] = size if sizes.get(letter) is None else sizes[letter]
    return "".join(dict.fromkeys(term)), sizes


def _einsum_norm(
    x_term: str, x_sizes: dict[str, int | None], weights: list[tuple[str, torch.Tensor]], output: str
) -> LocalBound:
    if len(set(output)) != len(output):
        raise UnsupportedVariant("Einsum(repeated output index)")
    sizes: dict[str, int] = {}
    for term, tensor in weights:
        for c, n in zip(term, tensor.shape, strict=True):
            sizes[c] = max(sizes.get(c, 1), int(n))
    # a broadcast axis of size 1 in X: X does not vary along it (the letter is W's and Y's only)
    x_letters = [c for c in x_term if not (x_sizes[c] == 1 and sizes.get(c, 1) > 1)]
    # a broadcast axis of size 1 in W: W does not vary along it (the letter is X's and Y's only)
    keep = (set(x_letters) | set(output)) & set(sizes)
    keep -= {c for c in keep if sizes[c] == 1 and c in x_letters and (x_sizes[c] or 2) > 1}
    w_term = "".join(sorted(keep))
    if weights:
        subscripts = ",".join(term for term, _ in weights) + "->" + w_term
        w = torch.einsum(subscripts, *[t for _, t in weights])
    else:
        w = torch.ones((), dtype=torch.float64)
    blocks = [c for c in w_term if c in x_letters and c in output]
    contracted = [c for c in w_term if c in x_letters and c not in output]
    spanned = [c for c in w_term if c not in x_letters]
    summed = [c for c in x_letters if c not in output and c not in w_term]
    if any(x_sizes[c] is None for c in summed):
        return unbounded("a summed axis of unknown size; give --input-shape", "unknown shape")
    count = math.prod(int(x_sizes[c] or 1) for c in summed)
    order = [w_term.index(c) for c in blocks + contracted + spanned]
    shape = [math.prod(w.shape[w_term.index(c)] for c in group) for group in (blocks, contracted, spanned)]
    found = matrix_bound(w.permute(order).reshape(shape))
    note = f"; sum over {count} entries (sqrt)" if count > 1 else ""
    return LocalBound(found.value * math.sqrt(count) * (1 + 1e-12), found.method + note, exact=True)
