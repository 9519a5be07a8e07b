"""Signal processing and caches: the discrete Fourier transform, and writing a key/value cache.

The unnormalised DFT matrix F of length m has F F* = m I: every singular value is sqrt(m), whether the input
is real (a column restriction) or complex, truncated or zero-padded to m (a selection), and keeping the first
m/2 + 1 frequencies (rows) keeps the constant-input direction: sqrt(m) exactly. The inverse is F* / m:
1/sqrt(m). The one-sided inverse (irfft) doubles each bin but DC and Nyquist: sqrt(2/m).
"""

from __future__ import annotations

import math

import torch

from lipcheck.ops.base import (
    EvalContext,
    LocalBound,
    Op,
    RuleContext,
    UnsupportedVariant,
    axis_index,
    register,
    unbounded,
)
from lipcheck.ops.shape import ints


@register
class DFT(Op):
    """Discrete Fourier transform along an axis (real inputs [..., 1], complex [..., 2]): see the module."""

    attributes = {"inverse": 0, "onesided": 0}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        length = self._length(ctx)
        if length is None:
            return unbounded("DFT of a length known only at run time: sqrt(length) is not bounded", "unknown shape")
        inverse, onesided = int(ctx.attrs["inverse"]), int(ctx.attrs["onesided"])
        if not inverse:
            return LocalBound(math.sqrt(length) * (1 + 1e-12), f"DFT of length {length}: sqrt({length})", exact=True)
        if onesided:
            return LocalBound(math.sqrt(2 / length) * (1 + 1e-12), f"inverse one-sided DFT: sqrt(2/{length})")
        return LocalBound(1 / math.sqrt(length) * (1 + 1e-12), f"inverse DFT: 1/sqrt({length})", exact=True)

    def _length(self, ctx: RuleContext) -> int | None:
        """The transform's length m: dft_length, else the input's size along the axis."""
        if ctx.has_input(1):
            length = ctx.const(1)
            return None if length is None else int(length.reshape(-1)[0])
        if ctx.known_only_at_run_time(2):
            return None
        shape = ctx.shape(0)
        given = ctx.const(2)
        axis = int(given.reshape(-1)[0]) if given is not None else int(ctx.attrs.get("axis", -2))
        size = shape[axis_index(axis, len(shape))] if shape is not None else None
        if size is None:
            return None
        n = int(size)
        return 2 * (n - 1) if int(ctx.attrs["inverse"]) and int(ctx.attrs["onesided"]) else n

    def evaluate(
        self, ctx: EvalContext, x: torch.Tensor, length: torch.Tensor | None = None, axis: torch.Tensor | None = None
    ) -> torch.Tensor:
        dim = axis_index(ints(axis)[0] if axis is not None else int(ctx.attrs.get("axis", -2)), x.dim())
        if dim == x.dim() - 1:
            raise UnsupportedVariant("DFT along the last (real/imaginary) axis")
        signal = x[..., 0] if x.shape[-1] == 1 else torch.complex(x[..., 0], x[..., 1])
        inverse, onesided = int(ctx.attrs["inverse"]), int(ctx.attrs["onesided"])
        n = int(ints(length)[0]) if length is not None else None
        if inverse and onesided:
            size = n if n is not None else 2 * (x.shape[dim] - 1)
            return torch.fft.irfft(signal, n=size, dim=dim).unsqueeze(-1)
        result = torch.fft.ifft(signal, n=n, dim=dim) if inverse else torch.fft.fft(signal, n=n, dim=dim)
        if onesided and not inverse:
            result = result.narrow(dim, 0, result.shape[dim] // 2 + 1)
        return torch.stack([result.real, result.imag], -1)


@register
class TensorScatter(Op):
    """Writes the update into the cache at each batch entry's write index (wrapping in circular mode): every
    output entry is one cache or one update entry, 1."""

    attributes = {"mode": "linear", "axis": -2}
    piecewise_linear = True

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        return LocalBound(1.0, "each output entry is one cache or update entry", exact=True)

    def evaluate(
        self, ctx: EvalContext, cache: torch.Tensor, update: torch.Tensor, write: torch.Tensor | None = None
    ) -> torch.Tensor:
        axis = axis_index(int(ctx.attrs["axis"]), cache.dim())
        if axis == 0:
            raise UnsupportedVariant("TensorScatter(axis=0)")
        starts = ints(write) if write is not None else [0] * cache.shape[0]
        circular, length = str(ctx.attrs["mode"]) == "circular", cache.shape[axis]
        out = cache.clone()
        for b, start in enumerate(starts):
            for step in range(update.shape[axis]):
                position = (start + step) % length if circular else start + step
                out[b].select(axis - 1, position).copy_(update[b].select(axis - 1, step))
        return out
