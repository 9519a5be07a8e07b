"""torch.export program -> lipcheck Graph: ATen ops mapped onto the ONNX op vocabulary the rules know.

``torch.export`` turns every way of writing a layer (``nn.ReLU``, ``F.relu``, ``x.relu()``, ``+``,
``torch.add``, ``x.view``, ``torch.flatten``...) into the same ATen call, so one table of small
converters covers modules, functional and tensor-method forms alike. Attributes are written the way
the ONNX frontend normalises them (pads as begin..end, strides, dilations, group...), so rules cannot
tell which frontend a node came from. A node whose tensor inputs are all weights is evaluated once and
becomes a constant (``weight.t()``, ``w * 2``...). Layer names are the modules' qualified names.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import fx

from lipcheck.graph import Graph, Node, Shape, check_constants, numpy_dtype_name, unique_name

Converter = Callable[["GraphBuilder", fx.Node, dict[str, Any]], None]
CONVERTERS: dict[str, Converter] = {}

# ATen ops that only alias, copy or reformat their first argument (in eval mode).
IDENTITY_OPS = {
    "alias",
    "clone",
    "contiguous",
    "detach",
    "lift_fresh_copy",
    "dropout",
    "feature_dropout",
    "alpha_dropout",
    "feature_alpha_dropout",
    "native_dropout",
    "_assert_tensor_metadata",
    "lift_fresh",
}
# Ops that draw random numbers: never evaluated to constants.
RANDOM_OPS = (
    "rand",
    "randn",
    "randint",
    "randperm",
    "normal",
    "bernoulli",
    "multinomial",
    "uniform",
    "empty",
    "native_dropout",
    "dropout",
    "poisson",
)
# Unary ATen ops with an ONNX namesake and no attributes.
UNARY_OPS = {
    "relu": "Relu",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
    "abs": "Abs",
    "neg": "Neg",
    "exp": "Exp",
    "log": "Log",
    "sqrt": "Sqrt",
    "reciprocal": "Reciprocal",
    "sin": "Sin",
    "cos": "Cos",
    "atan": "Atan",
    "asinh": "Asinh",
    "asin": "Asin",
    "acos": "Acos",
    "atanh": "Atanh",
    "acosh": "Acosh",
    "erf": "Erf",
    "softsign": "Softsign",
    "mish": "Mish",
    "selu": "Selu",
    "floor": "Floor",
    "ceil": "Ceil",
    "round": "Round",
    "sign": "Sign",
    "tan": "Tan",
    "sinh": "Sinh",
    "cosh": "Cosh",
    "hardswish": "HardSwish",
}


def converts(*names: str) -> Callable[[Converter], Converter]:
    def register(func: Converter) -> Converter:
        for name in names:
            CONVERTERS[name] = func
        return func

    return register


class UnmappedOps(Exception):
    """ATen ops with no converter: name -> layer names, all collected before raising."""

    def __init__(self, ops: dict[str, list[str]]):
        super().__init__(", ".join(sorted(ops)))
        self.ops = ops


def aten_name(target: Any) -> str:
    """'conv2d' for torch.ops.aten.conv2d.default; the Python name for other callables."""
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name.split("::", 1)[-1]
    return getattr(target, "__name__", str(target))


def arguments(node: fx.Node) -> dict[str, Any]:
    """The call's arguments by schema name, defaults filled in."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {str(i): a for i, a in enumerate(node.args)} | dict(node.kwargs)
    values: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
        else:
            values[arg.name] = None
    return values


def _static(dim: Any) -> int | None:
    return int(dim) if isinstance(dim, int) or (hasattr(dim, "node") and dim.node.is_constant()) else None


def _dtype_name(dtype: torch.dtype) -> str:
    """ONNX's lower-case name of a torch dtype (the graph's ``dtypes``)."""
    return numpy_dtype_name(torch.empty((), dtype=dtype).numpy().dtype) if dtype != torch.bfloat16 else "bfloat16"


def _shape_of(value: Any) -> Shape | None:
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    return tuple(_static(d) if not isinstance(d, int) else d for d in shape)


class GraphBuilder:
    """Walks an ExportedProgram's graph once, emitting lipcheck nodes."""

    def __init__(self, program: torch.export.ExportedProgram, source_names: dict[str, str] | None = None):
        self.program = program
        self.graph = Graph(nodes=[], inputs=[], outputs=[], name="")
        self.values: dict[str, str | list[str] | None] = {}  # fx node name -> lipcheck value name(s)
        self.tensors: dict[str, torch.Tensor] = {}  # constant value name -> tensor, for folding
        self.taken_values: set[str] = set()
        self.taken_nodes: set[str] = set()
        self.suffixes: dict[str, int] = {}  # unique_name's counters: 100k ``relu`` nodes are named in linear time
        self.node_suffixes: dict[str, int] = {}
        self.unmapped: dict[str, list[str]] = {}
        self.failed: set[str] = set()  # fx nodes that could not be mapped, and everything computed from them
        self.qualnames = self._module_qualnames()
        self.last_in_module = self._last_ops()
        self.source_names = source_names or {}
        self.current: fx.Node | None = None

    # ------------------------------------------------------------------ values

    def new_value(self, base: str) -> str:
        name = unique_name(self.taken_values, base, self.suffixes)
        self.taken_values.add(name)
        return name

    def constant(self, tensor: torch.Tensor | np.ndarray | float | int | bool, base: str = "const") -> str:
        """A new constant value (Python scalars take the dtype torch would give them)."""
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.as_tensor(tensor)
        name = self.new_value(base)
        self._store_constant(name, tensor)
        return name

    def _store_constant(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()  # exact: numpy has no bfloat16
        self.tensors[name] = tensor
        self.graph.constants[name] = tensor.numpy().copy()

    def value(self, arg: Any, like: torch.dtype = torch.float32) -> str:
        """The lipcheck value for an argument: a traced tensor, or a Python number as a constant."""
        if isinstance(arg, fx.Node):
            value = self.values.get(arg.name)
            if not isinstance(value, str):
                raise UnmappedOps({f"use of {arg.name}": [self.layer_base(self.current)]})
            return value
        if isinstance(arg, bool | int | float):
            dtype = like if isinstance(arg, float) or like.is_floating_point else torch.int64
            return self.constant(torch.tensor(arg, dtype=dtype))
        raise UnmappedOps({f"argument {type(arg).__name__}": [self.layer_base(self.current)]})

    def is_const(self, arg: Any) -> bool:
        return not isinstance(arg, fx.Node) or (
            isinstance(self.values.get(arg.name), str) and self.values[arg.name] in self.graph.constants
        )

    def tensor(self, arg: Any) -> torch.Tensor | None:
        if not isinstance(arg, fx.Node):
            return None
        name = self.values.get(arg.name)
        return self.tensors.get(name) if isinstance(name, str) else None

    def dtype(self, arg: Any) -> torch.dtype:
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
        return getattr(val, "dtype", torch.float32)

    # ------------------------------------------------------------------ nodes

    def emit(
        self,
        op: str,
        inputs: Sequence[str],
        attrs: dict[str, Any] | None = None,
        fx_node: fx.Node | None = None,
        outputs: int = 1,
        final: bool = True,
        shape: Shape | None = None,
    ) -> list[str]:
        """Add a node; ``final`` binds its outputs to the fx node's result (else they are intermediates)."""
        fx_node = fx_node or self.current
        assert fx_node is not None
        base = self.layer_base(fx_node)
        name = unique_name(self.taken_nodes, base, self.node_suffixes)
        self.taken_nodes.add(name)
        out_names = [self.new_value(fx_node.name if outputs == 1 else f"{fx_node.name}:{i}") for i in range(outputs)]
        self.graph.nodes.append(Node(name=name, op=op, inputs=list(inputs), outputs=out_names, attrs=dict(attrs or {})))
        val = fx_node.meta.get("val")
        vals = list(val) if isinstance(val, list | tuple) else [val]
        for i, out in enumerate(out_names):
            known = shape if (shape is not None and i == 0) else (_shape_of(vals[i]) if i < len(vals) else None)
            if known is not None:
                self.graph.shapes[out] = known
            if i < len(vals) and isinstance(getattr(vals[i], "dtype", None), torch.dtype):
                self.graph.dtypes[out] = _dtype_name(vals[i].dtype)  # type: ignore[union-attr]
        if final:
            self.values[fx_node.name] = out_names[0] if outputs == 1 else out_names
        return out_names

    def alias(self, fx_node: fx.Node, value: str) -> None:
        self.values[fx_node.name] = value

    def layer_base(self, fx_node: fx.Node | None) -> str:
        """A module's qualified name for its own op, ``module.op`` for functional ops inside a module."""
        if fx_node is None:
            return "node"
        stack = fx_node.meta.get("nn_module_stack") or {}
        qualname, call = "", ""
        if stack:
            call, (qualname, _) = list(stack.items())[-1]
            qualname = str(qualname)
        if not qualname:
            qualname = self.source_names.get(fx_node.name, "")
            if qualname:
                return qualname
        op = aten_name(fx_node.target).rstrip("_")
        if qualname and self._is_leaf(qualname) and self.last_in_module.get(call, fx_node.name) == fx_node.name:
            return (
                qualname  # a module's own op: the last one a call of it emits (a reflect-padded conv's Pad is conv.pad)
            )
        return f"{qualname}.{op}" if qualname else op

    def _module_qualnames(self) -> set[str]:
        names: set[str] = set()
        for node in self.program.graph.nodes:
            for qualname, _ in (node.meta.get("nn_module_stack") or {}).values():
                names.add(str(qualname))
        return names

    def _last_ops(self) -> dict[str, str]:
        """The last node that emits a lipcheck op in each call of a module (keyed as export keys the call)."""
        last: dict[str, str] = {}
        for node in self.program.graph.nodes:
            stack = node.meta.get("nn_module_stack") or {}
            name = aten_name(node.target) if node.op == "call_function" else ""
            if stack and (name.rstrip("_") in CONVERTERS or name in UNARY_OPS):
                last[str(list(stack)[-1])] = node.name
        return last

    def _is_leaf(self, qualname: str) -> bool:
        prefix = qualname + "."
        return not any(other.startswith(prefix) for other in self.qualnames)

    # ------------------------------------------------------------------ walk

    def build(self) -> Graph:
        signature = self.program.graph_signature
        state = {**self.program.state_dict, **self.program.constants}
        weight_names = {
            **signature.inputs_to_parameters,
            **signature.inputs_to_buffers,
            **signature.inputs_to_lifted_tensor_constants,
        }
        user_inputs = set(signature.user_inputs)
        for node in self.program.graph.nodes:
            self.current = node
            if node.op == "placeholder":
                if node.name in weight_names:
                    key = weight_names[node.name]
                    name = self.new_value(key)
                    self._store_constant(name, state[key])
                    self.values[node.name] = name
                elif node.name in user_inputs:
                    name = self.new_value(node.name)
                    self.graph.inputs.append(name)
                    self.graph.shapes[name] = _shape_of(node.meta.get("val")) or ()
                    if isinstance(getattr(node.meta.get("val"), "dtype", None), torch.dtype):
                        self.graph.dtypes[name] = _dtype_name(node.meta["val"].dtype)
                    self.values[node.name] = name
                else:
                    self.values[node.name] = None  # e.g. a token; never a tensor the network computes on
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                for arg in fx.node.map_arg(node.args[0], lambda n: n) if node.args else []:
                    if isinstance(arg, fx.Node) and isinstance(self.values.get(arg.name), str):
                        self.graph.outputs.append(self.values[arg.name])  # type: ignore[arg-type]
            else:
                self._unmapped(node, f"{node.op} {node.target}")
        if self.unmapped:
            raise UnmappedOps(self.unmapped)
        return self.graph

    def _unmapped(self, node: fx.Node, label: str) -> None:
        self.unmapped.setdefault(label, []).append(self.layer_base(node))
        self.failed.add(node.name)

    def _call(self, node: fx.Node) -> None:
        if any(arg.name in self.failed for arg in node.all_input_nodes):
            self._after_failure(node)
            return
        if node.target is operator.getitem:
            source, index = node.args
            value = self.values.get(source.name)  # type: ignore[union-attr, arg-type]
            self.values[node.name] = value[index] if isinstance(value, list) else None  # type: ignore[index]
            return
        name = aten_name(node.target)
        if name.startswith("sym_") or name in ("_assert_async", "_assert_scalar", "_functional_assert_async"):
            self.values[node.name] = None  # shape arithmetic and runtime asserts
            return
        args = arguments(node)
        if self._fold(node, args):
            return
        if name in IDENTITY_OPS:
            if args.get("train") or args.get("training"):  # dropout in training mode: random, scaled by 1/(1-p)
                self._unmapped(node, f"aten.{name} in training mode (export the model in eval mode)")
                self.values[node.name] = None
                return
            self.alias(node, self.value(_first(args)))
            return
        if name in UNARY_OPS:
            self.emit(UNARY_OPS[name], [self.value(_first(args))])
            return
        converter = CONVERTERS.get(name.rstrip("_"))
        if converter is None:
            self._unmapped(node, f"aten.{name}")
            self.values[node.name] = None
            return
        try:
            converter(self, node, args)
        except UnmappedOps as exc:
            for op, where in exc.ops.items():
                self.unmapped.setdefault(op, []).extend(where)
            self.values[node.name] = None
            self.failed.add(node.name)

    def _after_failure(self, node: fx.Node) -> None:
        """A node computed from one that could not be mapped: not mapped either, and listed only when its own
        op has no converter (so one unknown op is one line, not every use of its result after it)."""
        name = aten_name(node.target) if node.target is not operator.getitem else ""
        known = not name or name.startswith("sym_") or name.rstrip("_") in CONVERTERS
        if not (known or name in UNARY_OPS or name in IDENTITY_OPS):
            self.unmapped.setdefault(f"aten.{name}", []).append(self.layer_base(node))
        self.values[node.name] = None
        self.failed.add(node.name)

    def _fold(self, node: fx.Node, args: dict[str, Any]) -> bool:
        """Evaluate a node whose tensor inputs are all constants (weights behind t(), view, mul...)."""
        tensor_args = list(node.all_input_nodes)
        if not tensor_args:  # created in forward (torch.zeros, arange, full...): a constant unless random
            if aten_name(node.target).startswith(RANDOM_OPS) or not hasattr(node.target, "_schema"):
                return False
        elif not all(isinstance(self.values.get(a.name), str) for a in tensor_args):
            return False
        if not all(self.values[a.name] in self.tensors for a in tensor_args):
            return False
        try:
            result = node.target(  # type: ignore[operator]
                *fx.node.map_arg(node.args, lambda n: self.tensors[self.values[n.name]]),  # type: ignore[index]
                **fx.node.map_arg(node.kwargs, lambda n: self.tensors[self.values[n.name]]),  # type: ignore[index]
            )
        except Exception:
            return False
        if isinstance(result, torch.Tensor):
            self.values[node.name] = self.constant(result, node.name)
            return True
        if isinstance(result, list | tuple) and all(isinstance(r, torch.Tensor) for r in result):
            self.values[node.name] = [self.constant(r, f"{node.name}:{i}") for i, r in enumerate(result)]
            return True
        return False


def _first(args: dict[str, Any]) -> Any:
    return next(iter(args.values()))


def _tuple(value: Any, d: int) -> list[int]:
    if isinstance(value, int):
        return [value] * d
    values = [int(v) for v in value]
    return values * d if len(values) == 1 else values


def exported_to_graph(
    program: torch.export.ExportedProgram, name: str = "", source_names: dict[str, str] | None = None
) -> Graph:
    """Map an ExportedProgram onto lipcheck's Graph (raises UnmappedOps listing every unknown op)."""
    builder = GraphBuilder(program, source_names)
    graph = builder.build()
    graph.name = name
    check_constants(graph)
    return graph


# ---------------------------------------------------------------------- linear layers


def _conv_attrs(weight_shape: Shape, stride: Any, padding: Any, dilation: Any, groups: int) -> dict[str, Any]:
    d = len(weight_shape) - 2
    pads = _tuple(padding, d)
    return {
        "kernel_shape": [int(k) for k in weight_shape[2:]],  # type: ignore[arg-type]
        "strides": _tuple(stride, d),
        "dilations": _tuple(dilation, d),
        "group": int(groups),
        "pads": pads + pads,
        "spatial_dims": d,
    }


def _same_pads(kernel: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """torch's padding='same' (stride 1): total (k-1)*dilation, the extra one on the right."""
    total = [(k - 1) * dl for k, dl in zip(kernel, dilation, strict=True)]
    return [t // 2 for t in total] + [t - t // 2 for t in total]


@converts(
    "conv1d",
    "conv2d",
    "conv3d",
    "convolution",
    "_convolution",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
)
def _convolution(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    name = aten_name(node.target)
    weight = args["weight"]
    w_shape = _shape_of(weight.meta.get("val")) if isinstance(weight, fx.Node) else None
    if w_shape is None:
        raise UnmappedOps({f"aten.{name} without a known weight shape": [b.layer_base(node)]})
    transposed = bool(args.get("transposed", False)) or name.startswith("conv_transpose")
    padding = args.get("padding", 0)
    attrs = _conv_attrs(
        w_shape,
        args.get("stride", 1),
        0 if isinstance(padding, str) else padding,
        args.get("dilation", 1),
        args.get("groups", 1),
    )
    if padding == "same":
        attrs["pads"] = _same_pads(attrs["kernel_shape"], attrs["dilations"])
    inputs = [b.value(args["input"]), b.value(weight)]
    if args.get("bias") is not None:
        inputs.append(b.value(args["bias"]))
    if transposed:
        output_padding = args.get("output_padding", 0)
        attrs["output_padding"] = _tuple(output_padding, attrs["spatial_dims"])
        b.emit("ConvTranspose", inputs, attrs)
    else:
        b.emit("Conv", inputs, attrs)


@converts("linear")
def _linear(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    """2-D input: Gemm (transB); otherwise MatMul with W^T (+ bias), as ONNX exporters write it."""
    x, weight, bias = args["input"], args["weight"], args.get("bias")
    x_shape = _shape_of(x.meta.get("val")) if isinstance(x, fx.Node) else None
    if x_shape is not None and len(x_shape) == 2:
        inputs = [b.value(x), b.value(weight)] + ([b.value(bias)] if bias is not None else [])
        b.emit("Gemm", inputs, {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 1})
        return
    w = b.tensor(weight)
    w_t = b.constant(w.t(), f"{b.values[weight.name]}_T") if w is not None else None
    if w_t is None:
        w_t = b.emit("Transpose", [b.value(weight)], {"perm": [1, 0]}, final=False)[0]
    if bias is None:
        b.emit("MatMul", [b.value(x), w_t])
        return
    product = b.emit("MatMul", [b.value(x), w_t], final=False)[0]
    b.emit("Add", [product, b.value(bias)])


@converts("addmm")
def _addmm(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    attrs = {"alpha": float(args.get("alpha", 1)), "beta": float(args.get("beta", 1)), "transA": 0, "transB": 0}
    b.emit("Gemm", [b.value(args["mat1"]), b.value(args["mat2"]), b.value(args["self"])], attrs)


@converts("mm", "matmul", "bmm")
def _matmul(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    values = list(args.values())
    b.emit("MatMul", [b.value(values[0]), b.value(values[1])])


@converts(
    "batch_norm",
    "_native_batch_norm_legit_no_training",
    "native_batch_norm",
    "_native_batch_norm_legit",
    "cudnn_batch_norm",
)
def _batch_norm(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    training = bool(args.get("training", False))
    x = args["input"]
    channels = _shape_of(x.meta.get("val"))[1]  # type: ignore[index]
    mean, var = args.get("running_mean"), args.get("running_var")
    if mean is None or var is None:
        training = True
    weight = args.get("weight")
    bias = args.get("bias")
    ones = torch.ones(int(channels or 1))
    inputs = [
        b.value(x),
        b.value(weight) if weight is not None else b.constant(ones, "bn_scale"),
        b.value(bias) if bias is not None else b.constant(torch.zeros_like(ones), "bn_bias"),
        b.value(mean) if mean is not None else b.constant(torch.zeros_like(ones), "bn_mean"),
        b.value(var) if var is not None else b.constant(ones, "bn_var"),
    ]
    multi = aten_name(node.target) != "batch_norm"
    outs = b.emit(
        "BatchNormalization",
        inputs,
        {"epsilon": float(args.get("eps", 1e-5)), "training_mode": int(training)},
        final=False,
    )
    b.values[node.name] = [outs[0], None, None] if multi else outs[0]  # type: ignore[list-item]


@converts("layer_norm", "native_layer_norm")
def _layer_norm(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    shape = list(args["normalized_shape"])
    inputs = [b.value(args["input"])]
    for key in ("weight", "bias"):
        if args.get(key) is not None:
            inputs.append(b.value(args[key]))
        elif key == "weight":
            inputs.append(b.constant(torch.ones(shape), "ln_scale"))
    outs = b.emit(
        "LayerNormalization", inputs, {"axis": -len(shape), "epsilon": float(args.get("eps", 1e-5))}, final=False
    )
    b.values[node.name] = [outs[0], None, None] if aten_name(node.target).startswith("native") else outs[0]  # type: ignore[list-item]


def _affine_parameters(b: GraphBuilder, args: dict[str, Any], channels: int | None) -> list[str]:
    """The scale and bias inputs of a normalisation (ones and zeros where the module has none)."""
    if channels is None and (args.get("weight") is None or args.get("bias") is None):
        raise UnmappedOps(
            {"normalisation without affine parameters over an unknown channel count": [b.layer_base(b.current)]}
        )
    ones = torch.ones(int(channels or 1))
    scale = b.value(args["weight"]) if args.get("weight") is not None else b.constant(ones, "norm_scale")
    bias = b.value(args["bias"]) if args.get("bias") is not None else b.constant(torch.zeros_like(ones), "norm_bias")
    return [scale, bias]


@converts("group_norm", "native_group_norm")
def _group_norm(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    x = args["input"]
    channels = (_shape_of(x.meta.get("val")) or (None, None))[1]
    groups = int(args["num_groups"] if "num_groups" in args else args["group"])
    attrs = {"num_groups": groups, "epsilon": float(args.get("eps", 1e-5))}
    outs = b.emit("GroupNormalization", [b.value(x), *_affine_parameters(b, args, channels)], attrs, final=False)
    b.values[node.name] = [outs[0], None, None] if aten_name(node.target).startswith("native") else outs[0]  # type: ignore[list-item]


@converts("instance_norm")
def _instance_norm(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    """With its own statistics, InstanceNormalization; with running statistics, the BatchNorm it then is."""
    x = args["input"]
    channels = (_shape_of(x.meta.get("val")) or (None, None))[1]
    eps = float(args.get("eps", 1e-5))
    inputs = [b.value(x), *_affine_parameters(b, args, channels)]
    if args.get("use_input_stats", True):
        b.emit("InstanceNormalization", inputs, {"epsilon": eps})
        return
    mean, var = args.get("running_mean"), args.get("running_var")
    if mean is None or var is None:
        raise UnmappedOps({"aten.instance_norm without statistics": [b.layer_base(node)]})
    b.emit("BatchNormalization", [*inputs, b.value(mean), b.value(var)], {"epsilon": eps, "training_mode": 0})


# ---------------------------------------------------------------------- arithmetic


def _binary(op: str) -> Converter:
    def convert(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
        values = list(args.values())
        left, right = values[0], values[1]
        like = b.dtype(left if isinstance(left, fx.Node) else right)
        alpha = args.get("alpha", 1)
        right_value = b.value(right, like)
        if alpha not in (None, 1):
            right_value = b.emit("Mul", [right_value, b.constant(torch.tensor(alpha, dtype=like))], final=False)[0]
        b.emit(op, [b.value(left, like), right_value])

    return convert


def _rsub(b: GraphBuilder, args: dict[str, Any]) -> None:
    """other - self (torch's reversed subtraction)."""
    b.emit("Sub", [b.value(args["other"], b.dtype(args["self"])), b.value(args["self"])])


CONVERTERS.update(
    {
        "add": _binary("Add"),
        "sub": _binary("Sub"),
        "rsub": lambda b, n, a: _rsub(b, a),
        "mul": _binary("Mul"),
        "maximum": _binary("Max"),
        "minimum": _binary("Min"),
        "pow": _binary("Pow"),
    }
)


@converts("div")
def _div(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    if args.get("rounding_mode") is not None:
        b.emit(
            "Floor",
            [b.emit("Div", [b.value(args["self"]), b.value(args["other"], b.dtype(args["self"]))], final=False)[0]],
        )
        return
    _binary("Div")(b, node, args)


@converts("clamp", "clip", "hardtanh", "relu6")
def _clamp(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    name = aten_name(node.target).rstrip("_")
    x = _first(args)
    low, high = (
        (args.get("min_val", -1.0), args.get("max_val", 1.0))
        if name == "hardtanh"
        else (0.0, 6.0)
        if name == "relu6"
        else (args.get("min"), args.get("max"))
    )
    inputs = [b.value(x)]
    for bound in (low, high):
        inputs.append("" if bound is None else b.value(bound, b.dtype(x)))
    while inputs and inputs[-1] == "":
        inputs.pop()
    b.emit("Clip", inputs)


# ---------------------------------------------------------------------- activations


@converts("leaky_relu")
def _leaky_relu(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    b.emit("LeakyRelu", [b.value(args["self"])], {"alpha": float(args.get("negative_slope", 0.01))})


@converts("elu", "celu")
def _elu(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    alpha = float(args.get("alpha", 1.0))
    if aten_name(node.target).startswith("celu"):
        b.emit("Celu", [b.value(args["self"])], {"alpha": alpha})
        return
    scale, input_scale = float(args.get("scale", 1)), float(args.get("input_scale", 1))
    value = b.value(args["self"])
    dtype = b.dtype(args["self"])
    if input_scale != 1:
        value = b.emit("Mul", [value, b.constant(torch.tensor(input_scale, dtype=dtype))], final=False)[0]
    if scale == 1:
        b.emit("Elu", [value], {"alpha": alpha})
        return
    value = b.emit("Elu", [value], {"alpha": alpha}, final=False)[0]
    b.emit("Mul", [value, b.constant(torch.tensor(scale, dtype=dtype))])


@converts("gelu")
def _gelu(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    b.emit("Gelu", [b.value(args["self"])], {"approximate": str(args.get("approximate", "none"))})


@converts("silu")
def _silu(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    b.emit("SiLU", [b.value(args["self"])])


@converts("rsqrt")
def _rsqrt(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    """1 / sqrt(x): Sqrt then Reciprocal (it was mapped to Reciprocal alone, 1 / x)."""
    root = b.emit("Sqrt", [b.value(_first(args))], final=False)
    b.emit("Reciprocal", root)


@converts("hardsigmoid")
def _hardsigmoid(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    b.emit("HardSigmoid", [b.value(args["self"])], {"alpha": 1 / 6, "beta": 0.5})


@converts("softplus")
def _softplus(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    """log(1 + exp(beta x)) / beta has slope in (0, 1) for every beta > 0."""
    beta = float(args.get("beta", 1))
    if beta <= 0:
        raise UnmappedOps({f"aten.softplus(beta={beta})": [b.layer_base(node)]})
    if beta == 1:
        b.emit("Softplus", [b.value(args["self"])])
        return
    dtype = b.dtype(args["self"])
    scaled = b.emit("Mul", [b.value(args["self"]), b.constant(torch.tensor(beta, dtype=dtype))], final=False)[0]
    soft = b.emit("Softplus", [scaled], final=False)[0]
    b.emit("Mul", [soft, b.constant(torch.tensor(1 / beta, dtype=dtype))])


@converts("prelu", "_prelu_kernel")
def _prelu(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    values = list(args.values())
    x_shape = _shape_of(values[0].meta.get("val")) or ()
    slope = b.tensor(values[1])
    if slope is not None and slope.numel() > 1 and len(x_shape) > 2:
        slope = slope.reshape(-1, *([1] * (len(x_shape) - 2)))  # per channel, broadcast like ONNX
        b.emit("PRelu", [b.value(values[0]), b.constant(slope, "prelu_slope")])
        return
    b.emit("PRelu", [b.value(values[0]), b.value(values[1])])


@converts("softmax", "_softmax", "log_softmax", "_log_softmax")
def _softmax(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    op = "LogSoftmax" if "log" in aten_name(node.target) else "Softmax"
    b.emit(op, [b.value(args["self"])], {"axis": int(args["dim"]), "coerce_2d": False})


# ---------------------------------------------------------------------- shapes and selection


@converts("view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_as", "reshape_as", "_reshape_alias")
def _reshape(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    out_shape = _shape_of(node.meta.get("val"))
    x = b.value(_first(args))
    if out_shape is not None and sum(d is None for d in out_shape) <= 1:
        target = b.constant(torch.tensor([-1 if d is None else d for d in out_shape], dtype=torch.int64), "shape")
        b.emit("Reshape", [x, target])
    else:
        b.emit("Reshape", [x])


@converts("squeeze", "unsqueeze")
def _squeeze(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    op = "Unsqueeze" if aten_name(node.target).startswith("unsqueeze") else "Squeeze"
    values = list(args.values())
    axes = values[1] if len(values) > 1 else None
    inputs = [b.value(values[0])]
    if axes is not None:
        axes_list = [int(axes)] if isinstance(axes, int) else [int(a) for a in axes]
        inputs.append(b.constant(torch.tensor(axes_list, dtype=torch.int64), "axes"))
    b.emit(op, inputs)


@converts("permute", "transpose", "t", "swapaxes", "movedim")
def _transpose(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    values = list(args.values())
    x = values[0]
    rank = len(_shape_of(x.meta.get("val")) or ())
    name = aten_name(node.target)
    if name == "permute":
        perm = [int(p) % rank for p in values[1]]
    else:
        if name == "t":
            d0, d1 = 0, 1 if rank > 1 else 0
        else:
            d0, d1 = int(values[1]) % rank, int(values[2]) % rank
        perm = list(range(rank))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    b.emit("Transpose", [b.value(x)], {"perm": perm})


@converts("cat", "concat", "concatenate")
def _cat(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    tensors = list(args["tensors"])
    dtype = b.dtype(tensors[0])
    b.emit("Concat", [b.value(t, dtype) for t in tensors], {"axis": int(args.get("dim", 0))})


@converts("stack")
def _stack(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    dim = int(args.get("dim", 0))
    parts = []
    for t in args["tensors"]:
        axis = b.constant(torch.tensor([dim], dtype=torch.int64), "axes")
        parts.append(b.emit("Unsqueeze", [b.value(t), axis], final=False)[0])
    b.emit("Concat", parts, {"axis": dim})


@converts("split", "split_with_sizes", "chunk", "unbind", "tensor_split")
def _split(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    vals = node.meta.get("val")
    count = len(vals) if isinstance(vals, list | tuple) else 1
    values = list(args.values())
    dim = int(args.get("dim", 0))
    rank = len(_shape_of(values[0].meta.get("val")) or ())
    dim = dim % rank if rank else dim
    sizes = [(_shape_of(v) or ())[dim] if aten_name(node.target) != "unbind" else 1 for v in vals]  # type: ignore[union-attr]
    split_input = [b.constant(torch.tensor(sizes, dtype=torch.int64), "split")] if None not in sizes else []
    attrs = {"axis": dim, **({"split": sizes} if split_input else {})}
    outs = b.emit("Split", [b.value(values[0]), *split_input], attrs, outputs=count, final=False)
    if aten_name(node.target) == "unbind":
        squeezed = []
        for i, out in enumerate(outs):
            axes = b.constant(torch.tensor([dim], dtype=torch.int64), "axes")
            squeezed.append(b.emit("Squeeze", [out, axes], final=False, shape=_shape_of(vals[i]))[0])  # type: ignore[index]
        outs = squeezed
    b.values[node.name] = outs


@converts("slice", "narrow")
def _slice(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    values = list(args.values())
    x_shape = _shape_of(values[0].meta.get("val")) or ()
    dim = int(values[1]) if len(values) > 1 and values[1] is not None else 0
    if aten_name(node.target) == "narrow":
        start, length = int(values[2]), int(values[3])
        end, step = start + length, 1
    else:
        start = 0 if values[2] is None else int(values[2])
        end_value = values[3]
        end = (2**63 - 1) if end_value is None else int(end_value)
        step = int(values[4]) if len(values) > 4 and values[4] is not None else 1
    size = x_shape[dim] if x_shape and dim < len(x_shape) else None
    if size is not None and start == 0 and end >= size and step == 1:
        b.alias(node, b.value(values[0]))
        return
    consts = [
        b.constant(torch.tensor([v], dtype=torch.int64), n)
        for v, n in ((start, "starts"), (end, "ends"), (dim, "axes"), (step, "steps"))
    ]
    b.emit("Slice", [b.value(values[0]), *consts])


@converts("slice_scatter")
def _slice_scatter(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    """``input`` with ``src`` written over a range of one axis: the input's entries before the range, ``src``,
    the input's entries after it, concatenated (what ``run_decompositions`` makes of in-place padding)."""
    x, src = args["self"], args["src"]
    shape = _shape_of(x.meta.get("val")) or ()
    dim = int(args.get("dim") or 0) % max(1, len(shape))
    n = shape[dim] if dim < len(shape) else None
    step = int(args.get("step") or 1)
    if n is None or step != 1:
        raise UnmappedOps({"aten.slice_scatter (strided, or on an axis of unknown size)": [b.layer_base(node)]})
    start, end = (_slice_indices_of(args.get(k), default, n) for k, default in (("start", 0), ("end", n)))
    end = max(start, end)
    dtype = b.dtype(x)

    def kept(lo: int, hi: int) -> list[str]:
        if hi <= lo:
            return []
        bounds = ((lo, "starts"), (hi, "ends"), (dim, "axes"))
        consts = [b.constant(torch.tensor([v], dtype=torch.int64), label) for v, label in bounds]
        return b.emit("Slice", [b.value(x, dtype), *consts], final=False)

    b.emit("Concat", [*kept(0, start), b.value(src, dtype), *kept(end, n)], {"axis": dim})


def _slice_indices_of(value: Any, default: int, n: int) -> int:
    """A slice bound as Python's slicing clamps it on an axis of ``n`` entries."""
    if value is None:
        return default
    v = int(value)
    return min(max(v + n if v < 0 else v, 0), n)


@converts("copy")
def _copy(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    """The functional copy: ``src``'s values in the shape of ``self`` (whose own values are not read)."""
    target, src = args["self"], args["src"]
    shape, src_shape = _shape_of(target.meta.get("val")), _shape_of(src.meta.get("val"))
    if shape is not None and shape == src_shape and b.dtype(target) == b.dtype(src):
        b.alias(node, b.value(src))
    elif shape is not None and None not in shape:
        b.emit("Expand", [b.value(src), b.constant(torch.tensor(shape, dtype=torch.int64), "shape")])
    else:
        raise UnmappedOps({"aten.copy (to a shape unknown before running)": [b.layer_base(node)]})


@converts("empty", "empty_like", "new_empty")
def _empty(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    """Uninitialised memory: its entries are no function of the input, and a program that reads one reads an
    arbitrary value; taken as zeros, a constant. Decomposed padding (``run_decompositions``) allocates one
    and writes every entry, which ``recognise_wrap_padding`` checks before it calls the result a padding."""
    val = node.meta.get("val")
    shape = _shape_of(val) or (None,)
    sizes = [d for d in shape if d is not None]
    if len(sizes) != len(shape):
        raise UnmappedOps({"aten.empty (of a size unknown before running)": [b.layer_base(node)]})
    b.alias(node, b.constant(torch.zeros(sizes, dtype=getattr(val, "dtype", torch.float32)), node.name))


@converts("select", "index_select")
def _select(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    values = list(args.values())
    dim = int(values[1])
    index = values[2]
    indices = b.constant(torch.tensor(index, dtype=torch.int64), "index") if isinstance(index, int) else b.value(index)
    b.emit("Gather", [b.value(values[0]), indices], {"axis": dim})


@converts("expand", "expand_as", "broadcast_to")
def _expand(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    out_shape = _shape_of(node.meta.get("val")) or ()
    x = b.value(_first(args))
    if None not in out_shape:
        b.emit("Expand", [x, b.constant(torch.tensor(out_shape, dtype=torch.int64), "shape")])
    else:
        b.emit("Expand", [x])


@converts("repeat")
def _repeat(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    repeats = [int(r) for r in args["repeats"]]
    x = args["self"]
    rank = len(_shape_of(x.meta.get("val")) or ())
    value = b.value(x)
    if len(repeats) > rank:  # torch prepends size-1 axes
        shape = [1] * (len(repeats) - rank) + list(_shape_of(x.meta.get("val")) or ())
        target = b.constant(torch.tensor([-1 if d is None else d for d in shape], dtype=torch.int64), "shape")
        value = b.emit("Reshape", [value, target], final=False)[0]
    b.emit("Tile", [value, b.constant(torch.tensor(repeats, dtype=torch.int64), "repeats")])


@converts("_to_copy", "to", "type_as")
def _to_copy(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    out = node.meta.get("val")
    dtype = getattr(out, "dtype", torch.float32)
    onnx_type = {torch.float32: 1, torch.float64: 11, torch.float16: 10, torch.bfloat16: 16}.get(dtype, 7)
    b.emit("Cast", [b.value(_first(args))], {"to": onnx_type})


# ---------------------------------------------------------------------- pooling, padding, resizing


def _pool_attrs(kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool, d: int) -> dict[str, Any]:
    k = _tuple(kernel, d)
    s = _tuple(stride, d) if stride not in (None, []) else list(k)
    pads = _tuple(padding, d)
    return {
        "kernel_shape": k,
        "strides": s,
        "dilations": _tuple(dilation, d),
        "pads": pads + pads,
        "ceil_mode": int(bool(ceil_mode)),
        "spatial_dims": d,
        "group": 1,
    }


def _spatial_dims(name: str) -> int:
    return int(name[-2]) if name[-2:] in ("1d", "2d", "3d") else 2


@converts(
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "max_pool1d_with_indices",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
)
def _max_pool(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    name = aten_name(node.target)
    d = int(name.split("_pool")[1][0])
    attrs = _pool_attrs(
        args["kernel_size"],
        args.get("stride"),
        args.get("padding", 0),
        args.get("dilation", 1),
        args.get("ceil_mode", False),
        d,
    )
    outs = b.emit("MaxPool", [b.value(args["self"])], attrs, final=False)
    b.values[node.name] = [outs[0], None] if name.endswith("indices") else outs[0]  # type: ignore[list-item]


@converts("avg_pool1d", "avg_pool2d", "avg_pool3d")
def _avg_pool(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    name = aten_name(node.target)
    if args.get("divisor_override") is not None:
        raise UnmappedOps({f"aten.{name}(divisor_override)": [b.layer_base(node)]})
    attrs = _pool_attrs(
        args["kernel_size"],
        args.get("stride"),
        args.get("padding", 0),
        1,
        args.get("ceil_mode", False),
        _spatial_dims(name),
    )
    attrs["count_include_pad"] = int(bool(args.get("count_include_pad", True)))
    b.emit("AveragePool", [b.value(args["self"])], attrs)


@converts(
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "_adaptive_avg_pool2d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
)
def _adaptive_pool(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    """Output 1: a global pool. Output dividing the input: a plain pool with kernel = stride = n / out."""
    name = aten_name(node.target)
    is_max = "max" in name
    values = list(args.values())
    x = values[0]
    d = _spatial_dims(name)
    out_size = _tuple(values[1], d)
    in_shape = _shape_of(x.meta.get("val")) or ()
    spatial = list(in_shape[-d:])
    multi = is_max
    if all(o == 1 for o in out_size):
        outs = b.emit("GlobalMaxPool" if is_max else "GlobalAveragePool", [b.value(x)], final=False)
    elif None not in spatial and all(n % o == 0 for n, o in zip(spatial, out_size, strict=True)):  # type: ignore[operator]
        k = [n // o for n, o in zip(spatial, out_size, strict=True)]  # type: ignore[operator]
        attrs = _pool_attrs(k, k, 0, 1, False, d)
        outs = b.emit("MaxPool" if is_max else "AveragePool", [b.value(x)], attrs, final=False)
    else:
        raise UnmappedOps({f"aten.{name} to {out_size} from {spatial}": [b.layer_base(node)]})
    b.values[node.name] = [outs[0], None] if multi else outs[0]  # type: ignore[list-item]


@converts("mean", "sum", "amax", "amin", "max", "min")
def _reduce(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    name = aten_name(node.target)
    values = list(args.values())
    x = values[0]
    rank = len(_shape_of(x.meta.get("val")) or ())
    dims = args.get("dim")
    keepdim = bool(args.get("keepdim", False))
    if name in ("max", "min") and isinstance(dims, int):
        op = "ReduceMax" if name == "max" else "ReduceMin"
        outs = b.emit(
            op, [b.value(x)], {"axes": [dims % rank], "keepdims": int(keepdim), "noop_with_empty_axes": 0}, final=False
        )
        b.values[node.name] = [outs[0], None]  # type: ignore[list-item]
        return
    if name in ("max", "min") and len(values) > 1 and isinstance(values[1], fx.Node):
        b.emit("Max" if name == "max" else "Min", [b.value(values[0]), b.value(values[1])])
        return
    op = {
        "mean": "ReduceMean",
        "sum": "ReduceSum",
        "amax": "ReduceMax",
        "amin": "ReduceMin",
        "max": "ReduceMax",
        "min": "ReduceMin",
    }[name]
    if dims is None or (isinstance(dims, list | tuple) and not dims):
        axes = list(range(rank))
    else:
        axes = [int(dims) % rank] if isinstance(dims, int) else [int(a) % rank for a in dims]
    b.emit(op, [b.value(x)], {"axes": axes, "keepdims": int(keepdim), "noop_with_empty_axes": 0})


@converts("sort", "topk")
def _sort(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    """torch.sort and torch.topk as ONNX's TopK (a sort is the top n of n, sorted); values and indices."""
    x = _first(args)
    shape = _shape_of(x.meta.get("val")) or ()
    given = args.get("dim")
    dim = (int(given) if given is not None else -1) % max(len(shape), 1)
    if aten_name(node.target) == "sort":
        count, largest = shape[dim] if shape else None, bool(args.get("descending"))
    else:
        count, largest = int(args["k"]), bool(args.get("largest", True))
        if not args.get("sorted", True):  # torch's order of unsorted top values is its own
            raise UnmappedOps({"aten.topk(sorted=False)": [b.layer_base(node)]})
    if count is None:
        raise UnmappedOps({f"aten.{aten_name(node.target)} over an axis of unknown size": [b.layer_base(node)]})
    k = b.constant(torch.tensor([count], dtype=torch.int64), "k")
    attrs = {"axis": dim, "largest": int(largest), "sorted": 1}
    b.values[node.name] = b.emit("TopK", [b.value(x), k], attrs, outputs=2, final=False)


@converts(
    "constant_pad_nd",
    "pad",
    "reflection_pad1d",
    "reflection_pad2d",
    "reflection_pad3d",
    "replication_pad1d",
    "replication_pad2d",
    "replication_pad3d",
    "circular_pad1d",
    "circular_pad2d",
    "circular_pad3d",
)
def _pad(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    """torch lists (left, right) pairs from the last axis backwards; ONNX wants all begins, then all ends."""
    name = aten_name(node.target)
    values = list(args.values())
    x = values[0]
    rank = len(_shape_of(x.meta.get("val")) or ())
    torch_pads = [int(p) for p in values[1]]
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(torch_pads) // 2):
        axis = rank - 1 - i
        begins[axis], ends[axis] = torch_pads[2 * i], torch_pads[2 * i + 1]
    if name in ("constant_pad_nd",):
        mode, value = "constant", float(values[2] if len(values) > 2 and values[2] is not None else 0.0)
    elif name == "pad":
        modes = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
        mode = modes[str(args["mode"])]
        value = float(args.get("value") or 0.0)
    else:
        mode = {"reflection": "reflect", "replication": "edge", "circular": "wrap"}[name.split("_")[0]]
        value = 0.0
    pads = begins + ends
    inputs = [b.value(x), b.constant(torch.tensor(pads, dtype=torch.int64), "pads")]
    if mode == "constant" and value != 0.0:
        inputs.append(b.constant(torch.tensor(value, dtype=b.dtype(x)), "pad_value"))
    b.emit("Pad", inputs, {"mode": mode, "pads": pads})


@converts(
    "upsample_nearest1d",
    "upsample_nearest2d",
    "upsample_nearest3d",
    "upsample_bilinear2d",
    "upsample_linear1d",
    "upsample_trilinear3d",
    "upsample_bicubic2d",
    "_upsample_nearest_exact2d",
)
def _upsample(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    name = aten_name(node.target)
    x = _first(args)
    in_shape = _shape_of(x.meta.get("val"))
    out_shape = _shape_of(node.meta.get("val"))
    scales = None
    if in_shape and out_shape and None not in in_shape and None not in out_shape:
        scales = [o / i for o, i in zip(out_shape, in_shape, strict=True)]  # type: ignore[operator]
    if "nearest" in name:
        mode, transform = "nearest", "half_pixel" if "exact" in name else "asymmetric"
    else:
        mode = "cubic" if "bicubic" in name else "linear"
        transform = "align_corners" if args.get("align_corners") else "pytorch_half_pixel"
    b.emit(
        "Resize",
        [b.value(x)],
        {"mode": mode, "scales": scales, "coordinate_transformation_mode": transform, "nearest_mode": "floor"},
    )


@converts("grid_sampler", "grid_sampler_2d", "grid_sampler_3d")
def _grid_sampler(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    x, grid, mode, padding, align = list(args.values())[:5]
    attrs = {
        "mode": ("bilinear", "nearest", "bicubic")[int(mode)],
        "padding_mode": ("zeros", "border", "reflection")[int(padding)],
        "align_corners": int(bool(align)),
    }
    b.emit("GridSample", [b.value(x), b.value(grid)], attrs)


@converts("pixel_shuffle", "pixel_unshuffle")
def _pixel_shuffle(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    values = list(args.values())
    op = "DepthToSpace" if aten_name(node.target) == "pixel_shuffle" else "SpaceToDepth"
    b.emit(op, [b.value(values[0])], {"blocksize": int(values[1]), "mode": "CRD"})


@converts("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu")
def _attention(b: GraphBuilder, node: fx.Node, args: dict[str, Any]) -> None:
    """softmax(q k^T * scale) v, written out: q k^T is a product of two activations (not globally Lipschitz)."""
    values = list(args.values())
    if args.get("attn_mask") is not None or args.get("is_causal") or float(args.get("dropout_p") or 0.0):
        raise UnmappedOps({"aten.scaled_dot_product_attention with a mask or dropout": [b.layer_base(node)]})
    query, key = values[0], values[1]
    rank = len(_shape_of(key.meta.get("val")) or ())
    width = (_shape_of(query.meta.get("val")) or (None,))[-1]
    scale = args.get("scale") or (1 / width**0.5 if width else 1.0)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    key_t = b.emit("Transpose", [b.value(key)], {"perm": perm}, final=False)[0]
    scores = b.emit("MatMul", [b.value(query), key_t], final=False)[0]
    scaled = b.emit("Mul", [scores, b.constant(torch.tensor(float(scale), dtype=b.dtype(query)))], final=False)[0]
    weights = b.emit("Softmax", [scaled], {"axis": -1, "coerce_2d": False}, final=False)[0]
    outs = b.emit("MatMul", [weights, b.value(values[2])], final=False)
    multi = aten_name(node.target) != "scaled_dot_product_attention"
    b.values[node.name] = [outs[0], None] if multi else outs[0]  # type: ignore[list-item]


def module_parameter_names(program: torch.export.ExportedProgram) -> dict[str, str]:
    """For graphs without module metadata (TorchScript): name each layer after its weight's module."""
    signature = program.graph_signature
    params = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    names: dict[str, str] = {}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        for arg in node.all_input_nodes:
            key = params.get(arg.name)
            if key and key.endswith(".weight"):
                names[node.name] = key[: -len(".weight")]
                break
    return names
