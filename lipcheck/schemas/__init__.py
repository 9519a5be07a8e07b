"""JSON Schemas (draft 2020-12) of lipcheck's JSON documents, shipped with the package.

* ``report.schema.json``: ``lipcheck report --format json`` (schema ``lipcheck.report/1``), baselines included.
* ``check.schema.json``: ``lipcheck check --format json`` (schema ``lipcheck.check/1``); each model's report
  refers to the report schema by its ``$id``.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

REPORT = "report.schema.json"
CHECK = "check.schema.json"


def load_schema(name: str) -> dict[str, Any]:
    """The parsed schema file ``name`` (``REPORT`` or ``CHECK``)."""
    return json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))
