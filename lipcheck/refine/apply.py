"""Chain bounds applied to a whole graph: one AutoLip walk per method, the smallest certified bound wins."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from lipcheck.compose import Composition, Refinements, compose
from lipcheck.graph import Graph
from lipcheck.ops import Interval, Slope, UnitSlopes
from lipcheck.refine.affine import CertifiedMatrix, segment_operator
from lipcheck.refine.blocks import block_bound
from lipcheck.refine.bounds import combettes_pesquet_bound, eclipse_fast_bound, folded_bound
from lipcheck.refine.chains import MAX_DIM, MAX_ENTRIES, Chain, find_chains
from lipcheck.refine.lipsdp import lipsdp_bound
from lipcheck.refine.regions import NotLiftable, Region, find_blocks, find_regions, region_bound
from lipcheck.refine.rescale import balanced

PRODUCT = "product"
FOLDED = "folded"
COMBETTES_PESQUET = "combettes-pesquet"
ECLIPSE_FAST = "eclipse-fast"
LIPSDP = "lipsdp"
FREQUENCY_CP = "frequency-cp"
BLOCK_SDP = "block-sdp"
BEST = "best"
ALL = "all"
CHAIN_METHODS = (FOLDED, COMBETTES_PESQUET, ECLIPSE_FAST, FREQUENCY_CP, BLOCK_SDP, LIPSDP)
CHEAP_METHODS = (FOLDED, COMBETTES_PESQUET, ECLIPSE_FAST, FREQUENCY_CP, BLOCK_SDP)
METHOD_CHOICES = (BEST, PRODUCT, FOLDED, COMBETTES_PESQUET, ECLIPSE_FAST, FREQUENCY_CP, BLOCK_SDP, LIPSDP, ALL)
REGION_METHODS = (FREQUENCY_CP, BLOCK_SDP)  # bounded on regions and blocks, not on dense chains


def methods_for(choice: str) -> tuple[str, ...]:
    """The chain methods a --method choice computes (the product is always computed)."""
    if choice == PRODUCT:
        return ()
    if choice == BEST:
        return CHEAP_METHODS
    if choice == ALL:
        return CHAIN_METHODS
    if choice in CHAIN_METHODS:
        return (choice,)
    raise ValueError(f"unknown method {choice!r}; choose from {', '.join(METHOD_CHOICES)}")


@dataclass
class ChainResult:
    chain: Chain
    product: float  # product of the chain's per-node local bounds
    bounds: dict[str, float | None] = field(default_factory=dict)  # method -> certified chain bound
    seconds: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def best(self, methods: tuple[str, ...]) -> tuple[str, float] | None:
        found = [(value, name) for name, value in self.bounds.items() if name in methods and value is not None]
        if not found:
            return None
        value, name = min(found)
        return name, value


@dataclass
class RegionResult:
    """A region's or block's certified bound by one method: L(end) <= bound * L(start)."""

    region: Region
    method: str
    bound: float | None
    seconds: float
    note: str = ""


@dataclass
class Refinement:
    bound_method: str
    method_bounds: dict[str, float | None]
    method_seconds: dict[str, float]
    chains: list[ChainResult]
    composition: Composition
    regions: list[RegionResult] = field(default_factory=list)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Chain matrices are at most 1024 wide: threads gain little there and, on a busy machine, eigvalsh
    with two threads was measured 10-50x slower than with one. The setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def chain_operators(chain: Chain, graph: Graph) -> list[CertifiedMatrix]:
    return [segment_operator(segment, graph) for segment in chain.segments]


def bound_chain(
    weights: list[CertifiedMatrix],
    chain: Chain,
    methods: tuple[str, ...],
    slopes: list[Slope | UnitSlopes] | None = None,
) -> ChainResult:
    """Every requested method's certified bound on one chain (None where a method does not apply), each the
    smaller of its value on the chain's matrices and on their rescaled form (``lipcheck.refine.rescale``: a
    diagonal commutes with per-unit slopes too). ``slopes``: the chain's own scalar slopes unless given; with
    per-unit slopes every method but the fold also takes its scalar-slope value (per-unit ECLipsE, LipSDP and
    Combettes-Pesquet are not always below it), so a chain's bound never grows with ``UnitSlopes``."""
    own: list[Slope | UnitSlopes] = list(chain.slopes)
    choices = [own] if slopes is None or slopes == own else [slopes, own]
    result = ChainResult(chain, math.inf)
    rescaled = balanced(weights) if len(weights) > 1 else None
    forms = [weights] if rescaled is None else [weights, rescaled]
    for method in methods:
        started = time.perf_counter()
        pairs = [(form, s) for s in (choices[:1] if method == FOLDED else choices) for form in forms]
        values = [value for form, s in pairs if (value := _method_bound(method, form, s)) is not None]
        result.bounds[method] = min(values) if values else None
        result.seconds[method] = time.perf_counter() - started
    return result


def _method_bound(method: str, weights: list[CertifiedMatrix], slopes: list[Slope | UnitSlopes]) -> float | None:
    if method == FOLDED:
        return folded_bound(weights, slopes)
    if len(weights) < 2:
        return None  # no activation in the chain: only the fold applies
    if method == COMBETTES_PESQUET:
        return combettes_pesquet_bound(weights, slopes)
    if method == ECLIPSE_FAST:
        return eclipse_fast_bound(weights, slopes)
    found = lipsdp_bound(weights, slopes)
    return None if found is None else found.value


def refine(
    graph: Graph,
    product: Composition,
    choice: str = BEST,
    assume: dict[str, float] | None = None,
    device: torch.device | str = "cpu",
    cache: dict | None = None,
    max_dim: int = MAX_DIM,
    max_entries: int = MAX_ENTRIES,
    unit_slopes: Mapping[str, UnitSlopes] | None = None,
    ranges: Mapping[str, Interval] | None = None,
) -> Refinement:
    """Bound every chain of ``graph`` with the chosen methods and re-walk the graph with them.

    ``product`` is the plain composition of the same graph (its per-node bounds give each chain's product).
    ``ranges``: the values' ranges on an input domain (``lipcheck.ranges``), read by the rules as in ``product``.
    ``unit_slopes``: per-unit slope intervals by activation node name (e.g. from value ranges on an input
    box: a local bound); the dense chain methods use them in place of the node's scalar slope. The region
    methods (frequency-cp, block-sdp) keep the scalar slopes, which hold on every domain. A name that is no
    activation inside a dense chain is not used; a size that does not match its activation is a ValueError.
    """
    methods = methods_for(choice)
    if not methods or not product.bounded:
        return Refinement(PRODUCT, {PRODUCT: product.upper_bound}, {}, [], product)
    cache = {} if cache is None else cache
    seconds = {method: 0.0 for method in methods}
    chain_methods = tuple(method for method in methods if method not in REGION_METHODS)
    results = (
        _bound_chains(graph, product, chain_methods, max_dim, max_entries, seconds, unit_slopes)
        if chain_methods
        else []
    )
    regions = bound_regions(graph, methods)
    for method in REGION_METHODS:
        if method in methods:
            seconds[method] = sum(r.seconds for r in regions if r.method == method)

    def walk(refinements: Refinements) -> Composition:
        return compose(graph, assume=assume, device=device, refinements=refinements, rule_cache=cache, ranges=ranges)

    method_bounds: dict[str, float | None] = {PRODUCT: product.upper_bound}
    compositions: dict[str, Composition] = {PRODUCT: product}
    for method in methods:
        compositions[method] = walk(_refinements_by(method, results, regions))
        method_bounds[method] = compositions[method].upper_bound
    # per chain and region, the smallest of the computed methods
    mixed: Refinements = {}
    for r in results:
        found = r.best(methods)
        if found is not None:
            mixed.setdefault(r.chain.end, []).append((r.chain.start, found[1], found[0]))
    _add_regions(mixed, regions)
    singles = [(value, name) for name, value in method_bounds.items() if value is not None]
    best_value, best_name = min(singles, key=lambda item: (item[0], _order(item[1])))
    chosen, composition = best_name, compositions[best_name]
    if len(methods) > 1 and mixed:
        combined = walk(mixed)
        if combined.upper_bound is not None and combined.upper_bound < best_value * (1 - 1e-12):
            used = sorted({method for candidates in mixed.values() for _, _, method in candidates}, key=_order)
            chosen, composition = "per chain: " + ", ".join(used), combined
    return Refinement(chosen, method_bounds, seconds, results, composition, regions)


def _bound_chains(
    graph: Graph,
    product: Composition,
    methods: tuple[str, ...],
    max_dim: int,
    max_entries: int,
    seconds: dict[str, float],
    unit_slopes: Mapping[str, UnitSlopes] | None = None,
) -> list[ChainResult]:
    """Every dense chain bounded by every method (``seconds`` gets each method's time, folding included)."""
    local = {layer.name: layer.lipschitz for layer in product.layers}
    results: list[ChainResult] = []
    for chain in find_chains(graph, max_dim, max_entries):
        started = time.perf_counter()
        try:
            with single_thread():
                weights = chain_operators(chain, graph)
        except (RuntimeError, ValueError, MemoryError) as exc:  # too large for this machine: keep the product
            results.append(ChainResult(chain, math.inf, note=f"not folded: {exc}"))
            continue
        fold_time = time.perf_counter() - started
        with single_thread():
            result = bound_chain(weights, chain, methods, chain.unit_slopes(graph, unit_slopes))
        result.product = math.prod(local.get(node.name, math.inf) for node in chain.nodes)
        for method in methods:
            seconds[method] += result.seconds.get(method, 0.0) + fold_time
        results.append(result)
    return results


def _refinements_by(method: str, chains: list[ChainResult], regions: list[RegionResult]) -> Refinements:
    """What one method proves: its chain bounds, and for frequency-cp the regions'."""
    refinements: Refinements = {}
    for r in chains:
        if (value := r.bounds.get(method)) is not None:
            refinements.setdefault(r.chain.end, []).append((r.chain.start, value, method))
    _add_regions(refinements, [r for r in regions if r.method == method])
    return refinements


def bound_regions(graph: Graph, methods: tuple[str, ...]) -> list[RegionResult]:
    """Regions bounded by frequency-cp and residual blocks by block-sdp, as far as ``methods`` asks."""
    found: list[RegionResult] = []
    if FREQUENCY_CP in methods:
        found += [_bound_region(region, FREQUENCY_CP, region_bound, graph) for region in find_regions(graph)]
    if BLOCK_SDP in methods:
        found += [_bound_region(region, BLOCK_SDP, block_bound, graph) for region in find_blocks(graph)]
    return found


def _bound_region(
    region: Region, method: str, bound: Callable[[Region, Graph], float | None], graph: Graph
) -> RegionResult:
    started = time.perf_counter()
    try:
        with single_thread(), torch.no_grad():
            value = bound(region, graph)
        note = "" if value is not None else "certificate not found"
    except (NotLiftable, MemoryError, RuntimeError, ValueError) as exc:  # too large, or not one grid
        value, note = None, f"not bounded: {exc}"
    return RegionResult(region, method, value, time.perf_counter() - started, note)


def _add_regions(refinements: Refinements, regions: list[RegionResult]) -> None:
    for r in regions:
        if r.bound is not None and math.isfinite(r.bound):
            refinements.setdefault(r.region.end, []).append((r.region.start, r.bound, r.method))


def _order(name: str) -> int:
    ordering = (PRODUCT, *CHAIN_METHODS)
    return ordering.index(name) if name in ordering else len(ordering)
