"""PyTorch frontend: the checkpoint formats people have, loaded safely, turned into lipcheck's Graph.

Formats: a state_dict (bare, or inside a training checkpoint or a Lightning ``.ckpt``), ``.safetensors``,
TorchScript (``torch.jit.save``), ``torch.export`` programs (``.pt2``), and whole pickled modules
(``torch.save(model)``). Files that carry their graph are analysed from it; a bare state_dict needs
the architecture (``--model package.module:factory``) or gets per-tensor norms only.

Unpickling runs code, so pickles are read with ``weights_only=True``; a file that needs more is refused
with the classes it asks for (read from the pickle's opcodes, nothing executed) unless the user trusts it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import os
import pickle
import pickletools
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lipcheck.errors import InputShapeError, LipcheckError, ModelLoadError
from lipcheck.frontends.torch_archive import (
    TRUST_FLAG,
    ZIP_MAGIC,
    check_members,
    pickle_wants,
    read_archive,
    starts_like_zip,
)
from lipcheck.frontends.torch_archive import UntrustedPickleError as UntrustedPickleError  # re-exported
from lipcheck.frontends.torch_archive import pickle_globals as pickle_globals  # re-exported
from lipcheck.frontends.torch_graph import UnmappedOps, exported_to_graph, module_parameter_names
from lipcheck.frontends.torch_state import (
    baked,
    effective_state,
    is_parametrized,
    module_transposed,
    watch_buffer_writes,
)
from lipcheck.graph import Graph, check_finite

TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pt2", ".safetensors", ".tar", ".pkl", ".jit"}
# where training checkpoints keep the weights, in the order lipcheck looks
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema")
# prefixes that wrappers add to every key: DataParallel/DDP, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class TorchOptions:
    """What the user said about a PyTorch file."""

    model: str | None = None  # "package.module:factory" building the architecture of a state_dict
    model_kwargs: str | Mapping[str, Any] | None = None  # JSON object (or dict) passed to the factory
    trust_pickle: bool = False


@dataclass
class WeightTensors:
    """A file with weights and no architecture: only each tensor's norm can be certified."""

    tensors: dict[str, torch.Tensor]
    source: str  # where they came from, e.g. "a state_dict" or "checkpoint['model_state_dict']"
    name: str = ""
    notes: list[str] = field(default_factory=list)


def is_torch_file(path: Path) -> bool:
    """A PyTorch file by its suffix, or a zip archive as torch.save and torch.jit.save write them."""
    if path.suffix.lower() in TORCH_SUFFIXES:
        return True
    return path.is_file() and zipfile.is_zipfile(path)


def detect_format(path: Path) -> str:
    """'safetensors', 'pt2', 'torchscript' or 'pickle' (torch.save, zip or legacy), by content.

    An archive is read as torch reads it and refused when it is ambiguous (``torch_archive.read_archive``).
    """
    with path.open("rb") as f:
        head = f.read(16)
    if path.suffix.lower() == ".safetensors" or _looks_like_safetensors(head):
        return "safetensors"
    if head[:4] == ZIP_MAGIC:
        return read_archive(path).kind
    return "pickle"


def check_torch_file(path: Path, trusted: bool) -> str:
    """The file's format, after the checks every zip-based format gets before torch reads it."""
    if path.suffix.lower() != ".safetensors" and starts_like_zip(path):
        archive = read_archive(path)
        check_members(archive, trusted)
        return archive.kind
    return detect_format(path)


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def load_torch(
    path: str | os.PathLike[str], input_shapes: Sequence[str] = (), options: TorchOptions | None = None
) -> Graph | WeightTensors:
    """Read a PyTorch file: a Graph when the architecture is known, else the bare weight tensors."""
    options = options or TorchOptions()
    path = Path(path)
    _check_readable(path)
    shown = path.name
    kind = check_torch_file(path, options.trust_pickle)
    if kind == "safetensors":
        _no_model_for(path, kind, options, allowed=True)
        return _from_state_dict(_read_safetensors(path), "a safetensors file", shown, input_shapes, options)
    if kind == "torchscript":
        _no_model_for(path, "TorchScript file", options)
        return _from_torchscript(path, input_shapes)
    if kind == "pt2":
        _no_model_for(path, "torch.export program (.pt2)", options)
        return _from_exported(path, input_shapes)
    obj = unpickle(path, options.trust_pickle)
    found, where = find_weights(obj, path)
    if isinstance(found, nn.Module):
        _no_model_for(path, "pickled module", options)
        return module_to_graph(found, input_shapes, shown)
    return _from_state_dict(found, where, shown, input_shapes, options)


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected a model file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: file is empty")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _no_model_for(path: Path, kind: str, options: TorchOptions, allowed: bool = False) -> None:
    if options.model is not None and not allowed:
        raise ModelLoadError(f"{path}: --model is for files that hold only weights; this {kind} carries its own graph")


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text[:240]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.export and TorchScript conversion log and warn a lot; users need none of it."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.export", "torch._export", "torch.fx", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """Like uvicorn: modules under the working folder can be imported (for --model and trusted pickles)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


# ---------------------------------------------------------------------- pickles, safely


def unpickle(path: Path, trusted: bool) -> Any:
    try:
        with quiet():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        wanted = unsafe_globals(path)
        if not wanted and not _parses_as_pickle(path):
            raise ModelLoadError(f"{path}: not a readable PyTorch file (not a pickle or a torch archive)") from None
        if not trusted:
            refuse_untrusted(path, wanted or ["Python objects beyond tensors"])
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable PyTorch file ({_short(exc)})") from None
    try:
        with quiet(), _cwd_importable():
            return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise ModelLoadError(
            f"{path}: the pickle needs code that cannot be imported here ({_short(exc)}); run lipcheck where the "
            "model's package is importable (e.g. from its project folder)"
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"{path}: unpickling failed ({type(exc).__name__}: {_short(exc)})") from None


def refuse_untrusted(path: Path, wanted: list[str]) -> None:
    if not wanted:
        return
    listed = ", ".join(wanted[:10]) + (f" and {len(wanted) - 10} more" if len(wanted) > 10 else "")
    raise UntrustedPickleError(
        f"{path}: refused to unpickle: the file needs {listed}, and unpickling them runs code from the file. "
        f"If you trust it, pass {TRUST_FLAG}"
    )


def pt2_unsafe_globals(path: Path) -> list[str]:
    """Kept for callers that check a .pt2 as ``refuse_untrusted(path, pt2_unsafe_globals(path))``: the archive
    rules (``check_torch_file``) raise their own one-line error; nothing is left to list."""
    check_members(read_archive(path), trusted=False)
    return []


def unsafe_globals(path: Path) -> list[str]:
    """The classes and functions a pickle would import, beyond what weights_only allows; nothing is run."""
    try:
        return pickle_wants(path.read_bytes())
    except OSError:
        return []


def _parses_as_pickle(path: Path) -> bool:
    if starts_like_zip(path):
        return True
    try:
        for _ in pickletools.genops(path.read_bytes()):
            pass
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------- finding the weights


def _is_tensor_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    values = list(obj.values())
    tensors_only = all(isinstance(v, torch.Tensor) or v is None for v in values)
    return all(isinstance(k, str) for k in obj) and tensors_only and any(isinstance(v, torch.Tensor) for v in values)


def find_weights(obj: Any, path: Path) -> tuple[nn.Module | dict[str, torch.Tensor], str]:
    """The module or state_dict inside what torch.load returned, and where it was found."""
    if isinstance(obj, nn.Module):
        return obj, "a pickled module"
    if _is_tensor_dict(obj):
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, "a state_dict"
    if isinstance(obj, Mapping):
        for key in CHECKPOINT_KEYS:
            if key not in obj:
                continue
            value = obj[key]
            if isinstance(value, nn.Module):
                return value, f"checkpoint[{key!r}] (a pickled module)"
            if _is_tensor_dict(value):
                return {k: v for k, v in value.items() if isinstance(v, torch.Tensor)}, f"checkpoint[{key!r}]"
        keys = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
        raise ModelLoadError(
            f"{path}: no weights found in this dict (keys {keys}); lipcheck reads a state_dict, or a checkpoint "
            f"holding one under {', '.join(repr(k) for k in CHECKPOINT_KEYS)}"
        )
    raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a state_dict, checkpoint or nn.Module")


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove 'module.' (DataParallel) and '_orig_mod.' (torch.compile) when every key carries them."""
    result = dict(state)
    changed = True
    while changed and result:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in result):
                result = {k[len(prefix) :]: v for k, v in result.items()}
                changed = True
    return result


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - a declared dependency
        raise ModelLoadError(f"{path}: reading .safetensors needs the 'safetensors' package") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({_short(exc)})") from None


def _from_state_dict(
    state: Mapping[str, torch.Tensor], where: str, shown: str, input_shapes: Sequence[str], options: TorchOptions
) -> Graph | WeightTensors:
    state = strip_wrapper_prefixes(state)
    if options.model is None:
        state = effective_state(state)  # torch's spectral_norm / weight_norm keys: the weights they compute
        for key, tensor in state.items():  # per-tensor norms read every float tensor of rank 2 to 5 as a weight
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                check_finite(key, tensor.detach().cpu().float().numpy(), weight=2 <= tensor.dim() <= 5)
        return WeightTensors(dict(state), where, shown)
    module = build_module(options.model, options.model_kwargs)
    if is_parametrized(module) and not any(".parametrizations." in key for key in state):
        module = baked(module)  # a state_dict saved after the parametrizations were removed, values kept
    load_weights(module, module_state(module, state), shown)
    return module_to_graph(module, input_shapes, shown)


def module_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's state_dict as ``module`` takes it: parametrized keys (torch's spectral_norm, weight_norm) as
    they are for a module that registers the same parametrizations, as their effective tensors otherwise."""
    if is_parametrized(module):
        return dict(state)
    return effective_state(strip_common_prefix(dict(state), set(module.state_dict())), module_transposed(module))


# ---------------------------------------------------------------------- --model factories


def parse_model_kwargs(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if text is None or text == "":
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LipcheckError(f"--model-kwargs: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise LipcheckError(f"--model-kwargs: expected a JSON object like '{{\"num_classes\": 10}}', got {text}")
    return value


def build_module(spec: str, kwargs_text: str | Mapping[str, Any] | None = None) -> nn.Module:
    """Import ``package.module:factory`` (a class or function) and call it with the JSON kwargs."""
    kwargs = parse_model_kwargs(kwargs_text)
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise LipcheckError(f"--model {spec!r}: expected 'package.module:factory', e.g. torchvision.models:resnet18")
    with _cwd_importable():
        try:
            target: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise LipcheckError(f"--model {spec!r}: cannot import {module_name!r} ({_short(exc)})") from None
        except Exception as exc:
            raise LipcheckError(f"--model {spec!r}: importing {module_name!r} failed ({_short(exc)})") from None
        for part in attr_path.split("."):
            if not hasattr(target, part):
                raise LipcheckError(f"--model {spec!r}: {module_name!r} has no attribute {attr_path!r}")
            target = getattr(target, part)
    if not callable(target):
        raise LipcheckError(f"--model {spec!r}: {attr_path} is not callable")
    try:
        with quiet():
            module = target(**kwargs)
    except Exception as exc:
        raise LipcheckError(
            f"--model {spec!r}: calling {attr_path}(**kwargs) failed ({type(exc).__name__}: {_short(exc)})"
        ) from None
    if not isinstance(module, nn.Module):
        raise LipcheckError(f"--model {spec!r}: {attr_path} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def strip_common_prefix(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Lightning and other wrappers keep the network under an attribute ('model.'): drop it when that matches."""
    if set(state) == wanted or not state:
        return state
    first = {k.split(".", 1)[0] for k in state}
    if len(first) == 1 and all("." in k for k in state):
        prefix = next(iter(first)) + "."
        stripped = {k[len(prefix) :]: v for k, v in state.items()}
        if len(set(stripped) & wanted) > len(set(state) & wanted):
            return stripped
    return state


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], shown: str) -> None:
    """Strict load_state_dict with a one-line account of missing, unexpected and mis-shaped keys."""
    wanted = set(module.state_dict())
    state = strip_common_prefix(dict(state), wanted)
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - wanted)
    own = module.state_dict()
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(wanted & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                parts.append(f"{label} {len(keys)}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}")
        raise ModelLoadError(f"{shown}: the weights do not fit --model ({'; '.join(parts)})")
    module.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------- tracing


def _input_names(forward: Any) -> list[str]:
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]


def example_inputs(specs: Sequence[str], names: Sequence[str], shown: str) -> tuple[dict[str, tuple[int, ...]], list]:
    """Random float inputs of the shapes the user gave (a PyTorch module carries none)."""
    from lipcheck.options import parse_input_shapes

    if not specs:
        raise InputShapeError(
            f"{shown}: a PyTorch module does not record its input shape; give it with --input-shape, "
            "e.g. --input-shape 1,3,224,224 (batch first)"
        )
    known = list(names) or [f"input{i}" for i in range(len(specs))]
    shapes = parse_input_shapes(specs, known)
    ordered = [name for name in known if name in shapes]
    if ordered != known[: len(ordered)]:
        raise InputShapeError(f"{shown}: --input-shape must cover the module's first inputs ({', '.join(known)})")
    generator = torch.Generator().manual_seed(0)
    return shapes, [torch.randn(shapes[name], generator=generator) for name in ordered]


def _check_runs(module: nn.Module, inputs: list, shapes: dict[str, tuple[int, ...]], shown: str) -> None:
    try:
        with torch.no_grad(), quiet(), watch_buffer_writes(module, shown):
            module(*inputs)
    except LipcheckError:
        raise
    except Exception as exc:
        given = ", ".join(f"{name}={','.join(map(str, s))}" for name, s in shapes.items())
        raise InputShapeError(
            f"{shown}: the module does not run on --input-shape {given} ({type(exc).__name__}: {_short(exc)})"
        ) from None


def module_to_graph(module: nn.Module, input_shapes: Sequence[str], shown: str) -> Graph:
    """Trace an nn.Module with torch.export (torch.fx then torch.export where that fails) into a Graph.

    Parametrizations (torch's spectral_norm...) are baked into plain weights first (on a copy), so the graph's
    weights keep the module's plain names."""
    module = baked(module.eval())
    shapes, inputs = example_inputs(input_shapes, _input_names(module.forward), shown)
    _check_runs(module, inputs, shapes, shown)
    program = _export(module, inputs, shown)
    return program_to_graph(program, shown)


def _export(module: nn.Module, inputs: list, shown: str) -> torch.export.ExportedProgram:
    with quiet():
        try:
            return torch.export.export(module, tuple(inputs))
        except Exception as first:
            try:  # symbolic tracing handles some Python that export refuses; its GraphModule exports cleanly
                traced = torch.fx.symbolic_trace(module)
                return torch.export.export(traced, tuple(inputs))
            except Exception as second:
                raise ModelLoadError(
                    f"{shown}: cannot trace the module (torch.export: {_short(first)}; torch.fx: {_short(second)})"
                ) from None


def program_to_graph(
    program: torch.export.ExportedProgram, shown: str, source_names: dict[str, str] | None = None
) -> Graph:
    """Map the program; where ops have no converter, retry on its core-ATen decomposition before giving up."""
    try:
        return exported_to_graph(program, shown, source_names)
    except UnmappedOps as first:
        try:
            with quiet():
                decomposed = program.run_decompositions()
            return exported_to_graph(decomposed, shown, source_names or module_parameter_names(decomposed))
        except Exception:
            pass
        listed = "; ".join(
            f"{op} ({', '.join(where[:3])}{', ...' if len(where) > 3 else ''})"
            for op, where in sorted(first.ops.items())
        )
        raise ModelLoadError(f"{shown}: no lipcheck mapping for {len(first.ops)} PyTorch op(s): {listed}") from None


def _from_torchscript(path: Path, input_shapes: Sequence[str]) -> Graph:
    shown = path.name
    try:
        with quiet():
            scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable TorchScript file ({_short(exc)})") from None
    scripted.eval()
    argument_names = [a.name for a in scripted.forward.schema.arguments][1:]
    shapes, inputs = example_inputs(input_shapes, argument_names, shown)
    _check_runs(scripted, inputs, shapes, shown)
    try:
        from torch._export.converter import TS2EPConverter

        with quiet():
            converted = TS2EPConverter(scripted, tuple(inputs)).convert()
            names = module_parameter_names(converted)
            # the converter leaves every dimension dynamic; exporting its module again fixes the given shapes
            program = torch.export.export(converted.module(), tuple(inputs))
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot convert this TorchScript program ({_short(exc)})") from None
    return program_to_graph(program, shown, names)


def _from_exported(path: Path, input_shapes: Sequence[str]) -> Graph:
    """A .pt2 records its input shapes; --input-shape re-exports it at another size (dynamic dims)."""
    shown = path.name
    try:
        with quiet():
            program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable torch.export program ({_short(exc)})") from None
    if not input_shapes:
        input_shapes = _batch_of_one(program)
        if not input_shapes:
            return program_to_graph(program, shown)
    with quiet():
        module = torch.export.unflatten(program)
    user_inputs = list(program.graph_signature.user_inputs)
    shapes, inputs = example_inputs(input_shapes, user_inputs, shown)
    _check_runs(module, inputs, shapes, shown)
    return program_to_graph(_export(module, inputs, shown), shown)


def _batch_of_one(program: torch.export.ExportedProgram) -> list[str]:
    """Like the ONNX frontend: a dynamic batch axis is taken as 1 (samples do not interact). Other dynamic
    axes stay unknown (size-independent bounds); then [] and the program is read as it is."""
    specs, dynamic_batch = [], False
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    for name in program.graph_signature.user_inputs:
        shape = getattr(placeholders[name].meta.get("val"), "shape", None)
        if shape is None:
            return []
        dims = [d if isinstance(d, int) else None for d in shape]
        if any(d is None for d in dims[1:]):
            return []
        dynamic_batch = dynamic_batch or (bool(dims) and dims[0] is None)
        specs.append(f"{name}=" + ",".join(str(1 if d is None else d) for d in dims))
    return specs if dynamic_batch else []
