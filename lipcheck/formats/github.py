"""``--format github``: GitHub Actions workflow commands (``::error``, ``::warning``, ``::notice``).

Each becomes an annotation on the model file in the workflow run and the pull request. Escaping follows
the Actions toolkit (``@actions/core`` ``command.ts``): in the message, ``%``, CR and LF are percent-encoded;
in property values, also ``:`` and ``,``. Without it, a newline would end the command and a comma in a
title would start a new property.
"""

from __future__ import annotations

from lipcheck.formats import findings, summary_line
from lipcheck.gate import ModelRun


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def workflow_command(command: str, message: str, **properties: str | None) -> str:
    """``::command key=value,...::message`` with both parts escaped; None-valued properties are left out."""
    given = ",".join(f"{key}={escape_property(value)}" for key, value in properties.items() if value is not None)
    return f"::{command}{' ' + given if given else ''}::{escape_data(message)}"


def render_github(runs: list[ModelRun]) -> str:
    """One command per failure, warning and error; a notice with the bound for every model analysed."""
    lines = []
    for run in runs:
        for note in findings(run):
            lines.append(
                workflow_command(
                    note.level, f"{run.path}: {note.message}", file=run.path, title=f"lipcheck: {note.rule.title}"
                )
            )
        if run.error is None:
            lines.append(
                workflow_command("notice", f"{run.path}: {summary_line(run)}", file=run.path, title="lipcheck")
            )
    return "".join(line + "\n" for line in lines)
