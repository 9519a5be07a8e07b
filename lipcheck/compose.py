"""Composition: walk the graph like an interpreter, carrying Lipschitz constants instead of tensors.

Every value gets L(value) = a bound on its Lipschitz constant as a function of the network's inputs
(taken together). Network inputs have L = 1, constants L = 0; a node's outputs get what its op's rule
says (AutoLip, Virmaux & Scaman 2018). The network bound is sqrt(sum of L^2) over its outputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lipcheck import ops
from lipcheck.errors import UnsupportedOpsError
from lipcheck.graph import Graph, Node
from lipcheck.interpret import run_graph
from lipcheck.ops import Interval, LocalBound, RuleContext, UnsupportedVariant
from lipcheck.ops.base import SubgraphBound
from lipcheck.report import LayerResult, UnboundedReason
from lipcheck.walk import ProgressCallback, walk

if TYPE_CHECKING:
    from lipcheck.cache import LayerCache

__all__ = ["Composition", "LayerResult", "ProgressCallback", "UnboundedReason", "compose"]


@dataclass
class Composition:
    upper_bound: float | None  # None when some node is not globally Lipschitz
    layers: list[LayerResult]
    unbounded: list[UnboundedReason]
    assumptions: dict[str, float]
    output_lipschitz: list[float] = field(default_factory=list)  # per graph output

    @property
    def bounded(self) -> bool:
        return self.upper_bound is not None

    @property
    def certified(self) -> bool:
        return self.bounded and all(layer.certified for layer in self.layers)


# a value v -> [(u, factor, method), ...]: L(v) <= factor * L(u), each certified by a chain or region bound
# (lipcheck.refine); the walk takes the smallest
Refinements = dict[str, list[tuple[str, float, str]]]
# node name -> (the rule's answer, the --assume key used): answers kept between walks of one graph
RuleCache = dict[str, tuple[LocalBound | None, str | None]]


@dataclass
class _Walk:
    """One composition: the rules' answers turned into running constants, node by node."""

    graph: Graph
    assume: dict[str, float]
    device: torch.device
    cache: LayerCache | None
    refinements: Refinements | None
    rule_cache: RuleCache | None
    ranges: Mapping[str, Interval] | None = None
    lipschitz: dict[str, float] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    layers: list[LayerResult] = field(default_factory=list)
    reasons: list[UnboundedReason] = field(default_factory=list)
    used_assumptions: dict[str, float] = field(default_factory=dict)
    read: set[str] = field(default_factory=set)  # values some node or the graph's outputs read

    def __post_init__(self) -> None:
        self.read = {name for node in self.graph.nodes for name in node.inputs} | set(self.graph.outputs)

    def step(self, node: Node, inputs: list[float | None]) -> list[float]:
        op = ops.get(node.op)
        ignored = op.type_inputs if op is not None else ()
        inputs_l = [0.0 if i in ignored else value or 0.0 for i, value in enumerate(inputs)]
        if all(value == 0.0 for value in inputs_l):
            return [0.0] * len(node.outputs)  # depends on weights only
        local, assumed_key = self.local_bound(node, inputs_l)
        if local is None:
            return [math.inf] * len(node.outputs)
        if assumed_key is not None:
            self.used_assumptions[assumed_key] = self.assume[assumed_key]
        out_l = self.output_lipschitz(node, local, inputs_l)
        refined_by = None
        for start, factor, refined_method in (self.refinements or {}).get(node.outputs[0] if node.outputs else "", []):
            if factor * self.lipschitz.get(start, math.inf) < out_l:
                out_l, refined_by = factor * self.lipschitz[start], refined_method
        self.layers.append(self.layer(node, local, inputs_l, out_l, assumed_key, refined_by))
        each = _per_output(local, out_l, len(node.outputs)) if refined_by is None else [out_l] * len(node.outputs)
        return [self.discrete_output(node, name, lip) for name, lip in zip(node.outputs, each, strict=True)]

    def discrete_output(self, node: Node, name: str, out_l: float) -> float:
        """An integer output that the input moves changes in jumps (MaxPool's indices, TopK's): unbounded
        where something reads it; the node's float outputs keep their constant."""
        if not (out_l > 0 and math.isfinite(out_l) and self.graph.is_discrete(name)):
            return out_l
        if name in self.read:
            self.reasons.append(UnboundedReason(node.name, node.op, f"integer output {name!r} changes in jumps"))
        return math.inf

    def local_bound(self, node: Node, inputs_l: list[float]) -> tuple[LocalBound | None, str | None]:
        """The rule's answer, from this run's rule cache when the same node was bounded before."""
        ranges = self.node_ranges(node)
        keep = self.rule_cache is not None and ranges is None
        if keep and node.name in self.rule_cache:  # type: ignore[operator]
            return self.rule_cache[node.name]  # type: ignore[index]
        cache = self.cache if ranges is None else None
        local, assumed_key = bound_node(
            node, self.graph, inputs_l, self.device, self.assume, self.missing, cache, ranges
        )
        if keep and local is not None and local.output_lipschitz is None:
            self.rule_cache[node.name] = (local, assumed_key)  # type: ignore[index]
        return local, assumed_key

    def node_ranges(self, node: Node) -> list[Interval | None] | None:
        """The inputs' value ranges for a rule that reads them (None: the rule's global answer, cacheable)."""
        op = ops.get(node.op)
        if not self.ranges or op is None or not op.uses_ranges:
            return None
        return [self.ranges.get(name) if name else None for name in node.inputs]

    def output_lipschitz(self, node: Node, local: LocalBound, inputs_l: list[float]) -> float:
        if local.output_lipschitz is not None:
            out_l = local.output_lipschitz
        else:
            # the local constant is w.r.t. the variable inputs taken together
            variables = [value for value in inputs_l if value > 0]
            together = variables[0] if len(variables) == 1 else math.sqrt(sum(v * v for v in variables))
            out_l = local.value * together
        if not local.bounded:
            out_l = math.inf
            if _responsible(local, inputs_l):
                self.reasons.append(UnboundedReason(node.name, node.op, local.reason or local.method))
        return math.inf if math.isnan(out_l) else out_l  # 0 * inf: unbounded on a branch scaled to zero

    def layer(
        self,
        node: Node,
        local: LocalBound,
        inputs_l: list[float],
        out_l: float,
        assumed_key: str | None,
        refined_by: str | None,
    ) -> LayerResult:
        first_variable = next(v for v, lip in zip(node.inputs, inputs_l, strict=True) if lip > 0)
        op = ops.get(node.op)
        return LayerResult(
            name=node.name,
            op=op.display_name(node) if op is not None else node.op,
            input_shape=self.graph.shape(first_variable),
            output_shape=self.graph.shape(node.outputs[0]) if node.outputs else None,
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


def _per_output(local: LocalBound, out_l: float, count: int) -> list[float]:
    """Each output's constant: the rule's per-output constants where it gives them (none above the node's),
    else the node's constant for all."""
    each = local.outputs_lipschitz
    if each is None or len(each) != count or not math.isfinite(out_l):
        return [out_l] * count
    return [min(out_l, lip) if lip >= 0 else out_l for lip in each]  # NaN: the node's constant


def _responsible(local: LocalBound, inputs_l: list[float]) -> bool:
    """Whether a node whose output is unbounded is a cause: its own constant is infinite (or it says why),
    or its inputs were all bounded. A residual Add after the real culprit only passes the infinity on."""
    return local.reason is not None or not math.isfinite(local.value) or all(math.isfinite(v) for v in inputs_l)


def compose(
    graph: Graph,
    assume: dict[str, float] | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressCallback | None = None,
    cache: LayerCache | None = None,
    refinements: Refinements | None = None,
    rule_cache: RuleCache | None = None,
    input_lipschitz: dict[str, float] | None = None,
    ranges: Mapping[str, Interval] | None = None,
) -> Composition:
    """Bound every node and the whole network. Raises UnsupportedOpsError listing all unknown ops.

    ``progress`` is told which node comes next (for a progress bar); ``cache`` answers nodes bounded
    before with the same weights, attributes and shapes (``lipcheck.cache``).
    ``refinements`` maps a value v to candidates (u, factor, method): a certified L(v) <= factor * L(u) from a
    chain or region bound (lipcheck.refine); the smallest of them and the product is kept. ``rule_cache`` keeps
    the rules' answers between walks over the same graph in one run (answers that depend on the inputs' constants
    are not kept). ``input_lipschitz``: the graph inputs' own constants where they are not 1 (a branch
    of an If, whose inputs are values of the enclosing graph). ``ranges``: every value's range on an input
    domain (``lipcheck.ranges``): the rules that read ranges give the constant on that domain.
    """
    state = _Walk(graph, dict(assume or {}), torch.device(device), cache, refinements, rule_cache, ranges)
    # integer and boolean inputs (indices, axes, masks) are not directions anyone perturbs
    state.lipschitz.update({name: 0.0 if graph.is_discrete(name) else 1.0 for name in graph.inputs})
    state.lipschitz.update(input_lipschitz or {})
    walk(graph.nodes, state.lipschitz, state.step, progress=progress)
    if state.missing:
        raise UnsupportedOpsError(state.missing)
    outputs_l = [state.lipschitz.get(o, 0.0) for o in graph.outputs]
    total = math.sqrt(sum(v * v for v in outputs_l)) if len(outputs_l) > 1 else (outputs_l[0] if outputs_l else 0.0)
    return Composition(
        upper_bound=None if state.reasons or not math.isfinite(total) else total,
        layers=state.layers,
        unbounded=state.reasons,
        assumptions=state.used_assumptions,
        output_lipschitz=outputs_l,
    )


def bound_node(
    node: Node,
    graph: Graph,
    inputs_l: list[float],
    device: torch.device,
    assume: dict[str, float],
    missing: dict[str, list[str]],
    cache: LayerCache | None = None,
    ranges: list[Interval | None] | None = None,
) -> tuple[LocalBound | None, str | None]:
    """The op's rule's answer (None for an op without rule, recorded in ``missing``) and the --assume key used."""
    if node.op in assume:
        return LocalBound(assume[node.op], "assumed (--assume)", certified=False), node.op
    op = ops.get(node.op)
    if op is None or not op.has_rule:
        missing.setdefault(node.op, []).append(node.name)
        return None, None
    try:
        context = RuleContext(node, graph, inputs_l, device, bound_subgraph, run_graph, ranges=ranges)
        if cache is not None:
            return cache.bound(context, op), None
        return op.lipschitz(context), None
    except UnsupportedVariant as exc:
        if exc.label in assume:  # e.g. --assume "Resize(mode=linear)=1.5"
            return LocalBound(assume[exc.label], "assumed (--assume)", certified=False), exc.label
        missing.setdefault(exc.label, []).append(node.name)
        return None, None


def bound_subgraph(
    graph: Graph, input_lipschitz: dict[str, float], device: torch.device, rule_cache: RuleCache | None = None
) -> SubgraphBound:
    """A graph an op holds (an If's branch, a loop's body), composed like the network with its inputs'
    constants; ``rule_cache`` keeps the rules' answers between calls (a loop's iterations)."""
    try:
        result = compose(graph, device=device, input_lipschitz=input_lipschitz, rule_cache=rule_cache)
    except UnsupportedOpsError as exc:
        raise UnsupportedVariant(f"subgraph with {', '.join(sorted(exc.ops))}") from None
    first = result.unbounded[0] if result.unbounded else None
    return SubgraphBound(
        output_lipschitz=result.output_lipschitz,
        certified=all(layer.certified for layer in result.layers),
        layers=len(result.layers),
        reason=None if first is None else f"{first.node} ({first.op}): {first.reason}",
    )
