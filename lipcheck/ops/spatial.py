"""Geometry shared by the ops that slide a window over spatial axes (convolutions, pooling, padding)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lipcheck.ops.base import EvalContext

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def same_pads(
    auto_pad: str, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[int]:
    """Pads [begin..., end...] of auto_pad SAME_UPPER / SAME_LOWER (the extra one at the end / at the start)."""
    d = len(spatial)
    result = [0] * (2 * d)
    for i, (n, s, k, dl) in enumerate(zip(spatial, strides, kernel, dilations, strict=True)):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * dl + 1 - n, 0)
        small, large = total // 2, total - total // 2
        result[i], result[i + d] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    return result


def spatial_pads(
    ctx: EvalContext, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[int]:
    """Explicit pads [begin..., end...]; SAME padding of an input size unknown at load time computed now."""
    pads = ctx.attrs.get("pads")
    if pads is not None:
        return [int(p) for p in pads]
    auto_pad = ctx.attrs.get("auto_pad") or "NOTSET"
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return same_pads(auto_pad, spatial, kernel, strides, dilations)
    return [0] * (2 * len(spatial))


def pad_spatial(x: torch.Tensor, pads: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad the trailing len(pads)//2 axes by ONNX-ordered pads [begin..., end...]."""
    d = len(pads) // 2
    if not any(pads):
        return x
    torch_pads: list[int] = []
    for i in reversed(range(d)):
        torch_pads += [int(pads[i]), int(pads[i + d])]
    return F.pad(x, torch_pads, value=value)


def wrap_spatial(x: torch.Tensor, pads: Sequence[int]) -> torch.Tensor:
    """Wrap-pad (circularly) the trailing len(pads)//2 axes by ONNX-ordered pads [begin..., end...]."""
    d = len(pads) // 2
    torch_pads: list[int] = []
    for i in reversed(range(d)):
        torch_pads += [int(pads[i]), int(pads[i + d])]
    return F.pad(x, torch_pads, mode="circular")


def window_overlap(kernel: int, stride: int, dilation: int) -> int:
    """Most windows containing one input position: count of taps sharing a residue mod stride."""
    residues = [(i * dilation) % stride for i in range(kernel)]
    return max(residues.count(r) for r in set(residues))


def pool_output_sizes(
    spatial: Sequence[int],
    k: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int],
    ceil_mode: bool,
) -> list[int]:
    """ONNX's pooling output sizes (ceil mode: the last window must start inside the input or the left pad)."""
    d = len(k)
    sizes = []
    for i, n in enumerate(spatial):
        span = (k[i] - 1) * dilations[i] + 1
        length = n + pads[i] + pads[i + d] - span
        out = (math.ceil(length / strides[i]) if ceil_mode else length // strides[i]) + 1
        if ceil_mode and (out - 1) * strides[i] >= n + pads[i]:
            out -= 1
        sizes.append(max(out, 0))
    return sizes


def avgpool_matrix(
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


def padded_indices(n: int, before: int, after: int, mode: str) -> np.ndarray:
    """Which input index each output position of a 1-D edge/reflect/wrap padding copies."""
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
