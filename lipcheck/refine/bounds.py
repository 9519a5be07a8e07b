"""Certified Lipschitz bounds for a chain  W_m o act_{m-1} o ... o act_1 o W_1  (see ``chains``).

Every activation is elementwise with difference quotients in [a_i, b_i], so for any two inputs
f(x) - f(y) = W_m D_{m-1} W_{m-1} ... D_1 W_1 (x - y) with D_i diagonal, entries in [a_i, b_i].

* ``folded_bound``: prod ||W_i|| prod max(|a_i|, |b_i|)  (AutoLip on the folded segments).
* ``combettes_pesquet_bound``: Combettes & Pesquet (2020), Lipschitz certificates for layered network
  structures driven by averaged activation operators. Writing D_i = c_i I + r_i E_i (c_i the middle of
  [a_i, b_i], r_i its radius, ||E_i|| <= 1) and expanding the product gives
  sum over subsets S of {1..m-1} of prod_{i not in S} c_i prod_{i in S} r_i  x  prod of the norms of the
  partial products of W between consecutive elements of S. For averaged activations (ReLU: c = r = 1/2)
  this is exactly their theta_m / 2^(m-1). We sum the 2^(m-1) terms by dynamic programming over the last
  split, from the O(m^2) certified partial-product norms.
* ``eclipse_fast_bound``: ECLipsE-Fast (Xu & Sivaranjani, NeurIPS 2024): X_0 = I; for each hidden layer
  lambda_i = 1 / (2 m_i^2 lambda_max(W_i X_{i-1}^-1 W_i^T)), X_i = lambda_i I - lambda_i^2 m_i^2 W_i X_{i-1}^-1 W_i^T;
  L^2 = lambda_max(W_m^T W_m X_{m-1}^-1). Certified here by checking, for the matrices actually stored, each
  step's quadratic-form inequality (a 2x2 block matrix PSD) and the final one with rigorous eigenvalue
  bounds; a slightly shrunk X_i is kept where rounding needs it. For slopes with a_i b_i != 0 the same
  derivation gives M_i = X_{i-1} + a_i b_i lambda_i W_i^T W_i in place of X_{i-1}.
"""

from __future__ import annotations

import math

import torch

from lipcheck.ops import Slope
from lipcheck.refine.affine import CertifiedMatrix
from lipcheck.spectral.dense import UNIT_ROUNDOFF


def folded_bound(weights: list[CertifiedMatrix], slopes: list[Slope]) -> float:
    value = 1.0
    for w in weights:
        value *= w.norm_upper()
    for s in slopes:
        value *= s.lipschitz
    return value * (1 + 4 * len(weights) * UNIT_ROUNDOFF)


def partial_product_norms(weights: list[CertifiedMatrix]) -> dict[tuple[int, int], float]:
    """norms[(i, j)] >= ||W_j ... W_{i+1}|| for 0 <= i < j <= m (layers numbered from 1)."""
    m = len(weights)
    norms: dict[tuple[int, int], float] = {}
    for i in range(m):
        product = weights[i]
        norms[(i, i + 1)] = product.norm_upper()
        for j in range(i + 1, m):
            product = weights[j] @ product
            norms[(i, j + 1)] = product.norm_upper()
    return norms


def combettes_pesquet_bound(weights: list[CertifiedMatrix], slopes: list[Slope]) -> float:
    """sum over split sets S of prod c^(unsplit) r^(split) prod ||partial products|| (see module doc)."""
    m = len(weights)
    assert len(slopes) == m - 1
    norms = partial_product_norms(weights)
    mids = [abs(s.mid) for s in slopes]
    radii = [s.radius for s in slopes]
    # best[j]: the sum over split sets inside {1..j-1} of the terms for the map up to layer j, split at j
    # (the activation after layer j multiplies in later); best[0] = 1
    total = [0.0] * (m + 1)
    total[0] = 1.0
    for j in range(1, m + 1):
        acc = 0.0
        for i in range(j):
            unsplit = math.prod(mids[i : j - 1])  # activations i+1 .. j-1 kept whole inside the segment
            acc += total[i] * (radii[i - 1] if i > 0 else 1.0) * unsplit * norms[(i, j)]
        total[j] = acc
    # each term is a product of at most 2m roundings of nonnegative numbers
    return total[m] * (1 + 4 * (m * m + 2 * m) * UNIT_ROUNDOFF)


# --------------------------------------------------------------------------------------------------
# rigorous eigenvalue bounds


def min_eigenvalue_lower(matrix: torch.Tensor, entry_error: float = 0.0) -> float:
    """A lower bound on lambda_min(A) for any symmetric A within ``entry_error`` (Frobenius) of ``matrix``.

    ``matrix`` is symmetrised exactly; eigvalsh is backward stable (the computed eigenvalues are exact for
    a matrix within c n u ||A||_2), and Weyl's inequality moves eigenvalues by at most the perturbation norm.
    """
    sym = (matrix + matrix.T) / 2
    n = sym.shape[0]
    computed = float(torch.linalg.eigvalsh(sym)[0])
    fro = float(torch.linalg.matrix_norm(sym, ord="fro"))
    asymmetry = float(torch.linalg.matrix_norm(matrix - sym, ord="fro"))
    return computed - 32.0 * n * UNIT_ROUNDOFF * fro - entry_error - asymmetry


def _fro(t: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(t, ord="fro"))


def eclipse_fast_bound(weights: list[CertifiedMatrix], slopes: list[Slope]) -> float | None:
    """ECLipsE-Fast, certified (None when a step cannot be certified, e.g. a degenerate layer)."""
    m = len(weights)
    assert len(slopes) == m - 1
    x_prev: torch.Tensor | None = torch.eye(weights[0].shape[1], dtype=torch.float64)
    for i in range(m - 1):
        x_prev = _eclipse_step(weights[i], slopes[i], x_prev)  # type: ignore[arg-type]
        if x_prev is None:
            return None
    return _eclipse_last(weights[-1], x_prev)  # type: ignore[arg-type]


def _eclipse_step(w: CertifiedMatrix, slope: Slope, x_prev: torch.Tensor) -> torch.Tensor | None:
    """X_i from X_{i-1} for one hidden layer, its step inequality verified for the stored (shrunk) X_i."""
    mid, prod = slope.mid, slope.low * slope.high
    if mid == 0.0:
        return None
    a = w.matrix
    n_out = a.shape[0]
    try:
        solved = torch.linalg.solve(x_prev, a.T)  # X^-1 W^T
    except RuntimeError:
        return None
    k = a @ solved
    k = (k + k.T) / 2
    top = float(torch.linalg.eigvalsh(k)[-1])
    if not top > 0:
        return None
    lam = 1.0 / (2.0 * mid * mid * top)
    for _ in range(40):
        gram = a.T @ a
        m_mat = x_prev + (prod * lam) * gram
        try:
            inner = torch.linalg.solve(m_mat, a.T)
        except RuntimeError:
            lam /= 2
            continue
        x_new = lam * torch.eye(n_out, dtype=torch.float64) - (lam * lam * mid * mid) * (a @ inner)
        x_new = (x_new + x_new.T) / 2
        shrink = 1e-8 * float(x_new.diagonal().abs().max()) + 1e-300  # rounding needs ~1e-10
        margins: list[float] = []
        for _ in range(30):
            stored = x_new - shrink * torch.eye(n_out, dtype=torch.float64)
            block = _step_matrix(x_prev, a, lam, mid, prod, stored)
            error = _step_error(w, x_prev, lam, mid, prod, stored, gram)
            margins.append(min_eigenvalue_lower(block, error))
            if margins[-1] >= 0.0:
                return stored
            if len(margins) >= 4 and margins[-1] <= margins[-4]:
                return None  # shrinking does not help: scales too far apart for a verified step
            shrink *= 4
        lam /= 2  # with a_i b_i < 0 a smaller multiplier keeps M_i positive definite
    return None


def _eclipse_last(last: CertifiedMatrix, x_prev: torch.Tensor) -> float | None:
    """L = sqrt(lambda_max(W^T W X^-1)), inflated until rho X - W^T W is proven PSD."""
    a = last.matrix
    gram = a.T @ a
    try:
        chol = torch.linalg.cholesky(x_prev)
    except RuntimeError:
        return None
    # lambda_max(W^T W X^-1) = ||W L^-T||^2 with X = L L^T
    scaled = torch.linalg.solve_triangular(chol, a.T, upper=False).T
    candidate = float(torch.linalg.matrix_norm(scaled, ord=2)) ** 2
    factor = 1e-9
    for _ in range(40):
        rho = candidate * (1 + factor)
        matrix = rho * x_prev - gram
        g = last.gamma
        bound_gram = last.bound.T @ last.bound
        error = (
            (2 * g + g * g) * _fro(bound_gram)
            + 2.0 * (a.shape[0] + 2) * UNIT_ROUNDOFF * _fro(bound_gram)
            + 4 * UNIT_ROUNDOFF * (_fro(rho * x_prev) + _fro(gram))
        )
        if min_eigenvalue_lower(matrix, error) >= 0.0:
            return math.sqrt(rho) * (1 + 2 * UNIT_ROUNDOFF)
        factor *= 4
    return None


def _step_matrix(
    x_prev: torch.Tensor, a: torch.Tensor, lam: float, mid: float, prod: float, x_new: torch.Tensor
) -> torch.Tensor:
    """[[X_{i-1} + p lam W^T W, -m lam W^T], [-m lam W, lam I - X_i]]: PSD means
    w^T X_{i-1} w - QC_i(w) >= z^T X_i z for z = act(W w) differences (QC_i >= 0 the slope constraint)."""
    n_out = a.shape[0]
    top = torch.cat([x_prev + (prod * lam) * (a.T @ a), (-mid * lam) * a.T], dim=1)
    bottom = torch.cat([(-mid * lam) * a, lam * torch.eye(n_out, dtype=torch.float64) - x_new], dim=1)
    return torch.cat([top, bottom], dim=0)


def _step_error(
    w: CertifiedMatrix,
    x_prev: torch.Tensor,
    lam: float,
    mid: float,
    prod: float,
    x_new: torch.Tensor,
    gram: torch.Tensor,
) -> float:
    """Frobenius bound on (exact block for the exact W) - (computed block)."""
    g, bound = w.gamma, w.bound
    k = w.shape[0] + 2
    gram_bound = _fro(bound.T @ bound)
    return (
        abs(prod) * lam * ((2 * g + g * g) + 2.0 * k * UNIT_ROUNDOFF) * gram_bound * (1 + 1e-10)
        + math.sqrt(2.0) * abs(mid) * lam * (g + 4 * UNIT_ROUNDOFF) * _fro(bound)
        + 4
        * UNIT_ROUNDOFF
        * (_fro(x_prev) + abs(prod) * lam * _fro(gram) + _fro(x_new) + lam * math.sqrt(x_new.shape[0]))
    )
