"""Find chains in the graph: linear segments separated by elementwise slope-restricted activations.

A chain maps one value u to another value v through  S_1, act_1, S_2, ..., act_{m-1}, S_m  where each
S_i is a run of linear nodes (folded into one matrix, see ``affine``) and each act_i applies one scalar
function whose difference quotients lie in [alpha_i, beta_i] (ReLU [0, 1], Sigmoid [0, 1/4], ...).
Every value strictly inside the chain has exactly one consumer and is not a graph output, so the chain is
a function of u alone: L(v) <= L_chain * L(u). Chains start anywhere (a residual branch is a chain from
the block's input to the Add), so the refined bound replaces the product wherever the graph has one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lipcheck.graph import Graph, Node
from lipcheck.refine.affine import full_shape, is_foldable, variable_inputs

# default limits: a folded segment is an explicit n_out x n_in float64 matrix
MAX_DIM = 1024
MAX_ENTRIES = 1024 * 1024


@dataclass(frozen=True)
class Slope:
    """Every difference quotient (f(x) - f(y)) / (x - y) of the activation lies in [low, high]."""

    low: float
    high: float

    @property
    def lipschitz(self) -> float:
        return max(abs(self.low), abs(self.high))

    @property
    def mid(self) -> float:
        return (self.low + self.high) / 2

    @property
    def radius(self) -> float:
        return (self.high - self.low) / 2


def activation_slope(node: Node, graph: Graph) -> Slope | None:
    """The slope interval of an elementwise activation (None for anything else)."""
    op, a = node.op, node.attrs
    if op in ("Relu", "Tanh", "Softplus", "Softsign", "Atan", "Celu"):
        return Slope(0.0, 1.0)
    if op == "Sigmoid":
        return Slope(0.0, 0.25)
    if op == "LeakyRelu":
        alpha = float(a.get("alpha", 0.01))
        return Slope(min(alpha, 1.0), max(alpha, 1.0))
    if op == "Elu":
        alpha = float(a.get("alpha", 1.0))
        return Slope(0.0, max(1.0, alpha)) if alpha >= 0 else None
    if op == "Selu":
        alpha, gamma = float(a.get("alpha", 1.6732632423543772)), float(a.get("gamma", 1.0507009873554805))
        return Slope(0.0, gamma * max(1.0, alpha) * (1 + 1e-15)) if alpha >= 0 and gamma >= 0 else None
    if op == "HardSigmoid":
        alpha = float(a.get("alpha", 0.2))
        return Slope(min(0.0, alpha), max(0.0, alpha))
    if op == "Clip":
        bounds = [graph.constants.get(v) for v in node.inputs[1:3] if v]
        if (
            any(b is None for b in bounds)
            or len(node.inputs) > 1
            and any(v and v not in graph.constants for v in node.inputs[1:])
        ):
            return None
        return Slope(0.0, 1.0)
    if op == "PRelu":
        slope = graph.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
        if slope is None:
            return None
        s = np.asarray(slope, dtype=np.float64)
        return Slope(min(1.0, float(s.min())), max(1.0, float(s.max())))
    if op == "Gelu":  # GELU'(x) + GELU'(-x) = 1 (also for the tanh form): slopes in [1 - S, S]
        from lipcheck.rules.activations import GELU_MAX_SLOPE, GELU_TANH_MAX_SLOPE

        top = (GELU_TANH_MAX_SLOPE if a.get("approximate", "none") == "tanh" else GELU_MAX_SLOPE) * (1 + 1e-6)
        return Slope(1.0 - top, top)
    if op == "Recognised" and str(a.get("activation", "")).split(" ")[0] in ("SiLU", "GELU"):
        # x * s(x) with s(x) + s(-x) = 1 has f'(x) + f'(-x) = 1: slopes in [1 - S, S] for S = max f'
        scale, bound = float(a["scale"]), float(a["lipschitz"])
        if scale > 0:
            return Slope(scale - bound, bound)
    return None


@dataclass
class Chain:
    """u -> S_1 -> act_1 -> ... -> S_m -> v."""

    start: str
    segments: list[list[Node]] = field(default_factory=list)
    activations: list[tuple[Node, Slope]] = field(default_factory=list)

    @property
    def nodes(self) -> list[Node]:
        result: list[Node] = []
        for i, segment in enumerate(self.segments):
            result.extend(segment)
            if i < len(self.activations):
                result.append(self.activations[i][0])
        return result

    @property
    def end(self) -> str:
        return self.segments[-1][-1].outputs[0]

    @property
    def slopes(self) -> list[Slope]:
        return [slope for _, slope in self.activations]

    def worth_refining(self) -> bool:
        """A chain of one linear node gains nothing over that node's own bound."""
        return len(self.segments) > 1 or len(self.segments[0]) > 1


def _segment_fits(segment: list[Node], graph: Graph, max_dim: int, max_entries: int) -> bool:
    first, last = segment[0], segment[-1]
    shape_in = full_shape(graph, first.inputs[variable_inputs(first, graph)[0]])
    shape_out = full_shape(graph, last.outputs[0])
    if shape_in is None or shape_out is None:
        return False
    n_in, n_out = math.prod(shape_in[1:]), math.prod(shape_out[1:])
    return max(n_in, n_out) <= max_dim and n_in * n_out <= max_entries


def find_chains(graph: Graph, max_dim: int = MAX_DIM, max_entries: int = MAX_ENTRIES) -> list[Chain]:
    """Maximal chains worth refining, in graph order (no node belongs to two chains)."""
    consumers = graph.consumers()
    outputs = set(graph.outputs)
    # raw paths of foldable linear nodes and slope-restricted activations
    paths: list[tuple[str, list[tuple[Node, Slope | None]]]] = []
    tails: dict[str, int] = {}
    for node in graph.nodes:
        variables = variable_inputs(node, graph)
        if len(variables) != 1 or len(node.outputs) != 1 or not node.outputs[0]:
            continue
        slope = activation_slope(node, graph)
        if slope is None and not is_foldable(node, graph):
            continue
        if slope is not None and full_shape(graph, node.outputs[0]) is None:
            continue
        value = node.inputs[variables[0]]
        index = tails.pop(value, None)
        if index is None or len(consumers.get(value, [])) != 1 or value in outputs:
            index = len(paths)
            paths.append((value, []))
        paths[index][1].append((node, slope))
        tails[node.outputs[0]] = index
    chains: list[Chain] = []
    for start, items in paths:
        chains.extend(_split(start, items, graph, max_dim, max_entries))
    return [chain for chain in chains if chain.worth_refining()]


def _split(
    start: str, items: list[tuple[Node, Slope | None]], graph: Graph, max_dim: int, max_entries: int
) -> list[Chain]:
    """Cut a raw path into chains: S (act S)*, breaking at two activations in a row or a segment too large."""
    chains: list[Chain] = []
    current: Chain | None = None
    segment: list[Node] = []
    pending: tuple[Node, Slope] | None = None  # an activation waiting for the next segment
    value = start

    def close_segment() -> None:
        nonlocal current, segment, pending
        if not segment:
            return
        if not _segment_fits(segment, graph, max_dim, max_entries):
            if current is not None:
                chains.append(current)
            current, pending = None, None
        elif current is None or pending is None:
            if current is not None:
                chains.append(current)
            first = segment[0]
            current = Chain(first.inputs[variable_inputs(first, graph)[0]], [segment], [])
        else:
            current.activations.append(pending)
            current.segments.append(segment)
        segment, pending = [], None

    for node, slope in items:
        if slope is None:
            segment.append(node)
        else:
            if segment:
                close_segment()
                pending = (node, slope) if current is not None else None
            else:  # two activations in a row, or one at the start: the chain ends before it
                if current is not None:
                    chains.append(current)
                current, pending = None, None
        value = node.outputs[0]
    close_segment()
    if current is not None:
        chains.append(current)
    del value
    return chains
