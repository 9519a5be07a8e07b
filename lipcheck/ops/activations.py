"""Elementwise activations: the l2 Lipschitz constant is the sup of |f'| over the reals.

Constants without a closed form are the numerically located maxima of |f'| rounded *up* in the 7th
significant digit (tests re-derive each one on a fine grid). ``slope`` gives the interval of difference
quotients the chain bounds use: [inf f', sup f'] (for SiLU and GELU, f'(x) + f'(-x) = 1 gives [1 - S, S]).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from lipcheck.graph import Graph, Node
from lipcheck.ops.base import (
    EvalContext,
    Interval,
    LocalBound,
    Op,
    RuleContext,
    Slope,
    UnsupportedVariant,
    axis_index,
    node_attrs,
    register,
    unbounded,
    widen,
)

SILU_MAX_SLOPE = 1.099840  # at x ~ 2.3994: sigmoid(x) * (1 + x * (1 - sigmoid(x)))
MISH_MAX_SLOPE = 1.088499  # at x ~ 1.4906
GELU_MAX_SLOPE = 1.128905  # at x = sqrt(2): Phi(sqrt 2) + sqrt(2) phi(sqrt 2)
GELU_TANH_MAX_SLOPE = 1.128994  # tanh approximation, at x ~ 1.4185
ERF_MAX_SLOPE = 2.0 / math.sqrt(math.pi) * (1 + 1e-15)
SELU_ALPHA = 1.6732632423543772
SELU_GAMMA = 1.0507009873554805
SILU_MINIMISER = -1.2784645  # where x sigmoid(x) is smallest
GELU_MINIMISER = -0.7517916  # erf form (the tanh form's is within 1e-3: covered by UNIMODAL_MARGIN)
MISH_MINIMISER = -1.1924  # x tanh(softplus(x))
UNIMODAL_MARGIN = 1e-5  # f(x* + d) - f(x*) ~ f''/2 d^2: below 1e-6 for |d| <= 1e-3 here
RECOGNITION_MARGIN = 1e-4  # covers the tiny mismatch between a file's constants and the reference function


def _exact(value: float, method: str) -> LocalBound:
    return LocalBound(value, method, exact=True)


class Activation(Op):
    """An elementwise function ``function`` whose slope is at most ``constant``."""

    @staticmethod
    def function(x: torch.Tensor, /) -> torch.Tensor:
        raise NotImplementedError

    constant: ClassVar[float] = 1.0
    method: ClassVar[str] = "max |f'| = 1"
    exact_constant: ClassVar[bool] = True
    quotients: ClassVar[tuple[float, float] | None] = None  # the slope interval, when it is constant
    uses_ranges = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        x = ctx.input_range(0)
        units = None if x is None else self.slope_on(ctx.node, ctx.graph, x)
        if units is not None and units[0].numel():
            largest = float(torch.maximum(units[0].abs(), units[1].abs()).max())
            if largest < self.constant:
                return LocalBound(largest, "max |f'| on the input's range")
        return LocalBound(self.constant, self.method, exact=self.exact_constant)

    def slope(self, node: Node, graph: Graph) -> Slope | None:
        return None if self.quotients is None else Slope(*self.quotients)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


def relu(ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
    """max(x, 0); smoothed, tau * softplus(x / tau) with tau half the spread of x (gradient search only)."""
    if not ctx.smooth:
        return torch.relu(x)
    tau = (0.5 * x.detach().std() if x.numel() > 1 else x.detach().abs().reshape(())).clamp_min(1e-6)
    return tau * F.softplus(x / tau)


@register
class Relu(Activation):
    """max(x, 0): slope in [0, 1]."""

    quotients = (0.0, 1.0)
    piecewise_linear = kinked = decomposes_activations = positive_part = monotone = True

    def slope_on(self, node: Node, graph: Graph, x: Interval) -> tuple[torch.Tensor, torch.Tensor] | None:
        """1 where the input is never negative, 0 where it is never positive, [0, 1] elsewhere."""
        return (x.lo >= 0).to(torch.float64), (x.hi > 0).to(torch.float64)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return relu(ctx, x)


@register
class Tanh(Activation):
    """tanh: slope in (0, 1]."""

    function = staticmethod(torch.tanh)
    quotients = (0.0, 1.0)
    decomposes_activations = monotone = True

    def slope_on(self, node: Node, graph: Graph, x: Interval) -> tuple[torch.Tensor, torch.Tensor] | None:
        """tanh' = 1 - tanh^2 decreases with |x|."""
        return _outward_slopes(1 - torch.tanh(x.magnitude).square(), 1 - torch.tanh(x.smallest_magnitude).square())


@register
class Softsign(Activation):
    """x / (1 + |x|): slope in (0, 1]."""

    function = staticmethod(lambda x: x / (1 + x.abs()))
    quotients = (0.0, 1.0)
    monotone = True


@register
class Softplus(Activation):
    """log(1 + e^x): slope in (0, 1)."""

    function = staticmethod(lambda x: F.softplus(x, threshold=30.0))
    quotients = (0.0, 1.0)
    monotone = True
    decomposes_activations = True


@register
class Sin(Activation):
    """sin: |slope| <= 1."""

    function = staticmethod(torch.sin)


@register
class Cos(Activation):
    """cos: |slope| <= 1."""

    function = staticmethod(torch.cos)


@register
class Atan(Activation):
    """arctan: slope in (0, 1]."""

    function = staticmethod(torch.atan)
    quotients = (0.0, 1.0)
    monotone = True


@register
class Asinh(Activation):
    """arsinh: slope 1 / sqrt(1 + x^2) in (0, 1]."""

    function = staticmethod(torch.asinh)
    quotients = (0.0, 1.0)
    monotone = True


@register
class Celu(Activation):
    """max(0, x) + min(0, alpha (e^(x/alpha) - 1)): slope in (0, 1]."""

    attributes = {"alpha": 1.0}
    quotients = (0.0, 1.0)
    monotone = True

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        alpha = float(ctx.attrs["alpha"])
        return torch.clamp_min(x, 0) + torch.clamp_max(alpha * torch.expm1(torch.clamp_max(x, 0) / alpha), 0)


@register
class Clip(Op):
    """Clamp to constant bounds: 1. Bounds computed from the input move every entry they clamp."""

    piecewise_linear = monotone = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if not (ctx.is_variable(1) or ctx.is_variable(2)):
            return _exact(1.0, "max |f'| = 1")
        # |dy_j| <= max(|dx_j|, |dmin|, |dmax|): sum the squares, a scalar bound counted once per entry
        terms = []
        for index in ctx.variable_inputs():
            copies = ctx.broadcast_factor(index)
            if copies is None:
                return unbounded("clip bound broadcast to an unknown size; give --input-shape", "unknown shape")
            terms.append(copies * ctx.input_lipschitz[index])
        return LocalBound(
            1.0,
            "clamp with variable bounds: sqrt(sum L_i^2 copies_i)",
            output_lipschitz=math.sqrt(sum(t * t for t in terms)),
        )

    def slope(self, node: Node, graph: Graph) -> Slope | None:
        bounds = [graph.constants.get(v) for v in node.inputs[1:3] if v]
        if any(b is None for b in bounds) or any(v and v not in graph.constants for v in node.inputs[1:]):
            return None
        return Slope(0.0, 1.0)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, lo: Any = None, hi: Any = None) -> torch.Tensor:
        if lo is None and ctx.node.attrs.get("min") is not None:  # opset < 11: bounds are attributes
            lo = ctx.float_tensor(float(ctx.node.attrs["min"]))
        if hi is None and ctx.node.attrs.get("max") is not None:
            hi = ctx.float_tensor(float(ctx.node.attrs["max"]))
        if lo is not None:
            x = torch.maximum(x, lo.to(x.dtype))
        if hi is not None:
            x = torch.minimum(x, hi.to(x.dtype))
        return x


@register
class Sigmoid(Activation):
    """1 / (1 + e^-x): slope in (0, 1/4]."""

    function = staticmethod(torch.sigmoid)
    constant, method, quotients = 0.25, "max |f'| = 1/4", (0.0, 0.25)
    decomposes_activations = monotone = True

    def slope_on(self, node: Node, graph: Graph, x: Interval) -> tuple[torch.Tensor, torch.Tensor] | None:
        """sigmoid' = s (1 - s) decreases with |x|."""

        def derivative(t: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(t) * torch.sigmoid(-t)

        return _outward_slopes(derivative(x.magnitude), derivative(x.smallest_magnitude))


@register
class LeakyRelu(Op):
    """max(1, |alpha|): slopes alpha and 1."""

    attributes = {"alpha": 0.01}
    piecewise_linear = kinked = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return _exact(max(1.0, abs(float(ctx.attrs["alpha"]))), "max(1, |alpha|)")

    def slope(self, node: Node, graph: Graph) -> Slope | None:
        alpha = float(node_attrs(node)["alpha"])
        return Slope(min(alpha, 1.0), max(alpha, 1.0))

    def is_monotone(self, node: Node) -> bool:
        return float(node_attrs(node)["alpha"]) >= 0

    def slope_on(self, node: Node, graph: Graph, x: Interval) -> tuple[torch.Tensor, torch.Tensor] | None:
        """1 where the input is never negative, alpha where it is never positive, both ends elsewhere."""
        alpha = float(node_attrs(node)["alpha"])
        one, leak = torch.ones_like(x.lo), torch.full_like(x.lo, alpha)
        at_lo = torch.where(x.lo >= 0, one, leak)
        at_hi = torch.where(x.hi > 0, one, leak)
        return torch.minimum(at_lo, at_hi), torch.maximum(at_lo, at_hi)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        alpha = float(ctx.attrs["alpha"])
        if ctx.smooth:
            return alpha * x + (1 - alpha) * relu(ctx, x)
        return torch.where(x >= 0, x, alpha * x)


@register
class PRelu(Op):
    """max(1, max |slope|) with a constant slope tensor."""

    piecewise_linear = kinked = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        slope = ctx.const(1)
        if slope is None:
            return unbounded("PRelu slope computed from the input", "unknown slope")
        return _exact(max(1.0, float(np.abs(np.asarray(slope, dtype=np.float64)).max())), "max(1, max |slope|)")

    def slope(self, node: Node, graph: Graph) -> Slope | None:
        slope = graph.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
        if slope is None:
            return None
        s = np.asarray(slope, dtype=np.float64)
        return Slope(min(1.0, float(s.min())), max(1.0, float(s.max())))

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
        if ctx.smooth:
            return slope * x + (1 - slope) * relu(ctx, x)
        return torch.where(x >= 0, x, slope * x)


@register
class Elu(Op):
    """max(1, |alpha|): the negative branch has slope alpha * e^x."""

    attributes = {"alpha": 1.0}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return _exact(max(1.0, abs(float(ctx.attrs["alpha"]))), "max(1, |alpha|)")

    def slope(self, node: Node, graph: Graph) -> Slope | None:
        alpha = float(node_attrs(node)["alpha"])
        return Slope(0.0, max(1.0, alpha)) if alpha >= 0 else None

    def is_monotone(self, node: Node) -> bool:
        return float(node_attrs(node)["alpha"]) >= 0

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x, float(ctx.attrs["alpha"]) * torch.expm1(torch.clamp_max(x, 0)))


@register
class Selu(Op):
    """gamma * max(1, alpha) (1.7581 with the defaults)."""

    attributes = {"alpha": SELU_ALPHA, "gamma": SELU_GAMMA}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        alpha, gamma = float(ctx.attrs["alpha"]), float(ctx.attrs["gamma"])
        return _exact(abs(gamma) * max(1.0, abs(alpha)) * (1 + 1e-15), "gamma * max(1, alpha)")

    def slope(self, node: Node, graph: Graph) -> Slope | None:
        attrs = node_attrs(node)
        alpha, gamma = float(attrs["alpha"]), float(attrs["gamma"])
        return Slope(0.0, gamma * max(1.0, alpha) * (1 + 1e-15)) if alpha >= 0 and gamma >= 0 else None

    def is_monotone(self, node: Node) -> bool:
        return float(node_attrs(node)["alpha"]) >= 0

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        alpha, gamma = float(ctx.attrs["alpha"]), float(ctx.attrs["gamma"])
        return gamma * torch.where(x > 0, x, alpha * torch.expm1(torch.clamp_max(x, 0)))


@register
class HardSigmoid(Op):
    """|alpha| (ONNX default alpha = 0.2; PyTorch exports 1/6)."""

    attributes = {"alpha": 0.2, "beta": 0.5}
    piecewise_linear = decomposes_activations = monotone = True  # increasing or decreasing with alpha's sign

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return _exact(abs(float(ctx.attrs["alpha"])), "|alpha|")

    def slope(self, node: Node, graph: Graph) -> Slope | None:
        alpha = float(node_attrs(node)["alpha"])
        return Slope(min(0.0, alpha), max(0.0, alpha))

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(float(ctx.attrs["alpha"]) * x + float(ctx.attrs["beta"]), 0, 1)


def x_times_hard_sigmoid_slope(alpha: float, beta: float) -> float:
    """sup |d/dx x * clip(alpha x + beta, 0, 1)| = max(1, |2 - beta|, |beta|) for alpha > 0."""
    if alpha <= 0:
        return math.inf
    return max(1.0, abs(2.0 - beta), abs(beta))


@register
class HardSwish(Activation):
    """x * hardsigmoid(x) with alpha = 1/6, beta = 1/2: max slope 3/2 at x = 3."""

    function = staticmethod(lambda x: x * torch.clamp(x / 6 + 0.5, 0, 1))
    constant, method = x_times_hard_sigmoid_slope(1 / 6, 0.5), "max |f'| = 3/2"

    def value_range(self, ctx: RuleContext, *ranges: Interval | None) -> Interval | None:
        return unimodal_range(self.function, ranges[0], -1.5)


@register
class Gelu(Op):
    """1.128905 (erf form) or 1.128994 (tanh approximation)."""

    attributes = {"approximate": "none"}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if str(ctx.attrs["approximate"]) == "tanh":
            return LocalBound(GELU_TANH_MAX_SLOPE, "max |f'| (tanh approximation)")
        return LocalBound(GELU_MAX_SLOPE, "max |f'| = Phi(sqrt2) + sqrt2 phi(sqrt2)")

    def slope(self, node: Node, graph: Graph) -> Slope | None:
        """GELU'(x) + GELU'(-x) = 1 (also for the tanh form): slopes in [1 - S, S]."""
        tanh = node_attrs(node)["approximate"] == "tanh"
        top = (GELU_TANH_MAX_SLOPE if tanh else GELU_MAX_SLOPE) * (1 + 1e-6)
        return Slope(1.0 - top, top)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh" if str(ctx.attrs["approximate"]) == "tanh" else "none")

    def value_range(self, ctx: RuleContext, *ranges: Interval | None) -> Interval | None:
        approximate = "tanh" if str(ctx.attrs["approximate"]) == "tanh" else "none"
        return unimodal_range(lambda x: F.gelu(x, approximate=approximate), ranges[0], GELU_MINIMISER)


@register
class Mish(Activation):
    """x tanh(softplus(x)): 1.088499."""

    function = staticmethod(lambda x: x * torch.tanh(F.softplus(x, threshold=30.0)))
    constant, method, exact_constant = MISH_MAX_SLOPE, "max |f'|", False

    def value_range(self, ctx: RuleContext, *ranges: Interval | None) -> Interval | None:
        return unimodal_range(self.function, ranges[0], MISH_MINIMISER)


@register
class SiLU(Activation):
    """x sigmoid(x) (PyTorch's silu; ONNX files spell it out and ``Recognised`` finds it): 1.099840."""

    function = staticmethod(lambda x: x * torch.sigmoid(x))
    constant, method, exact_constant = SILU_MAX_SLOPE, "SiLU: max |f'|", False
    quotients = (1.0 - SILU_MAX_SLOPE, SILU_MAX_SLOPE)  # f'(x) + f'(-x) = 1

    def value_range(self, ctx: RuleContext, *ranges: Interval | None) -> Interval | None:
        return unimodal_range(self.function, ranges[0], SILU_MINIMISER)


@register
class Swish(Op):
    """x sigmoid(alpha x) (ONNX opset 24): SiLU's 1.099840 for alpha != 0, 1/2 for alpha = 0.

    f'(x) = g(alpha x) with g(t) = sigmoid(t) (1 + t (1 - sigmoid(t))): for alpha != 0, f' takes every
    value g takes, whatever alpha's size or sign. g(t) + g(-t) = 1 and sup g = 1.099840 (SiLU's maximum),
    so the slopes fill [1 - 1.099840, 1.099840].
    """

    attributes = {"alpha": 1.0}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if float(ctx.attrs["alpha"]) == 0.0:
            return _exact(0.5, "x sigmoid(0) = x/2")
        return LocalBound(swish_constant(1.0), "max |f'| = SiLU's, at any alpha")

    def slope(self, node: Node, graph: Graph) -> Slope | None:
        if float(node_attrs(node)["alpha"]) == 0.0:
            return Slope(0.5, 0.5)
        return Slope(1.0 - SILU_MAX_SLOPE, SILU_MAX_SLOPE)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return swish(x, float(ctx.attrs["alpha"]))

    def value_range(self, ctx: RuleContext, *ranges: Interval | None) -> Interval | None:
        alpha = float(ctx.attrs["alpha"])
        if alpha <= 0:
            return None
        return unimodal_range(lambda x: swish(x, alpha), ranges[0], SILU_MINIMISER / alpha)


def swish(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """x sigmoid(alpha x)."""
    return x * torch.sigmoid(alpha * x)


def swish_constant(alpha: float) -> float:
    """max |d/dx x sigmoid(alpha x)| (see ``Swish``): SiLU's for alpha != 0, 1/2 for alpha = 0."""
    return SILU_MAX_SLOPE if alpha != 0.0 else 0.5


@register
class Erf(Activation):
    """2 / sqrt(pi)."""

    function = staticmethod(torch.erf)
    constant, method = ERF_MAX_SLOPE, "max |f'| = 2/sqrt(pi)"
    decomposes_activations = monotone = True


@register
class ThresholdedRelu(Op):
    """x where x > alpha, else 0: discontinuous."""

    attributes = {"alpha": 1.0}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded("thresholded ReLU is discontinuous")

    def is_monotone(self, node: Node) -> bool:
        return float(node_attrs(node)["alpha"]) >= 0

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > float(ctx.attrs["alpha"]), x, torch.zeros_like(x))


def shrink_jump(lambd: float, bias: float) -> float:
    """The largest jump of Shrink (onnxruntime's order: x < -lambd first, then x > lambd, else 0)."""
    if lambd >= 0:  # pieces x + bias | 0 | x - bias meet at -lambd and lambd
        return abs(bias - lambd)
    return abs(2 * bias)  # -lambd > lambd: x + bias below -lambd, x - bias from there on


@register
class Shrink(Op):
    """x + bias below -lambd, x - bias above lambd, else 0: 1 when continuous (bias = lambd), else a jump.

    With bias = lambd >= 0 it is soft thresholding x - clip(x, -lambd, lambd): slopes 0 and 1. With
    lambd < 0 the first test wins on (lambd, -lambd), so bias = 0 makes it the identity. Any other pair
    leaves a jump of |bias - lambd| (or 2 |bias|): not continuous, so not Lipschitz.
    """

    attributes = {"bias": 0.0, "lambd": 0.5}
    piecewise_linear = kinked = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        lambd, bias = float(ctx.attrs["lambd"]), float(ctx.attrs["bias"])
        jump = shrink_jump(lambd, bias)
        if jump > 0 or not math.isfinite(jump):
            return unbounded(f"Shrink with bias {bias:g} != lambd {lambd:g} jumps by {jump:g}: discontinuous")
        return _exact(1.0, "soft thresholding: slopes 0 and 1" if lambd >= 0 else "the identity")

    def slope(self, node: Node, graph: Graph) -> Slope | None:
        attrs = node_attrs(node)
        lambd, bias = float(attrs["lambd"]), float(attrs["bias"])
        if shrink_jump(lambd, bias) != 0:
            return None
        return Slope(0.0, 1.0) if lambd >= 0 else Slope(1.0, 1.0)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        lambd, bias = float(ctx.attrs["lambd"]), float(ctx.attrs["bias"])
        if ctx.smooth and lambd >= 0 and bias == lambd:
            return relu(ctx, x - lambd) - relu(ctx, -x - lambd)
        return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))


def _softmax_axis(ctx: EvalContext, x: torch.Tensor, function: Callable[[torch.Tensor, int], torch.Tensor]) -> Any:
    axis = axis_index(int(ctx.attrs["axis"]), x.dim())
    if ctx.attrs.get("coerce_2d"):  # opset < 13: flatten from the axis on
        return function(x.reshape(math.prod(x.shape[:axis]), -1), 1).reshape(x.shape)
    return function(x, axis)


@register
class Softmax(Op):
    """1/2: the Jacobian diag(p) - p p^T is PSD with Gershgorin radius 2 p_i (1 - p_i) <= 1/2."""

    attributes = {"axis": -1}

    uses_ranges = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        """On a domain: the Gershgorin radius 2 p_i (1 - p_i) with p_i in the output's range (softmax is applied
        group by group, so the largest over all entries bounds the block-diagonal Jacobian)."""
        x = ctx.input_range(0)
        p = None if x is None else self.value_range(ctx, x)
        if p is not None:
            nearest_half = torch.minimum(torch.maximum(torch.full_like(p.lo, 0.5), p.lo), p.hi)
            value = float((2 * nearest_half * (1 - nearest_half)).max()) * (1 + 2.0**-40)
            if value < 0.5:
                return LocalBound(value, "Jacobian norm <= 2 max p(1 - p) on the output's range")
        return LocalBound(0.5, "Jacobian norm <= 1/2")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return _softmax_axis(ctx, x, torch.softmax)

    def value_range(self, ctx: RuleContext, *ranges: Interval | None) -> Interval | None:
        """p_i is increasing in x_i and decreasing in the others: p_i >= e^lo_i / (e^lo_i + sum_j!=i e^hi_j)."""
        x = ranges[0]
        if x is None or x.exact or ctx.attrs.get("coerce_2d"):
            return None
        axis = axis_index(int(ctx.attrs["axis"]), x.lo.dim())
        top = x.hi.amax(dim=axis, keepdim=True)
        e_lo, e_hi = torch.exp(x.lo - top), torch.exp(x.hi - top)
        total_lo, total_hi = e_lo.sum(dim=axis, keepdim=True), e_hi.sum(dim=axis, keepdim=True)
        slack = 4 * (x.lo.shape[axis] + 2) * 2.0**-53
        others_hi = (total_hi - e_hi) * (1 + slack) + slack * total_hi
        others_lo = ((total_lo - e_lo) * (1 - slack) - slack * total_lo).clamp_min(0)
        low = e_lo / (e_lo + others_hi) * (1 - slack)
        high = (e_hi / (e_hi + others_lo) * (1 + slack)).clamp_max(1.0)
        return Interval(low, high)


@register
class LogSoftmax(Op):
    """sqrt(n): the Jacobian maps v to v - (p.v) 1, and p.v lies between v's extreme entries.

    ||v - c 1||^2 is convex in c, so its max over that interval is at an extreme entry v_k, and
    sum_{i != k} (v_i - v_k)^2 <= n for a unit v (Cauchy-Schwarz). Attained as p -> e_k.
    """

    attributes = {"axis": -1}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        shape = ctx.shape(0)
        if shape is None:
            return unbounded("LogSoftmax over an axis of unknown size; give --input-shape", "unknown shape")
        axis = int(ctx.attrs["axis"]) % len(shape)
        dims = shape[axis:] if ctx.attrs.get("coerce_2d") else (shape[axis],)
        if any(d is None for d in dims):
            return unbounded("LogSoftmax over an axis of unknown size; give --input-shape", "unknown shape")
        n = math.prod(dims)  # type: ignore[arg-type]
        return LocalBound(math.sqrt(n) * (1 + 1e-15), f"Jacobian norm <= sqrt({n})")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return _softmax_axis(ctx, x, torch.log_softmax)


@register
class Hardmax(Op):
    """1 at the first maximum along an axis, 0 elsewhere: a step function, not Lipschitz."""

    attributes = {"axis": -1}
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded("hardmax jumps where the maximum changes place: discontinuous")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        def one_hot(t: torch.Tensor, dim: int) -> torch.Tensor:  # argmax: the first maximum, as ONNX asks
            return torch.zeros_like(t).scatter(dim, t.argmax(dim, keepdim=True), 1.0)

        return _softmax_axis(ctx, x, one_hot)


# ---------------------------------------------------------------------------------------------
# Activations recognised from the primitives exporters write them with (lipcheck.passes)


def _sigmoid_like(alpha: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t * torch.clamp(alpha * t + 0.5, 0, 1)


# name, reference function, sup |f'|
KNOWN_ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]] = {
    "SiLU": (lambda t: t * torch.sigmoid(t), SILU_MAX_SLOPE),
    "GELU": (lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))), GELU_MAX_SLOPE),
    "GELU (tanh)": (
        lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3))),
        GELU_TANH_MAX_SLOPE,
    ),
    "Mish": (lambda t: t * torch.tanh(F.softplus(t)), MISH_MAX_SLOPE),
    "HardSwish": (_sigmoid_like(1 / 6), 1.5),
    "HardSwish (alpha 0.2)": (_sigmoid_like(0.2), 1.5),
}
SELF_GATED = ("SiLU", "GELU")  # x s(x) with s(x) + s(-x) = 1: f'(x) + f'(-x) = 1
RECOGNISED_MINIMISERS = {  # where each known activation is smallest (for ``unimodal_range``)
    "SiLU": SILU_MINIMISER,
    "GELU": GELU_MINIMISER,
    "GELU (tanh)": GELU_MINIMISER,  # within 1e-3 of the tanh form's: UNIMODAL_MARGIN covers it
    "Mish": MISH_MINIMISER,
    "HardSwish": -1.5,  # x (x/6 + 1/2): slope x/3 + 1/2
    "HardSwish (alpha 0.2)": -1.25,  # x (0.2 x + 1/2): slope 0.4 x + 1/2
}


@register
class Recognised(Op):
    """An activation built from primitive ops that lipcheck recognised (e.g. x * sigmoid(x) = SiLU).

    ``attrs``: ``activation`` (a name of KNOWN_ACTIVATIONS) and ``scale`` (the node computes scale * f(x));
    ``node.folded`` lists the primitive nodes it replaces.
    """

    attributes = {"scale": 1.0}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        name, scale = str(ctx.attrs["activation"]), float(ctx.attrs["scale"])
        scale_note = "" if abs(scale - 1) < 1e-6 else f" x {scale:.6g}"
        method = f"recognised {name}{scale_note} from {len(ctx.node.folded) + 1} ops: max |f'|"
        return LocalBound(self.bound(ctx.node), method)

    def bound(self, node: Node) -> float:
        """|scale| sup |f'| with the recognition margin."""
        attrs = node_attrs(node)
        return abs(float(attrs["scale"])) * KNOWN_ACTIVATIONS[str(attrs["activation"])][1] * (1 + RECOGNITION_MARGIN)

    def slope(self, node: Node, graph: Graph) -> Slope | None:
        """x s(x) with s(x) + s(-x) = 1 has f'(x) + f'(-x) = 1: slopes in [1 - S, S] for S = max f'."""
        attrs = node_attrs(node)
        scale = float(attrs["scale"])
        if str(attrs["activation"]).split(" ")[0] not in SELF_GATED or scale <= 0:
            return None
        bound = self.bound(node)
        return Slope(scale - bound, bound)

    def value_range(self, ctx: RuleContext, *ranges: Interval | None) -> Interval | None:
        """scale * f on the input's range, f decreasing then increasing (``unimodal_range``), widened by the
        recognition margin: the file's primitives match scale * f within 2e-6 (max(1, |f|)) on the pass's grid."""
        name, scale = str(ctx.attrs["activation"]), float(ctx.attrs["scale"])
        minimiser = RECOGNISED_MINIMISERS.get(name)
        found = None if minimiser is None else unimodal_range(KNOWN_ACTIVATIONS[name][0], ranges[0], minimiser)
        if found is None:
            return None
        ends = torch.stack([scale * found.lo, scale * found.hi])
        low, high = ends.min(dim=0).values, ends.max(dim=0).values
        slack = RECOGNITION_MARGIN * abs(scale) * torch.maximum(torch.maximum(low.abs(), high.abs()), torch.ones(()))
        return Interval(low - slack, high + slack)

    def check(self, node: Node) -> None:
        if node.attrs.get("activation") not in KNOWN_ACTIVATIONS:
            raise UnsupportedVariant(f"Recognised({node.attrs.get('activation')})")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        """The reference formula times the matched scale."""
        return float(ctx.attrs["scale"]) * KNOWN_ACTIVATIONS[str(ctx.attrs["activation"])][0](x)

    def display_name(self, node: Node) -> str:
        return str(node.attrs.get("activation", node.op))


def _outward_slopes(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slope bounds computed in float64, pushed out by a few ulps."""
    return low * (1 - 2.0**-45), high * (1 + 2.0**-45)


def unimodal_range(
    function: Callable[[torch.Tensor], torch.Tensor], x: Interval | None, minimiser: float
) -> Interval | None:
    """{f(y) : y in x} for f decreasing then increasing around ``minimiser`` (SiLU, GELU, Mish, HardSwish):
    the largest value at an end, the smallest at the end or the minimiser, whichever the interval holds."""
    if x is None or x.exact or not x.lo.is_floating_point():
        return None
    at_lo, at_hi = function(x.lo), function(x.hi)
    nearest = torch.minimum(torch.maximum(torch.full_like(x.lo, minimiser), x.lo), x.hi)
    low = torch.minimum(torch.minimum(at_lo, at_hi), function(nearest) - UNIMODAL_MARGIN)
    high = torch.maximum(at_lo, at_hi)
    return widen(low, high)
