"""Control flow: If, whose branches are graphs of their own (the ONNX frontend converts them).

An If's inputs are its condition and then every other outer value its branches read; a branch's
inputs are outer values by the same names. Loop and Scan have no rule: an unrolled bound would need the
trip count and the carried state's recursion, and the node is refused rather than guessed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lipcheck.graph import Graph, Node
from lipcheck.ops.base import EvalContext, LocalBound, Op, RuleContext, UnsupportedVariant, register, unbounded

_BRANCHES = ("then_branch", "else_branch")


def _branch(node: Node, key: str) -> Graph:
    branch = node.attrs.get(key)
    if not isinstance(branch, Graph):
        raise UnsupportedVariant("If (branches not converted)")
    return branch


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
        return LocalBound(relative, f"{method}: {worst.method}", certified, output_lipschitz=worst.value)

    def _branch_bound(self, ctx: RuleContext, key: str) -> LocalBound:
        given = dict(zip(ctx.node.inputs, ctx.input_lipschitz, strict=True))
        try:
            result = ctx.bound_subgraph(_branch(ctx.node, key), given, ctx.device)
        except UnsupportedVariant as exc:
            raise UnsupportedVariant(f"If ({key}: {exc.label})") from None
        if result.reason is not None:
            return unbounded(f"{key} {result.reason}")
        value = max(result.output_lipschitz, default=0.0)
        return LocalBound(value, f"{key} composed ({result.layers} layers)", certified=result.certified)

    def evaluate(self, ctx: EvalContext, condition: torch.Tensor, *captured: torch.Tensor) -> Any:
        key = _BRANCHES[0] if bool(torch.as_tensor(condition).all()) else _BRANCHES[1]
        branch = _branch(ctx.node, key)
        values = ctx.run_subgraph(
            branch, dict(zip(ctx.node.inputs, (condition, *captured), strict=True)), ctx.dtype, ctx.device
        )
        outputs = tuple(values[name] for name in branch.outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def subgraphs(self, node: Node) -> list[Graph]:
        return [_branch(node, key) for key in _BRANCHES]
