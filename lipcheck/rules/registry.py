"""The rule registry: one small function per op, registered with a decorator.

A rule receives a ``RuleContext`` (the node, its inputs' constants, shapes and Lipschitz constants)
and returns a ``LocalBound``. By default the composition multiplies the local constant by the
Lipschitz constant of the node's variable inputs taken together (sqrt of the sum of squares);
rules for ops such as Add set ``output_lipschitz`` themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lipcheck.errors import NonFiniteConstantError
from lipcheck.graph import Graph, Node, Shape, check_finite


@dataclass(frozen=True)
class LocalBound:
    """A rule's answer for one node.

    ``value`` is the node's Lipschitz constant w.r.t. its variable inputs (``math.inf`` when it is not
    globally Lipschitz, with ``reason`` saying why). ``certified``: a proven upper bound, rounding
    included. ``exact``: equal to the true constant (up to rounding).
    """

    value: float
    method: str
    certified: bool = True
    exact: bool = False
    output_lipschitz: float | None = None
    reason: str | None = None

    @property
    def bounded(self) -> bool:
        return math.isfinite(self.value) and (self.output_lipschitz is None or math.isfinite(self.output_lipschitz))


def unbounded(reason: str, method: str = "not globally Lipschitz") -> LocalBound:
    return LocalBound(math.inf, method, certified=True, reason=reason)


@dataclass
class RuleContext:
    node: Node
    graph: Graph
    input_lipschitz: list[float]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def attrs(self) -> dict:
        return self.node.attrs

    def const(self, index: int) -> np.ndarray | None:
        """The value of input ``index`` when it is known before the network runs (never one holding NaN)."""
        return self._checked(index, weight=False)

    def _checked(self, index: int, weight: bool) -> np.ndarray | None:
        """Every constant a rule reads comes through here: NaN is refused, and infinities in a weight
        (``lipcheck.graph.check_finite`` says why), naming the tensor and this node."""
        if index >= len(self.node.inputs) or not self.node.inputs[index]:
            return None
        name = self.node.inputs[index]
        try:
            value = self.graph.constants.get(name)
        except NonFiniteConstantError as exc:  # refused when read from the file: name the node too
            raise NonFiniteConstantError(exc.tensor, exc.problem, self.node.name, self.node.op) from None
        if value is not None:
            check_finite(name, value, self.node, weight=weight)
        return value

    def has_input(self, index: int) -> bool:
        return index < len(self.node.inputs) and bool(self.node.inputs[index])

    def is_variable(self, index: int) -> bool:
        return index < len(self.input_lipschitz) and self.input_lipschitz[index] > 0

    def variable_inputs(self) -> list[int]:
        return [i for i in range(len(self.node.inputs)) if self.is_variable(i)]

    def shape(self, index: int) -> Shape | None:
        if index >= len(self.node.inputs) or not self.node.inputs[index]:
            return None
        return self.graph.shape(self.node.inputs[index])

    def output_shape(self, index: int = 0) -> Shape | None:
        return self.graph.shape(self.node.outputs[index])

    def tensor(self, index: int) -> torch.Tensor:
        """A known constant input, read as a weight (finite), as a float64 tensor on the analysis device."""
        value = self._checked(index, weight=True)
        assert value is not None, f"input {index} of {self.node.name} is not a constant"
        return torch.as_tensor(np.asarray(value, dtype=np.float64), device=self.device)

    def broadcast_factor(self, index: int) -> float | None:
        """sqrt(how many output elements copy one element of input ``index``); None when unknown.

        Broadcasting repeats entries: an input copied r times enters the output's norm sqrt(r) times.
        """
        in_shape, out_shape = self.shape(index), self.output_shape()
        if in_shape is None or out_shape is None:
            return 1.0 if self._same_as_other_variable(index) else None
        if len(in_shape) > len(out_shape):
            return None
        padded = (1,) * (len(out_shape) - len(in_shape)) + tuple(in_shape)
        copies = 1
        for i, o in zip(padded, out_shape, strict=True):
            if i == o:
                continue
            if i == 1 and o is not None:
                copies *= o
            elif i == 1:  # broadcast to an unknown size
                return None
            # i is None or o is None with i != 1: shape inference lost track, sizes match at runtime
        return math.sqrt(copies)

    def _same_as_other_variable(self, index: int) -> bool:
        # Without shapes we can only rule out broadcasting of an input whose partner is a scalar.
        others = [i for i in range(len(self.node.inputs)) if i != index and self.has_input(i)]
        return all(self.const(i) is not None and np.asarray(self.const(i)).size == 1 for i in others)


RuleFunction = Callable[[RuleContext], LocalBound]


@dataclass(frozen=True)
class RegisteredRule:
    op: str
    function: RuleFunction
    summary: str


_RULES: dict[str, RegisteredRule] = {}


def rule(*ops: str) -> Callable[[RuleFunction], RuleFunction]:
    """Register ``function`` as the rule for each op in ``ops`` (an op may have only one rule)."""

    def register(function: RuleFunction) -> RuleFunction:
        summary = (function.__doc__ or "").strip().splitlines()[0] if function.__doc__ else ""
        for op in ops:  # check them all first: a refused registration leaves the registry as it was
            if op in _RULES:
                raise ValueError(f"duplicate rule for op {op!r}: {_RULES[op].function.__qualname__}")
        if len(set(ops)) != len(ops):
            raise ValueError(f"op listed twice in one registration: {ops}")
        for op in ops:
            _RULES[op] = RegisteredRule(op, function, summary)
        return function

    return register


def get_rule(op: str) -> RegisteredRule | None:
    return _RULES.get(op)


def registered_rules() -> list[RegisteredRule]:
    return [_RULES[op] for op in sorted(_RULES)]
