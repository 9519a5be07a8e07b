"""Frequency-domain Combettes-Pesquet bounds on convolution chains and residual blocks (lipcheck.refine.regions).

The bound holds for every choice of the activations' difference quotients (diagonals D with entries in the
slope interval), not only for those some input realises. So the reference is the largest norm of the dense
Jacobian over sampled diagonals: 0/1 corners and uniform ones, each network re-run with its activations
replaced by the fixed multiplication x * d. No sample may exceed the bound.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from lipcheck.frontends import load_graph
from lipcheck.passes import prepare
from lipcheck.pipeline import certify
from lipcheck.refine.regions import find_regions, region_bound
from lipcheck.spectral.frequency import conv_frequency_matrices, half_frequencies


class Gate(nn.Module):
    """ReLU, or (for the reference) the multiplication by a fixed diagonal d in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.d: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) if self.d is None else x * self.d


class Basic(nn.Module):
    """x + conv(relu(conv(x))), any kernel, dilation and groups, 'same' zero padding."""

    def __init__(self, c: int, k: int = 3, dilation: int = 1, groups: int = 1, project: bool = False):
        super().__init__()
        pad = dilation * (k - 1) // 2
        self.c1 = nn.Conv2d(c, 2 * c, k, padding=pad, dilation=dilation, groups=groups)
        self.gate = Gate()
        self.c2 = nn.Conv2d(2 * c, c, k, padding=pad, dilation=dilation, groups=groups)
        self.skip = nn.Conv2d(c, c, 1) if project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.c2(self.gate(self.c1(x)))


class Down(nn.Module):
    """A ResNet transition block: stride-2 3x3 conv, ReLU, 3x3 conv, plus a stride-2 1x1 projection."""

    def __init__(self, c: int, out: int, k: int = 3):
        super().__init__()
        self.c1 = nn.Conv2d(c, out, k, stride=2, padding=k // 2)
        self.gate = Gate()
        self.c2 = nn.Conv2d(out, out, 3, padding=1)
        self.skip = nn.Conv2d(c, out, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.c2(self.gate(self.c1(x)))


class StridedChain(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1 = nn.Conv2d(c, 2 * c, 4, stride=(2, 3), padding=1, dilation=(1, 2))
        self.gate = Gate()
        self.c2 = nn.Conv2d(2 * c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.gate(self.c1(x)))


class Stage(nn.Module):
    """Blocks with a ReLU after each join (as in a ResNet), the last join the output."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.gates = nn.ModuleList(Gate() for _ in blocks[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.gates):
                x = self.gates[i](x)
        return x


class Chain(nn.Module):
    """conv, relu, conv, relu, conv: no residual, zero padding."""

    def __init__(self, c: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(3))
        self.gates = nn.ModuleList(Gate() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs[0](x)
        for gate, conv in zip(self.gates, self.convs[1:], strict=True):
            x = conv(gate(x))
        return x


class DenseResidual(nn.Module):
    """A residual MLP: x + W2 relu(W1 x), twice, with a ReLU between."""

    def __init__(self, d: int):
        super().__init__()
        self.inner = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), Gate(), nn.Linear(2 * d, d)) for _ in range(2))
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gate(x + self.inner[0](x))
        return x + self.inner[1](x)


class SllBlock(nn.Module):
    """x - 2 K^T (t * relu(K x + b)) as orthogonium's SDP-based blocks write it (conv, then conv_transpose with
    the same kernel); ``padding`` 0 is their circular mode (a valid conv, then a full transposed one)."""

    def __init__(self, c: int, inner: int, padding: int):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(inner, c, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(1, inner, 1, 1) * 0.1)
        self.t = nn.Parameter(torch.rand(1, inner, 1, 1) + 0.5)
        self.padding = padding
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.gate(nn.functional.conv2d(x, self.kernel, padding=self.padding) + self.bias)
        res = 2 * nn.functional.conv_transpose2d(self.t * res, self.kernel, padding=self.padding)
        return x - res


def _gates(net: nn.Module) -> list[Gate]:
    return [m for m in net.modules() if isinstance(m, Gate)]


def sampled_sup(net: nn.Module, shape: tuple[int, ...], samples: int, seed: int) -> float:
    """max over sampled diagonals D of sigma_max of the dense Jacobian of the net with D in place of ReLU."""
    gen = torch.Generator().manual_seed(seed)
    net = net.double()
    x = torch.zeros(shape, dtype=torch.float64)
    sizes: dict[int, torch.Size] = {}
    hooks = [g.register_forward_hook(lambda m, i, o: sizes.__setitem__(id(m), o.shape)) for g in _gates(net)]
    net(x)
    for h in hooks:
        h.remove()
    best = 0.0
    for s in range(samples):
        for gate in _gates(net):
            d = torch.rand(sizes[id(gate)], generator=gen, dtype=torch.float64)
            gate.d = (d > 0.5).double() if s % 2 == 0 else d
        jac = torch.autograd.functional.jacobian(net, x).reshape(-1, math.prod(shape[1:]))
        best = max(best, float(torch.linalg.matrix_norm(jac, ord=2)))
    for gate in _gates(net):
        gate.d = None
    net.float()
    return best


def export(net: nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(shape),), str(path), dynamo=False)
    return path


def only_region_bound(path: Path) -> float:
    graph = prepare(load_graph(str(path)))
    regions = find_regions(graph)
    assert len(regions) == 1, [(r.start, r.end) for r in regions]
    assert regions[0].start == graph.inputs[0] and regions[0].end == graph.outputs[0]
    return region_bound(regions[0], graph)


NETS = {
    "two basic blocks": (lambda: Stage([Basic(3), Basic(3)]), (1, 3, 6, 6)),
    "projection skip": (lambda: Stage([Basic(2, project=True), Basic(2)]), (1, 2, 5, 5)),
    "5x5 dilated": (lambda: Stage([Basic(2, k=5, dilation=2)]), (1, 2, 7, 7)),
    "grouped": (lambda: Stage([Basic(4, groups=2), Basic(4, groups=4)]), (1, 4, 5, 5)),
    "conv chain": (lambda: Chain(3), (1, 3, 6, 6)),
    "1-d grid": (lambda: Stage([Basic1d(3), Basic1d(3)]), (1, 3, 9)),
    "dense residual": (lambda: DenseResidual(6), (1, 6)),
    "strided transition, odd size": (lambda: Stage([Down(2, 3), Basic(3)]), (1, 2, 7, 7)),
    "strided transition, 5x5": (lambda: Stage([Down(2, 3, k=5)]), (1, 2, 8, 8)),
    "strided chain": (lambda: StridedChain(2), (1, 2, 9, 10)),
    "SLL blocks, zero padding": (lambda: Stage([SllBlock(2, 3, 1), SllBlock(2, 4, 1)]), (1, 2, 5, 5)),
    "SLL block, valid conv": (lambda: Stage([SllBlock(2, 3, 0)]), (1, 2, 6, 6)),
}


class Basic1d(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1 = nn.Conv1d(c, c, 3, padding=1)
        self.gate = Gate()
        self.c2 = nn.Conv1d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(self.gate(self.c1(x)))


@pytest.mark.parametrize("name", sorted(NETS))
def test_region_bound_above_every_sampled_diagonal(name: str, tmp_path: Path) -> None:
    torch.manual_seed(len(name))
    build, shape = NETS[name]
    net = build()
    bound = only_region_bound(export(net, shape, tmp_path / "net.onnx"))
    sup = sampled_sup(net, shape, samples=24, seed=1)
    assert sup <= bound * (1 + 1e-9), (sup, bound)
    # best takes it where it is smaller than the per-layer product (which has exact norms on small maps)
    found = certify(load_graph(str(tmp_path / "net.onnx")), method="best")
    product = found.refinement.method_bounds["product"]
    assert product is not None and found.upper_bound is not None
    assert found.upper_bound <= min(bound, product) * (1 + 1e-12)


def test_best_takes_the_regions_on_a_residual_net(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = export(Stage([Basic(3), Basic(3), Basic(3)]), (1, 3, 6, 6), tmp_path / "net.onnx")
    found = certify(load_graph(str(path)), method="best")
    bounds = found.refinement.method_bounds
    assert bounds["frequency-cp"] is not None and bounds["frequency-cp"] < 0.8 * bounds["product"]
    assert found.upper_bound is not None and found.upper_bound <= bounds["frequency-cp"] * (1 + 1e-12)
    assert found.upper_bound == pytest.approx(min(v for v in bounds.values() if v is not None), rel=1e-12) or (
        found.refinement.bound_method.startswith("per chain")
    )


def _wrap_conv_model(weights: list[np.ndarray], grid: int) -> bytes:
    """x -> Pad(wrap) -> Conv -> ... (no activation), plus the input: a linear circular residual block."""
    nodes, inits = [], {}
    value = "x"
    for i, w in enumerate(weights):
        k = w.shape[-1]
        p = (k - 1) // 2
        inits[f"w{i}"] = w.astype(np.float32)
        inits[f"pads{i}"] = np.array([0, 0, p, p, 0, 0, p, p], dtype=np.int64)
        nodes.append(helper.make_node("Pad", [value, f"pads{i}"], [f"p{i}"], mode="wrap", name=f"pad{i}"))
        nodes.append(helper.make_node("Conv", [f"p{i}", f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        value = f"c{i}"
    nodes.append(helper.make_node("Add", ["x", value], ["y"], name="join"))
    c = weights[0].shape[1]
    graph = helper.make_graph(
        nodes,
        "circular",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, grid, grid])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, grid, grid])],
        initializer=[numpy_helper.from_array(v, name=k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    return model.SerializeToString()


def test_circular_linear_block_is_exact(tmp_path: Path) -> None:
    """x + C2 C1 x with circular padding and no activation: the bound is the dense operator's norm."""
    rng = np.random.default_rng(3)
    weights = [(rng.standard_normal((3, 3, 3, 3)) * 0.3).astype(np.float32) for _ in range(2)]
    path = tmp_path / "wrap.onnx"
    path.write_bytes(_wrap_conv_model(weights, grid=5))
    bound = only_region_bound(path)
    conv = nn.Sequential(
        *[nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular", bias=False) for _ in weights]
    ).double()
    for layer, w in zip(conv, weights, strict=True):
        layer.weight.data = torch.from_numpy(w).double()
    jac = torch.autograd.functional.jacobian(lambda z: z + conv(z), torch.zeros(1, 3, 5, 5, dtype=torch.float64))
    exact = float(torch.linalg.matrix_norm(jac.reshape(75, 75), ord=2))
    assert exact * (1 - 1e-12) <= bound <= exact * (1 + 1e-9)


def test_frequency_matrices_match_the_convolution() -> None:
    """At each frequency, the matrix is the conv's action on a plane wave (ONNX cross-correlation, pads, dilation)."""
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.standard_normal((2, 3, 3, 2)))
    grid, begins, dilations = (6, 7), (2, 1), (2, 1)
    freqs = half_frequencies(grid)
    matrices = conv_frequency_matrices(w, begins, dilations, 1, freqs).matrix
    i, j = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    for f in (0, 5, len(freqs) - 1):
        wave = torch.exp(1j * (freqs[f, 0] * i + freqs[f, 1] * j))  # x[c, i] = v_c e^{i w.i}
        v = torch.from_numpy(rng.standard_normal(3)).to(torch.complex128)
        x = v[:, None, None] * wave
        padded = torch.cat([x, x], dim=1)
        padded = torch.cat([padded, padded], dim=2)  # periodic: index i + t d - p read modulo the grid
        y = torch.zeros(2, *grid, dtype=torch.complex128)
        for a in range(3):
            for b in range(2):
                shift = ((a * dilations[0] - begins[0]) % grid[0], (b * dilations[1] - begins[1]) % grid[1])
                window = padded[:, shift[0] : shift[0] + grid[0], shift[1] : shift[1] + grid[1]]
                y += torch.einsum("oi,ixy->oxy", w[:, :, a, b].to(torch.complex128), window)
        expected = (matrices[f] @ v)[:, None, None] * wave
        assert torch.allclose(y, expected, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# block-sdp: residual blocks proved as a whole


def normalised_sll(c: int, inner: int, padding: int, seed: int) -> SllBlock:
    """An SLL block with t = 1 and the kernel scaled to norm 1 on a large circular grid: 1-Lipschitz."""
    torch.manual_seed(seed)
    block = SllBlock(c, inner, padding)
    block.t.data[:] = 1.0
    kernel = block.kernel.data.double()
    spectrum = torch.fft.fft2(kernel, s=(32, 32)).permute(2, 3, 0, 1)
    block.kernel.data = (kernel / torch.linalg.matrix_norm(spectrum, ord=2).max()).float()
    return block


class DenseSll(nn.Module):
    """orthogonium's SDPBasedLipschitzDense: x - 2 W^T (t * relu(W x + b)), t_i = 1 / sum_j |W W^T|_ij q_j / q_i."""

    def __init__(self, d: int, inner: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inner, d) / math.sqrt(d))
        self.bias = nn.Parameter(torch.randn(1, inner) * 0.1)
        self.q = nn.Parameter(torch.randn(inner) * 0.3)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, q_inv = torch.exp(self.q), torch.exp(-self.q)
        t = 1 / torch.abs(torch.einsum("i,ik,kj,j -> ij", q_inv, self.weight, self.weight.T, q)).sum(1)
        res = t * self.gate(nn.functional.linear(x, self.weight) + self.bias)
        return x - 2 * nn.functional.linear(res, self.weight.T)


SLL_NETS = {
    "conv, zero padding": (lambda: Stage([normalised_sll(3, 4, 1, s) for s in range(3)]), (1, 3, 6, 6)),
    "conv, valid then full": (lambda: Stage([normalised_sll(2, 3, 0, s) for s in range(2)]), (1, 2, 6, 6)),
    "dense": (lambda: Stage([DenseSll(6, 8) for _ in range(3)]), (1, 6)),
}


@pytest.mark.parametrize("name", sorted(SLL_NETS))
def test_sll_blocks_certify_at_one(name: str, tmp_path: Path) -> None:
    """Each SLL block is 1-Lipschitz by construction; block-sdp proves it, and never below a sampled diagonal."""
    torch.manual_seed(7)
    build, shape = SLL_NETS[name]
    net = build()
    path = export(net, shape, tmp_path / "net.onnx")
    found = certify(load_graph(str(path)), method="best")
    bounds = found.refinement.method_bounds
    assert bounds["block-sdp"] is not None and bounds["block-sdp"] <= 1 + 1e-6
    assert bounds["product"] is not None and bounds["product"] > 1.5
    assert sampled_sup(net, shape, samples=16, seed=2) <= bounds["block-sdp"] * (1 + 1e-9)
    assert found.upper_bound is not None and found.upper_bound <= 1 + 1e-6


@pytest.mark.parametrize("name", sorted(n for n in NETS if n not in ("conv chain",)))
def test_block_sdp_is_sound_on_random_blocks(name: str, tmp_path: Path) -> None:
    """On blocks built for nothing in particular the certificate may be loose or absent, never below the truth."""
    torch.manual_seed(len(name) + 1)
    build, shape = NETS[name]
    net = build()
    path = export(net, shape, tmp_path / "net.onnx")
    value = certify(load_graph(str(path)), method="block-sdp").refinement.method_bounds["block-sdp"]
    assert value is not None
    assert sampled_sup(net, shape, samples=16, seed=3) <= value * (1 + 1e-9)


# --------------------------------------------------------------------------------------------------
# per-channel rescaling across activations


class Mlp(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        self.gates = nn.ModuleList(Gate() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers[0](x)
        for gate, layer in zip(self.gates, self.layers[1:], strict=True):
            x = layer(gate(x))
        return x


def _skew(first: nn.Module, second: nn.Module, seed: int) -> None:
    """Scale first's output channels by 2^k and second's input channels by 2^-k (k random in -4..4): with a ReLU
    between them the network computes the same function."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.exp2(torch.randint(-4, 5, (first.weight.shape[0],), generator=gen).double()).float()
    shape = (-1,) + (1,) * (first.weight.dim() - 1)
    first.weight.data *= s.reshape(shape)
    first.bias.data *= s
    second.weight.data /= s.reshape((1, -1) + (1,) * (second.weight.dim() - 2))


@pytest.mark.parametrize("kind", ["conv chain (frequency-cp)", "mlp (combettes-pesquet)"])
def test_rescaling_undoes_skewed_channels(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(11)
    conv = kind.startswith("conv")
    net, shape, method = (Chain(4), (1, 4, 6, 6), "frequency-cp") if conv else (Mlp(8), (1, 8), "combettes-pesquet")
    layers = list(net.convs if conv else net.layers)  # type: ignore[union-attr]
    plain = certify(load_graph(str(export(net, shape, tmp_path / "a.onnx"))), method=method).refinement.method_bounds
    x = torch.randn(shape)
    before = net(x)
    _skew(layers[0], layers[1], 1)
    _skew(layers[1], layers[2], 2)
    assert torch.allclose(net(x), before, rtol=1e-4, atol=1e-4)
    skewed = certify(load_graph(str(export(net, shape, tmp_path / "b.onnx"))), method=method).refinement.method_bounds
    assert skewed["product"] > 4 * plain["product"]  # the per-layer product suffers from the scales
    assert skewed[method] < 2 * plain[method]  # the rescaled chain bound does not
    assert sampled_sup(net, shape, samples=12, seed=4) <= skewed[method] * (1 + 1e-9)
