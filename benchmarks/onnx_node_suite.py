"""lipcheck against the ONNX project's own backend test models: every bound checked with onnxruntime.

    python benchmarks/onnx_node_suite.py --json out.json            # all 2,024 models (8-13 minutes, 1 worker)
    python benchmarks/onnx_node_suite.py --filter cast --limit 20   # a few, by name
    python benchmarks/onnx_node_suite.py --sample 50 --seed 0       # a deterministic sample

The node test models are regenerated from ``onnx.backend.test.case.node`` of the installed onnx (as
``python -m onnx.backend.test.cmd_tools generate-data`` writes them) into a temporary folder; the
``simple``, ``pytorch-converted`` and ``pytorch-operator`` models come from the wheel's
``onnx/backend/test/data``. Each model runs in a worker process (a hang or a crash costs one model):

* lipcheck's public API (``analyse``) at the test inputs' shapes classifies it: bounded, not globally
  Lipschitz, refused (the ops or variants without a rule), load error, crash (any other exception).
* every bound is checked against difference quotients ||f(x)-f(y)|| / ||x-y|| measured with
  onnxruntime, an implementation lipcheck does not share: the float inputs taken together are the
  variable, integer and bool inputs stay at the test data's values, all outputs are taken together.
  Pairs: random ones around the test inputs at several radii, far ones, then an adversarial search
  (finite-difference Jacobians and their top singular vectors, line scans at the finest admissible
  separation, gradient-free ascent). A quotient above the bound beyond float rounding makes the model
  **unsound**.
* lipcheck's interpreter runs the test inputs and is compared with the test's expected outputs.

Nothing here imports lipcheck in the parent process: only workers do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import random
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

SHIPPED_KINDS = ("simple", "pytorch-converted", "pytorch-operator")
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: 2.0**-24,
    onnx.TensorProto.DOUBLE: 2.0**-53,
    onnx.TensorProto.FLOAT16: 2.0**-11,
    onnx.TensorProto.BFLOAT16: 2.0**-8,
}
# further float element types: lipcheck is told their shapes, onnxruntime is asked to perturb them where it can
OTHER_FLOAT_TYPES = {
    getattr(onnx.TensorProto, name)
    for name in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0", "FLOAT4E2M1")
    if hasattr(onnx.TensorProto, name)
}
CONTROL_FLOW = {"If", "Loop", "Scan"}


# ---------------------------------------------------------------------------------------------
# The models


@dataclass(frozen=True)
class SuiteCase:
    """One test model: ``name`` is ``kind/test_name``; ``directory`` holds model.onnx and test_data_set_0."""

    name: str
    directory: str


def node_case_names() -> dict[str, Any]:
    """Every node test case of the installed onnx, by suite name (collecting imports onnx's case modules)."""
    import onnx.backend.test.case.node as node_cases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the case modules overflow float8 casts on purpose
        return {f"node/{case.name}": case for case in node_cases.collect_testcases()}


def shipped_cases() -> list[SuiteCase]:
    """The models in the wheel's backend test data, as they ship."""
    data = Path(onnx.__file__).parent / "backend" / "test" / "data"
    cases = []
    for kind in SHIPPED_KINDS:
        for directory in sorted((data / kind).iterdir()):
            if (directory / "model.onnx").is_file():
                cases.append(SuiteCase(f"{kind}/{directory.name}", str(directory)))
    return cases


def write_node_case(case: Any, directory: Path) -> None:
    """model.onnx and test_data_set_0/{input,output}_j.pb, the way onnx's ``generate-data`` writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(case.model.SerializeToString())
    data = directory / "test_data_set_0"
    data.mkdir(exist_ok=True)
    inputs, outputs = case.data_sets[0]
    graph = case.model.graph
    for prefix, values, infos in (("input", inputs, graph.input), ("output", outputs, graph.output)):
        for j, (value, info) in enumerate(zip(values, infos, strict=False)):
            (data / f"{prefix}_{j}.pb").write_bytes(_serialise(value, info))


def _serialise(value: Any, info: onnx.ValueInfoProto) -> bytes:
    if info.type.HasField("sequence_type"):
        return numpy_helper.from_list(value, info.name).SerializeToString()
    if info.type.HasField("optional_type"):
        return numpy_helper.from_optional(value, info.name).SerializeToString()
    if isinstance(value, onnx.TensorProto):
        return value.SerializeToString()
    return numpy_helper.from_array(np.asarray(value), info.name).SerializeToString()


def select(names: Sequence[str], substring: str | None, sample: int | None, seed: int, limit: int | None) -> list[str]:
    """Filter by substring, then a seeded sample (sorted, so the same seed picks the same models), then a limit."""
    chosen = sorted(n for n in names if substring is None or substring in n)
    if sample is not None and sample < len(chosen):
        chosen = sorted(random.Random(seed).sample(chosen, sample))
    return chosen[:limit] if limit is not None else chosen


def materialise(names: Iterable[str], folder: Path) -> list[SuiteCase]:
    """The chosen cases on disk: node cases written into ``folder``, shipped ones where they lie."""
    wanted = list(names)
    shipped = {case.name: case for case in shipped_cases()}
    node = node_case_names() if any(n.startswith("node/") for n in wanted) else {}
    cases = []
    for name in wanted:
        if name in shipped:
            cases.append(shipped[name])
        elif name in node:
            directory = folder / name
            write_node_case(node[name], directory)
            cases.append(SuiteCase(name, str(directory)))
        else:
            raise SystemExit(f"no test model named {name!r}")
    return cases


def all_case_names() -> list[str]:
    return sorted([*node_case_names(), *(case.name for case in shipped_cases())])


# ---------------------------------------------------------------------------------------------
# A model's test data


@dataclass
class TestData:
    """The model with its first data set: inputs and expected outputs by graph input/output name."""

    model: onnx.ModelProto
    inputs: dict[str, Any]
    expected: dict[str, Any]
    input_types: dict[str, int]  # elem type of each tensor input (absent for sequences and optionals)

    @property
    def float_inputs(self) -> list[str]:
        """The inputs that are directions of the Lipschitz constant: floating-point tensors."""
        floats = set(FLOAT_TYPES) | OTHER_FLOAT_TYPES
        return [name for name, elem in self.input_types.items() if elem in floats]

    def shape_specs(self) -> list[str]:
        """``name=d1,..`` for each float input lipcheck can be told about (rank >= 1, no empty axis)."""
        specs = []
        for name in self.float_inputs:
            shape = np.shape(self.inputs[name])
            if shape and all(d > 0 for d in shape):
                specs.append(f"{name}={','.join(str(d) for d in shape)}")
        return specs


def load_test_data(directory: Path) -> TestData:
    """Read model.onnx and test_data_set_0 the way onnx's backend runner pairs files with graph inputs."""
    model = onnx.load(str(directory / "model.onnx"))
    data = directory / "test_data_set_0"
    inputs = _read_values(data, "input", model.graph.input)
    expected = _read_values(data, "output", model.graph.output)
    types = {
        info.name: info.type.tensor_type.elem_type
        for info in model.graph.input
        if info.name in inputs and info.type.HasField("tensor_type")
    }
    return TestData(model, inputs, expected, types)


def _read_values(data: Path, prefix: str, infos: Sequence[onnx.ValueInfoProto]) -> dict[str, Any]:
    values = {}
    for j, info in enumerate(infos):
        path = data / f"{prefix}_{j}.pb"
        if not path.is_file():
            break  # later graph inputs are initializers (older exporters list weights as inputs)
        values[info.name] = _parse_value(path.read_bytes(), info)
    return values


def _parse_value(raw: bytes, info: onnx.ValueInfoProto) -> Any:
    if info.type.HasField("sequence_type"):
        proto = onnx.SequenceProto()
        proto.ParseFromString(raw)
        return numpy_helper.to_list(proto)
    if info.type.HasField("optional_type"):
        proto = onnx.OptionalProto()
        proto.ParseFromString(raw)
        return numpy_helper.to_optional(proto)
    proto = onnx.TensorProto()
    proto.ParseFromString(raw)
    return numpy_helper.to_array(proto)


def graph_ops(graph: onnx.GraphProto) -> set[str]:
    """Op types of a graph and of every subgraph it holds (If branches, Loop and Scan bodies)."""
    ops: set[str] = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                ops |= graph_ops(sub)
    return ops


# ---------------------------------------------------------------------------------------------
# The model through onnxruntime, as a map from the float inputs taken together to all outputs

NATIVE_TYPES = {
    getattr(onnx.TensorProto, name)
    for name in (
        "FLOAT",
        "DOUBLE",
        "FLOAT16",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "BOOL",
    )
}
WRAPPED = "__node_suite"


class Unmeasurable(Exception):
    """The model cannot be measured with onnxruntime (the message says why); not a finding about lipcheck."""


def boundary_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose inputs and outputs of types numpy cannot hold (bfloat16, float8, int4, ...) are float32.

    The casts are exact: every such value is a float32, and inputs are fed already rounded to their type.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    front = []
    for info in graph.input:
        elem = info.type.tensor_type.elem_type if info.type.HasField("tensor_type") else None
        if elem is not None and elem not in NATIVE_TYPES and elem != onnx.TensorProto.STRING:
            original = info.name
            info.name = f"{original}{WRAPPED}"
            info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            front.append(onnx.helper.make_node("Cast", [info.name], [original], to=elem))
    for info in graph.output:
        elem = info.type.tensor_type.elem_type if info.type.HasField("tensor_type") else None
        if elem is not None and elem not in NATIVE_TYPES and elem != onnx.TensorProto.STRING:
            original = info.name
            info.name = f"{original}{WRAPPED}"
            info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            graph.node.append(onnx.helper.make_node("Cast", [original], [info.name], to=onnx.TensorProto.FLOAT))
    nodes = [*front, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _np_dtype(elem: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))


class Evaluation(NamedTuple):
    """f at one point: every output flattened together (float64), and the outputs' shapes."""

    values: np.ndarray
    shapes: tuple[tuple[int, ...], ...]


class Probe:
    """f: R^n -> R^m through onnxruntime. x is the float inputs flattened and concatenated (in float64);
    the other inputs stay at the test data's values; f(x) is every output flattened and concatenated."""

    def __init__(self, data: TestData):
        import onnxruntime as ort

        self._check_kinds(data)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 4  # a pair onnxruntime refuses is counted, not logged
        self.converted = False  # opset < 7 (onnxruntime's oldest) converted by onnx's version converter
        try:
            self.session = ort.InferenceSession(
                boundary_casts(data.model).SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            self.session = self._converted_session(data.model, options, exc)
        self.feed_names = {i.name.removesuffix(WRAPPED): i.name for i in self.session.get_inputs()}
        self.names = data.float_inputs
        self.dtypes = [_np_dtype(data.input_types[name]) for name in self.names]
        # inputs behind a boundary cast are fed as float32 (holding values already rounded to their type)
        self.feed_dtypes = [
            np.dtype(np.float32) if self.feed_names[name] != name else dtype
            for name, dtype in zip(self.names, self.dtypes, strict=True)
        ]
        self.shapes = [np.shape(data.inputs[name]) for name in self.names]
        self.sizes = [int(np.prod(shape)) for shape in self.shapes]
        self.n = sum(self.sizes)
        self.fixed = {
            self.feed_names[k]: self._feedable(v, data.input_types.get(k))
            for k, v in data.inputs.items()
            if k not in self.names and k in self.feed_names
        }
        self.unit = self._unit_roundoff(data)
        self.x0 = self.round(
            np.concatenate([np.asarray(data.inputs[k], np.float64).ravel() for k in self.names] or [np.zeros(0)])
        )
        self.runs = 0
        self.m = 0  # output size, set once the test inputs have run
        # output shapes -> which entries of the flattened outputs come from float outputs
        self.float_masks: dict[tuple[tuple[int, ...], ...], np.ndarray] = {}
        floats = set(FLOAT_TYPES) | OTHER_FLOAT_TYPES
        self.output_is_float = [o.type.tensor_type.elem_type in floats for o in data.model.graph.output]

    def _converted_session(self, model: onnx.ModelProto, options: Any, error: Exception) -> Any:
        """Old exporters' opset-6 models, through ``onnx.version_converter`` (checked against the expected
        outputs in ``measure``); any other model onnxruntime cannot load is unmeasurable."""
        import onnxruntime as ort

        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is None or opset >= 7:
            raise Unmeasurable(f"onnxruntime cannot load it: {_short(error)}")
        try:
            converted = onnx.version_converter.convert_version(model, 7)
            session = ort.InferenceSession(
                boundary_casts(converted).SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise Unmeasurable(f"onnxruntime cannot load it, nor its opset-7 conversion: {_short(exc)}") from None
        self.converted = True
        return session

    @staticmethod
    def _check_kinds(data: TestData) -> None:
        infos = [i for i in data.model.graph.input if i.name in data.inputs] + list(data.model.graph.output)
        for info in infos:
            if not info.type.HasField("tensor_type"):
                raise Unmeasurable(f"{info.name!r} is a sequence, map or optional, not a tensor")
            if info.type.tensor_type.elem_type == onnx.TensorProto.STRING:
                raise Unmeasurable(f"{info.name!r} holds strings")
        if not data.float_inputs:
            raise Unmeasurable("no float input: nothing to perturb")
        if all(np.size(data.inputs[name]) == 0 for name in data.float_inputs):
            raise Unmeasurable("the float inputs are empty: nothing to perturb")

    @staticmethod
    def _feedable(value: Any, elem: int | None) -> np.ndarray:
        array = np.asarray(value)
        return array.astype(np.float32) if elem is not None and elem not in NATIVE_TYPES else array

    @staticmethod
    def _unit_roundoff(data: TestData) -> float:
        """The coarsest float precision (16 bits or more) the model computes in: inputs, outputs, cast targets.

        Float8 and float4 are left out on purpose: rounding to them is the quantisation under test.
        """
        elems = [info.type.tensor_type.elem_type for info in [*data.model.graph.input, *data.model.graph.output]]
        elems += _cast_targets(data.model.graph)
        return max([FLOAT_TYPES[e] for e in elems if e in FLOAT_TYPES] or [2.0**-24])

    def round(self, x: np.ndarray) -> np.ndarray:
        """x with each input's part rounded to that input's dtype: the values onnxruntime actually sees."""
        parts, start = [], 0
        with np.errstate(all="ignore"):
            for size, dtype in zip(self.sizes, self.dtypes, strict=True):
                parts.append(x[start : start + size].astype(dtype).astype(np.float64))
                start += size
        return np.concatenate(parts) if parts else x

    def __call__(self, x: np.ndarray) -> Evaluation | None:
        """The outputs at an already rounded x; None when onnxruntime refuses it."""
        feeds, start = dict(self.fixed), 0
        for name, size, shape, dtype in zip(self.names, self.sizes, self.shapes, self.feed_dtypes, strict=True):
            feeds[self.feed_names[name]] = x[start : start + size].reshape(shape).astype(dtype)
            start += size
        self.runs += 1
        try:
            with np.errstate(all="ignore"):
                outputs = self.session.run(None, feeds)
        except Exception:
            return None
        shapes = tuple(np.shape(o) for o in outputs)
        if shapes not in self.float_masks:
            self.float_masks[shapes] = np.concatenate(
                [np.full(np.size(o), is_float, bool) for o, is_float in zip(outputs, self.output_is_float, strict=True)]
                or [np.zeros(0, bool)]
            )
        return Evaluation(np.concatenate([np.asarray(o, np.float64).ravel() for o in outputs] or [np.zeros(0)]), shapes)


def _cast_targets(graph: onnx.GraphProto) -> list[int]:
    targets = []
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to":
                targets.append(attr.i)
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                targets += _cast_targets(sub)
    return targets


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


# ---------------------------------------------------------------------------------------------
# Difference quotients: random pairs, far pairs, then an adversarial search

RELATIVE_TOLERANCE = 1e-4  # a quotient above bound * (1 + this) + ABSOLUTE_TOLERANCE is a finding
ABSOLUTE_TOLERANCE = 1e-6
MIN_SEPARATION = 1e-3  # pairs closer than this times max(1, |x|, |y|) are skipped: float32 rounding dominates
ROUNDING_SLACK = 8.0  # |f(x) - f(y)| is reduced by this many units of roundoff of the sizes in Search._slack
RADII = (1.1e-3, 1e-1, 1.0, 10.0)  # around the test inputs, relative to max(1, |x0|)
FAR_SCALES = (1.0, 10.0, 100.0)
BLOCK_FACTORS = (0.5, 2.0, 4.0, -1.0)  # one input at a time scaled by these, the others at the test values
FULL_JACOBIAN = 1024  # inputs up to this size get a full finite-difference Jacobian, larger ones a random block
JACOBIAN_ENTRIES = 20_000_000
BLOCK = 48
ASCENT_STEPS = 80


@dataclass
class Pair:
    """The pair (centre - half * direction, centre + half * direction); direction has norm 1."""

    centre: np.ndarray
    direction: np.ndarray
    half: float

    @staticmethod
    def between(x: np.ndarray, y: np.ndarray) -> Pair:
        gap = float(np.linalg.norm(y - x))
        return Pair((x + y) / 2, (y - x) / gap if gap > 0 else y - x, gap / 2)


@dataclass
class Search:
    """The largest difference quotients of one model found within a budget of runs and seconds."""

    probe: Probe
    bound: float
    rng: np.random.Generator
    deadline: float
    max_runs: int
    worst: float = 0.0  # the largest quotient among pairs far enough apart
    evidence: float = 0.0  # the largest quotient once float rounding's share of |f(x) - f(y)| is taken away
    evidence_float: float = 0.0  # the same over the float outputs alone (integer outputs left out)
    best: Pair | None = None
    best_stage: str = ""
    best_separation: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    pairs: int = 0
    too_close: int = 0
    failed: int = 0
    nonfinite: int = 0
    stage: str = ""

    @property
    def scale(self) -> float:
        return max(1.0, float(np.linalg.norm(self.probe.x0)))

    def exhausted(self) -> bool:
        return self.probe.runs >= self.max_runs or time.monotonic() > self.deadline

    def difference(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float] | None:
        """f(y) - f(x), |y - x| and the evidence quotient, for the pair as rounded; None when it proves nothing."""
        x, y = self.probe.round(x), self.probe.round(y)
        if not self.apart(x, y):
            return None
        return self.compare(x, self.value(x), y, self.value(y))

    def apart(self, x: np.ndarray, y: np.ndarray) -> bool:
        """Finite and far enough apart that float32 rounding of the inputs cannot make the quotient."""
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            self.nonfinite += 1
            return False
        if np.linalg.norm(y - x) < MIN_SEPARATION * max(1.0, float(np.linalg.norm(x)), float(np.linalg.norm(y))):
            self.too_close += 1
            return False
        return True

    def value(self, x: np.ndarray) -> Evaluation | None:
        """f at an already rounded x (None when onnxruntime refuses it)."""
        return self.probe(x)

    def compare(
        self, x: np.ndarray, fx: Evaluation | None, y: np.ndarray, fy: Evaluation | None
    ) -> tuple[np.ndarray, float, float] | None:
        """Record the pair whose values are known (checked by ``apart`` already). Outputs whose shapes moved
        with the input (Resize with a variable scales) are not compared: f(x) - f(y) means nothing there."""
        if fx is None or fy is None or fx.shapes != fy.shapes:
            self.failed += 1
            return None
        if not (np.isfinite(fx.values).all() and np.isfinite(fy.values).all()):
            self.nonfinite += 1
            return None
        gap = float(np.linalg.norm(y - x))
        mask = self.probe.float_masks[fx.shapes]
        return fy.values - fx.values, gap, self._record(x, y, fx.values, fy.values, gap, mask)

    def _slack(self, x: np.ndarray, y: np.ndarray, fx: np.ndarray, fy: np.ndarray) -> float:
        """What float evaluation may add to |f(x) - f(y)|: a few units of roundoff of the outputs, of the bound
        times the inputs, and of intermediates of size 1 (exp(x) - 1 near 0 is off by u, not by u |f(x)|)."""
        size = (
            np.linalg.norm(fx)
            + np.linalg.norm(fy)
            + self.bound * (np.linalg.norm(x) + np.linalg.norm(y))
            + 2 * math.sqrt(fx.size)
        )
        return ROUNDING_SLACK * self.probe.unit * float(size)

    def _record(
        self, x: np.ndarray, y: np.ndarray, fx: np.ndarray, fy: np.ndarray, gap: float, floats: np.ndarray
    ) -> float:
        """Keep the worst pair; returns its evidence quotient (the part rounding cannot explain).
        ``floats`` masks the entries of float outputs, for the quotient over them alone."""
        change = float(np.linalg.norm(fy - fx))
        slack = self._slack(x, y, fx, fy)
        quotient, evidence = change / gap, (change - slack) / gap
        self.evidence_float = max(self.evidence_float, (float(np.linalg.norm(fy[floats] - fx[floats])) - slack) / gap)
        self.pairs += 1
        self.worst = max(self.worst, quotient)
        self.stages[self.stage] = max(self.stages.get(self.stage, -math.inf), evidence)
        if self.best is None or evidence > self.evidence:
            self.evidence, self.best, self.best_stage = evidence, Pair.between(x, y), self.stage
            self.best_separation = gap
        return evidence

    def quotient(self, pair: Pair) -> float:
        """The evidence quotient of one pair (-inf when it proves nothing)."""
        result = self.difference(pair.centre - pair.half * pair.direction, pair.centre + pair.half * pair.direction)
        return -math.inf if result is None else result[2]

    def unit(self, size: int | None = None) -> np.ndarray:
        vector = self.rng.standard_normal(self.probe.n if size is None else size)
        return vector / max(float(np.linalg.norm(vector)), 1e-300)

    def directions(self) -> list[np.ndarray]:
        """Random directions of several kinds: dense, signs, one input at a time, one coordinate."""
        n = self.probe.n
        found = [self.unit(), self.unit(), self.rng.choice([-1.0, 1.0], n) / math.sqrt(n)]
        start = 0
        for size in self.probe.sizes:
            if len(self.probe.sizes) > 1:
                block = np.zeros(n)
                block[start : start + size] = self.unit(size)
                found.append(block)
            start += size
        found.append(np.eye(1, n, int(self.rng.integers(n)))[0])
        return found


def around(search: Search, centre: np.ndarray, radii: Sequence[float] = RADII) -> None:
    """Pairs with one end at the centre and pairs symmetric about it, at each radius relative to max(1, |centre|)."""
    scale = max(1.0, float(np.linalg.norm(centre)))
    for radius in radii:
        for direction in search.directions():
            if search.exhausted():
                return
            half = radius * scale / 2
            search.quotient(Pair(centre + half * direction, direction, half))
            search.quotient(Pair(centre, direction, half))


def far(search: Search) -> None:
    """Independent random points at growing scales, pairs through and around the origin, and pairs around the
    test inputs with one input scaled (the model may be steeper at another value of a parameter input)."""
    x0, scale = search.probe.x0, search.scale
    for k in FAR_SCALES:
        p, q = search.unit() * k * scale, search.unit() * k * scale
        for x, y in ((p, q), (np.zeros_like(p), p), (x0, x0 + p)):
            if not search.exhausted():
                search.quotient(Pair.between(x, y))
    around(search, np.zeros_like(x0), RADII[:2])  # many activations are steepest at 0
    around(search, search.unit() * 10 * scale, RADII[:2])
    if len(search.probe.sizes) > 1:  # one input at other values: a parameter input (Resize's scales) moves
        start = 0
        for size in search.probe.sizes:
            for factor in BLOCK_FACTORS:
                centre = x0.copy()
                centre[start : start + size] *= factor
                around(search, centre, RADII[:2])
            start += size


def jacobian_direction(search: Search, centre: np.ndarray, half: float) -> np.ndarray | None:
    """Top right singular vector of the finite-difference Jacobian at ``centre`` (central steps 2 * half).

    Small inputs get every coordinate; larger ones a random block that holds the best direction so far.
    Every column is itself a pair, recorded like any other.
    """
    n, m = search.probe.n, search.probe.m
    basis = None
    if n > FULL_JACOBIAN or n * m > JACOBIAN_ENTRIES:
        k = max(4, min(BLOCK, JACOBIAN_ENTRIES // max(m, 1), n))
        block = search.rng.standard_normal((n, k))
        if search.best is not None:
            block[:, 0] = search.best.direction
        basis = np.linalg.qr(block)[0]
    columns = []
    for j in range(n if basis is None else basis.shape[1]):
        if search.exhausted():
            break
        v = np.eye(1, n, j)[0] if basis is None else basis[:, j]
        result = search.difference(centre - half * v, centre + half * v)
        usable = result is not None and result[0].size == m  # the output's shape can move with the input
        columns.append(result[0] / result[1] if usable else np.zeros(m))
    if not columns or not np.any(columns):
        return None
    top = np.linalg.svd(np.stack(columns, axis=1), full_matrices=False)[2][0]
    direction = top if basis is None else basis[:, : len(top)] @ top
    if basis is None and len(top) < n:
        direction = np.concatenate([top, np.zeros(n - len(top))])
    return direction / np.linalg.norm(direction)


def jacobian_stage(search: Search, centre: np.ndarray, halves: Sequence[float]) -> None:
    """Pairs along the Jacobian's top singular vector, at the step it was measured with and longer ones."""
    for half in halves:
        if search.exhausted():
            return
        direction = jacobian_direction(search, centre, half)
        if direction is not None:
            for stretch in (1.0, 3.0, 10.0, 100.0):
                search.quotient(Pair(centre, direction, half * stretch))


LINE_POINTS = 400
LINE_STRIDES = (1, 2, 4, 16, 64)


def line_scan(search: Search, base: np.ndarray, direction: np.ndarray) -> None:
    """f on a grid along base + t * direction as fine as a pair may be: neighbours are the closest pairs that
    count, so a jump anywhere in the window (a quantisation step, a rounding switch) is one large quotient."""
    step = 1.02 * MIN_SEPARATION * max(1.0, float(np.linalg.norm(base)) * 1.01 + 1.0)
    if step * LINE_POINTS > 0.01 * max(1.0, float(np.linalg.norm(base))):
        step = 1.02 * MIN_SEPARATION * max(1.0, float(np.linalg.norm(base)) + step * LINE_POINTS)
    points, values = [], []
    for k in range(LINE_POINTS):
        if search.exhausted():
            break
        x = search.probe.round(base + (k - LINE_POINTS // 2) * step * direction)
        points.append(x)
        values.append(search.value(x) if np.isfinite(x).all() else None)
    for stride in LINE_STRIDES:
        for k in range(len(points) - stride):
            if time.monotonic() > search.deadline:
                return
            if search.apart(points[k], points[k + stride]):
                search.compare(points[k], values[k], points[k + stride], values[k + stride])


def line_stage(search: Search) -> None:
    """Lines through the test inputs along the best direction and along a coordinate of each input (a
    parameter input such as Resize's scales jumps only along its own axes), then lines along coordinates
    through points of norm 0 and up to 1, where a pair may be closest."""
    x0, n = search.probe.x0, search.probe.n
    lines = []
    if search.best is not None:
        lines += [(x0, search.best.direction), (search.best.centre, search.best.direction)]
    start = 0
    for size in search.probe.sizes:
        if size:
            lines.append((x0, np.eye(1, n, start + int(search.rng.integers(size)))[0]))
        start += size
    for _ in range(3):
        axis = np.eye(1, n, int(search.rng.integers(n)))[0]
        lines += [(axis * float(search.rng.uniform(0.3, 1.0)), axis), (np.zeros(n), axis)]
    lines.append((search.unit(), search.unit()))
    for base, direction in lines:
        if search.exhausted():
            return
        line_scan(search, base, direction)


def _floor_half(centre: np.ndarray, half: float) -> float:
    """The smallest half-separation that keeps a pair about ``centre`` far enough apart to count."""
    return 0.51 * MIN_SEPARATION * max(1.0, float(np.linalg.norm(centre)) + half) * 1.02


def ascent(search: Search, steps: int) -> None:
    """(1+1) evolution strategy on the best pair: move its centre, turn its direction, stretch its separation."""
    if search.best is None:
        return
    pair, value, sigma = search.best, search.evidence, 0.3
    for _ in range(steps):
        if search.exhausted():
            return
        move = search.rng.integers(1, 8)  # which of centre (1), direction (2), separation (4) to change
        direction = pair.direction + sigma * search.unit() if move & 2 else pair.direction
        direction = direction / max(float(np.linalg.norm(direction)), 1e-300)
        reach = max(pair.half, 1e-2 * max(1.0, float(np.linalg.norm(pair.centre))))
        centre = pair.centre + sigma * reach * search.unit() if move & 1 else pair.centre
        half = pair.half * math.exp(sigma * search.rng.standard_normal()) if move & 4 else pair.half
        candidate = Pair(centre, direction, max(half, _floor_half(centre, half)))
        score = search.quotient(candidate)
        if score > value:
            pair, value, sigma = candidate, score, min(sigma * 1.5, 2.0)
        else:
            sigma = max(sigma * 0.85, 1e-3)


def search_quotients(search: Search) -> None:
    """The stages in order; each records into ``search`` and stops when its budget is spent."""
    x0, scale = search.probe.x0, search.scale
    stages = (
        ("around", lambda: around(search, x0)),
        ("far", lambda: far(search)),
        ("jacobian", lambda: jacobian_stage(search, x0, (0.6e-3 * scale, 0.05 * scale))),
        ("lines", lambda: line_stage(search)),
        ("ascent", lambda: ascent(search, ASCENT_STEPS)),
        ("refine", lambda: _refine(search)),
    )
    for name, run in stages:
        if search.exhausted():
            return
        search.stage = name
        run()


def _refine(search: Search) -> None:
    """Power step at the best pair found: the Jacobian there, then a shorter ascent."""
    if search.best is not None:
        best = search.best
        jacobian_stage(search, best.centre, (max(best.half, _floor_half(best.centre, best.half)),))
        ascent(search, ASCENT_STEPS // 2)


def measure(data: TestData, bound: float, seconds: float, max_runs: int, seed: int = 0) -> dict[str, Any]:
    """Difference quotients of the model through onnxruntime against lipcheck's bound."""
    try:
        probe = Probe(data)
        agrees = agrees_with_expected(probe, data)
        if probe.converted and not agrees:
            raise Unmeasurable("its opset-7 conversion disagrees with the expected outputs")
        start = finite_start(probe, np.random.default_rng(seed))
    except Unmeasurable as exc:
        return {"status": "unmeasurable", "reason": str(exc)}
    except NonFinite as exc:
        return {"status": "nonfinite", "reason": str(exc)}
    first, again = probe(probe.x0), probe(probe.x0)
    assert first is not None  # finite_start ran it
    probe.m = first.values.size
    search = Search(probe, bound, np.random.default_rng(seed), time.monotonic() + seconds, max_runs)
    search_quotients(search)
    limit = bound * (1 + RELATIVE_TOLERANCE) + ABSOLUTE_TOLERANCE
    return {
        "status": "measured",
        "unsound": bool(search.evidence > limit),
        "unsound_float_outputs": bool(search.evidence_float > limit),
        "worst_quotient": search.worst,
        "evidence": search.evidence,
        "evidence_float_outputs": search.evidence_float,
        "ratio": search.evidence / bound if bound > 0 else None,
        "found_by": search.best_stage,
        "separation": search.best_separation,
        "centre_norm": float(np.linalg.norm(search.best.centre)) if search.best is not None else None,
        "start": start,
        "onnxruntime_agrees": agrees,  # with the test's expected outputs at the test inputs
        "opset_converted": probe.converted,
        "input_norm": float(np.linalg.norm(probe.x0)),
        "by_stage": search.stages,
        "pairs": search.pairs,
        "runs": probe.runs,
        "too_close": search.too_close,
        "failed": search.failed,
        "nonfinite": search.nonfinite,
        "nondeterministic": again is None or not np.array_equal(first.values, again.values, equal_nan=True),
        "unit_roundoff": probe.unit,
        "inputs": probe.n,
        "outputs": probe.m,
    }


def agrees_with_expected(probe: Probe, data: TestData) -> bool:
    """onnxruntime's outputs at the test inputs match the test's expected outputs (the parity tolerances)."""
    result = probe(probe.x0)
    if result is None:
        raise Unmeasurable("onnxruntime fails on the test inputs")
    start = 0
    for shape, want in zip(result.shapes, data.expected.values(), strict=False):
        size = int(np.prod(shape))
        got, start = result.values[start : start + size].reshape(shape), start + size
        if not isinstance(want, np.ndarray) or want.dtype.kind not in "fciub":
            continue
        rtol, atol = tolerances(want)
        if got.shape != want.shape or not np.allclose(got, want.astype(np.float64), rtol, atol, equal_nan=True):
            return False
    return True


class NonFinite(Exception):
    """No finite starting point: the outputs stay NaN or infinite."""


def finite_start(probe: Probe, rng: np.random.Generator) -> str:
    """Move ``probe.x0`` to a point with finite outputs: the test inputs, else with their non-finite entries
    set to 0 (cast tests feed NaN and infinities on purpose), else a standard normal point."""
    outputs = probe(probe.x0)
    if outputs is None:
        raise Unmeasurable("onnxruntime fails on the test inputs")
    if np.isfinite(outputs.values).all():
        return "test inputs"
    candidates = (
        ("test inputs, non-finite entries set to 0", np.where(np.isfinite(probe.x0), probe.x0, 0.0)),
        ("test inputs, entries clipped to [-1, 1]", np.clip(np.nan_to_num(probe.x0), -1, 1)),
        ("a standard normal point", rng.standard_normal(probe.n)),
    )
    for label, x in candidates:
        x = probe.round(x)
        outputs = probe(x)
        if outputs is not None and np.isfinite(x).all() and np.isfinite(outputs.values).all():
            probe.x0 = x
            return label
    raise NonFinite("outputs are not finite at the test inputs nor near them")


# ---------------------------------------------------------------------------------------------
# What a model holds that issue 14's mechanisms need: used to group unsound results

PARAMETER_SLOTS = {  # op -> input positions that are parameters of the map, not data flowing through it
    "Pad": {1, 2, 3},
    "Resize": {1, 2, 3},
    "Upsample": {1},
    "Slice": {1, 2, 3, 4},
    "Clip": {1, 2},
    "TopK": {1},
    "Tile": {1},
    "Expand": {1},
    "Reshape": {1},
    "Squeeze": {1},
    "Unsqueeze": {1},
    "Split": {1},
    "CumSum": {1},
    "OneHot": {1, 2},
    "CenterCropPad": {1},
    "Dropout": {1, 2},
    "GridSample": {1},
    "ReduceMean": {1},
    "ReduceSum": {1},
    "ReduceMax": {1},
    "ReduceMin": {1},
    "ReduceProd": {1},
    "ReduceL1": {1},
    "ReduceL2": {1},
    "ReduceLogSum": {1},
    "ReduceLogSumExp": {1},
    "ReduceSumSquare": {1},
}


def model_features(data: TestData) -> list[str]:
    """Which of issue 14's mechanisms a model could exercise (several may hold; the summary takes the first)."""
    graph = data.model.graph
    variable = set(data.inputs)
    features = []
    ops = graph_ops(graph)
    if ops & CONTROL_FLOW:
        features.append("control flow")
    if any(n.op_type == "Dropout" and len(n.input) > 2 and n.input[2] and _true(graph, n.input[2]) for n in graph.node):
        features.append("dropout training")
    if _quantising_casts(graph, data):
        features.append("quantising cast")
    if any(
        i in PARAMETER_SLOTS.get(n.op_type, ()) and name in variable
        for n in graph.node
        for i, name in enumerate(n.input)
    ):
        features.append("parameter input")
    floats = set(FLOAT_TYPES) | OTHER_FLOAT_TYPES
    if any(o.type.tensor_type.elem_type not in floats for o in graph.output if o.type.HasField("tensor_type")):
        features.append("integer output")
    if any(elem not in floats for elem in data.input_types.values()):
        features.append("integer input")
    return features


def _true(graph: onnx.GraphProto, name: str) -> bool:
    """A value that is a graph input (a caller may pass true) or a constant true."""
    if name in {i.name for i in graph.input}:
        return True
    for init in graph.initializer:
        if init.name == name:
            return bool(numpy_helper.to_array(init).any())
    return any(n.op_type == "Constant" and name in n.output for n in graph.node)


def _quantising_casts(graph: onnx.GraphProto, data: TestData) -> bool:
    """A Cast to a non-float (or float8/float4) type, or a CastLike whose target type is such or is an input."""
    for node in graph.node:
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None and to not in FLOAT_TYPES:
                return True
        if node.op_type == "CastLike" and len(node.input) > 1:
            like = data.input_types.get(node.input[1])
            if node.input[1] in data.inputs or (like is not None and like not in FLOAT_TYPES):
                return True
    return False


MECHANISMS = (
    "control flow",
    "dropout training",
    "quantising cast",
    "parameter input",
    "integer output",
    "integer input",
)


def mechanism(record: dict[str, Any]) -> str:
    """The first of issue 14's mechanisms the model exhibits, else 'other' (read the record to be sure)."""
    features = record.get("features", [])
    if record.get("measurement", {}).get("nondeterministic"):
        return "dropout training" if "dropout training" in features else "nondeterministic"
    return next((m for m in MECHANISMS if m in features), "other")


# ---------------------------------------------------------------------------------------------
# lipcheck's side: the verdict through the public API, and its interpreter against the expected outputs


def classify(path: Path, specs: list[str]) -> dict[str, Any]:
    """bounded / unbounded / refused / load_error / crash, with what each needs said."""
    from lipcheck.errors import LipcheckError, UnsupportedOpsError
    from lipcheck.pipeline import analyse

    try:
        report = analyse(path, input_shapes=specs, device="cpu", method="best")
    except UnsupportedOpsError as exc:
        return {"status": "refused", "refused": {op: list(names) for op, names in exc.ops.items()}}
    except LipcheckError as exc:
        return {"status": "load_error", "error": type(exc).__name__, "message": _short(exc)}
    except Exception as exc:
        return {"status": "crash", **_exception(exc)}
    layers = [
        {"name": layer.name, "op": layer.op, "lipschitz": _finite(layer.lipschitz), "method": layer.method}
        for layer in report.layers
    ]
    if not report.bounded:
        reasons = [{"node": r.node, "op": r.op, "reason": r.reason} for r in report.unbounded_reasons]
        return {"status": "unbounded", "reasons": reasons, "layers": layers}
    return {
        "status": "bounded",
        "bound": report.upper_bound,
        "certified": report.certified,
        "bound_method": report.bound_method,
        "layers": layers,
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _exception(exc: BaseException) -> dict[str, Any]:
    frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"error": type(exc).__name__, "message": _short(exc), "traceback": "".join(frames[-3:])[-1500:]}


def tolerances(expected: np.ndarray) -> tuple[float, float]:
    """rtol, atol for comparing a float64 interpreter with the reference outputs of this dtype."""
    if expected.dtype.kind not in "fc":
        return 0.0, 0.0
    unit = {2: 2.0**-8 if expected.dtype != np.float16 else 2.0**-11, 1: 2.0**-3}.get(expected.dtype.itemsize, 0.0)
    return max(1e-3, 4 * unit), max(1e-5, 4 * unit)


def parity(path: Path, data: TestData, specs: list[str]) -> dict[str, Any]:
    """lipcheck's interpreter on the test inputs against the expected outputs (float32 tolerances)."""
    from lipcheck.errors import LipcheckError
    from lipcheck.frontends import load_graph
    from lipcheck.interpret import UninterpretableOpsError, interpret

    try:
        graph = load_graph(path, specs)
        function = interpret(graph)
    except UninterpretableOpsError as exc:
        return {"status": "uninterpretable", "ops": sorted(exc.ops)}
    except LipcheckError as exc:
        return {"status": "refused", "error": type(exc).__name__, "message": _short(exc)}
    except Exception as exc:
        return {"status": "crash", **_exception(exc)}
    try:
        values = function.run({name: data.inputs[name] for name in graph.inputs if name in data.inputs})
    except LipcheckError as exc:
        return {"status": "error", "error": type(exc).__name__, "message": _short(exc)}
    except Exception as exc:
        return {"status": "crash", **_exception(exc)}
    return compare(values, data.expected)


def compare(values: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    """Worst absolute and relative error over the outputs; 'mismatch' beyond the dtype's tolerances."""
    worst: dict[str, Any] = {"status": "ok", "max_abs": 0.0, "max_rel": 0.0}
    for name, want in expected.items():
        if not isinstance(want, np.ndarray) or want.dtype.kind not in "fciub" or name not in values:
            continue
        got = np.asarray(values[name].detach().cpu().numpy() if hasattr(values[name], "detach") else values[name])
        if got.shape != want.shape:
            return {"status": "mismatch", "output": name, "message": f"shape {list(got.shape)} != {list(want.shape)}"}
        got, ref = got.astype(np.float64), want.astype(np.float64)
        rtol, atol = tolerances(want)
        with np.errstate(all="ignore"):
            error = np.where(np.isclose(got, ref, rtol=0, atol=0, equal_nan=True), 0.0, np.abs(got - ref))
            error = np.nan_to_num(error, nan=np.inf)
            relative = error / np.maximum(np.abs(ref), 1e-12)
        if error.size and float(error.max()) >= worst["max_abs"]:
            worst.update(max_abs=float(error.max()), max_rel=float(relative.max()), output=name)
        if not np.all(error <= atol + rtol * np.abs(np.nan_to_num(ref))):
            worst["status"] = "mismatch"
    return worst


# ---------------------------------------------------------------------------------------------
# One model, in a worker


@dataclass(frozen=True)
class Settings:
    """What each model gets: seconds and onnxruntime runs for the quotient search, and the parity check."""

    search_seconds: float = 20.0
    max_runs: int = 8000
    parity: bool = True
    seed: int = 0


def evaluate(case: SuiteCase, settings: Settings) -> dict[str, Any]:
    """The full record of one model: verdict, measurement when bounded, interpreter parity."""
    started = time.perf_counter()
    record: dict[str, Any] = {"name": case.name}
    directory = Path(case.directory)
    try:
        data = load_test_data(directory)
    except Exception as exc:
        return {**record, "status": "load_error", "error": "test data", "message": _short(exc)}
    specs = data.shape_specs()
    record.update(
        ops=sorted(graph_ops(data.model.graph)),
        input_shapes=specs,
        features=model_features(data),
        fixed_inputs=[n for n in data.inputs if n not in data.float_inputs],
    )
    record.update(classify(directory / "model.onnx", specs))
    record["analyse_seconds"] = round(time.perf_counter() - started, 3)
    if record["status"] == "bounded":
        record["measurement"] = measure(
            data, record["bound"], settings.search_seconds, settings.max_runs, settings.seed
        )
    if settings.parity:
        record["parity"] = parity(directory / "model.onnx", data, specs)
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def _worker(connection: Connection, settings: Settings) -> None:
    """A worker process: lipcheck and torch imported once, one thread, cases in and records out."""
    import onnxruntime
    import torch

    import lipcheck.pipeline  # noqa: F401  (imported before 'ready', so no case pays for it)

    torch.set_num_threads(1)
    onnxruntime.set_default_logger_severity(4)  # a pair onnxruntime refuses is counted, not logged
    warnings.simplefilter("ignore")
    connection.send("ready")
    while True:
        case = connection.recv()
        if case is None:
            return
        try:
            record = evaluate(case, settings)
        except Exception as exc:  # the harness's own failure: reported as such, never as lipcheck's
            record = {"name": case.name, "status": "harness_error", **_exception(exc)}
        connection.send(record)


class Worker:
    """One worker process and its pipe; killed and replaced when a model overruns its time."""

    def __init__(self, settings: Settings):
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, settings), daemon=True)
        self.process.start()
        child.close()
        if not self.connection.poll(300) or self.connection.recv() != "ready":
            self.kill()
            raise RuntimeError("a suite worker did not start")
        self.case: SuiteCase | None = None
        self.started = 0.0

    def submit(self, case: SuiteCase) -> None:
        self.case, self.started = case, time.monotonic()
        self.connection.send(case)

    def kill(self) -> None:
        self.process.kill()
        self.process.join()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.send(None)
        self.process.join(10)
        if self.process.is_alive():
            self.kill()


def run_cases(
    cases: Sequence[SuiteCase], settings: Settings, workers: int = 1, timeout: float = 120.0, report: Any = None
) -> list[dict[str, Any]]:
    """Every case through worker processes; a model past ``timeout`` seconds is killed and recorded as such."""
    pending, idle = list(reversed(cases)), [Worker(settings) for _ in range(max(1, workers))]
    busy: list[Worker] = []
    records: dict[str, dict[str, Any]] = {}
    try:
        while pending or busy:
            while idle and pending:
                worker = idle.pop()
                worker.submit(pending.pop())
                busy.append(worker)
            ready = multiprocessing.connection.wait([w.connection for w in busy], timeout=0.5)
            for worker in list(busy):
                record = _collect(worker, ready, timeout)
                if record is None:
                    continue
                busy.remove(worker)
                records[record["name"]] = record
                idle.append(worker if worker.process.is_alive() else Worker(settings))
                if report is not None:
                    report(len(records), len(cases), record)
    finally:
        for worker in idle + busy:
            worker.stop() if worker in idle else worker.kill()
    return [records[case.name] for case in cases]


def _collect(worker: Worker, ready: list[Any], timeout: float) -> dict[str, Any] | None:
    """The worker's record when it has one, a timeout or death record when it has none to give, else None."""
    assert worker.case is not None
    if worker.connection in ready:
        try:
            return worker.connection.recv()
        except (EOFError, OSError):
            worker.kill()
            return {
                "name": worker.case.name,
                "status": "crash",
                "error": "worker died",
                "message": f"exit code {worker.process.exitcode}",
            }
    if time.monotonic() - worker.started > timeout:
        worker.kill()
        return {"name": worker.case.name, "status": "timeout", "message": f"over {timeout:g} s"}
    return None


# ---------------------------------------------------------------------------------------------
# The summary

STATUSES = ("bounded", "unbounded", "refused", "load_error", "crash", "harness_error", "timeout")
PARITY_FAILURES = ("mismatch", "error", "crash")


def refused_ops(records: Iterable[dict[str, Any]]) -> list[tuple[str, int]]:
    """op (or op variant): number of models refused for it, most frequent first."""
    counts = Counter(op for r in records if r["status"] == "refused" for op in r["refused"])
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def unsound(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("measurement", {}).get("unsound")]


def parity_failures(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Models whose interpreter run errs or disagrees, grouped by the model's op types."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record.get("parity", {}).get("status") in PARITY_FAILURES:
            groups[",".join(record.get("ops", [])) or "?"].append(record)
    return dict(sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])))


def summary(records: Sequence[dict[str, Any]]) -> list[str]:
    """The text printed at the end of a run (and pasted into the results file)."""
    lines = _count_lines(records)
    ranked = refused_ops(records)
    lines += ["", f"Refused ops ({len(ranked)} ops or variants; op: models):"]
    lines += [f"  {op}: {count}" for op, count in ranked]
    lines += ["", f"Unsound ({len(unsound(records))}): measured quotient above the certified bound"]
    for name, group in _by_mechanism(unsound(records)).items():
        lines.append(f"  [{name}] {len(group)} models")
        lines += [f"    {_unsound_line(r)}" for r in group]
    crashes = [r for r in records if r["status"] in ("crash", "harness_error", "timeout")]
    lines += ["", f"Crashes, harness errors and timeouts ({len(crashes)}):"]
    lines += [f"  {r['name']}: {r['status']} {r.get('error', '')}: {r.get('message', '')}" for r in crashes]
    lines += ["", *_parity_lines(records)]
    return lines


def _count_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    counts = Counter(r["status"] for r in records)
    measured = Counter(r["measurement"]["status"] for r in records if "measurement" in r)
    lines = [f"Models: {len(records)}"]
    lines += [f"  {status}: {counts[status]}" for status in STATUSES if counts[status]]
    lines.append(
        "  bounded models measured with onnxruntime: " + ", ".join(f"{k} {v}" for k, v in sorted(measured.items()))
    )
    reasons = Counter(
        r["measurement"].get("reason", "")
        for r in records
        if r.get("measurement", {}).get("status") in ("unmeasurable", "nonfinite")
    )
    lines += [f"    not measured: {count} x {reason}" for reason, count in reasons.most_common()]
    return lines


def _by_mechanism(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[mechanism(record)].append(record)
    order = [*MECHANISMS, "nondeterministic", "other"]
    return {name: groups[name] for name in order if groups.get(name)}


def _unsound_line(record: dict[str, Any]) -> str:
    m = record["measurement"]
    ratio = f"{m['ratio']:.3g}x" if m.get("ratio") else "bound 0"
    floats = (
        ""
        if m["evidence_float_outputs"] == m["evidence"]
        else f"; float outputs alone {m['evidence_float_outputs']:.6g}"
    )
    return (
        f"{record['name']}  ops {','.join(record['ops'])}  bound {record['bound']:.6g}  "
        f"quotient {m['evidence']:.6g} ({ratio}, {m['found_by']}{floats})"
    )


def _parity_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    counts = Counter(r["parity"]["status"] for r in records if "parity" in r)
    lines = ["Interpreter parity: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))]
    for ops, group in parity_failures(records).items():
        lines.append(f"  {ops}: {len(group)}")
        for record in group:
            p = record["parity"]
            numbers = p["status"] == "mismatch" and "message" not in p
            detail = (
                f"max abs {p.get('max_abs', 0):.3g}, max rel {p.get('max_rel', 0):.3g}"
                if numbers
                else f"{p.get('error', '')}: {p.get('message', '')}"
            )
            lines.append(f"    {record['name']}: {p['status']} ({detail})")
    return lines


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filter", help="only models whose name (kind/test_name) contains this")
    parser.add_argument("--limit", type=int, help="at most this many models (after --filter and --sample)")
    parser.add_argument("--sample", type=int, help="a deterministic sample of this many models (see --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample and of the quotient search")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per model before it is killed")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (each uses one thread)")
    parser.add_argument(
        "--search-seconds",
        type=float,
        default=Settings.search_seconds,
        help="seconds of quotient search per bounded model",
    )
    parser.add_argument("--max-runs", type=int, default=Settings.max_runs, help="onnxruntime runs per bounded model")
    parser.add_argument("--no-parity", action="store_true", help="skip the interpreter parity check")
    parser.add_argument("--json", type=Path, help="write one record per model to this file")
    parser.add_argument("--list", action="store_true", help="print the selected model names and stop")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser.parse_args(argv)


def _progress(done: int, total: int, record: dict[str, Any]) -> None:
    finding = record.get("measurement", {}).get("unsound") or record["status"] in ("crash", "timeout")
    if finding or done % 50 == 0 or done == total:
        flag = " UNSOUND" if record.get("measurement", {}).get("unsound") else ""
        print(f"[{done}/{total}] {record['name']}: {record['status']}{flag}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    names = select(all_case_names(), args.filter, args.sample, args.seed, args.limit)
    if args.list:
        print("\n".join(names))
        return 0
    settings = Settings(args.search_seconds, args.max_runs, not args.no_parity, args.seed)
    with tempfile.TemporaryDirectory(prefix="onnx_node_suite_") as folder:
        cases = materialise(names, Path(folder))
        records = run_cases(cases, settings, args.workers, args.timeout, None if args.quiet else _progress)
    seconds = time.perf_counter() - started
    print("\n".join(summary(records)))
    print(f"\nWall time: {seconds:.0f} s for {len(records)} models")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"command": " ".join(sys.argv), "seconds": seconds, "records": records}, indent=1, default=_json_default
            )
        )
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
