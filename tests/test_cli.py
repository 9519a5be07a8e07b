"""The command line as a user runs it: golden outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLES, assert_close_json
from tests.golden_files import GOLDEN, UPDATE, rewrite, write_or_compare


def run(*args: str, cwd: Path | None = None, columns: int = 160) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1", "PYTHONPATH": str(ROOT)}
    env.pop("LIPCHECK_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "lipcheck", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def check_golden(name: str, text: str) -> None:
    write_or_compare(GOLDEN / name, text)


@pytest.mark.parametrize("model", ["cnn_bn.onnx", "gated.onnx"])
def test_table_golden(model: str) -> None:
    result = run("report", str(SAMPLES / model), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    check_golden(model.replace(".onnx", ".table.txt"), result.stdout)


@pytest.mark.parametrize("model", ["cnn_bn.onnx", pytest.param("resnet_small.onnx", marks=pytest.mark.slow)])
def test_table_at_80_columns(model: str) -> None:
    """Narrow terminals: one line of numbers per layer, the method on lines of its own under it, names broken
    only at a separator, nothing wider than the screen."""
    result = run("report", str(SAMPLES / model), "--device", "cpu", "--lower-budget", "40", "--seed", "0", columns=80)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    data = json.loads(run("report", str(SAMPLES / model), "-f", "json", "--method", "product").stdout)  # the names
    names = [layer["name"] for layer in data["layers"]]
    rows = [i for i, line in enumerate(lines) if line[:3].strip().isdigit()]
    assert len(rows) == len(names)
    for row, name in zip(rows, names, strict=True):
        pieces = [lines[row][4:].split("  ")[0]]  # the name, then its continuation lines until the method's
        pieces += [
            line.strip() for line in lines[row + 1 :] if line.startswith("    ") and not line.startswith("      ")
        ]
        assert "".join(pieces).startswith(name) and name.startswith(pieces[0]), (name, pieces)
        assert pieces[0][-1] in "/.:" or pieces[0] == name  # broken only after a separator
    if model == "cnn_bn.onnx":  # without --lower: no searched numbers in a golden file
        check_golden("cnn_bn.table80.txt", run("report", str(SAMPLES / model), "--device", "cpu", columns=80).stdout)


@pytest.mark.parametrize("model", ["cnn_bn.onnx", "resnet_small.onnx", "gated.onnx"])
def test_json_golden(model: str) -> None:
    result = run("report", str(SAMPLES / model), "--format", "json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    golden = GOLDEN / model.replace(".onnx", ".json")
    if UPDATE:
        rewrite(golden, result.stdout)
    expected = json.loads(golden.read_text())
    data["lipcheck_version"] = expected["lipcheck_version"]
    assert_close_json(data, expected)
    required = {
        "schema",
        "lipcheck_version",
        "model",
        "upper_bound",
        "bounded",
        "unbounded_reasons",
        "lower_bound",
        "layers",
    }
    assert required <= data.keys()
    for layer in data["layers"]:
        assert {"name", "op", "lipschitz", "method", "certified"} <= layer.keys()


def test_json_of_unbounded_model_has_null_bound() -> None:
    data = json.loads(run("report", str(SAMPLES / "gated.onnx"), "-f", "json").stdout)
    assert data["upper_bound"] is None and data["bounded"] is False
    assert {r["node"] for r in data["unbounded_reasons"]} == {"/Mul"}  # LayerNorm with epsilon is Lipschitz


def test_output_file_is_written_and_never_silently_replaced(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    first = run("report", str(SAMPLES / "mlp.onnx"), "-f", "json", "-o", str(target))
    assert first.returncode == 0 and first.stdout == ""
    assert json.loads(target.read_text())["model"] == "mlp.onnx"
    target.write_text("mine")
    refused = run("report", str(SAMPLES / "mlp.onnx"), "-f", "json", "-o", str(target))
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert target.read_text() == "mine"
    forced = run("report", str(SAMPLES / "mlp.onnx"), "-o", str(target), "--force")
    assert forced.returncode == 0
    assert "Certified upper bound" in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary files left


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes((SAMPLES / "resnet_small.onnx").read_bytes()[:5000])
    return {
        "missing": tmp_path / "missing.onnx",
        "text": text,
        "empty": empty,
        "truncated": truncated,
        "directory": tmp_path,
    }


@pytest.mark.parametrize("kind", ["missing", "text", "empty", "truncated", "directory"])
def test_bad_input_gives_one_line_and_exit_2(tmp_path: Path, kind: str) -> None:
    path = _bad_files(tmp_path)[kind]
    result = run("report", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lipcheck: error: "), result.stderr
    assert "Traceback" not in result.stderr


USAGE_ERRORS = [
    (["report", str(SAMPLES / "mlp.onnx"), "--assume", "Relu"], "--assume"),
    (["report", str(SAMPLES / "mlp.onnx"), "--input-shape", "1,x"], "--input-shape"),
    (["report", str(SAMPLES / "mlp.onnx"), "--format", "xml"], "'xml' is not one of"),
    (["report"], "Missing argument 'MODEL'"),
    (["report", str(SAMPLES / "mlp.onnx"), "--bogus"], "No such option: --bogus"),
    (["normalize", str(SAMPLES / "mlp.onnx"), "--mode", "bad"], "'bad' is not one of 'bake', 'parametrize'"),
    (["check", "--fail-above", "x"], "Invalid value for '--fail-above'"),
    (["bogus"], "No such command 'bogus'"),
]


@pytest.mark.parametrize(("args", "message"), USAGE_ERRORS)
def test_bad_options_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = run(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("lipcheck: error: ") and message.lower() in lines[0].lower(), lines[0]
    assert result.stdout == ""


def test_version_help_and_rules() -> None:
    from lipcheck import __version__

    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"lipcheck {__version__}"
    assert "report" in run("--help").stdout
    assert "--input-shape" in run("report", "--help").stdout
    rules = run("rules")
    assert rules.returncode == 0
    for op in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Softmax", "LayerNormalization"):
        assert f"\n{op} " in rules.stdout


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "lipcheck"
    if not exe.exists():
        pytest.skip("package not installed as a console script in this environment")
    result = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
