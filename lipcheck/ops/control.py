"""Control flow: If, Loop and Scan, whose subgraphs are graphs of their own (the ONNX frontend converts them).

A control-flow node's inputs are the ones the file lists (``listed_inputs`` of them), then every other
outer value its subgraphs read. A subgraph's inputs are its formal ones (none for an If's branch; a loop
body's iteration number, condition, state and scan elements), then those outer values by the same names.

A Loop or Scan is unrolled: iteration k composes the body (``RuleContext.bound_subgraph``) with the constants of
the state it receives and of the outer values it reads, and hands the state's new constants to the next.
That is a deterministic function of the state's constants, so once they repeat every later iteration
repeats them, and the rest of the loop is counted in closed form. A scan output stacks one slice per
iteration: ||stack(a_k) - stack(b_k)||^2 = sum_k ||a_k - b_k||^2, so its constant is sqrt(sum_k L_k^2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lipcheck.errors import LipcheckError
from lipcheck.graph import Graph, Node
from lipcheck.ops.base import (
    EvalContext,
    LocalBound,
    Op,
    RuleContext,
    SubgraphBound,
    UnsupportedVariant,
    axis_index,
    register,
    unbounded,
)

_BRANCHES = ("then_branch", "else_branch")
ITERATION_CAP = 10_000  # iterations composed without the constants repeating before a loop is refused


def _subgraph(node: Node, key: str) -> Graph:
    graph = node.attrs.get(key)
    if not isinstance(graph, Graph):
        what = "branches" if key in _BRANCHES else "body"
        raise UnsupportedVariant(f"{node.op} ({what} not converted)")
    return graph


def _listed(node: Node) -> int:
    """How many of the node's inputs the file lists (the others are values its subgraphs capture)."""
    return int(node.attrs.get("listed_inputs", len(node.inputs)))


def _run(ctx: EvalContext, key: str, feeds: dict[str, Any]) -> tuple[Graph, dict[str, Any]]:
    """The subgraph and its values on ``feeds`` (the interpreter's runner; the function is made once)."""
    graph = _subgraph(ctx.node, key)
    return graph, ctx.run_subgraph(graph, feeds, ctx.dtype, ctx.device)


@register
class If(Op):
    """Runs one of two graphs: with a fixed condition, the output is one branch's, so max over the branches.

    A condition computed from the input switches between the branches: not Lipschitz (nothing says the
    branches agree where it switches). A constant condition picks its branch; one that depends only on
    values nobody perturbs (integer inputs, shapes) is fixed for any two inputs compared, so the larger of
    the two branches' bounds holds. Each branch is bounded by the same composition as the whole network,
    its inputs carrying the enclosing values' constants.
    """

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if ctx.is_variable(0):
            return unbounded("If switches on a condition computed from the input (discontinuous)")
        condition = ctx.const(0)
        keys = (
            _BRANCHES if condition is None else (_BRANCHES[0] if bool(np.asarray(condition).all()) else _BRANCHES[1],)
        )
        bounds = [self._branch_bound(ctx, key) for key in keys]
        worst = max(bounds, key=lambda bound: bound.value)
        if worst.reason is not None:
            return worst
        method = "taken branch" if condition is not None else "max over both branches"
        certified = all(bound.certified for bound in bounds)
        together = math.sqrt(sum(lip * lip for lip in ctx.input_lipschitz[1:]))
        # the constant w.r.t. the captured values taken together; an unbounded input only passes through
        relative = worst.value / together if math.isfinite(together) else 1.0
        each = [bound.outputs_lipschitz or () for bound in bounds]
        larger = tuple(map(max, *each)) if len(each) > 1 else each[0]  # each output: its larger branch
        same = len({len(values) for values in each}) == 1 and len(larger) == len(ctx.node.outputs)
        return LocalBound(
            relative,
            f"{method}: {worst.method}",
            certified,
            output_lipschitz=worst.value,
            outputs_lipschitz=larger if same else None,
        )

    def _branch_bound(self, ctx: RuleContext, key: str) -> LocalBound:
        given = dict(zip(ctx.node.inputs, ctx.input_lipschitz, strict=True))
        try:
            result = ctx.bound_subgraph(_subgraph(ctx.node, key), given, ctx.device, None)
        except UnsupportedVariant as exc:
            raise UnsupportedVariant(f"If ({key}: {exc.label})") from None
        if result.reason is not None:
            return unbounded(f"{key} {result.reason}")
        value = max(result.output_lipschitz, default=0.0)
        method = f"{key} composed ({result.layers} layers)"
        outputs = tuple(result.output_lipschitz)
        return LocalBound(value, method, certified=result.certified, outputs_lipschitz=outputs)

    def evaluate(self, ctx: EvalContext, condition: torch.Tensor, *captured: torch.Tensor) -> Any:
        key = _BRANCHES[0] if bool(torch.as_tensor(condition).all()) else _BRANCHES[1]
        branch, values = _run(ctx, key, dict(zip(ctx.node.inputs, (condition, *captured), strict=True)))
        outputs = tuple(values[name] for name in branch.outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def subgraphs(self, node: Node) -> list[Graph]:
        return [_subgraph(node, key) for key in _BRANCHES]


# ---------------------------------------------------------------------------------------------
# Loops: the body composed once per iteration, until its constants repeat


class _Body:
    """A Loop's or Scan's body as a function of its formal inputs' constants (the outer values it reads keep
    theirs). One rule cache per pattern of zero, finite and infinite input constants: a rule's answer
    depends on which inputs move, and is reused across iterations where the same ones do."""

    def __init__(self, ctx: RuleContext):
        self.op = ctx.node.op
        self.graph = _subgraph(ctx.node, "body")
        self.listed = _listed(ctx.node)
        self.formal = self.graph.inputs[: self.listed]
        outer = dict(zip(ctx.node.inputs, ctx.input_lipschitz, strict=True))
        missing = [name for name in self.graph.inputs[self.listed :] if name not in outer]
        if len(self.formal) != self.listed or missing:
            raise UnsupportedVariant(f"{self.op} (body inputs do not match the node's)")
        self.captured = {name: outer[name] for name in self.graph.inputs[self.listed :]}
        self.device = ctx.device
        self.bound_subgraph = ctx.bound_subgraph
        self.caches: dict[tuple[int, ...], dict[str, Any]] = {}
        self.certified = True

    def __call__(self, formal_l: Sequence[float]) -> SubgraphBound:
        given = {**self.captured, **dict(zip(self.formal, formal_l, strict=True))}
        pattern = tuple(0 if v == 0 else 1 if math.isfinite(v) else 2 for v in given.values())
        try:
            result = self.bound_subgraph(self.graph, given, self.device, self.caches.setdefault(pattern, {}))
        except UnsupportedVariant as exc:
            raise UnsupportedVariant(f"{self.op} (body: {exc.label})") from None
        self.certified = self.certified and result.certified
        return result


# one iteration: the state's constants -> (the next state's, this iteration's scan outputs'), or a verdict
Step = Callable[[list[float]], "tuple[list[float], list[float]] | LocalBound"]


def _unroll(
    step: Step, start: list[float], trips: int, first_stop: int, scan_outputs: int, label: str
) -> tuple[list[float], list[float], str] | LocalBound:
    """Final-state constants (the largest over the iterations the loop may stop after, first_stop..trips,
    the same for any two inputs compared), scan-output constants (sqrt of the sum over the trips
    iterations of their squares: a loop that stops earlier stacks fewer slices), and how they were found."""
    state, squares = list(start), [0.0] * scan_outputs
    best = list(start) if first_stop == 0 else [0.0] * len(start)
    done, repeated = 0, False
    while done < trips and not repeated:
        if done >= ITERATION_CAP:
            raise UnsupportedVariant(f"{label} (over {ITERATION_CAP} iterations without a fixed point)")
        answer = step(state)
        if isinstance(answer, LocalBound):
            return answer
        after, scans = answer
        done += 1
        repeated = after == state  # iteration k + 1 receives what iteration k did: so do all later ones
        repeats = trips - done + 1 if repeated else 1
        squares = [total + repeats * lip * lip for total, lip in zip(squares, scans, strict=True)]
        if done >= first_stop or repeated:  # a repeated state is also the state at every later stop
            best = [max(a, b) for a, b in zip(best, after, strict=True)]
        state = after
    method = f"unrolled {trips} iteration{'s' if trips != 1 else ''}"
    if repeated and done < trips:
        method += f" (constants fixed after {done})"
    if first_stop < trips:
        method += f", max over stopping after {first_stop} to {trips}"
    return best, [math.sqrt(total) for total in squares], method


def _loop_bound(ctx: RuleContext, unrolled: tuple[list[float], list[float], str], certified: bool) -> LocalBound:
    """The node's bound: the final states' and the scan outputs' constants, one per output."""
    states, scans, method = unrolled
    each = [*states, *scans]
    worst = max(each, default=0.0)
    if not math.isfinite(worst):
        return unbounded(f"{ctx.node.op}: the unrolled constants exceed the floating-point range ({method})")
    together = math.sqrt(sum(lip * lip for lip in ctx.input_lipschitz))
    outputs = len(ctx.node.outputs)
    per_output = tuple(each[:outputs]) if outputs <= len(each) else None
    return LocalBound(worst / together, method, certified, output_lipschitz=worst, outputs_lipschitz=per_output)


def _passes_unbounded(ctx: RuleContext) -> LocalBound | None:
    """An input that is already unbounded only passes through (the node that made it so is the cause)."""
    if all(math.isfinite(lip) for lip in ctx.input_lipschitz):
        return None
    return LocalBound(1.0, "an unbounded input passes through", output_lipschitz=math.inf)


def _body_verdict(result: SubgraphBound) -> LocalBound | None:
    return None if result.reason is None else unbounded(f"body {result.reason}")


def _stack(ctx: EvalContext, slices: list[torch.Tensor], axis: int, reverse: bool) -> torch.Tensor:
    """A scan output: one slice per iteration along ``axis`` (prepended when ``reverse``)."""
    if not slices:
        return ctx.float_tensor([])
    ordered = slices[::-1] if reverse else slices
    return torch.stack(ordered, dim=axis_index(axis, ordered[0].dim() + 1))


@register
class Loop(Op):
    """Runs its body M times: unrolled when M is a constant and when it stops does not depend on the input.

    Iteration k's state constants come from composing the body with the previous ones (the body's reads
    of the enclosing graph keep their constants); a scan output stacks one slice per iteration, so
    sqrt(sum_k L_k^2). A trip count or condition computed from the input changes how many iterations
    run: not Lipschitz. A trip count known only at run time has no bound over every value it may take.
    A body condition that depends only on values nobody perturbs stops both inputs compared at the same
    iteration: the final state's constant is then the largest over the iterations it may stop after
    (exactly M when the condition stays true: a constant, or the condition input passed on).
    """

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        passing = _passes_unbounded(ctx)
        if passing is not None:
            return passing
        body = _Body(ctx)
        states = body.listed - 2
        scan_outputs = len(body.graph.outputs) - 1 - states
        if states < 0 or scan_outputs < 0:
            raise UnsupportedVariant("Loop (body outputs do not match its state)")
        schedule = _schedule(ctx, body.graph)
        if isinstance(schedule, LocalBound):
            return schedule
        condition = body.graph.outputs[0]

        def step(state: list[float]) -> tuple[list[float], list[float]] | LocalBound:
            result = body([0.0, 0.0, *state])
            lip = result.output_lipschitz
            if lip[0] != 0:
                return unbounded(f"Loop stops on a condition computed from the input (body output {condition!r})")
            return _body_verdict(result) or (lip[1 : 1 + states], lip[1 + states :])

        trips, first_stop = schedule
        start = list(ctx.input_lipschitz[2 : body.listed])
        unrolled = _unroll(step, start, trips, first_stop, scan_outputs, "Loop")
        if isinstance(unrolled, LocalBound):
            return unrolled
        return _loop_bound(ctx, unrolled, body.certified)

    def evaluate(self, ctx: EvalContext, trips: Any, condition: Any, *rest: torch.Tensor) -> Any:
        body = _subgraph(ctx.node, "body")
        listed = _listed(ctx.node)
        formal, outputs = body.inputs[:listed], body.outputs
        outer = {n: v for n, v in zip(ctx.node.inputs, (trips, condition, *rest), strict=True) if n}
        outer = {name: value for name, value in outer.items() if name in body.inputs[listed:]}
        state = list(rest[: listed - 2])
        scans: list[list[torch.Tensor]] = [[] for _ in outputs[len(formal) - 1 :]]
        going = condition is None or bool(torch.as_tensor(condition).all())
        limit = None if trips is None else int(torch.as_tensor(trips).reshape(-1)[0])
        done = 0
        while going and (limit is None or done < limit):
            feeds = {formal[0]: ctx.int_tensor(done), formal[1]: torch.tensor(True, device=ctx.device)}
            _, values = _run(ctx, "body", {**outer, **feeds, **dict(zip(formal[2:], state, strict=True))})
            results = [values[name] for name in outputs]
            going, state = bool(torch.as_tensor(results[0]).all()), results[1 : len(formal) - 1]
            for slices, value in zip(scans, results[len(formal) - 1 :], strict=True):
                slices.append(value)
            done += 1
        return (*state, *(_stack(ctx, slices, 0, False) for slices in scans))

    def subgraphs(self, node: Node) -> list[Graph]:
        return [_subgraph(node, "body")]


def _schedule(ctx: RuleContext, body: Graph) -> tuple[int, int] | LocalBound:
    """(M, the first iteration the loop may stop after), or the verdict when when it stops is unknown."""
    starts = _starts(ctx)
    if isinstance(starts, LocalBound) or starts is False:
        return (0, 0) if starts is False else starts
    if ctx.is_variable(0):
        return unbounded("Loop's trip count is computed from the input")
    if not ctx.has_input(0):
        return unbounded("Loop runs until its condition turns false: the iteration count is known only at run time")
    value = ctx.const(0)
    if value is None:
        return unbounded("Loop's trip count is known only at run time")
    if np.asarray(value).size != 1:
        raise UnsupportedVariant("Loop (trip count not a scalar)")
    trips = max(int(np.asarray(value).reshape(-1)[0]), 0)
    if starts is None:  # a condition nobody perturbs, known at run time: 0 to M iterations
        return trips, 0
    return trips, trips if _always_continues(ctx, body) else min(trips, 1)


def _starts(ctx: RuleContext) -> bool | None | LocalBound:
    """Whether the first iteration runs: True, False, None (known at run time, not perturbed), or the verdict."""
    if not ctx.has_input(1):
        return True
    if ctx.is_variable(1):
        return unbounded("Loop's condition is computed from the input")
    value = ctx.const(1)
    if value is None:
        return None
    return bool(np.asarray(value).size == 1 and np.asarray(value).all())


def _always_continues(ctx: RuleContext, body: Graph) -> bool:
    """Whether the body's condition output is true whenever its condition input is: a constant true, or a
    function of the condition input alone (``cond_out = Identity(cond_in)``) that is true at true."""
    cond_in, cond_out = body.inputs[1], body.outputs[0]
    needed = body.needed_nodes([cond_out], given=body.inputs)
    read = {value for node in needed for value in node.inputs} | {cond_out}
    if any(value in body.inputs and value != cond_in for value in read):
        return False  # the iteration number, the state or outer values decide
    alone = Graph(needed, [cond_in], [cond_out], body.constants, body.shapes, dtypes=body.dtypes)
    try:
        value = ctx.run_subgraph(alone, {cond_in: torch.tensor(True)}, torch.float64, ctx.device)[cond_out]
    except (LipcheckError, RuntimeError, ValueError, TypeError, KeyError):
        return False
    return value.numel() == 1 and bool(value.all())


@register
class Scan(Op):
    """Runs its body once per slice of its scan inputs: unrolled over the scan length the shapes give.

    Iteration k receives the state's constants and a slice of each scan input, whose constant is at most
    the whole input's (a slice is a selection, norm 1: sound, and loose when the outputs reassemble the
    slices); a scan output stacks one slice per iteration: sqrt(sum_k L_k^2). The scan length must be
    known from the shapes (give --input-shape): the constant grows with it. Opset 8's batched form is
    refused.
    """

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        if ctx.attrs.get("batched"):
            raise UnsupportedVariant("Scan (opset 8, batched)")
        passing = _passes_unbounded(ctx)
        if passing is not None:
            return passing
        body = _Body(ctx)
        scan_inputs = int(ctx.attrs.get("num_scan_inputs") or 0)
        states = body.listed - scan_inputs
        scan_outputs = len(body.graph.outputs) - states
        if scan_inputs < 1 or states < 0 or scan_outputs < 0:
            raise UnsupportedVariant("Scan (body does not match its inputs)")
        trips = _scan_length(ctx, states, scan_inputs)
        if trips is None:
            return unbounded("Scan's sequence length is known only at run time: give --input-shape")
        elements = list(ctx.input_lipschitz[states : body.listed])  # a slice moves at most as much as its input

        def step(state: list[float]) -> tuple[list[float], list[float]] | LocalBound:
            result = body([*state, *elements])
            lip = result.output_lipschitz
            return _body_verdict(result) or (lip[:states], lip[states:])

        start = list(ctx.input_lipschitz[:states])
        unrolled = _unroll(step, start, trips, trips, scan_outputs, "Scan")
        if isinstance(unrolled, LocalBound):
            return unrolled
        return _loop_bound(ctx, unrolled, body.certified)

    def evaluate(self, ctx: EvalContext, *inputs: torch.Tensor) -> Any:
        body = _subgraph(ctx.node, "body")
        listed, attrs = _listed(ctx.node), ctx.attrs
        states = listed - int(attrs["num_scan_inputs"])
        formal, outputs = body.inputs[:listed], body.outputs
        outer = {name: value for name, value in zip(ctx.node.inputs, inputs, strict=True) if name}
        outer = {name: value for name, value in outer.items() if name in body.inputs[listed:]}
        sequences = inputs[states:listed]
        axes = [
            axis_index(a, x.dim()) for a, x in zip(_per(attrs, "scan_input_axes", sequences), sequences, strict=True)
        ]
        length = sequences[0].shape[axes[0]]
        state = list(inputs[:states])
        scans: list[list[torch.Tensor]] = [[] for _ in outputs[states:]]
        for k in range(length):
            picks = [length - 1 - k if d else k for d in _per(attrs, "scan_input_directions", sequences)]
            slices = [x.select(a, i) for x, a, i in zip(sequences, axes, picks, strict=True)]
            _, values = _run(ctx, "body", {**outer, **dict(zip(formal, [*state, *slices], strict=True))})
            results = [values[name] for name in outputs]
            state = results[:states]
            for collected, value in zip(scans, results[states:], strict=True):
                collected.append(value)
        stacked = (
            _stack(ctx, collected, axis, bool(direction))
            for collected, axis, direction in zip(
                scans, _per(attrs, "scan_output_axes", scans), _per(attrs, "scan_output_directions", scans), strict=True
            )
        )
        return (*state, *stacked)

    def check(self, node: Node) -> None:
        if node.attrs.get("batched"):
            raise UnsupportedVariant("Scan (opset 8, batched)")

    def subgraphs(self, node: Node) -> list[Graph]:
        return [_subgraph(node, "body")]


def _per(attrs: Any, key: str, items: Sequence[Any]) -> list[int]:
    """A per-input or per-output attribute of Scan, zeros when not given."""
    return [int(v) for v in (attrs.get(key) or [0] * len(items))]


def _scan_length(ctx: RuleContext, states: int, scan_inputs: int) -> int | None:
    """The number of iterations: a scan input's size along its scan axis (the largest known: they agree)."""
    axes = list(ctx.attrs.get("scan_input_axes") or [0] * scan_inputs)
    lengths = []
    for j, axis in enumerate(axes[:scan_inputs]):
        shape = ctx.shape(states + j)
        if shape is not None and -len(shape) <= axis < len(shape) and shape[axis] is not None:
            lengths.append(int(shape[axis]))
    return max(lengths) if lengths else None
