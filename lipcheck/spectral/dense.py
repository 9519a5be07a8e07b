"""Certified largest singular values of (batches of) dense matrices.

Every function here returns an upper bound on the exact sigma_max of its input, rounding included:
the computed value is inflated by an explicit margin derived from standard backward-error bounds.
All work is done in float64 (complex128 for complex input) on whatever device the input lives on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

UNIT_ROUNDOFF = 2.0**-53  # float64


def rounding_gamma(k: int, unit: float = UNIT_ROUNDOFF) -> float:
    """The standard rounding constant gamma_k = k u / (1 - k u) (Higham, Lemma 3.1)."""
    ku = k * unit
    if ku >= 0.5:
        raise ValueError(f"{k} rounded operations are beyond the error analysis at unit roundoff {unit:g}")
    return ku / (1.0 - ku)


@dataclass(frozen=True)
class SpectralBound:
    """An upper bound on an operator norm and how it was obtained."""

    value: float
    method: str
    exact: bool = False  # True when the value equals the true norm up to the rounding margin


def to_float64(tensor: torch.Tensor) -> torch.Tensor:
    """Promote to float64/complex128 (exact for float16/bfloat16/float32 input)."""
    if tensor.is_complex():
        return tensor.to(torch.complex128)
    return tensor.to(torch.float64)


def batched_sigma_max_upper(matrices: torch.Tensor) -> torch.Tensor:
    """Certified upper bounds on sigma_max of each matrix in a batch ``[..., m, n]``.

    sigma_max^2 is the top eigenvalue of the smaller Gram matrix A^H A (or A A^H). Forming the Gram
    matrix in floating point perturbs it by at most k*u*||A||_F^2 (k the inner dimension), and a
    backward-stable symmetric eigensolver adds at most c*r*u*||G||_2. With ||A||_F^2 <= r*sigma^2
    (r the rank bound min(m, n)) this gives sigma^2 * (1 - k*r*u) <= lambda_hat * (1 + c*r*u), which
    we solve for sigma. The margin is relative and tiny (~1e-9 for 2048x2048 blocks).
    """
    a = to_float64(matrices)
    m, n = a.shape[-2], a.shape[-1]
    if m == 0 or n == 0:
        return torch.zeros(a.shape[:-2], dtype=torch.float64, device=a.device)
    # scale each matrix by an exact power of two so its largest entry is in [0.5, 1): no overflow
    # or underflow in the Gram matrix (undone exactly at the end)
    peak = a.abs().amax(dim=(-2, -1))
    _, exp = torch.frexp(torch.where(peak > 0, peak, torch.ones_like(peak)))
    scale = torch.ldexp(torch.ones_like(peak), exp.to(torch.float64))
    return _sigma_unit(a / scale[..., None, None]) * scale


def _sigma_unit(a: torch.Tensor) -> torch.Tensor:
    m, n = a.shape[-2], a.shape[-1]
    gram = a.mH @ a if m >= n else a @ a.mH
    inner, rank = max(m, n), min(m, n)
    top = torch.linalg.eigvalsh(gram)[..., -1].real.clamp_min(0.0)
    # entries of |A|^H|A| differ from A^H A by at most inner*u*|A|^H|A| elementwise
    shrink = 1.0 - 2.0 * inner * rank * UNIT_ROUNDOFF
    grow = 1.0 + 16.0 * rank * UNIT_ROUNDOFF
    if shrink <= 0.5:  # absurdly large matrices: fall back to a Frobenius bound
        return torch.linalg.matrix_norm(a, ord="fro") * (1.0 + 4.0 * inner * UNIT_ROUNDOFF)
    return torch.sqrt(top * (grow / shrink))


def dense_sigma_max(matrix: torch.Tensor) -> SpectralBound:
    """Certified sigma_max of one matrix: exact up to a relative rounding margin below 1e-8."""
    if matrix.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(matrix.shape)}")
    value = float(batched_sigma_max_upper(matrix))
    return SpectralBound(value, "exact SVD (float64, rounding margin)", exact=True)


def gram_iteration_bound(matrix: torch.Tensor, iterations: int = 12) -> SpectralBound:
    """Delattre et al. (ICML 2023) Gram iteration: a certified upper bound on sigma_max.

    sigma_max(W) <= ||G_t||_F^(2^-t) with G_{k+1} = G_k^H G_k. Rescaling by the Frobenius norm at
    each step keeps the numbers finite; the logs are accumulated exactly as in the paper's code. The
    floating-point error of each product is at most k*r*u relative to sigma^2 (see
    ``batched_sigma_max_upper``) and is divided by 2 at every later root, so a relative margin of
    2*k*r*u on the result covers all steps.
    """
    g = to_float64(matrix)
    if g.shape[-2] < g.shape[-1]:
        g = g.mH
    peak = float(g.abs().max()) if g.numel() else 0.0
    if peak == 0.0:
        return SpectralBound(0.0, f"Gram iteration ({iterations} steps)")
    shift = math.frexp(peak)[1]
    g = torch.ldexp(g, torch.tensor(-shift, dtype=torch.float64))
    inner, rank = g.shape[-2], g.shape[-1]
    log_scale = 0.0
    for _ in range(iterations):
        r = float(torch.linalg.matrix_norm(g, ord="fro"))
        if r == 0.0:
            return SpectralBound(0.0, f"Gram iteration ({iterations} steps)")
        g = g / r
        log_scale = 2.0 * (log_scale + math.log(r))
        g = g.mH @ g
    fro = float(torch.linalg.matrix_norm(g, ord="fro"))
    exponent = 2.0**-iterations
    value = fro**exponent * math.exp(log_scale * exponent)
    # log/exp/pow rounding: relative error <= (iterations + 4) u (1 + |log_scale| 2^-t)
    value *= 1.0 + 4.0 * inner * rank * UNIT_ROUNDOFF
    value *= 1.0 + (iterations + 8) * UNIT_ROUNDOFF * (
        1.0 + abs(log_scale) * exponent + abs(math.log(fro)) * exponent if fro > 0 else 1.0
    )
    value = math.ldexp(value, shift)
    return SpectralBound(value, f"Gram iteration ({iterations} steps)")
