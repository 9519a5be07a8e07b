"""``--format markdown``: a GitHub-flavoured Markdown summary for pull-request comments and job summaries."""

from __future__ import annotations

import math

from lipcheck.formats import findings
from lipcheck.formats.methods import method_note
from lipcheck.gate import REL_TOLERANCE, GateResult, ModelRun, format_number, format_percent
from lipcheck.report import LayerResult, Report

ICONS = {"pass": "✅", "fail": "❌", "error": "❗", "ok": "ℹ️"}
_ESCAPED = set("\\`*_{}[]<|~#")


def text(value: str) -> str:
    """Plain text safe in a table cell: Markdown punctuation backslash-escaped, line breaks as <br>."""
    escaped = "".join("\\" + c if c in _ESCAPED else c for c in value)
    return escaped.replace("\r\n", "<br>").replace("\n", "<br>").replace("\r", "<br>")


def code(value: str) -> str:
    """An inline code span that survives a table cell (a pipe must stay escaped even inside code)."""
    value = value.replace("\r", " ").replace("\n", " ")
    fence = "`"
    while fence in value:
        fence += "`"
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value.replace('|', chr(92) + '|')}{pad}{fence}"


def _signed_percent(fraction: float | None) -> str:
    if fraction is None:
        return "–"
    if not math.isfinite(fraction):
        return "+inf%"
    if abs(fraction) <= REL_TOLERANCE:  # rounding noise, as the gate sees it
        return "0%"
    return ("+" if fraction > 0 else "") + format_percent(fraction)


def _gate_sentence(gate: GateResult) -> str:
    options = gate.options
    parts = []
    if options.fail_above is not None:
        parts.append(f"upper bound ≤ {format_number(options.fail_above)} (fail-above)")
    if options.layer_fail_above is not None:
        parts.append(f"every layer ≤ {format_number(options.layer_fail_above)} (layer-fail-above)")
    if options.baseline is not None:
        parts.append(
            f"growth ≤ {format_percent(options.allowed_increase)} against {code(options.baseline.path)} (max-increase)"
        )
    if options.allow_unbounded:
        parts.append("unbounded networks accepted (allow-unbounded)")
    verdict = "**Gate passed**" if gate.passed else "**Gate failed**"
    return f"{verdict}: " + "; ".join(parts)


def _local_sentence(local: dict) -> str:
    """--around: how many balls, the largest and median bound, the lower bounds and the certified accuracy."""
    uppers = sorted(row["upper"] for row in local["samples"] if row["upper"] is not None)
    lowers = [row["lower"] for row in local["samples"] if row["lower"] is not None]
    line = f"Local bounds on {len(local['samples'])} l{local['norm']} balls of radius {local['radius']:g}: max "
    line += f"**{format_number(local['max'])}**" if local["max"] is not None else "none"
    if uppers:
        line += f", median {format_number(uppers[len(uppers) // 2])}"
    if lowers:
        line += f"; largest quotient found in a ball {format_number(max(lowers))}"
    if local.get("certified_accuracy"):
        listed = ", ".join(f"{item['accuracy']:.0%} at {item['radius']:g}" for item in local["certified_accuracy"])
        line += f"; certified accuracy {listed}"
    return line + "."


def _lower_sentence(report) -> str:
    """The lower bound and the bracket (--lower)."""
    lower = report.lower
    domain = "" if lower.input_range is None else f" on [{lower.input_range[0]:g}, {lower.input_range[1]:g}]"
    line = f"Lower bound{domain} (largest Jacobian norm found): **{format_number(lower.value)}**"
    if report.upper_bound is not None:
        ratio = report.ratio
        line += f"; bracket [{format_number(lower.value)}, {format_number(report.upper_bound)}], upper/lower " + (
            format_number(ratio) if ratio is not None else "undefined"
        )
    return line + f" ({lower.evaluations} Jacobian-vector products, {lower.seconds:.1f} s, seed {lower.seed})."


def _model_section(run: ModelRun, heading: str) -> list[str]:
    lines = [f"{heading} {ICONS[run.status]} lipcheck: {code(run.path)}", ""]
    if run.error is not None:
        lines += [f"**Error**: {text(run.error)}", ""]
        return lines
    report = run.report
    assert report is not None
    lines += [_verdict_sentence(report), ""]
    if report.lower is not None:
        lines += [_lower_sentence(report), ""]
    if report.local is not None:
        lines += [_local_sentence(report.local), ""]
    gate = run.gate
    if gate is not None and gate.options.active:
        lines += [_gate_sentence(gate), ""]
    notes = findings(run)
    if notes:
        lines += [f"- {'❌' if note.level == 'error' else '⚠️'} {text(note.message)}" for note in notes]
        lines.append("")
    return lines + _layer_table(report, gate if gate is not None and gate.options.baseline is not None else None)


def _verdict_sentence(report: Report) -> str:
    """The bound (or why there is none), with the input shapes and the method that gave it."""
    shapes = ", ".join(
        f"{name} [{','.join('?' if d is None else str(d) for d in shape)}]"
        for name, shape in report.input_shapes.items()
    )
    if report.bounded:
        label = "Certified upper bound" if report.certified else "Upper bound"
        where = "" if report.domain_text is None else f" on {text(report.domain_text)} (not global)"
        bound = format_number(report.upper_bound)
        line = f"{label} on the l2 Lipschitz constant{where}: **{bound}** (input {code(shapes)})"
        if report.assumptions:
            listed = ", ".join(f"{op}={value:g}" for op, value in report.assumptions.items())
            line += f"; not certified: assumes {text(listed)}"
        if method_note(report):
            line += f"; {text(method_note(report))}"
        return line + "."
    if report.scope == "weights":
        return (
            f"**No network bound**: {text(report.unbounded_reasons[0].reason)}. "
            "Each row is one weight tensor's certified norm."
        )
    nodes = ", ".join(f"{code(r.node)} ({text(r.op)}: {text(r.reason)})" for r in report.unbounded_reasons)
    where = "Not globally Lipschitz" if report.domain_text is None else f"Not Lipschitz on {text(report.domain_text)}"
    return f"**{where}**: {nodes}."


def _layer_table(report: Report, gate: GateResult | None) -> list[str]:
    """The layers in a collapsed table (with the baseline's values when ``gate`` compared with one)."""
    lines = [f"<details><summary>{len(report.layers)} layers</summary>", ""]
    header = ["#", "layer", "op", "local L"]
    align = ["--:", "---", "---", "--:"]
    if gate is not None:
        header += ["baseline", "change"]
        align += ["--:", "--:"]
    header += ["method", "cert.", "running L"]
    align += ["---", ":-:", "--:"]
    lower_layers = report.lower.layers if report.lower is not None else None
    if lower_layers is not None:
        header.append("running lower")
        align.append("--:")
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for i, layer in enumerate(report.layers, 1):
        row = [str(i), code(layer.name), text(layer.op), format_number(layer.lipschitz)]
        if gate is not None:
            comparison = gate.comparison(layer.name)
            if comparison is None:
                row += ["–", "new"]
            else:
                row += [format_number(comparison.baseline), _signed_percent(comparison.increase)]
        row += [text(layer.reason or layer.method), _certainty(layer), format_number(layer.running)]
        if lower_layers is not None:
            found = lower_layers.get(layer.name)
            row.append("–" if found is None else format_number(found))
        lines.append("| " + " | ".join(row) + " |")
    if gate is not None and gate.missing_layers:
        lines += ["", "Baseline layers no longer in the model: " + ", ".join(code(n) for n in gate.missing_layers)]
    return lines + ["", "</details>", ""]


def _certainty(layer: LayerResult) -> str:
    if layer.assumed:
        return "assumed"
    if not math.isfinite(layer.lipschitz):
        return "–"
    return "exact" if layer.exact else "yes"


def render_markdown(runs: list[ModelRun]) -> str:
    """One section per model; with several models, a summary table first."""
    lines: list[str] = []
    heading = "###"
    if len(runs) != 1:
        failed = sum(run.status == "fail" for run in runs)
        errors = sum(run.status == "error" for run in runs)
        overall = "error" if errors else "fail" if failed else "pass"
        counts = f"{len(runs)} model{'s' if len(runs) != 1 else ''}: {failed} failed the gate, {errors} with errors"
        lines += [f"### {ICONS[overall]} lipcheck: {counts}", ""]
        lines += ["| | model | upper bound | gate |", "|:-:|---|--:|---|"]
        for run in runs:
            if run.error is not None:
                bound, verdict = "–", "error: " + text(run.error)
            else:
                assert run.report is not None
                bound = format_number(run.report.upper_bound)
                gate = run.gate
                if gate is None or not gate.options.active:
                    verdict = "no gate"
                elif gate.passed:
                    verdict = "passed"
                else:
                    verdict = f"failed ({len(gate.failures)})"
            lines.append(f"| {ICONS[run.status]} | {code(run.path)} | {bound} | {verdict} |")
        lines.append("")
        heading = "####"
    for run in runs:
        lines += _model_section(run, heading)
    return "\n".join(lines).rstrip("\n") + "\n"
