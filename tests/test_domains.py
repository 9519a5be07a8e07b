"""Input domains: value ranges and local bounds checked against the network evaluated on the domain.

What is measured, on tiny ONNX graphs built here and on the shipped digits models:
* range soundness: every intermediate value of the graph, at random points and corners of a random box, lies
  in the interval ``value_ranges`` gives it (one case per op with a range rule, and monotone/affine ones);
* local-bound soundness: on [0, 1]^n the domain bound of nets that are not globally Lipschitz (gating,
  SwiGLU, quotients, exp, squares, attention, a ViT-like block) is finite and at least the largest difference
  quotient found by random pairs, pairs along the Jacobian's top singular vector and a gradient ascent;
* --around: each sample's bound is at least the quotients sampled in its l2 ball and at most the global bound;
* the command line: the domain in the JSON and the verdict, one-line usage errors, the gate's baseline check.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from lipcheck.domain import Domain
from lipcheck.frontends import load_model
from lipcheck.graph import Graph
from lipcheck.interpret import interpret
from lipcheck.ops.base import Interval
from lipcheck.passes import prepare
from lipcheck.pipeline import Around, analyse, certify
from lipcheck.ranges import value_ranges
from tests.conftest import ROOT, SAMPLES
from tests.onnx_builders import node, rng_for

RELATIVE = 1e-9  # bounds are compared with quotients computed in float64
SLOW = pytest.mark.slow  # the digits CNN's extra cases (4-7 s each) run with -m slow


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Building and loading graphs


def build(
    tmp_path: Path, nodes: list, shape: tuple[int, ...], inits: dict[str, np.ndarray] | None = None, opset: int = 21
) -> Graph:
    """A graph of ``nodes`` on one float input ``x`` of ``shape`` (output ``y``), saved, loaded and prepared."""
    return prepare(load(tmp_path, nodes, shape, inits, opset))


def load(
    tmp_path: Path, nodes: list, shape: tuple[int, ...], inits: dict[str, np.ndarray] | None = None, opset: int = 21
) -> Graph:
    """The graph of ``build`` as loaded (the primitive ops the file holds, before the passes)."""
    graph = helper.make_graph(
        nodes,
        "domain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))],
        [onnx.ValueInfoProto(name="y")],
        [numpy_helper.from_array(_stored(v), name=k) for k, v in (inits or {}).items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10
    proto = onnx.shape_inference.infer_shapes(proto)  # as exporters write them (a Reshape's target, here)
    path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.onnx"
    onnx.save(proto, str(path))
    loaded = load_model(path)
    assert isinstance(loaded, Graph)
    return loaded


def _stored(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    return value.astype(np.float32) if value.dtype.kind == "f" else value


def weights(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    fan_in = shape[-1] if len(shape) == 2 else math.prod(shape[1:])
    return (rng.standard_normal(shape) * scale / math.sqrt(fan_in)).astype(np.float32)


def points_in(box: Interval, rng: np.random.Generator, count: int) -> list[torch.Tensor]:
    """Corners (all of them for up to 8 entries, else random ones), the centre and uniform points of the box."""
    lo, hi = box.lo, box.hi
    n = lo.numel()
    found = [box.centre]
    if n <= 8:
        masks = [torch.tensor(bits, dtype=torch.bool).reshape(lo.shape) for bits in itertools.product([0, 1], repeat=n)]
    else:
        masks = [torch.from_numpy(rng.integers(0, 2, lo.shape).astype(bool)) for _ in range(count // 2)]
    found += [torch.where(mask, hi, lo) for mask in masks]
    found += [lo + (hi - lo) * torch.from_numpy(rng.random(lo.shape)) for _ in range(count)]
    return found


# ---------------------------------------------------------------------------------------------
# 1. Range soundness, op by op


def cases() -> dict[str, tuple[Callable[[np.random.Generator], tuple[list, tuple[int, ...], dict]], str]]:  # noqa: C901
    """name -> (builder of (nodes, input shape, initializers), the box's sign: 'any', 'positive' or 'negative')."""

    def unary(op: str, shape: tuple[int, ...] = (1, 6), **attrs):
        return lambda rng: ([node(op, ["x"], ["y"], **attrs)], shape, {})

    def gemm_then(op: str, extra: list[str] | None = None, **attrs):
        def make(rng):
            nodes = [node("Gemm", ["x", "W", "b"], ["h"], transB=1), node(op, ["h", *(extra or [])], ["y"], **attrs)]
            return nodes, (1, 5), {"W": weights(rng, 6, 5, scale=2), "b": weights(rng, 6)}

        return make

    def conv(rng):
        nodes = [node("Conv", ["x", "W", "b"], ["h"], pads=[1, 1, 1, 1]), node("Relu", ["h"], ["y"])]
        return nodes, (1, 2, 5, 5), {"W": weights(rng, 3, 2, 3, 3), "b": weights(rng, 3)}

    def conv_bn(rng):
        c = 3
        nodes = [
            node("Conv", ["x", "W"], ["h"]),
            node("BatchNormalization", ["h", "s", "t", "m", "v"], ["y"]),
        ]
        bn = {"s": rng.uniform(-2, 2, c), "t": rng.standard_normal(c), "m": rng.standard_normal(c)}
        return nodes, (1, 2, 4, 4), {"W": weights(rng, c, 2, 3, 3), **bn, "v": rng.uniform(0.2, 2, c)}

    def relu_bn(rng):
        c = 2
        nodes = [node("Relu", ["x"], ["h"]), node("BatchNormalization", ["h", "s", "t", "m", "v"], ["y"])]
        bn = {"s": np.array([-1.5, 0.7]), "t": rng.standard_normal(c), "m": rng.standard_normal(c)}
        return nodes, (1, 2, 2, 2), {**bn, "v": rng.uniform(0.2, 2, c)}

    def pool(op: str):
        def make(rng):
            return [node(op, ["x"], ["y"], kernel_shape=[2, 2], strides=[1, 1])], (1, 2, 3, 3), {}

        return make

    def concat(rng):
        nodes = [
            node("Sigmoid", ["x"], ["s"]),
            node("Neg", ["x"], ["n"]),
            node("Concat", ["x", "s", "n"], ["y"], axis=1),
        ]
        return nodes, (1, 4), {}

    def reshape(rng):
        nodes = [node("Reshape", ["x", "shape"], ["r"]), node("Gemm", ["r", "W"], ["y"], transB=1)]
        return nodes, (1, 2, 3), {"shape": np.array([1, 6], dtype=np.int64), "W": weights(rng, 3, 6)}

    def binary(op: str):
        """op(Gemm_a(x), Gemm_b(x)): two activations."""

        def make(rng):
            nodes = [
                node("Gemm", ["x", "A"], ["a"], transB=1),
                node("Gemm", ["x", "B"], ["b"], transB=1),
                node(op, ["a", "b"], ["y"]),
            ]
            return nodes, (1, 4), {"A": weights(rng, 5, 4, scale=2), "B": weights(rng, 5, 4, scale=2)}

        return make

    def quotient(rng):
        """Gemm(x) / (1 + |Gemm(x)|) and Gemm(x) / (sigmoid(x) + 0.25): divisors that stay away from 0."""
        nodes = [
            node("Gemm", ["x", "A"], ["a"], transB=1),
            node("Abs", ["a"], ["m"]),
            node("Add", ["m", "one"], ["d"]),
            node("Div", ["a", "d"], ["q1"]),
            node("Sigmoid", ["a"], ["s"]),
            node("Add", ["s", "quarter"], ["e"]),
            node("Div", ["a", "e"], ["q2"]),
            node("Add", ["q1", "q2"], ["y"]),
        ]
        inits = {"A": weights(rng, 4, 4, scale=2), "one": np.array(1.0), "quarter": np.array(0.25)}
        return nodes, (1, 4), inits

    def power(p: float):
        def make(rng):
            return [node("Pow", ["x", "p"], ["y"])], (1, 6), {"p": np.array(p)}

        return make

    def self_product(rng):
        """x * x: the same value twice (the interval product holds it, however loosely)."""
        return [node("Mul", ["x", "x"], ["y"])], (1, 6), {}

    def matmul(rng):
        """Q K^T of one token sequence: MatMul of two activations."""
        nodes = [
            node("MatMul", ["x", "Wq"], ["q"]),
            node("MatMul", ["x", "Wk"], ["k"]),
            node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
            node("MatMul", ["q", "kt"], ["y"]),
        ]
        return nodes, (1, 3, 4), {"Wq": weights(rng, 4, 4, scale=2), "Wk": weights(rng, 4, 4, scale=2)}

    def softmax(rng):
        nodes = [node("MatMul", ["x", "W"], ["h"]), node("Softmax", ["h"], ["y"], axis=-1)]
        return nodes, (1, 2, 4), {"W": weights(rng, 4, 5, scale=3)}

    def layernorm(rng):
        nodes = [node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)]
        return nodes, (1, 3, 5), {"g": rng.uniform(-2, 2, 5), "b": rng.standard_normal(5)}

    def gelu_erf(rng):
        """0.5 x (1 + erf(x / sqrt 2)), as the TorchScript exporter writes it (recognised as GELU)."""
        nodes = [
            node("Div", ["x", "r2"], ["d"]),
            node("Erf", ["d"], ["e"]),
            node("Add", ["e", "one"], ["p"]),
            node("Mul", ["x", "p"], ["m"]),
            node("Mul", ["m", "half"], ["y"]),
        ]
        return nodes, (1, 6), {"r2": np.array(math.sqrt(2)), "one": np.array(1.0), "half": np.array(0.5)}

    def silu(rng):
        """x * sigmoid(x), recognised as SiLU."""
        return [node("Sigmoid", ["x"], ["s"]), node("Mul", ["x", "s"], ["y"])], (1, 6), {}

    return {
        "Relu": (unary("Relu"), "any"),
        "Sigmoid": (unary("Sigmoid"), "any"),
        "Conv": (conv, "any"),
        "Gemm": (gemm_then("Tanh"), "any"),
        "Conv+BatchNorm": (conv_bn, "any"),
        "Relu+BatchNorm": (relu_bn, "any"),
        "MaxPool": (pool("MaxPool"), "any"),
        "AveragePool": (pool("AveragePool"), "any"),
        "Concat": (concat, "any"),
        "Reshape": (reshape, "any"),
        "Sub": (binary("Sub"), "any"),
        "Mul": (binary("Mul"), "any"),
        "Mul-self": (self_product, "any"),
        "Div": (quotient, "any"),
        "Exp": (unary("Exp"), "any"),
        "Log": (unary("Log"), "positive"),
        "Sqrt": (unary("Sqrt"), "positive"),
        "Pow2": (power(2.0), "any"),
        "Pow3": (power(3.0), "any"),
        "Pow0.5": (power(0.5), "positive"),
        "Pow-1": (power(-1.0), "positive"),
        "Pow-1-negative": (power(-1.0), "negative"),
        "Reciprocal": (unary("Reciprocal"), "negative"),
        "Abs": (unary("Abs"), "any"),
        "Cosh": (unary("Cosh"), "any"),
        "MatMul": (matmul, "any"),
        "Softmax": (softmax, "any"),
        "LayerNormalization": (layernorm, "any"),
        "LayerNormalization on a narrow box": (layernorm, "narrow"),  # the variance bounded away from 0
        "Gelu": (unary("Gelu", (1, 6)), "any"),
        "Gelu-tanh": (unary("Gelu", (1, 6), approximate="tanh"), "any"),
        "Gelu-erf": (gelu_erf, "any"),
        "SiLU": (silu, "any"),
        "HardSwish": (unary("HardSwish"), "any"),
        "Mish": (unary("Mish"), "any"),
    }


CASES = cases()
RECOGNISED = {"SiLU": "SiLU", "Gelu-erf": "GELU"}  # the activation the pass recognises


def random_box(rng: np.random.Generator, shape: tuple[int, ...], sign: str) -> Interval:
    """A box of random ends per entry: crossing 0 or not ('any'), inside (0.1, 3) or inside (-3, -0.1), or
    narrow (widths up to 0.05)."""
    if sign == "narrow":
        low = rng.uniform(-3, 3, shape)
        high = low + rng.uniform(0.001, 0.05, shape)
    elif sign == "any":
        low = rng.uniform(-3, 1.5, shape)
        high = low + rng.uniform(0.05, 2.5, shape)
    else:
        low = rng.uniform(0.1, 1.5, shape)
        high = low + rng.uniform(0.05, 1.5, shape)
        if sign == "negative":
            low, high = -high, -low
    return Interval(torch.from_numpy(low), torch.from_numpy(high))


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_ranges_hold_every_value(tmp_path: Path, case: str) -> None:
    make, sign = CASES[case]
    rng = rng_for(f"ranges {case}")
    nodes, shape, inits = make(rng)
    loaded = load(tmp_path, nodes, shape, inits)
    graph = prepare(loaded.copy())
    present = {n.op for n in graph.nodes} | {str(n.attrs.get("activation")) for n in graph.nodes}
    if case in RECOGNISED:
        assert RECOGNISED[case] in present, present
    if case == "Conv+BatchNorm":
        assert "BatchNormalization" not in present, present
    function = interpret(loaded, torch.float64)  # the file's own ops (not the recognised reference formulas)
    known = {name for n in loaded.nodes for name in n.outputs}
    for trial in range(5):
        box = random_box(rng, shape, sign)
        ranges = value_ranges(graph, {"x": box})
        assert "y" in ranges, f"{case}: no range for the output"
        names = [name for name in ranges if name in known and ranges[name].lo.is_floating_point()]
        for point in points_in(box, rng, 40):
            values = function.run({"x": point}, outputs=names)
            for name in names:
                value, interval = values[name], ranges[name]
                inside = (value >= interval.lo) & (value <= interval.hi)
                assert bool(inside.all()), (
                    f"{case} trial {trial}: {name} = {value[~inside].tolist()} outside "
                    f"[{interval.lo.broadcast_to(value.shape)[~inside].tolist()}, "
                    f"{interval.hi.broadcast_to(value.shape)[~inside].tolist()}]"
                )


def test_ranges_are_not_vacuous(tmp_path: Path) -> None:
    """A few ranges are tight: ReLU's and Exp's are the image of the box, Softmax's is inside [0, 1], LayerNorm's
    inside beta +- |gamma| sqrt(d - 1)."""
    box = Interval(torch.tensor([[-1.0, 0.5, 2.0]], dtype=torch.float64), torch.tensor([[1.0, 1.5, 3.0]]).double())
    for op, low, high in (("Relu", [0, 0.5, 2], [1, 1.5, 3]), ("Exp", np.exp([-1, 0.5, 2]), np.exp([1, 1.5, 3]))):
        graph = build(tmp_path, [node(op, ["x"], ["y"])], (1, 3))
        found = value_ranges(graph, {"x": box})["y"]
        assert np.allclose(found.lo.numpy(), [low], rtol=1e-12, atol=1e-300)
        assert np.allclose(found.hi.numpy(), [high], rtol=1e-12, atol=1e-300)
    make, _ = CASES["Softmax"]
    graph = build(tmp_path, *make(rng_for("vacuous softmax")))
    found = value_ranges(graph, {"x": random_box(rng_for("box"), (1, 2, 4), "any")})["y"]
    assert bool((found.lo >= 0).all()) and bool((found.hi <= 1).all()) and bool((found.lo > 0).all())


# ---------------------------------------------------------------------------------------------
# 2. Local bounds on [0, 1]^n: at least every difference quotient found there


def gemm(name: str, x: str, rng: np.random.Generator, inits: dict, n_out: int, n_in: int, scale: float = 1.5) -> list:
    """Gemm(x, W_name, b_name) with random weights added to ``inits``."""
    inits[f"W{name}"], inits[f"b{name}"] = weights(rng, n_out, n_in, scale=scale), weights(rng, n_out, scale=0.5)
    return [node("Gemm", [x, f"W{name}", f"b{name}"], [name], transB=1)]


def attention(x: str, out: str, rng: np.random.Generator, inits: dict, d: int, prefix: str = "") -> list:
    """softmax(Q K^T / sqrt d) V W_o of LayerNorm(x), x [1, T, d]."""
    p = prefix
    for w in ("q", "k", "v", "o"):
        inits[f"{p}W{w}"] = weights(rng, d, d, scale=2.0)
    inits[f"{p}g"], inits[f"{p}beta"] = rng.uniform(0.5, 1.5, d), rng.standard_normal(d) * 0.2
    inits[f"{p}root"] = np.array(math.sqrt(d))
    return [
        node("LayerNormalization", [x, f"{p}g", f"{p}beta"], [f"{p}ln"], axis=-1, epsilon=1e-5),
        node("MatMul", [f"{p}ln", f"{p}Wq"], [f"{p}q"]),
        node("MatMul", [f"{p}ln", f"{p}Wk"], [f"{p}k"]),
        node("MatMul", [f"{p}ln", f"{p}Wv"], [f"{p}v"]),
        node("Transpose", [f"{p}k"], [f"{p}kt"], perm=[0, 2, 1]),
        node("MatMul", [f"{p}q", f"{p}kt"], [f"{p}s"]),
        node("Div", [f"{p}s", f"{p}root"], [f"{p}sd"]),
        node("Softmax", [f"{p}sd"], [f"{p}a"], axis=-1),
        node("MatMul", [f"{p}a", f"{p}v"], [f"{p}o"]),
        node("MatMul", [f"{p}o", f"{p}Wo"], [out]),
    ]


def nets() -> dict[str, Callable[[np.random.Generator], tuple[list, tuple[int, ...], dict]]]:
    """Networks that are not globally Lipschitz, each built on one of the domain's local rules."""

    def se(rng):
        """Squeeze-and-excitation: x * sigmoid(conv(pool(x))), then a convolution."""
        inits = {"Wz": weights(rng, 4, 4, 1, 1, scale=3), "bz": weights(rng, 4), "Wy": weights(rng, 2, 4, 3, 3)}
        nodes = [
            node("GlobalAveragePool", ["x"], ["p"]),
            node("Conv", ["p", "Wz", "bz"], ["z"]),
            node("Sigmoid", ["z"], ["s"]),
            node("Mul", ["x", "s"], ["g"]),
            node("Conv", ["g", "Wy"], ["y"]),
        ]
        return nodes, (1, 4, 3, 3), inits

    def swiglu(rng):
        inits: dict = {}
        nodes = gemm("h1", "x", rng, inits, 8, 6) + gemm("h2", "x", rng, inits, 8, 6)
        nodes += [node("Sigmoid", ["h1"], ["s"]), node("Mul", ["h1", "s"], ["u"]), node("Mul", ["u", "h2"], ["m"])]
        return nodes + gemm("y", "m", rng, inits, 3, 8), (1, 6), inits

    def softsign_div(rng):
        """h / (1 + |h|) as a Div of two activations."""
        inits: dict = {"one": np.array(1.0)}
        nodes = gemm("h", "x", rng, inits, 6, 5, scale=3)
        nodes += [node("Abs", ["h"], ["a"]), node("Add", ["a", "one"], ["d"]), node("Div", ["h", "d"], ["q"])]
        return nodes + gemm("y", "q", rng, inits, 3, 6), (1, 5), inits

    def rms_div(rng):
        """h / sqrt(mean(h^2) + eps): RMSNorm written out, a Div of two activations."""
        inits: dict = {"eps": np.array(0.05), "axes": np.array([-1], dtype=np.int64)}
        nodes = gemm("h", "x", rng, inits, 6, 5)
        nodes += [
            node("Mul", ["h", "h"], ["sq"]),
            node("ReduceMean", ["sq", "axes"], ["m"], keepdims=1),
            node("Add", ["m", "eps"], ["e"]),
            node("Sqrt", ["e"], ["r"]),
            node("Div", ["h", "r"], ["q"]),
        ]
        return nodes + gemm("y", "q", rng, inits, 3, 6), (1, 5), inits

    def exp_gating(rng):
        inits: dict = {}
        nodes = gemm("h", "x", rng, inits, 6, 5) + gemm("g", "x", rng, inits, 6, 5)
        nodes += [node("Exp", ["g"], ["e"]), node("Mul", ["h", "e"], ["m"])]
        return nodes + gemm("y", "m", rng, inits, 3, 6), (1, 5), inits

    def square(rng):
        inits: dict = {"two": np.array(2.0)}
        nodes = gemm("h", "x", rng, inits, 6, 5, scale=2) + [node("Pow", ["h", "two"], ["p"])]
        return nodes + gemm("y", "p", rng, inits, 3, 6), (1, 5), inits

    def attention_net(rng):
        inits: dict = {}
        return attention("x", "y", rng, inits, 4), (1, 3, 4), inits

    def vit_block(rng):
        """x + attention(LN x), then + W2 GELU(W1 LN(.) + b1) (GELU written with Erf, recognised)."""
        d, hidden = 4, 8
        inits: dict = {
            "g2": rng.uniform(0.5, 1.5, d),
            "beta2": rng.standard_normal(d) * 0.2,
            "W1": weights(rng, d, hidden, scale=2),
            "b1": weights(rng, hidden),
            "W2": weights(rng, hidden, d, scale=2),
            "r2": np.array(math.sqrt(2)),
            "one": np.array(1.0),
            "half": np.array(0.5),
        }
        nodes = attention("x", "att", rng, inits, d, prefix="a_")
        nodes += [
            node("Add", ["x", "att"], ["r1"]),
            node("LayerNormalization", ["r1", "g2", "beta2"], ["ln2"], axis=-1, epsilon=1e-5),
            node("MatMul", ["ln2", "W1"], ["f1"]),
            node("Add", ["f1", "b1"], ["f"]),
            node("Div", ["f", "r2"], ["fd"]),
            node("Erf", ["fd"], ["fe"]),
            node("Add", ["fe", "one"], ["fp"]),
            node("Mul", ["f", "fp"], ["fm"]),
            node("Mul", ["fm", "half"], ["gelu"]),
            node("MatMul", ["gelu", "W2"], ["f2"]),
            node("Add", ["r1", "f2"], ["y"]),
        ]
        return nodes, (1, 3, d), inits

    return {
        "se": se,
        "swiglu": swiglu,
        "softsign-div": softsign_div,
        "rms-div": rms_div,
        "exp-gating": exp_gating,
        "square": square,
        "attention": attention_net,
        "vit-block": vit_block,
    }


NETS = nets()


def clamp_to(low: torch.Tensor, high: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: torch.minimum(torch.maximum(t, low), high)


def into_ball(
    centre: torch.Tensor, radius: float, box: Interval | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Projection onto the l2 ball (then into the box, which keeps it in the ball when the centre is in the box)."""

    def project(t: torch.Tensor) -> torch.Tensor:
        d = t - centre
        norm = float(d.norm())
        t = centre + d * min(1.0, radius / norm) if norm > 0 else t
        return t if box is None else torch.minimum(torch.maximum(t, box.lo), box.hi)

    return project


def quotient(function: Callable, a: torch.Tensor, b: torch.Tensor) -> float:
    gap = float((a - b).norm())
    if gap == 0.0:
        return 0.0
    with torch.no_grad():
        return float((function(a) - function(b)).norm()) / gap


def largest_quotient(
    function: Callable,
    draw: Callable[[], torch.Tensor],
    project: Callable[[torch.Tensor], torch.Tensor],
    rng: np.random.Generator,
    pairs: int = 60,
    jacobians: int = 12,
    steps: int = 40,
    step: float = 1e-4,
) -> float:
    """The largest ||f(a) - f(b)|| / ||a - b|| found with a, b in the domain (``draw`` gives a point of it,
    ``project`` maps a point into it): random pairs, near pairs along the Jacobian's top singular vector, and a
    gradient ascent on the pair from the best of those."""
    best, best_pair = 0.0, None

    def consider(a: torch.Tensor, b: torch.Tensor) -> None:
        nonlocal best, best_pair
        value = quotient(function, a, b)
        if value > best:
            best, best_pair = value, (a.clone(), b.clone())

    for _ in range(pairs):
        consider(draw(), draw())
    for _ in range(jacobians):
        a = draw()
        jac = torch.autograd.functional.jacobian(function, a).reshape(-1, a.numel())
        direction = torch.linalg.svd(jac).Vh[0].reshape(a.shape)
        for sign in (1.0, -1.0):
            b = project(a + sign * step * direction)
            consider(a, b)
            consider(project(a - sign * step * direction), b)
    assert best_pair is not None
    a, b = (t.clone().requires_grad_(True) for t in best_pair)
    optimiser = torch.optim.Adam([a, b], lr=0.01)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = -(function(a) - function(b)).norm() / (a - b).norm().clamp_min(1e-12)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            a.copy_(project(a))
            b.copy_(project(b))
        consider(a.detach(), b.detach())
    return best


def unit_box_draw(shape: tuple[int, ...], rng: np.random.Generator) -> Callable[[], torch.Tensor]:
    """Corners half of the time, uniform points otherwise."""

    def draw() -> torch.Tensor:
        if rng.random() < 0.3:
            return torch.from_numpy(rng.integers(0, 2, shape).astype(np.float64))
        return torch.from_numpy(rng.random(shape))

    return draw


@pytest.mark.parametrize("net", sorted(NETS))
def test_domain_bound_holds_every_quotient(tmp_path: Path, net: str) -> None:
    rng = rng_for(f"nets {net}")
    nodes, shape, inits = NETS[net](rng)
    loaded = load(tmp_path, nodes, shape, inits)
    assert certify(loaded, copy=True).upper_bound is None, f"{net} should not be globally Lipschitz"
    found = certify(loaded, domain=Domain(low=(0.0,), high=(1.0,)), copy=True)
    upper = found.upper_bound
    assert upper is not None and math.isfinite(upper), [r.reason for r in found.composition.unbounded]
    function = interpret(loaded, torch.float64)  # the file's primitives
    zeros, ones = torch.zeros(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64)
    measured = largest_quotient(function, unit_box_draw(shape, rng), clamp_to(zeros, ones), rng)
    assert measured > 0
    assert upper * (1 + RELATIVE) >= measured, f"{net}: bound {upper!r} < quotient {measured!r} on [0, 1]^n"


# ---------------------------------------------------------------------------------------------
# 3. Local bounds (--around) on the trained digits models


def digits(count: int) -> np.ndarray:
    """Held-out digits (pixels / 16, in [0, 1]); uniform points of [0, 1]^64 without scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return rng_for("digits").random((count, 64))
    return load_digits().data[1500 : 1500 + count] / 16.0


DIGITS = {"digits_mlp.onnx": ((1, 64), 3), "digits_cnn.onnx": ((1, 1, 8, 8), 1)}  # input shape, samples (cnn: slow)


@pytest.fixture(scope="module")
def global_bounds() -> dict[str, float]:
    found = {}
    for model in DIGITS:
        loaded = load_model(SAMPLES / model)
        assert isinstance(loaded, Graph)
        bound = certify(loaded, copy=True).upper_bound
        assert bound is not None
        found[model] = bound
    return found


@pytest.mark.parametrize(
    ("model", "radius"),
    [
        (model, radius) if model != "digits_cnn.onnx" or radius == 0.01 else pytest.param(model, radius, marks=SLOW)
        for model in sorted(DIGITS)
        for radius in (0.01, 0.1, 1.0)
    ],
)
def test_local_bounds_hold_in_their_balls(model: str, radius: float, global_bounds: dict[str, float]) -> None:
    shape, count = DIGITS[model]
    samples = digits(count).reshape(count, *shape[1:])
    report = analyse(SAMPLES / model, device="cpu", around=Around(samples, radius))
    uppers = [entry["upper"] for entry in report.local["samples"]]
    assert len(uppers) == count and report.domain["kind"] == "ball" and report.domain["radius"] == radius
    loaded = load_model(SAMPLES / model)
    function = interpret(loaded, torch.float64)
    rng = rng_for(f"local {model} {radius}")
    for index, upper in enumerate(uppers):
        assert upper is not None and upper <= global_bounds[model] * (1 + RELATIVE), (index, upper)
        centre = torch.from_numpy(samples[index]).reshape(shape)

        def draw(centre: torch.Tensor = centre) -> torch.Tensor:
            direction = torch.from_numpy(rng.standard_normal(shape))
            return centre + direction / direction.norm() * radius * rng.random() ** (1 / centre.numel())

        measured = largest_quotient(function, draw, into_ball(centre, radius), rng, pairs=30, jacobians=8, steps=20)
        assert upper * (1 + RELATIVE) >= measured, f"{model} sample {index} radius {radius}: {upper!r} < {measured!r}"
    if radius == 0.01 and model == "digits_mlp.onnx":  # stable ReLUs make the small balls' bounds smaller
        assert max(uppers) < global_bounds[model]


# ---------------------------------------------------------------------------------------------
# 4. The command line


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160", "NO_COLOR": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("LIPCHECK_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "lipcheck", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_cli_input_range_gives_a_box_domain_and_a_finite_bound_for_gated() -> None:
    """gated.onnx: LayerNorm, then a product of two activations: no global bound, a finite one on [-1, 1] (its
    LayerNorm bounds the product's factors whatever the input box; [-1, 1] is a typical embedding range)."""
    result = cli("report", str(SAMPLES / "gated.onnx"), "--device", "cpu", "--input-range", "-1,1", "-f", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["domain"]["kind"] == "box" and data["domain"]["input_range"] == [[-1.0], [1.0]]
    assert data["domain"]["text"] == "inputs in [-1, 1]"
    assert data["upper_bound"] is not None and math.isfinite(data["upper_bound"])
    assert data["lower_bound"] is None or data["lower_bound"] <= data["upper_bound"]
    loaded = load_model(SAMPLES / "gated.onnx")
    assert isinstance(loaded, Graph) and certify(loaded, copy=True).upper_bound is None


def test_cli_verdict_names_the_domain() -> None:
    result = cli("report", str(SAMPLES / "mlp.onnx"), "--device", "cpu", "--input-range", "0,1", "--lower-budget", "16")
    assert result.returncode == 0, result.stderr
    verdicts = [line for line in result.stdout.splitlines() if "on inputs in [0, 1] (not global)" in line]
    assert len(verdicts) == 1, result.stdout


def test_cli_around_without_radius_is_one_line(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", digits(3))
    no_radius = cli("report", str(SAMPLES / "digits_mlp.onnx"), "--around", str(tmp_path / "x.npy"))
    assert no_radius.returncode == 2 and len(no_radius.stderr.strip().splitlines()) == 1, no_radius.stderr
    assert "--radius" in no_radius.stderr


def test_cli_wrong_label_count_is_one_line(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", digits(3))
    np.save(tmp_path / "y.npy", np.array([0, 1], dtype=np.int64))
    model = str(SAMPLES / "digits_mlp.onnx")
    wrong = cli(
        "report", model, "--around", str(tmp_path / "x.npy"), "--radius", "0.1", "--labels", str(tmp_path / "y.npy")
    )
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    assert "2" in wrong.stderr and "3" in wrong.stderr


def test_check_against_a_baseline_on_another_domain_is_not_compared(tmp_path: Path) -> None:
    """The baseline bounds the constant on [0, 1]; ``lipcheck check`` computes the global one: a warning, no
    comparison (a domain bound is no regression of a global one, nor the other way round)."""
    (tmp_path / "mlp.onnx").write_bytes((SAMPLES / "mlp.onnx").read_bytes())
    baseline = analyse(tmp_path / "mlp.onnx", device="cpu", domain=Domain(low=(0.0,), high=(1.0,)))
    (tmp_path / "baseline.json").write_text(json.dumps(baseline.to_dict()))
    (tmp_path / "pyproject.toml").write_text(
        '[tool.lipcheck]\ndevice = "cpu"\n\n[[tool.lipcheck.models]]\npath = "mlp.onnx"\nbaseline = "baseline.json"\n'
    )
    result = cli("check", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not compared" in result.stdout + result.stderr
    assert "inputs in [0, 1]" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# 5. Every ONNX sample model on a box: the domain bound holds every quotient and is at most the global bound

SAMPLE_BOXES = {
    "mlp.onnx": (-1.0, 1.0),
    "cnn_bn.onnx": (0.0, 1.0),
    "resnet_small.onnx": (0.0, 1.0),
    "gated.onnx": (-1.0, 1.0),
    "digits_mlp.onnx": (0.0, 1.0),
    "digits_cnn.onnx": (0.0, 1.0),
}


@pytest.mark.parametrize(
    "model", [m if m != "digits_cnn.onnx" else pytest.param(m, marks=SLOW) for m in sorted(SAMPLE_BOXES)]
)
def test_sample_models_on_a_box(model: str) -> None:
    low, high = SAMPLE_BOXES[model]
    loaded = load_model(SAMPLES / model)
    assert isinstance(loaded, Graph)
    shape = tuple(int(d) for d in loaded.shape(loaded.inputs[0]))  # type: ignore[union-attr]
    everywhere = certify(loaded, copy=True).upper_bound
    upper = certify(loaded, domain=Domain(low=(low,), high=(high,)), copy=True).upper_bound
    assert upper is not None and math.isfinite(upper)
    if everywhere is not None:
        assert upper <= everywhere * (1 + RELATIVE)
    rng = rng_for(f"sample box {model}")
    span = high - low

    def draw() -> torch.Tensor:
        return torch.from_numpy(low + span * rng.random(shape))

    lo, hi = torch.full(shape, low, dtype=torch.float64), torch.full(shape, high, dtype=torch.float64)
    measured = largest_quotient(
        interpret(loaded, torch.float64), draw, clamp_to(lo, hi), rng, pairs=20, jacobians=4, steps=15
    )
    assert 0 < measured <= upper * (1 + RELATIVE), f"{model}: bound {upper!r} < quotient {measured!r}"


# ---------------------------------------------------------------------------------------------
# 6. Normalisation, labels and robust radii


def test_normalisation_box_is_the_image_of_the_raw_box() -> None:
    domain = Domain(low=(0.0,), high=(1.0,), mean=(0.5, 0.25), std=(0.5, 0.25))
    box = domain.interval((1, 2, 3, 3))
    assert torch.allclose(box.lo[0, :, 0, 0], torch.tensor([-1.0, -1.0], dtype=torch.float64))
    assert torch.allclose(box.hi[0, :, 0, 0], torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert bool((box.lo <= torch.tensor([-1.0, -1.0]).reshape(1, 2, 1, 1)).all())  # pushed outward, never in
    low, high = domain.inner_box()
    assert low <= -1.0 + 1e-12 and high >= 1.0 - 1e-12 and high < 1.0 + 1e-9  # the channels' common part


def test_robust_radius_and_certified_accuracy_follow_the_margin() -> None:
    data = np.load(SAMPLES / "digits_test.npz")
    x, y = data["x"][:6], data["y"][:6]
    radius = 0.1
    report = analyse(SAMPLES / "digits_mlp.onnx", device="cpu", around=Around(x, radius, "2", y, (0.02, radius)))
    function = interpret(load_model(SAMPLES / "digits_mlp.onnx"), torch.float64)  # type: ignore[arg-type]
    samples = report.local["samples"]
    for row, sample, label in zip(samples, x, y, strict=True):
        logits = function(torch.from_numpy(sample.astype(np.float64)).reshape(1, 64)).reshape(-1)
        others = torch.cat([logits[:label], logits[label + 1 :]])
        margin = float(logits[label] - others.max())
        assert row["margin"] == pytest.approx(margin, rel=1e-9)
        expected = min(radius, margin / (math.sqrt(2) * row["upper"])) if margin > 0 else 0.0
        assert row["certified_radius"] == pytest.approx(expected, rel=1e-12)
    accuracy = report.local["certified_accuracy"]
    assert [item["radius"] for item in accuracy] == [0.02, radius]
    for item in accuracy:
        share = sum(row["certified_radius"] >= item["radius"] for row in samples) / len(samples)
        assert item["accuracy"] == share


def test_cli_channel_range_is_a_per_channel_box(tmp_path: Path) -> None:
    result = cli(
        "report", str(SAMPLES / "cnn_bn.onnx"), "--device", "cpu", "-f", "json", "--channel-range", "0:1,0:1,-1:1"
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["domain"]["kind"] == "box" and data["domain"]["input_range"] == [[0.0, 0.0, -1.0], [1.0, 1.0, 1.0]]
    assert data["lower_bound_search"]["input_range"] == [0.0, 1.0]  # the channels' common part
    assert 0 < data["lower_bound"] <= data["upper_bound"]
    from lipcheck.domain import DomainError

    with pytest.raises(DomainError, match="2 per-channel values"):  # a LipcheckError: one line, exit 2
        Domain(low=(0.0, 0.0), high=(1.0, 1.0)).interval((1, 3, 16, 16))
