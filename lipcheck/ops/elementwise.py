"""Elementwise functions without a global Lipschitz constant, and the logic ops exporters leave in graphs.

Exp, Log, Sqrt, 1/x, tan, sinh, cosh, arcsin, arccos, artanh and arcosh have unbounded slopes; sign, floor,
ceil and round are discontinuous. Comparisons and boolean logic run (the interpreter needs them) but have no
rule; Where has one for a constant condition, and Piecewise stands for a Where whose pieces meet where it
switches.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from lipcheck.graph import Graph, Node
from lipcheck.ops.arithmetic import reciprocal_range, same_float
from lipcheck.ops.base import EvalContext, Interval, LocalBound, Op, RuleContext, register, unbounded, widen


class Unary(Op):
    """An elementwise ``function``."""

    @staticmethod
    def function(x: torch.Tensor, /) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


class NotLipschitz(Unary):
    """An elementwise function with no global Lipschitz constant (``reason`` says why).

    On an input domain its constant is the largest |f'| on its input's range: ``largest_slope`` gives it per
    entry (NaN or inf where the range reaches a point of unbounded slope)."""

    reason: ClassVar[str]
    uses_ranges = True

    @staticmethod
    def largest_slope(x: Interval, /) -> torch.Tensor | None:
        return None

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        x = ctx.input_range(0)
        slopes = None if x is None or not x.lo.is_floating_point() else self.largest_slope(x)
        if slopes is not None and slopes.numel() and bool(torch.isfinite(slopes).all()):
            # |f'| computed in float64 within a few ulps; 2^-40 covers it
            return LocalBound(float(slopes.max()) * (1 + 2.0**-40), "max |f'| on the input's range")
        return unbounded(self.reason)


def _inside(condition: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` where ``condition`` holds, inf elsewhere (a slope without a bound)."""
    return torch.where(condition, value, torch.full_like(value, math.inf))


@register
class Exp(NotLipschitz):
    """e^x: unbounded slope."""

    function, reason = staticmethod(torch.exp), "exp has unbounded slope"
    decomposes_activations = monotone = True
    largest_slope = staticmethod(lambda x: torch.exp(x.hi))


@register
class Log(NotLipschitz):
    """log x: unbounded slope near 0."""

    function, reason = staticmethod(torch.log), "log has unbounded slope near 0"
    monotone = True
    largest_slope = staticmethod(lambda x: _inside(x.lo > 0, 1.0 / x.lo.clamp_min(1e-300)))


@register
class Sqrt(NotLipschitz):
    """sqrt x: unbounded slope near 0."""

    function, reason = staticmethod(torch.sqrt), "sqrt has unbounded slope near 0"
    decomposes_activations = monotone = True
    largest_slope = staticmethod(lambda x: _inside(x.lo > 0, 0.5 / x.lo.clamp_min(1e-300).sqrt()))


@register
class Reciprocal(NotLipschitz):
    """1/x: unbounded slope near 0."""

    function, reason = staticmethod(torch.reciprocal), "1/x has unbounded slope near 0"
    largest_slope = staticmethod(lambda x: 1.0 / x.smallest_magnitude.square())

    def value_range(self, ctx: RuleContext, *ranges: Interval | None) -> Interval | None:
        (x,) = ranges
        return None if x is None or x.exact or not x.lo.is_floating_point() else reciprocal_range(x)


@register
class Tan(NotLipschitz):
    """tan: unbounded slope."""

    function, reason = staticmethod(torch.tan), "tan has unbounded slope"
    largest_slope = staticmethod(lambda x: _inside(x.magnitude < 1.5, 1.0 / torch.cos(x.magnitude).square()))


@register
class Asin(NotLipschitz):
    """arcsin: slope 1 / sqrt(1 - x^2), unbounded near +-1."""

    function, reason = staticmethod(torch.asin), "arcsin has unbounded slope near +-1"
    monotone = True
    largest_slope = staticmethod(lambda x: _inside(x.magnitude < 1, (1 - x.magnitude.square()).clamp_min(0).rsqrt()))


@register
class Acos(NotLipschitz):
    """arccos: slope -1 / sqrt(1 - x^2), unbounded near +-1."""

    function, reason = staticmethod(torch.acos), "arccos has unbounded slope near +-1"
    monotone = True
    largest_slope = staticmethod(lambda x: _inside(x.magnitude < 1, (1 - x.magnitude.square()).clamp_min(0).rsqrt()))


@register
class Atanh(NotLipschitz):
    """artanh: slope 1 / (1 - x^2), unbounded near +-1."""

    function, reason = staticmethod(torch.atanh), "artanh has unbounded slope near +-1"
    monotone = True
    largest_slope = staticmethod(lambda x: _inside(x.magnitude < 1, 1.0 / (1 - x.magnitude.square()).clamp_min(1e-300)))


@register
class Acosh(NotLipschitz):
    """arcosh: slope 1 / sqrt(x^2 - 1), unbounded near 1."""

    function, reason = staticmethod(torch.acosh), "arcosh has unbounded slope near 1"
    monotone = True
    largest_slope = staticmethod(lambda x: _inside(x.lo > 1, (x.lo.square() - 1).clamp_min(1e-300).rsqrt()))


@register
class Sinh(NotLipschitz):
    """sinh: unbounded slope."""

    function, reason = staticmethod(torch.sinh), "sinh has unbounded slope"
    monotone = True
    largest_slope = staticmethod(lambda x: torch.cosh(x.magnitude))


@register
class Cosh(NotLipschitz):
    """cosh: unbounded slope."""

    function, reason = staticmethod(torch.cosh), "cosh has unbounded slope"
    largest_slope = staticmethod(lambda x: torch.sinh(x.magnitude))

    def value_range(self, ctx: RuleContext, *ranges: Interval | None) -> Interval | None:
        (x,) = ranges
        if x is None or x.exact or not x.lo.is_floating_point():
            return None
        return widen(torch.cosh(x.smallest_magnitude), torch.cosh(x.magnitude))


@register
class Sign(NotLipschitz):
    """sign: discontinuous."""

    function, reason = staticmethod(torch.sign), "sign is discontinuous"
    monotone = True
    decomposes_activations = True


@register
class Floor(NotLipschitz):
    """floor: discontinuous."""

    function, reason = staticmethod(torch.floor), "floor is discontinuous"
    monotone = True


@register
class Ceil(NotLipschitz):
    """ceil: discontinuous."""

    function, reason = staticmethod(torch.ceil), "ceil is discontinuous"
    monotone = True


@register
class Round(NotLipschitz):
    """round: discontinuous."""

    function, reason = staticmethod(torch.round), "round is discontinuous"
    monotone = True


@register
class Not(Unary):
    """Logical not: of a condition computed from activations, a step function."""

    function = staticmethod(torch.logical_not)

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded(SWITCH)


SWITCH = (
    "a comparison or logic of activations is a step function (discontinuous); a Where on it is Lipschitz "
    "when its pieces meet where it switches, which lipcheck proves for a comparison affine in one value"
)


class Binary(Op):
    """An elementwise ``function`` of two operands: a comparison or boolean logic, a step function of activations."""

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded(SWITCH)

    @staticmethod
    def function(a: torch.Tensor, b: torch.Tensor, /) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, ctx: EvalContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.function(*same_float(a, b))


@register
class Equal(Binary):
    """a == b."""

    function = staticmethod(torch.eq)


@register
class Less(Binary):
    """a < b."""

    compares = True

    function = staticmethod(torch.lt)


@register
class Greater(Binary):
    """a > b."""

    compares = True

    function = staticmethod(torch.gt)


@register
class LessOrEqual(Binary):
    """a <= b."""

    compares = True

    function = staticmethod(torch.le)


@register
class GreaterOrEqual(Binary):
    """a >= b."""

    compares = True

    function = staticmethod(torch.ge)


@register
class And(Binary):
    """Logical and."""

    function = staticmethod(torch.logical_and)


@register
class Or(Binary):
    """Logical or."""

    function = staticmethod(torch.logical_or)


@register
class Xor(Binary):
    """Logical xor."""

    function = staticmethod(torch.logical_xor)


@register
class Where(Op):
    """condition ? a : b with a constant condition: each entry from one branch, sqrt(sum copies_i L_i^2).

    |y_j - y'_j| is |a_j - a'_j| or |b_j - b'_j|, so ||y - y'||^2 <= ||a - a'||^2 + ||b - b'||^2 over the
    broadcast operands. A condition computed from the input switches between the branches: not
    Lipschitz unless they agree where it switches (recognised activations, lipcheck.passes, are).
    """

    selects = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if ctx.is_variable(0):
            if not math.isfinite(ctx.input_lipschitz[0]):  # the comparison that makes it already says why
                return LocalBound(1.0, "selection by a switching condition", output_lipschitz=math.inf)
            return unbounded("Where switches on a condition computed from the input (discontinuous)")
        terms = []
        for index in (1, 2):
            if not ctx.is_variable(index):
                continue
            copies = ctx.broadcast_factor(index)
            if copies is None:
                return unbounded("Where's branch broadcast to an unknown size; give --input-shape", "unknown shape")
            terms.append(copies * ctx.input_lipschitz[index])
        total = math.sqrt(sum(t * t for t in terms))
        return LocalBound(1.0, "selection by a constant condition: sqrt(sum L_i^2 copies_i)", output_lipschitz=total)

    def evaluate(self, ctx: EvalContext, condition: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(condition.to(torch.bool), *same_float(a, b))


@register
class Piecewise(Op):
    """An elementwise function that switches between two pieces where they meet: the larger piece constant.

    Written by ``lipcheck.passes.recognise_switches`` in place of ``Where(u(x) > t, a(x), b(x))`` with u
    affine in x and a, b elementwise functions of x that agree at the one switch point (exporters write
    thresholded activations so: Softplus as ``Where(beta x > 20, x, softplus(beta x) / beta)``). A
    continuous scalar function that is L-Lipschitz on each side of a point is L-Lipschitz. ``attrs``:
    ``function`` (the pieces, the comparison and the Where as a Graph of the one input), ``lipschitz``
    (the larger of the pieces' composed constants), ``switch`` (the switch point).
    """

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        switch = float(ctx.attrs["switch"])
        return LocalBound(float(ctx.attrs["lipschitz"]), f"pieces meeting at {switch:.6g}: the larger constant")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        function = ctx.attrs["function"]
        return ctx.run_subgraph(function, {function.inputs[0]: x}, ctx.dtype, ctx.device)[function.outputs[0]]

    def subgraphs(self, node: Node) -> list[Graph]:
        return [node.attrs["function"]]
