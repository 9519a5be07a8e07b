"""What ``lipcheck normalize --format json`` prints (schema lipcheck.normalize/1)."""

from __future__ import annotations

import math
from typing import Any

import lipcheck
from lipcheck.rewrite.normalize import NormalizeResult

SCHEMA = "lipcheck.normalize/1"


def _number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def normalize_document(result: NormalizeResult, dry_run: bool) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "lipcheck_version": lipcheck.__version__,
        "model": result.model,
        "format": result.format,
        "dry_run": dry_run,
        "written": [str(p) for p in result.written],
        "upper_bound_before": _number(result.bound_before),
        "upper_bound_after": _number(result.bound_after),
        "budget": result.budget_note or None,
        "output_change": _number(result.output_change),
        "passed": result.passed,
        "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in result.checks],
        "layers": [
            {
                "name": layer.name,
                "op": layer.op,
                "weight": layer.weight,
                "norm_before": _number(layer.norm_before),
                "scale": layer.factor,
                "norm_after": _number(layer.norm_after),
                "folded_batchnorm": layer.folded_bn,
            }
            for layer in result.layers
        ],
        "skipped": [{"name": name, "reason": reason} for name, reason in result.skipped],
    }
