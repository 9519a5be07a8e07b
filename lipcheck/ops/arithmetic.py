"""Arithmetic: sums of branches (residual connections), scaling by constants, and their elementwise kin.

A sum of branches has L_a + L_b (AutoLip); a product or quotient of two activations is not globally
Lipschitz; with one operand constant each is affine, and exact in a chain (``affine``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import numpy as np
import torch

from lipcheck.graph import Graph, Node
from lipcheck.ops.base import (
    AffineContext,
    EvalContext,
    Interval,
    LocalBound,
    NotFoldable,
    Op,
    RuleContext,
    register,
    unbounded,
    variable_inputs,
    widen,
)

PRODUCT_REASON = "product of two activations (not globally Lipschitz)"


def same_float(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Promote an integer operand to the other's float dtype (ONNX graphs mix them after casts)."""
    if a.is_floating_point() and not b.is_floating_point():
        b = b.to(a.dtype)
    elif b.is_floating_point() and not a.is_floating_point():
        a = a.to(b.dtype)
    return a, b


def _constant_operand(ctx: AffineContext) -> torch.Tensor:
    """The constant operand of a binary op, shaped for a batch of samples (NotFoldable otherwise)."""
    if ctx.in_shape != ctx.out_shape:
        raise NotFoldable(f"{ctx.node.op} broadcasts its variable input")
    c = ctx.const(1 - ctx.variable)
    rank = len(ctx.in_shape)
    if c is None or c.ndim > rank or (c.ndim == rank and c.shape[0] != 1):
        raise NotFoldable(f"{ctx.node.op} by a non-constant")
    return torch.from_numpy(c.reshape(c.shape[1:]) if c.ndim == rank else c)


# ---------------------------------------------------------------------------------------------
# Sums of branches, and elementwise max/min


class Branches(Op):
    """Sum of branches: L = sum of the branches' L (AutoLip); Max/Min: sqrt of the sum of squares."""

    single_method: ClassVar[str] = "bias (constant shift)"  # with one variable operand
    elementwise_extremum: ClassVar[bool] = False
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        variables = ctx.variable_inputs()
        copies = [ctx.broadcast_factor(i) for i in variables]
        if any(c is None for c in copies):
            return unbounded("input broadcast to an unknown size; give --input-shape", "unknown shape")
        if len(variables) == 1 and self.single_method:
            exact = copies[0] == 1.0 and not self.elementwise_extremum
            return LocalBound(copies[0], self.single_method, exact=exact)  # type: ignore[arg-type]
        terms = [c * ctx.input_lipschitz[i] for c, i in zip(copies, variables, strict=True)]  # type: ignore[operator]
        if self.elementwise_extremum:
            total = math.sqrt(sum(t * t for t in terms))
            return LocalBound(1.0, "elementwise max/min: sqrt(sum L_i^2)", output_lipschitz=total)
        scale = self.branch_scale(ctx)
        return LocalBound(scale, "sum of branches (L_a + L_b)", output_lipschitz=scale * sum(terms))

    def branch_scale(self, ctx: RuleContext) -> float:
        return 1.0


class Variadic(Branches):
    """Reduces its operands pairwise with ``function``."""

    monotone = True

    @staticmethod
    def function(a: torch.Tensor, b: torch.Tensor, /) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, ctx: EvalContext, *xs: Any) -> torch.Tensor:
        function = self.function
        return functools.reduce(lambda a, b: function(*same_float(a, b)), [x for x in xs if x is not None])


@register
class Add(Branches):
    """a + b: L_a + L_b; a bias when b is constant."""

    decomposes_activations = monotone = True
    join_signs = (1.0, 1.0)

    def channel_scale(self, node: Node, graph: Graph) -> np.ndarray | None:
        return _shift_scale(node, graph, 1.0)

    def evaluate(self, ctx: EvalContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.add(*same_float(a, b))

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        t = _constant_operand(ctx)
        return x + t if ctx.shifts else 1.0 * x


@register
class Sub(Branches):
    """a - b: L_a + L_b; a shift when one operand is constant."""

    decomposes_activations = True
    join_signs = (1.0, -1.0)

    def value_range(self, ctx: RuleContext, *ranges: Interval | None) -> Interval | None:
        a, b = ranges
        if a is None or b is None or a.exact and b.exact:
            return None
        return widen(a.lo - b.hi, a.hi - b.lo)

    def channel_scale(self, node: Node, graph: Graph) -> np.ndarray | None:
        return _shift_scale(node, graph, -1.0)

    def evaluate(self, ctx: EvalContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sub(*same_float(a, b))

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        t = _constant_operand(ctx)
        y = (-1.0 if ctx.variable == 1 and not ctx.absolute else 1.0) * x
        if ctx.shifts:
            y = y - t if ctx.variable == 0 else y + t
        return y


@register
class Sum(Variadic):
    """a + b + ...: the sum of the branches' L."""

    function = staticmethod(torch.add)


@register
class Mean(Variadic):
    """(a + b + ...) / n: the sum of the branches' L, over n."""

    function = staticmethod(torch.add)
    single_method = ""  # one variable operand is still averaged with the constant ones

    def branch_scale(self, ctx: RuleContext) -> float:
        return 1.0 / len([i for i in ctx.node.inputs if i])

    def evaluate(self, ctx: EvalContext, *xs: Any) -> torch.Tensor:
        present = [x for x in xs if x is not None]
        return super().evaluate(ctx, *present) / len(present)


@register
class Max(Variadic):
    """Elementwise max: sqrt of the sum of the branches' squared L."""

    function = staticmethod(torch.maximum)
    single_method, elementwise_extremum = "clamp by constant", True
    extremum = "max"


@register
class Min(Variadic):
    """Elementwise min: sqrt of the sum of the branches' squared L."""

    function = staticmethod(torch.minimum)
    single_method, elementwise_extremum = "clamp by constant", True
    extremum = "min"


def per_channel(graph: Graph, node: Node, constant: Any) -> np.ndarray | None:
    """The constant as one value per channel of the output (axis 1), when it broadcasts that way onto a variable
    operand of the output's own shape."""
    shape = graph.shape(node.outputs[0])
    variable = graph.shape(node.inputs[variable_inputs(node, graph)[0]])
    if constant is None or shape is None or variable != shape or len(shape) < 2 or not isinstance(shape[1], int):
        return None
    c = np.asarray(constant, dtype=np.float64)
    if c.ndim > len(shape):
        return None
    full = (1,) * (len(shape) - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(full) if i != 1) or full[1] not in (1, shape[1]):
        return None
    return np.broadcast_to(c.reshape(-1), (int(shape[1]),)).copy()


def _shift_scale(node: Node, graph: Graph, sign_of_second: float) -> np.ndarray | None:
    """x + c, x - c (multiplier 1) or c - x (multiplier -1) with c constant per channel or smaller."""
    variables = variable_inputs(node, graph)
    if len(variables) != 1 or len(node.inputs) != 2:
        return None
    shape_in, shape_out = graph.shape(node.inputs[variables[0]]), graph.shape(node.outputs[0])
    if shape_in is None or shape_in != shape_out or len(shape_out) < 2 or not isinstance(shape_out[1], int):
        return None
    return np.full(int(shape_out[1]), sign_of_second if variables[0] == 1 else 1.0)


# ---------------------------------------------------------------------------------------------
# Products and quotients


@register
class Mul(Op):
    """x * c with a constant c: max |c| (times sqrt(copies) if x is broadcast)."""

    piecewise_linear = decomposes_activations = True
    recognition_root = True  # where an exporter's decomposition of an activation ends (x * sigmoid(x))

    uses_ranges = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        variables = ctx.variable_inputs()
        if len(variables) == 2:
            return product_on_ranges(ctx, ctx.input_range(0), ctx.input_range(1)) or unbounded(PRODUCT_REASON)
        (var,) = variables
        factor = ctx.const(1 - var)
        if factor is None:
            return unbounded("multiplied by a value lipschitz cannot know before running", "unknown factor")
        copies = ctx.broadcast_factor(var)
        if copies is None:
            return unbounded("input broadcast to an unknown size; give --input-shape", "unknown shape")
        value = float(np.abs(np.asarray(factor, dtype=np.float64)).max(initial=0.0)) * copies
        return LocalBound(value, "scale by constant", exact=copies == 1.0)

    def evaluate(self, ctx: EvalContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.mul(*same_float(a, b))

    def value_range(self, ctx: RuleContext, *ranges: Interval | None) -> Interval | None:
        a, b = ranges
        if a is None or b is None or a.exact and b.exact:
            return None
        if ctx.node.inputs[0] == ctx.node.inputs[1] and a.lo.is_floating_point():
            return power_range(a, 2.0)  # x * x: a square, never negative (the interval product would allow lo * hi)
        return interval_product(a, b)

    def channel_scale(self, node: Node, graph: Graph) -> np.ndarray | None:
        variables = variable_inputs(node, graph)
        if len(variables) != 1 or len(node.inputs) != 2:
            return None
        return per_channel(graph, node, graph.constants.get(node.inputs[1 - variables[0]]))

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        t = _constant_operand(ctx)
        return x * (t.abs() if ctx.absolute else t)


@register
class Div(Op):
    """x / c with a constant c: 1 / min |c|; division by an activation is not Lipschitz."""

    piecewise_linear = decomposes_activations = True
    recognition_root = True

    uses_ranges = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if ctx.is_variable(1):
            found = None
            denominator, numerator = ctx.input_range(1), ctx.input_range(0)
            if denominator is not None and numerator is not None:
                found = product_on_ranges(ctx, numerator, reciprocal_range(denominator), reciprocal_slope(denominator))
            return found or unbounded("division by an activation (not globally Lipschitz)")
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

    def evaluate(self, ctx: EvalContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not a.is_floating_point() and not b.is_floating_point():
            return torch.div(a, b, rounding_mode="trunc")
        return torch.div(*same_float(a, b))

    def value_range(self, ctx: RuleContext, *ranges: Interval | None) -> Interval | None:
        a, b = ranges
        if a is None or b is None or a.exact and b.exact or not a.lo.is_floating_point():
            return None
        inverse = reciprocal_range(b)
        return None if inverse is None else interval_product(a, inverse)

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        t = _constant_operand(ctx)
        if ctx.variable != 0 or bool((t == 0).any()):
            raise NotFoldable("division by an activation or by zero")
        return x / (t.abs() if ctx.absolute else t)


@register
class Pow(Op):
    """x^p: not globally Lipschitz for p != 0, 1."""

    decomposes_activations = uses_ranges = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        p = _scalar_exponent(ctx)
        if p == 1.0:
            return LocalBound(1.0, "x^1", exact=True)
        if p == 0.0:
            return LocalBound(0.0, "x^0 is constant", exact=True)
        x = ctx.input_range(0)
        if p is not None and x is not None and not ctx.is_variable(1):
            slope = power_slope(x, p)
            if slope is not None:
                return LocalBound(slope, "max |p x^(p-1)| on the input's range")
        return unbounded("x^p is not globally Lipschitz for p != 0, 1")

    def value_range(self, ctx: RuleContext, *ranges: Interval | None) -> Interval | None:
        p = _scalar_exponent(ctx)
        x = ranges[0]
        if p is None or x is None or x.exact or not x.lo.is_floating_point():
            return None
        return power_range(x, p)

    def evaluate(self, ctx: EvalContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.is_floating_point():
            return torch.pow(a, b.to(a.dtype))
        return torch.pow(a, b).to(a.dtype)


@register
class Neg(Op):
    """-x: an isometry."""

    piecewise_linear = decomposes_activations = negates = monotone = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return LocalBound(1.0, "isometry", exact=True)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return torch.neg(x)

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        return x if ctx.absolute else -x


@register
class Abs(Op):
    """|x|: 1-Lipschitz."""

    piecewise_linear = decomposes_activations = True

    def value_range(self, ctx: RuleContext, *ranges: Interval | None) -> Interval | None:
        (x,) = ranges
        return None if x is None or x.exact else Interval(x.smallest_magnitude, x.magnitude)

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return LocalBound(1.0, "1-Lipschitz", exact=True)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)


# ---------------------------------------------------------------------------------------------
# On an input domain: ranges of products and quotients, and their local constants


def interval_product(a: Interval, b: Interval) -> Interval:
    """{x y : x in a, y in b}, entrywise (broadcasting like the op)."""
    ends = [a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi]
    stacked = torch.stack(torch.broadcast_tensors(*ends))
    return widen(stacked.min(dim=0).values, stacked.max(dim=0).values)


def reciprocal_range(b: Interval) -> Interval | None:
    """{1 / y : y in b} when no entry's interval holds 0."""
    if not b.lo.is_floating_point() or not bool(((b.lo > 0) | (b.hi < 0)).all()):
        return None
    return widen(1.0 / b.hi, 1.0 / b.lo)


def reciprocal_slope(b: Interval) -> float:
    """max |d(1/y)/dy| = 1 / min y^2 on b (which excludes 0)."""
    return float((1.0 / b.smallest_magnitude.square()).max()) * (1 + 2.0**-40)


def copy_gain(operand: torch.Tensor, other_magnitude: torch.Tensor, out_shape: tuple[int, ...]) -> float:
    """sup ||bcast(d) * m|| / ||d|| over perturbations d of ``operand``'s entries, m the other operand's
    magnitudes: each entry of d meets every m it is broadcast against, so the gain is the largest
    sqrt(sum of m^2 over an entry's copies)."""
    squares = other_magnitude.square().broadcast_to(out_shape)
    rank = len(out_shape)
    shape = (1,) * (rank - operand.dim()) + tuple(operand.shape)
    axes = tuple(i for i in range(rank) if shape[i] == 1 and out_shape[i] != 1)
    summed = squares.sum(dim=axes, keepdim=True) if axes else squares
    return math.sqrt(float(summed.max())) * (1 + 2.0**-40) if summed.numel() else 0.0


def product_on_ranges(
    ctx: RuleContext, a: Interval | None, b: Interval | None, b_slope: float = 1.0
) -> LocalBound | None:
    """a * g(b) on a domain, where g has slope at most ``b_slope`` (1: g(b) = b; 1/min b^2: g(b) = 1/b):
    f(a, b) - f(a', b') = (a - a') g(b) + a' (g(b) - g(b')), so L <= G_a L_a + G_b b_slope L_b with
    G_a the gain of a's perturbations against |g(b)| and G_b that of b's against |a|."""
    if a is None or b is None or not a.lo.is_floating_point() or not b.lo.is_floating_point():
        return None
    out = torch.broadcast_shapes(tuple(a.lo.shape), tuple(b.lo.shape))
    gain_a = copy_gain(a.lo, b.magnitude, out)
    gain_b = copy_gain(b.lo, a.magnitude, out) * b_slope
    lip_a = ctx.input_lipschitz[0] if ctx.is_variable(0) else 0.0
    lip_b = ctx.input_lipschitz[1] if ctx.is_variable(1) else 0.0
    together = math.hypot(gain_a, gain_b)
    if not math.isfinite(together):
        return None
    return LocalBound(
        together, "product on the input domain's ranges", output_lipschitz=gain_a * lip_a + gain_b * lip_b
    )


def _scalar_exponent(ctx: RuleContext) -> float | None:
    exponent = ctx.const(1)
    if exponent is None or np.asarray(exponent).size != 1:
        return None
    return float(np.asarray(exponent, dtype=np.float64).reshape(-1)[0])


def power_range(x: Interval, p: float) -> Interval | None:
    """{y^p : y in x}: through |y| for even integers, monotone for odd ones and on y >= 0 otherwise."""
    if p == int(p) and int(p) % 2 == 0:
        low, high = x.smallest_magnitude, x.magnitude
    elif p == int(p) or bool((x.lo >= 0).all()):
        low, high = x.lo, x.hi
    else:
        return None
    if p < 0 and not bool((x.smallest_magnitude > 0).all()):
        return None  # 0 in the interval: y^p unbounded near it
    ends = torch.stack([low.pow(p), high.pow(p)])
    if not bool(torch.isfinite(ends).all()):
        return None
    return widen(ends.min(dim=0).values, ends.max(dim=0).values)


def power_slope(x: Interval, p: float) -> float | None:
    """max |p y^(p-1)| on x (at the largest |y| for p >= 1, at the smallest for p < 1)."""
    if p != int(p) and not bool((x.lo >= 0).all()):
        return None
    magnitude = x.magnitude if p >= 1 else x.smallest_magnitude
    if p < 1 and not bool((magnitude > 0).all()):
        return None
    value = float((abs(p) * magnitude.pow(p - 1)).max())
    return value * (1 + 2.0**-40) if math.isfinite(value) else None
