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
        find = torch.argmax if self.largest else torch.argmin
        if int(ctx.attrs["select_last_index"]):  # torch returns the first of equal entries: search reversed
            return x.shape[axis] - 1 - find(x.flip(axis), dim=axis, keepdim=keep)
        return find(x, dim=axis, keepdim=keep)


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


def _laid_out(ctx: EvalContext, scale: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A per-tensor, per-axis or blocked scale (or zero point) laid out against ``x`` (attributes axis and
    block_size), in ``dtype``."""
    scale = scale.to(dtype)
    if scale.dim() == 0 or scale.numel() == 1:
        return scale.reshape(())
    axis = axis_index(int(ctx.attrs["axis"]), x.dim())
    block = int(ctx.attrs["block_size"])
    if block > 0:
        return scale.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
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
        scaled = torch.round(x.to(torch.float64) / _laid_out(ctx, scale, x, torch.float64))
        if zero is not None:
            scaled = scaled + _laid_out(ctx, zero, x, torch.float64)
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
        value = x.to(ctx.dtype)
        if zero is not None:
            value = value - _laid_out(ctx, zero, x, ctx.dtype)
        return value * _laid_out(ctx, scale, x, ctx.dtype)


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

    def evaluate(
        self,
        ctx: EvalContext,
        a: torch.Tensor,
        a_scale: torch.Tensor,
        a_zero: torch.Tensor | None,
        b: torch.Tensor,
        b_scale: torch.Tensor,
        b_zero: torch.Tensor | None,
        y_scale: torch.Tensor,
        y_zero: torch.Tensor | None = None,
    ) -> torch.Tensor:
        wide = torch.float64
        left = a.to(wide) - (a_zero.to(wide) if a_zero is not None else 0.0)
        right = b.to(wide) - (b_zero.to(wide) if b_zero is not None else 0.0)
        product = (left @ right) * (a_scale.to(wide) * b_scale.to(wide) / y_scale.to(wide))
        if y_zero is not None:
            product = product + y_zero.to(wide)
        return _saturate(product, y_zero.dtype if y_zero is not None else a.dtype)


@register
class DynamicQuantizeLinear(Op):
    """uint8 quantisation with the scale and zero point taken from the input's range: a step function (the
    scale itself jumps from ~0 to 1 where the input becomes all zero)."""

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded("dynamic quantisation rounds to a grid the input's own range sets: a step function")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values = x.to(torch.float32)  # ONNX computes the scale in float32
        zero_ = values.new_zeros(())
        high = torch.clamp_min(values.max(), 0.0) if values.numel() else zero_
        low = torch.clamp_max(values.min(), 0.0) if values.numel() else zero_
        scale = torch.where(high == low, values.new_ones(()), high - low) / 255.0
        zero = torch.round(torch.clamp(-low / scale, 0.0, 255.0))
        y = torch.clamp(torch.round(values / scale) + zero, 0, 255).to(torch.uint8)
        return y, scale.to(ctx.dtype), zero.to(torch.uint8)
