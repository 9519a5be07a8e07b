"""ONNX Attention (opset 23): the interpreter against onnxruntime, and each one-variable constant against a
search for the largest Jacobian norm (the product of two variable sides is named, not bounded)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lipcheck.frontends import load_graph
from lipcheck.interpret import interpret
from lipcheck.pipeline import analyse
from tests.jacobian import brute_force_norm
from tests.onnx_builders import save_nodes

SHAPE = (2, 4, 3, 4)  # batch, query heads, sequence, head size
KV_SHAPE = (2, 2, 3, 4)  # two key/value heads: grouped-query attention
RNG = np.random.default_rng(7)
CONSTANTS = {
    "Q": RNG.standard_normal(SHAPE).astype(np.float32),
    "K": RNG.standard_normal(KV_SHAPE).astype(np.float32),
    "V": RNG.standard_normal(KV_SHAPE).astype(np.float32),
    "float_mask": np.where(RNG.random((3, 3)) < 0.3, -np.inf, RNG.standard_normal((3, 3))).astype(np.float32),
    "bool_mask": np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1]], bool),
    "bool_mask_5": np.array([[1, 0, 1, 1, 0], [1, 1, 0, 1, 1], [0, 1, 1, 1, 1]], bool),
    "past_key": RNG.standard_normal((2, 2, 2, 4)).astype(np.float32),
    "past_value": RNG.standard_normal((2, 2, 2, 4)).astype(np.float32),
}
VARIANTS = {
    "plain": ({}, ""),
    "causal": ({"is_causal": 1}, ""),
    "float-mask": ({}, "float_mask"),
    "bool-mask-softcap": ({"softcap": 2.0}, "bool_mask"),
    "scale": ({"scale": 0.7}, ""),
}


def _model(variable: str, attrs: dict, mask: str, past: bool = False, outputs: int = 1) -> onnx.ModelProto:
    names = ["x" if side == variable else side for side in "QKV"]
    names += [mask, *(["past_key", "past_value"] if past else [])]
    used = {n for n in names if n in CONSTANTS}
    inits = [numpy_helper.from_array(CONSTANTS[n], name=n) for n in sorted(used)]
    shape = SHAPE if variable == "Q" else KV_SHAPE
    out_names = ["y", "present_key", "present_value"][:outputs]
    graph = helper.make_graph(
        [helper.make_node("Attention", names, out_names, name="attention", **attrs)],
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in out_names],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    proto.ir_version = 10
    return proto


@pytest.mark.parametrize("variable", ["Q", "K", "V"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_one_variable_side_is_bounded_above_its_jacobian(variable: str, variant: str, tmp_path) -> None:
    attrs, mask = VARIANTS[variant]
    path = tmp_path / "attention.onnx"
    onnx.save(_model(variable, attrs, mask), path)
    graph = load_graph(path, [])
    shape = SHAPE if variable == "Q" else KV_SHAPE
    x = RNG.standard_normal(shape).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = interpret(graph).run({"x": x})["y"].numpy()
    assert np.allclose(got, want, atol=1e-5), float(np.abs(got - want).max())
    report = analyse(path)
    assert report.upper_bound is not None
    found = max(
        brute_force_norm(graph, {"x": RNG.standard_normal(shape) * s}) for s in (0.3, 1, 3, 10) for _ in range(4)
    )
    assert report.upper_bound >= found * (1 - 1e-9), (report.upper_bound, found)
    if variable == "V":  # linear: the exact norm, wherever the Jacobian is taken
        assert report.upper_bound == pytest.approx(found, rel=1e-5)


def test_value_side_with_a_cache_counts_only_the_new_keys(tmp_path) -> None:
    path = tmp_path / "attention.onnx"
    onnx.save(_model("V", {"is_causal": 1}, "", past=True), path)
    graph = load_graph(path, [])
    report = analyse(path)
    found = brute_force_norm(graph, {"x": RNG.standard_normal(KV_SHAPE)})
    assert report.upper_bound == pytest.approx(found, rel=1e-5)


@pytest.mark.parametrize("pair", ["QK", "QV", "KV"])
def test_two_variable_sides_are_named(pair: str, tmp_path) -> None:
    proto = _model(pair[0], {}, "")
    proto.graph.node[0].input["QKV".index(pair[1])] = "x2"
    shape = SHAPE if pair[1] == "Q" else KV_SHAPE
    proto.graph.input.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, list(shape)))
    path = tmp_path / "attention.onnx"
    onnx.save(proto, path)
    report = analyse(path)
    assert report.upper_bound is None
    assert [(r.node, r.op) for r in report.unbounded_reasons] == [("attention", "Attention")]
    assert f"{pair[0]} and {pair[1]}" in report.unbounded_reasons[0].reason


def test_cache_outputs_run_like_onnxruntime(tmp_path) -> None:
    path = tmp_path / "attention.onnx"
    onnx.save(_model("Q", {"is_causal": 1}, "bool_mask_5", past=True, outputs=3), path)
    x = RNG.standard_normal(SHAPE).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = interpret(load_graph(path, [])).run({"x": x})
    for name, value in zip(["y", "present_key", "present_value"], want, strict=True):
        assert np.allclose(got[name].numpy(), value, atol=1e-5), name


def _reference(path: str, x: np.ndarray) -> np.ndarray:
    try:
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    except Exception:  # an op onnxruntime does not have yet (SwiGLU): the ONNX reference evaluator
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(path).run(None, {"x": x})[0]


@pytest.mark.parametrize(("interleaved", "rotated", "radius"), [(0, 0, 1.0), (1, 4, 1.0), (0, 4, 1.3)])
def test_rotary_embedding_is_a_rotation(interleaved: int, rotated: int, radius: float, tmp_path) -> None:
    """cos/sin of true angles rotate pairs: 1; caches of radius r scale them: r (exact either way)."""
    x = RNG.standard_normal((2, 2, 3, 8)).astype(np.float32)
    angles = RNG.uniform(0, 6.3, (5, (rotated or 8) // 2))
    inits = {"cos": (radius * np.cos(angles)).astype(np.float32), "sin": (radius * np.sin(angles)).astype(np.float32),
             "pos": np.array([[0, 2, 4], [1, 3, 0]], np.int64)}  # fmt: skip
    node = helper.make_node(
        "RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], interleaved=interleaved, rotary_embedding_dim=rotated
    )
    path = save_nodes(tmp_path, [node], x, inits, opset=23)
    graph = load_graph(path, [])
    got = interpret(graph).run({"x": x})["y"].numpy()
    assert np.allclose(got, _reference(path, x), atol=1e-5)
    bound = analyse(path).upper_bound
    found = brute_force_norm(graph, {"x": x.astype(np.float64)})
    assert bound == pytest.approx(found, rel=1e-6) and bound == pytest.approx(max(radius, 1.0), rel=1e-6)


@pytest.mark.parametrize("constant", ["A", "B"])
def test_swiglu_with_one_constant_operand(constant: str, tmp_path) -> None:
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    other = (3 * RNG.standard_normal((3, 4))).astype(np.float32)
    inputs = ["c", "x"] if constant == "A" else ["x", "c"]
    path = save_nodes(tmp_path, [helper.make_node("SwiGLU", inputs, ["y"], alpha=1.5)], x, {"c": other}, opset=28)
    graph = load_graph(path, [])
    assert np.allclose(interpret(graph).run({"x": x})["y"].numpy(), _reference(path, x), atol=1e-5)
    bound = analyse(path).upper_bound
    found = max(brute_force_norm(graph, {"x": RNG.standard_normal((3, 4)) * s}) for s in (0.5, 1, 2, 4))
    assert bound is not None and bound >= found * (1 - 1e-9)
