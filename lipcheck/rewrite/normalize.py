"""``lipcheck normalize`` in bake mode: rescale weights so each layer's certified norm is the target, then prove it.

Spectral normalization's W / sigma(W) * target, with sigma the layer's *certified operator norm* (for a
convolution the operator at its input size, not the reshaped kernel), so that after the rewrite the
certified norm is the target up to rounding. A BatchNorm right after a linear layer is folded into it
first where asked (ONNX always: the node is removed when the layer has a bias to take its shift;
PyTorch with ``fold_bn``: the BatchNorm is set to a pure shift so the architecture and its keys stay).
``lipschitz=K`` gives every selected layer the same norm t, the largest (by a secant search on re-certified
bounds) whose network bound, as ``lipcheck report`` gives it, is <= K.

The result is checked from the written file: re-loaded, re-certified, run against the original.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lipcheck import ops
from lipcheck.compose import Composition
from lipcheck.errors import LipcheckError
from lipcheck.files import StagedModel, check_new_model
from lipcheck.frontends import load_model
from lipcheck.frontends.torch_frontend import TorchOptions, WeightTensors
from lipcheck.graph import Graph, Node
from lipcheck.ops.conv import Conv
from lipcheck.ops.linear import MatMul
from lipcheck.options import Device, InputShape, Settings
from lipcheck.pipeline import certify, resolve_device
from lipcheck.rewrite.sources import OnnxSource, WeightSource, load_runnable, open_source

TOLERANCE = 1e-6  # a normalised layer's re-certified norm may exceed the target by this much (float32 rounding)


@dataclass
class NormalizeOptions:
    target: float = 1.0
    clip: bool = False
    lipschitz: float | None = None
    layers: str | None = None  # fnmatch patterns, comma-separated
    fold_bn: bool = False  # PyTorch files; ONNX always folds
    input_shapes: tuple[str, ...] = ()
    torch_options: TorchOptions = field(default_factory=TorchOptions)
    device: str = "cpu"

    @staticmethod
    def from_settings(
        settings: Settings, target: float, clip: bool, lipschitz: float | None, layers: str | None, fold_bn: bool
    ) -> NormalizeOptions:
        """The options of ``lipcheck normalize``: its own, and the model's (input shapes, --model, device)."""
        return NormalizeOptions(
            target=target,
            clip=clip,
            lipschitz=lipschitz,
            layers=layers,
            fold_bn=fold_bn,
            input_shapes=tuple(settings.input_shape),
            torch_options=TorchOptions(settings.model, settings.model_kwargs, settings.trust_pickle),
            device=str(resolve_device(Device(settings.device).value)),
        )


@dataclass
class LayerChange:
    name: str
    op: str
    weight: str  # the source tensor scaled
    norm_before: float
    factor: float = 1.0
    norm_after: float | None = None
    folded_bn: str | None = None
    note: str = ""


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class NormalizeResult:
    model: str
    format: str
    layers: list[LayerChange]
    skipped: list[tuple[str, str]]  # (layer, why it was left alone)
    bound_before: float | None
    bound_after: float | None = None
    budget_note: str = ""
    output_change: float | None = None
    checks: list[Check] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


@dataclass
class _Layer:
    node: Node
    weight_value: str  # graph constant
    source_name: str  # source tensor (the same, or what it is derived from by shape-only ops)
    direct: bool


def _selected(name: str, patterns: str | None) -> bool:
    if not patterns:
        return True
    return any(fnmatch.fnmatchcase(name, p.strip()) for p in patterns.split(",") if p.strip())


def _source_name(source: WeightSource, value: str, names: set[str]) -> str | None:
    if value in names:
        return value
    if isinstance(source, OnnxSource):
        return source.source_of(value)
    base = value.removesuffix("_T")  # the PyTorch frontend's transposed Linear weight
    return base if base in names else None


def _find_layers(
    graph: Graph, source: WeightSource, patterns: str | None
) -> tuple[list[_Layer], list[tuple[str, str]]]:
    layers, skipped = [], []
    names = set(source.names())
    uses: dict[str, int] = {}
    for node in graph.nodes:
        for v in node.inputs:
            uses[v] = uses.get(v, 0) + 1
    for node in graph.nodes:
        op = ops.get(node.op)
        index = op.weight_input(node, graph) if op is not None else None
        if index is None or not _selected(node.name, patterns):
            continue
        value = node.inputs[index]
        name = _source_name(source, value, names)
        if name is None:
            skipped.append((node.name, "its weight is computed from other constants (e.g. quantized); left alone"))
        elif uses.get(value, 0) > 1:
            skipped.append((node.name, "its weight is shared with another layer; left alone"))
        else:
            layers.append(_Layer(node, value, name, direct=name == value))
    return layers, skipped


# ---------------------------------------------------------------------- BatchNorm folding


def _following_batchnorm(graph: Graph, node: Node, readers: dict[str, list[Node]], names: set[str]) -> Node | None:
    """The per-channel affine node (BatchNorm) right after a layer, when its parameters are the file's tensors."""
    consumers = readers.get(node.outputs[0], [])
    if len(consumers) != 1 or node.outputs[0] in graph.outputs:
        return None
    bn = consumers[0]
    op = ops.get(bn.op)
    if op is None or bn.inputs[0] != node.outputs[0] or op.channel_affine(graph, bn) is None:
        return None
    return bn if all(v in names for v in op.parameter_inputs(bn)) else None


def _fold_batchnorm(layer: _Layer, bn: Node, source: WeightSource, graph: Graph) -> bool:
    """W' = W * m, b' = b * m, and the BatchNorm becomes the pure shift x + s (removed when a bias can take s)."""
    bn_op, layer_op = ops.get(bn.op), ops.get(layer.node.op)
    assert bn_op is not None and layer_op is not None
    multiplier, shift = bn_op.channel_affine(graph, bn)  # type: ignore[misc]
    weight = np.asarray(source.get(layer.source_name), dtype=np.float64)
    new_weight = layer_op.scale_output_channels(layer.node, weight, multiplier)
    if new_weight is None:
        return False
    bias_value = layer.node.inputs[2] if len(layer.node.inputs) > 2 and layer.node.inputs[2] else None
    if bias_value is not None and (bias_value not in source.names() or layer_op.bias_scale(layer.node) != 1.0):
        return False
    source.set(layer.source_name, new_weight)
    if bias_value is not None:
        bias = np.asarray(source.get(bias_value), dtype=np.float64)
        if isinstance(source, OnnxSource) and bias.shape == shift.shape:
            source.set(bias_value, bias * multiplier + shift)
            if source.remove_batchnorm(bn.name, layer.node.name):
                return True
            source.set(bias_value, bias * multiplier)
        else:
            source.set(bias_value, bias * multiplier)
    for name, value in bn_op.shift_parameters(bn, shift):  # keep the BatchNorm as x + shift
        source.set(name, value)
    return True


# ---------------------------------------------------------------------- certification


def _load_graph(path: Path, options: NormalizeOptions) -> Graph | WeightTensors:
    return load_model(path, options.input_shapes, options.torch_options)


def _certify(graph: Graph, fold_bn: bool, device: str) -> Composition:
    """Per-layer certified bounds and their product (the graph itself stays as it is)."""
    return certify(graph, method="product", device=device, fold_batchnorms=fold_bn, copy=True).product


def _norms_and_bound(graph: Graph, fold_bn: bool, device: str) -> tuple[dict[str, float], float | None]:
    """Per-layer certified norms (BatchNorms folded or not) and the network's bound as ``lipcheck report``
    gives it (the smallest certified method, lipcheck.refine). One walk when BatchNorms are folded anyway."""
    found = certify(graph, device=device, copy=True)
    norms = _layer_norms(found.product if fold_bn else _certify(graph, False, device))
    return norms, found.upper_bound


def _layer_norms(result: Composition) -> dict[str, float]:
    return {layer.name: layer.lipschitz for layer in result.layers}


def _weights_only_norms(tensors: dict[str, torch.Tensor], device: str) -> dict[str, float]:
    from lipcheck.weights import layer_name, weight_norms

    rows = {row.name: row.lipschitz for row in weight_norms(tensors, device)}
    return {key: rows[layer_name(key)] for key in tensors if layer_name(key) in rows}


# ---------------------------------------------------------------------- the rewrite


def normalize(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    options: NormalizeOptions,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> NormalizeResult:
    """Plan, apply and (unless ``output`` is None: a dry run) write and verify the normalised model."""
    path, out = Path(path), None if output is None else Path(output)
    if not (options.target > 0 and math.isfinite(options.target)):
        raise LipcheckError(f"--target {options.target}: must be a positive number")
    if options.lipschitz is not None and not (options.lipschitz > 0 and math.isfinite(options.lipschitz)):
        raise LipcheckError(f"--lipschitz {options.lipschitz}: must be a positive number")
    _check_output(path, out, force)
    note = progress or (lambda _: None)
    source = open_source(path, options.torch_options)
    graph = _load_graph(path, options)
    fold_bn = isinstance(source, OnnxSource) or options.fold_bn
    if isinstance(graph, WeightTensors):
        result = _plan_weights_only(source, graph, options)
    else:
        result = _plan_graph(source, graph, options, fold_bn, note)
    if out is None:
        return result
    with StagedModel(out, force, protect=source.input_files()) as staged:
        note("writing")
        staged.write(source.write)
        note("verifying")
        _verify(path, staged.model, result, options, fold_bn)  # the proof runs on the staged file
        if result.passed:
            result.written = staged.commit()  # only a proven model reaches the output path
    return result


def normalize_file(
    path: Path,
    output: Path | None,
    options: NormalizeOptions,
    mode: str,
    conv_norm: str,
    force: bool,
    progress: Callable[[str], None] | None = None,
) -> NormalizeResult:
    """``lipcheck normalize`` in either mode: bake (rescaled weights, any format) or parametrize (PyTorch).
    ``progress(text)`` is told each step as it starts."""
    if mode == "parametrize":
        return parametrize_file(path, output, options, conv_norm, force=force)
    return normalize(path, output, options, force=force, progress=progress)


def _check_output(path: Path, out: Path | None, force: bool) -> None:
    """Refuse, before any work, an output that is the input (whatever the flags) or an existing file (unless
    --force), or a folder where nothing can be written."""
    if out is not None:
        check_new_model(path, out, force)


def _plan_weights_only(source: WeightSource, weights: WeightTensors, options: NormalizeOptions) -> NormalizeResult:
    if options.lipschitz is not None:
        raise LipcheckError("--lipschitz needs the architecture (--model); this file holds weights only")
    norms = _weights_only_norms(
        {k: v for k, v in weights.tensors.items() if _selected(k, options.layers)}, options.device
    )
    changes = []
    for key, norm in norms.items():
        factor = _factor(norm, options.target, options.clip)
        source.set(key, np.asarray(source.get(key), dtype=np.float64) * factor)
        op = Conv.name if weights.tensors[key].dim() > 2 else MatMul.name
        changes.append(LayerChange(key, op, key, norm, factor))
    return NormalizeResult(
        weights.name,
        source.format,
        changes,
        [],
        None,
        budget_note="weights only: each tensor by its size-independent certified norm",
    )


def _factor(norm: float, target: float, clip: bool) -> float:
    if norm <= 0:
        return 1.0
    return min(1.0, target / norm) if clip else target / norm


def _plan_graph(
    source: WeightSource, graph: Graph, options: NormalizeOptions, fold_bn: bool, note: Callable[[str], None]
) -> NormalizeResult:
    note("certifying the input")
    _, bound_before = _norms_and_bound(graph, True, options.device)
    layers, skipped = _find_layers(graph, source, options.layers)
    if not layers:
        raise LipcheckError(
            f"{source.path}: no layer to normalise"
            + (f" matches --layers {options.layers!r}" if options.layers else "")
        )
    folded: dict[str, str] = {}
    if fold_bn:
        readers, names = graph.consumers(), set(source.names())
        for layer in layers:
            bn = _following_batchnorm(graph, layer.node, readers, names) if layer.direct else None
            if bn is not None and _fold_batchnorm(layer, bn, source, graph):
                folded[layer.node.name] = bn.name
    if isinstance(source, OnnxSource) and folded:
        graph = _graph_of(source, options)  # BatchNorm nodes were removed from the model itself
        layers, _ = _find_layers(graph, source, options.layers)
    else:
        _sync_graph(graph, source)
    note("certifying each layer")
    norms = _layer_norms(_certify(graph, fold_bn, options.device))
    changes = [
        LayerChange(
            layer.node.name,
            layer.node.op,
            layer.source_name,
            norms[layer.node.name],
            folded_bn=folded.get(layer.node.name),
        )
        for layer in layers
    ]
    budget = ""
    if options.lipschitz is None:
        for change in changes:
            change.factor = _factor(change.norm_before, options.target, options.clip)
    else:
        t, bound, trials = _uniform_target(graph, source, layers, changes, options, note)
        for change in changes:
            change.factor = t / change.norm_before if change.norm_before > 0 else 1.0
        budget = (
            f"every selected layer at norm {t:.6g}, the largest found ({trials} certifications) whose certified "
            f"network bound, as lipcheck report gives it, is <= {options.lipschitz:g} ({bound:.6g})"
        )
    for layer, change in zip(layers, changes, strict=True):
        _scale(source, graph, layer, change.factor)
    return NormalizeResult(graph.name, source.format, changes, skipped, bound_before, budget_note=budget)


def _scale(source: WeightSource, graph: Graph, layer: _Layer, factor: float) -> None:
    source.set(layer.source_name, np.asarray(source.get(layer.source_name), dtype=np.float64) * factor)
    graph.constants[layer.weight_value] = np.asarray(graph.constants[layer.weight_value]) * factor


def _graph_of(source: OnnxSource, options: NormalizeOptions) -> Graph:
    from lipcheck.frontends.onnx_frontend import onnx_to_graph

    return onnx_to_graph(copy.deepcopy(source.model), options.input_shapes, name=source.path.name)


def _sync_graph(graph: Graph, source: WeightSource) -> None:
    """Copy the source's edited tensors into the graph's constants of the same name."""
    for name in source.names():
        if name in graph.constants:
            value = source.get(name)
            if value is not None:
                graph.constants[name] = value


def _uniform_target(
    graph: Graph,
    source: WeightSource,
    layers: list[_Layer],
    changes: list[LayerChange],
    options: NormalizeOptions,
    note: Callable[[str], None],
) -> tuple[float, float, int]:
    """The largest common layer norm t whose network bound, as ``lipcheck report`` gives it (the smallest
    certified method), is <= K; with that bound and the number of certifications it took.

    Each trial certifies the scaled graph by every method (a second or so per trial on the digits CNN, where
    the product alone takes 50 ms), so the search must be short. A chain of positively homogeneous layers
    has the bound c t^d (d its number of scaled layers) and other networks are close to a power of t, so
    log(bound) against log(t) is nearly a line: a secant search on it, kept inside the bracket of trials
    below and above K (bisection when a secant step leaves it), ends in a handful of trials.
    """
    assert options.lipschitz is not None
    goal = options.lipschitz * (1 - 1e-6)  # room for the float32 rounding of the written weights
    bounds: dict[float, float] = {}

    def excess(u: float) -> float:
        """log(bound / goal) at t = exp(u): <= 0 when the budget is met."""
        t = math.exp(u)
        trial = graph.copy()
        for layer, change in zip(layers, changes, strict=True):
            factor = t / change.norm_before if change.norm_before > 0 else 1.0
            trial.constants[layer.weight_value] = np.asarray(trial.constants[layer.weight_value]) * factor
        note(f"searching the common layer norm: trial {len(bounds) + 1}, t = {t:.6g}")
        bound = certify(trial, device=options.device).upper_bound
        if bound is None:
            raise LipcheckError(f"{source.path}: not globally Lipschitz, so no scaling reaches --lipschitz")
        bounds[u] = bound
        return math.log(bound / goal) if bound > 0 else -math.inf

    u = _largest_within(excess, degree=float(min(max(len(layers), 1), 64)))
    if u is None:
        raise LipcheckError(
            f"--lipschitz {options.lipschitz:g}: unreachable by scaling the selected layers (the rest "
            "of the network alone is above it)"
        )
    return math.exp(u), bounds[u], len(bounds)


SEARCH_TOLERANCE = 1e-5  # the search ends when the bound is within this of K (relative)
SEARCH_TRIALS = 30
T_RANGE = (math.log(1e-9), math.log(1e6))


def _largest_within(excess: Callable[[float], float], degree: float) -> float | None:
    """The largest u found with excess(u) <= 0, for an excess that grows with u about ``degree`` times as fast
    (the log of a bound against the log of t); None when even the smallest u of ``T_RANGE`` is above."""
    target = math.log1p(-SEARCH_TOLERANCE / 2)  # aim inside the tolerance band, on the right side
    low: tuple[float, float] | None = None  # (u, excess) with excess <= 0, the largest so far
    high: tuple[float, float] | None = None  # with excess > 0, the smallest so far
    trial, previous = 0.0, None
    for _ in range(SEARCH_TRIALS):
        point = (trial, excess(trial))
        if point[1] <= 0 and (low is None or point[0] > low[0]):
            low = point
        elif point[1] > 0 and (high is None or point[0] < high[0]):
            high = point
        if low is not None and (low[1] >= math.log1p(-SEARCH_TOLERANCE) or low[0] >= T_RANGE[1]):
            break
        if (high is not None and high[0] <= T_RANGE[0]) or (low and high and high[0] - low[0] < 1e-7):
            break
        slope = degree
        if previous is not None and point[0] != previous[0]:
            secant = (point[1] - previous[1]) / (point[0] - previous[0])
            slope = secant if 1e-3 < secant < math.inf else slope
        previous = point
        trial = _next_trial(low, high, point, slope, target)
    return None if low is None else low[0]


def _next_trial(
    low: tuple[float, float] | None,
    high: tuple[float, float] | None,
    latest: tuple[float, float],
    slope: float,
    target: float,
) -> float:
    """A secant step from the latest trial towards excess = target: strictly inside the bracket when there is
    one (its midpoint when the step leaves it), else at least a little beyond the side known, within T_RANGE."""
    step = (target - latest[1]) / slope if math.isfinite(latest[1]) else 1.0
    if low is not None and high is not None:
        trial = latest[0] + step
        return trial if low[0] < trial < high[0] else (low[0] + high[0]) / 2
    if low is not None:  # every trial so far below the budget: up
        return min(max(latest[0] + step, low[0] + 1e-3), T_RANGE[1])
    assert high is not None  # every trial above: down
    return max(min(latest[0] + step, high[0] - 1e-3), T_RANGE[0])


# ---------------------------------------------------------------------- verification


def _verify(path: Path, out: Path, result: NormalizeResult, options: NormalizeOptions, fold_bn: bool) -> None:
    checks = result.checks
    try:
        after_graph = _load_graph(out, options)
    except LipcheckError as exc:
        checks.append(Check("reloads", False, str(exc)))
        return
    checks.append(Check("reloads", True, f"{out.name} reads back as {result.format}"))
    if isinstance(after_graph, WeightTensors):
        norms = _weights_only_norms(after_graph.tensors, options.device)
    else:
        norms, result.bound_after = _norms_and_bound(after_graph, fold_bn, options.device)
    worst = []
    for change in result.layers:
        change.norm_after = norms.get(change.name)
        limit = options.target if options.lipschitz is None else change.norm_before * change.factor
        if options.clip and change.factor == 1.0:
            limit = change.norm_before
        if change.norm_after is None or change.norm_after > limit * (1 + TOLERANCE):
            worst.append(f"{change.name} {change.norm_after} > {limit:.9g}")
    checks.append(
        Check(
            "layer norms",
            not worst,
            "; ".join(worst[:3]) or f"every normalised layer's certified norm <= its target x (1 + {TOLERANCE:g})",
        )
    )
    if options.lipschitz is not None:
        ok = result.bound_after is not None and result.bound_after <= options.lipschitz
        checks.append(
            Check("network bound", ok, f"certified bound {result.bound_after} vs --lipschitz {options.lipschitz:g}")
        )
    if result.format.startswith("ONNX"):
        _check_onnx(path, out, result, options)
    else:
        _check_torch(path, out, result, options)


def _random_inputs(shapes: list[tuple[int, ...]], count: int = 4) -> list[list[np.ndarray]]:
    generator = np.random.default_rng(0)
    return [[generator.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(count)]


def _relative_change(before: list[np.ndarray], after: list[np.ndarray]) -> float:
    num = math.sqrt(
        sum(
            float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
            for a, b in zip(after, before, strict=True)
        )
    )
    den = math.sqrt(sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in before))
    return num / den if den > 0 else num


def _check_onnx(path: Path, out: Path, result: NormalizeResult, options: NormalizeOptions) -> None:
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(out), full_check=True)
        result.checks.append(Check("onnx.checker", True, "check_model(full_check=True) passes"))
    except Exception as exc:
        result.checks.append(Check("onnx.checker", False, str(exc).splitlines()[0][:200]))
        return
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3
    before = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(str(out), session_options, providers=["CPUExecutionProvider"])

    def signature(session: ort.InferenceSession) -> tuple[list, list]:
        inputs = [(i.name, i.type, i.shape) for i in session.get_inputs()]
        return inputs, [(o.name, o.type) for o in session.get_outputs()]

    same = signature(before) == signature(after)
    result.checks.append(
        Check(
            "signature",
            same,
            "same inputs and outputs as the original" if same else "inputs or outputs differ from the original",
        )
    )
    from lipcheck.options import parse_input_shapes

    given = parse_input_shapes(list(options.input_shapes), [i.name for i in before.get_inputs()])
    shapes = [given.get(i.name) or tuple(d if isinstance(d, int) else 1 for d in i.shape) for i in before.get_inputs()]
    change = 0.0
    try:
        for inputs in _random_inputs(shapes):
            feed = {i.name: x for i, x in zip(before.get_inputs(), inputs, strict=True)}
            change = max(change, _relative_change(before.run(None, feed), after.run(None, feed)))
        result.output_change = change
        result.checks.append(Check("runs", True, "onnxruntime runs the output on random inputs"))
    except Exception as exc:
        result.checks.append(Check("runs", False, f"onnxruntime: {str(exc).splitlines()[0][:200]}"))


def _check_torch(path: Path, out: Path, result: NormalizeResult, options: NormalizeOptions) -> None:
    try:
        before = load_runnable(path, options.torch_options)
        after = load_runnable(out, options.torch_options)
        result.checks.append(Check("loads", True, "loads with plain torch"))
    except Exception as exc:
        result.checks.append(Check("loads", False, str(exc).splitlines()[0][:200]))
        return
    if before is None or after is None:
        return  # weights only: nothing to run
    shapes = [InputShape(spec).dims for spec in options.input_shapes]
    if not shapes:
        shapes = _pt2_input_shapes(path)
    if not shapes:
        return
    change = 0.0
    try:
        with torch.no_grad():
            for inputs in _random_inputs(shapes):
                tensors = [torch.from_numpy(x) for x in inputs]
                change = max(change, _relative_change(_as_list(before(*tensors)), _as_list(after(*tensors))))
        result.output_change = change
        result.checks.append(Check("runs", True, "the output model runs on random inputs"))
    except Exception as exc:
        result.checks.append(Check("runs", False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))


def _pt2_input_shapes(path: Path) -> list[tuple[int, ...]]:
    from lipcheck.frontends.torch_frontend import detect_format

    if detect_format(path) != "pt2":
        return []
    program = torch.export.load(str(path))
    args = program.example_inputs[0] if program.example_inputs else ()
    return [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]


def _as_list(value: object) -> list[np.ndarray]:
    if isinstance(value, torch.Tensor):
        return [value.detach().double().numpy()]
    if isinstance(value, list | tuple):
        return [v for item in value for v in _as_list(item)]
    return []


# ---------------------------------------------------------------------- parametrize (PyTorch, for training)


def parametrize_file(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    options: NormalizeOptions,
    conv_norm: str = "operator",
    force: bool = False,
) -> NormalizeResult:
    """Register training-time spectral normalization on a PyTorch model and save its state_dict.

    torch pickles parametrized modules only through their state_dict, so the output is the parametrized
    model's state_dict (keys ``<layer>.parametrizations.weight.original`` and the power-iteration vectors):
    resume training with ``model = factory(); parametrize(model, ...); model.load_state_dict(...)``. The
    proof does exactly that on a fresh module, then bakes it (``remove_parametrizations``) and certifies it.
    """
    from lipcheck.frontends.torch_frontend import module_to_graph
    from lipcheck.rewrite.parametrize import normalised_layers, parametrize

    path, out = Path(path), None if output is None else Path(output)
    _check_output(path, out, force)
    if not options.input_shapes:
        raise LipcheckError(f"{path}: --mode parametrize needs --input-shape (the layers' input sizes set the norms)")
    shape = InputShape(options.input_shapes[0]).dims

    def fresh_module() -> torch.nn.Module:
        onnx = path.suffix.lower() == ".onnx"
        module = None if onnx else load_runnable(path, options.torch_options)
        if not isinstance(module, torch.nn.Module) or isinstance(module, torch.jit.ScriptModule | torch.fx.GraphModule):
            raise LipcheckError(
                f"{path}: --mode parametrize needs an nn.Module: a state_dict or checkpoint with "
                "--model, or a pickled module (--trust-pickle)"
            )
        return module

    def normalised(module: torch.nn.Module) -> torch.nn.Module:
        return parametrize(module, input_shape=shape, target=options.target, conv_norm=conv_norm, layers=options.layers)

    original = fresh_module()
    certified = _certify(module_to_graph(original, options.input_shapes, path.name), False, options.device)
    before, ops = _layer_norms(certified), {layer.name: layer.op for layer in certified.layers}
    module = normalised(fresh_module())
    names = normalised_layers(module)
    changes = [LayerChange(name, ops.get(name, "?"), f"{name}.weight", before.get(name, math.nan)) for name in names]
    note = (
        f"parametrization (conv_norm={conv_norm}, power iteration while training); output: the parametrized "
        "state_dict; norms after: a fresh module loaded from it and baked with remove_parametrizations"
    )
    result = NormalizeResult(path.name, "parametrized state_dict", changes, [], None, budget_note=note)
    if out is None:
        return result
    with StagedModel(out, force, protect=[path]) as staged:
        staged.write(lambda target: torch.save(module.state_dict(), target))
        _prove_parametrized(
            staged.model, result, original, lambda: normalised(fresh_module()), shape, options, conv_norm
        )
        if result.passed:
            result.written = staged.commit()  # only a proven model reaches the output path
    return result


def _prove_parametrized(
    out: Path,
    result: NormalizeResult,
    original: torch.nn.Module,
    fresh: Callable[[], torch.nn.Module],
    shape: tuple[int, ...],
    options: NormalizeOptions,
    conv_norm: str,
) -> None:
    """Load the written state_dict into a fresh parametrized module, run it, bake it and certify its layers."""
    from lipcheck.frontends.torch_frontend import module_to_graph
    from lipcheck.rewrite.parametrize import remove_parametrizations

    try:
        reloaded = fresh()
        reloaded.load_state_dict(torch.load(out, weights_only=True), strict=True)
        reloaded.eval()
        result.checks.append(Check("reloads", True, "a fresh module, parametrized the same way, loads it strictly"))
    except Exception as exc:
        result.checks.append(Check("reloads", False, str(exc).splitlines()[0][:200]))
        return
    inputs = [torch.from_numpy(x[0]) for x in _random_inputs([shape])]
    with torch.no_grad():
        result.output_change = max(_relative_change(_as_list(original(x)), _as_list(reloaded(x))) for x in inputs)
    result.checks.append(Check("runs", True, "the parametrized model runs on random inputs"))
    baked = remove_parametrizations(reloaded)
    after = _layer_norms(_certify(module_to_graph(baked, options.input_shapes, out.name), False, options.device))
    over = []
    for change in result.layers:
        change.norm_after = after.get(change.name)
        if change.norm_after is not None and change.norm_before > 0:
            change.factor = change.norm_after / change.norm_before
        if change.norm_after is None or change.norm_after > options.target * (1 + TOLERANCE):
            over.append(f"{change.name} {change.norm_after}")
    if conv_norm == "operator":
        limit = f"{options.target:g} x (1 + {TOLERANCE:g})"
        detail = "; ".join(over[:3]) or f"baked: every layer's certified norm <= {limit}"
        result.checks.append(Check("layer norms", not over, detail))
