"""Every option of a lipcheck run, declared once: its flag, its ``[tool.lipcheck]`` key, its help, its parser.

``Settings`` holds the options of one model's run. Each field carries an ``Option`` in its metadata:
the command-line flag and the commands that have it, where its key may stand in ``[tool.lipcheck]``
(any table, a model's table only, the top level only, or nowhere), the help text, and the parser that
turns a flag's text or a TOML value into the field's value. The commands of ``lipcheck.cli``, the
configuration file (``lipcheck.config``), ``lipcheck check``'s overrides (``Overrides``) and the gate's
options (``Settings.gate_options``) are all made from these fields; adding an option is one field.

This module imports neither torch nor Typer: the CLI reads it before it knows whether it needs them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import Field, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lipcheck.errors import InputShapeError, LipcheckError

if TYPE_CHECKING:
    from lipcheck.domain import Domain
    from lipcheck.gate import Baseline, GateOptions
    from lipcheck.lower import LowerSettings


class ConfigError(LipcheckError):
    """The configuration file is unreadable or holds a bad key or value."""


class Method(str, Enum):
    """Which certified bound to compute (``lipcheck.refine``); the report keeps the smallest one computed."""

    best = "best"
    product = "product"
    folded = "folded"
    combettes_pesquet = "combettes-pesquet"
    eclipse_fast = "eclipse-fast"
    frequency_cp = "frequency-cp"
    block_sdp = "block-sdp"
    lipsdp = "lipsdp"
    all = "all"


class Device(str, Enum):
    """Where the spectral computations run; ``auto`` uses CUDA when torch sees a GPU."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class InputShape(str):
    """An input shape as a user writes it, ``1,3,224,224`` or ``input=1,3,224,224``, checked once where it comes
    in (a flag, a TOML value). It is the text (so it compares equal to it); ``name`` and ``dims`` are its parts."""

    name: str | None
    dims: tuple[int, ...]

    def __new__(cls, text: str, what: str = "--input-shape") -> InputShape:
        self = super().__new__(cls, text)
        name, _, dims = text.rpartition("=")
        self.name = name or None
        try:
            self.dims = tuple(int(d) for d in dims.replace("x", ",").split(","))
        except ValueError:
            raise InputShapeError(f"{what} {text!r}: expected comma-separated integers like 1,3,224,224") from None
        if any(d <= 0 for d in self.dims):
            raise InputShapeError(f"{what} {text!r}: dimensions must be positive")
        return self


# ---------------------------------------------------------------------------------------------
# The declaration of one option


Parser = Callable[[Any, str], Any]  # (a flag's text or a TOML value, what to call it in errors) -> value


def parse_input_shapes(specs: Sequence[str], input_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["1,3,32,32"]`` or ``["input=1,3,32,32", "mask=1,8"]`` (or InputShapes) -> {input name: shape}.

    Here, not in the ONNX frontend, so that the PyTorch path does not import onnx (half a second) for it."""
    result: dict[str, tuple[int, ...]] = {}
    for i, spec in enumerate(specs):
        shape = spec if isinstance(spec, InputShape) else InputShape(spec)
        name = shape.name
        if name is None:
            if i >= len(input_names):
                raise InputShapeError(f"--input-shape {spec!r}: the model has only {len(input_names)} input(s)")
            name = input_names[i]
        elif name not in input_names:
            raise InputShapeError(f"--input-shape {spec!r}: no input named {name!r} (inputs: {', '.join(input_names)})")
        result[name] = shape.dims
    return result


def _same(value: Any, what: str) -> Any:
    return value


@dataclass(frozen=True)
class Option:
    """How an option is given. ``what`` in a parser's errors is the flag, or '<table>: <key>' for a file."""

    flag: str
    help: str
    parse: Parser = _same
    metavar: str | None = None
    short: str | None = None
    commands: tuple[str, ...] = ("report", "check")
    toml: str | None = "any"  # 'any' table, 'model' (a model's table only), 'top' (top level only), None
    key: str | None = None  # the TOML key, when it is not the field's name
    role: str = ""  # for a per-model key: what it is to its model (shown when it is misplaced)
    override_help: str | None = None  # help of the flag in `lipcheck check`, which overrides every model's value
    cli_type: Any = str  # the type Typer reads before `parse` (str, float, int, bool, Path, an Enum, list[str])
    implies: str | None = None  # a boolean field that giving this option turns on (unless that field is given too)
    merge: bool = False  # a table: given entries are added to the file's instead of replacing them
    relative: bool = False  # a path: in a configuration file, relative to the file's folder
    gate: bool = False  # read by the gate (``Settings.gate_options``)


def option(default: Any, **spec: Any) -> Any:
    """A dataclass field carrying its Option (mutable defaults become factories)."""
    return _field(default, Option(**spec))


def _field(default: Any, spec: Option) -> Any:
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata={"option": spec})
    return field(default=default, metadata={"option": spec})


def option_of(item: Field) -> Option:
    return item.metadata["option"]


def toml_key(item: Field) -> str:
    return option_of(item).key or item.name


# ---------------------------------------------------------------------------------------------
# Parsers: each takes the value (a flag's text or a TOML value) and what to call it in an error


def boolean(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what}: expected true or false, got {value!r}")
    return value


def parse_increase(value: str | float | int, what: str = "--max-increase") -> float:
    """'5%' or 0.05 (or '0.05') -> 0.05. A bare number is a fraction, so it must be <= 1 (write '150%')."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise LipcheckError(f"{what}: expected a percentage like 5% or a fraction like 0.05, got {value!r}")
    text = str(value).strip()
    percent = text.endswith("%")
    try:
        number = float(text[:-1].strip() if percent else text)
    except ValueError:
        raise LipcheckError(f"{what} {text!r}: expected a percentage like 5% or a fraction like 0.05") from None
    if not math.isfinite(number) or number < 0:
        raise LipcheckError(f"{what} {text!r}: must be a finite value >= 0")
    if percent:
        return number / 100
    if number > 1:
        raise LipcheckError(f"{what} {text!r}: a bare number is a fraction (0.05 = 5%); write {text}% if you meant it")
    return number


def parse_limit(value: Any, what: str) -> float:
    """A threshold: a finite number >= 0."""
    if isinstance(value, bool):
        raise LipcheckError(f"{what}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LipcheckError(f"{what}: expected a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise LipcheckError(f"{what}: expected a finite number >= 0, got {value!r}")
    return number


limit = parse_limit
increase = parse_increase


def input_shapes(value: Any, what: str) -> tuple[InputShape, ...]:
    """'1,3,32,32', ['1,3,32,32', 'mask=1,32'] (a file, or repeated flags) or [1, 3, 32, 32] (one shape)."""
    if isinstance(value, InputShape):
        return (value,)
    if isinstance(value, str):
        return (InputShape(value, what),)
    if isinstance(value, list | tuple) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (InputShape(",".join(str(v) for v in value), what),)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(v if isinstance(v, InputShape) else InputShape(v, what) for v in value)
    raise ConfigError(f'{what}: expected a shape like "1,3,32,32", a list of such strings, or a list of integers')


def assumptions(value: Any, what: str) -> dict[str, float]:
    """OP=VALUE flags, or a TOML table of op = constant."""
    if isinstance(value, list | tuple):
        return dict(_assumption(item, what) for item in value)
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: expected a table of op = constant, e.g. assume = {{ STFT = 1.5 }}")
    return {str(op): limit(constant, f"{what}.{op}") for op, constant in value.items()}


def _assumption(item: str, what: str) -> tuple[str, float]:
    op, sep, value = item.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not op or not (number >= 0) or number == math.inf:
        raise LipcheckError(f"{what} {item!r}: expected OP=VALUE with a finite VALUE >= 0, e.g. STFT=1.5")
    return op, number


def choice(kind: type[Enum]) -> Parser:
    """One of an enumeration's values."""

    def parse(value: Any, what: str) -> Enum:
        if isinstance(value, kind):
            return value
        names = [member.value for member in kind]
        if value not in names:
            raise ConfigError(f"{what} must be one of {', '.join(names)}, got {value!r}")
        return kind(value)

    return parse


def factory(value: Any, what: str) -> str:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{what}: expected 'package.module:factory', got {value!r}")
    return value


def factory_arguments(value: Any, what: str) -> dict[str, Any]:
    """A JSON object on the command line, a table in a file."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value else {}
        except json.JSONDecodeError as exc:
            raise LipcheckError(f"{what}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(parsed, dict):
            raise LipcheckError(f"{what}: expected a JSON object like '{{\"num_classes\": 10}}', got {value}")
        return parsed
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a table, e.g. model_kwargs = {{ num_classes = 10 }}")
    return dict(value)


def path(value: Any, what: str) -> Path:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what}: expected a path (a string)")
    return Path(value)


def memory_size(value: Any, what: str) -> int:
    from lipcheck.memory import parse_memory_size

    return parse_memory_size(value, what)


def budget(value: Any, what: str) -> int:
    """The lower-bound budget: at least what one certified Jacobian norm costs."""
    from lipcheck.lower import MIN_BUDGET

    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_BUDGET:
        if is_flag(what):
            raise LipcheckError(f"{what} {value}: must be at least {MIN_BUDGET}")
        raise ConfigError(f"{what} must be an integer >= {MIN_BUDGET}, got {value!r}")
    return value


def integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    return value


def input_range(value: Any, what: str) -> tuple[float, float]:
    """'LO,HI' or [LO, HI] with finite LO < HI."""
    from lipcheck.lower import parse_input_range

    text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    return parse_input_range(text, f"{what} {text!r}:" if is_flag(what) else f"{what}:")


def numbers(value: Any, what: str, positive: bool = False) -> tuple[float, ...]:
    """'0.485,0.456,0.406' or a list of numbers: finite (and > 0 with ``positive``)."""
    items = value if isinstance(value, list) else str(value).split(",")
    try:
        found = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {value!r}: expected comma-separated numbers") from None
    if not found or not all(math.isfinite(v) and (v > 0 or not positive) for v in found):
        raise ConfigError(f"{what} {value!r}: expected finite{' positive' if positive else ''} numbers")
    return found


def channel_ranges(value: Any, what: str) -> tuple[tuple[float, float], ...]:
    """'0:1,0:1,-1:1' or [[0, 1], [0, 1], [-1, 1]]: finite LO < HI per channel."""
    items = value if isinstance(value, list) else str(value).split(",")
    found = []
    for item in items:
        pair = item if isinstance(item, list) else str(item).split(":")
        try:
            low, high = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise ConfigError(f"{what} {value!r}: expected LO:HI per channel, comma-separated") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(f"{what} {value!r}: each channel needs finite LO < HI")
        found.append((low, high))
    return tuple(found)


def positive_number(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {value!r}: expected a number") from None
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"{what} {value!r}: expected a finite number > 0")
    return number


def norm_name(value: Any, what: str) -> str:
    text = str(value).lower().removeprefix("l")
    if text in ("2", "inf", "infinity"):
        return "inf" if text.startswith("inf") else "2"
    raise ConfigError(f"{what} {value!r}: expected 2 or inf")


def is_flag(what: str) -> bool:
    """Errors about a flag name it with the value given; errors about a file key name the key's place."""
    return what.startswith("-")


# ---------------------------------------------------------------------------------------------
# The settings of one model's run

SHAPE_HELP = (
    "Fix an input's shape, e.g. 1,3,224,224 or input=1,3,224,224 (repeat for several inputs). "
    "Without it, the batch axis is 1 and unknown spatial sizes get size-independent bounds."
)
METHOD_HELP = (
    "best (default): the smallest of product, folded, combettes-pesquet, eclipse-fast, frequency-cp and block-sdp, "
    "chain by chain; product: per-layer AutoLip only; folded: consecutive linear ops composed into one matrix; "
    "combettes-pesquet / eclipse-fast: bounds on chains of linear layers and slope-restricted activations; "
    "frequency-cp: Combettes-Pesquet over convolution chains and residual blocks, per frequency (FFT); "
    "block-sdp: each residual block as a whole by the LipSDP/SLL certificate with per-channel multipliers; "
    "lipsdp: LipSDP-neuron on small chains (pip install 'lipcheck[sdp]'); all: best plus lipsdp."
)
MODEL_HELP = (
    "For a PyTorch state_dict (a file without architecture): import path of a function or class that builds "
    "the nn.Module, like uvicorn's, e.g. mypkg.nets:resnet18 (modules under the working folder are importable). "
    "The weights are loaded into it strictly. Needs --input-shape. Importing it runs its code."
)
TRUST_HELP = (
    "Allow PyTorch pickles that need more than tensors (e.g. a whole pickled nn.Module). Unpickling runs code "
    "from the file: use only for files you trust."
)
ALL = ("report", "check", "normalize")
PYTORCH = ("report", "normalize")


@dataclass(frozen=True)
class Settings:
    """The options of one model's run; every field may come from a flag or from the configuration file."""

    # -- the model and its analysis
    input_shape: tuple[InputShape, ...] = option(
        (),
        flag="--input-shape",
        short="-s",
        metavar="SHAPE",
        parse=input_shapes,
        cli_type=list[str],
        commands=ALL,
        help=SHAPE_HELP,
        override_help="Override every model's input_shape.",
    )
    assume: dict[str, float] = option(
        {},
        flag="--assume",
        metavar="OP=VALUE",
        parse=assumptions,
        cli_type=list[str],
        merge=True,
        help="Lipschitz constant for an op lipcheck has no rule for, e.g. STFT=1.5. "
        "The report then says it rests on this assumption.",
        override_help="Add to every model's assume table.",
    )
    device: Device = option(
        Device.auto,
        flag="--device",
        parse=choice(Device),
        cli_type=Device,
        commands=ALL,
        help="Where to compute: auto uses CUDA when available.",
        override_help="Override every model's device.",
    )
    method: Method = option(
        Method.best,
        flag="--method",
        short="-m",
        parse=choice(Method),
        cli_type=Method,
        help=METHOD_HELP,
        override_help="Override every model's method. " + METHOD_HELP,
    )
    max_memory: int | None = option(
        None,
        flag="--max-memory",
        metavar="SIZE",
        parse=memory_size,
        help="Memory budget, e.g. 2GiB or 800MB. Weights that do not fit are read from the model file a layer at a "
        "time (ONNX external data is read tensor by tensor). Default: weights up to 1 GiB stay loaded.",
        override_help="Override every model's max_memory.",
    )
    cache: Path | None = option(
        None,
        flag="--cache",
        parse=path,
        metavar="DIR",
        cli_type=Path,
        relative=True,
        help="Folder of per-layer results, reused by later runs: layers whose weights, attributes and input shape "
        "are unchanged are not recomputed (for CI; keyed also by lipcheck's version and code, and the device).",
        override_help="Override every model's cache.",
    )
    # -- PyTorch files (per model in a configuration file)
    model: str | None = option(
        None,
        flag="--model",
        metavar="PKG.MODULE:FACTORY",
        parse=factory,
        commands=PYTORCH,
        toml="model",
        role="the factory building that model's architecture",
        help=MODEL_HELP,
    )
    model_kwargs: dict[str, Any] = option(
        {},
        flag="--model-kwargs",
        metavar="JSON",
        parse=factory_arguments,
        commands=PYTORCH,
        toml="model",
        role="that factory's arguments",
        help="Keyword arguments for --model's factory, as a JSON object, e.g. '{\"num_classes\": 10}'.",
    )
    trust_pickle: bool = option(
        False,
        flag="--trust-pickle",
        parse=boolean,
        cli_type=bool,
        commands=PYTORCH,
        toml="model",
        role="trusting that model's pickle",
        help=TRUST_HELP,
    )
    # -- the gate
    fail_above: float | None = option(
        None,
        flag="--fail-above",
        metavar="X",
        parse=limit,
        cli_type=float,
        gate=True,
        help="Gate: exit 1 when the network's upper bound is above X "
        "(or the network is not globally Lipschitz, unless --allow-unbounded).",
        override_help="Override every model's fail_above.",
    )
    layer_fail_above: float | None = option(
        None,
        flag="--layer-fail-above",
        metavar="X",
        parse=limit,
        cli_type=float,
        gate=True,
        help="Gate: exit 1 when any layer's local bound is above X.",
        override_help="Override every model's layer_fail_above.",
    )
    allow_unbounded: bool = option(
        False,
        flag="--allow-unbounded",
        parse=boolean,
        cli_type=bool,
        gate=True,
        help="Gate: a network that is not globally Lipschitz only warns.",
        override_help="Override every model's allow_unbounded.",
    )
    max_increase: float | None = option(
        None,
        flag="--max-increase",
        metavar="PCT",
        parse=increase,
        gate=True,
        help="Allowed growth against --baseline: 5% or 0.05 (default 0: any growth beyond rounding fails).",
        override_help="Override every model's max_increase.",
    )
    baseline: Path | None = option(
        None,
        flag="--baseline",
        parse=path,
        metavar="FILE",
        cli_type=Path,
        relative=True,
        commands=("report",),
        toml="model",
        role="the baseline report",
        help="Gate: compare with this saved JSON report "
        "(fails when the network's or a layer's bound grew by more than --max-increase).",
    )
    exit_zero: bool = option(
        False,
        flag="--exit-zero",
        parse=boolean,
        cli_type=bool,
        toml="top",
        help="Report gate failures but exit 0 (errors still exit 2).",
        override_help="Report gate failures but exit 0.",
    )
    # -- the lower bound (lipcheck report --lower)
    search_lower: bool | None = option(
        None,
        flag="--lower",
        key="lower",
        parse=boolean,
        cli_type=bool,
        commands=("report",),
        help="Also search for a lower bound: the largest Jacobian norm found (power iteration through JVP/VJP, "
        "gradient ascent on the input from several starts). It is a true lower bound of the Lipschitz constant; "
        "the report shows the bracket [lower, upper] and upper/lower.",
    )
    lower_budget: int | None = option(
        None,
        flag="--lower-budget",
        metavar="N",
        parse=budget,
        cli_type=int,
        commands=("report",),
        implies="search_lower",
        help="Lower-bound budget: the total Jacobian-vector products (JVP, VJP, forward pass of a secant; a "
        "gradient counts 3) of the search, its certificate and the per-layer bounds. Default: 1000 for the search "
        "plus what the rest needs, capped on expensive networks (about 40 s of one CPU core). Implies --lower.",
    )
    seed: int = option(
        0,
        flag="--seed",
        parse=integer,
        cli_type=int,
        commands=("report",),
        help="Seed of the lower-bound search's random starts and directions (same seed, same result).",
    )
    input_range: tuple[float, float] | None = option(
        None,
        flag="--input-range",
        metavar="LO,HI",
        parse=input_range,
        commands=("report",),
        implies="search_lower",
        help="The input domain is the box [LO, HI] in every entry (e.g. 0,1 for images): the upper bound holds on "
        "it (and is finite for gating, attention and products, which have no global bound), and the lower-bound "
        "search stays in it. The report names the domain. Implies --lower.",
    )
    channel_range: tuple[tuple[float, float], ...] | None = option(
        None,
        flag="--channel-range",
        metavar="LO:HI,LO:HI,..",
        parse=lambda value, what: channel_ranges(value, what),
        commands=("report",),
        implies="search_lower",
        help="Like --input-range, one box per channel (axis 1): '0:1,0:1,-1:1'. With --lower the search stays in "
        "the channels' common part. Implies --lower.",
    )
    normalize_mean: tuple[float, ...] | None = option(
        None,
        flag="--normalize-mean",
        metavar="M1,M2,..",
        parse=lambda value, what: numbers(value, what),
        commands=("report",),
        help="The model's input is (x - mean) / std per channel for x in the --input-range box (default 0,1): "
        "the domain is that box's image. Give with --normalize-std.",
    )
    normalize_std: tuple[float, ...] | None = option(
        None,
        flag="--normalize-std",
        metavar="S1,S2,..",
        parse=lambda value, what: numbers(value, what, positive=True),
        commands=("report",),
        help="Per-channel standard deviations of the input normalisation (see --normalize-mean).",
    )
    around: Path | None = option(
        None,
        flag="--around",
        parse=path,
        metavar="FILE",
        cli_type=Path,
        commands=("report",),
        toml=None,
        help="Local bounds: a certified Lipschitz bound on the ball of --radius around each sample of FILE (.npy, "
        ".npz or .pt; one sample per row), their maximum as the report's bound, and with --lower the largest "
        "Jacobian norm found in each ball.",
    )
    radius: float | None = option(
        None,
        flag="--radius",
        metavar="R",
        parse=lambda value, what: positive_number(value, what),
        cli_type=float,
        commands=("report",),
        toml=None,
        help="The radius of the balls of --around.",
    )
    norm: str = option(
        "2",
        flag="--norm",
        metavar="2|inf",
        parse=lambda value, what: norm_name(value, what),
        commands=("report",),
        toml=None,
        help="The norm of the balls of --around: 2 (default) or inf (the box of half-width R).",
    )
    accuracy_radii: tuple[float, ...] | None = option(
        None,
        flag="--accuracy-radii",
        metavar="R1,R2,..",
        parse=lambda value, what: numbers(value, what, positive=True),
        commands=("report",),
        toml=None,
        help="With --labels: the radii (each at most --radius) at which the certified accuracy is printed "
        "(default R/4, R/2, R).",
    )
    labels: Path | None = option(
        None,
        flag="--labels",
        parse=path,
        metavar="FILE",
        cli_type=Path,
        commands=("report",),
        toml=None,
        help="Labels of the --around samples (.npy of integers; an .npz's 'y' works too): each correctly classified "
        "sample's certified robust radius min(R, margin / (sqrt(2) L)) and the certified accuracy.",
    )
    inputs: Path | None = option(
        None,
        flag="--inputs",
        parse=path,
        metavar="FILE",
        cli_type=Path,
        commands=("report",),
        toml=None,
        implies="search_lower",
        help="Start the lower-bound search from these inputs too: a .npy array of the input's shape or a batch "
        "[N, ...] of them (an .npz with one array per input name for several inputs). Implies --lower.",
    )

    @property
    def lower(self) -> LowerSettings | None:
        """The lower-bound search's settings, or None when it is not asked for."""
        if not self.search_lower:
            return None
        from lipcheck.lower import LowerSettings

        box = self.input_range
        domain = self.domain()
        if domain is not None and (domain.mean is not None or self.channel_range is not None):
            box = domain.inner_box()  # the search's box is one interval for every entry: the channels' common part
        return LowerSettings(budget=self.lower_budget, seed=self.seed, inputs=self.inputs, input_range=box)

    def domain(self) -> Domain | None:
        """The input domain these options give (None: a global bound); ConfigError for options that do not fit."""
        from lipcheck.domain import Domain

        if (self.around is None) != (self.radius is None):
            raise ConfigError("--around and --radius go together: give both (or neither)")
        if self.accuracy_radii is not None and (self.radius is None or max(self.accuracy_radii) > self.radius):
            raise ConfigError(
                "--accuracy-radii: each radius must be at most --radius (a ball's bound says nothing beyond)"
            )
        if self.labels is not None and self.around is None:
            raise ConfigError("--labels needs --around (the samples they label)")
        if (self.normalize_mean is None) != (self.normalize_std is None):
            raise ConfigError("--normalize-mean and --normalize-std go together: give both (or neither)")
        if self.input_range is not None and self.channel_range is not None:
            raise ConfigError("--input-range and --channel-range: give one of them")
        if (
            self.input_range is None
            and self.channel_range is None
            and self.normalize_mean is None
            and self.around is None
        ):
            return None
        if self.channel_range is not None:
            lows, highs = tuple(lo for lo, _ in self.channel_range), tuple(hi for _, hi in self.channel_range)
            return Domain(low=lows, high=highs, mean=self.normalize_mean, std=self.normalize_std)
        low, high = self.input_range or ((0.0, 1.0) if self.normalize_mean is not None else (-math.inf, math.inf))
        return Domain(low=(low,), high=(high,), mean=self.normalize_mean, std=self.normalize_std)

    def gate_options(self, baseline: Baseline | None = None) -> GateOptions:
        """The gate's options: the fields marked ``gate``, and the loaded baseline."""
        from lipcheck.gate import GateOptions

        values = {item.name: getattr(self, item.name) for item in fields(self) if option_of(item).gate}
        return GateOptions(**values, baseline=baseline)

    def with_values(self, values: Mapping[str, Any]) -> Settings:
        """These settings with parsed ``values`` given (a merging option adds to the current table)."""
        changes = dict(values)
        for item in fields(self):
            if item.name in changes and option_of(item).merge:
                changes[item.name] = {**getattr(self, item.name), **changes[item.name]}
        return replace(self, **changes)


def settings_fields(command: str | None = None) -> list[Field]:
    """The fields of Settings (those with a flag in ``command``, when given)."""
    return [item for item in fields(Settings) if command is None or command in option_of(item).commands]


# ---------------------------------------------------------------------------------------------
# Values from flags and from a file


def parse_given(
    values: Mapping[str, Any], what: Callable[[Field], str], folder: Path | None, dataclass_fields: Iterable[Field]
) -> dict[str, Any]:
    """Parse the given raw values (by field name) of these fields; an option that implies another sets it too."""
    parsed: dict[str, Any] = {}
    for item in dataclass_fields:
        if item.name not in values:
            continue
        spec = option_of(item)
        value = spec.parse(values[item.name], what(item))
        if spec.relative and value is not None and folder is not None:
            value = (folder / Path(value).expanduser()).absolute()
        parsed[item.name] = value
        if spec.implies is not None and spec.implies not in values:
            parsed.setdefault(spec.implies, True)
    return parsed


def from_flags(given: Mapping[str, Any], command: str, keep_false: bool = False) -> dict[str, Any]:
    """Parsed values of the flags of ``command`` that were given: None and [] mean 'not given', and so does
    False unless ``keep_false`` (``--no-x`` of a flag that overrides a file's value)."""
    present = {
        name: value
        for name, value in given.items()
        if value is not None and value != [] and (keep_false or value is not False)
    }
    return parse_given(present, lambda item: option_of(item).flag, None, settings_fields(command))


class Overrides:
    """``lipcheck check``'s flags: each given value replaces the file's (a merging option adds to it)."""

    def __init__(self, **values: Any):
        names = {item.name for item in fields(Settings)}
        unknown = set(values) - names
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        self.values = {
            name: value
            for name, value in values.items()
            if value is not None and value != () and value != {} and value != []
        }

    @property
    def exit_zero(self) -> bool | None:
        return self.values.get("exit_zero")

    def apply(self, settings: Settings) -> Settings:
        return settings.with_values(self.values)
