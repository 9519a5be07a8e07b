"""The report: what ``lipcheck report`` computes, as plain data, and its versioned JSON schema.

It is made by ``lipcheck.pipeline``; tables and text live in ``lipcheck.render`` and ``lipcheck.formats``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lipcheck
from lipcheck.graph import Shape

if TYPE_CHECKING:
    from lipcheck.lower import LowerBound


@dataclass
class LayerResult:
    """One node's line in the report."""

    name: str
    op: str
    input_shape: Shape | None  # of the first input that depends on the network input
    output_shape: Shape | None
    lipschitz: float  # the local constant (inf when not globally Lipschitz)
    method: str
    certified: bool
    exact: bool
    running: float  # L of the node's output w.r.t. the network input
    folded: list[str] = field(default_factory=list)
    reason: str | None = None
    assumed: bool = False
    refined_by: str | None = None  # a chain bound (lipcheck.refine) replaced the product at this node


@dataclass
class UnboundedReason:
    node: str
    op: str
    reason: str


SCHEMA = "lipcheck.report/1"
GLOBAL_DOMAIN = {"kind": "global", "text": "all inputs"}
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
    regions: list[Any] = field(default_factory=list)  # regions and residual blocks (frequency-cp, block-sdp)
    domain: dict[str, Any] | None = None  # where the bound holds (lipcheck.domain.Domain.to_dict); None: everywhere
    local: dict[str, Any] | None = None  # --around: the bound on each sample's ball (lipcheck.local)

    @property
    def domain_text(self) -> str | None:
        """'inputs in [0, 1]', 'l2 ball of radius 0.1 around each sample'; None for a global bound."""
        return None if self.domain is None else str(self.domain.get("text"))

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
            "regions": [_region_dict(region) for region in self.regions],
            "domain": self.domain if self.domain is not None else GLOBAL_DOMAIN,
            **({"local": self.local} if self.local is not None else {}),
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


def _region_dict(result: Any) -> dict[str, Any]:
    region = result.region
    return {
        "method": result.method,
        "input": region.start,
        "output": region.end,
        "nodes": [node.name for node in region.nodes],
        "residual_blocks": region.blocks,
        "bound": result.bound,
        **({"note": result.note} if result.note else {}),
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
