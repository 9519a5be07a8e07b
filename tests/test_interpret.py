"""The graph interpreter against onnxruntime: every sample model and the one-op models of test_rules.

Agreement is required to 1e-5 relative (to the output's largest entry); onnxruntime runs in float32,
the interpreter in float64 (and float32 for the sample models). Gradients must flow through it.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from lipcheck.frontends import load_graph
from lipcheck.graph import Graph, Node
from lipcheck.interpret import FeedTypeError, GraphFunction, UninterpretableOpsError, interpret, interpreted_ops
from lipcheck.ops import registered_rules
from lipcheck.passes import prepare
from tests.conftest import SAMPLE_MODELS, SAMPLES
from tests.onnx_builders import Runner, model, node, rng_for, save
from tests.test_rules import ACTIVATIONS, DECOMPOSED, LINEAR, NOT_LIPSCHITZ, VECTOR, _outputs

REL = 1e-5


def assert_agree(got: torch.Tensor | tuple, want: list[np.ndarray], rel: float = REL) -> None:
    got_list = list(got) if isinstance(got, tuple) else [got]
    assert len(got_list) == len(want)
    for g, w in zip(got_list, want, strict=True):
        g = g.detach().cpu().double().numpy()
        assert g.shape == w.shape, (g.shape, w.shape)
        scale = max(1.0, float(np.abs(w).max(initial=0.0)))
        assert np.abs(g - w).max(initial=0.0) <= rel * scale, float(np.abs(g - w).max())


def check_file(path, shape: tuple[int, ...], dims=None, seed: int = 0) -> GraphFunction:
    specs = [",".join(map(str, shape))] if dims is not None else []
    graph = load_graph(path, specs)
    function = interpret(graph)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    assert_agree(function(torch.as_tensor(x)), Runner(path).outputs(x))
    return function


@pytest.mark.parametrize("name", SAMPLE_MODELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sample_models_agree_with_onnxruntime(name: str, dtype: torch.dtype) -> None:
    path = SAMPLES / name
    graph = load_graph(path)
    function = interpret(graph, dtype=dtype)
    runner = Runner(path)
    rng = np.random.default_rng(7)
    for scale in (0.1, 1.0, 5.0):
        x = (scale * rng.standard_normal(graph.shape("input"))).astype(np.float32)
        got = function(torch.as_tensor(x))
        assert got.dtype == dtype
        assert_agree(got, runner.outputs(x))


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_prepared_graph_computes_the_same_function(name: str) -> None:
    """Folding and recognition keep the function (to the recognised formulas' 1e-6 match)."""
    graph = load_graph(SAMPLES / name)
    x = torch.as_tensor(np.random.default_rng(3).standard_normal(graph.shape("input")))
    before = interpret(graph)(x)
    after = interpret(prepare(graph))(x)
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-5 * float(before.abs().max()))


@pytest.mark.parametrize("case", LINEAR, ids=lambda c: c.id)
def test_linear_cases_agree_with_onnxruntime(case, tmp_path) -> None:
    nodes, inits = case.build(rng_for(case.id))
    proto = model(nodes, {"x": case.dims or case.shape}, _outputs(nodes), inits, opset=case.opset)
    if case.runtimes_differ is None:
        check_file(save(proto, tmp_path), case.shape, dims=case.dims)
        return
    # the interpreter follows the ONNX reference implementation (the backend tests' expected outputs)
    x = np.random.default_rng(0).standard_normal(case.shape).astype(np.float32)
    want = ReferenceEvaluator(proto).run(None, {"x": x})[0]
    got = interpret(load_graph(save(proto, tmp_path)))(torch.as_tensor(x))
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ACTIVATIONS, ids=lambda c: c.id)
def test_activations_agree_with_onnxruntime(case, tmp_path) -> None:
    proto = model(
        [node(case.op, ["x", *case.consts], ["y"], **case.attrs)], {"x": ["N"]}, ["y"], case.consts, opset=case.opset
    )
    path = save(proto, tmp_path)
    graph = load_graph(path, ["4001"])
    x = np.linspace(-8, 8, 4001).astype(np.float32)
    assert_agree(interpret(graph)(torch.as_tensor(x)), Runner(path).outputs(x))


@pytest.mark.parametrize("case", VECTOR, ids=lambda c: c.id)
def test_vector_ops_agree_with_onnxruntime(case, tmp_path) -> None:
    proto = model([node(case.op, ["x"], ["y"], **case.attrs)], {"x": case.shape}, ["y"], opset=case.opset)
    check_file(save(proto, tmp_path), case.shape)


@pytest.mark.parametrize(("build", "name"), [c[1:3] for c in DECOMPOSED], ids=[c[0] for c in DECOMPOSED])
def test_decomposed_activations_before_and_after_recognition(build, name, tmp_path) -> None:
    nodes, inits = build(None)
    path = save(model(nodes, {"x": ["N"]}, ["y"], inits), tmp_path)
    x = np.linspace(-8, 8, 801).astype(np.float32)
    want = Runner(path).outputs(x)
    graph = load_graph(path, ["801"])
    assert_agree(interpret(graph)(torch.as_tensor(x)), want)
    prepared = prepare(graph)
    assert [n.op for n in prepared.nodes] == ["Recognised"]
    assert_agree(interpret(prepared)(torch.as_tensor(x)), want)


@pytest.mark.parametrize(("build", "op"), [c[1:] for c in NOT_LIPSCHITZ], ids=[c[0] for c in NOT_LIPSCHITZ])
def test_not_lipschitz_graphs_run(build, op, tmp_path) -> None:
    nodes, inits = build(rng_for("unbounded"))
    check_file(save(model(nodes, {"x": (3, 4)}, ["y"], inits), tmp_path), (3, 4))


def test_every_rule_op_has_an_interpreter() -> None:
    missing = sorted({r.op for r in registered_rules()} - set(interpreted_ops()))
    assert missing == []


def test_unsupported_ops_are_listed_together() -> None:
    graph = Graph(
        nodes=[
            Node("a", "RandomNormalLike", ["x"], ["e"]),
            Node("b", "com.x:Custom", ["e"], ["c"]),
            Node("c", "Resize", ["c"], ["y"], {"mode": "lanczos"}),
            Node("d", "RandomNormalLike", ["y"], ["z"]),
        ],
        inputs=["x"],
        outputs=["z"],
    )
    with pytest.raises(UninterpretableOpsError) as info:
        interpret(graph)
    message = str(info.value)
    assert "3 op type(s)" in message and "RandomNormalLike (a, d)" in message and "Resize(mode=lanczos) (c)" in message
    assert "com.x:Custom (b)" in message and "\n" not in message


def test_jvp_and_vjp_through_the_interpreter() -> None:
    """Forward and reverse mode agree with a dense Jacobian; second derivatives exist (tanh MLP)."""
    function = interpret(load_graph(SAMPLES / "mlp.onnx"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 16, generator=gen, dtype=torch.float64)
    u = torch.randn(1, 10, generator=gen, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(function, x).reshape(10, 16)
    _, jv = torch.func.jvp(function, (x,), (v,))
    _, pullback = torch.func.vjp(function, x)
    (ju,) = pullback(u)
    assert torch.allclose(jv.reshape(-1), jac @ v.reshape(-1), rtol=1e-12, atol=1e-12)
    assert torch.allclose(ju.reshape(-1), jac.T @ u.reshape(-1), rtol=1e-12, atol=1e-12)
    grad = torch.func.grad(lambda t: torch.func.jvp(function, (t,), (v,))[1].pow(2).sum())(x)
    assert torch.isfinite(grad).all() and float(grad.abs().max()) > 0


def test_run_returns_intermediate_values_and_starts_anywhere() -> None:
    graph = load_graph(SAMPLES / "resnet_small.onnx")
    function = interpret(graph)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    middle = "/block1/Add_output_0"
    values = function.run({"input": x}, [middle, "output"])
    again = function.run({middle: values[middle]}, ["output"])
    assert torch.equal(again["output"], values["output"])


def test_float_casts_follow_the_compute_dtype(tmp_path) -> None:
    proto = model(
        [node("Cast", ["x"], ["c"], to=onnx.TensorProto.FLOAT16), node("Mul", ["c", "k"], ["y"])],
        {"x": (3,)},
        ["y"],
        {"k": np.array(1 / 3, np.float32)},
    )
    graph = load_graph(save(proto, tmp_path))
    y = interpret(graph)(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert y.dtype == torch.float64
    assert math.isclose(float(y[0]), float(np.float32(1 / 3)), rel_tol=1e-15)


def test_bfloat16_feeds_are_read_exactly(tmp_path) -> None:
    """ONNX's bfloat16 and float8 test data are numpy arrays of ml_dtypes types, which torch cannot read."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    graph = load_graph(save(model([node("Relu", ["x"], ["y"])], {"x": (3,)}), tmp_path))
    for kind in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):  # numpy kinds V, V, f
        x = np.array([-1.5, 0.25, 3.0]).astype(kind)
        y = interpret(graph).run({"x": x})["y"]
        assert y.tolist() == [0.0, 0.25, 3.0]


def test_gather_of_one_entry_is_a_scalar(tmp_path) -> None:
    """A 1-D input and a scalar index (x.shape[0] as exporters write it) give a 0-d output."""
    proto = model([node("Gather", ["x", "i"], ["y"], axis=0)], {"x": (3,)}, ["y"], {"i": np.array(2, np.int64)})
    path = save(proto, tmp_path)
    x = np.array([1.0, 2.0, 5.0], np.float32)
    got = interpret(load_graph(path)).run({"x": torch.as_tensor(x)})["y"]
    want = Runner(path).outputs(x)[0]
    assert got.shape == want.shape == () and float(got) == float(want)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"),
    [("bfloat16", torch.float64), ("float8_e4m3fn", torch.float64), ("float4_e2m1fn", torch.float64),
     ("int4", torch.int8), ("uint4", torch.uint8)],
)  # fmt: skip
def test_extension_type_feeds_are_read_exactly(dtype: str, torch_dtype: torch.dtype) -> None:
    """ONNX's narrow types (numpy arrays of ml_dtypes) run as float32 or (u)int8 holding the same numbers."""
    import ml_dtypes

    value = np.array([0.0, 1.0, 2.0, 3.0]).astype(getattr(ml_dtypes, dtype))
    graph = Graph(nodes=[Node("n", "Identity", ["x"], ["y"])], inputs=["x"], outputs=["y"])
    (out,) = interpret(graph).run({"x": value}).values()
    assert out.dtype == torch_dtype and out.tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("value", [np.array(["a", "b"]), np.array([{"a": 1}], dtype=object)], ids=["str", "object"])
def test_unreadable_feeds_are_a_lipcheck_error(value: np.ndarray) -> None:
    graph = Graph(nodes=[Node("n", "Identity", ["x"], ["y"])], inputs=["x"], outputs=["y"])
    with pytest.raises(FeedTypeError, match="input 'x' holds"):
        interpret(graph).run({"x": value})


def test_opset6_prelu_slope_is_per_channel(tmp_path) -> None:
    """Before opset 7 a slope of C entries belongs to axis 1 (as torch's nn.PReLU exports it)."""
    slope = np.array([0.1, -2.0, 3.0], np.float32)
    path = save(model([node("PRelu", ["x", "s"], ["y"])], {"x": (2, 3, 4)}, ["y"], {"s": slope}, opset=6), tmp_path)
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    (got,) = interpret(load_graph(path, ["2,3,4"])).run({"x": x}).values()
    want = torch.nn.functional.prelu(
        torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(slope, dtype=torch.float64)
    )
    assert torch.equal(got, want)
