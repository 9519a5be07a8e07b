"""``[tool.lipcheck]`` in pyproject.toml (or the top level of lipcheck.toml): the models ``lipcheck check`` runs.

```toml
[tool.lipcheck]
fail_above = 10              # defaults for every model (each key optional)
max_increase = "5%"

[[tool.lipcheck.models]]
path = "models/discriminator.onnx"   # relative to the folder of the config file
input_shape = ["1,3,32,32"]
baseline = "models/discriminator.lipcheck.json"
```

Precedence, lowest first: built-in defaults, the file's top-level keys, the model's own keys, command-line
flags. Keys may be written ``snake_case`` or ``kebab-case``. Unknown keys are errors that name the key.
"""

from __future__ import annotations

import difflib
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lipcheck.errors import LipcheckError
from lipcheck.gate import parse_increase, parse_limit

CONFIG_FILES = ("lipcheck.toml", "pyproject.toml")  # searched in this order in each folder
DEVICES = ("auto", "cpu", "cuda")

# keys every model may set, also allowed at the top level as defaults (except the model's own path and baseline)
MODEL_KEYS = (
    "path",
    "fail_above",
    "layer_fail_above",
    "allow_unbounded",
    "baseline",
    "max_increase",
    "input_shape",
    "assume",
    "device",
    "max_memory",
    "cache",
    "method",
    "model",
    "model_kwargs",
    "trust_pickle",
)
TOP_KEYS = (
    "models",
    "fail_above",
    "layer_fail_above",
    "allow_unbounded",
    "max_increase",
    "input_shape",
    "assume",
    "device",
    "exit_zero",
    "max_memory",
    "cache",
    "method",
)
_PER_MODEL_ONLY = {
    "path": "the model file",
    "baseline": "the baseline report",
    "model": "the factory building that model's architecture",
    "model_kwargs": "that factory's arguments",
    "trust_pickle": "trusting that model's pickle",
}
# the lower-bound search (lipcheck report --lower): lower = true, lower_budget, seed, input_range = "0,1"
LOWER_KEYS = ("lower", "lower_budget", "seed", "input_range")
MODEL_KEYS = MODEL_KEYS + LOWER_KEYS
TOP_KEYS = TOP_KEYS + LOWER_KEYS
METHODS = ("best", "product", "folded", "combettes-pesquet", "eclipse-fast", "lipsdp", "all")  # lipcheck.refine


class ConfigError(LipcheckError):
    """The configuration file is unreadable or holds a bad key or value."""


def _load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10 only
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(
                f"{path}: reading TOML on Python 3.10 needs the tomli package (pip install tomli)"
            ) from None
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None


def _lipcheck_table(path: Path, document: dict[str, Any]) -> dict[str, Any] | None:
    """The lipcheck settings in a parsed file: [tool.lipcheck] of a pyproject.toml, the whole of lipcheck.toml."""
    if path.name == "pyproject.toml":
        tool = document.get("tool")
        table = tool.get("lipcheck") if isinstance(tool, dict) else None
        if table is not None and not isinstance(table, dict):
            raise ConfigError(f"{path}: tool.lipcheck must be a table")
        return table
    return document


def find_config(start: Path | None = None) -> Path | None:
    """The nearest lipcheck.toml, or pyproject.toml with a [tool.lipcheck] table, from ``start`` upward."""
    folder = Path(start or Path.cwd()).resolve()
    for candidate_folder in (folder, *folder.parents):
        for name in CONFIG_FILES:
            candidate = candidate_folder / name
            if not candidate.is_file():
                continue
            if name == "lipcheck.toml" or _lipcheck_table(candidate, _load_toml(candidate)) is not None:
                return candidate
    return None


@dataclass(frozen=True)
class Settings:
    """The options of one model's run; every field may come from the file or from a flag."""

    fail_above: float | None = None
    layer_fail_above: float | None = None
    allow_unbounded: bool = False
    max_increase: float | None = None
    input_shape: tuple[str, ...] = ()
    assume: dict[str, float] = field(default_factory=dict)
    device: str = "auto"
    # PyTorch files: the architecture of a bare state_dict ("package.module:factory"), its kwargs, trust
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_pickle: bool = False
    lower: Any = None  # a lipcheck.lower.LowerSettings when the lower bound is searched (--lower)
    max_memory: int | None = None  # bytes
    cache: Path | None = None  # folder of per-layer results
    method: str = "best"


@dataclass(frozen=True)
class Overrides:
    """Command-line flags; None (or empty) means 'not given', so the file's value stands."""

    fail_above: float | None = None
    layer_fail_above: float | None = None
    allow_unbounded: bool | None = None
    max_increase: float | None = None
    input_shape: tuple[str, ...] = ()
    assume: dict[str, float] = field(default_factory=dict)
    device: str | None = None
    exit_zero: bool | None = None
    max_memory: int | None = None
    cache: Path | None = None
    method: str | None = None

    def apply(self, settings: Settings) -> Settings:
        changes: dict[str, Any] = {}
        for name in (
            "fail_above",
            "layer_fail_above",
            "allow_unbounded",
            "max_increase",
            "device",
            "max_memory",
            "cache",
            "method",
        ):
            value = getattr(self, name)
            if value is not None:
                changes[name] = value
        if self.input_shape:
            changes["input_shape"] = tuple(self.input_shape)
        if self.assume:
            changes["assume"] = {**settings.assume, **self.assume}
        return replace(settings, **changes)


@dataclass(frozen=True)
class ModelConfig:
    path: Path  # absolute
    settings: Settings
    baseline: Path | None = None  # absolute


@dataclass(frozen=True)
class Config:
    source: Path
    models: list[ModelConfig]
    exit_zero: bool = False


def _normalise_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key not in allowed:
            if key in _PER_MODEL_ONLY and "models" in allowed:
                raise ConfigError(
                    f"{where}: key {raw_key!r} belongs in each [[tool.lipcheck.models]] entry "
                    f"({_PER_MODEL_ONLY[key]} of that model)"
                )
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known keys: {', '.join(allowed)})"
            raise ConfigError(f"{where}: unknown key {raw_key!r}{hint}")
        if key in result:
            raise ConfigError(f"{where}: key {key!r} is given twice (as snake_case and kebab-case)")
        result[key] = value
    return result


def _settings(table: dict[str, Any], base: Settings, where: str, folder: Path | None = None) -> Settings:
    changes: dict[str, Any] = {}
    if "max_memory" in table:
        from lipcheck.memory import MemoryBudgetError, parse_memory_size

        try:
            changes["max_memory"] = parse_memory_size(table["max_memory"], f"{where}: max_memory")
        except MemoryBudgetError as exc:
            raise ConfigError(str(exc)) from None
    if "cache" in table:
        changes["cache"] = _relative_path(table["cache"], folder or Path.cwd(), f"{where}: cache")
    for key in ("fail_above", "layer_fail_above"):
        if key in table:
            changes[key] = parse_limit(table[key], f"{where}: {key}")
    if "allow_unbounded" in table:
        changes["allow_unbounded"] = _boolean(table["allow_unbounded"], f"{where}: allow_unbounded")
    if "max_increase" in table:
        changes["max_increase"] = parse_increase(table["max_increase"], f"{where}: max_increase")
    if "input_shape" in table:
        changes["input_shape"] = _input_shapes(table["input_shape"], f"{where}: input_shape")
    if "assume" in table:
        changes["assume"] = {**base.assume, **_assumptions(table["assume"], f"{where}: assume")}
    if "device" in table:
        device = table["device"]
        if device not in DEVICES:
            raise ConfigError(f"{where}: device must be one of {', '.join(DEVICES)}, got {device!r}")
        changes["device"] = device
    if "model" in table:
        if not isinstance(table["model"], str) or ":" not in table["model"]:
            raise ConfigError(f"{where}: model must be a string 'package.module:factory', got {table['model']!r}")
        changes["model"] = table["model"]
    if "model_kwargs" in table:
        if not isinstance(table["model_kwargs"], dict):
            raise ConfigError(f"{where}: model_kwargs must be a table, e.g. model_kwargs = {{ num_classes = 10 }}")
        changes["model_kwargs"] = dict(table["model_kwargs"])
    if "trust_pickle" in table:
        changes["trust_pickle"] = _boolean(table["trust_pickle"], f"{where}: trust_pickle")
    changes.update(_lower_changes(table, base, where))
    if "method" in table:
        method = table["method"]
        if method not in METHODS:
            raise ConfigError(f"{where}: method must be one of {', '.join(METHODS)}, got {method!r}")
        changes["method"] = method
    return replace(base, **changes)


def _lower_changes(table: dict[str, Any], base: Settings, where: str) -> dict[str, Any]:
    """Settings.lower from the LOWER_KEYS (any of lower_budget, input_range turns the search on, as the flags do)."""
    given = [key for key in LOWER_KEYS if key in table]
    if not given:
        return {}
    from lipcheck.lower import DEFAULT_BUDGET, LowerBoundError, LowerSettings, parse_input_range

    current = base.lower if base.lower is not None else LowerSettings(budget=DEFAULT_BUDGET)
    enabled = base.lower is not None or "lower_budget" in table or "input_range" in table
    if "lower" in table:
        enabled = _boolean(table["lower"], f"{where}: lower")
    changes: dict[str, Any] = {}
    if "lower_budget" in table:
        budget = table["lower_budget"]
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ConfigError(f"{where}: lower_budget must be an integer >= 1, got {budget!r}")
        changes["budget"] = budget
    if "seed" in table:
        if not isinstance(table["seed"], int) or isinstance(table["seed"], bool):
            raise ConfigError(f"{where}: seed must be an integer, got {table['seed']!r}")
        changes["seed"] = table["seed"]
    if "input_range" in table:
        value = table["input_range"]
        text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
        try:
            changes["input_range"] = parse_input_range(text)
        except LowerBoundError as exc:
            raise ConfigError(f"{where}: input_range: {str(exc).split(': ', 1)[-1]}") from None
    return {"lower": replace(current, **changes) if enabled else None}


def _boolean(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what}: expected true or false, got {value!r}")
    return value


def _input_shapes(value: Any, what: str) -> tuple[str, ...]:
    """'1,3,32,32', ['1,3,32,32', 'mask=1,32'] or [1, 3, 32, 32] (one shape)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (",".join(str(v) for v in value),)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f'{what}: expected a shape like "1,3,32,32", a list of such strings, or a list of integers')


def _assumptions(value: Any, what: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: expected a table of op = constant, e.g. assume = {{ Einsum = 1.5 }}")
    result = {}
    for op, constant in value.items():
        number = parse_limit(constant, f"{what}.{op}")
        if not math.isfinite(number):  # pragma: no cover - parse_limit already refuses it
            raise ConfigError(f"{what}.{op}: must be finite")
        result[str(op)] = number
    return result


def _relative_path(value: Any, folder: Path, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what}: expected a path (a string)")
    return (folder / Path(value).expanduser()).absolute()


def load_config(path: Path | None = None, start: Path | None = None, overrides: Overrides | None = None) -> Config:
    """Read the config file (``path``, else the nearest one from ``start``) and apply the command-line overrides."""
    if path is None:
        path = find_config(start)
        if path is None:
            where = Path(start or Path.cwd()).resolve()
            raise ConfigError(
                f"no lipcheck configuration found: no lipcheck.toml, and no pyproject.toml with a "
                f"[tool.lipcheck] table, in {where} or a folder above it"
            )
    elif not Path(path).is_file():
        raise ConfigError(f"{path}: no such configuration file")
    path = Path(path).absolute()
    table = _lipcheck_table(path, _load_toml(path))
    section = "[tool.lipcheck]" if path.name == "pyproject.toml" else "top level"
    if table is None:
        raise ConfigError(f"{path}: no [tool.lipcheck] table")
    top = _normalise_keys(table, TOP_KEYS, f"{path.name}: {section}")
    defaults = _settings(top, Settings(), f"{path.name}: {section}", path.parent)
    exit_zero = _boolean(top["exit_zero"], f"{path.name}: exit_zero") if "exit_zero" in top else False
    entries = top.get("models")
    models_where = "[[tool.lipcheck.models]]" if path.name == "pyproject.toml" else "[[models]]"
    if entries is None or entries == []:
        raise ConfigError(f"{path}: no models configured; add a {models_where} entry with a path")
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ConfigError(f"{path.name}: models must be an array of tables ({models_where})")
    overrides = overrides or Overrides()
    models = []
    for i, entry in enumerate(entries, 1):
        where = f"{path.name}: {models_where} #{i}"
        keys = _normalise_keys(entry, MODEL_KEYS, where)
        if "path" not in keys:
            raise ConfigError(f"{where}: missing key 'path' (the model file)")
        settings = overrides.apply(_settings(keys, defaults, where, path.parent))
        baseline = _relative_path(keys["baseline"], path.parent, f"{where}: baseline") if "baseline" in keys else None
        models.append(ModelConfig(_relative_path(keys["path"], path.parent, f"{where}: path"), settings, baseline))
    if overrides.exit_zero is not None:
        exit_zero = overrides.exit_zero
    return Config(path, models, exit_zero)
