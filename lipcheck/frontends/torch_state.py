"""Module state that is not plain weights: torch's parametrizations, and forwards that change their own buffers.

A model trained with ``torch.nn.utils.parametrizations.spectral_norm`` saves no ``weight``: its state_dict
holds ``<layer>.parametrizations.weight.original`` and the power-iteration vectors ``...weight.0._u`` and
``...weight.0._v``, and the weight the layer computes with is, in eval mode, ``original / sigma`` with
``sigma = u . (W v)`` (W the original reshaped to a matrix along ``dim``: 0, or 1 for ConvTranspose). The
same holds for ``weight_norm`` (``original0`` = g, ``original1`` = v: ``g v / ||v||``) and for the older
hook-based ``torch.nn.utils.spectral_norm`` (``weight_orig``, ``weight_u``, ``weight_v``). lipcheck reads
the *effective* weight, as the module computes it in eval mode; ``Parametrized.scale`` rescales it in
the file's own keys (for ``normalize``: ``u / f`` multiplies a spectral-normalised weight by f, in eval
mode; training mode recomputes the vectors and its own normalization).

A forward that writes into its own buffers (a power iteration kept in a buffer, a running statistic) is a
different function at every call: ``watch_buffer_writes`` names the op that does it, before any tracing.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize
from torch.utils._python_dispatch import TorchDispatchMode

from lipcheck.errors import ModelLoadError

SPECTRAL, WEIGHT_NORM = "spectral_norm", "weight_norm"
# (kind, the effective tensor's key from the match, the keys it is computed from)
_PARAMETRIZED = "{p}.parametrizations.{n}"
_PATTERNS = [
    (SPECTRAL, r"^(.*)\.parametrizations\.([^.]+)\.original$", (_PARAMETRIZED + ".0._u", _PARAMETRIZED + ".0._v")),
    (WEIGHT_NORM, r"^(.*)\.parametrizations\.([^.]+)\.original0$", (_PARAMETRIZED + ".original1",)),
    (SPECTRAL, r"^(.*)\.([^.]+)_orig$", ("{p}.{n}_u", "{p}.{n}_v")),
]


@dataclass(frozen=True)
class Parametrized:
    """One effective tensor (``name``, e.g. ``fc.weight``) computed from the file's tensors ``keys``."""

    name: str
    kind: str
    keys: tuple[str, ...]  # spectral_norm: (original, u, v); weight_norm: (g, v)
    dim: int

    def effective(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The tensor the module computes in eval mode (no power iteration), in float64."""
        tensors = [state[k].detach().double() for k in self.keys]
        if self.kind == WEIGHT_NORM:
            g, v = tensors
            return torch._weight_norm(v, g, self.dim)
        weight, u, v = tensors
        if weight.dim() == 1:
            return F.normalize(weight, dim=0, eps=1e-12)
        return weight / torch.vdot(u, _matrix(weight, self.dim) @ v)

    def scale(self, state: Mapping[str, torch.Tensor], factor: float) -> None:
        """Multiply the effective tensor by ``factor`` (> 0) by editing the file's tensors in place."""
        target = state[self.keys[0] if self.kind == WEIGHT_NORM else self.keys[1]]  # g, or u (sigma ~ u)
        if self.kind == SPECTRAL and state[self.keys[0]].dim() == 1:
            raise ModelLoadError(f"{self.name}: a spectral-normalised vector has norm 1 whatever its scale")
        with torch.no_grad():
            target.mul_(factor if self.kind == WEIGHT_NORM else 1.0 / factor)


def _matrix(weight: torch.Tensor, dim: int) -> torch.Tensor:
    return weight.movedim(dim, 0).reshape(weight.shape[dim], -1)


def find_parametrized(
    state: Mapping[str, torch.Tensor], transposed: Callable[[str], bool] | None = None
) -> list[Parametrized]:
    """Every parametrized tensor in a state_dict (``transposed(layer)``: whether it is a ConvTranspose, when the
    module is known). Raises for parametrization keys lipcheck cannot compute the tensor of."""
    found = []
    for key in state:
        for kind, pattern, others in _PATTERNS:
            match = re.match(pattern, key)
            if match is None:
                continue
            prefix, name = match.groups()
            keys = (key, *(o.format(p=prefix, n=name) for o in others))
            if all(k in state for k in keys):
                found.append(Parametrized(f"{prefix}.{name}", kind, keys, _dim(kind, state, keys, prefix, transposed)))
                break
    used = {k for p in found for k in p.keys}
    unknown = sorted(k for k in state if ".parametrizations." in k and k not in used)
    if unknown:
        raise ModelLoadError(
            f"{unknown[0]}: a parametrization lipcheck cannot evaluate from the weights alone (it reads torch's "
            "spectral_norm and weight_norm); pass --model with a module that registers it"
        )
    return found


def _dim(kind: str, state: Mapping[str, torch.Tensor], keys: tuple[str, ...], prefix: str, transposed: Any) -> int:
    """The axis the parametrization normalises along: 0, or 1 for a ConvTranspose (spectral_norm's rule)."""
    if kind == WEIGHT_NORM:
        g = state[keys[0]]
        sizes = [i for i, n in enumerate(g.shape) if n != 1]
        return sizes[0] if len(sizes) == 1 else (0 if g.dim() == state[keys[1]].dim() else -1)
    weight, u, v = (state[k].detach().double() for k in keys)
    if weight.dim() < 2:
        return 0
    fits = [d for d in (0, 1) if weight.shape[d] == u.numel() and weight.numel() // weight.shape[d] == v.numel()]
    if transposed is not None and len(fits) == 2:
        return 1 if transposed(prefix) else 0
    if len(fits) == 2:  # square channels, module unknown: the axis along which v is W^T u's direction
        agree = [abs(float(F.cosine_similarity(_matrix(weight, d).T @ u, v, dim=0))) for d in fits]
        return fits[agree.index(max(agree))]
    return fits[0] if fits else 0


def effective_state(
    state: Mapping[str, torch.Tensor], transposed: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """The state_dict with every parametrized tensor replaced by its effective value under its plain key."""
    found = find_parametrized(state, transposed)
    if not found:
        return dict(state)
    hidden = {k for p in found for k in p.keys}
    result = {k: v for k, v in state.items() if k not in hidden}
    for p in found:
        result[p.name] = p.effective(state).to(state[p.keys[0]].dtype)
    return result


def module_transposed(module: nn.Module) -> Callable[[str], bool]:
    """Whether the submodule at a qualified name is a ConvTranspose (spectral_norm's dim 1)."""

    def transposed(name: str) -> bool:
        try:
            return isinstance(module.get_submodule(name), nn.modules.conv._ConvTransposeNd)
        except AttributeError:
            return False

    return transposed


def is_parametrized(module: nn.Module) -> bool:
    return any(torch_parametrize.is_parametrized(m) for m in module.modules())


def baked(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (in eval mode) with every parametrization replaced by the tensor it computes now,
    so that tracing sees plain weights under their plain names (``conv.weight``)."""
    if not is_parametrized(module):
        return module
    module = copy.deepcopy(module).eval()
    with torch.no_grad():
        for layer in list(module.modules()):
            if torch_parametrize.is_parametrized(layer):
                for name in list(layer.parametrizations):  # type: ignore[arg-type]
                    torch_parametrize.remove_parametrizations(layer, name, leave_parametrized=True)
    return module


# ---------------------------------------------------------------------- forwards that change their buffers


class _BufferWrites(TorchDispatchMode):
    """Records the ATen ops that write into one of the watched tensors' storage."""

    def __init__(self, watched: dict[int, str]):
        super().__init__()
        self.watched = watched
        self.writes: list[tuple[str, str]] = []  # (op, buffer)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        schema = getattr(func, "_schema", None)
        if schema is not None and schema.is_mutable:
            values = list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args) :]]
            for argument, value in zip(schema.arguments, values, strict=False):
                written = argument.alias_info is not None and argument.alias_info.is_write
                if written and isinstance(value, torch.Tensor) and _storage(value) in self.watched:
                    self.writes.append((f"aten.{schema.name.split('::')[-1]}", self.watched[_storage(value)]))
        return func(*args, **kwargs)


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (a NaN weight equals itself)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t for name, t in [*module.named_buffers(), *module.named_parameters()] if t.numel()}


def _put_back(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Restore a buffer or parameter the forward replaced by another tensor (``self.u = ...``)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    table = owner._parameters if leaf in owner._parameters else owner._buffers
    table[leaf] = tensor  # type: ignore[assignment]


@contextmanager
def watch_buffer_writes(module: nn.Module, shown: str) -> Iterator[None]:
    """Run the block (a forward of ``module``) and refuse a module whose forward changes its own buffers or
    parameters (in place, or by assigning new ones): one line naming the op and the buffer. The module's
    state is restored either way."""
    state = _state(module)
    saved = {name: t.detach().clone() for name, t in state.items()}
    watch = _BufferWrites({_storage(t): name for name, t in state.items()})
    try:
        with watch:
            yield
        now = _state(module)
        changed = [name for name, t in state.items() if now.get(name) is not t or not _same(t, saved[name])]
    finally:
        current = _state(module)
        for name, tensor in state.items():
            if current.get(name) is not tensor:
                _put_back(module, name, tensor)
            with torch.no_grad():
                tensor.copy_(saved[name])
    if watch.writes or changed:
        op, buffer = watch.writes[0] if watch.writes else ("an assignment", changed[0])
        raise ModelLoadError(
            f"{shown}: the forward changes its own buffer {buffer!r} at every call ({op}), as a power iteration "
            "does: its output depends on earlier calls, so it has no one Lipschitz constant; bake that state "
            "into plain weights first"
        )
