"""Reductions over axes: a mean of n entries is 1/sqrt(n)-Lipschitz, a sum or l1 norm sqrt(n), a max, an l2
norm or a log-sum-exp 1; a sum of squares, a product or a log of a sum has no global constant.

Running sums (CumSum) too: the lower-triangular matrix of ones along the axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch

from lipcheck.graph import Graph, Node
from lipcheck.ops.base import (
    AffineContext,
    EvalContext,
    LocalBound,
    NotFoldable,
    Op,
    OrderStatistics,
    RuleContext,
    axis_index,
    node_attrs,
    register,
    unbounded,
)
from lipcheck.ops.pooling import mean_rounding_terms, spatial_count
from lipcheck.ops.shape import ints

Reduction = Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor]


def reduced_axes(ctx: RuleContext) -> list[int] | None:
    """The axes a node reduces ([] for none, None when the input's rank is unknown)."""
    shape = ctx.shape(0)
    axes = ctx.attrs.get("axes")
    if not axes:
        if int(ctx.attrs["noop_with_empty_axes"]):
            return []
        return list(range(len(shape))) if shape is not None else None
    return [int(a) for a in axes]


def _count(ctx: RuleContext) -> int | None:
    """Entries summed into one output entry (None when unknown: sizes, or axes known only at run time)."""
    if ctx.attrs.get("axes") is None and ctx.known_only_at_run_time(1):
        return None
    axes = reduced_axes(ctx)
    return spatial_count(ctx.shape(0), axes) if axes is not None else None


class Reduce(Op):
    """Reduces the ``axes`` (an attribute, or the second input from opset 18) with ``function``."""

    attributes = {"keepdims": 1, "noop_with_empty_axes": 0}

    @staticmethod
    def function(x: torch.Tensor, axes: tuple[int, ...], keepdims: bool, /) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, axes_input: torch.Tensor | None = None) -> torch.Tensor:
        axes = ctx.attrs.get("axes")
        if axes is None and axes_input is not None:
            axes = [int(v) for v in axes_input.reshape(-1).tolist()]
        if not axes:
            if int(ctx.attrs["noop_with_empty_axes"]):
                return x
            axes = list(range(x.dim()))
        return self.function(x, tuple(axis_index(int(a), x.dim()) for a in axes), bool(int(ctx.attrs["keepdims"])))


@register
class ReduceMean(Reduce):
    """Mean of n entries: 1/sqrt(n) (<= 1 when n is unknown)."""

    monotone = True

    function = staticmethod(lambda x, a, k: x.mean(dim=a, keepdim=k))
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        count = _count(ctx)
        if count is None:
            return LocalBound(1.0, "mean (size unknown): <= 1")
        return LocalBound(1.0 / math.sqrt(max(count, 1)), f"mean of {count}: 1/sqrt({count})", exact=True)

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        axes = ctx.attrs.get("axes")
        if axes is None and ctx.has_input(1):
            raise NotFoldable("ReduceMean over axes known only at run time")
        rank = len(ctx.in_shape)
        if not axes:
            if int(ctx.attrs["noop_with_empty_axes"]):
                return x
            axes = list(range(rank))
        axes = sorted({int(axis) % rank for axis in axes})
        if 0 in axes:
            raise NotFoldable("ReduceMean over the batch axis")
        return x.mean(dim=tuple(axes), keepdim=True).reshape(x.shape[0], *ctx.out_shape[1:])

    def rounding_terms(self, node: Node, graph: Graph) -> int:
        return mean_rounding_terms(node, graph)


@register
class ReduceSum(Reduce):
    """Sum of n entries: sqrt(n)."""

    monotone = True

    function = staticmethod(lambda x, a, k: x.sum(dim=a, keepdim=k))
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return _sqrt_count(ctx, "sum")


def _sqrt_count(ctx: RuleContext, what: str) -> LocalBound:
    """sqrt(n) for a sum (or l1 norm) of n entries per output: the all-ones (or sign) gradient's norm."""
    count = _count(ctx)
    if count is not None:
        return LocalBound(math.sqrt(count), f"{what} of {count}: sqrt({count})", exact=True)
    entries = spatial_count(ctx.shape(0), range(len(ctx.shape(0) or ())))
    if ctx.known_only_at_run_time(1) and entries is not None:  # a sum over any axes sums <= all entries
        return LocalBound(math.sqrt(entries), f"{what} over axes known at run time: <= sqrt({entries})")
    return unbounded(f"{what} over an axis of unknown size; give --input-shape", "unknown shape")


class DisjointGroups(Reduce):
    """Max (or l2 norm) over disjoint groups: 1."""

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return LocalBound(1.0, "max over disjoint groups")


def _extreme(x: torch.Tensor, axes: tuple[int, ...], keepdims: bool, largest: bool) -> torch.Tensor:
    """amax / amin; over an empty set ONNX gives the identity of the reduction (-inf / +inf, False / True)."""
    if x.numel():
        return x.amax(dim=axes, keepdim=keepdims) if largest else x.amin(dim=axes, keepdim=keepdims)
    shape = [1 if i in axes else n for i, n in enumerate(x.shape) if keepdims or i not in axes]
    if x.dtype == torch.bool:
        return torch.full(shape, not largest, dtype=torch.bool, device=x.device)
    if x.is_floating_point():
        return torch.full(shape, -math.inf if largest else math.inf, dtype=x.dtype, device=x.device)
    info = torch.iinfo(x.dtype)
    return torch.full(shape, info.min if largest else info.max, dtype=x.dtype, device=x.device)


class Extreme(DisjointGroups):
    """The largest (or smallest) entry of each group: one entry of the sorted group."""

    monotone = True

    largest: ClassVar[bool]
    piecewise_linear = True

    def order_statistics(self, node: Node, graph: Graph) -> OrderStatistics | None:
        shape = graph.shape(node.inputs[0])
        axes = node_attrs(node).get("axes")
        if shape is None or (not axes and len(node.inputs) > 1 and node.inputs[1]):
            return None  # axes given as an input the frontend could not read
        if not axes and int(node_attrs(node)["noop_with_empty_axes"]):
            return None
        reduced = sorted({axis_index(int(a), len(shape)) for a in axes} if axes else range(len(shape)))
        size = spatial_count(shape, reduced)
        if size is None or size == 0:
            return None
        return OrderStatistics(tuple(reduced), size, frozenset([size - 1 if self.largest else 0]))


@register
class ReduceMax(Extreme):
    """Max over disjoint groups: 1."""

    function = staticmethod(lambda x, a, k: _extreme(x, a, k, largest=True))
    largest = True


@register
class ReduceMin(Extreme):
    """Min over disjoint groups: 1."""

    function = staticmethod(lambda x, a, k: _extreme(x, a, k, largest=False))
    largest = False


@register
class ReduceL2(DisjointGroups):
    """l2 norm over disjoint groups: 1 (the triangle inequality)."""

    function = staticmethod(lambda x, a, k: x.pow(2).sum(dim=a, keepdim=k).sqrt())


@register
class ReduceL1(Reduce):
    """l1 norm of n entries: sqrt(n), the norm of its gradient sign(x) (groups are disjoint)."""

    function = staticmethod(lambda x, a, k: x.abs().sum(dim=a, keepdim=k))
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return _sqrt_count(ctx, "l1 norm")


@register
class ReduceSumSquare(Reduce):
    """Sum of squares: gradient 2x, unbounded."""

    function = staticmethod(lambda x, a, k: x.pow(2).sum(dim=a, keepdim=k))

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded("a sum of squares has gradient 2x, unbounded")


@register
class ReduceLogSum(Reduce):
    """log of a sum: unbounded slope near a zero sum."""

    function = staticmethod(lambda x, a, k: x.sum(dim=a, keepdim=k).log())

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded("log of a sum has unbounded slope near 0")


@register
class ReduceProd(Reduce):
    """A product of entries: its gradient holds the other entries, unbounded."""

    function = staticmethod(lambda x, a, k: _prod(x, a, k))

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded("a product of entries has unbounded slope (the other entries)")


def _prod(x: torch.Tensor, axes: tuple[int, ...], keepdims: bool) -> torch.Tensor:
    for axis in sorted(axes, reverse=True):
        x = x.prod(dim=axis, keepdim=keepdims)
    return x


@register
class ReduceLogSumExp(DisjointGroups):
    """log sum exp: its gradient is a softmax p, ||p||_2 <= 1 (approached when one entry dominates); groups
    are disjoint, so 1."""

    monotone = True

    function = staticmethod(lambda x, a, k: torch.logsumexp(x, dim=a, keepdim=k))

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return LocalBound(1.0, "gradient softmax(x): ||p||_2 <= 1, per disjoint group", exact=True)


def running_sum_norm(n: int) -> float:
    """||L_n||_2 for L_n the n x n lower-triangular matrix of ones: 1 / (2 sin(pi / (2 (2n + 1)))).

    L_n^-1 is the difference matrix D (1 on the diagonal, -1 below it); D^T D is the second-difference
    matrix with a free end, whose eigenvalues are 4 sin^2((2j - 1) pi / (2 (2n + 1))), j = 1..n. So
    sigma_max(L_n) = 1 / sigma_min(D) = 1 / (2 sin(pi / (2 (2n + 1)))) (about (2n + 1) / pi). Evaluated in
    float64 (relative error below 1e-15) and rounded up by 1e-12.
    """
    if n <= 0:
        return 0.0
    return 1.0 / (2.0 * math.sin(math.pi / (2.0 * (2 * n + 1)))) * (1 + 1e-12)


@register
class CumSum(Op):
    """Running sums along an axis: ||L_n|| = 1/(2 sin(pi/(2(2n+1)))) for n summed entries, exact.

    Each line along the axis is multiplied by L_n (inclusive), its transpose (reverse), or L_n shifted by one
    (exclusive: L_{n-1} bordered by zeros, so ||L_{n-1}||); lines are independent, so the norm is that of
    one line (``running_sum_norm``). An axis known only at run time: the largest over the axes.
    """

    monotone = True

    attributes = {"exclusive": 0, "reverse": 0}
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        shape, axis = ctx.shape(0), ctx.const(1)
        if shape is not None and 0 in shape:
            return LocalBound(0.0, "empty input", exact=True)
        if shape is None:
            return unbounded("running sum over an axis of unknown size; give --input-shape", "unknown shape")
        axes = [axis_index(int(np.asarray(axis).reshape(-1)[0]), len(shape))] if axis is not None else range(len(shape))
        sizes = [shape[a] for a in axes]
        if not sizes or None in sizes:
            return unbounded("running sum over an axis of unknown size; give --input-shape", "unknown shape")
        n = max(sizes) - int(ctx.attrs["exclusive"])  # type: ignore[type-var, operator]
        where = "" if axis is not None else ", the longest axis (axis known at run time)"
        method = f"lower-triangular ones, n = {n}{where}: 1/(2 sin(pi/(2(2n+1))))"
        return LocalBound(running_sum_norm(n), method, exact=axis is not None)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
        return running(ctx, x, axis, torch.cumsum, 0.0)


def running(
    ctx: EvalContext, x: torch.Tensor, axis: torch.Tensor, accumulate: Callable, identity: float
) -> torch.Tensor:
    """A running sum or product along ``axis`` (ONNX's exclusive and reverse attributes)."""
    dim = axis_index(ints(axis)[0], x.dim())
    reverse = bool(int(ctx.attrs["reverse"]))
    line = x.flip(dim) if reverse else x
    total = accumulate(line, dim).to(x.dtype)
    if int(ctx.attrs["exclusive"]):
        first = torch.full_like(total.narrow(dim, 0, min(1, total.shape[dim])), identity)
        total = torch.cat([first, total.narrow(dim, 0, max(total.shape[dim] - 1, 0))], dim)
    return total.flip(dim) if reverse else total


@register
class CumProd(Op):
    """Running products: each holds products of entries, whose slopes are the other entries (unbounded)."""

    attributes = {"exclusive": 0, "reverse": 0}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded("a running product has unbounded slope (the other entries)")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
        return running(ctx, x, axis, torch.cumprod, 1.0)
