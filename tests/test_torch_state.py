"""Module state beyond plain weights: torch's spectral_norm and weight_norm in state_dicts (report and
normalize), forwards that write into their own buffers, one unmapped op named once, circular padding."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize as torch_parametrize

from lipcheck.frontends.torch_frontend import TorchOptions
from lipcheck.frontends.torch_state import baked, effective_state
from lipcheck.pipeline import analyse
from lipcheck.rewrite.normalize import NormalizeOptions, normalize
from lipcheck.spectral.conv import ConvGeometry, conv_operator_norm
from tests.conftest import ROOT
from tests.test_torch_frontend import run_cli
from tests.torch_nets import SmallCNN, circular_cnn, reflect_cnn, spectral_normed_cnn, weight_normed_cnn

IMG = "1,3,16,16"
NETS = "tests.torch_nets"


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _plain(model: SmallCNN) -> SmallCNN:
    """The same network with its parametrizations baked: the weights it computes with in eval mode."""
    plain = SmallCNN()
    for layer in (model.conv, model.up, model.fc):
        assert torch_parametrize.is_parametrized(layer)
    with torch.no_grad():
        for name in ("conv", "up", "fc"):
            getattr(plain, name).weight.copy_(getattr(model, name).weight)
            getattr(plain, name).bias.copy_(getattr(model, name).bias)
    return plain.eval()


@pytest.mark.parametrize("factory", [spectral_normed_cnn, weight_normed_cnn])
def test_parametrized_state_dicts_are_read_as_the_weights_they_compute(factory, tmp_path: Path) -> None:
    model = factory()
    path = tmp_path / "sn.pt"
    torch.save(model.state_dict(), path)
    plain = tmp_path / "plain.pt"
    torch.save(_plain(model).state_dict(), plain)
    state = effective_state(torch.load(path))
    for key, value in _plain(model).state_dict().items():
        assert torch.allclose(state[key].double(), value.double(), rtol=1e-6, atol=1e-8), key  # ConvTranspose: dim 1
    expected = analyse(plain, device="cpu")  # weights only: per-tensor norms of the effective weights
    found = analyse(path, device="cpu")
    assert [r.name for r in found.layers] == [r.name for r in expected.layers]
    assert [r.lipschitz for r in found.layers] == pytest.approx([r.lipschitz for r in expected.layers], rel=1e-6)
    reference = analyse(plain, [IMG], device="cpu", torch_options=TorchOptions(f"{NETS}:SmallCNN")).upper_bound
    for architecture in (
        "SmallCNN",
        factory.__name__,
    ):  # a plain module, or one that registers the same parametrization
        bound = analyse(path, [IMG], device="cpu", torch_options=TorchOptions(f"{NETS}:{architecture}")).upper_bound
        assert bound == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize("factory", [spectral_normed_cnn, weight_normed_cnn])
def test_a_baked_state_dict_loads_into_the_parametrized_factory(factory, tmp_path: Path) -> None:
    """remove_parametrizations(leave_parametrized=True) before saving: plain keys, read by the same factory."""
    model = factory().eval()
    reference_path = tmp_path / "parametrized.pt"
    torch.save(model.state_dict(), reference_path)
    baked_path = tmp_path / "baked.pt"
    torch.save(baked(model).state_dict(), baked_path)
    assert not any(".parametrizations." in key for key in torch.load(baked_path))
    options = TorchOptions(f"{NETS}:{factory.__name__}")
    expected = analyse(reference_path, [IMG], device="cpu", torch_options=options).upper_bound
    found = analyse(baked_path, [IMG], device="cpu", torch_options=options).upper_bound
    assert expected is not None and found == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("architecture", ["SmallCNN", "spectral_normed_cnn", None])
def test_normalize_rescales_a_spectral_normed_state_dict_in_its_own_keys(architecture, tmp_path: Path) -> None:
    path, out = tmp_path / "sn.pt", tmp_path / "out.pt"
    torch.save(spectral_normed_cnn().state_dict(), path)
    options = TorchOptions(None if architecture is None else f"{NETS}:{architecture}")
    result = normalize(path, out, NormalizeOptions(input_shapes=(IMG,) if architecture else (), torch_options=options))
    assert result.passed and len(result.layers) == 3, [c.detail for c in result.checks]
    assert all(layer.norm_after == pytest.approx(1.0, rel=1e-5) for layer in result.layers)
    assert set(torch.load(out)) == set(torch.load(path))  # still loads into the spectral-normed module
    model = spectral_normed_cnn()
    model.load_state_dict(torch.load(out))
    weight = model.eval().fc.weight.detach().double()
    assert torch.linalg.matrix_norm(weight, 2).item() == pytest.approx(1.0, rel=1e-5)  # in eval mode


def test_a_forward_that_writes_its_buffers_is_one_line_before_tracing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import lipcheck.frontends.torch_frontend as frontend
    from tests.torch_nets import PowerIteration

    def never(*args: object) -> None:
        raise AssertionError("traced a stateful module")

    monkeypatch.setattr(frontend, "_export", never)
    path = tmp_path / "p.pt"
    model = PowerIteration()
    before = model.u.clone()
    torch.save(model.state_dict(), path)
    code, _, err = run_cli(capsys, "report", str(path), "--model", f"{NETS}:PowerIteration", "-s", "1,4")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "changes its own buffer 'u'" in err and "aten.copy_" in err
    assert torch.equal(torch.load(path)["u"], before)
    code, _, err = run_cli(capsys, "report", str(path), "--model", f"{NETS}:PowerIterationAssigned", "-s", "1,4")
    assert code == 2 and "changes its own buffer 'u' at every call (an assignment)" in err, err


def test_the_watch_restores_what_the_forward_changed() -> None:
    from lipcheck.errors import ModelLoadError
    from lipcheck.frontends.torch_state import watch_buffer_writes
    from tests.torch_nets import PowerIterationAssigned

    model = PowerIterationAssigned()
    buffer, value = model.u, model.u.clone()
    with pytest.raises(ModelLoadError), watch_buffer_writes(model, "m"), torch.no_grad():
        model(torch.randn(1, 4))
    assert model.u is buffer and torch.equal(model.u, value)
    nan = SmallCNN()
    with torch.no_grad():
        nan.fc.weight[0, 0] = float("nan")
    with watch_buffer_writes(nan, "m"), torch.no_grad():  # a NaN weight is not a change
        nan(torch.randn(1, 3, 16, 16))


def test_one_unmapped_op_is_named_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.torch_nets import CummaxNet

    path = tmp_path / "g.pt"
    torch.save(CummaxNet().state_dict(), path)
    code, _, err = run_cli(capsys, "report", str(path), "--model", f"{NETS}:CummaxNet", "-s", "1,8")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "for 1 PyTorch op(s): aten.cummax (cummax)" in err  # not every use of its result after it


def _dense_norm(module: torch.nn.Module, shape: tuple[int, ...]) -> float:
    module = module.double()
    x0 = torch.zeros(math.prod(shape), dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda x: module(x.reshape(shape)).reshape(-1), x0)
    return torch.linalg.matrix_norm(jacobian, 2).item()


CIRCULAR = [(3, 1, 1, (8, 8)), (3, 2, 2, (7, 6)), (5, 2, 1, (6, 9)), ((3, 1), (1, 0), 1, (5, 5))]


@pytest.mark.parametrize(("kernel", "padding", "dilation", "size"), CIRCULAR)
def test_circular_padding_is_one_exact_circular_convolution(kernel, padding, dilation, size) -> None:
    from lipcheck.frontends.torch_frontend import module_to_graph
    from lipcheck.pipeline import certify

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, kernel, padding=padding, dilation=dilation, padding_mode="circular", bias=False)
    found = certify(module_to_graph(conv, [f"1,2,{size[0]},{size[1]}"], "c"), method="product", copy=True).product
    assert [(layer.op, layer.exact) for layer in found.layers] == [("Conv", True)]  # the wrap Pad is not a layer
    exact = _dense_norm(conv, (1, 2, *size))
    assert exact <= found.layers[0].lipschitz <= exact * (1 + 1e-8)


def test_a_padding_that_stays_a_node_is_named_after_its_module() -> None:
    found = analyse_module(reflect_cnn())
    assert [(layer.name, layer.op) for layer in found.layers[:2]] == [("conv.pad", "Pad"), ("conv", "Conv")]


def analyse_module(model: torch.nn.Module):
    from lipcheck.frontends.torch_frontend import module_to_graph
    from lipcheck.pipeline import certify

    return certify(module_to_graph(model, [IMG], "m"), method="product", copy=True).product


def test_parametrize_mode_on_circular_padding(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    path, out = tmp_path / "c.pt", tmp_path / "p.pt"
    torch.save(circular_cnn().state_dict(), path)
    args = ["--mode", "parametrize", "--model", f"{NETS}:circular_cnn", "-s", IMG, "-o", str(out)]
    code, table, err = run_cli(capsys, "normalize", str(path), *args)
    assert code == 0 and "PASS layer norms" in table, table + err
    from lipcheck.rewrite.parametrize import parametrize, remove_parametrizations

    model = parametrize(circular_cnn(), input_shape=(1, 3, 16, 16))
    model.load_state_dict(torch.load(out))
    baked = remove_parametrizations(model.eval())
    weight = baked.conv.weight.detach().double()
    geometry = dataclasses.replace(ConvGeometry.default(2, input_size=(16, 16)), circular=True)
    certified = conv_operator_norm(weight, geometry).value
    assert certified == pytest.approx(1.0, rel=1e-6)  # the circular conv on the input's own 16x16 grid
    import lipcheck.rewrite.normalize as module

    monkeypatch.setattr(module, "TOLERANCE", -0.5)
    code, _, err = run_cli(capsys, "normalize", str(path), *args[:-1], str(tmp_path / "q.pt"))
    assert (
        code == 1
        and not (tmp_path / "q.pt").exists()
        and sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "p.pt"]
    )


def test_weight_norm_scale_keeps_direction() -> None:
    from lipcheck.frontends.torch_state import find_parametrized

    state = weight_normed_cnn().state_dict()
    found = {p.name: p for p in find_parametrized(state)}
    before = found["conv.weight"].effective(state).numpy()
    found["conv.weight"].scale(state, 0.5)
    assert np.allclose(found["conv.weight"].effective(state).numpy(), 0.5 * before)


def test_rsqrt_is_one_over_a_square_root() -> None:
    from lipcheck.frontends.torch_frontend import module_to_graph
    from lipcheck.interpret import interpret

    class Scaled(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x * x + 4.0)

    graph = module_to_graph(Scaled(), ["1,5"], "rsqrt")
    x = torch.linspace(-3, 3, 5, dtype=torch.float64).reshape(1, 5)
    assert torch.allclose(interpret(graph)(x), Scaled()(x), atol=1e-12)
