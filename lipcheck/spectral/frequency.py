"""Stride-1 convolutions on one grid as their matrices at the grid's frequencies, with rounding bounds.

A stride-1 circular convolution on a grid of size N (per axis) is diagonalised by the DFT: at each
frequency w it acts on the channels by the matrix K_hat(w) = sum_t K_t exp(i w.(t d - p)) (ONNX's
cross-correlation y[i] = sum_t K_t x[i + t d - p]). Sums and products of such convolutions are sums and
products of their matrices at each w, and the operator norm of the result is the largest sigma_max over
w. So a chain of convolutions, a residual block ``I + C2 C1`` or any polynomial in them is bounded
exactly without materialising an operator on the whole grid (Sedghi et al. 2019 for one layer).

Rounding: ``FrequencyMatrices`` carries a real matrix ``bound`` with |exact(w)| <= bound and
|computed(w) - exact(w)| <= gamma * bound entrywise at every w (the same ``bound`` serves all w:
|K_hat(w)| <= sum_t |K_t|, and it multiplies and adds along with the matrices), like
``lipcheck.refine.affine.CertifiedMatrix`` for dense segments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lipcheck.spectral.circular import eigen_tol
from lipcheck.spectral.dense import UNIT_ROUNDOFF, batched_sigma_max_upper, to_float64
from lipcheck.spectral.hermitian import RunningMaxEigenvalue

_NORM_CHUNK_ENTRIES = 1 << 22  # complex entries per batched norm call
GRAM_CERTIFY_ORDER = 48  # from this size on, Cholesky certificates instead of an eigensolver per frequency
MIN_GRAM_CHUNK = 4


def half_frequencies(grid: Sequence[int]) -> torch.Tensor:
    """Angular frequencies ``[F, d]`` of the grid, one of each pair {w, -w} (real kernels: the matrix at -w is
    the conjugate of the one at w, same singular values; products and sums keep that)."""
    if not grid:
        return torch.zeros((1, 0), dtype=torch.float64)
    axes = [torch.arange(n, dtype=torch.float64) for n in grid[:-1]] + [
        torch.arange(grid[-1] // 2 + 1, dtype=torch.float64)
    ]
    mesh = torch.meshgrid(*axes, indexing="ij")
    index = torch.stack([m.reshape(-1) for m in mesh], dim=1)
    sizes = torch.tensor([float(n) for n in grid], dtype=torch.float64)
    return 2 * math.pi * index / sizes


@dataclass
class FrequencyMatrices:
    """Matrices ``[F, out, in]`` (complex128) of one shift-invariant operator at F frequencies."""

    matrix: torch.Tensor
    bound: torch.Tensor  # [out, in] float64, >= |exact matrix| at every frequency
    gamma: float  # |computed - exact| <= gamma * bound entrywise

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.matrix.shape[1]), int(self.matrix.shape[2])

    def __matmul__(self, other: FrequencyMatrices) -> FrequencyMatrices:
        """Product at every frequency: complex inner products of length k are within ~sqrt(2)(k+2)u |A||B|."""
        k = self.matrix.shape[2]
        rounding = 1.01 * 2 * (k + 4) * UNIT_ROUNDOFF
        g1, g2 = self.gamma, other.gamma
        gamma = g1 + g2 + g1 * g2 + rounding * (1 + g1) * (1 + g2)
        bound = (self.bound @ other.bound) * (1 + rounding)
        return FrequencyMatrices(self.matrix @ other.matrix, bound, gamma * (1 + rounding))

    def __add__(self, other: FrequencyMatrices) -> FrequencyMatrices:
        """Sum at every frequency: one more rounding of each entry (relative u per component)."""
        gamma = max(self.gamma, other.gamma) + 2 * UNIT_ROUNDOFF * (1 + max(self.gamma, other.gamma))
        bound = (self.bound + other.bound) * (1 + 2 * UNIT_ROUNDOFF)
        return FrequencyMatrices(self.matrix + other.matrix, bound, gamma)

    def scaled(self, factor: float) -> FrequencyMatrices:
        """factor * M; the product by a float64 factor rounds each component once more."""
        gamma = self.gamma + 2 * UNIT_ROUNDOFF * (1 + self.gamma)
        return FrequencyMatrices(self.matrix * factor, self.bound * abs(factor) * (1 + 2 * UNIT_ROUNDOFF), gamma)

    @staticmethod
    def identity(channels: int, frequencies: int) -> FrequencyMatrices:
        eye = torch.eye(channels, dtype=torch.complex128)
        return FrequencyMatrices(
            eye.expand(frequencies, channels, channels), torch.eye(channels, dtype=torch.float64), 0.0
        )

    def norm_upper(self) -> float:
        """Certified upper bound on max over frequencies of sigma_max(exact matrix)."""
        f, m, n = self.matrix.shape
        if min(m, n) >= GRAM_CERTIFY_ORDER:
            top = _gram_certified_sigma_max(self.matrix, self.bound, self.gamma)
        else:
            chunk = max(1, _NORM_CHUNK_ENTRIES // max(1, m * n))
            top = max(float(batched_sigma_max_upper(self.matrix[s : s + chunk]).max()) for s in range(0, f, chunk))
        if self.gamma == 0.0:
            return top
        fro = float(torch.linalg.matrix_norm(self.bound, ord="fro"))
        return top + self.gamma * fro * (1 + 2 * self.bound.numel() * UNIT_ROUNDOFF)


def _gram_certified_sigma_max(matrix: torch.Tensor, bound: torch.Tensor, gamma: float) -> float:
    """max_w sigma_max(matrix[w]) via the Gram matrices, proven by one Cholesky each (``RunningMaxEigenvalue``)
    instead of an eigensolver each: the top eigenvalue of a few, every other one certified below it.

    The computed Gram matrix of M (inner length k) is within 2 (k + 4) u |M|^H |M| of the exact one entrywise,
    and |M| <= (1 + gamma) bound, so its eigenvalues move by at most that matrix's Frobenius norm.
    """
    f, m, n = matrix.shape
    wide = m < n
    order, inner = min(m, n), max(m, n)
    running = RunningMaxEigenvalue(eigen_tol(order))
    chunk = max(MIN_GRAM_CHUNK, _NORM_CHUNK_ENTRIES // max(1, order * order))
    for s in range(0, f, chunk):
        block = matrix[s : s + chunk]
        gram = block @ block.mH if wide else block.mH @ block
        running.certify((gram + gram.mH) / 2)
    absolute = bound * (1 + gamma)
    abs_gram = absolute @ absolute.T if wide else absolute.T @ absolute
    error = (2 * (inner + 4) + 4) * UNIT_ROUNDOFF * float(torch.linalg.matrix_norm(abs_gram, ord="fro"))
    return math.sqrt(running.upper + error) * (1 + 2 * UNIT_ROUNDOFF)


def conv_frequency_matrices(
    weight: torch.Tensor, begins: Sequence[int], dilations: Sequence[int], groups: int, freqs: torch.Tensor
) -> FrequencyMatrices:
    """K_hat(w) for the stride-1 convolution y[i] = sum_t K_t x[i + t d - p] (``weight`` [c_out, c_in/g, *k]).

    Groups become a block-diagonal matrix. The phases are computed in float64: each angle w.(t d - p) to
    within a few u of |angle|, cos/sin to within a few u, so every term of the sum is within
    (8 + 4 |angle|) u |K_t| of exact; the sum over T taps adds (T + 2) u of sum_t |K_t|.
    """
    w = dense_groups(to_float64(weight), groups)
    c_out, c_in, *taps = w.shape
    flat = w.reshape(c_out, c_in, -1)
    mesh = torch.meshgrid(*[torch.arange(k, dtype=torch.float64) for k in taps], indexing="ij")
    offsets = torch.stack(
        [m.reshape(-1) * d - p for m, d, p in zip(mesh, dilations, begins, strict=True)], dim=1
    )  # [T, dims]
    angles = freqs @ offsets.T  # [F, T]
    phase = torch.polar(torch.ones_like(angles), angles)
    matrix = torch.einsum("ft,oit->foi", phase, flat.to(torch.complex128))
    bound = flat.abs().sum(dim=-1)
    n_taps = flat.shape[-1]
    largest_angle = float(angles.abs().max()) if angles.numel() else 0.0
    gamma = (n_taps + 10 + 4 * largest_angle) * 2 * UNIT_ROUNDOFF
    return FrequencyMatrices(matrix, bound * (1 + 2 * UNIT_ROUNDOFF), gamma)


def dense_groups(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped convolution's weight [c_out, c_in / g, *k] as the block-diagonal one [c_out, c_in, *k]."""
    if groups == 1:
        return weight
    c_out, per_group, *taps = weight.shape
    full = torch.zeros((c_out, per_group * groups, *taps), dtype=weight.dtype)
    step = c_out // groups
    for g in range(groups):
        full[g * step : (g + 1) * step, g * per_group : (g + 1) * per_group] = weight[g * step : (g + 1) * step]
    return full


def dense_frequency_matrices(matrix: torch.Tensor, bound: torch.Tensor, gamma: float) -> FrequencyMatrices:
    """A dense map on flat vectors as the one-frequency case (the grid of a vector is a point)."""
    return FrequencyMatrices(to_float64(matrix).to(torch.complex128)[None], bound, gamma)
