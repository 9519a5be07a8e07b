"""The ``lipcheck`` command line. Data goes to stdout, diagnostics (and the gate's verdict) to stderr.

Exit codes: 0 ok, 1 a gate failed (bound above a limit, or grown against a baseline), 2 usage, config,
load or internal error.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

import lipcheck
from lipcheck.errors import LipcheckError
from lipcheck.files import write_new_file

app = typer.Typer(
    name="lipcheck",
    help="Certified upper bounds on the l2 Lipschitz constant of neural networks (ONNX).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    github = "github"
    sarif = "sarif"


CHECK_SCHEMA = "lipcheck.check/1"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Method(str, Enum):
    """Which certified bound to compute (lipcheck.refine); the report keeps the smallest one computed."""

    best = "best"
    product = "product"
    folded = "folded"
    combettes_pesquet = "combettes-pesquet"
    eclipse_fast = "eclipse-fast"
    lipsdp = "lipsdp"
    all = "all"


METHOD_HELP = (
    "best (default): the smallest of product, folded, combettes-pesquet and eclipse-fast, chain by chain; "
    "product: per-layer AutoLip only; folded: consecutive linear ops composed into one matrix; "
    "combettes-pesquet / eclipse-fast: bounds on chains of linear layers and slope-restricted activations; "
    "lipsdp: LipSDP-neuron on small chains (pip install 'lipcheck[sdp]'); all: best plus lipsdp."
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lipcheck {lipcheck.__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Certified upper bounds on the l2 Lipschitz constant of neural networks."""


def stdout_console(no_color: bool, **options) -> Console:
    """Rich console for data on stdout: piped output is plain and 160 columns wide (not Rich's 80),
    unless COLUMNS says otherwise."""
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(no_color=no_color or None, highlight=False, width=160 if wide else None, **options)


def parse_assumptions(items: list[str]) -> dict[str, float]:
    result: dict[str, float] = {}
    for item in items:
        op, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or not op or not (number >= 0) or number == float("inf"):
            raise LipcheckError(f"--assume {item!r}: expected OP=VALUE with a finite VALUE >= 0, e.g. Einsum=1.5")
        result[op] = number
    return result


INPUT_SHAPE_HELP = (
    "Fix an input's shape, e.g. 1,3,224,224 or input=1,3,224,224 (repeat for several inputs). "
    "Without it, the batch axis is 1 and unknown spatial sizes get size-independent bounds."
)
ASSUME_HELP = (
    "Lipschitz constant for an op lipcheck has no rule for, e.g. Einsum=1.5. "
    "The report then says it rests on this assumption."
)
FORMAT_HELP = (
    "table (for people), json (versioned schema), markdown (PR comments), github (workflow-command "
    "annotations) or sarif (2.1.0, for code scanning)."
)
SUMMARY_HELP = "Also append the Markdown report to $GITHUB_STEP_SUMMARY (when that is set, as in GitHub Actions)."


def _limit(value: float | None, flag: str) -> float | None:
    from lipcheck.gate import parse_limit

    return None if value is None else parse_limit(value, flag)


def _render(runs: list, output_format: OutputFormat) -> str:
    """Every format but the table, as text."""
    if output_format is OutputFormat.markdown:
        from lipcheck.formats.markdown import render_markdown

        return render_markdown(runs)
    if output_format is OutputFormat.github:
        from lipcheck.formats.github import render_github

        return render_github(runs)
    if output_format is OutputFormat.sarif:
        from lipcheck.formats.sarif import render_sarif

        return render_sarif(runs)
    raise AssertionError(output_format)


def _emit(text: str, output: Path | None, force: bool) -> None:
    """Data to --output (atomically) or stdout."""
    if output is not None:
        write_new_file(output, text, force)
        _note(f"wrote {output}")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def _note(line: str) -> None:
    """A diagnostic line on stderr."""
    sys.stderr.write(f"lipcheck: {line}\n")
    sys.stderr.flush()


def _gate_lines(run) -> None:
    """The gate's verdict on stderr: one line per failure and per warning."""
    if run.gate is None:
        return
    for failure in run.gate.failures:
        _note(f"gate failed: {run.path}: {failure.message}")
    for warning in run.gate.warnings:
        _note(f"warning: {run.path}: {warning.message}")


def _github_summary(runs: list) -> None:
    from lipcheck.files import append_text
    from lipcheck.formats.markdown import render_markdown

    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        _note("--github-summary: GITHUB_STEP_SUMMARY is not set (not in GitHub Actions?); no summary written")
        return
    append_text(Path(target), render_markdown(runs) + "\n")


@app.command()
def report(
    model: Annotated[
        Path, typer.Argument(metavar="MODEL", help="Model file: .onnx (external data is read from its folder).")
    ],
    output_format: Annotated[OutputFormat, typer.Option("--format", "-f", help=FORMAT_HELP)] = OutputFormat.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the report to this file instead of stdout.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Allow --output and --save-baseline to replace an existing file.")
    ] = False,
    input_shape: Annotated[
        list[str], typer.Option("--input-shape", "-s", metavar="SHAPE", help=INPUT_SHAPE_HELP)
    ] = [],  # noqa: B006  (typer needs a literal default)
    assume: Annotated[list[str], typer.Option("--assume", metavar="OP=VALUE", help=ASSUME_HELP)] = [],  # noqa: B006
    device: Annotated[Device, typer.Option(help="Where to compute: auto uses CUDA when available.")] = Device.auto,
    method: Annotated[Method, typer.Option("--method", "-m", help=METHOD_HELP)] = Method.best,
    fail_above: Annotated[
        float | None,
        typer.Option("--fail-above", metavar="X", help="Gate: exit 1 when the network's upper bound is above X "
                     "(or the network is not globally Lipschitz, unless --allow-unbounded)."),
    ] = None,
    layer_fail_above: Annotated[
        float | None,
        typer.Option("--layer-fail-above", metavar="X", help="Gate: exit 1 when any layer's local bound is above X."),
    ] = None,
    allow_unbounded: Annotated[
        bool, typer.Option("--allow-unbounded", help="Gate: a network that is not globally Lipschitz only warns.")
    ] = False,
    baseline: Annotated[
        Path | None,
        typer.Option("--baseline", metavar="FILE", help="Gate: compare with this saved JSON report "
                     "(fails when the network's or a layer's bound grew by more than --max-increase)."),
    ] = None,
    max_increase: Annotated[
        str | None,
        typer.Option("--max-increase", metavar="PCT", help="Allowed growth against --baseline: 5% or 0.05 "
                     "(default 0: any growth beyond rounding fails)."),
    ] = None,
    save_baseline: Annotated[
        Path | None,
        typer.Option("--save-baseline", metavar="FILE", help="Also write the JSON report to FILE, for a later "
                     "--baseline (refuses to replace a file without --force)."),
    ] = None,
    exit_zero: Annotated[
        bool, typer.Option("--exit-zero", help="Report gate failures but exit 0 (errors still exit 2).")
    ] = False,
    github_summary: Annotated[bool, typer.Option("--github-summary", help=SUMMARY_HELP)] = False,
    no_color: Annotated[bool, typer.Option("--no-color", help="Plain output (also: NO_COLOR set).")] = False,
) -> None:
    """Compute each layer's certified Lipschitz bound and the network's certified upper bound.

    With --fail-above, --layer-fail-above or --baseline it is also a gate: exit 1 when the gate fails.
    """
    from lipcheck.config import Settings
    from lipcheck.files import check_writable
    from lipcheck.gate import display_path, load_baseline, parse_increase
    from lipcheck.runner import analyse_and_gate, json_text, report_document

    assumptions = parse_assumptions(assume)
    settings = Settings(
        fail_above=_limit(fail_above, "--fail-above"),
        layer_fail_above=_limit(layer_fail_above, "--layer-fail-above"),
        allow_unbounded=allow_unbounded,
        max_increase=None if max_increase is None else parse_increase(max_increase),
        input_shape=tuple(input_shape),
        assume=assumptions,
        device=device.value,
        method=method.value,
    )
    if max_increase is not None and baseline is None:
        raise LipcheckError("--max-increase needs --baseline FILE (the report to compare with)")
    for target in (output, save_baseline):
        if target is not None:
            check_writable(target, force)
    if output is not None and save_baseline is not None and output.absolute() == save_baseline.absolute():
        raise LipcheckError("--output and --save-baseline name the same file")
    loaded = load_baseline(baseline) if baseline is not None else None
    if method in (Method.lipsdp, Method.all):
        from lipcheck.refine.lipsdp import available

        if not available():
            _note("--method lipsdp: cvxpy is not installed (pip install 'lipcheck[sdp]'); LipSDP is skipped")
    run = analyse_and_gate(model, settings, loaded, display_path(model))
    result = run.report
    assert result is not None and run.gate is not None

    if output_format is OutputFormat.table:
        if output is not None:
            from lipcheck.render import report_as_text

            _emit(report_as_text(result), output, force)
        else:
            from lipcheck.render import print_report

            print_report(result, stdout_console(no_color))
    elif output_format is OutputFormat.json:
        _emit(json_text(report_document(run)), output, force)
    else:
        _emit(_render([run], output_format), output, force)
    if save_baseline is not None:
        write_new_file(save_baseline, json_text(result.to_dict()), force)
        _note(f"wrote baseline {save_baseline}")
    if github_summary:
        _github_summary([run])
    if not run.gate.options.active:
        return
    _gate_lines(run)
    if run.gate.passed:
        _note(f"gate passed: {run.path}")
    elif exit_zero:
        _note(f"--exit-zero: exiting 0 despite {len(run.gate.failures)} gate failure(s)")
    else:
        raise typer.Exit(1)


@app.command()
def check(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", metavar="FILE", help="Config file (default: the nearest lipcheck.toml, or "
                     "pyproject.toml with [tool.lipcheck], from the working folder upward)."),
    ] = None,
    output_format: Annotated[OutputFormat, typer.Option("--format", "-f", help=FORMAT_HELP)] = OutputFormat.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the results to this file instead of stdout.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Allow --output to replace an existing file.")] = False,
    fail_above: Annotated[
        float | None, typer.Option("--fail-above", metavar="X", help="Override every model's fail_above.")
    ] = None,
    layer_fail_above: Annotated[
        float | None, typer.Option("--layer-fail-above", metavar="X", help="Override every model's layer_fail_above.")
    ] = None,
    allow_unbounded: Annotated[
        bool | None,
        typer.Option("--allow-unbounded/--no-allow-unbounded", help="Override every model's allow_unbounded."),
    ] = None,
    max_increase: Annotated[
        str | None, typer.Option("--max-increase", metavar="PCT", help="Override every model's max_increase.")
    ] = None,
    input_shape: Annotated[
        list[str], typer.Option("--input-shape", "-s", metavar="SHAPE", help="Override every model's input_shape.")
    ] = [],  # noqa: B006
    assume: Annotated[
        list[str], typer.Option("--assume", metavar="OP=VALUE", help="Add to every model's assume table.")
    ] = [],  # noqa: B006
    device: Annotated[Device | None, typer.Option(help="Override every model's device.")] = None,
    exit_zero: Annotated[
        bool | None, typer.Option("--exit-zero/--no-exit-zero", help="Report gate failures but exit 0.")
    ] = None,
    method: Annotated[
        Method | None, typer.Option("--method", "-m", help="Override every model's method. " + METHOD_HELP)
    ] = None,
    update_baselines: Annotated[
        bool, typer.Option("--update-baselines", help="Write each model's report to its configured baseline file "
                           "(replacing it) instead of comparing with it.")
    ] = False,
    github_summary: Annotated[bool, typer.Option("--github-summary", help=SUMMARY_HELP)] = False,
    no_color: Annotated[bool, typer.Option("--no-color", help="Plain output (also: NO_COLOR set).")] = False,
) -> None:
    """Run every model configured in [tool.lipcheck] (pyproject.toml) or lipcheck.toml through its gate.

    One summary line per model; exit 0 when every gate passed, 1 when one failed, 2 when a model could
    not be analysed.
    """
    from lipcheck.config import Overrides, load_config
    from lipcheck.files import check_writable
    from lipcheck.gate import display_path, parse_increase

    overrides = Overrides(
        fail_above=_limit(fail_above, "--fail-above"),
        layer_fail_above=_limit(layer_fail_above, "--layer-fail-above"),
        allow_unbounded=allow_unbounded,
        max_increase=None if max_increase is None else parse_increase(max_increase),
        input_shape=tuple(input_shape),
        assume=parse_assumptions(assume),
        device=None if device is None else device.value,
        exit_zero=exit_zero,
        method=None if method is None else method.value,
    )
    cfg = load_config(config, overrides=overrides)
    if output is not None:
        check_writable(output, force)
    from lipcheck.render import summary_as_text, summary_text  # imports torch: after the config is known good
    from lipcheck.runner import json_text, report_document, run_model
    cwd = Path.cwd()
    width = max(len(display_path(model.path, cwd)) for model in cfg.models)
    stdout = stdout_console(no_color, soft_wrap=True)
    stderr = Console(stderr=True, no_color=no_color or None, highlight=False, soft_wrap=True)
    table_to_stdout = output_format is OutputFormat.table and output is None
    runs = []
    for model in cfg.models:
        run = run_model(model, cwd, update_baseline=update_baselines)
        runs.append(run)
        (stdout if table_to_stdout else stderr).print(summary_text(run, width))
        _gate_lines(run)
        if update_baselines and run.error is None:
            if model.baseline is None:
                _note(f"{run.path}: no baseline configured; nothing written")
            else:
                _note(f"wrote baseline {display_path(model.baseline, cwd)}")
    failed = sum(run.status == "fail" for run in runs)
    errors = sum(run.status == "error" for run in runs)
    code = 2 if errors else 1 if failed and not cfg.exit_zero else 0
    if output_format is OutputFormat.table:
        if output is not None:
            _emit(summary_as_text(runs), output, force)
    elif output_format is OutputFormat.json:
        document = {
            "schema": CHECK_SCHEMA,
            "lipcheck_version": lipcheck.__version__,
            "config": display_path(cfg.source, cwd),
            "passed": not failed and not errors,
            "exit_code": code,
            "models": [
                {"path": run.path, "status": run.status, "error": run.error,
                 "report": None if run.report is None else report_document(run)}
                for run in runs
            ],
        }
        _emit(json_text(document), output, force)
    else:
        _emit(_render(runs, output_format), output, force)
    if github_summary:
        _github_summary(runs)
    _note(f"{len(runs)} model{'s' if len(runs) != 1 else ''} from {display_path(cfg.source, cwd)}: "
          f"{sum(run.status in ('pass', 'ok') for run in runs)} passed, {failed} failed the gate, {errors} with errors"
          + (" (--exit-zero: gate failures do not fail the run)" if failed and cfg.exit_zero else ""))
    if code:
        raise typer.Exit(code)

@app.command("rules")
def list_rules() -> None:
    """List the ops lipcheck has a rule for, with how each is bounded."""
    from rich.table import Table

    from lipcheck.rules import registered_rules

    table = Table(show_edge=False, pad_edge=False)
    table.add_column("op")
    table.add_column("bound")
    for registered in registered_rules():
        table.add_row(registered.op, registered.summary)
    Console(highlight=False).print(table)


def main() -> None:
    """Entry point: one line on stderr and exit code 2 for every error a user can cause."""
    try:
        app()
    except LipcheckError as exc:
        sys.stderr.write(f"lipcheck: error: {exc}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("lipcheck: interrupted\n")
        sys.exit(2)
    except Exception as exc:
        if os.environ.get("LIPCHECK_DEBUG"):
            raise
        sys.stderr.write(
            f"lipcheck: internal error: {type(exc).__name__}: {exc} (set LIPCHECK_DEBUG=1 for a traceback)\n"
        )
        sys.exit(2)
