"""Per-channel rescaling across activations: W2 D W1 = (W2 S^-1) D (S W1) for every positive diagonal S.

The chain bounds model each activation as a diagonal D of difference quotients, and diagonals commute, so
any positive diagonal S may be moved across an activation without changing the map (for the nonlinear
function itself this is positive homogeneity; for the bounds it holds for every activation). Products of
norms are not invariant: ||W2 S^-1|| ||S W1|| is often far smaller than ||W2|| ||W1|| when the channels'
scales differ (a folded BatchNorm, a trained network). S balances the norm of each channel's row in W1 with
its column in W2. Powers of two only: the rescaled matrices are exact, so their rounding bounds carry over.
"""

from __future__ import annotations

import torch

from lipcheck.refine.affine import CertifiedMatrix

SWEEPS = 3


def power_of_two_balance(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """s_j = 2^round(log2 sqrt(columns_j / rows_j)): after scaling row j by s_j and column j by 1 / s_j their
    norms are within a factor 2 of each other (1 where a norm is zero: nothing to balance)."""
    usable = (rows > 0) & (columns > 0)
    ratio = torch.where(usable, columns / torch.where(usable, rows, torch.ones_like(rows)), torch.ones_like(rows))
    return torch.exp2(torch.round(0.5 * torch.log2(ratio)))


def _scale_rows(matrix: CertifiedMatrix, s: torch.Tensor) -> CertifiedMatrix:
    return CertifiedMatrix(matrix.matrix * s[:, None], matrix.bound * s[:, None], matrix.gamma)


def _scale_columns(matrix: CertifiedMatrix, s: torch.Tensor) -> CertifiedMatrix:
    return CertifiedMatrix(matrix.matrix / s[None, :], matrix.bound / s[None, :], matrix.gamma)


def balanced(weights: list[CertifiedMatrix]) -> list[CertifiedMatrix] | None:
    """The chain's matrices with a power-of-two diagonal moved across every activation (same map, same D's);
    None when every scale is 1 (the chain is balanced already)."""
    result = list(weights)
    changed = False
    for _ in range(SWEEPS):
        for i in range(len(result) - 1):
            rows = torch.linalg.vector_norm(result[i].matrix, dim=1)
            columns = torch.linalg.vector_norm(result[i + 1].matrix, dim=0)
            s = power_of_two_balance(rows, columns)
            if bool((s == 1).all()):
                continue
            result[i], result[i + 1] = _scale_rows(result[i], s), _scale_columns(result[i + 1], s)
            changed = True
    return result if changed else None
