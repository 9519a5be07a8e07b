"""Ops that make tensors from shapes and scalars (exporters leave them in graphs). From integer shapes they are
constants; a Range whose bounds are computed from the input changes its length: the verdict."""

from __future__ import annotations

import numpy as np
import torch

from lipcheck.ops.base import EvalContext, LocalBound, Op, RuleContext, constant_tensor, register, unbounded
from lipcheck.ops.shape import ints


@register
class ConstantOfShape(Op):
    """A tensor of the given shape filled with ``value`` (0 by default)."""

    def evaluate(self, ctx: EvalContext, shape: torch.Tensor) -> torch.Tensor:
        value = ctx.attrs.get("value")
        array = np.asarray(value if value is not None else np.zeros(1, np.float32))
        fill = constant_tensor(array.reshape(-1)[:1], ctx.dtype, ctx.device)
        return fill.reshape(()).expand(*ints(shape)).clone()


@register
class Range(Op):
    """start, start + delta, ... below limit."""

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded("Range's length (limit - start) / delta changes with values computed from the input")

    def evaluate(self, ctx: EvalContext, start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if start.is_floating_point():
            return torch.arange(float(start), float(limit), float(delta), dtype=ctx.dtype, device=ctx.device)
        return torch.arange(int(start), int(limit), int(delta), dtype=start.dtype, device=ctx.device)
