"""Gathers, scatters, masks, running sums, top-k, crops, unpooling, folding: every rule against a reference.

Each case is a one-node ONNX model whose float inputs are the perturbation directions; integer inputs
(indices, axes, sizes known only at run time) are fed fixed values and never perturbed.

* The interpreter must compute what onnxruntime computes (1e-5 relative).
* Linear cases: the explicit Jacobian J[:, i] = f(e_i) - f(0) over all float inputs taken together
  (onnxruntime, float32 evaluation, float64 differences and SVD). The rule's value is certified when it
  is >= sigma_max(J) (1e-6 slack for float32 noise) and must equal it (1e-5) where the rule says exact.
  Run-time indices: every placement tried stays below the bound, and the worst one reaches it.
* Nonlinear cases (max/min reductions, top-k, shrink): the largest Jacobian norm of the interpreter
  (torch autograd, float64) over random, spiky and tied points, which is a lower bound of the constant.
* Everywhere: difference quotients ||f(a) - f(b)|| / ||a - b|| on random pairs, on pairs along the top
  singular vector, and on pairs straddling ties never exceed the bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lipcheck import ops
from lipcheck.errors import UnsupportedOpsError
from lipcheck.frontends import load_graph
from lipcheck.interpret import interpret
from lipcheck.ops.reductions import running_sum_norm
from lipcheck.pipeline import analyse
from tests.onnx_builders import rng_for, sigma_max

I64 = np.int64
F32 = np.float32
CERT_SLACK = 1e-6
EXACT_TOL = 1e-5
QUOTIENT_TOL = 1e-5  # float32 evaluation of both points


@dataclass
class Case:
    """One node ``op(*inputs) -> outputs``; ``floats`` are perturbed, ``ints`` fed (a list: several placements,
    the first the worst), ``consts`` are initializers."""

    id: str
    op: str
    inputs: list[str]
    floats: dict[str, tuple[int, ...]]
    attrs: dict = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    ints: list[dict[str, np.ndarray]] = field(default_factory=list)
    outputs: tuple[str, ...] = ("y",)
    opset: int = 18
    exact: bool = True  # the rule's value is the true constant (run-time indices: the worst placement's)
    value: float | None = None  # the value the rule must give, when known in closed form

    @property
    def graph_outputs(self) -> list[str]:
        """The outputs the graph exposes (a name starting with '_' is produced and left unread)."""
        return [o for o in self.outputs if o and not o.startswith("_")]

    def model(self) -> onnx.ModelProto:
        int_inputs = self.ints[0] if self.ints else {}
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in self.floats.items()]
        inputs += [helper.make_tensor_value_info(n, _onnx_type(v), v.shape) for n, v in int_inputs.items()]
        graph = helper.make_graph(
            [helper.make_node(self.op, self.inputs, list(self.outputs), name="node", **self.attrs)],
            "test",
            inputs,
            [helper.make_empty_tensor_value_info(o) for o in self.graph_outputs],
            initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in self.consts.items()],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        proto.ir_version = min(proto.ir_version, 10)
        return proto


def _onnx_type(value: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype)


class Session:
    """onnxruntime on a case's model: float outputs flattened and concatenated, float64."""

    def __init__(self, path: Path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def outputs(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        given = {k: (v.astype(F32) if v.dtype.kind == "f" else v) for k, v in feeds.items()}
        return [np.asarray(o) for o in self.session.run(None, given)]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        found = [o.astype(np.float64).reshape(-1) for o in self.outputs(feeds) if o.dtype.kind == "f"]
        return np.concatenate(found) if found else np.zeros(0)


def _split(case: Case, flat: np.ndarray) -> dict[str, np.ndarray]:
    feeds, start = {}, 0
    for name, shape in case.floats.items():
        size = math.prod(shape)
        feeds[name] = flat[start : start + size].reshape(shape)
        start += size
    return feeds


def _size(case: Case) -> int:
    return sum(math.prod(s) for s in case.floats.values())


def jacobian(case: Case, run: Session, ints: dict[str, np.ndarray]) -> np.ndarray:
    """J[:, i] = f(e_i) - f(0) over the float inputs taken together (the model is affine in them)."""
    n = _size(case)
    base = run({**_split(case, np.zeros(n)), **ints})
    columns = [run({**_split(case, np.eye(n)[i]), **ints}) - base for i in range(n)]
    return np.stack(columns, axis=1)


def largest_quotient(case: Case, run: Session, ints: dict, directions: list[np.ndarray], tag: str) -> float:
    """max ||f(a) - f(b)|| / ||a - b|| over random pairs, pairs along ``directions``, and tied pairs."""
    rng, n = rng_for(tag), _size(case)
    pairs = []
    for scale in (0.01, 1.0, 10.0):
        for _ in range(20):
            a = rng.standard_normal(n) * 3
            pairs.append((a, a + scale * rng.standard_normal(n)))
    for v in directions:
        a = rng.standard_normal(n)
        pairs += [(a, a + t * v) for t in (0.05, 1.0)]
    ties = np.round(rng.standard_normal((20, n)))  # many equal entries: sorts, maxima and argmaxes switch here
    pairs += [(t, t + 1e-3 * rng.standard_normal(n)) for t in ties]
    best = 0.0
    for a, b in pairs:
        a, b = a.astype(F32).astype(np.float64), b.astype(F32).astype(np.float64)
        gap = np.linalg.norm(a - b)
        if gap > 1e-6:
            change = run({**_split(case, a), **ints}) - run({**_split(case, b), **ints})
            best = max(best, float(np.linalg.norm(change) / gap))
    return best


def build(case: Case, tmp_path: Path) -> Path:
    path = tmp_path / f"{case.id}.onnx"
    onnx.save(case.model(), str(path))
    return path


def check_interpreter(case: Case, path: Path) -> None:
    """lipcheck's interpreter computes onnxruntime's outputs (every output, integers included)."""
    function = interpret(load_graph(path))
    run = Session(path)
    rng = rng_for(case.id + "/parity")
    for ints in case.ints or [{}]:
        feeds = {n: rng.standard_normal(s).astype(F32) for n, s in case.floats.items()} | ints
        want = run.outputs(feeds)
        got = function.run({k: torch.as_tensor(v) for k, v in feeds.items()}, case.graph_outputs)
        for name, w in zip(case.graph_outputs, want, strict=True):
            g = got[name].detach().cpu().numpy()
            assert g.shape == w.shape, (case.id, name, g.shape, w.shape)
            scale = max(1.0, float(np.abs(w.astype(np.float64)).max(initial=0.0)))
            assert np.abs(g.astype(np.float64) - w.astype(np.float64)).max(initial=0.0) <= 1e-5 * scale, (case.id, name)


def rule_value(case: Case, path: Path) -> tuple[float, bool]:
    """The single node's bound (w.r.t. its float inputs together) and whether the rule calls it exact."""
    report = analyse(path, device="cpu")
    assert report.bounded, report.unbounded_reasons
    (layer,) = report.layers
    assert layer.certified
    # each float input has constant 1: the composition multiplies by sqrt(number of inputs)
    assert report.upper_bound == pytest.approx(layer.lipschitz * math.sqrt(len(case.floats)), rel=1e-12)
    return layer.lipschitz, layer.exact


# ---------------------------------------------------------------------------------------------
# Linear cases (affine in the float inputs)


def _randn(tag: str, *shape: int) -> np.ndarray:
    return rng_for(tag).standard_normal(shape).astype(F32)


def _gather_elements() -> list[Case]:
    return [
        Case(
            "gatherelements-axis0-repeats",
            "GatherElements",
            ["x", "i"],
            {"x": (3, 4)},
            consts={"i": np.array([[0, 1, 2, 0], [0, 1, -1, 0]], I64)},
            value=math.sqrt(2),
        ),
        Case(
            "gatherelements-axis1-negative",
            "GatherElements",
            ["x", "i"],
            {"x": (2, 5)},
            {"axis": 1},
            consts={"i": np.array([[4, -1, 0, 0, 0, 1], [1, 2, 3, -2, 3, 3]], I64)},
            value=2.0,
        ),
        Case(
            "gatherelements-3d-axis2-smaller-indices",
            "GatherElements",
            ["x", "i"],
            {"x": (2, 3, 4)},
            {"axis": -1},
            consts={"i": rng_for("ge3").integers(-4, 4, (2, 2, 3)).astype(I64)},
        ),
        Case(
            "gatherelements-runtime-indices",
            "GatherElements",
            ["x", "i"],
            {"x": (3, 4)},
            ints=[{"i": np.zeros((5, 4), I64)}, {"i": rng_for("ger").integers(-3, 3, (5, 4)).astype(I64)}],
            value=math.sqrt(5),
        ),
    ]


def _gather_nd() -> list[Case]:
    return [
        Case(
            "gathernd-elements",
            "GatherND",
            ["x", "i"],
            {"x": (3, 4)},
            consts={"i": np.array([[0, 1], [2, 3], [0, 1], [-3, 1]], I64)},
            value=math.sqrt(3),
        ),
        Case(
            "gathernd-slices",
            "GatherND",
            ["x", "i"],
            {"x": (3, 4, 2)},
            consts={"i": np.array([[[0], [2]], [[0], [-3]]], I64)},
            value=math.sqrt(3),
        ),
        Case(
            "gathernd-batch-dims",
            "GatherND",
            ["x", "i"],
            {"x": (2, 3, 4)},
            {"batch_dims": 1},
            consts={"i": np.array([[[0], [0], [1]], [[2], [2], [-1]]], I64)},
            value=math.sqrt(3),
        ),
        Case(
            "gathernd-runtime-indices",
            "GatherND",
            ["x", "i"],
            {"x": (3, 4)},
            ints=[{"i": np.ones((5, 2), I64)}, {"i": rng_for("gndr").integers(0, 3, (5, 2)).astype(I64)}],
            value=math.sqrt(5),
        ),
    ]


SE_INDEX = np.array([[0, 0, 1], [0, 2, 1]], I64)  # column 0 and 2: two updates to one entry


def _scatter_elements() -> list[Case]:
    distinct = np.array([[0, 1, 2, 0], [1, 2, 0, 2]], I64)
    return [
        Case(
            "scatterelements-none-data",
            "ScatterElements",
            ["x", "i", "u"],
            {"x": (3, 4)},
            consts={"i": distinct, "u": _randn("seu", 2, 4)},
            value=1.0,
        ),
        Case(
            "scatterelements-none-overwrites-all",
            "ScatterElements",
            ["x", "i", "u"],
            {"x": (2, 3)},
            consts={"i": np.array([[0, 1, 1], [1, 0, 0]], I64), "u": _randn("seu2", 2, 3)},
            value=0.0,
        ),
        Case(
            "scatterelements-none-both-axis1",
            "ScatterElements",
            ["x", "i", "u"],
            {"x": (2, 5), "u": (2, 2)},
            {"axis": 1},
            consts={"i": np.array([[1, -1], [0, 3]], I64)},
            value=1.0,
        ),
        Case(
            "scatterelements-add-updates",
            "ScatterElements",
            ["d", "i", "x"],
            {"x": (2, 3)},
            {"reduction": "add"},
            consts={"i": SE_INDEX, "d": _randn("sed", 3, 3)},
            value=math.sqrt(2),
        ),
        Case(
            "scatterelements-add-both",
            "ScatterElements",
            ["x", "i", "u"],
            {"x": (3, 3), "u": (2, 3)},
            {"reduction": "add"},
            consts={"i": SE_INDEX},
            value=math.sqrt(3),
        ),
        Case(
            "scatterelements-mul-data",
            "ScatterElements",
            ["x", "i", "u"],
            {"x": (3, 3)},
            {"reduction": "mul"},
            consts={"i": SE_INDEX, "u": np.array([[2, 3, -0.5], [-4, 1, 0.5]], F32)},
            value=8.0,
        ),
        Case(
            "scatterelements-mul-updates",
            "ScatterElements",
            ["d", "i", "x"],
            {"x": (2, 4)},
            {"reduction": "mul"},
            consts={"i": distinct, "d": _randn("sed2", 3, 4) * 3},
        ),
        Case(
            "scatterelements-runtime-add-updates",
            "ScatterElements",
            ["d", "i", "x"],
            {"x": (2, 3)},
            {"reduction": "add"},
            consts={"d": _randn("sed3", 3, 3)},
            ints=[{"i": np.zeros((2, 3), I64)}, {"i": SE_INDEX}],
            value=math.sqrt(2),
        ),
        Case(
            "scatter-opset10",
            "Scatter",
            ["x", "i", "u"],
            {"x": (3, 4)},
            {"axis": 0},
            consts={"i": distinct, "u": _randn("seu3", 2, 4)},
            opset=10,
            value=1.0,
        ),
    ]


def _scatter_nd() -> list[Case]:
    return [
        Case(
            "scatternd-none-rows",
            "ScatterND",
            ["x", "i", "u"],
            {"x": (4, 3)},
            consts={"i": np.array([[1], [-1]], I64), "u": _randn("sndu", 2, 3)},
            value=1.0,
        ),
        Case(
            "scatternd-add-updates",
            "ScatterND",
            ["d", "i", "x"],
            {"x": (3, 3)},
            {"reduction": "add"},
            consts={"i": np.array([[1], [1], [-3]], I64), "d": _randn("sndd", 4, 3)},
            value=math.sqrt(3),
        ),
        Case(
            "scatternd-add-both",
            "ScatterND",
            ["x", "i", "u"],
            {"x": (4,), "u": (3,)},
            {"reduction": "add"},
            consts={"i": np.array([[0], [0], [2]], I64)},
            value=math.sqrt(3),
        ),
        Case(
            "scatternd-mul-data",
            "ScatterND",
            ["x", "i", "u"],
            {"x": (4,)},
            {"reduction": "mul"},
            consts={"i": np.array([[0], [0], [2]], I64), "u": np.array([3, -2, 0.5], F32)},
            value=6.0,
        ),
        Case(
            "scatternd-mul-updates-elements",
            "ScatterND",
            ["d", "i", "x"],
            {"x": (2,)},
            {"reduction": "mul"},
            consts={"i": np.array([[0, 1], [1, 2]], I64), "d": np.array([[1, -5, 2], [3, 4, -0.5]], F32)},
            value=5.0,
        ),
        Case(
            "scatternd-mul-updates-twice-into-zero",
            "ScatterND",
            ["d", "i", "x"],
            {"x": (3,)},
            {"reduction": "mul"},
            consts={"i": np.array([[0], [0], [1]], I64), "d": np.array([0, 2, 7], F32)},
            value=2.0,
        ),
        Case(
            "scatternd-runtime-add-both",
            "ScatterND",
            ["x", "i", "u"],
            {"x": (4,), "u": (3,)},
            {"reduction": "add"},
            ints=[{"i": np.full((3, 1), 2, I64)}, {"i": np.array([[0], [3], [1]], I64)}],
            value=2.0,
        ),
    ]


def _masks_and_sums() -> list[Case]:
    return [
        Case("trilu-upper", "Trilu", ["x"], {"x": (3, 4)}, opset=14, value=1.0),
        Case(
            "trilu-lower-k-1",
            "Trilu",
            ["x", "k"],
            {"x": (2, 3, 3)},
            {"upper": 0},
            consts={"k": np.array(-1, I64)},
            opset=14,
            value=1.0,
        ),
        Case("trilu-upper-keeps-nothing", "Trilu", ["x", "k"], {"x": (3, 4)}, consts={"k": np.array(4, I64)}, value=0),
        Case(
            "trilu-lower-keeps-nothing",
            "Trilu",
            ["x", "k"],
            {"x": (3, 4)},
            {"upper": 0},
            consts={"k": np.array(-3, I64)},
            value=0.0,
        ),
        Case(
            "trilu-runtime-k",
            "Trilu",
            ["x", "k"],
            {"x": (3, 4)},
            ints=[{"k": np.array(0, I64)}, {"k": np.array(9, I64)}],
            value=1.0,
            exact=False,
        ),
        Case("cumsum-n7", "CumSum", ["x", "a"], {"x": (7,)}, consts={"a": np.array(0, I64)}),
        Case("cumsum-n7-exclusive", "CumSum", ["x", "a"], {"x": (7,)}, {"exclusive": 1}, {"a": np.array(0, I64)}),
        Case("cumsum-n7-reverse", "CumSum", ["x", "a"], {"x": (7,)}, {"reverse": 1}, {"a": np.array([0], I64)}),
        Case(
            "cumsum-2d-reverse-exclusive",
            "CumSum",
            ["x", "a"],
            {"x": (3, 6)},
            {"reverse": 1, "exclusive": 1},
            {"a": np.array(-1, np.int32)},
        ),
        Case("cumsum-n1-exclusive", "CumSum", ["x", "a"], {"x": (1, 4)}, {"exclusive": 1}, {"a": np.array(0, I64)}),
        Case(
            "cumsum-runtime-axis",
            "CumSum",
            ["x", "a"],
            {"x": (2, 6)},
            ints=[{"a": np.array(1, I64)}, {"a": np.array(0, I64)}],
            value=running_sum_norm(6),
        ),
    ]


def _crops_unpooling_folding() -> list[Case]:
    return [
        Case("centercroppad-crop-pad", "CenterCropPad", ["x", "s"], {"x": (5, 6)}, consts={"s": np.array([3, 9], I64)}),
        Case(
            "centercroppad-axes",
            "CenterCropPad",
            ["x", "s"],
            {"x": (2, 5, 4)},
            {"axes": [-1, 1]},
            {"s": np.array([7, 2], I64)},
        ),
        Case(
            "maxunpool-constant-indices",
            "MaxUnpool",
            ["x", "i"],
            {"x": (1, 2, 2, 2)},
            {"kernel_shape": [2, 2], "strides": [2, 2]},
            consts={"i": np.array([[[[0, 3], [9, 15]], [[0, 3], [9, 31]]]], I64)},  # duplicates: the last one wins
            value=1.0,
        ),
        Case(
            "maxunpool-output-shape",
            "MaxUnpool",
            ["x", "i", "s"],
            {"x": (1, 1, 2, 2)},
            {"kernel_shape": [2, 2], "strides": [2, 2]},
            consts={"i": np.array([[[[5, 7], [13, 24]]]], I64), "s": np.array([1, 1, 5, 5], I64)},
            value=1.0,
        ),
        Case(
            "col2im-k2-s1",
            "Col2Im",
            ["x", "im", "b"],
            {"x": (1, 8, 4)},
            consts={"im": np.array([3, 3], I64), "b": np.array([2, 2], I64)},
            value=2.0,
        ),
        Case(
            "col2im-k3-s2-pads",
            "Col2Im",
            ["x", "im", "b"],
            {"x": (1, 9, 9)},
            {"strides": [2, 2], "pads": [1, 0, 1, 2]},
            {"im": np.array([5, 5], I64), "b": np.array([3, 3], I64)},
        ),
        Case(
            "col2im-dilation2",
            "Col2Im",
            ["x", "im", "b"],
            {"x": (1, 4, 9)},
            {"dilations": [2, 2]},
            {"im": np.array([5, 5], I64), "b": np.array([2, 2], I64)},
            value=2.0,
        ),
        Case(
            "col2im-3d",
            "Col2Im",
            ["x", "im", "b"],
            {"x": (1, 8, 8)},
            consts={"im": np.array([3, 3, 3], I64), "b": np.array([2, 2, 2], I64)},
            value=math.sqrt(8),
        ),
        Case(
            "col2im-runtime-geometry",
            "Col2Im",
            ["x", "im", "b"],
            {"x": (1, 4, 4)},
            ints=[{"im": np.array([3, 3], I64), "b": np.array([2, 2], I64)}],
            value=2.0,
        ),
        Case("spacetodepth-crd", "SpaceToDepth", ["x"], {"x": (1, 2, 4, 6)}, {"blocksize": 2, "mode": "CRD"}, opset=28),
        Case("spacetodepth-dcr", "SpaceToDepth", ["x"], {"x": (2, 2, 4, 2)}, {"blocksize": 2}, opset=28, value=1.0),
        Case("depthtospace-crd", "DepthToSpace", ["x"], {"x": (1, 8, 2, 3)}, {"blocksize": 2, "mode": "CRD"}, value=1),
    ]


LINEAR = [
    *_gather_elements(),
    *_gather_nd(),
    *_scatter_elements(),
    *_scatter_nd(),
    *_masks_and_sums(),
    *_crops_unpooling_folding(),
]


@pytest.mark.parametrize("case", LINEAR, ids=lambda c: c.id)
def test_linear_rule_against_dense_jacobian(case: Case, tmp_path) -> None:
    path = build(case, tmp_path)
    check_interpreter(case, path)
    value, exact = rule_value(case, path)
    run = Session(path)
    norms = []
    for ints in case.ints or [{}]:
        jac = jacobian(case, run, ints)
        norm = sigma_max(jac)
        norms.append(norm)
        assert value >= norm * (1 - CERT_SLACK), f"{case.id}: certified {value} < exact {norm} for {ints}"
        top = np.linalg.svd(jac)[2][0] if jac.size else np.zeros(_size(case))
        found = largest_quotient(case, run, ints, [top], case.id)
        assert found <= value * (1 + QUOTIENT_TOL) + 1e-6, f"{case.id}: quotient {found} above {value}"
    if case.exact:
        assert exact or case.ints, f"{case.id}: the rule does not call {value} exact"
        assert value == pytest.approx(norms[0], rel=EXACT_TOL, abs=1e-7), f"{case.id}: {value} vs {norms[0]}"
    if exact:
        assert value == pytest.approx(norms[0], rel=EXACT_TOL, abs=1e-7), f"{case.id}: exact {value} vs {norms[0]}"
    if case.value is not None:
        assert value == pytest.approx(case.value, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Nonlinear cases: the interpreter's largest Jacobian norm (autograd), and difference quotients


def interpreter_jacobian_norm(case: Case, path: Path, ints: dict, points: list[np.ndarray]) -> float:
    function = interpret(load_graph(path))
    fixed = {k: torch.as_tensor(v) for k, v in ints.items()}
    names = list(case.floats)

    def flat(x: torch.Tensor) -> torch.Tensor:
        feeds = {name: t.reshape(case.floats[name]) for name, t in zip(names, split(x), strict=True)}
        values = function.run(feeds | fixed, case.graph_outputs)
        return torch.cat([v.reshape(-1) for v in values.values() if v.is_floating_point()])

    def split(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(x, [math.prod(s) for s in case.floats.values()])

    best = 0.0
    for point in points:
        jac = torch.autograd.functional.jacobian(flat, torch.as_tensor(point, dtype=torch.float64))
        best = max(best, float(torch.linalg.matrix_norm(jac.reshape(-1, point.size), ord=2)))
    return best


def _points(case: Case) -> list[np.ndarray]:
    rng, n = rng_for(case.id + "/points"), _size(case)
    points = [rng.standard_normal(n) * s for s in (0.1, 1.0, 10.0) for _ in range(10)]
    for i in range(n):  # one entry far above (or below) the rest: maxima and sorts move it alone
        spike = rng.standard_normal(n) * 0.01
        spike[i] = 10.0 if i % 2 else -10.0
        points.append(spike)
    return points


NONLINEAR = [
    Case(
        "scatterelements-max-data",
        "ScatterElements",
        ["x", "i", "u"],
        {"x": (3, 3)},
        {"reduction": "max"},
        consts={"i": SE_INDEX, "u": _randn("sem", 2, 3)},
    ),
    Case(
        "scatterelements-min-both",
        "ScatterElements",
        ["x", "i", "u"],
        {"x": (3, 3), "u": (2, 3)},
        {"reduction": "min"},
        consts={"i": SE_INDEX},
    ),
    Case(
        "scatternd-max-both",
        "ScatterND",
        ["x", "i", "u"],
        {"x": (4, 2), "u": (3, 2)},
        {"reduction": "max"},
        consts={"i": np.array([[1], [1], [3]], I64)},
    ),
    Case("topk-values", "TopK", ["x", "k"], {"x": (3, 8)}, consts={"k": np.array([3], I64)}, outputs=("y", "_i")),
    Case(
        "topk-smallest-axis0",
        "TopK",
        ["x", "k"],
        {"x": (6, 2)},
        {"axis": 0, "largest": 0},
        consts={"k": np.array([4], I64)},
        outputs=("y", "_i"),
    ),
    Case(
        "topk-runtime-k",
        "TopK",
        ["x", "k"],
        {"x": (2, 7)},
        ints=[{"k": np.array([5], I64)}, {"k": np.array([1], I64)}],
        outputs=("y", "_i"),
    ),
    Case("topk-opset9-attribute", "TopK", ["x"], {"x": (2, 6)}, {"k": 2}, outputs=("y", "_i"), opset=9),
    Case("shrink-soft", "Shrink", ["x"], {"x": (9,)}, {"lambd": 0.5, "bias": 0.5}),
    Case("shrink-negative-lambd-identity", "Shrink", ["x"], {"x": (9,)}, {"lambd": -1.0, "bias": 0.0}),
]


@pytest.mark.parametrize("case", NONLINEAR, ids=lambda c: c.id)
def test_nonlinear_rule_against_jacobian_search(case: Case, tmp_path) -> None:
    path = build(case, tmp_path)
    check_interpreter(case, path)
    value, exact = rule_value(case, path)
    assert value == 1.0 and (exact or case.ints), (case.id, value, exact)  # k known at run time could be 0
    run = Session(path)
    for ints in case.ints or [{}]:
        found = interpreter_jacobian_norm(case, path, ints, _points(case))
        assert found <= value * (1 + 1e-9), f"{case.id}: Jacobian norm {found} above {value}"
        assert found >= value * (1 - 1e-9), f"{case.id}: the search found {found}, the rule says exact {value}"
        quotient = largest_quotient(case, run, ints, [], case.id)
        assert quotient <= value * (1 + QUOTIENT_TOL) + 1e-6, f"{case.id}: quotient {quotient} above {value}"


def test_running_sum_norm_is_the_dense_svd() -> None:
    """1/(2 sin(pi/(2(2n+1)))) against numpy's SVD of the lower-triangular ones matrix, n up to 1500."""
    for n in (1, 2, 3, 4, 7, 10, 64, 257, 1000, 1500):
        dense = float(np.linalg.norm(np.tril(np.ones((n, n))), 2))
        closed = running_sum_norm(n)
        assert closed >= dense and closed == pytest.approx(dense, rel=1e-10), (n, closed, dense)
    assert running_sum_norm(0) == 0.0


# ---------------------------------------------------------------------------------------------
# Verdicts and refusals


VERDICTS = [
    Case("hardmax", "Hardmax", ["x"], {"x": (3, 4)}, opset=13),
    Case("hardmax-opset11-coerce", "Hardmax", ["x"], {"x": (2, 3, 4)}, {"axis": 1}, opset=11),
    Case("shrink-hard", "Shrink", ["x"], {"x": (5,)}, {"lambd": 0.5}),
    Case("shrink-negative-lambd-bias", "Shrink", ["x"], {"x": (5,)}, {"lambd": -1.0, "bias": 0.5}),
    Case("topk-indices-read", "TopK", ["x", "k"], {"x": (2, 5)}, consts={"k": np.array([2], I64)}, outputs=("y", "i")),
    Case(
        "scatterelements-mul-both",
        "ScatterElements",
        ["x", "i", "u"],
        {"x": (3, 3), "u": (2, 3)},
        {"reduction": "mul"},
        consts={"i": SE_INDEX},
    ),
    Case(
        "scatternd-mul-updates-twice",
        "ScatterND",
        ["d", "i", "x"],
        {"x": (3,)},
        {"reduction": "mul"},
        consts={"i": np.array([[0], [0], [1]], I64), "d": np.array([1, 2, 7], F32)},
    ),
]


@pytest.mark.parametrize("case", VERDICTS, ids=lambda c: c.id)
def test_not_globally_lipschitz_is_named(case: Case, tmp_path) -> None:
    path = build(case, tmp_path)
    check_interpreter(case, path)
    report = analyse(path, device="cpu")
    assert not report.bounded and report.upper_bound is None
    assert [(r.node, r.op) for r in report.unbounded_reasons] == [("node", case.op)]
    if case.op in ("Hardmax", "Shrink"):  # a step: a quotient across it is as large as one wants
        run, a = Session(path), np.zeros(_size(case))
        b = a.copy()
        b[0] = 0.5 + 1e-3 if case.op == "Shrink" else 1e-3
        a[0] = 0.5 - 1e-3 if case.op == "Shrink" else -1e-3
        if case.op == "Shrink" and case.attrs["lambd"] < 0:
            a[0], b[0] = 1 - 1e-3, 1 + 1e-3
        gap = np.linalg.norm(run(_split(case, a)) - run(_split(case, b))) / np.linalg.norm(a - b)
        assert gap > 100


def test_indices_computed_from_the_input_are_a_verdict(tmp_path) -> None:
    """MaxUnpool of a MaxPool's argmax indices, GatherElements of TopK's indices: positions that jump."""
    pool = helper.make_node("MaxPool", ["x"], ["p", "i"], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    unpool = helper.make_node("MaxUnpool", ["p", "i"], ["y"], name="unpool", kernel_shape=[2, 2], strides=[2, 2])
    topk = helper.make_node("TopK", ["x2", "k"], ["v", "j"], name="topk")
    gather = helper.make_node("GatherElements", ["x2", "j"], ["z"], name="gather", axis=1)
    graph = helper.make_graph(
        [pool, unpool, topk, gather],
        "test",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 1, 4, 4)),
            helper.make_tensor_value_info("x2", TensorProto.FLOAT, (2, 5)),
        ],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("y", "z")],
        initializer=[numpy_helper.from_array(np.array([2], I64), "k")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 10
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    report = analyse(path, device="cpu")
    assert not report.bounded
    named = {r.node for r in report.unbounded_reasons}
    assert {"unpool", "gather"} <= named and {"pool", "topk"} <= named  # the argmax outputs are steps themselves


REFUSED = [
    (
        Case(
            "scatternd-none-duplicates",
            "ScatterND",
            ["x", "i", "u"],
            {"x": (4,)},
            consts={"i": np.array([[1], [1]], I64), "u": np.ones(2, F32)},
        ),
        "ScatterND(reduction=none, duplicate indices)",
    ),
    (
        Case(
            "scatterelements-none-duplicates",
            "ScatterElements",
            ["x", "i", "u"],
            {"x": (3, 3)},
            consts={"i": SE_INDEX, "u": np.ones((2, 3), F32)},
        ),
        "ScatterElements(reduction=none, duplicate indices)",
    ),
    (
        Case(
            "scatternd-mul-runtime-indices",
            "ScatterND",
            ["x", "i", "u"],
            {"x": (4,)},
            {"reduction": "mul"},
            consts={"u": np.ones(2, F32)},
            ints=[{"i": np.array([[1], [2]], I64)}],
        ),
        "ScatterND(reduction=mul, indices known at run time)",
    ),
    (
        Case(
            "topk-unsorted",
            "TopK",
            ["x", "k"],
            {"x": (2, 6)},
            {"sorted": 0},
            consts={"k": np.array([3], I64)},
            outputs=("y", "_i"),
        ),
        "TopK(sorted=0)",
    ),
]


@pytest.mark.parametrize(("case", "label"), REFUSED, ids=[c.id for c, _ in REFUSED])
def test_variants_without_a_bound_are_refused_by_name(case: Case, label: str, tmp_path) -> None:
    path = build(case, tmp_path)
    with pytest.raises(UnsupportedOpsError) as info:
        analyse(path, device="cpu")
    assert label in str(info.value)


@pytest.mark.parametrize(
    ("lambd", "bias", "formula"),
    [
        (0.5, 0.5, lambda t: t - t.clamp(-0.5, 0.5)),
        (-1.0, 0.0, lambda t: t),
        (0.0, 0.0, lambda t: t),
    ],
    ids=["soft", "negative-lambd", "zero"],
)
def test_shrink_slope_interval_holds_every_derivative(lambd, bias, formula, tmp_path) -> None:
    """The chain bounds' slope facet of a continuous Shrink, against central differences on a fine grid."""
    case = Case("shrink-slope", "Shrink", ["x"], {"x": (4001,)}, {"lambd": lambd, "bias": bias})
    path = build(case, tmp_path)
    grid = np.linspace(-4, 4, 4001)
    assert np.abs(Session(path)({"x": grid}) - formula(torch.as_tensor(grid)).numpy()).max() <= 1e-6
    graph = load_graph(path)
    (layer,) = graph.nodes
    slope = ops.get("Shrink").slope(layer, graph)  # type: ignore[union-attr]
    t = torch.as_tensor(np.linspace(-6, 6, 120_001), dtype=torch.float64)
    quotients = (formula(t + 1e-5) - formula(t - 1e-5)) / 2e-5
    assert slope.low <= float(quotients.min()) + 1e-7 and float(quotients.max()) <= slope.high + 1e-7
    assert slope.lipschitz == 1.0


def test_a_cached_answer_knows_whether_the_indices_are_read(tmp_path) -> None:
    """TopK's bound depends on whether its indices output is read: the layer cache must tell the two apart."""
    values_only = Case("topk-cache", "TopK", ["x", "k"], {"x": (2, 5)}, consts={"k": np.array([2], I64)})
    values_only.outputs = ("y", "_i")
    both = Case("topk-cache", "TopK", ["x", "k"], {"x": (2, 5)}, consts={"k": np.array([2], I64)})
    both.outputs = ("y", "i")
    cache = tmp_path / "cache"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = analyse(build(values_only, tmp_path / "a"), device="cpu", cache=cache)
    second = analyse(build(both, tmp_path / "b"), device="cpu", cache=cache)
    assert first.upper_bound == 1.0 and second.upper_bound is None


def test_a_long_axis_counts_the_interior_patches(monkeypatch) -> None:
    """Past PATCH_SLOTS slots Col2Im's cover is the size-independent count: never below the exact one."""
    from lipcheck.ops import indexing

    for k, stride, dilation in [(3, 1, 1), (3, 2, 1), (2, 2, 2), (5, 3, 2), (4, 2, 1), (1, 3, 1)]:
        exact, known = indexing.patch_cover(200, k, stride, dilation, 1, 1)
        monkeypatch.setattr(indexing, "PATCH_SLOTS", 10)
        interior, flagged = indexing.patch_cover(200, k, stride, dilation, 1, 1)
        monkeypatch.undo()
        assert known and not flagged and interior >= exact, (k, stride, dilation, exact, interior)
