"""Value ranges: for an input domain (a box), an interval around every value of the graph.

One walk over the graph (``lipcheck.walk``) carrying ``Interval``s instead of tensors. Each node gets its
outputs' interval from, in order:

1. its op's ``value_range`` facet (products, quotients, softmax, normalisations, non-monotone activations);
2. exactness: every input known exactly (constants, shapes computed from shapes): the node is evaluated once;
3. monotonicity: an op marked ``monotone`` (non-decreasing in each input: ReLU, sigmoid, exp, Add, pooling,
   Concat, Reshape...) maps the low ends to the low end and the high ends to the high end;
4. its ``affine`` facet (a linear layer with constant weights, one variable input): centre and radius,
   c' = A c + b, r' = |A| r (interval bound propagation).

A node none of them covers gets no interval (None), nor does anything computed from it: the rules that need
ranges then keep their global answer. Intervals enclose the values of the network computed exactly (real
arithmetic), with lipcheck's own float64 rounding covered by an outward margin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lipcheck import ops
from lipcheck.graph import Graph, Node
from lipcheck.ops import EvalContext, NotFoldable, RuleContext, UnsupportedVariant
from lipcheck.ops.base import Interval, constant_tensor, variable_inputs, widen
from lipcheck.refine.affine import apply_node
from lipcheck.spectral.dense import UNIT_ROUNDOFF
from lipcheck.walk import walk

Ranges = dict[str, Interval]


def value_ranges(
    graph: Graph,
    inputs: Mapping[str, Interval],
    balls: Mapping[str, tuple[torch.Tensor, float]] | None = None,
    known: Mapping[str, Interval] | None = None,
) -> Ranges:
    """An interval for every value reachable from ``inputs`` that some rule covers (see the module doc).

    ``balls``: inputs that lie in an l2 ball (centre, radius) as well as in their box: a linear layer reading one
    maps it into A c + b +- R ||row_i(A)||, often far tighter than the box's |A| r. ``known``: intervals proven
    otherwise (``lipcheck.refine.ball_ranges``): each value's interval is cut to them."""
    walker = _RangeWalk(graph, dict(balls or {}), dict(known or {}))
    env: dict[str, Interval | None] = dict(inputs)
    walk(graph.nodes, env, walker.step, read=walker.constant)
    return {name: value for name, value in env.items() if value is not None}


class _RangeWalk:
    def __init__(self, graph: Graph, balls: dict[str, tuple[torch.Tensor, float]], known: dict[str, Interval]):
        self.graph = graph
        self.balls = balls
        self.known = known

    def constant(self, name: str) -> Interval | None:
        value = self.graph.constants.get(name)
        if value is None:
            return None
        tensor = constant_tensor(value, torch.float64, torch.device("cpu"))
        return Interval(tensor, tensor)

    def step(self, node: Node, inputs: list[Interval | None]) -> list[Interval | None]:
        op = ops.get(node.op)
        count = len(node.outputs)
        if op is None or any(value is None for name, value in zip(node.inputs, inputs, strict=True) if name):
            return [None] * count
        try:
            found = _node_range(op, node, self.graph, inputs)
        except (UnsupportedVariant, NotFoldable, NotImplementedError, RuntimeError, ValueError, TypeError):
            found = None
        if found is None:
            return [None] * count
        found = tuple(found)
        if found and found[0] is not None and node.inputs and node.inputs[0] in self.balls:
            found = (_ball_image(node, self.graph, found[0], *self.balls[node.inputs[0]]), *found[1:])
        cut = [self._cut(name, value) for name, value in zip(node.outputs, found, strict=False)]
        return cut + [None] * (count - len(cut))

    def _cut(self, name: str, value: Interval | None) -> Interval | None:
        other = self.known.get(name)
        if value is None or other is None:
            return value if value is not None else other
        return Interval(torch.maximum(value.lo, other.lo), torch.minimum(value.hi, other.hi))


def _node_range(op: ops.Op, node: Node, graph: Graph, inputs: list[Interval | None]) -> tuple[Interval | None, ...]:
    context = RuleContext(node, graph, [0.0 if value is None or value.exact else 1.0 for value in inputs])
    own = op.value_range(context, *inputs)
    if own is not None:
        return own if isinstance(own, tuple) else (own,)
    if not op.has_evaluate:
        return ()
    if all(value is None or value.exact for value in inputs):
        return _outputs(_evaluate(op, node, [None if v is None else v.lo for v in inputs]), exact=True)
    if op.is_monotone(node):
        low = _evaluate(op, node, [None if v is None else v.lo for v in inputs])
        high = _evaluate(op, node, [None if v is None else v.hi for v in inputs])
        return tuple(_widened(lo, hi) for lo, hi in zip(low, high, strict=True))
    if op.has_affine:
        return (_affine_range(node, graph, inputs),)
    return ()


def _evaluate(op: ops.Op, node: Node, args: list[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
    context = EvalContext(node, torch.float64, torch.device("cpu"))
    with torch.no_grad():
        result = op.evaluate(context, *args)
    return result if isinstance(result, tuple) else (result,)


def _outputs(values: tuple[torch.Tensor, ...], exact: bool) -> tuple[Interval | None, ...]:
    return tuple(Interval(v, v) if exact else None for v in values)


def _widened(low: torch.Tensor, high: torch.Tensor) -> Interval | None:
    """[low, high] pushed out by a few float64 ulps (the op ran in float64 on the ends); None for integers
    that moved (a step function of the input: no interval of ours describes it)."""
    if not low.is_floating_point():
        return Interval(low, low) if torch.equal(low, high) else None
    if bool(torch.isnan(low).any() | torch.isnan(high).any()):
        return None  # an end outside the function's domain (sqrt or log of a range reaching below 0)
    return widen(torch.minimum(low, high), torch.maximum(low, high))


def _affine_range(node: Node, graph: Graph, inputs: list[Interval | None]) -> Interval | None:
    """Centre and radius through a linear layer: A c + b +- (|A| r + rounding)."""
    variables = variable_inputs(node, graph)
    if len(variables) != 1:
        return None
    box = inputs[variables[0]]
    assert box is not None
    centre, radius = box.centre, box.radius
    out_centre = apply_node(node, graph, centre, "affine")
    out_radius = apply_node(node, graph, radius, "abs")
    op = ops.get(node.op)
    terms = op.rounding_terms(node, graph) if op is not None else 1
    scale = apply_node(node, graph, centre.abs() + radius, "abs") + out_centre.abs()
    slack = 2 * (terms + 2) * UNIT_ROUNDOFF * scale
    return Interval(out_centre - out_radius - slack, out_centre + out_radius + slack)


BALL_MAX_INPUTS = 4096  # the rows' norms come from the layer applied to the input's basis


def _ball_image(node: Node, graph: Graph, found: Interval, centre: torch.Tensor, radius: float) -> Interval:
    """``found`` cut to A c + b +- R ||row_i(A)|| when the node is a linear layer of the ball's input."""
    op = ops.get(node.op)
    if op is None or not op.has_affine or variable_inputs(node, graph) != [0] or centre.numel() > BALL_MAX_INPUTS:
        return found
    try:
        basis = torch.eye(centre.numel(), dtype=torch.float64).reshape(-1, *centre.shape[1:])
        columns = apply_node(node, graph, basis, "linear")
        middle = apply_node(node, graph, centre.reshape(1, *centre.shape[1:]), "affine")
    except (NotFoldable, RuntimeError, ValueError):
        return found
    rows = columns.square().sum(dim=0, keepdim=True).sqrt()
    terms = centre.numel() + op.rounding_terms(node, graph) + 2
    slack = 2 * terms * UNIT_ROUNDOFF * (apply_node(node, graph, centre.abs(), "abs") + middle.abs() + radius * rows)
    reach = radius * rows * (1 + 2 * terms * UNIT_ROUNDOFF) + slack
    low = torch.maximum(found.lo, (middle - reach).reshape(found.lo.shape))
    high = torch.minimum(found.hi, (middle + reach).reshape(found.hi.shape))
    return Interval(low, high)


def box(shape: tuple[int, ...], low: Any, high: Any) -> Interval:
    """The box of one input: ``low``/``high`` scalars or arrays broadcastable to ``shape`` (per channel: [C, 1, 1])."""
    lo = torch.as_tensor(low, dtype=torch.float64).broadcast_to(shape).clone()
    hi = torch.as_tensor(high, dtype=torch.float64).broadcast_to(shape).clone()
    return Interval(lo, hi)
