"""The steps made linear in the number of nodes give the results they gave when they were quadratic.

Speed itself is measured by ``benchmarks/deep_chain.py`` (a 100k-node chain), never by a timed test.
"""

from __future__ import annotations

import random

import onnx

from lipcheck.frontends.onnx_frontend import _topological, onnx_to_graph
from lipcheck.graph import unique_name
from lipcheck.passes import prepare
from tests.onnx_builders import model, node


def _levels(g: onnx.GraphProto) -> list[str]:
    """The former sort, a rescan of every pending node per level: the reference order."""
    available = {v.name for v in g.input} | {i.name for i in g.initializer} | {""}
    pending, ordered = list(g.node), []
    while pending:
        progress = [n for n in pending if all(i in available for i in n.input)]
        if not progress:
            ordered += pending
            break
        for n in progress:
            available.update(n.output)
        ordered += progress
        pending = [n for n in pending if n not in progress]
    return [n.name for n in ordered]


def test_topological_order_is_the_former_level_order() -> None:
    generator = random.Random(3)
    for trial in range(30):
        count = generator.randint(1, 60)
        nodes = []
        for i in range(count):
            sources = ["x"] + [f"v{j}" for j in range(i)]
            inputs = generator.sample(sources, k=min(len(sources), generator.randint(1, 3)))
            if trial % 5 == 0 and i == count - 1:
                inputs.append("dangling")  # never produced: placed after the rest
            nodes.append(node("Sum", inputs, [f"v{i}"], name=f"n{i}"))
        generator.shuffle(nodes)
        proto = model(nodes, {"x": [1, 4]}, outputs=[f"v{count - 1}"])
        assert [n.name for n in _topological(proto.graph)] == _levels(proto.graph)


def test_unique_names_with_counters_are_the_same_names() -> None:
    taken: set[str] = {"relu_3", "conv"}
    fast: set[str] = set(taken)
    counters: dict[str, int] = {}
    for base in ["relu"] * 8 + ["conv"] * 3 + ["relu_1", "relu"]:
        slow_name = unique_name(taken, base)
        taken.add(slow_name)
        fast_name = unique_name(fast, base, counters)
        fast.add(fast_name)
        assert slow_name == fast_name


def test_many_decomposed_activations_are_recognised_and_their_parts_dropped() -> None:
    """200 SiLUs written as x * Sigmoid(x) in a chain: each becomes one node, its Sigmoid leaves the graph."""
    nodes = []
    for i in range(200):
        nodes += [node("Sigmoid", [f"v{i}"], [f"s{i}"]), node("Mul", [f"v{i}", f"s{i}"], [f"v{i + 1}"])]
    graph = onnx_to_graph(model(nodes, {"v0": [1, 4]}, outputs=["v200"]), name="silu")
    prepare(graph)
    assert len(graph.nodes) == 200 and {n.attrs.get("activation") for n in graph.nodes} == {"SiLU"}
    assert [n.inputs[0] for n in graph.nodes] == [f"v{i}" for i in range(200)]
