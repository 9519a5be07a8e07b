"""One line saying which method gave the certified bound (shared by the table and the Markdown report)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lipcheck.gate import format_number

if TYPE_CHECKING:
    from lipcheck.report import Report


def method_note(report: Report) -> str:
    """'by eclipse-fast; product 1.13969, folded 0.972313, ...' (empty when only the product was computed)."""
    if not report.bounded or len(report.method_bounds) <= 1:
        return ""
    others = ", ".join(
        f"{name} {format_number(value)}"
        for name, value in report.method_bounds.items()
        if value is not None and name != report.bound_method
    )
    return f"by {report.bound_method}" + (f"; {others}" if others else "")
