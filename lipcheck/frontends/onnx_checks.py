"""An ONNX graph is checked before it is analysed, and refused in one line naming the node.

A graph that is not a DAG of uniquely named values gets a wrong story, not an error: a cycle is walked
as if it were not there, a second producer of a value silently replaces the first (its branch vanishes
from the bound), a missing initializer reads as "weight computed from the input". So the rules of
``onnx.checker`` that change what the graph means are applied here: every value has one producer, every
input is defined, the graph is acyclic, and nodes of the standard domain match their schema (arity,
required inputs and attributes, attribute types). What the full checker also says but does not change
the analysis (missing shapes in value_info, deprecated ops such as Upsample, ops of other domains, which
are reported as ops without a rule) is left alone: exporters write such models every day.
"""

from __future__ import annotations

import onnx
from onnx import defs

from lipcheck.errors import ModelLoadError


def _label(proto: onnx.NodeProto, index: int) -> str:
    """As lipcheck names nodes: the node's name, else its first output, else its position."""
    name = proto.name or (proto.output[0] if proto.output else "") or f"#{index}"
    return f"node {name!r} ({proto.op_type})"


def check_graph(model: onnx.ModelProto, where: str) -> None:
    """Refuse duplicate producers, undefined inputs, cycles and schema violations (one line, naming the node)."""
    graph = model.graph
    _check_names(graph, where)
    defined = _defined_values(graph, where)
    for index, proto in enumerate(graph.node):
        for value in proto.input:
            if value and value not in defined:
                raise ModelLoadError(
                    f"{where}: {_label(proto, index)} reads {value!r}, which no node, graph input or initializer "
                    "defines"
                )
    for output in graph.output:
        if output.name not in defined:
            raise ModelLoadError(f"{where}: graph output {output.name!r} is not computed by any node")
    _check_acyclic(graph, where)
    opsets = {o.domain or "": o.version for o in model.opset_import}
    for index, proto in enumerate(graph.node):
        problem = _schema_problem(proto, opsets)
        if problem:
            raise ModelLoadError(f"{where}: {_label(proto, index)} {problem} (onnx.checker rejects it)")


def _check_names(graph: onnx.GraphProto, where: str) -> None:
    """Protobuf hands over a string field that is not valid UTF-8 as bytes: refused before anything uses it."""
    values = [*graph.input, *graph.output, *graph.value_info, *graph.initializer]
    names = [v.name for v in values] + [s.values.name for s in graph.sparse_initializer]
    for proto in graph.node:
        names += [proto.name, proto.op_type, proto.domain, *proto.input, *proto.output]
        names += [attr.name for attr in proto.attribute]
    for name in names:
        if not isinstance(name, str):
            raise ModelLoadError(f"{where}: the name {name!r} in the graph is not valid UTF-8")


def _defined_values(graph: onnx.GraphProto, where: str) -> dict[str, str]:
    """Every value name -> what defines it; a name defined twice is refused (ONNX graphs are SSA)."""
    defined: dict[str, str] = {}
    initializers = [i.name for i in graph.initializer] + [s.values.name for s in graph.sparse_initializer]
    for name in initializers:
        if name in defined:
            raise ModelLoadError(f"{where}: two initializers are named {name!r}")
        defined[name] = "an initializer"
    for value in graph.input:
        if value.name in defined and defined[value.name] != "an initializer":  # an initializer may be an input
            raise ModelLoadError(f"{where}: two graph inputs are named {value.name!r}")
        defined.setdefault(value.name, "a graph input")
    for index, proto in enumerate(graph.node):
        for value in (v for v in proto.output if v):
            if value in defined:
                raise ModelLoadError(
                    f"{where}: {_label(proto, index)} computes {value!r}, which {defined[value]} already defines; "
                    "every value must have one producer"
                )
            defined[value] = _label(proto, index)
    return defined


def _check_acyclic(graph: onnx.GraphProto, where: str) -> None:
    """Kahn's algorithm, linear in the graph's size: a node never reached waits on a cycle."""
    producer = {value: index for index, proto in enumerate(graph.node) for value in proto.output if value}
    readers: dict[int, list[int]] = {}
    waiting = [0] * len(graph.node)
    for index, proto in enumerate(graph.node):
        for value in (v for v in proto.input if v in producer):
            readers.setdefault(producer[value], []).append(index)
            waiting[index] += 1
    ready = [index for index, count in enumerate(waiting) if count == 0]
    for index in ready:  # grows while it is walked
        for reader in readers.get(index, []):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                ready.append(reader)
    if len(ready) < len(graph.node):
        index = next(i for i, count in enumerate(waiting) if count > 0)
        seen: set[int] = set()
        while index not in seen:  # walk back through unfinished producers until one repeats: it is on the cycle
            seen.add(index)
            value = next(v for v in graph.node[index].input if v in producer and waiting[producer[v]] > 0)
            index = producer[value]
        value = next(v for v in graph.node[index].input if v in producer and waiting[producer[v]] > 0)
        raise ModelLoadError(f"{where}: the graph has a cycle: {_label(graph.node[index], index)} waits on {value!r}")


def _schema_problem(proto: onnx.NodeProto, opsets: dict[str, int]) -> str | None:
    """What makes a standard-domain node invalid for its schema at the model's opset, if anything."""
    domain = proto.domain if proto.domain not in ("", "ai.onnx") else ""
    if domain or domain not in opsets:
        return None  # other domains: an op lipcheck has no rule for is reported as such
    try:
        schema = defs.get_schema(proto.op_type, opsets[domain], domain)
    except defs.SchemaError:
        return None  # unknown op (or an opset newer than the installed onnx): reported as an op without a rule
    problem = _arity_problem(proto, schema)
    if problem:
        return problem
    for attr in proto.attribute:
        declared = schema.attributes.get(attr.name)
        if declared is None:
            return f"has attribute {attr.name!r}, which {proto.op_type} does not take"
        if attr.type != declared.type:  # an UNDEFINED type reads as no value at all
            return f"has attribute {attr.name!r} of type {_type_name(attr.type)}, not {_type_name(declared.type)}"  # type: ignore[arg-type]
    given = {attr.name for attr in proto.attribute}
    missing = [name for name, declared in schema.attributes.items() if declared.required and name not in given]
    return f"lacks the required attribute {missing[0]!r}" if missing else None


def _arity_problem(proto: onnx.NodeProto, schema: defs.OpSchema) -> str | None:
    inputs, outputs = len(proto.input), len(proto.output)
    if not schema.min_input <= inputs <= schema.max_input:
        return f"has {inputs} inputs; {proto.op_type} takes {schema.min_input} to {schema.max_input}"
    if not schema.min_output <= outputs <= schema.max_output:
        return f"has {outputs} outputs; {proto.op_type} gives {schema.min_output} to {schema.max_output}"
    single = defs.OpSchema.FormalParameterOption.Single
    for index, formal in enumerate(schema.inputs[:inputs]):
        if formal.option == single and not proto.input[index]:
            return f"leaves its required input {formal.name} empty"
    return None


def _type_name(kind: int) -> str:
    return onnx.AttributeProto.AttributeType.Name(kind)
