"""Control flow: values a subgraph captures from the enclosing graph are inputs of its node.

Before, an If or Loop whose listed inputs were all constants (or integers) counted as a constant even
when its branch read the network's input: a bound of 0 for a model that moves. Now the captured values
are inputs, an If is bounded through its branches, and Loop/Scan are refused.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from lipcheck.cache import LayerCache
from lipcheck.errors import UnsupportedOpsError
from lipcheck.frontends import load_graph
from lipcheck.interpret import interpret
from lipcheck.pipeline import analyse
from tests.onnx_builders import node, rng_for, save, sigma_max

X_SHAPE = (1, 4)


def _branch(name: str, weight: str, output: str) -> onnx.GraphProto:
    """y = x @ weight, with both x and weight read from the enclosing graph."""
    return helper.make_graph(
        [node("MatMul", ["x", weight], [output])],
        name,
        [],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
    )


def _if_model(condition: onnx.NodeProto | None, int_condition: bool) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """If(cond) then x @ A else x @ B; cond from ``condition`` or an integer input k (k > 0)."""
    rng = rng_for(f"if-{int_condition}")
    a, b = rng.standard_normal((4, 3)).astype(np.float32), 3 * rng.standard_normal((4, 3)).astype(np.float32)
    nodes = [condition] if condition is not None else []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(X_SHAPE))]
    if int_condition:
        inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
        nodes.append(node("Greater", ["k", "zero"], ["cond"]))
    branches = {"then_branch": _branch("then", "A", "ya"), "else_branch": _branch("else", "B", "yb")}
    nodes.append(node("If", ["cond"], ["y"], **branches))
    graph = helper.make_graph(
        nodes,
        "if",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[
            onnx.numpy_helper.from_array(a, "A"),
            onnx.numpy_helper.from_array(b, "B"),
            onnx.numpy_helper.from_array(np.zeros(1, np.int64), "zero"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    return proto, a.astype(np.float64), b.astype(np.float64)


def test_constant_condition_takes_its_branch(tmp_path):
    condition = node("Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [False]))
    proto, _, b = _if_model(condition, int_condition=False)
    report = analyse(save(proto, tmp_path))
    assert report.upper_bound == pytest.approx(sigma_max(b), rel=1e-6)
    assert "taken branch" in report.layers[0].method


def test_condition_on_an_integer_input_bounds_both_branches(tmp_path):
    proto, a, b = _if_model(None, int_condition=True)
    path = save(proto, tmp_path)
    report = analyse(path)
    assert report.upper_bound == pytest.approx(max(sigma_max(a), sigma_max(b)), rel=1e-6)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = rng_for("if-quotients")
    for k in (-1, 1):  # each branch's difference quotients stay under the bound
        feeds = {"k": np.array([k], np.int64)}
        for _ in range(20):
            x, x2 = rng.standard_normal((2, *X_SHAPE)).astype(np.float32)
            y = session.run(None, {"x": x, **feeds})[0]
            y2 = session.run(None, {"x": x2, **feeds})[0]
            quotient = np.linalg.norm(y - y2) / np.linalg.norm(x - x2)
            assert quotient <= report.upper_bound * (1 + 1e-5)


def test_condition_computed_from_the_input_is_unbounded(tmp_path):
    reduce = node("ReduceSum", ["x"], ["s"], keepdims=0)
    proto, _, _ = _if_model(None, int_condition=False)
    graph = proto.graph
    graph.node.insert(0, node("Greater", ["s", "fzero"], ["cond"]))
    graph.node.insert(0, reduce)
    graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((), np.float32), "fzero"))
    report = analyse(save(proto, tmp_path))
    assert report.upper_bound is None
    assert any(reason.op == "If" for reason in report.unbounded_reasons)


def test_interpreter_runs_the_chosen_branch_like_onnxruntime(tmp_path):
    proto, _, _ = _if_model(None, int_condition=True)
    path = save(proto, tmp_path)
    function = interpret(load_graph(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = rng_for("if-run").standard_normal(X_SHAPE).astype(np.float32)
    for k in (-3, 2):
        expected = session.run(None, {"x": x, "k": np.array([k], np.int64)})[0]
        got = function.run({"x": torch.as_tensor(x), "k": torch.tensor([k])})["y"]
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_nested_if_sees_the_outermost_values(tmp_path):
    """The inner If reads x and A from two scopes up: the outer If captures them for it."""
    inner = node("If", ["cond"], ["inner_y"], then_branch=_branch("t", "A", "ta"), else_branch=_branch("e", "A", "ea"))
    outer_then = helper.make_graph(
        [inner], "outer_then", [], [helper.make_tensor_value_info("inner_y", TensorProto.FLOAT, None)]
    )
    condition = node("Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True]))
    proto, a, _ = _if_model(condition, int_condition=False)
    proto.graph.node[1].attribute[0].CopyFrom(helper.make_attribute("else_branch", _branch("else", "B", "yb")))
    proto.graph.node[1].attribute[1].CopyFrom(helper.make_attribute("then_branch", outer_then))
    report = analyse(save(proto, tmp_path))
    assert report.upper_bound == pytest.approx(sigma_max(a), rel=1e-6)


def test_loop_reading_the_input_is_refused_not_constant(tmp_path):
    """A Loop whose listed inputs are all constants but whose body reads x used to get L = 0."""
    body = helper.make_graph(
        [node("Identity", ["cond_in"], ["cond_out"]), node("Relu", ["x"], ["scan_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, None),
        ],
    )
    graph = helper.make_graph(
        [node("Loop", ["trips", "go"], ["y"], body=body)],
        "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(X_SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[
            onnx.numpy_helper.from_array(np.array(2, np.int64), "trips"),
            onnx.numpy_helper.from_array(np.array(True), "go"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    path = save(proto, tmp_path)
    assert load_graph(str(path)).nodes[0].inputs == ["trips", "go", "x"]
    with pytest.raises(UnsupportedOpsError, match="Loop"):
        analyse(path)


def test_cached_answers_tell_branches_with_their_own_weights_apart(tmp_path):
    """The layer cache keys an If on its branches' contents: weights held inside a branch included (two
    weights that differ in one entry in the middle, where a printed array shows '...'), and the same
    branch loaded again is found in the cache."""
    cache = LayerCache(tmp_path / "cache")
    bounds = []
    for bump in (0.0, 100.0):
        weight = rng_for("inner").standard_normal((64, 48)).astype(np.float32)
        weight[30, 20] += bump
        inner = helper.make_graph(
            [node("MatMul", ["v", "W"], ["yw"])],
            "then",
            [],
            [helper.make_tensor_value_info("yw", TensorProto.FLOAT, None)],
            initializer=[onnx.numpy_helper.from_array(weight, "W")],
        )
        graph = helper.make_graph(
            [node("If", ["cond"], ["y"], then_branch=inner, else_branch=inner)],
            "if",
            [
                helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 64]),
                helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            ],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 10
        folder = tmp_path / str(bump)
        folder.mkdir()
        report = analyse(save(proto, folder), cache=cache)
        assert report.upper_bound == pytest.approx(sigma_max(weight.astype(np.float64)), rel=1e-6)
        bounds.append(report.upper_bound)
    assert bounds[1] > 1.5 * bounds[0]
    assert cache.stats.hits == 0
    assert analyse(folder / "model.onnx", cache=cache).upper_bound == bounds[1]
    assert cache.stats.hits == 1
