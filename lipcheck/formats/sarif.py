"""``--format sarif``: SARIF 2.1.0, as GitHub code scanning (``github/codeql-action/upload-sarif``) reads it.

One run, every lipcheck rule in ``tool.driver.rules``, one result per gate failure (level error), gate warning
(warning) and model error (error). A model file has no lines, so each location points at line 1 of the
model; ``partialFingerprints`` are set from rule, model and layer so code scanning does not try to hash
lines of a binary file and keeps one alert per finding across runs.
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from pathlib import PurePosixPath
from typing import Any

import lipcheck
from lipcheck.formats import RULES, findings
from lipcheck.gate import ModelRun

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_VERSION = "2.1.0"


def artifact_uri(path: str) -> str:
    """A relative path stays a relative URI reference (resolved against the repository root); an absolute one
    becomes a file:// URI. Characters outside the URI grammar are percent-encoded."""
    if PurePosixPath(path).is_absolute():
        return "file://" + urllib.parse.quote(path)
    return urllib.parse.quote(path)


def _rule_descriptor(rule: Any) -> dict[str, Any]:
    return {
        "id": rule.id,
        "name": "".join(word.capitalize() for word in rule.id.split("-")),
        "shortDescription": {"text": rule.title},
        "fullDescription": {"text": rule.description},
        "help": {"text": rule.description},
        "defaultConfiguration": {"level": rule.level},
        "properties": {"tags": ["lipschitz", "robustness"]},
    }


def _fingerprint(*parts: str | None) -> str:
    return hashlib.sha256("\0".join(part or "" for part in parts).encode()).hexdigest()[:32]


def sarif_log(runs: list[ModelRun]) -> dict[str, Any]:
    index = {rule.id: i for i, rule in enumerate(RULES)}
    results = []
    for run in runs:
        for note in findings(run):
            finding = note.finding
            layer = finding.layer if finding is not None else None
            # numbers change from run to run and must not make a new alert; which layers changed may
            detail = note.message if note.rule.check in ("layers_changed", "baseline_mismatch") else None
            location: dict[str, Any] = {
                "physicalLocation": {
                    "artifactLocation": {"uri": artifact_uri(run.path)},
                    "region": {"startLine": 1},
                }
            }
            if layer is not None:
                location["logicalLocations"] = [{"name": layer, "kind": "member"}]
            result: dict[str, Any] = {
                "ruleId": note.rule.id,
                "ruleIndex": index[note.rule.id],
                "level": note.level,
                "message": {"text": note.message},
                "locations": [location],
                "partialFingerprints": {"lipcheckFinding/v1": _fingerprint(note.rule.id, run.path, layer, detail)},
            }
            if finding is not None:
                numbers = {"value": finding.value, "limit": finding.limit, "baseline": finding.baseline}
                result["properties"] = {k: v for k, v in numbers.items() if v is not None}
            results.append(result)
    return {
        "$schema": SARIF_SCHEMA,
        "version": SARIF_VERSION,
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "lipcheck",
                        "version": lipcheck.__version__,
                        "semanticVersion": lipcheck.__version__,
                        "rules": [_rule_descriptor(rule) for rule in RULES],
                    }
                },
                "invocations": [{"executionSuccessful": all(run.error is None for run in runs)}],
                "results": results,
            }
        ],
    }


def render_sarif(runs: list[ModelRun]) -> str:
    return json.dumps(sarif_log(runs), indent=2) + "\n"
