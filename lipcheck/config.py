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
The keys, their places and their parsers are the fields of ``lipcheck.options.Settings``.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import Field, dataclass
from pathlib import Path
from typing import Any

from lipcheck.errors import LipcheckError
from lipcheck.options import ConfigError, Overrides, Settings, option_of, parse_given, settings_fields, toml_key

__all__ = ["Config", "ConfigError", "ModelConfig", "Overrides", "find_config", "load_config"]

CONFIG_FILES = ("lipcheck.toml", "pyproject.toml")  # searched in this order in each folder


def _keys(places: tuple[str, ...]) -> dict[str, Field]:
    """TOML key -> field, for the fields whose key may stand in one of these places."""
    return {toml_key(item): item for item in settings_fields() if option_of(item).toml in places}


TOP_KEYS = _keys(("any", "top"))
MODEL_KEYS = _keys(("any", "model"))
PER_MODEL_ONLY = {"path": "the model file"} | {
    key: option_of(item).role for key, item in MODEL_KEYS.items() if option_of(item).toml == "model"
}


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
class ModelConfig:
    path: Path  # absolute
    settings: Settings

    @property
    def baseline(self) -> Path | None:  # absolute
        return self.settings.baseline


@dataclass(frozen=True)
class Config:
    source: Path
    models: list[ModelConfig]
    exit_zero: bool = False


def _normalise_keys(table: dict[str, Any], allowed: dict[str, Field], where: str, top: bool) -> dict[str, Any]:
    """Key -> value with kebab-case keys in snake_case; an unknown or misplaced key is an error naming it."""
    result: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key not in allowed and not (key == "models" and top) and not (key == "path" and not top):
            if key in PER_MODEL_ONLY and top:
                raise ConfigError(
                    f"{where}: key {raw_key!r} belongs in each [[tool.lipcheck.models]] entry "
                    f"({PER_MODEL_ONLY[key]} of that model)"
                )
            known = [*allowed, *(["models"] if top else ["path"])]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known keys: {', '.join(known)})"
            raise ConfigError(f"{where}: unknown key {raw_key!r}{hint}")
        if key in result:
            raise ConfigError(f"{where}: key {key!r} is given twice (as snake_case and kebab-case)")
        result[key] = value
    return result


def _settings(table: dict[str, Any], allowed: dict[str, Field], base: Settings, where: str, folder: Path) -> Settings:
    """``base`` with the table's keys parsed (errors as ConfigError naming the key's place)."""
    values = {allowed[key].name: value for key, value in table.items() if key in allowed}
    try:
        parsed = parse_given(values, lambda item: f"{where}: {toml_key(item)}", folder, allowed.values())
    except ConfigError:
        raise
    except LipcheckError as exc:
        raise ConfigError(str(exc)) from None
    return base.with_values(parsed)


def _relative_path(value: Any, folder: Path, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what}: expected a path (a string)")
    return (folder / Path(value).expanduser()).absolute()


def _read(path: Path | None, start: Path | None) -> tuple[Path, dict[str, Any]]:
    """The config file (``path``, else the nearest one from ``start``) and its lipcheck table."""
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
    if table is None:
        raise ConfigError(f"{path}: no [tool.lipcheck] table")
    return path, table


def load_config(path: Path | None = None, start: Path | None = None, overrides: Overrides | None = None) -> Config:
    """Read the config file (``path``, else the nearest one from ``start``) and apply the command-line overrides."""
    path, table = _read(path, start)
    section = "[tool.lipcheck]" if path.name == "pyproject.toml" else "top level"
    top = _normalise_keys(table, TOP_KEYS, f"{path.name}: {section}", top=True)
    defaults = _settings(top, TOP_KEYS, Settings(), f"{path.name}: {section}", path.parent)
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
        keys = _normalise_keys(entry, MODEL_KEYS, where, top=False)
        if "path" not in keys:
            raise ConfigError(f"{where}: missing key 'path' (the model file)")
        settings = overrides.apply(_settings(keys, MODEL_KEYS, defaults, where, path.parent))
        models.append(ModelConfig(_relative_path(keys["path"], path.parent, f"{where}: path"), settings))
    exit_zero = overrides.exit_zero if overrides.exit_zero is not None else defaults.exit_zero
    return Config(path, models, exit_zero)
