"""Pooling: max pooling is 1-Lipschitz per window (sqrt(windows sharing an input) in all), average pooling
is the linear map it is (its exact norm when sizes are known), l_p pooling compares l_p with l_2 norms."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lipcheck.graph import Graph, Node, Shape
from lipcheck.ops.base import (
    AffineContext,
    EvalContext,
    LocalBound,
    NotFoldable,
    Op,
    RuleContext,
    UnsupportedVariant,
    node_attrs,
    register,
    unbounded,
)
from lipcheck.ops.spatial import (
    CONV,
    MAX_POOL,
    avgpool_matrix,
    pad_spatial,
    pool_output_sizes,
    spatial_pads,
    window_overlap,
)
from lipcheck.spectral import dense_sigma_max

POOL_ATTRIBUTES = {"ceil_mode": 0, "auto_pad": "NOTSET"}


def lp_to_l2(p: float, count: int) -> float:
    """max ||v||_p / ||v||_2 over vectors with ``count`` entries (1 for p >= 2)."""
    return count ** (1.0 / p - 0.5) * (1 + 1e-15) if p < 2 else 1.0


def spatial_count(shape: Sequence[int | None] | None, axes: Sequence[int]) -> int | None:
    """How many entries the axes hold (None when a size is unknown)."""
    if shape is None:
        return None
    dims = [shape[a % len(shape)] for a in axes]
    return None if any(v is None for v in dims) else math.prod(dims)  # type: ignore[arg-type]


def _window_overlaps(ctx: RuleContext) -> int:
    k, s, d = ctx.attrs["kernel_shape"], ctx.attrs["strides"], ctx.attrs["dilations"]
    return math.prod(window_overlap(kk, ss, dd) for kk, ss, dd in zip(k, s, d, strict=True))


def largest_multiplicity(ctx: RuleContext) -> int | None:
    """Most windows one input entry lies in, on the input's known size (None when a size or the padding is unknown).

    The windows holding an entry are a product over axes, so the most is the product of the most per axis."""
    attrs, shape = ctx.attrs, ctx.shape(0)
    k = [int(v) for v in attrs["kernel_shape"]]
    d = len(k)
    pads = attrs.get("pads") or ([0] * 2 * d if attrs["auto_pad"] in ("NOTSET", "VALID") else None)
    if pads is None or shape is None or len(shape) != d + 2 or None in shape[2:]:
        return None
    strides = [int(v) for v in attrs.get("strides") or [1] * d]
    dilations = [int(v) for v in attrs.get("dilations") or [1] * d]
    spatial = [int(n) for n in shape[2:]]  # type: ignore[arg-type]
    sizes = pool_output_sizes(spatial, k, strides, dilations, [int(p) for p in pads], bool(int(attrs["ceil_mode"])))
    most = 1
    for i, n in enumerate(spatial):
        counts = np.zeros(n, dtype=np.int64)
        for j in range(sizes[i]):
            taps = j * strides[i] - int(pads[i]) + np.arange(k[i]) * dilations[i]
            np.add.at(counts, taps[(taps >= 0) & (taps < n)], 1)
        most *= int(counts.max()) if n else 0
    return most


class Pool(Op):
    """A window sliding over 1 to 3 spatial axes."""

    attributes = POOL_ATTRIBUTES

    def check(self, node: Node) -> None:
        k = node.attrs.get("kernel_shape") or []
        if len(k) not in (1, 2, 3):
            raise UnsupportedVariant(f"{node.op}({len(k)}-d)")

    @staticmethod
    def geometry(ctx: EvalContext, x: torch.Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
        """(kernel, strides, dilations, pads) with SAME padding resolved for this input."""
        k = [int(v) for v in ctx.attrs["kernel_shape"]]
        d = len(k)
        strides = [int(v) for v in ctx.attrs.get("strides") or [1] * d]
        dilations = [int(v) for v in ctx.attrs.get("dilations") or [1] * d]
        return k, strides, dilations, spatial_pads(ctx, x.shape[2:], k, strides, dilations)


@register
class MaxPool(Pool):
    """sqrt(most windows sharing one input) = sqrt(prod ceil(k/s)) without dilation."""

    monotone = True

    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if ctx.output_used(1):
            return unbounded("MaxPool's Indices output is read: argmax positions jump with the input")
        overlap = _window_overlaps(ctx)
        return LocalBound(math.sqrt(overlap), f"sqrt({overlap}) overlapping windows", exact=overlap == 1)

    def check(self, node: Node) -> None:
        super().check(node)
        if len(node.outputs) > 1 and node.outputs[1]:
            raise UnsupportedVariant("MaxPool(with Indices output)")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        k, strides, dilations, pads = self.geometry(ctx, x)
        d = len(k)
        ceil_mode = bool(int(ctx.attrs["ceil_mode"]))
        fits = pads[:d] == pads[d:] and all(2 * p <= kk for p, kk in zip(pads[:d], k, strict=True))
        if not fits:
            x = pad_spatial(x, pads, value=-math.inf)
        return MAX_POOL[d](x, tuple(k), tuple(strides), tuple(pads[:d]) if fits else 0, tuple(dilations), ceil_mode)


@register
class LpPool(Pool):
    """(sum |x|^p)^(1/p) per window: sqrt(overlap) x max ||v||_p / ||v||_2 over a window (p >= 1)."""

    attributes = {**POOL_ATTRIBUTES, "p": 2}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        """sum over windows of (||a_w||_p - ||b_w||_p)^2 <= sum_w ||a_w - b_w||_2^2 (p >= 2) = sum_i m_i (a_i - b_i)^2
        with m_i the windows holding entry i: sqrt(max m_i), reached at b = 0, a = t e_i (each window holding
        entry i then differs by |t|). Counted on the input when its size is known, else the most on any size."""
        p = float(ctx.attrs["p"])
        if p < 1:
            return unbounded("LpPool with p < 1 is not Lipschitz")
        counted = largest_multiplicity(ctx)
        overlap = counted if counted is not None else _window_overlaps(ctx)
        where = " (counted on the input)" if counted is not None else ""
        value, method = math.sqrt(overlap), f"sqrt({overlap}) overlapping windows{where}"
        # | ||a||_p - ||b||_p | <= ||a - b||_p <= taps^(1/p - 1/2) ||a - b||_2 for 1 <= p < 2
        factor = lp_to_l2(p, math.prod(ctx.attrs["kernel_shape"]))
        method += f" x {factor:.6g} (l_p vs l_2 norm)" if factor != 1 else ""
        return LocalBound(value * factor, method, exact=overlap <= 1 or (counted is not None and p >= 2))

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        k, strides, dilations, pads = self.geometry(ctx, x)
        p = float(ctx.attrs["p"])
        total, _ = window_sums(x.abs().pow(p), k, strides, dilations, pads, bool(int(ctx.attrs["ceil_mode"])))
        return total.pow(1 / p)


def window_sums(
    x: torch.Tensor,
    k: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int],
    ceil_mode: bool,
    counted: str = "input",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over every pooling window (zero padding) and the number of taps counted per window.

    Any rank, ONNX's output size (ceil mode included). ``counted``: "input" counts taps inside the
    input, "padded" those inside the padded input (count_include_pad); the ceil-mode overhang never counts.
    """
    d = len(k)
    spatial = list(x.shape[2:])
    sizes = pool_output_sizes(spatial, k, strides, dilations, pads, ceil_mode)
    ends = []
    for i, n in enumerate(spatial):
        needed = (sizes[i] - 1) * strides[i] + (k[i] - 1) * dilations[i] + 1
        ends.append(max(needed - n - pads[i], pads[i + d]))
    padded = pad_spatial(x, list(pads[:d]) + ends)
    mask = torch.ones((1, 1, *spatial), dtype=x.dtype, device=x.device)
    if counted == "padded":
        mask = pad_spatial(mask, pads, value=1.0)
        mask = pad_spatial(mask, [0] * d + [e - p for e, p in zip(ends, pads[d:], strict=True)])
    else:
        mask = pad_spatial(mask, list(pads[:d]) + ends)
    n, c = x.shape[0], x.shape[1]
    ones = torch.ones((1, 1, *k), dtype=x.dtype, device=x.device)
    crop = (slice(None), slice(None), *[slice(0, s) for s in sizes])

    def window_sum(t: torch.Tensor) -> torch.Tensor:
        return CONV[d](t, ones, None, tuple(strides), 0, tuple(dilations))[crop]

    total = window_sum(padded.reshape(n * c, 1, *padded.shape[2:]))
    return total.reshape(n, c, *total.shape[2:]), window_sum(mask)


@register
class AveragePool(Pool):
    """Linear: exact norm of the (separable) pooling matrix when sizes are known; else a Schur bound."""

    monotone = True

    attributes = {**POOL_ATTRIBUTES, "count_include_pad": 0}
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        k, s, d = ctx.attrs["kernel_shape"], ctx.attrs["strides"], ctx.attrs["dilations"]
        include_pad = bool(int(ctx.attrs["count_include_pad"]))
        ceil_mode = bool(int(ctx.attrs["ceil_mode"]))
        pads = ctx.attrs.get("pads")
        shape = ctx.shape(0)
        dims = len(k)
        if pads is not None and shape is not None and len(shape) == dims + 2 and None not in shape[2:]:
            value = 1.0
            for i, n in enumerate(shape[2:]):
                matrix = avgpool_matrix(int(n), k[i], s[i], d[i], pads[i], pads[i + dims], ceil_mode, include_pad)  # type: ignore[arg-type]
                if matrix.size:
                    value *= dense_sigma_max(torch.from_numpy(matrix)).value
            return LocalBound(value, "exact norm of the pooling matrix", exact=True)
        # Schur test: rows sum to <= 1; a column sums to <= overlap / (smallest divisor)
        value = 1.0
        for kk, ss, dd in zip(k, s, d, strict=True):
            smallest_divisor = kk if include_pad and not ceil_mode else 1
            value *= math.sqrt(window_overlap(kk, ss, dd) / smallest_divisor)
        return LocalBound(value, "size-independent Schur bound")

    def window_mean(self, node: Node, graph: Graph) -> dict[str, Any] | None:
        """Without padding or ceil mode every window is full: each divides by the window size."""
        attrs = node_attrs(node)
        k = [int(v) for v in attrs["kernel_shape"]]
        d = len(k)
        pads = [int(p) for p in attrs.get("pads") or [0] * 2 * d]
        if attrs["auto_pad"] not in ("NOTSET", "VALID") or int(attrs["ceil_mode"]) or any(pads):
            return None
        strides = [int(v) for v in attrs.get("strides") or [1] * d]
        dilations = [int(v) for v in attrs.get("dilations") or [1] * d]
        return {"kernel_shape": k, "strides": strides, "dilations": dilations, "pads": [0] * 2 * d, "ceil_mode": 0}

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        k, strides, dilations, pads = self.geometry(ctx, x)
        counted = "padded" if int(ctx.attrs["count_include_pad"]) else "input"
        total, count = window_sums(x, k, strides, dilations, pads, bool(int(ctx.attrs["ceil_mode"])), counted)
        return total / count.clamp_min(1)

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        attrs = ctx.attrs
        if int(attrs["ceil_mode"]) or attrs.get("pads") is None:
            raise NotFoldable("AveragePool in ceil mode or with unknown padding")
        k, s, dl, pads = (attrs[key] for key in ("kernel_shape", "strides", "dilations", "pads"))
        include_pad = bool(int(attrs["count_include_pad"]))
        d = len(k)
        y = x
        for i in range(d):
            matrix = avgpool_matrix(ctx.in_shape[2 + i], k[i], s[i], dl[i], pads[i], pads[i + d], False, include_pad)
            y = torch.movedim(torch.tensordot(y, torch.from_numpy(matrix), dims=([2 + i], [1])), -1, 2 + i)
        return y.reshape(x.shape[0], *ctx.out_shape[1:])

    def rounding_terms(self, node: Node, graph: Graph) -> int:
        return int(math.prod(node_attrs(node)["kernel_shape"])) + 2


def _global_count(shape: Shape | None) -> int | None:
    return spatial_count(shape, range(2, len(shape))) if shape is not None else None


@register
class GlobalAveragePool(Op):
    """Mean over H*W entries: 1/sqrt(H*W) (1 when the size is unknown)."""

    monotone = True

    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        count = _global_count(ctx.shape(0))
        if count is None:
            return LocalBound(1.0, "mean (size unknown): <= 1")
        return LocalBound(1.0 / math.sqrt(count), f"mean of {count}: 1/sqrt({count})", exact=True)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True).reshape(x.shape[0], *ctx.out_shape[1:])

    def rounding_terms(self, node: Node, graph: Graph) -> int:
        return mean_rounding_terms(node, graph)


def mean_rounding_terms(node: Node, graph: Graph) -> int:
    """A mean sums every entry of its input at most."""
    shape = graph.shape(node.inputs[0])
    return int(math.prod([d or 1 for d in shape])) + 2 if shape else 1


@register
class GlobalMaxPool(Op):
    """Max over each channel's entries: 1."""

    monotone = True

    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return LocalBound(1.0, "max over disjoint groups")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@register
class GlobalLpPool(Op):
    """l_p norm over H*W entries: 1 for p >= 2, (H*W)^(1/p - 1/2) for 1 <= p < 2."""

    attributes = {"p": 2}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        p = float(ctx.attrs["p"])
        if p < 1:
            return unbounded("GlobalLpPool with p < 1 is not Lipschitz")
        if p >= 2:
            return LocalBound(1.0, "l_p norm over disjoint groups (p >= 2)", exact=True)
        count = _global_count(ctx.shape(0))
        if count is None:
            return unbounded("l_p norm (p < 2) over an unknown number of entries; give --input-shape", "unknown shape")
        return LocalBound(lp_to_l2(p, count), f"l_p norm of {count} entries: {count}^(1/p - 1/2)", exact=True)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> Any:
        p = float(ctx.attrs["p"])
        return x.abs().pow(p).sum(dim=tuple(range(2, x.dim())), keepdim=True).pow(1 / p)


def roi_samples(roi: Any, size: tuple[int, ...], pooled: tuple[int, int], attrs: Any) -> tuple:
    """ONNX RoiAlign's bilinear samples of one region: positions [bins, samples, 4] into the flattened image,
    their weights, and the samples per bin (the reference implementation's arithmetic, in float64)."""
    height, width = size
    half = str(attrs["coordinate_transformation_mode"]) == "half_pixel"
    scale, offset = float(attrs["spatial_scale"]), 0.5 if half else 0.0
    x0, y0, x1, y1 = (float(v) * scale - offset for v in roi)
    roi_w, roi_h = (x1 - x0, y1 - y0) if half else (max(x1 - x0, 1.0), max(y1 - y0, 1.0))
    bin_h, bin_w = roi_h / pooled[0], roi_w / pooled[1]
    ratio = int(attrs["sampling_ratio"])
    grid_h = ratio if ratio > 0 else int(math.ceil(roi_h / pooled[0]))
    grid_w = ratio if ratio > 0 else int(math.ceil(roi_w / pooled[1]))
    ys = y0 + np.arange(pooled[0])[:, None] * bin_h + (np.arange(grid_h)[None, :] + 0.5) * bin_h / max(grid_h, 1)
    xs = x0 + np.arange(pooled[1])[:, None] * bin_w + (np.arange(grid_w)[None, :] + 0.5) * bin_w / max(grid_w, 1)
    y = np.broadcast_to(ys[:, None, :, None], (pooled[0], pooled[1], grid_h, grid_w)).reshape(pooled[0] * pooled[1], -1)
    x = np.broadcast_to(xs[None, :, None, :], (pooled[0], pooled[1], grid_h, grid_w)).reshape(pooled[0] * pooled[1], -1)
    outside = (y < -1.0) | (y > height) | (x < -1.0) | (x > width)
    y, x = np.maximum(y, 0.0), np.maximum(x, 0.0)
    y_low, x_low = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    y_edge, x_edge = y_low >= height - 1, x_low >= width - 1
    y_low, x_low = np.where(y_edge, height - 1, y_low), np.where(x_edge, width - 1, x_low)
    y, x = np.where(y_edge, y_low, y), np.where(x_edge, x_low, x)
    y_high, x_high = np.where(y_edge, y_low, y_low + 1), np.where(x_edge, x_low, x_low + 1)
    ly, lx = y - y_low, x - x_low
    positions = np.stack(
        [y_low * width + x_low, y_low * width + x_high, y_high * width + x_low, y_high * width + x_high], -1
    )
    weights = np.stack([(1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx], -1)
    weights = np.where(outside[..., None], 0.0, weights)
    return np.where(outside[..., None], 0, positions), weights, max(grid_h * grid_w, 1)


@register
class RoiAlign(Op):
    """Bilinear samples averaged (or maxed) over each bin of each region. With constant regions it is linear
    in X (avg): the exact norm of the sampling rows stacked over the regions reading one image (all regions
    when the batch indices are known only at run time); max mode: each output entry is one weighted pixel
    (weight <= 1), so sqrt(most output entries reading one pixel). Regions from the input: the verdict."""

    attributes = {"coordinate_transformation_mode": "half_pixel", "mode": "avg", "output_height": 1,
                  "output_width": 1, "sampling_ratio": 0, "spatial_scale": 1.0}  # fmt: skip

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        rois, shape = ctx.const(1), ctx.shape(0)
        if rois is None:
            return unbounded("RoiAlign of regions computed from the input: the sampling moves with them")
        if shape is None or len(shape) != 4 or shape[2] is None or shape[3] is None:
            raise UnsupportedVariant("RoiAlign(image size unknown: give --input-shape)")
        size, pooled = (shape[2], shape[3]), (int(ctx.attrs["output_height"]), int(ctx.attrs["output_width"]))
        batch = ctx.const(2)
        groups: dict[int, list[np.ndarray]] = {}
        for r, roi in enumerate(np.asarray(rois, np.float64).reshape(-1, 4)):
            positions, weights, count = roi_samples(roi, size, pooled, ctx.attrs)
            rows = np.zeros((positions.shape[0], size[0] * size[1]))
            if str(ctx.attrs["mode"]) == "avg":
                np.add.at(rows, (np.arange(rows.shape[0])[:, None, None], positions), weights / count)
            else:  # which pixels each output entry may read
                np.add.at(rows, (np.arange(rows.shape[0])[:, None, None], positions), (weights > 0).astype(float))
            groups.setdefault(int(batch.reshape(-1)[r]) if batch is not None else 0, []).append(rows)
        if str(ctx.attrs["mode"]) != "avg":
            most = (
                max(float((np.vstack(g) > 0).sum(axis=0).max(initial=0.0)) for g in groups.values()) if groups else 0.0
            )
            return LocalBound(math.sqrt(most), "sqrt(most output entries reading one pixel), weights <= 1")
        norm = (
            max(float(dense_sigma_max(torch.as_tensor(np.vstack(g))).value) for g in groups.values()) if groups else 0.0
        )
        return LocalBound(norm * (1 + 1e-6), "exact norm of the sampling rows stacked per image", exact=True)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, rois: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        pooled = (int(ctx.attrs["output_height"]), int(ctx.attrs["output_width"]))
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        outputs = []
        for roi, image in zip(rois.detach().cpu().double().tolist(), batch.reshape(-1).tolist(), strict=True):
            positions, weights, count = roi_samples(roi, tuple(x.shape[2:]), pooled, ctx.attrs)
            picked = flat[int(image)][:, torch.as_tensor(positions, device=x.device)]  # [C, bins, samples, 4]
            weighted = picked * torch.as_tensor(weights, dtype=x.dtype, device=x.device)
            average = str(ctx.attrs["mode"]) == "avg"
            value = weighted.sum((-1, -2)) / count if average else weighted.amax(-1).amax(-1)
            outputs.append(value.reshape(x.shape[1], *pooled))
        return torch.stack(outputs) if outputs else x.new_zeros((0, x.shape[1], *pooled))
