"""Ops that select, copy or interpolate entries.

An op that maps each input entry to at most r output entries (with coefficients of modulus <= 1)
has Lipschitz constant <= sqrt(r): selections are <= 1, copies sqrt(r), concatenated branches
sqrt(sum L_i^2).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lipcheck.graph import Graph, Node
from lipcheck.ops.base import (
    AffineContext,
    EvalContext,
    LocalBound,
    NotFoldable,
    Op,
    OrderStatistics,
    RuleContext,
    UnsupportedVariant,
    axis_index,
    node_attrs,
    register,
    unbounded,
    variable_inputs,
)
from lipcheck.ops.pooling import spatial_count
from lipcheck.ops.shape import ints
from lipcheck.ops.spatial import pad_spatial, padded_indices


class Selection(Op):
    """Selects entries, each at most once: <= 1."""

    monotone = True

    piecewise_linear = True
    moves_entries = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return LocalBound(1.0, "selection")


def _slice_indices(start: int, end: int, step: int, n: int) -> range:
    """ONNX Slice clamping rules for one axis."""
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), n), min(max(end, 0), n)
    else:
        start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
    return range(start, end, step)


def _rank(graph: Graph, value: str) -> int | None:
    shape = graph.shape(value)
    return None if shape is None else len(shape)


def _one_axis(axis: int, rank: int | None) -> int | None:
    """An axis counted from 0 (None for a negative axis of an input whose rank is unknown)."""
    if axis >= 0:
        return axis
    return None if rank is None else axis + rank


def _constants(graph: Graph, values: list[str]) -> list[np.ndarray | None] | None:
    """The given inputs' constant values (None for an omitted one); None when one of them is not a constant."""
    if any(v and v not in graph.constants for v in values):
        return None
    return [np.asarray(graph.constants[v]) if v else None for v in values]


@register
class Slice(Selection):
    """Selects a strided range on some axes: <= 1."""

    def selection_axis(self, node: Node, graph: Graph) -> int | None:
        starts: Any
        axes: Any
        if len(node.inputs) > 1:  # opset >= 10: starts, ends, axes, steps as inputs
            values = _constants(graph, node.inputs[1:5])
            if values is None or values[0] is None:
                return None
            starts, axes = values[0], values[2] if len(values) > 2 else None
        else:
            starts, axes = node_attrs(node).get("starts"), node_attrs(node).get("axes")
            if starts is None:
                return None
        listed = [int(a) for a in np.asarray(axes).reshape(-1)] if axes is not None else list(range(np.size(starts)))
        return _one_axis(listed[0], _rank(graph, node.inputs[0])) if len(listed) == 1 else None

    def evaluate(
        self,
        ctx: EvalContext,
        x: torch.Tensor,
        starts: Any = None,
        ends: Any = None,
        axes: Any = None,
        steps: Any = None,
    ) -> torch.Tensor:
        if starts is None:  # opset < 10: attributes
            start_list, end_list = list(ctx.attrs["starts"]), list(ctx.attrs["ends"])
            axis_list = list(ctx.attrs.get("axes") or range(len(start_list)))
            step_list = [1] * len(start_list)
        else:
            start_list, end_list = ints(starts), ints(ends)
            axis_list = ints(axes) if axes is not None else list(range(len(start_list)))
            step_list = ints(steps) if steps is not None else [1] * len(start_list)
        for start, end, axis, step in zip(start_list, end_list, axis_list, step_list, strict=True):
            axis = axis_index(int(axis), x.dim())
            picked = _slice_indices(int(start), int(end), int(step), x.shape[axis])
            if step == 1:
                x = x.narrow(axis, picked.start, max(len(picked), 0))
            else:
                x = x.index_select(axis, ctx.int_tensor(list(picked)))
        return x


@register
class Split(Selection):
    """Splits into parts along an axis: each entry goes to one output, <= 1."""

    attributes = {"axis": 0}

    def selection_axis(self, node: Node, graph: Graph) -> int | None:
        if _constants(graph, node.inputs[1:2]) is None:  # split sizes known only at run time
            return None
        return _one_axis(int(node_attrs(node)["axis"]), _rank(graph, node.inputs[0]))

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, split: Any = None) -> tuple[torch.Tensor, ...]:
        axis = axis_index(int(ctx.attrs["axis"]), x.dim())
        sizes = ints(split) if split is not None else ctx.attrs.get("split")
        count = len(ctx.node.outputs)
        if not sizes:
            n = x.shape[axis]
            chunk = math.ceil(n / count)
            sizes = [min(chunk, n - i * chunk) for i in range(count)]
        return tuple(torch.split(x, [int(s) for s in sizes], dim=axis))


@register
class ReverseSequence(Selection):
    """Reverses the first sequence_lens[b] steps of each batch entry b: a permutation, 1 (lengths are integers)."""

    attributes = {"batch_axis": 1, "time_axis": 0}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return LocalBound(1.0, "a permutation of entries", exact=True)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch_axis, time_axis = int(ctx.attrs["batch_axis"]), int(ctx.attrs["time_axis"])
        steps = torch.arange(x.shape[time_axis], device=x.device)
        parts = []
        for b, length in enumerate(ints(lengths)):
            row = x.select(batch_axis, b)  # the time axis keeps its place among the others
            time = time_axis if time_axis < batch_axis else time_axis - 1
            order = torch.where(steps < length, length - 1 - steps, steps)
            parts.append(row.index_select(time, order))
        return torch.stack(parts, batch_axis)


@register
class Compress(Selection):
    """Keeps the entries a condition selects: <= 1."""

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        axis = ctx.attrs.get("axis")
        if axis is None:
            x, axis = x.reshape(-1), 0
        axis = axis_index(int(axis), x.dim())
        chosen = torch.nonzero(condition.reshape(-1).to(torch.bool)).reshape(-1)
        return x.index_select(axis, chosen)


def _identity_channels(node: Node, graph: Graph) -> np.ndarray | None:
    """Ones per channel when the node's one variable input has the output's shape (the node is the identity)."""
    shape_in, shape_out = graph.shape(node.inputs[0]), graph.shape(node.outputs[0])
    if variable_inputs(node, graph) != [0] or shape_in is None or shape_in != shape_out or len(shape_out) < 2:
        return None
    return np.ones(int(shape_out[1])) if isinstance(shape_out[1], int) else None


@register
class Concat(Op):
    """Concatenated branches: sqrt(sum of L_i^2)."""

    monotone = True

    attributes = {"axis": 0}
    piecewise_linear = True
    moves_entries = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        total = math.sqrt(sum(lip * lip for lip in ctx.input_lipschitz))
        return LocalBound(1.0, "concat: sqrt(sum L_i^2)", output_lipschitz=total)

    def joined_axis(self, node: Node, graph: Graph) -> int | None:
        return _one_axis(int(node_attrs(node)["axis"]), _rank(graph, node.outputs[0]))

    def channel_scale(self, node: Node, graph: Graph) -> np.ndarray | None:
        """A concatenation of one tensor (TorchScript writes a zero-width wrap padding so) is the identity."""
        return _identity_channels(node, graph) if len([v for v in node.inputs if v]) == 1 else None

    def evaluate(self, ctx: EvalContext, *xs: Any) -> torch.Tensor:
        present = [x for x in xs if x is not None]
        if any(x.is_floating_point() for x in present):
            present = [x.to(ctx.dtype) for x in present]
        return torch.cat(present, dim=axis_index(int(ctx.attrs["axis"]), present[0].dim()))


@register
class Gather(Op):
    """Constant indices: sqrt(most copies of one entry)."""

    monotone = True

    attributes = {"axis": 0}
    piecewise_linear = True
    moves_entries = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if ctx.is_variable(1):
            return unbounded("gather with indices computed from the input (discontinuous)")
        indices = ctx.const(1)
        if indices is None:  # given at run time: each entry copied at most as often as there are indices
            count = spatial_count(ctx.shape(1), range(len(ctx.shape(1) or ())))
            if count is None or not ctx.has_input(1):
                return unbounded("gather indices unknown before running", "unknown indices")
            return LocalBound(math.sqrt(count), f"selection by {count} indices known at run time: <= sqrt({count})")
        flat = np.asarray(indices).reshape(-1).astype(np.int64)
        shape = ctx.shape(0)
        axis = int(ctx.attrs["axis"])
        if shape is not None and shape[axis % len(shape)] is not None:
            flat = flat % int(shape[axis % len(shape)])  # type: ignore[arg-type]
        elif (flat < 0).any() and (flat >= 0).any():
            return unbounded("negative gather indices on an axis of unknown size", "unknown shape")
        copies = int(np.bincount(flat - flat.min()).max()) if flat.size else 0
        return LocalBound(
            math.sqrt(copies), f"selection, {copies} cop{'y' if copies == 1 else 'ies'} max", exact=copies <= 1
        )

    def selection_axis(self, node: Node, graph: Graph) -> int | None:
        indices = _constants(graph, node.inputs[1:2])
        if not indices or indices[0] is None or indices[0].ndim != 1:  # a scalar index drops the axis
            return None
        return _one_axis(int(node_attrs(node)["axis"]), _rank(graph, node.inputs[0]))

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        axis = axis_index(int(ctx.attrs["axis"]), x.dim())
        index = indices.to(torch.int64)
        index = torch.where(index < 0, index + x.shape[axis], index)
        picked = x.index_select(axis, index.reshape(-1))
        return picked.reshape((*x.shape[:axis], *index.shape, *x.shape[axis + 1 :]))  # () for a scalar


class Copies(Op):
    """Copies entries r times: sqrt(r)."""

    monotone = True

    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        in_shape, out_shape = ctx.shape(0), ctx.output_shape()
        if self.repeats(ctx) is not None:
            copies = self.repeats(ctx)
        elif in_shape is not None and out_shape is not None and None not in in_shape and None not in out_shape:
            copies = math.prod(out_shape) // max(1, math.prod(in_shape))  # type: ignore[arg-type]
        else:
            return unbounded("copy count unknown; give --input-shape", "unknown shape")
        return LocalBound(math.sqrt(copies), f"sqrt({copies}) copies", exact=True)  # type: ignore[arg-type]

    def repeats(self, ctx: RuleContext) -> int | None:
        """The copy count read from the node itself, when it says."""
        return None


@register
class Expand(Copies):
    """Broadcasts to a larger shape: sqrt(copies)."""

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(shape))))


@register
class Tile(Copies):
    """Repeats the input along each axis: sqrt(product of the repeats)."""

    def repeats(self, ctx: RuleContext) -> int | None:
        repeats = ctx.const(1)
        return None if repeats is None else math.prod(int(r) for r in np.asarray(repeats).reshape(-1))

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, repeats: torch.Tensor) -> torch.Tensor:
        return x.repeat(*ints(repeats))


@register
class Pad(Op):
    """Zero padding: 1. Edge/reflect/wrap padding copies entries: sqrt(most copies of one entry)."""

    monotone = True

    attributes = {"mode": "constant"}
    piecewise_linear = True
    moves_entries = True  # a constant fill is not an input entry: recognise_wrap_padding tells it apart

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        mode = str(ctx.attrs["mode"])
        if mode == "constant" and ctx.is_variable(2):
            return self._variable_fill(ctx)
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
            index = padded_indices(int(n), before, after, mode)
            copies *= int(np.bincount(index).max()) if index.size else 1
        return LocalBound(math.sqrt(copies), f"{mode} padding: sqrt({copies}) copies", exact=True)

    def channel_scale(self, node: Node, graph: Graph) -> np.ndarray | None:
        """Padding by nothing is the identity."""
        pads = node_attrs(node).get("pads")
        if pads is None and len(node.inputs) > 1 and node.inputs[1]:
            pads = graph.constants.get(node.inputs[1])
        if pads is None or np.any(np.asarray(pads) != 0):
            return None
        return _identity_channels(node, graph)

    def _variable_fill(self, ctx: RuleContext) -> LocalBound:
        """The fill value computed from the input: it lands in every padded entry, sqrt(P) times its L."""
        in_shape, out_shape = ctx.shape(0), ctx.output_shape()
        if in_shape is None or out_shape is None or None in in_shape or None in out_shape:
            return unbounded("padding value computed from the input, over an unknown size", "unknown shape")
        padded = max(math.prod(out_shape) - math.prod(in_shape), 0)  # type: ignore[arg-type]
        total = math.sqrt(ctx.input_lipschitz[0] ** 2 + padded * ctx.input_lipschitz[2] ** 2)
        return LocalBound(1.0, f"padding by a computed value: sqrt(L_x^2 + {padded} L_v^2)", output_lipschitz=total)

    def evaluate(
        self, ctx: EvalContext, x: torch.Tensor, pads: Any = None, value: Any = None, axes: Any = None
    ) -> torch.Tensor:
        amounts = ctx.attrs.get("pads")
        if amounts is None:
            amounts = ints(pads)
            if axes is not None:
                listed = [axis_index(a, x.dim()) for a in ints(axes)]
                full = [0] * (2 * x.dim())
                for j, axis in enumerate(listed):
                    full[axis], full[axis + x.dim()] = amounts[j], amounts[j + len(listed)]
                amounts = full
        amounts = [int(a) for a in amounts]
        mode = str(ctx.attrs["mode"])
        rank = x.dim()
        if mode == "constant":
            given = value is not None and value.numel()
            fill = float(value.reshape(-1)[0]) if given else float(ctx.attrs.get("value") or 0.0)
            return pad_spatial(x, amounts, value=fill) if len(amounts) == 2 * rank else x
        for axis in range(rank):
            before, after = amounts[axis], amounts[axis + rank]
            if before or after:
                index = padded_indices(x.shape[axis], before, after, mode).tolist()
                x = x.index_select(axis, ctx.int_tensor(index))
        return x

    def wrap_pads(self, graph: Graph, node: Node) -> list[int] | None:
        attrs = node_attrs(node)
        pads = attrs.get("pads")
        return [int(p) for p in pads] if attrs["mode"] == "wrap" and pads is not None else None

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        pads = ctx.attrs.get("pads")
        rank = len(ctx.in_shape)
        if ctx.attrs["mode"] != "constant" or pads is None or len(pads) != 2 * rank:
            raise NotFoldable("Pad that is not a constant pad of known size")
        if pads[0] or pads[rank] or any(int(p) < 0 for p in pads):
            raise NotFoldable("Pad of the batch axis or cropping")
        value = ctx.const(2)
        fill = float(value.reshape(-1)[0]) if value is not None and value.size else 0.0
        widths = [int(p) for i in reversed(range(1, rank)) for p in (pads[i], pads[i + rank])]
        return F.pad(x, widths, value=fill if ctx.shifts else 0.0)


def _kept_by_triangle(rows: int, columns: int, k: int, upper: bool) -> bool:
    """Whether a rows x columns triangle keeps an entry: upper keeps j - i >= k, lower j - i <= k."""
    if rows <= 0 or columns <= 0:
        return False
    return k <= columns - 1 if upper else k >= -(rows - 1)


@register
class Trilu(Op):
    """Keeps a triangle of the last two axes, zeroes the rest: a 0/1 mask, 1 (0 when nothing is kept)."""

    monotone = True

    attributes = {"upper": 1}
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        shape, k = ctx.shape(0), ctx.const(1)
        if k is None and ctx.has_input(1):  # the diagonal known at run time: still a mask
            return LocalBound(1.0, "0/1 mask (diagonal known at run time)")
        offset = int(np.asarray(k).reshape(-1)[0]) if k is not None else 0
        if shape is None or len(shape) < 2 or None in shape[-2:]:
            return LocalBound(1.0, "0/1 mask")
        if 0 in shape or not _kept_by_triangle(shape[-2], shape[-1], offset, bool(int(ctx.attrs["upper"]))):  # type: ignore[arg-type]
            return LocalBound(0.0, "0/1 mask keeping nothing", exact=True)
        return LocalBound(1.0, "0/1 mask", exact=True)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, k: Any = None) -> torch.Tensor:
        offset = ints(k)[0] if k is not None else 0
        return torch.triu(x, offset) if int(ctx.attrs["upper"]) else torch.tril(x, offset)


def _center_window(size: int, target: int) -> tuple[int, int, int]:
    """(input start, output start, length) of the part of an axis a centred crop or pad keeps."""
    if target <= size:  # crop: the window starts at floor((size - target) / 2)
        return (size - target) // 2, 0, target
    return 0, (target - size) // 2, size  # pad: the extra pixel of an odd total goes to the end


@register
class CenterCropPad(Op):
    """Crops or zero-pads the listed axes around their centres: each entry kept at most once, 1."""

    monotone = True

    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        in_shape, out_shape = ctx.shape(0), ctx.output_shape()
        sizes = [*(in_shape or [None]), *(out_shape or [None])]
        if None in sizes:
            return LocalBound(1.0, "crop or zero padding: a selection")
        if 0 in sizes:
            return LocalBound(0.0, "empty input or output", exact=True)
        return LocalBound(1.0, "crop or zero padding: a selection", exact=True)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, shape: Any) -> torch.Tensor:
        targets = ints(shape)
        axes = [axis_index(int(a), x.dim()) for a in ctx.attrs.get("axes") or range(x.dim())]
        for axis, target in zip(axes, targets, strict=True):
            start, at, length = _center_window(x.shape[axis], target)
            kept = x.narrow(axis, start, length)
            before = list(kept.shape)
            before[axis] = at
            after = list(kept.shape)
            after[axis] = target - at - length
            x = torch.cat([kept.new_zeros(before), kept, kept.new_zeros(after)], axis)
        return x


SORTED_TOP_K = "sorting is 1-Lipschitz in l2 (rearrangement inequality); the top k are some of its entries"


@register
class TopK(Op):
    """The k largest (or smallest) values along an axis, sorted: 1. Its indices output is a step function."""

    monotone = True

    attributes = {"axis": -1, "largest": 1, "sorted": 1}
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if not int(ctx.attrs["sorted"]):
            raise UnsupportedVariant("TopK(sorted=0)")  # the order is unspecified (onnxruntime's: a heap's)
        if ctx.output_used(1):
            return unbounded("TopK's indices output is read: the positions of the top values jump with the input")
        shape = ctx.output_shape()
        if shape is not None and 0 in shape:
            return LocalBound(0.0, "k = 0: no values", exact=True)
        return LocalBound(1.0, SORTED_TOP_K, exact=shape is not None and None not in shape)

    def check(self, node: Any) -> None:
        if not int(node.attrs.get("sorted", 1)):
            raise UnsupportedVariant("TopK(sorted=0)")

    def order_statistics(self, node: Node, graph: Graph) -> OrderStatistics | None:
        attrs, shape = node_attrs(node), graph.shape(node.inputs[0])
        k = _constants(graph, node.inputs[1:2])
        if shape is None or k is None or not int(attrs["sorted"]):
            return None
        count = int(k[0].reshape(-1)[0]) if k and k[0] is not None else attrs.get("k")
        axis = axis_index(int(attrs["axis"]), len(shape))
        size = shape[axis]
        if size is None or count is None or not 0 < int(count) <= size:
            return None
        first = size - int(count) if int(attrs["largest"]) else 0
        return OrderStatistics((axis,), size, frozenset(range(first, first + int(count))))

    def evaluate(self, ctx: EvalContext, x: torch.Tensor, k: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        count = ints(k)[0] if k is not None else int(ctx.attrs["k"])
        axis = axis_index(int(ctx.attrs["axis"]), x.dim())
        # a stable sort: of equal values the one at the lower index comes first, as ONNX asks
        values, indices = torch.sort(x, dim=axis, descending=bool(int(ctx.attrs["largest"])), stable=True)
        return values.narrow(axis, 0, count), indices.narrow(axis, 0, count)


@register
class Nonexpansive(Op):
    """A 1-Lipschitz map an exporter wrote out in several ops (pairs sorted, order statistics, CReLU): 1.

    Written by ``lipcheck.passes.recognise_sorting`` in place of the ops, when their structure proves the
    map 1-Lipschitz: each group's sorted entries, each kept at most once (sorting is 1-Lipschitz in l2: the
    rearrangement inequality), or (max(x, 0), max(-x, 0)) per entry. Equality holds wherever the order does
    not change. ``attrs``: ``function`` (the ops, as a Graph of the one input), ``idiom`` (the name the
    report shows), ``why`` (the structure found).
    """

    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        shape = ctx.output_shape()
        exact = shape is not None and None not in shape and 0 not in shape
        return LocalBound(1.0, f"{ctx.attrs['idiom']}: {ctx.attrs['why']}", exact=exact)

    def evaluate(self, ctx: EvalContext, x: torch.Tensor) -> torch.Tensor:
        function = ctx.attrs["function"]
        return ctx.run_subgraph(function, {function.inputs[0]: x}, ctx.dtype, ctx.device)[function.outputs[0]]

    def subgraphs(self, node: Node) -> list[Graph]:
        return [node.attrs["function"]]

    def display_name(self, node: Node) -> str:
        return str(node.attrs.get("idiom", node.op))
