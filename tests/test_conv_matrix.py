"""The exact conv operator from its dense matrix: equal to torch's conv Jacobian entry for entry, its certified
norm never below the Jacobian's SVD and within rounding of it, and strictly tighter than the circular embedding
where the map is small against the kernel (5x5 depthwise on 2x2: EfficientNet-B0's last stage at 64x64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lipcheck.spectral.conv import (
    ConvGeometry,
    circular_embedding_bound,
    conv_operator_norm,
    conv_transpose_operator_norm,
)
from lipcheck.spectral.conv_matrix import DENSE_METHOD, ConvWindow, conv_matrices, dense_affordable

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def jacobian(layer: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    layer = layer.double()
    x0 = torch.zeros(math.prod(shape), dtype=torch.float64)
    return torch.autograd.functional.jacobian(lambda x: layer(x.reshape(shape)).reshape(-1), x0)


def _tuple(value, d: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,) * d


def geometry_of(layer: nn.Module, spatial: tuple[int, ...]) -> ConvGeometry:
    d = len(spatial)
    return ConvGeometry(
        stride=_tuple(layer.stride, d),
        dilation=_tuple(layer.dilation, d),
        pads=_tuple(layer.padding, d) * 2,
        groups=layer.groups,
        input_size=spatial,
    )


# (d, c_in, c_out, kernel, stride, padding, dilation, groups, spatial)
CASES = [
    pytest.param(1, 3, 4, 5, 2, 2, 1, 1, (6,), id="1d-strided"),
    pytest.param(1, 4, 4, 3, 1, 3, 3, 2, (5,), id="1d-dilated-grouped"),
    pytest.param(2, 6, 6, 5, 1, 2, 1, 6, (2, 2), id="2d-depthwise-5x5-on-2x2"),
    pytest.param(2, 4, 6, (5, 3), (2, 1), (2, 1), 1, 2, (4, 3), id="2d-strided-grouped"),
    pytest.param(2, 3, 2, 3, 1, 2, 2, 1, (3, 4), id="2d-dilated"),
    pytest.param(2, 2, 3, 5, 1, 2, 1, 1, (4, 4), id="2d-5x5-on-4x4"),
    pytest.param(3, 2, 2, 3, (1, 2, 1), 1, 1, 2, (2, 3, 2), id="3d-strided-depthwise"),
]


@pytest.mark.parametrize(("d", "c_in", "c_out", "kernel", "stride", "padding", "dilation", "groups", "spatial"), CASES)
def test_matrix_is_the_conv_jacobian(d, c_in, c_out, kernel, stride, padding, dilation, groups, spatial) -> None:
    torch.manual_seed(1)
    layer = CONVS[d](c_in, c_out, kernel, stride, padding, dilation, groups, bias=False)
    exact = jacobian(layer, (1, c_in, *spatial))
    geometry = geometry_of(layer, spatial)
    out = tuple(layer(torch.zeros(1, c_in, *spatial, dtype=torch.float64)).shape[2:])
    window = ConvWindow(spatial, out, geometry.pads[:d], geometry.stride, geometry.dilation, groups)
    mats = conv_matrices(layer.weight.detach(), window)
    rows, cols = c_out // groups * math.prod(out), c_in // groups * math.prod(spatial)
    blocks = exact.reshape(groups, rows, groups, cols)
    for g in range(groups):
        assert torch.equal(mats[g], blocks[g, :, g]), "the dense matrix copies the weights exactly"
    truth = float(torch.linalg.matrix_norm(exact, 2))
    found = conv_operator_norm(layer.weight.detach(), geometry)
    assert found.method == DENSE_METHOD and found.exact
    assert truth <= found.value <= truth * (1 + 1e-9)


# (d, c_in, c_out, kernel, stride, padding, output_padding, dilation, groups, spatial)
TRANSPOSE_CASES = [
    pytest.param(1, 3, 2, 4, 2, 1, 1, 1, 1, (4,), id="1d-strided-cropped"),
    pytest.param(2, 4, 4, 3, 2, 1, 1, 1, 2, (3, 3), id="2d-grouped-output-padding"),
    pytest.param(2, 2, 3, 5, 1, 2, 0, 2, 1, (2, 3), id="2d-dilated-cropped"),
    pytest.param(3, 2, 2, 3, 2, 1, 0, 1, 2, (2, 2, 1), id="3d-grouped"),
]


@pytest.mark.parametrize(
    ("d", "c_in", "c_out", "kernel", "stride", "padding", "adjust", "dilation", "groups", "spatial"), TRANSPOSE_CASES
)
def test_transposed_conv_is_its_exact_norm(d, c_in, c_out, kernel, stride, padding, adjust, dilation, groups, spatial):
    torch.manual_seed(2)
    layer = TRANSPOSED[d](c_in, c_out, kernel, stride, padding, adjust, groups, False, dilation)
    truth = float(torch.linalg.matrix_norm(jacobian(layer, (1, c_in, *spatial)), 2))
    out = tuple(layer(torch.zeros(1, c_in, *spatial, dtype=torch.float64)).shape[2:])
    geometry = geometry_of(layer, spatial)
    found = conv_transpose_operator_norm(layer.weight.detach(), geometry, (geometry.pads[:d], out))
    assert found.method == DENSE_METHOD
    assert truth <= found.value <= truth * (1 + 1e-9)
    uncropped = conv_transpose_operator_norm(layer.weight.detach(), geometry)  # crop unknown: still a bound
    assert found.value <= uncropped.value * (1 + 1e-12)


def test_depthwise_5x5_on_2x2_is_strictly_tighter_than_the_embedding() -> None:
    """The 2x2 map only meets the central 3x3 taps two at a time; the circular grid sums all 25."""
    torch.manual_seed(0)
    layer = nn.Conv2d(32, 32, 5, padding=2, groups=32, bias=False)
    geometry = geometry_of(layer, (2, 2))
    weight = layer.weight.detach()
    embedded = circular_embedding_bound(weight, geometry).value
    found = conv_operator_norm(weight, geometry)
    truth = float(torch.linalg.matrix_norm(jacobian(layer, (1, 32, 2, 2)), 2))
    assert found.method == DENSE_METHOD
    assert truth <= found.value <= truth * (1 + 1e-9)
    assert found.value < embedded / 2.5  # 0.591 against 1.613 (2.73x) for this seed


def test_circular_convs_keep_the_embedding() -> None:
    """A folded wrap padding makes the operator the circular conv: its dense zero-padded restriction is smaller
    and would not bound it."""
    torch.manual_seed(3)
    weight = torch.randn(3, 2, 3, 3).double()
    geometry = ConvGeometry.default(2, input_size=(4, 4), circular=True)
    found = conv_operator_norm(weight, geometry)
    assert found.method.startswith("circular embedding")
    layer = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False)
    layer.weight.data = weight.clone()
    truth = float(torch.linalg.matrix_norm(jacobian(layer, (1, 2, 4, 4)), 2))
    assert truth <= found.value <= truth * (1 + 1e-9)


def test_large_operators_stay_on_the_embedding() -> None:
    window = ConvWindow((16, 16), (16, 16), (1, 1), (1, 1), (1, 1), 1)
    assert dense_affordable((4, 4, 3, 3), window)  # 1024 x 1024: about half a second
    assert not dense_affordable((8, 8, 3, 3), window)  # 2048 x 2048: several seconds
    assert dense_affordable((64, 1, 3, 3), ConvWindow((16, 16), (16, 16), (1, 1), (1, 1), (1, 1), 64))  # depthwise
