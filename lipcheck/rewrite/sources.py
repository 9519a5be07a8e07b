"""The weights of a model file, editable by name, and written back in the file's own format.

Names are lipcheck's graph constant names: ONNX initializer names, or the module's state_dict keys for
PyTorch files (mapped back to the file's own keys, e.g. with a 'module.' or Lightning 'model.' prefix).
Everything else in the file (other checkpoint keys, metadata, the graph) is kept as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lipcheck.errors import LipcheckError
from lipcheck.frontends.torch_frontend import (
    TorchOptions,
    build_module,
    check_torch_file,
    find_weights,
    load_weights,
    module_state,
    quiet,
    strip_common_prefix,
    strip_wrapper_prefixes,
    unpickle,
)
from lipcheck.frontends.torch_state import Parametrized, find_parametrized, module_transposed


class WeightSource:
    """A model file's named weight tensors; subclasses know one format each."""

    path: Path
    format: str

    def names(self) -> list[str]:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray | None:
        raise NotImplementedError

    def set(self, name: str, value: np.ndarray) -> None:
        raise NotImplementedError

    def write(self, target: Path) -> None:
        raise NotImplementedError

    def remove_batchnorm(self, bn_node: str, linear_node: str) -> bool:
        """Drop an (already identity) BatchNorm from the graph when the format allows it."""
        return False

    def input_files(self) -> list[Path]:
        """The files the model was read from (the output may replace none of them)."""
        return [self.path]


# ---------------------------------------------------------------------- ONNX


class OnnxSource(WeightSource):
    def __init__(self, path: Path):
        from lipcheck.frontends.onnx_frontend import load_onnx_model

        self.path = path
        self.model = load_onnx_model(path)
        self.external_files = _external_files(path)
        self.external = bool(self.external_files)
        self.format = "ONNX with external data" if self.external else "ONNX"
        self.initializers = {init.name: init for init in self.model.graph.initializer}
        self._producers: dict[str, Any] | None = None  # value -> node, for source_of

    def names(self) -> list[str]:
        return list(self.initializers)

    def get(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        init = self.initializers.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def set(self, name: str, value: np.ndarray) -> None:
        from onnx import numpy_helper

        init = self.initializers[name]
        old = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array(np.asarray(value).astype(old.dtype).reshape(old.shape), name))

    def input_files(self) -> list[Path]:
        return [self.path, *self.external_files]

    def source_of(self, value: str) -> str | None:
        """The initializer a weight comes from through shape-only ops (Transpose, Reshape, Cast, ...)."""
        from lipcheck.frontends.onnx_frontend import WEIGHT_VIEW_OPS

        if self._producers is None:
            self._producers = {out: node for node in self.model.graph.node for out in node.output}
        producers = self._producers
        seen = 0
        while value not in self.initializers and seen < 16:
            node = producers.get(value)
            if node is None or node.op_type not in WEIGHT_VIEW_OPS:
                return None
            value = node.input[0]
            seen += 1
        return value if value in self.initializers else None

    def remove_batchnorm(self, bn_node: str, linear_node: str) -> bool:
        nodes = {node.name: node for node in self.model.graph.node}
        bn, linear = nodes.get(bn_node), nodes.get(linear_node)
        if bn is None or linear is None or linear.output[0] != bn.input[0]:
            return False
        linear.output[0] = bn.output[0]
        self.model.graph.node.remove(bn)
        self._producers = None
        used = {name for node in self.model.graph.node for name in node.input}
        for name in list(bn.input[1:]):
            init = self.initializers.get(name)
            if init is not None and name not in used:
                self.model.graph.initializer.remove(init)
                del self.initializers[name]
        return True

    def write(self, target: Path) -> None:
        import onnx

        model = self.model
        if self.external:
            model = copy.deepcopy(self.model)
            onnx.save_model(
                model,
                str(target),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=target.name + ".data",
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(target))


def _external_files(path: Path) -> list[Path]:
    """The external data files an ONNX model's initializers are read from."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    found = []
    for init in model.graph.initializer:
        if uses_external_data(init):
            location = next((e.value for e in init.external_data if e.key == "location"), None)
            if location is not None and path.parent / location not in found:
                found.append(path.parent / location)
    return found


# ---------------------------------------------------------------------- PyTorch


@dataclass
class TorchSource(WeightSource):
    """A PyTorch file; ``tensors`` maps the module's keys to the live tensors inside the loaded object."""

    path: Path
    format: str
    obj: Any  # what was loaded: a checkpoint dict, a module, a ScriptModule, an ExportedProgram, a safetensors dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    file_keys: dict[str, str] = field(default_factory=dict)  # module key -> key in the file
    metadata: dict[str, str] | None = None  # safetensors header metadata
    # effective tensors of torch's parametrizations (spectral_norm, weight_norm), by their plain key
    parametrized: dict[str, Parametrized] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.parametrized:
            self.parametrized = {p.name: p for p in find_parametrized(self.tensors)}

    def names(self) -> list[str]:
        hidden = {k for p in self.parametrized.values() for k in p.keys}
        return [k for k in self.tensors if k not in hidden] + list(self.parametrized)

    def get(self, name: str) -> np.ndarray | None:
        if name in self.parametrized:
            return self.parametrized[name].effective(self.tensors).numpy()
        tensor = self.tensors.get(name)
        if tensor is None:
            return None
        tensor = tensor.detach()
        return (tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor).cpu().numpy().copy()

    def set(self, name: str, value: np.ndarray) -> None:
        if name in self.parametrized:
            self._scale_parametrized(self.parametrized[name], np.asarray(value, dtype=np.float64))
            return
        tensor = self.tensors[name]
        new = torch.as_tensor(np.asarray(value), dtype=torch.float64).to(dtype=tensor.dtype).reshape(tensor.shape)
        with torch.no_grad():
            tensor.copy_(new)

    def _scale_parametrized(self, parametrized: Parametrized, value: np.ndarray) -> None:
        """A parametrized tensor changes only by a positive factor (what normalize does): scale it in its keys."""
        current = parametrized.effective(self.tensors).numpy()
        factor = float(np.vdot(value, current) / max(np.vdot(current, current), 1e-300))
        if not factor > 0 or np.abs(value - factor * current).max() > 1e-6 * max(np.abs(value).max(), 1e-30):
            raise LipcheckError(
                f"{self.path}: {parametrized.name} comes from torch's {parametrized.kind}; lipcheck can only "
                "rescale it as a whole (--fold-bn changes it channel by channel)"
            )
        parametrized.scale(self.tensors, factor)

    def write(self, target: Path) -> None:
        with quiet():
            self._write(target)

    def _write(self, target: Path) -> None:
        if self.format == "safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.obj.items()}, str(target), metadata=self.metadata)
        elif self.format == "TorchScript":
            torch.jit.save(self.obj, str(target))
        elif self.format == "torch.export program":
            torch.export.save(self.obj, str(target))
        else:
            torch.save(self.obj, target)


def open_source(path: Path, options: TorchOptions | None = None) -> WeightSource:
    """Load a model file for rewriting (the same formats ``lipcheck report`` reads)."""
    with quiet():
        return _open_source(path, options)


def _open_source(path: Path, options: TorchOptions | None) -> WeightSource:
    from lipcheck.frontends import _looks_like_onnx

    options = options or TorchOptions()
    if path.suffix.lower() == ".onnx" or _looks_like_onnx(path):
        return OnnxSource(path)
    kind = check_torch_file(path, options.trust_pickle)  # the same archive rules as ``lipcheck report``
    if kind == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        return _state_source(path, "safetensors", tensors, tensors, options, metadata)
    if kind == "torchscript":
        scripted = torch.jit.load(str(path), map_location="cpu")
        return TorchSource(path, "TorchScript", scripted, dict(scripted.state_dict(keep_vars=True)))
    if kind == "pt2":
        program = torch.export.load(str(path))
        return TorchSource(path, "torch.export program", program, dict(program.state_dict))
    obj = unpickle(path, options.trust_pickle)
    found, where = find_weights(obj, path)
    if isinstance(found, torch.nn.Module):
        tensors = dict(found.state_dict(keep_vars=True))
        parametrized = {p.name: p for p in find_parametrized(tensors, module_transposed(found))}
        return TorchSource(path, "pickled module", obj, tensors, parametrized=parametrized)
    return _state_source(path, where, found, obj, options, None)


def _state_source(
    path: Path,
    where: str,
    state: Mapping[str, torch.Tensor],
    obj: Any,
    options: TorchOptions,
    metadata: dict[str, str] | None,
) -> TorchSource:
    """Module keys as the report sees them (wrapper and Lightning prefixes removed) -> the file's tensors."""
    file_keys = list(state)
    stripped = list(strip_wrapper_prefixes(dict(state)))
    transposed = None
    if options.model is not None:
        module = build_module(options.model, options.model_kwargs)
        named = dict(zip(stripped, state.values(), strict=True))
        load_weights(module, module_state(module, named), path.name)
        wanted = set(module.state_dict()) | {p.name for p in find_parametrized(named)}
        matched = list(strip_common_prefix(named, wanted))
        transposed = module_transposed(module)
    else:
        matched = stripped
    if len(matched) != len(file_keys):
        raise LipcheckError(f"{path}: cannot map the file's keys to the module's")
    tensors = {module_key: state[file_key] for module_key, file_key in zip(matched, file_keys, strict=True)}
    # the tensors are the loaded object's own: editing them in place edits what ``write`` saves
    keys = dict(zip(matched, file_keys, strict=True))
    parametrized = {p.name: p for p in find_parametrized(tensors, transposed)}
    kind = "state_dict" if where == "a state_dict" else where
    return TorchSource(path, kind, obj, tensors, keys, metadata, parametrized)


def load_runnable(path: Path, options: TorchOptions) -> torch.nn.Module | None:
    """The model as a callable torch module, to compare outputs before and after (None without architecture)."""
    with quiet():
        return _load_runnable(path, options)


def _load_runnable(path: Path, options: TorchOptions) -> torch.nn.Module | None:
    kind = check_torch_file(path, options.trust_pickle)
    if kind == "torchscript":
        return torch.jit.load(str(path), map_location="cpu").eval()
    if kind == "pt2":
        return torch.export.load(str(path)).module()
    if kind == "safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        obj = unpickle(path, options.trust_pickle)
        state, _ = find_weights(obj, path)
        if isinstance(state, torch.nn.Module):
            return state.eval()
    if options.model is None:
        return None
    module = build_module(options.model, options.model_kwargs)
    load_weights(module, module_state(module, strip_wrapper_prefixes(state)), path.name)
    return module.eval()
