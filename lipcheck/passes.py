"""Graph passes run before bounding: each returns the same function with a tighter description.

* ``fold_batchnorm``: an inference BatchNorm next to a Conv, ConvTranspose or Gemm is merged into its
  weights (exact, and tighter than multiplying two norms).
* ``recognise_activations``: elementwise subgraphs that compute a known activation from primitives
  (x * Sigmoid(x) = SiLU, the Erf and Tanh forms of GELU, x * Tanh(Softplus(x)) = Mish,
  x * HardSigmoid(x) = HardSwish) are replaced by one node, instead of being seen as a product of
  two activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from lipcheck.graph import Graph, Node, unique_name
from lipcheck.rules.activations import (
    GELU_MAX_SLOPE,
    GELU_TANH_MAX_SLOPE,
    MISH_MAX_SLOPE,
    SILU_MAX_SLOPE,
)
from lipcheck.rules.linear import batchnorm_affine


def prepare(graph: Graph, fold_batchnorms: bool = True) -> Graph:
    """All passes, in order (``fold_batchnorms=False`` keeps BatchNorms as layers of their own)."""
    recognise_activations(graph)
    if fold_batchnorms:
        fold_batchnorm(graph)
    return graph


# ---------------------------------------------------------------------------------------------
# BatchNorm folding


def _add_constant(graph: Graph, base: str, value: np.ndarray) -> str:
    name = unique_name(set(graph.constants) | set(graph.shapes), base)
    graph.constants[name] = value
    return name


def _fold_after(graph: Graph, producer: Node, bn: Node, multiplier: np.ndarray, shift: np.ndarray) -> bool:
    """producer -> BN  becomes  producer' (weights scaled per output channel)."""
    weight = graph.constants.get(producer.inputs[1]) if len(producer.inputs) > 1 else None
    if weight is None:
        return False
    w = np.asarray(weight, dtype=np.float64)
    channels = multiplier.shape[0]
    if producer.op == "Conv":
        if w.shape[0] != channels:
            return False
        new_w = w * multiplier.reshape(-1, *([1] * (w.ndim - 1)))
    elif producer.op == "ConvTranspose":
        groups = int(producer.attrs.get("group", 1))
        if w.shape[1] * groups != channels:
            return False
        grouped = w.reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        new_w = (grouped * multiplier.reshape(groups, 1, -1, *([1] * (w.ndim - 2)))).reshape(w.shape)
    else:  # Gemm with a constant B: scale output columns
        if graph.constants.get(producer.inputs[0]) is not None or w.ndim != 2:
            return False
        trans_b = int(producer.attrs.get("transB", 0))
        if (w.shape[0] if trans_b else w.shape[1]) != channels:
            return False
        new_w = w * (multiplier[:, None] if trans_b else multiplier[None, :])
    old_bias = graph.constants.get(producer.inputs[2]) if len(producer.inputs) > 2 and producer.inputs[2] else None
    if producer.inputs[2:3] and producer.inputs[2] and old_bias is None:
        return False  # a variable bias: leave it
    if producer.op == "Gemm":
        beta = float(producer.attrs.get("beta", 1.0))
        c = np.zeros(channels) if old_bias is None else beta * np.asarray(old_bias, dtype=np.float64)
        new_bias = c * multiplier + shift
        producer.attrs["beta"] = 1.0
    else:
        b = np.zeros(channels) if old_bias is None else np.asarray(old_bias, dtype=np.float64)
        new_bias = b * multiplier + shift
    producer.inputs = [
        producer.inputs[0],
        _add_constant(graph, f"{producer.name}.folded_weight", new_w),
        _add_constant(graph, f"{producer.name}.folded_bias", new_bias),
    ]
    producer.outputs = list(bn.outputs[:1])
    producer.folded.append(bn.name)
    return True


def _fold_before(graph: Graph, bn: Node, consumer: Node, multiplier: np.ndarray, shift: np.ndarray) -> bool:
    """BN -> Conv/Gemm  becomes  Conv'/Gemm' (weights scaled per input channel).

    For a Gemm the shift becomes an exact bias. For a padded Conv the shift's effect near the border
    is not a bias: the node is marked ``inexact_offset`` (its Lipschitz constant is still exact).
    """
    weight = graph.constants.get(consumer.inputs[1]) if len(consumer.inputs) > 1 else None
    if weight is None:
        return False
    w = np.asarray(weight, dtype=np.float64)
    old_bias = graph.constants.get(consumer.inputs[2]) if len(consumer.inputs) > 2 and consumer.inputs[2] else None
    if len(consumer.inputs) > 2 and consumer.inputs[2] and old_bias is None:
        return False
    channels = multiplier.shape[0]
    if consumer.op == "Conv":
        groups = int(consumer.attrs.get("group", 1))
        if w.shape[1] * groups != channels:
            return False
        grouped = w.reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        shape = (groups, 1, w.shape[1], *([1] * (w.ndim - 2)))
        new_w = (grouped * multiplier.reshape(shape)).reshape(w.shape)
        offset = (grouped * shift.reshape(shape)).sum(axis=tuple(range(2, grouped.ndim))).reshape(-1)
        bias = (np.zeros(w.shape[0]) if old_bias is None else np.asarray(old_bias, dtype=np.float64)) + offset
        if any(int(p) for p in (consumer.attrs.get("pads") or [1])):
            consumer.attrs["inexact_offset"] = True
    elif consumer.op == "Gemm":
        if int(consumer.attrs.get("transA", 0)) or w.ndim != 2:
            return False
        trans_b = int(consumer.attrs.get("transB", 0))
        if (w.shape[1] if trans_b else w.shape[0]) != channels:
            return False
        b_matrix = w.T if trans_b else w  # [K, M]
        alpha, beta = float(consumer.attrs.get("alpha", 1.0)), float(consumer.attrs.get("beta", 1.0))
        new_w = w * (multiplier[None, :] if trans_b else multiplier[:, None])
        c = 0.0 if old_bias is None else beta * np.asarray(old_bias, dtype=np.float64)
        bias = c + alpha * (shift @ b_matrix)
        consumer.attrs["beta"] = 1.0
    else:
        return False
    consumer.inputs = [
        bn.inputs[0],
        _add_constant(graph, f"{consumer.name}.folded_weight", new_w),
        _add_constant(graph, f"{consumer.name}.folded_bias", np.asarray(bias)),
    ]
    consumer.folded.insert(0, bn.name)
    return True


def fold_batchnorm(graph: Graph) -> None:
    """Merge each inference BatchNorm into the Conv/ConvTranspose/Gemm before it, else after it."""
    changed = True
    while changed:
        changed = False
        producers, consumers = graph.producers(), graph.consumers()
        for bn in graph.nodes:
            if bn.op != "BatchNormalization" or not bn.inputs:
                continue
            affine = batchnorm_affine(graph, bn)
            if affine is None:
                continue
            x = bn.inputs[0]
            producer = producers.get(x)
            if (
                producer is not None
                and producer.op in ("Conv", "ConvTranspose", "Gemm")
                and len(consumers.get(x, [])) == 1
                and x not in graph.outputs
                and _fold_after(graph, producer, bn, *affine)
            ):
                graph.nodes.remove(bn)
                changed = True
                break
            y = bn.outputs[0]
            users = consumers.get(y, [])
            if (
                len(users) == 1
                and y not in graph.outputs
                and users[0].op in ("Conv", "Gemm")
                and users[0].inputs[0] == y
                and _fold_before(graph, bn, users[0], *affine)
            ):
                graph.nodes.remove(bn)
                changed = True
                break
    graph.prune()


# ---------------------------------------------------------------------------------------------
# Recognising activations built from primitives

_UNARY: dict[str, Callable[[torch.Tensor, dict], torch.Tensor]] = {
    "Sigmoid": lambda x, a: torch.sigmoid(x),
    "Tanh": lambda x, a: torch.tanh(x),
    "Softplus": lambda x, a: torch.nn.functional.softplus(x),
    "Erf": lambda x, a: torch.erf(x),
    "Relu": lambda x, a: torch.relu(x),
    "Exp": lambda x, a: torch.exp(x),
    "Neg": lambda x, a: -x,
    "Abs": lambda x, a: x.abs(),
    "Identity": lambda x, a: x,
    "HardSigmoid": lambda x, a: torch.clamp(float(a.get("alpha", 0.2)) * x + float(a.get("beta", 0.5)), 0, 1),
}
_BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": torch.div,
    "Pow": torch.pow,
}


def _sigmoid_like(alpha: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t * torch.clamp(alpha * t + 0.5, 0, 1)


# name, reference function, sup |f'|
KNOWN_ACTIVATIONS: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], float]] = [
    ("SiLU", lambda t: t * torch.sigmoid(t), SILU_MAX_SLOPE),
    ("GELU", lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))), GELU_MAX_SLOPE),
    (
        "GELU (tanh)",
        lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3))),
        GELU_TANH_MAX_SLOPE,
    ),
    ("Mish", lambda t: t * torch.tanh(torch.nn.functional.softplus(t)), MISH_MAX_SLOPE),
    ("HardSwish", _sigmoid_like(1 / 6), 1.5),
    ("HardSwish (alpha 0.2)", _sigmoid_like(0.2), 1.5),
]
_GRID = torch.cat(
    [
        torch.linspace(-40, 40, 16001, dtype=torch.float64),
        torch.tensor([-1e4, -1e3, -100.0, 100.0, 1e3, 1e4], dtype=torch.float64),
    ]
)
_MATCH_TOLERANCE = 2e-6  # relative to max(1, |f|): float32 constants such as 1.4142135 pass


def _scalar(graph: Graph, value: str) -> float | None:
    const = graph.constants.get(value)
    if const is None or np.asarray(const).size != 1:
        return None
    return float(np.asarray(const).reshape(-1)[0])


def _region(graph: Graph, product: Node, source: str, producers: dict[str, Node]) -> list[Node] | None:
    """Elementwise nodes between ``source`` and ``product`` if every path back ends at ``source``."""
    region: dict[str, Node] = {}
    stack = [v for v in product.inputs if v]
    while stack:
        value = stack.pop()
        if value == source or _scalar(graph, value) is not None:
            continue
        node = producers.get(value)
        if node is None or node.op not in _UNARY and node.op not in _BINARY:
            return None
        if node.name not in region:
            region[node.name] = node
            stack.extend(v for v in node.inputs if v)
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    return sorted(region.values(), key=lambda n: order[n.name])


def _evaluate(graph: Graph, nodes: list[Node], product: Node, source: str) -> torch.Tensor | None:
    values: dict[str, torch.Tensor] = {source: _GRID}

    def get(name: str) -> torch.Tensor:
        if name in values:
            return values[name]
        return torch.tensor(_scalar(graph, name), dtype=torch.float64)

    with np.errstate(all="ignore"):
        for node in [*nodes, product]:
            if node.op in _UNARY:
                out = _UNARY[node.op](get(node.inputs[0]), node.attrs)
            else:
                out = _BINARY[node.op](get(node.inputs[0]), get(node.inputs[1]))
            values[node.outputs[0]] = out
    result = values[product.outputs[0]]
    return result if result.shape == _GRID.shape else None


def identify_activation(values: torch.Tensor) -> tuple[str, float, float] | None:
    """(name, scale c, sup|g'|) when values = c * f(grid) for a known activation f."""
    if not torch.isfinite(values).all():
        return None
    for name, function, slope in KNOWN_ACTIVATIONS:
        reference = function(_GRID)
        scale = float((values * reference).sum() / (reference * reference).sum())
        if scale == 0.0:
            continue
        error = (values - scale * reference).abs() / (abs(scale) * reference.abs().clamp_min(1.0))
        if float(error.max()) <= _MATCH_TOLERANCE:
            # the margin covers the tiny mismatch between the graph's constants and the reference
            return name, scale, abs(scale) * slope * (1 + 1e-4)
    return None


def _candidate_sources(product: Node, producers: dict[str, Node], graph: Graph) -> list[str]:
    """Values every input of the product depends on, nearest first."""
    ancestor_sets = []
    for value in product.inputs:
        if not value or _scalar(graph, value) is not None:
            continue
        seen: list[str] = []
        stack = [value]
        while stack and len(seen) < 64:
            v = stack.pop()
            if v in seen:
                continue
            seen.append(v)
            node = producers.get(v)
            if node is not None and (node.op in _UNARY or node.op in _BINARY):
                stack.extend(i for i in node.inputs if i)
        ancestor_sets.append(seen)
    if not ancestor_sets:
        return []
    common = [v for v in ancestor_sets[0] if all(v in s for s in ancestor_sets[1:])]
    order = {out: i for i, node in enumerate(graph.nodes) for out in node.outputs}
    return sorted(common, key=lambda v: -order.get(v, -1))


def recognise_activations(graph: Graph) -> None:
    """Replace products that compute a known activation by a single ``Recognised`` node."""
    for product in reversed(list(graph.nodes)):
        if product not in graph.nodes or product.op not in ("Mul", "Div"):
            continue
        producers = graph.producers()
        variable_inputs = [v for v in product.inputs if v and v not in graph.constants]
        if len(variable_inputs) < 2 and product.op == "Mul":
            # a constant times a product, as in 0.5 * (x * (1 + erf(x / sqrt2))) = GELU: try it whole
            inner = producers.get(variable_inputs[0]) if variable_inputs else None
            if inner is None or inner.op not in ("Mul", "Div"):
                continue
        for source in _candidate_sources(product, producers, graph):
            nodes = _region(graph, product, source, producers)
            if nodes is None:
                continue
            values = _evaluate(graph, nodes, product, source)
            found = identify_activation(values) if values is not None else None
            if found is None:
                continue
            name, scale, slope = found
            scale_note = "" if abs(scale - 1) < 1e-6 else f" x {scale:.6g}"
            index = graph.nodes.index(product)
            graph.nodes[index] = Node(
                name=product.name,
                op="Recognised",
                inputs=[source],
                outputs=list(product.outputs),
                attrs={
                    "activation": name,
                    "scale": scale,
                    "lipschitz": slope,
                    "method": f"recognised {name}{scale_note} from {len(nodes) + 1} ops: max |f'|",
                },
                folded=[n.name for n in nodes],
            )
            graph.prune()
            break
