"""Run a lipcheck Graph as a torch program: each op's ``evaluate`` facet, in one walk (``lipcheck.walk``).

The same Graph comes from every frontend (ONNX, PyTorch), so this interpreter serves all of them. It
is what the lower bound (``lipcheck.lower``) differentiates: every op is written with differentiable
torch functions, so ``torch.func.jvp``/``vjp`` and autograd work through it.

* Precision: float64 (the default) or float32. Float constants and inputs are converted to that
  dtype, and a ``Cast`` to any float type yields it too, so a float64 run stays float64 throughout.
  Integer and bool values (shapes, indices, masks) keep their types.
* Device: constants are moved to the device once, at construction.
* Ops without an evaluation, or attribute variants it does not implement, are all listed at
  construction in one ``UninterpretableOpsError``.

Which graph to interpret: the graph as loaded (before ``lipcheck.passes.prepare``) is exactly the
file's function. ``prepare`` keeps the function's Jacobian but not always its value to the last bit:
a recognised activation runs its reference formula (equal to the file's primitives to ~1e-6), and a
BatchNorm folded *before* a padded convolution shifts the output near the border by a constant.
Both graphs can be interpreted; ``lipcheck.lower`` uses the loaded one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lipcheck import ops
from lipcheck.errors import LipcheckError
from lipcheck.graph import Graph, Node
from lipcheck.ops import EvalContext, UnsupportedVariant
from lipcheck.ops.base import constant_tensor
from lipcheck.walk import walk

__all__ = [
    "FeedTypeError",
    "GraphFunction",
    "UninterpretableOpsError",
    "interpret",
    "interpreted_ops",
    "unsupported_ops",
]


class FeedTypeError(LipcheckError):
    """A value fed to the interpreter has an element type torch cannot hold (strings, objects)."""


class UninterpretableOpsError(LipcheckError):
    """The graph holds ops (or op variants) the interpreter cannot run; all are listed at once."""

    def __init__(self, missing: dict[str, list[str]]):
        self.ops = missing
        listed = "; ".join(
            f"{op} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" for op, names in sorted(missing.items())
        )
        super().__init__(f"cannot run the network: no interpreter for {len(missing)} op type(s): {listed}")


def interpreted_ops() -> list[str]:
    """The ops the interpreter can run."""
    return [op.name for op in ops.registered() if op.has_evaluate]


def unsupported_ops(graph: Graph, nodes: Sequence[Node] | None = None) -> dict[str, list[str]]:
    """Op (or variant) label -> names of the nodes the interpreter cannot run."""
    missing: dict[str, list[str]] = {}
    for node in graph.nodes if nodes is None else nodes:
        op = ops.get(node.op)
        label = node.op if op is None or not op.has_evaluate else None
        if label is None and op is not None:
            try:
                op.check(node)
            except UnsupportedVariant as exc:
                label = exc.label
        if label is not None:
            missing.setdefault(label, []).append(node.name)
        for subgraph in op.subgraphs(node) if op is not None and label is None else []:
            for inner, names in unsupported_ops(subgraph).items():
                missing.setdefault(f"{node.op}({inner} inside)", []).extend(f"{node.name}/{n}" for n in names)
    return missing


class GraphFunction:
    """A Graph as a callable torch function of its inputs (see the module docstring).

    ``fn(x)`` or ``fn(x1, x2)`` returns the output tensor (a tuple when the graph has several);
    ``fn.run(feeds, outputs)`` returns any values by name.
    """

    def __init__(self, graph: Graph, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.graph = graph
        self.dtype = dtype
        self.device = torch.device(device)
        self.nodes = graph.needed_nodes()
        missing = unsupported_ops(graph, self.nodes)
        if missing:
            raise UninterpretableOpsError(missing)
        used = {v for node in self.nodes for v in node.inputs if v} | set(graph.outputs)
        self.constants = {
            name: constant_tensor(value, dtype, self.device) for name, value in graph.constants.items() if name in used
        }
        self._options: dict[str, Any] = {"smooth": False}
        self._subgraphs: dict[int, tuple[Graph, GraphFunction]] = {}  # by id; the graph is held so its id stays
        self._contexts = {
            id(node): EvalContext(node, dtype, self.device, self._options, self._run_subgraph) for node in self.nodes
        }
        self._plans: dict[tuple[tuple[str, ...], tuple[str, ...]], list[Node]] = {}

    @property
    def input_names(self) -> list[str]:
        return list(self.graph.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.graph.inputs):
            raise TypeError(f"expected {len(self.graph.inputs)} input(s), got {len(inputs)}")
        values = self.run(dict(zip(self.graph.inputs, inputs, strict=True)))
        outputs = tuple(values[name] for name in self.graph.outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def _plan(self, given: tuple[str, ...], wanted: tuple[str, ...]) -> list[Node]:
        """The nodes needed to compute ``wanted`` from ``given`` values and constants."""
        key = (given, wanted)
        if key not in self._plans:
            needed = {id(node) for node in self.graph.needed_nodes(wanted, given)}
            self._plans[key] = [node for node in self.nodes if id(node) in needed]
        return self._plans[key]

    def run(
        self, feeds: Mapping[str, Any], outputs: Sequence[str] | None = None, smooth: bool = False
    ) -> dict[str, torch.Tensor]:
        """Compute ``outputs`` (default: the graph's) from ``feeds`` (any values by name: inputs or intermediates).

        ``smooth``: ReLU-family kinks are rounded (a softplus at a temperature of half the pre-activation's
        spread), a different function whose gradients show a piecewise-linear network which way to go.
        """
        self._options["smooth"] = smooth
        try:
            return self._run(feeds, outputs)
        finally:
            self._options["smooth"] = False

    def _run(self, feeds: Mapping[str, Any], outputs: Sequence[str] | None) -> dict[str, torch.Tensor]:
        wanted = tuple(self.graph.outputs if outputs is None else outputs)
        env: dict[str, torch.Tensor] = {}
        for name, value in feeds.items():
            tensor = torch.as_tensor(_torch_readable(name, value), device=self.device)
            env[name] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        plan = self._plan(tuple(sorted(env)), wanted)
        walk(plan, env, self._step, read=self._constant, keep=set(wanted))
        return {name: env[name] if name in env else self._constant(name) for name in wanted}

    def _run_subgraph(
        self, graph: Graph, feeds: dict[str, Any], dtype: torch.dtype, device: torch.device
    ) -> dict[str, Any]:
        """A graph a node holds (an If's branch), run on ``feeds``; its function is built once."""
        if id(graph) not in self._subgraphs:
            self._subgraphs[id(graph)] = (graph, GraphFunction(graph, dtype, device))
        function = self._subgraphs[id(graph)][1]
        return function.run({name: value for name, value in feeds.items() if name in graph.inputs})

    def _step(self, node: Node, args: list[Any]) -> Sequence[Any]:
        result = ops.get(node.op).evaluate(self._contexts[id(node)], *args)  # type: ignore[union-attr]
        return result if isinstance(result, tuple) else (result,)

    def _constant(self, name: str) -> torch.Tensor:
        if name not in self.constants:
            raise KeyError(f"value {name!r} is neither given nor computed by the graph")
        return self.constants[name]


def _torch_readable(name: str, value: Any) -> Any:
    """Arrays of numpy's extension types (bfloat16, float8, float4, int4: ONNX's, by ml_dtypes) as float32 or
    int8/uint8, exactly; strings and objects are refused with a lipcheck error."""
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        value = value.copy()  # torch warns about read-only arrays (protobuf and memory-mapped data)
    if not isinstance(value, np.ndarray) or value.dtype in _TORCH_NATIVE:
        return value
    kind = value.dtype.name
    if "float" in kind:
        return value.astype(np.float32)
    if kind in ("int2", "int4"):
        return value.astype(np.int8)
    if kind in ("uint2", "uint4"):
        return value.astype(np.uint8)
    if kind in _WIDER:  # torch has no arithmetic on uint16/32/64: the same numbers in a wider signed type
        if kind == "uint64" and value.size and int(value.max()) >= 2**63:
            raise FeedTypeError(f"input {name!r} holds uint64 values of 2^63 or more, which lipcheck cannot evaluate")
        return value.astype(_WIDER[kind])
    if value.dtype.kind in "iub":
        return value
    raise FeedTypeError(f"input {name!r} holds {kind} values, which lipcheck's interpreter cannot evaluate")


_WIDER = {"uint16": np.int32, "uint32": np.int64, "uint64": np.int64}
_TORCH_NATIVE = {np.dtype(t) for t in (np.float16, np.float32, np.float64, np.complex64, np.complex128, np.bool_)}


def run_graph(graph: Graph, feeds: dict[str, Any], dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """A graph's outputs on ``feeds`` (inputs it does not have are left out), with a function made for it."""
    return GraphFunction(graph, dtype, device).run(
        {name: value for name, value in feeds.items() if name in graph.inputs}
    )


def interpret(graph: Graph, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> GraphFunction:
    """The graph as a torch function (see GraphFunction)."""
    return GraphFunction(graph, dtype, device)
