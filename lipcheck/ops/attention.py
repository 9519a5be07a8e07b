"""Transformer blocks: Attention, RotaryEmbedding, SwiGLU.

Attention (ONNX opset 23): Y = softmax(Q K^T * scale + bias) V, bias from the mask, causality and the cache.

Two of Q, K, V computed from the input multiply activations with each other: not globally Lipschitz. With
one of them variable the map is Lipschitz, row by row (each query row attends on its own):

* V only: Y = P V with the probabilities P constant: the exact norm, max over (batch, key/value head) of
  sigma_max of the probability rows that read that head (stacked over the query heads it serves).
* Q only: dY_i = scale V^T (diag(p_i) - p_i p_i^T) K dq_i, and ||diag(p) - p p^T|| <= 1/2, so
  scale ||K|| ||V|| / 2 per head (softcap's tanh has slope <= 1; masks only drop keys).
* K only: dY_i = scale V^T (diag(p_i) - p_i p_i^T) dK q_i, stacked over the query rows i:
  scale ||V|| ||Q||_F / 2 per key/value head (the Frobenius norm over the query rows that read it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lipcheck.ops.activations import swish, swish_constant
from lipcheck.ops.base import EvalContext, LocalBound, Op, RuleContext, UnsupportedVariant, register, unbounded

Q, K, V, MASK, PAST_KEY, PAST_VALUE, NONPAD = range(7)
CONSTANT_MARGIN = 1 + 1e-6  # the file's float32 probabilities against ours in float64


@dataclass
class Heads:
    """Q, K, V as [batch, heads, sequence, size] (K and V with the cache prepended), the additive bias
    [.., q, kv], the scale and how many query heads share one key/value head."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor
    scale: float
    group: int
    flat: bool  # 3-D inputs: Y goes back to [batch, sequence, heads * size]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, sequence, hidden = x.shape
    return x.reshape(batch, sequence, heads, hidden // heads).transpose(1, 2)


def heads(attrs: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: list[torch.Tensor | None]) -> Heads:
    """Everything but the two products, as ONNX's reference computes it."""
    mask, past_key, past_value, nonpad = (extra + [None] * 4)[:4]
    flat = q.dim() == 3
    if flat:
        q_heads, kv_heads = int(attrs["q_num_heads"]), int(attrs["kv_num_heads"])
        q, k, v = _split_heads(q, q_heads), _split_heads(k, kv_heads), _split_heads(v, kv_heads)
    scale = attrs.get("scale")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    past = 0 if past_key is None else past_key.shape[2]
    if past_key is not None and past_value is not None:
        k, v = torch.cat([past_key.to(k.dtype), k], 2), torch.cat([past_value.to(v.dtype), v], 2)
    bias = _bias(attrs, q, k, mask, past, nonpad)
    return Heads(q, k, v, bias, scale, q.shape[1] // k.shape[1], flat)


def _bias(
    attrs: dict, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, past: int, nonpad: torch.Tensor | None
) -> torch.Tensor:
    """The additive bias: the mask (bool: -inf where false; padded with -inf to the keys), then causality
    aligned to the bottom right (offset: the cache's length, or each batch's valid keys minus the queries)."""
    lq, lkv = q.shape[2], k.shape[2]
    bias = torch.zeros(lq, lkv, dtype=q.dtype, device=q.device)
    if mask is not None:
        mask = mask if mask.dtype == torch.bool else mask.to(q.dtype)
        if lkv > mask.shape[-1]:
            fill = False if mask.dtype == torch.bool else -math.inf
            mask = torch.nn.functional.pad(mask, (0, lkv - mask.shape[-1]), value=fill)
        if mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, -math.inf).to(q.dtype)
        bias = bias + mask
    columns = torch.arange(lkv, device=q.device)
    offset = torch.tensor(past, device=q.device)
    if past == 0 and nonpad is not None:
        offset = nonpad.reshape(-1, 1, 1, 1).to(torch.int64) - lq
    behind = torch.arange(lq, device=q.device).reshape(lq, 1) + offset - columns  # query position - key position
    allowed = torch.ones_like(behind, dtype=torch.bool)
    if int(attrs.get("is_causal") or 0):
        allowed &= behind >= 0
    left, right = int(attrs.get("left_window_size", -1)), int(attrs.get("right_window_size", -1))
    if left >= 0:
        allowed &= behind <= left
    if right >= 0:
        allowed &= -behind <= right
    bias = bias + torch.where(allowed, 0.0, -math.inf).to(q.dtype)
    if nonpad is not None:
        valid = columns < nonpad.reshape(-1, 1).to(torch.int64)
        bias = bias + torch.where(valid, 0.0, -math.inf).to(q.dtype).reshape(-1, 1, 1, lkv)
    return bias


def probabilities(attrs: dict, h: Heads) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scores + bias) with fully masked rows zero, and the scores (after softcap)."""
    k = h.k.repeat_interleave(h.group, dim=1)
    root = math.sqrt(h.scale)
    scores = (h.q * root) @ (k * root).transpose(-1, -2)
    softcap = float(attrs.get("softcap") or 0.0)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    logits = scores + h.bias
    masked = torch.isneginf(h.bias.amax(-1, keepdim=True))
    safe = torch.where(torch.isneginf(logits.amax(-1, keepdim=True)), 0.0, logits.amax(-1, keepdim=True))
    weights = torch.exp(logits - safe.detach())
    total = weights.sum(-1, keepdim=True)
    p = weights / torch.where(total == 0, 1.0, total)
    return torch.where(masked, 0.0, p), (scores if int(attrs.get("qk_matmul_output_mode") or 0) != 2 else logits)


@register
class Attention(Op):
    """softmax(Q K^T scale + bias) V: see the module docstring for the three one-variable constants."""

    attributes = {
        "is_causal": 0,
        "softcap": 0.0,
        "qk_matmul_output_mode": 0,
        "left_window_size": -1,
        "right_window_size": -1,
    }

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        sides = [name for name, inputs in (("Q", (Q,)), ("K", (K, PAST_KEY)), ("V", (V, PAST_VALUE)))
                 if any(ctx.is_variable(i) for i in inputs)]  # fmt: skip
        if len(sides) >= 2:
            return unbounded(
                f"attention multiplies {' and '.join(sides)} computed from the input: softmax(Q K^T) V is a "
                "product of activations (not globally Lipschitz)"
            )
        if ctx.is_variable(MASK) or ctx.is_variable(NONPAD):
            raise UnsupportedVariant("Attention(a mask computed from the input)")
        if any(ctx.output_used(i) for i in (1, 2, 3)):
            raise UnsupportedVariant("Attention(present key/value or scores read)")
        if not sides:
            return LocalBound(0.0, "constant", exact=True)
        return _one_side(ctx, sides[0])

    def evaluate(
        self, ctx: EvalContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *extra: torch.Tensor | None
    ) -> tuple:
        h = heads(dict(ctx.attrs), q, k, v, list(extra))
        p, scores = probabilities(dict(ctx.attrs), h)
        y = p @ h.v.repeat_interleave(h.group, dim=1)
        if h.flat:
            y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
        mode = int(ctx.attrs.get("qk_matmul_output_mode") or 0)
        return y, h.k, h.v, (p if mode == 3 else scores)


def _one_side(ctx: RuleContext, side: str) -> LocalBound:
    """The constant w.r.t. the one variable side, from the constant others (the variable one's shape)."""
    values: list[torch.Tensor | None] = []
    for index in range(len(ctx.node.inputs)):
        value = ctx.const(index)
        if value is None and ctx.node.inputs[index]:
            shape = ctx.shape(index)
            if shape is None or any(d is None for d in shape):
                raise UnsupportedVariant("Attention(shapes unknown: give --input-shape)")
            value = np.zeros([int(d) for d in shape if d is not None])
        values.append(None if value is None else torch.tensor(value, dtype=torch.float64))
    values += [None] * (NONPAD + 1 - len(values))
    if values[MASK] is not None and ctx.graph.dtype(ctx.node.inputs[MASK]) == "bool":
        values[MASK] = values[MASK].to(torch.bool)  # type: ignore[union-attr]
    h = heads(dict(ctx.attrs), values[Q], values[K], values[V], values[3:])  # type: ignore[arg-type]
    if side == "V":
        p, _ = probabilities(dict(ctx.attrs), h)
        past = h.v.shape[2] - (values[V].shape[-2] if values[V].dim() == 4 else values[V].shape[1])  # type: ignore[union-attr]
        blocks = p[..., past:].reshape(p.shape[0], -1, h.group * p.shape[2], p.shape[3] - past)
        norm = float(torch.linalg.matrix_norm(blocks, ord=2).max()) if blocks.numel() else 0.0
        return LocalBound(norm * CONSTANT_MARGIN, "Y = P V: max sigma_max of the probabilities per head", exact=True)
    k_norms = torch.linalg.matrix_norm(h.k, ord=2)
    v_norms = torch.linalg.matrix_norm(h.v, ord=2)
    if side == "Q":
        bound = 0.5 * h.scale * float((k_norms * v_norms).max())
        return LocalBound(bound * CONSTANT_MARGIN, "scale ||K|| ||V|| / 2 per head (softmax's slope <= 1/2)")
    q_rows = h.q.reshape(h.q.shape[0], k_norms.shape[1], -1).norm(dim=-1)  # Frobenius over the rows of a group
    bound = 0.5 * h.scale * float((q_rows * v_norms).max())
    return LocalBound(bound * CONSTANT_MARGIN, "scale ||Q||_F ||V|| / 2 per key/value head (softmax's slope <= 1/2)")


@register
class RotaryEmbedding(Op):
    """Rotates pairs of entries by the cached angles: [c -s; s c] has norm sqrt(c^2 + s^2) (1 for true
    rotations); entries beyond rotary_embedding_dim pass through. Caches computed from the input multiply it."""

    attributes = {"interleaved": 0, "rotary_embedding_dim": 0, "num_heads": 0}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        cos, sin = ctx.const(1), ctx.const(2)
        if cos is None or sin is None:
            return unbounded("RotaryEmbedding with cos/sin caches computed from the input multiplies them with it")
        c, s = np.asarray(cos, np.float64), np.asarray(sin, np.float64)
        scale = float(np.sqrt(c * c + s * s).max()) if c.size else 0.0
        shape, rotated = ctx.shape(0), int(ctx.attrs["rotary_embedding_dim"])
        passes = rotated > 0 and (shape is None or None in shape or rotated < _head_size(shape, ctx.attrs))
        value = max(scale, 1.0) if passes else scale
        return LocalBound(value * (1 + 1e-12), "max over cached angles of sqrt(cos^2 + sin^2)", exact=True)

    def evaluate(
        self,
        ctx: EvalContext,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shape = x.shape
        x = x.transpose(1, 2) if x.dim() == 4 else x.reshape(shape[0], shape[1], int(ctx.attrs["num_heads"]), -1)
        rotated = int(ctx.attrs["rotary_embedding_dim"]) or x.shape[3]
        if positions is not None:
            cos, sin = cos[positions.to(torch.int64)], sin[positions.to(torch.int64)]
        cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
        part, rest = x[..., :rotated], x[..., rotated:]
        interleaved = bool(int(ctx.attrs["interleaved"]))
        x1, x2 = (part[..., 0::2], part[..., 1::2]) if interleaved else part.chunk(2, dim=-1)
        real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
        part = torch.stack([real, imag], -1).reshape(part.shape) if interleaved else torch.cat([real, imag], -1)
        out = torch.cat([part, rest], -1)
        return out.reshape(shape) if len(shape) == 3 else out.transpose(1, 2)


def _head_size(shape: tuple, attrs: Any) -> int:
    return int(shape[3]) if len(shape) == 4 else int(shape[2]) // max(int(attrs["num_heads"]), 1)


@register
class SwiGLU(Op):
    """Swish(A) * B: a product of two activations (not globally Lipschitz); with B constant, Swish's constant
    times max |B|; with A constant, max |Swish(A)|."""

    attributes = {"alpha": 1.0}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        a, b = ctx.const(0), ctx.const(1)
        if a is None and b is None:
            return unbounded("SwiGLU multiplies Swish(A) by B, both computed from the input")
        alpha = float(ctx.attrs["alpha"])
        if b is not None:
            bound = swish_constant(alpha) * float(np.abs(b).max(initial=0.0)) * (1 + 1e-15)
            return LocalBound(bound, "max|Swish'| max|B|")
        gate = swish(torch.as_tensor(a, dtype=torch.float64), alpha)
        return LocalBound(float(gate.abs().max()) * (1 + 1e-12), "max |Swish(A)|", exact=True)

    def evaluate(self, ctx: EvalContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return swish(a, float(ctx.attrs["alpha"])) * b
