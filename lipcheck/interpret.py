"""Run a lipcheck Graph as a torch program: one small function per op, in a registry like the rules'.

The same Graph comes from every frontend (ONNX, PyTorch), so this interpreter serves all of them. It
is what the lower bound (``lipcheck.lower``) differentiates: every op is written with differentiable
torch functions, so ``torch.func.jvp``/``vjp`` and autograd work through it.

* Precision: float64 (the default) or float32. Float constants and inputs are converted to that
  dtype, and a ``Cast`` to any float type yields it too, so a float64 run stays float64 throughout.
  Integer and bool values (shapes, indices, masks) keep their types.
* Device: constants are moved to the device once, at construction.
* Ops without an implementation, or attribute variants it does not implement, are all listed at
  construction in one ``UninterpretableOpsError``.

Which graph to interpret: the graph as loaded (before ``lipcheck.passes.prepare``) is exactly the
file's function. ``prepare`` keeps the function's Jacobian but not always its value to the last bit:
a recognised activation runs its reference formula (equal to the file's primitives to ~1e-6), and a
BatchNorm folded *before* a padded convolution shifts the output near the border by a constant.
Both graphs can be interpreted; ``lipcheck.lower`` uses the loaded one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lipcheck.errors import LipcheckError
from lipcheck.graph import Graph, Node

Value = torch.Tensor | None


class UninterpretableOpsError(LipcheckError):
    """The graph holds ops (or op variants) the interpreter cannot run; all are listed at once."""

    def __init__(self, ops: dict[str, list[str]]):
        self.ops = ops
        listed = "; ".join(
            f"{op} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" for op, names in sorted(ops.items())
        )
        super().__init__(f"cannot run the network: no interpreter for {len(ops)} op type(s): {listed}")


class InterpretError(LipcheckError):
    """A node failed while running (e.g. an input whose shape or type the op cannot take)."""


class Unsupported(Exception):
    """Raised by an op's ``check`` for an attribute variant the interpreter does not implement."""

    def __init__(self, label: str):
        super().__init__(label)
        self.label = label


@dataclass
class OpContext:
    node: Node
    dtype: torch.dtype
    device: torch.device
    options: dict[str, Any] = field(default_factory=dict)  # per-run options shared by all nodes (``smooth``)

    @property
    def attrs(self) -> dict[str, Any]:
        return self.node.attrs

    def attr(self, name: str, default: Any = None) -> Any:
        value = self.node.attrs.get(name)
        return default if value is None else value

    def float_tensor(self, values: Any) -> torch.Tensor:
        return torch.as_tensor(values, dtype=self.dtype, device=self.device)

    def int_tensor(self, values: Any) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.int64, device=self.device)


OpFunction = Callable[..., Any]
CheckFunction = Callable[[Node], None]


@dataclass(frozen=True)
class RegisteredOp:
    op: str
    function: OpFunction
    check: CheckFunction | None = None


_OPS: dict[str, RegisteredOp] = {}


def op(*names: str, check: CheckFunction | None = None) -> Callable[[OpFunction], OpFunction]:
    """Register ``function(ctx, *inputs)`` for each op name; it returns a tensor or a tuple of outputs."""

    def register(function: OpFunction) -> OpFunction:
        for name in names:
            if name in _OPS:
                raise ValueError(f"duplicate interpreter for op {name!r}")
        for name in names:
            _OPS[name] = RegisteredOp(name, function, check)
        return function

    return register


def interpreted_ops() -> list[str]:
    return sorted(_OPS)


def unsupported_ops(graph: Graph, nodes: Sequence[Node] | None = None) -> dict[str, list[str]]:
    """Op (or variant) label -> names of the nodes the interpreter cannot run."""
    missing: dict[str, list[str]] = {}
    for node in graph.nodes if nodes is None else nodes:
        registered = _OPS.get(node.op)
        label = node.op if registered is None else None
        if registered is not None and registered.check is not None:
            try:
                registered.check(node)
            except Unsupported as exc:
                label = exc.label
        if label is not None:
            missing.setdefault(label, []).append(node.name)
    return missing


# ---------------------------------------------------------------------------------------------
# The interpreter

_INT_DTYPES = {
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.bool_): torch.bool,
}


def constant_tensor(value: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Floats in the compute dtype; integers and bools keep their type (unsigned wider ones as int64)."""
    array = np.asarray(value)
    if array.dtype.kind in "fc":
        return torch.as_tensor(np.array(array, dtype=np.float64), device=device).to(dtype)
    torch_dtype = _INT_DTYPES.get(array.dtype, torch.int64)
    return torch.as_tensor(
        np.array(array, dtype=array.dtype if array.dtype in _INT_DTYPES else np.int64), device=device
    ).to(torch_dtype)


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
        self.nodes = graph.live_nodes()
        missing = unsupported_ops(graph, self.nodes)
        if missing:
            raise UninterpretableOpsError(missing)
        used = {v for node in self.nodes for v in node.inputs if v} | set(graph.outputs)
        self.constants = {
            name: constant_tensor(value, dtype, self.device) for name, value in graph.constants.items() if name in used
        }
        self._options: dict[str, Any] = {"smooth": False}
        self._contexts = [OpContext(node, dtype, self.device, self._options) for node in self.nodes]
        self._plans: dict[tuple[tuple[str, ...], tuple[str, ...]], list[int]] = {}

    @property
    def input_names(self) -> list[str]:
        return list(self.graph.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.graph.inputs):
            raise TypeError(f"expected {len(self.graph.inputs)} input(s), got {len(inputs)}")
        values = self.run(dict(zip(self.graph.inputs, inputs, strict=True)))
        outputs = tuple(values[name] for name in self.graph.outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def _plan(self, given: tuple[str, ...], wanted: tuple[str, ...]) -> list[int]:
        """Indices of the nodes needed to compute ``wanted`` from ``given`` values and constants."""
        key = (given, wanted)
        if key not in self._plans:
            producers = {out: i for i, node in enumerate(self.nodes) for out in node.outputs if out}
            needed: set[int] = set()
            stack = [v for v in wanted if v not in given]
            seen: set[str] = set()
            while stack:
                value = stack.pop()
                if value in seen or value in given or value in self.constants:
                    continue
                seen.add(value)
                index = producers.get(value)
                if index is None:
                    raise KeyError(f"value {value!r} is neither given nor computed by the graph")
                needed.add(index)
                stack.extend(v for v in self.nodes[index].inputs if v)
            self._plans[key] = sorted(needed)
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
            tensor = torch.as_tensor(value, device=self.device)
            env[name] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        for index in self._plan(tuple(sorted(env)), wanted):
            node, ctx = self.nodes[index], self._contexts[index]
            args = [self._value(env, v) if v else None for v in node.inputs]
            try:
                result = _OPS[node.op].function(ctx, *args)
            except (LipcheckError, KeyError):
                raise
            except Exception as exc:
                raise InterpretError(f"running node {node.name!r} ({node.op}) failed: {exc}") from exc
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(node.outputs, results, strict=False):
                if name:
                    env[name] = value
        return {name: self._value(env, name) for name in wanted}

    def _value(self, env: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if name in env:
            return env[name]
        return self.constants[name]


def interpret(graph: Graph, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> GraphFunction:
    """The graph as a torch function (see GraphFunction)."""
    return GraphFunction(graph, dtype, device)


# ---------------------------------------------------------------------------------------------
# Helpers


def _ints(value: torch.Tensor | Sequence[int] | None) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _spatial_pads(
    ctx: OpContext, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[int]:
    """Explicit pads [begin..., end...]; SAME padding of an input size unknown at load time computed now."""
    pads = ctx.attrs.get("pads")
    if pads is not None:
        return [int(p) for p in pads]
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    d = len(spatial)
    result = [0] * (2 * d)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for i, (n, s, k, dl) in enumerate(zip(spatial, strides, kernel, dilations, strict=True)):
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * dl + 1 - n, 0)
            small, large = total // 2, total - total // 2
            result[i], result[i + d] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    return result


def _pad_spatial(x: torch.Tensor, pads: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad the trailing len(pads)//2 axes by ONNX-ordered pads [begin..., end...]."""
    d = len(pads) // 2
    if not any(pads):
        return x
    torch_pads: list[int] = []
    for i in reversed(range(d)):
        torch_pads += [int(pads[i]), int(pads[i + d])]
    return F.pad(x, torch_pads, value=value)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _spatial_check(node: Node) -> None:
    k = node.attrs.get("kernel_shape") or []
    if len(k) not in (1, 2, 3) and node.op not in ("Conv", "ConvTranspose"):
        raise Unsupported(f"{node.op}({len(k)}-d)")


# ---------------------------------------------------------------------------------------------
# Elementwise activations


def _unary(name: str, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
    op(name)(lambda ctx, x: function(x))


def _relu(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    """max(x, 0); with ``smooth``, tau * softplus(x / tau) with tau half the spread of x (gradient search only)."""
    if not ctx.options.get("smooth"):
        return torch.relu(x)
    tau = (0.5 * x.detach().std() if x.numel() > 1 else x.detach().abs().reshape(())).clamp_min(1e-6)
    return tau * F.softplus(x / tau)


op("Relu")(_relu)

for _name, _function in {
    "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid,
    "Erf": torch.erf,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Sign": torch.sign,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,
    "Softsign": lambda x: x / (1 + x.abs()),
    "Softplus": lambda x: F.softplus(x, threshold=30.0),
    "Mish": lambda x: x * torch.tanh(F.softplus(x, threshold=30.0)),
    "HardSwish": lambda x: x * torch.clamp(x / 6 + 0.5, 0, 1),
    "Not": torch.logical_not,
}.items():
    _unary(_name, _function)


@op("LeakyRelu")
def _leaky_relu(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    alpha = float(ctx.attr("alpha", 0.01))
    if ctx.options.get("smooth"):
        return alpha * x + (1 - alpha) * _relu(ctx, x)
    return torch.where(x >= 0, x, alpha * x)


@op("PRelu")
def _prelu(ctx: OpContext, x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    if ctx.options.get("smooth"):
        return slope * x + (1 - slope) * _relu(ctx, x)
    return torch.where(x >= 0, x, slope * x)


@op("Elu")
def _elu(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, float(ctx.attr("alpha", 1.0)) * torch.expm1(torch.clamp_max(x, 0)))


@op("Selu")
def _selu(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    alpha = float(ctx.attr("alpha", 1.6732632423543772))
    gamma = float(ctx.attr("gamma", 1.0507009873554805))
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(torch.clamp_max(x, 0)))


@op("Celu")
def _celu(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    alpha = float(ctx.attr("alpha", 1.0))
    return torch.clamp_min(x, 0) + torch.clamp_max(alpha * torch.expm1(torch.clamp_max(x, 0) / alpha), 0)


@op("ThresholdedRelu")
def _thresholded_relu(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > float(ctx.attr("alpha", 1.0)), x, torch.zeros_like(x))


@op("HardSigmoid")
def _hard_sigmoid(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(float(ctx.attr("alpha", 0.2)) * x + float(ctx.attr("beta", 0.5)), 0, 1)


@op("Gelu")
def _gelu(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh" if str(ctx.attr("approximate", "none")) == "tanh" else "none")


@op("Clip")
def _clip(ctx: OpContext, x: torch.Tensor, lo: Value = None, hi: Value = None) -> torch.Tensor:
    if lo is None and "min" in ctx.attrs:  # opset < 11: bounds are attributes
        lo = ctx.float_tensor(float(ctx.attrs["min"]))
    if hi is None and "max" in ctx.attrs:
        hi = ctx.float_tensor(float(ctx.attrs["max"]))
    if lo is not None:
        x = torch.maximum(x, lo.to(x.dtype))
    if hi is not None:
        x = torch.minimum(x, hi.to(x.dtype))
    return x


def _recognised_check(node: Node) -> None:
    from lipcheck.passes import KNOWN_ACTIVATIONS

    if node.attrs.get("activation") not in {name for name, _, _ in KNOWN_ACTIVATIONS}:
        raise Unsupported(f"Recognised({node.attrs.get('activation')})")


@op("Recognised", check=_recognised_check)
def _recognised(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    """An activation recognised by ``prepare``: its reference formula times the matched scale."""
    from lipcheck.passes import KNOWN_ACTIVATIONS

    function = next(f for name, f, _ in KNOWN_ACTIVATIONS if name == ctx.attrs["activation"])
    return float(ctx.attrs.get("scale", 1.0)) * function(x)


# ---------------------------------------------------------------------------------------------
# Arithmetic


def _same_float(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.is_floating_point() and not b.is_floating_point():
        b = b.to(a.dtype)
    elif b.is_floating_point() and not a.is_floating_point():
        a = a.to(b.dtype)
    return a, b


@op("Add")
def _add(ctx: OpContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.add(*_same_float(a, b))


@op("Sub")
def _sub(ctx: OpContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sub(*_same_float(a, b))


@op("Mul")
def _mul(ctx: OpContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mul(*_same_float(a, b))


@op("Div")
def _div(ctx: OpContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return torch.div(*_same_float(a, b))


@op("Pow")
def _pow(ctx: OpContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point():
        return torch.pow(a, b.to(a.dtype))
    return torch.pow(a, b).to(a.dtype)


def _variadic(function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFunction:
    def run(ctx: OpContext, *xs: Value) -> torch.Tensor:
        return functools.reduce(lambda a, b: function(*_same_float(a, b)), [x for x in xs if x is not None])

    return run


op("Sum")(_variadic(torch.add))
op("Max")(_variadic(torch.maximum))
op("Min")(_variadic(torch.minimum))


@op("Mean")
def _mean(ctx: OpContext, *xs: Value) -> torch.Tensor:
    present = [x for x in xs if x is not None]
    return _variadic(torch.add)(ctx, *present) / len(present)


for _name, _function in {
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}.items():
    op(_name)(lambda ctx, a, b, _f=_function: _f(*_same_float(a, b)))


@op("Where")
def _where(ctx: OpContext, condition: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(condition.to(torch.bool), *_same_float(a, b))


# ---------------------------------------------------------------------------------------------
# Dense layers and convolutions


@op("Gemm")
def _gemm(ctx: OpContext, a: torch.Tensor, b: torch.Tensor, c: Value = None) -> torch.Tensor:
    if int(ctx.attr("transA", 0)):
        a = a.transpose(0, 1)
    if int(ctx.attr("transB", 0)):
        b = b.transpose(0, 1)
    y = float(ctx.attr("alpha", 1.0)) * (a @ b)
    if c is not None:
        y = y + float(ctx.attr("beta", 1.0)) * c
    return y


@op("MatMul")
def _matmul(ctx: OpContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(*_same_float(a, b))


def _conv_check(node: Node) -> None:
    if (
        node.op == "ConvTranspose"
        and node.attrs.get("auto_pad") in ("SAME_UPPER", "SAME_LOWER")
        and node.attrs.get("output_shape")
    ):
        raise Unsupported("ConvTranspose(auto_pad=SAME with output_shape)")


@op("Conv", check=_conv_check)
def _conv(ctx: OpContext, x: torch.Tensor, w: torch.Tensor, b: Value = None) -> torch.Tensor:
    d = w.dim() - 2
    if d not in _CONV:
        raise ValueError(f"{d}-d convolution")
    kernel = list(w.shape[2:])
    strides = list(ctx.attr("strides", [1] * d))
    dilations = list(ctx.attr("dilations", [1] * d))
    pads = _spatial_pads(ctx, x.shape[2:], kernel, strides, dilations)
    symmetric = pads[:d] == pads[d:]
    if not symmetric:
        x = _pad_spatial(x, pads)
    return _CONV[d](
        x, w, b, tuple(strides), tuple(pads[:d]) if symmetric else 0, tuple(dilations), int(ctx.attr("group", 1))
    )


def _transpose_pads(
    ctx: OpContext,
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    adjust: Sequence[int],
) -> tuple[list[int], list[int]]:
    """(begin pads, output sizes) of a ConvTranspose, as onnxruntime computes them."""
    d = len(spatial)
    output_shape = ctx.attrs.get("output_shape")
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    pads = list(ctx.attrs.get("pads") or [0] * (2 * d))
    begins, sizes = [], []
    for i in range(d):
        full = (spatial[i] - 1) * strides[i] + adjust[i] + (kernel[i] - 1) * dilations[i] + 1
        if output_shape:
            out = int(output_shape[-d + i])
            total = max(0, full - out)
            begin = total - total // 2 if auto_pad == "SAME_UPPER" else total // 2
        else:
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                total = max(0, full - spatial[i] * strides[i])
                begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
                end = total - begin
            else:
                begin, end = int(pads[i]), int(pads[i + d])
            out = full - begin - end
        begins.append(begin)
        sizes.append(out)
    return begins, sizes


@op("ConvTranspose", check=_conv_check)
def _conv_transpose(ctx: OpContext, x: torch.Tensor, w: torch.Tensor, b: Value = None) -> torch.Tensor:
    d = w.dim() - 2
    if d not in _CONV_T:
        raise ValueError(f"{d}-d transposed convolution")
    kernel = list(w.shape[2:])
    strides = list(ctx.attr("strides", [1] * d))
    dilations = list(ctx.attr("dilations", [1] * d))
    adjust = list(ctx.attr("output_padding", [0] * d))
    groups = int(ctx.attr("group", 1))
    y = _CONV_T[d](x, w, None, tuple(strides), 0, 0, groups, tuple(dilations))
    begins, sizes = _transpose_pads(ctx, x.shape[2:], kernel, strides, dilations, adjust)
    # output_padding adds zero rows at the end; then crop [begin, begin + size) on each axis
    y = _pad_spatial(y, [0] * d + [max(0, bg + sz - n) for bg, sz, n in zip(begins, sizes, y.shape[2:], strict=True)])
    for i, (begin, size) in enumerate(zip(begins, sizes, strict=True)):
        y = y.narrow(2 + i, begin, size)
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * d))
    return y


def _batchnorm_check(node: Node) -> None:
    if int(node.attrs.get("training_mode", 0) or 0):
        raise Unsupported("BatchNormalization(training_mode=1)")


def _channel(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel parameter shaped to broadcast over [N, C, ...] (or per-element, opset < 9 spatial=0)."""
    if param.dim() == 1:
        return param.reshape(1, -1, *([1] * (x.dim() - 2)))
    return param.unsqueeze(0)


@op("BatchNormalization", check=_batchnorm_check)
def _batchnorm(
    ctx: OpContext, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> torch.Tensor:
    multiplier = scale / torch.sqrt(var + float(ctx.attr("epsilon", 1e-5)))
    return (x - _channel(mean, x)) * _channel(multiplier, x) + _channel(bias, x)


# ---------------------------------------------------------------------------------------------
# Normalisations (not globally Lipschitz, but they run)


def _normalise(x: torch.Tensor, dims: Sequence[int], epsilon: float) -> torch.Tensor:
    mean = x.mean(dim=tuple(dims), keepdim=True)
    centred = x - mean
    return centred / torch.sqrt(centred.pow(2).mean(dim=tuple(dims), keepdim=True) + epsilon)


@op("LayerNormalization")
def _layer_norm(ctx: OpContext, x: torch.Tensor, scale: Value = None, bias: Value = None) -> tuple[torch.Tensor, ...]:
    axis = _axis(int(ctx.attr("axis", -1)), x.dim())
    dims = list(range(axis, x.dim()))
    epsilon = float(ctx.attr("epsilon", 1e-5))
    mean = x.mean(dim=tuple(dims), keepdim=True)
    inv_std = 1 / torch.sqrt((x - mean).pow(2).mean(dim=tuple(dims), keepdim=True) + epsilon)
    y = (x - mean) * inv_std
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y, mean, inv_std


@op("InstanceNormalization")
def _instance_norm(ctx: OpContext, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    y = _normalise(x, range(2, x.dim()), float(ctx.attr("epsilon", 1e-5)))
    return y * _channel(scale, x) + _channel(bias, x)


@op("GroupNormalization")
def _group_norm(ctx: OpContext, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    groups = int(ctx.attrs["num_groups"])
    n, c = x.shape[0], x.shape[1]
    y = _normalise(x.reshape(n, groups, -1), [2], float(ctx.attr("epsilon", 1e-5))).reshape(x.shape)
    if scale.numel() == groups and groups != c:  # opset 18: one scale and bias per group
        scale, bias = scale.repeat_interleave(c // groups), bias.repeat_interleave(c // groups)
    return y * _channel(scale, x) + _channel(bias, x)


@op("MeanVarianceNormalization")
def _mvn(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    axes = [_axis(int(a), x.dim()) for a in ctx.attr("axes", [0, 2, 3])]
    centred = x - x.mean(dim=tuple(axes), keepdim=True)
    return centred / (torch.sqrt(centred.pow(2).mean(dim=tuple(axes), keepdim=True)) + 1e-9)


@op("LpNormalization")
def _lp_normalisation(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    p = int(ctx.attr("p", 2))
    norm = x.abs().pow(p).sum(dim=int(ctx.attr("axis", -1)), keepdim=True).pow(1 / p)
    return x / norm


def _softmax_like(function: Callable[[torch.Tensor, int], torch.Tensor]) -> OpFunction:
    def run(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
        axis = _axis(int(ctx.attr("axis", -1)), x.dim())
        if ctx.attrs.get("coerce_2d"):  # opset < 13: flatten from the axis on
            return function(x.reshape(math.prod(x.shape[:axis]), -1), 1).reshape(x.shape)
        return function(x, axis)

    return run


op("Softmax")(_softmax_like(lambda x, axis: torch.softmax(x, axis)))
op("LogSoftmax")(_softmax_like(lambda x, axis: torch.log_softmax(x, axis)))


# ---------------------------------------------------------------------------------------------
# Pooling and reductions


def _pool_geometry(ctx: OpContext, x: torch.Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
    k = [int(v) for v in ctx.attrs["kernel_shape"]]
    d = len(k)
    strides = [int(v) for v in ctx.attr("strides", [1] * d)]
    dilations = [int(v) for v in ctx.attr("dilations", [1] * d)]
    pads = _spatial_pads(ctx, x.shape[2:], k, strides, dilations)
    return k, strides, dilations, pads


def _pool_output_sizes(spatial, k, strides, dilations, pads, ceil_mode: bool) -> list[int]:
    d = len(k)
    sizes = []
    for i, n in enumerate(spatial):
        span = (k[i] - 1) * dilations[i] + 1
        length = n + pads[i] + pads[i + d] - span
        out = (math.ceil(length / strides[i]) if ceil_mode else length // strides[i]) + 1
        if ceil_mode and (out - 1) * strides[i] >= n + pads[i]:
            out -= 1  # the last window must start inside the input or the left padding
        sizes.append(max(out, 0))
    return sizes


def _window_sums(
    x: torch.Tensor, k, strides, dilations, pads, ceil_mode: bool, counted: str = "input"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over every pooling window (zero padding) and the number of taps counted per window.

    Any rank, ONNX's output size (ceil mode included). ``counted``: "input" counts taps inside the
    input, "padded" those inside the padded input (count_include_pad); the ceil-mode overhang never counts.
    """
    d = len(k)
    spatial = list(x.shape[2:])
    sizes = _pool_output_sizes(spatial, k, strides, dilations, pads, ceil_mode)
    ends = []
    for i, n in enumerate(spatial):
        needed = (sizes[i] - 1) * strides[i] + (k[i] - 1) * dilations[i] + 1
        ends.append(max(needed - n - pads[i], pads[i + d]))
    padded = _pad_spatial(x, list(pads[:d]) + ends)
    mask = torch.ones((1, 1, *spatial), dtype=x.dtype, device=x.device)
    if counted == "padded":
        mask = _pad_spatial(mask, pads, value=1.0)
        mask = _pad_spatial(mask, [0] * d + [e - p for e, p in zip(ends, pads[d:], strict=True)])
    else:
        mask = _pad_spatial(mask, list(pads[:d]) + ends)
    n, c = x.shape[0], x.shape[1]
    ones = torch.ones((1, 1, *k), dtype=x.dtype, device=x.device)
    crop = (slice(None), slice(None), *[slice(0, s) for s in sizes])

    def window_sum(t: torch.Tensor) -> torch.Tensor:
        return _CONV[d](t, ones, None, tuple(strides), 0, tuple(dilations))[crop]

    total = window_sum(padded.reshape(n * c, 1, *padded.shape[2:]))
    return total.reshape(n, c, *total.shape[2:]), window_sum(mask)


@op("AveragePool", check=_spatial_check)
def _average_pool(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    k, strides, dilations, pads = _pool_geometry(ctx, x)
    counted = "padded" if int(ctx.attr("count_include_pad", 0)) else "input"
    total, count = _window_sums(x, k, strides, dilations, pads, bool(int(ctx.attr("ceil_mode", 0))), counted)
    return total / count.clamp_min(1)


@op("LpPool", check=_spatial_check)
def _lp_pool(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    k, strides, dilations, pads = _pool_geometry(ctx, x)
    p = float(ctx.attr("p", 2))
    total, _ = _window_sums(x.abs().pow(p), k, strides, dilations, pads, bool(int(ctx.attr("ceil_mode", 0))))
    return total.pow(1 / p)


def _maxpool_check(node: Node) -> None:
    _spatial_check(node)
    if len(node.outputs) > 1 and node.outputs[1]:
        raise Unsupported("MaxPool(with Indices output)")


@op("MaxPool", check=_maxpool_check)
def _max_pool(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    k, strides, dilations, pads = _pool_geometry(ctx, x)
    d = len(k)
    ceil_mode = bool(int(ctx.attr("ceil_mode", 0)))
    fits = pads[:d] == pads[d:] and all(2 * p <= kk for p, kk in zip(pads[:d], k, strict=True))
    if not fits:
        x = _pad_spatial(x, pads, value=-math.inf)
    return _MAX_POOL[d](x, tuple(k), tuple(strides), tuple(pads[:d]) if fits else 0, tuple(dilations), ceil_mode)


@op("GlobalAveragePool")
def _global_average_pool(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def _global_max_pool(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalLpPool")
def _global_lp_pool(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    p = float(ctx.attr("p", 2))
    return x.abs().pow(p).sum(dim=tuple(range(2, x.dim())), keepdim=True).pow(1 / p)


def _reduce(function: Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor]) -> OpFunction:
    def run(ctx: OpContext, x: torch.Tensor, axes_input: Value = None) -> torch.Tensor:
        axes = ctx.attrs.get("axes")
        if axes is None and axes_input is not None:
            axes = _ints(axes_input)
        keepdims = bool(int(ctx.attr("keepdims", 1)))
        if not axes:
            if int(ctx.attr("noop_with_empty_axes", 0)):
                return x
            axes = list(range(x.dim()))
        return function(x, tuple(_axis(int(a), x.dim()) for a in axes), keepdims)

    return run


for _name, _function in {
    "ReduceMean": lambda x, a, k: x.mean(dim=a, keepdim=k),
    "ReduceSum": lambda x, a, k: x.sum(dim=a, keepdim=k),
    "ReduceMax": lambda x, a, k: x.amax(dim=a, keepdim=k),
    "ReduceMin": lambda x, a, k: x.amin(dim=a, keepdim=k),
    "ReduceL2": lambda x, a, k: x.pow(2).sum(dim=a, keepdim=k).sqrt(),
    "ReduceL1": lambda x, a, k: x.abs().sum(dim=a, keepdim=k),
    "ReduceSumSquare": lambda x, a, k: x.pow(2).sum(dim=a, keepdim=k),
    "ReduceLogSumExp": lambda x, a, k: torch.logsumexp(x, dim=a, keepdim=k),
}.items():
    op(_name)(_reduce(_function))


# ---------------------------------------------------------------------------------------------
# Rearrangements, selections, copies


@op("Identity")
def _identity(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    return x


@op("Dropout")
def _dropout(ctx: OpContext, x: torch.Tensor, *_: Value) -> tuple[torch.Tensor, torch.Tensor]:
    return x, torch.ones_like(x, dtype=torch.bool)


_ONNX_TYPES: dict[int, torch.dtype | None] = {  # None: the compute dtype (every float type)
    1: None,
    10: None,
    11: None,
    16: None,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    12: torch.int64,
    13: torch.int64,
}


def _cast_check(node: Node) -> None:
    if node.op == "Cast" and int(node.attrs.get("to", 1)) not in _ONNX_TYPES:
        raise Unsupported(f"Cast(to={node.attrs.get('to')})")


@op("Cast", check=_cast_check)
def _cast(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    target = _ONNX_TYPES[int(ctx.attrs["to"])]
    return x.to(ctx.dtype if target is None else target)


@op("CastLike")
def _cast_like(ctx: OpContext, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(ctx.dtype if like.is_floating_point() else like.dtype)


@op("Flatten")
def _flatten(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    axis = _axis(int(ctx.attr("axis", 1)), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Reshape")
def _reshape(ctx: OpContext, x: torch.Tensor, shape: Value = None) -> torch.Tensor:
    target = _ints(shape) if shape is not None else [int(v) for v in ctx.attrs["shape"]]
    if not int(ctx.attr("allowzero", 0)):
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


@op("Squeeze")
def _squeeze(ctx: OpContext, x: torch.Tensor, axes: Value = None) -> torch.Tensor:
    listed = _ints(axes) if axes is not None else ctx.attrs.get("axes")
    if not listed:
        return x.reshape([d for d in x.shape if d != 1])
    drop = {_axis(int(a), x.dim()) for a in listed}
    return x.reshape([d for i, d in enumerate(x.shape) if i not in drop])


@op("Unsqueeze")
def _unsqueeze(ctx: OpContext, x: torch.Tensor, axes: Value = None) -> torch.Tensor:
    listed = _ints(axes) if axes is not None else [int(a) for a in ctx.attrs["axes"]]
    rank = x.dim() + len(listed)
    for axis in sorted(_axis(a, rank) for a in listed):
        x = x.unsqueeze(axis)
    return x


@op("Transpose")
def _transpose(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    perm = ctx.attrs.get("perm")
    return x.permute(*(perm if perm else reversed(range(x.dim()))))


@op("DepthToSpace")
def _depth_to_space(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    b = int(ctx.attrs["blocksize"])
    n, c, h, w = x.shape
    if str(ctx.attr("mode", "DCR")) == "CRD":
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    else:
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@op("SpaceToDepth")
def _space_to_depth(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    b = int(ctx.attrs["blocksize"])
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@op("Shape")
def _shape(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    start = ctx.attrs.get("start") or 0
    return ctx.int_tensor(list(x.shape)[start : ctx.attrs.get("end")])


@op("Size")
def _size(ctx: OpContext, x: torch.Tensor) -> torch.Tensor:
    return ctx.int_tensor(x.numel())


def _slice_indices(start: int, end: int, step: int, n: int) -> range:
    """ONNX Slice clamping rules for one axis."""
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), n), min(max(end, 0), n)
    else:
        start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
    return range(start, end, step)


@op("Slice")
def _slice(
    ctx: OpContext, x: torch.Tensor, starts: Value = None, ends: Value = None, axes: Value = None, steps: Value = None
) -> torch.Tensor:
    if starts is None:  # opset < 10: attributes
        start_list, end_list = list(ctx.attrs["starts"]), list(ctx.attrs["ends"])
        axis_list = list(ctx.attrs.get("axes") or range(len(start_list)))
        step_list = [1] * len(start_list)
    else:
        start_list, end_list = _ints(starts), _ints(ends)
        axis_list = _ints(axes) if axes is not None else list(range(len(start_list)))
        step_list = _ints(steps) if steps is not None else [1] * len(start_list)
    for start, end, axis, step in zip(start_list, end_list, axis_list, step_list, strict=True):
        axis = _axis(int(axis), x.dim())
        picked = _slice_indices(int(start), int(end), int(step), x.shape[axis])
        if step == 1:
            x = x.narrow(axis, picked.start, max(len(picked), 0))
        else:
            x = x.index_select(axis, ctx.int_tensor(list(picked)))
    return x


@op("Split")
def _split(ctx: OpContext, x: torch.Tensor, split: Value = None) -> tuple[torch.Tensor, ...]:
    axis = _axis(int(ctx.attr("axis", 0)), x.dim())
    sizes = _ints(split) if split is not None else ctx.attrs.get("split")
    count = len(ctx.node.outputs)
    if not sizes:
        n = x.shape[axis]
        chunk = math.ceil(n / count)
        sizes = [min(chunk, n - i * chunk) for i in range(count)]
    return tuple(torch.split(x, [int(s) for s in sizes], dim=axis))


@op("Concat")
def _concat(ctx: OpContext, *xs: Value) -> torch.Tensor:
    present = [x for x in xs if x is not None]
    if any(x.is_floating_point() for x in present):
        present = [x.to(ctx.dtype) for x in present]
    return torch.cat(present, dim=_axis(int(ctx.attr("axis", 0)), present[0].dim()))


@op("Gather")
def _gather(ctx: OpContext, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    axis = _axis(int(ctx.attr("axis", 0)), x.dim())
    index = indices.to(torch.int64)
    index = torch.where(index < 0, index + x.shape[axis], index)
    picked = x.index_select(axis, index.reshape(-1))
    return picked.reshape(*x.shape[:axis], *index.shape, *x.shape[axis + 1 :])


@op("Compress")
def _compress(ctx: OpContext, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    axis = ctx.attrs.get("axis")
    if axis is None:
        x, axis = x.reshape(-1), 0
    axis = _axis(int(axis), x.dim())
    chosen = torch.nonzero(condition.reshape(-1).to(torch.bool)).reshape(-1)
    return x.index_select(axis, chosen)


@op("Expand")
def _expand(ctx: OpContext, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


@op("Tile")
def _tile(ctx: OpContext, x: torch.Tensor, repeats: torch.Tensor) -> torch.Tensor:
    return x.repeat(*_ints(repeats))


def _padded_indices(n: int, before: int, after: int, mode: str) -> list[int]:
    """Which input index each output position of a 1-D edge/reflect/wrap padding copies."""
    positions = np.arange(-before, n + after)
    if mode == "edge":
        index = np.clip(positions, 0, n - 1)
    elif mode == "wrap":
        index = positions % n
    elif n == 1:
        index = np.zeros_like(positions)
    else:
        period = 2 * (n - 1)
        folded = positions % period
        index = np.where(folded < n, folded, period - folded)
    return index.tolist()


@op("Pad")
def _pad(ctx: OpContext, x: torch.Tensor, pads: Value = None, value: Value = None, axes: Value = None) -> torch.Tensor:
    amounts = ctx.attrs.get("pads")
    if amounts is None:
        amounts = _ints(pads)
        if axes is not None:
            listed = [_axis(a, x.dim()) for a in _ints(axes)]
            full = [0] * (2 * x.dim())
            for j, axis in enumerate(listed):
                full[axis], full[axis + x.dim()] = amounts[j], amounts[j + len(listed)]
            amounts = full
    amounts = [int(a) for a in amounts]
    mode = str(ctx.attr("mode", "constant"))
    rank = x.dim()
    if mode == "constant":
        fill = float(value.reshape(-1)[0]) if value is not None and value.numel() else float(ctx.attr("value", 0.0))
        return _pad_spatial(x, amounts, value=fill) if len(amounts) == 2 * rank else x
    for axis in range(rank):
        before, after = amounts[axis], amounts[axis + rank]
        if before or after:
            x = x.index_select(axis, ctx.int_tensor(_padded_indices(x.shape[axis], before, after, mode)))
    return x


# ---------------------------------------------------------------------------------------------
# Resize (nearest and linear)


def _resize_check(node: Node) -> None:
    mode = str(node.attrs.get("mode", "nearest"))
    if mode not in ("nearest", "linear"):
        raise Unsupported(f"Resize(mode={mode})")
    if int(node.attrs.get("antialias", 0) or 0) and mode != "nearest":
        raise Unsupported("Resize(antialias=1)")
    if str(node.attrs.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
        raise Unsupported(f"Resize(keep_aspect_ratio_policy={node.attrs['keep_aspect_ratio_policy']})")


def _source_coordinates(transform: str, out: int, n: int, scale: float, roi: tuple[float, float]) -> np.ndarray:
    """Input coordinate of each output position (ONNX Resize coordinate_transformation_mode)."""
    o = np.arange(out, dtype=np.float64)
    if transform == "half_pixel":
        return (o + 0.5) / scale - 0.5
    if transform == "pytorch_half_pixel":
        return (o + 0.5) / scale - 0.5 if out > 1 else np.zeros(out)
    if transform == "align_corners":
        return o * (n - 1) / (out - 1) if out > 1 else np.zeros(out)
    if transform == "tf_half_pixel_for_nn":
        return (o + 0.5) / scale
    if transform == "tf_crop_and_resize":
        start, end = roi
        if out > 1:
            return start * (n - 1) + o * (end - start) * (n - 1) / (out - 1)
        return np.full(out, 0.5 * (start + end) * (n - 1))
    if transform == "half_pixel_symmetric":
        adjustment = out / (scale * n)
        offset = n / 2 * (1 - adjustment)
        return offset + (o + 0.5) / scale - 0.5
    return o / scale  # asymmetric


def _nearest(coords: np.ndarray, mode: str) -> np.ndarray:
    if mode == "floor":
        return np.floor(coords)
    if mode == "ceil":
        return np.ceil(coords)
    if mode == "round_prefer_ceil":
        return np.floor(coords + 0.5)
    return np.ceil(coords - 0.5)  # round_prefer_floor


@op("Resize", check=_resize_check)
def _resize(ctx: OpContext, x: torch.Tensor, *rest: Value) -> torch.Tensor:
    rank = x.dim()
    legacy = "coordinate_transformation_mode" not in ctx.attrs  # Upsample and Resize-10
    transform = "asymmetric" if legacy else str(ctx.attrs["coordinate_transformation_mode"])
    nearest_mode = "floor" if legacy else str(ctx.attr("nearest_mode", "round_prefer_floor"))
    axes = [_axis(int(a), rank) for a in (ctx.attrs.get("axes") or range(rank))]
    sizes = rest[2] if len(rest) > 2 and rest[2] is not None and rest[2].numel() else None
    roi_input = rest[0] if not legacy and rest and rest[0] is not None and rest[0].numel() else None
    scales = ctx.attrs.get("scales")
    if not legacy and len(rest) > 1 and rest[1] is not None and rest[1].numel():
        scales = rest[1].reshape(-1).tolist()
    roi = roi_input.reshape(-1).tolist() if roi_input is not None else None
    mode = str(ctx.attr("mode", "nearest"))
    extrapolation = float(ctx.attr("extrapolation_value", 0.0))
    for j, axis in enumerate(axes):
        n = x.shape[axis]
        start, end = (roi[j], roi[j + len(axes)]) if roi is not None else (0.0, 1.0)
        if sizes is not None:
            out = int(sizes.reshape(-1)[j])
            scale = out / n
        else:
            scale = float(scales[j if len(scales) == len(axes) else axis])
            out = int(math.floor(n * scale))
        if out == n and scale == 1.0 and transform != "tf_crop_and_resize":
            continue
        coords = _source_coordinates(transform, out, n, scale, (start, end))
        outside = (coords < 0) | (coords > n - 1) if transform == "tf_crop_and_resize" else None
        if mode == "nearest":
            index = np.clip(_nearest(coords, nearest_mode), 0, n - 1).astype(np.int64)
            y = x.index_select(axis, ctx.int_tensor(index))
        else:
            clamped = np.clip(coords, 0, n - 1)
            low = np.floor(clamped).astype(np.int64)
            high = np.minimum(low + 1, n - 1)
            weight_shape = [1] * rank
            weight_shape[axis] = out
            weight = ctx.float_tensor(clamped - low).reshape(weight_shape)
            y = (
                x.index_select(axis, ctx.int_tensor(low)) * (1 - weight)
                + x.index_select(axis, ctx.int_tensor(high)) * weight
            )
        if outside is not None and outside.any():
            keep_shape = [1] * rank
            keep_shape[axis] = out
            keep = torch.as_tensor(~outside, device=x.device).reshape(keep_shape)
            y = torch.where(keep, y, torch.full_like(y, extrapolation))
        x = y
    return x


# ---------------------------------------------------------------------------------------------
# Shape computations that exporters leave in graphs


@op("ConstantOfShape")
def _constant_of_shape(ctx: OpContext, shape: torch.Tensor) -> torch.Tensor:
    value = ctx.attrs.get("value")
    array = np.asarray(value if value is not None else np.zeros(1, np.float32))
    fill = constant_tensor(array.reshape(-1)[:1], ctx.dtype, ctx.device)
    return fill.reshape(()).expand(*_ints(shape)).clone()


@op("Range")
def _range(ctx: OpContext, start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if start.is_floating_point():
        return torch.arange(float(start), float(limit), float(delta), dtype=ctx.dtype, device=ctx.device)
    return torch.arange(int(start), int(limit), int(delta), dtype=start.dtype, device=ctx.device)
