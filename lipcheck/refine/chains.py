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
from collections.abc import Mapping
from dataclasses import dataclass, field

from lipcheck import ops
from lipcheck.graph import Graph, Node
from lipcheck.ops import Slope, UnitSlopes, variable_inputs
from lipcheck.refine.affine import full_shape, is_foldable

# default limits: a folded segment is an explicit n_out x n_in float64 matrix
MAX_DIM = 1024
MAX_ENTRIES = 1024 * 1024


def activation_slope(node: Node, graph: Graph) -> Slope | None:
    """The slope interval of an elementwise activation (its op's ``slope`` facet; None for anything else)."""
    op = ops.get(node.op)
    return op.slope(node, graph) if op is not None else None


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

    def unit_slopes(self, graph: Graph, known: Mapping[str, UnitSlopes] | None) -> list[Slope | UnitSlopes]:
        """Each activation's slope: the node's ``known`` per-unit intervals (by node name), intersected with
        its op's scalar slope, where given; the scalar slope elsewhere. ValueError when a size does not match
        the activation's output (its one-sample size: the chain's matrices number units in C order)."""
        slopes: list[Slope | UnitSlopes] = []
        for node, slope in self.activations:
            units = (known or {}).get(node.name)
            if units is None:
                slopes.append(slope)
                continue
            shape = full_shape(graph, node.outputs[0])
            if shape is None or units.size != math.prod(shape[1:]):
                raise ValueError(f"unit slopes for {node.name}: {units.size} units, output shape {shape}")
            slopes.append(units.within(slope))
        return slopes

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
