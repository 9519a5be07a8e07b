"""lipcheck's graph IR: a small, framework-free description of a network.

Frontends (ONNX, PyTorch) emit this; rules and composition read it. Op names use the ONNX operator
vocabulary, and frontends normalise attributes once (defaults filled in, attributes that moved to
inputs across opsets moved back to attributes), so rules never look at opset versions.
It imports neither onnx nor torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lipcheck.errors import NonFiniteConstantError

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
    constants: MutableMapping[str, np.ndarray] = field(default_factory=dict)  # a dict or LazyConstants
    shapes: dict[str, Shape] = field(default_factory=dict)
    name: str = ""
    dtypes: dict[str, str] = field(default_factory=dict)  # number types by value, where known (see ``dtype``)

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
            return constant_shape(self.constants, value)
        return self.shapes.get(value)

    def dtype(self, value: str) -> str | None:
        """The value's number type by ONNX's name in lower case ("float", "double", "int64", "bool",
        "float8e4m3fn"...), where known."""
        if value in self.constants:
            return numpy_dtype_name(constant_dtype(self.constants, value))
        return self.dtypes.get(value)

    def is_discrete(self, value: str) -> bool:
        """Integers, booleans, strings: values nobody perturbs (indices, axes, masks), not directions."""
        dtype = self.dtype(value)
        return dtype is not None and dtype.startswith(("int", "uint", "bool", "string"))

    def needed_nodes(self, wanted: Iterable[str] | None = None, given: Iterable[str] = ()) -> list[Node]:
        """The nodes that ``wanted`` values (default: the outputs) depend on, in topological order.

        Values in ``given`` and constants need no node. One pass over the graph: linear time.
        """
        producers = {out: node for node in self.nodes for out in node.outputs if out}
        given = set(given)
        needed: set[int] = set()
        stack = list(self.outputs if wanted is None else wanted)
        seen: set[str] = set()
        while stack:
            value = stack.pop()
            if value in seen or value in given or value in self.constants:
                continue
            seen.add(value)
            node = producers.get(value)
            if node is not None and id(node) not in needed:
                needed.add(id(node))
                stack.extend(v for v in node.inputs if v)
        return [node for node in self.nodes if id(node) in needed]

    def copy(self) -> Graph:
        """A copy that passes can rewrite without touching this graph (constant arrays are shared, not copied)."""
        return Graph(
            nodes=[
                Node(n.name, n.op, list(n.inputs), list(n.outputs), dict(n.attrs), list(n.folded)) for n in self.nodes
            ],
            inputs=list(self.inputs),
            outputs=list(self.outputs),
            constants=dict(self.constants),
            shapes=dict(self.shapes),
            name=self.name,
            dtypes=dict(self.dtypes),
        )

    def prune(self) -> None:
        """Drop nodes no output depends on (e.g. parts of a recognised pattern)."""
        self.nodes = self.needed_nodes()

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)


def unique_name(taken: Container[str], base: str, counters: dict[str, int] | None = None) -> str:
    """``base``, or ``base_1``, ``base_2``... the first not in ``taken`` (not copied). ``counters`` remembers, per
    base, where the search stopped: naming n values after one base is then linear, not quadratic."""
    if base not in taken:
        return base
    i = counters.get(base, 1) if counters is not None else 1
    while f"{base}_{i}" in taken:
        i += 1
    if counters is not None:
        counters[base] = i + 1
    return f"{base}_{i}"


# ---------------------------------------------------------------------------------------------
# Constants loaded on access: models whose weights do not fit in memory are read a layer at a time


@dataclass(frozen=True)
class TensorSource:
    """Where a constant can be (re)read from without holding it: a file region, a proto, a recipe.

    ``load`` returns the array (a fresh one or a read-only view); ``shape``, ``dtype`` and ``nbytes``
    are known without calling it. Frontends make these (ONNX external data by offset, safetensors
    tensor by tensor); ``LazyConstants`` decides when to call ``load`` and when to forget the result.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= int(d)
        return count * np.dtype(self.dtype).itemsize


class LazyConstants(MutableMapping[str, np.ndarray]):
    """``Graph.constants`` for models read tensor by tensor: a mapping that loads values on access.

    Values set with ``c[name] = array`` are held ("pinned"), as in a dict. Values added with
    ``add_source`` are loaded when first read and kept in a least-recently-used cache of at most
    ``cache_bytes`` bytes; older ones are dropped and re-read when needed again, so a walk over the
    graph holds about one layer's weights at a time when the cache is small. ``cache_bytes=None``
    keeps everything once loaded. Shapes are known without loading (``shape_of``).
    """

    def __init__(self, cache_bytes: int | None = None):
        self.cache_bytes = cache_bytes
        self._pinned: dict[str, np.ndarray] = {}
        self._sources: dict[str, TensorSource] = {}
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self.loads = 0  # how many times a source was read (a measure of re-reading)
        self.peak_bytes = 0  # most bytes of re-readable values held at once (just before dropping old ones)

    # -- the mapping protocol
    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._pinned:
            return self._pinned[name]
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        source = self._sources[name]  # KeyError for unknown names, as a dict
        value = source.load()
        check_finite(name, value)  # read tensor by tensor: checked here, when first read, never all at once
        self.loads += 1
        self._hold(name, value)
        return value

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self._forget(name)
        self._pinned[name] = value

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._forget(name)

    def __contains__(self, name: object) -> bool:
        return name in self._pinned or name in self._sources

    def __iter__(self) -> Iterator[str]:
        yield from list(self._pinned)
        yield from [n for n in self._sources if n not in self._pinned]

    def __len__(self) -> int:
        return len(self._pinned) + len(self._sources)

    # -- lazy parts
    def add_source(self, name: str, source: TensorSource) -> None:
        """Register a constant read on access (replaces any value of that name)."""
        self._forget(name)
        self._sources[name] = source

    def set_derived(self, name: str, value: np.ndarray, recompute: Callable[[], np.ndarray]) -> None:
        """A computed constant (a folded weight) that may be dropped and recomputed like a loaded one."""
        self.add_source(name, TensorSource(tuple(value.shape), value.dtype, recompute))
        self._hold(name, value)

    def source(self, name: str) -> TensorSource | None:
        """How a lazy constant is (re)read; None for a held one."""
        return self._sources.get(name)

    def is_lazy(self, name: str) -> bool:
        return name in self._sources

    def shape_of(self, name: str) -> tuple[int, ...]:
        if name in self._pinned:
            return tuple(self._pinned[name].shape)
        return self._sources[name].shape

    def dtype_of(self, name: str) -> np.dtype:
        if name in self._pinned:
            return np.asarray(self._pinned[name]).dtype
        return np.dtype(self._sources[name].dtype)

    def nbytes_of(self, name: str) -> int:
        if name in self._pinned:
            return int(self._pinned[name].nbytes)
        return self._sources[name].nbytes

    def restrict(self, keep: Iterable[str]) -> None:
        """Forget every constant not named in ``keep`` (without loading anything)."""
        keep = set(keep)
        for name in [n for n in self if n not in keep]:
            self._forget(name)

    def release(self) -> None:
        """Drop every loaded value that can be re-read (pinned values stay)."""
        self._cache.clear()
        self._cached_bytes = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of loaded re-readable values held now (pinned ones not counted)."""
        return self._cached_bytes

    def _forget(self, name: str) -> None:
        self._pinned.pop(name, None)
        self._sources.pop(name, None)
        value = self._cache.pop(name, None)
        if value is not None:
            self._cached_bytes -= value.nbytes

    def _hold(self, name: str, value: np.ndarray) -> None:
        self._cache[name] = value
        self._cached_bytes += value.nbytes
        self.peak_bytes = max(self.peak_bytes, self._cached_bytes)
        self._evict(keep=name)

    def _evict(self, keep: str) -> None:
        if self.cache_bytes is None:
            return
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            oldest = next(iter(self._cache))
            if oldest == keep:
                self._cache.move_to_end(oldest)
                oldest = next(iter(self._cache))
            self._cached_bytes -= self._cache.pop(oldest).nbytes


CONTINUOUS_DTYPES = ("float", "double", "float16", "bfloat16")  # casts among these change precision only
_NUMPY_NAMES = {"float32": "float", "float64": "double", "bool_": "bool", "bool": "bool"}


def numpy_dtype_name(dtype: np.dtype) -> str:
    """ONNX's lower-case name of a numpy dtype (float32 -> "float", float8_e4m3fn -> "float8e4m3fn")."""
    name = np.dtype(dtype).name
    return _NUMPY_NAMES.get(name, name.replace("_", ""))


def check_finite(name: str, value: Any, node: Node | None = None, weight: bool = False) -> None:
    """Refuse a float constant holding NaN, and one holding an infinity when it is read as a weight.

    A NaN weight still gets a finite "certified" bound (the FFT and SVD paths absorb it) and an infinite one
    an inf or NaN norm: neither says anything about the network. Infinities elsewhere are legitimate (-inf
    attention masks, Clip without an upper bound), so they are refused only where a rule reads a weight.
    """
    array = np.asarray(value)
    if array.dtype.kind not in "fc" or array.size == 0:
        return
    if weight and np.isfinite(array).all():
        return
    problem = "NaN" if np.isnan(array).any() else ("an infinite value" if weight else "")
    if problem:
        raise NonFiniteConstantError(name, problem, node.name if node else "", node.op if node else "")


def check_constants(graph: Graph) -> None:
    """No constant the graph uses and holds in memory is NaN (a frontend's last step; lazy ones are checked
    when read, unused ones never matter)."""
    users = graph.consumers()
    lazy = graph.constants.is_lazy if isinstance(graph.constants, LazyConstants) else (lambda name: False)
    for name in [n for n in graph.constants if (n in users or n in graph.outputs) and not lazy(n)]:
        check_finite(name, graph.constants[name], users[name][0] if name in users else None)


def constant_dtype(constants: MutableMapping[str, np.ndarray], name: str) -> np.dtype:
    """A constant's dtype, without loading it when ``constants`` is lazy."""
    if isinstance(constants, LazyConstants):
        return constants.dtype_of(name)
    return np.asarray(constants[name]).dtype


def constant_shape(constants: MutableMapping[str, np.ndarray], name: str) -> tuple[int, ...]:
    """A constant's shape, without loading it when ``constants`` is lazy."""
    if isinstance(constants, LazyConstants):
        return constants.shape_of(name)
    return tuple(np.shape(constants[name]))
