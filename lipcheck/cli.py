"""The ``lipcheck`` command line. Data goes to stdout, diagnostics (and the gate's verdict) to stderr.

Exit codes: 0 ok, 1 a gate failed (bound above a limit, or grown against a baseline), 2 usage, config,
load or internal error. The analysis options of every command are the fields of
``lipcheck.options.Settings`` (``with_settings`` turns them into Typer options); the options below are
those of the output.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import Field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

import lipcheck
from lipcheck.errors import LipcheckError, one_line
from lipcheck.files import write_new_file
from lipcheck.formats import Format
from lipcheck.options import Overrides, Settings, from_flags, option_of, settings_fields

app = typer.Typer(
    name="lipcheck",
    help="Certified upper bounds on the l2 Lipschitz constant of neural networks (ONNX and PyTorch).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

CHECK_SCHEMA = "lipcheck.check/1"
FORMAT_HELP = (
    "table (for people), json (versioned schema), markdown (PR comments), github (workflow-command "
    "annotations) or sarif (2.1.0, for code scanning)."
)
SUMMARY_HELP = "Also append the Markdown report to $GITHUB_STEP_SUMMARY (when that is set, as in GitHub Actions)."

# the output options, shared by the commands
FormatOption = Annotated[Format, typer.Option("--format", "-f", help=FORMAT_HELP)]
NoColor = Annotated[bool, typer.Option("--no-color", help="Plain output (also: NO_COLOR set).")]
GithubSummary = Annotated[bool, typer.Option("--github-summary", help=SUMMARY_HELP)]


ReportOutput = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write the report to this file instead of stdout.")
]
CheckOutput = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write the results to this file instead of stdout.")
]
ModelOutput = Annotated[
    Path | None, typer.Option("--output", "-o", help="Where to write the normalised model (same format).")
]
ReportForce = Annotated[
    bool, typer.Option("--force", help="Allow --output and --save-baseline to replace an existing file.")
]
CheckForce = Annotated[
    bool, typer.Option("--force", help="Allow --output and --json-output to replace an existing file.")
]
CheckJsonOutput = Annotated[
    Path | None,
    typer.Option(
        "--json-output",
        metavar="FILE",
        help="Also write the results as JSON (schema lipcheck.check/1) to FILE, whatever --format prints "
        "(one run gives GitHub annotations and the data for the job's outputs).",
    ),
]
ModelForce = Annotated[bool, typer.Option("--force", help="Allow -o to replace an existing file.")]


# ---------------------------------------------------------------------------------------------
# Settings fields as Typer options


def _parameter(item: Field, command: str) -> inspect.Parameter:
    """The Typer parameter of a Settings field: a plain flag, or in ``check`` an override of every model's value."""
    spec = option_of(item)
    override = command == "check"
    names = [spec.flag, *([spec.short] if spec.short else [])]
    kind: Any = spec.cli_type
    default: Any = None
    if kind is bool:
        if override:
            names[0] = f"{spec.flag}/--no-{spec.flag[2:]}"
            kind = bool | None
        else:
            default = False
    elif kind == list[str]:
        default = []
    elif isinstance(kind, type) and issubclass(kind, Enum) and not override:
        default = item.default
    else:
        kind = kind | None
    help_text = (spec.override_help if override else None) or spec.help
    info = typer.Option(*names, metavar=spec.metavar, help=help_text)
    return inspect.Parameter(
        item.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info]
    )


def with_settings(command: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Add the Settings fields that ``command`` has to a command's options; it receives them as ``settings``.

    For ``check`` they are overrides (``lipcheck.options.Overrides``) of every configured model's values.
    """

    def decorate(function: Callable[..., None]) -> Callable[..., None]:
        hints = typing.get_type_hints(function, include_extras=True)
        own = [
            p.replace(annotation=hints[p.name])
            for p in inspect.signature(function).parameters.values()
            if p.name != "settings"
        ]
        added = [_parameter(item, command) for item in settings_fields(command)]

        @functools.wraps(function)
        def run(**values: Any) -> None:
            given = {p.name: values.pop(p.name) for p in added}
            parsed = from_flags(given, command, keep_false=command == "check")
            settings = Overrides(**parsed) if command == "check" else Settings().with_values(parsed)
            function(**values, settings=settings)

        run.__signature__ = inspect.Signature([*own, *added])  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in [*own, *added]}
        return run

    return decorate


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


# ---------------------------------------------------------------------------------------------
# Output


def stdout_console(no_color: bool, **options: Any) -> Console:
    """Rich console for data on stdout: piped output is plain and 160 columns wide (not Rich's 80),
    unless COLUMNS says otherwise."""
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(no_color=no_color or None, highlight=False, width=160 if wide else None, **options)


def _progress(output_format: Format, no_color: bool, label: str = "bounding") -> Any:
    """Progress on stderr: the bar on a terminal (not for JSON output), plain lines now and then elsewhere."""
    from lipcheck.progress import LayerProgress, PlainProgress, is_terminal, progress_wanted

    if not is_terminal(sys.stderr):
        return PlainProgress(label)
    if not progress_wanted(output_format is Format.json):
        return None
    return LayerProgress(label, no_color=no_color or bool(os.environ.get("NO_COLOR")))


def _render(runs: list, output_format: Format) -> str:
    """Every format but the table, as text."""
    if output_format is Format.markdown:
        from lipcheck.formats.markdown import render_markdown

        return render_markdown(runs)
    if output_format is Format.github:
        from lipcheck.formats.github import render_github

        return render_github(runs)
    if output_format is Format.sarif:
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


def _gate_lines(run: Any) -> None:
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


# ---------------------------------------------------------------------------------------------
# lipcheck report

MODEL_HELP = (
    "Model file: .onnx (external data is read from its folder), a PyTorch file (state_dict or checkpoint "
    ".pt/.pth/.ckpt, TorchScript, torch.export .pt2, pickled module) or .safetensors."
)


@app.command()
@with_settings("report")
def report(
    model_file: Annotated[Path, typer.Argument(metavar="MODEL", help=MODEL_HELP)],
    output_format: FormatOption = Format.table,
    output: ReportOutput = None,
    force: ReportForce = False,
    save_baseline: Annotated[
        Path | None,
        typer.Option(
            "--save-baseline",
            metavar="FILE",
            help="Also write the JSON report to FILE, for a later --baseline (refuses to replace a file "
            "without --force).",
        ),
    ] = None,
    github_summary: GithubSummary = False,
    no_color: NoColor = False,
    *,
    settings: Settings,
) -> None:
    """Compute each layer's certified Lipschitz bound and the network's certified upper bound.

    With --fail-above, --layer-fail-above or --baseline it is also a gate: exit 1 when the gate fails.
    With --lower, also an empirical lower bound (the bracket [lower, upper]).
    """
    from lipcheck.files import check_writable
    from lipcheck.gate import display_path, load_baseline
    from lipcheck.runner import analyse_and_gate, json_text

    if settings.max_increase is not None and settings.baseline is None:
        raise LipcheckError("--max-increase needs --baseline FILE (the report to compare with)")
    for target in (output, save_baseline):
        if target is not None:
            check_writable(target, force)
    if output is not None and save_baseline is not None and output.absolute() == save_baseline.absolute():
        raise LipcheckError("--output and --save-baseline name the same file")
    loaded = load_baseline(settings.baseline) if settings.baseline is not None else None
    _note_missing_solver(settings)
    progress = _progress(output_format, no_color, label=f"bounding {display_path(model_file)}")
    try:
        run = analyse_and_gate(model_file, settings, loaded, display_path(model_file), progress)
    finally:
        if progress is not None:
            progress.close()
    _write_report(run, output_format, output, force, no_color)
    if save_baseline is not None:
        assert run.report is not None
        write_new_file(save_baseline, json_text(run.report.to_dict()), force)
        _note(f"wrote baseline {save_baseline}")
    if github_summary:
        _github_summary([run])
    _exit_for_gate(run, settings.exit_zero)


def _note_missing_solver(settings: Settings) -> None:
    if settings.method in ("lipsdp", "all"):
        from lipcheck.refine.lipsdp import available

        if not available():
            _note("--method lipsdp: cvxpy is not installed (pip install 'lipcheck[sdp]'); LipSDP is skipped")


def _write_report(run: Any, output_format: Format, output: Path | None, force: bool, no_color: bool) -> None:
    from lipcheck.runner import json_text, report_document

    if output_format is Format.table and output is not None:
        from lipcheck.render import report_as_text

        _emit(report_as_text(run.report), output, force)
    elif output_format is Format.table:
        from lipcheck.render import print_report

        print_report(run.report, stdout_console(no_color))
    elif output_format is Format.json:
        _emit(json_text(report_document(run)), output, force)
    else:
        _emit(_render([run], output_format), output, force)


def _exit_for_gate(run: Any, exit_zero: bool) -> None:
    if run.gate is None or not run.gate.options.active:
        return
    _gate_lines(run)
    if run.gate.passed:
        _note(f"gate passed: {run.path}")
    elif exit_zero:
        _note(f"--exit-zero: exiting 0 despite {len(run.gate.failures)} gate failure(s)")
    else:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------
# lipcheck check


@app.command()
@with_settings("check")
def check(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            metavar="FILE",
            help="Config file (default: the nearest lipcheck.toml, or pyproject.toml with [tool.lipcheck], "
            "from the working folder upward).",
        ),
    ] = None,
    output_format: FormatOption = Format.table,
    output: CheckOutput = None,
    json_output: CheckJsonOutput = None,
    force: CheckForce = False,
    update_baselines: Annotated[
        bool,
        typer.Option(
            "--update-baselines",
            help="Write each model's report to its configured baseline file (replacing it) instead of "
            "comparing with it.",
        ),
    ] = False,
    github_summary: GithubSummary = False,
    no_color: NoColor = False,
    *,
    settings: Overrides,
) -> None:
    """Run every model configured in [tool.lipcheck] (pyproject.toml) or lipcheck.toml through its gate.

    One summary line per model; exit 0 when every gate passed, 1 when one failed, 2 when a model could
    not be analysed.
    """
    from lipcheck.config import load_config
    from lipcheck.files import check_writable

    cfg = load_config(config, overrides=settings)
    for target in (output, json_output):
        if target is not None:
            check_writable(target, force)
    if output is not None and json_output is not None and output.absolute() == json_output.absolute():
        raise LipcheckError("--output and --json-output name the same file")
    runs = _run_models(cfg, output_format, output, no_color, update_baselines)
    failed = sum(run.status == "fail" for run in runs)
    errors = sum(run.status == "error" for run in runs)
    code = 2 if errors else 1 if failed and not cfg.exit_zero else 0
    _write_check(cfg, runs, code, output_format, output, force)
    if json_output is not None:
        from lipcheck.runner import json_text

        write_new_file(json_output, json_text(_check_document(cfg, runs, code)), force)
        _note(f"wrote {json_output}")
    if github_summary:
        _github_summary(runs)
    _check_summary(cfg, runs, failed, errors)
    if code:
        raise typer.Exit(code)


def _run_models(cfg: Any, output_format: Format, output: Path | None, no_color: bool, update: bool) -> list:
    """Each configured model through analysis and gate, with its summary line as it finishes."""
    from lipcheck.gate import display_path
    from lipcheck.render import summary_text  # imports torch: after the config is known good
    from lipcheck.runner import run_model

    cwd = Path.cwd()
    width = max(len(display_path(model.path, cwd)) for model in cfg.models)
    stdout = stdout_console(no_color, soft_wrap=True)
    stderr = Console(stderr=True, no_color=no_color or None, highlight=False, soft_wrap=True)
    table_to_stdout = output_format is Format.table and output is None
    runs = []
    for model in cfg.models:
        progress = _progress(output_format, no_color, label=f"bounding {display_path(model.path, cwd)}")
        try:
            run = run_model(model, cwd, update_baseline=update, progress=progress)
        finally:
            if progress is not None:
                progress.close()
        runs.append(run)
        (stdout if table_to_stdout else stderr).print(summary_text(run, width))
        _gate_lines(run)
        if update and run.error is None:
            if model.baseline is None:
                _note(f"{run.path}: no baseline configured; nothing written")
            else:
                _note(f"wrote baseline {display_path(model.baseline, cwd)}")
    return runs


def _write_check(cfg: Any, runs: list, code: int, output_format: Format, output: Path | None, force: bool) -> None:
    from lipcheck.render import summary_as_text
    from lipcheck.runner import json_text

    if output_format is Format.table:
        if output is not None:
            _emit(summary_as_text(runs), output, force)
        return
    if output_format is not Format.json:
        _emit(_render(runs, output_format), output, force)
        return
    _emit(json_text(_check_document(cfg, runs, code)), output, force)


def _check_document(cfg: Any, runs: list, code: int) -> dict[str, Any]:
    """``lipcheck check``'s results as JSON (schema lipcheck.check/1)."""
    from lipcheck.gate import display_path
    from lipcheck.runner import report_document

    return {
        "schema": CHECK_SCHEMA,
        "lipcheck_version": lipcheck.__version__,
        "config": display_path(cfg.source, Path.cwd()),
        "passed": code == 0 and not any(run.status == "fail" for run in runs),
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


def _check_summary(cfg: Any, runs: list, failed: int, errors: int) -> None:
    from lipcheck.gate import display_path

    passed = sum(run.status in ("pass", "ok") for run in runs)
    plural = "s" if len(runs) != 1 else ""
    note = " (--exit-zero: gate failures do not fail the run)" if failed and cfg.exit_zero else ""
    _note(
        f"{len(runs)} model{plural} from {display_path(cfg.source, Path.cwd())}: "
        f"{passed} passed, {failed} failed the gate, {errors} with errors{note}"
    )


# ---------------------------------------------------------------------------------------------
# lipcheck normalize


class ConvNorm(str, Enum):
    operator = "operator"
    exact = "exact"
    reshape = "reshape"


class NormalizeMode(str, Enum):
    bake = "bake"
    parametrize = "parametrize"


class NormalizeFormat(str, Enum):
    table = "table"
    json = "json"


@app.command()
@with_settings("normalize")
def normalize(
    model_file: Annotated[
        Path, typer.Argument(metavar="MODEL", help="The model to normalise (any format `report` reads).")
    ],
    output: ModelOutput = None,
    mode: Annotated[
        NormalizeMode,
        typer.Option(
            help="bake: rescale the weights (any format). parametrize: register training-time spectral "
            "normalization on a PyTorch module and save its state_dict."
        ),
    ] = NormalizeMode.bake,
    target: Annotated[float, typer.Option(help="Each normalised layer's certified operator norm.")] = 1.0,
    clip: Annotated[bool, typer.Option("--clip", help="Only shrink layers above the target.")] = False,
    lipschitz: Annotated[
        float | None,
        typer.Option(
            "--lipschitz",
            metavar="K",
            help="Instead of --target: give every selected layer the same norm, the largest whose re-certified "
            "network bound is <= K.",
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
            help="--mode parametrize: normalise convs by their operator norm at the layer's input size as lipcheck "
            "certifies it (operator), the exact zero-padded operator (exact), or the reshaped kernel as torch's "
            "spectral_norm does (reshape).",
        ),
    ] = ConvNorm.operator,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would change; write nothing.")] = False,
    force: ModelForce = False,
    output_format: Annotated[
        NormalizeFormat, typer.Option("--format", "-f", help="table (for people) or json (lipcheck.normalize/1).")
    ] = NormalizeFormat.table,
    no_color: NoColor = False,
    *,
    settings: Settings,
) -> None:
    """Rewrite a model with spectral normalization and prove the result.

    Every Conv, ConvTranspose and Linear/Gemm/MatMul layer is rescaled so that its certified operator norm
    equals --target; the output (same format as the input) is then re-loaded, re-certified and run
    against the original. Exit 1 when a check fails. The input is never modified.
    """
    from lipcheck.files import check_new_model

    if mode is NormalizeMode.parametrize and (lipschitz is not None or clip or fold_bn):
        raise LipcheckError("--lipschitz, --clip and --fold-bn are for --mode bake")
    if output is None and not dry_run:
        raise LipcheckError("normalize needs -o OUTPUT (or --dry-run to only show the plan)")
    if output is not None and not dry_run:
        check_new_model(model_file, output, force)  # before torch is even imported: a bad -o fails at once
    from lipcheck.progress import PlainProgress, is_terminal
    from lipcheck.rewrite.normalize import NormalizeOptions, normalize_file

    options = NormalizeOptions.from_settings(settings, target, clip, lipschitz, layers, fold_bn)
    progress = None if is_terminal(sys.stderr) else PlainProgress(f"normalize {model_file.name}").stage
    out = None if dry_run else output
    result = normalize_file(model_file, out, options, mode.value, conv_norm.value, force, progress)
    _show_normalize(result, output_format, no_color, None if dry_run else output)


def _show_normalize(result: Any, output_format: NormalizeFormat, no_color: bool, output: Path | None) -> None:
    dry_run = output is None
    if output_format is NormalizeFormat.json:
        from lipcheck.rewrite.report import normalize_document
        from lipcheck.runner import json_text

        sys.stdout.write(json_text(normalize_document(result, dry_run)))
    else:
        from lipcheck.render import print_normalize

        print_normalize(result, stdout_console(no_color), dry_run)
    for path in result.written:
        _note(f"wrote {path}")
    failed = [check for check in result.checks if not check.passed]
    for failure in failed:
        _note(f"check failed: {failure.name}: {failure.detail}")
    if failed:
        _note(f"{output}: not written: the model failed its proof (the unproven file was deleted)")
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------
# lipcheck rules


@app.command("rules")
def list_rules(
    output_format: Annotated[
        NormalizeFormat, typer.Option("--format", "-f", help="table (for people) or json (one object per op).")
    ] = NormalizeFormat.table,
) -> None:
    """List the ops lipcheck knows: how each is bounded, and what else lipcheck can do with it."""
    from lipcheck import ops
    from lipcheck.runner import json_text

    known = ops.registered()
    if output_format is NormalizeFormat.json:
        rows = [{"op": op.name, "bound": op.summary if op.has_rule else None, "facets": op.facets()} for op in known]
        sys.stdout.write(json_text({"schema": "lipcheck.rules/1", "ops": rows}))
        return
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    table.add_column("op")
    table.add_column("bound")
    table.add_column("facets")
    for op in known:
        table.add_row(op.name, op.summary if op.has_rule else "(no rule)", ", ".join(op.facets()))
    stdout_console(False).print(table)


INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class _Interrupts:
    """SIGINT raises KeyboardInterrupt as usual, and is remembered: Typer turns a KeyboardInterrupt into a
    silent ``exit 130``, so ``main`` asks this, not the exception, whether the run was interrupted."""

    def __init__(self) -> None:
        self.seen = False
        self.previous: Any = None

    def __enter__(self) -> _Interrupts:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def __call__(self, signum: int, frame: object) -> None:
        self.seen = True
        raise KeyboardInterrupt


def _interrupted() -> typing.NoReturn:
    """Ctrl-C: one line, exit 130. Every file lipcheck writes is staged and renamed, so nothing partial is left."""
    sys.stderr.write("lipcheck: interrupted\n")
    sys.stderr.flush()
    sys.exit(INTERRUPTED)


def main() -> None:
    """Entry point: one line on stderr and exit code 2 for every error a user can cause, 130 for Ctrl-C."""
    with _Interrupts() as interrupts:
        try:
            _run_app()
        except SystemExit as exc:
            if interrupts.seen or exc.code == INTERRUPTED:
                _interrupted()
            raise
        except KeyboardInterrupt:
            _interrupted()
        except Exception as exc:
            if interrupts.seen:  # whatever a library made of the KeyboardInterrupt
                _interrupted()
            _failed(exc)


def _run_app() -> None:
    """The Typer app without its standalone mode, so that a usage error is one line like every other error.

    Typer raises click's exceptions (its own vendored copy in recent releases), told apart by what they have.
    """
    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # end of input where a prompt waited
        sys.stderr.write("lipcheck: aborted\n")
        sys.exit(1)
    except Exception as exc:
        if not (hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # type: ignore[attr-defined]  # ``lipcheck`` alone: the help, as a usage error
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        message = one_line(exc.format_message()).replace("Value error, ", "")
        context = getattr(exc, "ctx", None)  # usage errors: unknown option or command, bad value, missing argument
        where = f" (see {context.command_path} --help)" if context is not None else ""
        sys.stderr.write(f"lipcheck: error: {message}{where}\n")
        sys.exit(exc.exit_code)  # type: ignore[attr-defined]
    if isinstance(code, int) and code:
        sys.exit(code)  # typer.Exit(n) (and Typer's 130 for Ctrl-C) come back as the return value here


def _failed(exc: Exception) -> typing.NoReturn:
    """An error a user can cause: one line on stderr, exit 2 (a traceback only with LIPCHECK_DEBUG)."""
    if isinstance(exc, LipcheckError):
        sys.stderr.write(f"lipcheck: error: {exc}\n")
        sys.exit(2)
    if os.environ.get("LIPCHECK_DEBUG"):
        raise exc
    sys.stderr.write(
        f"lipcheck: internal error: {type(exc).__name__}: {one_line(str(exc))} (set LIPCHECK_DEBUG=1 for a traceback)\n"
    )
    sys.exit(2)
