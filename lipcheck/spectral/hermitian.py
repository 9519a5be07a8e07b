"""Certified largest eigenvalue over a batch of Hermitian positive semidefinite matrices.

The exact route (``eigvalsh`` of every matrix) costs a full tridiagonal reduction per matrix. Proving
``lambda_max(G) < mu`` is much cheaper: ``mu I - G`` is positive definite exactly when its Cholesky
factorisation exists, and Rump (Verification of positive definiteness, BIT 46:433-452, 2006,
Corollary 2.4) shows that a floating-point Cholesky of ``fl(A - c I)`` running to completion proves
``A`` positive definite once ``c >= gamma_{n+1} / (1 - gamma_{n+1}) * trace(A)`` (plus an underflow
term). So the maximum over a batch is certified in three steps:

1. estimate every matrix's top eigenvalue with a few Lanczos steps in single precision (cheap,
   memory bound, never trusted as a bound);
2. compute the exact top eigenvalue (float64 ``eigvalsh``) of the matrix with the largest estimate:
   a true value ``L`` up to rounding, so the maximum is at least ``L``;
3. test every matrix at ``mu = L * (1 + tol)`` with one float64 Cholesky each; the matrices that fail
   (whose top eigenvalue may exceed ``mu``) get the exact treatment.

The result is ``max(mu, exact values of the failures)``: an upper bound on the maximum, within
``tol`` (relative) of it. Only step 3 and the exact fallbacks carry the certificate; a poor estimate
in step 1 only costs time.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from lipcheck.spectral.dense import UNIT_ROUNDOFF, rounding_gamma

SINGLE_ROUNDOFF = 2.0**-24  # float32
# Smallest normal numbers: the underflow terms use these rather than subnormals, so that libraries
# flushing subnormals to zero are covered too.
TINY = {False: 2.0**-1022, True: 2.0**-126}
LANCZOS_STEPS = 8  # first estimate; doubled for the matrices that fail the first test
REFINE_ROUNDS = 3  # estimate-and-test rounds before the exact fallback
EXACT_BELOW = 2  # this many pending matrices or fewer go straight to the exact eigensolver
# A single-precision Cholesky test goes first where its rounding allowance (relative to the level
# tested) is below this: most matrices then pass at twice the speed, the rest are retested in double.
SINGLE_MAX_MARGIN = 1e-2


def rump_alpha(order: int, single: bool = False) -> float:
    """Relative factor of Rump's shift, ``c = alpha * trace(A)`` (+ underflow), made twice as large.

    Rump's Corollary 2.4 has gamma_{n+1} / (1 - gamma_{n+1}) for real symmetric matrices; complex
    inner products of length k carry gamma_{k+2} (Higham, Lemma 3.5), and a reciprocal-multiply in
    the triangular solves one more rounding, so gamma_{n+4}, doubled, covers every case here.
    """
    g = rounding_gamma(order + 4, SINGLE_ROUNDOFF if single else UNIT_ROUNDOFF)
    return 2.0 * g / (1.0 - 2.0 * g)


def single_precision_is_exact_ieee(device: torch.device) -> bool:
    """Whether float32 products here are IEEE single precision, as the error bounds assume.

    ``torch.set_float32_matmul_precision("high"/"medium")`` or ``allow_tf32`` let matrix products
    (and the factorisations built on them) run in TF32/bfloat16, with far larger rounding errors:
    the single-precision tier is then skipped and everything is done in float64.
    """
    if torch.get_float32_matmul_precision() != "highest":
        return False
    if device.type == "cuda":
        return not torch.backends.cuda.matmul.allow_tf32
    return device.type == "cpu"


def single_margin(order: int) -> float:
    """Rough relative allowance of the single-precision test: alpha * n (trace <= n * level)."""
    try:
        return rump_alpha(order, single=True) * order
    except ValueError:
        return math.inf


class Workspace:
    """Buffers reused across the chunks of one computation, on the CPU.

    A fresh large tensor per chunk costs page faults on first touch every time (glibc hands big
    blocks out by mmap and unmaps them when freed): measured at a fifth of the time of a batch of
    512x512 complex Cholesky factorisations. On a GPU the caching allocator already reuses memory.
    """

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cpu"
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, column_major: bool = False):
        """A tensor of ``shape`` over the named buffer (grown as needed), or None when disabled.

        ``column_major``: the last two axes transposed in memory, as LAPACK (and ``cholesky_ex``'s
        own output) lays them out.
        """
        if not self.enabled:
            return None
        size = math.prod(shape)
        buffer = self._buffers.get((name, dtype))
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(size, dtype=dtype)
            self._buffers[(name, dtype)] = buffer
        if column_major:
            return buffer[:size].view(*shape[:-2], shape[-1], shape[-2]).mT
        return buffer[:size].view(shape)


def certify_below(
    mats: torch.Tensor,
    mu: float,
    single: bool = False,
    error: float | None = None,
    negated: bool = False,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """For each Hermitian matrix ``[..., n, n]`` (lower triangle read), True proves lambda_max < mu.

    Builds ``A = mu I - G`` and runs ``cholesky_ex`` on ``fl(A - c I)`` with Rump's shift ``c``, in
    float64/complex128, or with ``single`` in float32/complex64 after rounding G (which moves its
    eigenvalues by at most u ||G||_F, added to the shift; ``error`` replaces that term when the
    caller passes single-precision matrices and knows how far they are from the double ones). False
    only means "not proven". With ``negated`` the batch holds -G rather than G and is overwritten
    (one copy of the batch fewer: the caller assembled -G directly). The
    diagonal of ``A`` is rounded when formed (mu itself too in single precision): within
    u (mu + |g_ii|) of the exact value each, which the shift absorbs by adding 2 u (mu + max |g_ii|).
    """
    n = mats.shape[-1]
    unit = SINGLE_ROUNDOFF if single else UNIT_ROUNDOFF
    g_diag_abs = mats.diagonal(dim1=-2, dim2=-1).real.abs().amax(dim=-1).to(torch.float64)
    extra = 0.0
    work = mats
    if single and error is not None:
        extra = error
        work = mats.to(torch.complex64 if mats.is_complex() else torch.float32)
    elif single:
        entries = torch.view_as_real(mats) if mats.is_complex() else mats
        extra = unit * torch.linalg.vector_norm(entries.flatten(-3 if mats.is_complex() else -2), dim=-1) * (1.0 + 1e-6)
        work = mats.to(torch.complex64 if mats.is_complex() else torch.float32)
    a = work if negated else -work
    diag = a.diagonal(dim1=-2, dim2=-1)
    diag += mu
    real_diag = diag.real.to(torch.float64)
    trace = real_diag.sum(dim=-1).clamp_min(0.0)
    underflow = 8.0 * n * (2.0 * (n + 1) + real_diag.amax(dim=-1).clamp_min(0.0)) * TINY[single]
    shift = rump_alpha(n, single) * trace + underflow + 2.0 * unit * (mu + g_diag_abs) + extra
    diag -= (shift * (1.0 + 4.0 * unit))[..., None].to(diag.dtype)
    factor = None if workspace is None else workspace.take("factor", tuple(a.shape), a.dtype, column_major=True)
    info = None if workspace is None else workspace.take("info", tuple(a.shape[:-2]), torch.int32)
    return _factorizes(a, factor, info)


# torch factorises a CPU batch one matrix after another, and LAPACK runs one matrix of a few hundred
# rows on one core: with several threads, halves of the batch go to a small pool instead (measured
# 1.2-1.6x on two cores for 128 to 512 rows; nothing below ~100 rows, where each call is too short).
SPLIT_MIN_ORDER = 96
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}  # by (process id, workers): a forked child starts its own


def _factorizes(a: torch.Tensor, factor: torch.Tensor | None, info: torch.Tensor | None) -> torch.Tensor:
    """``cholesky_ex(a).info == 0`` for a batch, into the given buffers, split across CPU threads."""
    threads = torch.get_num_threads() if a.device.type == "cpu" else 1
    parts = min(threads, a.shape[0]) if a.dim() == 3 and a.shape[-1] >= SPLIT_MIN_ORDER else 1
    if parts < 2:
        out = None if factor is None else (factor, info)
        return torch.linalg.cholesky_ex(a, out=out).info == 0
    key = (os.getpid(), parts)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(max_workers=parts, thread_name_prefix="lipcheck-cholesky")
    pool = _POOLS[key]
    bounds = [a.shape[0] * i // parts for i in range(parts + 1)]

    def one(lo: int, hi: int) -> torch.Tensor:
        if factor is None or info is None:
            return torch.linalg.cholesky_ex(a[lo:hi]).info
        return torch.linalg.cholesky_ex(a[lo:hi], out=(factor[lo:hi], info[lo:hi])).info

    futures = [pool.submit(one, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.cat([f.result() for f in futures]) == 0


def exact_top_upper(mats: torch.Tensor) -> torch.Tensor:
    """Upper bounds on lambda_max of Hermitian matrices ``[..., n, n]`` by float64 ``eigvalsh``.

    A backward-stable eigensolver returns eigenvalues within c n u ||G||_2 of the exact ones
    (||G||_2 = max |eigenvalue|); 32 n u covers LAPACK's and cuSOLVER's constants generously.
    """
    n = mats.shape[-1]
    values = torch.linalg.eigvalsh(mats)
    magnitude = values.abs().amax(dim=-1)
    return values[..., -1] + (32.0 * n * UNIT_ROUNDOFF) * magnitude * 1.0000001


def lanczos_estimate(
    mats: torch.Tensor, steps: int = LANCZOS_STEPS, seed: int = 0, negated: bool = False
) -> torch.Tensor:
    """Estimates (not bounds) of lambda_max of each Hermitian matrix ``[B, n, n]``, single precision.

    Plain Lanczos from a seeded random start, no reorthogonalisation (only the top Ritz value is
    wanted); breakdowns (beta = 0, e.g. n < steps) are handled by zero vectors. With ``negated`` the
    batch holds -G and the estimates are still of lambda_max(G) (minus the smallest Ritz value). The
    small tridiagonal eigenproblems are solved on the CPU (on a GPU they cost a launch each).
    """
    batch, n, _ = mats.shape
    steps = max(1, min(steps, n))
    low = mats.to(torch.complex64 if mats.is_complex() else torch.float32)
    # the start vectors come from a CPU generator on every device: same candidates on CPU and GPU
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, n, 1, generator=gen, dtype=torch.float32).to(device=mats.device, dtype=low.dtype)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-30)
    v_prev = torch.zeros_like(v)
    beta_prev = torch.zeros(batch, 1, 1, device=mats.device, dtype=torch.float32)
    alphas, betas = [], []
    for _ in range(steps):
        w = low @ v
        alpha = (v.conj() * w).sum(dim=1, keepdim=True).real
        w = w - alpha * v - beta_prev * v_prev
        beta = torch.linalg.vector_norm(w, dim=1, keepdim=True)
        alphas.append(alpha.reshape(batch))
        betas.append(beta.reshape(batch))
        safe = torch.where(beta > 0, beta, torch.ones_like(beta))
        v_prev, v, beta_prev = v, torch.where(beta > 0, w / safe, torch.zeros_like(w)), beta
    diag = torch.stack(alphas, dim=1)
    tri = torch.diag_embed(diag)
    if steps > 1:
        off = torch.stack(betas[:-1], dim=1)
        tri = tri + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
    ritz = torch.linalg.eigvalsh(tri.to(device="cpu", dtype=torch.float64))
    return -ritz[:, 0] if negated else ritz[:, -1]


class RunningMaxEigenvalue:
    """Certified max of lambda_max over batches of Hermitian PSD matrices fed in chunks.

    Seed it with ``add_exact`` on the matrix most likely to hold the maximum (found by
    ``lanczos_estimate``), then feed every matrix to ``certify``. ``upper`` is a certified upper
    bound on every lambda_max seen (rounding of the matrices themselves is the caller's margin);
    ``lower`` a value the maximum reaches up to rounding; ``upper <= lower * (1 + tol)`` unless a
    later chunk raised ``lower``.
    """

    def __init__(self, tol: float, workspace: Workspace | None = None):
        self.tol = tol
        self.workspace = workspace
        self.lower = 0.0
        self.upper = 0.0
        self.exact_evaluations = 0
        self.cholesky_evaluations = 0

    def add_exact(self, mats: torch.Tensor) -> None:
        """Exact (eigvalsh) treatment of a few matrices ``[B, n, n]``."""
        if mats.shape[0] == 0:
            return
        exact = float(exact_top_upper(mats).max())
        self.exact_evaluations += int(mats.shape[0])
        self.upper = max(self.upper, exact)
        self.lower = max(self.lower, exact * (1.0 - 64.0 * mats.shape[-1] * UNIT_ROUNDOFF))

    def level(self) -> float:
        """The level every matrix is tested at: the best exact value times 1 + tol."""
        return self.lower * (1.0 + self.tol)

    def record_proven(self, mu: float) -> None:
        """Some matrices were proven below ``mu`` by the caller (``certify_below``)."""
        self.upper = max(self.upper, mu)

    def certify(self, mats: torch.Tensor, failed_at: float | None = None, single_first: bool = True) -> None:
        """Account for every matrix of ``[B, n, n]``: Cholesky at lower * (1 + tol), then refine.

        A matrix that fails the test may hold a value above the level. The failures are ranked by
        Lanczos estimates and the most promising one is evaluated exactly (always: a failed test is
        a better witness than an 8-step estimate, which runs low); the rest are retested at the new
        level. A few rounds of that, then whatever is left is evaluated exactly. ``failed_at``: every
        matrix is known to have failed a float64 test at this level (skipped if it is still the
        level); ``single_first=False`` skips the single-precision tier (the caller just ran it).
        """
        if mats.shape[0] == 0:
            return
        if self.lower <= 0.0:  # nothing to test against yet: seed with the most promising matrix
            estimates = lanczos_estimate(mats)
            top = int(torch.argmax(estimates))
            self.add_exact(mats[top : top + 1])
        pending: torch.Tensor | None = None  # None: all of them (no copy)
        steps = LANCZOS_STEPS
        for _ in range(REFINE_ROUNDS):
            subset = mats if pending is None else mats[pending]
            mu = self.lower * (1.0 + self.tol)
            if mu <= 0.0:  # zero matrices so far: any positive level above their entries
                mu = float(subset.abs().amax()) * subset.shape[-1] + TINY[False] * 2.0**60
            if pending is None and failed_at is not None and failed_at == mu:
                proven = torch.zeros(subset.shape[0], dtype=torch.bool, device=subset.device)
            else:
                proven = _test(subset, mu, single_first, self.workspace)
                self.cholesky_evaluations += int(subset.shape[0])
            if bool(proven.any()):
                self.upper = max(self.upper, mu)
            failed = (~proven).nonzero().flatten()
            pending = failed if pending is None else pending[failed]
            if pending.numel() <= EXACT_BELOW:
                break
            candidates = mats if pending.numel() == mats.shape[0] else mats[pending]
            estimates = lanczos_estimate(candidates, steps)
            steps *= 2
            order = torch.argsort(estimates, descending=True)
            self.add_exact(candidates[order[:1]])
            pending = pending[order[1:]]
        assert pending is not None
        if pending.numel():
            self.add_exact(mats[pending])


def _test(mats: torch.Tensor, mu: float, single_first: bool = True, workspace: Workspace | None = None) -> torch.Tensor:
    """``certify_below``, in single precision first where that is cheap and decisive enough."""
    if (
        not single_first
        or single_margin(mats.shape[-1]) > SINGLE_MAX_MARGIN
        or not single_precision_is_exact_ieee(mats.device)
    ):
        return certify_below(mats, mu, workspace=workspace)
    proven = certify_below(mats, mu, single=True, workspace=workspace)
    rest = (~proven).nonzero().flatten()
    if rest.numel():
        proven[rest] = certify_below(mats[rest], mu, workspace=workspace)
    return proven
