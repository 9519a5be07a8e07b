"""Residual blocks proved as a whole: the LipSDP / SLL certificate with per-channel multipliers, per frequency.

For a block y = a S x + b A D B x (skip S, branch B -> activation with slopes in [p, q] -> A; see
``lipcheck.refine.regions`` for how convolutions are lifted to one circular grid), every z = D B x obeys
2 (z - p B x)^H Lam (q B x - z) >= 0 for any diagonal Lam >= 0. So if

    M = [[rho^2 I - a^2 S^H S + 2 p q B^H Lam B,   -(a b S^H A + (p + q) B^H Lam)],
         [-(a b S^H A + (p + q) B^H Lam)^H,         2 Lam - b^2 A^H A            ]]

is positive semidefinite, ||y - y'|| <= rho ||x - x'|| (Fazlyab et al. 2019 for one layer; Araujo et al. 2023
build their SLL blocks so that it holds with rho = 1). With Lam the same on every position of a channel, M is
shift-invariant: PSD iff its matrix is PSD at every frequency. Lam: per channel, the least-squares solution of
a b S^H A + (p + q) B^H Lam = 0 (exactly zero for SLL and AOC blocks), then a few scalings of it; rho^2 from
the Schur complement, then certified by eigenvalue bounds on M with its rounding margins.
"""

from __future__ import annotations

import math

import torch

from lipcheck.graph import Graph
from lipcheck.refine.regions import Block, Cut, Linear, NotLiftable, Region, lift
from lipcheck.spectral.dense import UNIT_ROUNDOFF
from lipcheck.spectral.frequency import FrequencyMatrices

SCALINGS = (1.0, 0.7, 1.4, 0.5, 2.0, 0.3, 3.0)
REFINE_STEPS = 40  # golden-section steps on the multipliers' scale, fewer where one evaluation is costly
SEARCH_FLOPS = 2e10  # about the work the search may spend per family of multipliers
MAX_ORDER = 768  # channels plus hidden channels of one frequency's matrix M
MAX_ENTRIES = 1 << 22  # entries of M over all frequencies (each search step solves and factors at that size)


def block_bound(region: Region, graph: Graph) -> float | None:
    """A certified rho for the region's one block, or None when the certificate does not apply or fails."""
    lifted = lift(region, graph)
    (block,) = [item for item in lifted.items if isinstance(item, Block)]
    cuts = [item for item in block.branch if isinstance(item, Cut)]
    if len(cuts) != 1 or any(isinstance(item, Block) for item in block.branch) or len(lifted.items) != 1:
        return None
    where = block.branch.index(cuts[0])
    slope = cuts[0].slope
    ops = lifted.operators
    channels = lifted.channels[id(block)]
    freqs = lifted.frequencies
    skip = _product([ops[id(i)] for i in block.skip]) or FrequencyMatrices.identity(channels, freqs)
    before = _product([ops[id(i)] for i in block.branch[:where] if isinstance(i, Linear)])
    after = _product([ops[id(i)] for i in block.branch[where + 1 :] if isinstance(i, Linear)])
    if before is None or after is None:
        return None
    hidden = before.shape[0]
    order = skip.shape[1] + hidden
    if order > MAX_ORDER or freqs * order**2 > MAX_ENTRIES:
        raise NotLiftable(f"{freqs} matrices of order {order}")
    problem = _Problem(skip, before, after, block.signs, slope.low, slope.high)
    return problem.solve()


def _product(operators: list[FrequencyMatrices]) -> FrequencyMatrices | None:
    result: FrequencyMatrices | None = None
    for operator in operators:
        result = operator if result is None else operator @ result
    return result


class _Problem:
    """The block's matrices at every frequency and the search for Lam and rho."""

    def __init__(
        self,
        skip: FrequencyMatrices,
        before: FrequencyMatrices,
        after: FrequencyMatrices,
        signs: tuple[float, float],
        low: float,
        high: float,
    ):
        self.s, self.b_mat, self.a_mat = skip, before, after
        self.a, self.b = signs
        self.p, self.q = low, high
        s, bm, am = skip.matrix, before.matrix, after.matrix
        self.ss = s.mH @ s
        self.sa = s.mH @ am  # [F, c, h]
        self.aa = am.mH @ am  # [F, h, h]
        self.bh = bm.mH  # [F, c, h]

    def least_squares(self) -> torch.Tensor | None:
        """Per hidden channel k: the lam_k >= 0 closest to zeroing column k of a b S^H A + (p + q) B^H lam."""
        if self.p + self.q == 0:
            return None
        target = -(self.a * self.b) * self.sa
        num = (self.bh.conj() * target).real.sum(dim=(0, 1))
        den = (self.bh.abs() ** 2).sum(dim=(0, 1)) * (self.p + self.q)
        lam = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
        top = float(lam.max())
        return lam.clamp_min(1e-6 * top) if top > 0 else None

    def rho_squared(self, lam: torch.Tensor) -> float | None:
        """The smallest rho^2 making M PSD for this Lam (Schur complement), or None when 2 Lam - b^2 A^H A is not PD."""
        p_mat = torch.diag_embed(2 * lam).to(self.aa.dtype) - self.b**2 * self.aa
        chol, info = torch.linalg.cholesky_ex(p_mat)
        if bool((info != 0).any()):
            return None
        c_mat = -(self.a * self.b * self.sa + (self.p + self.q) * self.bh * lam)
        solved = torch.cholesky_solve(c_mat.mH, chol)  # P^-1 C^H
        bl = self.bh * lam  # B^H Lam
        q_mat = self.a**2 * self.ss - 2 * self.p * self.q * (bl @ self.b_mat.matrix) + c_mat @ solved
        q_mat = (q_mat + q_mat.mH) / 2
        return float(torch.linalg.eigvalsh(q_mat)[..., -1].max())

    def solve(self) -> float | None:
        """The best rho over two families of multipliers, each scaled: the least-squares fit (exact for SLL-type
        blocks) and the diagonal of b^2 A^H A (which keeps 2 Lam - b^2 A^H A positive definite for scales > 1/2)."""
        best: tuple[float, torch.Tensor] | None = None
        for base in (self.least_squares(), self.output_weights()):
            if base is None:
                continue
            found = [(value, scale) for scale in SCALINGS if (value := self.rho_squared(base * scale)) is not None]
            if not found:
                continue
            value, scale = self.refine_scale(base, *min(found)[::-1])
            if best is None or value < best[0]:
                best = (value, base * scale)
        return None if best is None else self.certify(best[1], max(best[0], 0.0))

    def output_weights(self) -> torch.Tensor | None:
        """b^2 times the largest diagonal entry of A^H A over frequencies, per hidden channel."""
        diagonal = self.aa.diagonal(dim1=-2, dim2=-1).real.amax(dim=0) * self.b**2
        top = float(diagonal.max()) if diagonal.numel() else 0.0
        return diagonal.clamp_min(1e-6 * top) if top > 0 else None

    def refine_scale(self, base: torch.Tensor, scale: float, value: float) -> tuple[float, float]:
        """Golden-section search on log(scale) around the best coarse scaling (rho^2 is often smallest right at
        the edge where 2 Lam - b^2 A^H A stops being positive definite, e.g. for orthogonal kernels)."""
        lo, hi = math.log(scale) - 0.7, math.log(scale) + 0.7
        best = (value, scale)
        ratio = (math.sqrt(5) - 1) / 2
        freqs, c, h = self.sa.shape
        per_step = 2 * 10.0 * freqs * (c**3 + h**3 + c * c * h)  # two Cholesky/eigensolves of each side
        steps = int(min(REFINE_STEPS, max(4, SEARCH_FLOPS / per_step)))
        for _ in range(steps):
            left, right = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
            f_left, f_right = self.rho_squared(base * math.exp(left)), self.rho_squared(base * math.exp(right))
            for found, x in ((f_left, left), (f_right, right)):
                if found is not None and found < best[0]:
                    best = (found, math.exp(x))
            # an infeasible point (None) lies on the small side: the feasible minimum is to its right
            if f_left is None or (f_right is not None and f_right <= f_left):
                lo = left
            else:
                hi = right
        return best

    def certify(self, lam: torch.Tensor, rho2: float) -> float | None:
        """rho for which M is proven PSD at every frequency (rounding of M's entries and of the eigensolver
        included), trying a few small increases of rho^2."""
        matrix, error = self.matrix(lam)
        n = matrix.shape[-1]
        top = torch.zeros(n, dtype=matrix.dtype)
        top[: self.ss.shape[-1]] = 1
        for bump in (1e-9, 1e-7, 1e-5, 1e-3):
            candidate = rho2 * (1 + bump) + bump * 1e-6 + error
            full = matrix + candidate * torch.diag_embed(top)
            values = torch.linalg.eigvalsh(full)
            fro = torch.linalg.matrix_norm(full, ord="fro")
            lower = values[..., 0] - 32.0 * n * UNIT_ROUNDOFF * fro - error - 4 * UNIT_ROUNDOFF * candidate
            if bool((lower >= 0).all()):
                return math.sqrt(candidate) * (1 + 2 * UNIT_ROUNDOFF)
        return None

    def matrix(self, lam: torch.Tensor) -> tuple[torch.Tensor, float]:
        """M without its rho^2 I term, and a bound on the spectral norm of its error at every frequency."""
        lam_c = lam.to(self.aa.dtype)
        bl = self.bh * lam_c
        top_left = -(self.a**2) * self.ss + 2 * self.p * self.q * (bl @ self.b_mat.matrix)
        off = -(self.a * self.b * self.sa + (self.p + self.q) * bl)
        bottom = torch.diag_embed(2 * lam_c) - self.b**2 * self.aa
        full = torch.cat([torch.cat([top_left, off], dim=2), torch.cat([off.mH, bottom], dim=2)], dim=1)
        full = (full + full.mH) / 2
        return full, self._error(lam)

    def _error(self, lam: torch.Tensor) -> float:
        """|M_computed - M_exact| <= eta |M|_bound entrywise: every product of two certified operators is off by
        (gamma_x + gamma_y + gamma_x gamma_y + 2 (k + 8) u) times the product of their bounds."""
        bs, ba, bb = self.s.bound, self.a_mat.bound, self.b_mat.bound
        k = max(bs.shape + ba.shape + bb.shape)
        gamma = max(self.s.gamma, self.a_mat.gamma, self.b_mat.gamma)
        eta = 3 * gamma + gamma * gamma + 2 * (k + 8) * UNIT_ROUNDOFF * (1 + gamma) ** 2 + 8 * UNIT_ROUNDOFF
        scaled = bb.T * lam  # |B|^T Lam
        parts = [
            self.a**2 * (bs.T @ bs) + 2 * abs(self.p * self.q) * (scaled @ bb),
            abs(self.a * self.b) * (bs.T @ ba) + abs(self.p + self.q) * scaled,
            self.b**2 * (ba.T @ ba) + 2 * torch.diag(lam),
        ]
        squares = [float(torch.linalg.matrix_norm(x, ord="fro")) ** 2 for x in parts]
        return eta * math.sqrt(squares[0] + 2 * squares[1] + squares[2]) * (1 + 1e-6)
