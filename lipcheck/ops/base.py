"""What an op is to lipcheck: one class per op, holding every facet the analyses ask of it.

An op's class declares its attribute defaults once and implements the facets it has:

* ``lipschitz(ctx)``: its rule, a certified bound on its Lipschitz constant (``lipcheck.compose``);
* ``slope(node, graph)``: for an elementwise activation, the interval of its difference quotients
  (the chain bounds of ``lipcheck.refine``);
* ``evaluate(ctx, *inputs)``: how it runs, as differentiable torch code (``lipcheck.interpret``);
* ``affine(ctx, x)``: for a linear op, its action on a batch of vectors, exactly, with its linear part
  and its absolute-value part (``lipcheck.refine.affine``);
* ``shift_invariant(node, graph)`` / ``channel_scale(node, graph)``: the node as a convolution (or a per-channel
  scaling) for the frequency-domain region bounds (``lipcheck.refine.regions``); ``join_signs`` marks the
  ops that join a residual block (a x + b y);
* ``value_range(ctx, *ranges)``: the range of its outputs from its inputs' ranges (room for input
  domains: returns None, "unknown", until an op has one);
* flags the analyses read (``piecewise_linear``, ``kinked``, ``decomposes_activations``) and the
  folding facets of layers and per-channel affine ops;
* what the recognition passes ask (``lipcheck.passes``): ``selection_axis``, ``joined_axis``,
  ``order_statistics``, ``window_mean``, and the flags ``extremum``, ``positive_part``, ``negates``,
  ``rearranges``.

The registry (``register``) keys instances by op name and refuses a second registration of a name.
Analyses never test op names: they ask the op (``get(node.op)``) for a facet.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from lipcheck.errors import NonFiniteConstantError
from lipcheck.graph import Graph, Node, Shape, check_finite, unique_name


class UnsupportedVariant(Exception):
    """A known op with attributes lipcheck has no rule (or no evaluation) for; reported like an unknown op."""

    def __init__(self, label: str):
        super().__init__(label)
        self.label = label


class NotFoldable(Exception):
    """The node is not an affine map of its one variable input that ``affine`` evaluates exactly."""


# ---------------------------------------------------------------------------------------------
# What a rule returns, and what it is given


@dataclass(frozen=True)
class LocalBound:
    """A rule's answer for one node.

    ``value`` is the node's Lipschitz constant w.r.t. its variable inputs (``math.inf`` when it is not
    globally Lipschitz, with ``reason`` saying why). ``certified``: a proven upper bound, rounding
    included. ``exact``: equal to the true constant (up to rounding). By default the composition
    multiplies ``value`` by the Lipschitz constant of the variable inputs taken together; rules for
    ops such as Add set ``output_lipschitz`` (the constant of the output itself) instead. Every output of
    a node gets that constant, unless ``outputs_lipschitz`` gives one per output (a loop's final state and
    its scan outputs), each at most ``output_lipschitz``, which is then the largest of them.
    """

    value: float
    method: str
    certified: bool = True
    exact: bool = False
    output_lipschitz: float | None = None
    reason: str | None = None
    outputs_lipschitz: tuple[float, ...] | None = None

    @property
    def bounded(self) -> bool:
        return math.isfinite(self.value) and (self.output_lipschitz is None or math.isfinite(self.output_lipschitz))


def unbounded(reason: str, method: str = "not globally Lipschitz") -> LocalBound:
    return LocalBound(math.inf, method, certified=True, reason=reason)


@dataclass(frozen=True)
class OrderStatistics:
    """Entries of the sorted groups of a node's first input: a group is the entries along ``axes`` at one
    position of the other axes, of ``size`` entries; ``ranks`` are the places in the sorted group (0 the
    smallest) that the node's first output holds, each once."""

    axes: tuple[int, ...]
    size: int
    ranks: frozenset[int]


@dataclass(frozen=True)
class Slope:
    """Every difference quotient (f(x) - f(y)) / (x - y) of an elementwise activation lies in [low, high]."""

    low: float
    high: float

    @property
    def lipschitz(self) -> float:
        return max(abs(self.low), abs(self.high))

    @property
    def mid(self) -> float:
        return (self.low + self.high) / 2

    @property
    def radius(self) -> float:
        return (self.high - self.low) / 2


def _rounded(values: list[Fraction], up: bool) -> np.ndarray:
    """Exact rationals to float64, each rounded up (or down) to a float on that side of it."""
    result = np.array([float(v) for v in values], dtype=np.float64)
    for k, v in enumerate(values):
        if (Fraction(result[k]) < v) if up else (Fraction(result[k]) > v):
            result[k] = np.nextafter(result[k], np.inf if up else -np.inf)
    return result


@dataclass(frozen=True, eq=False)
class UnitSlopes:
    """Per-unit slope intervals of an elementwise activation: unit j's difference quotients lie in
    [low[j], high[j]]. Local analyses know them (on an input box a ReLU that is always active has [1, 1],
    one always inactive [0, 0]); the chain bounds then use a diagonal interval per layer, not one scalar.

    ``low`` and ``high`` are float64 arrays of the activation output's one-sample shape (or flat); units are
    numbered in C order, the order of the rows and columns of the chain's folded matrices.
    """

    low: np.ndarray
    high: np.ndarray

    def __post_init__(self) -> None:
        low = np.ascontiguousarray(self.low, dtype=np.float64).reshape(-1)
        high = np.ascontiguousarray(self.high, dtype=np.float64).reshape(-1)
        if low.shape != high.shape or not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise ValueError("UnitSlopes: low and high must be finite arrays of one size")
        if (low > high).any():
            raise ValueError("UnitSlopes: some low > high")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @property
    def size(self) -> int:
        return int(self.low.size)

    @property
    def lipschitz(self) -> np.ndarray:
        return np.maximum(np.abs(self.low), np.abs(self.high))

    @property
    def mid(self) -> np.ndarray:
        """A float near each unit's centre; ``radius`` is computed from it so that [mid - r, mid + r] covers."""
        return self.low / 2 + self.high / 2

    @property
    def radius(self) -> np.ndarray:
        """Certified: r >= max(high - mid, mid - low) exactly (computed in rationals, rounded up), so
        [mid - r, mid + r] covers [low, high]; r = 0 exactly where low == high (a stable unit)."""
        mid = self.mid
        triples = zip(self.low, self.high, mid, strict=True)
        return _rounded([max(Fraction(h) - Fraction(c), Fraction(c) - Fraction(lo)) for lo, h, c in triples], up=True)

    def quadratic(self) -> tuple[np.ndarray, np.ndarray]:
        """(m, p) with -s^2 + 2 m s - p >= 0 for every s in [low, high], per unit: the slope constraint
        (z - low y)(high y - z) >= 0 of LipSDP and ECLipsE in float form. A concave quadratic is >= 0 on an
        interval iff it is at both ends, so m = mid and p <= min(low (2m - low), high (2m - high)) (exact
        rationals, rounded down) suffice; p = low * high when no rounding occurs."""
        mid = self.mid
        products = [
            min(Fraction(lo) * (2 * Fraction(c) - Fraction(lo)), Fraction(h) * (2 * Fraction(c) - Fraction(h)))
            for lo, h, c in zip(self.low, self.high, mid, strict=True)
        ]
        return mid, _rounded(products, up=False)

    def within(self, slope: Slope) -> UnitSlopes:
        """The intersection with the op's own interval (both hold for every unit, so both may be used)."""
        low, high = np.maximum(self.low, slope.low), np.minimum(self.high, slope.high)
        if (low > high).any():
            raise ValueError(f"UnitSlopes outside the activation's slope [{slope.low}, {slope.high}]")
        return UnitSlopes(low, high)

    @staticmethod
    def of(slope: Slope, size: int) -> UnitSlopes:
        """A scalar slope repeated over ``size`` units."""
        return UnitSlopes(np.full(size, slope.low), np.full(size, slope.high))


@dataclass(frozen=True)
class Interval:
    """Every entry of a value lies in [lo, hi] on the input domain (float64 tensors of the value's shape, or
    broadcastable to it; integer tensors for values known exactly, such as shapes)."""

    lo: torch.Tensor
    hi: torch.Tensor

    @property
    def exact(self) -> bool:
        """One value, known exactly (a constant, or a shape computed from shapes)."""
        return self.lo is self.hi or (not self.lo.is_floating_point() and torch.equal(self.lo, self.hi))

    @property
    def centre(self) -> torch.Tensor:
        return (self.lo + self.hi) / 2

    @property
    def radius(self) -> torch.Tensor:
        return (self.hi - self.lo) / 2

    @property
    def magnitude(self) -> torch.Tensor:
        """The largest |value| per entry."""
        return torch.maximum(self.lo.abs(), self.hi.abs())

    @property
    def smallest_magnitude(self) -> torch.Tensor:
        """The smallest |value| per entry (0 where the interval holds 0)."""
        return torch.where(
            (self.lo <= 0) & (self.hi >= 0), torch.zeros_like(self.lo), torch.minimum(self.lo.abs(), self.hi.abs())
        )


def widen(low: torch.Tensor, high: torch.Tensor) -> Interval:
    """[low, high] computed in float64, widened by a few ulps so that it holds the exact interval."""
    tiny = torch.finfo(torch.float64).tiny
    margin = 2.0**-46
    return Interval(low - margin * low.abs() - tiny, high + margin * high.abs() + tiny)


@dataclass(frozen=True)
class ShiftInvariant:
    """A node that is a convolution: y[i] = sum_t K_t x[s i + t d - p] + bias, i in [0, n_out).

    ``circular``: indices wrap around the input grid (a wrap padding folded in; then n_out = n_in); else zero
    padding. The frequency chain bounds (``lipcheck.refine.regions``) multiply such maps in the frequency domain.
    """

    weight: torch.Tensor  # [c_out, c_in / groups, *kernel], float64
    begins: tuple[int, ...]  # padding before, per spatial axis (may exceed the kernel's span: a full conv)
    ends: tuple[int, ...]
    dilations: tuple[int, ...]
    groups: int
    circular: bool
    input_size: tuple[int, ...]
    strides: tuple[int, ...] = ()  # empty: 1 on every axis (a strided one enters a region in polyphase form)

    @property
    def pointwise(self) -> bool:
        """A 1x1 stride-1 convolution: it commutes with restricting the grid."""
        ones = all(int(k) == 1 for k in self.weight.shape[2:])
        return ones and not any(self.begins) and not any(self.ends) and not self.strided

    @property
    def strided(self) -> bool:
        return any(s != 1 for s in self.strides)


class Attributes(Mapping[str, Any]):
    """A node's attributes over its op's declared defaults (a value of None on the node is 'not given')."""

    def __init__(self, node: Node, defaults: Mapping[str, Any]):
        self._node, self._defaults = node, defaults

    def __getitem__(self, key: str) -> Any:
        value = self._node.attrs.get(key)
        if value is None and key in self._defaults:
            return self._defaults[key]
        if value is None and key not in self._node.attrs:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        yield from self._node.attrs
        yield from (k for k in self._defaults if k not in self._node.attrs)

    def __len__(self) -> int:
        return len(set(self._node.attrs) | set(self._defaults))


def node_attrs(node: Node) -> Attributes:
    """The node's attributes with its op's defaults filled in (see ``Op.attributes``)."""
    op = get(node.op)
    return Attributes(node, op.attributes if op is not None else {})


@dataclass
class SubgraphBound:
    """A subgraph's composition (an If's branch), as ``RuleContext.bound_subgraph`` returns it."""

    output_lipschitz: list[float]  # per output of the subgraph
    certified: bool
    layers: int
    reason: str | None = None  # the first cause, when some node of it is not globally Lipschitz


# (subgraph, its inputs' constants, device, a rule cache kept between calls or None) -> its bound; raises
# UnsupportedVariant for ops without rules
BoundSubgraph = Callable[[Graph, dict[str, float], torch.device, "dict[str, Any] | None"], SubgraphBound]
# (subgraph, feeds, dtype, device) -> its outputs by name
RunSubgraph = Callable[[Graph, dict[str, Any], torch.dtype, torch.device], dict[str, Any]]


def _no_subgraphs(*args: Any) -> Any:
    raise UnsupportedVariant("subgraph (no walker given)")


@dataclass
class RuleContext:
    """What a rule sees of one node: its inputs' constants, shapes and Lipschitz constants, and the
    composition itself for the graphs an op holds (given by the walker, so ops import no analysis)."""

    node: Node
    graph: Graph
    input_lipschitz: list[float]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    bound_subgraph: BoundSubgraph = _no_subgraphs
    run_subgraph: RunSubgraph = _no_subgraphs  # the interpreter, for a rule that runs part of a subgraph
    ranges: Sequence[Interval | None] | None = None  # the inputs' value ranges on an input domain (lipcheck.ranges)

    @property
    def attrs(self) -> Attributes:
        return node_attrs(self.node)

    def input_range(self, index: int) -> Interval | None:
        """Input ``index``'s value range on the input domain (None: global analysis, or not known)."""
        if self.ranges is None or index >= len(self.ranges):
            return None
        return self.ranges[index]

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

    def known_only_at_run_time(self, index: int) -> bool:
        """A parameter input (axes, pads, scales...) that is given but is not a constant: the rule must not
        read the attribute a frontend fills from constant inputs as if it were that parameter."""
        return self.has_input(index) and self.const(index) is None

    def output_used(self, index: int) -> bool:
        """Whether output ``index`` is read by a node or is a graph output (an ignored output does not count)."""
        if index >= len(self.node.outputs) or not self.node.outputs[index]:
            return False
        name = self.node.outputs[index]
        return name in self.graph.outputs or any(name in node.inputs for node in self.graph.nodes)

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


@dataclass
class EvalContext:
    """What ``evaluate`` sees of one node: its attributes, the compute dtype and device, per-run options."""

    node: Node
    dtype: torch.dtype
    device: torch.device
    options: dict[str, Any] = field(default_factory=dict)  # shared by all nodes of a run (``smooth``)
    run_subgraph: RunSubgraph = _no_subgraphs  # the interpreter, for the graphs an op holds

    def __post_init__(self) -> None:
        self.attrs = node_attrs(self.node)

    @property
    def smooth(self) -> bool:
        """ReLU-family kinks are rounded (a gradient search's view of a piecewise-linear network)."""
        return bool(self.options.get("smooth"))

    def float_tensor(self, values: Any) -> torch.Tensor:
        return torch.as_tensor(values, dtype=self.dtype, device=self.device)

    def int_tensor(self, values: Any) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.int64, device=self.device)


def constant_tensor(value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Floats in the compute dtype; integers and bools keep their type (unsigned wider ones as int64)."""
    array = np.asarray(value)
    if array.dtype.kind in "fc":
        return torch.as_tensor(np.array(array, dtype=np.float64), device=device).to(dtype)
    torch_dtype = _INT_DTYPES.get(array.dtype, torch.int64)
    kept = np.array(array, dtype=array.dtype if array.dtype in _INT_DTYPES else np.int64)
    return torch.as_tensor(kept, device=device).to(torch_dtype)


_INT_DTYPES = {
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.bool_): torch.bool,
}


@dataclass
class AffineContext:
    """What ``affine`` sees of a node with one variable input: its constants and full one-sample shapes.

    ``mode``: 'affine' (the node as it is), 'linear' (shifts and biases dropped), 'abs' (the linear part
    with every weight replaced by its absolute value: a bound for rounding errors).
    """

    node: Node
    graph: Graph
    variable: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    mode: str

    @property
    def attrs(self) -> Attributes:
        return node_attrs(self.node)

    @property
    def absolute(self) -> bool:
        return self.mode == "abs"

    @property
    def shifts(self) -> bool:
        return self.mode == "affine"

    def const(self, index: int) -> np.ndarray | None:
        if index >= len(self.node.inputs) or not self.node.inputs[index]:
            return None
        value = self.graph.constants.get(self.node.inputs[index])
        return None if value is None else np.asarray(value, dtype=np.float64)

    def has_input(self, index: int) -> bool:
        return index < len(self.node.inputs) and bool(self.node.inputs[index])

    def weights(self, value: np.ndarray) -> torch.Tensor:
        """A constant as the float64 tensor this mode multiplies by (absolute values in 'abs' mode)."""
        tensor = torch.from_numpy(np.array(value, dtype=np.float64))
        return tensor.abs() if self.absolute else tensor


def axis_index(axis: int, rank: int) -> int:
    """ONNX's axis convention: a negative axis counts from the end."""
    return axis + rank if axis < 0 else axis


def variable_inputs(node: Node, graph: Graph) -> list[int]:
    """Indices of the inputs that are not constants (before any Lipschitz constant is known)."""
    return [i for i, v in enumerate(node.inputs) if v and v not in graph.constants]


class _ValueNames:
    """The names a graph's values use (constants and values with a shape), without copying them."""

    def __init__(self, graph: Graph):
        self.graph = graph

    def __contains__(self, name: object) -> bool:
        return name in self.graph.constants or name in self.graph.shapes


def add_constant(graph: Graph, base: str, value: np.ndarray) -> str:
    """A new constant of the graph, named after ``base``."""
    name = unique_name(_ValueNames(graph), base)
    graph.constants[name] = value
    return name


def replace_parameters(graph: Graph, node: Node, weight: np.ndarray, bias: np.ndarray) -> None:
    """Give a layer (input, weight, bias) new weight and bias constants (a folded affine map)."""
    node.inputs = [
        node.inputs[0],
        add_constant(graph, f"{node.name}.folded_weight", weight),
        add_constant(graph, f"{node.name}.folded_bias", bias),
    ]


# ---------------------------------------------------------------------------------------------
# The op class and its registry


class Op:
    """Everything lipcheck knows of one op. Subclasses override the facets the op has.

    The class docstring's first line is the op's summary in ``lipcheck rules``.
    """

    name: ClassVar[str] = ""  # set by ``register`` from the class name unless the class gives one
    attributes: ClassVar[Mapping[str, Any]] = {}  # attribute defaults, as the ONNX schema has them
    piecewise_linear: ClassVar[bool] = False  # with only such ops, J(x) is the exact map of x's linear region
    kinked: ClassVar[bool] = False  # a ReLU-like kink that the lower-bound search smooths for its gradients
    decomposes_activations: ClassVar[bool] = False  # may appear in an exporter's decomposition of an activation
    recognition_root: ClassVar[bool] = False  # where such a decomposition ends (the product in x * sigmoid(x))
    compares: ClassVar[bool] = False  # an elementwise order comparison: a step function of its operands
    selects: ClassVar[bool] = False  # an elementwise choice between two operands by a condition (Where)
    moves_entries: ClassVar[bool] = False  # only copies input entries to output positions (Slice, Concat, Gather)
    type_inputs: ClassVar[tuple[int, ...]] = ()  # inputs read for their type or shape only: no value flows out
    join_signs: ClassVar[tuple[float, float] | None] = None  # a x + b y of its two inputs (a residual join)
    extremum: ClassVar[str] = ""  # "max" or "min": the elementwise largest or smallest of its operands
    positive_part: ClassVar[bool] = False  # max(x, 0) elementwise
    negates: ClassVar[bool] = False  # -x elementwise
    rearranges: ClassVar[bool] = False  # moves the entries of its first input, each once, unchanged (Reshape)
    monotone: ClassVar[bool] = False  # non-decreasing in every input, entry by entry (ReLU, Add, MaxPool, Reshape)
    uses_ranges: ClassVar[bool] = False  # its rule reads its inputs' value ranges when there is a domain

    @property
    def summary(self) -> str:
        doc = (type(self).__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    # -- facets (a subclass overrides those it has)
    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        """A certified bound on the op's Lipschitz constant; raises UnsupportedVariant for variants it cannot bound."""
        raise NotImplementedError

    def slope(self, node: Node, graph: Graph) -> Slope | None:
        """For an elementwise activation, the interval of its difference quotients (None otherwise)."""
        return None

    def evaluate(self, ctx: EvalContext, *inputs: Any) -> Any:
        """The op on torch tensors: a tensor, or a tuple for several outputs."""
        raise NotImplementedError

    def check(self, node: Node) -> None:
        """Raise UnsupportedVariant for attribute variants ``evaluate`` does not implement."""

    def subgraphs(self, node: Node) -> list[Graph]:
        """The graphs the node holds and runs (an If's branches); the interpreter checks them too."""
        return []

    def affine(self, ctx: AffineContext, x: torch.Tensor) -> torch.Tensor:
        """The node on a batch ``x`` [N, *sample] of its variable input, exactly (see AffineContext.mode)."""
        raise NotFoldable(self.name)

    def rounding_terms(self, node: Node, graph: Graph) -> int:
        """Terms in the longest sum one output entry of ``affine`` is computed from (for rounding bounds)."""
        return 2

    def shift_invariant(self, node: Node, graph: Graph) -> ShiftInvariant | None:
        """The node as a convolution of its one variable input (None when it is not)."""
        return None

    def channel_scale(self, node: Node, graph: Graph) -> np.ndarray | None:
        """Per-channel multipliers m (axis 1) when the node computes m * x + shift of its one variable input."""
        return None

    def selection_axis(self, node: Node, graph: Graph) -> int | None:
        """The one axis (counted from 0) along which the node copies entries of its first input to its outputs at
        positions fixed by constants, keeping the rank (a Slice, a Split, a Gather of 1-D constant indices)."""
        return None

    def joined_axis(self, node: Node, graph: Graph) -> int | None:
        """The axis (counted from 0) along which the node places its inputs side by side (a Concat)."""
        return None

    def order_statistics(self, node: Node, graph: Graph) -> OrderStatistics | None:
        """The sorted entries of groups of its first input that its first output holds (ReduceMax: the largest)."""
        return None

    def window_mean(self, node: Node, graph: Graph) -> dict[str, Any] | None:
        """For a mean over windows that are all full (one divisor, the window size): the windows' geometry, as
        the attributes ``kernel_shape``, ``strides``, ``dilations``, ``pads``, ``ceil_mode`` of a pooling op."""
        return None

    def value_range(self, ctx: RuleContext, *ranges: Any) -> Any:
        """The outputs' ranges (an Interval, or a tuple of them) from the inputs' (``lipcheck.ranges``); None: the
        walk's generic rules apply (exact inputs, ``is_monotone``, ``affine``)."""
        return None

    def is_monotone(self, node: Node) -> bool:
        """Non-decreasing in every input, entry by entry (or, with one input, monotone either way): the range of
        the outputs is the outputs at the inputs' low ends and at their high ends."""
        return self.monotone

    def slope_on(self, node: Node, graph: Graph, x: Interval) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For an elementwise activation whose input lies in ``x``: per entry, bounds [low, high] on its difference
        quotients there (ReLU: 1 where the input is never negative); None: the global ``slope`` only."""
        return None

    def display_name(self, node: Node) -> str:
        """The op as the report shows it."""
        return node.op

    # -- folding (layers and per-channel affine ops)
    def channel_affine(self, graph: Graph, node: Node) -> tuple[np.ndarray, np.ndarray] | None:
        """(multiplier, shift) when the node computes y = multiplier * x + shift per channel (axis 1)."""
        return None

    def fold_output_affine(self, graph: Graph, node: Node, multiplier: np.ndarray, shift: np.ndarray) -> bool:
        """Absorb a per-channel affine map applied to this layer's output into its weights (True if done)."""
        return False

    def fold_input_affine(self, graph: Graph, node: Node, multiplier: np.ndarray, shift: np.ndarray) -> bool:
        """Absorb a per-channel affine map applied to this layer's input into its weights (True if done)."""
        return False

    def wrap_pads(self, graph: Graph, node: Node) -> list[int] | None:
        """A wrap (circular) padding's constant pads, ONNX-ordered [begin..., end...] over every axis; else None."""
        return None

    def absorb_wrap_padding(self, graph: Graph, node: Node, pad: Node, pads: list[int]) -> bool:
        """Take a wrap padding of this layer's input into the layer itself (True if done): a circular conv."""
        return False

    def parameter_inputs(self, node: Node) -> list[str]:
        """The inputs holding a per-channel affine node's parameters (the file's tensors ``normalize`` edits)."""
        return []

    def shift_parameters(self, node: Node, shift: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """New values of ``parameter_inputs`` that make the node the pure shift x + shift."""
        return []

    def bias_scale(self, node: Node) -> float:
        """The factor the layer's bias input is multiplied by (Gemm's beta)."""
        return 1.0

    def weight_input(self, node: Node, graph: Graph) -> int | None:
        """The input holding the weight that spectral normalization rescales (None: not a normalizable layer)."""
        return None

    def scale_output_channels(self, node: Node, weight: np.ndarray, multiplier: np.ndarray) -> np.ndarray | None:
        """The weight with output channel c scaled by multiplier[c] (None when the layout does not allow it)."""
        return None

    # -- which facets the op has
    @property
    def has_rule(self) -> bool:
        return type(self).lipschitz is not Op.lipschitz

    @property
    def has_evaluate(self) -> bool:
        return type(self).evaluate is not Op.evaluate

    @property
    def has_affine(self) -> bool:
        return type(self).affine is not Op.affine

    def facets(self) -> list[str]:
        """The facets this op implements, for ``lipcheck rules``."""
        found = [
            name
            for name, present in (("rule", self.has_rule), ("evaluate", self.has_evaluate), ("affine", self.has_affine))
            if present
        ]
        if type(self).slope is not Op.slope:
            found.append("slope")
        if type(self).value_range is not Op.value_range:
            found.append("range")
        return found


_OPS: dict[str, Op] = {}
OpClass = TypeVar("OpClass", bound=type[Op])


def register(cls: OpClass) -> OpClass:
    """Class decorator: register one instance of an op class under its name (a second one is refused)."""
    name = cls.__dict__.get("name") or cls.__name__
    if name in _OPS:
        raise ValueError(f"duplicate op {name!r}: {type(_OPS[name]).__qualname__} and {cls.__qualname__}")
    cls.name = name
    _OPS[name] = cls()
    return cls


def get(name: str) -> Op | None:
    """The registered op of that name (None for an op lipcheck does not know)."""
    return _OPS.get(name)


def registered() -> list[Op]:
    """Every registered op, by name."""
    return [_OPS[name] for name in sorted(_OPS)]


# ---------------------------------------------------------------------------------------------
# Rules as plain functions: for ops lipcheck does not know (a custom domain's op, in a plugin)

RuleFunction = Callable[[RuleContext], LocalBound]


@dataclass(frozen=True)
class RegisteredRule:
    op: str
    function: RuleFunction
    summary: str


class _FunctionRule(Op):
    """An op known only by a rule function registered with ``rule``."""

    def __init__(self, function: RuleFunction):
        self._function = function

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return self._function(ctx)

    @property
    def summary(self) -> str:
        doc = (self._function.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


def rule(*ops: str) -> Callable[[RuleFunction], RuleFunction]:
    """Register ``function(ctx) -> LocalBound`` as the rule of each op in ``ops``, ops lipcheck does not know yet.

    An op that is already registered is refused (and nothing of this call is registered).
    """

    def add(function: RuleFunction) -> RuleFunction:
        for op in ops:
            if op in _OPS:
                raise ValueError(f"duplicate rule for op {op!r}: {type(_OPS[op]).__qualname__}")
        if len(set(ops)) != len(ops):
            raise ValueError(f"op listed twice in one registration: {ops}")
        for op in ops:
            instance = _FunctionRule(function)
            instance.name = op  # type: ignore[misc]  # per instance: one function may serve several names
            _OPS[op] = instance
        return function

    return add


def registered_rules() -> list[RegisteredRule]:
    """Every op with a rule, by name, with its rule function and summary."""
    return [RegisteredRule(op.name, op.lipschitz, op.summary) for op in registered() if op.has_rule]
