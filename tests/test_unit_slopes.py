"""Per-unit slope intervals (``UnitSlopes``) in the dense chain bounds: local bounds on an input domain.

What is compared, against dense float64 references written here:
* soundness: every method's bound >= ||W_m D_{m-1} ... D_1 W_1|| (SVD) for many diagonals D_i drawn inside
  the unit intervals (vertices mostly: the norm is convex in each D_i, so its maximum is at a vertex);
* all units stable: Combettes-Pesquet equals the exact norm of the affine map within 1e-9 relative;
* sub-intervals of [0, 1]: per-unit Combettes-Pesquet <= the scalar ReLU bound;
* refine() on an ONNX MLP: with unit slopes the graph bound is <= the one without and >= the dense maximum.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lipcheck.compose import compose
from lipcheck.frontends import load_graph
from lipcheck.passes import prepare
from lipcheck.refine import Slope, UnitSlopes, refine
from lipcheck.refine.affine import CertifiedMatrix
from lipcheck.refine.bounds import combettes_pesquet_bound, eclipse_fast_bound, folded_bound
from lipcheck.refine.lipsdp import available, lipsdp_bound
from tests.onnx_builders import model, node, rng_for, save
from tests.test_refine import exact

RELU = Slope(0.0, 1.0)
KINDS = ((1.0, 1.0), (0.0, 0.0), (0.0, 1.0), (0.3, 0.7))  # active, inactive, unknown, a narrower one


pytestmark = pytest.mark.usefixtures("one_thread")


def random_net(rng: np.random.Generator, sizes: list[int]) -> list[np.ndarray]:
    return [rng.standard_normal((sizes[i + 1], sizes[i])) / math.sqrt(sizes[i]) for i in range(len(sizes) - 1)]


def random_units(rng: np.random.Generator, n: int, kinds=KINDS) -> UnitSlopes:
    picks = rng.integers(0, len(kinds), n)
    return UnitSlopes(np.array([kinds[k][0] for k in picks]), np.array([kinds[k][1] for k in picks]))


def sampled_max(weights: list[np.ndarray], units: list[UnitSlopes], rng: np.random.Generator, count: int) -> float:
    """max ||W_m D ... D W_1|| over random D: vertices for 3/4 of the draws, interior points otherwise."""
    best = 0.0
    for k in range(count):
        product = weights[0]
        for w, u in zip(weights[1:], units, strict=True):
            d = rng.uniform(u.low, u.high) if k % 4 == 0 else np.where(rng.random(u.size) < 0.5, u.low, u.high)
            product = w @ (d[:, None] * product)
        best = max(best, float(np.linalg.norm(product, 2)))
    return best


# ---------------------------------------------------------------------------------------------
# the type


def test_radius_and_quadratic_are_certified() -> None:
    rng = rng_for("unit-certified")
    low = np.concatenate([[0.0, 1.0, 0.3, -0.1], rng.uniform(-1, 1, 200)])
    high = np.concatenate([[1.0, 1.0, 0.7, 0.25], low[4:] + rng.uniform(0, 1, 200) * (rng.random(200) < 0.8)])
    units = UnitSlopes(low, high)
    mid, r = units.mid, units.radius
    q_mid, p = units.quadratic()
    assert r[1] == 0.0 and r[0] == 0.5 and p[0] == 0.0 and p[1] == 1.0  # exact where nothing rounds
    for lo, hi, c, rad, pp in zip(low, high, mid, r, p, strict=True):
        lo, hi, c, rad, pp = map(Fraction, (lo, hi, c, rad, pp))
        assert c - rad <= lo and hi <= c + rad and (rad == 0) == (lo == hi)
        for s in (lo, hi):  # the concave constraint holds at both ends, hence on [lo, hi]
            assert -s * s + 2 * c * s - pp >= 0
    assert np.array_equal(q_mid, mid)
    with pytest.raises(ValueError):
        UnitSlopes(np.array([0.5]), np.array([0.2]))
    with pytest.raises(ValueError):
        UnitSlopes(np.array([2.0]), np.array([3.0])).within(RELU)
    clipped = UnitSlopes(np.array([-1.0, 0.2]), np.array([0.5, 2.0])).within(RELU)
    assert clipped.low.tolist() == [0.0, 0.2] and clipped.high.tolist() == [0.5, 1.0]


def test_scaled_matrix_keeps_its_rounding_bound() -> None:
    rng = rng_for("unit-scaled")
    m = rng.standard_normal((4, 5))
    left, right = rng.uniform(0.1, 3, 4), rng.uniform(-2, 2, 5)
    scaled = exact(m).scaled(torch.from_numpy(left), torch.from_numpy(right))
    for i in range(4):
        for j in range(5):
            true = Fraction(left[i]) * Fraction(m[i, j]) * Fraction(right[j])
            bound = Fraction(float(scaled.bound[i, j]))
            assert abs(true - Fraction(float(scaled.matrix[i, j]))) <= Fraction(scaled.gamma) * bound
            assert abs(true) <= bound


# ---------------------------------------------------------------------------------------------
# dense bounds


@pytest.mark.parametrize("sizes", [[5, 8, 8, 3], [6, 10, 7, 9, 4], [4, 6, 6, 6, 6, 2]])
def test_every_method_is_sound_with_unit_slopes(sizes: list[int]) -> None:
    rng = rng_for(f"unit-sound-{sizes}")
    for trial in range(3):
        weights = random_net(rng, sizes)
        units = [random_units(rng, n) for n in sizes[1:-1]]
        reference = sampled_max(weights, units, rng, 1500)
        certified = [exact(w) for w in weights]
        bounds = {
            "folded": folded_bound(certified, units),
            "cp": combettes_pesquet_bound(certified, units),
            "eclipse": eclipse_fast_bound(certified, units),
        }
        if available() and trial == 0:
            found = lipsdp_bound(certified, units)
            bounds["lipsdp"] = None if found is None else found.value
        for name, value in bounds.items():
            if value is not None:
                assert value >= reference, (name, value, reference)
        assert bounds["cp"] <= bounds["folded"] * (1 + 1e-12)


@pytest.mark.parametrize("sizes", [[5, 8, 8, 3], [6, 10, 7, 9, 4]])
def test_all_stable_gives_the_exact_norm(sizes: list[int]) -> None:
    rng = rng_for(f"unit-stable-{sizes}")
    weights = random_net(rng, sizes)
    units = [random_units(rng, n, KINDS[:2]) for n in sizes[1:-1]]
    product = weights[0]
    for w, u in zip(weights[1:], units, strict=True):
        product = w @ (u.low[:, None] * product)
    norm = float(np.linalg.norm(product, 2))
    certified = [exact(w) for w in weights]
    cp = combettes_pesquet_bound(certified, units)
    assert norm <= cp <= norm * (1 + 1e-9)
    if available():
        found = lipsdp_bound(certified, units)
        # a stable unit's constraint -(z - y)^2 >= 0 pins z only as its multiplier grows without bound, and
        # the solver's strictly feasible point keeps it finite: close, not exact
        assert found is None or norm <= found.value <= norm * (1 + 1e-2)


@pytest.mark.parametrize("sizes", [[5, 8, 8, 3], [6, 10, 7, 9, 4], [4, 6, 6, 6, 6, 2]])
def test_unit_combettes_pesquet_below_the_scalar_one(sizes: list[int]) -> None:
    rng = rng_for(f"unit-below-{sizes}")
    for _ in range(4):
        weights = [exact(w) for w in random_net(rng, sizes)]
        units = [random_units(rng, n) for n in sizes[1:-1]]
        scalar = combettes_pesquet_bound(weights, [RELU] * len(units))
        per_unit = combettes_pesquet_bound(weights, units)
        assert per_unit <= scalar * (1 + 1e-12)
    # every unit [0, 1]: the same bound as the scalar slope (up to the certified radius' rounding)
    full = [UnitSlopes.of(RELU, n) for n in sizes[1:-1]]
    assert combettes_pesquet_bound(weights, full) == pytest.approx(scalar_of(weights), rel=1e-12)


def scalar_of(weights: list[CertifiedMatrix]) -> float:
    return combettes_pesquet_bound(weights, [RELU] * (len(weights) - 1))


def test_the_hull_covers_the_input_placement_counterexample() -> None:
    """W_1 = [1; 1], W_2 = [1, -1], units [1, 1] and [0, 1]: input-side placement 1.207; true constant 1."""
    weights = [exact(np.array([[1.0], [1.0]])), exact(np.array([[1.0, -1.0]]))]
    units = [UnitSlopes(np.array([1.0, 0.0]), np.array([1.0, 1.0]))]
    assert combettes_pesquet_bound(weights, units) == pytest.approx(1.0, rel=1e-12)
    assert combettes_pesquet_bound(weights, units) >= 1.0


# ---------------------------------------------------------------------------------------------
# in a graph


def _mlp(tmp_path, rng: np.random.Generator, sizes: list[int]):
    nodes, inits, value = [], {}, "x"
    for i in range(len(sizes) - 1):
        out = "y" if i == len(sizes) - 2 else f"h{i}"
        inits[f"w{i}"] = rng.standard_normal((sizes[i + 1], sizes[i])).astype(np.float32) / np.float32(sizes[i] ** 0.5)
        inits[f"b{i}"] = rng.standard_normal(sizes[i + 1]).astype(np.float32)
        nodes.append(node("Gemm", [value, f"w{i}", f"b{i}"], [out], transB=1))
        if out != "y":
            nodes.append(node("Relu", [out], [f"a{i}"], name=f"relu{i}"))
            value = f"a{i}"
    path = save(model(nodes, {"x": [1, sizes[0]]}, initializers=inits), tmp_path)
    return path, [inits[f"w{i}"].astype(np.float64) for i in range(len(sizes) - 1)]


@pytest.mark.parametrize("choice", ["best", "combettes-pesquet", "eclipse-fast", "folded"])
def test_refine_with_unit_slopes(tmp_path, choice: str) -> None:
    rng = rng_for(f"unit-refine-{choice}")
    sizes = [6, 12, 10, 4]
    path, weights = _mlp(tmp_path, rng, sizes)
    graph = load_graph(path, [])
    prepare(graph)
    units = {f"relu{i}": random_units(rng, n) for i, n in enumerate(sizes[1:-1])}
    product = compose(graph)
    without = refine(graph, product, choice).composition.upper_bound
    local = refine(graph, product, choice, unit_slopes=units).composition.upper_bound
    reference = sampled_max(weights, list(units.values()), rng, 3000)
    assert reference <= local <= without * (1 + 1e-12)
    if choice in ("best", "combettes-pesquet"):
        assert local < without  # a third of the units stable: a real gain
    stable = {name: UnitSlopes(u.low, u.low) for name, u in units.items()}
    exact_norm = sampled_max(weights, list(stable.values()), rng, 1)
    if choice in ("best", "combettes-pesquet"):
        bound = refine(graph, product, choice, unit_slopes=stable).composition.upper_bound
        assert exact_norm <= bound <= exact_norm * (1 + 1e-6)


def test_refine_rejects_a_wrong_size(tmp_path) -> None:
    rng = rng_for("unit-size")
    path, _ = _mlp(tmp_path, rng, [4, 6, 3])
    graph = load_graph(path, [])
    prepare(graph)
    with pytest.raises(ValueError):
        refine(graph, compose(graph), "combettes-pesquet", unit_slopes={"relu0": UnitSlopes.of(RELU, 5)})
