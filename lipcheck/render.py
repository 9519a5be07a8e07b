"""Presentation of a Report: the Rich table with its verdict line, JSON text, and ``lipcheck check``'s summary lines.

Markdown, GitHub workflow commands and SARIF are in ``lipcheck.formats``.
"""

from __future__ import annotations

import io
import math
import re
import textwrap

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from lipcheck.formats import summary_line
from lipcheck.formats.methods import method_note
from lipcheck.gate import ModelRun, format_number
from lipcheck.graph import Shape
from lipcheck.report import LayerResult, Report


def format_shape(shape: Shape | None) -> str:
    if shape is None:
        return "?"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def verdict(report: Report) -> Text:
    if report.scope == "weights":
        reason = report.unbounded_reasons[0].reason if report.unbounded_reasons else "the file holds weights only"
        return Text.assemble(
            ("No network bound", "bold yellow"),
            f": {reason}. Each row is the certified norm of one weight tensor, valid for any stride, padding and "
            "input size.",
        )
    if not report.bounded:
        names = ", ".join(f"{r.node} ({r.op}: {r.reason})" for r in report.unbounded_reasons)
        where = "Not globally Lipschitz" if report.domain_text is None else f"Not Lipschitz on {report.domain_text}"
        return Text.assemble((where, "bold red"), f": {names}")
    text = Text.assemble(
        (
            "Certified upper bound" if report.certified else "Upper bound",
            "bold green" if report.certified else "bold yellow",
        ),
        " on the l2 Lipschitz constant"
        + ("" if report.domain_text is None else f" on {report.domain_text} (not global)")
        + ": ",
        (format_number(report.upper_bound), "bold"),
    )
    if report.assumptions:
        listed = ", ".join(f"{op}={value:g}" for op, value in report.assumptions.items())
        text.append(f" (not certified: assumes {listed})", style="yellow")
    note = method_note(report)
    if note:
        text.append(f" ({note})")
    return text


# below this many columns the shapes column is left out so that the rest stays readable
SHAPES_MIN_WIDTH = 130
# below this many, each layer's method goes on a line of its own under the layer, as wide as the screen
NARROW_WIDTH = 110
WIDE_NAME = 48  # longer layer names take several lines (of the wide table) rather than the method's room
NAME_BREAKS = re.compile(r"[^/.:]*[/.:]|[^/.:]+")  # a layer name's pieces, each ending at a separator


def wrap_name(name: str, width: int) -> list[str]:
    """A layer name in lines of at most ``width``, broken only after a separator (``/``, ``.``, ``:``); a
    piece longer than the whole width is the one thing cut."""
    lines = [""]
    for piece in NAME_BREAKS.findall(name):
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
        while len(lines[-1]) > width:
            lines[-1:] = [lines[-1][:width], lines[-1][width:]]
    return lines


def _cert(layer: LayerResult) -> Text:
    if layer.assumed:
        return Text("assumed", style="yellow")
    if not math.isfinite(layer.lipschitz):
        return Text("-", style="red")
    return Text("exact" if layer.exact else "yes", style="green")


def _method(report: Report, layer: LayerResult) -> str:
    text = layer.method if not layer.reason else layer.reason
    return text + (f"; running L by {layer.refined_by} bound" if layer.refined_by else "")


def narrow_table(report: Report, width: int) -> Group:
    """The table for narrow terminals: one line of numbers per layer, its name wrapped only at separators, and
    under it the op and the method on lines of their own (wrapped at spaces) instead of columns squeezed to a
    few letters."""
    lower_layers = report.lower.layers if report.lower is not None else None
    heads = ["#", "layer", "local L", "cert.", "running L", *(["running lower"] if lower_layers else [])]
    aligns = ["right", "left", "right", "center", "right", "right"]
    rows = []
    for i, layer in enumerate(report.layers, 1):
        running = "-" if report.scope == "weights" else format_number(layer.running)
        lower = [_lower_cell(lower_layers.get(layer.name))] if lower_layers is not None else []
        rows.append([str(i), layer.name, format_number(layer.lipschitz), _cert(layer), running, *lower])
    sizes = [max([len(heads[c])] + [len(str(row[c])) for row in rows]) for c in range(len(heads))]
    sizes[1] = max(8, min(sizes[1], width - sum(sizes) + sizes[1] - 2 * (len(heads) - 1)))
    indent = " " * (sizes[0] + 2)
    lines = [Text("  ".join(_cell(h, sizes[c], aligns[c]) for c, h in enumerate(heads)), style="bold")]
    lines.append(Text(indent + "  op: method", style="dim"))
    lines.append(Text("─" * min(width, sum(sizes) + 2 * (len(heads) - 1))))
    for row, layer in zip(rows, report.layers, strict=True):
        names = wrap_name(layer.name, sizes[1])
        cells = [Text(_cell(str(row[0]), sizes[0], "right"), style="dim"), Text(_cell(names[0], sizes[1], "left"))]
        for c in range(2, len(heads)):
            value = row[c]
            style = value.style if isinstance(value, Text) else ""
            cells.append(Text(_cell(str(value), sizes[c], aligns[c]), style=style))
        lines.append(Text("  ").join(cells))
        lines.extend(Text(indent + more) for more in names[1:])
        described = f"{layer.op}: {_method(report, layer)}"
        wrapped = textwrap.wrap(described, max(20, width - len(indent) - 2), break_long_words=False)
        lines.extend(Text(indent + "  " + part, style="dim") for part in wrapped)
    return Group(*lines)


def _cell(text: str, size: int, align: str) -> str:
    return text.rjust(size) if align == "right" else text.center(size) if align == "center" else text.ljust(size)


def build_table(report: Report, width: int = 160) -> Table | Group:
    if width < NARROW_WIDTH:
        return narrow_table(report, width)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("#", justify="right", style="dim", no_wrap=True)
    table.add_column("layer", no_wrap=True)  # names wrapped by wrap_name, at separators only
    table.add_column("op", no_wrap=True)
    table.add_column("local L", justify="right", no_wrap=True)
    table.add_column("cert.", justify="center", no_wrap=True)
    table.add_column("running L", justify="right", no_wrap=True)
    lower_layers = report.lower.layers if report.lower is not None else None
    if lower_layers is not None:
        table.add_column("running lower", justify="right", no_wrap=True)
    with_shapes = width >= SHAPES_MIN_WIDTH
    if with_shapes:
        table.add_column("in -> out", no_wrap=True)
    table.add_column("method", overflow="fold")
    for i, layer in enumerate(report.layers, 1):
        cert = _cert(layer)
        shapes = [f"{format_shape(layer.input_shape)} -> {format_shape(layer.output_shape)}"] if with_shapes else []
        table.add_row(
            str(i),
            "\n".join(wrap_name(layer.name, WIDE_NAME)),
            layer.op,
            format_number(layer.lipschitz),
            cert,
            "-" if report.scope == "weights" else format_number(layer.running),
            *([_lower_cell(lower_layers.get(layer.name))] if lower_layers is not None else []),
            *shapes,
            _method(report, layer),
        )
    return table


# method texts of bounds used because an input size is unknown
SIZE_FREE_METHODS = ("size unknown", "size-independent")


def _lower_cell(value: float | None) -> str:
    """A running lower bound, or a dash where the layer's value could not be evaluated on its own."""
    return "-" if value is None else format_number(value)


def lower_text(report: Report) -> Text | None:
    """The lower bound and the bracket, when the search ran (--lower)."""
    lower = report.lower
    if lower is None:
        return None
    domain = "" if lower.input_range is None else f" on [{lower.input_range[0]:g}, {lower.input_range[1]:g}]"
    text = Text.assemble(
        ("Lower bound", "bold cyan"),
        f"{domain} (largest Jacobian norm found): ",
        (format_number(lower.value), "bold"),
    )
    if report.upper_bound is not None:
        text.append(f"; bracket [{format_number(lower.value)}, {format_number(report.upper_bound)}]")
        ratio = report.ratio
        text.append(f", upper/lower {format_number(ratio)}" if ratio is not None else ", upper/lower undefined")
    text.append(
        f" (search: {lower.evaluations} Jacobian-vector products, {lower.seconds:.1f} s, "
        f"best from {lower.start}, seed {lower.seed})",
        style="dim",
    )
    if lower.piecewise_linear:
        text.append(
            "\nPiecewise-linear network: J(x) is exact there, so the lower bound is the exact constant of x's "
            "linear region.",
            style="dim",
        )
    return text


LOCAL_ROWS = 25  # samples listed in the table of --around (the JSON has them all)


def local_table(local: dict) -> Table:
    """One row per sample of --around: its certified bound, the lower bound in its ball, the robust radius."""
    labelled = any(sample["label"] is not None for sample in local["samples"])
    table = Table(
        box=None, title=f"Local bounds: l{local['norm']} balls of radius {local['radius']:g}", title_justify="left"
    )
    for column in (
        "sample",
        "upper",
        "lower",
        "upper/lower",
        *(("label", "pred.", "margin", "robust radius") if labelled else ()),
    ):
        table.add_column(column, justify="right")
    for sample in local["samples"][:LOCAL_ROWS]:
        upper, lower = sample["upper"], sample["lower"]
        ratio = format_number(upper / lower) if upper is not None and lower else "-"
        row = [str(sample["index"]), _number_or_dash(upper), _number_or_dash(lower), ratio]
        if labelled:
            row += [str(sample["label"]), str(sample["predicted"]), _number_or_dash(sample["margin"])]
            row.append(_number_or_dash(sample["certified_radius"]))
        table.add_row(*row)
    if len(local["samples"]) > LOCAL_ROWS:
        table.add_row(
            f"... {len(local['samples']) - LOCAL_ROWS} more (all in --format json)", *[""] * (len(table.columns) - 1)
        )
    return table


def local_summary(local: dict) -> Text:
    uppers = sorted(s["upper"] for s in local["samples"] if s["upper"] is not None)
    text = Text.assemble(
        ("Local bounds", "bold"), f" on {len(local['samples'])} balls: max {_number_or_dash(local['max'])}"
    )
    if uppers:
        text.append(f", median {format_number(uppers[len(uppers) // 2])}")
    text.append(f"; {local['seconds_per_sample']:.2f} s per sample", style="dim")
    accuracy = local.get("certified_accuracy")
    if accuracy:
        listed = ", ".join(f"{item['accuracy']:.0%} at {item['radius']:g}" for item in accuracy)
        text.append(f"\nCertified accuracy: {listed} (clean {local['clean_accuracy']:.0%})")
    return text


def _number_or_dash(value: float | None) -> str:
    return "-" if value is None else format_number(value)


def print_report(report: Report, console: Console) -> None:
    shapes = ", ".join(f"{name} {format_shape(shape)}" for name, shape in report.input_shapes.items()) or "unknown"
    where = "" if report.domain_text is None else f"; domain: {report.domain_text}"
    console.print(
        Text.assemble(
            ("lipcheck report ", "bold"), report.model, f"  (input: {shapes}; device: {report.device}{where})"
        )
    )
    console.print(build_table(report, console.width))
    console.print(verdict(report))
    lower = lower_text(report)
    if lower is not None:
        console.print(lower)
    if report.local is not None:
        console.print(local_table(report.local))
        console.print(local_summary(report.local))
    size_free = sum(1 for layer in report.layers if any(m in layer.method for m in SIZE_FREE_METHODS))
    if size_free and report.scope == "network":
        console.print(
            Text(
                f"{size_free} layer(s) have input sizes the model leaves open and got bounds valid for every size; "
                "--input-shape gives tighter ones.",
                style="dim",
            )
        )


def report_as_text(report: Report, width: int = 160) -> str:
    """The table and verdict as plain text (for --output files)."""
    buffer = io.StringIO()
    print_report(report, Console(file=buffer, width=width, no_color=True, color_system=None, highlight=False))
    return buffer.getvalue()


STATUS_LABELS = {
    "pass": ("PASS", "bold green"),
    "fail": ("FAIL", "bold red"),
    "error": ("ERROR", "bold red"),
    "ok": ("OK", "bold"),
}


def summary_text(run: ModelRun, path_width: int = 0) -> Text:
    """``lipcheck check``'s line for one model: status, path, bound and gate verdict (or the error)."""
    label, style = STATUS_LABELS[run.status]
    return Text.assemble((f"{label:<5}", style), "  ", run.path.ljust(path_width), "  ", summary_line(run))


def summary_as_text(runs: list[ModelRun]) -> str:
    width = max((len(run.path) for run in runs), default=0)
    return "".join(summary_text(run, width).plain + "\n" for run in runs)


def print_normalize(result, console: Console, dry_run: bool) -> None:
    """``lipcheck normalize``: the before/after table, the bounds, the output change and every check."""
    title = "plan (dry run, nothing written)" if dry_run else f"{result.format}"
    console.print(Text.assemble(("lipcheck normalize ", "bold"), result.model, f"  ({title})"))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name, justify in (
        ("#", "right"),
        ("layer", "left"),
        ("op", "left"),
        ("norm before", "right"),
        ("scale", "right"),
        ("norm after", "right"),
        ("BatchNorm folded", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name != "layer")  # type: ignore[arg-type]
    for i, layer in enumerate(result.layers, 1):
        after = layer.norm_after if layer.norm_after is not None else layer.norm_before * layer.factor
        table.add_row(
            str(i),
            layer.name,
            layer.op,
            format_number(layer.norm_before),
            f"{layer.factor:.6g}",
            format_number(after) + ("" if layer.norm_after is not None else " (planned)"),
            layer.folded_bn or "",
        )
    console.print(table)
    for name, reason in result.skipped:
        console.print(Text(f"left alone: {name}: {reason}", style="yellow"))
    if result.budget_note:
        console.print(Text(f"budget: {result.budget_note}"))
    if result.bound_before is not None or result.bound_after is not None:
        after = "-" if dry_run else format_number(result.bound_after)
        console.print(Text.assemble("network bound: ", format_number(result.bound_before), " -> ", (after, "bold")))
    if result.output_change is not None:
        console.print(f"outputs changed by {result.output_change:.3g} (relative l2, random inputs)")
    for check in result.checks:
        style = "green" if check.passed else "bold red"
        console.print(Text.assemble(("PASS " if check.passed else "FAIL ", style), f"{check.name}: {check.detail}"))
