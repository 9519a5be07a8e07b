"""Control flow: values a subgraph captures from the enclosing graph are inputs of its node.

Before, an If or Loop whose listed inputs were all constants (or integers) counted as a constant even
when its branch read the network's input: a bound of 0 for a model that moves. Now the captured values
are inputs, an If is bounded through its branches, and a Loop or Scan is unrolled: its body composed
once per iteration (until the constants repeat), checked against dense Jacobians from onnxruntime.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from lipcheck import ops
from lipcheck.cache import LayerCache
from lipcheck.errors import UnsupportedOpsError
from lipcheck.frontends import load_graph
from lipcheck.interpret import interpret
from lipcheck.ops import RuleContext
from lipcheck.ops.control import ITERATION_CAP
from lipcheck.pipeline import analyse
from tests.onnx_builders import node, ort_jacobian, rng_for, save, sigma_max

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


# ---------------------------------------------------------------------------------------------
# Loop and Scan: unrolled

FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def _value(name: str, elem: int, shape: list | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _aligned(tag: str, top: float) -> np.ndarray:
    """A symmetric 4x4 matrix with sigma_max = top: its powers keep their singular vectors (W^k has norm top^k)."""
    q, _ = np.linalg.qr(rng_for(tag).standard_normal((4, 4)))
    return (q @ np.diag([top, 0.7 * top, -0.4 * top, 0.1 * top]) @ q.T).astype(np.float32)


def _model(nodes, inputs, outputs, initializers, opset: int = 17) -> onnx.ModelProto:
    inits = [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()]
    graph = helper.make_graph(nodes, "control", inputs, [_value(o, FLOAT, None) for o in outputs], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10
    return proto


def _loop(
    weight: np.ndarray,
    trips: int | None = 3,
    scan: bool = False,
    condition: list[onnx.NodeProto] | None = None,
    go: bool | None = None,
    local: bool = False,
) -> onnx.ModelProto:
    """y = x W^M by a Loop whose body computes v_out = v_in @ W (W read from the enclosing graph), with
    v_out as a scan output too when ``scan``; cond_out = Identity(cond_in) unless ``condition`` computes it.
    ``trips`` None: M is an int64 graph input. ``local``: W is a Constant node of the body."""
    body_nodes = condition or [node("Identity", ["cond_in"], ["cond_out"])]
    if local:
        body_nodes = [*body_nodes, node("Constant", [], ["W"], value=onnx.numpy_helper.from_array(weight, "W"))]
    body_nodes = [*body_nodes, node("MatMul", ["v_in", "W"], ["v_out"])]
    body_outputs = [_value("cond_out", BOOL, []), _value("v_out", FLOAT, [1, 4])]
    if scan:
        body_nodes.append(node("Identity", ["v_out"], ["slice"]))
        body_outputs.append(_value("slice", FLOAT, [1, 4]))
    body = helper.make_graph(
        body_nodes,
        "body",
        [_value("i", INT64, []), _value("cond_in", BOOL, []), _value("v_in", FLOAT, [1, 4])],
        body_outputs,
    )
    inputs = [_value("x", FLOAT, list(X_SHAPE))]
    initializers: dict[str, np.ndarray] = {} if local else {"W": weight}
    if trips is None:
        inputs.append(_value("M", INT64, []))
    else:
        initializers["M"] = np.array(trips, np.int64)
    if go is not None:
        initializers["go"] = np.array(go)
    outputs = ["y", "s"] if scan else ["y"]
    loop = node("Loop", ["M", "go" if go is not None else "", "x"], outputs, name="loop", body=body)
    return _model([loop], inputs, outputs, initializers)


def _interpreter_matches_onnxruntime(path, feeds: dict[str, np.ndarray]) -> None:
    function = interpret(load_graph(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)
    got = function.run({name: torch.as_tensor(value) for name, value in feeds.items()})
    for name, want in zip([o.name for o in session.get_outputs()], expected, strict=True):
        assert tuple(got[name].shape) == want.shape, name
        np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-5, atol=1e-5)


def _x(tag: str, shape=X_SHAPE) -> np.ndarray:
    return rng_for(tag).standard_normal(shape).astype(np.float32)


def test_loop_with_a_constant_trip_count_is_the_product_of_its_iterations(tmp_path):
    """Three iterations of v @ W: sigma_max(W)^3, attained (W symmetric: its powers are aligned)."""
    weight = _aligned("loop-w", 1.3)
    path = save(_loop(weight), tmp_path)
    report = analyse(path)
    sigma = sigma_max(weight.astype(np.float64))
    assert report.upper_bound == pytest.approx(sigma**3, rel=1e-6)
    truth = sigma_max(ort_jacobian(path, X_SHAPE))
    assert truth == pytest.approx(sigma**3, rel=1e-5)  # the bound is the constant
    assert report.upper_bound >= truth * (1 - 1e-6)
    assert report.layers[0].method.startswith("unrolled 3 iterations")
    _interpreter_matches_onnxruntime(path, {"x": _x("loop-run")})


def test_loop_scan_output_stacks_its_iterations(tmp_path):
    """(x W^3, [x W, x W^2, x W^3]): final state sigma^3, scan output sqrt(sigma^2 + sigma^4 + sigma^6), each
    its own; together sqrt(sigma^2 + sigma^4 + 2 sigma^6), which the aligned powers attain."""
    weight = _aligned("loop-scan", 0.8)
    path = save(_loop(weight, scan=True), tmp_path)
    report = analyse(path)
    sigma = sigma_max(weight.astype(np.float64))
    assert report.upper_bound == pytest.approx(math.sqrt(sigma**2 + sigma**4 + 2 * sigma**6), rel=1e-6)
    truth = sigma_max(ort_jacobian(path, X_SHAPE))
    assert report.upper_bound >= truth * (1 - 1e-6)
    assert truth == pytest.approx(report.upper_bound, rel=1e-5)
    _interpreter_matches_onnxruntime(path, {"x": _x("loop-scan-run")})


def test_cache_keys_a_loop_by_the_weights_inside_its_body(tmp_path, monkeypatch):
    """A weight that lives only in the body is no input of the node: the layer cache keys the body by its
    constants' bytes (not by the object, which made every run a miss), and an edited one is a new key."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("LIPCHECK_CACHE_KEY", raising=False)
    cache = LayerCache(tmp_path / "cache")
    keys = []
    for top in (0.5, 0.5, 2.0):
        graph = load_graph(str(save(_loop(_aligned("loop-cache", top), local=True), tmp_path)))
        loop = graph.nodes[0]
        keys.append(cache.key(RuleContext(loop, graph, [0.0, 0.0, 1.0]), ops.get(loop.op)))
    assert keys[0] == keys[1] != keys[2]
    for top in (0.5, 2.0, 0.5):
        weight = _aligned("loop-cache", top)
        report = analyse(save(_loop(weight, local=True), tmp_path), cache=cache)
        assert report.upper_bound == pytest.approx(sigma_max(weight.astype(np.float64)) ** 3, rel=1e-6)
    assert cache.stats.hits > 0


def test_loop_that_never_starts_passes_its_state_on(tmp_path):
    weight = _aligned("loop-off", 2.0)
    for proto in (_loop(weight, trips=0, scan=True), _loop(weight, trips=5, go=False)):
        path = save(proto, tmp_path)
        assert analyse(path).upper_bound == pytest.approx(1.0)
        assert sigma_max(ort_jacobian(path, X_SHAPE)) == pytest.approx(1.0)


def test_loop_whose_constants_repeat_is_finished_in_closed_form(tmp_path):
    """v_out = Relu(v_in) keeps the constant 1: a billion iterations cost two compositions, and the scan
    output of a billion slices has the constant sqrt(1e9)."""
    body = helper.make_graph(
        [node("Identity", ["cond_in"], ["cond_out"]), node("Relu", ["v_in"], ["v_out"]), node("Neg", ["v_out"], ["s"])],
        "body",
        [_value("i", INT64, []), _value("cond_in", BOOL, []), _value("v_in", FLOAT, [1, 4])],
        [_value("cond_out", BOOL, []), _value("v_out", FLOAT, [1, 4]), _value("s", FLOAT, [1, 4])],
    )
    loop = node("Loop", ["M", "", "x"], ["y", "z"], body=body)
    proto = _model([loop], [_value("x", FLOAT, list(X_SHAPE))], ["y", "z"], {"M": np.array(10**9, np.int64)})
    report = analyse(save(proto, tmp_path))
    assert report.upper_bound == pytest.approx(math.sqrt(1 + 1e9), rel=1e-9)
    assert "constants fixed after 1" in report.layers[0].method


def test_loop_without_a_fixed_point_is_refused_past_the_cap(tmp_path):
    weight = (1.0001 * np.eye(4)).astype(np.float32)
    with pytest.raises(UnsupportedOpsError, match=f"over {ITERATION_CAP} iterations without a fixed point"):
        analyse(save(_loop(weight, trips=ITERATION_CAP + 5), tmp_path))


def test_loop_whose_constants_overflow_is_unbounded(tmp_path):
    report = analyse(save(_loop(_aligned("loop-big", 3.0), trips=5000), tmp_path))
    assert report.upper_bound is None
    assert [(r.node, r.op) for r in report.unbounded_reasons] == [("loop", "Loop")]
    assert "floating-point range" in report.unbounded_reasons[0].reason


def test_loop_with_a_trip_count_known_at_run_time_is_unbounded(tmp_path):
    path = save(_loop(_aligned("loop-m", 0.5), trips=None), tmp_path)
    report = analyse(path)
    assert report.upper_bound is None
    assert [(r.node, r.op) for r in report.unbounded_reasons] == [("loop", "Loop")]
    assert "trip count is known only at run time" in report.unbounded_reasons[0].reason
    for trips in (0, 2, 4):
        _interpreter_matches_onnxruntime(path, {"x": _x("loop-m-run"), "M": np.array(trips, np.int64)})


def test_loop_over_the_first_axis_does_not_take_it_as_a_batch_of_one(tmp_path):
    """M = x.shape[0] (a for loop over rows, as exported): with the first axis taken as a batch of 1, M
    folded to the constant 1 and the bound held for one iteration only."""
    weight = _aligned("loop-rows", 1.5)
    proto = _loop(weight)
    proto.graph.input[0].CopyFrom(_value("x", FLOAT, ["N", 4]))
    proto.graph.node.insert(0, node("Gather", ["shape", "first"], ["M"], axis=0))
    proto.graph.node.insert(0, node("Shape", ["x"], ["shape"]))
    del proto.graph.initializer[1]  # the constant M
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0, np.int64), "first"))
    for init in proto.graph.node[2].attribute[0].g.input[2:]:
        init.CopyFrom(_value("v_in", FLOAT, [None, 4]))
    path = save(proto, tmp_path)
    report = analyse(path)
    assert report.upper_bound is None
    assert "trip count is known only at run time" in report.unbounded_reasons[0].reason
    sigma = sigma_max(weight.astype(np.float64))
    assert analyse(path, input_shapes=["3,4"]).upper_bound == pytest.approx(sigma**3, rel=1e-6)
    _interpreter_matches_onnxruntime(path, {"x": _x("loop-rows-run", (3, 4))})


def test_loop_stopping_on_a_condition_computed_from_the_input_is_unbounded(tmp_path):
    """cond_out = sum(v_in) > 0: how many times W is applied depends on x (a jump where the sum crosses 0)."""
    condition = [
        node("ReduceSum", ["v_in"], ["total"], keepdims=0),
        node("Greater", ["total", "zero"], ["cond_out"]),
    ]
    proto = _loop(_aligned("loop-cond", 0.5), trips=4, condition=condition)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    path = save(proto, tmp_path)
    report = analyse(path)
    assert report.upper_bound is None
    assert [(r.node, r.op) for r in report.unbounded_reasons] == [("loop", "Loop")]
    assert "condition computed from the input" in report.unbounded_reasons[0].reason
    for tag in ("a", "b", "c"):
        _interpreter_matches_onnxruntime(path, {"x": _x(f"loop-cond-{tag}")})


def test_loop_stopping_on_its_iteration_number_takes_the_largest_stop(tmp_path):
    """cond_out = i < 1 stops after two of the four iterations, the same for every x: the bound is the
    largest of sigma^1..sigma^4 (sigma < 1: sigma itself), above the true sigma^2."""
    condition = [node("Less", ["i", "one"], ["cond_out"])]
    weight = _aligned("loop-stop", 0.6)
    proto = _loop(weight, trips=4, condition=condition)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((), np.int64), "one"))
    path = save(proto, tmp_path)
    report = analyse(path)
    sigma = sigma_max(weight.astype(np.float64))
    assert report.upper_bound == pytest.approx(sigma, rel=1e-6)
    assert "max over stopping after 1 to 4" in report.layers[0].method
    assert sigma_max(ort_jacobian(path, X_SHAPE)) == pytest.approx(sigma**2, rel=1e-5)
    _interpreter_matches_onnxruntime(path, {"x": _x("loop-stop-run")})


def test_loop_reading_the_input_is_bounded_through_its_body(tmp_path):
    """A Loop whose listed inputs are all constants but whose body reads x used to get L = 0: its two
    scan slices are Relu(x), so sqrt(2), attained."""
    body = helper.make_graph(
        [node("Identity", ["cond_in"], ["cond_out"]), node("Relu", ["x"], ["scan_out"])],
        "body",
        [_value("i", INT64, []), _value("cond_in", BOOL, [])],
        [_value("cond_out", BOOL, []), _value("scan_out", FLOAT, None)],
    )
    initializers = {"trips": np.array(2, np.int64), "go": np.array(True)}
    proto = _model(
        [node("Loop", ["trips", "go"], ["y"], body=body)], [_value("x", FLOAT, list(X_SHAPE))], ["y"], initializers
    )
    path = save(proto, tmp_path)
    assert load_graph(str(path)).nodes[0].inputs == ["trips", "go", "x"]
    report = analyse(path)
    assert report.upper_bound == pytest.approx(math.sqrt(2))
    assert sigma_max(ort_jacobian(path, X_SHAPE)) == pytest.approx(math.sqrt(2), rel=1e-5)
    _interpreter_matches_onnxruntime(path, {"x": np.abs(_x("loop-x"))})


def _scan(
    length: int | str = 3,
    reverse: bool = False,
    output_axis: int = 0,
    opset: int = 17,
) -> onnx.ModelProto:
    """A running sum over the rows of x [T, 2]: state += x_t, each state a scan output; initial state 0."""
    body = helper.make_graph(
        [node("Add", ["sum_in", "next"], ["sum_out"]), node("Identity", ["sum_out"], ["scan_out"])],
        "body",
        [_value("sum_in", FLOAT, [2]), _value("next", FLOAT, [2])],
        [_value("sum_out", FLOAT, [2]), _value("scan_out", FLOAT, [2])],
    )
    scan = node(
        "Scan",
        ["initial", "x"],
        ["y", "z"],
        name="scan",
        body=body,
        num_scan_inputs=1,
        scan_input_directions=[int(reverse)],
        scan_output_axes=[output_axis],
    )
    inputs = [_value("x", FLOAT, [length, 2])]
    return _model([scan], inputs, ["y", "z"], {"initial": np.zeros(2, np.float32)}, opset)


def test_scan_running_sum_against_its_dense_jacobian(tmp_path):
    """States s_k = k (sum of k slices), scan output sqrt(1 + 4 + 9): together sqrt(9 + 14), above the
    dense Jacobian's norm."""
    path = save(_scan(), tmp_path)
    report = analyse(path)
    assert report.upper_bound == pytest.approx(math.sqrt(9 + 14), rel=1e-9)
    truth = sigma_max(ort_jacobian(path, (3, 2)))
    # per column of x: y = x1 + x2 + x3 and z = (x1, x1 + x2, x1 + x2 + x3)
    assert truth == pytest.approx(sigma_max(np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])), rel=1e-5)
    assert truth <= report.upper_bound * (1 + 1e-6)
    _interpreter_matches_onnxruntime(path, {"x": _x("scan-run", (3, 2))})


@pytest.mark.parametrize(("reverse", "output_axis"), [(True, 0), (False, 1), (True, -1)])
def test_scan_directions_and_axes_run_like_onnxruntime(reverse, output_axis, tmp_path):
    path = save(_scan(5, reverse, output_axis), tmp_path)
    _interpreter_matches_onnxruntime(path, {"x": _x("scan-dir", (5, 2))})
    report = analyse(path)
    truth = sigma_max(ort_jacobian(path, (5, 2)))
    assert truth <= report.upper_bound * (1 + 1e-6)


def test_scan_of_unknown_length_asks_for_the_input_shape(tmp_path):
    path = save(_scan("T"), tmp_path)
    report = analyse(path)
    assert report.upper_bound is None
    assert [(r.node, r.op) for r in report.unbounded_reasons] == [("scan", "Scan")]
    assert "give --input-shape" in report.unbounded_reasons[0].reason
    assert analyse(path, input_shapes=["4,2"]).upper_bound == pytest.approx(math.sqrt(16 + 1 + 4 + 9 + 16))


def test_opset_8_scan_is_refused_by_name(tmp_path):
    body = helper.make_graph(
        [node("Add", ["sum_in", "next"], ["sum_out"]), node("Identity", ["sum_out"], ["scan_out"])],
        "body",
        [_value("sum_in", FLOAT, [2]), _value("next", FLOAT, [2])],
        [_value("sum_out", FLOAT, [2]), _value("scan_out", FLOAT, [2])],
    )
    scan = node("Scan", ["", "initial", "x"], ["y", "z"], body=body, num_scan_inputs=1)
    proto = _model([scan], [_value("x", FLOAT, [1, 3, 2])], ["y", "z"], {"initial": np.zeros((1, 2), np.float32)}, 8)
    with pytest.raises(UnsupportedOpsError, match=r"Scan \(opset 8, batched\)"):
        analyse(save(proto, tmp_path))


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
