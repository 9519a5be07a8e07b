"""Certified norm of a stride-1 circular convolution on a grid: max over frequencies of sigma_max(K_hat(w)).

Cost is what matters here (every convolution of a network with a known input size lands here), so the
per-frequency work is the cheapest that still certifies:

* Gram taps instead of per-frequency products. With K_hat(w) = sum_a K_a exp(-i w.a), the Gram
  matrix is K_hat(w) K_hat(w)^H = sum_delta H_delta exp(-i w.delta) with the real matrices
  H_delta = sum_b K_{b+delta} K_b^T (and H_{-delta} = H_delta^T). They are formed once in float64,
  on the smaller channel side, and every frequency's Gram matrix is then one small real matrix
  product away (two for the real and imaginary parts) instead of a complex c_out x c_in x c_in product.
* Half the frequencies: a real kernel has K_hat(-w) = conj(K_hat(w)), same singular values; each
  pair {w, -w} of the grid is evaluated once.
* No eigensolver per frequency: Lanczos estimates on the first chunk pick the frequency whose exact
  top eigenvalue (``eigvalsh``) seeds ``RunningMaxEigenvalue``; every frequency is then certified
  below that value times 1 + tol with one Cholesky each (Rump's criterion); only those that fail are
  estimated again, evaluated exactly and retested.
* Single precision where it is decisive: for up to ~290 channels the Rump allowance of a float32
  Cholesky is below 1% of the level, so each chunk is assembled and tested in float32 (with a proven
  bound on the float32 assembly error) and only the frequencies it cannot prove are redone in float64.

Rounding: every computed Gram entry differs from the exact one by at most eta * (S S^T)_ij with
S = sum_a |K_a| (entrywise) and eta covering the float64 tap products, the sum over delta and the
phases (real and imaginary parts each), so the computed matrices are within 4 eta ||S||_F^2 of the
exact ones in spectral norm; that absolute margin is added before the square root.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lipcheck.spectral.dense import UNIT_ROUNDOFF, rounding_gamma, to_float64
from lipcheck.spectral.hermitian import (
    SINGLE_MAX_MARGIN,
    SINGLE_ROUNDOFF,
    RunningMaxEigenvalue,
    Workspace,
    certify_below,
    lanczos_estimate,
    rump_alpha,
    single_margin,
    single_precision_is_exact_ieee,
)

# Complex128 Gram entries per chunk of frequencies (8 MiB, about a quarter of the L3 cache of a
# server core complex): small enough that assembling, estimating and factorising stay in cache.
CHUNK_ENTRIES = 512 * 1024
# On a GPU the cache argument does not hold and each chunk costs launches and synchronisations:
# 16 Mi entries (256 MiB of complex128) per chunk, so that most layers are one or two chunks.
CHUNK_ENTRIES_GPU = 16 * 1024 * 1024
MIN_CHUNK = 8  # but at least this many frequencies (large channel counts: fewer, fatter calls)
# Relative tolerance of the certified maximum eigenvalue (the norm, its square root, gets half):
# at least this, and well above the Cholesky test's own rounding allowance (see ``eigen_tol``).
EIGEN_TOL = 1e-10


def eigen_tol(order: int) -> float:
    """Tolerance of the Cholesky certificate for matrices of this order: ``EIGEN_TOL``, or 8 times
    Rump's relative shift (at most alpha * n) where that is larger, so that the test at
    ``L * (1 + tol)`` passes on the matrix whose top eigenvalue is ``L``."""
    return max(EIGEN_TOL, 8.0 * rump_alpha(order) * order)


def half_grid_indices(grid: Sequence[int], device: torch.device) -> torch.Tensor:
    """Integer frequency indices ``[F, d]`` of the grid, one per pair {j, -j mod grid}."""
    mesh = torch.meshgrid(*[torch.arange(m, device=device) for m in grid], indexing="ij")
    idx = torch.stack([m.reshape(-1) for m in mesh], dim=1)
    sizes = torch.tensor(list(grid), device=device)
    neg = (-idx) % sizes
    # keep j when j <= -j in lexicographic order: compare the flat (row-major) positions
    strides = torch.tensor([math.prod(grid[i + 1 :]) for i in range(len(grid))], device=device)
    return idx[(idx * strides).sum(dim=1) <= (neg * strides).sum(dim=1)]


def gram_taps(kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``kernel [g, n, c, *A]`` (n <= c preferred) -> offsets ``[D, d]``, taps ``[D, g, n, n]``, max pairs.

    H_delta = sum_b K_{b+delta} K_b^T over every delta in the difference set, float64. Only the
    half with delta >= 0 (lexicographically) is multiplied out; the rest are transposes.
    """
    g, n, c, *taps = kernel.shape
    d = len(taps)
    k = to_float64(kernel).reshape(g, n, c, -1)
    device = kernel.device
    ranges = [range(-(a - 1), a) for a in taps]
    half: list[tuple[int, ...]] = []
    for delta in _product(ranges):
        nonzero = [x for x in delta if x != 0]
        if not nonzero or nonzero[0] > 0:
            half.append(delta)
    strides = [math.prod(taps[i + 1 :]) for i in range(d)]
    by_tap = k.permute(3, 0, 1, 2).contiguous()  # [T, g, n, c]: one contiguous matrix per tap
    mats = []
    most_pairs = 1
    for delta in half:
        # sum over b with 0 <= b and b + delta < A on every axis: one product per pair, no copies
        lows = [max(0, -x) for x in delta]
        highs = [min(a, a - x) for a, x in zip(taps, delta, strict=True)]
        bs = list(_product([range(lo, hi) for lo, hi in zip(lows, highs, strict=True)]))
        most_pairs = max(most_pairs, len(bs))
        shift = sum(x * s for x, s in zip(delta, strides, strict=True))
        acc: torch.Tensor | None = None
        for bb in bs:
            flat = sum(b * s for b, s in zip(bb, strides, strict=True))
            term = by_tap[flat + shift] @ by_tap[flat].mT
            acc = term if acc is None else acc.add_(term)
        assert acc is not None
        mats.append(acc)
    h_half = torch.stack(mats)
    offsets_half = torch.tensor(half, dtype=torch.long, device=device).reshape(-1, d)
    h = torch.cat([h_half, h_half[1:].mT])
    offsets = torch.cat([offsets_half, -offsets_half[1:]])
    return offsets, h, most_pairs


def _product(ranges: Sequence[range]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for r in ranges:
        out = [p + (x,) for p in out for x in r]
    return out


def grid_norm(kernel: torch.Tensor, grid: Sequence[int]) -> float:
    """Certified max over the grid's frequencies of sigma_max(K_hat(w)) for ``kernel [g, c_out, c_in, *A]``.

    Within ``eigen_tol(n) / 2`` (relative, plus the rounding margin) above the exact value.
    """
    g, c_out, c_in, *taps = kernel.shape
    if len(grid) != len(taps):
        raise ValueError(f"grid {tuple(grid)} does not match a {len(taps)}-d kernel")
    k = to_float64(kernel)
    if c_out > c_in:  # K_hat(w)^T has the same singular values: Gram on the smaller side
        k = k.transpose(1, 2)
    if not bool(torch.isfinite(k).all()):
        return math.inf
    peak = float(k.abs().max()) if k.numel() else 0.0
    if peak == 0.0:
        return 0.0
    # exact power-of-two scaling: largest entry in [0.5, 1), undone at the end
    exponent = math.frexp(peak)[1]
    k = torch.ldexp(k, torch.tensor(-exponent, dtype=torch.float64, device=k.device))
    grams = _Grams.of(k, grid)
    running = _sweep(grams, half_grid_indices(grid, k.device), g)
    top = running.upper + grams.abs_margin
    value = math.sqrt(top) * (1.0 + 4.0 * UNIT_ROUNDOFF)
    return math.ldexp(value, exponent)


@dataclass
class _Grams:
    """The Gram matrices of a scaled kernel at integer frequencies, assembled from its Gram taps."""

    offsets: torch.Tensor
    sizes: torch.Tensor
    h_flat: torch.Tensor
    h_single: torch.Tensor
    n: int
    abs_margin: float  # absolute rounding margin of every float64 Gram entry's effect on the spectrum
    single_error: float  # spectral distance of the single-precision assembly from the double one
    use_single: bool
    workspace: Workspace

    @staticmethod
    def of(k: torch.Tensor, grid: Sequence[int]) -> _Grams:
        n, c = k.shape[1], k.shape[2]
        offsets, h, most_pairs = gram_taps(k)
        n_offsets = offsets.shape[0]
        # entrywise rounding of every Gram entry (real and imaginary part each) relative to S S^T:
        # tap products (<= most_pairs * c terms), the sum over offsets, phases within 128 u
        eta = rounding_gamma(most_pairs * c + n_offsets + 8)
        eta += (1.0 + rounding_gamma(n_offsets + 8)) * 160.0 * UNIT_ROUNDOFF
        s_fro2 = float((k.abs().sum(dim=tuple(range(3, k.dim())))).square().sum(dim=(1, 2)).max())
        # single-precision Gram matrices differ from the double ones by at most this (spectral norm):
        # rounding h and the phases to float32 and the float32 sum over offsets, entrywise relative
        # to S S^T like eta (both matrices' own errors counted)
        single_error = 4.0 * (rounding_gamma(n_offsets + 8, SINGLE_ROUNDOFF) + 2.0 * eta) * s_fro2
        use_single = (
            single_margin(n) <= SINGLE_MAX_MARGIN
            and math.isfinite(single_error)
            and single_precision_is_exact_ieee(k.device)
        )
        h_flat = h.reshape(n_offsets, -1)
        return _Grams(
            offsets=offsets,
            sizes=torch.tensor(list(grid), device=k.device),
            h_flat=h_flat,
            h_single=h_flat.to(torch.float32) if use_single else h_flat,
            n=n,
            abs_margin=2.0 * 2.0 * eta * s_fro2,
            single_error=single_error,
            use_single=use_single,
            workspace=Workspace(k.device),
        )

    def at(self, idx: torch.Tensor, single: bool = False, negated: bool = False, reuse: bool = False) -> torch.Tensor:
        """Gram matrices ``[len(idx) * g, n, n]`` (complex128, or complex64) at integer frequencies.

        With ``negated``, -G (for ``certify_below(..., negated=True)``: the sign is put on the small
        phase matrices, so no pass over the batch is spent on it). ``reuse``: into the workspace's
        buffers (the previous chunk's result is overwritten)."""
        # phase fraction (j . delta / m) mod 1 from exact integer products, one rounding per axis
        residues = (idx[:, None, :] * self.offsets[None, :, :]) % self.sizes  # [F, D, d]
        frac = (residues.to(torch.float64) / self.sizes.to(torch.float64)).sum(dim=-1)
        angle = (2.0 * math.pi) * torch.remainder(frac, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        cos, sin = (-cos, sin) if negated else (cos, -sin)
        # one real product for both parts (the taps, often the largest operand, are read once)
        phases = torch.cat([cos, sin])
        taps = self.h_single if single else self.h_flat
        count = len(idx)
        parts_out = self.workspace.take("parts", (2 * count, taps.shape[1]), taps.dtype) if reuse else None
        parts = torch.matmul(phases.to(taps.dtype), taps, out=parts_out)
        complex_dtype = torch.complex64 if single else torch.complex128
        grams_out = self.workspace.take("grams", (count, taps.shape[1]), complex_dtype) if reuse else None
        return torch.complex(parts[:count], parts[count:], out=grams_out).reshape(-1, self.n, self.n)


def _sweep(grams: _Grams, freqs: torch.Tensor, g: int) -> RunningMaxEigenvalue:
    """Every frequency's top eigenvalue proven below a running level, which rises only to exact values.

    One pass over chunks small enough to stay in cache between assembling and testing them (on a
    GPU: large chunks, few launches). The first chunk is estimated (Lanczos) to find the frequency
    whose exact value seeds the level (that value times 1 + tol); every chunk is then assembled as
    -G and tested in place by Cholesky at that level, in float32 where that is decisive enough
    (with the proven float32 assembly error), else in float64. What a float32 test cannot prove
    is assembled again in float64 and resolved at once (ranked, the most promising evaluated
    exactly, the rest retested), so the level rises early and later float32 tests pass. What a
    float64 test cannot prove lies above the level: those are set aside and resolved together at
    the end, since resolving them chunk by chunk would raise the level a little at a time, with
    an exact eigensolve per new record.
    """
    n, single = grams.n, grams.use_single
    entries = CHUNK_ENTRIES_GPU if freqs.device.type == "cuda" else CHUNK_ENTRIES
    chunk = max(MIN_CHUNK, entries // max(1, g * n * n))
    running = RunningMaxEigenvalue(eigen_tol(n), grams.workspace)
    set_aside: list[torch.Tensor] = []
    untested = False  # some set-aside chunk was never tested (zero seed)
    for start in range(0, freqs.shape[0], chunk):
        idx = freqs[start : start + chunk]
        negated = grams.at(idx, single=single, negated=True, reuse=True)
        if running.lower <= 0.0:
            best = int(torch.argmax(lanczos_estimate(negated, negated=True)))
            running.add_exact(grams.at(idx[best // g : best // g + 1])[best % g : best % g + 1])
        mu = running.level()
        if mu <= 0.0:  # a zero seed: the general resolution below handles it
            set_aside.append(idx)
            untested = True
            continue
        error = grams.single_error if single else None
        proven = certify_below(negated, mu, single=single, error=error, negated=True, workspace=grams.workspace)
        running.cholesky_evaluations += int(proven.numel())
        if bool(proven.any()):
            running.record_proven(mu)
        failed = torch.unique((~proven).nonzero().flatten() // g)
        if not failed.numel():
            continue
        if single:  # resolved now: the level rises early and later float32 tests keep passing
            running.certify(grams.at(idx[failed]), single_first=False)
        else:
            set_aside.append(idx[failed])
    if set_aside:
        _resolve(grams, running, torch.cat(set_aside), None if untested else running.level(), 4 * chunk)
    return running


def _resolve(
    grams: _Grams, running: RunningMaxEigenvalue, rest: torch.Tensor, failed_at: float | None, step: int
) -> None:
    """The set-aside frequencies, ranked and resolved together (the level is fixed once seeded: a float64
    failure at it needs no second test before ranking)."""
    for start in range(0, rest.shape[0], step):
        running.certify(
            grams.at(rest[start : start + step]), failed_at=failed_at if start == 0 else None, single_first=False
        )
