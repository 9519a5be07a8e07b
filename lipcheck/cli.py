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
    help="Certified upper bounds on the l2 Lipschitz constant of neural networks (ONNX and PyTorch).",
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


def parse_model_kwargs(text: str | None) -> dict:
    from lipcheck.frontends.torch_frontend import parse_model_kwargs as parse

    return parse(text)


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
MODEL_HELP = (
    "For a PyTorch state_dict (a file without architecture): import path of a function or class that builds "
    "the nn.Module, like uvicorn's, e.g. mypkg.nets:resnet18 (modules under the working folder are importable). "
    "The weights are loaded into it strictly. Needs --input-shape."
)
TRUST_HELP = (
    "Allow PyTorch pickles that need more than tensors (e.g. a whole pickled nn.Module). Unpickling runs code "
    "from the file: use only for files you trust."
)
LOWER_HELP = (
    "Also search for a lower bound: the largest Jacobian norm found (power iteration through JVP/VJP, "
    "gradient ascent on the input from several starts). It is a true lower bound of the Lipschitz constant; "
    "the report shows the bracket [lower, upper] and upper/lower."
)
LOWER_BUDGET_HELP = (
    "Lower-bound search budget in Jacobian-vector products (JVP, VJP or gradient; default 1000, about a second "
    "on small models). Implies --lower."
)
INPUTS_HELP = (
    "Start the lower-bound search from these inputs too: a .npy array of the input's shape or a batch [N, ...] "
    "of them (an .npz with one array per input name for several inputs). Implies --lower."
)
INPUT_RANGE_HELP = (
    "The input domain is the box [LO, HI] in every entry (e.g. 0,1 for images): the lower-bound search stays "
    "in it, so the lower bound holds for the constant on that domain. Implies --lower."
)
SEED_HELP = "Seed of the lower-bound search's random starts and directions (same seed, same result)."
MAX_MEMORY_HELP = (
    "Memory budget, e.g. 2GiB or 800MB. Weights that do not fit are read from the model file a layer at a "
    "time (ONNX external data is read tensor by tensor). Default: weights up to 1 GiB stay loaded."
)
CACHE_HELP = (
    "Folder of per-layer results, reused by later runs: layers whose weights, attributes and input shape "
    "are unchanged are not recomputed (for CI; keyed also by lipcheck's version and code, and the device)."
)
SUMMARY_HELP = "Also append the Markdown report to $GITHUB_STEP_SUMMARY (when that is set, as in GitHub Actions)."


def _limit(value: float | None, flag: str) -> float | None:
    from lipcheck.gate import parse_limit

    return None if value is None else parse_limit(value, flag)


def _memory(value: str | None) -> int | None:
    from lipcheck.memory import parse_memory_size

    return None if value is None else parse_memory_size(value)


def _progress(output_format: OutputFormat, no_color: bool, label: str = "bounding"):
    """The stderr progress bar, or None when it is not wanted (JSON output, stderr not a terminal)."""
    from lipcheck.progress import LayerProgress, progress_wanted

    if not progress_wanted(output_format is OutputFormat.json):
        return None
    return LayerProgress(label, no_color=no_color or bool(os.environ.get("NO_COLOR")))


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
        Path,
        typer.Argument(
            metavar="MODEL",
            help="Model file: .onnx (external data is read from its folder), a PyTorch "
            "file (state_dict or checkpoint .pt/.pth/.ckpt, TorchScript, torch.export .pt2, pickled module) "
            "or .safetensors.",
        ),
    ],
    output_format: Annotated[OutputFormat, typer.Option("--format", "-f", help=FORMAT_HELP)] = OutputFormat.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the report to this file instead of stdout.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Allow --output and --save-baseline to replace an existing file.")
    ] = False,
    input_shape: Annotated[list[str], typer.Option("--input-shape", "-s", metavar="SHAPE", help=INPUT_SHAPE_HELP)] = [],  # noqa: B006  (typer needs a literal default)
    assume: Annotated[list[str], typer.Option("--assume", metavar="OP=VALUE", help=ASSUME_HELP)] = [],  # noqa: B006
    device: Annotated[Device, typer.Option(help="Where to compute: auto uses CUDA when available.")] = Device.auto,
    method: Annotated[Method, typer.Option("--method", "-m", help=METHOD_HELP)] = Method.best,
    fail_above: Annotated[
        float | None,
        typer.Option(
            "--fail-above",
            metavar="X",
            help="Gate: exit 1 when the network's upper bound is above X "
            "(or the network is not globally Lipschitz, unless --allow-unbounded).",
        ),
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
        typer.Option(
            "--baseline",
            metavar="FILE",
            help="Gate: compare with this saved JSON report "
            "(fails when the network's or a layer's bound grew by more than --max-increase).",
        ),
    ] = None,
    max_increase: Annotated[
        str | None,
        typer.Option(
            "--max-increase",
            metavar="PCT",
            help="Allowed growth against --baseline: 5% or 0.05 (default 0: any growth beyond rounding fails).",
        ),
    ] = None,
    save_baseline: Annotated[
        Path | None,
        typer.Option(
            "--save-baseline",
            metavar="FILE",
            help="Also write the JSON report to FILE, for a later "
            "--baseline (refuses to replace a file without --force).",
        ),
    ] = None,
    exit_zero: Annotated[
        bool, typer.Option("--exit-zero", help="Report gate failures but exit 0 (errors still exit 2).")
    ] = False,
    github_summary: Annotated[bool, typer.Option("--github-summary", help=SUMMARY_HELP)] = False,
    no_color: Annotated[bool, typer.Option("--no-color", help="Plain output (also: NO_COLOR set).")] = False,
    model_factory: Annotated[
        str | None,
        typer.Option("--model", metavar="PKG.MODULE:FACTORY", help=MODEL_HELP),
    ] = None,
    model_kwargs: Annotated[
        str | None,
        typer.Option(
            "--model-kwargs",
            metavar="JSON",
            help="Keyword arguments for --model's factory, as a JSON object, e.g. '{\"num_classes\": 10}'.",
        ),
    ] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help=TRUST_HELP)] = False,
    lower: Annotated[bool, typer.Option("--lower", help=LOWER_HELP)] = False,
    lower_budget: Annotated[int | None, typer.Option("--lower-budget", metavar="N", help=LOWER_BUDGET_HELP)] = None,
    inputs: Annotated[Path | None, typer.Option("--inputs", metavar="FILE", help=INPUTS_HELP)] = None,
    input_range: Annotated[str | None, typer.Option("--input-range", metavar="LO,HI", help=INPUT_RANGE_HELP)] = None,
    seed: Annotated[int, typer.Option("--seed", help=SEED_HELP)] = 0,
    max_memory: Annotated[str | None, typer.Option("--max-memory", metavar="SIZE", help=MAX_MEMORY_HELP)] = None,
    cache: Annotated[Path | None, typer.Option("--cache", metavar="DIR", help=CACHE_HELP)] = None,
) -> None:
    """Compute each layer's certified Lipschitz bound and the network's certified upper bound.

    With --fail-above, --layer-fail-above or --baseline it is also a gate: exit 1 when the gate fails.
    With --lower, also an empirical lower bound (the bracket [lower, upper]).
    """
    from lipcheck.config import Settings
    from lipcheck.files import check_writable
    from lipcheck.gate import display_path, load_baseline, parse_increase
    from lipcheck.runner import analyse_and_gate, json_text, report_document

    assumptions = parse_assumptions(assume)
    lower_settings = _lower_settings(lower, lower_budget, inputs, input_range, seed)
    settings = Settings(
        fail_above=_limit(fail_above, "--fail-above"),
        layer_fail_above=_limit(layer_fail_above, "--layer-fail-above"),
        allow_unbounded=allow_unbounded,
        max_increase=None if max_increase is None else parse_increase(max_increase),
        input_shape=tuple(input_shape),
        assume=assumptions,
        device=device.value,
        model=model_factory,
        model_kwargs=parse_model_kwargs(model_kwargs),
        trust_pickle=trust_pickle,
        lower=lower_settings,
        max_memory=_memory(max_memory),
        cache=cache,
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
    progress = _progress(output_format, no_color)
    try:
        run = analyse_and_gate(model, settings, loaded, display_path(model), progress)
    finally:
        if progress is not None:
            progress.close()
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


def _lower_settings(lower: bool, budget: int | None, inputs: Path | None, input_range: str | None, seed: int):
    """The lower-bound search's settings, or None when it is not asked for."""
    if not (lower or budget is not None or inputs is not None or input_range is not None):
        return None
    from lipcheck.lower import DEFAULT_BUDGET, LowerSettings, parse_input_range

    if budget is not None and budget < 1:
        raise LipcheckError(f"--lower-budget {budget}: must be at least 1")
    return LowerSettings(
        budget=DEFAULT_BUDGET if budget is None else budget,
        seed=seed,
        inputs=inputs,
        input_range=None if input_range is None else parse_input_range(input_range),
    )


@app.command()
def check(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            metavar="FILE",
            help="Config file (default: the nearest lipcheck.toml, or "
            "pyproject.toml with [tool.lipcheck], from the working folder upward).",
        ),
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
        bool,
        typer.Option(
            "--update-baselines",
            help="Write each model's report to its configured baseline file "
            "(replacing it) instead of comparing with it.",
        ),
    ] = False,
    github_summary: Annotated[bool, typer.Option("--github-summary", help=SUMMARY_HELP)] = False,
    no_color: Annotated[bool, typer.Option("--no-color", help="Plain output (also: NO_COLOR set).")] = False,
    max_memory: Annotated[
        str | None, typer.Option("--max-memory", metavar="SIZE", help="Override every model's max_memory.")
    ] = None,
    cache: Annotated[Path | None, typer.Option("--cache", metavar="DIR", help="Override every model's cache.")] = None,
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
        max_memory=_memory(max_memory),
        cache=None if cache is None else cache.absolute(),
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
        progress = _progress(output_format, no_color, label=display_path(model.path, cwd))
        try:
            run = run_model(model, cwd, update_baseline=update_baselines, progress=progress)
        finally:
            if progress is not None:
                progress.close()
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
                {
                    "path": run.path,
                    "status": run.status,
                    "error": run.error,
                    "report": None if run.report is None else report_document(run),
                }
                for run in runs
            ],
        }
        _emit(json_text(document), output, force)
    else:
        _emit(_render(runs, output_format), output, force)
    if github_summary:
        _github_summary(runs)
    _note(
        f"{len(runs)} model{'s' if len(runs) != 1 else ''} from {display_path(cfg.source, cwd)}: "
        f"{sum(run.status in ('pass', 'ok') for run in runs)} passed, {failed} failed the gate, {errors} with errors"
        + (" (--exit-zero: gate failures do not fail the run)" if failed and cfg.exit_zero else "")
    )
    if code:
        raise typer.Exit(code)


class ConvNorm(str, Enum):
    operator = "operator"
    exact = "exact"
    reshape = "reshape"


class NormalizeMode(str, Enum):
    bake = "bake"
    parametrize = "parametrize"


@app.command()
def normalize(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="The model to normalise (any format `report` reads).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write the normalised model (same format).")
    ] = None,
    mode: Annotated[
        NormalizeMode,
        typer.Option(
            help="bake: rescale the weights (any format). parametrize: register training-time "
            "spectral normalization on a PyTorch module and save it as a pickled module."
        ),
    ] = NormalizeMode.bake,
    target: Annotated[float, typer.Option(help="Each normalised layer's certified operator norm.")] = 1.0,
    clip: Annotated[bool, typer.Option("--clip", help="Only shrink layers above the target.")] = False,
    lipschitz: Annotated[
        float | None,
        typer.Option(
            "--lipschitz",
            metavar="K",
            help="Instead of --target: give every selected layer the same norm, "
            "the largest whose re-certified network bound is <= K.",
        ),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            metavar="PATTERN",
            help="Only layers whose name matches (fnmatch, comma-separated), e.g. 'layer1.*,fc'.",
        ),
    ] = None,
    fold_bn: Annotated[
        bool,
        typer.Option("--fold-bn", help="PyTorch: fold a BatchNorm after a layer into it first (ONNX always does)."),
    ] = False,
    conv_norm: Annotated[
        ConvNorm,
        typer.Option(
            "--conv-norm",
            help="--mode parametrize: normalise convs by their operator norm at the "
            "layer's input size as lipcheck certifies it (operator), the exact zero-padded operator "
            "(exact), or the reshaped kernel as torch's spectral_norm does (reshape).",
        ),
    ] = ConvNorm.operator,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would change; write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Allow -o to replace an existing file.")] = False,
    input_shape: Annotated[list[str], typer.Option("--input-shape", "-s", metavar="SHAPE", help=INPUT_SHAPE_HELP)] = [],  # noqa: B006
    model_factory: Annotated[str | None, typer.Option("--model", metavar="PKG.MODULE:FACTORY", help=MODEL_HELP)] = None,
    model_kwargs: Annotated[
        str | None, typer.Option("--model-kwargs", metavar="JSON", help="Keyword arguments for --model's factory.")
    ] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help=TRUST_HELP)] = False,
    device: Annotated[Device, typer.Option(help="Where to compute: auto uses CUDA when available.")] = Device.auto,
    output_format: Annotated[
        str, typer.Option("--format", "-f", help="table (for people) or json (lipcheck.normalize/1).")
    ] = "table",
    no_color: Annotated[bool, typer.Option("--no-color", help="Plain output (also: NO_COLOR set).")] = False,
) -> None:
    """Rewrite a model with spectral normalization and prove the result.

    Every Conv, ConvTranspose and Linear/Gemm/MatMul layer is rescaled so that its certified operator norm
    equals --target; the output (same format as the input) is then re-loaded, re-certified and run
    against the original. Exit 1 when a check fails. The input is never modified.
    """
    from lipcheck.frontends.torch_frontend import TorchOptions
    from lipcheck.report import resolve_device
    from lipcheck.rewrite.normalize import NormalizeOptions
    from lipcheck.rewrite.normalize import normalize as run_normalize

    if mode is NormalizeMode.parametrize and (lipschitz is not None or clip or fold_bn):
        raise LipcheckError("--lipschitz, --clip and --fold-bn are for --mode bake")
    if output_format not in ("table", "json"):
        raise LipcheckError(f"--format {output_format!r}: expected table or json")
    if output is None and not dry_run:
        raise LipcheckError("normalize needs -o OUTPUT (or --dry-run to only show the plan)")
    options = NormalizeOptions(
        target=target,
        clip=clip,
        lipschitz=lipschitz,
        layers=layers,
        fold_bn=fold_bn,
        input_shapes=tuple(input_shape),
        torch_options=TorchOptions(model_factory, parse_model_kwargs(model_kwargs), trust_pickle),
        device=str(resolve_device(device.value)),
    )
    if mode is NormalizeMode.parametrize:
        from lipcheck.rewrite.normalize import parametrize_file

        result = parametrize_file(model, None if dry_run else output, options, conv_norm.value, force=force)
    else:
        result = run_normalize(model, None if dry_run else output, options, force=force)
    if output_format == "json":
        from lipcheck.rewrite.report import normalize_document
        from lipcheck.runner import json_text

        sys.stdout.write(json_text(normalize_document(result, dry_run)))
    else:
        from lipcheck.render import print_normalize

        print_normalize(result, stdout_console(no_color), dry_run)
    for path in result.written:
        _note(f"wrote {path}")
    failed = [check for check in result.checks if not check.passed]
    for check in failed:
        _note(f"check failed: {check.name}: {check.detail}")
    if failed:
        raise typer.Exit(1)


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
