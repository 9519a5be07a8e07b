"""Certified operator norms of convolutions (1-D, 2-D, 3-D; stride, dilation, groups, padding).

The operator of a convolution is not its reshaped kernel. The bounds here rest on two facts:

* A zero-padded, strided, dilated convolution on an input of size n equals, after the polyphase
  (space-to-depth) rewrite, a *valid* stride-1 convolution on the padded input regrouped into
  ``c_in * prod(stride)`` channels of size ``m = ceil((n + pads) / stride)``. A valid convolution is
  a restriction of the circular convolution on the grid of size m, whose singular values are those
  of the per-frequency matrices K_hat(w) = sum_a K_a exp(-i w.a) (Sedghi, Gupta, Long, ICLR 2019).
  So ||conv|| <= max over the m-grid of sigma_max(K_hat(w)): exact for circular convolutions, and no
  looser than the circular embedding on n + k - 1 for zero padding.
* For unknown n, the circular bound on every grid is at most the supremum of sigma_max(K_hat(w)) over
  the continuous torus. sigma_max(K_hat(w)) is Lipschitz in w with constant sum_a |a_d| ||K_a||_2 per
  axis, so a branch-and-bound over frequency cells gives a certified bound of that supremum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lipcheck.spectral.circular import grid_norm
from lipcheck.spectral.conv_matrix import ConvWindow, dense_affordable, dense_conv_norm
from lipcheck.spectral.dense import (
    UNIT_ROUNDOFF,
    SpectralBound,
    batched_sigma_max_upper,
    to_float64,
)

# Largest number of complex entries of K_hat held at once (bounds peak memory at ~256 MiB).
_CHUNK_ENTRIES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a convolution's operator except its weights.

    ``pads`` is (begin_1, ..., begin_d, end_1, ..., end_d) as in ONNX. ``input_size`` is the spatial
    size or None when unknown (then a size-independent bound is used). ``circular``: the operator is the
    circular conv on the padded input grid (a wrap padding folded in, or a parametrization's circular
    sigma), whose norm the circular embedding gives exactly; the zero-padded conv's dense matrix is not it.
    """

    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[int, ...]
    groups: int = 1
    input_size: tuple[int, ...] | None = None
    circular: bool = False

    @classmethod
    def default(cls, spatial_dims: int, **overrides) -> ConvGeometry:
        base: dict[str, Any] = {
            "stride": (1,) * spatial_dims,
            "dilation": (1,) * spatial_dims,
            "pads": (0,) * (2 * spatial_dims),
        }
        base.update(overrides)
        return cls(**base)


def effective_kernel_size(kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    return tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True))


def polyphase_kernel(weight: torch.Tensor, stride: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """Rewrite a strided, dilated kernel ``[c_out, c_in, *k]`` as a stride-1 kernel.

    Returns ``[c_out, c_in * prod(stride), *ceil(k_eff / stride)]``: tap p = a*s + b of the dilated
    kernel moves to spatial offset a of input phase b (the space-to-depth rewrite).
    """
    c_out, c_in, *kernel = weight.shape
    d = len(kernel)
    eff = effective_kernel_size(kernel, dilation)
    taps = [math.ceil(e / s) for e, s in zip(eff, stride, strict=True)]
    padded = weight.new_zeros((c_out, c_in, *[a * s for a, s in zip(taps, stride, strict=True)]))
    index = (slice(None), slice(None), *[slice(0, e, dl) for e, dl in zip(eff, dilation, strict=True)])
    padded[index] = weight
    shape = [c_out, c_in]
    for a, s in zip(taps, stride, strict=True):
        shape += [a, s]
    split = padded.reshape(shape)
    # [c_out, c_in, A1, s1, A2, s2, ...] -> [c_out, c_in, s1, s2, ..., A1, A2, ...]
    order = [0, 1] + [3 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
    return split.permute(order).reshape(c_out, c_in * math.prod(stride), *taps)


def _grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``[c_out, c_in/g, *k]`` -> ``[g, c_out/g, c_in/g, *k]``."""
    c_out = weight.shape[0]
    if c_out % groups:
        raise ValueError(f"output channels {c_out} not divisible by groups {groups}")
    return weight.reshape(groups, c_out // groups, *weight.shape[1:])


def _frequency_sigma_max(kernel: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Upper bounds on sigma_max(K_hat(w)) at each frequency row of ``freqs`` ``[F, d]`` (radians).

    ``kernel`` is ``[g, c_out, c_in, *A]``; the result is the max over groups, shape ``[F]``.
    Taps are centred first (a global phase leaves singular values unchanged) so that phases stay
    small. K_hat is formed in complex128 by a direct sum over taps, whose rounding error is covered
    by an absolute margin added to the result.
    """
    g, c_out, c_in, *taps = kernel.shape
    device = kernel.device
    flat = to_float64(kernel).reshape(g, c_out, c_in, -1)  # [g, co, ci, T]
    grids = torch.meshgrid(*[torch.arange(a, dtype=torch.float64, device=device) for a in taps], indexing="ij")
    offsets = torch.stack([grid.reshape(-1) - (a - 1) / 2 for grid, a in zip(grids, taps, strict=True)], dim=1)
    n_taps = offsets.shape[0]
    # |fl(sum_a K_a e^{i phi_a}) - exact| <= (T + 4) u sum_a |K_a| entrywise; bound its spectral
    # norm by the Frobenius norm of that entrywise bound.
    abs_sum = flat.abs().sum(dim=-1)  # [g, co, ci]
    abs_margin = float((n_taps + 4) * 2 * UNIT_ROUNDOFF * torch.linalg.matrix_norm(abs_sum, ord="fro").max())
    per_freq_entries = g * c_out * c_in
    chunk = max(1, _CHUNK_ENTRIES // max(1, per_freq_entries))
    taps_complex = flat.to(torch.complex128)  # converted once, not per chunk
    out = []
    for start in range(0, freqs.shape[0], chunk):
        w = freqs[start : start + chunk].to(device=device, dtype=torch.float64)
        phase = torch.polar(torch.ones((), dtype=torch.float64, device=device), -(w @ offsets.T))  # [F, T]
        k_hat = torch.einsum("ft,gijt->fgij", phase, taps_complex)
        sig = batched_sigma_max_upper(k_hat).amax(dim=1)
        out.append(sig)
    return torch.cat(out) + abs_margin


def circular_conv_norm(kernel: torch.Tensor, grid: Sequence[int], groups: int = 1) -> float:
    """Exact (up to rounding margin) norm of the stride-1 circular convolution on ``grid``."""
    return grid_norm(_grouped(kernel, groups), list(grid))


def _padded_polyphase(weight: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """Polyphase kernel with groups as a leading batch axis: ``[g, co/g, ci/g * prod(s), *A]``."""
    grouped = _grouped(weight, geometry.groups)
    g, cog = grouped.shape[:2]
    flat = grouped.reshape(g * cog, *grouped.shape[2:])
    poly = polyphase_kernel(flat, geometry.stride, geometry.dilation)
    poly = poly.reshape(g, cog, *poly.shape[1:])
    # input phases that no tap reaches (stride > kernel) are zero columns: dropping them leaves
    # every singular value unchanged and shrinks the per-frequency matrices
    used = poly.abs().sum(dim=[0, 1, *range(3, poly.dim())]) > 0
    if not bool(used.all()) and bool(used.any()):
        poly = poly[:, :, used]
    return poly


def conv_norm_known_size(weight: torch.Tensor, geometry: ConvGeometry) -> SpectralBound:
    """Certified norm of a zero-padded convolution on a known input size (of the circular one with
    ``geometry.circular``): the circular embedding, or the exact operator's dense norm where that is cheap
    and smaller (small maps against the kernel, where the embedding is loose)."""
    embedded = circular_embedding_bound(weight, geometry)
    if geometry.circular or embedded.exact:
        return embedded
    return _smaller(embedded, _dense_zero_padded(weight, geometry))


def circular_embedding_bound(weight: torch.Tensor, geometry: ConvGeometry) -> SpectralBound:
    """The norm of the circular convolution on grid m = ceil((n + pad_begin + pad_end) / stride) of the
    polyphase kernel: the zero-padded conv on n is a restriction of it. Exact when the convolution is
    circular on that grid; never below the true norm.
    """
    assert geometry.input_size is not None
    d = weight.dim() - 2
    padded_len = [n + geometry.pads[i] + geometry.pads[i + d] for i, n in enumerate(geometry.input_size)]
    grid = [math.ceil(p / s) for p, s in zip(padded_len, geometry.stride, strict=True)]
    poly = _padded_polyphase(weight, geometry)
    if math.prod(poly.shape[3:]) == 1:
        # one tap after the polyphase rewrite (1x1 kernels, stride >= kernel): K_hat(w) is the same
        # matrix at every frequency, so the norm is that matrix's
        value = float(batched_sigma_max_upper(poly.flatten(2)).max())
        return SpectralBound(value, "single tap: exact SVD (float64, rounding margin)", exact=True)
    value = grid_norm(poly, grid)
    shape = "x".join(map(str, grid))
    return SpectralBound(value, f"circular embedding, FFT grid {shape}")


def _smaller(embedded: SpectralBound, dense: SpectralBound | None) -> SpectralBound:
    """The dense operator's norm where it was affordable and is no larger (both are certified)."""
    return dense if dense is not None and dense.value <= embedded.value else embedded


def _dense_zero_padded(weight: torch.Tensor, geometry: ConvGeometry) -> SpectralBound | None:
    """The exact norm of the zero-padded conv on its input from its dense matrix, when that is cheap."""
    assert geometry.input_size is not None
    d = weight.dim() - 2
    eff = effective_kernel_size(weight.shape[2:], geometry.dilation)
    out = tuple(
        max(0, (n + geometry.pads[i] + geometry.pads[i + d] - e) // s + 1)
        for i, (n, e, s) in enumerate(zip(geometry.input_size, eff, geometry.stride, strict=True))
    )
    pads, stride, dilation = geometry.pads[:d], geometry.stride, geometry.dilation
    window = ConvWindow(geometry.input_size, out, pads, stride, dilation, geometry.groups)
    return dense_conv_norm(weight, window) if dense_affordable(weight.shape, window) else None


def reshape_bound(weight: torch.Tensor, geometry: ConvGeometry) -> SpectralBound:
    """Size-independent bound from reshaped kernels (Singla & Feizi 2021 style), stride-aware.

    y = sum_a W_a (D S_a x) gives sqrt(mult) * ||[W_1 ... W_T]|| where mult is the most taps that
    hit one input position after striding; y = sum_a (D S_a) W_a x gives sqrt(T) * ||[W_1; ...; W_T]||.
    Maximum over groups.
    """
    grouped = to_float64(_grouped(weight, geometry.groups))  # [g, co, ci, *k]
    g, co, ci, *kernel = grouped.shape
    n_taps = math.prod(kernel)
    mult = 1
    for k, dl, s in zip(kernel, geometry.dilation, geometry.stride, strict=True):
        residues = [(i * dl) % s for i in range(k)]
        mult *= max(residues.count(r) for r in set(residues))
    wide = grouped.reshape(g, co, ci * n_taps)  # columns: (ci, taps)
    stacked = grouped.reshape(g, co, ci, n_taps).permute(0, 3, 1, 2).reshape(g, n_taps * co, ci)
    wide_bound = math.sqrt(mult) * float(batched_sigma_max_upper(wide).max())
    tall_bound = math.sqrt(n_taps) * float(batched_sigma_max_upper(stacked).max())
    if wide_bound <= tall_bound:
        return SpectralBound(wide_bound, f"size-independent: sqrt({mult}) x reshaped kernel norm")
    return SpectralBound(tall_bound, f"size-independent: sqrt({n_taps}) x stacked tap norm")


# Work allowed for the size-independent branch-and-bound of one layer (about a second on 2 cores
# for 64-128 channels), and a cap on frequencies evaluated (small layers: per-call overhead rules).
TORUS_FLOP_BUDGET = 4e10
TORUS_MAX_EVALUATIONS = 20_000


def torus_sup_bound(
    weight: torch.Tensor,
    geometry: ConvGeometry,
    rel_tol: float = 1e-3,
    flop_budget: float = TORUS_FLOP_BUDGET,
) -> SpectralBound | None:
    """Certified bound on sup_w sigma_max(K_hat(w)) over the continuous torus: valid for every size.

    Branch and bound over cubes of frequencies: a cube of half-width h centred at c holds no value
    above sigma(c) + h * sum_d L_d. Cubes that cannot beat the best value found (times 1 + rel_tol)
    are dropped; the rest are split. K_hat(-w) is the conjugate of K_hat(w) (real kernels), so half
    the torus (last axis in [0, pi]) suffices. Stops when the bound is within rel_tol of the best value
    or the work budget is spent; the result is a valid bound either way. None when the budget does
    not cover even the coarsest grid (large layers: use ``reshape_bound``).
    """
    poly = _padded_polyphase(weight, geometry)
    g, co, ci, *taps = poly.shape
    d = len(taps)
    n_taps = math.prod(taps)
    rank = min(co, ci)
    cost = 8.0 * g * (co * ci * n_taps + co * ci * rank + 2 * rank**3)  # flops per frequency
    max_evaluations = min(TORUS_MAX_EVALUATIONS, int(flop_budget / cost))
    start = 16
    while start > 2 and start ** (d - 1) * (start // 2) * 4 > max_evaluations:
        start //= 2
    if start ** (d - 1) * (start // 2) > max_evaluations:
        return None
    device = weight.device
    flat = to_float64(poly).reshape(g, co, ci, -1)
    grids = torch.meshgrid(*[torch.arange(a, dtype=torch.float64, device=device) for a in taps], indexing="ij")
    # ||K_a||_2 per tap (max over groups): the slope of sigma_max(K_hat(w)) along each axis
    tap_norms = batched_sigma_max_upper(flat.permute(3, 0, 1, 2)).amax(dim=1)
    slope = sum(
        float(((grid.reshape(-1) - (a - 1) / 2).abs() * tap_norms).sum()) for grid, a in zip(grids, taps, strict=True)
    )
    half = math.pi / start
    axes = [(torch.arange(start, dtype=torch.float64, device=device) + 0.5) * (2 * half)] * (d - 1)
    axes.append((torch.arange(start // 2, dtype=torch.float64, device=device) + 0.5) * (2 * half))
    centres = torch.stack([m.reshape(-1) for m in torch.meshgrid(*axes, indexing="ij")], dim=1)
    best = 0.0
    dropped_upper = 0.0
    evaluations = 0
    while True:
        values = _frequency_sigma_max(poly, centres)
        evaluations += centres.shape[0]
        best = max(best, float(values.max()))
        uppers = values + half * slope  # |w_d - c_d| <= half on every axis
        keep = uppers > best * (1.0 + rel_tol)
        if (~keep).any():
            dropped_upper = max(dropped_upper, float(uppers[~keep].max()))
        live = centres[keep]
        if live.shape[0] == 0:
            value = max(best, dropped_upper)
            break
        next_count = live.shape[0] * 2**d
        if evaluations + next_count > max_evaluations:
            value = max(dropped_upper, float(uppers[keep].max()))
            break
        half /= 2
        shifts = torch.stack(
            [
                m.reshape(-1)
                for m in torch.meshgrid(
                    *[torch.tensor([-half, half], dtype=torch.float64, device=device)] * d, indexing="ij"
                )
            ],
            dim=1,
        )
        centres = (live[:, None, :] + shifts[None, :, :]).reshape(-1, d)
    return SpectralBound(value, f"size-independent: frequency branch-and-bound (tol {rel_tol:g})")


def conv_operator_norm(weight: torch.Tensor, geometry: ConvGeometry) -> SpectralBound:
    """Certified l2 operator norm of a convolution with ONNX semantics (weight ``[c_out, c_in/g, *k]``).

    With a known input size: the circular embedding of the polyphase kernel. Without: the smaller of
    the reshaped-kernel bound and the frequency branch-and-bound.
    """
    if weight.dim() < 3:
        raise ValueError(f"convolution weight needs >= 3 dims, got {tuple(weight.shape)}")
    if geometry.input_size is not None:
        return conv_norm_known_size(weight, geometry)
    cheap = reshape_bound(weight, geometry)
    fine = torus_sup_bound(weight, geometry)
    return fine if fine is not None and fine.value <= cheap.value else cheap


def conv_transpose_operator_norm(
    weight: torch.Tensor, geometry: ConvGeometry, output: tuple[Sequence[int], Sequence[int]] | None = None
) -> SpectralBound:
    """Certified norm of a transposed convolution (weight ``[c_in, c_out/g, *k]``).

    ConvTranspose = crop o (adjoint of a valid conv on the uncropped output), and the adjoint has the
    same norm, so the valid conv with the same weight, stride, dilation and groups on the uncropped
    output length (n - 1) * s + k_eff bounds it. ``output``: the (begin crops, sizes) of the actual
    output; where given and small, the exact norm of the cropped operator's adjoint (a conv from the
    output to the input reading output position x * s - begin + a * d) from its dense matrix.
    """
    d = weight.dim() - 2
    if geometry.input_size is None:
        adjoint = ConvGeometry.default(d, stride=geometry.stride, dilation=geometry.dilation, groups=geometry.groups)
        return conv_operator_norm(weight, adjoint)
    eff = effective_kernel_size(weight.shape[2:], geometry.dilation)
    full = tuple((n - 1) * s + e for n, s, e in zip(geometry.input_size, geometry.stride, eff, strict=True))
    adjoint = ConvGeometry.default(
        d, stride=geometry.stride, dilation=geometry.dilation, groups=geometry.groups, input_size=full
    )
    embedded = circular_embedding_bound(weight, adjoint)
    if embedded.exact:
        return embedded
    begins, sizes = ((0,) * d, full) if output is None else (tuple(int(v) for v in part) for part in output)
    window = ConvWindow(sizes, geometry.input_size, begins, geometry.stride, geometry.dilation, geometry.groups)
    return _smaller(embedded, dense_conv_norm(weight, window) if dense_affordable(weight.shape, window) else None)


def reshaped_kernel_norm(weight: torch.Tensor) -> float:
    """sigma_max of the kernel reshaped to (c_out, c_in*k*k): an ESTIMATE, not a bound on the operator.

    This is what ``torch.nn.utils.spectral_norm`` normalises; the operator norm can be several times
    larger. Shown for comparison only.
    """
    return float(torch.linalg.matrix_norm(to_float64(weight.reshape(weight.shape[0], -1)), ord=2))
