"""Convolution chains and residual blocks as one operator each: Combettes-Pesquet in the frequency domain.

A *region* maps a value u to a value v through stride-1 convolutions that keep the grid (``ShiftInvariant``),
elementwise slope-restricted activations, and residual blocks ``x + B(x)`` (or ``P x + B(x)``, P a linear
projection) whose branch B is again convolutions and activations. Every value inside has its consumers
inside, so L(v) <= bound * L(u).

The bound. All convolutions are lifted to one grid N: circular ones live on the input's own grid; a
zero-padded one on n is R C_N E (embed, circular convolution on N >= n + pad, restrict), and between two
layers E R is a 0/1 diagonal that merges with the activation beside it (its difference quotients then lie in
[min(a, 0), max(b, 0)]) or, with no activation there, is kept as a cut of its own with slopes in [0, 1].
For two inputs the region's difference is then  R M E (x - y)  with M a product of circular convolutions,
diagonals D_k with entries in [a_k, b_k], and residual sums. Writing each D_k = c_k I + r_k F_k (||F_k|| <= 1)
and expanding (Combettes & Pesquet 2020): every subset S of the cuts gives a term whose norm is at most
prod_{k in S} r_k times the product of the norms of the maps between consecutive cuts of S, all others at
c_k. A block's identity survives only in the term where none of its branch's cuts is split. The sum over S
is a dynamic programme over the last split cut; each map between two cuts is a polynomial in circular
convolutions, so its norm is the largest sigma_max of its matrices over the frequencies (FFT), never a
materialised operator. Regions of flat vectors (dense layers) are the one-frequency case. Strided convolutions
may read the region's input: on the input's phases x_r[j] = x[s j + r] (an orthogonal rearrangement) they are
stride-1 convolutions on the coarse grid, so a ResNet stage is one region from its transition block on.
Each region is bounded twice, as it is and with per-channel scales moved across its activations
(``lipcheck.refine.rescale``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lipcheck import ops
from lipcheck.graph import Graph, Node
from lipcheck.ops import ShiftInvariant, Slope, variable_inputs
from lipcheck.refine.affine import full_shape, is_foldable, segment_operator
from lipcheck.refine.chains import MAX_DIM
from lipcheck.refine.rescale import power_of_two_balance
from lipcheck.spectral.dense import UNIT_ROUNDOFF
from lipcheck.spectral.frequency import (
    FrequencyMatrices,
    conv_frequency_matrices,
    dense_frequency_matrices,
    dense_groups,
    half_frequencies,
)

# a region's operators are held as [F, out, in] complex matrices: at most this many entries each
MAX_OPERATOR_ENTRIES = 1 << 24
MAX_CUTS = 40


@dataclass
class Linear:
    """One linear node of the region (a convolution, or a foldable dense node)."""

    node: Node
    conv: ShiftInvariant | None
    before: int = -1  # index of the last cut before it (-1: none)


@dataclass
class Cut:
    """An activation (or a bare restriction, ``node`` None) splitting the region: slopes in [low, high]."""

    node: Node | None
    slope: Slope
    index: int = -1


@dataclass
class Block:
    """x -> a skip(x) + b branch(x): skip linear (empty: the identity), branch linear nodes and cuts."""

    join: Node
    skip: list[Linear]
    branch: list[Linear | Cut | Block]
    signs: tuple[float, float] = (1.0, 1.0)  # (a, b)
    before: int = -1
    last: int = -1  # index of the block's last cut (== before when it has none)


Item = Linear | Cut | Block


@dataclass
class Region:
    start: str
    end: str
    items: list[Item] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)

    @property
    def blocks(self) -> int:
        return sum(isinstance(item, Block) for item in self.items)


# ----------------------------------------------------------------------------------------------------
# finding regions


def _shift_invariant(node: Node, graph: Graph) -> ShiftInvariant | None:
    op = ops.get(node.op)
    return op.shift_invariant(node, graph) if op is not None else None


def _slope(node: Node, graph: Graph) -> Slope | None:
    op = ops.get(node.op)
    return op.slope(node, graph) if op is not None else None


def _channel_scale(node: Node, graph: Graph) -> ShiftInvariant | None:
    """A per-channel scaling (plus shift) of a feature map, as the 1x1 convolution diag(m)."""
    op = ops.get(node.op)
    shape = full_shape(graph, node.outputs[0])
    if op is None or shape is None or len(shape) < 3:
        return None
    multiplier = op.channel_scale(node, graph)
    if multiplier is None:
        return None
    d = len(shape) - 2
    weight = torch.diag(torch.from_numpy(multiplier)).reshape(shape[1], shape[1], *([1] * d))
    return ShiftInvariant(weight, (0,) * d, (0,) * d, (1,) * d, 1, circular=False, input_size=tuple(shape[2:]))


def _dense_vector(node: Node, graph: Graph) -> bool:
    """A foldable linear node between flat vectors [1, d] (a dense layer of an MLP)."""
    variables = variable_inputs(node, graph)
    if len(variables) != 1 or len(node.outputs) != 1:
        return False
    shape_in, shape_out = full_shape(graph, node.inputs[variables[0]]), full_shape(graph, node.outputs[0])
    if shape_in is None or shape_out is None or len(shape_in) != 2 or len(shape_out) != 2:
        return False
    return max(shape_in[1], shape_out[1]) <= MAX_DIM and is_foldable(node, graph)


class _Parser:
    """Reads regions off the graph: straight runs, and blocks where a value fans out to two paths that rejoin."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.consumers = graph.consumers()
        self.outputs = set(graph.outputs)
        self.start = ""  # the region's input: the only value a strided convolution may read (polyphase form)

    def item(self, node: Node, value: str) -> Linear | Cut | None:
        if len(node.outputs) != 1 or variable_inputs(node, self.graph) != [node.inputs.index(value)]:
            return None
        slope = _slope(node, self.graph)
        if slope is not None:
            return Cut(node, slope)
        conv = _shift_invariant(node, self.graph) or _channel_scale(node, self.graph)
        if conv is not None and conv.strided and value != self.start:
            return None
        if conv is not None:
            return Linear(node, conv)
        return Linear(node, None) if _dense_vector(node, self.graph) else None

    def single_next(self, value: str) -> Node | None:
        users = self.consumers.get(value, [])
        return users[0] if len(users) == 1 and value not in self.outputs else None

    def sequence(self, value: str) -> list[Item]:
        """Items from ``value`` on, as far as they go."""
        self.start = value
        items: list[Item] = []
        while True:
            users = self.consumers.get(value, [])
            if value in self.outputs or not users:
                return items
            if len(users) == 2:
                block = self.block(value, users)
                if block is None:
                    return items
                items.append(block)
                value = block.join.outputs[0]
                continue
            node = users[0]
            item = self.item(node, value) if len(users) == 1 else None
            if item is None:
                return items
            items.append(item)
            value = node.outputs[0]

    def path_to_join(self, value: str, first: Node) -> tuple[list[Item], Node] | None:
        """The run of items from ``first`` (a consumer of ``value``) up to the Add it reaches."""
        items: list[Item] = []
        node = first
        while True:
            op = ops.get(node.op)
            if op is not None and op.join_signs is not None and len(variable_inputs(node, self.graph)) == 2:
                return items, node
            item = self.item(node, value)
            if item is None:
                return None
            items.append(item)
            value = node.outputs[0]
            following = self.single_next(value)
            if following is None:
                return None
            node = following

    def block(self, value: str, users: list[Node]) -> Block | None:
        first, second = (self.path_to_join(value, user) for user in users)
        if first is None or second is None or first[1] is not second[1]:
            return None
        (a, join), (b, _) = first, second
        if variable_inputs(join, self.graph) != [0, 1] or len(join.inputs) != 2 or join.inputs[0] == join.inputs[1]:
            return None
        shapes = [self.graph.shape(v) for v in (*join.inputs, join.outputs[0])]
        if shapes[0] is None or not shapes[0] == shapes[1] == shapes[2]:
            return None
        if any(isinstance(i, Cut | Block) for i in a) and any(isinstance(i, Cut | Block) for i in b):
            return None
        signs = ops.get(join.op).join_signs  # type: ignore[union-attr]
        assert signs is not None
        # which join input each path arrives at (a path without nodes arrives with the block's input itself)
        ends = [_end_value(path, value) for path in (a, b)]
        sign_a, sign_b = signs if join.inputs.index(ends[0]) == 0 else signs[::-1]
        if any(isinstance(i, Cut | Block) for i in a):
            return Block(join, [i for i in b if isinstance(i, Linear)], a, (sign_b, sign_a))
        return Block(join, [i for i in a if isinstance(i, Linear)], b, (sign_a, sign_b))


def _end_value(path: list[Item], start: str) -> str:
    return _end_of(path) if path else start


def _region_nodes(items: list[Item]) -> list[Node]:
    nodes: list[Node] = []
    for item in items:
        if isinstance(item, Block):
            nodes += [i.node for i in item.skip] + _region_nodes(item.branch) + [item.join]
        elif item.node is not None:
            nodes.append(item.node)
    return nodes


def find_regions(graph: Graph) -> list[Region]:
    """Maximal regions with a residual block or a convolution chain (no node in two regions)."""
    parser = _Parser(graph)
    taken: set[int] = set()
    inside: set[str] = set()  # values computed inside a region (not its end)
    regions: list[Region] = []
    starts = list(graph.inputs) + [out for node in graph.nodes for out in node.outputs[:1]]
    for start in starts:
        if start in inside:
            continue
        items = parser.sequence(start)
        while items and isinstance(items[-1], Cut):  # an activation at the end: the walk applies it as well
            items = items[:-1]
        if not items or isinstance(items[0], Cut) or not _worth_it(items):
            continue  # (a region after a leading activation starts at that activation's output)
        nodes = _region_nodes(items)
        if any(id(n) in taken for n in nodes):
            continue
        region = Region(start, _end_of(items), items, nodes)
        taken.update(id(n) for n in nodes)
        inside.update(out for n in nodes for out in n.outputs if out != region.end)
        regions.append(region)
    return regions


def find_blocks(graph: Graph) -> list[Region]:
    """Every residual block of the graph, each alone as a region from its input to its join."""
    parser = _Parser(graph)
    found: list[Region] = []
    for value, users in parser.consumers.items():
        if len(users) != 2 or value in parser.outputs:
            continue
        parser.start = value
        block = parser.block(value, users)
        if block is not None and any(isinstance(i, Cut) for i in block.branch):
            found.append(Region(value, block.join.outputs[0], [block], _region_nodes([block])))
    return found


def _end_of(items: list[Item]) -> str:
    last = items[-1]
    node = last.join if isinstance(last, Block) else last.node
    assert node is not None
    return node.outputs[0]


def _worth_it(items: list[Item]) -> bool:
    """A block, or at least two convolutions: else the per-node bounds are as good."""
    if any(isinstance(i, Block) for i in items):
        return True
    convs = [i for i in items if isinstance(i, Linear) and i.conv is not None]
    return len(convs) >= 2 and any(isinstance(i, Cut) for i in items)


# ----------------------------------------------------------------------------------------------------
# the operators on one grid


@dataclass
class _Lifted:
    """The region's items on the common grid, with cuts numbered in composition order."""

    items: list[Item]
    cuts: list[Cut]
    operators: dict[int, FrequencyMatrices]  # id(Linear) -> its matrices
    frequencies: int
    channels_in: int
    channels: dict[int, int] = field(default_factory=dict)  # id(Block) -> its channels (the skip's size)


class NotLiftable(Exception):
    """The region's layers do not share one grid (or are too large to hold)."""


def _grid(region: Region, spatial: tuple[int, ...]) -> tuple[tuple[int, ...], bool]:
    """(grid, circular): circular convolutions on their input's grid; zero-padded ones (placed at the origin)
    on one large enough for every layer: N >= n_in + max(begin, end) on each axis."""
    convs = [i.conv for i in _linears(region.items) if i.conv is not None]
    dense = [i for i in _linears(region.items) if i.conv is None]
    if convs and dense:
        raise NotLiftable("convolutions and dense layers mixed")
    if not convs:
        return (), True
    wide = [c for c in convs if not c.pointwise]
    circular = {c.circular for c in wide}
    if len(circular) > 1:
        raise NotLiftable("circular and zero-padded convolutions mixed")
    if circular == {True}:
        if any(c.input_size != tuple(spatial) for c in wide):
            raise NotLiftable("circular convolutions on different grids")
        return tuple(spatial), True
    grid = [max([n, *(c.input_size[a] + max(0, c.begins[a], c.ends[a]) for c in wide)]) for a, n in enumerate(spatial)]
    return tuple(grid), not wide


def _linears(items: list[Item]) -> list[Linear]:
    found: list[Linear] = []
    for item in items:
        if isinstance(item, Linear):
            found.append(item)
        elif isinstance(item, Block):
            found += item.skip + _linears(item.branch)
    return found


def lift(region: Region, graph: Graph) -> _Lifted:
    """Number the cuts (adding restriction cuts where zero padding needs them) and build each operator."""
    shape = full_shape(graph, region.start)
    if shape is None:
        raise NotLiftable("size unknown")
    spatial, channels_in = _polyphase_start(region, shape)
    grid, circular = _grid(region, spatial)
    freqs = half_frequencies(grid)
    for linear in _linears(region.items):
        m, n = _size(linear, graph)
        if freqs.shape[0] * m * n > MAX_OPERATOR_ENTRIES:
            raise NotLiftable(f"{linear.node.name}: {freqs.shape[0]} x {m} x {n} matrices")
    operators = {id(linear): _operator(linear, graph, freqs) for linear in _linears(region.items)}
    items, _ = _place(region.items, clean=True, circular=circular)
    cuts: list[Cut] = []
    _number(items, cuts)
    if len(cuts) > MAX_CUTS:
        raise NotLiftable(f"{len(cuts)} activations")
    channels = {id(block): _channels(block, graph) for block in _blocks(items)}
    return _Lifted(items, cuts, operators, int(freqs.shape[0]), channels_in, channels)


def _polyphase_start(region: Region, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """(spatial size, channels) of the region's input as its layers see it: as it is, or, when strided
    convolutions read it, in polyphase form (each phase of the stride a channel of its own, on the coarse grid:
    an orthogonal rearrangement, zero-filled to a multiple of the stride) with those convolutions made stride-1
    convolutions on that grid."""
    strided = [linear for linear in _linears(region.items) if linear.conv is not None and linear.conv.strided]
    spatial, channels = tuple(shape[2:]), int(shape[1])
    if not strided:
        return spatial, channels
    strides = {linear.conv.strides for linear in strided if linear.conv is not None}
    if len(strides) != 1:
        raise NotLiftable("strided convolutions with different strides")
    (stride,) = strides
    for linear in strided:
        assert linear.conv is not None
        linear.conv = polyphase(linear.conv)
    coarse = tuple(-(-n // s) for n, s in zip(spatial, stride, strict=True))
    return coarse, channels * math.prod(stride)


def polyphase(conv: ShiftInvariant) -> ShiftInvariant:
    """The strided convolution y[i] = sum_t K_t x[s i + t d - p] as a stride-1 one on the phases x_r[j] = x[s j + r]
    (input channel (r, c) at index r c_in + c, r in row-major order): offset t d - p = s q + r reads x_r[i + q]."""
    stride, d = conv.strides, len(conv.strides)
    weight = dense_groups(conv.weight, conv.groups)
    c_out, c_in, *taps = weight.shape
    offsets = [[t * conv.dilations[a] - conv.begins[a] for t in range(taps[a])] for a in range(d)]
    q_min = [min(m // stride[a] for m in offsets[a]) for a in range(d)]
    q_max = [max(m // stride[a] for m in offsets[a]) for a in range(d)]
    size = [q_max[a] - q_min[a] + 1 for a in range(d)]
    phases = math.prod(stride)
    result = torch.zeros((c_out, c_in * phases, *size), dtype=torch.float64)
    for tap in itertools.product(*[range(k) for k in taps]):
        q = [offsets[a][tap[a]] // stride[a] - q_min[a] for a in range(d)]
        r = [offsets[a][tap[a]] % stride[a] for a in range(d)]
        phase = 0
        for a in range(d):
            phase = phase * stride[a] + r[a]
        into: tuple[Any, ...] = (slice(None), slice(phase * c_in, (phase + 1) * c_in), *q)
        source: tuple[Any, ...] = (slice(None), slice(None), *tap)
        result[into] = weight[source]
    coarse = tuple(-(-n // s) for n, s in zip(conv.input_size, stride, strict=True))
    n_out = [
        (n + b + e - (k - 1) * r - 1) // s + 1
        for n, b, e, k, r, s in zip(conv.input_size, conv.begins, conv.ends, taps, conv.dilations, stride, strict=True)
    ]
    begins = tuple(-q for q in q_min)
    ends = tuple(n_out[a] - coarse[a] - begins[a] + size[a] - 1 for a in range(d))
    return ShiftInvariant(result, begins, ends, (1,) * d, 1, circular=False, input_size=coarse)


def _blocks(items: list[Item]) -> list[Block]:
    found: list[Block] = []
    for item in items:
        if isinstance(item, Block):
            found += [item, *_blocks(item.branch)]
    return found


def _channels(block: Block, graph: Graph) -> int:
    shape = full_shape(graph, block.join.outputs[0])
    if shape is None:
        raise NotLiftable("size unknown")
    return int(shape[1])


def _size(linear: Linear, graph: Graph) -> tuple[int, int]:
    """(outputs, inputs) of the linear node's matrices."""
    if linear.conv is not None:
        return int(linear.conv.weight.shape[0]), int(linear.conv.weight.shape[1]) * linear.conv.groups
    shape_in = full_shape(graph, linear.node.inputs[variable_inputs(linear.node, graph)[0]])
    shape_out = full_shape(graph, linear.node.outputs[0])
    assert shape_in is not None and shape_out is not None
    return math.prod(shape_out[1:]), math.prod(shape_in[1:])


def _operator(linear: Linear, graph: Graph, freqs: torch.Tensor) -> FrequencyMatrices:
    if linear.conv is not None:
        c = linear.conv
        return conv_frequency_matrices(c.weight, c.begins, c.dilations, c.groups, freqs)
    dense = segment_operator([linear.node], graph)
    return dense_frequency_matrices(dense.matrix, dense.bound, dense.gamma)


_RESTRICT = Slope(0.0, 1.0)


def _place(items: list[Item], clean: bool, circular: bool) -> tuple[list[Item], bool]:
    """The items with restriction cuts inserted before every padded convolution whose input may be nonzero
    outside the grid's inner part, and activations on such inputs widened to include slope 0."""
    if circular:
        return items, True
    placed: list[Item] = []
    for item in items:
        if isinstance(item, Cut):
            slope = item.slope if clean else Slope(min(item.slope.low, 0.0), max(item.slope.high, 0.0))
            placed.append(Cut(item.node, slope))
            clean = True
        elif isinstance(item, Linear):
            if not clean and item.conv is not None and not item.conv.pointwise:
                placed.append(Cut(None, _RESTRICT))
                clean = True
            placed.append(item)
            clean = clean and (item.conv is None or item.conv.pointwise)
        else:
            if not clean and not all(i.conv is None or i.conv.pointwise for i in _linears([item])):
                placed.append(Cut(None, _RESTRICT))
                clean = True
            skip_clean = clean and all(i.conv is None or i.conv.pointwise for i in item.skip)
            branch, branch_clean = _place(item.branch, clean, circular)
            placed.append(Block(item.join, item.skip, branch, item.signs))
            clean = skip_clean and branch_clean
    return placed, clean


def _number(items: list[Item], cuts: list[Cut]) -> None:
    """Give cuts their index in composition order and every item the index of the last cut before it."""
    for item in items:
        if isinstance(item, Cut):
            item.index = len(cuts)
            cuts.append(item)
        elif isinstance(item, Linear):
            item.before = len(cuts) - 1
        else:
            item.before = len(cuts) - 1
            for linear in item.skip:
                linear.before = item.before
            _number(item.branch, cuts)
            item.last = len(cuts) - 1


# ----------------------------------------------------------------------------------------------------
# the bound


@dataclass
class _Map:
    """A linear map ``scalar * operator`` (operator None: the identity), scalars kept apart until a sum needs them."""

    operator: FrequencyMatrices | None = None
    scalar: float = 1.0

    def then(self, operator: FrequencyMatrices) -> _Map:
        return _Map(operator if self.operator is None else operator @ self.operator, self.scalar)

    def after(self, first: _Map) -> _Map:
        """self o first."""
        if self.operator is None:
            return _Map(first.operator, first.scalar * self.scalar)
        return _Map(first.then(self.operator).operator, first.scalar * self.scalar)

    def matrices(self, channels: int, frequencies: int) -> FrequencyMatrices:
        operator = self.operator or FrequencyMatrices.identity(channels, frequencies)
        return operator if self.scalar == 1.0 else operator.scaled(self.scalar)

    def plus(self, other: _Map, channels: int, frequencies: int) -> _Map:
        if self.operator is None and other.operator is None:
            return _Map(None, self.scalar + other.scalar)
        return _Map(self.matrices(channels, frequencies) + other.matrices(channels, frequencies))

    def norm_upper(self) -> float:
        value = abs(self.scalar) * (1.0 if self.operator is None else self.operator.norm_upper())
        return value * (1 + 2 * UNIT_ROUNDOFF)


class _Segments:
    """||map between cut i and cut j|| (i = -1: the region's start; j = len(cuts): its end)."""

    def __init__(self, lifted: _Lifted):
        self.lifted = lifted

    def product(self, items: list[Item], i: int, j: int) -> _Map:
        """The items' map between the two cuts, every cut strictly inside at its middle slope."""
        result = _Map()
        for item in items:
            if isinstance(item, Cut):
                if i < item.index < j:
                    result = _Map(result.operator, result.scalar * item.slope.mid)
            elif isinstance(item, Linear):
                if i <= item.before < j:
                    result = result.then(self.lifted.operators[id(item)])
            else:
                result = self.block(item, i, j, result)
        return result

    def block(self, block: Block, i: int, j: int, result: _Map) -> _Map:
        if block.before < i <= block.last or block.before < j <= block.last:
            return self.product(block.branch, i, j).after(result)  # a split in the branch: no skip in this term
        if not (i <= block.before and block.last < j):
            return result
        skip = _Map(scalar=block.signs[0])
        for linear in block.skip:
            skip = skip.then(self.lifted.operators[id(linear)])
        branch = self.product(block.branch, i, j)
        branch = _Map(branch.operator, branch.scalar * block.signs[1])
        channels = self.lifted.channels.get(id(block), self.lifted.channels_in)
        whole = skip.plus(branch, channels, self.lifted.frequencies)
        return whole.after(result)

    def norm(self, i: int, j: int) -> float:
        return self.product(self.lifted.items, i, j).norm_upper()


def region_bound(region: Region, graph: Graph) -> float:
    """The certified Combettes-Pesquet bound of the region (see the module docstring), the smaller of its value on
    the layers as they are and with per-channel scales moved across activations (``lipcheck.refine.rescale``)."""
    lifted = lift(region, graph)
    value = _combettes_pesquet(lifted)
    rescaled = _rescaled(lifted)
    return value if rescaled is None else min(value, _combettes_pesquet(rescaled))


def _combettes_pesquet(lifted: _Lifted) -> float:
    segments = _Segments(lifted)
    cuts = lifted.cuts
    p = len(cuts)
    total = {-1: 1.0}
    for j in range(p + 1):
        total[j] = sum(
            total[i] * (cuts[i].slope.radius if i >= 0 else 1.0) * segments.norm(i, j)
            for i in range(-1, j)
            if i < 0 or cuts[i].slope.radius > 0
        )
    # every term is a product of at most 2p + 2 nonnegative roundings
    return total[p] * (1 + 4 * (p * p + 4 * p + 4) * UNIT_ROUNDOFF) if math.isfinite(total[p]) else math.inf


def _rescaled(lifted: _Lifted) -> _Lifted | None:
    """The same region with a power-of-two per-channel scale moved across every activation that sits between two
    linear layers of one run (None when no scale differs from 1)."""
    operators = dict(lifted.operators)
    changed = False
    for items in _item_lists(lifted.items):
        for k in range(1, len(items) - 1):
            left, cut, right = items[k - 1], items[k], items[k + 1]
            if not (isinstance(cut, Cut) and isinstance(left, Linear) and isinstance(right, Linear)):
                continue
            a, b = operators[id(left)], operators[id(right)]
            rows = torch.linalg.vector_norm(a.matrix, dim=(0, 2))
            columns = torch.linalg.vector_norm(b.matrix, dim=(0, 1))
            s = power_of_two_balance(rows, columns)
            if bool((s == 1).all()):
                continue
            changed = True
            operators[id(left)] = FrequencyMatrices(a.matrix * s[:, None], a.bound * s[:, None], a.gamma)
            operators[id(right)] = FrequencyMatrices(b.matrix / s[None, :], b.bound / s[None, :], b.gamma)
    if not changed:
        return None
    return _Lifted(lifted.items, lifted.cuts, operators, lifted.frequencies, lifted.channels_in, lifted.channels)


def _item_lists(items: list[Item]) -> list[list[Item]]:
    """The region's runs of items: the main line and every branch."""
    found = [items]
    for item in items:
        if isinstance(item, Block):
            found += _item_lists(item.branch)
    return found
