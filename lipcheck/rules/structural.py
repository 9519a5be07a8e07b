"""Rules for ops that move, select, copy, pool or reduce entries.

An op that maps each input entry to at most r output entries (with coefficients of modulus <= 1)
has Lipschitz constant <= sqrt(r); pure rearrangements are isometries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from lipcheck.rules.registry import LocalBound, RuleContext, rule, unbounded
from lipcheck.spectral import dense_sigma_max


class UnsupportedVariant(Exception):
    """A known op with attributes lipcheck has no rule for; reported like an unknown op."""

    def __init__(self, label: str):
        super().__init__(label)
        self.label = label


FLOAT_TYPES = {1, 10, 11, 16, 17, 18, 19, 20, 21, 22, 23}


@rule("Identity", "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "DepthToSpace", "SpaceToDepth")
def rearrangement(ctx: RuleContext) -> LocalBound:
    """Rearranges entries without copying: an isometry (1)."""
    return LocalBound(1.0, "isometry", exact=True)


@rule("Shape", "Size")
def shape_only(ctx: RuleContext) -> LocalBound:
    """Depends on the input's shape, never on its values: 0 (left when a dimension is unknown)."""
    return LocalBound(0.0, "depends only on the shape", exact=True)


@rule("Cast", "CastLike")
def cast(ctx: RuleContext) -> LocalBound:
    """Float-to-float casts: 1. Casts to integer or bool types round, which is not continuous."""
    target = ctx.attrs.get("to")
    if ctx.node.op == "CastLike":
        like = ctx.const(1)
        target = 1 if like is None or np.issubdtype(np.asarray(like).dtype, np.floating) else 7
    if target is not None and int(target) not in FLOAT_TYPES:
        return unbounded("cast of an activation to an integer type (discontinuous)")
    return LocalBound(1.0, "float cast", exact=True)


@rule("Slice", "Split", "Compress")
def selection(ctx: RuleContext) -> LocalBound:
    """Selects entries, each at most once: <= 1."""
    return LocalBound(1.0, "selection")


@rule("Concat")
def concat(ctx: RuleContext) -> LocalBound:
    """Concatenated branches: sqrt(sum of L_i^2)."""
    total = math.sqrt(sum(lip * lip for lip in ctx.input_lipschitz))
    return LocalBound(1.0, "concat: sqrt(sum L_i^2)", output_lipschitz=total)


@rule("Gather")
def gather(ctx: RuleContext) -> LocalBound:
    """Constant indices: sqrt(most copies of one entry)."""
    if ctx.is_variable(1):
        return unbounded("gather with indices computed from the input (discontinuous)")
    indices = ctx.const(1)
    if indices is None:
        return unbounded("gather indices unknown before running", "unknown indices")
    flat = np.asarray(indices).reshape(-1).astype(np.int64)
    shape = ctx.shape(0)
    axis = int(ctx.attrs.get("axis", 0))
    if shape is not None and shape[axis % len(shape)] is not None:
        flat = flat % int(shape[axis % len(shape)])
    elif (flat < 0).any() and (flat >= 0).any():
        return unbounded("negative gather indices on an axis of unknown size", "unknown shape")
    copies = int(np.bincount(flat - flat.min()).max()) if flat.size else 0
    return LocalBound(
        math.sqrt(copies), f"selection, {copies} cop{'y' if copies == 1 else 'ies'} max", exact=copies <= 1
    )


@rule("Expand", "Tile")
def expand(ctx: RuleContext) -> LocalBound:
    """Copies entries r times: sqrt(r)."""
    in_shape, out_shape = ctx.shape(0), ctx.output_shape()
    if ctx.node.op == "Tile" and ctx.const(1) is not None:
        copies = math.prod(int(r) for r in np.asarray(ctx.const(1)).reshape(-1))
    elif in_shape is not None and out_shape is not None and None not in in_shape and None not in out_shape:
        copies = math.prod(out_shape) // max(1, math.prod(in_shape))
    else:
        return unbounded("copy count unknown; give --input-shape", "unknown shape")
    return LocalBound(math.sqrt(copies), f"sqrt({copies}) copies", exact=True)


def _window_overlap(kernel: int, stride: int, dilation: int) -> int:
    """Most windows containing one input position: count of taps sharing a residue mod stride."""
    residues = [(i * dilation) % stride for i in range(kernel)]
    return max(residues.count(r) for r in set(residues))


@rule("MaxPool", "LpPool")
def max_pool(ctx: RuleContext) -> LocalBound:
    """sqrt(most windows sharing one input) = sqrt(prod ceil(k/s)) without dilation."""
    if ctx.node.op == "LpPool" and float(ctx.attrs.get("p", 2)) < 1:
        return unbounded("LpPool with p < 1 is not Lipschitz")
    k, s, d = ctx.attrs["kernel_shape"], ctx.attrs["strides"], ctx.attrs["dilations"]
    overlap = math.prod(_window_overlap(kk, ss, dd) for kk, ss, dd in zip(k, s, d, strict=True))
    exact = overlap == 1
    value, method = math.sqrt(overlap), f"sqrt({overlap}) overlapping windows"
    if ctx.node.op == "LpPool":
        # | ||a||_p - ||b||_p | <= ||a - b||_p <= taps^(1/p - 1/2) ||a - b||_2 for 1 <= p < 2
        factor = _lp_to_l2(float(ctx.attrs.get("p", 2)), math.prod(k))
        value, method = value * factor, method + (f" x {factor:.6g} (l_p vs l_2 norm)" if factor != 1 else "")
    return LocalBound(value, method, exact=exact)


def _lp_to_l2(p: float, count: int) -> float:
    """max ||v||_p / ||v||_2 over vectors with ``count`` entries (1 for p >= 2)."""
    return count ** (1.0 / p - 0.5) * (1 + 1e-15) if p < 2 else 1.0


def _avgpool_matrix(
    n: int, k: int, s: int, dl: int, pad_begin: int, pad_end: int, ceil_mode: bool, include_pad: bool
) -> np.ndarray:
    """The 1-D average-pooling matrix, with each entry at least its true value."""
    span = (k - 1) * dl + 1
    length = n + pad_begin + pad_end - span
    outputs = (math.ceil(length / s) if ceil_mode else length // s) + 1
    if ceil_mode and (outputs - 1) * s >= n + pad_begin:
        outputs -= 1  # the last window must start inside the input or the left padding
    matrix = np.zeros((max(outputs, 0), n))
    for j in range(max(outputs, 0)):
        start = j * s - pad_begin
        taps = [start + i * dl for i in range(k)]
        valid = [p for p in taps if 0 <= p < n]
        # runtimes divide by the taps inside the padded input (count_include_pad) or by the valid ones
        divisor = sum(1 for p in taps if -pad_begin <= p < n + pad_end) if include_pad else len(valid)
        divisor = max(1, min(divisor, len(taps)), len(valid)) if valid else 1
        for p in valid:
            matrix[j, p] += 1.0 / divisor
    return matrix


@rule("AveragePool")
def average_pool(ctx: RuleContext) -> LocalBound:
    """Linear: exact norm of the (separable) pooling matrix when sizes are known; else a Schur bound."""
    k, s, d = ctx.attrs["kernel_shape"], ctx.attrs["strides"], ctx.attrs["dilations"]
    include_pad = bool(int(ctx.attrs.get("count_include_pad", 0)))
    ceil_mode = bool(int(ctx.attrs.get("ceil_mode", 0)))
    pads = ctx.attrs.get("pads")
    shape = ctx.shape(0)
    dims = len(k)
    if pads is not None and shape is not None and len(shape) == dims + 2 and None not in shape[2:]:
        value = 1.0
        for i, n in enumerate(shape[2:]):
            matrix = _avgpool_matrix(int(n), k[i], s[i], d[i], pads[i], pads[i + dims], ceil_mode, include_pad)
            if matrix.size:
                value *= dense_sigma_max(torch.from_numpy(matrix)).value
        return LocalBound(value, "exact norm of the pooling matrix", exact=True)
    # Schur test: rows sum to <= 1; a column sums to <= overlap / (smallest divisor)
    value = 1.0
    for kk, ss, dd in zip(k, s, d, strict=True):
        overlap = _window_overlap(kk, ss, dd)
        smallest_divisor = kk if include_pad and not ceil_mode else 1
        value *= math.sqrt(overlap / smallest_divisor)
    return LocalBound(value, "size-independent Schur bound")


def _spatial_count(shape: Sequence[int | None] | None, axes: Sequence[int]) -> int | None:
    if shape is None:
        return None
    dims = [shape[a % len(shape)] for a in axes]
    return None if any(v is None for v in dims) else math.prod(dims)


@rule("GlobalAveragePool")
def global_average_pool(ctx: RuleContext) -> LocalBound:
    """Mean over H*W entries: 1/sqrt(H*W) (1 when the size is unknown)."""
    shape = ctx.shape(0)
    count = _spatial_count(shape, range(2, len(shape))) if shape is not None else None
    if count is None:
        return LocalBound(1.0, "mean (size unknown): <= 1")
    return LocalBound(1.0 / math.sqrt(count), f"mean of {count}: 1/sqrt({count})", exact=True)


@rule("GlobalMaxPool", "ReduceMax", "ReduceMin", "ReduceL2")
def max_reduce(ctx: RuleContext) -> LocalBound:
    """Max (or l2 norm) over disjoint groups: 1."""
    return LocalBound(1.0, "max over disjoint groups")


@rule("GlobalLpPool")
def global_lp_pool(ctx: RuleContext) -> LocalBound:
    """l_p norm over H*W entries: 1 for p >= 2, (H*W)^(1/p - 1/2) for 1 <= p < 2."""
    p = float(ctx.attrs.get("p", 2))
    if p < 1:
        return unbounded("GlobalLpPool with p < 1 is not Lipschitz")
    if p >= 2:
        return LocalBound(1.0, "l_p norm over disjoint groups (p >= 2)", exact=True)
    shape = ctx.shape(0)
    count = _spatial_count(shape, range(2, len(shape))) if shape is not None else None
    if count is None:
        return unbounded("l_p norm (p < 2) over an unknown number of entries; give --input-shape", "unknown shape")
    return LocalBound(_lp_to_l2(p, count), f"l_p norm of {count} entries: {count}^(1/p - 1/2)", exact=True)


def _reduced_axes(ctx: RuleContext) -> list[int] | None:
    shape = ctx.shape(0)
    axes = ctx.attrs.get("axes")
    if not axes:
        if int(ctx.attrs.get("noop_with_empty_axes", 0)):
            return []
        return list(range(len(shape))) if shape is not None else None
    return [int(a) for a in axes]


@rule("ReduceMean", "ReduceSum")
def mean_reduce(ctx: RuleContext) -> LocalBound:
    """Mean of n entries: 1/sqrt(n) (<= 1 when n is unknown); sum of n entries: sqrt(n)."""
    axes = _reduced_axes(ctx)
    count = _spatial_count(ctx.shape(0), axes) if axes is not None else None
    if ctx.node.op == "ReduceMean":
        if count is None:
            return LocalBound(1.0, "mean (size unknown): <= 1")
        return LocalBound(1.0 / math.sqrt(max(count, 1)), f"mean of {count}: 1/sqrt({count})", exact=True)
    if count is None:
        return unbounded("sum over an axis of unknown size; give --input-shape", "unknown shape")
    return LocalBound(math.sqrt(count), f"sum of {count}: sqrt({count})", exact=True)


@rule("Pad")
def pad(ctx: RuleContext) -> LocalBound:
    """Zero padding: 1. Edge/reflect/wrap padding copies entries: sqrt(most copies of one entry)."""
    mode = str(ctx.attrs.get("mode", "constant"))
    if mode == "constant":
        return LocalBound(1.0, "zero padding (isometric embedding)", exact=True)
    pads = ctx.attrs.get("pads")
    if pads is None:
        return unbounded("padding amounts unknown before running", "unknown pads")
    rank = len(pads) // 2
    shape = ctx.shape(0)
    copies = 1
    for axis in range(rank):
        before, after = int(pads[axis]), int(pads[axis + rank])
        n = shape[axis] if shape is not None and len(shape) == rank else None
        if n is None:
            copies *= 1 + max(before, 0) + max(after, 0)
            continue
        index = _padded_indices(int(n), before, after, mode)
        copies *= int(np.bincount(index).max()) if index.size else 1
    return LocalBound(math.sqrt(copies), f"{mode} padding: sqrt({copies}) copies", exact=True)


def _padded_indices(n: int, before: int, after: int, mode: str) -> np.ndarray:
    """Which input index each output position of a 1-D padding copies."""
    positions = np.arange(-before, n + after)
    if mode == "edge":
        return np.clip(positions, 0, n - 1)
    if mode == "wrap":
        return positions % n
    if n == 1:
        return np.zeros_like(positions)
    period = 2 * (n - 1)  # reflect without repeating the edge
    folded = positions % period
    return np.where(folded < n, folded, period - folded)


@rule("Resize")
def resize(ctx: RuleContext) -> LocalBound:
    """Nearest-neighbour resize: each input copied at most ceil(scale) times per axis: sqrt(prod)."""
    mode = str(ctx.attrs.get("mode", "nearest"))
    if mode != "nearest":
        raise UnsupportedVariant(f"Resize(mode={mode})")
    scales = ctx.attrs.get("scales")
    in_shape, out_shape = ctx.shape(0), ctx.output_shape()
    if not scales:
        return unbounded("resize scale unknown before running; give --input-shape", "unknown scale")
    effective = list(scales)
    transform = str(ctx.attrs.get("coordinate_transformation_mode", ""))
    exact = True
    if transform in ("align_corners", "tf_crop_and_resize"):
        # input coordinate = start + o * step: an input is read by at most ceil(1 / step) outputs
        if in_shape is None or out_shape is None or None in in_shape or None in out_shape:
            return unbounded(f"{transform} resize of unknown size; give --input-shape", "unknown shape")
        spans = [1.0] * len(in_shape)
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
            if o <= 1:
                effective.append(1.0)
            elif span * (i - 1) == 0:  # every output reads the same input (e.g. a size-1 axis)
                effective.append(float(o))
            else:
                effective.append(min(float(o), (o - 1) / (span * (i - 1))))
    copies = math.prod(max(1, math.ceil(float(x) - 1e-12)) for x in effective)
    return LocalBound(math.sqrt(copies), f"nearest resize: sqrt({copies}) copies", exact=exact)
