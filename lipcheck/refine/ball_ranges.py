"""Tighter ranges on a ball: each pre-activation moves at most R times the Lipschitz constant of its own row.

Interval propagation (``lipcheck.ranges``) widens a ball's box at every layer by |W|. On a ball B(x0, R) around
a sample, a pre-activation z_r of a dense chain that starts at the input satisfies
|z_r(x) - z_r(x0)| <= R * Lip(z_r on the ball), and that constant is bounded like the whole chain's, row by
row: Combettes-Pesquet with the unit slopes of the activations before it (``row_bounds``). Layer by layer, each
activation's input range is cut to z(x0) +- R b_r, its unit slopes follow, and the next layer uses them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from lipcheck import ops
from lipcheck.graph import Graph
from lipcheck.interpret import interpret
from lipcheck.ops import Interval, UnitSlopes
from lipcheck.refine.affine import CertifiedMatrix
from lipcheck.refine.chains import Chain, find_chains
from lipcheck.spectral.dense import UNIT_ROUNDOFF


def row_bounds(weights: list[CertifiedMatrix], slopes: list[UnitSlopes]) -> torch.Tensor:
    """b_r >= the Lipschitz constant of row r of W_m D_{m-1} ... D_1 W_1 over all D_i within ``slopes``.

    Combettes-Pesquet's expansion (see ``bounds.unit_combettes_pesquet_bound``, input-side placement) with the
    last factor of each term a row: sum over the last split s of total[s] * ||e_r^T M(s, m) R_s||, total[s] the
    sum of the terms' products up to s (total[0] = 1)."""
    m = len(weights)
    mids = [torch.from_numpy(s.mid) for s in slopes]
    radii = [torch.from_numpy(s.radius) for s in slopes]
    norms: dict[tuple[int, int], float] = {}
    rows = torch.zeros(weights[-1].shape[0], dtype=torch.float64)
    total = [1.0] + [0.0] * m
    for i in range(m):
        product = weights[i]
        for j in range(i + 1, m + 1):
            if j > i + 1:
                product = weights[j - 1] @ product.scaled(left=mids[j - 2])
            scaled = product if i == 0 else product.scaled(right=radii[i - 1])
            if j < m:
                norms[(i, j)] = scaled.norm_upper()
            else:
                rows = rows + total[i] * _row_norms(scaled)
        if i + 1 < m:
            total[i + 1] = sum(total[k] * norms[(k, i + 1)] for k in range(i + 1))
    return rows * (1 + 4 * (m * m + 2 * m) * UNIT_ROUNDOFF)


def _row_norms(matrix: CertifiedMatrix) -> torch.Tensor:
    """||row_r(M_exact)|| <= ||row_r(M)|| + gamma ||row_r(bound)||, rounded up."""
    n = matrix.shape[1]
    computed = matrix.matrix.norm(dim=1) + matrix.gamma * matrix.bound.norm(dim=1)
    return computed * (1 + (n + 4) * UNIT_ROUNDOFF)


def tightened_ranges(
    graph: Graph,
    ranges: Mapping[str, Interval],
    centre: torch.Tensor,
    input_name: str,
    radius: float,
    operators: dict[int, list[CertifiedMatrix]] | None = None,
) -> dict[str, Interval]:
    """Cut the input ranges of the activations of every dense chain starting at ``input_name`` (an l2 ball of
    ``radius`` around ``centre``) to z(x0) +- R b_r. ``operators``: the chains' matrices, kept between balls."""
    chains = [chain for chain in find_chains(graph) if chain.start == input_name and chain.activations]
    if not chains:
        return {}
    wanted = [segment[-1].outputs[0] for chain in chains for segment in chain.segments[:-1]]
    with torch.no_grad():
        values = interpret(graph, torch.float64).run({input_name: centre}, wanted)
    found: dict[str, Interval] = {}
    for index, chain in enumerate(chains):
        matrices = _operators(chain, graph, index, operators)
        if matrices is not None:
            _tighten_chain(chain, graph, matrices, ranges, values, radius, found)
    return found


def _operators(
    chain: Chain, graph: Graph, index: int, cache: dict[int, list[CertifiedMatrix]] | None
) -> list[CertifiedMatrix] | None:
    from lipcheck.refine.apply import chain_operators

    if cache is not None and index in cache:
        return cache[index]
    try:
        matrices = chain_operators(chain, graph)
    except (RuntimeError, ValueError, MemoryError):
        return None
    if cache is not None:
        cache[index] = matrices
    return matrices


def _tighten_chain(
    chain: Chain,
    graph: Graph,
    matrices: list[CertifiedMatrix],
    ranges: Mapping[str, Interval],
    values: Mapping[str, torch.Tensor],
    radius: float,
    found: dict[str, Interval],
) -> None:
    slopes: list[UnitSlopes] = []
    for layer, (node, _) in enumerate(chain.activations):
        value = chain.segments[layer][-1].outputs[0]
        known = found.get(value) or ranges.get(value)
        op = ops.get(node.op)
        if known is None or op is None:
            return
        reach = radius * row_bounds(matrices[: layer + 1], slopes).reshape(known.lo.shape)
        centre = values[value].to(torch.float64).reshape(known.lo.shape)
        # z(x0) is computed in float64: its error is a few hundred ulps of the sums' magnitudes, far below 2^-30
        slack = 2.0**-30 * (centre.abs() + reach + known.magnitude) + math.ulp(0.0)
        cut = Interval(torch.maximum(known.lo, centre - reach - slack), torch.minimum(known.hi, centre + reach + slack))
        found[value] = cut
        units = op.slope_on(node, graph, cut)
        if units is None:
            return
        low, high = (np.asarray(u.broadcast_to(cut.lo.shape).reshape(-1)) for u in units)
        slopes.append(UnitSlopes(low, high))
