"""Step functions, quantisation and the small ops beside them: the interpreter against onnxruntime, and the
verdict (or constant) each gets, against a dense Jacobian where there is one."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from lipcheck.frontends import load_graph
from lipcheck.interpret import interpret
from lipcheck.pipeline import analyse
from tests.jacobian import brute_force_norm
from tests.onnx_builders import save_nodes

RNG = np.random.default_rng(11)
X = RNG.standard_normal((3, 4)).astype(np.float32)
X[1, 2] = X[1, 0]  # a tie, for select_last_index


def _agree(path: str, x: np.ndarray = X) -> None:
    """Against onnxruntime, or the ONNX reference evaluator for ops onnxruntime lacks (CumProd)."""
    try:
        want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    except ort.capi.onnxruntime_pybind11_state.InvalidGraph:
        want = ReferenceEvaluator(path).run(None, {"x": x})[0]
    got = interpret(load_graph(path, [])).run({"x": x})["y"].numpy()
    assert got.shape == want.shape
    assert np.allclose(got.astype(np.float64), want.astype(np.float64), atol=1e-6), (got, want)


CASES = {
    "argmax": ([helper.make_node("ArgMax", ["x"], ["y"], axis=1, keepdims=0)], {}, "ArgMax"),
    "argmax-last": ([helper.make_node("ArgMax", ["x"], ["y"], axis=1, select_last_index=1)], {}, "ArgMax"),
    "argmin": ([helper.make_node("ArgMin", ["x"], ["y"], axis=0)], {}, "ArgMin"),
    "mod-fmod": ([helper.make_node("Mod", ["x", "d"], ["y"], fmod=1)], {"d": np.float32(0.7)}, "Mod"),
    "quantize": (
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=1)],
        {"s": np.array([0.1, 0.2, 0.05, 1.0], np.float32), "z": np.array([0, 3, -4, 1], np.int8)},
        "QuantizeLinear",
    ),
    "cumprod": (
        [helper.make_node("CumProd", ["x", "a"], ["y"], exclusive=1, reverse=1)],
        {"a": np.int64(1)},
        "CumProd",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_functions_run_and_get_their_verdict(case: str, tmp_path) -> None:
    nodes, inits, op = CASES[case]
    path = save_nodes(tmp_path, nodes, X, inits, opset=26 if op == "CumProd" else 21)
    _agree(path)
    report = analyse(path)
    assert report.upper_bound is None
    assert [r.op for r in report.unbounded_reasons] == [op]


@pytest.mark.parametrize("op", ["IsNaN", "IsInf"])
def test_float_tests_are_constant_on_finite_inputs(op: str, tmp_path) -> None:
    x = X.copy()
    x[0, 0], x[2, 1] = np.inf, np.nan
    cast = helper.make_node("Cast", ["t"], ["y"], to=TensorProto.FLOAT)
    path = save_nodes(tmp_path, [helper.make_node(op, ["x"], ["t"]), cast], x)
    _agree(path, x)
    assert analyse(path).upper_bound == 0.0


def test_dequantize_runs_on_integers_and_is_a_constant(tmp_path) -> None:
    q = RNG.integers(-128, 127, (3, 4)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], axis=1)]
    inits = {"s": np.array([0.1, 0.2, 0.05, 1.0], np.float32), "z": np.array([0, 3, -4, 1], np.int8)}
    path = save_nodes(tmp_path, nodes, q, inits, x_type=TensorProto.INT8)
    _agree(path, q)
    assert analyse(path).upper_bound == 0.0  # integers are not perturbed


def test_reverse_sequence_is_a_permutation(tmp_path) -> None:
    nodes = [helper.make_node("ReverseSequence", ["x", "n"], ["y"], batch_axis=0, time_axis=1)]
    path = save_nodes(tmp_path, nodes, X, {"n": np.array([4, 2, 1], np.int64)})
    _agree(path)
    report = analyse(path)
    assert report.upper_bound == pytest.approx(1.0)
    assert brute_force_norm(load_graph(path, []), {"x": X.astype(np.float64)}) == pytest.approx(1.0)


def test_one_hot_of_integer_classes_runs(tmp_path) -> None:
    classes = np.array([[0, 3, -1], [2, 1, 7]], np.int64)
    nodes = [helper.make_node("OneHot", ["x", "depth", "values"], ["y"], axis=1)]
    inits = {"depth": np.int64(4), "values": np.array([0.5, 2.0], np.float32)}
    path = save_nodes(tmp_path, nodes, classes, inits, x_type=TensorProto.INT64)
    _agree(path, classes)
    assert analyse(path).upper_bound == 0.0


def test_determinant_is_not_lipschitz_beyond_one_by_one(tmp_path) -> None:
    x = RNG.standard_normal((2, 3, 3)).astype(np.float32)
    path = save_nodes(tmp_path, [helper.make_node("Det", ["x"], ["y"])], x)
    _agree(path, x)
    assert analyse(path).upper_bound is None


def test_quantised_matmul_and_dynamic_quantisation_run_like_onnxruntime(tmp_path) -> None:
    """The float scale of a quantised product is a graph input here: the output steps with it."""
    a = RNG.integers(0, 255, (3, 4)).astype(np.uint8)
    nodes = [
        helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "x", "zy"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "x", "zy"], ["d"]),
        helper.make_node("DynamicQuantizeLinear", ["d"], ["y", "scale", "zero"]),
    ]
    inits = {"a": a, "sa": np.float32(0.02), "za": np.uint8(120), "b": RNG.integers(0, 255, (4, 2)).astype(np.uint8),
             "sb": np.float32(0.01), "zb": np.uint8(128), "zy": np.uint8(100)}  # fmt: skip
    x = np.array(0.05, np.float32)
    path = save_nodes(tmp_path, nodes, x, inits)
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = interpret(load_graph(path, [])).run({"x": x})["y"].numpy()
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    report = analyse(path)
    assert report.upper_bound is None and report.unbounded_reasons[0].op == "QLinearMatMul"


def test_range_of_bounds_computed_from_the_input_is_named(tmp_path) -> None:
    x = np.array(1.5, np.float32)
    nodes = [helper.make_node("Range", ["x", "limit", "delta"], ["y"])]
    path = save_nodes(tmp_path, nodes, x, {"limit": np.float32(6.0), "delta": np.float32(0.5)})
    _agree(path, x)
    report = analyse(path)
    assert [(r.op, "length" in r.reason) for r in report.unbounded_reasons] == [("Range", True)]
