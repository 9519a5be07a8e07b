"""Sorting activations, l2-norm pooling and selections that rejoin, as exporters really write them.

Each module of ``tests.sorting_nets`` is written as deel-torchlip or orthogonium write its forward, exported
by TorchScript (``dynamo=False``), by dynamo, as a torch.export program (.pt2), and as a state_dict read with
``--model``. Each bound is checked against difference quotients measured on the exported file (onnxruntime,
or the exported program): never above the bound, and equal to it where the constant is reached.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from lipcheck.errors import ModelLoadError
from lipcheck.frontends import load_model
from lipcheck.frontends.torch_frontend import TorchOptions
from lipcheck.graph import Graph
from lipcheck.interpret import interpret
from lipcheck.passes import prepare
from lipcheck.pipeline import analyse
from lipcheck.report import Report
from tests.onnx_builders import Runner, node, ort_jacobian, rng_for, save_nodes, sigma_max
from tests.sorting_nets import (
    Orthogonal,
    OrthogoniumMaxMin,
    Roll,
    ScaledAdaptativeL2NormPool2d,
    ScaledL2NormPool2d,
    TorchlipGroupSort,
    TorchlipMaxMin,
)

FORMS = ("torchscript", "dynamo", "pt2")
Function = Callable[[np.ndarray], np.ndarray]


def _export(module: nn.Module, shape: tuple[int, ...], form: str, directory: Path) -> Path:
    x = torch.randn(*shape)
    module = module.eval()
    if form == "pt2":
        path = directory / "model.pt2"
        torch.export.save(torch.export.export(module, (x,)), path)
        return path
    path = directory / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()):  # dynamo's progress lines
        torch.onnx.export(
            module, (x,), str(path), dynamo=form == "dynamo", **({} if form == "dynamo" else {"opset_version": 17})
        )
    return path


def _function(path: Path) -> Function:
    """The exported file as a function of one float32 input: onnxruntime, or the torch.export program."""
    if path.suffix == ".onnx":
        return Runner(path)
    program = torch.export.load(path).module()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return program(torch.from_numpy(np.asarray(x, dtype=np.float32))).double().numpy().reshape(-1)

    return run


def _in_float64(module: nn.Module) -> Function:
    """The module itself in float64: the reference for networks whose float32 rounding would show."""
    module = module.double().eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy().reshape(-1)

    return run


def _largest_quotient(run: Function, shape: tuple[int, ...], tag: str, pairs: int = 200) -> float:
    """max ||f(x) - f(y)|| / ||x - y|| over random pairs, near (one linear region) and far."""
    rng = rng_for(tag)
    worst = 0.0
    for i in range(pairs):
        x = rng.standard_normal(shape).astype(np.float32)
        y = (x + 10.0 ** -(i % 4) * rng.standard_normal(shape)).astype(np.float32)
        gap = np.linalg.norm(x.astype(np.float64) - y.astype(np.float64))
        worst = max(worst, float(np.linalg.norm(run(x) - run(y)) / gap))
    return worst


def _prepared_is_the_same_function(path: Path, shape: tuple[int, ...]) -> None:
    """The recognised nodes compute what the ops they replace computed (lipcheck's interpreter, float64)."""
    graph = load_model(path, [])
    assert isinstance(graph, Graph)
    x = torch.as_tensor(rng_for(str(path)).standard_normal(shape))
    before = interpret(graph)(x)
    assert torch.allclose(interpret(prepare(graph.copy()))(x), before, rtol=1e-12, atol=1e-12)


def _ops(report: Report) -> list[str]:
    return [layer.op for layer in report.layers]


# ---------------------------------------------------------------------------------------------
# Sorting activations: 1 however written (before: GroupSort2 sqrt 2, MaxMin 2 or sqrt 2, FullSort in .pt2 refused)


class StackedGroupSort(nn.Module):
    """GroupSort2 by torch.stack (an Unsqueeze before each part of the Concat)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = x.view(x.shape[0], -1, 2)
        return torch.stack([pairs.min(-1)[0], pairs.max(-1)[0]], -1).flatten(1)


SORTING = {  # factory, input shape, the op the report shows
    "GroupSort2": (lambda: TorchlipGroupSort(2), (1, 8), "GroupSort"),
    "GroupSort2 on images": (lambda: TorchlipGroupSort(2), (1, 4, 3, 3), "GroupSort"),
    "GroupSort4": (lambda: TorchlipGroupSort(4), (1, 8), "TopK"),
    "FullSort": (lambda: TorchlipGroupSort(None), (1, 8), "TopK"),
    "MaxMin (deel-torchlip)": (TorchlipMaxMin, (1, 6), "CReLU"),
    "MaxMin (orthogonium)": (OrthogoniumMaxMin, (1, 8, 3, 3), "MaxMin"),
    "GroupSort2 by torch.stack": (StackedGroupSort, (1, 8), "GroupSort"),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", SORTING)
def test_sorting_activation_is_one_lipschitz(name: str, form: str, tmp_path: Path) -> None:
    make, shape, shown = SORTING[name]
    path = _export(make(), shape, form, tmp_path)
    report = analyse(path, device="cpu")
    assert report.upper_bound is not None and report.upper_bound <= 1 + 1e-6
    assert shown in _ops(report)
    _prepared_is_the_same_function(path, shape)
    worst = _largest_quotient(_function(path), shape, f"{name} {form}")
    # sorts, max, min, relu and negation are exact in float32: the quotients are 1 up to float64 rounding
    assert 1 - 1e-9 <= worst <= report.upper_bound * (1 + 1e-9)


@pytest.mark.parametrize("name", ["GroupSort2", "GroupSort4", "FullSort", "MaxMin", "OrthogoniumMaxMin"])
def test_sorting_activation_of_a_state_dict(name: str, tmp_path: Path) -> None:
    """state_dict + --model: an orthogonal linear map (norm 1) then the activation: 1 in all."""
    net = Orthogonal(name).eval()
    path = tmp_path / "weights.pt"
    torch.save(net.state_dict(), path)
    options = TorchOptions("tests.sorting_nets:Orthogonal", {"activation": name})
    report = analyse(path, ["1,8"], device="cpu", torch_options=options)
    activation = [layer for layer in report.layers if layer.name.startswith("act")]
    assert activation and max(layer.lipschitz for layer in activation) <= 1 + 1e-6
    assert report.upper_bound is not None and report.upper_bound <= 1 + 1e-6
    assert _largest_quotient(_in_float64(net), (1, 8), name) <= report.upper_bound * (1 + 1e-9)


def test_orthogonal_network_with_sorting_activations_is_one_lipschitz(tmp_path: Path) -> None:
    """Orthogonal layers between MaxMin and GroupSort2 (a 1-Lipschitz network by construction): 1, where
    the Concat rule alone gave 2 x sqrt 2."""
    net = nn.Sequential(Orthogonal("OrthogoniumMaxMin"), Orthogonal("GroupSort2"), Orthogonal("MaxMin"))
    path = _export(net, (1, 8), "torchscript", tmp_path)
    report = analyse(path, device="cpu")
    assert report.upper_bound is not None and report.upper_bound <= 1 + 1e-6
    assert _largest_quotient(_in_float64(net), (1, 8), "network") <= report.upper_bound * (1 + 1e-9)


class TopThree(nn.Module):
    def __init__(self, ordered: bool) -> None:
        super().__init__()
        self.ordered = ordered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.topk(x, 3, dim=1, sorted=self.ordered).values


def test_torch_topk_is_topk(tmp_path: Path) -> None:
    """torch.topk in a .pt2: ONNX's TopK, 1; unsorted, torch's order is its own: refused, not guessed."""
    path = _export(TopThree(True), (2, 6), "pt2", tmp_path)
    report = analyse(path, device="cpu")
    assert _ops(report) == ["TopK"] and report.upper_bound == 1.0
    _prepared_is_the_same_function(path, (2, 6))
    (tmp_path / "unsorted").mkdir()
    unsorted = _export(TopThree(False), (2, 6), "pt2", tmp_path / "unsorted")
    with pytest.raises(ModelLoadError, match=r"aten\.topk\(sorted=False\)"):
        analyse(unsorted, device="cpu")


def _pairs_model(tmp_path: Path, first: tuple[int, int], second: tuple[int, int]) -> str:
    """max and min of x[:, first] and x[:, second], concatenated."""
    nodes = [
        node("Slice", ["x", "s0", "e0", "axis"], ["a"]),
        node("Slice", ["x", "s1", "e1", "axis"], ["b"]),
        node("Max", ["a", "b"], ["high"]),
        node("Min", ["a", "b"], ["low"]),
        node("Concat", ["high", "low"], ["y"], axis=1),
    ]
    bounds = {"s0": [first[0]], "e0": [first[1]], "s1": [second[0]], "e1": [second[1]], "axis": [1]}
    constants = {k: np.asarray(v, dtype=np.int64) for k, v in bounds.items()}
    return save_nodes(tmp_path, nodes, np.zeros((1, 4), np.float32), constants)


def test_max_and_min_of_disjoint_slices_sort_pairs(tmp_path: Path) -> None:
    path = _pairs_model(tmp_path, (2, 4), (0, 2))
    report = analyse(path, device="cpu")
    assert _ops(report) == ["MaxMin"] and report.upper_bound == 1.0
    assert _largest_quotient(Runner(path), (1, 4), "slices") <= 1 + 1e-9


def test_groupsort2_as_tensorflow_writes_it(tmp_path: Path) -> None:
    """deel-lip's GroupSort2 (TensorFlow, through tf2onnx): Reshape to [-1, 2], Split, Min and Max, Concat,
    Reshape back."""
    nodes = [
        node("Reshape", ["x", "pairs"], ["flat"]),
        node("Split", ["flat"], ["b", "c"], axis=1, num_outputs=2),
        node("Min", ["b", "c"], ["low"]),
        node("Max", ["b", "c"], ["high"]),
        node("Concat", ["low", "high"], ["sorted"], axis=1),
        node("Reshape", ["sorted", "back"], ["y"]),
    ]
    constants = {"pairs": np.array([-1, 2]), "back": np.array([2, 8])}
    path = save_nodes(tmp_path, nodes, np.zeros((2, 8), np.float32), constants, opset=18)
    report = analyse(path, device="cpu")
    assert "MaxMin" in _ops(report) and report.upper_bound == 1.0
    _prepared_is_the_same_function(path, (2, 8))
    assert 1 - 1e-9 <= _largest_quotient(Runner(path), (2, 8), "tensorflow") <= 1 + 1e-9


def test_max_and_min_of_overlapping_slices_are_not_sorted_pairs(tmp_path: Path) -> None:
    """x[0:3] and x[1:4] share entries: moving x1 moves two maxima, sqrt 2 > 1."""
    path = _pairs_model(tmp_path, (0, 3), (1, 4))
    report = analyse(path, device="cpu")
    assert "MaxMin" not in _ops(report)
    run = Runner(path)
    reached = np.linalg.norm(run(np.array([[0, 1, 0, 0]])) - run(np.zeros((1, 4))))
    assert reached == pytest.approx(math.sqrt(2)) and report.upper_bound >= reached


def test_max_and_min_of_a_group_of_one_are_copies(tmp_path: Path) -> None:
    """ReduceMax and ReduceMin of one entry are the same entry twice: sqrt 2, not a sort."""
    nodes = [
        node("ReduceMax", ["x"], ["high"], axes=[2]),
        node("ReduceMin", ["x"], ["low"], axes=[2]),
        node("Concat", ["low", "high"], ["y"], axis=2),
    ]
    path = save_nodes(tmp_path, nodes, np.zeros((1, 3, 1), np.float32), opset=17)
    report = analyse(path, device="cpu")
    assert "GroupSort" not in _ops(report) and report.upper_bound == pytest.approx(math.sqrt(2))
    assert sigma_max(ort_jacobian(path, (1, 3, 1))) == pytest.approx(math.sqrt(2))


def test_smallest_and_largest_values_of_topk_are_order_statistics(tmp_path: Path) -> None:
    """The 2 smallest and the 3 largest of 6: five distinct entries of the sorted group, 1."""
    nodes = [
        node("TopK", ["x", "two"], ["low", "low_at"], largest=0),
        node("TopK", ["x", "three"], ["high", "high_at"]),
        node("Concat", ["low", "high"], ["y"], axis=1),
    ]
    constants = {"two": np.array([2]), "three": np.array([3])}
    path = save_nodes(tmp_path, nodes, np.zeros((2, 6), np.float32), constants)
    report = analyse(path, device="cpu")
    assert _ops(report) == ["order statistics"] and report.upper_bound == 1.0
    run = Runner(path)
    assert _largest_quotient(run, (2, 6), "topk") <= 1 + 1e-9
    x = np.arange(12.0).reshape(2, 6)
    assert np.linalg.norm(run(x + 0.5 * np.eye(12)[5].reshape(2, 6)) - run(x)) == 0.5  # the largest moves alone


def test_relu_of_x_and_of_minus_x_twice_is_not_crelu(tmp_path: Path) -> None:
    """relu(x) twice and relu(-x): sqrt 2 where x > 0."""
    nodes = [
        node("Relu", ["x"], ["p"]),
        node("Neg", ["x"], ["m"]),
        node("Relu", ["m"], ["q"]),
        node("Concat", ["p", "q", "p"], ["y"], axis=1),
    ]
    path = save_nodes(tmp_path, nodes, np.zeros((1, 3), np.float32))
    report = analyse(path, device="cpu")
    assert "CReLU" not in _ops(report)
    run = Runner(path)
    reached = np.linalg.norm(run(np.array([[1.0, 0, 0]])) - run(np.zeros((1, 3))))
    assert reached == pytest.approx(math.sqrt(2)) and report.upper_bound >= reached


# ---------------------------------------------------------------------------------------------
# l2-norm pooling written out (x^2, AveragePool, sign * relu(abs), times k, ^0.5): LpPool(p=2), before unbounded

L2_POOLS = {  # factory, input shape, the true constant: sqrt(most windows holding one entry) times the scale
    "stride = kernel": (lambda: ScaledL2NormPool2d(2), (1, 2, 4, 4), 1.0),
    "stride 1": (lambda: ScaledL2NormPool2d(2, 1), (1, 2, 4, 4), 2.0),
    "kernel 3, stride 1": (lambda: ScaledL2NormPool2d(3, 1), (1, 1, 4, 4), 2.0),  # 2 windows per axis, not 3
    "scaled by 0.5": (lambda: ScaledL2NormPool2d(2, k_coef_lip=0.5), (1, 2, 4, 4), 0.5),
    "adaptive": (ScaledAdaptativeL2NormPool2d, (1, 2, 4, 4), 1.0),
}


def _reached(run: Function, shape: tuple[int, ...]) -> float:
    """max over entries i of ||f(e_i) - f(0)||: the l2 pooling's constant is reached there."""
    base = run(np.zeros(shape))
    n = math.prod(shape)
    return max(float(np.linalg.norm(run(np.eye(n)[i].reshape(shape)) - base)) for i in range(n))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", L2_POOLS)
def test_l2_norm_pooling_is_an_lp_pool(name: str, form: str, tmp_path: Path) -> None:
    make, shape, constant = L2_POOLS[name]
    path = _export(make(), shape, form, tmp_path)
    report = analyse(path, device="cpu")
    assert "LpPool" in _ops(report)
    assert report.upper_bound == pytest.approx(constant, rel=1e-12) and report.upper_bound >= constant
    _prepared_is_the_same_function(path, shape)
    run = _function(path)
    assert _reached(run, shape) == pytest.approx(constant, rel=1e-6)
    assert _largest_quotient(run, shape, f"{name} {form}") <= report.upper_bound * (1 + 1e-5)  # float32 sums


def test_l2_norm_pooling_of_a_state_dict(tmp_path: Path) -> None:
    net = Orthogonal("L2NormPool", width=4).eval()
    path = tmp_path / "weights.pt"
    torch.save(net.state_dict(), path)
    options = TorchOptions("tests.sorting_nets:Orthogonal", {"activation": "L2NormPool", "width": 4})
    report = analyse(path, ["1,2,4,4"], device="cpu", torch_options=options)
    assert "LpPool" in _ops(report)
    assert report.upper_bound is not None and report.upper_bound <= 1 + 1e-6


@pytest.mark.parametrize(
    ("exponent", "pads"),
    [(3.0, [0, 0, 0, 0]), (2.0, [1, 1, 1, 1])],  # a cube; windows of different sizes at the border
)
def test_look_alikes_of_l2_pooling_are_not_lp_pools(exponent: float, pads: list[int], tmp_path: Path) -> None:
    nodes = [
        node("Pow", ["x", "p"], ["square"]),
        node("AveragePool", ["square"], ["mean"], kernel_shape=[2, 2], strides=[2, 2], pads=pads),
        node("Sqrt", ["mean"], ["y"]),
    ]
    path = save_nodes(tmp_path, nodes, np.zeros((1, 1, 4, 4), np.float32), {"p": np.float32(exponent)})
    report = analyse(path, device="cpu")
    assert "LpPool" not in _ops(report) and report.upper_bound is None


# ---------------------------------------------------------------------------------------------
# Selections that rejoin: sqrt(the most copies of one entry), not sqrt(number of branches)


class PermutedSplit(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = x.split(2, 1)
        return torch.cat([c, a, b], 1)


class OverlappingSlices(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, 0:4], x[:, 2:6], x[:, 0:2]], 1)  # every entry twice or once: sqrt 2, not sqrt 3


REJOINS = {  # factory, input shape, the norm (before: sqrt of the branches, per Concat)
    "roll along one axis": (lambda: Roll(2, 1), (1, 6), 1.0),
    "roll along two axes": (lambda: Roll((1, 2), (2, 3)), (1, 2, 4, 5), 1.0),
    "rolled twice along one axis": (lambda: nn.Sequential(Roll(1, 1), Roll(2, 1)), (1, 6), 1.0),  # one Gather
    "split, permuted": (PermutedSplit, (1, 6), 1.0),
    "overlapping slices": (OverlappingSlices, (1, 6), math.sqrt(2)),
}


def _dense_norm(run: Function, shape: tuple[int, ...]) -> float:
    """sigma_max of the Jacobian of a linear map, column by column: f(e_i) - f(0)."""
    n = math.prod(shape)
    base = run(np.zeros(shape))
    return sigma_max(np.stack([run(np.eye(n)[i].reshape(shape)) - base for i in range(n)], axis=1))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", REJOINS)
def test_rejoined_selections_cost_their_most_copies(name: str, form: str, tmp_path: Path) -> None:
    make, shape, norm = REJOINS[name]
    path = _export(make(), shape, form, tmp_path)
    report = analyse(path, device="cpu")
    assert report.upper_bound == pytest.approx(norm, rel=1e-12)
    _prepared_is_the_same_function(path, shape)
    assert _dense_norm(_function(path), shape) == pytest.approx(norm, rel=1e-6)


def test_slices_steps_and_gathers_rejoined(tmp_path: Path) -> None:
    """x[0:3], x[5:2:-1] and x[[1, -2]] concatenated: entries 1 and 4 twice, sqrt 2 (the Concat rule: sqrt 3)."""
    nodes = [
        node("Slice", ["x", "zero", "three", "axis"], ["a"]),
        node("Slice", ["x", "five", "two", "axis", "back"], ["b"]),
        node("Gather", ["x", "picked"], ["c"], axis=1),
        node("Concat", ["a", "b", "c"], ["y"], axis=1),
    ]
    values = {"zero": [0], "three": [3], "five": [5], "two": [2], "axis": [1], "back": [-1], "picked": [1, -2]}
    constants = {k: np.asarray(v, dtype=np.int64) for k, v in values.items()}
    path = save_nodes(tmp_path, nodes, np.zeros((2, 6), np.float32), constants)
    report = analyse(path, device="cpu")
    assert _ops(report) == ["Gather"] and report.upper_bound == pytest.approx(math.sqrt(2), rel=1e-12)
    assert sigma_max(ort_jacobian(path, (2, 6))) == pytest.approx(math.sqrt(2), rel=1e-6)
    assert onnx.load(path).graph.node[-1].op_type == "Concat"  # the file is untouched
