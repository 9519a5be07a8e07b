"""Composition: walk the graph like an interpreter, carrying Lipschitz constants instead of tensors.

Every value gets L(value) = a bound on its Lipschitz constant as a function of the network's inputs
(taken together). Network inputs have L = 1, constants L = 0; a node's outputs get what its rule
says (AutoLip, Virmaux & Scaman 2018). The network bound is sqrt(sum of L^2) over its outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lipcheck.errors import UnsupportedOpsError
from lipcheck.graph import Graph, Node, Shape
from lipcheck.rules import LocalBound, RuleContext, UnsupportedVariant, get_rule

if TYPE_CHECKING:
    from lipcheck.cache import LayerCache

# progress(done, total, name): called before each node with the node's name, and (total, total, "") at the end
ProgressCallback = Callable[[int, int, str], None]


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


@dataclass
class Composition:
    upper_bound: float | None  # None when some node is not globally Lipschitz
    layers: list[LayerResult]
    unbounded: list[UnboundedReason]
    assumptions: dict[str, float]

    @property
    def bounded(self) -> bool:
        return self.upper_bound is not None

    @property
    def certified(self) -> bool:
        return self.bounded and all(layer.certified for layer in self.layers)


def compose(
    graph: Graph,
    assume: dict[str, float] | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressCallback | None = None,
    cache: LayerCache | None = None,
    refinements: dict[str, tuple[str, float, str]] | None = None,
    rule_cache: dict[str, tuple[LocalBound | None, str | None]] | None = None,
) -> Composition:
    """Bound every node and the whole network. Raises UnsupportedOpsError listing all unknown ops.

    ``progress`` is told which node comes next (for a progress bar); ``cache`` answers nodes bounded
    before with the same weights, attributes and shapes (``lipcheck.cache``).
    ``refinements`` maps a value v to (u, factor, method): a certified L(v) <= factor * L(u) from a chain
    bound (lipcheck.refine); the smaller of it and the product is kept. ``rule_cache`` keeps the rules'
    answers between walks over the same graph in one run (answers that depend on the inputs' constants
    are not kept).
    """
    assume = dict(assume or {})
    device = torch.device(device)
    lipschitz: dict[str, float] = {name: 1.0 for name in graph.inputs}
    missing: dict[str, list[str]] = {}
    layers: list[LayerResult] = []
    reasons: list[UnboundedReason] = []
    used_assumptions: dict[str, float] = {}
    total_nodes = len(graph.nodes)
    for index, node in enumerate(graph.nodes):
        if progress is not None:
            progress(index, total_nodes, node.name)
        inputs_l = [lipschitz.get(v, 0.0) if v else 0.0 for v in node.inputs]
        if all(value == 0.0 for value in inputs_l):
            for out in node.outputs:
                lipschitz[out] = 0.0  # depends on weights only
            continue
        if rule_cache is not None and node.name in rule_cache:
            local, assumed_key = rule_cache[node.name]
        else:
            local, assumed_key = _bound_node(node, graph, inputs_l, device, assume, missing, cache)
            if rule_cache is not None and local is not None and local.output_lipschitz is None:
                rule_cache[node.name] = (local, assumed_key)
        if local is None:
            for out in node.outputs:
                lipschitz[out] = math.inf
            continue
        if assumed_key is not None:
            used_assumptions[assumed_key] = assume[assumed_key]
        if local.output_lipschitz is not None:
            out_l = local.output_lipschitz
        else:
            # the local constant is w.r.t. the variable inputs taken together
            variables = [value for value in inputs_l if value > 0]
            together = variables[0] if len(variables) == 1 else math.sqrt(sum(v * v for v in variables))
            out_l = local.value * together
        if not local.bounded:
            out_l = math.inf
            reasons.append(UnboundedReason(node.name, node.op, local.reason or local.method))
        if math.isnan(out_l):  # 0 * inf: an unbounded op on a constant-scaled-to-zero branch
            out_l = math.inf
        refined_by = None
        if refinements and node.outputs and node.outputs[0] in refinements:
            start, factor, refined_method = refinements[node.outputs[0]]
            if factor * lipschitz.get(start, math.inf) < out_l:
                out_l, refined_by = factor * lipschitz[start], refined_method
        for out in node.outputs:
            if out:
                lipschitz[out] = out_l
        first_variable = next(v for v, lip in zip(node.inputs, inputs_l, strict=True) if lip > 0)
        layers.append(
            LayerResult(
                name=node.name,
                op=str(node.attrs.get("activation", node.op)) if node.op == "Recognised" else node.op,
                input_shape=graph.shape(first_variable),
                output_shape=graph.shape(node.outputs[0]) if node.outputs else None,
                lipschitz=local.value,
                method=local.method,
                certified=local.certified,
                exact=local.exact,
                running=out_l,
                folded=list(node.folded),
                reason=local.reason,
                assumed=assumed_key is not None,
                refined_by=refined_by,
            )
        )
    if progress is not None:
        progress(total_nodes, total_nodes, "")
    if missing:
        raise UnsupportedOpsError(missing)
    outputs_l = [lipschitz.get(o, 0.0) for o in graph.outputs]
    total = math.sqrt(sum(v * v for v in outputs_l)) if len(outputs_l) > 1 else (outputs_l[0] if outputs_l else 0.0)
    return Composition(
        upper_bound=None if reasons or not math.isfinite(total) else total,
        layers=layers,
        unbounded=reasons,
        assumptions=used_assumptions,
    )


def _bound_node(
    node: Node,
    graph: Graph,
    inputs_l: list[float],
    device: torch.device,
    assume: dict[str, float],
    missing: dict[str, list[str]],
    cache: LayerCache | None = None,
) -> tuple[LocalBound | None, str | None]:
    """The rule's answer (None for an op without rule) and the --assume key used, if any."""
    if node.op in assume:
        return LocalBound(assume[node.op], "assumed (--assume)", certified=False), node.op
    registered = get_rule(node.op)
    if registered is None:
        missing.setdefault(node.op, []).append(node.name)
        return None, None
    try:
        context = RuleContext(node, graph, inputs_l, device)
        if cache is not None:
            return cache.bound(context, registered), None
        return registered.function(context), None
    except UnsupportedVariant as exc:
        if exc.label in assume:  # e.g. --assume "Resize(mode=linear)=1.5"
            return LocalBound(assume[exc.label], "assumed (--assume)", certified=False), exc.label
        missing.setdefault(exc.label, []).append(node.name)
        return None, None
