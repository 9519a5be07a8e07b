"""Circular padding however it reaches lipcheck is one exact circular convolution.

``padding_mode="circular"`` is exported as Pad(mode=wrap) by the dynamo exporter and torch.export, as a
Slice/Slice/Concat per axis by the TorchScript exporter, and as slice_scatter/copy into an empty tensor by
``run_decompositions``; all must give the circular convolution's exact norm,
and a net of such convs whose top singular vectors line up must get its true constant on every path.
The true constants here come from dense Jacobians: each layer's operator on the small grid (its SVD), and the
whole net's Jacobian where every ReLU is active (a lower bound that meets the product of the layers' norms).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lipcheck.frontends.torch_frontend import TorchOptions
from lipcheck.pipeline import analyse

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
GRIDS = {1: (7,), 2: (6, 5), 3: (4, 5, 6)}
CHANNELS = [2, 3, 3, 2]


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path, dynamo: bool) -> Path:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=dynamo, input_names=["x"], output_names=["y"])
    return path


def dense_norm(module: nn.Module, shape: tuple[int, ...]) -> float:
    """sigma_max of the module's Jacobian at 0, in float64 (the operator of a linear module)."""
    module = module.double()
    x0 = torch.zeros(math.prod(shape), dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda x: module(x.reshape(shape)).reshape(-1), x0)
    return float(torch.linalg.matrix_norm(jacobian, 2))


def _orthogonal(n: int, first: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal matrix, with ``first`` (a unit vector) as its first column when given."""
    columns = torch.randn(n, n, dtype=torch.float64, generator=generator)
    if first is not None:
        columns[:, 0] = first
    q, r = torch.linalg.qr(columns)
    q = q * torch.sign(torch.diagonal(r))
    if first is not None:
        q[:, 0] = first  # QR keeps the first column's direction; its sign was fixed just above
    return q


class AlignedCircularNet(nn.Module):
    """Three circular convs with ReLUs whose norms multiply: the true constant is the product.

    Tap a of conv i is p_a M_i, with p a positive filter, so the conv's symbol is p_hat(w) M_i, largest at
    w = 0 where it is sum(p) M_i; M_{i+1}'s top right singular vector is M_i's top left one, so the chain's
    symbol at 0 has norm prod sum(p_i) ||M_i||. Biases make every ReLU active at x = 0: there the Jacobian is
    the chain of convs and its norm is the product, which also bounds the net: so it is the true constant.
    """

    def __init__(self, d: int = 2, kernel: tuple[int, ...] | None = None) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(7 + d)
        kernel = kernel or (3,) * (d - 1) + (5,)
        convs, previous = [], None
        for c_in, c_out in zip(CHANNELS, CHANNELS[1:], strict=False):
            conv = CONVS[d](c_in, c_out, kernel, padding=tuple(k // 2 for k in kernel), padding_mode="circular")
            v = _orthogonal(c_in, previous, generator)
            u = _orthogonal(c_out, None, generator)
            s = torch.tensor([2.0, 0.7, 0.3][: min(c_in, c_out)], dtype=torch.float64)
            m = u[:, : len(s)] @ torch.diag(s) @ v[:, : len(s)].T
            taps = torch.rand(kernel, dtype=torch.float64, generator=generator) + 0.1
            with torch.no_grad():
                conv.weight.copy_(m.reshape(c_out, c_in, *[1] * d) * (taps / taps.sum()))
            convs.append(conv)
            previous = u[:, 0]
        self.convs = nn.ModuleList(convs)
        self._activate_at_zero()
        self.eval()

    def _activate_at_zero(self) -> None:
        """Biases that keep every pre-activation >= 1 at x = 0 (the maps are constant images there)."""
        h = torch.zeros(CHANNELS[0])
        with torch.no_grad():
            for conv in self.convs:
                symbol = conv.weight.sum(dim=tuple(range(2, conv.weight.dim())))
                pre = symbol @ h
                conv.bias.copy_((1.0 - pre).clamp_min(1.0))
                h = torch.relu(pre + conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x) if i == len(self.convs) - 1 else torch.relu(conv(x))
        return x


def aligned_circular_net() -> AlignedCircularNet:
    """The 2-D net (the factory `--model` names for the state_dict path)."""
    return AlignedCircularNet(2)


def true_constant(net: AlignedCircularNet, shape: tuple[int, ...]) -> float:
    """The product of the layers' exact norms, checked to be reached by the Jacobian at 0."""
    product = 1.0
    for conv in net.convs:
        linear = CONVS[conv.weight.dim() - 2](
            conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding, padding_mode="circular"
        )
        linear.weight, linear.bias = conv.weight, None
        product *= dense_norm(linear, (1, conv.in_channels, *shape[2:]))
        shape = (1, conv.out_channels, *shape[2:])
    reached = dense_norm(net, (1, CHANNELS[0], *shape[2:]))
    assert reached == pytest.approx(product, rel=1e-9), "the construction must make the product the true constant"
    return product


def _paths(tmp_path: Path, net: nn.Module, x: torch.Tensor) -> dict[str, tuple[Path, TorchOptions | None]]:
    state = tmp_path / "state.pt"
    torch.save(net.state_dict(), state)
    program, decomposed = tmp_path / "net.pt2", tmp_path / "decomposed.pt2"
    exported = torch.export.export(net, (x,))
    torch.export.save(exported, program)
    torch.export.save(exported.run_decompositions(), decomposed)  # empty + slice_scatter + copy per side
    return {
        "torchscript-onnx": (export_onnx(net, x, tmp_path / "ts.onnx", dynamo=False), None),
        "dynamo-onnx": (export_onnx(net, x, tmp_path / "dynamo.onnx", dynamo=True), None),
        "torch.export": (program, None),
        "torch.export-decomposed": (decomposed, None),
        "state_dict+model": (state, TorchOptions(f"{__name__}:aligned_circular_net")),
    }


def test_aligned_circular_net_gets_its_true_constant_on_every_path(tmp_path: Path) -> None:
    net = aligned_circular_net().float()
    shape = (1, CHANNELS[0], *GRIDS[2])
    truth = true_constant(AlignedCircularNet(2), shape)
    x = torch.randn(shape)
    for name, (path, options) in _paths(tmp_path, net, x).items():
        report = analyse(path, [",".join(map(str, shape))], device="cpu", torch_options=options)
        assert report.upper_bound is not None
        ratio = report.upper_bound / truth
        assert 1.0 <= ratio <= 1.0 + 1e-6, f"{name}: bound {report.upper_bound} against the true {truth}"
        convs = [layer for layer in report.layers if layer.op == "Conv"]
        assert len(convs) == 3 and all(layer.exact for layer in convs), name
        assert not [layer for layer in report.layers if layer.op in ("Slice", "Concat", "Pad")], name


@pytest.mark.parametrize("d", [1, 3])
def test_aligned_circular_net_torchscript_1d_3d(tmp_path: Path, d: int) -> None:
    net = AlignedCircularNet(d)
    shape = (1, CHANNELS[0], *GRIDS[d])
    truth = true_constant(AlignedCircularNet(d), shape)
    path = export_onnx(net.float(), torch.randn(shape), tmp_path / "ts.onnx", dynamo=False)
    bound = analyse(path, device="cpu").upper_bound
    assert bound is not None and 1.0 <= bound / truth <= 1.0 + 1e-6


# (dims, kernel, padding, dilation, grid): symmetric, asymmetric and dilated windows
SINGLE = [
    (1, 3, 1, 1, (9,)),
    (1, 4, "same", 1, (8,)),
    (2, 3, 1, 1, (6, 6)),
    (2, (3, 5), (1, 2), 1, (5, 7)),
    (2, 3, 2, 2, (7, 6)),
    (2, 2, "same", 1, (6, 6)),
    (3, 3, 1, 1, (4, 4, 5)),
]


@pytest.mark.parametrize(("d", "kernel", "padding", "dilation", "grid"), SINGLE)
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_one_circular_conv_is_its_exact_operator_norm(tmp_path: Path, d, kernel, padding, dilation, grid, dynamo):
    torch.manual_seed(3)
    conv = CONVS[d](3, 4, kernel, padding=padding, dilation=dilation, padding_mode="circular", bias=False)
    shape = (1, 3, *grid)
    exact = dense_norm(conv, shape)
    path = export_onnx(conv.float(), torch.randn(shape), tmp_path / "one.onnx", dynamo=dynamo)
    report = analyse(path, device="cpu")
    assert [(layer.op, layer.exact) for layer in report.layers] == [("Conv", True)]
    assert exact <= report.upper_bound <= exact * (1 + 1e-8)


class OrthogoniumStyleConv2d(nn.Conv2d):
    """The padding of orthogonium's orthogonal convs (BcopRkoConv2d, AdaptiveSOCConv2d...): an nn.Conv2d
    subclass with ``padding="same"`` and ``padding_mode="circular"`` by default (even kernels pad one side
    only). The weight is a BCOP-style orthogonal kernel: R (P + (I - P) z1)(Q + (I - Q) z2) with orthogonal
    projections P, Q and orthogonal R, unitary at every frequency, so the circular conv is orthogonal: norm 1."""

    def __init__(self, channels: int, generator: torch.Generator) -> None:
        super().__init__(channels, channels, 2, padding="same", padding_mode="circular", bias=False)

        def projection() -> torch.Tensor:
            basis = _orthogonal(channels, None, generator)[:, : channels // 2]
            return basis @ basis.T

        eye = torch.eye(channels, dtype=torch.float64)
        p, q, r = projection(), projection(), _orthogonal(channels, None, generator)
        taps = [[p @ q, p @ (eye - q)], [(eye - p) @ q, (eye - p) @ (eye - q)]]
        weight = torch.stack([torch.stack([r @ taps[i][j] for j in range(2)], -1) for i in range(2)], -2)
        with torch.no_grad():
            self.weight.copy_(weight)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_orthogonium_style_circular_convs_are_exactly_one(tmp_path: Path, dynamo: bool) -> None:
    generator = torch.Generator().manual_seed(11)
    net = nn.Sequential(*[OrthogoniumStyleConv2d(4, generator) for _ in range(3)]).eval()
    shape = (1, 4, 6, 6)
    truth = dense_norm(net, shape)  # the float32 weights' true constant: 1 up to their rounding
    assert truth == pytest.approx(1.0, abs=1e-6)
    report = analyse(export_onnx(net.float(), torch.randn(shape), tmp_path / "o.onnx", dynamo), device="cpu")
    assert report.upper_bound is not None and truth <= report.upper_bound <= truth * (1 + 1e-6)
    assert [layer.op for layer in report.layers] == ["Conv"] * 3


def test_a_slice_and_concat_that_is_not_a_wrap_stays_a_concatenation(tmp_path: Path) -> None:
    """Edge copies (x[0] in front) and a shifted wrap with an entry missing are not circular padding."""

    class NotWrap(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            edge = torch.cat([x[..., :1], x, x[..., -1:]], dim=-1)  # replicate padding
            gap = torch.cat([x[..., 2:], x[..., :1]], dim=-1)  # drops entry 1
            return torch.cat([edge, torch.cat([gap, gap], dim=-1)], dim=-1)

    path = export_onnx(NotWrap(), torch.randn(1, 2, 5), tmp_path / "n.onnx", dynamo=False)
    report = analyse(path, device="cpu")
    assert "Pad" not in [layer.op for layer in report.layers]
    x = torch.zeros(10, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: NotWrap()(v.reshape(1, 2, 5)).reshape(-1), x)
    assert report.upper_bound >= float(torch.linalg.matrix_norm(jacobian, 2)) * (1 - 1e-9)


def test_a_gather_of_wrapped_indices_is_a_wrap_padding(tmp_path: Path) -> None:
    """x[..., idx] with idx = (-2, -1, 0, ..., n-1, 0): Gather, recognised as one wrap Pad before the conv."""
    torch.manual_seed(4)

    class Gathered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x.index_select(2, torch.tensor([4, 5, 0, 1, 2, 3, 4, 5, 0])))

    shape, net = (1, 2, 6), Gathered()
    exact = dense_norm(net, shape)
    report = analyse(export_onnx(net.float(), torch.randn(shape), tmp_path / "g.onnx", dynamo=False), device="cpu")
    assert [(layer.op, layer.exact) for layer in report.layers] == [("Conv", True)]
    assert exact <= report.upper_bound <= exact * (1 + 1e-8)


def test_a_scatter_into_empty_memory_that_leaves_an_entry_unwritten_is_not_a_padding(tmp_path: Path) -> None:
    """Entries of torch.empty that the program never overwrites are read as a constant, never as a wrap."""

    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.empty(1, 2, 8)
            y[..., 1:7] = x
            y[..., :1] = x[..., -1:]  # the last entry stays unwritten
            return self.conv(y)

    torch.manual_seed(5)
    net, shape = Partial().eval(), (1, 2, 6)
    path = tmp_path / "partial.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(shape),)).run_decompositions(), path)
    report = analyse(path, device="cpu")
    assert not [layer for layer in report.layers if "circular" in layer.method]
    jacobian = torch.autograd.functional.jacobian(lambda v: net(v.reshape(shape)).reshape(-1), torch.zeros(12))
    assert report.upper_bound >= float(torch.linalg.matrix_norm(jacobian.double(), 2)) * (1 - 1e-6)
