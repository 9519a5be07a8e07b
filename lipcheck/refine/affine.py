"""Exact evaluation of the linear ops lipcheck can fold, and their composed matrix with a rounding bound.

A run of consecutive linear (affine) nodes -- every op with an ``affine`` facet: Gemm, MatMul, Conv,
AveragePool, GlobalAveragePool, BatchNormalization, Mul/Div/Add/Sub by constants, Neg, zero Pad,
Flatten/Reshape/Transpose/... -- is one affine map x -> J x + b. Its Lipschitz constant is sigma_max(J),
which can be far below the product of the nodes' norms. ``segment_operator`` builds J explicitly (the
segment applied to the identity basis, in float64) together with an elementwise bound on the rounding
error, so the norm stays certified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lipcheck import ops
from lipcheck.graph import Graph, Node
from lipcheck.ops import AffineContext, NotFoldable, variable_inputs
from lipcheck.spectral.dense import UNIT_ROUNDOFF, batched_sigma_max_upper
from lipcheck.walk import walk


def full_shape(graph: Graph, value: str) -> tuple[int, ...] | None:
    """The value's shape when every dim is known and the batch dim is 1 (one sample)."""
    shape = graph.shape(value)
    if shape is None or not shape or any(d is None for d in shape) or shape[0] != 1:
        return None
    return tuple(int(d) for d in shape)  # type: ignore[arg-type]


def _affine_context(node: Node, graph: Graph, x: torch.Tensor, mode: str) -> AffineContext:
    """What the op's ``affine`` needs; NotFoldable unless the node has one variable input of known size."""
    variables = variable_inputs(node, graph)
    if len(variables) != 1 or len(node.outputs) != 1:
        raise NotFoldable(f"{node.op} with {len(variables)} variable inputs")
    (var,) = variables
    out_shape = full_shape(graph, node.outputs[0])
    in_shape = full_shape(graph, node.inputs[var])
    if out_shape is None or in_shape is None or tuple(x.shape[1:]) != in_shape[1:]:
        raise NotFoldable(f"{node.op}: sizes unknown")
    return AffineContext(node, graph, var, in_shape, out_shape, mode)


def apply_node(node: Node, graph: Graph, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The node on a batch ``x`` of samples ``[N, *sample]`` (its op's ``affine`` facet).

    mode 'affine': the node as it is; 'linear': its linear part (shifts and biases dropped);
    'abs': the linear part with every weight replaced by its absolute value (a bound for rounding).
    """
    op = ops.get(node.op)
    if op is None or not op.has_affine:
        raise NotFoldable(node.op)
    return op.affine(_affine_context(node, graph, x, mode), x)


def is_foldable(node: Node, graph: Graph) -> bool:
    """True when ``apply_node`` evaluates the node exactly (checked on one zero sample)."""
    op = ops.get(node.op)
    if op is None or not op.has_affine:
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
    """A run of linear nodes on a batch ``x``: one walk carrying the batch from node to node."""
    first = nodes[0]
    start = first.inputs[variable_inputs(first, graph)[0]]

    def step(node: Node, args: list[torch.Tensor | None]) -> list[torch.Tensor]:
        return [apply_node(node, graph, next(a for a in args if a is not None), mode)]

    env = walk(nodes, {start: x}, step, keep={nodes[-1].outputs[0]})
    return env[nodes[-1].outputs[0]]


def inner_length(node: Node, graph: Graph) -> int:
    """Terms in the longest sum one output entry of the node is computed from (for rounding bounds)."""
    op = ops.get(node.op)
    return op.rounding_terms(node, graph) if op is not None else 2


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

    def scaled(self, left: torch.Tensor | None = None, right: torch.Tensor | None = None) -> CertifiedMatrix:
        """diag(left) M diag(right), still certified: each entry takes at most two more roundings, so
        |fl(L M R) - L M R| <= 2.02 u |L||M||R| <= 2.02 u (1 + gamma) |L| bound |R|; with
        |L M_exact R - L M R| <= gamma |L| bound |R| the new gamma is gamma + 2.02 u (1 + gamma) over the new
        bound |L| bound |R| (itself rounded up, and still >= |L M_exact R|)."""
        matrix, bound, count = self.matrix, self.bound, 0
        if left is not None:
            matrix, bound, count = left[:, None] * matrix, left.abs()[:, None] * bound, count + 1
        if right is not None:
            matrix, bound, count = matrix * right[None, :], bound * right.abs()[None, :], count + 1
        rounding = 1.01 * count * UNIT_ROUNDOFF
        gamma = (self.gamma + rounding * (1 + self.gamma)) * (1 + rounding)
        return CertifiedMatrix(matrix, bound * (1 + 2 * rounding), gamma)

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
