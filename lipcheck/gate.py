"""The CI gate: thresholds and baselines turned into a verdict.

Plain data and plain text, no presentation library: the CLI prints the messages, the writers in
``lipcheck.formats`` turn a :class:`GateResult` into Markdown, GitHub workflow commands or SARIF.

The gate reads reports as the dicts of the versioned JSON schema (``Report.to_dict()``), so a
baseline saved by one lipcheck release is compared by the next exactly as it is stored.

Rules, in the order they are checked:

* ``unbounded``: with any gate active, a network that is not globally Lipschitz fails (it has no
  bound to compare), unless ``allow_unbounded``; then it is a warning.
* ``bound_above``: the network's upper bound is above ``fail_above``.
* ``layer_above``: a layer's local bound is above ``layer_fail_above`` (one finding per layer).
* ``bound_increase`` / ``layer_increase``: against a baseline report, the network's bound or a
  layer's local bound grew by more than ``max_increase`` (a fraction; 0 when not given). Layers are
  matched by name; layers only in the model (new) or only in the baseline (missing) are warnings.
  A relative tolerance of :data:`REL_TOLERANCE` absorbs floating-point noise, so a bound that grew
  by exactly ``max_increase`` passes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lipcheck.errors import LipcheckError

if TYPE_CHECKING:
    from lipcheck.report import Report

REL_TOLERANCE = 1e-9

CHECKS = (
    "unbounded",
    "bound_above",
    "layer_above",
    "bound_increase",
    "layer_increase",
    "layers_changed",
    "baseline_mismatch",
)


def format_number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "unbounded"
    return f"{value:.6g}"


def format_percent(fraction: float | None) -> str:
    if fraction is None:
        return "?"
    if not math.isfinite(fraction):
        return "inf%"
    return f"{fraction * 100:.4g}%"


@dataclass(frozen=True)
class Baseline:
    """A saved report to compare against; ``data`` follows the report schema."""

    path: str
    data: dict[str, Any]


def load_baseline(path: str | os.PathLike[str], shown: str | None = None) -> Baseline:
    """Read a baseline report; any file that is not a lipcheck report is a LipcheckError (exit 2).

    ``shown`` is the path as messages and the gate's JSON name it (default: ``path`` as given).
    """
    shown = shown or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LipcheckError(
            f"baseline {shown}: no such file (write it with lipcheck report --save-baseline, "
            "or lipcheck check --update-baselines)"
        ) from None
    except IsADirectoryError:
        raise LipcheckError(f"baseline {shown}: is a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LipcheckError(f"baseline {shown}: cannot read ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LipcheckError(f"baseline {shown}: not a lipcheck report (invalid JSON: {exc})") from None
    problem = _report_problem(data)
    if problem:
        raise LipcheckError(f"baseline {shown}: {problem}")
    return Baseline(shown, data)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _report_problem(data: Any) -> str | None:
    from lipcheck.report import SCHEMA

    family = SCHEMA.rsplit("/", 1)[0] + "/"  # "lipcheck.report/"
    if not isinstance(data, dict) or not isinstance(data.get("schema"), str):
        return f'not a lipcheck report (no "schema": "{SCHEMA}")'
    schema = data["schema"]
    if not schema.startswith(family):
        return f'not a lipcheck report (schema {schema!r}, expected "{SCHEMA}")'
    if schema != SCHEMA:
        return f"report schema {schema!r} is not one this lipcheck reads ({SCHEMA})"
    bound = data.get("upper_bound", "missing")
    if not (bound is None or _is_number(bound)):
        return 'not a lipcheck report ("upper_bound" must be a number or null)'
    layers = data.get("layers")
    if not isinstance(layers, list):
        return 'not a lipcheck report ("layers" must be a list)'
    for i, layer in enumerate(layers):
        if not (isinstance(layer, dict) and isinstance(layer.get("name"), str)):
            return f'not a lipcheck report (layer {i} has no "name")'
        value = layer.get("lipschitz", "missing")
        if not (value is None or _is_number(value)):
            return f'not a lipcheck report (layer {layer["name"]!r}: "lipschitz" must be a number or null)'
    return None


@dataclass(frozen=True)
class GateOptions:
    fail_above: float | None = None
    layer_fail_above: float | None = None
    allow_unbounded: bool = False
    baseline: Baseline | None = None
    max_increase: float | None = None  # a fraction; with a baseline, None means 0

    @property
    def active(self) -> bool:
        return self.fail_above is not None or self.layer_fail_above is not None or self.baseline is not None

    @property
    def allowed_increase(self) -> float:
        return self.max_increase or 0.0


@dataclass
class Finding:
    """One failed check or one warning; ``message`` is a complete sentence without the model name."""

    check: str  # one of CHECKS
    message: str
    layer: str | None = None
    value: float | None = None
    limit: float | None = None
    baseline: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "message": self.message,
            "layer": self.layer,
            "value": _finite(self.value),
            "limit": _finite(self.limit),
            "baseline": _finite(self.baseline),
        }


@dataclass
class Comparison:
    """A bound against its baseline value; ``layer`` None is the whole network."""

    layer: str | None
    baseline: float | None
    current: float | None

    @property
    def increase(self) -> float | None:
        """Relative change (0.05 = grew 5%); None when either side is unbounded."""
        if self.baseline is None or self.current is None:
            return None
        if self.baseline > 0:
            return self.current / self.baseline - 1
        return 0.0 if self.current <= 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "baseline": self.baseline,
            "current": self.current,
            "increase": _finite(self.increase),
        }


@dataclass
class GateResult:
    options: GateOptions
    failures: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    new_layers: list[str] = field(default_factory=list)
    missing_layers: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def comparison(self, layer: str | None) -> Comparison | None:
        return next((c for c in self.comparisons if c.layer == layer), None)

    def to_dict(self) -> dict[str, Any]:
        options = self.options
        return {
            "passed": self.passed,
            "fail_above": options.fail_above,
            "layer_fail_above": options.layer_fail_above,
            "allow_unbounded": options.allow_unbounded,
            "baseline": options.baseline.path if options.baseline else None,
            "max_increase": options.allowed_increase if options.baseline else options.max_increase,
            "failures": [f.to_dict() for f in self.failures],
            "warnings": [w.to_dict() for w in self.warnings],
            "comparisons": [c.to_dict() for c in self.comparisons],
            "new_layers": list(self.new_layers),
            "missing_layers": list(self.missing_layers),
        }


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _bound(value: Any) -> float | None:
    """A schema number (None for unbounded) as a float, None when unbounded."""
    return None if value is None or not math.isfinite(float(value)) else float(value)


def evaluate(report: dict[str, Any], options: GateOptions) -> GateResult:
    """Apply the gate to a report dict (``Report.to_dict()``)."""
    result = GateResult(options)
    if not options.active:
        return result
    bound = _bound(report.get("upper_bound"))
    if bound is None and report.get("scope") == "weights":
        (result.warnings if options.allow_unbounded else result.failures).append(
            Finding("unbounded", "no network bound: the file holds weights only (--model gives the architecture)")
        )
    elif bound is None:
        nodes = ", ".join(f"{r['node']} ({r['op']})" for r in report.get("unbounded_reasons", [])) or "?"
        if options.allow_unbounded:
            result.warnings.append(
                Finding("unbounded", f"not globally Lipschitz ({nodes}); accepted by allow-unbounded")
            )
        else:
            result.failures.append(
                Finding(
                    "unbounded",
                    f"not globally Lipschitz ({nodes}), so no bound to gate on; use allow-unbounded to accept this",
                )
            )
    if options.fail_above is not None and bound is not None and bound > options.fail_above:
        result.failures.append(
            Finding(
                "bound_above",
                f"upper bound {format_number(bound)} is above the limit "
                f"{format_number(options.fail_above)} (fail-above)",
                value=bound,
                limit=options.fail_above,
            )
        )
    if options.layer_fail_above is not None:
        limit = options.layer_fail_above
        for layer in report["layers"]:
            value = _bound(layer.get("lipschitz"))
            if value is not None and value > limit:
                result.failures.append(
                    Finding(
                        "layer_above",
                        f"layer {layer['name']} ({layer.get('op', '?')}): local bound "
                        f"{format_number(value)} is above the limit {format_number(limit)} (layer-fail-above)",
                        layer=layer["name"],
                        value=value,
                        limit=limit,
                    )
                )
    if options.baseline is not None:
        _compare(report, options.baseline, options.allowed_increase, result)
    return result


def _grew_too_much(comparison: Comparison, allowed: float) -> bool:
    if comparison.baseline is None or comparison.current is None:
        return False
    return comparison.current > comparison.baseline * (1 + allowed) * (1 + REL_TOLERANCE)


def _growth_text(comparison: Comparison) -> str:
    increase = comparison.increase
    grew = f"grew {format_percent(increase)}" if increase is None or math.isfinite(increase) else "grew from 0"
    return f"{grew} ({format_number(comparison.baseline)} -> {format_number(comparison.current)})"


def _domain(report: dict[str, Any]) -> str:
    """Where a report's bound holds (reports written before domains existed are global)."""
    domain = report.get("domain")
    return str(domain.get("text", "all inputs")) if isinstance(domain, dict) else "all inputs"


def _compare(report: dict[str, Any], baseline: Baseline, allowed: float, result: GateResult) -> None:
    old = baseline.data
    if old.get("model") != report.get("model"):
        result.warnings.append(
            Finding(
                "baseline_mismatch",
                f"the baseline {baseline.path} is a report on {old.get('model')!r}, not {report.get('model')!r}",
            )
        )
    if old.get("input_shapes") is not None and old.get("input_shapes") != report.get("input_shapes"):
        result.warnings.append(
            Finding(
                "baseline_mismatch",
                f"the baseline {baseline.path} was computed for input shapes "
                f"{_shapes(old.get('input_shapes'))}, this report for {_shapes(report.get('input_shapes'))}",
            )
        )
    if _domain(old) != _domain(report):
        result.warnings.append(
            Finding(
                "baseline_mismatch",
                f"the baseline {baseline.path} bounds the constant on {_domain(old)}, this report on "
                f"{_domain(report)}: not compared",
            )
        )
        return
    limit_text = f"more than the allowed {format_percent(allowed)} (max-increase)"
    network = Comparison(None, _bound(old.get("upper_bound")), _bound(report.get("upper_bound")))
    result.comparisons.append(network)
    if _grew_too_much(network, allowed):
        result.failures.append(
            Finding(
                "bound_increase",
                f"upper bound {_growth_text(network)} against the baseline, {limit_text}",
                value=network.current,
                limit=allowed,
                baseline=network.baseline,
            )
        )
    old_layers: dict[str, list[dict[str, Any]]] = {}
    for layer in old["layers"]:
        old_layers.setdefault(layer["name"], []).append(layer)
    for layer in report["layers"]:
        name = layer["name"]
        matches = old_layers.get(name)
        if not matches:
            result.new_layers.append(name)
            continue
        previous = matches.pop(0)
        comparison = Comparison(name, _bound(previous.get("lipschitz")), _bound(layer.get("lipschitz")))
        result.comparisons.append(comparison)
        if _grew_too_much(comparison, allowed):
            result.failures.append(
                Finding(
                    "layer_increase",
                    f"layer {name} ({layer.get('op', '?')}): local bound "
                    f"{_growth_text(comparison)} against the baseline, {limit_text}",
                    layer=name,
                    value=comparison.current,
                    limit=allowed,
                    baseline=comparison.baseline,
                )
            )
    result.missing_layers = [name for name, rest in old_layers.items() for _ in rest]
    if result.new_layers:
        result.warnings.append(
            Finding(
                "layers_changed",
                f"{len(result.new_layers)} layer(s) not in the baseline (new, not compared): "
                + ", ".join(result.new_layers),
            )
        )
    if result.missing_layers:
        result.warnings.append(
            Finding(
                "layers_changed",
                f"{len(result.missing_layers)} baseline layer(s) missing from the model: "
                + ", ".join(result.missing_layers),
            )
        )


def _shapes(shapes: Any) -> str:
    if not isinstance(shapes, dict):
        return repr(shapes)
    parts = []
    for name, shape in shapes.items():
        dims = "?" if shape is None else ",".join("?" if d is None else str(d) for d in shape)
        parts.append(f"{name} [{dims}]")
    return ", ".join(parts)


@dataclass
class ModelRun:
    """What one model gave: a report with its gate, or an error. The unit every output format renders."""

    path: str  # as shown to users and CI systems (posix, relative to the working folder when inside it)
    report: Report | None = None  # lipcheck.report.Report
    gate: GateResult | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        """'error', 'fail', 'pass' (a gate ran and passed) or 'ok' (no gate: report only)."""
        if self.error is not None:
            return "error"
        if self.gate is None or not self.gate.options.active:
            return "ok"
        return "pass" if self.gate.passed else "fail"


def display_path(path: str | os.PathLike[str], cwd: Path | None = None) -> str:
    """The path relative to the working folder when it lies inside it, else absolute; '/' separators."""
    absolute = Path(os.path.abspath(path))
    base = Path(os.path.abspath(cwd or Path.cwd()))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        return absolute.as_posix()
