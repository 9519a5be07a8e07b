"""Writers that turn model runs into what CI systems read: Markdown, GitHub workflow commands, SARIF.

Each writer is a pure function of a list of :class:`lipcheck.gate.ModelRun` (one for ``lipcheck report``,
one per configured model for ``lipcheck check``) and returns text. The Rich table and the plain
summary lines live in ``lipcheck.render``; JSON documents in ``lipcheck.runner``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lipcheck.gate import Finding, ModelRun, format_number


class Format(str, Enum):
    """What ``lipcheck report`` and ``lipcheck check`` write."""

    table = "table"  # for people (lipcheck.render)
    json = "json"  # the versioned report schema (lipcheck.runner)
    markdown = "markdown"  # pull-request comments and job summaries
    github = "github"  # GitHub Actions workflow commands
    sarif = "sarif"  # SARIF 2.1.0, for code scanning


@dataclass(frozen=True)
class Rule:
    """One kind of finding, with its stable id (SARIF ruleId) and its texts."""

    id: str
    check: str  # Finding.check, or "model_error"
    title: str
    description: str
    level: str  # SARIF default level: "error" or "warning"


RULES = (
    Rule(
        "bound-above-limit",
        "bound_above",
        "Lipschitz bound above the limit",
        "The network's certified upper bound on its l2 Lipschitz constant is above the configured limit (fail-above).",
        "error",
    ),
    Rule(
        "layer-bound-above-limit",
        "layer_above",
        "Layer Lipschitz bound above the limit",
        "A layer's certified local Lipschitz bound is above the configured per-layer limit (layer-fail-above).",
        "error",
    ),
    Rule(
        "not-globally-lipschitz",
        "unbounded",
        "Network is not globally Lipschitz",
        "Some node (LayerNorm, a product of two activations, attention, ...) makes the network not globally "
        "Lipschitz, so it has no finite certified bound. Accept it with allow-unbounded.",
        "error",
    ),
    Rule(
        "bound-regression",
        "bound_increase",
        "Lipschitz bound grew against the baseline",
        "The network's certified upper bound grew by more than the allowed fraction (max-increase) against "
        "the baseline report.",
        "error",
    ),
    Rule(
        "layer-bound-regression",
        "layer_increase",
        "Layer Lipschitz bound grew against the baseline",
        "A layer's certified local bound grew by more than the allowed fraction (max-increase) against the "
        "baseline report; layers are matched by name.",
        "error",
    ),
    Rule(
        "layers-differ-from-baseline",
        "layers_changed",
        "Layers differ from the baseline",
        "Some layers are new (not in the baseline, so not compared) or are in the baseline but no longer in the model.",
        "warning",
    ),
    Rule(
        "baseline-mismatch",
        "baseline_mismatch",
        "Baseline is for another model or input shape",
        "The baseline report names another model file or other input shapes than this report.",
        "warning",
    ),
    Rule(
        "model-error",
        "model_error",
        "Model could not be analysed",
        "lipcheck could not read or analyse the model (missing file, unsupported ops, bad baseline, ...).",
        "error",
    ),
)
RULE_BY_CHECK = {rule.check: rule for rule in RULES}


@dataclass(frozen=True)
class Annotation:
    """One finding of one model, flattened for writers that list findings (GitHub, SARIF)."""

    rule: Rule
    level: str  # "error", "warning" or "notice"
    path: str
    message: str
    finding: Finding | None = None


def findings(run: ModelRun) -> list[Annotation]:
    """Errors and warnings of one run: gate failures, gate warnings, load errors, and (without a gate) an
    unbounded network as a warning."""
    if run.error is not None:
        return [Annotation(RULE_BY_CHECK["model_error"], "error", run.path, run.error)]
    result: list[Annotation] = []
    gate = run.gate
    if gate is not None and gate.options.active:
        result += [Annotation(RULE_BY_CHECK[f.check], "error", run.path, f.message, f) for f in gate.failures]
        result += [Annotation(RULE_BY_CHECK[f.check], "warning", run.path, f.message, f) for f in gate.warnings]
    elif run.report is not None and not run.report.bounded:
        nodes = ", ".join(f"{r.node} ({r.op})" for r in run.report.unbounded_reasons)
        result.append(Annotation(RULE_BY_CHECK["unbounded"], "warning", run.path, f"not globally Lipschitz ({nodes})"))
    return result


def bound_sentence(run: ModelRun) -> str:
    """'certified upper bound 1.13969', 'upper bound 2.5 (not certified: assumes STFT=1.5)', 'not globally
    Lipschitz'."""
    report = run.report
    assert report is not None
    if report.scope == "weights":
        return "no network bound (weights only; pass --model)"
    where = "" if report.domain_text is None else f" on {report.domain_text}"
    if not report.bounded:
        return "not globally Lipschitz" if not where else f"not Lipschitz{where}"
    text = f"{'certified ' if report.certified else ''}upper bound {format_number(report.upper_bound)}{where}"
    if report.assumptions:
        listed = ", ".join(f"{op}={value:g}" for op, value in report.assumptions.items())
        text += f" (not certified: assumes {listed})"
    return text


def summary_line(run: ModelRun) -> str:
    """The one-line outcome of a model, without its path: bound and gate verdict, or the error."""
    if run.error is not None:
        return run.error
    text = bound_sentence(run)
    gate = run.gate
    if gate is None or not gate.options.active:
        return text + "; no gate configured"
    if gate.passed:
        text += "; gate passed"
    else:
        text += f"; gate failed ({len(gate.failures)} failure{'s' if len(gate.failures) != 1 else ''})"
    if gate.warnings:
        text += f", {len(gate.warnings)} warning{'s' if len(gate.warnings) != 1 else ''}"
    return text
