"""Normalisations. Inference BatchNorm is a per-channel affine map (folded into a neighbouring layer by
``lipcheck.passes``); the others divide by a statistic of their input."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from lipcheck.graph import Graph, Node
from lipcheck.ops.arithmetic import interval_product
from lipcheck.ops.base import (
    AffineContext,
    EvalContext,
    Interval,
    LocalBound,
    NotFoldable,
    Op,
    RuleContext,
    UnsupportedVariant,
    axis_index,
    node_attrs,
    register,
    unbounded,
    widen,
)
from lipcheck.spectral import dense_sigma_max

EPSILON = {"epsilon": 1e-5}
EXACT_ROW = 2048  # LayerNorm rows up to this size get the exact norm of their centred scaling (a dense SVD)


def batchnorm_affine(scale: Any, bias: Any, mean: Any, var: Any, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """(multiplier, shift) of an inference BatchNorm: y = multiplier * x + shift, in float64."""
    scale, bias, mean, var = (np.asarray(p, dtype=np.float64) for p in (scale, bias, mean, var))
    multiplier = scale / np.sqrt(var + epsilon)
    return multiplier, bias - mean * multiplier


def _channel(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel parameter shaped to broadcast over [N, C, ...] (or per-element, opset < 9 spatial=0)."""
    if param.dim() == 1:
        return param.reshape(1, -1, *([1] * (x.dim() - 2)))
    return param.unsqueeze(0)


@register
class BatchNormalization(Op):
    """Inference BatchNorm not next to a linear op: a per-channel scaling, max |scale/sqrt(var+eps)|."""

    attributes = {**EPSILON, "training_mode": 0}
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if int(ctx.attrs["training_mode"]):
            return unbounded("BatchNormalization in training mode uses batch statistics", "training mode")
        if any(ctx.is_variable(i) for i in range(1, 5)):
            return unbounded("BatchNorm parameters computed from the input")
        affine = self.channel_affine(ctx.graph, ctx.node)
        if affine is None:
            return unbounded("BatchNorm parameters are not known constants", "unknown weight")
        return LocalBound(float(np.abs(affine[0]).max()) * (1 + 1e-15), "per-channel scale", exact=True)

    def channel_affine(self, graph: Graph, node: Node) -> tuple[np.ndarray, np.ndarray] | None:
        """(multiplier, shift) with constant parameters in inference mode; None otherwise."""
        attrs = node_attrs(node)
        if int(attrs["training_mode"]):
            return None
        params = [graph.constants.get(v) for v in node.inputs[1:5]]
        if len(params) < 4 or any(p is None for p in params):
            return None
        scale, bias, mean, var = params
        return batchnorm_affine(scale, bias, mean, var, float(attrs["epsilon"]))

    def parameter_inputs(self, node: Node) -> list[str]:
        return list(node.inputs[1:5])

    def shift_parameters(self, node: Node, shift: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """scale 1, bias = shift, mean 0, and var = 1 - eps, which makes the scale exactly 1."""
        epsilon = float(node_attrs(node)["epsilon"])
        values = [np.ones_like(shift), shift, np.zeros_like(shift), np.full_like(shift, 1.0 - epsilon)]
        return list(zip(node.inputs[1:5], values, strict=True))

    def check(self, node: Node) -> None:
        if int(node.attrs.get("training_mode", 0) or 0):
            raise UnsupportedVariant("BatchNormalization(training_mode=1)")

    def evaluate(
        self,
        ctx: EvalContext,
        x: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        mean: torch.Tensor,
        var: torch.Tensor,
    ) -> torch.Tensor:
        multiplier = scale / torch.sqrt(var + float(ctx.attrs["epsilon"]))
        return (x - _channel(mean, x)) * _channel(multiplier, x) + _channel(bias, x)

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        affine = self.channel_affine(ctx.graph, ctx.node)
        if ctx.variable != 0 or affine is None:
            raise NotFoldable("BatchNorm parameters unknown")
        scale, shift = (torch.from_numpy(a).reshape(-1, *([1] * (x.dim() - 2))) for a in affine)
        y = x * (scale.abs() if ctx.absolute else scale)
        return y + shift if ctx.shifts else y


def normalise(x: torch.Tensor, dims: Sequence[int], epsilon: float) -> torch.Tensor:
    """(x - mean) / sqrt(variance + epsilon) over ``dims``."""
    mean = x.mean(dim=tuple(dims), keepdim=True)
    centred = x - mean
    return centred / torch.sqrt(centred.pow(2).mean(dim=tuple(dims), keepdim=True) + epsilon)


class StandardisedScale(Op):
    """scale * n(x) + bias, where n divides the centred input by sqrt(its mean square + epsilon).

    On one group of d entries, with c the centred input (centring is a projection, norm 1),
    n(c) = c / s with s = sqrt(|c|^2 / d + eps): its Jacobian (1/s)(I - c c^T / (d s^2)) has the
    eigenvalues 1/s (orthogonal to c) and eps / s^3 (along c), both <= 1/sqrt(eps), reached at c = 0
    (a constant input). The scale multiplies by at most max |scale|, and groups are independent blocks:
    L = max |scale| / sqrt(eps). Finite, and large because eps is small; far smaller on a domain where the
    variance is bounded below. RMSNorm is the same map without the centring.
    """

    attributes = EPSILON
    group: ClassVar[str] = "group"  # what one normalised group is, for the method text

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        epsilon = float(ctx.attrs["epsilon"])
        if ctx.is_variable(1):
            return unbounded(f"{ctx.node.op}'s scale computed from the input (a product of two activations)")
        if not epsilon > 0:
            return unbounded(f"{ctx.node.op} with epsilon {epsilon:g} divides by the input's deviation (not Lipschitz)")
        if any(ctx.node.outputs[1:]):
            return unbounded(f"{ctx.node.op}'s statistics outputs are not bounded", "statistics outputs")
        gamma, exact, what = self.scale_norm(ctx)
        value = gamma / math.sqrt(epsilon) * (1 + 1e-12)
        method = (
            f"{what} / sqrt(eps) = {gamma:.6g} / sqrt({epsilon:.3g}): the slope at a constant {self.group} "
            "(large because eps is small)"
        )
        variance = self.smallest_variance(ctx)
        if variance is not None and variance > 0:
            value = gamma / math.sqrt(variance + epsilon) * (1 + 1e-12)
            method = f"{what} / sqrt(var_min + eps), var_min = {variance:.3g} on the input's range"
            exact = False
        if not ctx.is_variable(2):
            return LocalBound(value, method, exact=exact)
        factor = ctx.broadcast_factor(2)
        if factor is None:
            return unbounded("bias broadcast to an unknown size; give --input-shape", "unknown shape")
        output = value * ctx.input_lipschitz[0] + factor * ctx.input_lipschitz[2]
        return LocalBound(value, method + " + variable bias", output_lipschitz=output)

    def scale_norm(self, ctx: RuleContext) -> tuple[float, bool, str]:
        """(the norm of the scale acting on a centred group, whether it is exact, what it is)."""
        return _max_abs(ctx.const(1)), False, "max|scale|"

    def smallest_variance(self, ctx: RuleContext) -> float | None:
        """A lower bound on every group's variance over the input's range (None: no domain, or not known)."""
        return None


def _max_abs(scale: Any) -> float:
    return float(np.abs(np.asarray(scale, dtype=np.float64)).max(initial=0.0)) if scale is not None else 1.0


@register
class LayerNormalization(StandardisedScale):
    """max |scale| / sqrt(eps): the slope of (x - mean) / sqrt(var + eps) at a constant input."""

    attributes = {**EPSILON, "axis": -1}
    group = "row"
    uses_ranges = True

    def smallest_variance(self, ctx: RuleContext) -> float | None:
        x = ctx.input_range(0)
        if x is None or not x.lo.is_floating_point() or x.lo.dim() == 0:
            return None
        axis = axis_index(int(ctx.attrs["axis"]), x.lo.dim())
        width = math.prod(x.lo.shape[axis:])
        return smallest_mean_square_deviation(x.lo.reshape(-1, width), x.hi.reshape(-1, width))

    def value_range(self, ctx: RuleContext, *ranges: Interval | None) -> Interval | tuple[Interval | None, ...] | None:
        """A standardised row of d entries sums to 0 with norm < sqrt(d): each entry within sqrt(d - 1)."""
        x = ranges[0]
        if x is None or x.exact or ctx.is_variable(1) or ctx.is_variable(2):
            return None
        axis = axis_index(int(ctx.attrs["axis"]), x.lo.dim())
        width = math.prod(x.lo.shape[axis:])
        reach = math.sqrt(max(width - 1, 0)) * (1 + 2.0**-40)
        standard = standardised_range(x.lo.reshape(-1, width), x.hi.reshape(-1, width), float(ctx.attrs["epsilon"]))
        z = Interval(
            standard.lo.clamp_min(-reach).reshape(x.lo.shape), standard.hi.clamp_max(reach).reshape(x.lo.shape)
        )
        scale, bias = ctx.const(1), ctx.const(2)
        if scale is not None:
            gamma = torch.as_tensor(np.asarray(scale, np.float64))
            z = interval_product(z, Interval(gamma, gamma))
        if bias is not None:
            beta = torch.as_tensor(np.asarray(bias, np.float64))
            z = widen(z.lo + beta, z.hi + beta)
        return (z, None, None)

    def scale_norm(self, ctx: RuleContext) -> tuple[float, bool, str]:
        """||diag(scale) P|| exactly (P the centring projection) for rows up to EXACT_ROW entries."""
        shape, scale = ctx.shape(0), ctx.const(1)
        axis = int(ctx.attrs["axis"])
        dims = shape[axis_index(axis, len(shape)) :] if shape is not None else None
        if dims is None or None in dims or not 2 <= math.prod(dims) <= EXACT_ROW:  # type: ignore[arg-type]
            return super().scale_norm(ctx)
        d = math.prod(dims)  # type: ignore[arg-type]
        full = tuple(int(n) for n in dims)  # type: ignore[arg-type]
        gamma = np.ones(d) if scale is None else np.broadcast_to(np.asarray(scale, np.float64), full).reshape(-1)
        matrix = torch.from_numpy(np.diag(gamma) - np.outer(gamma, np.ones(d)) / d)
        return dense_sigma_max(matrix).value, True, "||diag(scale) (I - 11^T/d)||"

    def evaluate(
        self, ctx: EvalContext, x: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        axis = axis_index(int(ctx.attrs["axis"]), x.dim())
        dims = tuple(range(axis, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        inv_std = 1 / torch.sqrt((x - mean).pow(2).mean(dim=dims, keepdim=True) + float(ctx.attrs["epsilon"]))
        y = (x - mean) * inv_std
        if scale is not None:
            y = y * scale
        if bias is not None:
            y = y + bias
        return y, mean, inv_std


@register
class InstanceNormalization(StandardisedScale):
    """max |scale| / sqrt(eps): each channel of each sample standardised over its spatial entries."""

    group = "channel"

    def scale_norm(self, ctx: RuleContext) -> tuple[float, bool, str]:
        """One scale per channel: |scale_c| is the norm on a centred channel of two entries or more."""
        gamma, _, what = super().scale_norm(ctx)
        shape = ctx.shape(0)
        spatial = shape[2:] if shape is not None else None
        exact = spatial is not None and None not in spatial and math.prod(spatial) >= 2  # type: ignore[arg-type]
        return gamma, exact, what

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y = normalise(x, range(2, x.dim()), float(ctx.attrs["epsilon"]))
        return y * _channel(scale, x) + _channel(bias, x)


@register
class GroupNormalization(StandardisedScale):
    """max |scale| / sqrt(eps): each group of channels of each sample standardised together."""

    group = "group"

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        groups = int(ctx.attrs["num_groups"])
        n, c = x.shape[0], x.shape[1]
        y = normalise(x.reshape(n, groups, -1), [2], float(ctx.attrs["epsilon"])).reshape(x.shape)
        if scale.numel() == groups and groups != c:  # opset 18: one scale and bias per group
            scale, bias = scale.repeat_interleave(c // groups), bias.repeat_interleave(c // groups)
        return y * _channel(scale, x) + _channel(bias, x)


@register
class RMSNormalization(StandardisedScale):
    """max |scale| / sqrt(eps): x / sqrt(mean(x^2) + eps), the slope at 0 (no centring)."""

    attributes = {**EPSILON, "axis": -1}
    group = "zero row"

    def scale_norm(self, ctx: RuleContext) -> tuple[float, bool, str]:
        """No centring: the Jacobian at 0 is diag(scale) / sqrt(eps), so max|scale| is exact."""
        return _max_abs(ctx.const(1)), True, "max|scale|"

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        axis = axis_index(int(ctx.attrs["axis"]), x.dim())
        dims = tuple(range(axis, x.dim()))
        y = x / torch.sqrt(x.pow(2).mean(dim=dims, keepdim=True) + float(ctx.attrs["epsilon"]))
        return y if scale is None else y * scale


MVN_EPSILON = float(np.float32(1e-9))  # ONNX's function body adds it to the deviation, in float32


@register
class MeanVarianceNormalization(Op):
    """1 / 1e-9: ONNX's (x - mean) / (sqrt(var) + 1e-9) has slope 1/(r + eps) across the input at deviation r.

    With c the centred input and r = |c| / sqrt(n), f(c) = c / (r + eps): its Jacobian has the eigenvalues
    1/(r + eps) (orthogonal to c) and eps/(r + eps)^2 (along c), both <= 1/eps, reached as c -> 0.
    """

    attributes = {"axes": [0, 2, 3]}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        method = "1 / eps with ONNX's eps = 1e-9 added to the deviation: the slope at a constant input"
        return LocalBound(1.0 / MVN_EPSILON * (1 + 1e-12), method, exact=True)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        axes = tuple(axis_index(int(a), x.dim()) for a in ctx.attrs["axes"])
        centred = x - x.mean(dim=axes, keepdim=True)
        return centred / (torch.sqrt(centred.pow(2).mean(dim=axes, keepdim=True)) + MVN_EPSILON)


@register
class LpNormalization(Op):
    """x / ||x||_p, with no epsilon: not Lipschitz near 0."""

    attributes = {"p": 2, "axis": -1}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded("normalising by the input's norm (no epsilon) is not Lipschitz near 0")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        p = int(ctx.attrs["p"])
        norm = x.abs().pow(p).sum(dim=int(ctx.attrs["axis"]), keepdim=True).pow(1 / p)
        return torch.where(norm == 0, 0.0, x / torch.where(norm == 0, 1.0, norm))  # ONNX: 0 for a zero vector


def lrn_constant(alpha: float, beta: float, bias: float, size: int) -> float:
    """A global bound on LRN's slope, for bias > 0, alpha >= 0, beta >= 0.

    With S_c the window's sum of squares and D_c = bias + a S_c (a = alpha/size), the Jacobian is
    diag(D^-beta) - (2 alpha beta / size) M, (M v)_c = x_c D_c^(-beta-1) sum_(j in window c) x_j v_j. The first
    term is at most bias^-beta (reached at x = 0). By Cauchy-Schwarz (x_c^2 <= S_c, every j in at most
    ``size`` windows) ||M v||^2 <= max_c S_c^2 D_c^(-2 beta-2) size ||v||^2, and S / (bias + a S)^(beta+1) peaks
    at S = bias / (a beta): ||J|| <= bias^-beta + 2 alpha beta sqrt(size) g* / size.
    """
    if alpha == 0.0 or beta == 0.0:
        return bias**-beta
    a = alpha / size
    peak = bias / (a * beta)
    g = peak / (bias + a * peak) ** (beta + 1)
    return bias**-beta + 2.0 * alpha * beta * g / math.sqrt(size)


def lrn_window_sum(squares: torch.Tensor, size: int) -> torch.Tensor:
    """The sum over c - floor((size-1)/2) <= i <= c + ceil((size-1)/2) along axis 1 (ONNX's window)."""
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    moved = squares.movedim(1, -1)
    padded = torch.nn.functional.pad(moved, (before, after))
    return padded.unfold(-1, size, 1).sum(-1).movedim(-1, 1)


@register
class LRN(Op):
    """Local response normalisation across channels: see ``lrn_constant`` (the verdict for bias <= 0, alpha or
    beta < 0)."""

    attributes = {"alpha": 1e-4, "beta": 0.75, "bias": 1.0}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        alpha, beta, bias = (float(ctx.attrs[k]) for k in ("alpha", "beta", "bias"))
        if bias <= 0 or alpha < 0 or beta < 0:
            return unbounded("LRN with bias <= 0 or negative alpha/beta has unbounded slope near 0")
        method = "bias^-beta + 2 alpha beta max_S S / (bias + alpha S / size)^(beta+1) / sqrt(size)"
        return LocalBound(lrn_constant(alpha, beta, bias, int(ctx.attrs["size"])) * (1 + 1e-12), method)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        alpha, beta, bias = (float(ctx.attrs[k]) for k in ("alpha", "beta", "bias"))
        size = int(ctx.attrs["size"])
        return x / (bias + alpha / size * lrn_window_sum(x * x, size)).pow(beta)


def standardised_range(low: torch.Tensor, high: torch.Tensor, epsilon: float) -> Interval:
    """(y - mean(y)) / sqrt(var(y) + eps) per row [rows, d] for y in [low, high]: the centred entry's interval
    over the interval of 1 / sqrt(var + eps), var between the rows' smallest and largest variance on the box."""
    rounding = (low.shape[1] + 2) * 2.0**-52  # a float64 mean of d terms is within d u of their magnitudes' mean
    mean_low = low.mean(dim=1, keepdim=True) - rounding * low.abs().mean(dim=1, keepdim=True) - 1e-300
    mean_high = high.mean(dim=1, keepdim=True) + rounding * high.abs().mean(dim=1, keepdim=True) + 1e-300
    centred = widen(low - mean_high, high - mean_low)
    largest = torch.maximum(centred.lo.square(), centred.hi.square()).mean(dim=1, keepdim=True) * (1 + 2.0**-40)
    smallest = _row_smallest_deviation(low, high).unsqueeze(1)
    inverse = Interval((largest + epsilon).rsqrt() * (1 - 2.0**-40), (smallest + epsilon).rsqrt() * (1 + 2.0**-40))
    return interval_product(centred, inverse)


def smallest_mean_square_deviation(low: torch.Tensor, high: torch.Tensor, steps: int = 64) -> float:
    """A certified lower bound on min over rows and over y in [low, high] of mean_i (y_i - mean(y))^2."""
    value = _row_smallest_deviation(low, high, steps)
    return float(value.min()) if value.numel() else 0.0


def _row_smallest_deviation(low: torch.Tensor, high: torch.Tensor, steps: int = 64) -> torch.Tensor:
    """Per row, a certified lower bound on min over y in [low, high] of mean_i (y_i - mean(y))^2.

    min_y var(y) = min_mu g(mu), g(mu) = mean_i dist(mu, [low_i, high_i])^2, convex in mu. Bisection on the sign of
    g' brackets the minimiser; convexity gives g(mu*) >= g(mu) - |g'(mu)| * (bracket width) at the last mu.
    """
    left, right = low.min(dim=1).values, high.max(dim=1).values
    for _ in range(steps):
        mid = (left + right) / 2
        rising = _deviation_slope(low, high, mid) > 0
        right = torch.where(rising, mid, right)
        left = torch.where(rising, left, mid)
    mid = (left + right) / 2
    value = _deviation(low, high, mid) - _deviation_slope(low, high, mid).abs() * (right - left)
    return (value * (1 - 2.0**-40) - 1e-300).clamp_min(0.0)


def _deviation(low: torch.Tensor, high: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    m = mu[:, None]
    return ((low - m).clamp_min(0) + (m - high).clamp_min(0)).square().mean(dim=1)


def _deviation_slope(low: torch.Tensor, high: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    m = mu[:, None]
    return 2 * ((m - high).clamp_min(0) - (low - m).clamp_min(0)).mean(dim=1)
