"""DFT, TensorScatter and CausalConvWithState: the interpreter against onnxruntime (or the ONNX reference), each
constant against the dense Jacobian."""

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

RNG = np.random.default_rng(5)


def _check(path: str, x: np.ndarray, exact: bool) -> None:
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    graph = load_graph(path, [])
    got = interpret(graph).run({"x": x})["y"].numpy()
    assert got.shape == want.shape and np.allclose(got, want, atol=1e-4), float(np.abs(got - want).max())
    bound = analyse(path).upper_bound
    found = brute_force_norm(graph, {"x": x.astype(np.float64)})
    assert bound is not None and bound >= found * (1 - 1e-9), (bound, found)
    if exact:
        assert bound == pytest.approx(found, rel=1e-6)


@pytest.mark.parametrize(
    ("attrs", "channels", "length", "exact"),
    [({}, 1, None, True), ({}, 2, None, True), ({"onesided": 1}, 1, None, True), ({}, 1, 12, True),
     ({}, 2, 5, True), ({"inverse": 1}, 2, None, True), ({"inverse": 1, "onesided": 1}, 2, None, False)],
    ids=["real", "complex", "onesided", "padded", "truncated", "inverse", "irfft"],
)  # fmt: skip
def test_dft_constant_is_sqrt_of_its_length(
    attrs: dict, channels: int, length: int | None, exact: bool, tmp_path
) -> None:
    x = RNG.standard_normal((2, 8, channels)).astype(np.float32)
    inits = {"axis": np.int64(1)}
    inputs = ["x", "n" if length else "", "axis"]
    if length:
        inits["n"] = np.int64(length)
    path = save_nodes(tmp_path, [helper.make_node("DFT", inputs, ["y"], **attrs)], x, inits, opset=20)
    _check(path, x, exact)


@pytest.mark.parametrize("mode", ["linear", "circular"])
def test_tensor_scatter_writes_each_entry_once(mode: str, tmp_path) -> None:
    update = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    x = RNG.standard_normal((2, 5, 4)).astype(np.float32)  # the cache is the variable
    inits = {"u": update, "w": np.array([1, 4] if mode == "circular" else [0, 2], np.int64)}
    node = helper.make_node("TensorScatter", ["x", "u", "w"], ["y"], mode=mode, axis=1)
    _check(save_nodes(tmp_path, [node], x, inits, opset=24), x, exact=True)


@pytest.mark.parametrize(("activation", "state_read"), [("none", False), ("silu", False), ("none", True)])
def test_causal_conv_with_state(activation: str, state_read: bool, tmp_path) -> None:
    """Against the ONNX reference (onnxruntime has no opset 27 kernel); without a state it is exact."""
    from onnx.reference import ReferenceEvaluator

    weight = RNG.standard_normal((3, 1, 4)).astype(np.float32)
    outputs = ["y", "state"]
    node = helper.make_node("CausalConvWithState", ["x", "w"], outputs, activation=activation)
    graph = helper.make_graph(
        [node],
        "causal",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6])],
        [onnx.ValueInfoProto(name=o) for o in outputs[: 1 + state_read]],
        [numpy_helper.from_array(weight, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 27)])
    proto.ir_version = 10
    path = str(tmp_path / "model.onnx")
    onnx.save(proto, path)
    x = RNG.standard_normal((2, 3, 6)).astype(np.float32)
    loaded = load_graph(path, [])
    got = interpret(loaded).run({"x": x})
    for name, want in zip(outputs, ReferenceEvaluator(path).run(None, {"x": x}), strict=False):
        assert np.allclose(got[name].numpy(), want, atol=1e-5), name
    bound = analyse(path).upper_bound
    found = max(brute_force_norm(loaded, {"x": RNG.standard_normal((2, 3, 6)) * s}) for s in (0.3, 1, 3))
    assert bound is not None and bound >= found * (1 - 1e-9)
    if activation == "none" and not state_read:
        assert bound == pytest.approx(found, rel=1e-6)
