"""Spectral normalization as a training-time parametrization: operator norms, not reshaped kernels."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize
from torch.nn.utils.parametrizations import spectral_norm

from lipcheck.compose import compose
from lipcheck.errors import LipcheckError
from lipcheck.frontends.torch_frontend import module_to_graph
from lipcheck.passes import prepare
from lipcheck.rewrite.parametrize import ParametrizeError, normalised_layers, parametrize, remove_parametrizations
from lipcheck.spectral.conv import ConvGeometry, conv_operator_norm, conv_transpose_operator_norm

IMAGE = (1, 3, 16, 16)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny convs: one thread is faster, and far steadier on a loaded machine, than several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SmallCNN(nn.Module):
    """Padded convs, one with stride 2, then a Linear: no BatchNorm, so lipcheck sees the weights as they are."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.flatten(1))


def train(model: nn.Module, steps: int = 20, lr: float = 1e-3) -> None:
    """Adam on a random regression task: enough to move the weights well away from their start."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, *IMAGE[1:], generator=generator)
    targets = torch.randn(16, 10, generator=generator)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = (model(inputs) - targets).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def certified_norms(model: nn.Module) -> dict[str, float]:
    """lipcheck's certified per-layer norms of the plain (saved and re-loaded) model, by layer name."""
    fresh = SmallCNN()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    fresh.load_state_dict(state, strict=True)
    graph = module_to_graph(fresh, [",".join(map(str, IMAGE))], "cnn")
    prepare(graph)
    result = compose(graph)
    return {layer.name: layer.lipschitz for layer in result.layers if layer.op in ("Conv", "Gemm", "MatMul")}


def test_operator_norms_stay_at_target_while_torch_spectral_norm_leaves_convs_above() -> None:
    ours = parametrize(SmallCNN(), torch.randn(IMAGE), target=1.0)
    train(ours)
    remove_parametrizations(ours)
    ours_norms = certified_norms(ours)
    assert sorted(ours_norms) == ["conv1", "conv2", "conv3", "fc"]
    for name, norm in ours_norms.items():  # the circular sigma normalised: the zero-padded operator a little below
        assert 0.95 <= norm <= 1.0 * (1 + 0.01), (name, ours_norms)

    reference = SmallCNN()
    for layer in (reference.conv1, reference.conv2, reference.conv3, reference.fc):
        spectral_norm(layer)
    train(reference)
    for layer in (reference.conv1, reference.conv2, reference.conv3, reference.fc):
        torch_parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    torch_norms = certified_norms(reference)
    assert max(torch_norms[name] for name in ("conv1", "conv2", "conv3")) > 1.2 * 1.0, torch_norms


def test_exact_sigma_keeps_every_layer_at_the_target_throughout_training() -> None:
    model = parametrize(SmallCNN(), torch.randn(IMAGE), target=1.0, exact_sigma=True)
    start = model.conv2.parametrizations["weight"].original.detach().clone()
    train(model)
    assert float((model.conv2.parametrizations["weight"].original.detach() - start).abs().max()) > 1e-3
    remove_parametrizations(model, exact=False)  # the weights the model trained with, not re-normalised
    norms = certified_norms(model)
    assert len(norms) == 4
    for name, norm in norms.items():  # lipcheck certifies the zero-padded operator: at most the circular sigma
        assert 0.95 <= norm <= 1.0 + 1e-4, (name, norms)


def dense_operator_norm(layer: nn.Module, input_shape: tuple[int, ...]) -> float:
    """The layer's exact l2 operator norm (bias off) on ``input_shape``, from the SVD of its matrix."""
    size = math.prod(input_shape)
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *input_shape)
    weight = layer.weight.detach().double()
    if isinstance(layer, nn.ConvTranspose2d):
        columns = F.conv_transpose2d(basis, weight, None, layer.stride, layer.padding, layer.output_padding,
                                     layer.groups, layer.dilation)  # fmt: skip
    else:
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
        columns = conv(basis, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return float(torch.linalg.matrix_norm(columns.reshape(size, -1), ord=2))


def certified_layer_norm(layer: nn.Module, spatial: tuple[int, ...]) -> float:
    """lipcheck's certified norm of one conv / conv-transpose at a known input size."""
    weight = layer.weight.detach().double()
    pads = tuple(layer.padding) * 2
    geometry = ConvGeometry(stride=tuple(layer.stride), dilation=tuple(layer.dilation), pads=pads,
                            groups=layer.groups, input_size=spatial)  # fmt: skip
    if isinstance(layer, nn.ConvTranspose2d):
        return conv_transpose_operator_norm(weight, geometry).value
    return conv_operator_norm(weight, geometry).value


LAYERS = [
    pytest.param(lambda: nn.Conv1d(4, 6, 5, stride=2, padding=2), (4, 12), id="conv1d-stride2"),
    pytest.param(lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (4, 6, 6), id="conv2d-dilated-grouped"),
    pytest.param(lambda: nn.Conv3d(2, 3, 3, padding=1), (2, 4, 4, 4), id="conv3d"),
    pytest.param(
        lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), (4, 5, 5), id="convtranspose2d"
    ),
    pytest.param(  # output padding >= stride: the closed-form adjoint does not fit, autograd's is used
        lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, dilation=3, padding=1, output_padding=2),
        (4, 5, 5),
        id="convtranspose2d-dilated",
    ),
]


@pytest.mark.parametrize(("make_layer", "input_shape"), LAYERS)
def test_conv_operator_norm_is_the_certified_norm_and_bounds_the_exact_one(make_layer, input_shape) -> None:
    torch.manual_seed(2)
    layer = make_layer()
    with torch.no_grad():
        layer.weight.normal_()
    wrapped = nn.Sequential(layer)
    parametrize(wrapped, input_shape=(1, *input_shape), target=0.5)
    wrapped.eval()
    exact = dense_operator_norm(layer, input_shape)
    # the circular sigma normalised (a warm-started estimate); lipcheck certifies the zero-padded operator, below it
    assert exact * (1 - 1e-9) <= certified_layer_norm(layer, input_shape[1:]) <= 0.5 * (1 + 1e-2)
    normalisation = layer.parametrizations["weight"][0]
    original = layer.parametrizations["weight"].original.detach().double()
    exact_sigma = float(normalisation.exact_sigma(original))  # the differentiable FFT/SVD path
    assert exact_sigma == pytest.approx(normalisation.converged_sigma(original), rel=1e-9)
    remove_parametrizations(wrapped)  # baked with lipcheck's certified sigma on the layer's own grid
    exact = dense_operator_norm(layer, input_shape)
    assert exact * (1 - 1e-9) <= certified_layer_norm(layer, input_shape[1:]) <= 0.5 * (1 + 1e-5)
    assert 0.5 * 0.7 < exact <= 0.5 * (1 + 1e-5)  # boundary effects: a 6x6 map with padding 2 loses most


@pytest.mark.parametrize(("make_layer", "input_shape"), LAYERS)
def test_exact_mode_normalises_the_zero_padded_operator(make_layer, input_shape) -> None:
    torch.manual_seed(3)
    layer = make_layer()
    with torch.no_grad():
        layer.weight.normal_()
    parametrize(nn.Sequential(layer), torch.randn(1, *input_shape), target=2.0, conv_norm="exact")
    layer.eval()
    assert dense_operator_norm(layer, input_shape) == pytest.approx(2.0, rel=1e-3)


def test_reflect_padding_is_normalised_with_the_padding_included() -> None:
    torch.manual_seed(6)
    layer = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
    wrapped = parametrize(nn.Sequential(layer), torch.randn(1, 4, 6, 6), target=1.0)  # operator mode: exact operator
    basis = torch.eye(4 * 36, dtype=torch.float64).reshape(-1, 4, 6, 6)

    def norm_with_padding() -> float:
        reference = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=False).double()
        with torch.no_grad():
            reference.weight.copy_(layer.weight.double())
            return float(torch.linalg.matrix_norm(reference(basis).reshape(4 * 36, -1), ord=2))

    wrapped.eval()
    assert norm_with_padding() == pytest.approx(1.0, rel=1e-2)  # warm-started estimate
    remove_parametrizations(wrapped)  # power iteration to convergence
    assert norm_with_padding() == pytest.approx(1.0, rel=1e-4)


def test_reshape_mode_matches_torch_spectral_norm() -> None:
    torch.manual_seed(4)
    layers = [nn.Conv2d(3, 5, 3), nn.ConvTranspose2d(4, 6, 3, stride=2), nn.Conv1d(2, 7, 4), nn.Linear(9, 4)]
    for layer in layers:
        theirs = spectral_norm(copy.deepcopy(layer), n_power_iterations=500)
        parametrize(nn.Sequential(layer), conv_norm="reshape")  # no example needed: no operator norms
        torch_weight = theirs.weight.detach()  # one training-mode access: 500 more steps, converged
        layer.eval()
        torch.testing.assert_close(layer.weight.detach(), torch_weight, rtol=1e-4, atol=1e-6)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv2(torch.relu(self.conv1(x)))))


TINY_INPUT = (2, 2, 6, 6)


def test_layers_pattern_selects_by_qualified_name() -> None:
    assert normalised_layers(parametrize(Tiny(), input_shape=TINY_INPUT)) == ["conv1", "conv2", "head.1"]
    assert normalised_layers(parametrize(Tiny(), input_shape=TINY_INPUT, layers="conv*")) == ["conv1", "conv2"]
    assert normalised_layers(parametrize(Tiny(), input_shape=TINY_INPUT, layers="head.*, conv2")) == ["conv2", "head.1"]
    with pytest.raises(ValueError, match="no Linear"):
        parametrize(Tiny(), input_shape=TINY_INPUT, layers="decoder.*")


def test_registering_twice_adds_nothing_and_example_is_required_for_operator_norms() -> None:
    model = parametrize(Tiny(), input_shape=TINY_INPUT)
    parametrize(model, input_shape=TINY_INPUT)
    assert all(len(layer.parametrizations["weight"]) == 1 for layer in (model.conv1, model.conv2, model.head[1]))
    with pytest.raises(ValueError, match="example_inputs or input_shape"):
        parametrize(Tiny())
    unused = Tiny()
    unused.spare = nn.Conv2d(4, 4, 1)
    with pytest.raises(ValueError, match="did not run.*spare"):
        parametrize(unused, input_shape=TINY_INPUT)


def _vectors(model: nn.Module) -> list[torch.Tensor]:
    return [buffer.clone() for name, buffer in model.named_buffers() if name.endswith(("_u", "_v"))]


def test_power_iteration_runs_in_training_mode_only_and_gradients_reach_the_weights() -> None:
    model = parametrize(Tiny(), input_shape=TINY_INPUT)
    x = torch.randn(TINY_INPUT)
    with torch.no_grad():
        model.conv1.parametrizations["weight"].original.add_(0.3 * torch.randn(4, 2, 3, 3))
    before = _vectors(model)
    assert len(before) == 6
    model.eval()
    model(x)
    assert all(torch.equal(a, b) for a, b in zip(before, _vectors(model), strict=True))
    model.train()
    original = model.conv1.parametrizations["weight"].original
    start = original.detach().clone()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().sum().backward()
    assert original.grad is not None and float(original.grad.abs().max()) > 0
    assert not torch.equal(before[0], _vectors(model)[0])  # conv1's u moved: its weight changed
    optimiser.step()
    assert float((original.detach() - start).abs().max()) > 1e-4


def test_remove_parametrizations_gives_the_plain_architecture_with_normalised_weights() -> None:
    model = parametrize(Tiny(), input_shape=TINY_INPUT, target=0.7)
    model.eval()
    x = torch.randn(TINY_INPUT)
    expected = model(x).detach()
    remove_parametrizations(model, exact=False)  # bake exactly what the model computes now
    assert normalised_layers(model) == []
    assert not any(torch_parametrize.is_parametrized(layer) for layer in model.modules())
    assert set(model.state_dict()) == set(Tiny().state_dict())
    fresh = Tiny()
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    torch.testing.assert_close(fresh(x), expected)
    assert float(torch.linalg.matrix_norm(fresh.head[1].weight.detach().double(), ord=2)) == pytest.approx(
        0.7, rel=1e-4
    )


def test_bad_options_are_one_line_errors_and_register_nothing() -> None:
    model = Tiny()
    for options in ({"target": 0.0}, {"target": float("inf")}, {"n_power_iterations": 0}, {"conv_norm": "fft"}):
        with pytest.raises(ParametrizeError):
            parametrize(model, input_shape=TINY_INPUT, **options)
    assert normalised_layers(model) == []
    assert issubclass(ParametrizeError, LipcheckError) and issubclass(ParametrizeError, ValueError)
