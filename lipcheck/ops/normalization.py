"""Normalisations. Inference BatchNorm is a per-channel affine map (folded into a neighbouring layer by
``lipcheck.passes``); the others divide by a statistic of their input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from lipcheck.graph import Graph, Node
from lipcheck.ops.base import (
    AffineContext,
    EvalContext,
    LocalBound,
    NotFoldable,
    Op,
    RuleContext,
    UnsupportedVariant,
    axis_index,
    node_attrs,
    register,
    unbounded,
)

EPSILON = {"epsilon": 1e-5}


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


class DividesByStatistic(Op):
    """Divides by a statistic of the input (``reason``): not globally Lipschitz."""

    reason: ClassVar[str]

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return unbounded(self.reason)


@register
class LayerNormalization(DividesByStatistic):
    """LayerNorm divides by the input's standard deviation (not globally Lipschitz)."""

    attributes = {**EPSILON, "axis": -1}
    reason = "LayerNorm divides by the input's standard deviation (not globally Lipschitz)"

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
class InstanceNormalization(DividesByStatistic):
    """InstanceNorm divides by the input's standard deviation (not globally Lipschitz)."""

    attributes = EPSILON
    reason = "InstanceNorm divides by the input's standard deviation (not globally Lipschitz)"

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y = normalise(x, range(2, x.dim()), float(ctx.attrs["epsilon"]))
        return y * _channel(scale, x) + _channel(bias, x)


@register
class GroupNormalization(DividesByStatistic):
    """GroupNorm divides by the input's standard deviation (not globally Lipschitz)."""

    attributes = EPSILON
    reason = "GroupNorm divides by the input's standard deviation (not globally Lipschitz)"

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        groups = int(ctx.attrs["num_groups"])
        n, c = x.shape[0], x.shape[1]
        y = normalise(x.reshape(n, groups, -1), [2], float(ctx.attrs["epsilon"])).reshape(x.shape)
        if scale.numel() == groups and groups != c:  # opset 18: one scale and bias per group
            scale, bias = scale.repeat_interleave(c // groups), bias.repeat_interleave(c // groups)
        return y * _channel(scale, x) + _channel(bias, x)


@register
class MeanVarianceNormalization(DividesByStatistic):
    """Divides by the input's standard deviation (not globally Lipschitz)."""

    attributes = {"axes": [0, 2, 3]}
    reason = "divides by the input's standard deviation (not globally Lipschitz)"

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        axes = tuple(axis_index(int(a), x.dim()) for a in ctx.attrs["axes"])
        centred = x - x.mean(dim=axes, keepdim=True)
        return centred / (torch.sqrt(centred.pow(2).mean(dim=axes, keepdim=True)) + 1e-9)


@register
class LpNormalization(DividesByStatistic):
    """Normalising by the input's norm is not Lipschitz near 0."""

    attributes = {"p": 2, "axis": -1}
    reason = "normalising by the input's norm is not Lipschitz near 0"

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        p = int(ctx.attrs["p"])
        norm = x.abs().pow(p).sum(dim=int(ctx.attrs["axis"]), keepdim=True).pow(1 / p)
        return x / norm
