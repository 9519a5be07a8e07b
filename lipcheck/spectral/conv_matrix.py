"""The exact operator of a convolution on a small input, as one dense matrix per group.

The circular embedding (``conv_norm_known_size``) bounds a zero-padded conv on n by the circular conv on a
grid of n + k - 1 or more: exact for circular convs, but loose where the map is small against the kernel
(3.04x for a 5x5 depthwise conv on a 2x2 map: the circular conv sums taps that the zero-padded one never
applies together). There the operator itself is small, a few hundred rows per group, and its top singular
value is the exact norm.

Entries are copied, not computed: entry ((o, x), (i, y)) of group g's matrix is w[g, o, i, a] for the one
tap a with y = x * s - begin + a * d on every axis (no tap: 0). The per-axis 0/1 selections are contracted
with the taps in float64, where every sum has at most one nonzero term and every product is w * 1: the
matrix is exact, and ``batched_sigma_max_upper`` certifies its norm with its own rounding margin.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lipcheck.spectral.dense import SpectralBound, batched_sigma_max_upper, to_float64

# Work allowed for one layer's dense norm: the smaller Gram matrix (2 m n r flops per group) and its
# eigenvalues (about 9 r^3), and the matrices' memory. Measured on one core: a 3x3 conv with 64 channels on
# a 4x4 map (r = 1024, 1.2e10 flops) takes 0.56 s, with 128 channels on 3x3 (r = 1152) 0.63 s, while
# r = 2048 takes 3-4 s; so about a second per layer at most.
DENSE_FLOPS = 1.5e10
DENSE_MAX_SIDE = 1536
DENSE_MAX_ENTRIES = 1 << 23  # 64 MiB of float64 for all groups together
DENSE_METHOD = "operator matrix SVD (float64, rounding margin)"


@dataclass(frozen=True)
class ConvWindow:
    """Which input entries a conv's output entries read: input and output sizes, begin pads, stride, dilation.

    Output x on an axis reads input x * stride - begin + a * dilation through tap a (when in range): a
    zero-padded conv (begin = its begin pad), or the adjoint of a transposed conv with its crop."""

    input_size: tuple[int, ...]
    output_size: tuple[int, ...]
    begins: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int = 1


def dense_cost(weight_shape: Sequence[int], window: ConvWindow) -> tuple[float, int, int]:
    """(flops, entries, smaller side) of the dense norm: every group's Gram product and eigensolve, the matrices."""
    c_out, c_in_group = int(weight_shape[0]), int(weight_shape[1])
    rows = c_out // window.groups * math.prod(window.output_size)
    cols = c_in_group * math.prod(window.input_size)
    side = min(rows, cols)
    return window.groups * (2.0 * rows * cols * side + 9.0 * side**3), window.groups * rows * cols, side


def dense_affordable(weight_shape: Sequence[int], window: ConvWindow) -> bool:
    """Whether the dense norm fits the per-layer work and memory allowances (``DENSE_*``)."""
    flops, entries, side = dense_cost(weight_shape, window)
    return flops <= DENSE_FLOPS and entries <= DENSE_MAX_ENTRIES and side <= DENSE_MAX_SIDE


def _selections(window: ConvWindow, taps: Sequence[int], device: torch.device) -> list[torch.Tensor]:
    """Per axis, ``[taps, out, in]`` 0/1: tap a takes output x to input x * s - begin + a * d."""
    out = []
    for n_in, n_out, k, begin, s, d in zip(
        window.input_size, window.output_size, taps, window.begins, window.stride, window.dilation, strict=True
    ):
        a = torch.arange(k, device=device)[:, None, None]
        x = torch.arange(n_out, device=device)[None, :, None]
        y = torch.arange(n_in, device=device)[None, None, :]
        out.append((y == x * s - begin + a * d).to(torch.float64))
    return out


def conv_matrices(weight: torch.Tensor, window: ConvWindow) -> torch.Tensor:
    """The conv's exact matrix per group, ``[g, c_out/g * prod(out), c_in/g * prod(in)]`` (float64).

    ``weight`` is ``[c_out, c_in/g, *k]``; rows are (output channel, output position) and columns (input
    channel, input position), both in row-major order as torch flattens ``[c, *spatial]``."""
    g = window.groups
    c_out, c_in_group, *taps = weight.shape
    d = len(taps)
    grouped = to_float64(weight).reshape(g, c_out // g, c_in_group, *taps)
    letters = iter(string.ascii_letters[3:])  # 'a', 'b', 'c' name the group and channel axes
    tap, outs, ins = ([next(letters) for _ in range(d)] for _ in range(3))
    axes = [f"{t}{o}{i}" for t, o, i in zip(tap, outs, ins, strict=True)]
    expression = f"abc{''.join(tap)},{','.join(axes)}->ab{''.join(outs)}c{''.join(ins)}"
    matrix = torch.einsum(expression, grouped, *_selections(window, taps, weight.device))
    return matrix.reshape(g, c_out // g * math.prod(window.output_size), c_in_group * math.prod(window.input_size))


def dense_conv_norm(weight: torch.Tensor, window: ConvWindow) -> SpectralBound:
    """Certified norm of the conv's exact operator: the largest group's top singular value."""
    if math.prod(window.output_size) == 0 or math.prod(window.input_size) == 0:
        return SpectralBound(0.0, "empty operator", exact=True)
    if not bool(torch.isfinite(weight).all()):
        return SpectralBound(math.inf, DENSE_METHOD)
    value = float(batched_sigma_max_upper(conv_matrices(weight, window)).max())
    return SpectralBound(value, DENSE_METHOD, exact=True)
