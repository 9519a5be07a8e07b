"""The report: what ``lipcheck report`` computes, as plain data, and its versioned JSON schema.

This module has no presentation code; tables and text live in ``lipcheck.render``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lipcheck
from lipcheck.compose import Composition, LayerResult, UnboundedReason, compose
from lipcheck.frontends import load_graph
from lipcheck.graph import Shape
from lipcheck.passes import prepare

SCHEMA = "lipcheck.report/1"


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
            "upper_bound": self.upper_bound,
            "bounded": self.bounded,
            "certified": self.certified,
            "unbounded_reasons": [{"node": r.node, "op": r.op, "reason": r.reason} for r in self.unbounded_reasons],
            "lower_bound": self.lower_bound,
            "input_shapes": {name: _shape_list(shape) for name, shape in self.input_shapes.items()},
            "assumptions": dict(self.assumptions),
            "layers": [_layer_dict(layer) for layer in self.layers],
            "bound_method": self.bound_method,
            "method_bounds": dict(self.method_bounds),
            "chains": [_chain_dict(chain) for chain in self.chains],
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
    method: str = "best",
) -> Report:
    """Load a model file and compute its certified Lipschitz report (the library entry point).

    ``method``: best (default), product, folded, combettes-pesquet, eclipse-fast, lipsdp or all (see
    ``lipcheck.refine``); the report's ``upper_bound`` is the smallest certified bound computed.
    """
    from lipcheck.refine import refine

    torch_device = resolve_device(device)
    graph = load_graph(path, input_shapes)
    prepare(graph)
    cache: dict = {}
    product: Composition = compose(graph, assume=assume, device=torch_device, cache=cache)
    refined = refine(graph, product, method, assume=assume, device=torch_device, cache=cache)
    composition = refined.composition
    return Report(
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
