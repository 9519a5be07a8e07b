"""1-Lipschitz networks from orthogonium and deel-torchlip: does lipcheck certify them at <= 1 (issue 15)?

Every network here is built only from 1-Lipschitz layers of orthogonium (orthogonal convolutions, AOC/BCOP/RKO,
strided and transposed, circular or zero padding; orthogonal dense layers; SLL and AOC residual blocks; MaxMin)
and deel-torchlip (GroupSort, FullSort, MaxMin, L2-norm pooling, spectral layers, LipResidual), with random
weights from a fixed seed, in eval mode. So its true Lipschitz constant is at most 1, and a certified bound
above 1 + 1e-6 shows something lipcheck does not yet recognise. Each network goes through every path a user
has: ONNX from the TorchScript exporter (``torch.onnx.export(dynamo=False)``), ONNX from the dynamo exporter,
a ``torch.export`` program (``.pt2``), and state_dicts read with ``--model`` (this module's ``build`` and
``build_baked`` are the factories). The table gives, per network and path, the bound, whether it passes, the
time, and where a failing bound loses: the layers whose local bound exceeds 1 + 1e-6, the first node where
the running bound crosses it although its own bound does not (a composition step: Add, Concat, ...), or the
reasons for "not globally Lipschitz". A path that fails to export or load is one line, not a crash.

    PYTHONPATH=. python benchmarks/one_lipschitz.py                      # every network, every path
    PYTHONPATH=. python benchmarks/one_lipschitz.py --nets plain,sll_block --paths onnx-ts,pt2
    PYTHONPATH=. python benchmarks/one_lipschitz.py --lower --out benchmarks/results/one_lipschitz_before.md
    PYTHONPATH=. python benchmarks/one_lipschitz.py --blocks             # --method all on the residual blocks

Needs ``pip install --no-deps orthogonium deel-torchlip`` (the ``bench`` extra); run from the repository root
(the state_dict paths import ``benchmarks.one_lipschitz`` as ``--model``).

Parametrizations. Both libraries compute their weights through ``torch.nn.utils.parametrize``, and some of
those parametrizations change their own state in ``forward``: orthogonium's ``BatchedPowerIteration`` (the
default spectral normaliser in front of its Bjorck orthogonaliser) writes its vectors ``u``, ``v`` at every
call, in train and eval mode alike; deel-torchlip's Bjorck parametrization recomputes its buffer
``_w_bjorck`` in train mode only and returns the stored buffer in eval mode (so a freshly built layer put in
eval mode without one training-mode forward computes with its *un*-orthogonalised initial weight), and
torch's ``spectral_norm`` updates ``_u``/``_v`` in train mode. ``build`` therefore runs one forward in train
mode (no gradient) before ``eval()``, as training would leave the buffers, and the exported files are of the
*baked* network: every parametrization removed with its current value kept
(``remove_parametrizations(..., leave_parametrized=True)``), which fixes the weights the network computes
with. lipcheck's ``--model`` loader bakes the same way (``lipcheck.frontends.torch_state.baked``), so the
parametrized state_dict with ``--model build`` works as well as the baked one with ``--model build_baked``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

TOL = 1e-6  # pass: bound <= 1 + TOL (--tol)
PATHS = ["onnx-ts", "onnx-dynamo", "pt2", "state_dict", "state_dict-baked"]
# not in the default list: torch.jit.trace of the baked network; the exporters on the network with its
# parametrizations still registered (what a user gets without baking first); the baked state_dict read with
# the parametrized architecture (--model build)
EXTRA_PATHS = ["torchscript", "onnx-ts-unbaked", "onnx-dynamo-unbaked", "pt2-unbaked", "state_dict-baked-to-param"]
SEED = 0
LINEAR_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


# ---------------------------------------------------------------------------------------------- networks


def _aoc(cin: int, cout: int, k: int, stride: int = 1, circular: bool = False, **kw: Any) -> nn.Module:
    """orthogonium's AdaptiveOrthoConv2d: circular padding is its default; 'zeros' gives a zero-padded conv."""
    from orthogonium.layers import AdaptiveOrthoConv2d

    if stride == 1 and k > 1:
        padding: Any = "same" if circular else k // 2
    else:
        padding = (k - stride + 1) // 2 if k > stride else 0
    mode = "circular" if circular else "zeros"
    return AdaptiveOrthoConv2d(cin, cout, k, stride=stride, padding=padding, padding_mode=mode, **kw)


def _aoct(cin: int, cout: int, k: int, stride: int, padding: int) -> nn.Module:
    from orthogonium.layers import AdaptiveOrthoConvTranspose2d

    return AdaptiveOrthoConvTranspose2d(cin, cout, k, stride=stride, padding=padding)


def _maxmin() -> nn.Module:
    from orthogonium.layers import MaxMin

    return MaxMin()


def _linear(cin: int, cout: int) -> nn.Module:
    from orthogonium.layers import OrthoLinear

    return OrthoLinear(cin, cout)


def net_plain() -> nn.Module:
    """Zero-padded orthogonal 3x3 convs (BCOP), orthogonium MaxMin, an orthogonal dense layer."""
    return nn.Sequential(_aoc(2, 4, 3), _maxmin(), _aoc(4, 4, 3), _maxmin(), nn.Flatten(), _linear(4 * 16 * 16, 10))


def net_circular() -> nn.Module:
    """The same with orthogonium's default circular padding."""
    return nn.Sequential(
        _aoc(2, 4, 3, circular=True),
        _maxmin(),
        _aoc(4, 4, 3, circular=True),
        _maxmin(),
        nn.Flatten(),
        _linear(4 * 16 * 16, 10),
    )


def net_strided() -> nn.Module:
    """Strided orthogonal convs: 3x3 stride 2 (BCOP x RKO, its kernel composed in forward) and 2x2 stride 2 (RKO)."""
    return nn.Sequential(
        _aoc(2, 4, 3),
        _maxmin(),
        _aoc(4, 8, 3, stride=2),
        _maxmin(),
        _aoc(8, 16, 2, stride=2),
        _maxmin(),
        nn.Flatten(),
        _linear(16 * 4 * 4, 10),
    )


def net_strided_circular() -> nn.Module:
    """Strided convs with circular padding (the 3x3 stride-2 one pads 1 circularly)."""
    return nn.Sequential(
        _aoc(2, 4, 3, circular=True),
        _maxmin(),
        _aoc(4, 8, 3, stride=2, circular=True),
        _maxmin(),
        _aoc(8, 16, 2, stride=2, circular=True),
        nn.Flatten(),
        _linear(16 * 4 * 4, 10),
    )


def net_transposed() -> nn.Module:
    """Orthogonal transposed convs: 4x4 stride 2 (BCOP x RKO), 3x3 stride 1 (BCOP), 2x2 stride 2 (RKO)."""
    return nn.Sequential(
        _aoc(2, 8, 2, stride=2),
        _maxmin(),
        _aoct(8, 4, 4, stride=2, padding=1),
        _maxmin(),
        _aoct(4, 4, 3, stride=1, padding=1),
        _maxmin(),
        _aoc(4, 16, 2, stride=2),
        _aoct(16, 4, 2, stride=2, padding=0),
    )


def net_groupsort2() -> nn.Module:
    """Zero-padded orthogonal convs with deel-torchlip GroupSort2."""
    import deel.torchlip as tl

    return nn.Sequential(_aoc(2, 4, 3), tl.GroupSort2(), _aoc(4, 4, 3), tl.GroupSort2())


def net_groupsort4() -> nn.Module:
    """Zero-padded orthogonal convs with deel-torchlip GroupSort(4)."""
    import deel.torchlip as tl

    return nn.Sequential(_aoc(2, 8, 3), tl.GroupSort(4), _aoc(8, 8, 3), tl.GroupSort(4))


def net_fullsort() -> nn.Module:
    """Orthogonal dense layers with deel-torchlip FullSort (input 1 x 32)."""
    import deel.torchlip as tl

    return nn.Sequential(_linear(32, 16), tl.FullSort(), _linear(16, 16), tl.FullSort(), _linear(16, 4))


def net_torchlip_maxmin() -> nn.Module:
    """deel-torchlip's MaxMin, [relu(x), relu(-x)] along channels, between zero-padded orthogonal convs."""
    import deel.torchlip as tl

    return nn.Sequential(_aoc(2, 4, 3), tl.MaxMin(), _aoc(8, 4, 3))


def net_l2pool() -> nn.Module:
    """deel-torchlip's L2-norm pooling: 2x2 stride 2 (ScaledL2NormPool2d) and global (ScaledAdaptativeL2NormPool2d)."""
    import deel.torchlip as tl

    return nn.Sequential(
        _aoc(2, 4, 3),
        _maxmin(),
        tl.ScaledL2NormPool2d(2),
        _aoc(4, 4, 3),
        _maxmin(),
        tl.ScaledAdaptativeL2NormPool2d((1, 1)),
        nn.Flatten(),
        _linear(4, 4),
    )


def net_torchlip() -> nn.Module:
    """deel-torchlip only: spectral (Bjorck) convs and dense, GroupSort2, its MaxMin ([relu(x), relu(-x)]),
    L2-norm pooling, a spectral transposed conv."""
    import deel.torchlip as tl

    return nn.Sequential(
        tl.SpectralConv2d(2, 4, 3, padding=1),
        tl.GroupSort2(),
        tl.ScaledL2NormPool2d(2),
        tl.SpectralConv2d(4, 4, 3, padding=1),
        tl.MaxMin(),
        tl.SpectralConvTranspose2d(8, 4, 2, stride=2),
        tl.GroupSort2(),
        tl.ScaledAdaptativeL2NormPool2d((1, 1)),
        nn.Flatten(),
        tl.SpectralLinear(4, 4),
    )


def net_sll_block() -> nn.Module:
    """One SDPBasedLipschitzResBlock (SLL: x - 2 K^T relu(K x + b), K rescaled by AOL, zero padding)."""
    from orthogonium.layers.conv.SLL import SDPBasedLipschitzResBlock

    return SDPBasedLipschitzResBlock(4, 2, kernel_size=3)


def net_sll_dense_block() -> nn.Module:
    """One SDPBasedLipschitzDense (dense SLL; input 1 x 32)."""
    from orthogonium.layers.conv.SLL import SDPBasedLipschitzDense

    return SDPBasedLipschitzDense(32, 32, 64)


def net_sll_aoc_block() -> nn.Module:
    """One SLLxAOCLipschitzResBlock (SLL fused with AOC pre/post convs: stride 2, 4 -> 8 channels)."""
    from orthogonium.layers.conv.SLL import SLLxAOCLipschitzResBlock

    return SLLxAOCLipschitzResBlock(4, 8, 2, kernel_size=3, stride=2)


def net_aoc_res_block() -> nn.Module:
    """One AOCLipschitzResBlock (x - 2 K^T relu(K x + b), K an AOC conv; its default 'circular' mode pads 0)."""
    from orthogonium.layers.conv.SLL import AOCLipschitzResBlock

    return AOCLipschitzResBlock(4, 2, 3)


def net_resnet() -> nn.Module:
    """A stack: orthogonal conv, SLL block, SLLxAOC block (stride 2), AOC residual block, orthogonal dense."""
    from orthogonium.layers.conv.SLL import AOCLipschitzResBlock, SDPBasedLipschitzResBlock, SLLxAOCLipschitzResBlock

    return nn.Sequential(
        _aoc(2, 4, 3),
        SDPBasedLipschitzResBlock(4, 2, kernel_size=3),
        SLLxAOCLipschitzResBlock(4, 8, 2, kernel_size=3, stride=2),
        AOCLipschitzResBlock(8, 1, 3),
        nn.Flatten(),
        _linear(8 * 8 * 8, 10),
    )


def _branch() -> nn.Module:
    return nn.Sequential(_aoc(4, 4, 3), _maxmin(), _aoc(4, 4, 3))


def net_additive_res() -> nn.Module:
    """orthogonium AdditiveResidual: a x + (1 - a) f(x), a = sigmoid(alpha), f 1-Lipschitz."""
    from orthogonium.layers.residual import AdditiveResidual

    return AdditiveResidual(_branch(), init_val=0.3)


def net_prescaled_res() -> nn.Module:
    """orthogonium PrescaledAdditiveResidual: (x + f(alpha x)) / (1 + |alpha|)."""
    from orthogonium.layers.residual import PrescaledAdditiveResidual

    return PrescaledAdditiveResidual(_branch(), init_val=0.7)


class _ConcatRes(nn.Module):
    """orthogonium ConcatResidual: [x1, f(x2)] for x = [x1, x2] split along channels."""

    def __init__(self) -> None:
        super().__init__()
        from orthogonium.layers.residual import ConcatResidual

        self.block = ConcatResidual(_branch())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def net_concat_res() -> nn.Module:
    """orthogonium ConcatResidual (input 8 channels: x1 passes, f acts on x2)."""
    return _ConcatRes()


def net_l2norm_res() -> nn.Module:
    """orthogonium L2NormResidual: sqrt(x^2/2 + f(x)^2/2 + eps), elementwise."""
    from orthogonium.layers.residual import L2NormResidual

    return L2NormResidual(_branch())


class _LipRes(nn.Module):
    """deel-torchlip LipResidual: a x + (1 - a) f(x), a = sigmoid(alpha)."""

    def __init__(self) -> None:
        super().__init__()
        import deel.torchlip as tl

        self.f = _branch()
        self.mix = tl.LipResidual()
        with torch.no_grad():
            self.mix.alpha.fill_(0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x, self.f(x))


def net_lip_residual() -> nn.Module:
    """deel-torchlip LipResidual: a x + (1 - a) f(x), a = sigmoid(alpha), f conv-MaxMin-conv."""
    return _LipRes()


@dataclass(frozen=True)
class Net:
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]


IMAGE = (1, 2, 16, 16)
NETS: dict[str, Net] = {
    "plain": Net(net_plain, IMAGE),
    "circular": Net(net_circular, IMAGE),
    "strided": Net(net_strided, IMAGE),
    "strided_circular": Net(net_strided_circular, IMAGE),
    "transposed": Net(net_transposed, IMAGE),
    "groupsort2": Net(net_groupsort2, IMAGE),
    "groupsort4": Net(net_groupsort4, IMAGE),
    "fullsort": Net(net_fullsort, (1, 32)),
    "torchlip_maxmin": Net(net_torchlip_maxmin, IMAGE),
    "l2pool": Net(net_l2pool, IMAGE),
    "torchlip": Net(net_torchlip, IMAGE),
    "sll_block": Net(net_sll_block, (1, 4, 16, 16)),
    "sll_dense_block": Net(net_sll_dense_block, (1, 32)),
    "sll_aoc_block": Net(net_sll_aoc_block, (1, 4, 16, 16)),
    "aoc_res_block": Net(net_aoc_res_block, (1, 4, 16, 16)),
    "resnet": Net(net_resnet, IMAGE),
    "additive_res": Net(net_additive_res, (1, 4, 16, 16)),
    "prescaled_res": Net(net_prescaled_res, (1, 4, 16, 16)),
    "concat_res": Net(net_concat_res, (1, 8, 16, 16)),
    "l2norm_res": Net(net_l2norm_res, (1, 4, 16, 16)),
    "lip_residual": Net(net_lip_residual, (1, 4, 16, 16)),
}
BLOCKS = ["sll_block", "sll_dense_block", "sll_aoc_block", "aoc_res_block"]
CONV_BLOCKS = ["sll_block", "sll_aoc_block", "aoc_res_block"]  # any input size: --block-size N gives N x N
SHAPES: dict[str, tuple[int, ...]] = {}  # input shapes that replace NETS[net].shape for this run


def build(net: str) -> nn.Module:
    """The network ``net`` with its parametrizations, seeded, buffers primed by one train-mode forward, in eval
    mode (the ``--model`` factory of the parametrized state_dict)."""
    spec = NETS[net]
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = spec.make()
        module.train()
        with torch.no_grad():
            module(torch.randn(spec.shape))
    return module.eval()


def build_baked(net: str) -> nn.Module:
    """``build`` with its parametrizations removed, their values kept (the ``--model`` factory of the baked
    state_dict): lipcheck's own ``baked``."""
    from lipcheck.frontends.torch_state import baked

    return baked(build(net))


# ---------------------------------------------------------------------------------------------- paths


def export(net: str, path: str, folder: Path) -> tuple[Path, list[str], dict[str, Any]]:
    """Write ``net`` in the form ``path``: (file, lipcheck --input-shape, TorchOptions kwargs)."""
    shape = SHAPES.get(net, NETS[net].shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    shapes = [",".join(map(str, shape))]
    suffix = {"onnx-ts": ".onnx", "onnx-dynamo": ".onnx", "pt2": ".pt2"}.get(path.removesuffix("-unbaked"), ".pt")
    file = folder / f"{net}_{path}{suffix}"
    if path.startswith("state_dict"):
        factory = "build_baked" if path == "state_dict-baked" else "build"
        torch.save((build if path == "state_dict" else build_baked)(net).state_dict(), file)
        return file, shapes, {"model": f"benchmarks.one_lipschitz:{factory}", "model_kwargs": {"net": net}}
    module = build(net) if path.endswith("-unbaked") else build_baked(net)
    kind = path.removesuffix("-unbaked")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_output():
        warnings.simplefilter("ignore")
        if kind == "onnx-ts":
            torch.onnx.export(module, (x,), str(file), dynamo=False, opset_version=17, input_names=["x"])
        elif kind == "onnx-dynamo":
            torch.onnx.export(module, (x,), str(file), dynamo=True, input_names=["x"], verbose=False)
        elif kind == "pt2":
            torch.export.save(torch.export.export(module, (x,)), str(file))
        elif kind == "torchscript":
            torch.jit.save(torch.jit.trace(module, (x,)), str(file))
        else:
            raise ValueError(f"unknown path {path!r}")
    return file, shapes if kind == "torchscript" else [], {}


@contextlib.contextmanager
def _quiet_output() -> Any:
    """The exporters print to the process's stdout and stderr (file descriptors 1 and 2: the TorchScript
    exporter dumps its whole IR graph when it fails) directly: silence both."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


# ---------------------------------------------------------------------------------------------- measuring


@dataclass
class Row:
    net: str
    path: str
    bound: float | None = None
    seconds: float = 0.0
    status: str = "ok"  # ok | unbounded | export failed | load error | crash
    where: str = ""
    method: str = ""
    method_bounds: dict[str, float] = field(default_factory=dict)
    lower: float | None = None
    linear: float | None = None  # the product of the linear layers' own bounds (float32 weights: 1 + ~1e-7 each)

    @property
    def passed(self) -> bool:
        return self.bound is not None and self.bound <= 1 + TOL


def _short(exc: BaseException, limit: int = 160) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(exc).split()))  # the dynamo exporter's colours
    text = re.sub(r"\S*/(?=[^/\s]+\.(?:pt2|pt|onnx)\b)", "", text)  # the temporary folder
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def where_it_loses(report: Any, limit: int = 4) -> str:
    """The nodes to look at in a bound above 1 + TOL: local bounds above it, then the first nodes whose running
    bound crosses it although their own does not (a composition step), and reasons for 'not Lipschitz'."""
    parts = [f"{r.op} {r.node}: {r.reason}" for r in report.unbounded_reasons[:limit]]
    named = {r.node for r in report.unbounded_reasons}
    local = [layer for layer in report.layers if layer.lipschitz > 1 + TOL and layer.name not in named]
    parts += [f"{layer.op} {layer.name} = {layer.lipschitz:.6g} [{layer.method}]" for layer in local[:limit]]
    if len(local) > limit:
        parts.append(f"... {len(local) - limit} more local > 1")
    if report.upper_bound is not None:
        record, steps = 1 + TOL, []  # nodes that raise the running bound to a new high without a local bound > 1
        for layer in report.layers:
            if math.isfinite(layer.running) and layer.running > record * (1 + 1e-4):
                if layer.lipschitz <= 1 + TOL:
                    steps.append(f"{layer.op} {layer.name} -> {layer.running:.4g}")
                record = layer.running
        if steps:
            more = f", ... ({len(steps) - limit} more)" if len(steps) > limit else ""
            parts.append("composition: " + ", ".join(steps[:limit]) + more)
    return "; ".join(parts)


def measure(net: str, path: str, folder: Path, method: str, lower_budget: int | None) -> Row:
    from lipcheck.errors import LipcheckError
    from lipcheck.frontends.torch_frontend import TorchOptions
    from lipcheck.lower import LowerSettings
    from lipcheck.pipeline import analyse

    row = Row(net, path)
    try:
        file, shapes, options = export(net, path, folder)
    except Exception as exc:
        row.status, row.where = "export failed", _short(exc)
        return row
    lower = LowerSettings(budget=lower_budget, per_layer=False) if lower_budget else False
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = analyse(
                file, input_shapes=shapes, device="cpu", torch_options=TorchOptions(**options), method=method
            )
        row.seconds = time.perf_counter() - start
        if lower:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row.lower = _lower(file, shapes, options, lower)
    except LipcheckError as exc:
        row.seconds = time.perf_counter() - start
        row.status, row.where = "load error", _short(exc)
        return row
    except Exception as exc:
        row.seconds = time.perf_counter() - start
        tail = traceback.extract_tb(exc.__traceback__)[-1]
        row.status, row.where = "crash", f"{_short(exc)} ({Path(tail.filename).name}:{tail.lineno})"
        return row
    row.bound = report.upper_bound
    if row.bound is not None and row.lower is not None and row.lower > row.bound * (1 + 1e-6):
        row.status = "UNSOUND"  # the empirical lower bound is above the certified one
    row.linear = math.prod(layer.lipschitz for layer in report.layers if layer.op in LINEAR_OPS)
    row.method = report.bound_method or ""
    row.method_bounds = dict(report.method_bounds or {})
    if not report.bounded:
        row.status = "unbounded"
    if not row.passed:
        row.where = where_it_loses(report)
    if row.status == "UNSOUND":
        row.where = f"UNSOUND: lower bound {row.lower:.9g} > certified {row.bound:.9g}; " + row.where
    return row


def _lower(file: Path, shapes: list[str], options: dict[str, Any], settings: Any) -> float:
    from lipcheck.frontends.torch_frontend import TorchOptions
    from lipcheck.lower import lower_bound
    from lipcheck.pipeline import load_model

    graph = load_model(file, shapes, TorchOptions(**options))
    return float(lower_bound(graph, settings, "cpu").value)


# ---------------------------------------------------------------------------------------------- output


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.7f}" if value < 10 else f"{value:.4g}"


def table(rows: list[Row]) -> str:
    lines = [
        "| net | path | certified bound | pass | time s | lower | linear product | where it loses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.status in ("export failed", "load error", "crash"):
            verdict, bound = r.status, "-"
        else:
            verdict = "yes" if r.passed else "NO"
            bound = "not Lipschitz" if r.status == "unbounded" else _fmt(r.bound)
            if r.method and r.bound is not None:
                bound += f" ({r.method})"
        where = r.where.replace("|", "/")
        lines.append(
            f"| {r.net} | {r.path} | {bound} | {verdict} | {r.seconds:.2f} | {_fmt(r.lower)} | {_fmt(r.linear)} "
            f"| {where} |"
        )
    return "\n".join(lines)


def blocks_table(rows: list[Row]) -> str:
    """Per residual block: every refine method's network bound, the best, its ratio to 1, the lower bound."""
    methods = sorted({m for r in rows for m in r.method_bounds})
    head = "| block | path | " + " | ".join(methods) + " | best / 1 | lower | time s |"
    lines = [head, "|" + "---|" * (len(methods) + 5)]
    for r in rows:
        cells = [_fmt(r.method_bounds.get(m)) for m in methods]
        best = _fmt(r.bound) if r.status == "ok" else r.status
        lines.append(
            f"| {r.net} | {r.path} | " + " | ".join(cells) + f" | {best} | {_fmt(r.lower)} | {r.seconds:.2f} |"
        )
    return "\n".join(lines)


def _commit() -> str:
    """The checkout's commit, and the last commit that changed lipcheck/ (the code measured)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()

    import lipcheck

    used = Path(lipcheck.__file__).resolve().parent
    if used != Path("lipcheck").resolve():
        return f"lipcheck imported from {used} (not this checkout)"
    try:
        head, code = git("rev-parse", "--short", "HEAD"), git("log", "-1", "--format=%h", "--", "lipcheck")
        dirty = " (lipcheck/ modified)" if git("status", "--porcelain", "--", "lipcheck") else ""
        return f"checkout {head}, lipcheck/ as of {code}{dirty}"
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    global TOL
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default="all", help=f"comma-separated, or 'all': {', '.join(NETS)}")
    parser.add_argument("--paths", default="all", help=f"comma-separated, or 'all': {', '.join(PATHS + EXTRA_PATHS)}")
    parser.add_argument("--tol", type=float, default=TOL, help=f"pass when the bound is <= 1 + TOL (default {TOL:g})")
    parser.add_argument("--method", default="best", help="lipcheck's --method (best, product, all, ...)")
    parser.add_argument("--lower", action="store_true", help="also lipcheck's empirical lower bound (first path)")
    parser.add_argument("--lower-budget", type=int, default=1000, help="JVPs for --lower (default 1000)")
    parser.add_argument("--blocks", action="store_true", help="the residual blocks alone, --method all, per method")
    parser.add_argument("--block-size", type=int, help="input size N x N of the conv residual blocks (default 16)")
    parser.add_argument("--out", help="also write the result as Markdown to this file")
    parser.add_argument("--label", default="", help="a title for the Markdown output")
    parser.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    parser.add_argument("--keep", help="write the exported files into this folder and keep them")
    parser.add_argument("--list", action="store_true", help="list the networks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, spec in NETS.items():
            doc = " ".join((spec.make.__doc__ or "").split())
            print(f"{name:18s} {'x'.join(map(str, spec.shape)):12s} {doc}")
        return 0
    TOL = args.tol
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    names = list(NETS) if args.nets == "all" else args.nets.split(",")
    if args.blocks and args.nets == "all":
        names = BLOCKS
    paths = PATHS if args.paths == "all" else args.paths.split(",")
    method = "all" if args.blocks and args.method == "best" else args.method
    unknown = [n for n in names if n not in NETS] + [p for p in paths if p not in PATHS + EXTRA_PATHS]
    if unknown:
        parser.error(f"unknown net or path: {', '.join(unknown)}")

    if args.block_size:
        SHAPES.update({net: (*NETS[net].shape[:2], args.block_size, args.block_size) for net in CONV_BLOCKS})
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for net in names:
            lowered = False
            for path in paths:
                budget = args.lower_budget if args.lower and not lowered else None
                row = measure(net, path, folder, method, budget)
                lowered = lowered or row.lower is not None
                rows.append(row)
                print(
                    f"{net:18s} {path:17s} {row.status:13s} {_fmt(row.bound):>14s} {row.seconds:6.2f}s", file=sys.stderr
                )
    text = blocks_table(rows) if args.blocks else table(rows)
    failed = [r for r in rows if not r.passed]
    summary = f"{len(rows) - len(failed)} of {len(rows)} pass (bound <= 1 + {TOL:g})"
    print(text)
    print()
    print(summary)
    if args.out:
        given = sys.argv[1:] if argv is None else argv
        command = "PYTHONPATH=. python benchmarks/one_lipschitz.py " + shlex.join(given)
        header = [
            f"{'##' if args.append else '#'} {args.label or '1-Lipschitz networks'}",
            "",
            f"lipcheck: {_commit()}, torch {torch.__version__}, {_versions()}; `{command}`; "
            f"method `{method}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
        ]
        out = Path(args.out)
        before = out.read_text() + "\n" if args.append and out.exists() else ""
        out.write_text(before + "\n".join([*header, text, "", summary, ""]))
    return 0


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("orthogonium", "deel-torchlip"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


if __name__ == "__main__":
    sys.exit(main())
