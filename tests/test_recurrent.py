"""RNN, GRU, LSTM: the interpreter against onnxruntime, and the unrolled rules against dense Jacobians.

The rules bound every step's Jacobian from slopes, ranges and weight norms; each bound is checked against
the largest Jacobian norm found (random points at several scales, then gradient ascent on sigma_max) and
against difference quotients measured with onnxruntime on random pairs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from benchmarks import onnx_node_suite as suite
from lipcheck import ops
from lipcheck.frontends import load_graph
from lipcheck.interpret import interpret
from lipcheck.ops import RuleContext, recurrent
from lipcheck.pipeline import analyse
from tests.jacobian import brute_force_norm
from tests.onnx_builders import model, node, rng_for, save

T, BATCH, IN, HID = 4, 2, 3, 3
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
OUTPUTS = ("Y", "Y_h", "Y_c")


def _build(
    op: str,
    tmp_path: Path,
    *,
    outputs: tuple[str, ...] = ("Y",),
    scale: float = 0.8,
    variable: tuple[str, ...] = (),
    steps: int | None = T,
    **attrs: Any,
) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """One recurrent node on x; weights are initializers unless named in ``variable`` (then graph inputs)."""
    rng = rng_for(f"{op}-{sorted((k, v) for k, v in attrs.items() if k != 'layout')}-{outputs}-{variable}")
    layout = int(attrs.get("layout", 0))
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    g = GATES[op]
    values: dict[str, np.ndarray] = {
        "W": scale * rng.standard_normal((dirs, g * HID, IN)),
        "R": scale * rng.standard_normal((dirs, g * HID, HID)),
        "B": 0.3 * rng.standard_normal((dirs, 2 * g * HID)),
    }
    state_shape = (BATCH, dirs, HID) if layout else (dirs, BATCH, HID)
    wanted = {"initial_h", "initial_c", "P"} & (set(attrs.pop("extra", ())) | set(variable))
    for name in sorted(wanted):
        values[name] = rng.standard_normal((dirs, 3 * HID) if name == "P" else state_shape)
    order = ["W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]
    if "sequence_lens" in attrs:
        values["sequence_lens"] = np.asarray(attrs.pop("sequence_lens"), dtype=np.int32)
    inputs = ["x"] + [n if n in values else "" for n in order]
    while inputs[-1] == "":
        inputs.pop()
    x_shape = (BATCH, steps, IN) if layout else (steps, BATCH, IN)
    graph_inputs: dict[str, Any] = {"x": x_shape}
    shapes = {"x": x_shape}
    for name in variable:
        graph_inputs[name] = values[name].shape
        shapes[name] = values[name].shape
    inits = {k: v.astype(np.int32 if k == "sequence_lens" else np.float32) for k, v in values.items()}
    inits = {k: v for k, v in inits.items() if k not in variable}
    names = [o if o in outputs else "" for o in OUTPUTS[: 2 if op != "LSTM" else 3]]
    while names[-1] == "":
        names.pop()
    proto = model([node(op, inputs, names, hidden_size=HID, **attrs)], graph_inputs, list(outputs), inits, opset=14)
    return save(proto, tmp_path), {k: tuple(int(d) for d in v) for k, v in shapes.items() if None not in v}


def _ort(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


CASES = [
    ("RNN", {}),
    ("RNN", {"direction": "reverse", "activations": ["Relu"]}),
    ("RNN", {"direction": "bidirectional", "activations": ["Sigmoid", "Tanh"], "extra": ["initial_h"]}),
    ("RNN", {"layout": 1, "sequence_lens": [T, 2], "clip": 0.7}),
    ("GRU", {}),
    ("GRU", {"linear_before_reset": 1, "extra": ["initial_h"]}),
    ("GRU", {"direction": "bidirectional", "sequence_lens": [3, T]}),
    ("GRU", {"direction": "reverse", "layout": 1, "activations": ["Sigmoid", "Softsign"]}),
    ("LSTM", {}),
    ("LSTM", {"extra": ["P", "initial_h", "initial_c"]}),
    ("LSTM", {"direction": "bidirectional", "sequence_lens": [2, T], "clip": 1.5}),
    ("LSTM", {"direction": "reverse", "layout": 1, "activations": ["Sigmoid", "Tanh", "Relu"], "extra": ["P"]}),
]
IDS = [f"{op}-{'-'.join(f'{k}={v}' for k, v in attrs.items()) or 'defaults'}" for op, attrs in CASES]


@pytest.mark.parametrize(("op", "attrs"), CASES, ids=IDS)
def test_interpreter_matches_onnxruntime(tmp_path: Path, op: str, attrs: dict[str, Any]) -> None:
    outputs = ("Y", "Y_h", "Y_c") if op == "LSTM" else ("Y", "Y_h")
    path, shapes = _build(op, tmp_path, outputs=outputs, **dict(attrs))
    x = rng_for("feed").standard_normal(shapes["x"]).astype(np.float32)
    got = interpret(load_graph(path)).run({"x": torch.as_tensor(x, dtype=torch.float64)})
    if attrs.get("layout"):  # onnxruntime has no batchwise layout: the same weights, time-major, transposed
        (tmp_path / "time_major").mkdir()
        plain, _ = _build(op, tmp_path / "time_major", outputs=outputs, **{**attrs, "layout": 0})
        expected = _ort(plain).run(None, {"x": x.transpose(1, 0, 2)})
        expected = [e.transpose(2, 0, 1, 3) if e.ndim == 4 else e.transpose(1, 0, 2) for e in expected]
    else:
        expected = _ort(path).run(None, {"x": x})
    for name, want in zip(outputs, expected, strict=True):
        assert np.allclose(got[name].numpy(), want, atol=2e-6), name


def _largest_jacobian_norm(path: Path, shapes: dict[str, tuple[int, ...]], tag: str) -> float:
    """max sigma_max(J) over random points at several scales, then gradient ascent from the best ones."""
    graph = load_graph(path)
    rng = rng_for(tag)
    points = [
        {k: s * rng.standard_normal(shape) for k, shape in shapes.items()}
        for s in (0.0, 0.3, 1.0, 3.0, 10.0)
        for _ in range(4)
    ]
    norms = [brute_force_norm(graph, p) for p in points]
    best = max(norms)
    for start in sorted(range(len(points)), key=lambda i: -norms[i])[:3]:
        best = max(best, _ascend(graph, points[start]))
    return best


def _ascend(graph: Any, point: dict[str, np.ndarray], steps: int = 25) -> float:
    """Gradient ascent on u^T J(x) v (u, v: J's top singular pair, refreshed every step)."""
    function = interpret(graph)
    names = list(point)
    sizes = [point[n].size for n in names]
    x = torch.cat([torch.as_tensor(point[n], dtype=torch.float64).reshape(-1) for n in names])

    def flat(z: torch.Tensor) -> torch.Tensor:
        parts = torch.split(z, sizes)
        feeds = {n: p.reshape(point[n].shape) for n, p in zip(names, parts, strict=True)}
        return torch.cat([v.reshape(-1) for v in function.run(feeds).values()])

    best = 0.0
    for _ in range(steps):
        jac = torch.autograd.functional.jacobian(flat, x)
        u_all, s_all, vh = torch.linalg.svd(jac)
        best = max(best, float(s_all[0]))
        z = x.clone().requires_grad_(True)
        _, jv = torch.autograd.functional.jvp(flat, z, vh[0], create_graph=True)
        (grad,) = torch.autograd.grad((u_all[:, 0] * jv).sum(), z)
        x = (x + 0.3 * grad / (grad.norm() + 1e-12)).detach()
    return best


def _quotients(path: Path, shapes: dict[str, tuple[int, ...]], tag: str, pairs: int = 200) -> float:
    """The largest ||f(a) - f(b)|| / ||a - b|| over random pairs, measured with onnxruntime."""
    session, rng, best = _ort(path), rng_for(tag), 0.0
    for k in range(pairs):
        radius = (0.01, 0.3, 2.0)[k % 3]
        a = {n: rng.standard_normal(s).astype(np.float32) * (1 + k % 5) for n, s in shapes.items()}
        b = {n: (v + radius * rng.standard_normal(v.shape)).astype(np.float32) for n, v in a.items()}
        fa = np.concatenate([o.reshape(-1) for o in session.run(None, a)]).astype(np.float64)
        fb = np.concatenate([o.reshape(-1) for o in session.run(None, b)]).astype(np.float64)
        gap = math.sqrt(sum(float(((a[n].astype(np.float64) - b[n]) ** 2).sum()) for n in a))
        best = max(best, float(np.linalg.norm(fa - fb)) / gap)
    return best


SOUND = [
    ("RNN", "Y", {}),
    ("RNN", "Y_h", {"direction": "bidirectional", "activations": ["Relu", "Tanh"]}),
    ("RNN", "Y", {"variable": ("initial_h",)}),
    ("GRU", "Y", {}),
    ("GRU", "Y_h", {"linear_before_reset": 1, "extra": ["initial_h"]}),
    ("GRU", "Y", {"direction": "bidirectional", "sequence_lens": [3, T]}),
    ("LSTM", "Y", {}),
    ("LSTM", "Y_c", {"extra": ["P", "initial_c"]}),
    ("LSTM", "Y_h", {"variable": ("initial_h",), "extra": ["P"]}),
    ("LSTM", "Y", {"direction": "reverse", "activations": ["Sigmoid", "Tanh", "Relu"]}),
    ("GRU", "Y", {"steps": 1, "extra": ["initial_h"]}),  # one step: the step constants alone
    ("LSTM", "Y_h", {"steps": 1, "extra": ["P", "initial_c"]}),
]


@pytest.mark.parametrize(
    ("op", "output", "attrs"), SOUND, ids=[f"{o}-{out}-{i}" for i, (o, out, _) in enumerate(SOUND)]
)
def test_bound_holds_against_jacobians_and_quotients(tmp_path: Path, op: str, output: str, attrs: dict) -> None:
    attrs = dict(attrs)
    path, shapes = _build(op, tmp_path, outputs=(output,), scale=1.2, **attrs)
    report = analyse(path)
    assert report.upper_bound is not None and report.certified, report.unbounded_reasons
    tag = f"{op}-{output}-{attrs}"
    largest = max(_largest_jacobian_norm(path, shapes, tag), _quotients(path, shapes, tag))
    assert largest <= report.upper_bound * (1 + 1e-6), (largest, report.upper_bound)
    print(f"{op} {output}: largest found {largest:.4g}, bound {report.upper_bound:.4g}")


@pytest.mark.parametrize(
    ("op", "output", "attrs"), SOUND, ids=[f"{o}-{out}-{i}" for i, (o, out, _) in enumerate(SOUND)]
)
def test_node_suite_search_does_not_beat_the_bound(tmp_path: Path, op: str, output: str, attrs: dict) -> None:
    """The node suite's instrument (onnxruntime quotients: random, far, Jacobian directions, line scans,
    ascent) on the same models, an implementation lipcheck does not share."""
    path, shapes = _build(op, tmp_path, outputs=(output,), scale=1.2, **dict(attrs))
    bound = analyse(path).upper_bound
    assert bound is not None
    feeds = {n: rng_for("start").standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    data = suite.TestData(onnx.load(str(path)), feeds, {}, dict.fromkeys(feeds, TensorProto.FLOAT))
    result = suite.measure(data, bound, seconds=10, max_runs=1500)
    assert result["status"] == "measured" and not result["unsound"], result


def test_scalar_rnn_bound_is_the_jacobian_at_zero(tmp_path: Path) -> None:
    """I = H = 1, positive weights, no bias, tanh: at x = 0 every tanh' is 1 and J is the Toeplitz matrix
    W R^(t-s), whose norm the rule computes: the bound is attained."""
    graph_inputs = {"x": (5, 1, 1)}
    inits = {"W": np.full((1, 1, 1), 0.7, np.float32), "R": np.full((1, 1, 1), 0.9, np.float32)}
    proto = model([node("RNN", ["x", "W", "R"], ["Y"], hidden_size=1)], graph_inputs, ["Y"], inits, opset=14)
    path = save(proto, tmp_path)
    report = analyse(path)
    reference = brute_force_norm(load_graph(path), {"x": np.zeros((5, 1, 1))})
    assert report.upper_bound == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize(
    ("op", "variable", "reason"),
    [
        ("RNN", ("W",), "bilinear"),
        ("LSTM", ("R",), "bilinear"),
        ("GRU", ("initial_h",), "initial_h"),
        ("LSTM", ("initial_c",), "initial_c"),
    ],
)
def test_verdicts(tmp_path: Path, op: str, variable: tuple[str, ...], reason: str) -> None:
    path, _ = _build(op, tmp_path, variable=variable)
    report = analyse(path)
    assert report.upper_bound is None
    assert any(reason in r.reason for r in report.unbounded_reasons), report.unbounded_reasons


def test_unbounded_gate_activation_is_a_verdict(tmp_path: Path) -> None:
    path, _ = _build("GRU", tmp_path, activations=["Relu", "Tanh"])
    report = analyse(path)
    assert report.upper_bound is None
    assert any("unbounded" in r.reason for r in report.unbounded_reasons)


def test_sequence_length_is_the_analysed_shape(tmp_path: Path) -> None:
    """A symbolic length is analysed at the shape given (longer sequences: larger bounds); a length no
    shape says is the verdict."""
    path, _ = _build("RNN", tmp_path, steps=None, scale=1.2)
    unknown = analyse(path)  # the first axis is the time axis here: not taken as a batch axis of 1
    assert unknown.upper_bound is None and "sequence length" in unknown.unbounded_reasons[0].reason
    bounds = [analyse(path, input_shapes=[f"{t},{BATCH},{IN}"]).upper_bound for t in (1, 4, 9)]
    assert bounds[0] is not None and bounds[0] < bounds[1] < bounds[2]  # type: ignore[operator]
    graph = load_graph(path, [f"4,{BATCH},{IN}"])
    graph.shapes.pop("x")
    rnn = graph.nodes[0]
    local = ops.get("RNN").lipschitz(RuleContext(rnn, graph, [1.0] + [0.0] * (len(rnn.inputs) - 1)))  # type: ignore[union-attr]
    assert not local.bounded and "sequence length" in (local.reason or "")


def test_long_sequences_stream_into_the_schur_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond DENSE_STEPS the matrix of block norms is not stored: sqrt(||N||_1 ||N||_inf) >= ||N||."""
    path, _ = _build("LSTM", tmp_path, outputs=("Y", "Y_h"))
    dense = analyse(path).upper_bound
    monkeypatch.setattr(recurrent, "DENSE_STEPS", 0)
    schur = analyse(path).upper_bound
    assert dense is not None and schur is not None
    assert dense <= schur <= dense * math.sqrt(T) * (1 + 1e-9)
