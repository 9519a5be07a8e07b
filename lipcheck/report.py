"""The report: what ``lipcheck report`` computes, as plain data, and its versioned JSON schema.

This module has no presentation code; tables and text live in ``lipcheck.render``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import lipcheck
from lipcheck.compose import Composition, LayerResult, ProgressCallback, UnboundedReason, compose
from lipcheck.frontends import load_model
from lipcheck.graph import Graph, Shape
from lipcheck.passes import prepare

if TYPE_CHECKING:
    from lipcheck.cache import LayerCache
    from lipcheck.frontends.torch_frontend import TorchOptions, WeightTensors
    from lipcheck.lower import LowerBound, LowerSettings

SCHEMA = "lipcheck.report/1"
NO_ARCHITECTURE = "no architecture"


@dataclass
class Report:
    model: str
    upper_bound: float | None
    layers: list[LayerResult]
    unbounded_reasons: list[UnboundedReason]
    input_shapes: dict[str, Shape]
    assumptions: dict[str, float] = field(default_factory=dict)
    lower_bound: float | None = None
    device: str = "cpu"
    # "network": a bound for the whole model; "weights": a file without architecture, per-tensor norms only
    scope: str = "network"
    lower: LowerBound | None = None  # the lower-bound search, when asked for (--lower)
    # which method gave upper_bound, every computed method's network bound, and the chains (lipcheck.refine)
    bound_method: str = "product"
    method_bounds: dict[str, float | None] = field(default_factory=dict)
    chains: list[Any] = field(default_factory=list)

    @property
    def bounded(self) -> bool:
        return self.upper_bound is not None

    @property
    def certified(self) -> bool:
        """True when the bound rests on no assumption."""
        return self.bounded and not self.assumptions and all(layer.certified for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "lipcheck_version": lipcheck.__version__,
            "model": self.model,
            "scope": self.scope,
            "upper_bound": self.upper_bound,
            "bounded": self.bounded,
            "certified": self.certified,
            "unbounded_reasons": [{"node": r.node, "op": r.op, "reason": r.reason} for r in self.unbounded_reasons],
            "lower_bound": self.lower_bound,
            "input_shapes": {name: _shape_list(shape) for name, shape in self.input_shapes.items()},
            "assumptions": dict(self.assumptions),
            "layers": [
                _layer_dict(layer)
                if self.lower is None
                else {**_layer_dict(layer), "running_lower_bound": self.lower.layers.get(layer.name)}
                for layer in self.layers
            ],
            "bound_method": self.bound_method,
            "method_bounds": dict(self.method_bounds),
            "chains": [_chain_dict(chain) for chain in self.chains],
            **self._lower_fields(),
        }

    @property
    def ratio(self) -> float | None:
        """upper / lower: how loose the bracket is (None without both bounds or with a zero lower bound)."""
        if self.upper_bound is None or not self.lower_bound:
            return None
        return self.upper_bound / self.lower_bound

    def _lower_fields(self) -> dict[str, Any]:
        """Present only when the lower-bound search ran: the bracket and the search's details."""
        if self.lower is None:
            return {}
        return {
            "bracket": {"lower": self.lower_bound, "upper": self.upper_bound, "ratio": self.ratio},
            "lower_bound_search": self.lower.to_dict(),
        }


def _chain_dict(result: Any) -> dict[str, Any]:
    chain = result.chain
    return {
        "input": chain.start,
        "output": chain.end,
        "nodes": [node.name for node in chain.nodes],
        "activations": [{"node": node.name, "slope": [slope.low, slope.high]} for node, slope in chain.activations],
        "product": _finite(result.product),
        "bounds": dict(result.bounds),
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _shape_list(shape: Shape | None) -> list[int | None] | None:
    return None if shape is None else [None if d is None else int(d) for d in shape]


def _layer_dict(layer: LayerResult) -> dict[str, Any]:
    return {
        "name": layer.name,
        "op": layer.op,
        "lipschitz": _finite(layer.lipschitz),
        "method": layer.method,
        "certified": layer.certified,
        "exact": layer.exact,
        "running_bound": _finite(layer.running),
        "input_shape": _shape_list(layer.input_shape),
        "output_shape": _shape_list(layer.output_shape),
        "folded": list(layer.folded),
        **({"reason": layer.reason} if layer.reason else {}),
        **({"refined_by": layer.refined_by} if layer.refined_by else {}),
    }


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when torch sees a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from lipcheck.errors import LipcheckError

        raise LipcheckError("--device cuda: torch sees no CUDA device")
    return torch.device(device)


def analyse(
    path: str | os.PathLike[str],
    input_shapes: list[str] | tuple[str, ...] = (),
    assume: dict[str, float] | None = None,
    device: str = "auto",
    torch_options: TorchOptions | None = None,
    lower: bool | LowerSettings = False,
    max_memory: int | None = None,
    cache: str | os.PathLike[str] | LayerCache | None = None,
    progress: ProgressCallback | None = None,
    method: str = "best",
) -> Report:
    """Load a model file and compute its certified Lipschitz report (the library entry point).

    ``torch_options`` carries what PyTorch files may need: ``--model`` for a bare state_dict, and
    whether a pickle is trusted. ``lower``: also search for an empirical lower bound (True for the
    default settings, or a ``lipcheck.lower.LowerSettings``); the report then holds ``lower_bound``
    and the bracket. ``max_memory``: bytes of memory to stay within (weights are then read a layer at
    a time); ``cache``: a folder (or ``LayerCache``) of per-layer results reused across runs;
    ``progress``: see ``compose``. ``method``: best (default), product, folded, combettes-pesquet,
    eclipse-fast, lipsdp or all (see ``lipcheck.refine``); the report's ``upper_bound`` is the smallest
    certified bound computed.
    """
    from lipcheck.refine import refine

    torch_device = resolve_device(device)
    layer_cache = None
    if cache is not None:
        from lipcheck.cache import LayerCache

        layer_cache = cache if isinstance(cache, LayerCache) else LayerCache(cache)
    graph = load_model(path, input_shapes, torch_options, max_memory=max_memory)
    if not isinstance(graph, Graph):
        return weights_report(graph, torch_device)
    loaded = graph.copy() if lower else None
    prepare(graph)
    rule_cache: dict = {}
    product: Composition = compose(
        graph, assume=assume, device=torch_device, progress=progress, cache=layer_cache, rule_cache=rule_cache
    )
    refined = refine(graph, product, method, assume=assume, device=torch_device, cache=rule_cache)
    composition = refined.composition
    result = Report(
        model=Path(path).name,
        upper_bound=composition.upper_bound,
        layers=composition.layers,
        unbounded_reasons=composition.unbounded,
        input_shapes={name: graph.shape(name) or () for name in graph.inputs},
        assumptions=composition.assumptions,
        device=str(torch_device),
        bound_method=refined.bound_method,
        method_bounds=refined.method_bounds,
        chains=refined.chains,
    )
    if loaded is not None:
        from lipcheck.lower import LowerSettings, lower_bound

        settings = lower if isinstance(lower, LowerSettings) else LowerSettings()
        outputs = {node.name: node.outputs[0] for node in graph.nodes if node.outputs and node.outputs[0]}
        shown = {layer.name: outputs[layer.name] for layer in composition.layers if layer.name in outputs}
        result.lower = lower_bound(loaded, settings, torch_device, shown)
        result.lower_bound = result.lower.value
    return result


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
