"""lipcheck.spectral against dense references.

Every bound is compared with the exact largest singular value of the layer's explicit matrix: the
Jacobian obtained by pushing an identity basis through ``torch.nn.functional`` in float64 at small
sizes, then ``torch.linalg.matrix_norm(ord=2)`` (or numpy's SVD). Certified means ``bound >= exact``
up to the reference's own rounding (``CERT_SLACK``); for small dense matrices the check is exact:
``sigma_max^2 >= ||A v||^2 / ||v||^2`` evaluated in rational arithmetic.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from fractions import Fraction
from functools import cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lipcheck.spectral import (
    ConvGeometry,
    SpectralBound,
    circular_conv_norm,
    circular_embedding_bound,
    conv_operator_norm,
    conv_transpose_operator_norm,
    dense_sigma_max,
    gram_iteration_bound,
    reshaped_kernel_norm,
)
from lipcheck.spectral.circular import _product, gram_taps, half_grid_indices
from lipcheck.spectral.conv import reshape_bound, torus_sup_bound
from lipcheck.spectral.hermitian import (
    RunningMaxEigenvalue,
    Workspace,
    certify_below,
    lanczos_estimate,
    single_margin,
    single_precision_is_exact_ieee,
)

F64 = torch.float64
CERT_SLACK = 1e-12  # relative rounding allowance of the float64 dense reference
CLOSE = 1e-6  # "exact" methods must land this close (relative) to the dense SVD
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The matrices here are tiny: intra-op threads only add spin-wait overhead (badly so on a
    shared machine). Restored afterwards so other test modules are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# dense references


def generator(tag: str) -> torch.Generator:
    """A generator seeded from a readable tag, so every case has its own reproducible weights."""
    return torch.Generator().manual_seed(zlib.crc32(tag.encode()))


def randn(tag: str, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(tag), dtype=F64)


def jacobian(fn, in_shape: tuple[int, ...]) -> torch.Tensor:
    """Explicit matrix ``[out, in]`` of a linear map on tensors of shape ``in_shape``."""
    numel = math.prod(in_shape)
    basis = torch.eye(numel, dtype=F64).reshape(numel, *in_shape)
    return fn(basis).reshape(numel, -1).T


def exact_norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.to(F64), ord=2))


def svd_sigma_max(matrix: torch.Tensor) -> float:
    if matrix.numel() == 0:
        return 0.0
    return float(np.linalg.svd(matrix.numpy(), compute_uv=False)[0])


def rigorous_lower_sq(matrix: torch.Tensor) -> Fraction:
    """An exact rational lower bound on sigma_max(matrix)^2: ||A v||^2 / ||v||^2 with v the
    numerically computed top right singular vector, evaluated without rounding."""
    a = matrix.to(torch.complex128 if matrix.is_complex() else F64).numpy()
    if not np.any(a):
        return Fraction(0)
    v = np.linalg.svd(a)[2][0].conj()
    if a.dtype.kind == "c":  # complex: treat as the real matrix [[Re, -Im], [Im, Re]]
        a = np.block([[a.real, -a.imag], [a.imag, a.real]])
        v = np.concatenate([v.real, v.imag])
    rows = [[Fraction(float(x)) for x in row] for row in a]
    vec = [Fraction(float(x)) for x in v]
    num = sum(sum(r * x for r, x in zip(row, vec, strict=True)) ** 2 for row in rows)
    den = sum(x * x for x in vec)
    return num / den


def assert_rigorous_upper(value: float, matrix: torch.Tensor, what: str) -> None:
    lower_sq = rigorous_lower_sq(matrix)
    if Fraction(value) ** 2 < lower_sq:
        shortfall = 1 - math.sqrt(Fraction(value) ** 2 / lower_sq)
        sigma = svd_sigma_max(matrix.to(torch.complex128 if matrix.is_complex() else F64))
        pytest.fail(
            f"{what}: {value!r} is below the true sigma_max (~{sigma!r}) by at least "
            f"{shortfall:.3g} relative (exact rational check)"
        )


def torch_pads(pads: tuple[int, ...]) -> list[int]:
    """ONNX pads (begin_1..begin_d, end_1..end_d) -> F.pad order (last axis first)."""
    d = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(d)):
        out += [pads[i], pads[i + d]]
    return out


def wrap_pad(x: torch.Tensor, extra: tuple[int, ...]) -> torch.Tensor:
    """Circular padding at the end of every spatial axis, by any amount (wraps repeatedly)."""
    for axis, e in enumerate(extra):
        dim = 2 + axis
        index = torch.arange(x.shape[dim] + e) % x.shape[dim]
        x = x.index_select(dim, index)
    return x


def conv_matrix(weight: torch.Tensor, geometry: ConvGeometry, size: tuple[int, ...]) -> torch.Tensor:
    """Jacobian of an ONNX Conv (zero pads, stride, dilation, groups) on inputs of ``size``."""
    d = weight.dim() - 2
    c_in = weight.shape[1] * geometry.groups

    def fn(x):
        x = F.pad(x, torch_pads(geometry.pads))
        return CONV[d](x, weight, stride=geometry.stride, dilation=geometry.dilation, groups=geometry.groups)

    return jacobian(fn, (c_in, *size))


def conv_exact(weight: torch.Tensor, geometry: ConvGeometry, size=None) -> float:
    return exact_norm(conv_matrix(weight, geometry, size or geometry.input_size))


def circular_matrix(weight: torch.Tensor, grid: tuple[int, ...], dilation=None, groups: int = 1) -> torch.Tensor:
    """Jacobian of the stride-1 circular convolution on ``grid``: wrap-pad, then a valid conv."""
    d = weight.dim() - 2
    dilation = dilation or (1,) * d
    extra = tuple((k - 1) * dl for k, dl in zip(weight.shape[2:], dilation, strict=True))

    def fn(x):
        return CONV[d](wrap_pad(x, extra), weight, dilation=dilation, groups=groups)

    return jacobian(fn, (weight.shape[1] * groups, *grid))


def conv_transpose_matrix(
    weight: torch.Tensor,
    geometry: ConvGeometry,
    output_padding: tuple[int, ...],
    size: tuple[int, ...],
) -> torch.Tensor:
    """Jacobian of an ONNX ConvTranspose (weight ``[c_in, c_out/g, *k]``) on inputs of ``size``.

    Symmetric pads map to torch's ``padding``; asymmetric ones crop the uncropped output.
    """
    d = weight.dim() - 2
    begins, ends = geometry.pads[:d], geometry.pads[d:]
    symmetric = begins == ends
    kw = dict(
        stride=geometry.stride,
        output_padding=output_padding,
        groups=geometry.groups,
        dilation=geometry.dilation,
    )

    def fn(x):
        if symmetric:
            return CONV_T[d](x, weight, padding=begins, **kw)
        y = CONV_T[d](x, weight, padding=0, **kw)
        crop = [slice(b, y.shape[2 + i] - e) for i, (b, e) in enumerate(zip(begins, ends, strict=True))]
        return y[(slice(None), slice(None), *crop)]

    return jacobian(fn, (weight.shape[0], *size))


# ---------------------------------------------------------------------------------------------
# dense layers


def _low_rank() -> torch.Tensor:
    return randn("lowrank-a", 9, 2) @ randn("lowrank-b", 2, 7)


DENSE_MATRICES = {
    "tall-12x5": lambda: randn("tall", 12, 5),
    "wide-4x11": lambda: randn("wide", 4, 11),
    "square-8x8": lambda: randn("square", 8, 8),
    "rank2-9x7": _low_rank,
    "duplicate-rows-6x4": lambda: randn("dup", 1, 4).repeat(6, 1),
    "zero-5x3": lambda: torch.zeros(5, 3, dtype=F64),
    "single-1x1": lambda: torch.tensor([[-2.5]], dtype=F64),
    "row-1x9": lambda: randn("row", 1, 9),
    "float32-7x6": lambda: torch.randn(7, 6, generator=generator("f32")),
    "complex-5x4": lambda: torch.complex(randn("re", 5, 4), randn("im", 5, 4)),
    "orthogonal-6x6": lambda: torch.linalg.qr(randn("orth", 6, 6))[0] * 3.0,
    "ill-conditioned-6x5": lambda: (
        torch.linalg.qr(randn("u", 6, 5))[0]
        @ torch.diag(torch.tensor([1e6, 1.0, 1e-3, 1e-9, 0.0], dtype=F64))
        @ torch.linalg.qr(randn("v", 5, 5))[0].T
    ),
}


@pytest.mark.parametrize("name", list(DENSE_MATRICES))
def test_dense_sigma_max_is_exact_and_certified(name):
    matrix = DENSE_MATRICES[name]()
    bound = dense_sigma_max(matrix)
    exact = svd_sigma_max(matrix.to(torch.complex128 if matrix.is_complex() else F64))
    assert bound.exact
    assert_rigorous_upper(bound.value, matrix, "dense_sigma_max")
    assert bound.value <= exact * (1 + CLOSE)
    if exact == 0:
        assert bound.value == 0.0


@pytest.mark.parametrize("iterations", [0, 1, 3, 6, 12], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("name", list(DENSE_MATRICES))
def test_gram_iteration_is_certified(name, iterations):
    matrix = DENSE_MATRICES[name]()
    bound = gram_iteration_bound(matrix, iterations)
    assert not bound.exact
    assert_rigorous_upper(bound.value, matrix, f"gram_iteration_bound(t={iterations})")
    if iterations == 0:  # zero steps is the Frobenius norm
        fro = float(torch.linalg.matrix_norm(matrix.to(torch.complex128), ord="fro"))
        assert bound.value == pytest.approx(fro, rel=1e-12)


def _gapped_matrix(singular_values: list[float], rows: int = 10) -> torch.Tensor:
    cols = len(singular_values)
    u = torch.linalg.qr(randn("gap-u", rows, cols))[0]
    v = torch.linalg.qr(randn("gap-v", cols, cols))[0]
    return u @ torch.diag(torch.tensor(singular_values, dtype=F64)) @ v.T


def test_gram_iteration_converges_monotonically_with_spectral_gap():
    matrix = _gapped_matrix([3.0, 2.0, 1.5, 1.0, 0.5, 0.1])
    exact = svd_sigma_max(matrix)
    assert exact == pytest.approx(3.0, rel=1e-12)
    values = [gram_iteration_bound(matrix, t).value for t in range(13)]
    for t, (earlier, later) in enumerate(zip(values, values[1:], strict=False)):
        assert later <= earlier * (1 + 1e-12), f"step {t + 1} increased the bound"
    assert all(v >= exact * (1 - CERT_SLACK) for v in values)
    assert values[0] / exact > 1.2  # the Frobenius norm is loose here...
    assert values[6] / exact <= 1.001  # ...a few Gram steps are not
    assert values[12] / exact <= 1 + 1e-9


def test_gram_iteration_without_gap_approaches_from_above():
    """r equal singular values: ||G_t||_F = sqrt(r) sigma^(2^t), so the bound is
    sigma * r^(2^-(t+1))."""
    matrix = _gapped_matrix([2.0, 2.0, 2.0, 2.0])
    for t in (0, 1, 4, 10):
        value = gram_iteration_bound(matrix, t).value
        assert value >= 2.0
        assert value == pytest.approx(2.0 * 4 ** (2.0 ** -(t + 1)), rel=1e-9)


EXTREME_SCALES = [1e-300, 1e-170, 1e-162, 1e-100, 1e-30, 1e-9, 1e30, 1e100, 1e150]


@pytest.mark.parametrize("scale", EXTREME_SCALES, ids=lambda s: f"{s:g}")
def test_dense_sigma_max_at_extreme_scales(scale):
    """Certified means certified for every finite input, not only for weights of order one: tiny
    or huge scales must not underflow to a value below the truth."""
    matrix = randn("scale", 5, 3) * scale
    assert_rigorous_upper(dense_sigma_max(matrix).value, matrix, f"dense_sigma_max at {scale:g}")


@pytest.mark.parametrize("scale", EXTREME_SCALES, ids=lambda s: f"{s:g}")
def test_gram_iteration_at_extreme_scales(scale):
    matrix = randn("scale", 5, 3) * scale
    value = gram_iteration_bound(matrix).value
    assert_rigorous_upper(value, matrix, f"gram_iteration_bound at {scale:g}")


@pytest.mark.parametrize("x", [0.00013687617154257522, 3393.43685272347, 0.5, 1.0, 3.0])
def test_gram_iteration_of_a_scalar_is_at_least_its_magnitude(x):
    """sigma_max of the 1x1 matrix [[x]] is |x|, exactly representable: no reference error at all.
    (The first two values were found by sampling; the log-domain rescaling must be covered by the
    rounding margin.)"""
    for t in (1, 6, 12):
        value = gram_iteration_bound(torch.tensor([[x]], dtype=F64), t).value
        assert value >= x, f"t={t}: gram_iteration_bound([[{x!r}]]) = {value!r} < {x!r}"
    assert dense_sigma_max(torch.tensor([[-x]], dtype=F64)).value >= x


def test_dense_sigma_max_rejects_non_matrices():
    with pytest.raises(ValueError, match="expected a matrix"):
        dense_sigma_max(torch.ones(2, 3, 4))


# ---------------------------------------------------------------------------------------------
# convolutions with a known input size


@dataclass(frozen=True)
class ConvCase:
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    pads: tuple[int, ...]
    size: tuple[int, ...]
    c_in_per_group: int = 2
    c_out_per_group: int = 3

    @property
    def d(self) -> int:
        return len(self.kernel)

    @property
    def id(self) -> str:
        def j(t):
            return "x".join(map(str, t))

        return (
            f"{self.d}d-n{j(self.size)}-k{j(self.kernel)}-s{j(self.stride)}-d{j(self.dilation)}"
            f"-g{self.groups}-p{'_'.join(map(str, self.pads))}"
        )

    def weight(self) -> torch.Tensor:
        c_out = self.c_out_per_group * self.groups
        return randn(self.id, c_out, self.c_in_per_group, *self.kernel)

    def geometry(self, known: bool = True) -> ConvGeometry:
        return ConvGeometry(self.stride, self.dilation, self.pads, self.groups, self.size if known else None)

    @property
    def padded(self) -> tuple[int, ...]:
        return tuple(n + self.pads[i] + self.pads[i + self.d] for i, n in enumerate(self.size))

    @property
    def valid(self) -> bool:
        eff = [(k - 1) * dl + 1 for k, dl in zip(self.kernel, self.dilation, strict=True)]
        return all(p >= e for p, e in zip(self.padded, eff, strict=True))


def onnx_pads(kind: str, d: int) -> tuple[int, ...]:
    if kind == "zero":
        return (0,) * (2 * d)
    if kind == "one":
        return (1,) * (2 * d)
    # asymmetric, different per axis: axis 0 gets (0, 2), axis 1 gets (1, 0), ...
    begins = tuple(0 if i % 2 == 0 else 1 for i in range(d))
    ends = tuple(2 if i % 2 == 0 else 0 for i in range(d))
    return begins + ends


CONV_SIZES = {1: (9,), 2: (6, 5), 3: (4, 3, 4)}
CONV_STRIDES = {1: (1, 2, 3), 2: (1, 2, 3), 3: (1, 2)}


def _conv_grid() -> list[ConvCase]:
    cases = []
    for d, size in CONV_SIZES.items():
        for stride in CONV_STRIDES[d]:
            for dilation in (1, 2):
                for groups in (1, 2):
                    for pads in ("zero", "one", "asym"):
                        for k in (1, 2, 3):
                            case = ConvCase(
                                (k,) * d,
                                (stride,) * d,
                                (dilation,) * d,
                                groups,
                                onnx_pads(pads, d),
                                size,
                            )
                            if case.valid:
                                cases.append(case)
    # anisotropic geometry: every axis different
    cases += [
        ConvCase((3, 2), (1, 2), (2, 1), 1, (0, 1, 2, 0), (7, 6)),
        ConvCase((4, 1), (3, 1), (1, 3), 2, (1, 0, 1, 0), (8, 5)),
        ConvCase((2, 3), (2, 3), (1, 1), 1, (0, 0, 0, 0), (6, 9)),
        ConvCase((2, 1, 3), (1, 2, 1), (1, 1, 2), 1, (0, 1, 0, 1, 0, 1), (3, 4, 5)),
        ConvCase((3, 3, 2), (3, 2, 1), (1, 1, 1), 2, (1, 1, 0, 1, 1, 1), (4, 3, 3)),
        ConvCase((5,), (2,), (2,), 1, (4, 1), (6,)),  # kernel wider than the input
        ConvCase((4,), (4,), (1,), 1, (0, 0), (11,)),  # stride == kernel, ragged end
    ]
    return cases


CONV_CASES = _conv_grid()
STRIDE1_CASES = [c for c in CONV_CASES if set(c.stride) == {1}]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: c.id)
def test_conv_known_size_is_certified(case):
    weight, geometry = case.weight(), case.geometry()
    exact = conv_exact(weight, geometry)
    bound = conv_operator_norm(weight, geometry)
    assert isinstance(bound, SpectralBound)
    assert bound.value >= exact * (1 - CERT_SLACK), f"certified {bound.value!r} < exact {exact!r}"


@pytest.mark.parametrize("case", STRIDE1_CASES, ids=lambda c: c.id)
def test_conv_stride1_equals_circular_embedding(case):
    """The embedding is the circular conv on n + pad_begin + pad_end (= n + k_eff - 1 for 'same'
    padding), certified for that circular operator; the layer's bound is no looser (the dense operator's
    norm where that is smaller)."""
    weight, geometry = case.weight(), case.geometry()
    circular = exact_norm(circular_matrix(weight, case.padded, case.dilation, case.groups))
    bound = circular_embedding_bound(weight, geometry).value
    assert bound >= circular * (1 - CERT_SLACK)
    assert bound <= circular * (1 + CLOSE)
    assert conv_operator_norm(weight, geometry).value <= bound


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in CONV_CASES
        if set(c.stride) != {1} and all(p % s == 0 for p, s in zip(c.padded, c.stride, strict=True))
    ],
    ids=lambda c: c.id,
)
def test_strided_bound_no_looser_than_unstrided(case):
    """Polyphase circular conv on m = P/s is the stride-1 circular conv on P, subsampled."""
    weight = case.weight()
    strided = conv_operator_norm(weight, case.geometry()).value
    unstrided_geometry = ConvGeometry((1,) * case.d, case.dilation, case.pads, case.groups, case.size)
    unstrided = conv_operator_norm(weight, unstrided_geometry).value
    assert strided <= unstrided * (1 + 1e-9)


POINTWISE = [
    (1, 1, 1, "zero"),
    (1, 1, 3, "asym"),
    (1, 2, 1, "one"),
    (2, 1, 1, "zero"),
    (2, 1, 2, "one"),
    (2, 2, 3, "asym"),
    (3, 1, 1, "zero"),
    (3, 1, 2, "asym"),
    (3, 2, 1, "zero"),
]


@pytest.mark.parametrize(
    ("d", "stride", "groups", "pads"),
    [pytest.param(*p, id=f"{p[0]}d-s{p[1]}-g{p[2]}-pad_{p[3]}") for p in POINTWISE],
)
def test_pointwise_conv_is_exact(d, stride, groups, pads):
    """A 1x1 conv is the dense matrix applied per pixel: its norm is sigma_max of that matrix."""
    case = ConvCase(
        (1,) * d,
        (stride,) * d,
        (1,) * d,
        groups,
        onnx_pads(pads, d),
        CONV_SIZES[d],
        c_in_per_group=4,
        c_out_per_group=3,
    )
    weight = case.weight()
    exact = conv_exact(weight, case.geometry())
    per_group = max(svd_sigma_max(block.reshape(block.shape[0], -1)) for block in weight.chunk(groups, dim=0))
    assert exact == pytest.approx(per_group, rel=1e-12)  # the reference agrees with the theory
    bound = conv_operator_norm(weight, case.geometry()).value
    assert exact * (1 - CERT_SLACK) <= bound <= exact * (1 + CLOSE)


@pytest.mark.parametrize(
    ("kernel", "size"),
    [((2,), (8,)), ((3,), (9,)), ((2, 2), (4, 6)), ((3, 2), (6, 4)), ((2, 2, 2), (2, 4, 2))],
    ids=lambda v: "x".join(map(str, v)),
)
def test_stride_equal_to_kernel_is_exact(kernel, size):
    """Non-overlapping patches: the operator is block diagonal, so the reshape norm is exact and
    the polyphase bound must find it."""
    weight = randn(f"patch{kernel}", 5, 3, *kernel)
    geometry = ConvGeometry.default(len(kernel), stride=kernel, input_size=size)
    exact = conv_exact(weight, geometry)
    assert reshaped_kernel_norm(weight) == pytest.approx(exact, rel=1e-12)
    assert exact * (1 - CERT_SLACK) <= conv_operator_norm(weight, geometry).value
    assert conv_operator_norm(weight, geometry).value <= exact * (1 + CLOSE)


def test_conv_bound_accepts_float32_weights():
    weight = torch.randn(3, 2, 3, 3, generator=generator("conv-f32"))
    geometry = ConvGeometry.default(2, pads=(1, 1, 1, 1), input_size=(5, 5))
    exact = conv_exact(weight.to(F64), geometry)
    value = conv_operator_norm(weight, geometry).value
    assert exact * (1 - CERT_SLACK) <= value <= exact * 1.5


@pytest.mark.parametrize("scale", [1e-200, 1e-165, 1e-150, 1e150, 1e160], ids=lambda s: f"{s:g}")
@pytest.mark.parametrize("known", [True, False], ids=["known-size", "size-free"])
def test_conv_bound_at_extreme_weight_scales(scale, known):
    """No underflow to 0, no NaN, no crash: the bound must stay above the truth for any finite
    weights (an infinite bound would be useless but not wrong)."""
    weight = randn("conv-scale", 3, 2, 3) * scale
    geometry = ConvGeometry.default(1, pads=(1, 1), input_size=(8,) if known else None)
    exact = conv_exact(weight, geometry, (8,))
    value = conv_operator_norm(weight, geometry).value
    assert value >= exact * (1 - CERT_SLACK), f"certified {value!r} < exact {exact!r}"


def test_conv_rejects_bad_shapes():
    with pytest.raises(ValueError, match=">= 3 dims"):
        conv_operator_norm(torch.ones(3, 3), ConvGeometry.default(1, input_size=(4,)))
    with pytest.raises(ValueError, match="not divisible by groups"):
        conv_operator_norm(torch.ones(3, 1, 3), ConvGeometry.default(1, groups=2, input_size=(4,)))


# ---------------------------------------------------------------------------------------------
# circular convolutions: exact


@pytest.mark.parametrize(
    ("kernel", "grid", "groups", "c_in_per_group"),
    [
        ((3,), (7,), 1, 2),
        ((4,), (6,), 2, 2),
        ((5,), (3,), 1, 2),  # kernel longer than the grid: taps alias
        ((1,), (5,), 3, 1),  # depthwise 1-tap
        ((3, 3), (5, 4), 1, 2),
        ((2, 3), (4, 6), 2, 1),
        ((3, 1), (3, 3), 4, 1),  # depthwise
        ((2, 2, 2), (3, 3, 2), 1, 2),
        ((3, 2, 1), (3, 2, 4), 2, 1),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_circular_conv_norm_is_exact(kernel, grid, groups, c_in_per_group):
    weight = randn(f"circ{kernel}{grid}", 3 * groups, c_in_per_group, *kernel)
    exact = exact_norm(circular_matrix(weight, grid, groups=groups))
    value = circular_conv_norm(weight, grid, groups)
    assert exact * (1 - CERT_SLACK) <= value <= exact * (1 + CLOSE)


def test_wrap_pad_matches_torch_circular_padding():
    """The reference's wrap padding is torch's circular padding where the latter applies."""
    x = randn("wrap", 2, 3, 5, 4)
    ours = wrap_pad(x, (2, 3))
    theirs = F.pad(x, (0, 3, 0, 2), mode="circular")
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------------------------------------
# transposed convolutions with a known input size


@dataclass(frozen=True)
class TransposeCase:
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    pads: tuple[int, ...]
    output_padding: tuple[int, ...]
    size: tuple[int, ...]

    @property
    def id(self) -> str:
        def j(t):
            return "x".join(map(str, t))

        return (
            f"{len(self.kernel)}d-n{j(self.size)}-k{j(self.kernel)}-s{j(self.stride)}"
            f"-d{j(self.dilation)}-g{self.groups}-p{'_'.join(map(str, self.pads))}"
            f"-op{j(self.output_padding)}"
        )

    def weight(self) -> torch.Tensor:  # [c_in, c_out/g, *k]
        return randn(self.id, 2 * self.groups, 3, *self.kernel)

    def geometry(self, known: bool = True) -> ConvGeometry:
        return ConvGeometry(self.stride, self.dilation, self.pads, self.groups, self.size if known else None)


def _transpose_grid() -> list[TransposeCase]:
    sizes = {1: (6,), 2: (4, 3)}
    cases = []
    for d, size in sizes.items():
        for stride in (1, 2, 3):
            for dilation in (1, 2):
                for groups in (1, 2):
                    for k in (1, 2, 3):
                        for pads in ("zero", "one", "asym"):
                            eff = (k - 1) * dilation + 1
                            if pads != "zero" and eff < 3:
                                continue  # keep the cropped output non-empty
                            for op in sorted({0, max(stride, dilation) - 1}):
                                cases.append(
                                    TransposeCase(
                                        (k,) * d,
                                        (stride,) * d,
                                        (dilation,) * d,
                                        groups,
                                        onnx_pads(pads, d),
                                        (op,) * d,
                                        size,
                                    )
                                )
    return cases


TRANSPOSE_CASES = _transpose_grid()


@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=lambda c: c.id)
def test_conv_transpose_known_size_is_certified(case):
    weight = case.weight()
    matrix = conv_transpose_matrix(weight, case.geometry(), case.output_padding, case.size)
    exact = exact_norm(matrix)
    bound = conv_transpose_operator_norm(weight, case.geometry())
    assert bound.value >= exact * (1 - CERT_SLACK), f"certified {bound.value!r} < exact {exact!r}"


@pytest.mark.parametrize(
    "case",
    [c for c in TRANSPOSE_CASES if set(c.pads) == {0} and set(c.output_padding) == {0}],
    ids=lambda c: c.id,
)
def test_uncropped_conv_transpose_matches_adjoint_conv(case):
    """Without cropping, ConvTranspose is exactly the adjoint of the valid Conv with the same
    weight: the reference must agree, which pins down the weight layout convention."""
    weight = case.weight()
    transpose = conv_transpose_matrix(weight, case.geometry(), case.output_padding, case.size)
    full = tuple(
        (n - 1) * s + (k - 1) * dl + 1
        for n, s, k, dl in zip(case.size, case.stride, case.kernel, case.dilation, strict=True)
    )
    conv_geometry = ConvGeometry.default(
        len(case.kernel), stride=case.stride, dilation=case.dilation, groups=case.groups
    )
    conv = conv_matrix(weight, conv_geometry, full)
    torch.testing.assert_close(transpose, conv.T, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# size-independent bounds


@dataclass(frozen=True)
class FreeCase:
    name: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int = 1
    pads: tuple[int, ...] | None = None

    def weight(self, transpose: bool = False) -> torch.Tensor:
        tag = f"free-{self.name}-{transpose}"
        if transpose:  # [c_in, c_out/g, *k]
            return randn(tag, 2 * self.groups, 2, *self.kernel)
        return randn(tag, 3 * self.groups, 2, *self.kernel)

    def geometry(self, size=None) -> ConvGeometry:
        d = len(self.kernel)
        pads = self.pads or (0,) * (2 * d)
        return ConvGeometry(self.stride, self.dilation, pads, self.groups, size)


FREE_CASES = [
    FreeCase("1d-k3", (3,), (1,), (1,), pads=(1, 1)),
    FreeCase("1d-k4-s2", (4,), (2,), (1,), pads=(1, 2)),
    FreeCase("1d-k3-dil2-g2", (3,), (1,), (2,), groups=2),
    FreeCase("1d-k2-s3", (2,), (3,), (1,)),
    FreeCase("2d-k3", (3, 3), (1, 1), (1, 1), pads=(1, 1, 1, 1)),
    FreeCase("2d-k3-s2", (3, 3), (2, 2), (1, 1), pads=(0, 1, 1, 0)),
    FreeCase("2d-k2x3-dil2x1-g2", (2, 3), (1, 2), (2, 1), groups=2),
    FreeCase("2d-k4-s2-dil2", (4, 4), (2, 2), (2, 2), pads=(3, 3, 3, 3)),
]
FREE_SIZES = {1: (4, 7, 12, 20), 2: (4, 7, 12, 20)}


def _eff(case: FreeCase) -> list[int]:
    return [(k - 1) * dl + 1 for k, dl in zip(case.kernel, case.dilation, strict=True)]


def _fits(case: FreeCase, n: int) -> bool:
    d = len(case.kernel)
    pads = case.geometry().pads
    return all(n + pads[i] + pads[i + d] >= e for i, e in enumerate(_eff(case)))


FREE_PARAMS = [
    pytest.param(case, n, id=f"{case.name}-n{n}")
    for case in FREE_CASES
    for n in FREE_SIZES[len(case.kernel)]
    if _fits(case, n)
]


@cache
def free_bounds(case: FreeCase, transpose: bool) -> dict[str, float]:
    weight = case.weight(transpose)
    geometry = case.geometry()
    if transpose:
        return {"operator": conv_transpose_operator_norm(weight, geometry).value}
    return {
        "operator": conv_operator_norm(weight, geometry).value,
        "reshape": reshape_bound(weight, geometry).value,
        "torus": torus_sup_bound(weight, geometry).value,
    }


@pytest.mark.parametrize(("case", "n"), FREE_PARAMS)
def test_size_independent_conv_bound_holds_at_every_size(case, n):
    d = len(case.kernel)
    size = (n,) * d
    weight = case.weight()
    exact = conv_exact(weight, case.geometry(), size)
    bounds = free_bounds(case, False)
    for method, value in bounds.items():
        assert value >= exact * (1 - CERT_SLACK), f"{method}: {value!r} < exact {exact!r}"
    assert bounds["operator"] == min(bounds["reshape"], bounds["torus"])
    # the frequency bound covers every grid, so also the known-size certificate
    known = conv_operator_norm(weight, case.geometry(size)).value
    assert bounds["torus"] >= known * (1 - 1e-9)


@pytest.mark.parametrize(("case", "n"), FREE_PARAMS)
def test_size_independent_conv_transpose_bound_holds_at_every_size(case, n):
    d = len(case.kernel)
    weight = case.weight(transpose=True)
    # ONNX ConvTranspose with the case's pads (cropping) and the largest legal output padding
    output_padding = tuple(max(s, dl) - 1 for s, dl in zip(case.stride, case.dilation, strict=True))
    matrix = conv_transpose_matrix(weight, case.geometry(), output_padding, (n,) * d)
    assert matrix.numel() > 0
    exact = exact_norm(matrix)
    value = free_bounds(case, True)["operator"]
    assert value >= exact * (1 - CERT_SLACK), f"{value!r} < exact {exact!r}"


@pytest.mark.parametrize("case", FREE_CASES[:2] + FREE_CASES[4:6], ids=lambda c: c.name)
def test_frequency_bound_is_close_to_large_grid_norm(case):
    """The branch-and-bound stops within its tolerance of the supremum over the torus, which a
    fine grid approaches from below: the size-independent bound is not loose for these kernels."""
    weight = case.weight()
    torus = free_bounds(case, False)["torus"]
    fine_grid = (48,) * len(case.kernel)
    circular_on_fine_grid = conv_operator_norm(weight, case.geometry(fine_grid)).value
    assert circular_on_fine_grid <= torus * (1 + 1e-9)
    assert torus <= circular_on_fine_grid * 1.02


# ---------------------------------------------------------------------------------------------
# the reshape norm is an estimate, not a bound


def test_reshaped_kernel_norm_underestimates_the_operator():
    """What torch.nn.utils.spectral_norm normalises can sit far below the true operator norm,
    which is why lipcheck may only show it as an estimate."""
    weight = randn("reshape-estimate", 4, 3, 3, 3)
    geometry = ConvGeometry.default(2, pads=(1, 1, 1, 1), input_size=(8, 8))
    exact = conv_exact(weight, geometry)
    estimate = reshaped_kernel_norm(weight)
    assert estimate < exact * 0.9, f"estimate {estimate} vs exact {exact}"
    assert conv_operator_norm(weight, geometry).value >= exact * (1 - CERT_SLACK)


def test_reshaped_kernel_norm_underestimates_even_a_positive_averaging_kernel():
    weight = torch.full((1, 1, 3, 3), 1.0 / 9.0, dtype=F64)  # a 3x3 mean filter
    geometry = ConvGeometry.default(2, pads=(1, 1, 1, 1), input_size=(10, 10))
    exact = conv_exact(weight, geometry)
    assert reshaped_kernel_norm(weight) == pytest.approx(1.0 / 3.0)
    assert exact > 0.9  # a mean filter passes constants almost unchanged
    found = conv_operator_norm(weight, geometry).value  # the exact operator (dense, a small map)
    assert exact * (1 - 1e-12) <= found <= exact * (1 + 1e-9) and found > 2.5 * reshaped_kernel_norm(weight)


# ---------------------------------------------------------------------------------------------
# soundness by sampling through the real layer


SOUNDNESS_GEOMETRIES = {
    "k3-s1-p1": dict(kernel=3, stride=(1, 1), dilation=(1, 1), pads=(1, 1, 1, 1), groups=1),
    "k3-s2-asym": dict(kernel=3, stride=(2, 2), dilation=(1, 1), pads=(0, 1, 2, 0), groups=1),
    "k2-dil2-g2": dict(kernel=2, stride=(1, 2), dilation=(2, 2), pads=(1, 0, 1, 0), groups=2),
    "k4-s2-p1": dict(kernel=4, stride=(2, 2), dilation=(1, 1), pads=(1, 1, 1, 1), groups=1),
}


@pytest.mark.parametrize("name", list(SOUNDNESS_GEOMETRIES))
def test_sampled_pairs_never_exceed_the_bound(name):
    spec = SOUNDNESS_GEOMETRIES[name]
    size = (7, 8)
    groups = spec["groups"]
    weight = randn(f"sound-{name}", 4, 4 // groups, spec["kernel"], spec["kernel"])
    bias = randn(f"sound-bias-{name}", 4)
    geometry = ConvGeometry(spec["stride"], spec["dilation"], spec["pads"], groups, size)
    known = conv_operator_norm(weight, geometry).value
    free = conv_operator_norm(weight, ConvGeometry(spec["stride"], spec["dilation"], spec["pads"], groups, None)).value

    def layer(x):
        x = F.pad(x, torch_pads(spec["pads"]))
        return F.conv2d(x, weight, bias, stride=spec["stride"], dilation=spec["dilation"], groups=groups)

    gen = generator(f"pairs-{name}")
    x = torch.randn(256, 4, *size, generator=gen, dtype=F64)
    y = x + torch.randn(256, 4, *size, generator=gen, dtype=F64) * torch.logspace(-6, 2, 256, dtype=F64).reshape(
        -1, 1, 1, 1
    )
    # adversarial pair: the difference along the top right singular vector of the Jacobian
    matrix = conv_matrix(weight, geometry, size)
    top = torch.linalg.svd(matrix)[2][0].reshape(1, 4, *size)
    x = torch.cat([x, torch.zeros_like(top)])
    y = torch.cat([y, 0.5 * top])
    ratios = (layer(x) - layer(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    worst = float(ratios.max())
    assert worst == pytest.approx(exact_norm(matrix), rel=1e-9)  # the adversarial pair is tight
    # slack: f(x) - f(y) cancels in float64 (bias included), ~1e-10 relative for |x-y| ~ 1e-6 |x|
    assert worst <= known * (1 + 1e-9)
    assert worst <= free * (1 + 1e-9)


# ---------------------------------------------------------------------------------------------
# the fast known-size path: Cholesky certificates, Lanczos candidates, Gram taps


def hermitian_psd(tag: str, batch: int, n: int, complex_: bool, top: tuple[float, ...] = ()) -> torch.Tensor:
    """Random Hermitian PSD matrices ``[batch, n, n]`` with a spread spectrum in (0, 1]; ``top``
    overrides the largest eigenvalues (clusters, ties) of every matrix."""
    gen = generator(tag)
    dtype = torch.complex128 if complex_ else F64
    a = torch.randn(batch, n, n, generator=gen, dtype=F64)
    if complex_:
        a = torch.complex(a, torch.randn(batch, n, n, generator=gen, dtype=F64))
    q = torch.linalg.qr(a).Q
    eig = torch.rand(batch, n, generator=gen, dtype=F64) * 0.9
    for i, value in enumerate(top):
        eig[:, i] = value
    return (q * eig[:, None, :].to(dtype)) @ q.mH


@pytest.mark.parametrize("single", [False, True], ids=["double", "single"])
@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("n", [1, 7, 40])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30], ids=lambda s: f"{s:g}")
def test_cholesky_certificate_is_sound_and_tight(single, complex_, n, scale):
    """``certify_below`` never proves lambda_max < mu when it is not (checked a hair below the
    exact top eigenvalue, clusters and ties at the top included), and proves it just above (single
    precision: above by its rounding allowance; the caller scales matrices to unit range)."""
    mats = hermitian_psd(f"chol-{n}-{complex_}", 6, n, complex_, top=(1.0, 1.0 - 1e-12, 1.0 - 1e-9)[:n]) * scale
    exact = torch.linalg.eigvalsh(mats)[:, -1]
    margin = 2 * single_margin(n) + 1e-6 if single else 1e-9
    for i in range(mats.shape[0]):
        lam = float(exact[i])
        below = certify_below(mats[i : i + 1], lam * (1 - 1e-7 if single else 1e-13), single=single)
        assert not bool(below.any()), f"proved lambda_max < mu below the exact {lam!r}"
        assert not bool(certify_below(mats[i : i + 1], lam * 0.5, single=single).any())
        if single and scale != 1.0:
            continue  # float32 underflow/overflow allowances dominate there: "not proven" is allowed
        assert bool(certify_below(mats[i : i + 1], lam * (1 + margin), single=single).all())


def test_cholesky_certificate_rejects_indefinite_shifts():
    """A test level under a negative-definite part or NaNs never passes."""
    mats = torch.stack([torch.eye(3, dtype=F64) * 2.0, torch.full((3, 3), float("nan"), dtype=F64)])
    assert certify_below(mats, 1.0).tolist() == [False, False]
    assert certify_below(mats, 2.0 * (1 + 1e-9)).tolist() == [True, False]


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize(("batch", "n"), [(1, 1), (5, 3), (300, 12), (20, 60)])
def test_running_max_eigenvalue_brackets_the_maximum(complex_, batch, n):
    """Upper bound >= the exact max, within the tolerance, over chunks fed in any order; the
    estimates only steer, a poor candidate costs exact evaluations but never soundness."""
    mats = hermitian_psd(f"run-{batch}-{n}-{complex_}", batch, n, complex_)
    # two matrices tie for the maximum, a third is just below: the ranking must not matter
    mats[batch // 2] *= 1.5
    mats[-1] = mats[batch // 2] * (1 - 1e-10)
    exact = float(torch.linalg.eigvalsh(mats)[:, -1].max())
    tol = 1e-9
    for order in (torch.arange(batch), torch.arange(batch).flip(0)):
        running = RunningMaxEigenvalue(tol)
        for start in range(0, batch, 64):
            running.certify(mats[order[start : start + 64]])
        assert exact * (1 - 1e-13) <= running.upper <= exact * (1 + tol + 1e-12)
        assert running.lower <= exact * (1 + 1e-13)


def test_matrices_known_to_fail_are_ranked_without_a_second_test():
    """``failed_at``: the batch failed a float64 test at the current level, so the first test is
    skipped. Sound even when the claim is wrong (some were below the level): they are then
    evaluated or retested, and the bound still brackets the maximum."""
    mats = hermitian_psd("failed-at", 12, 20, True)
    exact = torch.linalg.eigvalsh(mats)[:, -1]
    tol = 1e-9
    for seed in (int(torch.argmin(exact)), int(torch.argsort(exact)[6])):
        running = RunningMaxEigenvalue(tol, Workspace(torch.device("cpu")))
        running.add_exact(mats[seed : seed + 1])
        running.certify(mats, failed_at=running.level(), single_first=False)
        assert float(exact.max()) * (1 - 1e-13) <= running.upper <= float(exact.max()) * (1 + tol + 1e-12)
        assert running.exact_evaluations < 12  # ranked: not every matrix went to the eigensolver


def test_workspace_reuses_its_buffers_and_changes_no_result():
    mats = hermitian_psd("workspace", 6, 16, True)
    levels = torch.linalg.eigvalsh(mats)[:, -1]
    mu = float(levels.median())
    workspace = Workspace(torch.device("cpu"))
    for single in (False, True):
        plain = certify_below(mats, mu, single=single)
        reused = certify_below(mats, mu, single=single, workspace=workspace)
        assert plain.tolist() == reused.tolist()
        assert bool((~reused | (levels < mu)).all())  # proven only below the level
        assert bool(reused[levels < mu * (1 - 0.05)].all())  # and decisive away from it
    first = workspace.take("factor", (6, 16, 16), torch.complex128, column_major=True)
    again = workspace.take("factor", (3, 16, 16), torch.complex128, column_major=True)
    assert first.data_ptr() == again.data_ptr() and again.mT.is_contiguous()
    assert Workspace(torch.device("meta")).take("factor", (2, 2), torch.float64) is None


def test_threaded_factorisations_give_the_same_verdicts():
    """With several CPU threads a batch is split across a small pool: same verdicts, with and
    without the workspace's buffers, as one plain call."""
    mats = hermitian_psd("threads", 7, 100, True)
    levels = torch.linalg.eigvalsh(mats)[:, -1]
    mu = float(levels.median())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        plain = certify_below(mats, mu)
        torch.set_num_threads(3)
        split = certify_below(mats, mu)
        buffered = certify_below(mats, mu, workspace=Workspace(torch.device("cpu")))
    finally:
        torch.set_num_threads(before)
    assert plain.tolist() == split.tolist() == buffered.tolist()
    assert 0 < int(plain.sum()) < 7 and bool((~plain | (levels < mu)).all())


@pytest.mark.parametrize(("c_out", "c_in", "grid"), [(300, 296, (6, 6)), (320, 310, (5, 7))])
def test_double_precision_tier_resolves_what_it_set_aside(c_out, c_in, grid):
    """Above ~290 channels every frequency is tested in float64; the failures are set aside and
    resolved together at the end. The result still brackets the exact circular norm tightly."""
    weight = randn(f"double-tier-{c_out}", c_out, c_in, 3, 3)
    exact = _fft_reference(weight, grid)
    value = circular_conv_norm(weight, grid)
    assert exact * (1 - 1e-12) <= value <= exact * (1 + 1e-8)


def test_reduced_precision_matmul_disables_the_single_precision_tier():
    """With TF32/bfloat16 matrix products allowed, float32 error bounds do not hold: double only,
    and the bound is the same (to the tolerance) and still certified."""
    weight = randn("tf32", 40, 48, 3, 3)
    exact = _fft_reference(weight, (10, 10))
    before = torch.get_float32_matmul_precision()
    assert single_precision_is_exact_ieee(torch.device("cpu")) == (before == "highest")
    try:
        torch.set_float32_matmul_precision("medium")
        assert not single_precision_is_exact_ieee(torch.device("cpu"))
        value = circular_conv_norm(weight, (10, 10))
    finally:
        torch.set_float32_matmul_precision(before)
    assert exact * (1 - 1e-12) <= value <= exact * (1 + 1e-8)


def test_lanczos_estimates_never_exceed_the_top_eigenvalue_much():
    mats = hermitian_psd("lanczos", 30, 50, True)
    exact = torch.linalg.eigvalsh(mats)[:, -1]
    estimates = lanczos_estimate(mats, steps=12)
    assert bool((estimates <= exact * (1 + 1e-5)).all())
    assert bool((estimates >= exact * 0.8).all())  # 12 steps on a spread spectrum: close


def test_half_grid_holds_one_of_each_conjugate_pair():
    for grid in [(1,), (2,), (7,), (8,), (4, 6), (5, 5), (3, 4, 2)]:
        idx = half_grid_indices(grid, torch.device("cpu"))
        sizes = torch.tensor(grid)
        keys = {tuple(row.tolist()) for row in idx}
        neg = {tuple(((-row) % sizes).tolist()) for row in idx}
        assert len(keys) == idx.shape[0]
        assert keys | neg == set(_product([range(m) for m in grid]))
        assert len(keys & neg) == sum(
            1 for j in _product([range(m) for m in grid]) if all((2 * x) % m == 0 for x, m in zip(j, grid, strict=True))
        )


@pytest.mark.parametrize("kernel", [(3,), (3, 3), (2, 3), (2, 2, 3)], ids=lambda k: "x".join(map(str, k)))
def test_gram_taps_reproduce_the_per_frequency_gram_matrix(kernel):
    weight = randn(f"gram-{kernel}", 2, 3, 4, *kernel)  # [g, n, c, *A]
    offsets, taps, _ = gram_taps(weight)
    d = len(kernel)
    for w in [torch.zeros(d, dtype=F64), torch.linspace(0.3, 2.9, d, dtype=F64)]:
        grid = torch.meshgrid(*[torch.arange(a, dtype=F64) for a in kernel], indexing="ij")
        phase = torch.exp(-1j * sum(g * x for g, x in zip(grid, w, strict=True))).reshape(-1)
        k_hat = torch.einsum("gnct,t->gnc", weight.reshape(2, 3, 4, -1).to(torch.complex128), phase)
        direct = k_hat @ k_hat.mH
        via_taps = torch.einsum("dgij,d->gij", taps.to(torch.complex128), torch.exp(-1j * (offsets.to(F64) @ w)))
        assert torch.allclose(via_taps, direct, rtol=1e-12, atol=1e-12)


def _fft_reference(weight: torch.Tensor, grid: tuple[int, ...], groups: int = 1) -> float:
    """Exact circular norm on ``grid``: FFT of the zero-padded kernel, svdvals per frequency."""
    d = weight.dim() - 2
    grouped = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
    spectrum = torch.fft.fftn(grouped, s=grid, dim=tuple(range(3, 3 + d)))
    mats = spectrum.permute(*range(3, 3 + d), 0, 1, 2).reshape(-1, *grouped.shape[1:3])
    return float(torch.linalg.svdvals(mats)[..., 0].max())


@pytest.mark.parametrize(
    ("c_out", "c_in", "kernel", "grid", "groups"),
    [
        (40, 48, (3, 3), (10, 10), 1),  # channels where the single-precision tier and Lanczos engage
        (72, 20, (3, 3), (9, 8), 1),  # c_out > c_in: Gram on the input side
        (6, 4, (3, 3), (20, 21), 1),  # more frequencies than one chunk
        (32, 16, (3,), (50,), 2),
        (8, 8, (3, 3, 3), (5, 4, 6), 1),
        (16, 16, (3, 3), (8, 8), 16),  # depthwise: 1x1 per-frequency matrices
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_fast_circular_norm_matches_fft_svd_reference(c_out, c_in, kernel, grid, groups):
    weight = randn(f"fast-{c_out}-{c_in}-{kernel}-{grid}", c_out, c_in // groups, *kernel)
    exact = _fft_reference(weight, grid, groups)
    value = circular_conv_norm(weight, grid, groups)
    assert exact * (1 - 1e-12) <= value <= exact * (1 + 1e-8)


@pytest.mark.parametrize("scale", [1e-30, 1e30, 1e-300, 1e300], ids=lambda s: f"{s:g}")
def test_fast_circular_norm_at_extreme_scales(scale):
    weight = randn("fast-scale", 24, 20, 3, 3)
    exact = _fft_reference(weight, (7, 7))
    value = circular_conv_norm(weight * scale, (7, 7))
    assert exact * scale * (1 - 1e-12) <= value <= exact * scale * (1 + 1e-8)


def test_fast_circular_norm_with_a_clustered_top_block_and_ties():
    """Ill-conditioned case: the top frequency's matrix has its two largest singular values 1e-9
    apart, and two frequencies (a symmetric kernel) hold the same maximum."""
    gen = generator("cluster")
    u = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=F64)).Q
    centre = (
        u
        * torch.linspace(0.1, 1.0, 20, dtype=F64)
        .flip(0)
        .index_put_((torch.tensor([1]),), torch.tensor([1.0 - 1e-9], dtype=F64))
    ) @ v.T
    weight = torch.zeros(20, 20, 3, 3, dtype=F64)
    weight[:, :, 1, 1] = centre
    weight[:, :, 0, 1] = weight[:, :, 2, 1] = 0.05 * randn("cluster-side", 20, 20)  # symmetric in w1
    exact = _fft_reference(weight, (8, 8))
    value = circular_conv_norm(weight, (8, 8))
    assert exact * (1 - 1e-12) <= value <= exact * (1 + 1e-8)
    zero = torch.zeros(5, 4, 3, 3, dtype=F64)
    assert circular_conv_norm(zero, (6, 6)) == 0.0
