"""Tighter certified bounds (lipcheck.refine): folds, chain bounds, LipSDP, and their use in the report.

What is compared:
* folds: the folded affine map equals onnxruntime's output on random inputs, and its certified norm
  lies between the dense SVD of the onnxruntime Jacobian and the product of the per-layer bounds;
* Combettes-Pesquet and ECLipsE-Fast: against straightforward re-implementations of each paper's
  definition written here (subset enumeration; the paper's recursion in numpy), certified >= reference
  and within 1e-8 of it;
* soundness: every method >= the largest Jacobian norm at random points, and >= the exact constant of
  tiny one-hidden-layer ReLU nets (the max over the four activation patterns, all realised);
* LipSDP: the verified value is >= the solver's value; ECLipsE-Fast (a feasible point of the same SDP)
  and the other certified methods must not fall below the solver's LipSDP value by more than 1e-4
  relative (the solver tolerance plus our strict-feasibility margin).
"""

from __future__ import annotations

import itertools
import json
import math

import jsonschema
import numpy as np
import pytest
import torch

from lipcheck.compose import compose
from lipcheck.frontends import load_graph
from lipcheck.passes import prepare
from lipcheck.pipeline import analyse
from lipcheck.refine import Slope, find_chains
from lipcheck.refine.affine import CertifiedMatrix, apply_segment, segment_operator
from lipcheck.refine.bounds import combettes_pesquet_bound, eclipse_fast_bound, folded_bound, min_eigenvalue_lower
from lipcheck.refine.lipsdp import lipsdp_bound
from lipcheck.schemas import REPORT, load_schema
from tests.conftest import SAMPLES
from tests.onnx_builders import Runner, model, node, ort_jacobian, rng_for, save, sigma_max

RELU = Slope(0.0, 1.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def exact(matrix: np.ndarray) -> CertifiedMatrix:
    t = torch.from_numpy(np.asarray(matrix, dtype=np.float64))
    return CertifiedMatrix(t, t.abs(), 0.0)


def random_net(tag: str, sizes: list[int]) -> list[np.ndarray]:
    rng = rng_for(tag)
    return [rng.standard_normal((sizes[i + 1], sizes[i])) / math.sqrt(sizes[i]) for i in range(len(sizes) - 1)]


# ---------------------------------------------------------------------------------------------
# folding linear ops


def _fold_models(tmp_path):
    rng = rng_for("fold")
    dense = model(
        [
            node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),
            node("Mul", ["h1", "scale"], ["h2"]),
            node("Sub", ["h2", "shift"], ["h3"]),
            node("MatMul", ["h3", "w2"], ["h4"]),
            node("Div", ["h4", "divisor"], ["y"]),
        ],
        {"x": [1, 6]},
        initializers={
            "w1": rng.standard_normal((7, 6)).astype(np.float32),
            "b1": rng.standard_normal(7).astype(np.float32),
            "scale": rng.uniform(0.5, 2, 7).astype(np.float32),
            "shift": rng.standard_normal(7).astype(np.float32),
            "w2": rng.standard_normal((7, 5)).astype(np.float32),
            "divisor": np.float32(3.0),
        },
    )
    conv = model(
        [
            node("Conv", ["x", "k1", "c1"], ["h1"], pads=[1, 1, 1, 1]),
            node("AveragePool", ["h1"], ["h2"], kernel_shape=[2, 2], strides=[2, 2]),
            node("Conv", ["h2", "k2"], ["h3"], pads=[1, 0, 1, 0]),
            node("Flatten", ["h3"], ["h4"]),
            node("Gemm", ["h4", "w"], ["y"], transB=1),
        ],
        {"x": [1, 2, 6, 6]},
        initializers={
            "k1": rng.standard_normal((3, 2, 3, 3)).astype(np.float32),
            "c1": rng.standard_normal(3).astype(np.float32),
            "k2": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
            "w": rng.standard_normal((5, 4 * 4 * 2)).astype(np.float32),
        },
    )
    return [(save(dense, tmp_path, "dense.onnx"), (1, 6)), (save(conv, tmp_path, "conv.onnx"), (1, 2, 6, 6))]


def test_fold_is_exact_and_between_svd_and_product(tmp_path) -> None:
    for path, shape in _fold_models(tmp_path):
        graph = load_graph(path, [",".join(map(str, shape))])
        prepare(graph)
        (chain,) = find_chains(graph)
        assert len(chain.segments) == 1 and len(chain.segments[0]) == len(graph.nodes)
        # the folded map computes what onnxruntime computes
        x = rng_for(str(path)).standard_normal((4, *shape[1:])).astype(np.float32)
        ours = apply_segment(chain.segments[0], graph, torch.from_numpy(x.astype(np.float64))).numpy()
        theirs = np.stack([Runner(path)(x[i : i + 1]) for i in range(4)])
        np.testing.assert_allclose(ours.reshape(4, -1), theirs, rtol=1e-5, atol=1e-4)
        # its certified norm: >= the dense SVD of the (onnxruntime) Jacobian, <= the product
        dense = sigma_max(ort_jacobian(path, shape))
        operator = segment_operator(chain.segments[0], graph)
        np.testing.assert_allclose(operator.matrix.numpy(), ort_jacobian(path, shape), rtol=1e-4, atol=1e-4)
        folded = operator.norm_upper()
        product = compose(graph).upper_bound
        assert dense * (1 - 1e-6) <= folded <= product * (1 + 1e-12), (dense, folded, product)
        assert folded <= dense * (1 + 1e-5)  # exact up to float32 noise of the reference
        report = analyse(path, input_shapes=[",".join(map(str, shape))], device="cpu")
        assert report.bound_method == "folded" and report.upper_bound == pytest.approx(folded, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Combettes & Pesquet: the sum over split sets, enumerated


def cp_reference(weights: list[np.ndarray], slopes: list[Slope]) -> float:
    """theta over all subsets S of {1..m-1}, each term prod c^(not in S) r^(in S) prod ||partial products||."""
    m = len(weights)
    total = 0.0
    for split in itertools.product([False, True], repeat=m - 1):
        term, start = 1.0, 0
        for i in range(m - 1):
            term *= slopes[i].radius if split[i] else abs(slopes[i].mid)
        for j in [i + 1 for i in range(m - 1) if split[i]] + [m]:
            product = np.eye(weights[start].shape[1])
            for w in weights[start:j]:
                product = w @ product
            term *= np.linalg.norm(product, 2)
            start = j
        total += term
    return total


@pytest.mark.parametrize("slope", [RELU, Slope(0.1, 1.0), Slope(0.0, 0.25), Slope(-0.0999, 1.0999)])
def test_combettes_pesquet_matches_definition(slope: Slope) -> None:
    for depth in (2, 3, 5):
        weights = random_net(f"cp{depth}{slope}", [6, 9, 7, 8, 5, 4][: depth + 1])
        slopes = [slope] * (depth - 1)
        reference = cp_reference(weights, slopes)
        ours = combettes_pesquet_bound([exact(w) for w in weights], slopes)
        assert reference <= ours <= reference * (1 + 1e-8)
        if slope == RELU:  # their theta_m / 2^(m-1)
            assert ours <= folded_bound([exact(w) for w in weights], slopes) * (1 + 1e-12)


# ---------------------------------------------------------------------------------------------
# ECLipsE-Fast: the paper's recursion, literally


def eclipse_reference(weights: list[np.ndarray], alpha: float = 0.0, beta: float = 1.0) -> float:
    """Xu & Sivaranjani (2024), ECLipsE-Fast for slopes in [0, beta] (their Algorithm, p = 0)."""
    m = (alpha + beta) / 2
    x = np.eye(weights[0].shape[1])
    for w in weights[:-1]:
        k = w @ np.linalg.inv(x) @ w.T
        lam = 1 / (2 * m * m * np.linalg.eigvalsh((k + k.T) / 2).max())
        x = lam * np.eye(w.shape[0]) - lam * lam * m * m * k
    last = weights[-1]
    return math.sqrt(max(np.linalg.eigvals(last.T @ last @ np.linalg.inv(x)).real))


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_eclipse_fast_matches_paper(beta: float) -> None:
    for depth in (2, 3, 6):
        weights = random_net(f"ecl{depth}{beta}", [5, 8, 9, 7, 8, 6, 3][: depth + 1])
        slopes = [Slope(0.0, beta)] * (depth - 1)
        reference = eclipse_reference(weights, 0.0, beta)
        ours = eclipse_fast_bound([exact(w) for w in weights], slopes)
        assert ours is not None and reference * (1 - 1e-12) <= ours <= reference * (1 + 1e-7), (ours, reference)


# ---------------------------------------------------------------------------------------------
# soundness


def _jacobian_norms(weights: list[np.ndarray], biases: list[np.ndarray], slope: Slope, points: np.ndarray):
    """||J(x)|| of a ReLU / leaky-ReLU net at each point (slope.low for negative pre-activations)."""
    norms = []
    for x in points:
        jac, h = np.eye(len(x)), x
        for w, b in zip(weights[:-1], biases, strict=True):
            pre = w @ h + b
            d = np.where(pre > 0, slope.high, slope.low)
            h = np.where(pre > 0, slope.high * pre, slope.low * pre)
            jac = d[:, None] * (w @ jac)
        norms.append(np.linalg.norm(weights[-1] @ jac, 2))
    return np.array(norms)


@pytest.mark.parametrize("slope", [RELU, Slope(0.1, 1.0)])
def test_every_method_is_sound_on_random_nets(slope: Slope) -> None:
    for depth in (2, 3, 4):
        tag = f"sound{depth}{slope}"
        weights = random_net(tag, [4, 6, 5, 6, 3][: depth + 1])
        rng = rng_for(tag + "b")
        biases = [rng.standard_normal(w.shape[0]) for w in weights[:-1]]
        worst = _jacobian_norms(weights, biases, slope, rng.standard_normal((400, 4)) * 3).max()
        slopes = [slope] * (depth - 1)
        certified = [exact(w) for w in weights]
        for value in (
            folded_bound(certified, slopes),
            combettes_pesquet_bound(certified, slopes),
            eclipse_fast_bound(certified, slopes),
            lipsdp_bound(certified, slopes).value,
        ):
            assert value >= worst, (value, worst)


def test_exact_constant_of_tiny_relu_nets() -> None:
    """2 -> 2 -> 1 ReLU: two lines in general position cut the plane into 4 regions, so all four
    activation patterns occur and L = max over patterns of ||W2 D W1||."""
    for seed in range(5):
        weights = random_net(f"tiny{seed}", [2, 2, 1])
        true = max(
            np.linalg.norm(weights[1] @ np.diag(d) @ weights[0], 2) for d in itertools.product([0.0, 1.0], repeat=2)
        )
        certified = [exact(w) for w in weights]
        for value in (
            folded_bound(certified, [RELU]),
            combettes_pesquet_bound(certified, [RELU]),
            eclipse_fast_bound(certified, [RELU]),
            lipsdp_bound(certified, [RELU]).value,
        ):
            assert value >= true * (1 - 1e-12), (value, true)


# ---------------------------------------------------------------------------------------------
# LipSDP


def test_lipsdp_verified_and_no_method_below_it() -> None:
    for depth, slope in ((2, RELU), (3, RELU), (3, Slope(0.1, 1.0)), (4, Slope(0.0, 0.25))):
        weights = [exact(w) for w in random_net(f"sdp{depth}{slope}", [5, 8, 7, 6, 3][: depth + 1])]
        slopes = [slope] * (depth - 1)
        found = lipsdp_bound(weights, slopes)
        assert found is not None
        assert found.value >= found.solver_value  # the certified value is the solver's, inflated and checked
        assert found.value <= found.solver_value * (1 + 1e-6)
        tolerance = 1e-4
        for value in (
            folded_bound(weights, slopes),
            combettes_pesquet_bound(weights, slopes),
            eclipse_fast_bound(weights, slopes),
        ):
            assert value >= found.solver_value * (1 - tolerance), (value, found.solver_value)


def test_min_eigenvalue_lower_is_below_the_true_minimum() -> None:
    rng = rng_for("eig")
    a = rng.standard_normal((30, 30))
    matrix = torch.from_numpy(a @ a.T - 5 * np.eye(30))
    assert min_eigenvalue_lower(matrix) <= float(np.linalg.eigvalsh(matrix.numpy())[0])
    assert min_eigenvalue_lower(matrix, 0.5) <= float(np.linalg.eigvalsh(matrix.numpy())[0]) - 0.5


# ---------------------------------------------------------------------------------------------
# in the graph: residual branches, samples, report


def test_chain_inside_a_residual_branch(tmp_path) -> None:
    rng = rng_for("residual")
    proto = model(
        [
            node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),
            node("Relu", ["h1"], ["h2"]),
            node("Gemm", ["h2", "w2", "b2"], ["h3"], transB=1),
            node("Relu", ["h3"], ["h4"]),
            node("Gemm", ["h4", "w3"], ["h5"], transB=1),
            node("Add", ["x", "h5"], ["y"]),
        ],
        {"x": [1, 8]},
        initializers={
            "w1": rng.standard_normal((16, 8)).astype(np.float32),
            "b1": rng.standard_normal(16).astype(np.float32),
            "w2": rng.standard_normal((16, 16)).astype(np.float32) / 4,
            "b2": rng.standard_normal(16).astype(np.float32),
            "w3": rng.standard_normal((8, 16)).astype(np.float32) / 4,
        },
    )
    path = save(proto, tmp_path)
    graph = load_graph(path, [])
    prepare(graph)
    (chain,) = find_chains(graph)
    assert chain.start == "x" and chain.end == "h5" and len(chain.segments) == 3
    report = analyse(path, device="cpu")
    product = report.method_bounds["product"]
    branch = report.chains[0]
    # the Add rule: L(y) = 1 + L(branch), with the branch's chain bound in place of its product
    by_chain = 1 + min(v for v in branch.bounds.values() if v is not None)
    assert report.upper_bound <= by_chain * (1 + 1e-12)
    # the block as one region: ||I + c^2 W3 W2 W1|| + (split terms) <= 1 + the branch's Combettes-Pesquet bound
    region = report.method_bounds["frequency-cp"]
    assert region is not None and region < product
    assert report.upper_bound <= min(by_chain, region) * (1 + 1e-12)
    assert report.upper_bound < product
    run = Runner(path)
    x = rng.standard_normal((200, 8))
    y = x + 1e-3 * rng.standard_normal((200, 8))
    ratios = [np.linalg.norm(run(a[None]) - run(b[None])) / np.linalg.norm(a - b) for a, b in zip(x, y, strict=True)]
    assert max(ratios) <= report.upper_bound


@pytest.mark.parametrize("name", ["digits_mlp.onnx", "digits_cnn.onnx"])
def test_digits_samples_every_method(name: str) -> None:
    report = analyse(SAMPLES / name, device="cpu", method="all")
    bounds = report.method_bounds
    methods = {"product", "folded", "combettes-pesquet", "eclipse-fast", "frequency-cp", "block-sdp", "lipsdp"}
    assert set(bounds) == methods
    assert report.upper_bound <= min(v for v in bounds.values() if v is not None)
    assert bounds["combettes-pesquet"] < bounds["product"] and bounds["eclipse-fast"] < bounds["product"]
    data = report.to_dict()
    jsonschema.Draft202012Validator(load_schema(REPORT)).validate(json.loads(json.dumps(data)))
    assert data["bound_method"] == report.bound_method
    product_only = analyse(SAMPLES / name, device="cpu", method="product")
    assert product_only.upper_bound == bounds["product"] and product_only.bound_method == "product"
    assert product_only.method_bounds == {"product": bounds["product"]} and product_only.chains == []


def test_cli_method_option() -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lipcheck",
            "report",
            str(SAMPLES / "mlp.onnx"),
            "--device",
            "cpu",
            "-m",
            "combettes-pesquet",
            "-f",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["bound_method"] == "combettes-pesquet"
    assert set(data["method_bounds"]) == {"product", "combettes-pesquet"}
    assert data["upper_bound"] == data["method_bounds"]["combettes-pesquet"] < data["method_bounds"]["product"]
    assert [layer.get("refined_by") for layer in data["layers"]][-1] == "combettes-pesquet"
    bad = subprocess.run(
        [sys.executable, "-m", "lipcheck", "report", str(SAMPLES / "mlp.onnx"), "-m", "nope"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2


def test_config_method_key(tmp_path) -> None:
    from lipcheck.config import ConfigError, Overrides, load_config

    config = tmp_path / "lipcheck.toml"
    config.write_text(
        'method = "eclipse-fast"\n[[models]]\npath = "a.onnx"\n[[models]]\npath = "b.onnx"\nmethod = "product"\n'
    )
    loaded = load_config(config)
    assert [m.settings.method for m in loaded.models] == ["eclipse-fast", "product"]
    overridden = load_config(config, overrides=Overrides(method="lipsdp"))
    assert [m.settings.method for m in overridden.models] == ["lipsdp", "lipsdp"]
    config.write_text('method = "fastest"\n[[models]]\npath = "a.onnx"\n')
    with pytest.raises(ConfigError, match="method must be one of"):
        load_config(config)
