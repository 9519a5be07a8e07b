"""Exact evaluation of the linear ops lipcheck can fold, and their composed matrix with a rounding bound.

A run of consecutive linear (affine) nodes -- Gemm, MatMul, Conv, AveragePool, GlobalAveragePool,
BatchNormalization, Mul/Div/Add/Sub by constants, Neg, zero Pad, Flatten/Reshape/Transpose/... -- is one
affine map x -> J x + b. Its Lipschitz constant is sigma_max(J), which can be far below the product of
the nodes' norms. ``segment_operator`` builds J explicitly (the segment applied to the identity basis, in
float64) together with an elementwise bound on the rounding error, so the norm stays certified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lipcheck.graph import Graph, Node
from lipcheck.rules.linear import batchnorm_affine
from lipcheck.rules.structural import _avgpool_matrix
from lipcheck.spectral.dense import UNIT_ROUNDOFF, batched_sigma_max_upper

# ops evaluated here; Identity-like reshapes keep C order, so only the target shape matters
RESHAPES = ("Identity", "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze")
LINEAR_OPS = (
    "Gemm",
    "MatMul",
    "Conv",
    "AveragePool",
    "GlobalAveragePool",
    "BatchNormalization",
    "Mul",
    "Div",
    "Add",
    "Sub",
    "Neg",
    "Pad",
    "Transpose",
    "ReduceMean",
    *RESHAPES,
)


class NotFoldable(Exception):
    """The node is not an affine map of its one variable input that this module can evaluate exactly."""


def variable_inputs(node: Node, graph: Graph) -> list[int]:
    return [i for i, v in enumerate(node.inputs) if v and v not in graph.constants]


def _const(graph: Graph, node: Node, index: int) -> np.ndarray | None:
    if index >= len(node.inputs) or not node.inputs[index]:
        return None
    value = graph.constants.get(node.inputs[index])
    return None if value is None else np.asarray(value, dtype=np.float64)


def _tensor(value: np.ndarray, absolute: bool) -> torch.Tensor:
    t = torch.from_numpy(np.array(value, dtype=np.float64))
    return t.abs() if absolute else t


def full_shape(graph: Graph, value: str) -> tuple[int, ...] | None:
    """The value's shape when every dim is known and the batch dim is 1 (one sample)."""
    shape = graph.shape(value)
    if shape is None or not shape or any(d is None for d in shape) or shape[0] != 1:
        return None
    return tuple(int(d) for d in shape)


def inner_length(node: Node, graph: Graph) -> int:
    """Terms in the longest sum one output entry of the node is computed from (for rounding bounds)."""
    w = _const(graph, node, 1)
    if node.op == "Gemm":
        return int(w.shape[1] if int(node.attrs.get("transB", 0)) else w.shape[0]) + 2 if w is not None else 1
    if node.op == "MatMul":
        variable = variable_inputs(node, graph)[0]
        w = _const(graph, node, 1 - variable)
        return int(w.shape[0] if variable == 0 else w.shape[-1]) + 1 if w is not None else 1
    if node.op == "Conv" and w is not None:
        return int(np.prod(w.shape[1:])) + 2
    if node.op == "AveragePool":
        return int(np.prod(node.attrs["kernel_shape"])) + 2
    if node.op in ("GlobalAveragePool", "ReduceMean"):
        shape = graph.shape(node.inputs[0])
        return int(np.prod([d or 1 for d in shape])) + 2 if shape else 1
    return 2


def apply_node(node: Node, graph: Graph, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The node on a batch ``x`` of samples ``[N, *sample]``.

    mode 'affine': the node as it is; 'linear': its linear part (shifts and biases dropped);
    'abs': the linear part with every weight replaced by its absolute value (a bound for rounding).
    """
    absolute, shifts = mode == "abs", mode == "affine"
    op = node.op
    variables = variable_inputs(node, graph)
    if len(variables) != 1 or len(node.outputs) != 1:
        raise NotFoldable(f"{op} with {len(variables)} variable inputs")
    (var,) = variables
    out_shape = full_shape(graph, node.outputs[0])
    in_shape = full_shape(graph, node.inputs[var])
    if out_shape is None or in_shape is None or tuple(x.shape[1:]) != in_shape[1:]:
        raise NotFoldable(f"{op}: sizes unknown")
    n = x.shape[0]
    if op == "Gemm":
        w, c = _const(graph, node, 1), _const(graph, node, 2)
        if var != 0 or w is None or int(node.attrs.get("transA", 0)) or w.ndim != 2:
            raise NotFoldable("Gemm needs a variable A and a constant B")
        if len(node.inputs) > 2 and node.inputs[2] and c is None:
            raise NotFoldable("Gemm with a variable C")
        b = _tensor(w.T if int(node.attrs.get("transB", 0)) else w, absolute)
        alpha = float(node.attrs.get("alpha", 1.0))
        y = x @ b * (abs(alpha) if absolute else alpha)
        if shifts and c is not None:
            y = y + float(node.attrs.get("beta", 1.0)) * torch.from_numpy(c)
        return y.reshape(n, *out_shape[1:])
    if op == "MatMul":
        w = _const(graph, node, 1 - var)
        if w is None or w.ndim != 2:
            raise NotFoldable("MatMul needs a constant 2-D operand")
        t = _tensor(w, absolute)
        return (x @ t if var == 0 else t @ x).reshape(n, *out_shape[1:])
    if op == "Conv":
        w, b = _const(graph, node, 1), _const(graph, node, 2)
        if var != 0 or w is None or (len(node.inputs) > 2 and node.inputs[2] and b is None):
            raise NotFoldable("Conv needs constant weights and bias")
        d = w.ndim - 2
        pads = node.attrs.get("pads")
        if pads is None or d not in (1, 2, 3):
            raise NotFoldable("Conv padding unknown")
        padded = F.pad(x, [p for i in reversed(range(d)) for p in (int(pads[i]), int(pads[i + d]))])
        conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
        y = conv(
            padded,
            _tensor(w, absolute),
            None,
            tuple(node.attrs["strides"]),
            0,
            tuple(node.attrs["dilations"]),
            int(node.attrs.get("group", 1)),
        )
        if shifts and b is not None:
            y = y + torch.from_numpy(b).reshape(-1, *([1] * d))
        return y.reshape(n, *out_shape[1:])
    if op == "AveragePool":
        if int(node.attrs.get("ceil_mode", 0)) or node.attrs.get("pads") is None:
            raise NotFoldable("AveragePool in ceil mode or with unknown padding")
        k, s, dl, pads = (node.attrs[key] for key in ("kernel_shape", "strides", "dilations", "pads"))
        include_pad = bool(int(node.attrs.get("count_include_pad", 0)))
        d = len(k)
        y = x
        for i in range(d):
            matrix = _avgpool_matrix(in_shape[2 + i], k[i], s[i], dl[i], pads[i], pads[i + d], False, include_pad)
            y = torch.movedim(torch.tensordot(y, torch.from_numpy(matrix), dims=([2 + i], [1])), -1, 2 + i)
        return y.reshape(n, *out_shape[1:])
    if op == "GlobalAveragePool":
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True).reshape(n, *out_shape[1:])
    if op == "ReduceMean":
        axes = node.attrs.get("axes")
        rank = len(in_shape)
        if not axes:
            if int(node.attrs.get("noop_with_empty_axes", 0)):
                return x
            axes = list(range(rank))
        axes = sorted({int(axis) % rank for axis in axes})
        if 0 in axes:
            raise NotFoldable("ReduceMean over the batch axis")
        return x.mean(dim=tuple(axes), keepdim=True).reshape(n, *out_shape[1:])
    if op == "BatchNormalization":
        affine = batchnorm_affine(graph, node)
        if var != 0 or affine is None:
            raise NotFoldable("BatchNorm parameters unknown")
        scale, shift = (torch.from_numpy(a).reshape(-1, *([1] * (x.dim() - 2))) for a in affine)
        y = x * (scale.abs() if absolute else scale)
        return y + shift if shifts else y
    if op in ("Mul", "Div", "Add", "Sub"):
        if in_shape != out_shape:
            raise NotFoldable(f"{op} broadcasts its variable input")
        c = _const(graph, node, 1 - var)
        if c is None or c.ndim > len(in_shape) or (c.ndim == len(in_shape) and c.shape[0] != 1):
            raise NotFoldable(f"{op} by a non-constant")
        t = torch.from_numpy(c.reshape(c.shape[1:]) if c.ndim == len(in_shape) else c)
        if op == "Mul":
            return x * (t.abs() if absolute else t)
        if op == "Div":
            if var != 0 or bool((t == 0).any()):
                raise NotFoldable("division by an activation or by zero")
            return x / (t.abs() if absolute else t)
        sign = -1.0 if op == "Sub" and var == 1 and not absolute else 1.0
        y = sign * x
        if shifts:
            y = y + t if op == "Add" else (y - t if var == 0 else y + t)
        return y
    if op == "Neg":
        return x if absolute else -x
    if op == "Pad":
        pads = node.attrs.get("pads")
        if node.attrs.get("mode", "constant") != "constant" or pads is None or len(pads) != 2 * len(in_shape):
            raise NotFoldable("Pad that is not a constant pad of known size")
        if pads[0] or pads[len(in_shape)] or any(int(p) < 0 for p in pads):
            raise NotFoldable("Pad of the batch axis or cropping")
        rank = len(in_shape)
        value = _const(graph, node, 2)
        fill = float(value.reshape(-1)[0]) if value is not None and value.size else 0.0
        widths = [int(p) for i in reversed(range(1, rank)) for p in (pads[i], pads[i + rank])]
        return F.pad(x, widths, value=fill if shifts else 0.0)
    if op == "Transpose":
        perm = node.attrs.get("perm") or list(reversed(range(len(in_shape))))
        if int(perm[0]) != 0:
            raise NotFoldable("Transpose that moves the batch axis")
        return x.permute(*[int(p) for p in perm])
    if op in RESHAPES:
        return x.reshape(n, *out_shape[1:])
    raise NotFoldable(op)


def is_foldable(node: Node, graph: Graph) -> bool:
    """True when ``apply_node`` evaluates the node exactly (checked on one zero sample)."""
    if node.op not in LINEAR_OPS:
        return False
    variables = variable_inputs(node, graph)
    if len(variables) != 1:
        return False
    shape = full_shape(graph, node.inputs[variables[0]])
    if shape is None:
        return False
    try:
        apply_node(node, graph, torch.zeros((1, *shape[1:]), dtype=torch.float64), "abs")
    except (NotFoldable, RuntimeError, ValueError, IndexError, KeyError, TypeError):
        return False
    return True


def apply_segment(nodes: list[Node], graph: Graph, x: torch.Tensor, mode: str = "affine") -> torch.Tensor:
    for node in nodes:
        x = apply_node(node, graph, x, mode)
    return x


@dataclass
class CertifiedMatrix:
    """A computed matrix M and a bound on its distance to the exact one: |M_exact - M| <= gamma * bound.

    ``bound`` is an elementwise upper bound on |M_exact| as well (from the same products of |weights|).
    """

    matrix: torch.Tensor
    bound: torch.Tensor
    gamma: float

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)  # type: ignore[return-value]

    def error_norm(self) -> float:
        """An upper bound on ||M_exact - M||_2 (through the Frobenius norm)."""
        if self.gamma == 0.0:
            return 0.0
        fro = float(torch.linalg.matrix_norm(self.bound, ord="fro"))
        return self.gamma * fro * (1 + 2 * self.bound.numel() * UNIT_ROUNDOFF)

    def norm_upper(self) -> float:
        """Certified upper bound on sigma_max of the exact matrix."""
        return float(batched_sigma_max_upper(self.matrix)) + self.error_norm()

    def __matmul__(self, other: CertifiedMatrix) -> CertifiedMatrix:
        """(self @ other), exact product bounded: fl(AB) is within k u |A||B| of AB."""
        k = self.matrix.shape[1]
        rounding = 1.01 * (k + 2) * UNIT_ROUNDOFF
        g1, g2 = self.gamma, other.gamma
        gamma = g1 + g2 + g1 * g2 + rounding * (1 + g1) * (1 + g2)
        bound = (self.bound @ other.bound) * (1 + rounding)
        return CertifiedMatrix(self.matrix @ other.matrix, bound, gamma * (1 + rounding))

    @staticmethod
    def identity(n: int) -> CertifiedMatrix:
        eye = torch.eye(n, dtype=torch.float64)
        return CertifiedMatrix(eye, eye.clone(), 0.0)


def segment_operator(nodes: list[Node], graph: Graph) -> CertifiedMatrix:
    """The Jacobian J (n_out x n_in) of a run of linear nodes, with its rounding bound.

    Applying the segment to the identity basis in float64 computes each entry of J as nested sums of
    products; with k the total length of those sums, |J_computed - J| <= gamma_k |W_d|...|W_1| entrywise,
    and |W_d|...|W_1| is what the same run computes with absolute weights (itself rounded, hence 1 + 2 gamma).
    """
    first = nodes[0]
    shape = full_shape(graph, first.inputs[variable_inputs(first, graph)[0]])
    assert shape is not None
    n_in = math.prod(shape[1:])
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *shape[1:])
    with torch.no_grad():
        linear = apply_segment(nodes, graph, basis, "linear").reshape(n_in, -1).T.contiguous()
        absolute = apply_segment(nodes, graph, basis, "abs").reshape(n_in, -1).T.contiguous()
    total = sum(inner_length(node, graph) for node in nodes) + 2 * len(nodes)
    gamma = 1.05 * total * UNIT_ROUNDOFF
    return CertifiedMatrix(linear, absolute * (1 + 2 * gamma), gamma)
