"""ONNX frontend: ModelProto -> lipcheck Graph.

Done once here so rules stay short: local functions are inlined, subgraphs that depend only on
weights are folded to constants (weights behind Transpose, Reshape, Cast, DequantizeLinear, Constant
nodes...), attribute defaults are filled from the operator schema, attributes that became inputs in
later opsets are turned back into attributes, and shapes come from ONNX shape inference after the
input shapes are fixed (batch axis set to 1 unless the user says otherwise).

Weights are not all read up front: each initializer becomes a lazily loaded constant (read from the
parsed file, or by offset from its external data file), so a model larger than memory is bounded a
layer at a time under ``--max-memory`` (see ``lipcheck.memory``). Shape inference sees initializers
as typed inputs, not their bytes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from lipcheck.errors import InputShapeError, ModelLoadError
from lipcheck.frontends.onnx_checks import check_graph
from lipcheck.graph import (
    Graph,
    LazyConstants,
    Node,
    Shape,
    TensorSource,
    check_constants,
    constant_dtype,
    constant_shape,
    unique_name,
)
from lipcheck.memory import current_rss, plan_memory
from lipcheck.ops.spatial import same_pads
from lipcheck.options import parse_input_shapes

# Ops whose output never depends on the values of their inputs (only on shapes or on nothing).
VALUE_INDEPENDENT_OPS = {"Shape", "Size", "ConstantOfShape", "EyeLike", "RandomNormalLike", "RandomUniformLike"}
# Ops through which a layer may read an initializer as it is, rearranged or cast (``lipcheck normalize``
# rescales the initializer itself).
WEIGHT_VIEW_OPS = ("Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten")
# Ops that are never folded even when all inputs are constant (random, or not reproducible).
NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


# Initializers up to this many bytes are read at once; larger ones are read when a node needs them.
_EAGER_BYTES = 64 * 1024


def load_onnx_model(path: str | os.PathLike[str], load_weights: bool = True) -> onnx.ModelProto:
    """Read an ONNX file (with external data next to it), with one-line errors for bad files.

    ``load_weights=False`` leaves external data in its files (checked to exist and to be long enough):
    ``onnx_to_graph(..., base_dir=path.parent)`` then reads each tensor when it is needed.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an .onnx file")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path}: file is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, and others on truncated files
        raise ModelLoadError(f"{path}: not a readable ONNX model ({_short(exc)})") from None
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph found in {size} bytes)")
    _check_external_keys(model, path)
    if not load_weights:
        _check_external_data(model, path)
        _load_external_attributes(model, path)
        return model
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: external data file missing ({_short(exc)}); keep it next to the model") from None
    except Exception as exc:
        missing = _missing_external_files(model, path.parent)
        if missing:  # onnx reports a missing file as a ValueError ("not regular file")
            raise ModelLoadError(
                f"{path}: external data file missing ({', '.join(missing)}); keep it next to the model"
            ) from None
        raise ModelLoadError(f"{path}: cannot read external data ({_short(exc)})") from None
    return model


_EXTERNAL_KEYS = {"location", "offset", "length", "checksum", "basepath"}


def _check_external_keys(model: onnx.ModelProto, path: Path) -> None:
    """External data entries onnx reads only with a warning (unknown keys) or an exception: one line here."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    for tensor in (t for t in _get_all_tensors(model) if uses_external_data(t)):
        entries = {entry.key: entry.value for entry in tensor.external_data}
        if not all(isinstance(text, str) for text in [*entries, *entries.values()]):
            raise ModelLoadError(f"{path}: external data of {tensor.name!r} is not valid UTF-8")
        unknown = sorted(set(entries) - _EXTERNAL_KEYS)
        numbers_ok = all(entries.get(k, "0").isdigit() for k in ("offset", "length"))
        if unknown or not entries.get("location") or not numbers_ok:
            problem = f"an unknown key {unknown[0]!r}" if unknown else "no location" if numbers_ok else "a bad offset"
            raise ModelLoadError(f"{path}: external data of {tensor.name!r} has {problem}")


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Every external tensor's file exists and holds its bytes: errors now, not halfway through a report."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    missing = _missing_external_files(model, path.parent)
    if missing:
        raise ModelLoadError(f"{path}: external data file missing ({', '.join(missing)}); keep it next to the model")
    sizes: dict[str, int] = {}
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        location = path.parent / info.location
        if Path(info.location).is_absolute() or os.path.normpath(info.location).startswith(".."):
            raise ModelLoadError(f"{path}: external data of {tensor.name!r} points outside the model's folder")
        size = sizes.setdefault(info.location, location.stat().st_size)
        length = info.length if info.length else _tensor_nbytes(tensor)
        if length is not None and (info.offset or 0) + length > size:
            raise ModelLoadError(
                f"{path}: external data of {tensor.name!r} ends at byte {(info.offset or 0) + length}, "
                f"but {info.location} has {size} bytes"
            )


def _load_external_attributes(model: onnx.ModelProto, path: Path) -> None:
    """External tensors other than the main graph's initializers (Constant nodes, subgraphs): read now."""
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_tensor, uses_external_data

    top_level = {init.name for init in model.graph.initializer}
    try:
        for tensor in _get_all_tensors(model):
            if uses_external_data(tensor) and tensor.name not in top_level:
                load_external_data_for_tensor(tensor, str(path.parent))
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read external data ({_short(exc)})") from None


def _tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        return None
    if tensor.data_type in _SUB_BYTE_TYPES:
        return None
    return math.prod(tensor.dims) * itemsize


_SUB_BYTE_TYPES = {
    getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, name)
}


def _missing_external_files(model: onnx.ModelProto, base: Path) -> list[str]:
    """External data locations named by the model's tensors that are not files under ``base``."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    try:
        locations = {ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)}
    except Exception:
        return []
    return sorted(loc for loc in locations if not (base / loc).is_file())


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _fix_input_shapes(
    model: onnx.ModelProto,
    inputs: list[onnx.ValueInfoProto],
    given: dict[str, tuple[int, ...]],
    batch_axis: bool = True,
) -> dict[str, Shape]:
    """Write fixed input shapes into the model; returns the shape used for each input (an unknown first
    dimension set to 1 when ``batch_axis``)."""
    used: dict[str, Shape] = {}
    for value in inputs:
        tensor_type = value.type.tensor_type
        dims = list(tensor_type.shape.dim) if tensor_type.HasField("shape") else []
        if value.name in given:
            shape = given[value.name]
            if dims and len(dims) != len(shape):
                raise InputShapeError(
                    f"--input-shape for {value.name!r} has {len(shape)} dims, the model's input has {len(dims)}"
                )
            for dim, wanted in zip(dims, shape, strict=False):
                if dim.HasField("dim_value") and dim.dim_value not in (0, wanted):
                    raise InputShapeError(
                        f"--input-shape for {value.name!r}: dimension {dim.dim_value} of the model cannot be {wanted}"
                    )
            del tensor_type.shape.dim[:]
            for d in shape:
                tensor_type.shape.dim.add().dim_value = d
            used[value.name] = tuple(shape)
            continue
        shape_list: list[int | None] = []
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape_list.append(dim.dim_value)
            elif axis == 0 and batch_axis:  # the batch axis: samples do not interact, so 1 gives the same constant
                dim.Clear()
                dim.dim_value = 1
                shape_list.append(1)
            else:
                shape_list.append(None)
        used[value.name] = tuple(shape_list)
    return used


def _shape_of(value: onnx.ValueInfoProto) -> Shape | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim)


def _schema_defaults(op: str, domain: str, opset: int) -> dict[str, Any]:
    """The schema's attribute defaults (a fresh dict: callers add to it)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in _cached_schema_defaults(op, domain, opset).items()}


@functools.lru_cache(maxsize=1024)
def _cached_schema_defaults(op: str, domain: str, opset: int) -> dict[str, Any]:
    try:
        schema = onnx.defs.get_schema(op, opset, domain)
    except Exception:
        return {}
    defaults = {}
    for name, attr in schema.attributes.items():
        if attr.default_value.name:
            defaults[name] = _decode(helper.get_attribute_value(attr.default_value))
    return defaults


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


class _Folder:
    """Evaluates nodes whose inputs are all known, with the ONNX reference implementation."""

    def __init__(self, opsets: dict[str, int]):
        self.opsets = opsets

    def run(self, node: onnx.NodeProto, values: list[np.ndarray | None]) -> list[np.ndarray] | None:
        from onnx.reference import ReferenceEvaluator

        inputs = []
        feeds = {}
        for name, value in zip(node.input, values, strict=True):
            if not name:
                continue
            assert value is not None
            inputs.append(
                helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
            )
            feeds[name] = value
        outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o]
        graph = helper.make_graph([node], "fold", inputs, outputs)
        opset_imports = [helper.make_opsetid(domain, version) for domain, version in self.opsets.items()]
        model = helper.make_model(graph, opset_imports=opset_imports)
        try:
            results = ReferenceEvaluator(model).run(None, feeds)
        except Exception:
            return None
        return [np.asarray(r) for r in results]


def onnx_to_graph(
    model: onnx.ModelProto,
    input_shapes: Sequence[str] = (),
    name: str = "",
    base_dir: str | os.PathLike[str] | None = None,
    max_memory: int | None = None,
    batch_axis: bool = True,
) -> Graph:
    """Convert a loaded ONNX model to lipcheck's Graph (see module docstring).

    ``base_dir``: the folder of external data not loaded into ``model`` (``load_onnx_model(...,
    load_weights=False)``). ``max_memory``: the budget in bytes (``lipcheck.memory.plan_memory``).
    ``batch_axis``: an unknown first dimension of an input is a batch axis, set to 1 (False for a
    subgraph, whose first axis may be anything and whose unknown sizes stay unknown). Never in a model
    with a Loop or Scan: its first axis may be the one scanned, or the one a trip count is read from.
    The graph's constants read ``model``'s tensors on access: do not modify it afterwards.
    """
    if model.functions:
        with contextlib.suppress(Exception):  # ops of functions that cannot be inlined are reported as unknown
            model = onnx.inliner.inline_local_functions(model)  # type: ignore[attr-defined]
    where = name or model.graph.name or "model"
    check_graph(model, where)
    opsets = {op.domain or "": op.version for op in model.opset_import}
    opset = opsets.get("", opsets.get("ai.onnx", 21))
    g = model.graph
    constants = _constants(g, base_dir, max_memory)
    inputs = [v for v in g.input if v.name not in constants]
    input_names = [v.name for v in inputs]
    batch_axis = batch_axis and not _has_loops(g)
    _fix_input_shapes(model, list(inputs), parse_input_shapes(list(input_shapes), input_names), batch_axis)
    shapes, dtypes = _inferred_shapes(model, constants, inputs)
    kept = _fold(model, constants, shapes, inputs, opsets, opset)
    graph = Graph(
        nodes=_nodes(kept, opsets, opset, constants, (shapes, dtypes), where),
        inputs=input_names,
        outputs=[o.name for o in g.output],
        constants=constants,
        shapes=shapes,
        name=name or g.name,
        dtypes=dtypes,
    )
    graph.prune()
    _convert_subgraphs(graph, model, where)
    used = {v for node in graph.nodes for v in node.inputs} | set(graph.outputs)
    constants.restrict(used)
    check_constants(graph)
    return graph


# ops that run along an axis their inputs' first dimension may be (a loop's iterations, a recurrent layer's
# time steps): in a model with one, an unknown first dimension is not a batch axis of 1
_SEQUENTIAL_OPS = ("Loop", "Scan", "RNN", "GRU", "LSTM")


def _has_loops(g: onnx.GraphProto) -> bool:
    """Whether the graph or one of its subgraphs holds a Loop, a Scan or a recurrent layer."""
    for proto in g.node:
        if proto.op_type in _SEQUENTIAL_OPS and proto.domain in ("", "ai.onnx"):
            return True
        for attr in proto.attribute:
            if any(_has_loops(body) for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)):
                return True
    return False


def captured_values(proto: onnx.NodeProto) -> list[str]:
    """Outer values a control-flow node's subgraphs read. ONNX lets a branch or loop body use any value in
    scope without listing it, so these are inputs of the node as much as its listed ones."""
    captured: dict[str, None] = {}
    for attr in proto.attribute:
        bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for body in bodies:
            captured.update(dict.fromkeys(name for name in _free_values(body) if name not in proto.input))
    return list(captured)


def _free_values(body: onnx.GraphProto) -> list[str]:
    """The values a subgraph (its own subgraphs included) reads without defining them, in first-use order."""
    defined = {v.name for v in body.input} | {i.name for i in body.initializer} | {""}
    defined |= {s.values.name for s in body.sparse_initializer} | {o for proto in body.node for o in proto.output}
    free: dict[str, None] = {}
    for proto in body.node:
        free.update(dict.fromkeys(name for name in [*proto.input, *captured_values(proto)] if name not in defined))
    free.update(dict.fromkeys(v.name for v in body.output if v.name not in defined))
    return list(free)


def _convert_subgraphs(graph: Graph, model: onnx.ModelProto, where: str) -> None:
    """Control-flow subgraphs become lipcheck Graphs whose inputs are their formal inputs (a Loop's or Scan's
    body: iteration number, condition, state, scan elements), then the outer values they read (all among
    the node's inputs, by name); outer constants become the subgraph's. A body whose formal inputs do not
    match the node's listed inputs stays a GraphProto, and the op refuses it."""
    for node in graph.nodes:
        for key in _SUBGRAPHS.get(node.op, ()):
            body = node.attrs.get(key)
            if not isinstance(body, onnx.GraphProto):
                continue
            formal = [v.name for v in body.input]
            if node.op != "If" and len(formal) != node.attrs.get("listed_inputs"):
                continue  # opset-8 Scan (batched, sequence lengths first) or a malformed body
            shapes = _scan_element_shapes(node, graph, formal) if node.op == "Scan" else {}
            converted = _branch_graph(body, _free_values(body), graph, model, f"{where}/{node.name}/{key}", shapes)
            if converted.inputs[: len(formal)] == formal:
                node.attrs[key] = converted


_SUBGRAPHS = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}


def _scan_element_shapes(node: Node, outer: Graph, formal: list[str]) -> dict[str, Shape]:
    """A Scan body's scan-element inputs: the scan input's shape without its scan axis (exact for every
    iteration, unlike the state's, which the body declares)."""
    count = int(node.attrs.get("num_scan_inputs") or 0)
    axes = list(node.attrs.get("scan_input_axes") or [0] * count)
    shapes: dict[str, Shape] = {}
    first = len(formal) - count
    for j, (name, axis) in enumerate(zip(formal[first:], axes, strict=False)):
        shape = outer.shape(node.inputs[first + j])
        if shape is not None and -len(shape) <= axis < len(shape):
            shapes[name] = tuple(d for i, d in enumerate(shape) if i != axis % len(shape))
    return shapes


def _branch_graph(
    body: onnx.GraphProto,
    captured: list[str],
    outer: Graph,
    model: onnx.ModelProto,
    where: str,
    shapes: Mapping[str, Shape] | None = None,
) -> Graph:
    """The subgraph with its captured outer values as inputs (or initializers, for constants); ``shapes``
    replaces the declared shapes of formal inputs, dimension by dimension where the declared one is unknown."""
    branch = onnx.GraphProto()
    branch.CopyFrom(body)
    for value in branch.input:
        if value.name in (shapes or {}):
            _merge_shape(value, shapes[value.name])  # type: ignore[index]
    for name in captured:
        value = outer.constants.get(name)
        if value is not None:
            branch.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        else:
            dtype = outer.dtype(name)
            elem = onnx.TensorProto.DataType.Value(dtype.upper()) if dtype else onnx.TensorProto.FLOAT
            branch.input.append(helper.make_tensor_value_info(name, elem, outer.shape(name)))
    branch_model = helper.make_model(branch, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return onnx_to_graph(branch_model, name=where, batch_axis=False)


def _merge_shape(value: onnx.ValueInfoProto, shape: Shape) -> None:
    """Fill the unknown dimensions of a declared input shape (or a missing shape) from ``shape``."""
    tensor_type = value.type.tensor_type
    dims = list(tensor_type.shape.dim) if tensor_type.HasField("shape") else []
    if dims and len(dims) != len(shape):
        return  # the body disagrees with the node's input: keep its own
    known = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    merged = [
        mine if mine is not None else given for mine, given in zip(known or [None] * len(shape), shape, strict=True)
    ]
    del tensor_type.shape.dim[:]
    tensor_type.shape.SetInParent()
    for size in merged:
        dim = tensor_type.shape.dim.add()
        if size is not None:
            dim.dim_value = size


def _constants(g: onnx.GraphProto, base_dir: str | os.PathLike[str] | None, max_memory: int | None) -> LazyConstants:
    """The initializers, large ones read on access, with a cache sized by the memory budget."""
    constants = LazyConstants()
    for init in g.initializer:
        _add_initializer(constants, init, base_dir)
    for sparse in g.sparse_initializer:
        constants[sparse.values.name] = _sparse_to_dense(sparse)
    lazy = [n for n in constants if constants.is_lazy(n)]
    plan = plan_memory(
        max_memory,
        weight_bytes=sum(constants.nbytes_of(n) for n in lazy),
        largest_tensor=max((constants.nbytes_of(n) for n in lazy), default=0),
        resident=current_rss(),
    )
    constants.cache_bytes = plan.cache_bytes
    return constants


def _inferred_shapes(
    model: onnx.ModelProto, constants: LazyConstants, inputs: list[onnx.ValueInfoProto]
) -> tuple[dict[str, Shape], dict[str, str]]:
    """Shapes and number types from ONNX shape inference (the file's value_info where inference fails);
    inputs as fixed."""
    g = model.graph
    try:
        inferred = shape_inference.infer_shapes(_without_weights(model, constants), data_prop=True)
        values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    except Exception:
        values = [*g.input, *g.output, *g.value_info]
    shapes: dict[str, Shape] = {}
    dtypes: dict[str, str] = {}
    for value in [*values, *inputs]:
        shape = _shape_of(value)
        if shape is not None:
            shapes[value.name] = shape
        if value.type.tensor_type.elem_type:
            dtypes[value.name] = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()
    return shapes, dtypes


def _fold(
    model: onnx.ModelProto,
    constants: LazyConstants,
    shapes: dict[str, Shape],
    inputs: list[onnx.ValueInfoProto],
    opsets: dict[str, int],
    opset: int,
) -> list[onnx.NodeProto]:
    """The nodes left once everything computable from constants is folded (shapes refined in between)."""
    folder = _Folder(opsets)
    kept = _fold_pass(_topological(model.graph), constants, shapes, folder, opsets, opset)
    for _ in range(2):  # folded subgraphs often compute shapes (Pad amounts, Expand targets): infer again
        if not _refine_shapes(model, kept, constants, inputs, shapes):
            break
        before = len(kept)
        kept = _fold_pass(kept, constants, shapes, folder, opsets, opset)
        if len(kept) == before:
            break
    return kept


def _nodes(
    kept: list[onnx.NodeProto],
    opsets: dict[str, int],
    opset: int,
    constants: LazyConstants,
    types: tuple[dict[str, Shape], dict[str, str]],
    where: str,
) -> list[Node]:
    """lipcheck's nodes, uniquely named (the first output's name for an unnamed node), attributes normalised;
    ``types``: the values' shapes and number types."""
    nodes: list[Node] = []
    taken: set[str] = set()
    counters: dict[str, int] = {}
    for proto in kept:
        op, attrs = _proto_attrs(proto, opsets, opset)
        node_name = unique_name(taken, proto.name or proto.output[0] or op, counters)
        taken.add(node_name)
        node = Node(node_name, op, [*proto.input, *captured_values(proto)], list(proto.output), attrs)
        if any(attr.type in _GRAPH_ATTRIBUTES for attr in proto.attribute):
            attrs["listed_inputs"] = len(proto.input)  # the rest are values its subgraphs capture
        try:
            _normalise(node, opset, constants, types)
        except ModelLoadError as exc:  # attributes that do not fit the node: name the file too
            raise ModelLoadError(f"{where}: {exc}") from None
        nodes.append(node)
    return nodes


_GRAPH_ATTRIBUTES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _add_initializer(constants: LazyConstants, init: onnx.TensorProto, base_dir: str | os.PathLike[str] | None) -> None:
    """Small tensors now; large ones as sources read on access (from the proto or the external file)."""
    from onnx.external_data_helper import uses_external_data

    try:
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
    except Exception as exc:
        raise ModelLoadError(f"cannot read initializer {init.name!r} ({_short(exc)})") from None
    shape = tuple(int(d) for d in init.dims)
    external = uses_external_data(init)
    if external and base_dir is None:
        raise ModelLoadError(f"initializer {init.name!r} is stored as external data, and its folder is not known")
    loader = _external_loader(init, Path(base_dir)) if external else _proto_loader(init)  # type: ignore[arg-type]
    source = TensorSource(shape, dtype, loader)
    if source.nbytes <= _EAGER_BYTES or init.data_type in _SUB_BYTE_TYPES:
        constants[init.name] = loader()
    else:
        constants.add_source(init.name, source)


def _proto_loader(init: onnx.TensorProto):
    def load() -> np.ndarray:
        try:
            return numpy_helper.to_array(init)
        except Exception as exc:
            raise ModelLoadError(f"cannot read initializer {init.name!r} ({_short(exc)})") from None

    return load


def _external_loader(init: onnx.TensorProto, base_dir: Path):
    """Read one tensor from its external data file by offset and length (never the whole file)."""
    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(init)
    location = base_dir / info.location
    offset = int(info.offset or 0)
    dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
    shape = tuple(int(d) for d in init.dims)
    native = init.data_type in _NATIVE_TYPES
    length = int(info.length) if info.length else _tensor_nbytes(init)

    def load() -> np.ndarray:
        try:
            if native:
                count = math.prod(shape)
                value = np.fromfile(location, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=offset)
                if value.size != count:
                    raise ValueError(f"{location.name} ends before the tensor's {count} values")
                return value.astype(dtype, copy=False).reshape(shape)
            with open(location, "rb") as handle:  # other types: let onnx decode the bytes
                handle.seek(offset)
                data = handle.read(length) if length is not None else handle.read()
            tensor = onnx.TensorProto()
            tensor.CopyFrom(init)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = data
            return numpy_helper.to_array(tensor)
        except Exception as exc:
            message = f"cannot read initializer {init.name!r} from {info.location} ({_short(exc)})"
            raise ModelLoadError(message) from None

    return load


_NATIVE_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
}


def _proto_attrs(proto: onnx.NodeProto, opsets: dict[str, int], opset: int) -> tuple[str, dict[str, Any]]:
    """lipcheck's op name ('domain:Op' outside the default domain) and attributes with defaults."""
    domain = proto.domain if proto.domain not in ("", "ai.onnx") else ""
    op = proto.op_type if not domain else f"{domain}:{proto.op_type}"
    attrs = _schema_defaults(proto.op_type, domain, opsets.get(domain, opset))
    for attr in proto.attribute:
        attrs[attr.name] = _decode(helper.get_attribute_value(attr))
    return op, attrs


def _fold_pass(
    protos: list[onnx.NodeProto],
    constants: MutableMapping[str, np.ndarray],
    shapes: dict[str, Shape],
    folder: _Folder,
    opsets: dict[str, int],
    opset: int,
) -> list[onnx.NodeProto]:
    """Evaluate nodes whose inputs are all known (and Shape/Size of known shapes); return the others."""
    kept = []
    for proto in protos:
        op, attrs = _proto_attrs(proto, opsets, opset)
        if _foldable(proto, constants):
            known = [constants.get(i) if i else None for i in proto.input]
            folded = _fold_constant(proto, attrs, known, folder)
            if folded is not None:
                for out, value in zip(proto.output, folded, strict=False):
                    if out:
                        _store_folded(constants, out, value, proto, attrs, folder)
                continue
        if op == "Shape" or op == "Size":
            shape_value = _shape_value(op, attrs, shapes.get(proto.input[0]))
            if shape_value is not None:
                constants[proto.output[0]] = shape_value
                continue
        kept.append(proto)
    return kept


_SHAPE_VALUE_LIMIT = 4096  # constants up to this many entries reach shape inference with their values


def _refine_shapes(
    model: onnx.ModelProto,
    kept: list[onnx.NodeProto],
    constants: MutableMapping[str, np.ndarray],
    inputs: list[onnx.ValueInfoProto],
    shapes: dict[str, Shape],
) -> bool:
    """Shape inference on the remaining nodes with the folded constants as initializers.

    The first inference sees constant subgraphs, not their values, so shapes that depend on them
    (Pad amounts, Expand targets, Resize sizes computed at export time) stay unknown. Large constants
    (weights) go in as typed inputs: only their shapes matter. True when some shape gained a dim.
    """
    needed = {i for proto in kept for i in [*proto.input, *captured_values(proto)] if i in constants}
    values, typed = [], []
    try:
        for value_name in sorted(needed):
            shape = constant_shape(constants, value_name)
            if math.prod(shape) <= _SHAPE_VALUE_LIMIT:
                values.append(numpy_helper.from_array(np.asarray(constants[value_name]), value_name))
            else:
                dtype = helper.np_dtype_to_tensor_dtype(constant_dtype(constants, value_name))
                typed.append(helper.make_tensor_value_info(value_name, dtype, list(shape)))
        graph = helper.make_graph(kept, "refine", [*inputs, *typed], list(model.graph.output), initializer=values)
        refined = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        inferred = shape_inference.infer_shapes(refined, data_prop=True)
    except Exception:
        return False
    gained = False
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        new = _shape_of(info)
        old = shapes.get(info.name)
        if new is None or (old is not None and len(old) != len(new)):
            continue
        merged = new if old is None else tuple(o if o is not None else n for o, n in zip(old, new, strict=True))
        if merged != old:
            shapes[info.name] = merged
            gained = True
    return gained


def _sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices)
    dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
    flat = dense.reshape(-1)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(tuple(indices.T), dense.shape)
    flat[indices] = values
    return dense


def _without_weights(model: onnx.ModelProto, constants: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """Shape inference needs initializers' shapes, not their bytes: large ones become typed inputs.

    Cheaper than serialising every weight for the shape inferencer (and below protobuf's 2 GiB limit);
    small ones keep their values (from ``constants``: they may live in external data) for data
    propagation.
    """
    graph = _copy_fields(model.graph, onnx.GraphProto(), skip={"initializer"})
    slim = _copy_fields(model, onnx.ModelProto(), skip={"graph"})
    slim.graph.CopyFrom(graph)
    listed = {v.name for v in slim.graph.input}
    for init in model.graph.initializer:
        if math.prod(init.dims) > 64:
            if init.name not in listed:
                slim.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            slim.graph.initializer.append(numpy_helper.from_array(np.asarray(constants[init.name]), init.name))
    return slim


def _copy_fields(source, target, skip: set[str]):
    """Copy a protobuf message's fields but those in ``skip`` (no weights copied for a slim model)."""
    for descriptor, value in source.ListFields():
        if descriptor.name in skip:
            continue
        if descriptor.label == descriptor.LABEL_REPEATED:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)
    return target


def _topological(g: onnx.GraphProto) -> list[onnx.NodeProto]:
    """ONNX requires topological order, but not every writer obeys; sort defensively, level by level: the nodes
    whose inputs are all available, in the file's order, then those the previous level made ready, and so on
    (Kahn's algorithm, in n log n: it was a pass over every pending node per level, quadratic for a chain).
    Nodes on a cycle or behind a dangling input follow in the file's order."""
    available = {v.name for v in g.input} | {i.name for i in g.initializer} | {""}
    available |= {s.values.name for s in g.sparse_initializer}
    nodes = list(g.node)
    waiting = [0] * len(nodes)  # inputs not available yet, per node
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for value in {*node.input, *captured_values(node)} - available:
            waiting[index] += 1
            readers.setdefault(value, []).append(index)
    level = [index for index, count in enumerate(waiting) if count == 0]
    placed = [False] * len(nodes)
    ordered: list[onnx.NodeProto] = []
    while level:
        following = []
        for index in level:
            placed[index] = True
            ordered.append(nodes[index])
            for value in nodes[index].output:
                for reader in readers.pop(value, []):
                    waiting[reader] -= 1
                    if waiting[reader] == 0:
                        following.append(reader)
        level = sorted(following)
    ordered.extend(node for index, node in enumerate(nodes) if not placed[index])
    return ordered


def _foldable(proto: onnx.NodeProto, constants: Mapping[str, np.ndarray]) -> bool:
    if proto.op_type in NEVER_FOLD or proto.op_type in ("If", "Loop", "Scan"):  # captured values are inputs too
        return False
    return all(name in constants for name in proto.input if name)


def _store_folded(constants, out: str, value: np.ndarray, proto, attrs, folder: _Folder) -> None:
    """A folded value; a large one computed from lazily read weights may be dropped and recomputed."""
    inputs = [i for i in proto.input if i]
    if (
        isinstance(constants, LazyConstants)
        and value.nbytes > _EAGER_BYTES
        and any(constants.is_lazy(i) for i in inputs)
    ):
        index = list(proto.output).index(out)
        # the inputs as they are now, independent of what the mapping keeps later
        readers = [_reader(constants, i) if i else None for i in proto.input]

        def recompute() -> np.ndarray:
            again = _fold_constant(proto, attrs, [read() if read else None for read in readers], folder)
            assert again is not None, f"folding {proto.name or proto.op_type} failed on the second run"
            return again[index]

        constants.set_derived(out, value, recompute)
    else:
        constants[out] = value


def _reader(constants: LazyConstants, name: str):
    source = constants.source(name)
    if source is not None:
        return source.load
    value = constants[name]
    return lambda: value


def _fold_constant(proto, attrs, known, folder: _Folder) -> list[np.ndarray] | None:
    if proto.op_type == "Constant" and not proto.input:
        for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            if key in attrs:
                return [np.asarray(attrs[key])]
    if proto.op_type in ("Identity", "Dropout") and known[0] is not None:
        return [known[0]]
    result = folder.run(proto, known)
    if result is None and proto.op_type == "DequantizeLinear":
        # the ONNX reference evaluator implements DequantizeLinear only from opset 19
        result = _dequantize_linear(attrs, known)
    return result


def _dequantize_linear(attrs: dict[str, Any], known: list[np.ndarray | None]) -> list[np.ndarray] | None:
    """(x - zero_point) * scale for integer x with a scalar or per-axis scale (opsets 10 to 18)."""
    x, scale = np.asarray(known[0]), np.asarray(known[1])
    zero = np.asarray(known[2]) if len(known) > 2 and known[2] is not None else None
    if x.dtype.kind not in "iu" or scale.ndim > 1 or int(attrs.get("block_size", 0) or 0):
        return None
    shape = [1] * x.ndim
    if scale.ndim == 1 and x.ndim:
        shape[int(attrs.get("axis", 1)) % x.ndim] = -1
    dx = x.astype(np.float32)
    if zero is not None:
        dx = dx - zero.astype(np.float32).reshape(shape if zero.ndim == 1 and x.ndim else zero.shape)
    return [(dx * scale.reshape(shape if scale.ndim == 1 and x.ndim else scale.shape)).astype(scale.dtype)]


def _shape_value(op: str, attrs: dict[str, Any], shape: Shape | None) -> np.ndarray | None:
    if shape is None or any(d is None for d in shape):
        return None
    if op == "Size":
        return np.asarray(math.prod(shape), dtype=np.int64)  # type: ignore[arg-type]  # no None: checked above
    start = attrs.get("start", 0) or 0
    end = attrs.get("end")
    return np.asarray(shape[start:end], dtype=np.int64)


def _const_list(constants: MutableMapping[str, np.ndarray], node: Node, index: int) -> list | None:
    if len(node.inputs) > index and node.inputs[index] and node.inputs[index] in constants:
        return np.asarray(constants[node.inputs[index]]).reshape(-1).tolist()
    return None


def _normalise(
    node: Node, opset: int, constants: MutableMapping[str, np.ndarray], types: tuple[dict[str, Shape], dict[str, str]]
) -> None:
    """Fill op-specific attributes so rules never look at opsets (see module docstring)."""
    normaliser = _NORMALISERS.get(node.op)
    if normaliser is not None:
        shapes, dtypes = types
        in_shape = shapes.get(node.inputs[0]) if node.inputs and node.inputs[0] else None
        normaliser(node, _Opset(opset, constants, shapes, in_shape, dtypes))


@dataclass
class _Opset:
    """What a normaliser reads besides the node: the opset, the constants, the shapes, the first input's shape."""

    version: int
    constants: MutableMapping[str, np.ndarray]
    shapes: dict[str, Shape]
    in_shape: Shape | None
    dtypes: dict[str, str]


def _window(node: Node, at: _Opset) -> None:
    """Convolutions and pools: kernel, strides, dilations, group, and pads [begin..., end...] (None while a
    SAME padding waits for an unknown input size)."""
    a = node.attrs
    if node.op in ("Conv", "ConvTranspose"):
        weight = node.inputs[1] if len(node.inputs) > 1 else ""
        if not a.get("kernel_shape") and weight in at.constants:
            a["kernel_shape"] = list(constant_shape(at.constants, weight)[2:])
    k = list(a.get("kernel_shape") or [])
    d = len(k) if k else (len(at.in_shape) - 2 if at.in_shape else 0)
    a["strides"] = list(a.get("strides") or [1] * d)
    a["dilations"] = list(a.get("dilations") or [1] * d)
    a["group"] = int(a.get("group", 1) or 1)
    pads: list[int] | None = list(a.get("pads") or [0] * (2 * d))
    auto_pad = a.get("auto_pad", "NOTSET") or "NOTSET"
    spatial = at.in_shape[2:] if at.in_shape and len(at.in_shape) == d + 2 else None
    if auto_pad == "VALID":
        pads = [0] * (2 * d)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER") and node.op != "ConvTranspose":
        if spatial is None or any(n is None for n in spatial):
            pads = None  # unknown until the input size is known
        else:
            pads = same_pads(auto_pad, spatial, k, a["strides"], a["dilations"])  # type: ignore[arg-type]
    a["pads"] = pads
    a["spatial_dims"] = d
    weight = node.inputs[1] if node.op in ("Conv", "ConvTranspose") and len(node.inputs) > 1 else ""
    weight_rank = len(constant_shape(at.constants, weight)) if weight in at.constants else None
    _check_window(node, d, [len(at.in_shape) if at.in_shape else None, weight_rank])


def _check_window(node: Node, d: int, ranks: list[int | None]) -> None:
    """Conv and pooling attributes, input and weight must fit the window's rank (the spectral code indexes
    them per axis)."""
    a = node.attrs
    if d == 0:  # rank unknown (no kernel shape, weight or input shape): nothing to check against
        return
    for what, rank in zip(("input", "weight"), ranks, strict=True):
        if rank is not None and rank != d + 2:
            raise ModelLoadError(f"node {node.name!r} ({node.op}): its {what} has rank {rank}, not {d + 2}")
    sizes = {
        "kernel_shape": (a.get("kernel_shape") or [1] * d, d, 1),
        "strides": (a["strides"], d, 1),
        "dilations": (a["dilations"], d, 1),
        "pads": (a["pads"] or [0] * (2 * d), 2 * d, 0),
    }
    for key, (values, length, least) in sizes.items():
        if len(values) != length or any(int(v) < least for v in values):
            raise ModelLoadError(
                f"node {node.name!r} ({node.op}): {key} {list(values)} does not fit a {d}-D window "
                f"({length} entries, each at least {least})"
            )
    if int(a["group"]) < 1:
        raise ModelLoadError(f"node {node.name!r} ({node.op}): group {a['group']} is not positive")


def _softmax(node: Node, at: _Opset) -> None:
    """Before opset 13 the axis defaulted to 1 and the input was flattened from it on."""
    if node.attrs.get("axis") is None:
        node.attrs["axis"] = -1 if at.version >= 13 else 1
    node.attrs["coerce_2d"] = at.version < 13


def _pad(node: Node, at: _Opset) -> None:
    """Pads as an attribute over every axis (an input from opset 11, with optional axes from opset 18)."""
    a = node.attrs
    pads = _const_list(at.constants, node, 1) if at.version >= 11 else a.get("pads")
    a["pads"] = pads
    axes = _const_list(at.constants, node, 3)
    if axes is not None and pads is not None and at.in_shape is not None:
        rank = len(at.in_shape)
        full = [0] * (2 * rank)
        for j, axis in enumerate(axes):
            axis = axis % rank
            full[axis], full[axis + rank] = pads[j], pads[j + len(axes)]
        a["pads"] = full
    a["mode"] = a.get("mode", "constant") or "constant"


def _sizes_scales(sizes: list, in_shape: Shape, axes: list | None, policy: str | None) -> list[float] | None:
    """Resize's scales (one per axis resized) from constant sizes, with keep_aspect_ratio_policy's one scale."""
    rank = len(in_shape)
    resized = [int(axis) % rank for axis in (axes or range(rank))]
    if len(sizes) != len(resized):
        return None
    scales = [s / in_shape[axis] for s, axis in zip(sizes, resized, strict=True)]
    if policy in ("not_larger", "not_smaller"):
        return [min(scales) if policy == "not_larger" else max(scales)] * len(scales)
    return scales


def _resize(node: Node, at: _Opset) -> None:
    """Upsample becomes Resize; scales as an attribute (from the scales or sizes input, or the shapes)."""
    a, op, in_shape = node.attrs, node.op, at.in_shape
    if op == "Upsample" and at.version < 9:
        scales = a.get("scales")
    else:
        idx = 1 if op == "Upsample" else (2 if at.version >= 11 else 1)
        scales = _const_list(at.constants, node, idx)
        if not scales and op == "Resize" and at.version >= 11:
            sizes = _const_list(at.constants, node, 3)
            out_shape = at.shapes.get(node.outputs[0])
            if sizes and in_shape and all(in_shape):
                scales = _sizes_scales(sizes, in_shape, a.get("axes"), a.get("keep_aspect_ratio_policy"))
            if not scales and out_shape and in_shape and all(out_shape) and all(in_shape):
                scales = [o / n for o, n in zip(out_shape, in_shape, strict=True)]  # type: ignore[operator]
    node.op = "Resize"
    a["scales"] = scales
    mode = a.get("mode", "nearest") or "nearest"
    a["mode"] = "linear" if mode in ("bilinear", "trilinear") else mode  # old Upsample's names for linear


def _reduce(node: Node, at: _Opset) -> None:
    """Axes as an attribute (an input from opset 18 for ReduceMean and the like)."""
    a = node.attrs
    if a.get("axes") is None:
        a["axes"] = _const_list(at.constants, node, 1)
    a["keepdims"] = int(a.get("keepdims", 1))
    a["noop_with_empty_axes"] = int(a.get("noop_with_empty_axes", 0) or 0)


def _scatter(node: Node, at: _Opset) -> None:
    """Scatter (opsets 9 and 10) is ScatterElements without a reduction."""
    node.op = "ScatterElements"


def _scan(node: Node, at: _Opset) -> None:
    """Axes and directions over every scan input and output; opset 8's batched form (sequence lengths
    first, batch axis 0, scan axis 1) is marked ``batched``."""
    a = node.attrs
    count = int(a.get("num_scan_inputs") or 0)
    if at.version < 9:
        a["batched"] = 1
        return
    states = int(a.get("listed_inputs", len(node.inputs))) - count
    scan_outputs = max(len(node.outputs) - states, 0)
    a["scan_input_axes"] = list(a.get("scan_input_axes") or [0] * count)
    a["scan_input_directions"] = list(a.get("scan_input_directions") or [0] * count)
    a["scan_output_axes"] = list(a.get("scan_output_axes") or [0] * scan_outputs)
    a["scan_output_directions"] = list(a.get("scan_output_directions") or [0] * scan_outputs)


def _batch_norm(node: Node, at: _Opset) -> None:
    if int(node.attrs.get("training_mode", 0) or 0):
        node.attrs["training_mode"] = 1


def _dropout(node: Node, at: _Opset) -> None:
    """A training_mode input that is a constant false is the inference default: dropped, so only a
    Dropout that may drop entries keeps it (its rule and the interpreter refuse those)."""
    mode = at.constants.get(node.inputs[2]) if len(node.inputs) > 2 else None
    if mode is not None and not bool(np.asarray(mode).reshape(-1)[0]):
        node.inputs = node.inputs[:2]


def _element_type(at: _Opset, value: str) -> int | None:
    """The ONNX element type of a value, where known."""
    name = at.dtypes.get(value)
    if name is not None:
        return int(onnx.TensorProto.DataType.Value(name.upper()))
    if value in at.constants:
        return int(helper.np_dtype_to_tensor_dtype(np.asarray(at.constants[value]).dtype))
    return None


def _cast_like(node: Node, at: _Opset) -> None:
    """The target type as Cast's ``to`` (the interpreter refuses the types it cannot produce exactly)."""
    target = _element_type(at, node.inputs[1]) if len(node.inputs) > 1 else None
    if target is not None:
        node.attrs["to"] = target


def _quantize(node: Node, at: _Opset) -> None:
    """The integer type written: ``output_dtype``, else the zero point's, else uint8."""
    if not int(node.attrs.get("output_dtype") or 0):
        zero = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else ""
        node.attrs["output_dtype"] = (_element_type(at, zero) if zero else None) or onnx.TensorProto.UINT8


def _prelu(node: Node, at: _Opset) -> None:
    """Before opset 7 a 1-D slope of C entries is per channel (axis 1), not broadcast against the last axis."""
    slope = at.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
    rank = len(at.in_shape) if at.in_shape is not None else 0
    if at.version < 7 and slope is not None and np.ndim(slope) == 1 and np.size(slope) > 1 and rank > 2:
        name = unique_name({*at.constants, *at.shapes}, f"{node.inputs[1]}_per_channel")
        at.constants[name] = np.asarray(slope).reshape(-1, *([1] * (rank - 2)))
        node.inputs[1] = name


_NORMALISERS: dict[str, Callable[[Node, _Opset], None]] = {
    **dict.fromkeys(("Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"), _window),
    **dict.fromkeys(("Softmax", "LogSoftmax", "Hardmax"), _softmax),
    "Pad": _pad,
    **dict.fromkeys(("Resize", "Upsample"), _resize),
    **dict.fromkeys(
        ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceLogSumExp")
        + ("ReduceSumSquare", "ReduceLogSum", "ReduceProd"),
        _reduce,
    ),
    "PRelu": _prelu,
    "CastLike": _cast_like,
    "QuantizeLinear": _quantize,
    "BatchNormalization": _batch_norm,
    "Dropout": _dropout,
    "Scatter": _scatter,
    "Scan": _scan,
}
