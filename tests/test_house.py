"""The shape of the code base: what DESIGN.md and CONTRIBUTING.md promise a newcomer, checked.

* every function in ``lipcheck/`` fits on a screen (80 lines at most);
* an op's name is written in its op module (``lipcheck/ops/``) and in the frontends' mapping tables,
  nowhere else: analyses ask an op for a facet instead of testing its name;
* every op is registered once, says what it is, and has what the interpreter and the rules need;
* every option is declared once (``lipcheck.options.Settings``), with a flag, a help text, and a unique key.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lipcheck import ops
from lipcheck.graph import Node
from lipcheck.options import Option, option_of, settings_fields, toml_key
from tests.conftest import ROOT

PACKAGE = ROOT / "lipcheck"
MAX_FUNCTION_LINES = 80
# ops the frontends map to others or fold away, named only there
FRONTEND_ONLY = {"Upsample", "Constant", "If", "Loop", "Scan", "DequantizeLinear", "Scatter"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_function_is_longer_than_a_screen() -> None:
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


def test_op_names_live_in_op_modules_and_frontends_only() -> None:
    names = {op.name for op in ops.registered()} | FRONTEND_ONLY
    allowed = (PACKAGE / "ops", PACKAGE / "frontends")
    found = []
    for path in _modules():
        if path.is_relative_to(allowed[0]) or path.is_relative_to(allowed[1]):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert found == []


def test_every_op_is_registered_once_with_a_summary() -> None:
    registered = ops.registered()
    names = [op.name for op in registered]
    assert len(names) == len(set(names)) and names == sorted(names)
    assert all(op.summary for op in registered), [op.name for op in registered if not op.summary]
    for op in registered:
        assert ops.get(op.name) is op and type(op).name == op.name


def test_a_second_op_of_the_same_name_is_refused() -> None:
    with pytest.raises(ValueError, match="duplicate op 'Relu'"):

        @ops.register
        class Relu(ops.Op):
            """A second Relu."""

    assert type(ops.get("Relu")).__module__ == "lipcheck.ops.activations"


def test_declared_defaults_fill_what_a_node_leaves_out() -> None:
    bare = ops.node_attrs(Node("n", "LeakyRelu", ["x"], ["y"]))
    given = ops.node_attrs(Node("n", "LeakyRelu", ["x"], ["y"], {"alpha": 0.2}))
    assert bare["alpha"] == 0.01 and given["alpha"] == 0.2 and "beta" not in bare


@pytest.mark.parametrize("command", ["report", "check", "normalize"])
def test_every_option_is_declared_once_with_a_flag_and_help(command: str) -> None:
    fields = settings_fields(command)
    flags = [option_of(item).flag for item in fields]
    assert len(flags) == len(set(flags))
    for item in fields:
        spec: Option = option_of(item)
        assert spec.flag.startswith("--") and spec.help.endswith((".", ")")), item.name
        if command == "check":
            assert spec.override_help, f"{item.name}: a check flag overrides every model's value; say so"
    keys = [toml_key(item) for item in settings_fields() if option_of(item).toml is not None]
    assert len(keys) == len(set(keys))
