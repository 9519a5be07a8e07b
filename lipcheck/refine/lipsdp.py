"""LipSDP-neuron (Fazlyab et al., NeurIPS 2019) for small chains, certified after solving.

Needs the optional extra ``lipcheck[sdp]`` (cvxpy with the open Clarabel/SCS solvers). The SDP finds
per-neuron multipliers T_i >= 0 and the smallest rho with

    F(rho, T) = [[rho I + p_1 W_1^T T_1 W_1, -m_1 W_1^T T_1, 0, ...],
                 [-m_1 T_1 W_1, T_1 + p_2 W_2^T T_2 W_2, -m_2 W_2^T T_2, ...],
                 ...,
                 [..., -m_{l-1} T_{l-1} W_{l-1}, T_{l-1} - W_l^T W_l]]  PSD

(p_i = a_i b_i, m_i = (a_i + b_i)/2 from the slope interval [a_i, b_i]); then L <= sqrt(rho). The solver
answers only to its tolerance, so its rho is not yet a bound. We ask it for F >= margin * I (a strictly
feasible point), keep the returned T (clipped at 0), inflate rho, and accept rho only when the assembled
F, in float64, has a rigorously nonnegative smallest eigenvalue (``min_eigenvalue_lower``: eigvalsh with
backward-error and assembly-rounding margins). The certified value is sqrt of that verified rho.

Per-unit slopes (``UnitSlopes``): neuron j of layer i has its own constraint -z^2 + 2 m_ij y z - p_ij y^2 >= 0
(``UnitSlopes.quadratic``), so p_i T_i and m_i T_i become diag(p_i) T_i and diag(m_i) T_i: the same
S-procedure, one multiplier per neuron as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lipcheck.ops import Slope, UnitSlopes
from lipcheck.refine.affine import CertifiedMatrix
from lipcheck.refine.bounds import min_eigenvalue_lower
from lipcheck.spectral.dense import UNIT_ROUNDOFF

MAX_SIZE = 128  # side of the LMI (inputs + hidden neurons): cvxpy + Clarabel took 640 s at side 160 here
MAX_COEFFICIENTS = 4_000_000  # sum of n_i * n_(i-1)^2: the size of the problem cvxpy builds


def available() -> bool:
    try:
        import cvxpy  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class LipSDPResult:
    value: float  # certified: sqrt of the verified rho
    solver_value: float  # sqrt of the solver's rho (not a certificate by itself)
    solver: str


Coefficient = float | torch.Tensor  # a scalar slope's (int or float), or per neuron


def coefficients(slope: Slope | UnitSlopes) -> tuple[Coefficient, Coefficient]:
    """(p, m) of the slope constraint: floats for a scalar slope, per-neuron vectors for ``UnitSlopes``."""
    if isinstance(slope, Slope):
        return slope.low * slope.high, slope.mid
    mid, p = slope.quadratic()
    return torch.from_numpy(p), torch.from_numpy(mid)


def _weighted(coefficient: Coefficient, t: torch.Tensor) -> tuple[float, torch.Tensor]:
    """coefficient * diag(t) as (scalar, vector): a scalar stays outside (the scalar code's own rounding)."""
    if not isinstance(coefficient, torch.Tensor):
        return coefficient, t
    return 1.0, coefficient * t


def lmi_matrix(
    weights: list[torch.Tensor], slopes: list[Slope | UnitSlopes], multipliers: list[torch.Tensor], rho: float
) -> torch.Tensor:
    """F(rho, T) assembled in float64 (see the module docstring)."""
    sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights[:-1]]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    total = int(offsets[-1])
    f = torch.zeros((total, total), dtype=torch.float64)
    f[: sizes[0], : sizes[0]] = rho * torch.eye(sizes[0], dtype=torch.float64)
    for i, (w, slope, t) in enumerate(zip(weights[:-1], slopes, multipliers, strict=True)):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        nxt = int(offsets[i + 2])
        (p, pt), (mid, mt) = (_weighted(c, t) for c in coefficients(slope))
        f[lo:hi, lo:hi] += p * (w.T @ (pt[:, None] * w))
        f[lo:hi, hi:nxt] = -mid * (w.T * mt[None, :])
        f[hi:nxt, lo:hi] = -mid * (mt[:, None] * w)
        f[hi:nxt, hi:nxt] += torch.diag(t)
    last = weights[-1]
    lo = int(offsets[-2])
    f[lo:, lo:] -= last.T @ last
    return f


def _assembly_error(
    weights: list[CertifiedMatrix], slopes: list[Slope | UnitSlopes], multipliers: list[torch.Tensor], rho: float
) -> float:
    """Frobenius bound on F(exact W) - computed F: weight errors (gamma) and the rounding of each product."""
    error = 4 * UNIT_ROUNDOFF * rho * math.sqrt(weights[0].shape[1])
    for w, slope, t in zip(weights[:-1], slopes, multipliers, strict=True):
        g, b = w.gamma, w.bound
        k = w.shape[0] + 4
        # |p| |t| and |m| |t| (a vector coefficient folded into t: its product rounds once more, inside k's +4)
        (p, pt), (mid, mt) = (
            _weighted(c.abs() if isinstance(c, torch.Tensor) else abs(c), t) for c in coefficients(slope)
        )
        quad = float(torch.linalg.matrix_norm(b.T @ (pt[:, None] * b), ord="fro"))
        error += p * ((2 * g + g * g) * (1 + 1e-10) + 2.0 * k * UNIT_ROUNDOFF) * quad
        error += (
            math.sqrt(2.0) * mid * (g + 4 * UNIT_ROUNDOFF) * float(torch.linalg.matrix_norm(mt[:, None] * b, ord="fro"))
        )
        error += 4 * UNIT_ROUNDOFF * float(t.abs().sum())
    last = weights[-1]
    g = last.gamma
    gram = float(torch.linalg.matrix_norm(last.bound.T @ last.bound, ord="fro"))
    error += ((2 * g + g * g) * (1 + 1e-10) + 2.0 * (last.shape[0] + 4) * UNIT_ROUNDOFF) * gram
    return error * 2.0  # the sums of the blocks into F round once more


def fits(weights: list[CertifiedMatrix]) -> bool:
    """Small enough for the SDP (see MAX_SIZE, MAX_COEFFICIENTS)."""
    side = weights[0].shape[1] + sum(w.shape[0] for w in weights[:-1])
    coefficients = sum(w.shape[0] * w.shape[1] ** 2 for w in weights[:-1])
    return side <= MAX_SIZE and coefficients <= MAX_COEFFICIENTS


def lipsdp_bound(weights: list[CertifiedMatrix], slopes: list[Slope | UnitSlopes]) -> LipSDPResult | None:
    """Solve LipSDP-neuron and certify it; None when cvxpy is missing, the chain is too large or not verified."""
    if not available() or len(weights) < 2 or not fits(weights):
        return None
    mats = [w.matrix.numpy() for w in weights]
    # scale the problem so the product bound is ~1: better conditioned for the solver
    scales = [max(float(np.linalg.norm(m, 2)), 1e-300) for m in mats]
    solved = _solve([m / s for m, s in zip(mats, scales, strict=True)], slopes)
    if solved is None:
        return None
    t_values, rho_value, solver_used = solved
    # undo the scaling: W_i = s_i V_i. With T_i' = T_i * (prod_{j>i} s_j^2) / s_i^2 ... the LMI is
    # homogeneous, so rescale by verifying on the real weights with multipliers mapped accordingly.
    multipliers = []
    for i, t in enumerate(t_values):
        later = math.prod(scales[i + 1 :])
        factor = later * later  # T_i multiplies z_i, where z_i scales like prod_{j<=i} s_j
        multipliers.append(torch.from_numpy(np.clip(np.asarray(t, dtype=np.float64), 0.0, None) * factor))
    total_scale = math.prod(scales)
    solver_rho = rho_value * total_scale * total_scale
    tensors = [w.matrix for w in weights]
    inflation = 1e-9
    for _ in range(30):
        candidate = max(solver_rho, 0.0) * (1 + inflation) + 1e-300
        f_num = lmi_matrix(tensors, slopes, multipliers, candidate)
        error = _assembly_error(weights, slopes, multipliers, candidate)
        if min_eigenvalue_lower(f_num, error) >= 0.0:
            return LipSDPResult(
                math.sqrt(candidate) * (1 + 2 * UNIT_ROUNDOFF), math.sqrt(max(solver_rho, 0.0)), solver_used.lower()
            )
        inflation *= 4
    return None


def _solve(scaled: list[np.ndarray], slopes: list[Slope | UnitSlopes]) -> tuple[list[np.ndarray], float, str] | None:
    """The solver's multipliers T_i and rho for the scaled weights (None when no solver succeeds)."""
    import cvxpy as cp

    ts = [cp.Variable(m.shape[0], nonneg=True) for m in scaled[:-1]]
    rho = cp.Variable(nonneg=True)
    n0 = scaled[0].shape[1]
    sizes = [n0] + [m.shape[0] for m in scaled[:-1]]
    blocks: list[list] = [[np.zeros((sizes[i], sizes[j])) for j in range(len(sizes))] for i in range(len(sizes))]
    blocks[0][0] = rho * np.eye(n0)
    for i, (w, slope, t) in enumerate(zip(scaled[:-1], slopes, ts, strict=True)):
        p, mid = coefficients(slope)
        diag_t = cp.diag(t)
        if isinstance(slope, Slope):  # the scalar form, as before
            if p != 0.0:
                blocks[i][i] = blocks[i][i] + p * (w.T @ diag_t @ w)
            blocks[i][i + 1] = -mid * (w.T @ diag_t)
            blocks[i + 1][i] = -mid * (diag_t @ w)
        else:
            diag_pt, diag_mt = (cp.diag(cp.multiply(c.numpy(), t)) for c in (p, mid))  # type: ignore[union-attr]
            blocks[i][i] = blocks[i][i] + w.T @ diag_pt @ w
            blocks[i][i + 1] = -(w.T @ diag_mt)
            blocks[i + 1][i] = -(diag_mt @ w)
        blocks[i + 1][i + 1] = diag_t
    last = scaled[-1]
    blocks[-1][-1] = blocks[-1][-1] - last.T @ last
    f = cp.bmat(blocks)
    margin = 1e-7
    problem = cp.Problem(cp.Minimize(rho), [(f + f.T) / 2 >> margin * np.eye(sum(sizes))])
    for solver in ("CLARABEL", "SCS"):
        if solver not in cp.installed_solvers():
            continue
        try:
            problem.solve(solver=solver)
        except cp.SolverError:
            continue
        if problem.status in ("optimal", "optimal_inaccurate") and rho.value is not None:
            return [np.asarray(t.value) for t in ts], float(rho.value), solver
    return None
