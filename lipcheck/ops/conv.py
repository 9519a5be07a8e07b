"""Convolutions: the operator norm of the convolution, not of its reshaped kernel (``lipcheck.spectral``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lipcheck.graph import Graph, Node
from lipcheck.ops.activations import SILU_MAX_SLOPE
from lipcheck.ops.base import (
    AffineContext,
    EvalContext,
    LocalBound,
    NotFoldable,
    Op,
    RuleContext,
    ShiftInvariant,
    UnsupportedVariant,
    node_attrs,
    register,
    replace_parameters,
    unbounded,
    variable_inputs,
)
from lipcheck.ops.linear import folded_note, layer_parameters
from lipcheck.ops.spatial import CONV, CONV_TRANSPOSE, pad_spatial, spatial_pads, wrap_spatial
from lipcheck.spectral import ConvGeometry, conv_operator_norm, conv_transpose_operator_norm
from lipcheck.spectral.dense import batched_sigma_max_upper

CONV_ATTRIBUTES = {"group": 1, "auto_pad": "NOTSET"}


def conv_geometry(ctx: RuleContext, weight: torch.Tensor) -> ConvGeometry:
    """Strides, dilations, pads, groups and (when known) the input size of a Conv or ConvTranspose node."""
    d = weight.dim() - 2
    in_shape = ctx.shape(0)
    spatial = None
    pads = ctx.attrs.get("pads")
    if in_shape is not None and len(in_shape) == d + 2 and all(n is not None for n in in_shape[2:]):
        spatial = tuple(int(n) for n in in_shape[2:])  # type: ignore[arg-type]
    if pads is None:  # auto_pad SAME with an unknown size
        spatial, pads = None, [0] * (2 * d)
    return ConvGeometry(
        stride=tuple(ctx.attrs["strides"]),
        dilation=tuple(ctx.attrs["dilations"]),
        pads=tuple(pads),
        groups=int(ctx.attrs["group"]),
        input_size=spatial,
        circular=ctx.attrs.get("wrap_pads") is not None,
    )


def _known_conv(node: Node, graph: Graph, any_stride: bool = False) -> tuple[torch.Tensor, Any, tuple[int, ...]] | None:
    """(weight, attributes, input size) of a (transposed) convolution of its first input with constant weight and
    bias and known sizes, stride 1 unless ``any_stride``; else None."""
    weight = graph.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or variable_inputs(node, graph) != [0]:
        return None
    attrs = node_attrs(node)
    d = np.ndim(weight) - 2
    shape_in, shape_out = graph.shape(node.inputs[0]), graph.shape(node.outputs[0])
    if shape_in is None or shape_out is None or len(shape_in) != d + 2 or len(shape_out) != d + 2:
        return None
    if not all(isinstance(n, int) for n in [*shape_in[2:], *shape_out[2:]]):
        return None
    if not any_stride and any(int(s) != 1 for s in attrs["strides"]):
        return None
    size = tuple(int(n) for n in shape_in[2:])  # type: ignore[arg-type]
    return torch.from_numpy(np.asarray(weight, dtype=np.float64)), attrs, size


def _with_variable_bias(ctx: RuleContext, local: LocalBound) -> LocalBound:
    """conv(x) + b(x): each bias entry is added at every position of its output channel."""
    if not ctx.is_variable(2):
        return local
    out = ctx.output_shape()
    if out is None or len(out) < 2 or any(d is None for d in out):
        return unbounded(
            "bias computed from the input, added over an unknown size; give --input-shape", "unknown shape"
        )
    copies = math.prod(out) // max(1, int(out[1]))  # type: ignore[arg-type]
    total = local.value * ctx.input_lipschitz[0] + math.sqrt(copies) * ctx.input_lipschitz[2]
    return LocalBound(local.value, local.method + " + variable bias", certified=local.certified, output_lipschitz=total)


def _window(ctx: EvalContext, w: torch.Tensor) -> tuple[int, list[int], list[int]]:
    """(spatial rank, strides, dilations) of a convolution with weight ``w``."""
    d = w.dim() - 2
    strides = [int(s) for s in ctx.attrs.get("strides") or [1] * d]
    dilations = [int(s) for s in ctx.attrs.get("dilations") or [1] * d]
    return d, strides, dilations


@register
class Conv(Op):
    """Convolution operator norm: exact (dense) on small maps, else the circular embedding, else size-independent."""

    attributes = CONV_ATTRIBUTES
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if ctx.is_variable(1):
            return unbounded("convolution weight computed from the input (product of two activations)")
        if ctx.const(1) is None:
            return unbounded("convolution weight is not a known constant", "unknown weight")
        weight = ctx.tensor(1)
        found = conv_operator_norm(weight, conv_geometry(ctx, weight))
        method, exact = found.method, found.exact
        if ctx.attrs.get("wrap_pads") is not None and ctx.shape(0) is not None:
            # a wrap padding folded in: the circular convolution on the input's own grid, whose norm the
            # circular embedding on that grid computes exactly (conv_norm_known_size, no padding)
            method, exact = f"circular convolution ({ctx.attrs['wrap_padding']} folded), " + method, True
        local = LocalBound(found.value, method + folded_note(ctx.node), exact=exact)
        return _with_variable_bias(ctx, local)

    def absorb_wrap_padding(self, graph: Graph, node: Node, pad: Node, pads: list[int]) -> bool:
        """wrap-pad then a valid stride-1 conv whose window spans exactly the padding: a circular convolution on
        the unpadded grid (y[i] = sum_j w[j] x[(i - begin + d j) mod n]), so the pair is one exact operator."""
        attrs = node_attrs(node)
        weight = graph.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
        shape = graph.shape(pad.inputs[0])
        if weight is None or shape is None or attrs.get("wrap_pads") is not None:
            return False
        d = np.ndim(weight) - 2
        if len(shape) != d + 2 or len(pads) != 2 * (d + 2) or any(pads[a] or pads[a + d + 2] for a in (0, 1)):
            return False
        begins, ends = pads[2 : d + 2], pads[d + 4 :]
        spans = [int(r) * (int(k) - 1) for r, k in zip(attrs["dilations"], np.shape(weight)[2:], strict=True)]
        fits = all(
            isinstance(n, int) and min(b, e) >= 0 and b + e == span and span < n
            for n, b, e, span in zip(shape[2:], begins, ends, spans, strict=True)
        )
        if not fits or any(int(s) != 1 for s in attrs["strides"]) or any(int(p) for p in attrs.get("pads") or [1]):
            return False
        node.attrs.update(wrap_pads=begins + ends, wrap_padding=pad.name, pads=[0] * (2 * d))
        return True

    def evaluate(
        self, ctx: EvalContext, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None
    ) -> torch.Tensor:
        d, strides, dilations = _window(ctx, w)
        if d not in CONV:
            raise ValueError(f"{d}-d convolution")
        if ctx.attrs.get("wrap_pads") is not None:
            x = wrap_spatial(x, ctx.attrs["wrap_pads"])
        pads = spatial_pads(ctx, x.shape[2:], list(w.shape[2:]), strides, dilations)
        symmetric = pads[:d] == pads[d:]
        if not symmetric:
            x = pad_spatial(x, pads)
        return CONV[d](
            x, w, b, tuple(strides), tuple(pads[:d]) if symmetric else 0, tuple(dilations), int(ctx.attrs["group"])
        )

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        w, b = ctx.const(1), ctx.const(2)
        if ctx.variable != 0 or w is None or (ctx.has_input(2) and b is None):
            raise NotFoldable("Conv needs constant weights and bias")
        d = w.ndim - 2
        pads = ctx.attrs.get("pads")
        if pads is None or d not in (1, 2, 3):
            raise NotFoldable("Conv padding unknown")
        if ctx.attrs.get("wrap_pads") is not None:
            x = wrap_spatial(x, ctx.attrs["wrap_pads"])
        padded = F.pad(x, [p for i in reversed(range(d)) for p in (int(pads[i]), int(pads[i + d]))])
        y = CONV[d](
            padded,
            ctx.weights(w),
            None,
            tuple(ctx.attrs["strides"]),
            0,
            tuple(ctx.attrs["dilations"]),
            int(ctx.attrs["group"]),
        )
        if ctx.shifts and b is not None:
            y = y + torch.from_numpy(b).reshape(-1, *([1] * d))
        return y.reshape(x.shape[0], *ctx.out_shape[1:])

    def shift_invariant(self, node: Node, graph: Graph) -> ShiftInvariant | None:
        """Constant weight and bias (padding of any size, or circular with stride 1)."""
        found = _known_conv(node, graph, any_stride=True)
        if found is None:
            return None
        weight, attrs, size = found
        strides = tuple(int(s) for s in attrs["strides"])
        d = weight.dim() - 2
        wrap = attrs.get("wrap_pads")
        pads = wrap if wrap is not None else attrs.get("pads")
        if pads is None or len(pads) != 2 * d:
            return None
        return ShiftInvariant(
            weight,
            tuple(int(p) for p in pads[:d]),
            tuple(int(p) for p in pads[d:]),
            tuple(int(r) for r in attrs["dilations"]),
            int(attrs["group"]),
            circular=wrap is not None,
            input_size=size,
            strides=strides if any(s != 1 for s in strides) else (),
        )

    def rounding_terms(self, node: Node, graph: Graph) -> int:
        w = graph.constants.get(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
        return int(np.prod(np.shape(w)[1:])) + 2 if w is not None else 2

    def weight_input(self, node: Node, graph: Graph) -> int | None:
        return 1

    def scale_output_channels(self, node: Node, weight: np.ndarray, multiplier: np.ndarray) -> np.ndarray | None:
        if weight.shape[0] != multiplier.size:
            return None
        return weight * multiplier.reshape(-1, *([1] * (weight.ndim - 1)))

    def fold_output_affine(self, graph: Graph, node: Node, multiplier: np.ndarray, shift: np.ndarray) -> bool:
        return _fold_output_channels(self, graph, node, multiplier, shift)

    def fold_input_affine(self, graph: Graph, node: Node, multiplier: np.ndarray, shift: np.ndarray) -> bool:
        """W (m x + s): W's input channels scaled, and W s added to the bias.

        Exact inside the input; for a padded Conv the shift's effect near the border is not a bias, so the
        node is marked ``inexact_offset`` (its Lipschitz constant, which ignores the shift, is still exact).
        """
        parameters = layer_parameters(graph, node)
        if parameters is None:
            return False
        w, old_bias = parameters
        groups = int(node_attrs(node)["group"])
        if w.shape[1] * groups != multiplier.shape[0]:
            return False
        grouped = w.reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        shape = (groups, 1, w.shape[1], *([1] * (w.ndim - 2)))
        new_w = (grouped * multiplier.reshape(shape)).reshape(w.shape)
        offset = (grouped * shift.reshape(shape)).sum(axis=tuple(range(2, grouped.ndim))).reshape(-1)
        bias = (np.zeros(w.shape[0]) if old_bias is None else old_bias) + offset
        if any(int(p) for p in (node.attrs.get("pads") or [1])):
            node.attrs["inexact_offset"] = True
        replace_parameters(graph, node, new_w, bias)
        return True


def _fold_output_channels(op: Op, graph: Graph, node: Node, multiplier: np.ndarray, shift: np.ndarray) -> bool:
    """m * conv(x, W, b) + s = conv(x, m W, m b + s): output channels scaled."""
    parameters = layer_parameters(graph, node)
    if parameters is None:
        return False
    weight, bias = parameters
    new_weight = op.scale_output_channels(node, weight, multiplier)
    if new_weight is None:
        return False
    b = np.zeros(multiplier.shape[0]) if bias is None else bias
    replace_parameters(graph, node, new_weight, b * multiplier + shift)
    return True


def transpose_pads(
    attrs: Mapping[str, Any],
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    adjust: Sequence[int],
) -> tuple[list[int], list[int]]:
    """(begin pads, output sizes) of a ConvTranspose, as onnxruntime computes them."""
    d = len(spatial)
    output_shape = attrs.get("output_shape")
    auto_pad = attrs["auto_pad"]
    pads = list(attrs.get("pads") or [0] * (2 * d))
    begins, sizes = [], []
    for i in range(d):
        full = (spatial[i] - 1) * strides[i] + adjust[i] + (kernel[i] - 1) * dilations[i] + 1
        if output_shape:
            out = int(output_shape[-d + i])
            total = max(0, full - out)
            begin = total - total // 2 if auto_pad == "SAME_UPPER" else total // 2
        else:
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                total = max(0, full - spatial[i] * strides[i])
                begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
                end = total - begin
            else:
                begin, end = int(pads[i]), int(pads[i + d])
            out = full - begin - end
        begins.append(begin)
        sizes.append(out)
    return begins, sizes


@register
class ConvTranspose(Op):
    """Transposed convolution: the norm of its adjoint convolution (uncropped output)."""

    attributes = CONV_ATTRIBUTES
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if ctx.is_variable(1):
            return unbounded("weight computed from the input (product of two activations)")
        if ctx.const(1) is None:
            return unbounded("weight is not a known constant", "unknown weight")
        weight = ctx.tensor(1)
        geometry = conv_geometry(ctx, weight)
        found = conv_transpose_operator_norm(weight, geometry, _transpose_output(ctx, weight, geometry))
        return _with_variable_bias(
            ctx, LocalBound(found.value, "adjoint conv: " + found.method + folded_note(ctx.node))
        )

    def check(self, node: Node) -> None:
        if _same_with_output_shape(node.attrs):
            raise UnsupportedVariant("ConvTranspose(auto_pad=SAME with output_shape)")

    def evaluate(
        self, ctx: EvalContext, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None
    ) -> torch.Tensor:
        d, strides, dilations = _window(ctx, w)
        if d not in CONV_TRANSPOSE:
            raise ValueError(f"{d}-d transposed convolution")
        adjust = [int(a) for a in (ctx.attrs.get("output_padding") or [0] * d)]
        y = CONV_TRANSPOSE[d](x, w, None, tuple(strides), 0, 0, int(ctx.attrs["group"]), tuple(dilations))
        begins, sizes = transpose_pads(ctx.attrs, x.shape[2:], list(w.shape[2:]), strides, dilations, adjust)
        # output_padding adds zero rows at the end; then crop [begin, begin + size) on each axis
        y = pad_spatial(
            y, [0] * d + [max(0, bg + sz - n) for bg, sz, n in zip(begins, sizes, y.shape[2:], strict=True)]
        )
        for i, (begin, size) in enumerate(zip(begins, sizes, strict=True)):
            y = y.narrow(2 + i, begin, size)
        if b is not None:
            y = y + b.reshape(1, -1, *([1] * d))
        return y

    def weight_input(self, node: Node, graph: Graph) -> int | None:
        return 1

    def scale_output_channels(self, node: Node, weight: np.ndarray, multiplier: np.ndarray) -> np.ndarray | None:
        groups = int(node_attrs(node)["group"])
        if weight.shape[1] * groups != multiplier.size:
            return None
        grouped = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], *weight.shape[2:])
        return (grouped * multiplier.reshape(groups, 1, -1, *([1] * (weight.ndim - 2)))).reshape(weight.shape)

    def fold_output_affine(self, graph: Graph, node: Node, multiplier: np.ndarray, shift: np.ndarray) -> bool:
        return _fold_output_channels(self, graph, node, multiplier, shift)

    def shift_invariant(self, node: Node, graph: Graph) -> ShiftInvariant | None:
        """Stride 1: y[j] = sum_t W_t^T x[j - t d + p], the correlation with the flipped, transposed kernel and
        begin padding (k - 1) d - p (one group, no output padding)."""
        found = _known_conv(node, graph)
        if found is None:
            return None
        weight, attrs, size = found
        d = weight.dim() - 2
        pads = attrs.get("pads")
        adjust = attrs.get("output_padding") or [0] * d
        if int(attrs["group"]) != 1 or pads is None or len(pads) != 2 * d or any(int(a) for a in adjust):
            return None
        if attrs.get("output_shape") or attrs.get("auto_pad") not in (None, "NOTSET"):
            return None
        dilations = tuple(int(r) for r in attrs["dilations"])
        spans = [(int(k) - 1) * r for k, r in zip(weight.shape[2:], dilations, strict=True)]
        flipped = weight.flip(dims=list(range(2, d + 2))).transpose(0, 1).contiguous()
        return ShiftInvariant(
            flipped,
            tuple(span - int(p) for span, p in zip(spans, pads[:d], strict=True)),
            tuple(span - int(p) for span, p in zip(spans, pads[d:], strict=True)),
            dilations,
            1,
            circular=False,
            input_size=size,
        )


def _same_with_output_shape(attrs: Mapping[str, Any]) -> bool:
    return attrs.get("auto_pad") in ("SAME_UPPER", "SAME_LOWER") and bool(attrs.get("output_shape"))


def _transpose_output(
    ctx: RuleContext, weight: torch.Tensor, geometry: ConvGeometry
) -> tuple[list[int], list[int]] | None:
    """(begin crops, sizes) of a ConvTranspose's actual output, as ``evaluate`` computes it (None: unknown)."""
    if geometry.input_size is None or _same_with_output_shape(ctx.attrs):
        return None
    d = weight.dim() - 2
    adjust = [int(a) for a in (ctx.attrs.get("output_padding") or [0] * d)]
    kernel = list(weight.shape[2:])
    return transpose_pads(ctx.attrs, geometry.input_size, kernel, geometry.stride, geometry.dilation, adjust)


CAUSAL_EXACT_LENGTH = 1024  # sequences up to this length get the exact norm of each channel's Toeplitz matrix


@register
class CausalConvWithState(Op):
    """Depthwise causal 1-D convolution of [past state, input] (then SiLU when asked), and the new state.

    Each channel is a valid convolution of the padded sequence, an L x (L + k - 1) Toeplitz matrix T_c: its
    exact norm for sequences up to CAUSAL_EXACT_LENGTH, else ||w_c||_1 (Young). SiLU multiplies by 1.099840;
    reading the new state too (the last k - 1 padded entries, a selection) gives sqrt(L^2 + 1).
    """

    attributes = {"activation": "none"}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        weight = ctx.const(1)
        if weight is None or ctx.is_variable(2):
            return unbounded("a causal convolution with weights computed from the input multiplies them with it")
        shape = ctx.shape(0)
        length = shape[2] if shape is not None and len(shape) == 3 else None
        norm, method = _causal_norm(weight.reshape(weight.shape[0], -1), length, with_state=ctx.is_variable(3))
        if str(ctx.attrs["activation"]) in ("silu", "swish"):
            norm, method = norm * SILU_MAX_SLOPE, f"{method}, then SiLU (1.099840)"
        if ctx.output_used(1):
            norm, method = math.sqrt(norm**2 + 1.0), f"sqrt(({method})^2 + 1) with the new state"
        return LocalBound(norm, method)

    def evaluate(
        self,
        ctx: EvalContext,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        past: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = weight.shape[2]
        if past is None:
            past = torch.zeros(x.shape[0], x.shape[1], k - 1, dtype=x.dtype, device=x.device)
        padded = torch.cat([past.to(x.dtype), x], 2)
        out = F.conv1d(padded, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), groups=x.shape[1])
        if str(ctx.attrs["activation"]) in ("silu", "swish"):
            out = F.silu(out)
        return out, padded[:, :, padded.shape[2] - (k - 1) :]


def _causal_norm(taps: np.ndarray, length: int | None, with_state: bool) -> tuple[float, str]:
    """max over channels of ||T_c||: exact (dense, float64) for known short sequences, else max ||w_c||_1.
    Without a variable past state only the input's columns of T_c move."""
    if length is None or length > CAUSAL_EXACT_LENGTH:
        return float(np.abs(taps.astype(np.float64)).sum(axis=1).max(initial=0.0)) * (
            1 + 1e-12
        ), "max ||w_c||_1 (Young)"
    k = taps.shape[1]
    rows = torch.arange(length).reshape(-1, 1)
    offsets = torch.arange(length + k - 1).reshape(1, -1) - rows  # T[i, i + j] = w[j]
    inside = (offsets >= 0) & (offsets < k)
    kernel = torch.tensor(taps, dtype=torch.float64)
    toeplitz = torch.where(inside, kernel[:, offsets.clamp(0, k - 1)], 0.0)
    if not with_state:
        toeplitz = toeplitz[..., k - 1 :]
    norm = float(batched_sigma_max_upper(toeplitz).max()) if toeplitz.numel() else 0.0
    return norm, f"exact norm of each channel's {length} x {length + k - 1} causal convolution"
