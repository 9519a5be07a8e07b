"""Attention (ONNX opset 23): softmax(Q K^T / sqrt(d)) V multiplies activations with each other."""

from __future__ import annotations

import math

import torch

from lipcheck.graph import Node
from lipcheck.ops.base import EvalContext, LocalBound, Op, RuleContext, UnsupportedVariant, register, unbounded


@register
class Attention(Op):
    """softmax(Q K^T) V: with two of Q, K, V computed from the input, not globally Lipschitz."""

    attributes = {"is_causal": 0, "softcap": 0.0}

    def lipschitz(self, ctx: RuleContext) -> LocalBound:
        variable = [name for index, name in enumerate("QKV") if ctx.is_variable(index)]
        if len(variable) >= 2:
            return unbounded(
                f"attention multiplies {' and '.join(variable)} computed from the input: softmax(Q K^T) V is a "
                "product of activations (not globally Lipschitz)"
            )
        raise UnsupportedVariant(f"Attention(only {''.join(variable) or 'the mask'} from the input)")

    def check(self, node: Node) -> None:
        """The plain form only: 4-D Q, K, V, no mask, no cache, not causal, no softcap."""
        extra = [i for i in node.inputs[3:] if i] or [o for o in node.outputs[1:] if o]
        if extra or int(node.attrs.get("is_causal") or 0) or float(node.attrs.get("softcap") or 0.0):
            raise UnsupportedVariant("Attention(with a mask, a cache, causal or softcap)")

    def evaluate(self, ctx: EvalContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: object) -> torch.Tensor:
        if q.dim() != 4:
            raise ValueError("Attention: 4-D Q, K, V [batch, heads, sequence, size] only")
        scale = ctx.attrs.get("scale")
        scale = float(scale) if scale else 1.0 / math.sqrt(q.shape[-1])
        if k.shape[1] != q.shape[1]:  # grouped-query attention: each K, V head serves several Q heads
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
