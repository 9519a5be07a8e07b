"""Spectral normalization as a training-time parametrization, with convolutions normalised by their
operator norm at the layer's input size (not by their reshaped kernel, as torch's spectral_norm does).

``parametrize(model, example)`` registers, on the ``weight`` of every Linear, Conv and ConvTranspose,
``weight -> weight * target / sigma(weight)`` where sigma is estimated by power iteration with persistent
vectors (like ``torch.nn.utils.parametrizations.spectral_norm``): ``n_power_iterations`` steps per
training-mode forward, none in eval mode, no gradient through the vectors. For a convolution the
operator is the one the layer applies to its actual input (sizes found by running the example through
the model once with forward hooks). ``conv_norm`` chooses what is normalised:

- ``"operator"`` (default): the conv as lipcheck certifies it at that size, the circular convolution
  on the padded grid (power iteration on ``F.conv{d}d`` after a circular wrap, adjoint
  ``F.conv_transpose{d}d`` folded back). Its sigma bounds the zero-padded operator's from above, so the
  exported model's certified per-layer norm is the target and the true norm is at most the target.
  Convs with a padding mode other than zeros (whose padding repeats entries) get ``"exact"`` instead.
- ``"exact"``: the zero-padded operator itself (``F.conv{d}d`` with the layer's stride, padding,
  dilation and groups; adjoint ``F.conv_transpose{d}d`` with the output padding that restores the input
  size). Its true norm is the target; lipcheck's certificate can be a few percent above on small maps.
- ``"reshape"``: torch's reshaped kernel, which can be several times below the operator norm.

Power iteration approaches sigma from below and lags weights that move fast (measured: a tiny CNN under
Adam at lr 1e-3 reached 1.3x the target between steps with one step per forward), so during training a
layer's norm can sit above the target. ``remove_parametrizations`` bakes with the exact sigma, and the
certified statement is lipcheck's report on the saved model.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

from lipcheck.errors import LipcheckError
from lipcheck.spectral.conv import ConvGeometry, conv_operator_norm

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORMALISED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, *CONV_TYPES, *CONV_TRANSPOSE_TYPES)
CONV_NORMS = ("operator", "exact", "reshape")

# Most power-iteration steps at registration, so that sigma starts out converged (a handful usually
# suffice for convs); iteration stops once sigma changes by less than SETTLED_RTOL over CHECK_EVERY steps.
WARM_START_ITERATIONS = 50
# Most steps when baking a layer whose sigma has no closed form (conv_norm="exact").
BAKE_ITERATIONS = 1000
SETTLED_RTOL = 2e-5
CHECK_EVERY = 10

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class ParametrizeError(LipcheckError, ValueError):
    """The model or the options do not allow the parametrization (one line, for the CLI's exit code 2)."""


LayerShapes = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # qualified name -> (input shape, output shape)


class SpectralNormalisation(nn.Module):
    """``weight -> weight * target / sigma`` with sigma = <u, A(weight) v> from persistent power iteration.

    Subclasses define the linear map A(weight) and its adjoint; ``_u`` lives in A's output space and
    ``_v`` in its input space. Power iteration gives an estimate of sigma from below (it converges to
    the largest singular value): the certified check is lipcheck's report on the saved model.
    """

    _u: torch.Tensor  # buffers (registered in ``start``)
    _v: torch.Tensor

    def __init__(self, target: float, n_power_iterations: int, eps: float) -> None:
        super().__init__()
        if not target > 0 or not math.isfinite(target):
            raise ParametrizeError(f"target must be a positive number, got {target}")
        if n_power_iterations < 1:
            raise ParametrizeError(f"n_power_iterations must be >= 1, got {n_power_iterations}")
        self.target = float(target)
        self.n_power_iterations = int(n_power_iterations)
        self.eps = float(eps)
        self.use_exact_sigma = False  # parametrize(exact_sigma=True): SVDs at every forward, no power iteration

    def apply_map(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint_map(self, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _init_vectors(self, weight: torch.Tensor, u_shape: Sequence[int], v_shape: Sequence[int]) -> None:
        generator = torch.Generator(device="cpu").manual_seed(0)  # reproducible start, whatever the global seed
        u = torch.randn(tuple(u_shape), generator=generator, dtype=torch.float64)
        v = torch.randn(tuple(v_shape), generator=generator, dtype=torch.float64)
        self.register_buffer("_u", (u / u.norm()).to(device=weight.device, dtype=weight.dtype))
        self.register_buffer("_v", (v / v.norm()).to(device=weight.device, dtype=weight.dtype))
        self.converge(weight)

    @torch.no_grad()
    def converge(self, weight: torch.Tensor, max_steps: int = WARM_START_ITERATIONS) -> int:
        """Power-iterate until sigma settles (or ``max_steps``); returns the steps taken."""
        weight = weight.detach()
        previous = float(self.sigma(weight))
        for done in range(CHECK_EVERY, max_steps + CHECK_EVERY, CHECK_EVERY):
            self.power_iterate(weight, min(CHECK_EVERY, max_steps - done + CHECK_EVERY))
            current = float(self.sigma(weight))
            if abs(current - previous) <= SETTLED_RTOL * abs(current):
                return min(done, max_steps)
            previous = current
        return max_steps

    @torch.no_grad()
    def power_iterate(self, weight: torch.Tensor, steps: int) -> None:
        """``steps`` power-iteration steps, in place (so DataParallel replicas update the original buffers)."""
        weight = weight.detach()
        for _ in range(steps):
            self._u.copy_(_normalised(self.apply_map(weight, self._v), self.eps))
            self._v.copy_(_normalised(self.adjoint_map(weight, self._u), self.eps))

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """The current estimate <u, A v>, differentiable in the weight (not in u and v)."""
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        return torch.sum(u * self.apply_map(weight, v))

    def converged_sigma(self, weight: torch.Tensor) -> float:
        """sigma as exactly as it can be had, for baking: subclasses with a closed form override this."""
        self.converge(weight, BAKE_ITERATIONS)
        return float(self.sigma(weight.detach()))

    def exact_sigma(self, weight: torch.Tensor) -> torch.Tensor | None:
        """sigma computed exactly and differentiably (SVDs), where the subclass has a way; else None."""
        return None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        sigma = self.exact_sigma(weight) if self.use_exact_sigma else None
        if sigma is None:
            if self.training:
                self.power_iterate(weight, self.n_power_iterations)
            sigma = self.sigma(weight)
        return weight * (self.target / sigma.clamp_min(self.eps))

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        """Assigning ``layer.weight = W`` stores W as the unnormalised weight (as torch's spectral_norm does)."""
        return value


class MatrixSpectralNorm(SpectralNormalisation):
    """sigma of the weight as a matrix: rows along ``dim``, everything else flattened into columns.

    For a Linear this is the layer's exact operator norm; for a conv it is torch's reshaped-kernel
    quantity (``dim=0``; ``dim=1`` for ConvTranspose), which can be several times below the operator norm.
    """

    def __init__(
        self, weight: torch.Tensor, target: float = 1.0, n_power_iterations: int = 1, eps: float = 1e-12, dim: int = 0
    ) -> None:
        super().__init__(target, n_power_iterations, eps)
        self.dim = dim
        rows, cols = self._matrix(weight).shape
        self._init_vectors(weight, (rows,), (cols,))

    def _matrix(self, weight: torch.Tensor) -> torch.Tensor:
        if self.dim != 0:
            weight = weight.movedim(self.dim, 0)
        return weight.flatten(1)

    def converged_sigma(self, weight: torch.Tensor) -> float:
        """The matrix's largest singular value, by SVD in float64."""
        return float(torch.linalg.matrix_norm(self._matrix(weight.detach()).double(), ord=2))

    def exact_sigma(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_norm(self._matrix(weight), ord=2)

    def apply_map(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.mv(self._matrix(weight), x)

    def adjoint_map(self, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.mv(self._matrix(weight).t(), y)


class ZeroPaddedConvSpectralNorm(SpectralNormalisation):
    """sigma of the linear operator a (transposed) convolution applies to an input of a known size.

    ``apply_map`` is the layer's own forward without bias (zero padding, stride, dilation, groups; other
    padding modes pad explicitly first); the adjoint is the transposed operation, with the output
    padding that gives back the input's size. Where the closed-form adjoint does not fit (padding
    modes other than zeros, ``padding="same"``), the adjoint is taken by autograd.
    """

    def __init__(
        self,
        layer: Any,
        weight: torch.Tensor,
        input_shape: Sequence[int],
        output_shape: Sequence[int],
        target: float = 1.0,
        n_power_iterations: int = 1,
        eps: float = 1e-12,
    ) -> None:
        super().__init__(target, n_power_iterations, eps)
        self.transposed = isinstance(layer, CONV_TRANSPOSE_TYPES)
        self.spatial_dims = weight.dim() - 2
        self.stride = tuple(layer.stride)
        self.dilation = tuple(layer.dilation)
        self.groups = int(layer.groups)
        self.padding: Any = layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)
        self.padding_mode = layer.padding_mode
        self.explicit_pad = tuple(getattr(layer, "_reversed_padding_repeated_twice", ()))
        in_shape = (1, *input_shape[-self.spatial_dims - 1 :])
        out_shape = (1, *output_shape[-self.spatial_dims - 1 :])
        kernel = weight.shape[2:]
        spatial_in, spatial_out = in_shape[2:], out_shape[2:]
        if self.transposed:
            # the layer's forward may be called with output_size: take the padding from the recorded sizes
            self.output_padding = tuple(
                o - ((n - 1) * s - 2 * p + d * (k - 1) + 1)
                for o, n, s, p, d, k in zip(
                    spatial_out, spatial_in, self.stride, self.padding, self.dilation, kernel, strict=True
                )
            )
            self.adjoint_padding = (0,) * self.spatial_dims  # unused: the adjoint is a plain conv
        else:
            self.output_padding = (0,) * self.spatial_dims
            if not isinstance(self.padding, str):
                self.adjoint_padding = tuple(
                    n - ((m - 1) * s - 2 * p + d * (k - 1) + 1)
                    for n, m, s, p, d, k in zip(
                        spatial_in, spatial_out, self.stride, self.padding, self.dilation, kernel, strict=True
                    )
                )
        self.closed_form_adjoint = self._closed_form_fits(in_shape, out_shape)
        self._init_vectors(weight, out_shape, in_shape)
        if self.closed_form_adjoint and not _adjoint_checks(self, weight):
            self.closed_form_adjoint = False
            self.converge(weight)

    def _closed_form_fits(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> bool:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return False
        if self.transposed:
            return all(0 <= p < s for p, s in zip(self.output_padding, self.stride, strict=True))
        return all(0 <= p < max(s, d) for p, s, d in zip(self.adjoint_padding, self.stride, self.dilation, strict=True))

    def apply_map(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        d = self.spatial_dims
        if self.transposed:
            return _CONV_TRANSPOSE_FN[d](
                x, weight, None, self.stride, self.padding, self.output_padding, self.groups, self.dilation
            )
        if self.padding_mode != "zeros":
            x = F.pad(x, self.explicit_pad, mode=self.padding_mode)
            return _CONV_FN[d](x, weight, None, self.stride, 0, self.dilation, self.groups)
        return _CONV_FN[d](x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def adjoint_map(self, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = self.spatial_dims
        if not self.closed_form_adjoint:
            return _autograd_adjoint(self, weight, y)
        if self.transposed:
            return _CONV_FN[d](y, weight, None, self.stride, self.padding, self.dilation, self.groups)
        return _CONV_TRANSPOSE_FN[d](
            y, weight, None, self.stride, self.padding, self.adjoint_padding, self.groups, self.dilation
        )


class CircularConvSpectralNorm(SpectralNormalisation):
    """sigma of the conv as lipcheck certifies it at a known input size: the circular convolution on the
    padded input grid, rounded up to a multiple of the stride (``lipcheck.spectral.conv.conv_norm_known_size``).

    The zero-padded conv on the actual input is a restriction of this operator, so its true norm is at
    most this sigma; normalising this sigma makes lipcheck's certified per-layer norm equal the target
    (the exact operator norm of a small feature map can be a few percent lower, from boundary effects).
    A ConvTranspose is treated through its adjoint conv (same weight, stride, dilation, groups; no
    padding), which has the same norm. ``input_length`` is the circular grid's length per spatial dim.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        input_length: Sequence[int],
        stride: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        target: float = 1.0,
        n_power_iterations: int = 1,
        eps: float = 1e-12,
    ) -> None:
        super().__init__(target, n_power_iterations, eps)
        self.spatial_dims = weight.dim() - 2
        self.stride, self.dilation, self.groups = tuple(stride), tuple(dilation), int(groups)
        self.input_length = tuple(int(n) for n in input_length)
        self.span = tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, weight.shape[2:], strict=True))
        out_length = tuple(n // s for n, s in zip(self.input_length, self.stride, strict=True))
        self.closed_form_adjoint = True
        self._init_vectors(weight, (1, weight.shape[0], *out_length), (1, weight.shape[1] * groups, *self.input_length))
        if not _adjoint_checks(self, weight):
            self.closed_form_adjoint = False
            self.converge(weight)

    def converged_sigma(self, weight: torch.Tensor) -> float:
        """lipcheck's certified norm of this circular conv (per-frequency SVDs, with its rounding margin)."""
        geometry = ConvGeometry.default(
            self.spatial_dims,
            stride=self.stride,
            dilation=self.dilation,
            groups=self.groups,
            input_size=self.input_length,
            circular=True,
        )
        return conv_operator_norm(weight.detach().double(), geometry).value

    def exact_sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """Largest singular value over frequencies of the aliased kernel spectrum, differentiably.

        The kernel (dilated, wrapped onto the grid L = s * m) is Fourier-transformed on L; output
        frequency theta of the strided conv gathers the s^d aliases theta + j * m, so sigma is
        max_theta sigma_max([K(theta + j m)]_j) / sqrt(s^d), per group.
        """
        d, g = self.spatial_dims, self.groups
        co, ci_group = weight.shape[:2]
        kernel = weight.reshape(g, co // g, ci_group, *weight.shape[2:])
        for axis in range(d):  # the dilated taps' positions on the circular grid (summed where they wrap)
            dim = 3 + axis
            positions = torch.arange(kernel.shape[dim], device=weight.device) * self.dilation[axis]
            shape = list(kernel.shape)
            shape[dim] = self.input_length[axis]
            kernel = kernel.new_zeros(shape).index_add(dim, positions % self.input_length[axis], kernel)
        spectrum = torch.fft.fftn(kernel, dim=tuple(range(3, 3 + d)))
        bases = [n // s for n, s in zip(self.input_length, self.stride, strict=True)]
        split = [g, co // g, ci_group]
        for s, m in zip(self.stride, bases, strict=True):
            split += [s, m]  # frequency index = alias * m + base
        order = [0, *(4 + 2 * a for a in range(d)), 1, 2, *(3 + 2 * a for a in range(d))]
        matrices = spectrum.reshape(split).permute(order).reshape(g * math.prod(bases), co // g, -1)
        return torch.linalg.matrix_norm(matrices, ord=2).max() / math.sqrt(math.prod(self.stride))

    def _wrap_index(self, axis: int, device: torch.device) -> torch.Tensor:
        length = self.input_length[axis]
        return torch.arange(length + self.span[axis] - 1, device=device) % length

    def apply_map(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for axis in range(self.spatial_dims):  # circular padding at the end, any length (F.pad caps it)
            x = x.index_select(2 + axis, self._wrap_index(axis, x.device))
        return _CONV_FN[self.spatial_dims](x, weight, None, self.stride, 0, self.dilation, self.groups)

    def adjoint_map(self, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.closed_form_adjoint:
            return _autograd_adjoint(self, weight, y)
        output_padding = tuple(s - 1 for s in self.stride)
        x = _CONV_TRANSPOSE_FN[self.spatial_dims](
            y, weight, None, self.stride, 0, output_padding, self.groups, self.dilation
        )
        for axis in range(self.spatial_dims):  # the adjoint of the wrap-around: add the tail back onto the head
            shape = list(x.shape)
            shape[2 + axis] = self.input_length[axis]
            x = x.new_zeros(shape).index_add_(2 + axis, self._wrap_index(axis, x.device), x)
        return x


def _adjoint_checks(normalisation: SpectralNormalisation, weight: torch.Tensor) -> bool:
    """<A v, u> == <v, A* u> on random vectors, in float64: guards the closed-form adjoint's geometry."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    w = weight.detach().to(torch.float64)
    v = torch.randn(normalisation._v.shape, generator=generator, dtype=torch.float64).to(w.device)
    u = torch.randn(normalisation._u.shape, generator=generator, dtype=torch.float64).to(w.device)
    try:
        with torch.no_grad():
            forward, backward = normalisation.apply_map(w, v), normalisation.adjoint_map(w, u)
    except RuntimeError:
        return False
    if forward.shape != u.shape or backward.shape != v.shape:
        return False
    left, right = float(torch.sum(forward * u)), float(torch.sum(v * backward))
    return abs(left - right) <= 1e-9 * max(1.0, abs(left), abs(right))


def _autograd_adjoint(normalisation: SpectralNormalisation, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A* y as the gradient of <A x, y> in x (A is linear, so any x will do)."""
    with torch.enable_grad():
        x = torch.zeros(normalisation._v.shape, dtype=y.dtype, device=y.device, requires_grad=True)
        (gradient,) = torch.autograd.grad(normalisation.apply_map(weight.detach(), x), x, grad_outputs=y)
    return gradient


def _frozen(parametrization: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The parametrization's output in eval mode (no power-iteration step)."""
    training = parametrization.training
    parametrization.eval()
    try:
        return parametrization(weight)
    finally:
        parametrization.train(training)


def _normalised(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / x.norm().clamp_min(eps)


def _matches(name: str, layers: str | None) -> bool:
    if layers is None:
        return True
    return any(fnmatch.fnmatchcase(name, pattern.strip()) for pattern in layers.split(",") if pattern.strip())


def _is_ours(layer: nn.Module) -> bool:
    if not torch_parametrize.is_parametrized(layer, "weight"):
        return False
    return any(isinstance(p, SpectralNormalisation) for p in layer.parametrizations["weight"])  # type: ignore[index]


def _record_shapes(module: nn.Module, layers: dict[str, nn.Module], example: tuple[torch.Tensor, ...]) -> LayerShapes:
    """Each layer's (input shape, output shape) on the example; the largest input where a layer runs twice."""
    shapes: LayerShapes = {}

    def hook_for(name: str):
        def hook(_layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
            seen = (tuple(args[0].shape), tuple(output.shape))
            if name not in shapes or math.prod(seen[0]) > math.prod(shapes[name][0]):
                shapes[name] = seen

        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    modes = {sub: sub.training for sub in module.modules()}
    try:
        module.eval()  # no BatchNorm statistics update, no power-iteration step
        with torch.no_grad():
            module(*example)
    finally:
        for handle in handles:
            handle.remove()
        for sub, training in modes.items():
            sub.training = training
    return shapes


def circular_grid(layer: Any, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Length per spatial dim of the circular grid lipcheck embeds the layer's conv in (a multiple of the stride).

    Conv: the padded input, rounded up to the stride. ConvTranspose: its adjoint conv's input, the
    uncropped output (n - 1) * s + dilation * (k - 1) + 1, rounded up likewise.
    """
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    spatial = tuple(input_shape[-len(kernel) :])
    spans = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
    if isinstance(layer, CONV_TRANSPOSE_TYPES):
        lengths = [(n - 1) * s + e for n, s, e in zip(spatial, stride, spans, strict=True)]
    elif isinstance(layer.padding, str):
        lengths = [n + (e - 1 if layer.padding == "same" else 0) for n, e in zip(spatial, spans, strict=True)]
    else:
        lengths = [n + 2 * p for n, p in zip(spatial, layer.padding, strict=True)]
    return tuple(math.ceil(n / s) * s for n, s in zip(lengths, stride, strict=True))


def _example(module: nn.Module, example_inputs, input_shape: Sequence[int] | None) -> tuple[torch.Tensor, ...]:
    if example_inputs is not None:
        return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if input_shape is None:
        raise ParametrizeError("convolutions are normalised at their input size: give example_inputs or input_shape")
    reference = next(iter(module.parameters()), None)
    device = reference.device if reference is not None else None
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    return (torch.randn(tuple(int(n) for n in input_shape), device=device, dtype=dtype),)


def parametrize(
    module: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    target: float = 1.0,
    conv_norm: str = "operator",
    layers: str | None = None,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    exact_sigma: bool = False,
) -> nn.Module:
    """Register spectral normalization on every Linear, Conv{1,2,3}d and ConvTranspose{1,2,3}d weight, in place.

    ``weight = W * target / sigma(W)``. Linear: sigma of the matrix. Convolutions: sigma of the conv
    operator at the input size the layer sees when the model runs ``example_inputs`` (or a random input
    of ``input_shape``; a layer run at several sizes takes the largest), as lipcheck certifies it
    (``conv_norm="operator"``) or exactly (``"exact"``); ``"reshape"``: torch's reshaped-kernel sigma.
    ``layers``: fnmatch patterns on qualified names (``"layer1.*"``, or several separated by commas); only
    matching layers are normalised. Layers that already carry this parametrization are left as they are.
    Returns ``module``. Raises ``ParametrizeError`` (a ValueError) for options that do not fit the model.

    sigma is a power-iteration estimate (from below, ``n_power_iterations`` steps per training-mode
    forward, frozen in eval mode): certify the trained model with lipcheck's report on the saved weights.
    ``exact_sigma=True`` computes sigma exactly at every forward instead (differentiable SVDs: of the
    matrix, or of the conv's per-frequency matrices for ``"operator"``), so it does not lag the weights;
    it costs an FFT and a batched SVD per layer and forward (``"exact"`` convs keep power iteration).
    """
    if conv_norm not in CONV_NORMS:
        raise ParametrizeError(f"conv_norm must be one of {', '.join(CONV_NORMS)}, got {conv_norm!r}")
    SpectralNormalisation(target, n_power_iterations, eps)  # checks the numbers before anything is registered
    chosen = {
        name: layer
        for name, layer in module.named_modules()
        if isinstance(layer, NORMALISED_TYPES) and _matches(name, layers) and not _is_ours(layer)
    }
    if layers is not None and not chosen and not normalised_layers(module):
        raise ParametrizeError(f"no Linear, Conv or ConvTranspose layer matches {layers!r}")
    convs = {name: layer for name, layer in chosen.items() if not isinstance(layer, nn.Linear)}
    shapes: LayerShapes = {}
    if convs and conv_norm != "reshape":
        shapes = _record_shapes(module, convs, _example(module, example_inputs, input_shape))
        missing = sorted(set(convs) - set(shapes))
        if missing:
            raise ParametrizeError(
                f"these layers did not run on the example input, so their input size is unknown: {', '.join(missing)}"
            )
    for name, layer in chosen.items():
        normalisation = _normalisation(layer, shapes.get(name), conv_norm, target, n_power_iterations, eps)
        normalisation.use_exact_sigma = exact_sigma
        normalisation.train(layer.training)
        torch_parametrize.register_parametrization(layer, "weight", normalisation)
    return module


def _normalisation(
    layer: Any, shapes: Any, conv_norm: str, target: float, n_power_iterations: int, eps: float
) -> SpectralNormalisation:
    """The parametrization of one layer: matrix, reshaped kernel, exact operator or circular embedding."""
    weight = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        return MatrixSpectralNorm(weight, target, n_power_iterations, eps)
    if conv_norm == "reshape":
        dim = 1 if isinstance(layer, CONV_TRANSPOSE_TYPES) else 0
        return MatrixSpectralNorm(weight, target, n_power_iterations, eps, dim=dim)
    in_shape, out_shape = shapes
    if conv_norm == "operator" and _circular_on_input(layer, in_shape):
        # circular padding that the window spans exactly: the circular convolution on the input's own grid,
        # which lipcheck certifies exactly (its wrap Pad folded into the conv)
        spatial = in_shape[-(weight.dim() - 2) :]
        return CircularConvSpectralNorm(
            weight, spatial, layer.stride, layer.dilation, layer.groups, target, n_power_iterations, eps
        )
    if conv_norm == "exact" or getattr(layer, "padding_mode", "zeros") != "zeros":
        # reflect / replicate / circular padding repeats entries: only the exact operator includes that
        return ZeroPaddedConvSpectralNorm(layer, weight, in_shape, out_shape, target, n_power_iterations, eps)
    grid = circular_grid(layer, in_shape)
    return CircularConvSpectralNorm(
        weight, grid, layer.stride, layer.dilation, layer.groups, target, n_power_iterations, eps
    )


def _circular_on_input(layer: Any, in_shape: Sequence[int]) -> bool:
    """A stride-1 conv with circular padding of d (k - 1) in all, on a grid longer than its window."""
    if getattr(layer, "padding_mode", "zeros") != "circular" or isinstance(layer.padding, str):
        return False
    spatial = in_shape[-len(layer.kernel_size) :]
    return all(
        s == 1 and 2 * p == d * (k - 1) and d * (k - 1) < n
        for s, p, d, k, n in zip(layer.stride, layer.padding, layer.dilation, layer.kernel_size, spatial, strict=True)
    )


def normalised_layers(module: nn.Module) -> list[str]:
    """Qualified names of the layers whose weight carries this spectral-normalization parametrization."""
    return [name for name, layer in module.named_modules() if _is_ours(layer)]


def remove_parametrizations(module: nn.Module, exact: bool = True) -> nn.Module:
    """Bake the normalised weights in and drop the parametrizations, in place; returns ``module``.

    ``exact=True`` divides by sigma computed exactly rather than by the running power-iteration estimate
    (which lags a weight that moves fast): lipcheck's certified norm for ``conv_norm="operator"``, the SVD
    for matrices (Linear, ``"reshape"``), power iteration run to convergence for ``"exact"``. So the
    exported model's certified per-layer norms equal the target. ``exact=False`` bakes exactly the
    weights the model computes in eval mode now. The state_dict keys become the plain architecture's.
    """
    for _name, layer in list(module.named_modules()):
        if not _is_ours(layer):
            continue
        stack = layer.parametrizations["weight"]
        with torch.no_grad():
            weight = stack.original.detach()
            for parametrization in stack:  # each one transforms the output of the previous
                if exact and isinstance(parametrization, SpectralNormalisation):
                    sigma = max(parametrization.converged_sigma(weight), parametrization.eps)
                    weight = weight * (parametrization.target / sigma)
                else:
                    weight = _frozen(parametrization, weight)
        torch_parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        with torch.no_grad():
            layer.weight.copy_(weight)
    return module
