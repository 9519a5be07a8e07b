"""The empirical lower bound: never above the certified bound, exact where the truth is known, and
never above the brute-force Jacobian norm (dense Jacobian + SVD) at the point it reports."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
import torch

from lipcheck.frontends import load_graph
from lipcheck.graph import Graph, Node
from lipcheck.interpret import GraphFunction, UninterpretableOpsError, interpret
from lipcheck.lower import (
    CERTIFY_ITERATIONS,
    DEFAULT_SEARCH,
    LAYER_ONE_SHOT,
    LAYER_REFINE,
    MIN_BUDGET,
    NODE_FLOPS,
    LowerBoundError,
    LowerSettings,
    _certify_cost,
    _default_plan,
    _FlatFunction,
    _plan,
    load_starts,
    lower_bound,
    parse_input_range,
)
from lipcheck.pipeline import analyse
from lipcheck.schemas import REPORT, load_schema
from tests.conftest import ROOT, SAMPLE_MODELS, SAMPLES
from tests.jacobian import brute_force_norm
from tests.onnx_builders import model, node, rng_for, save
from tests.test_rules import LINEAR, _outputs

SMALL = LowerSettings(budget=120)


@pytest.fixture(scope="module")
def sample_reports() -> dict[str, object]:
    # every cheap certified method (LipSDP is checked against dense references in test_refine), so each is checked
    return {name: analyse(SAMPLES / name, device="cpu", lower=SMALL, method="best") for name in SAMPLE_MODELS}


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_lower_bound_is_below_every_upper_bound(name: str, sample_reports) -> None:
    report = sample_reports[name]
    lower = report.lower
    assert lower is not None and report.lower_bound == lower.value
    assert math.isfinite(lower.value) and lower.value > 0
    if report.upper_bound is not None:
        assert lower.value <= report.upper_bound
        assert report.ratio == pytest.approx(report.upper_bound / lower.value)
        assert report.method_bounds and all(lower.value <= bound for bound in report.method_bounds.values() if bound)
    for layer in report.layers:
        found = lower.layers.get(layer.name)
        assert found is not None, layer.name
        if math.isfinite(layer.running):
            assert found <= layer.running * (1 + 1e-12), (layer.name, found, layer.running)
    data = report.to_dict()
    jsonschema.validate(data, load_schema(REPORT))
    assert data["bracket"]["lower"] == lower.value and data["lower_bound_search"]["budget"] == SMALL.budget


@pytest.mark.parametrize("name", ["mlp.onnx", "cnn_bn.onnx", "resnet_small.onnx", "gated.onnx"])
def test_lower_bound_is_below_the_dense_jacobian_norm_at_its_point(name: str, sample_reports) -> None:
    lower = sample_reports[name].lower
    exact = brute_force_norm(load_graph(SAMPLES / name), lower.point)
    assert lower.value <= exact * (1 + 1e-9)
    assert lower.value >= exact * (1 - 1e-3)  # the search's direction is the top singular vector there


def _linear_model(tmp_path, rows: int, cols: int, tag: str, relu: bool = False):
    rng = rng_for(tag)
    weight = rng.standard_normal((cols, rows)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    nodes = [node("Gemm", ["x", "W", "b"], ["h" if relu else "y"])]
    if relu:
        nodes.append(node("Relu", ["h"], ["y"]))
    path = save(model(nodes, {"x": (1, cols)}, ["y"], {"W": weight, "b": bias}), tmp_path)
    return path, float(np.linalg.svd(weight.astype(np.float64), compute_uv=False)[0])


@pytest.mark.parametrize(("rows", "cols"), [(5, 8), (40, 48)])
def test_single_linear_layer_is_exact(tmp_path, rows: int, cols: int) -> None:
    """Small: exact SVD of J; larger than the dense limit: power iteration, which must converge."""
    path, sigma = _linear_model(tmp_path, rows, cols, f"linear-{rows}")
    found = lower_bound(load_graph(path), LowerSettings(budget=300))
    assert found.value == pytest.approx(sigma, rel=1e-6) and found.value <= sigma
    assert found.piecewise_linear and found.check == "jvp"


def test_one_layer_relu_net_reaches_the_weight_norm(tmp_path) -> None:
    """More inputs than units: some region has every unit active, where J = W (L = sigma_max(W))."""
    path, sigma = _linear_model(tmp_path, 5, 8, "relu-layer", relu=True)
    found = lower_bound(load_graph(path), LowerSettings(budget=1000))
    assert found.value == pytest.approx(sigma, rel=1e-6) and found.value <= sigma
    assert found.piecewise_linear


def test_tanh_mlp_beats_the_jacobian_at_zero(tmp_path) -> None:
    rng = rng_for("tanh-mlp")
    inits = {
        "W1": rng.standard_normal((6, 12)).astype(np.float32),
        "b1": rng.standard_normal(12).astype(np.float32),
        "W2": rng.standard_normal((12, 4)).astype(np.float32),
        "b2": rng.standard_normal(4).astype(np.float32),
    }
    nodes = [node("Gemm", ["x", "W1", "b1"], ["h"]), node("Tanh", ["h"], ["t"]), node("Gemm", ["t", "W2", "b2"], ["y"])]
    graph = load_graph(save(model(nodes, {"x": (1, 6)}, ["y"], inits), tmp_path))
    at_zero = brute_force_norm(graph, {"x": np.zeros((1, 6))})
    found = lower_bound(graph, LowerSettings(budget=200))
    assert found.value >= at_zero * (1 - 1e-6)
    assert found.value <= brute_force_norm(graph, found.point) * (1 + 1e-9)
    assert not found.piecewise_linear
    upper = float(
        np.linalg.svd(inits["W1"].astype(np.float64), compute_uv=False)[0]
        * np.linalg.svd(inits["W2"].astype(np.float64), compute_uv=False)[0]
    )
    assert found.value <= upper


def test_same_seed_same_result_and_budget_respected() -> None:
    graph = load_graph(SAMPLES / "mlp.onnx")
    first = lower_bound(graph, LowerSettings(budget=80, seed=3, per_layer=False))
    again = lower_bound(graph, LowerSettings(budget=80, seed=3, per_layer=False))
    assert first.value == again.value and first.start == again.start
    assert first.evaluations <= 80 and first.budget == 80  # the budget bounds everything, certificate included


def test_input_range_keeps_the_search_inside(tmp_path) -> None:
    graph = load_graph(SAMPLES / "cnn_bn.onnx")
    found = lower_bound(graph, LowerSettings(budget=80, input_range=(0.0, 1.0), per_layer=False))
    point = found.point["input"]
    assert point.min() >= 0.0 and point.max() <= 1.0
    assert found.input_range == (0.0, 1.0) and found.value > 0


def test_user_inputs_are_starts(tmp_path) -> None:
    graph = load_graph(SAMPLES / "mlp.onnx")
    data = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    starts, shapes = load_starts(data, {"input": (1, 16)})
    assert len(starts) == 3 and shapes == {"input": (1, 16)} and starts[1]["input"].shape == (1, 16)
    file = tmp_path / "x.npy"
    np.save(file, data[:1])
    found = lower_bound(graph, LowerSettings(budget=200, inputs=file, per_layer=False))
    assert found.starts == 1 + 1 + 4  # the sample, zero and four random points


@pytest.mark.parametrize(("shape", "message"), [((3, 15), "fits neither"), ((2, 2, 16), "fits neither")])
def test_inputs_of_the_wrong_shape_are_refused(shape, message) -> None:
    with pytest.raises(LowerBoundError, match=message):
        load_starts(np.zeros(shape), {"input": (1, 16)})


def test_unknown_input_sizes_need_a_shape(tmp_path) -> None:
    path = save(model([node("Relu", ["x"], ["y"])], {"x": ["N", "C"]}, ["y"]), tmp_path)
    with pytest.raises(LowerBoundError, match="--input-shape"):
        lower_bound(load_graph(path))
    found = lower_bound(load_graph(path), LowerSettings(budget=30, inputs=np.ones((2, 1, 3))))
    assert found.value == pytest.approx(1.0, rel=1e-6)  # ReLU with every input positive: the identity


def test_several_inputs_are_taken_together(tmp_path) -> None:
    """y = a + b: J = [I, I], norm sqrt(2)."""
    path = save(model([node("Add", ["a", "b"], ["y"])], {"a": (1, 3), "b": (1, 3)}, ["y"]), tmp_path)
    found = lower_bound(load_graph(path), LowerSettings(budget=30))
    assert found.value == pytest.approx(math.sqrt(2), rel=1e-8) and found.value <= math.sqrt(2)
    with pytest.raises(LowerBoundError, match="npz"):
        load_starts(np.zeros((1, 3)), {"a": (1, 3), "b": (1, 3)})


def test_ops_the_interpreter_lacks_are_named() -> None:
    graph = Graph([Node("e", "RandomNormalLike", ["x"], ["y"])], ["x"], ["y"], shapes={"x": (1, 3)})
    with pytest.raises(UninterpretableOpsError, match="RandomNormalLike"):
        lower_bound(graph)


@pytest.mark.parametrize("text", ["1", "a,b", "1,0", "0,inf", "nan,1", "1,2,3"])
def test_bad_input_ranges(text: str) -> None:
    with pytest.raises(LowerBoundError, match="--input-range"):
        parse_input_range(text)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "160", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "lipcheck", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_lower_table_and_json(tmp_path) -> None:
    table = run_cli("report", str(SAMPLES / "mlp.onnx"), "--lower", "--lower-budget", "60", "--device", "cpu")
    assert table.returncode == 0, table.stderr
    assert "running lower" in table.stdout and "Lower bound (largest Jacobian norm found):" in table.stdout
    assert "bracket [" in table.stdout
    data = json.loads(
        run_cli(
            "report",
            str(SAMPLES / "mlp.onnx"),
            "-f",
            "json",
            "--input-range",
            "-1,1",
            "--lower-budget",
            "60",
            "--seed",
            "2",
        ).stdout
    )
    jsonschema.validate(data, load_schema(REPORT))
    assert data["lower_bound_search"]["input_range"] == [-1.0, 1.0] and data["lower_bound_search"]["seed"] == 2
    assert 0 < data["lower_bound"] <= data["upper_bound"]
    assert data["bracket"]["ratio"] == pytest.approx(data["upper_bound"] / data["lower_bound"])
    markdown = run_cli("report", str(SAMPLES / "mlp.onnx"), "-f", "markdown", "--lower-budget", "40")
    assert "Lower bound (largest Jacobian norm found): **" in markdown.stdout and "running lower |" in markdown.stdout


def test_cli_without_lower_has_no_lower_fields() -> None:
    data = json.loads(run_cli("report", str(SAMPLES / "mlp.onnx"), "-f", "json").stdout)
    assert data["lower_bound"] is None and "bracket" not in data and "running_lower_bound" not in data["layers"][0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input-range", "1,0"], "--input-range '1,0': LO must be below HI"),
        (["--input-range", "x"], "expected LO,HI"),
        (["--lower-budget", "7"], "--lower-budget 7: must be at least 8"),
        (["--inputs", "missing.npy"], "--inputs missing.npy: no such file"),
        (["--inputs", "BAD"], "fits neither the model's input shape [1,16]"),
        (["--inputs", "TEXT"], "not a readable .npy or .npz file"),
    ],
)
def test_cli_errors_name_the_flag(tmp_path, args: list[str], message: str) -> None:
    """In process (cli.main turns these errors into one line and exit code 2: checked below)."""
    from typer.testing import CliRunner

    from lipcheck.cli import app
    from lipcheck.errors import LipcheckError

    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 3)))
    text = tmp_path / "text.npy"
    text.write_text("not numpy")
    args = [str(bad) if a == "BAD" else str(text) if a == "TEXT" else a for a in args]
    result = CliRunner().invoke(app, ["report", str(SAMPLES / "mlp.onnx"), "--device", "cpu", *args])
    assert isinstance(result.exception, LipcheckError), result.output
    assert message in str(result.exception) and "\n" not in str(result.exception)


def test_cli_error_is_one_line_with_exit_code_2() -> None:
    result = run_cli("report", str(SAMPLES / "mlp.onnx"), "--input-range", "-1,-2")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "lipcheck: error: --input-range '-1,-2': LO must be below HI\n"


def test_config_keys_turn_the_search_on(tmp_path) -> None:
    from lipcheck.config import ConfigError, load_config

    config = tmp_path / "lipcheck.toml"
    config.write_text(
        f'lower_budget = 50\nseed = 4\n[[models]]\npath = "{SAMPLES / "mlp.onnx"}"\n'
        f'input_range = [0, 1]\n[[models]]\npath = "{SAMPLES / "cnn_bn.onnx"}"\nlower = false\n'
    )
    first, second = load_config(config).models
    assert first.settings.lower == LowerSettings(budget=50, seed=4, input_range=(0.0, 1.0))
    assert second.settings.lower is None
    config.write_text(f'[[models]]\npath = "{SAMPLES / "mlp.onnx"}"\nlower_budget = 0\n')
    with pytest.raises(ConfigError, match="lower_budget must be an integer >= 8"):
        load_config(config)


@pytest.mark.parametrize("case", LINEAR, ids=lambda c: c.id)
def test_linear_cases_lower_bound_meets_the_certified_bound(case, tmp_path) -> None:
    """Every op of test_rules' affine cases: lower <= certified upper, and close to it where that is exact."""
    nodes, inits = case.build(rng_for(case.id))
    proto = model(nodes, {"x": case.dims or case.shape}, _outputs(nodes), inits, opset=case.opset)
    spec = [",".join(map(str, case.shape))]
    report = analyse(
        save(proto, tmp_path), input_shapes=spec, device="cpu", lower=LowerSettings(budget=90, per_layer=False)
    )
    assert report.upper_bound is not None and report.lower_bound is not None
    assert report.lower_bound <= report.upper_bound
    if case.exact:
        assert report.lower_bound >= report.upper_bound * (1 - 1e-2), (report.lower_bound, report.upper_bound)


@pytest.fixture
def forward_passes(monkeypatch) -> list[int]:
    """Counts the interpreter's forward passes, independently of the search's own count: every product
    runs at most one (a JVP or a linearisation one, J v and J^T u on a recorded pass none, a gradient two
    for three products, a secant two for two), so passes <= evaluations <= budget."""
    count = [0]
    run = GraphFunction.run

    def counted(self, *args, **kwargs):
        count[0] += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(GraphFunction, "run", counted)
    return count


@pytest.mark.parametrize("budget", [MIN_BUDGET, 9, 13, 31, 64, 150])
def test_the_budget_caps_everything(budget: int, forward_passes: list[int]) -> None:
    """Search, certificate and per-layer bounds together; what the budget allows is still certified."""
    graph = load_graph(SAMPLES / "resnet_small.onnx")
    layers = {f"layer {i}": node.outputs[0] for i, node in enumerate(graph.nodes) if node.op in {"Relu", "Add"}}
    found = lower_bound(graph, LowerSettings(budget=budget), layer_outputs=layers)
    assert forward_passes[0] <= found.evaluations <= budget and found.budget == budget
    assert found.value > 0
    assert found.value <= brute_force_norm(graph, found.point) * (1 + 1e-9)
    if budget >= 13:  # room for the one-shot bound of every layer: each gets one
        assert set(found.layers) == set(layers)
        assert all(value > 0 for value in found.layers.values())


def test_exhaustion_mid_search_certifies_the_best_point_so_far(forward_passes: list[int]) -> None:
    """A budget that runs out inside the ascent: the value is still ||J v|| at a point, confirmed."""
    graph = load_graph(SAMPLES / "mlp.onnx")
    small = lower_bound(graph, LowerSettings(budget=47, per_layer=False))
    large = lower_bound(graph, LowerSettings(budget=400, per_layer=False))
    assert forward_passes[0] <= small.evaluations + large.evaluations
    assert small.evaluations <= 47 and large.evaluations <= 400
    for found in (small, large):
        exact = brute_force_norm(graph, found.point)
        assert exact * (1 - 1e-3) <= found.value <= exact * (1 + 1e-9)
    assert small.check == "jvp" and small.value <= large.value


@pytest.mark.parametrize("layers", [0, 1, 12])
def test_explicit_plans_fit_their_budget(layers: int) -> None:
    for total in range(MIN_BUDGET, 400):
        plan = _plan(total, layers)
        assert plan.search >= 0 and plan.certify_iterations >= 1
        assert plan.search + _certify_cost(plan.certify_iterations) + plan.layer_reserve <= total
    assert _plan(1000, layers).certify_iterations == CERTIFY_ITERATIONS


def test_the_default_budget_is_scaled_down_on_expensive_networks() -> None:
    cheap = _default_plan(layers=10, cost=1e7, spent=1)
    assert cheap.search == DEFAULT_SEARCH and cheap.certify_iterations == CERTIFY_ITERATIONS
    assert cheap.total == 1 + DEFAULT_SEARCH + _certify_cost(CERTIFY_ITERATIONS) + LAYER_ONE_SHOT + 10 * LAYER_REFINE
    resnet50 = _default_plan(layers=122, cost=8.26e9, spent=1)  # ResNet-50 at 224x224: 8.2 GFLOP a forward pass
    assert resnet50.total == 24 and resnet50.search >= 1 + 2 * 4  # one screening
    assert resnet50.layer_reserve == LAYER_ONE_SHOT
    assert _default_plan(layers=0, cost=1e15, spent=1).total == MIN_BUDGET + 1


def test_the_default_budget_on_a_sample_model_keeps_the_full_search() -> None:
    report = analyse(SAMPLES / "mlp.onnx", device="cpu", lower=True)
    lower = report.lower
    layers = len(report.layers)
    certificate = _certify_cost(CERTIFY_ITERATIONS)
    assert lower.budget == 1 + DEFAULT_SEARCH + certificate + LAYER_ONE_SHOT + layers * LAYER_REFINE
    assert lower.evaluations <= lower.budget and set(lower.layers) == {layer.name for layer in report.layers}


def test_a_linear_net_spends_the_search_on_power_iteration(tmp_path) -> None:
    """J is the same everywhere: after the first start, the budget goes to the certificate's power iteration,
    so a budget far below the default still gives the exact constant; a ReLU net is never taken as linear."""
    path, sigma = _linear_model(tmp_path, 40, 48, "linear-short")
    found = lower_bound(load_graph(path), LowerSettings(budget=150))
    assert found.evaluations <= 150 and found.starts == 1
    assert found.value <= sigma and found.value == pytest.approx(sigma, rel=1e-6)
    (tmp_path / "relu").mkdir()
    relu_path, _ = _linear_model(tmp_path / "relu", 5, 8, "relu-short", relu=True)
    assert lower_bound(load_graph(relu_path), LowerSettings(budget=150)).starts > 1


def test_the_cost_counts_conv_and_matmul_flops(tmp_path) -> None:
    """A 3x3 conv (3 -> 4 channels, padded, on 8x8) then a 256 -> 5 Gemm: 2 x 256 x 27 + 2 x 5 x 256 flops,
    plus the per-node overhead of the graph's nodes; the measuring pass is one product."""
    rng = rng_for("cost")
    inits = {
        "W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "G": rng.standard_normal((256, 5)).astype(np.float32),
        "shape": np.array([1, 256], dtype=np.int64),
    }
    nodes = [
        node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        node("Reshape", ["c", "shape"], ["f"]),
        node("Gemm", ["f", "G"], ["y"]),
    ]
    graph = load_graph(save(model(nodes, {"x": (1, 3, 8, 8)}, ["y"], inits), tmp_path))
    network = _FlatFunction(interpret(graph, dtype=torch.float64), {"x": (1, 3, 8, 8)}, graph.outputs)
    cost = network.cost(torch.zeros(network.dim, dtype=torch.float64))
    assert cost == 2 * 256 * 27 + 2 * 5 * 256 + NODE_FLOPS * len(network.function.nodes)
    assert network.evaluations == 1
