"""Step functions and quantisation: outputs that jump as the input moves (arg-max positions, values rounded to a
grid, remainders), so not globally Lipschitz when computed from the input; and the tests of a float value
(IsNaN, IsInf), constant on the finite inputs a Lipschitz constant speaks of.

They run in the interpreter, so the networks that hold them (on integer inputs, or where their output is not
read) are evaluated and bounded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lipcheck.ops.base import (
    EvalContext,
    LocalBound,
    Op,
    RuleContext,
    UnsupportedVariant,
    axis_index,
    register,
    unbounded,
)


class ArgExtreme(Op):
    """The position of the largest (smallest) entry along an axis: an integer that jumps."""

    attributes = {"axis": 0, "keepdims": 1, "select_last_index": 0}
    largest = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded(f"{self.name} is a step function: the position of the extreme entry jumps")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        axis = axis_index(int(ctx.attrs["axis"]), x.dim())
        keep = bool(int(ctx.attrs["keepdims"]))
        signed = x if self.largest else -x.to(torch.float64) if not x.is_floating_point() else -x
        if int(ctx.attrs["select_last_index"]):  # torch returns the first of equal entries: search reversed
            last = x.shape[axis] - 1
            return last - torch.argmax(signed.flip(axis), dim=axis, keepdim=keep)
        return torch.argmax(signed, dim=axis, keepdim=keep)


@register
class ArgMax(ArgExtreme):
    """Index of the largest entry (the first of equals, or the last with select_last_index)."""


@register
class ArgMin(ArgExtreme):
    """Index of the smallest entry."""

    largest = False


@register
class Mod(Op):
    """Remainder (sign of the divisor, or of the dividend with fmod=1): a sawtooth, it jumps at each multiple."""

    attributes = {"fmod": 0}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded("a remainder jumps at every multiple of the divisor")

    def evaluate(self, ctx: EvalContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.is_floating_point() != b.is_floating_point():
            a, b = a.to(ctx.dtype), b.to(ctx.dtype)
        return torch.fmod(a, b) if int(ctx.attrs["fmod"]) else torch.remainder(a, b)


class FloatTest(Op):
    """A test of each entry that is the same (false) for every finite input: constant, 0."""

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return LocalBound(0.0, f"{self.name} is false on every finite input: constant", exact=True)


@register
class IsNaN(FloatTest):
    """x != x."""

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return torch.isnan(x)


@register
class IsInf(FloatTest):
    """x is +inf (detect_positive) or -inf (detect_negative)."""

    attributes = {"detect_negative": 1, "detect_positive": 1}

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        positive = torch.isposinf(x) if int(ctx.attrs["detect_positive"]) else torch.zeros_like(x, dtype=torch.bool)
        negative = torch.isneginf(x) if int(ctx.attrs["detect_negative"]) else torch.zeros_like(x, dtype=torch.bool)
        return positive | negative


# ONNX element type -> (torch dtype holding it, smallest, largest): the integer targets quantisation writes
QUANTISED = {
    2: (torch.uint8, 0, 255),
    3: (torch.int8, -128, 127),
    4: (torch.int32, 0, 65535),  # uint16, held wider (torch has no arithmetic on it)
    5: (torch.int16, -32768, 32767),
    6: (torch.int32, -(2**31), 2**31 - 1),
    21: (torch.uint8, 0, 15),  # uint4
    22: (torch.int8, -8, 7),  # int4
    25: (torch.uint8, 0, 3),  # uint2
    26: (torch.int8, -2, 1),  # int2
}


def _broadcast_scale(scale: torch.Tensor, x: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """Per-tensor, per-axis or blocked scale (or zero point) laid out against ``x``."""
    if scale.dim() == 0 or scale.numel() == 1:
        return scale.reshape(())
    if block > 0:
        scale = scale.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
        return scale
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


@register
class QuantizeLinear(Op):
    """round(x / scale) + zero point, saturated: a step function of x (rounds to a grid)."""

    attributes = {"axis": 1, "block_size": 0, "saturate": 1, "output_dtype": 0}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded("quantisation rounds to a grid: a step function (assume a constant with --assume if wanted)")

    def check(self, node: Any) -> None:
        target = int(node.attrs.get("output_dtype") or 2)
        if target not in QUANTISED:
            raise UnsupportedVariant(f"QuantizeLinear(output_dtype={target})")

    def evaluate(
        self, ctx: EvalContext, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None
    ) -> torch.Tensor:
        dtype, low, high = QUANTISED[int(ctx.attrs["output_dtype"] or 2)]  # the frontend fills it
        axis = axis_index(int(ctx.attrs["axis"]), x.dim()) if x.dim() else 0
        block = int(ctx.attrs["block_size"])
        scaled = torch.round(x.to(torch.float64) / _broadcast_scale(scale.to(torch.float64), x, axis, block))
        if zero is not None:
            scaled = scaled + _broadcast_scale(zero.to(torch.float64), x, axis, block)
        return scaled.clamp(low, high).to(dtype)


@register
class DequantizeLinear(Op):
    """(x - zero point) * scale: linear in x with constant scales, max |scale|; x is usually an integer
    input nobody perturbs."""

    attributes = {"axis": 1, "block_size": 0}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        scale = ctx.const(1)
        if scale is None or ctx.is_variable(2):
            return unbounded("dequantisation with scales or zero points computed from the input multiplies them")
        return LocalBound(float(np.abs(scale).max()), "max |scale|", exact=True)

    def evaluate(
        self, ctx: EvalContext, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None
    ) -> torch.Tensor:
        axis = axis_index(int(ctx.attrs["axis"]), x.dim()) if x.dim() else 0
        block = int(ctx.attrs["block_size"])
        value = x.to(ctx.dtype)
        if zero is not None:
            value = value - _broadcast_scale(zero.to(ctx.dtype), x, axis, block)
        return value * _broadcast_scale(scale.to(ctx.dtype), x, axis, block)


def _saturate(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round half to even and clip to the integer type (uint8 or int8, as the zero point says)."""
    info = torch.iinfo(dtype)
    return torch.round(values).clamp(info.min, info.max).to(dtype)


@register
class QLinearMatMul(Op):
    """A quantised matrix product: its output is rounded to the integer grid, a step function of any float
    operand (scales) it reads; its integer operands are not perturbed."""

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded("a quantised product rounds its output to an integer grid: a step function")

    def evaluate(self, ctx: EvalContext, *args: torch.Tensor | None) -> torch.Tensor:
        a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero = (list(args) + [None] * 8)[:8]
        assert a is not None and b is not None and a_scale is not None and b_scale is not None and y_scale is not None
        left = a.to(torch.float64) - (a_zero.to(torch.float64) if a_zero is not None else 0.0)
        right = b.to(torch.float64) - (b_zero.to(torch.float64) if b_zero is not None else 0.0)
        product = (left @ right) * (a_scale.to(torch.float64) * b_scale.to(torch.float64) / y_scale.to(torch.float64))
        if y_zero is not None:
            product = product + y_zero.to(torch.float64)
        return _saturate(product, y_zero.dtype if y_zero is not None else a.dtype)


@register
class DynamicQuantizeLinear(Op):
    """uint8 quantisation with the scale and zero point taken from the input's range: a step function (the
    scale itself jumps from ~0 to 1 where the input becomes all zero)."""

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded("dynamic quantisation rounds to a grid the input's own range sets: a step function")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values = x.to(torch.float32)  # ONNX computes the scale in float32
        high = torch.clamp_min(values.max(), 0.0) if values.numel() else torch.tensor(0.0)
        low = torch.clamp_max(values.min(), 0.0) if values.numel() else torch.tensor(0.0)
        scale = torch.where(high == low, torch.tensor(1.0), (high - low)) / 255.0
        zero = torch.round(torch.clamp(-low / scale, 0.0, 255.0))
        y = torch.clamp(torch.round(values / scale) + zero, 0, 255).to(torch.uint8)
        return y, scale.to(ctx.dtype), zero.to(torch.uint8)
