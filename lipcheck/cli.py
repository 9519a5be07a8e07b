"""The ``lipcheck`` command line. Data goes to stdout, diagnostics to stderr.

Exit codes: 0 ok, 2 usage, load or internal error.
"""

from __future__ import annotations

import os
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

import lipcheck
from lipcheck.errors import LipcheckError

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


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


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


def write_new_file(path: Path, text: str, force: bool) -> None:
    """Write atomically (temporary file, then rename); refuse to replace a file without --force."""
    if path.exists() and not force:
        raise LipcheckError(f"{path}: already exists; use --force to replace it")
    if path.is_dir():
        raise LipcheckError(f"{path}: is a directory")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise LipcheckError(f"{path}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        raise LipcheckError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@app.command()
def report(
    model: Annotated[
        Path, typer.Argument(metavar="MODEL", help="Model file: .onnx (external data is read from its folder).")
    ],
    output_format: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="table (for people) or json (versioned schema).")
    ] = OutputFormat.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the report to this file instead of stdout.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Allow --output to replace an existing file.")] = False,
    input_shape: Annotated[
        list[str],
        typer.Option(
            "--input-shape",
            "-s",
            metavar="SHAPE",
            help="Fix an input's shape, e.g. 1,3,224,224 or input=1,3,224,224 (repeat for several inputs). "
            "Without it, the batch axis is 1 and unknown spatial sizes get size-independent bounds.",
        ),
    ] = [],  # noqa: B006  (typer needs a literal default)
    assume: Annotated[
        list[str],
        typer.Option(
            "--assume",
            metavar="OP=VALUE",
            help="Lipschitz constant for an op lipcheck has no rule for, e.g. Einsum=1.5. "
            "The report then says it rests on this assumption.",
        ),
    ] = [],  # noqa: B006
    device: Annotated[Device, typer.Option(help="Where to compute: auto uses CUDA when available.")] = Device.auto,
    no_color: Annotated[bool, typer.Option("--no-color", help="Plain output (also: NO_COLOR set).")] = False,
) -> None:
    """Compute each layer's certified Lipschitz bound and the network's certified upper bound."""
    from lipcheck.render import print_report, report_as_json, report_as_text
    from lipcheck.report import analyse

    assumptions = parse_assumptions(assume)
    result = analyse(model, input_shapes=input_shape, assume=assumptions, device=device.value)
    if output_format is OutputFormat.json:
        text = report_as_json(result)
    elif output is not None:
        text = report_as_text(result)
    else:
        text = None
    if output is not None:
        write_new_file(output, text or "", force)
        Console(stderr=True, no_color=True, highlight=False).print(f"wrote {output}")
    elif text is not None:
        sys.stdout.write(text)
    else:
        console = Console(no_color=no_color or None, highlight=False)
        print_report(result, console)


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
