"""lipcheck's graph IR: a small, framework-free description of a network.

Frontends (ONNX, PyTorch) emit this; rules and composition read it. Op names use the ONNX operator
vocabulary, and frontends normalise attributes once (defaults filled in, attributes that moved to
inputs across opsets moved back to attributes), so rules never look at opset versions.
It imports neither onnx nor torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Shape = tuple[int | None, ...]


@dataclass
class Node:
    """One operation. ``inputs``/``outputs`` are value names; '' marks an omitted optional input."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    # names of nodes folded into this one (e.g. a BatchNorm merged into its conv)
    folded: list[str] = field(default_factory=list)


@dataclass
class Graph:
    """A DAG of nodes in topological order.

    ``constants`` holds every value known before the network runs (weights and folded constant
    subgraphs). ``shapes`` maps value names to their shapes where known (None for unknown dims).
    """

    nodes: list[Node]
    inputs: list[str]
    outputs: list[str]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    shapes: dict[str, Shape] = field(default_factory=dict)
    name: str = ""

    def producers(self) -> dict[str, Node]:
        return {out: node for node in self.nodes for out in node.outputs if out}

    def consumers(self) -> dict[str, list[Node]]:
        result: dict[str, list[Node]] = {}
        for node in self.nodes:
            for value in node.inputs:
                if value:
                    result.setdefault(value, []).append(node)
        return result

    def shape(self, value: str) -> Shape | None:
        if value in self.constants:
            return tuple(self.constants[value].shape)
        return self.shapes.get(value)

    def live_nodes(self) -> list[Node]:
        """Nodes that some graph output depends on, in topological order."""
        producers = self.producers()
        needed: set[str] = set()
        stack = list(self.outputs)
        seen_values: set[str] = set()
        while stack:
            value = stack.pop()
            if value in seen_values:
                continue
            seen_values.add(value)
            node = producers.get(value)
            if node is None or node.name in needed:
                continue
            needed.add(node.name)
            stack.extend(v for v in node.inputs if v)
        return [node for node in self.nodes if node.name in needed]

    def prune(self) -> None:
        """Drop nodes no output depends on (e.g. parts of a recognised pattern)."""
        self.nodes = self.live_nodes()

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)


def unique_name(taken: Iterable[str], base: str) -> str:
    taken = set(taken)
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"
