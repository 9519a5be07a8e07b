"""Rules for elementwise activations: the sup of |f'| over the reals (l2 Lipschitz constant).

Constants that have no closed form are the numerically located maxima of |f'| rounded *up* in the
7th significant digit (tests re-derive each one on a fine grid).
"""

from __future__ import annotations

import math

import numpy as np

from lipcheck.rules.registry import LocalBound, RuleContext, rule, unbounded

SILU_MAX_SLOPE = 1.099840  # at x ~ 2.3994: sigmoid(x) * (1 + x * (1 - sigmoid(x)))
MISH_MAX_SLOPE = 1.088499  # at x ~ 1.4906
GELU_MAX_SLOPE = 1.128905  # at x = sqrt(2): Phi(sqrt 2) + sqrt(2) phi(sqrt 2)
GELU_TANH_MAX_SLOPE = 1.128994  # tanh approximation, at x ~ 1.4185
ERF_MAX_SLOPE = 2.0 / math.sqrt(math.pi) * (1 + 1e-15)


def _exact(value: float, method: str) -> LocalBound:
    return LocalBound(value, method, exact=True)


@rule("Relu", "Tanh", "Softsign", "Softplus", "Sin", "Cos", "Atan", "Celu")
def one_lipschitz(ctx: RuleContext) -> LocalBound:
    """Slope never above 1: Relu, Tanh, Softsign, Softplus, Sin, Cos, Atan, Celu."""
    return _exact(1.0, "max |f'| = 1")


@rule("Clip")
def clip(ctx: RuleContext) -> LocalBound:
    """Clamp to constant bounds: 1. Bounds computed from the input move every entry they clamp."""
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


@rule("Sigmoid")
def sigmoid(ctx: RuleContext) -> LocalBound:
    """sigmoid' <= 1/4."""
    return _exact(0.25, "max |f'| = 1/4")


@rule("LeakyRelu")
def leaky_relu(ctx: RuleContext) -> LocalBound:
    """max(1, |alpha|)."""
    return _exact(max(1.0, abs(float(ctx.attrs.get("alpha", 0.01)))), "max(1, |alpha|)")


@rule("PRelu")
def prelu(ctx: RuleContext) -> LocalBound:
    """max(1, max |slope|) with a constant slope tensor."""
    slope = ctx.const(1)
    if slope is None:
        return unbounded("PRelu slope computed from the input", "unknown slope")
    return _exact(max(1.0, float(np.abs(np.asarray(slope, dtype=np.float64)).max())), "max(1, max |slope|)")


@rule("Elu")
def elu(ctx: RuleContext) -> LocalBound:
    """max(1, |alpha|): the negative branch has slope alpha * e^x."""
    return _exact(max(1.0, abs(float(ctx.attrs.get("alpha", 1.0)))), "max(1, |alpha|)")


@rule("Selu")
def selu(ctx: RuleContext) -> LocalBound:
    """gamma * max(1, alpha) (1.7581 with the defaults)."""
    alpha = float(ctx.attrs.get("alpha", 1.6732632423543772))
    gamma = float(ctx.attrs.get("gamma", 1.0507009873554805))
    return _exact(abs(gamma) * max(1.0, abs(alpha)) * (1 + 1e-15), "gamma * max(1, alpha)")


@rule("HardSigmoid")
def hard_sigmoid(ctx: RuleContext) -> LocalBound:
    """|alpha| (ONNX default alpha = 0.2; PyTorch exports 1/6)."""
    return _exact(abs(float(ctx.attrs.get("alpha", 0.2))), "|alpha|")


def x_times_hard_sigmoid_slope(alpha: float, beta: float) -> float:
    """sup |d/dx x * clip(alpha x + beta, 0, 1)| = max(1, |2 - beta|, |beta|) for alpha > 0."""
    if alpha <= 0:
        return math.inf
    return max(1.0, abs(2.0 - beta), abs(beta))


@rule("HardSwish")
def hard_swish(ctx: RuleContext) -> LocalBound:
    """x * hardsigmoid(x) with alpha = 1/6, beta = 1/2: max slope 3/2 at x = 3."""
    return _exact(x_times_hard_sigmoid_slope(1 / 6, 0.5), "max |f'| = 3/2")


@rule("Gelu")
def gelu(ctx: RuleContext) -> LocalBound:
    """1.128905 (erf form) or 1.128994 (tanh approximation)."""
    if str(ctx.attrs.get("approximate", "none")) == "tanh":
        return LocalBound(GELU_TANH_MAX_SLOPE, "max |f'| (tanh approximation)")
    return LocalBound(GELU_MAX_SLOPE, "max |f'| = Phi(sqrt2) + sqrt2 phi(sqrt2)")


@rule("Mish")
def mish(ctx: RuleContext) -> LocalBound:
    """1.088499."""
    return LocalBound(MISH_MAX_SLOPE, "max |f'|")


@rule("Erf")
def erf(ctx: RuleContext) -> LocalBound:
    """2 / sqrt(pi)."""
    return _exact(ERF_MAX_SLOPE, "max |f'| = 2/sqrt(pi)")


@rule("Softmax")
def softmax(ctx: RuleContext) -> LocalBound:
    """1/2: the Jacobian diag(p) - p p^T is PSD with Gershgorin radius 2 p_i (1 - p_i) <= 1/2."""
    return LocalBound(0.5, "Jacobian norm <= 1/2")


@rule("LogSoftmax")
def log_softmax(ctx: RuleContext) -> LocalBound:
    """sqrt(n): the Jacobian maps v to v - (p.v) 1, and p.v lies between v's extreme entries.

    ||v - c 1||^2 is convex in c, so its max over that interval is at an extreme entry v_k, and
    sum_{i != k} (v_i - v_k)^2 <= n for a unit v (Cauchy-Schwarz). Attained as p -> e_k.
    """
    shape = ctx.shape(0)
    axis = int(ctx.attrs.get("axis", -1))
    if shape is None:
        return unbounded("LogSoftmax over an axis of unknown size; give --input-shape", "unknown shape")
    axis = axis % len(shape)
    dims = shape[axis:] if ctx.attrs.get("coerce_2d") else (shape[axis],)
    if any(d is None for d in dims):
        return unbounded("LogSoftmax over an axis of unknown size; give --input-shape", "unknown shape")
    n = math.prod(dims)
    return LocalBound(math.sqrt(n) * (1 + 1e-15), f"Jacobian norm <= sqrt({n})")


@rule("Recognised")
def recognised(ctx: RuleContext) -> LocalBound:
    """An activation built from primitive ops that lipcheck recognised (e.g. x * sigmoid(x) = SiLU)."""
    return LocalBound(float(ctx.attrs["lipschitz"]), str(ctx.attrs["method"]))


_NOT_LIPSCHITZ = {
    "Exp": "exp has unbounded slope",
    "Log": "log has unbounded slope near 0",
    "Sqrt": "sqrt has unbounded slope near 0",
    "Reciprocal": "1/x has unbounded slope near 0",
    "Pow": "x^p is not globally Lipschitz for p != 0, 1",
    "Tan": "tan has unbounded slope",
    "Sinh": "sinh has unbounded slope",
    "Cosh": "cosh has unbounded slope",
    "Sign": "sign is discontinuous",
    "Floor": "floor is discontinuous",
    "Ceil": "ceil is discontinuous",
    "Round": "round is discontinuous",
    "ThresholdedRelu": "thresholded ReLU is discontinuous",
    "LayerNormalization": "LayerNorm divides by the input's standard deviation (not globally Lipschitz)",
    "InstanceNormalization": "InstanceNorm divides by the input's standard deviation (not globally Lipschitz)",
    "GroupNormalization": "GroupNorm divides by the input's standard deviation (not globally Lipschitz)",
    "LpNormalization": "normalising by the input's norm is not Lipschitz near 0",
    "MeanVarianceNormalization": "divides by the input's standard deviation (not globally Lipschitz)",
}


@rule(*_NOT_LIPSCHITZ)
def not_lipschitz(ctx: RuleContext) -> LocalBound:
    """Ops with no global Lipschitz constant (Exp, Log, Sqrt, LayerNorm, ...)."""
    if ctx.node.op == "Pow":
        exponent = ctx.const(1)
        if exponent is not None and np.asarray(exponent).size == 1:
            p = float(np.asarray(exponent).reshape(-1)[0])
            if p == 1.0:
                return _exact(1.0, "x^1")
            if p == 0.0:
                return _exact(0.0, "x^0 is constant")
    return unbounded(_NOT_LIPSCHITZ[ctx.node.op])
