"""Ops that rearrange entries (isometries), read only shapes (constant 0), or change the number type."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lipcheck.graph import CONTINUOUS_DTYPES, Graph, Node
from lipcheck.ops.base import (
    AffineContext,
    EvalContext,
    LocalBound,
    NotFoldable,
    Op,
    RuleContext,
    UnsupportedVariant,
    axis_index,
    register,
    unbounded,
)

# ONNX TensorProto data types: float, float16, double and bfloat16 change precision only; every other target
# rounds to a coarse grid or to integers (a step function)
CONTINUOUS_TYPES = {1: "float", 10: "float16", 11: "double", 16: "bfloat16"}
QUANTISED_TYPES = {
    17: "float8e4m3fn", 18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz", 21: "uint4", 22: "int4",
    23: "float4e2m1", 24: "float8e8m0",
}  # fmt: skip
CAST_TYPES: dict[int, torch.dtype | None] = {  # None: the compute dtype (every float type)
    1: None,
    10: None,
    11: None,
    16: None,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    12: torch.int64,
    13: torch.int64,
}


def ints(value: torch.Tensor | Any) -> list[int]:
    """A shape, axes or index operand as a list of Python ints."""
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


class Rearrangement(Op):
    """Rearranges entries without copying: an isometry (1)."""

    monotone = True

    piecewise_linear = rearranges = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return LocalBound(1.0, "isometry", exact=True)


class Reshaping(Rearrangement):
    """Keeps the entries in C order: only the target shape matters (exact in a chain)."""

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *ctx.out_shape[1:])


@register
class Identity(Reshaping):
    """y = x: an isometry."""

    decomposes_activations = True

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return x

    def channel_scale(self, node: Node, graph: Graph) -> np.ndarray | None:
        shape = graph.shape(node.outputs[0])
        return np.ones(int(shape[1])) if shape is not None and len(shape) >= 2 and isinstance(shape[1], int) else None


def dropout_training(node: Node, graph: Graph) -> bool | None:
    """Whether a Dropout node drops entries: its training_mode input (opset 12 on), None when only the run says."""
    if len(node.inputs) < 3 or not node.inputs[2]:
        return False
    mode = graph.constants.get(node.inputs[2])
    return None if mode is None else bool(np.asarray(mode).reshape(-1)[0])


TRAINING_DROPOUT = "Dropout in training mode drops entries at random and scales the rest by 1/(1 - ratio)"


@register
class Dropout(Reshaping):
    """The identity at inference: an isometry. In training mode it is random: no bound."""

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if dropout_training(ctx.node, ctx.graph) is not False:
            return unbounded(TRAINING_DROPOUT, "training mode")
        return super().lipschitz(ctx)

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        if dropout_training(ctx.node, ctx.graph) is not False:
            raise NotFoldable(TRAINING_DROPOUT)
        return super().affine(ctx, x)

    def check(self, node: Node) -> None:
        if len(node.inputs) > 2 and node.inputs[2]:  # the frontend drops a constant-false training_mode
            raise UnsupportedVariant("Dropout(training_mode)")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, *rest: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.ones_like(x, dtype=torch.bool)


@register
class Flatten(Reshaping):
    """To 2-D at ``axis``: an isometry."""

    attributes = {"axis": 1}

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        axis = axis_index(int(ctx.attrs["axis"]), x.dim())
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register
class Reshape(Reshaping):
    """To another shape: an isometry."""

    attributes = {"allowzero": 0}

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, shape: torch.Tensor | None = None) -> torch.Tensor:
        target = ints(shape) if shape is not None else ints(ctx.attrs["shape"])
        if not int(ctx.attrs["allowzero"]):
            target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
        return x.reshape(target)


@register
class Squeeze(Reshaping):
    """Drops size-1 axes: an isometry."""

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        listed = ints(axes) if axes is not None else ctx.attrs.get("axes")
        if not listed:
            return x.reshape([d for d in x.shape if d != 1])
        drop = {axis_index(int(a), x.dim()) for a in listed}
        return x.reshape([d for i, d in enumerate(x.shape) if i not in drop])


@register
class Unsqueeze(Reshaping):
    """Adds size-1 axes: an isometry."""

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        listed = ints(axes) if axes is not None else ints(ctx.attrs["axes"])
        rank = x.dim() + len(listed)
        for axis in sorted(axis_index(a, rank) for a in listed):
            x = x.unsqueeze(axis)
        return x


@register
class Transpose(Rearrangement):
    """Permutes axes: an isometry."""

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        perm = ctx.attrs.get("perm")
        return x.permute(*(perm if perm else reversed(range(x.dim()))))

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        perm = ctx.attrs.get("perm") or list(reversed(range(len(ctx.in_shape))))
        if int(perm[0]) != 0:
            raise NotFoldable("Transpose that moves the batch axis")
        return x.permute(*[int(p) for p in perm])


@register
class DepthToSpace(Rearrangement):
    """Channels to blocks of pixels: an isometry."""

    attributes = {"mode": "DCR"}

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        b = int(ctx.attrs["blocksize"])
        n, c, h, w = x.shape
        if str(ctx.attrs["mode"]) == "CRD":
            y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
        else:
            y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(n, c // (b * b), h * b, w * b)


@register
class SpaceToDepth(Rearrangement):
    """Blocks of pixels to channels: an isometry."""

    attributes = {"mode": "DCR"}  # opset 28 adds CRD (channel major, then the block's row and column)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        b = int(ctx.attrs["blocksize"])
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // b, b, w // b, b)
        crd = str(ctx.attrs["mode"]) == "CRD"
        y = y.permute(0, 1, 3, 5, 2, 4) if crd else y.permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * b * b, h // b, w // b)


class ShapeOnly(Op):
    """Depends on the input's shape, never on its values: 0 (left when a dimension is unknown)."""

    monotone = True

    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return LocalBound(0.0, "depends only on the shape", exact=True)


@register
class Shape(ShapeOnly):
    """The input's shape (from ``start`` to ``end``): 0."""

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        start = ctx.attrs.get("start") or 0
        return ctx.int_tensor(list(x.shape)[start : ctx.attrs.get("end")])


@register
class Size(ShapeOnly):
    """The input's number of entries: 0."""

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return ctx.int_tensor(x.numel())


def _cast_bound(target: str | None) -> LocalBound:
    """Casts among float, float16, double and bfloat16: 1. Every other cast rounds: a step function."""
    if target is None:
        return unbounded("cast to the type of a value whose type is unknown", "unknown type")
    if target not in CONTINUOUS_DTYPES:
        kind = "an integer type" if target.startswith(("int", "uint", "bool")) else f"{target}, which quantises"
        return unbounded(f"cast of an activation to {kind} (a step function: discontinuous)")
    return LocalBound(1.0, "float cast", exact=True)


@register
class Cast(Op):
    """Among float, float16, double, bfloat16: 1. To integers, bool, float8 or float4: a step function."""

    monotone = True

    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        to = int(ctx.attrs["to"])
        return _cast_bound(CONTINUOUS_TYPES.get(to) or QUANTISED_TYPES.get(to) or "int")

    def check(self, node: Any) -> None:
        if int(node.attrs.get("to", 1)) not in CAST_TYPES:
            raise UnsupportedVariant(f"Cast(to={node.attrs.get('to')})")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        target = CAST_TYPES[int(ctx.attrs["to"])]
        return x.to(ctx.dtype if target is None else target)


@register
class CastLike(Op):
    """A cast to the type of a second input: 1 to a float type, not continuous to an integer type."""

    monotone = True

    piecewise_linear = True

    type_inputs = (1,)  # ``like`` gives the type; its values never reach the output

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return _cast_bound(ctx.graph.dtype(ctx.node.inputs[1]))

    def check(self, node: Any) -> None:
        if int(node.attrs.get("to", 1)) not in CAST_TYPES:  # ``to``: the frontend's reading of ``like``'s type
            raise UnsupportedVariant(f"CastLike(to={node.attrs.get('to')})")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x.to(ctx.dtype if like.is_floating_point() else like.dtype)
