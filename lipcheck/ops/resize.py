"""Resize (and Upsample, which the ONNX frontend maps onto it): nearest-neighbour resizing is a selection,
whose norm is sqrt(the most outputs reading one input), counted on the index map when sizes are known;
linear and cubic modes are evaluated, not yet bounded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lipcheck.graph import Node
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


def source_coordinates(
    transform: str, out: int, n: int, scale: float, roi: tuple[float, float], dtype: type = np.float64
) -> np.ndarray:
    """Input coordinate of each output position (ONNX Resize coordinate_transformation_mode), computed in
    ``dtype``."""
    o: np.ndarray = np.arange(out, dtype=dtype)
    scale = dtype(scale)
    if transform == "half_pixel":
        return (o + 0.5) / scale - 0.5
    if transform == "pytorch_half_pixel":
        return (o + 0.5) / scale - 0.5 if out > 1 else np.zeros(out)
    if transform == "align_corners":
        return o * (n - 1) / (out - 1) if out > 1 else np.zeros(out)
    if transform == "tf_half_pixel_for_nn":
        return (o + 0.5) / scale
    if transform == "tf_crop_and_resize":
        start, end = roi
        if out > 1:
            return start * (n - 1) + o * (end - start) * (n - 1) / (out - 1)
        return np.full(out, 0.5 * (start + end) * (n - 1))
    if transform == "half_pixel_symmetric":
        adjustment = out / (scale * n)
        offset = n / 2 * (1 - adjustment)
        return offset + (o + 0.5) / scale - 0.5
    return o / scale  # asymmetric


def nearest_index(coords: np.ndarray, mode: str) -> np.ndarray:
    """The input position a nearest-mode output reads (ONNX nearest_mode)."""
    if mode == "floor":
        return np.floor(coords)
    if mode == "ceil":
        return np.ceil(coords)
    if mode == "round_prefer_ceil":
        return np.floor(coords + 0.5)
    return np.ceil(coords - 0.5)  # round_prefer_floor


def _present(values: tuple[Any, ...], index: int) -> torch.Tensor | None:
    value = values[index] if len(values) > index else None
    return value if value is not None and value.numel() else None


@dataclass
class _Plan:
    """How a Resize node maps each axis, read once from its attributes and runtime inputs."""

    axes: list[int]
    transform: str
    nearest_mode: str
    mode: str
    extrapolation: float
    scales: list[float] | None
    sizes: torch.Tensor | None
    roi: list[float] | None

    @staticmethod
    def of(ctx: EvalContext, x: torch.Tensor, rest: tuple[Any, ...], legacy: bool) -> _Plan:
        rank = x.dim()
        scales = ctx.attrs.get("scales")
        given = None if legacy else _present(rest, 1)
        if given is not None:
            scales = given.reshape(-1).tolist()
        roi = None if legacy else _present(rest, 0)
        return _Plan(
            axes=[axis_index(int(a), rank) for a in (ctx.attrs.get("axes") or range(rank))],
            transform="asymmetric" if legacy else str(ctx.attrs["coordinate_transformation_mode"]),
            nearest_mode="floor" if legacy else str(ctx.attrs.get("nearest_mode") or "round_prefer_floor"),
            mode=str(ctx.attrs["mode"]),
            extrapolation=float(ctx.attrs["extrapolation_value"]),
            scales=scales,
            sizes=_present(rest, 2),
            roi=None if roi is None else roi.reshape(-1).tolist(),
        )

    def resize_axis(self, ctx: EvalContext, x: torch.Tensor, j: int, axis: int) -> torch.Tensor:
        n = x.shape[axis]
        start, end = (self.roi[j], self.roi[j + len(self.axes)]) if self.roi is not None else (0.0, 1.0)
        if self.sizes is not None:
            out = int(self.sizes.reshape(-1)[j])
            scale = out / n
        else:
            assert self.scales is not None
            scale = float(self.scales[j if len(self.scales) == len(self.axes) else axis])
            out = int(math.floor(n * scale))
        if out == n and scale == 1.0 and self.transform != "tf_crop_and_resize":
            return x
        coords = source_coordinates(self.transform, out, n, scale, (start, end))
        y = self._interpolate(ctx, x, axis, coords, out)
        if self.transform == "tf_crop_and_resize":
            outside = (coords < 0) | (coords > n - 1)
            if outside.any():
                keep_shape = [1] * x.dim()
                keep_shape[axis] = out
                keep = torch.as_tensor(~outside, device=x.device).reshape(keep_shape)
                y = torch.where(keep, y, torch.full_like(y, self.extrapolation))
        return y

    def _interpolate(self, ctx: EvalContext, x: torch.Tensor, axis: int, coords: np.ndarray, out: int) -> torch.Tensor:
        n = x.shape[axis]
        if self.mode == "nearest":
            index = np.clip(nearest_index(coords, self.nearest_mode), 0, n - 1).astype(np.int64)
            return x.index_select(axis, ctx.int_tensor(index))
        clamped = np.clip(coords, 0, n - 1)
        low = np.floor(clamped).astype(np.int64)
        high = np.minimum(low + 1, n - 1)
        weight_shape = [1] * x.dim()
        weight_shape[axis] = out
        weight = ctx.float_tensor(clamped - low).reshape(weight_shape)
        low_values = x.index_select(axis, ctx.int_tensor(low))
        return low_values * (1 - weight) + x.index_select(axis, ctx.int_tensor(high)) * weight


def _copies_per_axis(ctx: RuleContext, transform: str) -> tuple[list[float], bool] | LocalBound:
    """Per axis, how many outputs may read one input (align_corners / tf_crop_and_resize), and exactness."""
    in_shape, out_shape = ctx.shape(0), ctx.output_shape()
    if in_shape is None or out_shape is None or None in in_shape or None in out_shape:
        return unbounded(f"{transform} resize of unknown size; give --input-shape", "unknown shape")
    spans = [1.0] * len(in_shape)
    exact = True
    if transform == "tf_crop_and_resize":
        exact = False
        roi = ctx.const(1)
        axes = ctx.attrs.get("axes") or list(range(len(in_shape)))
        if roi is None or np.asarray(roi).size != 2 * len(axes):
            return unbounded("crop region (roi) unknown before running", "unknown roi")
        roi = np.asarray(roi, dtype=np.float64).reshape(-1)
        for j, axis in enumerate(axes):
            spans[int(axis) % len(in_shape)] = abs(float(roi[j + len(axes)] - roi[j]))
    effective = []
    for i, o, span in zip(in_shape, out_shape, spans, strict=True):
        if o <= 1:  # type: ignore[operator]
            effective.append(1.0)
        elif span * (i - 1) == 0:  # type: ignore[operator]  # every output reads the same input (a size-1 axis)
            effective.append(float(o))  # type: ignore[arg-type]
        else:
            effective.append(min(float(o), (o - 1) / (span * (i - 1))))  # type: ignore[arg-type, operator]
    return effective, exact


def _nearest_reads(
    transform: str, rounding: str, out: int, n: int, scale: float, window: tuple[float, float], dtype: type
) -> np.ndarray:
    """The input index each output reads along one axis, coordinates rounded to ``dtype`` (-1: none, the
    extrapolation value of tf_crop_and_resize)."""
    coords = source_coordinates(transform, out, n, scale, window, dtype)
    index = np.clip(nearest_index(coords, rounding), 0, n - 1).astype(np.int64)
    if transform == "tf_crop_and_resize":
        index[(coords < 0) | (coords > n - 1)] = -1
    return index


def _counted_copies(ctx: RuleContext, scales: list[float]) -> tuple[int, bool] | None:
    """The most outputs that read one input, counted on the index map the op computes (sizes known).

    The coordinates are computed in float64 and in float32 (as runtimes do) and an output counts for
    every input either reads, so a boundary case rounded differently is covered; exact when they agree.
    """
    in_shape, out_shape = ctx.shape(0), ctx.output_shape()
    if in_shape is None or out_shape is None or None in in_shape or None in out_shape:
        return None
    rank = len(in_shape)
    axes = [axis_index(int(a), rank) for a in (ctx.attrs.get("axes") or range(rank))]
    scale_of = dict(zip(axes, scales, strict=True)) if len(scales) == len(axes) else dict(enumerate(scales))
    legacy = "coordinate_transformation_mode" not in ctx.attrs  # Upsample and Resize-10
    transform = "asymmetric" if legacy else str(ctx.attrs["coordinate_transformation_mode"])
    rounding = "floor" if legacy else str(ctx.attrs.get("nearest_mode") or "round_prefer_floor")
    roi = ctx.const(1) if transform == "tf_crop_and_resize" else None
    if transform == "tf_crop_and_resize" and (roi is None or np.asarray(roi).size != 2 * len(axes)):
        return None
    copies, exact = 1, True
    for j, axis in enumerate(axes):
        n, out = int(in_shape[axis]), int(out_shape[axis])  # type: ignore[arg-type]
        window = (0.0, 1.0) if roi is None else (float(roi.reshape(-1)[j]), float(roi.reshape(-1)[j + len(axes)]))
        scale = float(scale_of.get(axis, out / n))
        reads = [
            _nearest_reads(transform, rounding, out, n, scale, window, dtype) for dtype in (np.float64, np.float32)
        ]
        plain = np.bincount(reads[0][reads[0] >= 0], minlength=n)
        other = reads[1][(reads[1] != reads[0]) & (reads[1] >= 0)]
        counts = plain + np.bincount(other, minlength=n)
        copies *= max(1, int(counts.max(initial=0)))
        exact = exact and bool((counts == plain).all())
    return copies, exact


@register
class Resize(Op):
    """Nearest-neighbour resize: sqrt(the most copies of one input), counted per axis when sizes are known."""

    attributes = {"mode": "nearest", "antialias": 0, "keep_aspect_ratio_policy": "stretch", "extrapolation_value": 0.0}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        mode = str(ctx.attrs["mode"])
        if mode != "nearest":
            raise UnsupportedVariant(f"Resize(mode={mode})")
        if any(ctx.is_variable(i) for i in range(1, len(ctx.node.inputs))):
            return unbounded("roi, scales or sizes computed from the input: the index map jumps", "moving grid")
        scales = ctx.attrs.get("scales")
        if not scales:
            return unbounded("resize scale unknown before running; give --input-shape", "unknown scale")
        counted = _counted_copies(ctx, list(scales))
        if counted is not None:
            copies, exact = counted
            return LocalBound(math.sqrt(copies), f"nearest resize: sqrt({copies}) copies", exact=exact)
        effective = list(scales)
        transform = str(ctx.attrs.get("coordinate_transformation_mode") or "")
        if transform in ("align_corners", "tf_crop_and_resize"):
            # input coordinate = start + o * step: an input is read by at most ceil(1 / step) outputs
            found = _copies_per_axis(ctx, transform)
            if isinstance(found, LocalBound):
                return found
            effective, _ = found
        # size unknown: an input's rounding cell, widened at the border by the coordinates that are clamped
        # onto it (under one unit in every mode), is shorter than 2 units, so it holds < 2 * scale outputs
        copies = math.prod(max(1, math.ceil(2 * float(x) - 1e-12)) for x in effective)
        return LocalBound(math.sqrt(copies), f"nearest resize, size unknown: sqrt({copies}) copies")

    def check(self, node: Node) -> None:
        mode = str(node.attrs.get("mode") or "nearest")
        if mode not in ("nearest", "linear"):
            raise UnsupportedVariant(f"Resize(mode={mode})")
        if int(node.attrs.get("antialias", 0) or 0) and mode != "nearest":
            raise UnsupportedVariant("Resize(antialias=1)")
        if str(node.attrs.get("keep_aspect_ratio_policy") or "stretch") != "stretch":
            raise UnsupportedVariant(f"Resize(keep_aspect_ratio_policy={node.attrs['keep_aspect_ratio_policy']})")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, *rest: Any) -> torch.Tensor:
        legacy = "coordinate_transformation_mode" not in ctx.attrs  # Upsample and Resize-10
        plan = _Plan.of(ctx, x, rest, legacy)
        for j, axis in enumerate(plan.axes):
            x = plan.resize_axis(ctx, x, j, axis)
        return x
