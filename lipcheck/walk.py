"""The one walk over a graph, in the style of ``torch.fx.Interpreter``: an environment of values by name.

Every analysis is a walk that carries its own kind of value: Lipschitz constants (``lipcheck.compose``),
tensors (``lipcheck.interpret``), batches of vectors through a linear segment (``lipcheck.refine.affine``).
``walk`` visits the nodes in order, hands each its inputs' values, stores its outputs, frees a value after
its last use (unless kept), and wraps any failure once with the node it happened at. Which nodes a
result depends on is ``Graph.needed_nodes``. Both run in time linear in the size of the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, MutableMapping, Sequence
from typing import Any, TypeVar

from lipcheck.errors import LipcheckError
from lipcheck.graph import Node

V = TypeVar("V")
# step(node, input values) -> one value per output ('' inputs and outputs are given and take None)
Step = Callable[[Node, list[Any]], Sequence[Any]]
# progress(done, total, name): called before each node, and (total, total, "") at the end
ProgressCallback = Callable[[int, int, str], None]


class NodeError(LipcheckError):
    """A node failed during a walk (its name and op lead the message; the original error is the cause)."""

    def __init__(self, node: Node, error: BaseException):
        self.node = node
        super().__init__(f"node {node.name!r} ({node.op}): {type(error).__name__}: {error}")


def last_uses(nodes: Sequence[Node]) -> dict[int, list[str]]:
    """For each node index, the values read for the last time there."""
    last: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for value in node.inputs:
            if value:
                last[value] = index
    result: dict[int, list[str]] = {}
    for value, index in last.items():
        result.setdefault(index, []).append(value)
    return result


def walk(
    nodes: Sequence[Node],
    env: MutableMapping[str, V],
    step: Step,
    read: Callable[[str], V] | None = None,
    keep: Collection[str] | None = None,
    progress: ProgressCallback | None = None,
) -> MutableMapping[str, V]:
    """Run ``step`` on every node in order; return the environment of values by name.

    An input's value comes from ``env``, else from ``read(name)`` (constants, or a default); without
    ``read`` a missing value is None. ``keep``: the values to keep to the end; the others are dropped
    after their last use (None keeps everything). A failure inside ``step`` that is not already a
    LipcheckError becomes a ``NodeError`` naming the node.
    """
    frees = last_uses(nodes) if keep is not None else {}
    total = len(nodes)
    for index, node in enumerate(nodes):
        if progress is not None:
            progress(index, total, node.name)
        args = [_value(env, read, v) if v else None for v in node.inputs]
        try:
            results = step(node, args)
        except LipcheckError:
            raise
        except Exception as exc:
            raise NodeError(node, exc) from exc
        for name, value in zip(node.outputs, results, strict=False):
            if name:
                env[name] = value
        for value_name in frees.get(index, ()):
            if value_name not in keep:  # type: ignore[operator]
                env.pop(value_name, None)
    if progress is not None:
        progress(total, total, "")
    return env


def _value(env: Mapping[str, V], read: Callable[[str], V] | None, name: str) -> V | None:
    if name in env:
        return env[name]
    return read(name) if read is not None else None
