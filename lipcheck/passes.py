"""Graph passes run before bounding: each returns the same function with a tighter description.

* ``fold_batchnorm``: a per-channel affine node (inference BatchNorm) next to a layer that can absorb
  it (Conv, ConvTranspose, Gemm) is merged into the layer's weights: exact, and tighter than
  multiplying two norms.
* ``recognise_activations``: elementwise subgraphs that compute a known activation from primitives
  (x * Sigmoid(x) = SiLU, the Erf and Tanh forms of GELU, x * Tanh(Softplus(x)) = Mish,
  x * HardSigmoid(x) = HardSwish) are replaced by one ``Recognised`` node, instead of being seen as a
  product of two activations. The subgraph is run by the ops' own ``evaluate`` on a grid of inputs.

* ``recognise_wrap_padding``: a region of entry-moving nodes (Slice, Gather, Concat...) that computes a wrap
  padding of one value (TorchScript's export of ``padding_mode="circular"``: a Slice/Slice/Concat per axis) is
  replaced by one ``Pad(mode=wrap)``, which ``fold_wrap_padding`` then merges into the conv after it.

* ``recognise_switches``: ``Where(u(x) > t, a(x), b(x))`` whose pieces a and b meet at the one point
  where the affine u(x) crosses t (thresholded activations, ReLU written as a Where) is replaced by one
  ``Piecewise`` node bounded by the larger piece constant, instead of being a switch (not Lipschitz).
* ``recognise_sorting``: a Concat of sorted entries of one value's groups (ReduceMin/ReduceMax, TopK: GroupSort),
  of max(a, b) and min(a, b) for disjoint selections a, b of one value (MaxMin), or of relu(x) and relu(-x)
  (CReLU) is replaced by one ``Nonexpansive`` node: 1, where the Concat rule gives sqrt(2) or 2. The structure
  proves it (constant positions, distinct ranks, disjoint pairs), not an evaluation.
* ``recognise_l2_pooling``: x^2, a mean over full windows, then c sqrt (torch's LPPool written out) is replaced
  by ``LpPool(p=2)`` times its scale, instead of x^p and sign, which have no global constant.
* ``merge_rejoined_selections``: a Concat of Slices, Split outputs and Gathers of constant positions of one
  value along the concatenation axis (torch.roll) is one Gather: sqrt(most copies of an entry), not
  sqrt(number of branches).

Passes ask the ops for facets (``channel_affine``, ``fold_output_affine``, ``decomposes_activations``...);
they never test op names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from lipcheck import ops
from lipcheck.errors import LipcheckError
from lipcheck.graph import Graph, Node, Shape, unique_name
from lipcheck.ops.activations import KNOWN_ACTIVATIONS, Recognised
from lipcheck.ops.arithmetic import Mul
from lipcheck.ops.base import EvalContext, add_constant, constant_tensor, variable_inputs
from lipcheck.ops.elementwise import Piecewise
from lipcheck.ops.pooling import LpPool
from lipcheck.ops.selection import Gather, Nonexpansive, Pad
from lipcheck.ops.spatial import padded_indices
from lipcheck.walk import walk


def prepare(graph: Graph, fold_batchnorms: bool = True) -> Graph:
    """All passes, in order (``fold_batchnorms=False`` keeps BatchNorms as layers of their own)."""
    recognise_activations(graph)
    recognise_switches(graph)
    recognise_sorting(graph)
    recognise_l2_pooling(graph)
    recognise_wrap_padding(graph)  # before the selections merge: a wrap padding is one of them
    merge_rejoined_selections(graph)
    fold_wrap_padding(graph)
    if fold_batchnorms:
        fold_batchnorm(graph)
    return graph


def _op(node: Node) -> ops.Op:
    """The node's op (a bare Op, with no facet, for an op lipcheck does not know)."""
    return ops.get(node.op) or ops.Op()


# ---------------------------------------------------------------------------------------------
# Wrap padding: a circular convolution written as Pad(wrap) then a valid Conv (torch's padding_mode="circular")


def fold_wrap_padding(graph: Graph) -> None:
    """Merge each wrap padding into the layer that alone reads it, when the layer can take it (one pass)."""
    producers, consumers = graph.producers(), graph.consumers()
    removed: set[int] = set()
    for node in graph.nodes:
        x = node.inputs[0] if node.inputs else ""
        pad = producers.get(x)
        if pad is None or len(consumers.get(x, [])) != 1 or x in graph.outputs:
            continue
        pads = _op(pad).wrap_pads(graph, pad)
        if pads is not None and _op(node).absorb_wrap_padding(graph, node, pad, pads):
            node.inputs[0] = pad.inputs[0]
            removed.add(id(pad))
    if removed:
        graph.nodes = [node for node in graph.nodes if id(node) not in removed]


# Wrap padding written as selections: Slice + Concat per axis (TorchScript), a Gather of wrapped indices

WRAP_REGION_NODES = 64  # entry-moving nodes looked at behind one candidate
WRAP_ENTRIES = 1 << 24  # largest padded value whose index map is computed (bigger ones keep their own nodes)


def recognise_wrap_padding(graph: Graph) -> None:
    """Replace each region of entry-moving nodes that computes a wrap padding of one value by one Pad(wrap).

    A region ends where a moved value is read by an op that is not a mover (or is a graph output). Its
    nodes only copy entries, so the region is the 0/1 selection map that its output on distinct values
    (1, 2, 3... in float64, exact) spells out: if that map is the wrap padding's, entry for entry, the
    region is that padding. Concatenated branches would otherwise count sqrt(3) per padded axis, and the
    conv after them would be bounded on the padded grid instead of as the circular conv it is."""
    producers, consumers = graph.producers(), graph.consumers()
    order = {id(node): i for i, node in enumerate(graph.nodes)}
    replaced = False
    for index, node in enumerate(graph.nodes):
        if not _ends_moving_region(graph, node, consumers):
            continue
        pad = _as_wrap_pad(graph, node, producers, order)
        if pad is not None:
            graph.nodes[index] = pad
            producers[pad.outputs[0]] = pad
            order[id(pad)] = index
            replaced = True
    if replaced:  # the slices nothing else reads
        graph.prune()


def _ends_moving_region(graph: Graph, node: Node, consumers: dict[str, list[Node]]) -> bool:
    if not _op(node).moves_entries or len(node.outputs) != 1 or _op(node).wrap_pads(graph, node) is not None:
        return False
    out = node.outputs[0]
    return out in graph.outputs or any(not _op(user).moves_entries for user in consumers.get(out, []))


def _moving_region(graph: Graph, end: Node, producers: dict[str, Node]) -> tuple[list[Node], str] | None:
    """The entry-moving nodes behind ``end`` and the one variable value (of floats) they all read; None when
    they read more than one. Constants they read are parameters (integers), or data that ``_index_map``
    reads as zeros: entries from no source entry."""
    region: dict[int, Node] = {}
    sources: set[str] = set()
    stack = [end]
    while stack:
        node = stack.pop()
        if id(node) in region:
            continue
        region[id(node)] = node
        if len(region) > WRAP_REGION_NODES:
            return None
        for value in filter(None, node.inputs):
            producer = producers.get(value)
            if value in graph.constants:
                continue
            if producer is not None and _op(producer).moves_entries:
                stack.append(producer)
            else:
                sources.add(value)
    if len(sources) != 1 or graph.is_discrete(next(iter(sources))):
        return None
    return list(region.values()), sources.pop()


def _as_wrap_pad(graph: Graph, end: Node, producers: dict[str, Node], order: dict[int, int]) -> Node | None:
    """One Pad(mode=wrap) node computing what ``end`` computes, when its region is a wrap padding."""
    found = _moving_region(graph, end, producers)
    if found is None:
        return None
    nodes, source = found
    shape, out_shape = graph.shape(source), graph.shape(end.outputs[0])
    if not _may_pad(shape, out_shape):
        return None
    index_map = _index_map(graph, sorted(nodes, key=lambda n: order[id(n)]), source, shape)  # type: ignore[arg-type]
    if index_map is None:
        return None
    pads = _wrap_pads_of(index_map, shape)  # type: ignore[arg-type]
    if pads is None:
        return None
    folded = [n.name for n in nodes if n is not end]
    return Node(end.name, Pad.name, [source], list(end.outputs), {"mode": "wrap", "pads": pads}, folded)


def _may_pad(shape: Shape | None, out_shape: Shape | None) -> bool:
    """Known shapes of one rank, the output at least the input on every axis and larger on one, not too big."""
    if shape is None or out_shape is None or len(shape) != len(out_shape) or None in shape or None in out_shape:
        return False
    if any(o < n for o, n in zip(out_shape, shape, strict=True)) or tuple(out_shape) == tuple(shape):  # type: ignore[operator]
        return False
    return 0 < math.prod(out_shape) <= WRAP_ENTRIES  # type: ignore[arg-type]


def _index_map(graph: Graph, nodes: list[Node], source: str, shape: Sequence[int]) -> torch.Tensor | None:
    """Which source entry (flat, from 0) each output entry of the region holds; None if some output entry
    holds none (a constant fill, or a float constant's entry: those are read as 0, the source's as 1, 2...).

    The source holds floats, and movers keep their data's type, so an integer constant is never data here."""
    ids = torch.arange(1, math.prod(shape) + 1, dtype=torch.float64).reshape(tuple(shape))

    def read(name: str) -> torch.Tensor:
        value = constant_tensor(graph.constants[name], torch.float64, torch.device("cpu"))
        return value if graph.is_discrete(name) else torch.zeros_like(value)

    def step(node: Node, args: list[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
        out = _op(node).evaluate(EvalContext(node, torch.float64, torch.device("cpu")), *args)
        return out if isinstance(out, tuple) else (out,)

    try:
        values = walk(nodes, {source: ids}, step, read=read)
    except LipcheckError:
        return None
    result = values[nodes[-1].outputs[0]]  # the region's end: every other node of it is its ancestor
    if result.dim() != len(shape) or not bool((result >= 1).all()):
        return None
    return result.to(torch.int64) - 1


def _wrap_pads_of(index_map: torch.Tensor, shape: Sequence[int]) -> list[int] | None:
    """The ONNX pads [begins..., ends...] of the wrap padding of ``shape`` whose index map this is, or None.

    The first output entry fixes the begin pad of every axis (it holds source entry -begin mod n); the
    output size fixes the end pad; then the whole map must be that padding's."""
    first = int(index_map.reshape(-1)[0])
    begins: list[int] = []
    ends: list[int] = []
    for axis in reversed(range(len(shape))):
        n = int(shape[axis])
        first, position = divmod(first, n)
        begin = (-position) % n
        end = index_map.shape[axis] - n - begin
        if end < 0:
            return None
        begins.insert(0, begin)
        ends.insert(0, end)
    expected = torch.arange(math.prod(shape), dtype=torch.int64).reshape(tuple(shape))
    for axis, (n, begin, end) in enumerate(zip(shape, begins, ends, strict=True)):
        expected = expected.index_select(axis, torch.from_numpy(padded_indices(int(n), begin, end, "wrap")))
    return begins + ends if torch.equal(expected, index_map) else None


# ---------------------------------------------------------------------------------------------
# BatchNorm folding


def _fold_one(graph: Graph, node: Node, producers: dict[str, Node], consumers: dict[str, list[Node]]) -> bool:
    """Merge a per-channel affine node into the layer before it, else the one after it (True if done)."""
    affine = _op(node).channel_affine(graph, node) if node.inputs else None
    if affine is None:
        return False
    x, y = node.inputs[0], node.outputs[0]
    producer = producers.get(x)
    if (
        producer is not None
        and len(consumers.get(x, [])) == 1
        and x not in graph.outputs
        and _op(producer).fold_output_affine(graph, producer, *affine)
    ):
        producer.outputs = list(node.outputs[:1])
        producer.folded.append(node.name)
        return True
    users = consumers.get(y, [])
    if len(users) == 1 and y not in graph.outputs and users[0].inputs[0] == y:
        consumer = users[0]
        if _op(consumer).fold_input_affine(graph, consumer, *affine):
            consumer.inputs[0] = node.inputs[0]
            consumer.folded.insert(0, node.name)
            return True
    return False


def fold_batchnorm(graph: Graph) -> None:
    """Merge each inference BatchNorm into the Conv/ConvTranspose/Gemm before it, else after it.

    Passes over the graph until one folds nothing (a fold can enable one earlier in the graph: a BatchNorm
    before another that folded into the conv after it), each linear: the producers and readers are updated
    as nodes fold, never recomputed, and folded nodes leave the list once per pass."""
    changed = True
    while changed:
        producers, consumers = graph.producers(), graph.consumers()
        folded: set[int] = set()
        for node in graph.nodes:
            if _fold_one(graph, node, producers, consumers):
                folded.add(id(node))
                _after_fold(node, producers, consumers)
        graph.nodes = [node for node in graph.nodes if id(node) not in folded]
        changed = bool(folded)
    graph.prune()


def _after_fold(node: Node, producers: dict[str, Node], consumers: dict[str, list[Node]]) -> None:
    """Keep the maps true once ``node`` (input x, output y) has folded into the layer before or after it."""
    x, y = node.inputs[0], node.outputs[0]
    users = consumers.pop(y, [])
    if producers.get(x) is not None and producers[x].outputs[:1] == [y]:  # into its producer, which now makes y
        producers[y] = producers.pop(x)
        consumers.pop(x, None)
        consumers[y] = users
    else:  # into its consumer, which now reads x
        consumers[x] = [user for user in consumers.get(x, []) if user is not node] + users
        producers.pop(y, None)


# ---------------------------------------------------------------------------------------------
# Recognising activations built from primitives

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


def _region(
    graph: Graph, values: list[str], source: str, producers: dict[str, Node], order: dict[str, int]
) -> list[Node] | None:
    """Elementwise nodes between ``source`` and ``values`` if every path back ends at ``source`` (``order``: each
    value's producer's position in the graph)."""
    region: dict[str, Node] = {}
    stack = [v for v in values if v]
    while stack:
        value = stack.pop()
        if value == source or _scalar(graph, value) is not None:
            continue
        node = producers.get(value)
        if node is None or not _op(node).decomposes_activations:
            return None
        if node.name not in region:
            region[node.name] = node
            stack.extend(v for v in node.inputs if v)
    return sorted(region.values(), key=lambda n: order[n.outputs[0]])


def _evaluate(graph: Graph, nodes: list[Node], source: str, grid: torch.Tensor = _GRID) -> torch.Tensor | None:
    """The region's output on the grid (its scalar constants broadcast), by the ops' ``evaluate``."""

    def scalar(name: str) -> torch.Tensor:
        return torch.tensor(_scalar(graph, name), dtype=torch.float64)

    def step(node: Node, args: list[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
        out = _op(node).evaluate(EvalContext(node, torch.float64, torch.device("cpu")), *args)
        return out if isinstance(out, tuple) else (out,)

    with np.errstate(all="ignore"):
        values = walk(nodes, {source: grid}, step, read=scalar)
    result = values[nodes[-1].outputs[0]]
    return result if result.shape == grid.shape else None


def identify_activation(values: torch.Tensor) -> tuple[str, float] | None:
    """(name, scale c) when values = c * f(grid) for a known activation f."""
    if not torch.isfinite(values).all():
        return None
    for name, (function, _) in KNOWN_ACTIVATIONS.items():
        reference = function(_GRID)
        scale = float((values * reference).sum() / (reference * reference).sum())
        if scale == 0.0:
            continue
        error = (values - scale * reference).abs() / (abs(scale) * reference.abs().clamp_min(1.0))
        if float(error.max()) <= _MATCH_TOLERANCE:
            return name, scale
    return None


def _candidate_sources(values: list[str], producers: dict[str, Node], graph: Graph, order: dict[str, int]) -> list[str]:
    """Values every one of ``values`` depends on, nearest first."""
    ancestor_sets = []
    for value in values:
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
            if node is not None and _op(node).decomposes_activations:
                stack.extend(i for i in node.inputs if i)
        ancestor_sets.append(seen)
    if not ancestor_sets:
        return []
    common = [v for v in ancestor_sets[0] if all(v in s for s in ancestor_sets[1:])]
    return sorted(common, key=lambda v: -order.get(v, -1))


def _worth_trying(product: Node, graph: Graph, producers: dict[str, Node]) -> bool:
    """A product of two activations, or a constant scaling of one (0.5 * (x * (1 + erf(x / sqrt2))) = GELU)."""
    variable_inputs = [v for v in product.inputs if v and v not in graph.constants]
    if len(variable_inputs) >= 2:
        return True
    inner = producers.get(variable_inputs[0]) if variable_inputs else None
    return inner is not None and _op(inner).recognition_root


def _recognise(graph: Graph, product: Node, producers: dict[str, Node], order: dict[str, int]) -> Node | None:
    """The Recognised node replacing ``product`` and the region before it, if it is a known activation."""
    for source in _candidate_sources(product.inputs, producers, graph, order):
        nodes = _region(graph, product.inputs, source, producers, order)
        if nodes is None:
            continue
        values = _evaluate(graph, [*nodes, product], source)
        found = identify_activation(values) if values is not None else None
        if found is None:
            continue
        name, scale = found
        attrs = {"activation": name, "scale": scale}
        return Node(product.name, Recognised.name, [source], list(product.outputs), attrs, [n.name for n in nodes])
    return None


def recognise_activations(graph: Graph) -> None:
    """Replace products that compute a known activation by a single ``Recognised`` node.

    Linear in the graph's size (plus the work per candidate): the producers, positions and readers are found
    once, and a replaced region's nodes are dropped by counting their remaining readers, not by pruning the
    whole graph after each replacement."""
    producers = graph.producers()
    order = {out: i for i, node in enumerate(graph.nodes) for out in node.outputs}
    readers = {value: len(users) for value, users in graph.consumers().items()}
    dead: set[int] = set()
    for index in reversed(range(len(graph.nodes))):
        product = graph.nodes[index]
        if id(product) in dead or not _op(product).recognition_root or not _worth_trying(product, graph, producers):
            continue
        recognised = _recognise(graph, product, producers, order)
        if recognised is None:
            continue
        graph.nodes[index] = recognised
        producers.update({out: recognised for out in recognised.outputs})
        readers[recognised.inputs[0]] = readers.get(recognised.inputs[0], 0) + 1
        _release(product.inputs, graph, producers, readers, dead)
    if dead:
        graph.nodes = [node for node in graph.nodes if id(node) not in dead]
        graph.prune()


def _release(
    values: list[str], graph: Graph, producers: dict[str, Node], readers: dict[str, int], dead: set[int]
) -> None:
    """One reader fewer for each value; a node none of whose outputs is read any more (nor a graph output) is
    dead, and releases its own inputs in turn."""
    stack = [v for v in values if v]
    while stack:
        value = stack.pop()
        readers[value] = readers.get(value, 0) - 1
        node = producers.get(value)
        if node is None or id(node) in dead or readers[value] > 0:
            continue
        if all(readers.get(out, 0) <= 0 and out not in graph.outputs for out in node.outputs):
            dead.add(id(node))
            stack.extend(v for v in node.inputs if v)


# ---------------------------------------------------------------------------------------------
# Recognising switches whose pieces meet

_MEET_TOLERANCE = 2.0**-23  # relative to max(1, |piece|): below float32 resolution


def recognise_switches(graph: Graph) -> None:
    """Replace each ``Where`` whose pieces meet where its condition switches by one ``Piecewise`` node."""
    producers = graph.producers()
    order = {out: i for i, node in enumerate(graph.nodes) for out in node.outputs}
    replaced = False
    for index, select in enumerate(graph.nodes):
        if not _op(select).selects or len(select.inputs) != 3:
            continue
        piecewise = _piecewise(graph, select, producers, order)
        if piecewise is not None:
            graph.nodes[index] = piecewise
            producers.update(dict.fromkeys(piecewise.outputs, piecewise))
            replaced = True
    if replaced:  # the comparison and pieces nothing else reads
        graph.prune()


def _piecewise(graph: Graph, select: Node, producers: dict[str, Node], order: dict[str, int]) -> Node | None:
    """The Piecewise node for ``select`` = Where(compare(u, t), a, b), when u, a, b are elementwise
    functions of one value x, u is affine in x, and a and b agree where u crosses t."""
    condition, *pieces = select.inputs
    compare = producers.get(condition)
    if compare is None or not _op(compare).compares:
        return None
    operands = [v for v in compare.inputs if _scalar(graph, v) is None]
    thresholds = [_scalar(graph, v) for v in compare.inputs if _scalar(graph, v) is not None]
    if len(operands) != 1 or len(thresholds) != 1:
        return None
    values = [v for v in (operands[0], *pieces) if _scalar(graph, v) is None]
    for source in _candidate_sources(values, producers, graph, order):
        region = _region(graph, values, source, producers, order)
        if region is None:
            continue
        if not _affine_path(graph, operands[0], source, producers):
            continue
        function = _subgraph(graph, [*region, compare, select], source, [select.outputs[0]])
        switch = _switch_point(function, operands[0], float(thresholds[0]))  # type: ignore[arg-type]
        if switch is None or not _pieces_meet(function, pieces, switch):
            continue
        lipschitz = _pieces_constant(graph, region, source, [p for p in pieces if _scalar(graph, p) is None])
        if lipschitz is None:
            continue
        attrs = {"function": function, "lipschitz": lipschitz, "switch": switch}
        folded = [n.name for n in [*region, compare]]
        return Node(select.name, Piecewise.name, [source], list(select.outputs), attrs, folded)
    return None


def _affine_path(graph: Graph, value: str, source: str, producers: dict[str, Node]) -> bool:
    """Whether ``value`` is built from ``source`` by ops with an affine action on one variable input and
    scalar constants only (sums, scalings, x / c): affine, so it crosses a threshold at most once. The one
    such variant that is not affine (c / x) is told apart by the grid check of ``_switch_point``."""
    stack = [value]
    while stack:
        current = stack.pop()
        if current == source:
            continue
        node = producers.get(current)
        if node is None or type(_op(node)).affine is ops.Op.affine:
            return False
        variables = [v for v in node.inputs if v and _scalar(graph, v) is None]
        if len(variables) != 1:
            return False
        stack.append(variables[0])
    return True


def _subgraph(graph: Graph, nodes: list[Node], source: str, outputs: list[str]) -> Graph:
    """``nodes`` as a graph of ``source`` alone, with the constants they read."""
    names = {v for node in nodes for v in node.inputs if v}
    constants = {v: np.asarray(graph.constants[v]) for v in names if v != source and v in graph.constants}
    values = names | {v for node in nodes for v in node.outputs}
    shapes = {v: graph.shapes[v] for v in values if v in graph.shapes}
    function = Graph(nodes=list(nodes), inputs=[source], outputs=outputs, constants=constants, shapes=shapes)
    function.nodes = function.needed_nodes()
    return function


def _run(function: Graph, values: list[str], points: torch.Tensor) -> list[torch.Tensor]:
    from lipcheck.interpret import GraphFunction

    run = GraphFunction(function).run({function.inputs[0]: points}, values)
    return [torch.broadcast_to(run[v].to(torch.float64), points.shape) for v in values]


def _switch_point(function: Graph, operand: str, threshold: float) -> float | None:
    """Where u(x) = threshold, when u is affine in x on the grid (so that point is the only switch)."""
    (u,) = _run(function, [operand], _GRID)
    if not torch.isfinite(u).all():
        return None
    slope = float((u[-2] - u[-5]) / (_GRID[-2] - _GRID[-5]))  # from 1e3 and -1e3
    offset = float(u[-2] - slope * _GRID[-2])
    if slope == 0.0 or not bool(((u - (slope * _GRID + offset)).abs() <= 1e-9 * u.abs().clamp_min(1.0)).all()):
        return None
    return (threshold - offset) / slope


def _pieces_meet(function: Graph, pieces: list[str], switch: float) -> bool:
    a, b = _run(function, pieces, torch.tensor([switch], dtype=torch.float64))
    gap = float((a - b).abs().max())
    return math.isfinite(gap) and gap <= _MEET_TOLERANCE * max(1.0, float(a.abs().max()), float(b.abs().max()))


def _pieces_constant(graph: Graph, region: list[Node], source: str, pieces: list[str]) -> float | None:
    """The larger of the pieces' constants as functions of ``source``, by composition; None if unbounded."""
    from lipcheck.compose import compose
    from lipcheck.errors import UnsupportedOpsError

    if not pieces:
        return 0.0
    try:
        result = compose(_subgraph(graph, region, source, pieces))
    except UnsupportedOpsError:
        return None
    constant = max(result.output_lipschitz)
    return constant if math.isfinite(constant) and not result.unbounded else None


# ---------------------------------------------------------------------------------------------
# Selections along one axis: which entries of a value another value holds

Selected = tuple[str, list[Node], np.ndarray]  # (source, the selections in order, positions along the axis)


def _selected(graph: Graph, value: str, axis: int, producers: dict[str, Node]) -> Selected | None:
    """``value`` as entries of an earlier value along ``axis``, through the Slices, Splits and Gathers of
    constant positions before it (none: the value itself); the positions come from the selections' own
    ``evaluate`` run on the positions 0..n-1."""
    path: list[Node] = []
    source, node = value, producers.get(value)
    while node is not None and _op(node).selection_axis(node, graph) == axis:
        path.append(node)
        source = node.inputs[0]
        node = producers.get(source)
    path.reverse()
    shape = graph.shape(source)
    if shape is None or axis >= len(shape) or shape[axis] is None:
        return None
    n = int(shape[axis])  # type: ignore[arg-type]
    probe = torch.arange(n, dtype=torch.float64).reshape([n if i == axis else 1 for i in range(len(shape))])

    def step(node: Node, args: list[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
        out = _op(node).evaluate(EvalContext(node, torch.float64, torch.device("cpu")), *args)
        return out if isinstance(out, tuple) else (out,)

    def read(name: str) -> torch.Tensor:
        return constant_tensor(graph.constants[name], torch.float64, torch.device("cpu"))

    try:
        picked = walk(path, {source: probe}, step, read=read)[value]
    except LipcheckError:
        return None
    if picked.dim() != len(shape) or picked.numel() != picked.shape[axis]:
        return None
    return source, path, picked.reshape(-1).round().to(torch.int64).numpy()


# ---------------------------------------------------------------------------------------------
# Selections that rejoin: one selection map, sqrt(the most copies of one entry), not sqrt(branches)


def merge_rejoined_selections(graph: Graph) -> None:
    """Replace each Concat of selections of one value along the concatenation axis (Slice, Split, Gather of
    constant positions: ``torch.roll``, channel permutations) by one Gather of that value: its rule counts the
    copies of each entry (a permutation: 1) where the Concat rule charges sqrt(number of branches)."""
    producers = graph.producers()
    replaced = False
    for index, join in enumerate(graph.nodes):
        axis = _op(join).joined_axis(join, graph)
        if axis is None or len(join.inputs) < 2 or not all(join.inputs):
            continue
        makers = [producers.get(value) for value in join.inputs]
        if not any(m is not None and _op(m).selection_axis(m, graph) == axis for m in makers):
            continue
        picks = [_selected(graph, value, axis, producers) for value in join.inputs]
        if any(p is None for p in picks) or len({p[0] for p in picks}) != 1 or not any(p[1] for p in picks):  # type: ignore[index]
            continue
        positions = np.concatenate([p[2] for p in picks])  # type: ignore[index]
        indices = add_constant(graph, f"{join.name}.positions", positions)
        folded = list(dict.fromkeys(node.name for p in picks for node in p[1]))  # type: ignore[index]
        source = picks[0][0]  # type: ignore[index]
        gather = Node(join.name, Gather.name, [source, indices], join.outputs[:1], {"axis": axis}, folded)
        graph.nodes[index] = producers[join.outputs[0]] = gather  # a later Concat may select from it in turn
        replaced = True
    if replaced:
        graph.prune()


# ---------------------------------------------------------------------------------------------
# Sorting idioms written out: pairs sorted by Max and Min, order statistics concatenated, CReLU

Idiom = tuple[str, list[Node], str, str]  # (source, the nodes before the Concat, name, the structure found)


def recognise_sorting(graph: Graph) -> None:
    """Replace each Concat that provably computes a 1-Lipschitz sorting idiom of one value by one
    ``Nonexpansive`` node (the Concat rule would charge sqrt(2) or 2 for a GroupSort or a MaxMin)."""
    producers = graph.producers()
    order = {out: i for i, node in enumerate(graph.nodes) for out in node.outputs}
    replaced = False
    for index, join in enumerate(graph.nodes):
        if _op(join).joined_axis(join, graph) is None or len(join.inputs) < 2 or not all(join.inputs):
            continue
        moves = [_rearranged(graph, value, producers) for value in join.inputs]
        parts = [part for part, _ in moves]
        makers = [producers.get(part) for part in parts]
        if any(maker is None for maker in makers):
            continue
        found = _sorting_idiom(graph, parts, makers, producers)  # type: ignore[arg-type]
        if found is None:
            continue
        source, nodes, idiom, why = found
        nodes = [*nodes, *(node for _, moved in moves for node in moved)]
        region = sorted({id(n): n for n in nodes}.values(), key=lambda n: order[n.outputs[0]])
        attrs = {"function": _subgraph(graph, [*region, join], source, join.outputs[:1]), "idiom": idiom, "why": why}
        folded = [n.name for n in region]
        graph.nodes[index] = Node(join.name, Nonexpansive.name, [source], join.outputs[:1], attrs, folded)
        replaced = True
    if replaced:
        graph.prune()


def _rearranged(graph: Graph, value: str, producers: dict[str, Node]) -> tuple[str, list[Node]]:
    """The value that ``value`` moves the entries of, through Reshapes, Unsqueezes, Transposes (torch.stack
    writes an Unsqueeze before its Concat): placing entries elsewhere, each once, keeps a map 1-Lipschitz."""
    moved: list[Node] = []
    node = producers.get(value)
    while node is not None and _op(node).rearranges and len(variable_inputs(node, graph)) == 1:
        moved.append(node)
        value = node.inputs[0]
        node = producers.get(value)
    return value, moved


def _sorting_idiom(graph: Graph, parts: list[str], makers: list[Node], producers: dict[str, Node]) -> Idiom | None:
    return (
        _order_statistics(graph, parts, makers)
        or _sorted_pairs(graph, makers, producers)
        or _concatenated_relu(makers, producers)
    )


def _order_statistics(graph: Graph, parts: list[str], makers: list[Node]) -> Idiom | None:
    """Each part holds entries of the same groups of one value, sorted (ReduceMax, ReduceMin, TopK's values),
    and no entry of a sorted group twice: a selection of the sorted groups (deel-torchlip's GroupSort2)."""
    stats = [
        _op(m).order_statistics(m, graph) if m.outputs[0] == v else None for m, v in zip(makers, parts, strict=True)
    ]
    if any(s is None for s in stats) or len({m.inputs[0] for m in makers}) != 1:
        return None
    if len({(s.axes, s.size) for s in stats}) != 1:  # type: ignore[union-attr]
        return None
    ranks = [r for s in stats for r in s.ranks]  # type: ignore[union-attr]
    if len(ranks) != len(set(ranks)):
        return None
    size = stats[0].size  # type: ignore[union-attr]
    idiom = "GroupSort" if len(ranks) == size else "order statistics"
    why = f"{len(ranks)} of the sorted {size} entries of each group, each once (sorting is 1-Lipschitz)"
    return makers[0].inputs[0], makers, idiom, why


def _sorted_pairs(graph: Graph, makers: list[Node], producers: dict[str, Node]) -> Idiom | None:
    """max(a, b) and min(a, b) of two disjoint selections a, b of one value along one axis: each pair sorted
    (orthogonium's MaxMin: Split, Max, Min, Concat)."""
    if len(makers) != 2 or {_op(m).extremum for m in makers} != {"max", "min"}:
        return None
    operands = [sorted(m.inputs) for m in makers]
    if operands[0] != operands[1] or len(operands[0]) != 2 or "" in operands[0] or operands[0][0] == operands[0][1]:
        return None
    axes = [_op(n).selection_axis(n, graph) for v in operands[0] if (n := producers.get(v)) is not None]
    axis = next((a for a in axes if a is not None), None)  # one operand may be the value itself
    picks = [_selected(graph, value, axis, producers) for value in operands[0]] if axis is not None else [None]
    if any(p is None for p in picks) or picks[0][0] != picks[1][0]:  # type: ignore[index]
        return None
    (source, path_a, at_a), (_, path_b, at_b) = picks  # type: ignore[misc]
    positions = np.concatenate([at_a, at_b])
    if at_a.size != at_b.size or np.unique(positions).size != positions.size:
        return None
    why = f"max and min of {at_a.size} disjoint pairs along axis {axis}: each pair sorted"
    return source, [*path_a, *path_b, *makers], "MaxMin", why


def _concatenated_relu(makers: list[Node], producers: dict[str, Node]) -> Idiom | None:
    """max(x, 0) and max(-x, 0) (deel-torchlip's MaxMin, CReLU): per entry |x - y| when the signs agree, else
    sqrt(x^2 + y^2) <= |x - y|."""
    if len(makers) != 2 or not all(_op(m).positive_part for m in makers):
        return None
    x, y = (m.inputs[0] for m in makers)
    for plain, negated in ((x, y), (y, x)):
        negation = producers.get(negated)
        if negation is not None and _op(negation).negates and negation.inputs[0] == plain:
            return plain, [*makers, negation], "CReLU", "max(x, 0) and max(-x, 0) of each entry"
    return None


# ---------------------------------------------------------------------------------------------
# l2-norm pooling written out: sqrt(c * mean over windows of x^2)

_NONNEGATIVE = torch.cat(
    [
        torch.linspace(0, 40, 4001, dtype=torch.float64),
        torch.tensor([1.0, 1e-12, 1e-6, 1e-3, 100.0, 1e3, 1e4, 1e8], dtype=torch.float64),
    ]
)
_LINE = torch.cat([_GRID, torch.tensor([1.0], dtype=torch.float64)])  # 1 exactly: the constant is the value there
_EXACT = 1e-14  # relative: exporters' decompositions match up to float64 rounding (a few ulps), nothing more


def recognise_l2_pooling(graph: Graph) -> None:
    """Replace h(x) -> mean over full windows -> t as ``LpPool(p=2)`` times a scale, when h(x) = c2 x^2 and
    t(m) = c1 sqrt(m) (torch's LPPool: x^2, AveragePool, sign(m) relu(|m|), times k, ^0.5): the output is
    c1 sqrt(c2 / taps) ||window of x||_2. h and t are matched on grids, as activations are; the norm's rule
    then follows from the pooling geometry."""
    producers, consumers = graph.producers(), graph.consumers()
    order = {out: i for i, node in enumerate(graph.nodes) for out in node.outputs}
    replaced = False
    for pool in list(graph.nodes):
        geometry = _op(pool).window_mean(pool, graph)
        if geometry is None or not pool.inputs:
            continue
        head = _square(graph, pool.inputs[0], producers, order)
        tail = _square_root(graph, pool.outputs[0], producers, consumers, order) if head is not None else None
        if head is None or tail is None:
            continue
        _replace_by_lp_pool(graph, pool, geometry, head, tail)
        producers, consumers = graph.producers(), graph.consumers()
        order = {out: i for i, node in enumerate(graph.nodes) for out in node.outputs}
        replaced = True
    if replaced:
        graph.prune()


def _square(
    graph: Graph, value: str, producers: dict[str, Node], order: dict[str, int]
) -> tuple[str, list[Node], float] | None:
    """(x, nodes, c2) when ``value`` = c2 x^2 elementwise, c2 > 0."""
    for source in _candidate_sources([value], producers, graph, order):
        nodes = _region(graph, [value], source, producers, order)
        if not nodes:
            continue
        values = _evaluate(graph, nodes, source, _LINE)
        c2 = _multiple(values, _LINE * _LINE) if values is not None else None
        if c2 is not None and c2 > 0:
            return source, nodes, c2
    return None


def _square_root(
    graph: Graph, value: str, producers: dict[str, Node], consumers: dict[str, list[Node]], order: dict[str, int]
) -> tuple[Node, list[Node], float] | None:
    """(last node, nodes, c1) for the furthest elementwise function of ``value`` (>= 0) that is c1 sqrt(value)."""
    reached: dict[int, Node] = {}
    stack = [value]
    while stack and len(reached) < 32:
        for user in consumers.get(stack.pop(), []):
            if _op(user).decomposes_activations and id(user) not in reached:
                reached[id(user)] = user
                stack.extend(user.outputs)
    for last in sorted(reached.values(), key=lambda n: -order[n.outputs[0]]):
        nodes = _region(graph, [last.outputs[0]], value, producers, order)
        values = _evaluate(graph, nodes, value, _NONNEGATIVE) if nodes else None
        c1 = _multiple(values, _NONNEGATIVE.sqrt()) if values is not None else None
        if c1 is not None and c1 > 0:
            return last, nodes, c1  # type: ignore[return-value]
    return None


def _multiple(values: torch.Tensor, reference: torch.Tensor) -> float | None:
    """c when values = c * reference on the grid (relative error below ``_EXACT``); c is the value at 1."""
    at_one = (reference == 1.0).nonzero()
    if not torch.isfinite(values).all() or at_one.numel() == 0:
        return None
    c = float(values[at_one[0, 0]])
    error = (values - c * reference).abs() / (abs(c) * reference.abs()).clamp_min(1.0)
    return c if float(error.max()) <= _EXACT else None


def _replace_by_lp_pool(
    graph: Graph,
    pool: Node,
    geometry: dict,
    head: tuple[str, list[Node], float],
    tail: tuple[Node, list[Node], float],
) -> None:
    """LpPool(p=2) of x in place of the tail's last node, then a Mul by the scale unless it is 1."""
    (source, head_nodes, c2), (last, tail_nodes, c1) = head, tail
    taps = math.prod(geometry["kernel_shape"])
    scale = math.sqrt(c1 * c1 * c2 / taps)
    if scale != 1.0:
        scale *= 1 + _EXACT + 4 * 2.0**-52  # the match's tolerance and the three roundings above, up
    folded = [n.name for n in [*head_nodes, pool, *tail_nodes]]
    attrs = {**geometry, "p": 2, "auto_pad": "NOTSET"}
    output = last.outputs[0]
    taken = {v for node in graph.nodes for v in node.outputs} | set(graph.inputs) | set(graph.constants)
    pooled = output if scale == 1.0 else unique_name(taken, f"{pool.outputs[0]}.l2")
    nodes = [Node(last.name if scale == 1.0 else pool.name, LpPool.name, [source], [pooled], attrs, folded)]
    if scale != 1.0 and output in graph.shapes:
        graph.shapes[pooled] = graph.shapes[output]
    if scale != 1.0:
        factor = add_constant(graph, f"{last.name}.scale", np.asarray(scale))
        nodes.append(Node(last.name, Mul.name, [pooled, factor], [output]))
    index = graph.nodes.index(last)
    graph.nodes[index : index + 1] = nodes
