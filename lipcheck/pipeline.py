"""From a model to its certificate: the one sequence ``report``, ``check`` and ``normalize`` run.

``certify(graph)`` is what every command does with a loaded graph: ``prepare`` (recognise activations,
fold BatchNorms), ``compose`` (each layer's certified bound and their product, AutoLip), ``refine``
(chain bounds; the smallest certified bound wins). ``analyse(path)`` loads the file first, certifies
it, adds the empirical lower bound when asked, and returns the ``Report``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lipcheck.compose import Composition, ProgressCallback, UnboundedReason, compose
from lipcheck.domain import Domain
from lipcheck.errors import LipcheckError
from lipcheck.frontends import load_model
from lipcheck.graph import Graph
from lipcheck.ops import Interval, UnitSlopes
from lipcheck.options import Device, Method, Settings
from lipcheck.passes import prepare
from lipcheck.refine import Refinement, refine
from lipcheck.report import NO_ARCHITECTURE, Report

if TYPE_CHECKING:
    from lipcheck.cache import LayerCache
    from lipcheck.frontends.torch_frontend import TorchOptions, WeightTensors
    from lipcheck.lower import LowerSettings


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when torch sees a GPU."""
    device = Device(device).value
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LipcheckError("--device cuda: torch sees no CUDA device")
    return torch.device(device)


@dataclass
class Certificate:
    """A prepared graph's per-layer bounds (``product``) and its refined bounds (``refinement``)."""

    graph: Graph
    product: Composition
    refinement: Refinement
    domain: Domain | None = None

    @property
    def composition(self) -> Composition:
        """The walk that gave the reported bound (the best method's)."""
        return self.refinement.composition

    @property
    def upper_bound(self) -> float | None:
        return self.composition.upper_bound


def certify(
    graph: Graph,
    method: str = "best",
    assume: dict[str, float] | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressCallback | None = None,
    cache: LayerCache | None = None,
    fold_batchnorms: bool = True,
    copy: bool = False,
    domain: Domain | None = None,
) -> Certificate:
    """Prepare, compose and refine ``graph`` (a copy of it with ``copy``: the caller's graph stays as loaded).

    ``method``: best (default), product, folded, combettes-pesquet, eclipse-fast, frequency-cp, block-sdp, lipsdp or all
    (``lipcheck.refine``). ``cache``: per-layer results reused across runs (``lipcheck.cache``);
    ``progress``: told which layer comes next. ``fold_batchnorms=False`` keeps BatchNorms as layers.
    ``domain``: the bound holds for inputs in it (``lipcheck.domain``), through the value ranges of every node.
    """
    working = graph.copy() if copy else graph
    prepare(working, fold_batchnorms=fold_batchnorms)
    return certify_prepared(working, method, assume, device, progress, cache, domain)


def certify_prepared(
    graph: Graph,
    method: str = "best",
    assume: dict[str, float] | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressCallback | None = None,
    cache: LayerCache | None = None,
    domain: Domain | None = None,
    rule_cache: dict | None = None,
) -> Certificate:
    """``certify`` after ``prepare`` (``rule_cache`` keeps the domain-free rules' answers between calls)."""
    ranges = domain_ranges(graph, domain) if domain is not None else None
    rule_cache = {} if rule_cache is None else rule_cache
    product = compose(
        graph, assume=assume, device=device, progress=progress, cache=cache, rule_cache=rule_cache, ranges=ranges
    )
    slopes = unit_slopes(graph, ranges) if ranges else None
    refined = refine(
        graph,
        product,
        Method(method).value,
        assume=assume,
        device=device,
        cache=rule_cache,
        unit_slopes=slopes,
        ranges=ranges,
    )
    return Certificate(graph, product, refined, domain)


def domain_ranges(graph: Graph, domain: Domain) -> dict[str, Interval]:
    """Every value's range on ``domain``; on an l2 ball, tightened along the dense chains that read the input."""
    from lipcheck.ranges import value_ranges
    from lipcheck.refine.ball_ranges import tightened_ranges

    inputs, balls = domain.input_ranges(graph), domain.balls(graph)
    ranges = value_ranges(graph, inputs, balls)
    if len(balls) != 1:
        return ranges
    ((name, (centre, radius)),) = balls.items()
    known = tightened_ranges(graph, ranges, centre, name, radius)
    return value_ranges(graph, inputs, balls, known) if known else ranges


def unit_slopes(graph: Graph, ranges: Mapping[str, Interval]) -> dict[str, UnitSlopes]:
    """Per-unit slope intervals of the activations whose input ranges are known (ReLU: exactly 1 or 0 where
    the range shows it always active or inactive), for the chain bounds."""
    from lipcheck import ops

    found: dict[str, UnitSlopes] = {}
    for node in graph.nodes:
        op = ops.get(node.op)
        x = ranges.get(node.inputs[0]) if node.inputs and node.inputs[0] else None
        if op is None or x is None or not x.lo.is_floating_point():
            continue
        bounds = op.slope_on(node, graph, x)
        if bounds is not None:
            low, high = (b.broadcast_to(x.lo.shape).reshape(-1).numpy() for b in bounds)
            found[node.name] = UnitSlopes(low, high)
    return found


def analyse(
    path: str | os.PathLike[str],
    input_shapes: Sequence[str] = (),
    assume: dict[str, float] | None = None,
    device: str = "auto",
    torch_options: TorchOptions | None = None,
    lower: bool | LowerSettings = False,
    max_memory: int | None = None,
    cache: str | os.PathLike[str] | LayerCache | None = None,
    progress: ProgressCallback | None = None,
    method: str = "best",
    domain: Domain | None = None,
    around: Around | None = None,
) -> Report:
    """Load a model file and compute its certified Lipschitz report (the library entry point).

    ``torch_options`` carries what PyTorch files may need: ``--model`` for a bare state_dict, and
    whether a pickle is trusted. ``lower``: also search for an empirical lower bound (True for the
    default settings, or a ``lipcheck.lower.LowerSettings``); the report then holds ``lower_bound``
    and the bracket. ``max_memory``: bytes of memory to stay within (weights are then read a layer at
    a time); ``cache``: a folder (or ``LayerCache``) of per-layer results reused across runs;
    ``progress``: see ``compose``. ``method``: see ``certify``; the report's ``upper_bound`` is the
    smallest certified bound computed. ``domain``: the bound holds for inputs there (``lipcheck.domain``);
    ``around``: local bounds on balls around samples (``lipcheck.local``), inside ``domain`` when given.
    """
    torch_device = resolve_device(device)
    layer_cache = _layer_cache(cache)
    graph = load_model(path, input_shapes, torch_options, max_memory=max_memory)
    if not isinstance(graph, Graph):
        return weights_report(graph, torch_device)
    if around is not None:
        return _local_report(Path(path).name, graph, around, domain or Domain(), method, assume, torch_device, lower)
    loaded = graph.copy() if lower else None
    found = certify(graph, method, assume, torch_device, progress, layer_cache, domain=domain)
    report = _report(Path(path).name, found, torch_device)
    if loaded is not None:
        from lipcheck.lower import LowerSettings, lower_bound

        settings = lower if isinstance(lower, LowerSettings) else LowerSettings()
        outputs = {node.name: node.outputs[0] for node in found.graph.nodes if node.outputs and node.outputs[0]}
        shown = {layer.name: outputs[layer.name] for layer in found.composition.layers if layer.name in outputs}
        report.lower = lower_bound(loaded, settings, torch_device, shown)
        report.lower_bound = report.lower.value
    return report


LOCAL_METHOD = "combettes-pesquet"  # per ball: the chain bound that per-unit slopes tighten most for its cost


@dataclass(frozen=True)
class Around:
    """--around: samples (a file, or an array [N, ...]), the balls' radius and norm, labels (file or array)."""

    samples: str | os.PathLike[str] | np.ndarray
    radius: float
    norm: str = "2"
    labels: str | os.PathLike[str] | np.ndarray | None = None
    accuracy_radii: tuple[float, ...] | None = None  # default: R/4, R/2, R


def _local_report(
    model: str,
    graph: Graph,
    around: Around,
    domain: Domain,
    method: str,
    assume: dict[str, float] | None,
    device: torch.device,
    lower: bool | LowerSettings,
) -> Report:
    """The report of --around: the largest local bound as the bound, the worst sample's layers, and per sample
    the bound, the lower bound (with ``lower``) and the robust radius (with labels)."""
    from lipcheck.local import LocalError, load_labels, load_samples, run_local

    variables = [name for name in graph.inputs if not graph.is_discrete(name)]
    if len(variables) != 1:
        raise LocalError(f"--around needs a model with one float input; this one has {len(variables)}")
    shape = graph.shape(variables[0])
    if shape is None or any(not isinstance(d, int) for d in shape):
        raise LocalError("--around needs the input's full shape; give --input-shape")
    full = tuple(int(d) for d in shape)  # type: ignore[arg-type]
    if isinstance(around.samples, np.ndarray):
        samples, inner = np.asarray(around.samples, dtype=np.float64).reshape(-1, *full[1:]), None
    else:
        samples, inner = load_samples(around.samples, full)
    labels = inner
    if isinstance(around.labels, np.ndarray):
        labels = np.asarray(around.labels).reshape(-1).astype(np.int64)
    elif around.labels is not None:
        labels = load_labels(around.labels, samples.shape[0])
    loaded = graph.copy()
    prepare(graph)
    rule_cache: dict = {}

    # the bound on the whole domain (global without one) holds on every ball: computed once, with every method;
    # each ball adds what its ranges give (stable units, bounded products) through the cheap chain bound
    enclosing = certify_prepared(graph, method, assume, device, domain=domain if domain.bounded else None)
    per_ball = LOCAL_METHOD if Method(method).value in ("best", "all") else method

    def bound(ball: Domain) -> Certificate:
        found = certify_prepared(graph, per_ball, assume, device, domain=ball, rule_cache=rule_cache)
        if enclosing.upper_bound is not None and (
            found.upper_bound is None or enclosing.upper_bound < found.upper_bound
        ):
            return enclosing
        return found

    tries = None if not lower else 4
    local, worst = run_local(loaded, samples, domain, around.radius, around.norm, bound, labels, tries)
    report = _report(model, worst, device)
    report.upper_bound = local.max
    report.domain = {**domain.around(samples[0], around.radius, around.norm).to_dict(), "samples": len(samples)}
    report.local = local.to_dict(around.accuracy_radii)
    lowers = [s.lower for s in local.samples if s.lower is not None]
    report.lower_bound = max(lowers) if lowers else None
    return report


def analyse_with(path: str | os.PathLike[str], settings: Settings, progress: ProgressCallback | None = None) -> Report:
    """``analyse`` with the options of one run (``lipcheck.options.Settings``: flags and configuration)."""
    from lipcheck.frontends.torch_frontend import TorchOptions

    around = None
    if settings.around is not None and settings.radius is not None:
        around = Around(settings.around, settings.radius, settings.norm, settings.labels, settings.accuracy_radii)
    domain = settings.domain()
    return analyse(
        path,
        input_shapes=list(settings.input_shape),
        assume=dict(settings.assume),
        device=Device(settings.device).value,
        torch_options=TorchOptions(settings.model, settings.model_kwargs, settings.trust_pickle),
        lower=settings.lower or False,
        max_memory=settings.max_memory,
        cache=settings.cache,
        progress=progress,
        method=Method(settings.method).value,
        domain=domain,
        around=around,
    )


def _layer_cache(cache: str | os.PathLike[str] | LayerCache | None) -> LayerCache | None:
    if cache is None:
        return None
    from lipcheck.cache import LayerCache

    return cache if isinstance(cache, LayerCache) else LayerCache(cache)


def _report(model: str, found: Certificate, device: torch.device) -> Report:
    composition = found.composition
    domain = None if found.domain is None else found.domain.to_dict()
    return Report(
        domain=domain,
        model=model,
        upper_bound=composition.upper_bound,
        layers=composition.layers,
        unbounded_reasons=composition.unbounded,
        input_shapes={name: found.graph.shape(name) or () for name in found.graph.inputs},
        assumptions=composition.assumptions,
        device=str(device),
        bound_method=found.refinement.bound_method,
        method_bounds=found.refinement.method_bounds,
        chains=found.refinement.chains,
        regions=found.refinement.regions,
    )


def weights_report(weights: WeightTensors, device: torch.device) -> Report:
    """A state_dict without its architecture: every weight's certified norm, and no network bound."""
    from lipcheck.weights import weight_norms

    reason = (
        f"{weights.source} holds weights only; a network bound needs the architecture: "
        "pass --model package.module:factory and --input-shape"
    )
    return Report(
        model=weights.name,
        upper_bound=None,
        layers=weight_norms(weights.tensors, device),
        unbounded_reasons=[UnboundedReason("(whole model)", NO_ARCHITECTURE, reason)],
        input_shapes={},
        device=str(device),
        scope="weights",
    )
