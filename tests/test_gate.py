"""lipcheck as a CI gate: thresholds, baselines, `lipcheck check` with [tool.lipcheck], and the CI formats.

Real subprocess runs check each exit code and every format against golden files (regenerate with
LIPCHECK_UPDATE_GOLDEN=1); the gate, config and writers are also tested in-process, which is faster.
The SARIF output is validated against tests/schemas/sarif-2.1.0-subset.schema.json, a hand-written
subset of the SARIF 2.1.0 schema (the tests run offline).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from lipcheck.config import Overrides, find_config, load_config
from lipcheck.errors import LipcheckError
from lipcheck.formats.github import escape_data, escape_property, render_github, workflow_command
from lipcheck.formats.markdown import code, render_markdown, text
from lipcheck.formats.sarif import artifact_uri, sarif_log
from lipcheck.gate import (
    Baseline,
    GateOptions,
    ModelRun,
    evaluate,
    format_percent,
    load_baseline,
)
from lipcheck.options import parse_increase, parse_limit
from lipcheck.schemas import CHECK, REPORT, load_schema
from tests.conftest import ROOT, SAMPLES, assert_close_json
from tests.golden_files import GOLDEN, UPDATE, rewrite
from tests.test_cli import check_golden

jsonschema = pytest.importorskip("jsonschema")
from referencing import Registry, Resource  # noqa: E402  (installed with jsonschema)

SARIF_SUBSET = json.loads((Path(__file__).parent / "schemas" / "sarif-2.1.0-subset.schema.json").read_text())
GATE_FLAGS = ("--fail-above", "0.45", "--layer-fail-above", "2", "--baseline", "baseline.json", "--max-increase", "5%")


def run(*args: str, cwd: Path, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m lipcheck ARGS`` in ``cwd``; ``env`` adds variables (None removes one)."""
    full_env: dict[str, str | None] = {**os.environ, "COLUMNS": "160", "NO_COLOR": "1", "PYTHONPATH": str(ROOT)}
    full_env.pop("LIPCHECK_DEBUG", None)
    full_env.pop("GITHUB_STEP_SUMMARY", None)
    full_env.update(env or {})
    full_env = {key: value for key, value in full_env.items() if value is not None}
    return subprocess.run(
        [sys.executable, "-m", "lipcheck", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300
    )


def validate_report(data: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(load_schema(REPORT)).validate(data)


def validate_check(data: dict[str, Any]) -> None:
    registry = Registry().with_resource("urn:lipcheck:schema:report:1", Resource.from_contents(load_schema(REPORT)))
    jsonschema.Draft202012Validator(load_schema(CHECK), registry=registry).validate(data)


def validate_sarif(data: dict[str, Any]) -> None:
    jsonschema.Draft7Validator(SARIF_SUBSET).validate(data)
    driver = data["runs"][0]["tool"]["driver"]
    assert {"name", "version", "rules"} <= driver.keys()
    rule_ids = [rule["id"] for rule in driver["rules"]]
    assert len(rule_ids) == len(set(rule_ids))
    for result in data["runs"][0]["results"]:
        assert result["ruleId"] in rule_ids and rule_ids[result["ruleIndex"]] == result["ruleId"]
        uri = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        assert " " not in uri and urllib.parse.unquote(uri) != "" and "\\" not in uri


# --- a report to gate, computed once in-process -------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn() -> Any:
    from lipcheck.pipeline import analyse

    return analyse(SAMPLES / "cnn_bn.onnx", device="cpu")


@pytest.fixture(scope="module")
def cnn_dict(cnn: Any) -> dict[str, Any]:
    return cnn.to_dict()


def grown_baseline(report: dict[str, Any]) -> dict[str, Any]:
    """The baseline of the golden runs: the network bound grew 10%, /0/Conv 20%, /4/Conv 4% (under 5%), and
    /8/Relu was called /8/Relu_old (so one layer is new and one is missing)."""
    data = copy.deepcopy(report)
    data["upper_bound"] = report["upper_bound"] / 1.10
    for layer in data["layers"]:
        if layer["name"] == "/0/Conv":
            layer["lipschitz"] /= 1.20
        elif layer["name"] == "/4/Conv":
            layer["lipschitz"] /= 1.04
        elif layer["name"] == "/8/Relu":
            layer["name"] = "/8/Relu_old"
    return data


@pytest.fixture
def workdir(tmp_path: Path, cnn_dict: dict[str, Any]) -> Path:
    """A folder with cnn_bn.onnx and baseline.json, so paths in the outputs are short and machine-independent."""
    (tmp_path / "cnn_bn.onnx").write_bytes((SAMPLES / "cnn_bn.onnx").read_bytes())
    (tmp_path / "baseline.json").write_text(json.dumps(grown_baseline(cnn_dict), indent=2))
    return tmp_path


def gate_with_baseline(report: dict[str, Any], baseline: dict[str, Any], max_increase: float | None = 0.05):
    return evaluate(report, GateOptions(baseline=Baseline("baseline.json", baseline), max_increase=max_increase))


def scale(report: dict[str, Any], bound_divisor: float = 1.0, layer: str | None = None, divisor: float = 1.0):
    """A copy of ``report`` as a baseline whose numbers are the current ones divided (so the current ones grew)."""
    data = copy.deepcopy(report)
    data["upper_bound"] = report["upper_bound"] / bound_divisor
    for entry in data["layers"]:
        if entry["name"] == layer:
            entry["lipschitz"] /= divisor
    return data


# --- report: exit codes, formats, golden files (real subprocesses) ----------------------------------------


def test_report_gate_fails_json_golden_and_stderr(workdir: Path) -> None:
    result = run("report", "cnn_bn.onnx", "--device", "cpu", "-f", "json", *GATE_FLAGS, cwd=workdir)
    assert result.returncode == 1, result.stderr
    data = json.loads(result.stdout)
    validate_report(data)
    golden = GOLDEN / "gate_cnn_bn.json"
    if UPDATE:
        rewrite(golden, result.stdout)
    expected = json.loads(golden.read_text())
    data["lipcheck_version"] = expected["lipcheck_version"]
    assert_close_json(data, expected)
    gate = data["gate"]
    assert gate["passed"] is False
    assert [f["check"] for f in gate["failures"]] == ["bound_above", "layer_above", "bound_increase", "layer_increase"]
    assert gate["new_layers"] == ["/8/Relu"] and gate["missing_layers"] == ["/8/Relu_old"]
    lines = result.stderr.splitlines()
    failed = [line for line in lines if line.startswith("lipcheck: gate failed: cnn_bn.onnx: ")]
    assert len(failed) == 4, result.stderr  # one line per failure
    assert any("layer /0/Conv (Conv)" in line and "grew 20%" in line for line in failed)
    assert any("upper bound grew 10%" in line for line in failed)
    assert not any("/4/Conv" in line for line in failed)  # grew 4%: within 5%
    warnings = [line for line in lines if line.startswith("lipcheck: warning: ")]
    assert any("new" in line and "/8/Relu" in line for line in warnings)
    assert any("missing" in line and "/8/Relu_old" in line for line in warnings)


def test_report_github_golden(workdir: Path) -> None:
    result = run("report", "cnn_bn.onnx", "--device", "cpu", "-f", "github", *GATE_FLAGS, cwd=workdir)
    assert result.returncode == 1, result.stderr
    check_golden("gate_cnn_bn.github.txt", result.stdout)
    commands = result.stdout.splitlines()
    assert sum(line.startswith("::error file=cnn_bn.onnx,") for line in commands) == 4
    assert sum(line.startswith("::warning file=cnn_bn.onnx,") for line in commands) == 2


def test_report_sarif_file_and_markdown_step_summary_golden(workdir: Path) -> None:
    summary = workdir / "summary.md"
    summary.write_text("earlier step\n")
    result = run(
        "report",
        "cnn_bn.onnx",
        "--device",
        "cpu",
        "-f",
        "sarif",
        "-o",
        "out.sarif",
        "--github-summary",
        *GATE_FLAGS,
        cwd=workdir,
        env={"GITHUB_STEP_SUMMARY": str(summary)},
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""  # the data went to the file
    data = json.loads((workdir / "out.sarif").read_text())
    validate_sarif(data)
    golden = GOLDEN / "gate_cnn_bn.sarif"
    if UPDATE:
        rewrite(golden, (workdir / "out.sarif").read_text())
    expected = json.loads(golden.read_text())
    for log in (data, expected):
        log["runs"][0]["tool"]["driver"]["version"] = log["runs"][0]["tool"]["driver"]["semanticVersion"] = "X"
    assert_close_json(data, expected)
    results = data["runs"][0]["results"]
    assert [r["level"] for r in results] == ["error"] * 4 + ["warning"] * 2
    assert {r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in results} == {"cnn_bn.onnx"}
    appended = summary.read_text()
    assert appended.startswith("earlier step\n")  # appended, not replaced
    check_golden("gate_cnn_bn.md", appended[len("earlier step\n") :])


def test_report_passes_exit_0_and_save_baseline_refuses_to_overwrite(workdir: Path) -> None:
    first = run(
        "report", "cnn_bn.onnx", "--device", "cpu", "--fail-above", "10", "--save-baseline", "saved.json", cwd=workdir
    )
    assert first.returncode == 0, first.stderr
    assert "lipcheck: gate passed: cnn_bn.onnx" in first.stderr
    assert "Certified upper bound" in first.stdout  # the table still goes to stdout
    saved = json.loads((workdir / "saved.json").read_text())
    validate_report(saved)
    assert "gate" not in saved  # a baseline is the plain report
    before = (workdir / "saved.json").read_text()
    again = run("report", "cnn_bn.onnx", "--device", "cpu", "--save-baseline", "saved.json", cwd=workdir)
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1 and "--force" in again.stderr and again.stdout == ""
    assert (workdir / "saved.json").read_text() == before
    assert sorted(p.name for p in workdir.iterdir()) == ["baseline.json", "cnn_bn.onnx", "saved.json"]  # no temp files


def test_report_exit_zero_reports_but_exits_0(workdir: Path) -> None:
    result = run(
        "report", "cnn_bn.onnx", "--device", "cpu", "-f", "json", "--fail-above", "0.45", "--exit-zero", cwd=workdir
    )
    assert result.returncode == 0
    assert json.loads(result.stdout)["gate"]["passed"] is False
    assert "gate failed: cnn_bn.onnx: upper bound 0.478692 is above the limit 0.45" in result.stderr


@pytest.mark.parametrize(
    "content, expected",
    [
        ("[1, 2, 3]", "not a lipcheck report"),
        ('{"schema": "sarif", "layers": []}', "not a lipcheck report"),
        ("not json at all", "not a lipcheck report (invalid JSON"),
    ],
)
def test_baseline_that_is_not_a_report_is_refused(tmp_path: Path, content: str, expected: str) -> None:
    (tmp_path / "b.json").write_text(content)
    with pytest.raises(LipcheckError, match=re.escape(expected)):
        load_baseline(tmp_path / "b.json")


def test_baseline_that_is_not_a_report_exit_2_from_the_cli(workdir: Path) -> None:
    (workdir / "bogus.json").write_text('{"hello": "world"}')
    result = run("report", "cnn_bn.onnx", "--baseline", "bogus.json", cwd=workdir)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lipcheck: error: baseline bogus.json: not a lipcheck report")


def test_usage_errors_exit_2_fast(tmp_path: Path) -> None:
    model = str(SAMPLES / "mlp.onnx")
    for args, message in [
        (("--max-increase", "5%"), "--max-increase needs --baseline"),
        (("--fail-above", "-1"), "--fail-above"),
        (("--baseline", "b.json", "--max-increase", "five"), "--max-increase 'five'"),
    ]:
        result = run("report", model, *args, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


# --- lipcheck check (real subprocesses) ---------------------------------------------------------------------


def write_config(folder: Path, body: str, name: str = "pyproject.toml") -> Path:
    path = folder / name
    path.write_text(body)
    return path


CHECK_CONFIG = """
[project]
name = "demo"

[tool.lipcheck]
device = "cpu"
fail_above = 10

[[tool.lipcheck.models]]
path = "models/mlp.onnx"
fail_above = 0.5

[[tool.lipcheck.models]]
path = "models/cnn_bn.onnx"
input_shape = ["1,3,16,16"]
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    for name in ("mlp.onnx", "cnn_bn.onnx"):
        (tmp_path / "models" / name).write_bytes((SAMPLES / name).read_bytes())
    write_config(tmp_path, CHECK_CONFIG)
    (tmp_path / "src").mkdir()
    return tmp_path


def test_check_exit_1_with_one_line_per_model(project: Path) -> None:
    # the config is found upward; paths are relative to it; output is plain when not a terminal, NO_COLOR or not
    result = run("check", cwd=project / "src", env={"NO_COLOR": None, "FORCE_COLOR": None, "TERM": "xterm-256color"})
    assert result.returncode == 1, result.stderr
    assert "\x1b" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("FAIL ") and "../" not in lines[0] and "mlp.onnx" in lines[0]
    assert lines[1].startswith("PASS ") and "cnn_bn.onnx" in lines[1] and "0.478692" in lines[1]
    assert "gate failed: " in result.stderr and "above the limit 0.5 (fail-above)" in result.stderr


def test_check_flags_override_the_file_exit_0(project: Path) -> None:
    result = run("check", "--fail-above", "100", "-f", "json", cwd=project)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    validate_check(data)
    assert data["passed"] is True and data["exit_code"] == 0
    assert [m["status"] for m in data["models"]] == ["pass", "pass"]
    assert [m["report"]["gate"]["fail_above"] for m in data["models"]] == [100.0, 100.0]
    assert [m["path"] for m in data["models"]] == ["models/mlp.onnx", "models/cnn_bn.onnx"]
    assert len([line for line in result.stderr.splitlines() if line.startswith(("PASS", "FAIL"))]) == 2


def test_check_exit_2_when_a_model_fails_to_load_but_others_still_run(project: Path) -> None:
    write_config(project, CHECK_CONFIG + '\n[[tool.lipcheck.models]]\npath = "models/missing.onnx"\n')
    result = run("check", "-f", "sarif", cwd=project)
    assert result.returncode == 2  # even though a gate failed too: errors win
    data = json.loads(result.stdout)
    validate_sarif(data)
    rules = [r["ruleId"] for r in data["runs"][0]["results"]]
    assert rules == ["bound-above-limit", "model-error"]
    assert data["runs"][0]["invocations"][0]["executionSuccessful"] is False
    summary = [line for line in result.stderr.splitlines() if line.startswith(("PASS", "FAIL", "ERROR"))]
    assert [line.split()[0] for line in summary] == ["FAIL", "PASS", "ERROR"]


def test_check_unknown_key_exit_2_names_the_key(tmp_path: Path) -> None:
    write_config(tmp_path, '[tool.lipcheck]\nfail_abov = 3\n[[tool.lipcheck.models]]\npath = "m.onnx"\n')
    result = run("check", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "unknown key 'fail_abov'" in result.stderr and "did you mean 'fail_above'" in result.stderr


# --- the gate, in-process ----------------------------------------------------------------------------------


def test_parse_increase_and_limits() -> None:
    assert parse_increase("5%") == pytest.approx(0.05)
    assert parse_increase(" 5 % ") == pytest.approx(0.05)
    assert parse_increase("0.05") == 0.05 and parse_increase(0.05) == 0.05 and parse_increase(0) == 0
    assert parse_increase("150%") == pytest.approx(1.5)
    for bad in ("-1%", "abc", "5", "nan", True, "inf%"):
        with pytest.raises(LipcheckError):
            parse_increase(bad)
    assert parse_limit(3, "x") == 3.0
    for bad in (-1, "x", float("inf"), False):
        with pytest.raises(LipcheckError):
            parse_limit(bad, "x")


def test_fail_above_and_unbounded(cnn_dict: dict[str, Any]) -> None:
    bound = cnn_dict["upper_bound"]
    assert evaluate(cnn_dict, GateOptions(fail_above=bound)).passed  # equal is not above
    failed = evaluate(cnn_dict, GateOptions(fail_above=bound * 0.999))
    assert [f.check for f in failed.failures] == ["bound_above"] and failed.failures[0].value == bound
    assert evaluate(cnn_dict, GateOptions()).passed and not GateOptions().active
    unbounded = {
        **cnn_dict,
        "upper_bound": None,
        "bounded": False,
        "unbounded_reasons": [{"node": "/ln", "op": "LayerNormalization", "reason": "divides"}],
    }
    gate = evaluate(unbounded, GateOptions(fail_above=100))
    assert not gate.passed and gate.failures[0].check == "unbounded" and "/ln" in gate.failures[0].message
    allowed = evaluate(unbounded, GateOptions(fail_above=100, allow_unbounded=True))
    assert allowed.passed and allowed.warnings[0].check == "unbounded"


def test_layer_fail_above_names_each_layer(cnn_dict: dict[str, Any]) -> None:
    gate = evaluate(cnn_dict, GateOptions(layer_fail_above=1.5))
    assert [f.layer for f in gate.failures] == ["/0/Conv", "/4/Conv"]
    assert "layer /0/Conv (Conv): local bound 2.24872 is above the limit 1.5" in gate.failures[0].message


@pytest.mark.parametrize("max_increase", [0.05, parse_increase("5%")])
def test_network_regression_at_the_edge_of_the_threshold(cnn_dict: dict[str, Any], max_increase: float) -> None:
    exactly = gate_with_baseline(cnn_dict, scale(cnn_dict, bound_divisor=1.05), max_increase)
    assert exactly.passed, [f.message for f in exactly.failures]  # grew exactly 5%: not more than 5%
    under = gate_with_baseline(cnn_dict, scale(cnn_dict, bound_divisor=1.0499), max_increase)
    assert under.passed
    over = gate_with_baseline(cnn_dict, scale(cnn_dict, bound_divisor=1.0501), max_increase)
    assert [f.check for f in over.failures] == ["bound_increase"]
    assert "grew 5.01%" in over.failures[0].message and "allowed 5%" in over.failures[0].message
    assert over.comparison(None).increase == pytest.approx(0.0501)


def test_layer_regression_at_the_edge_of_the_threshold(cnn_dict: dict[str, Any]) -> None:
    assert gate_with_baseline(cnn_dict, scale(cnn_dict, layer="/7/Conv", divisor=1.05)).passed
    assert gate_with_baseline(cnn_dict, scale(cnn_dict, layer="/7/Conv", divisor=1.0499)).passed
    over = gate_with_baseline(cnn_dict, scale(cnn_dict, layer="/7/Conv", divisor=1.0501))
    assert [(f.check, f.layer) for f in over.failures] == [("layer_increase", "/7/Conv")]
    assert over.failures[0].message.startswith("layer /7/Conv (Conv): local bound grew 5.01% (")


def test_baseline_without_max_increase_allows_only_rounding(cnn_dict: dict[str, Any]) -> None:
    assert gate_with_baseline(cnn_dict, copy.deepcopy(cnn_dict), None).passed
    noise = scale(cnn_dict, bound_divisor=1 + 1e-12)  # last-bit differences between machines
    assert gate_with_baseline(cnn_dict, noise, None).passed
    grown = gate_with_baseline(cnn_dict, scale(cnn_dict, bound_divisor=1.0001), None)
    assert not grown.passed and "allowed 0%" in grown.failures[0].message
    shrunk = gate_with_baseline(cnn_dict, scale(cnn_dict, bound_divisor=0.5), None)
    assert shrunk.passed and shrunk.comparison(None).increase == pytest.approx(-0.5)


def test_new_and_missing_layers_are_named(cnn_dict: dict[str, Any]) -> None:
    baseline = copy.deepcopy(cnn_dict)
    baseline["layers"] = [layer for layer in baseline["layers"] if layer["name"] != "/2/Relu"]
    baseline["layers"].append({**baseline["layers"][0], "name": "/gone/Conv"})
    gate = gate_with_baseline(cnn_dict, baseline)
    assert gate.passed
    assert gate.new_layers == ["/2/Relu"] and gate.missing_layers == ["/gone/Conv"]
    messages = [w.message for w in gate.warnings]
    assert messages == [
        "1 layer(s) not in the baseline (new, not compared): /2/Relu",
        "1 baseline layer(s) missing from the model: /gone/Conv",
    ]


def test_baseline_of_another_model_warns(cnn_dict: dict[str, Any]) -> None:
    gate = gate_with_baseline(cnn_dict, {**copy.deepcopy(cnn_dict), "model": "other.onnx"})
    assert gate.passed and gate.warnings[0].check == "baseline_mismatch" and "other.onnx" in gate.warnings[0].message


def test_format_percent() -> None:
    assert format_percent(0.05) == "5%" and format_percent(0.0501) == "5.01%" and format_percent(1.5) == "150%"


# --- configuration, in-process -----------------------------------------------------------------------------


def test_config_found_upward_and_paths_relative_to_it(tmp_path: Path) -> None:
    write_config(tmp_path, '[tool.lipcheck]\n[[tool.lipcheck.models]]\npath = "m/a.onnx"\nbaseline = "b.json"\n')
    nested = tmp_path / "x" / "y"
    nested.mkdir(parents=True)
    write_config(tmp_path / "x", '[project]\nname = "no lipcheck table here"\n')  # skipped
    assert find_config(nested) == tmp_path / "pyproject.toml"
    config = load_config(start=nested)
    assert config.models[0].path == tmp_path / "m" / "a.onnx"
    assert config.models[0].baseline == tmp_path / "b.json"
    write_config(tmp_path / "x", 'device = "cpu"\n[[models]]\npath = "c.onnx"\n', name="lipcheck.toml")
    config = load_config(start=nested)  # lipcheck.toml: top-level keys, and nearer
    assert config.source.name == "lipcheck.toml" and config.models[0].path == tmp_path / "x" / "c.onnx"
    assert config.models[0].settings.device == "cpu"


def test_config_precedence_defaults_model_flags(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
[tool.lipcheck]
fail_above = 10
max-increase = "5%"
allow_unbounded = true
assume = { Einsum = 1.5, Erf = 2 }
input_shape = "1,3,8,8"

[[tool.lipcheck.models]]
path = "a.onnx"

[[tool.lipcheck.models]]
path = "b.onnx"
fail_above = 3
max_increase = 0.1
input_shape = [1, 3, 32, 32]
assume = { Erf = 3 }
""",
    )
    a, b = load_config(path).models
    assert (a.settings.fail_above, a.settings.max_increase, a.settings.allow_unbounded) == (10, 0.05, True)
    assert a.settings.input_shape == ("1,3,8,8",) and a.settings.assume == {"Einsum": 1.5, "Erf": 2}
    assert (b.settings.fail_above, b.settings.max_increase) == (3, 0.1)
    assert b.settings.input_shape == ("1,3,32,32",) and b.settings.assume == {"Einsum": 1.5, "Erf": 3}
    flags = Overrides(fail_above=1, allow_unbounded=False, assume={"Erf": 4}, input_shape=("1,3,4,4",), exit_zero=True)
    config = load_config(path, overrides=flags)
    for model in config.models:
        assert model.settings.fail_above == 1 and model.settings.allow_unbounded is False
        assert model.settings.assume["Erf"] == 4 and model.settings.input_shape == ("1,3,4,4",)
    assert config.models[1].settings.max_increase == 0.1  # not given as a flag: the file's value stands
    assert config.exit_zero is True


@pytest.mark.parametrize(
    "body, message",
    [
        ('[tool.lipcheck]\nfail_abov = 3\n[[tool.lipcheck.models]]\npath = "a"\n', "unknown key 'fail_abov'"),
        (
            '[tool.lipcheck]\n[[tool.lipcheck.models]]\npath = "a"\nthreshold = 3\n',
            r"\[\[tool.lipcheck.models\]\] #1: unknown key 'threshold'",
        ),
        ('[tool.lipcheck]\nbaseline = "b.json"\n[[tool.lipcheck.models]]\npath = "a"\n', "belongs in each"),
        ("[tool.lipcheck]\n[[tool.lipcheck.models]]\nfail_above = 3\n", "missing key 'path'"),
        ("[tool.lipcheck]\nfail_above = 3\n", "no models configured"),
        (
            '[tool.lipcheck]\nfail_above = "high"\n[[tool.lipcheck.models]]\npath = "a"\n',
            "fail_above: expected a number",
        ),
        ('[tool.lipcheck]\nallow_unbounded = "yes"\n[[tool.lipcheck.models]]\npath = "a"\n', "true or false"),
        ('[tool.lipcheck]\ndevice = "tpu"\n[[tool.lipcheck.models]]\npath = "a"\n', "device must be one of"),
        ('[tool.lipcheck]\nmax_increase = "5"\n[[tool.lipcheck.models]]\npath = "a"\n', "write 5% if you meant it"),
        ("[tool.lipcheck\n", "invalid TOML"),
        ('[tool.lipcheck]\nfail_above = 1\nfail-above = 2\n[[tool.lipcheck.models]]\npath = "a"\n', "given twice"),
    ],
)
def test_config_errors_name_the_problem(tmp_path: Path, body: str, message: str) -> None:
    path = write_config(tmp_path, body)
    with pytest.raises(LipcheckError, match=message):
        load_config(path)


def test_no_config_found(tmp_path: Path) -> None:
    if find_config(tmp_path) is not None:
        pytest.skip("a folder above the temporary folder holds a lipcheck configuration")
    with pytest.raises(LipcheckError, match="no lipcheck configuration found"):
        load_config(start=tmp_path)


def test_run_model_turns_errors_into_results(tmp_path: Path) -> None:
    from lipcheck.runner import run_model

    mlp = (SAMPLES / "mlp.onnx").as_posix()
    path = write_config(
        tmp_path,
        '[tool.lipcheck]\n[[tool.lipcheck.models]]\npath = "nope.onnx"\n'
        f'[[tool.lipcheck.models]]\npath = "{mlp}"\nbaseline = "b.json"\n',
    )
    missing, no_baseline = (run_model(model, cwd=tmp_path) for model in load_config(path).models)
    assert missing.status == "error" and missing.path == "nope.onnx" and missing.error == "no such file"
    assert no_baseline.status == "error" and "baseline b.json: no such file" in no_baseline.error
    assert "--update-baselines" in no_baseline.error


# --- the writers, in-process -------------------------------------------------------------------------------


def test_github_escaping() -> None:
    assert escape_data("100% sure\r\nnext: a,b") == "100%25 sure%0D%0Anext: a,b"
    assert escape_property("a: b, c% d\ne") == "a%3A b%2C c%25 d%0Ae"
    assert escape_data("%0A") == "%250A"  # an already-escaped-looking text stays literal
    line = workflow_command("error", "bound 5%\nwhy: a, b", file="models/a,b:c.onnx", title="t: x", line=None)
    assert line == "::error file=models/a%2Cb%3Ac.onnx,title=t%3A x::bound 5%25%0Awhy: a, b"


def test_github_commands_stay_one_line_each(cnn: Any, cnn_dict: dict[str, Any]) -> None:
    gate = evaluate(cnn_dict, GateOptions(fail_above=0.45))
    gate.failures[0].message = "multi\nline 100% message"
    out = render_github([ModelRun("dir,with:odd/cnn 1.onnx", cnn, gate), ModelRun("x.onnx", error="bad\r\nfile")])
    lines = out.splitlines()
    assert len(lines) == 3 and all(line.startswith("::") for line in lines)
    assert lines[0].startswith("::error file=dir%2Cwith%3Aodd/cnn 1.onnx,title=lipcheck%3A ")
    assert lines[0].endswith("::dir,with:odd/cnn 1.onnx: multi%0Aline 100%25 message")
    assert lines[2] == "::error file=x.onnx,title=lipcheck%3A Model could not be analysed::x.onnx: bad%0D%0Afile"


def test_sarif_for_every_kind_of_run_is_valid(cnn: Any, cnn_dict: dict[str, Any]) -> None:
    runs = [
        ModelRun("a b/cnn.onnx", cnn, evaluate(cnn_dict, GateOptions(fail_above=0.45, layer_fail_above=2))),
        ModelRun("ok.onnx", cnn, evaluate(cnn_dict, GateOptions(fail_above=10))),
        ModelRun("plain.onnx", cnn, evaluate(cnn_dict, GateOptions())),
        ModelRun("/abs/missing.onnx", error="no such file"),
    ]
    log = sarif_log(runs)
    validate_sarif(log)
    results = log["runs"][0]["results"]
    assert [r["ruleId"] for r in results] == ["bound-above-limit", "layer-bound-above-limit", "model-error"]
    assert results[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "a%20b/cnn.onnx"
    assert results[1]["locations"][0]["logicalLocations"] == [{"name": "/0/Conv", "kind": "member"}]
    assert results[2]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "file:///abs/missing.onnx"
    assert len({r["partialFingerprints"]["lipcheckFinding/v1"] for r in results}) == 3
    assert validate_sarif(sarif_log([])) is None and artifact_uri("m/x.onnx") == "m/x.onnx"


def test_markdown_escapes_cells_and_summarises_several_models(cnn: Any, cnn_dict: dict[str, Any]) -> None:
    assert text("max |f'| = 1 <b> -> x_y") == "max \\|f'\\| = 1 \\<b> -> x\\_y"
    assert code("a|b") == "`a\\|b`" and code("x`y") == "``x`y``"
    runs = [
        ModelRun("a.onnx", cnn, evaluate(cnn_dict, GateOptions(fail_above=0.45))),
        ModelRun("b|c.onnx", cnn, evaluate(cnn_dict, GateOptions())),
        ModelRun("gone.onnx", error="gone.onnx: no such file"),
    ]
    out = render_markdown(runs)
    assert out.startswith("### ❗ lipcheck: 3 models: 1 failed the gate, 1 with errors\n")
    assert "| ❌ | `a.onnx` | 0.478692 | failed (1) |" in out
    assert "| ℹ️ | `b\\|c.onnx` | 0.478692 | no gate |" in out
    assert "| ❗ | `gone.onnx` | – | error: gone.onnx: no such file |" in out
    assert out.count("#### ") == 3


def test_json_documents_match_the_shipped_schemas(cnn: Any, cnn_dict: dict[str, Any]) -> None:
    from lipcheck.runner import report_document

    for name in ("cnn_bn.json", "resnet_small.json", "gated.json"):  # the report goldens of tests/test_cli.py
        validate_report(json.loads((GOLDEN / name).read_text()))
    document = report_document(ModelRun("cnn.onnx", cnn, gate_with_baseline(cnn_dict, grown_baseline(cnn_dict))))
    validate_report(document)
    assert "gate" not in report_document(ModelRun("cnn.onnx", cnn, evaluate(cnn_dict, GateOptions())))
    with pytest.raises(jsonschema.ValidationError):
        validate_report({**cnn_dict, "unexpected": 1})
    validate_check(
        {
            "schema": "lipcheck.check/1",
            "lipcheck_version": "0",
            "config": "pyproject.toml",
            "passed": False,
            "exit_code": 2,
            "models": [
                {"path": "cnn.onnx", "status": "pass", "error": None, "report": document},
                {"path": "x.onnx", "status": "error", "error": "no such file", "report": None},
            ],
        }
    )


def test_summary_lines_respect_no_color(cnn: Any, cnn_dict: dict[str, Any]) -> None:
    import io

    from rich.console import Console

    from lipcheck.render import summary_text

    line = summary_text(ModelRun("a.onnx", cnn, evaluate(cnn_dict, GateOptions(fail_above=0.45))), 8)
    assert line.plain == "FAIL   a.onnx    certified upper bound 0.478692; gate failed (1 failure)"
    colored, plain = io.StringIO(), io.StringIO()
    Console(file=colored, force_terminal=True, color_system="standard").print(line)
    Console(file=plain, force_terminal=True, color_system="standard", no_color=True).print(line)
    assert "\x1b[" in colored.getvalue() and "\x1b[3" not in plain.getvalue()


def test_shipped_ci_files() -> None:
    hooks = (ROOT / ".pre-commit-hooks.yaml").read_text()
    for needed in ("- id: lipcheck", "entry: lipcheck check", "language: python", "pass_filenames: false"):
        assert needed in hooks
    action = (ROOT / "action.yml").read_text()
    for needed in ("using: composite", "python-version:", "args:", "actions/setup-python@", "lipcheck check"):
        assert needed in action
    # inputs reach the scripts through env variables, never spliced into a script (script injection)
    for line in action.splitlines():
        if "${{" in line:
            assert re.fullmatch(r"\s+[\w-]+: \$\{\{ [\w.-]+ \}\}", line), line


@pytest.mark.parametrize(("limit", "code", "verdict"), [("10", 0, "pass"), ("0.1", 1, "fail"), (None, 2, "error")])
def test_action_step_writes_its_outputs(limit: str | None, code: int, verdict: str, tmp_path: Path) -> None:
    """The action's `lipcheck check` step, run as GitHub runs it: one run gives the annotations (stdout), the
    JSON results (--json-output) and the outputs bound, verdict and report in $GITHUB_OUTPUT."""
    yaml = pytest.importorskip("yaml")
    step = next(
        s for s in yaml.safe_load((ROOT / "action.yml").read_text())["runs"]["steps"] if s.get("id") == "lipcheck"
    )
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "lipcheck").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lipcheck "$@"\n')
    (bin_folder / "lipcheck").chmod(0o755)
    (bin_folder / "python").symlink_to(sys.executable)
    if limit is not None:
        config = f'fail_above = {limit}\n[[models]]\npath = "{(SAMPLES / "mlp.onnx").as_posix()}"\n'
        (tmp_path / "lipcheck.toml").write_text(config)
    env = {**os.environ, "PATH": f"{bin_folder}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    env |= {
        "LIPCHECK_ARGS": "",
        "LIPCHECK_FORMAT": "github",
        "LIPCHECK_SUMMARY": "false",
        "LIPCHECK_CACHE_KEY_INPUT": "",
    }
    env |= {"GITHUB_OUTPUT": str(tmp_path / "out.txt"), "RUNNER_TEMP": str(tmp_path)}
    result = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == code, result.stderr
    outputs = dict(line.split("=", 1) for line in (tmp_path / "out.txt").read_text().splitlines())
    assert outputs["verdict"] == verdict and set(outputs) == {"bound", "verdict", "report"}
    if limit is None:
        assert outputs["bound"] == outputs["report"] == ""
        return
    assert float(outputs["bound"]) == pytest.approx(0.701563, rel=1e-5)
    assert json.loads(Path(outputs["report"]).read_text())["models"][0]["status"] == verdict
    assert ("::error" in result.stdout) == (verdict == "fail")  # the annotations, from the same run
