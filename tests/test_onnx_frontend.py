"""The ONNX frontend on real exports: every opset, both exporters, weight storage, shapes, names.

Each test builds a small seeded torch model, exports it to ``tmp_path`` and runs ``analyse``. Bounds
are checked against onnxruntime on random and nearby input pairs (and, where cheap, against the
largest Jacobian norm found by power iteration, a true lower bound on the Lipschitz constant).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from torch import nn
from torch.autograd import forward_ad
from torch.nn import functional as F

from lipcheck.errors import InputShapeError, ModelLoadError
from lipcheck.pipeline import analyse

torch.set_num_threads(2)

# ---------------------------------------------------------------------------------------------
# helpers


def export(model: nn.Module, args: tuple, path: Path, *, dynamo: bool = False, **kwargs) -> Path:
    """torch.onnx.export quietly (the dynamo exporter prints progress; the legacy one warns)."""
    kwargs.setdefault("input_names", ["input"])
    kwargs.setdefault("output_names", ["output"])
    if dynamo:
        kwargs.setdefault("verbose", False)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), args, str(path), dynamo=dynamo, **kwargs)
    return path


def op_types(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node]


def layer_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def input_dependent_nodes(path: Path) -> list[onnx.NodeProto]:
    """ONNX nodes whose output values depend on the values of the graph inputs."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    live = {v.name for v in graph.input if v.name not in initializers}
    result = []
    for node in graph.node:
        if node.op_type in ("Shape", "Size"):
            continue  # depend on the shape only
        if any(i in live for i in node.input):
            live.update(node.output)
            result.append(node)
    return result


def relative_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b))


def empirical_ratio(path: Path, shape: tuple[int, ...], pairs: int = 200, seed: int = 0) -> float:
    """max ||f(x) - f(y)|| / ||x - y|| over random pairs and nearby pairs (y = x + 1e-3 noise)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(seed)

    def run(x: np.ndarray) -> np.ndarray:
        outputs = session.run(None, {name: x.astype(np.float32)})
        return np.concatenate([np.asarray(o, dtype=np.float64).reshape(-1) for o in outputs])

    best = 0.0
    for i in range(2 * pairs):
        x = rng.standard_normal(shape) * rng.choice([0.3, 1.0, 3.0])
        step = 1e-3 if i % 2 else 1.0
        y = x + step * rng.standard_normal(shape)
        x32, y32 = x.astype(np.float32), y.astype(np.float32)
        gap = np.linalg.norm((x32.astype(np.float64) - y32.astype(np.float64)).reshape(-1))
        best = max(best, float(np.linalg.norm(run(x32) - run(y32)) / gap))
    return best


def jacobian_lower_bound(
    model: nn.Module, shape: tuple[int, ...], points: int = 2, iterations: int = 20, seed: int = 0
) -> float:
    """max over random points of ||J(x) v|| for unit v from power iteration on J^T J.

    Every value found is a true lower bound on the Lipschitz constant (J v by forward-mode AD,
    J^T u by backpropagation, in float64).
    """
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(model).double().eval().requires_grad_(False)
    best = 0.0
    for _ in range(points):
        x = torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_(True)
        y = model(x)
        v = torch.randn(shape, generator=generator, dtype=torch.float64)
        for _ in range(iterations):
            v = v / v.norm()
            with forward_ad.dual_level(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch scripts a helper lazily
                jv = forward_ad.unpack_dual(model(forward_ad.make_dual(x.detach(), v))).tangent
            best = max(best, float(jv.norm()))
            (v,) = torch.autograd.grad(y, x, jv, retain_graph=True)
    return best


def seeded_batchnorm(bn: nn.modules.batchnorm._BatchNorm, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(0.5 * torch.randn(c, generator=generator))
        bn.running_var.copy_(0.25 + 1.5 * torch.rand(c, generator=generator))
        bn.weight.copy_(1.0 + 0.5 * torch.randn(c, generator=generator))
        bn.bias.copy_(0.2 * torch.randn(c, generator=generator))


# ---------------------------------------------------------------------------------------------
# 1. opset coverage


class SmallCNN(nn.Module):
    """conv, BN, relu, reflect pad, maxpool, avgpool, flatten, linear, residual add, concat, dropout,
    nearest upsample, softmax."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3)  # padded explicitly: a Pad node (pads as an input from opset 11)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv3 = nn.Conv2d(16, 4, 1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 4 * 4, 10)
        seeded_batchnorm(self.bn1, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = h + self.conv2(F.pad(h, (1, 1, 1, 1), mode="reflect"))  # residual
        h = self.pool(h)
        h = torch.cat([h, self.up(self.avg(h))], dim=1)
        h = self.avg(self.conv3(h))
        h = self.drop(torch.flatten(h, 1))
        return torch.softmax(self.fc(h), dim=-1)


CNN_SHAPE = (1, 3, 16, 16)


def test_every_opset_and_dynamo_give_the_same_sound_bound(tmp_path: Path) -> None:
    model = SmallCNN().eval()
    x = torch.randn(CNN_SHAPE)
    bounds: dict[str, float] = {}
    paths: dict[str, Path] = {}
    failures: dict[int, str] = {}
    opset = 9
    while opset <= 40:  # the legacy exporter raises past the newest opset it accepts
        path = tmp_path / f"cnn_opset{opset}.onnx"
        try:
            export(model, (x,), path, opset_version=opset)
        except Exception as exc:  # any refusal ends the sweep
            failures[opset] = str(exc).splitlines()[0]
            break
        paths[f"opset {opset}"] = path
        opset += 1
    max_opset = opset - 1
    assert max_opset >= 20, f"TorchScript exporter stopped at {max_opset}: {failures}"
    assert "Unsupported onnx_opset_version" in failures.get(max_opset + 1, ""), failures
    paths["dynamo"] = export(model, (x,), tmp_path / "cnn_dynamo.onnx", dynamo=True)

    for label, path in paths.items():
        report = analyse(path, device="cpu")
        assert report.upper_bound is not None and math.isfinite(report.upper_bound), label
        bounds[label] = report.upper_bound
        ops = {layer.op for layer in report.layers}
        assert {"Conv", "Relu", "Pad", "MaxPool", "AveragePool", "Concat", "Resize", "Softmax", "Add"} <= ops, (
            label,
            ops,
        )
        # every size is known: no layer falls back to a size-independent bound
        assert not any("size-independent" in layer.method for layer in report.layers), label
    reference = bounds["opset 13"]
    for label, bound in bounds.items():
        assert relative_gap(bound, reference) <= 1e-6, (label, bound, reference)

    lower = jacobian_lower_bound(model, CNN_SHAPE, points=3)
    assert lower <= min(bounds.values()), (lower, bounds)
    for label, path in paths.items():
        ratio = empirical_ratio(path, CNN_SHAPE, pairs=200)
        assert ratio <= bounds[label], (label, ratio, bounds[label])


# ---------------------------------------------------------------------------------------------
# 2. dynamo's Linear as Transpose + MatMul + Add on named initializers


def test_dynamo_unfused_linear_matches_torchscript(tmp_path: Path) -> None:
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 4))
    x = torch.randn(1, 5, 16)  # a sequence input: exporters write MatMul, not Gemm
    legacy = export(model, (x,), tmp_path / "mlp_ts.onnx", opset_version=17)
    unfused = export(model, (x,), tmp_path / "mlp_dynamo.onnx", dynamo=True, optimize=False)
    fused = export(model, (x,), tmp_path / "mlp_dynamo_opt.onnx", dynamo=True)

    graph = onnx.load(str(unfused), load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("Transpose") == 3 and ops.count("MatMul") == 3 and "Gemm" not in ops, ops
    initializers = {init.name for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Transpose":
            assert node.input[0] in initializers and node.input[0].endswith(".weight"), node
        if node.op_type == "Add":
            assert any(i in initializers and i.endswith(".bias") for i in node.input), node

    reference = analyse(legacy, device="cpu", method="product")
    assert reference.upper_bound is not None
    for path in (unfused, fused):
        report = analyse(path, device="cpu", method="product")
        assert report.upper_bound is not None
        assert relative_gap(report.upper_bound, reference.upper_bound) <= 1e-9, path.name
        # the weight transpose is folded away: only three MatMuls carry the network's norm
        assert [layer.op for layer in report.layers].count("MatMul") == 3
        assert "Transpose" not in [layer.op for layer in report.layers]
    exact = math.prod(torch.linalg.matrix_norm(m.weight.double(), 2).item() for m in model if isinstance(m, nn.Linear))
    assert reference.upper_bound == pytest.approx(exact, rel=1e-9)
    assert empirical_ratio(unfused, (1, 5, 16), pairs=100) <= reference.upper_bound


# ---------------------------------------------------------------------------------------------
# 3. where the weights live


def _cnn_head() -> nn.Module:
    torch.manual_seed(31)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))


def test_weights_in_constant_nodes(tmp_path: Path) -> None:
    base = export(_cnn_head(), (torch.randn(1, 3, 8, 8),), tmp_path / "base.onnx", opset_version=13)
    model = onnx.load(str(base))
    graph = model.graph
    constants = [
        helper.make_node("Constant", [], [init.name], name=f"weight_{i}", value=init)
        for i, init in enumerate(graph.initializer)
    ]
    assert len(constants) == 4
    nodes = list(graph.node)
    del graph.initializer[:]
    del graph.node[:]
    graph.node.extend(constants + nodes)
    onnx.checker.check_model(model)
    moved = tmp_path / "constant_nodes.onnx"
    onnx.save(model, str(moved))

    expected = analyse(base, device="cpu")
    report = analyse(moved, device="cpu")
    assert report.upper_bound == pytest.approx(expected.upper_bound, rel=1e-12)
    assert [layer.name for layer in report.layers] == [layer.name for layer in expected.layers]
    assert not any(layer.name.startswith("weight_") for layer in report.layers)

    # Constant-node tensors stored as external data too
    external = tmp_path / "constant_nodes_external.onnx"
    onnx.save_model(
        onnx.load(str(moved)),
        str(external),
        save_as_external_data=True,
        location="constant_nodes_external.bin",
        size_threshold=0,
        convert_attribute=True,
    )
    assert (tmp_path / "constant_nodes_external.bin").stat().st_size > 0
    assert analyse(external, device="cpu").upper_bound == pytest.approx(expected.upper_bound, rel=1e-12)


def test_external_data_and_missing_data_file(tmp_path: Path) -> None:
    base = export(_cnn_head(), (torch.randn(1, 3, 8, 8),), tmp_path / "base.onnx", opset_version=17)
    expected = analyse(base, device="cpu").upper_bound
    sub = tmp_path / "external"
    sub.mkdir()
    path = sub / "model.onnx"
    onnx.save_model(
        onnx.load(str(base)),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    assert path.stat().st_size < (sub / "model.onnx.data").stat().st_size
    assert analyse(path, device="cpu").upper_bound == pytest.approx(expected, rel=1e-12)

    (sub / "model.onnx.data").rename(tmp_path / "elsewhere.data")
    with pytest.raises(ModelLoadError) as info:
        analyse(path, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    detail = message.removeprefix(f"{path}: ")  # tmp_path itself is named after this test
    assert "external data file missing" in detail and "model.onnx.data" in detail, message


class _SharedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(33)
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(x)))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_weight_used_twice(tmp_path: Path, dynamo: bool) -> None:
    model = _SharedLinear()
    kwargs = {"dynamo": True} if dynamo else {"opset_version": 13}
    path = export(model, (torch.randn(1, 6),), tmp_path / "shared.onnx", **kwargs)
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = [init.name for init in graph.initializer if init.name.endswith("weight")]
    assert len(weights) == 1
    users = [node for node in graph.node if weights[0] in node.input]
    assert len(users) == 2

    report = analyse(path, device="cpu", method="product")
    sigma = torch.linalg.matrix_norm(model.fc.weight.double(), 2).item()
    assert report.upper_bound == pytest.approx(sigma * sigma, rel=1e-9)
    linear_layers = [layer for layer in report.layers if layer.op in ("Gemm", "MatMul")]
    assert len(linear_layers) == 2
    assert all(layer.lipschitz == pytest.approx(sigma, rel=1e-9) for layer in linear_layers)
    assert empirical_ratio(path, (1, 6), pairs=100) <= report.upper_bound


# ---------------------------------------------------------------------------------------------
# 4. activations written with primitives, and as native ops

ACTIVATIONS = {
    # module factory, the op names the report may show for it (recognised from primitives or native)
    "silu": (nn.SiLU, {"SiLU"}),
    "hardswish": (nn.Hardswish, {"HardSwish"}),
    "mish": (nn.Mish, {"Mish"}),
    "gelu": (nn.GELU, {"GELU", "Gelu"}),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), {"GELU (tanh)", "Gelu"}),
}
NATIVE = {"hardswish": "HardSwish", "mish": "Mish", "gelu": "Gelu", "gelu_tanh": "Gelu"}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_decomposed_and_native_activations_agree(tmp_path: Path, name: str) -> None:
    factory, shown = ACTIVATIONS[name]
    torch.manual_seed(41)
    model = nn.Sequential(nn.Linear(8, 16), factory(), nn.Linear(16, 4))
    x = torch.randn(1, 8)
    exports = {f"opset {o}": {"opset_version": o} for o in (11, 13, 14, 17, 18, 20)}
    exports["dynamo"] = {"dynamo": True}
    bounds: dict[str, float] = {}
    native_seen = False
    for label, kwargs in exports.items():
        path = export(model, (x,), tmp_path / f"{name}_{label.replace(' ', '')}.onnx", **kwargs)
        ops = op_types(path)
        native_seen |= NATIVE.get(name) in ops
        if label == "opset 13":  # the legacy exporter writes every one of them with primitives here
            assert not {"Gelu", "HardSwish", "Mish"} & set(ops), ops
        report = analyse(path, device="cpu")
        assert report.upper_bound is not None and math.isfinite(report.upper_bound), (label, ops)
        middle = [layer.op for layer in report.layers][1:-1]
        assert len(middle) == 1 and middle[0] in shown, (label, ops, middle)
        bounds[label] = report.upper_bound
        if label in ("opset 13", "dynamo"):
            assert empirical_ratio(path, (1, 8), pairs=100) <= report.upper_bound, label
    if name in NATIVE:
        assert native_seen, f"no export wrote a native {NATIVE[name]} op"
    reference = bounds["opset 13"]  # decomposed at opset 13 for every activation here
    for label, bound in bounds.items():
        assert relative_gap(bound, reference) <= 1e-4, (label, bounds)
    assert min(bounds.values()) >= jacobian_lower_bound(model, (1, 8), points=8)


# ---------------------------------------------------------------------------------------------
# 5. dynamic spatial dims and --input-shape


def _fully_convolutional() -> nn.Module:
    torch.manual_seed(51)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )


@pytest.fixture(scope="module")
def dynamic_fcn(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = _fully_convolutional().eval()
    path = tmp_path_factory.mktemp("fcn") / "fcn_dynamic.onnx"
    export(
        model,
        (torch.randn(1, 3, 16, 16),),
        path,
        opset_version=17,
        dynamic_axes={
            "input": {0: "batch", 2: "height", 3: "width"},
            "output": {0: "batch", 2: "out_height", 3: "out_width"},
        },
    )
    return model, path


def test_dynamic_spatial_dims(dynamic_fcn: tuple[nn.Module, Path]) -> None:
    model, path = dynamic_fcn
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]

    free = analyse(path, device="cpu")
    assert free.upper_bound is not None and math.isfinite(free.upper_bound)
    assert free.input_shapes["input"] == (1, 3, None, None)
    convs = [layer for layer in free.layers if layer.op == "Conv"]
    assert len(convs) == 4
    for layer in convs:
        if layer.name.startswith("/6/"):  # the 1x1 conv: a plain matrix, the same at every size
            assert "size-independent" in layer.method or "single tap" in layer.method, layer.method
        else:
            assert "size-independent" in layer.method, (layer.name, layer.method)

    for size in (16, 32):
        shape = (1, 3, size, size)
        report = analyse(path, input_shapes=[",".join(map(str, shape))], device="cpu")
        assert report.input_shapes["input"] == shape
        assert report.upper_bound is not None
        assert report.upper_bound <= free.upper_bound * (1 + 1e-9), (size, report.upper_bound, free.upper_bound)
        assert not any("size-independent" in layer.method for layer in report.layers)
        assert empirical_ratio(path, shape, pairs=100, seed=size) <= report.upper_bound, size
        lower = jacobian_lower_bound(model, shape, seed=size)
        assert lower <= report.upper_bound, (size, lower, report.upper_bound)


def test_size_aware_conv_bound_against_its_true_norm(tmp_path: Path) -> None:
    """A single linear conv: power iteration finds its true norm, which the bound must not undercut.

    A wrong input size or padding taken from the ONNX file would show up here as a bound below the
    norm (size too small) or well above it.
    """
    torch.manual_seed(52)
    model = nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=2).eval()
    path = export(
        model,
        (torch.randn(1, 3, 16, 16),),
        tmp_path / "conv.onnx",
        opset_version=17,
        dynamic_axes={"input": {2: "height", 3: "width"}, "output": {2: "oh", 3: "ow"}},
    )
    free = analyse(path, device="cpu").upper_bound
    assert free is not None
    for size in (5, 16, 32):
        shape = (1, 3, size, size)
        bound = analyse(path, input_shapes=[f"input={','.join(map(str, shape))}"], device="cpu").upper_bound
        norm = jacobian_lower_bound(model, shape, points=1, iterations=60, seed=size)
        assert norm <= bound <= free * (1 + 1e-9), (size, norm, bound, free)
        if size >= 16:  # the circular embedding is close to the zero-padded norm on large inputs
            assert bound <= 1.1 * norm, (size, norm, bound)


@pytest.mark.parametrize(
    "spec",
    [
        ["3,32,32"],  # wrong rank
        ["1,3,32,32,1"],  # wrong rank
        ["1,3,a,32"],  # not an integer
        ["1,3,32.5,32"],  # not an integer
        ["1,3,,32"],
        ["image=1,3,32,32"],  # no input of that name
        ["1,4,32,32"],  # 4 channels where the model fixes 3
        ["1,3,0,32"],  # not positive
        ["1,3,32,32", "1,3,32,32"],  # more shapes than inputs
    ],
)
def test_bad_input_shapes(dynamic_fcn: tuple[nn.Module, Path], spec: list[str]) -> None:
    _, path = dynamic_fcn
    with pytest.raises(InputShapeError) as info:
        analyse(path, input_shapes=spec, device="cpu")
    assert "\n" not in str(info.value)


def test_input_shape_contradicting_a_static_model(tmp_path: Path) -> None:
    path = export(_fully_convolutional(), (torch.randn(1, 3, 16, 16),), tmp_path / "static.onnx", opset_version=17)
    with pytest.raises(InputShapeError):
        analyse(path, input_shapes=["1,3,32,32"], device="cpu")
    with pytest.raises(InputShapeError):
        analyse(path, input_shapes=["input=1,3,16"], device="cpu")
    same = analyse(path, input_shapes=["input=1,3,16,16"], device="cpu")
    assert same.upper_bound == pytest.approx(analyse(path, device="cpu").upper_bound, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# 6. not globally Lipschitz


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(61)
        self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.a(x) * self.b(x))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(62)
        self.q, self.k, self.v, self.out = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(8)
        return self.out(torch.softmax(scores, dim=-1) @ self.v(x))


def _layer_norm_net() -> nn.Module:
    torch.manual_seed(63)
    return nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("kwargs", [{"opset_version": 17}, {"dynamo": True}], ids=["opset17", "dynamo"])
def test_layer_norm_with_epsilon_is_bounded(tmp_path: Path, kwargs: dict) -> None:
    """LayerNormalization is Lipschitz with max|scale|/sqrt(eps): no sampled quotient exceeds the bound."""
    path = export(_layer_norm_net(), (torch.randn(1, 5, 8),), tmp_path / "ln.onnx", **kwargs)
    report = analyse(path, device="cpu")
    assert report.upper_bound is not None and report.certified
    (norm,) = [layer for layer in report.layers if layer.op == "LayerNormalization"]
    assert "sqrt(eps)" in norm.method and norm.lipschitz > 100  # 1/sqrt(1e-5) times the scale's norm
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(5)
    for scale in (1e-4, 1e-2, 1.0):
        x = rng.standard_normal((64, 1, 5, 8)) * scale
        y = x + rng.standard_normal(x.shape) * scale * 1e-2
        fx = np.stack([session.run(None, {name: a.astype(np.float32)})[0] for a in x]).astype(np.float64)
        fy = np.stack([session.run(None, {name: a.astype(np.float32)})[0] for a in y]).astype(np.float64)
        ratios = np.linalg.norm((fx - fy).reshape(64, -1), axis=1) / np.linalg.norm((x - y).reshape(64, -1), axis=1)
        assert ratios.max() <= report.upper_bound * (1 + 1e-3)


UNBOUNDED_CASES = {
    # name: (model factory, export kwargs, op types that must be named as unbounded)
    "layernorm_opset13": (_layer_norm_net, {"opset_version": 13}, {"Div"}),  # decomposed
    "gated_product": (_Gated, {"opset_version": 17}, {"Mul"}),
    "gated_product_dynamo": (_Gated, {"dynamo": True}, {"Mul"}),
    "attention": (_Attention, {"opset_version": 17}, {"MatMul"}),
    "attention_dynamo": (_Attention, {"dynamo": True}, {"MatMul"}),
}


@pytest.mark.parametrize("case", list(UNBOUNDED_CASES))
def test_not_globally_lipschitz(tmp_path: Path, case: str) -> None:
    factory, kwargs, expected_ops = UNBOUNDED_CASES[case]
    path = export(factory(), (torch.randn(1, 5, 8),), tmp_path / f"{case}.onnx", **kwargs)
    report = analyse(path, device="cpu")
    assert report.upper_bound is None
    assert not report.bounded

    nodes = input_dependent_nodes(path)
    by_name = {layer_name(node): node for node in nodes}
    named = {reason.node: reason for reason in report.unbounded_reasons}
    assert named, "no node named as the reason"
    for name, reason in named.items():
        assert name in by_name, (name, list(by_name))
        assert by_name[name].op_type == reason.op
        assert reason.reason
    assert expected_ops <= {reason.op for reason in report.unbounded_reasons}
    if "attention" in case:  # both products: Q K^T and softmax(.) V
        assert [r.op for r in report.unbounded_reasons].count("MatMul") == 2

    # every node that computes on the input is still listed (or folded into a listed one)
    covered = {layer.name for layer in report.layers}
    covered |= {name for layer in report.layers for name in layer.folded}
    assert set(by_name) <= covered, set(by_name) - covered
    unbounded = [layer for layer in report.layers if not math.isfinite(layer.running)]
    assert unbounded and unbounded[-1].name == report.layers[-1].name


# ---------------------------------------------------------------------------------------------
# 7. names and folding in the report


def test_layer_names_are_onnx_node_names(tmp_path: Path) -> None:
    model = SmallCNN()
    path = export(model, (torch.randn(CNN_SHAPE),), tmp_path / "named.onnx", opset_version=17)
    report = analyse(path, device="cpu")
    expected = [layer_name(node) for node in input_dependent_nodes(path)]
    assert all(node.name for node in input_dependent_nodes(path))
    assert [layer.name for layer in report.layers] == expected

    # unnamed nodes are reported under their first output's name; duplicate names stay distinct
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        node.name = ""
    unnamed = tmp_path / "unnamed.onnx"
    onnx.save(proto, str(unnamed))
    report = analyse(unnamed, device="cpu")
    assert [layer.name for layer in report.layers] == [node.output[0] for node in input_dependent_nodes(unnamed)]

    proto = onnx.load(str(path))
    for node in proto.graph.node:
        node.name = "same"
    duplicated = tmp_path / "duplicated.onnx"
    onnx.save(proto, str(duplicated))
    names = [layer.name for layer in analyse(duplicated, device="cpu").layers]
    assert len(set(names)) == len(names) == len(expected)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_batchnorm_folded_into_conv_is_listed(tmp_path: Path, exporter: str) -> None:
    model = SmallCNN()
    x = torch.randn(CNN_SHAPE)
    # keep the BatchNormalization node: the default export already folds it
    if exporter == "torchscript":
        kept = export(model, (x,), tmp_path / "bn.onnx", opset_version=17, do_constant_folding=False)
    else:
        kept = export(model, (x,), tmp_path / "bn.onnx", dynamo=True, optimize=False)
    prefolded = export(model, (x,), tmp_path / "prefolded.onnx", opset_version=17)
    bn_nodes = [
        node
        for node in onnx.load(str(kept), load_external_data=False).graph.node
        if node.op_type == "BatchNormalization"
    ]
    assert len(bn_nodes) == 1 and "BatchNormalization" not in op_types(prefolded)

    report = analyse(kept, device="cpu")
    folded = [layer for layer in report.layers if layer.folded]
    assert len(folded) == 1
    assert folded[0].op == "Conv" and folded[0].folded == [layer_name(bn_nodes[0])]
    assert "BatchNormalization" not in {layer.op for layer in report.layers}
    first_conv = next(
        node for node in onnx.load(str(kept), load_external_data=False).graph.node if node.op_type == "Conv"
    )
    assert folded[0].name == layer_name(first_conv)
    reference = analyse(prefolded, device="cpu").upper_bound
    assert report.upper_bound is not None and relative_gap(report.upper_bound, reference) <= 1e-6


class _ExportTimeShapes(nn.Module):
    """Ops whose shape arguments the exporters compute with constant subgraphs (Pad amounts from
    opset 11, Expand targets through ConstantOfShape/Where, repeat through Tile)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(71)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(F.pad(x, (2, 1, 1, 2), mode="reflect"))
        h = h[:, :1].expand(-1, 4, -1, -1) + h
        return h.repeat(1, 2, 1, 1)


def test_shapes_computed_by_constant_subgraphs_are_known(tmp_path: Path) -> None:
    """Regression: shapes were inferred before constant folding only, so a static model's Expand
    was 'not globally Lipschitz' and the conv after an opset-11 Pad fell back to a size-free bound."""
    model = _ExportTimeShapes()
    shape = (1, 3, 12, 12)
    bounds = {}
    for label, kwargs in {
        "opset 9": {"opset_version": 9},
        "opset 13": {"opset_version": 13},
        "opset 17": {"opset_version": 17},
        "dynamo": {"dynamo": True},
    }.items():
        path = export(model, (torch.randn(shape),), tmp_path / f"{label.replace(' ', '')}.onnx", **kwargs)
        report = analyse(path, device="cpu")
        assert report.upper_bound is not None, (label, report.unbounded_reasons)
        assert not any("size-independent" in layer.method for layer in report.layers), label
        assert all(layer.output_shape is not None and None not in layer.output_shape for layer in report.layers), label
        bounds[label] = report.upper_bound
        assert empirical_ratio(path, shape, pairs=50) <= report.upper_bound, label
    for bound in bounds.values():
        assert relative_gap(bound, bounds["opset 13"]) <= 1e-6, bounds
    assert jacobian_lower_bound(model, shape) <= min(bounds.values())
