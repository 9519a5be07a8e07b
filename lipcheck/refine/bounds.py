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

Per-unit slopes (``UnitSlopes``, e.g. from value ranges on an input box): activation i has its own interval
[a_ij, b_ij] per unit j, so D_i = diag(c_i) + diag(r_i) E_i. ``folded_bound`` takes the largest unit's
|slope|; ``combettes_pesquet_bound`` keeps the diagonals inside the partial products (see
``unit_combettes_pesquet_bound``); ECLipsE-Fast and LipSDP take per-unit coefficients in their quadratic
constraints (``eclipse_fast_bound``, ``lipcheck.refine.lipsdp``). A scalar ``Slope`` keeps the scalar code.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lipcheck.ops import Slope, UnitSlopes
from lipcheck.refine.affine import CertifiedMatrix
from lipcheck.spectral.dense import UNIT_ROUNDOFF

AnySlope = Slope | UnitSlopes


def any_units(slopes: list[AnySlope]) -> bool:
    return any(isinstance(s, UnitSlopes) for s in slopes)


def as_units(weights: list[CertifiedMatrix], slopes: list[AnySlope]) -> list[UnitSlopes]:
    """Every activation as per-unit intervals (a scalar slope repeated over the layer's units)."""
    pairs = zip(weights[:-1], slopes, strict=True)
    return [s if isinstance(s, UnitSlopes) else UnitSlopes.of(s, w.shape[0]) for w, s in pairs]


def _lipschitz(slope: AnySlope) -> float:
    return slope.lipschitz if isinstance(slope, Slope) else float(slope.lipschitz.max(initial=0.0))


def folded_bound(weights: list[CertifiedMatrix], slopes: list[AnySlope]) -> float:
    value = 1.0
    for w in weights:
        value *= w.norm_upper()
    for s in slopes:
        value *= _lipschitz(s)
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


def combettes_pesquet_bound(weights: list[CertifiedMatrix], slopes: list[AnySlope]) -> float:
    """sum over split sets S of prod c^(unsplit) r^(split) prod ||partial products|| (see module doc)."""
    m = len(weights)
    assert len(slopes) == m - 1
    if any_units(slopes):
        return unit_combettes_pesquet_bound(weights, as_units(weights, slopes))
    return _scalar_split_sum(partial_product_norms(weights), slopes)  # type: ignore[arg-type]


def _scalar_split_sum(norms: dict[tuple[int, int], float], slopes: list[Slope]) -> float:
    """The scalar bound from the partial-product norms (the dynamic program below, rounding included)."""
    m = len(slopes) + 1
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


def unit_combettes_pesquet_bound(weights: list[CertifiedMatrix], slopes: list[UnitSlopes]) -> float:
    """Combettes-Pesquet with a diagonal interval per activation: the smaller of two placements of the radii.

    With D_i = C_i + R_i E_i (C_i = diag(mid), R_i = diag(radius), E_i diagonal, |E_i| <= 1) and
    M(i, j) = W_j C_{j-1} W_{j-1} ... C_{i+1} W_{i+1} (unsplit activations absorbed; M(i, i+1) = W_{i+1}),
    expanding W_m D_{m-1} ... D_1 W_1 over the split set S = {s_1 < ... < s_k} gives the terms
        M(s_k, m) R_{s_k} E_{s_k} M(s_{k-1}, s_k) ... R_{s_1} E_{s_1} M(0, s_1).
    Diagonals commute, so R E = E R = Q (Q^-1 R Q^-1 E) Q for any Q >= sqrt(R) (zero where R is), and
    |Q^-1 R Q^-1 E| <= 1. Submultiplicativity with ||E|| <= 1 bounds each term by either
        prod over consecutive (i, j) of ||M(i, j) R_i||        (R_0 = I: 'input side'), or
        prod over consecutive (i, j) of ||Q_j M(i, j) Q_i||    (Q_0 = Q_m = I: 'balanced').
    Both factor over consecutive split points, so the scalar code's dynamic program sums all 2^(m-1) terms.
    Stable units (radius 0) drop out of the split terms; when every unit is stable only S = {} is left and
    the bound is ||W_m C_{m-1} ... C_1 W_1||, the exact Jacobian of the affine map on that domain.
    Neither placement is always below the scalar bound (W_1 = [1; 1], W_2 = [1, -1], units [1, 1] and
    [0, 1]: input side 1.207, scalar [0, 1] gives 1), so the scalar bound on each layer's hull of the unit
    intervals is the third candidate; the smallest is returned.
    """
    m = len(weights)
    assert len(slopes) == m - 1
    input_side, balanced_side = _unit_partial_norms(weights, slopes)
    values = [_sum_split_terms(norms, m) for norms in (input_side, balanced_side)]
    hull = _scalar_split_sum(partial_product_norms(weights), [_hull(s) for s in slopes])
    return min(min(values) * (1 + 4 * (m * m + 2 * m) * UNIT_ROUNDOFF), hull)


def _hull(units: UnitSlopes) -> Slope:
    """One interval holding every unit's (the scalar bound with it is the third candidate: with slopes
    inside [0, b] it is never above the scalar bound of the op's own [0, b], see the tests)."""
    return Slope(float(units.low.min(initial=np.inf)), float(units.high.max(initial=-np.inf)))


def _sum_split_terms(norms: dict[tuple[int, int], float], m: int) -> float:
    """total[j]: sum over split sets inside {1..j-1} of the products of norms up to layer j (total[0] = 1)."""
    total = [1.0] + [0.0] * m
    for j in range(1, m + 1):
        total[j] = sum(total[i] * norms[(i, j)] for i in range(j))
    return total[m]


def _unit_partial_norms(
    weights: list[CertifiedMatrix], slopes: list[UnitSlopes]
) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], float]]:
    """||M(i, j) R_i|| and ||Q_j M(i, j) Q_i|| (certified) for 0 <= i < j <= m (see the caller)."""
    m = len(weights)
    mids = [torch.from_numpy(s.mid) for s in slopes]
    radii = [torch.from_numpy(s.radius) for s in slopes]
    roots = [torch.from_numpy(_sqrt_upper(s.radius)) for s in slopes]
    input_side: dict[tuple[int, int], float] = {}
    balanced_side: dict[tuple[int, int], float] = {}
    for i in range(m):
        product = weights[i]
        for j in range(i + 1, m + 1):
            if j > i + 1:
                product = weights[j - 1] @ product.scaled(left=mids[j - 2])
            r_in = radii[i - 1] if i > 0 else None
            q_in = roots[i - 1] if i > 0 else None
            q_out = roots[j - 1] if j < m else None
            input_side[(i, j)] = _scaled_norm(product, None, r_in)
            balanced_side[(i, j)] = _scaled_norm(product, q_out, q_in)
    return input_side, balanced_side


def _sqrt_upper(values: np.ndarray) -> np.ndarray:
    """q >= sqrt(v), exactly 0 where v is (sqrt is correctly rounded, one ulp up covers it)."""
    return np.where(values == 0.0, 0.0, np.nextafter(np.sqrt(values), np.inf))


def _scaled_norm(matrix: CertifiedMatrix, left: torch.Tensor | None, right: torch.Tensor | None) -> float:
    """Certified ||diag(left) M diag(right)||; rows and columns scaled by 0 are dropped first (exact: they
    are zero in the exact product too), which makes the norms of mostly stable layers cheap."""
    rows = slice(None) if left is None else torch.nonzero(left).flatten()
    cols = slice(None) if right is None else torch.nonzero(right).flatten()
    sub = CertifiedMatrix(matrix.matrix[rows][:, cols], matrix.bound[rows][:, cols], matrix.gamma)
    if sub.matrix.numel() == 0:
        return 0.0
    return sub.scaled(None if left is None else left[rows], None if right is None else right[cols]).norm_upper()


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


def eclipse_fast_bound(weights: list[CertifiedMatrix], slopes: list[AnySlope]) -> float | None:
    """ECLipsE-Fast, certified (None when a step cannot be certified, e.g. a degenerate layer).

    Per-unit slopes (``UnitSlopes``) take the step with per-unit constraint coefficients
    (``_unit_eclipse_step``); the last step does not involve the slopes."""
    m = len(weights)
    assert len(slopes) == m - 1
    x_prev: torch.Tensor | None = torch.eye(weights[0].shape[1], dtype=torch.float64)
    for i in range(m - 1):
        step = _unit_eclipse_step if isinstance(slopes[i], UnitSlopes) else _eclipse_step
        x_prev = step(weights[i], slopes[i], x_prev)  # type: ignore[arg-type]
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


# --------------------------------------------------------------------------------------------------
# ECLipsE-Fast with per-unit slopes


def _unit_eclipse_step(w: CertifiedMatrix, units: UnitSlopes, x_prev: torch.Tensor) -> torch.Tensor | None:
    """X_i from X_{i-1} with per-unit constraints -z_j^2 + 2 m_j y_j z_j - p_j y_j^2 >= 0 (y = W w).

    Weighting every unit's constraint by the same lambda, the step inequality is the PSD block
        [[X_{i-1} + lambda W^T P W, -lambda W^T M], [-lambda M W, lambda I - X_i]]   (M, P diagonal),
    which gives w^T X_{i-1} w >= z^T X_i z + lambda sum_j (constraint_j) >= z^T X_i z, as in the scalar case.
    The Schur complement gives X_i = lambda I - lambda^2 M W (X_{i-1} + lambda W^T P W)^-1 W^T M, and
    lambda = 1 / (2 lambda_max(M W X_{i-1}^-1 W^T M)) (the scalar choice with m W in place of m, W).
    """
    mid_np, prod_np = units.quadratic()
    mid, prod = torch.from_numpy(mid_np), torch.from_numpy(prod_np)
    if not bool((mid != 0).any()):
        return None
    a = w.matrix
    scaled = mid[:, None] * a  # M W
    try:
        k = scaled @ torch.linalg.solve(x_prev, scaled.T)
    except RuntimeError:
        return None
    top = float(torch.linalg.eigvalsh((k + k.T) / 2)[-1])
    if not top > 0:
        return None
    lam = 1.0 / (2.0 * top)
    for _ in range(40):
        gram_p = a.T @ (prod[:, None] * a)  # W^T P W
        try:
            inner = torch.linalg.solve(x_prev + lam * gram_p, scaled.T)
        except RuntimeError:
            lam /= 2
            continue
        x_new = lam * torch.eye(a.shape[0], dtype=torch.float64) - (lam * lam) * (scaled @ inner)
        stored = _unit_verified(w, x_prev, lam, mid, prod, (x_new + x_new.T) / 2)
        if stored is not None:
            return stored
        lam /= 2
    return None


def _unit_verified(
    w: CertifiedMatrix, x_prev: torch.Tensor, lam: float, mid: torch.Tensor, prod: torch.Tensor, x_new: torch.Tensor
) -> torch.Tensor | None:
    """x_new shrunk until the step block is proven PSD (None when shrinking stops helping)."""
    n_out = x_new.shape[0]
    shrink = 1e-8 * float(x_new.diagonal().abs().max()) + 1e-300
    margins: list[float] = []
    for _ in range(30):
        stored = x_new - shrink * torch.eye(n_out, dtype=torch.float64)
        block = _unit_step_matrix(x_prev, w.matrix, lam, mid, prod, stored)
        margins.append(min_eigenvalue_lower(block, _unit_step_error(w, x_prev, lam, mid, prod, stored)))
        if margins[-1] >= 0.0:
            return stored
        if len(margins) >= 4 and margins[-1] <= margins[-4]:
            return None
        shrink *= 4
    return None


def _unit_step_matrix(
    x_prev: torch.Tensor, a: torch.Tensor, lam: float, mid: torch.Tensor, prod: torch.Tensor, x_new: torch.Tensor
) -> torch.Tensor:
    """[[X_{i-1} + lam W^T P W, -lam W^T M], [-lam M W, lam I - X_i]] (see ``_unit_eclipse_step``)."""
    n_out = a.shape[0]
    cross = (-lam * mid)[:, None] * a
    top = torch.cat([x_prev + a.T @ ((lam * prod)[:, None] * a), cross.T], dim=1)
    bottom = torch.cat([cross, lam * torch.eye(n_out, dtype=torch.float64) - x_new], dim=1)
    return torch.cat([top, bottom], dim=0)


def _unit_step_error(
    w: CertifiedMatrix, x_prev: torch.Tensor, lam: float, mid: torch.Tensor, prod: torch.Tensor, x_new: torch.Tensor
) -> float:
    """Frobenius bound on (exact block for the exact W) - (computed block): the scalar bound with |p| and |m|
    moved onto the rows of |W| (each coefficient's product rounds once, as the scalar's lam * p does)."""
    g, bound = w.gamma, w.bound
    k = w.shape[0] + 2
    abs_p, abs_m = prod.abs(), mid.abs()
    quad_bound = _fro(bound.T @ (abs_p[:, None] * bound))
    quad = _fro(w.matrix.T @ (abs_p[:, None] * w.matrix))
    return (
        lam * ((2 * g + g * g) + 2.0 * k * UNIT_ROUNDOFF) * quad_bound * (1 + 1e-10)
        + math.sqrt(2.0) * lam * (g + 4 * UNIT_ROUNDOFF) * _fro(abs_m[:, None] * bound)
        + 4 * UNIT_ROUNDOFF * (_fro(x_prev) + lam * quad + _fro(x_new) + lam * math.sqrt(x_new.shape[0]))
    )
