"""Run one model through analysis and gate: what ``lipcheck report`` does once and ``lipcheck check`` per model.

Errors a user can cause (unreadable model, bad baseline, unknown ops) become ``ModelRun.error`` so that
``lipcheck check`` goes on with the other models; the CLI turns them into exit code 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lipcheck.config import ModelConfig
from lipcheck.errors import LipcheckError, one_line
from lipcheck.files import write_new_file
from lipcheck.gate import Baseline, ModelRun, display_path, evaluate, load_baseline
from lipcheck.options import Settings


def report_document(run: ModelRun) -> dict[str, Any]:
    """The JSON report (schema lipcheck.report/1), with a ``gate`` object when a gate was applied."""
    assert run.report is not None
    data = run.report.to_dict()
    if run.gate is not None and run.gate.options.active:
        data["gate"] = run.gate.to_dict()
    return data


def json_text(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def analyse_and_gate(
    path: Path, settings: Settings, baseline: Baseline | None, shown: str, progress: Any = None
) -> ModelRun:
    """Analyse one model and apply its gate; raises LipcheckError for the user's errors.

    ``progress``: a ``lipcheck.compose.ProgressCallback`` (the CLI's progress bar)."""
    from lipcheck.pipeline import analyse_with

    report = analyse_with(path, settings, progress)
    run = ModelRun(shown, report)
    run.gate = evaluate(report.to_dict(), settings.gate_options(baseline))
    return run


def run_model(
    model: ModelConfig, cwd: Path | None = None, update_baseline: bool = False, progress: Any = None
) -> ModelRun:
    """One configured model: never raises for a user error, returns a ModelRun with ``error`` instead.

    ``update_baseline`` writes the new report to the model's baseline file (replacing it) and skips the comparison.
    """
    shown = display_path(model.path, cwd)
    try:
        baseline = None
        if model.baseline is not None and not update_baseline:
            baseline = load_baseline(model.baseline, display_path(model.baseline, cwd))
        # the shown path is relative to the working folder or absolute: it opens the same file, and errors name it
        run = analyse_and_gate(Path(shown), model.settings, baseline, shown, progress)
        if update_baseline and model.baseline is not None:
            assert run.report is not None
            write_new_file(model.baseline, json_text(run.report.to_dict()), force=True)
        return run
    except LipcheckError as exc:
        message = str(exc)
        # the run is shown with its path: 'missing.onnx: no such file' reads 'missing.onnx  no such file'
        return ModelRun(shown, error=message.removeprefix(f"{shown}: "))
    except Exception as exc:
        if os.environ.get("LIPCHECK_DEBUG"):
            raise
        message = f"internal error: {type(exc).__name__}: {one_line(str(exc))} (set LIPCHECK_DEBUG=1 for a traceback)"
        return ModelRun(shown, error=message)
