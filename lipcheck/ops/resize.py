"""Resize (and Upsample, which the ONNX frontend maps onto it): nearest-neighbour resizing is a selection,
whose norm is sqrt(the most outputs reading one input), counted on the index map when sizes are known;
linear and cubic resizing with known sizes is the Kronecker product of one interpolation matrix per axis,
built by the same code that evaluates it, whose norm is the product of the matrices' norms."""

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
    node_attrs,
    register,
    unbounded,
)


def source_coordinates(
    transform: str,
    out: int,
    n: int,
    scale: float,
    roi: tuple[float, float],
    dtype: type = np.float64,
    length: float | None = None,
) -> np.ndarray:
    """Input coordinate of each output position (ONNX Resize coordinate_transformation_mode), computed in
    ``dtype``. ``length``: the resized length the formulas divide by, the integer ``out`` unless given (the
    ONNX specification's reference takes scale * n, which onnxruntime does not)."""
    o: np.ndarray = np.arange(out, dtype=dtype)
    scale = dtype(scale)
    size = float(out if length is None else length)
    if transform == "half_pixel":
        return (o + 0.5) / scale - 0.5
    if transform == "pytorch_half_pixel":
        return (o + 0.5) / scale - 0.5 if size > 1 else np.zeros(out)
    if transform == "align_corners":
        return o * (n - 1) / (size - 1) if size != 1 else np.zeros(out)
    if transform == "tf_half_pixel_for_nn":
        return (o + 0.5) / scale
    if transform == "tf_crop_and_resize":
        start, end = roi
        if size != 1:
            return start * (n - 1) + o * (end - start) * (n - 1) / (size - 1)
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


def _cubic(t: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with coefficient ``a`` (ONNX cubic_coeff_a)."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


@dataclass(frozen=True)
class Kernel:
    """The 1-D interpolation of a linear or cubic Resize, as the ONNX reference computes it."""

    mode: str  # linear or cubic
    cubic_a: float = -0.75
    exclude_outside: bool = False
    antialias: bool = False

    @staticmethod
    def of(attrs: Any) -> Kernel:
        return Kernel(
            mode=str(attrs["mode"]),
            cubic_a=float(attrs["cubic_coeff_a"]),
            exclude_outside=bool(int(attrs.get("exclude_outside") or 0)),
            antialias=bool(int(attrs.get("antialias") or 0)),
        )

    def taps(self, ratio: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """(offsets from each output's base input [K], weights [out, K]) at ``ratio`` in (0, 1]."""
        reach = 1.0 if self.mode == "linear" else 2.0
        stretch = min(scale, 1.0) if self.antialias else 1.0  # antialiasing widens the kernel when downsampling
        start = int(np.floor(-reach / stretch) + 1) if self.antialias else int(1 - reach)
        offsets = np.arange(start, 2 - start)
        args = (offsets[None, :] - ratio[:, None]) * stretch
        weights = np.clip(1 - np.abs(args), 0, 1) if self.mode == "linear" else _cubic(args, self.cubic_a)
        if self.antialias:
            weights = weights / weights.sum(axis=1, keepdims=True)
        return offsets, weights

    def gather(self, coords: np.ndarray, n: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """(input index [out, K], clamped to the edge; weight [out, K]) of the taps of outputs reading ``coords``."""
        base = np.floor(coords)
        base = np.where(base == coords, base - 1, base)  # the reference's ratio lies in (0, 1]
        offsets, weights = self.taps(coords - base, scale)
        index = base.astype(np.int64)[:, None] + offsets[None, :]
        if self.exclude_outside:
            weights = np.where((index < 0) | (index >= n), 0.0, weights)
            total = weights.sum(axis=1, keepdims=True)
            weights = weights / np.where(total == 0, 1.0, total)
        return np.clip(index, 0, n - 1), weights


def interpolation_taps(
    kernel: Kernel, transform: str, out: int, n: int, scale: float, window: tuple[float, float], length: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One axis's resize as (input index [out, K], weight [out, K], float64; the outputs that are the
    extrapolation value, whose weights are 0)."""
    coords = source_coordinates(transform, out, n, scale, window, length=length)
    index, weights = kernel.gather(coords, n, scale)
    outside = np.zeros(out, dtype=bool)
    if transform == "tf_crop_and_resize":
        outside = (coords < 0) | (coords > n - 1)
        weights[outside] = 0.0
    return index, weights, outside


def interpolation_matrix(
    kernel: Kernel, transform: str, out: int, n: int, scale: float, window: tuple[float, float], length: float
) -> np.ndarray:
    """The [out, n] linear part of one axis's resize (float64), from the taps the evaluation applies."""
    index, weights, _ = interpolation_taps(kernel, transform, out, n, scale, window, length)
    result = np.zeros((out, n))
    np.add.at(result, (np.broadcast_to(np.arange(out)[:, None], index.shape), index), weights)
    return result


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
    aspect_scale: float | None = None  # keep_aspect_ratio_policy's one scale (sizes rounded from it)

    @staticmethod
    def of(ctx: EvalContext, x: torch.Tensor, rest: tuple[Any, ...], legacy: bool) -> _Plan:
        rank = x.dim()
        scales = ctx.attrs.get("scales")
        given = _present(rest, 0 if legacy else 1)  # Upsample-9 and Resize-10: (X, scales)
        if given is not None:
            scales = given.reshape(-1).tolist()
        roi = None if legacy else _present(rest, 0)
        plan = _Plan(
            axes=[axis_index(int(a), rank) for a in (ctx.attrs.get("axes") or range(rank))],
            transform="asymmetric" if legacy else str(ctx.attrs["coordinate_transformation_mode"]),
            nearest_mode="floor" if legacy else str(ctx.attrs.get("nearest_mode") or "round_prefer_floor"),
            mode=str(ctx.attrs["mode"]),
            extrapolation=float(ctx.attrs["extrapolation_value"]),
            scales=scales,
            sizes=_present(rest, 2),
            roi=None if roi is None else roi.reshape(-1).tolist(),
        )
        policy = str(ctx.attrs["keep_aspect_ratio_policy"])
        if plan.sizes is not None and policy != "stretch":
            ratios = [float(s) / x.shape[a] for s, a in zip(plan.sizes.reshape(-1).tolist(), plan.axes, strict=True)]
            plan.aspect_scale = min(ratios) if policy == "not_larger" else max(ratios)
            rounded = [int(plan.aspect_scale * x.shape[a] + 0.5) for a in plan.axes]  # round half up
            plan.sizes = torch.tensor(rounded)
        return plan

    def resize_axis(self, ctx: EvalContext, x: torch.Tensor, j: int, axis: int) -> torch.Tensor:
        n = x.shape[axis]
        start, end = (self.roi[j], self.roi[j + len(self.axes)]) if self.roi is not None else (0.0, 1.0)
        if self.sizes is not None:
            out = int(self.sizes.reshape(-1)[j])
            scale = out / n if self.aspect_scale is None else self.aspect_scale
            length = float(out) if self.aspect_scale is None else n * scale
        else:
            assert self.scales is not None
            scale = float(self.scales[j if len(self.scales) == len(self.axes) else axis])
            out = int(math.floor(n * scale))
            length = n * scale  # the ONNX reference divides by the unrounded resized length
        if out == n and scale == 1.0 and self.transform != "tf_crop_and_resize":
            return x
        if self.mode != "nearest":
            return self._interpolate(ctx, x, axis, (out, scale, (start, end), length))
        coords = source_coordinates(self.transform, out, n, scale, (start, end))
        index = np.clip(nearest_index(coords, self.nearest_mode), 0, n - 1).astype(np.int64)
        y = x.index_select(axis, ctx.int_tensor(index))
        if self.transform == "tf_crop_and_resize":
            y = self._extrapolate(y, axis, (coords < 0) | (coords > n - 1))
        return y

    def _interpolate(
        self, ctx: EvalContext, x: torch.Tensor, axis: int, spec: tuple[int, float, tuple[float, float], float]
    ) -> torch.Tensor:
        out, scale, window, length = spec
        index, weights, outside = interpolation_taps(
            Kernel.of(ctx.attrs), self.transform, out, x.shape[axis], scale, window, length
        )
        shape = [1] * x.dim()
        shape[axis] = out
        y = sum(
            x.index_select(axis, ctx.int_tensor(index[:, k])) * ctx.float_tensor(weights[:, k]).reshape(shape)
            for k in range(index.shape[1])
        )
        assert isinstance(y, torch.Tensor)
        return self._extrapolate(y, axis, outside)

    def _extrapolate(self, y: torch.Tensor, axis: int, outside: np.ndarray) -> torch.Tensor:
        if not outside.any():
            return y
        keep_shape = [1] * y.dim()
        keep_shape[axis] = len(outside)
        keep = torch.as_tensor(~outside, device=y.device).reshape(keep_shape)
        return torch.where(keep, y, torch.full_like(y, self.extrapolation))


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


def _declared(out_shape: Any, rank: int, axis: int) -> int | None:
    known = out_shape is not None and len(out_shape) == rank and out_shape[axis] is not None
    return int(out_shape[axis]) if known else None


def _sized(ctx: RuleContext, legacy: bool) -> bool:
    """The output size is given (a constant sizes input), not rounded from scales."""
    sizes = None if legacy else ctx.const(3)
    return sizes is not None and np.asarray(sizes).size > 0


def _output_sizes(n: int, scale: float, declared: int | None, sized: bool) -> list[int]:
    """The sizes an axis resized by ``scale`` may come out at: the declared one when sizes are given; else
    also floor(n * scale) in float64 (the ONNX reference, shape inference) and in float32 (onnxruntime)."""
    if sized and declared is not None:
        return [declared]
    found = {math.floor(n * scale), math.floor(float(np.float32(n) * np.float32(scale)))}
    return sorted(found | ({declared} if declared is not None else set()))


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
        n, declared = int(in_shape[axis]), int(out_shape[axis])  # type: ignore[arg-type]
        window = (0.0, 1.0) if roi is None else (float(roi.reshape(-1)[j]), float(roi.reshape(-1)[j + len(axes)]))
        scale = float(scale_of.get(axis, declared / n))
        outs = _output_sizes(n, scale, declared, _sized(ctx, legacy))
        most = 0
        for out in outs:  # the sizes runtimes may disagree on: the most copies over them
            reads = [
                _nearest_reads(transform, rounding, out, n, scale, window, dtype) for dtype in (np.float64, np.float32)
            ]
            plain = np.bincount(reads[0][reads[0] >= 0], minlength=n)
            other = reads[1][(reads[1] != reads[0]) & (reads[1] >= 0)]
            counts = plain + np.bincount(other, minlength=n)
            most = max(most, int(counts.max(initial=0)))
            exact = exact and len(outs) == 1 and bool((counts == plain).all())
        copies *= max(1, most)
    return copies, exact


def _spectral_norm(matrix: np.ndarray) -> tuple[float, bool]:
    """||matrix||_2 from the eigenvalues of the smaller Gram matrix (exact), or sqrt(||.||_1 ||.||_inf) when
    both sides are long (a bound)."""
    if min(matrix.shape, default=0) == 0:
        return 0.0, True
    if min(matrix.shape) > 4096:
        return math.sqrt(np.abs(matrix).sum(axis=0).max() * np.abs(matrix).sum(axis=1).max()), False
    gram = matrix.T @ matrix if matrix.shape[1] <= matrix.shape[0] else matrix @ matrix.T
    return math.sqrt(max(0.0, float(np.linalg.eigvalsh(gram)[-1]))), True


def _axis_norm(
    kernel: Kernel, transform: str, out: int, n: int, scale: float, window: tuple[float, float]
) -> tuple[float, bool]:
    """||A||_2 of one axis's interpolation matrix, the larger over the resized length the coordinates divide
    by (scale * n in the ONNX reference, the integer size in onnxruntime)."""
    norms, exact = [], True
    for length in {float(out), n * scale}:
        value, tight = _spectral_norm(interpolation_matrix(kernel, transform, out, n, scale, window, length))
        norms.append(value)
        exact = exact and tight
    return max(norms), exact and max(norms) - min(norms) <= 1e-12 * max(norms)


def _separable_bound(ctx: RuleContext, scales: list[float]) -> LocalBound:
    """Linear and cubic resize with known sizes: the Kronecker product of per-axis interpolation matrices,
    whose norm is the product of theirs (exact); extrapolated outputs are constants."""
    mode = str(ctx.attrs["mode"])
    in_shape, out_shape = ctx.shape(0), ctx.output_shape()
    if in_shape is None or None in in_shape:
        return unbounded(f"{mode} resize of unknown size; give --input-shape", "unknown shape")
    rank = len(in_shape)
    axes = [axis_index(int(a), rank) for a in (ctx.attrs.get("axes") or range(rank))]
    scale_of = dict(zip(axes, scales, strict=True)) if len(scales) == len(axes) else dict(enumerate(scales))
    legacy = "coordinate_transformation_mode" not in ctx.attrs  # Upsample and Resize-10
    transform = "asymmetric" if legacy else str(ctx.attrs["coordinate_transformation_mode"])
    roi = np.zeros(0)
    if transform == "tf_crop_and_resize":
        found = ctx.const(1)
        if found is None or np.asarray(found).size != 2 * len(axes):
            return unbounded("crop region (roi) unknown before running", "unknown roi")
        roi = np.asarray(found, dtype=np.float64).reshape(-1)
    kernel = Kernel.of(ctx.attrs)
    norm, exact = 1.0, True
    for j, axis in enumerate(axes):
        n, scale = int(in_shape[axis]), float(scale_of.get(axis, 1.0))  # type: ignore[arg-type]
        outs = _output_sizes(n, scale, _declared(out_shape, rank, axis), _sized(ctx, legacy))
        if outs == [n] and scale == 1.0 and transform != "tf_crop_and_resize":
            continue
        window = (float(roi[j]), float(roi[j + len(axes)])) if roi.size else (0.0, 1.0)
        norms = [_axis_norm(kernel, transform, out, n, scale, window) for out in outs]
        value = max(v for v, _ in norms)
        norm, exact = norm * value, exact and all(tight and v == value for v, tight in norms)
    # 1e-6: onnxruntime computes the coefficients in float32
    return LocalBound(norm * (1 + 1e-6), f"{mode} resize: product of the axes' interpolation norms", exact=exact)


@register
class Resize(Op):
    """Resize: nearest sqrt(the most copies of one input); linear and cubic the product of per-axis norms.

    With constant scales or sizes, linear and cubic resizing (any coordinate_transformation_mode,
    cubic_coeff_a, exclude_outside, antialias) is y = (A_1 (x) A_2 (x) ...) x + c on the resized axes, A_k the
    1-D interpolation matrix of axis k and c the extrapolation value of tf_crop_and_resize's outputs outside
    the crop (rows of A_k that are zero). ||A (x) B||_2 = ||A||_2 ||B||_2, so the product is exact; where
    runtimes differ (the resized length align_corners divides by, the size floor(n * scale) in float32 or
    float64) the larger norm is taken.
    """

    attributes = {
        "mode": "nearest",
        "antialias": 0,
        "keep_aspect_ratio_policy": "stretch",
        "extrapolation_value": 0.0,
        "cubic_coeff_a": -0.75,
        "exclude_outside": 0,
    }

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        mode = str(ctx.attrs["mode"])
        if mode not in ("nearest", "linear", "cubic"):
            raise UnsupportedVariant(f"Resize(mode={mode})")
        if any(ctx.is_variable(i) for i in range(1, len(ctx.node.inputs))):
            return unbounded("roi, scales or sizes computed from the input: the index map jumps", "moving grid")
        scales = ctx.attrs.get("scales")
        if not scales:
            return unbounded("resize scale unknown before running; give --input-shape", "unknown scale")
        if mode != "nearest":
            return _separable_bound(ctx, list(scales))
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
        if mode not in ("nearest", "linear", "cubic"):
            raise UnsupportedVariant(f"Resize(mode={mode})")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, *rest: Any) -> torch.Tensor:
        legacy = "coordinate_transformation_mode" not in ctx.attrs  # Upsample and Resize-10
        plan = _Plan.of(ctx, x, rest, legacy)
        for j, axis in enumerate(plan.axes):
            x = plan.resize_axis(ctx, x, j, axis)
        return x


# ---------------------------------------------------------------------------------------------
# GridSample: a resampling at the grid's points, linear in the image when the grid is constant

_GRID_MODES = {
    "bilinear": "bilinear",
    "linear": "bilinear",
    "nearest": "nearest",
    "bicubic": "bicubic",
    "cubic": "bicubic",
}
_DENSE_ENTRIES = 1 << 24  # sampling matrices up to this many entries get their exact norm


def _grid_sample(x: torch.Tensor, grid: torch.Tensor, mode: str, padding: str, align: bool) -> torch.Tensor:
    """torch's grid_sample (ONNX's semantics) for 1-, 2- and 3-D images (a 1-D one as a row of height 1)."""
    if x.dim() == 3:  # [N, C, W] sampled at grid [N, W_out, 1]: y = 0 is row 0 exactly, in any mode
        flat = torch.cat([grid, torch.zeros_like(grid)], dim=-1).unsqueeze(1)
        return _grid_sample(x.unsqueeze(2), flat, mode, padding, align).squeeze(2)
    return torch.nn.functional.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=padding, align_corners=align)


def _sampling_matrix(grid_n: torch.Tensor, spatial: tuple[int, ...], attrs: tuple[str, str, bool]) -> np.ndarray:
    """The [outputs, pixels] matrix of sampling one image at ``grid_n`` [1, *out, d], in grid_n's dtype."""
    pixels = math.prod(spatial)
    basis = torch.eye(pixels, dtype=grid_n.dtype).reshape(pixels, 1, *spatial)
    columns = _grid_sample(basis, grid_n.expand(pixels, *grid_n.shape[1:]), *attrs)
    return columns.reshape(pixels, -1).T.double().numpy()


def _sampling_norm(grid_n: torch.Tensor, spatial: tuple[int, ...], attrs: tuple[str, str, bool]) -> tuple[float, bool]:
    """||M||_2 of one image's sampling matrix. Nearest sampling is a selection: built with float32 coordinates
    too (as runtimes compute them), an output counting for every pixel either reads where they differ."""
    matrix = _sampling_matrix(grid_n, spatial, attrs)
    if attrs[0] != "nearest":
        return _spectral_norm(matrix)
    other = _sampling_matrix(grid_n.float(), spatial, attrs)
    if np.array_equal(matrix, other):
        return _spectral_norm(matrix)
    union = np.maximum(matrix != 0, other != 0).sum(axis=0)
    return math.sqrt(float(union.max(initial=0))), False


def _sampling_norms(grid: np.ndarray, spatial: tuple[int, ...], attrs: tuple[str, str, bool]) -> tuple[float, bool]:
    """max over the batch of ||M_n||_2, M_n the [outputs, pixels] matrix of sampling image n at grid[n], built
    by sampling the identity's columns (float64); exact, or sqrt(||M||_1 ||M||_inf) where M is too large."""
    pixels, exact, best = math.prod(spatial), True, 0.0
    for points in grid:
        outputs = math.prod(points.shape[:-1])
        grid_n = torch.as_tensor(np.asarray(points, dtype=np.float64))[None]
        if pixels * max(pixels, outputs) <= _DENSE_ENTRIES:
            value, tight = _sampling_norm(grid_n, spatial, attrs)
        else:
            value, tight = _sums_bound(grid_n, spatial, attrs), False
        best, exact = max(best, value), exact and tight
    return best, exact


def _sums_bound(grid_n: torch.Tensor, spatial: tuple[int, ...], attrs: tuple[str, str, bool]) -> float:
    """sqrt(max column sum * max row sum) of |M| (Hoelder), the sampling matrix M taken a block of columns at a
    time (cubic weights change sign); bilinear and nearest weights are >= 0: one forward and one backward pass."""
    pixels, outputs = math.prod(spatial), math.prod(grid_n.shape[1:-1])
    if attrs[0] != "bicubic":
        with torch.enable_grad():
            ones = torch.ones(1, 1, *spatial, dtype=torch.float64, requires_grad=True)
            sampled = _grid_sample(ones, grid_n, *attrs)
            (columns,) = torch.autograd.grad(sampled.sum(), ones)
        return math.sqrt(float(columns.max()) * float(sampled.detach().max()))
    block = max(1, _DENSE_ENTRIES // max(outputs, pixels))
    rows = torch.zeros(outputs, dtype=torch.float64)
    most = 0.0
    for start in range(0, pixels, block):
        count = min(block, pixels - start)
        basis = torch.zeros(count, pixels, dtype=torch.float64)
        basis[torch.arange(count), torch.arange(start, start + count)] = 1.0
        sampled = _grid_sample(basis.reshape(count, 1, *spatial), grid_n.expand(count, *grid_n.shape[1:]), *attrs)
        part = sampled.reshape(count, -1).abs()
        most = max(most, float(part.sum(dim=1).max()))
        rows += part.sum(dim=0)
    return math.sqrt(most * (float(rows.max()) if rows.numel() else 0.0))


@register
class GridSample(Op):
    """GridSample with a constant grid: max over the batch of the sampling matrix's norm (exact).

    Image n, channel c is sampled as y[n, c] = M_n x[n, c] with M_n fixed by grid[n] and the mode, padding
    and align_corners (zeros padding reads 0 outside: rows of M_n with smaller sums), so the Jacobian is
    block diagonal and its norm is max_n ||M_n||_2, computed from M_n built by the evaluation itself. A grid
    computed from the input makes the output a product of two variables (bilinear in image and grid), and
    the nearest mode a step function of the grid: not globally Lipschitz.
    """

    attributes = {"mode": "bilinear", "padding_mode": "zeros", "align_corners": 0}

    def _attrs(self, attrs: Any) -> tuple[str, str, bool]:
        return _GRID_MODES[str(attrs["mode"])], str(attrs["padding_mode"]), bool(int(attrs["align_corners"]))

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        self.check(ctx.node)
        if ctx.is_variable(1):
            what = "the image and a grid" if ctx.is_variable(0) else "a constant image at a grid"
            return unbounded(
                f"samples {what} computed from the input: not globally Lipschitz in the grid", "moving grid"
            )
        grid, shape, attrs = ctx.const(1), ctx.shape(0), self._attrs(ctx.attrs)
        if grid is None:
            return unbounded("sampling grid unknown before running", "unknown grid")
        if np.ndim(grid) == 5 and attrs[0] == "bicubic":  # a grid of 3-D points
            raise UnsupportedVariant("GridSample(mode=cubic) of a volume")
        if shape is None or any(d is None for d in shape[2:]):
            return unbounded("grid sampling of an image of unknown size; give --input-shape", "unknown shape")
        spatial = tuple(int(d) for d in shape[2:])  # type: ignore[arg-type]
        grid = np.asarray(grid, dtype=np.float64)
        if math.prod(spatial) == 0 or grid.size == 0:
            return LocalBound(0.0, "empty grid sampling", exact=True)
        norm, exact = _sampling_norms(grid, spatial, attrs)
        # 1e-6: runtimes compute the sampling weights in float32
        return LocalBound(norm * (1 + 1e-6), f"{attrs[0]} grid sampling: max_n ||M_n||", exact=exact)

    def check(self, node: Node) -> None:
        attrs = node_attrs(node)
        mode, padding = str(attrs["mode"]), str(attrs["padding_mode"])
        if mode not in _GRID_MODES or padding not in ("zeros", "border", "reflection"):
            raise UnsupportedVariant(f"GridSample(mode={mode}, padding_mode={padding})")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        mode, padding, align = self._attrs(ctx.attrs)
        if x.dim() == 5 and mode == "bicubic":
            raise UnsupportedVariant("GridSample(mode=cubic) of a volume")
        return _grid_sample(x, grid, mode, padding, align)


def affine_base_grid(spatial: list[int], align_corners: bool) -> torch.Tensor:
    """[prod(spatial), d + 1]: each output point's homogeneous coordinates (x, y[, z], 1) in [-1, 1]."""
    axes = []
    for n in spatial:
        if align_corners:
            axes.append(torch.linspace(-1.0, 1.0, n, dtype=torch.float64) if n > 1 else torch.full((1,), -1.0))
        else:
            axes.append((2 * torch.arange(n, dtype=torch.float64) + 1) / n - 1)
    mesh = torch.meshgrid(*axes, indexing="ij")  # depth/height first, width last
    coords = [m.reshape(-1).to(torch.float64) for m in reversed(mesh)]  # x (width) first
    return torch.stack([*coords, torch.ones_like(coords[0])], 1)


@register
class AffineGrid(Op):
    """The sampling grid of an affine transform theta: grid_n = B theta_n^T with B the base coordinates,
    linear in theta with the exact norm sigma_max(B). A size known only at run time: the verdict."""

    attributes = {"align_corners": 0}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        size = ctx.const(1)
        if size is None:
            return unbounded("AffineGrid of a size known only at run time: the grid's extent is not bounded")
        base = affine_base_grid([int(n) for n in size.reshape(-1)[2:]], bool(int(ctx.attrs["align_corners"])))
        norm = float(torch.linalg.matrix_norm(base, ord=2)) * (1 + 1e-12)
        return LocalBound(norm, "sigma_max of the base coordinates [x, y, 1]", exact=True)

    def evaluate(self, ctx: EvalContext, theta: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        spatial = [int(n) for n in size.reshape(-1).tolist()[2:]]
        base = affine_base_grid(spatial, bool(int(ctx.attrs["align_corners"]))).to(theta.dtype)
        grid = theta @ base.T  # [N, d, points]
        return grid.transpose(1, 2).reshape(theta.shape[0], *spatial, len(spatial))
