"""Ops that read or write entries at positions an index tensor, or a patch geometry, gives.

A gather copies input entries to output entries: its Jacobian S has one 1 per row, so S^T S is the
diagonal of how often each input entry is read and ||S|| = sqrt(the largest multiplicity), exactly. A
scatter writes update entries into a copy of the data; each output entry is a data entry, an update
entry, or (with a reduction) a combination of one data entry and the updates sent to it. Distinct
output entries draw on disjoint sets of input entries, so the norm is the worst output entry's.

Indices are integers: not directions anyone perturbs. Indices computed from the float input move
entries around (a step function of the input): not globally Lipschitz. Indices known only at run time
(an integer graph input) get the worst placement their shape allows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lipcheck.graph import Shape
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
from lipcheck.ops.shape import ints
from lipcheck.ops.spatial import window_overlap

MOVED = "{op} at positions computed from the input (a step function of the input: discontinuous)"
REDUCTIONS = ("none", "add", "mul", "max", "min")
_TORCH_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


def _known(shape: Shape | None) -> bool:
    return shape is not None and all(d is not None for d in shape)


def empty_output(ctx: RuleContext) -> LocalBound | None:
    """0, exactly, for an output known to have no entries (None otherwise)."""
    shape = ctx.output_shape()
    if shape is not None and any(d == 0 for d in shape):
        return LocalBound(0.0, "empty output", exact=True)
    return None


def _size(shape: Shape | None, axis: int) -> int | None:
    return None if shape is None or axis >= len(shape) else shape[axis]


# ---------------------------------------------------------------------------------------------
# Constant indices: which input (or output) entry each index entry names, as rows of integers


def normalised(values: np.ndarray, size: int | None, label: str) -> np.ndarray | None:
    """Index values with negatives counted from the end of an axis of ``size`` entries.

    None when a negative index meets an axis of unknown size; an index out of range is refused (onnxruntime
    refuses it too).
    """
    value = np.asarray(values, dtype=np.int64)
    if size is None:
        return None if (value < 0).any() else value
    value = np.where(value < 0, value + size, value)
    if ((value < 0) | (value >= size)).any():
        raise UnsupportedVariant(f"{label}(index out of range)")
    return value


@dataclass
class Keys:
    """The distinct entries a constant index tensor names (rows of ``unique``), how often each is named
    (``counts``), and which one each index entry names (``inverse``)."""

    unique: np.ndarray
    counts: np.ndarray
    inverse: np.ndarray

    @classmethod
    def of(cls, columns: Sequence[np.ndarray], label: str) -> Keys:
        if not columns:
            raise UnsupportedVariant(f"{label}(indices of rank 0 or empty index tuples)")
        stacked = np.stack([np.asarray(c, dtype=np.int64).reshape(-1) for c in columns], axis=1)
        if stacked.shape[0] == 0:
            empty = np.zeros(0, dtype=np.int64)
            return cls(stacked, empty, empty)
        unique, inverse, counts = np.unique(stacked, axis=0, return_inverse=True, return_counts=True)
        return cls(unique, counts, inverse.reshape(-1))

    @property
    def most(self) -> int:
        return int(self.counts.max()) if self.counts.size else 0


def element_keys(indices: np.ndarray, axis: int, data: Shape | None, label: str) -> Keys | None:
    """GatherElements / ScatterElements: each index entry names the entry at its own position with the axis
    coordinate replaced by its value. None when a negative index meets an axis of unknown size."""
    if data is not None and len(data) == indices.ndim:
        for d, (n, m) in enumerate(zip(indices.shape, data, strict=True)):
            if d != axis and m is not None and n > m:
                raise UnsupportedVariant(f"{label}(index out of range)")
    value = normalised(indices, _size(data, axis), label)
    if value is None:
        return None
    if indices.ndim == 0:
        raise UnsupportedVariant(f"{label}(indices of rank 0)")
    columns = [np.asarray(c) for c in np.indices(indices.shape, dtype=np.int64)]
    columns[axis] = value
    return Keys.of(columns, label)


def tuple_keys(indices: np.ndarray, data: Shape | None, batch_dims: int, label: str) -> Keys | None:
    """GatherND / ScatterND: each index tuple (the last axis) names a slice of the data, within its batch.
    None when a negative index meets an axis of unknown size."""
    columns = [np.asarray(c) for c in np.indices(indices.shape[:-1], dtype=np.int64)][:batch_dims]
    for j in range(indices.shape[-1]):
        value = normalised(indices[..., j], _size(data, batch_dims + j), label)
        if value is None:
            return None
        columns.append(value)
    return Keys.of(columns, label)


def selection_bound(keys: Keys | None, runtime_count: int | None, what: str) -> LocalBound:
    """sqrt(most reads of one input entry): exact from constant indices, else the most their shape allows."""
    if keys is not None:
        copies = keys.most
        plural = "y" if copies == 1 else "ies"
        return LocalBound(math.sqrt(copies), f"{what}: {copies} cop{plural} of one entry at most", exact=True)
    if runtime_count is None:
        return unbounded(f"{what} by indices of unknown shape, known only at run time", "unknown indices")
    return LocalBound(
        math.sqrt(runtime_count), f"{what} by {runtime_count} indices known at run time: <= sqrt({runtime_count})"
    )


# ---------------------------------------------------------------------------------------------
# Flat positions, for the interpreter


def _strides(shape: Sequence[int]) -> list[int]:
    return [math.prod(shape[d + 1 :]) for d in range(len(shape))]


def _along(n: int, d: int, rank: int, device: torch.device) -> torch.Tensor:
    """0..n-1 laid along axis d of a rank-``rank`` tensor (for broadcasting)."""
    return torch.arange(n, device=device).reshape([-1 if i == d else 1 for i in range(rank)])


def _positive(index: torch.Tensor, size: int) -> torch.Tensor:
    index = index.to(torch.int64)
    return torch.where(index < 0, index + size, index)


def element_flat(indices: torch.Tensor, shape: Sequence[int], axis: int) -> torch.Tensor:
    """GatherElements / ScatterElements: the flat position in a tensor of ``shape`` each index entry names."""
    strides = _strides(shape)
    flat = torch.zeros(indices.shape, dtype=torch.int64, device=indices.device)
    for d, n in enumerate(indices.shape):
        coordinate = _positive(indices, shape[axis]) if d == axis else _along(n, d, indices.dim(), indices.device)
        flat = flat + coordinate * strides[d]
    return flat


def tuple_flat(indices: torch.Tensor, shape: Sequence[int], batch_dims: int) -> torch.Tensor:
    """GatherND / ScatterND: flat positions, shaped ``indices.shape[:-1] + (slice size,)``."""
    strides, rank = _strides(shape), indices.dim() - 1
    flat = torch.zeros(indices.shape[:-1], dtype=torch.int64, device=indices.device)
    for d in range(batch_dims):
        flat = flat + _along(indices.shape[d], d, rank, indices.device) * strides[d]
    k = indices.shape[-1]
    for j in range(k):
        flat = flat + _positive(indices[..., j], shape[batch_dims + j]) * strides[batch_dims + j]
    width = math.prod(shape[batch_dims + k :])
    return flat.unsqueeze(-1) + torch.arange(width, device=indices.device)


def scatter_flat(data: torch.Tensor, flat: torch.Tensor, updates: torch.Tensor, reduction: str) -> torch.Tensor:
    """Write ``updates`` into a copy of ``data`` at flat positions, as onnxruntime does (reduction 'none': the
    last write to a position wins)."""
    base, source, flat = data.reshape(-1), updates.reshape(-1).to(data.dtype), flat.reshape(-1)
    if reduction == "none":
        order = torch.arange(flat.numel(), device=flat.device)
        last = torch.full(base.shape, -1, dtype=torch.int64, device=flat.device)
        last = last.scatter_reduce(0, flat, order, "amax")
        keep = last[flat] == order
        result = base.scatter(0, flat[keep], source[keep])
    elif reduction == "add":
        result = base.index_add(0, flat, source)
    else:
        result = base.scatter_reduce(0, flat, source, _TORCH_REDUCE[reduction], include_self=True)
    return result.reshape(data.shape)


# ---------------------------------------------------------------------------------------------
# Gathers


@register
class GatherElements(Op):
    """Constant indices: sqrt(most reads of one entry), exact. Run-time indices: sqrt(indices along the axis)."""

    attributes = {"axis": 0}
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if ctx.is_variable(1):
            return unbounded(MOVED.format(op="gather"))
        empty = empty_output(ctx)
        if empty is not None:
            return empty
        indices, data = ctx.const(1), ctx.shape(0)
        shape = np.shape(indices) if indices is not None else ctx.shape(1)
        if shape is None:
            return selection_bound(None, None, "selection")
        axis = axis_index(int(ctx.attrs["axis"]), len(shape))
        keys = None
        if indices is not None:
            keys = element_keys(np.asarray(indices), axis, data, self.name)
        # output entries sharing all but the axis coordinate are the only ones that can read the same entry
        return selection_bound(keys, shape[axis], "selection")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        axis = axis_index(int(ctx.attrs["axis"]), x.dim())
        return torch.gather(x, axis, _positive(indices, x.shape[axis]))


@register
class GatherND(Op):
    """Constant indices: sqrt(most reads of one slice), exact. Run-time indices: sqrt(index tuples per batch)."""

    attributes = {"batch_dims": 0}
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if ctx.is_variable(1):
            return unbounded(MOVED.format(op="gather"))
        empty = empty_output(ctx)
        if empty is not None:
            return empty
        indices, b = ctx.const(1), int(ctx.attrs["batch_dims"])
        shape = np.shape(indices) if indices is not None else ctx.shape(1)
        if shape is None:
            return selection_bound(None, None, "selection")
        keys = None if indices is None else tuple_keys(np.asarray(indices), ctx.shape(0), b, self.name)
        # within one batch, each index tuple reads each entry of the data at most once
        per_batch = shape[b:-1]
        runtime = None if None in per_batch else math.prod(per_batch)
        return selection_bound(keys, runtime, "selection")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        b = int(ctx.attrs["batch_dims"])
        flat = tuple_flat(indices, x.shape, b)
        return x.reshape(-1)[flat].reshape(*indices.shape[:-1], *x.shape[b + indices.shape[-1] :])


# ---------------------------------------------------------------------------------------------
# Scatters


@dataclass
class Placement:
    """Where a scatter's updates land: ``keys`` (one key per update unit, a unit writing ``width`` output
    entries) from constant indices, else None; ``most``: the most units one output entry can receive."""

    keys: Keys | None
    most: int | None
    width: int | None
    data_size: int | None


def scatter_bound(ctx: RuleContext, label: str, placement: Placement) -> LocalBound:
    """The bound of a scatter w.r.t. data and updates together (see the scatter classes' docstrings)."""
    reduction = str(ctx.attrs["reduction"])
    keys = placement.keys
    if not ctx.is_variable(0) and keys is not None and keys.counts.size == 0:
        return LocalBound(0.0, "no updates: the output is the constant data", exact=True)
    if reduction in ("max", "min"):
        return LocalBound(1.0, f"{reduction} over disjoint groups of entries: <= 1", exact=True)
    if reduction == "mul":
        return _product_bound(ctx, label, placement)
    if reduction == "add":
        most = keys.most if keys is not None else placement.most
        if most is None:
            return unbounded(f"{label} by indices of unknown shape, known only at run time", "unknown indices")
        terms = int(ctx.is_variable(0)) + int(ctx.is_variable(2)) * most
        method = f"sums of {terms} entries at most (data and updates)"
        return LocalBound(math.sqrt(terms), method, exact=keys is not None)
    return _overwrite_bound(ctx, label, placement)


def _overwrite_bound(ctx: RuleContext, label: str, placement: Placement) -> LocalBound:
    """reduction 'none': each output entry is one data entry or one update entry, each used once: <= 1."""
    keys, updates_var = placement.keys, ctx.is_variable(2)
    method = "each output entry is one data or update entry"
    if keys is None:
        return LocalBound(1.0, method + " (ONNX forbids duplicate indices with reduction none)", exact=updates_var)
    if keys.most > 1:
        raise UnsupportedVariant(f"{label}(reduction=none, duplicate indices)")
    if updates_var:  # each update lands, once
        return LocalBound(1.0, method, exact=True)
    overwritten = None if placement.width is None else keys.counts.size * placement.width
    if overwritten is None or placement.data_size is None:
        return LocalBound(1.0, method)
    if overwritten >= placement.data_size:
        return LocalBound(0.0, "every data entry is overwritten by constants", exact=True)
    return LocalBound(1.0, method, exact=True)


def _product_bound(ctx: RuleContext, label: str, placement: Placement) -> LocalBound:
    """reduction 'mul': out_j = data_j * (the product of the updates sent to j)."""
    keys = placement.keys
    if keys is None:
        raise UnsupportedVariant(f"{label}(reduction=mul, indices known at run time)")
    data_var, updates_var = ctx.is_variable(0), ctx.is_variable(2)
    if keys.counts.size == 0:
        return LocalBound(1.0, "no updates: the data itself", exact=True)
    if data_var and updates_var:
        return unbounded("products of data and update entries, both computed from the input")
    if updates_var:  # data constant: each output entry is data_j times the updates sent to j
        data = np.asarray(ctx.const(0), dtype=np.float64)
        coefficient = data[tuple(keys.unique.T)].reshape(keys.counts.size, -1)
        if (np.abs(coefficient[keys.counts > 1]) > 0).any():
            return unbounded("products of two update entries computed from the input")
        single = np.abs(coefficient[keys.counts == 1])
        return LocalBound(float(single.max(initial=0.0)), "max |data| at entries updated once", exact=True)
    updates = np.asarray(ctx.const(2), dtype=np.float64).reshape(keys.inverse.size, -1)
    product = np.ones((keys.counts.size, updates.shape[1]))
    np.multiply.at(product, keys.inverse, updates)
    value = float(np.abs(product).max(initial=0.0))
    method = "max |product of the updates| per entry"
    if placement.width is None or placement.data_size is None:  # entries no update reaches may be left: 1
        return LocalBound(max(value, 1.0), method + ", or 1")
    if keys.counts.size * placement.width < placement.data_size:
        return LocalBound(max(value, 1.0), method + ", or 1 where no update lands", exact=True)
    return LocalBound(value, method, exact=True)


class Scatter(Op):
    """Writes updates into a copy of the data at positions an index tensor gives."""

    attributes = {"reduction": "none"}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if ctx.is_variable(1):
            return unbounded(MOVED.format(op="scatter"))
        if str(ctx.attrs["reduction"]) not in REDUCTIONS:
            raise UnsupportedVariant(f"{self.name}(reduction={ctx.attrs['reduction']})")
        empty = empty_output(ctx)
        if empty is not None:
            return empty
        return scatter_bound(ctx, self.name, self.placement(ctx))

    def placement(self, ctx: RuleContext) -> Placement:
        raise NotImplementedError

    def check(self, node: Any) -> None:
        reduction = node.attrs.get("reduction") or "none"
        if reduction not in REDUCTIONS:
            raise UnsupportedVariant(f"{self.name}(reduction={reduction})")

    @staticmethod
    def data_size(ctx: RuleContext) -> int | None:
        shape = ctx.shape(0)
        return math.prod(shape) if _known(shape) else None  # type: ignore[arg-type]


@register
class ScatterElements(Scatter):
    """Each output entry: a data entry, an update, or a reduction of one data entry and the updates sent to it.

    Distinct output entries draw on disjoint inputs. reduction none (no duplicates, as ONNX requires): a
    selection from (data, updates), <= 1. add: sqrt(1 + most updates to one entry) with variable data
    (sqrt(most) without), exact. max/min: each output entry is 1-Lipschitz in l_inf of its group, so <= 1.
    mul: with one of data and updates constant, the max |coefficient|; a product of two variables is not
    globally Lipschitz.
    """

    attributes = {"reduction": "none", "axis": 0}

    def placement(self, ctx: RuleContext) -> Placement:
        indices, data = ctx.const(1), ctx.shape(0)
        shape = np.shape(indices) if indices is not None else ctx.shape(1)
        if shape is None:
            return Placement(None, None, 1, self.data_size(ctx))
        axis = axis_index(int(ctx.attrs["axis"]), len(shape))
        keys = None if indices is None else element_keys(np.asarray(indices), axis, data, self.name)
        # updates sharing all but the axis coordinate are the only ones that can meet
        return Placement(keys, shape[axis], 1, self.data_size(ctx))

    def evaluate(
        self, ctx: EvalContext, data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor
    ) -> torch.Tensor:
        axis = axis_index(int(ctx.attrs["axis"]), data.dim())
        flat = element_flat(indices, data.shape, axis)
        return scatter_flat(data, flat, updates, str(ctx.attrs["reduction"]))


@register
class ScatterND(Scatter):
    """As ScatterElements, each index tuple writing a slice: the bound counts updates per output entry."""

    def placement(self, ctx: RuleContext) -> Placement:
        indices, data = ctx.const(1), ctx.shape(0)
        shape = np.shape(indices) if indices is not None else ctx.shape(1)
        if shape is None:
            return Placement(None, None, None, self.data_size(ctx))
        k = shape[-1]
        rest = data[k:] if data is not None and k is not None else None
        width = math.prod(rest) if _known(rest) else None  # type: ignore[arg-type]
        keys = None if indices is None else tuple_keys(np.asarray(indices), data, 0, self.name)
        units = shape[:-1]
        most = None if None in units else math.prod(units)
        return Placement(keys, most, width, self.data_size(ctx))

    def evaluate(
        self, ctx: EvalContext, data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor
    ) -> torch.Tensor:
        flat = tuple_flat(indices, data.shape, 0)
        return scatter_flat(data, flat, updates, str(ctx.attrs["reduction"]))


# ---------------------------------------------------------------------------------------------
# Unpooling and folding patches


@register
class MaxUnpool(Op):
    """Each entry written at its index, the last write to a position winning: <= 1. Indices from the input: none."""

    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if ctx.is_variable(1):
            return unbounded(MOVED.format(op="MaxUnpool writes entries") + ", e.g. a MaxPool's argmax indices")
        empty = empty_output(ctx)
        shape = ctx.shape(0)
        if empty is not None or (shape is not None and 0 in shape):
            return LocalBound(0.0, "no entries", exact=True)
        return LocalBound(1.0, "each entry written once at most: a selection", exact=True)

    def evaluate(
        self, ctx: EvalContext, x: torch.Tensor, indices: torch.Tensor, output_shape: Any = None
    ) -> torch.Tensor:
        kernel = [int(k) for k in ctx.attrs["kernel_shape"]]
        d = len(kernel)
        strides = [int(s) for s in ctx.attrs.get("strides") or [1] * d]
        pads = [int(p) for p in ctx.attrs.get("pads") or [0] * (2 * d)]
        spatial = [
            (n - 1) * s + k - pads[i] - pads[i + d]
            for i, (n, s, k) in enumerate(zip(x.shape[2:], strides, kernel, strict=True))
        ]
        shape = [*x.shape[:2], *spatial]
        if output_shape is not None:  # the indices are flat positions in a tensor of this shape
            shape = ints(output_shape)
            if any(given < least for given, least in zip(shape[2:], spatial, strict=True)):
                raise ValueError(f"MaxUnpool output_shape {shape} is smaller than the unpooled size {spatial}")
        out = x.new_zeros(math.prod(shape))
        return scatter_flat(out, indices, x, "none").reshape(shape)


PATCH_SLOTS = 1_000_000  # beyond this many (tap, patch) slots per axis, the size-independent count


def patch_cover(n: int, k: int, stride: int, dilation: int, before: int, after: int) -> tuple[int, bool]:
    """The most patches (of ``k`` taps) covering one of ``n`` positions, as Im2Col lays them out, and whether
    that count is exact (on a very long axis: the interior's count, an upper bound)."""
    windows = (n + before + after - (dilation * (k - 1) + 1)) // stride + 1
    if windows <= 0 or n <= 0:
        return 0, True
    if windows * k > PATCH_SLOTS:
        return window_overlap(k, stride, dilation), False
    position = np.arange(windows)[None, :] * stride - before + np.arange(k)[:, None] * dilation
    inside = position[(position >= 0) & (position < n)]
    return (int(np.bincount(inside, minlength=n).max()) if inside.size else 0), True


@register
class Col2Im(Op):
    """Adds patches back into an image, the adjoint of Im2Col: sqrt(most patches covering one pixel), exact.

    Im2Col A reads pixel p into every (tap, patch) slot covering it, each slot reading one pixel: A^T A =
    diag(cover(p)), so ||Col2Im|| = ||A^T|| = ||A|| = sqrt(max_p cover(p)); cover factorises over the axes.
    """

    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        image, block = ctx.const(1), ctx.const(2)
        empty = empty_output(ctx)
        if empty is not None:
            return empty
        if block is None or image is None:
            return self._runtime_bound(ctx, block)
        kernel = [int(k) for k in np.asarray(block).reshape(-1)]
        sizes = [int(n) for n in np.asarray(image).reshape(-1)]
        d = len(sizes)
        strides, dilations, pads = _fold_geometry(ctx.attrs, d)
        counts = [
            patch_cover(n, k, s, dl, pads[i], pads[i + d])
            for i, (n, k, s, dl) in enumerate(zip(sizes, kernel, strides, dilations, strict=True))
        ]
        cover = math.prod(count for count, _ in counts)
        exact = all(known for _, known in counts)
        return LocalBound(math.sqrt(cover), f"adjoint of Im2Col: {cover} patches over one pixel at most", exact=exact)

    @staticmethod
    def _runtime_bound(ctx: RuleContext, block: np.ndarray | None) -> LocalBound:
        """A pixel is in a patch once at most, at one tap of it: cover <= min(taps, patches), and taps is at
        most the input's second axis (C x taps, C >= 1)."""
        shape = ctx.shape(0)
        limits = [math.prod(int(k) for k in np.asarray(block).reshape(-1))] if block is not None else []
        limits += [d for d in (shape or (None,))[1:3] if d is not None]
        if not limits:
            return unbounded("Col2Im geometry and sizes known only at run time", "unknown shape")
        cover = min(limits)
        return LocalBound(math.sqrt(cover), f"geometry known at run time: {cover} patches over one pixel at most")

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, image_shape: Any, block_shape: Any) -> torch.Tensor:
        sizes, kernel = ints(image_shape), ints(block_shape)
        d = len(sizes)
        strides, dilations, pads = _fold_geometry(ctx.attrs, d)
        flat = torch.zeros((), dtype=torch.int64, device=x.device)
        inside = torch.ones((), dtype=torch.bool, device=x.device)
        for i in range(d):
            windows = (sizes[i] + pads[i] + pads[i + d] - (dilations[i] * (kernel[i] - 1) + 1)) // strides[i] + 1
            position = torch.arange(max(windows, 0), device=x.device) * strides[i] - pads[i]
            position = position + torch.arange(kernel[i], device=x.device)[:, None] * dilations[i]
            layout = [1] * (2 * d)
            layout[i], layout[d + i] = kernel[i], max(windows, 0)
            position = position.reshape(layout)
            inside = inside & (position >= 0) & (position < sizes[i])
            flat = flat * sizes[i] + position
        pixels = math.prod(sizes)
        flat = torch.where(inside, flat, pixels).reshape(-1)  # slots in the padding go to a discarded pixel
        n, channels = x.shape[0], x.shape[1] // math.prod(kernel)
        out = x.new_zeros(n, channels, pixels + 1).index_add(2, flat, x.reshape(n, channels, -1))
        return out[..., :pixels].reshape(n, channels, *sizes)


def _fold_geometry(attrs: Any, d: int) -> tuple[list[int], list[int], list[int]]:
    strides = [int(s) for s in attrs.get("strides") or [1] * d]
    dilations = [int(v) for v in attrs.get("dilations") or [1] * d]
    pads = [int(p) for p in attrs.get("pads") or [0] * (2 * d)]
    return strides, dilations, pads


@register
class OneHot(Op):
    """values[1] where the class index is, values[0] elsewhere. Integer indices nobody perturbs make it a
    constant; indices computed from the float input jump (the verdict); values from the input: refused."""

    attributes = {"axis": -1}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if ctx.is_variable(0) or ctx.is_variable(1):
            return unbounded("OneHot of indices or depth computed from the input: the hot position jumps")
        raise UnsupportedVariant("OneHot(values computed from the input)")

    def evaluate(
        self, ctx: EvalContext, indices: torch.Tensor, depth: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        count = int(ints(depth)[0]) if depth.dim() else int(depth.item())
        index = indices.to(torch.int64)
        index = torch.where(index < 0, index + count, index)
        valid = (index >= 0) & (index < count)
        hot = torch.nn.functional.one_hot(torch.where(valid, index, 0), count).to(torch.bool) & valid.unsqueeze(-1)
        axis = axis_index(int(ctx.attrs["axis"]), indices.dim() + 1)
        hot = hot.movedim(-1, axis)
        off, on = values.reshape(-1)[0], values.reshape(-1)[1]
        return torch.where(hot, on, off)
