"""The PyTorch frontend: every checkpoint format, parity with ONNX exports, pickle safety, one-line errors."""

from __future__ import annotations

import io
import math
import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipcheck.cli import main
from lipcheck.compose import Composition, compose
from lipcheck.frontends import load_graph, load_model
from lipcheck.frontends.torch_frontend import (
    TorchOptions,
    UntrustedPickleError,
    WeightTensors,
    detect_format,
    load_torch,
    module_to_graph,
    pickle_globals,
    strip_wrapper_prefixes,
)
from lipcheck.graph import Graph
from lipcheck.passes import prepare
from lipcheck.pipeline import analyse
from tests.conftest import ROOT, SAMPLES
from tests.torch_nets import FunctionalForms, ParityNet, WithCummax, make_parity_net

IMG = "1,3,16,16"
RESNET = "sample_models.build:ResNetSmall"


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    """--model imports like uvicorn, relative to the working folder: run from the repository root."""
    monkeypatch.chdir(ROOT)


def composed(graph: Graph) -> Composition:
    prepare(graph)
    return compose(graph)


def onnx_export(module: nn.Module, x: torch.Tensor, path: Path, opset: int = 17) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=opset, input_names=["input"])
    return path


def weight_layers(result: Composition) -> list[tuple[str, float]]:
    return [(layer.op, layer.lipschitz) for layer in result.layers if layer.op in ("Conv", "Gemm", "MatMul")]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI in-process (as `lipcheck ARGS`): exit code, stdout, stderr."""
    argv = sys.argv
    sys.argv = ["lipcheck", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------- every format


RESNET_FILES = [
    ("resnet_small_ckpt.pt", ["--model", RESNET, "-s", IMG]),
    ("resnet_small.ckpt", ["--model", RESNET, "-s", IMG]),
    ("resnet_small_ts.pt", ["-s", IMG]),
    ("resnet_small.pt2", []),
]


def _report_args(args: list[str]) -> tuple[list[str], TorchOptions]:
    shapes = [args[i + 1] for i, a in enumerate(args) if a == "-s"]
    model = next((args[i + 1] for i, a in enumerate(args) if a == "--model"), None)
    return shapes, TorchOptions(model=model, trust_pickle="--trust-pickle" in args)


def test_every_resnet_format_gives_the_same_report() -> None:
    """Checkpoint, Lightning, TorchScript and .pt2 files of one network: identical bounds and layers."""
    reports = {}
    for name, args in RESNET_FILES:
        shapes, options = _report_args(args)
        reports[name] = analyse(SAMPLES / name, shapes, device="cpu", torch_options=options)
    reference = reports["resnet_small.pt2"]
    assert reference.bounded and reference.scope == "network"
    for name, report in reports.items():
        assert math.isclose(report.upper_bound, reference.upper_bound, rel_tol=1e-12), name
        assert [layer.lipschitz for layer in report.layers] == pytest.approx(
            [layer.lipschitz for layer in reference.layers], rel=1e-12
        ), name
    names = [layer.name for layer in reference.layers]
    assert names[:3] == ["stem.0", "stem.2", "block1.conv1"]  # qualified module names, BN folded into stem.0
    assert "block1.add" in names and "fc" in names


def test_module_names_survive_in_checkpoints() -> None:
    report = analyse(SAMPLES / "resnet_small_ckpt.pt", [IMG], device="cpu", torch_options=TorchOptions(model=RESNET))
    convs = [layer for layer in report.layers if layer.op == "Conv"]
    assert [c.name for c in convs][:4] == ["stem.0", "block1.conv1", "block1.conv2", "block2.conv1"]
    assert any("bn" in folded for c in convs for folded in c.folded)


def test_safetensors_and_pickled_module_agree() -> None:
    from_safetensors = analyse(
        SAMPLES / "cnn_bn.safetensors", [IMG], device="cpu",
        torch_options=TorchOptions(model="sample_models.build:make_cnn_bn"),
    )  # fmt: skip
    trusted = TorchOptions(trust_pickle=True)
    from_pickle = analyse(SAMPLES / "cnn_bn_module.pt", [IMG], device="cpu", torch_options=trusted)
    assert from_safetensors.upper_bound == pytest.approx(from_pickle.upper_bound, rel=1e-12)
    assert [layer.name for layer in from_pickle.layers][:3] == ["0", "2", "3"]


def test_formats_are_detected_by_content(tmp_path: Path) -> None:
    for name, kind in [("resnet_small_ts.pt", "torchscript"), ("resnet_small.pt2", "pt2"),
                       ("cnn_bn.safetensors", "safetensors"), ("resnet_small.ckpt", "pickle")]:  # fmt: skip
        renamed = tmp_path / f"renamed_{kind}.bin"
        renamed.write_bytes((SAMPLES / name).read_bytes())
        assert detect_format(renamed) == kind, name


def test_legacy_and_zip_torch_save_both_load(tmp_path: Path) -> None:
    state = {"fc.weight": torch.randn(3, 4, dtype=torch.float64), "fc.bias": torch.zeros(3)}
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    loaded = load_model(legacy)
    assert isinstance(loaded, WeightTensors) and set(loaded.tensors) == set(state)


def test_half_precision_weights_are_read_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).to(torch.bfloat16)
    path = tmp_path / "bf16.pt"
    torch.save(net.state_dict(), path)
    report = analyse(path, device="cpu")
    exact = torch.linalg.matrix_norm(net[0].weight.double(), 2).item()
    assert report.layers[0].lipschitz == pytest.approx(exact, rel=1e-9) and report.layers[0].lipschitz >= exact


# ---------------------------------------------------------------------- parity with ONNX


def test_parity_with_onnx_export(tmp_path: Path) -> None:
    """The same network via PyTorch and via its ONNX export: the same bound (1e-6) and per-layer values."""
    net = ParityNet()
    x = torch.randn(1, 3, 16, 16)
    from_torch = composed(module_to_graph(net, [IMG], "net"))
    from_onnx = composed(load_graph(onnx_export(net, x, tmp_path / "net.onnx")))
    assert from_torch.upper_bound == pytest.approx(from_onnx.upper_bound, rel=1e-6)
    torch_layers, onnx_layers = weight_layers(from_torch), weight_layers(from_onnx)
    assert [op for op, _ in torch_layers] == [op for op, _ in onnx_layers]
    assert [v for _, v in torch_layers] == pytest.approx([v for _, v in onnx_layers], rel=1e-6)


def test_parity_for_the_sample_mlp() -> None:
    from_torch = analyse(SAMPLES / "mlp_state_dict.pt", ["1,16"], device="cpu",
                         torch_options=TorchOptions(model="sample_models.build:make_mlp"))  # fmt: skip
    from_onnx = analyse(SAMPLES / "mlp.onnx", ["1,16"], device="cpu")
    assert from_torch.upper_bound == pytest.approx(from_onnx.upper_bound, rel=1e-6)
    assert [layer.name for layer in from_torch.layers] == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize(("onnx_name", "torch_name", "args"), [
    ("resnet_small.onnx", "resnet_small.pt2", []),
    ("cnn_bn.onnx", "cnn_bn_module.pt", ["--trust-pickle"]),
])  # fmt: skip
def test_parity_with_written_out_activations(onnx_name: str, torch_name: str, args: list[str]) -> None:
    """ONNX writes GELU and SiLU out as several ops; lipcheck recognises them with a 1e-4 margin that the
    PyTorch graph (one gelu / silu op) does not need. Every weight layer agrees to 1e-6."""
    shapes, options = _report_args(args)
    from_torch = analyse(SAMPLES / torch_name, [IMG], device="cpu", torch_options=options)
    from_onnx = analyse(SAMPLES / onnx_name, [IMG], device="cpu")
    assert from_torch.upper_bound <= from_onnx.upper_bound <= from_torch.upper_bound * (1 + 2e-4)
    t = [(layer.op, layer.lipschitz) for layer in from_torch.layers if layer.op in ("Conv", "Gemm")]
    o = [(layer.op, layer.lipschitz) for layer in from_onnx.layers if layer.op in ("Conv", "Gemm")]
    t, o = sorted(t), sorted(o)  # exporters may order independent branches differently
    assert [op for op, _ in t] == [op for op, _ in o]
    assert [v for _, v in t] == pytest.approx([v for _, v in o], rel=1e-6)


# ---------------------------------------------------------------------- functional and method forms


def _max_ratio(module: nn.Module, shape: tuple[int, ...], pairs: int = 200) -> float:
    """Largest ||f(x)-f(y)|| / ||x-y|| over random and nearby pairs (a lower bound on the true constant)."""
    gen = torch.Generator().manual_seed(5)
    worst = 0.0
    with torch.no_grad():
        for i in range(pairs):
            x = torch.randn(shape, generator=gen) * 2
            y = x + torch.randn(shape, generator=gen) * (1e-3 if i % 2 else 1.0)
            worst = max(worst, float((module(x) - module(y)).norm() / (x - y).norm()))
    return worst


def test_functional_and_method_forms_are_mapped_and_sound() -> None:
    net = FunctionalForms().eval()
    result = composed(module_to_graph(net, ["2,3,8,8"], "functional"))
    assert result.bounded
    ops = {layer.op for layer in result.layers}
    assert {"Conv", "Relu", "AveragePool", "Sigmoid", "Gemm", "Concat", "Transpose", "Slice", "Clip"} <= ops
    assert _max_ratio(net, (2, 3, 8, 8)) <= result.upper_bound


def test_functional_conv_equals_module_conv() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)

    class Functional(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)

    as_module = composed(module_to_graph(nn.Sequential(conv), [IMG], "m"))
    as_function = composed(module_to_graph(Functional(), [IMG], "f"))
    assert as_module.upper_bound == pytest.approx(as_function.upper_bound, rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_bound_is_sound_on_random_pairs(seed: int) -> None:
    torch.manual_seed(seed)
    net = ParityNet(width=4 + seed)
    result = composed(module_to_graph(net, [IMG], "net"))
    assert _max_ratio(net, (1, 3, 16, 16), pairs=100) <= result.upper_bound


# ---------------------------------------------------------------------- state_dict without architecture


def test_state_dict_without_model_reports_each_weight() -> None:
    report = analyse(SAMPLES / "mlp_state_dict.pt", device="cpu")
    assert report.scope == "weights" and not report.bounded and report.upper_bound is None
    state = torch.load(SAMPLES / "mlp_state_dict.pt", weights_only=True)
    assert [layer.name for layer in report.layers] == ["0", "2", "4"]
    for layer in report.layers:
        exact = torch.linalg.matrix_norm(state[f"{layer.name}.weight"].double(), 2).item()
        assert exact <= layer.lipschitz <= exact * (1 + 1e-8)
    assert report.to_dict()["scope"] == "weights"


def test_conv_weight_norm_holds_for_every_geometry(tmp_path: Path) -> None:
    """A bare conv kernel's bound dominates the real operator for strides, paddings and sizes."""
    torch.manual_seed(4)
    weight = torch.randn(4, 3, 3, 3)
    torch.save({"conv.weight": weight}, tmp_path / "conv.pt")
    report = analyse(tmp_path / "conv.pt", device="cpu")
    bound = report.layers[0].lipschitz
    for stride, padding, size in [(1, 1, 8), (2, 1, 9), (1, 0, 7), (1, 2, 6)]:
        n = 3 * size * size
        eye = torch.eye(n, dtype=torch.float64).reshape(n, 3, size, size)
        jac = F.conv2d(eye, weight.double(), stride=stride, padding=padding).reshape(n, -1)
        assert torch.linalg.matrix_norm(jac, 2).item() <= bound


def test_wrapper_prefixes_are_stripped() -> None:
    t = torch.zeros(1)
    assert set(strip_wrapper_prefixes({"module._orig_mod.a.weight": t, "module._orig_mod.b": t})) == {"a.weight", "b"}
    assert set(strip_wrapper_prefixes({"module.a": t, "b": t})) == {"module.a", "b"}  # not every key: kept


# ---------------------------------------------------------------------- pickle safety


class _WritesAFile:
    """Unpickling this object runs os.system: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2, 2)}, "payload": _WritesAFile(marker)}, evil)
    code, out, err = run_cli(capsys, "report", str(evil))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "refused to unpickle" in err and "--trust-pickle" in err
    assert "system" in err  # names what it would have imported (posix.system / nt.system)
    assert not marker.exists()
    with pytest.raises(UntrustedPickleError):
        load_torch(evil)
    assert not marker.exists()


def test_plain_pickle_with_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"weights": _WritesAFile(marker)}))
    with pytest.raises(UntrustedPickleError, match="system"):
        load_torch(evil)
    assert not marker.exists()
    assert any(name.endswith(".system") for name in pickle_globals(evil.read_bytes()))


def test_pt2_with_a_malicious_embedded_pickle_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """torch.export.load falls back to weights_only=False for the sample inputs: lipcheck checks them first."""
    import zipfile

    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save((_WritesAFile(marker),), payload)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(SAMPLES / "resnet_small.pt2") as source, zipfile.ZipFile(evil, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            target.writestr(item, payload.getvalue() if "/data/sample_inputs/" in item.filename else data)
    code, _, err = run_cli(capsys, "report", str(evil))
    assert code == 2 and "refused to unpickle" in err and "system" in err and "--trust-pickle" in err
    assert not marker.exists()


def test_pickled_module_needs_trust(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "report", str(SAMPLES / "cnn_bn_module.pt"), "-s", IMG)
    assert code == 2 and "torch.nn.modules.conv.Conv2d" in err and "--trust-pickle" in err
    code, out, _ = run_cli(capsys, "report", str(SAMPLES / "cnn_bn_module.pt"), "-s", IMG, "--trust-pickle")
    assert code == 0 and "Certified upper bound" in out


# ---------------------------------------------------------------------- failure modes: one line, exit 2


FAILURES = [
    (["mlp_state_dict.pt", "--model", "tests.torch_nets:nope", "-s", "1,16"], "has no attribute 'nope'"),
    (["mlp_state_dict.pt", "--model", "no_such_pkg.nets:make", "-s", "1,16"], "cannot import 'no_such_pkg.nets'"),
    (["mlp_state_dict.pt", "--model", "tests.torch_nets", "-s", "1,16"], "expected 'package.module:factory'"),
    (["mlp_state_dict.pt", "--model", "tests.torch_nets:broken_factory", "-s", "1,16"], "failed on purpose"),
    (["mlp_state_dict.pt", "--model", "tests.torch_nets:not_a_module", "-s", "1,16"], "not a torch.nn.Module"),
    (["mlp_state_dict.pt", "--model", "tests.torch_nets:make_parity_net", "-s", IMG], "do not fit --model"),
    (["mlp_state_dict.pt", "--model", "sample_models.build:make_mlp", "--model-kwargs", "{oops", "-s", "1,16"],
     "--model-kwargs: not valid JSON"),
    (["mlp_state_dict.pt", "--model", "sample_models.build:make_mlp", "--model-kwargs", "[1]", "-s", "1,16"],
     "expected a JSON object"),
    (["mlp_state_dict.pt", "--model", "sample_models.build:make_mlp"], "--input-shape"),
    (["mlp_state_dict.pt", "--model", "sample_models.build:make_mlp", "-s", "1,15"], "does not run on --input-shape"),
    (["resnet_small_ts.pt"], "--input-shape"),
    (["resnet_small_ts.pt", "-s", IMG, "--model", RESNET], "carries its own graph"),
    (["resnet_small.pt2", "-s", "1,4,16,16"], "does not run on --input-shape"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), FAILURES)
def test_failures_are_one_clear_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "report", str(SAMPLES / args[0]), *args[1:])
    assert code == 2, err
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("lipcheck: error: ") and message in err, err


def test_wrong_keys_are_listed(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "report", str(SAMPLES / "mlp_state_dict.pt"), "--model",
                           "tests.torch_nets:make_parity_net", "-s", IMG)  # fmt: skip
    assert code == 2
    assert "missing 19: bn1.bias" in err and "unexpected 6: 0.bias, 0.weight" in err


def test_unsupported_module_names_the_op(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cummax.pt"
    torch.save(WithCummax().state_dict(), path)
    code, _, err = run_cli(capsys, "report", str(path), "--model", "tests.torch_nets:WithCummax", "-s", "1,4")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "aten.cummax" in err


def test_garbage_and_empty_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02not really a pickle" * 3)
    empty = tmp_path / "empty.pth"
    empty.touch()
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    for path, message in [(garbage, "not a readable PyTorch file"), (empty, "file is empty"),
                          (text, "not a readable PyTorch file")]:  # fmt: skip
        code, _, err = run_cli(capsys, "report", str(path))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_checkpoint_without_weights_lists_its_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "notes": "nothing here"}, path)
    code, _, err = run_cli(capsys, "report", str(path))
    assert code == 2 and "'epoch'" in err and "model_state_dict" in err


# ---------------------------------------------------------------------- the CLI end to end


def test_cli_reads_a_checkpoint_with_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "report", str(SAMPLES / "resnet_small_ckpt.pt"), "--model", RESNET, "-s", IMG,
                             "--format", "json")  # fmt: skip
    assert code == 0, err
    import json

    data = json.loads(out)
    assert data["scope"] == "network" and data["bounded"]
    assert data["layers"][0]["name"] == "stem.0"


def test_cli_weights_only_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "report", str(SAMPLES / "mlp_state_dict.pt"))
    assert code == 0
    assert "No network bound" in out and "--model" in out


def test_pt2_input_shape_reexports_at_the_new_size() -> None:
    small = analyse(SAMPLES / "resnet_small.pt2", device="cpu")
    large = analyse(SAMPLES / "resnet_small.pt2", ["3,3,16,16"], device="cpu")  # the batch axis is dynamic
    assert small.input_shapes != large.input_shapes
    assert large.layers[0].input_shape == (3, 3, 16, 16)
    assert [layer.name for layer in large.layers] == [layer.name for layer in small.layers]


def test_model_kwargs_reach_the_factory(tmp_path: Path) -> None:
    net = make_parity_net(width=3, classes=2)
    path = tmp_path / "w.pth"
    torch.save({"model": net.state_dict(), "epoch": 1}, path)
    report = analyse(path, [IMG], device="cpu", torch_options=TorchOptions(
        model="tests.torch_nets:make_parity_net", model_kwargs='{"width": 3, "classes": 2}'))  # fmt: skip
    assert report.layers[-1].output_shape == (1, 2)


def test_no_stray_output_from_torch(capsys: pytest.CaptureFixture[str]) -> None:
    """torch.export and the TorchScript converter warn and log; none of it reaches the user."""
    code, out, err = run_cli(capsys, "report", str(SAMPLES / "resnet_small_ts.pt"), "-s", IMG, "-f", "json")
    assert code == 0 and err == "" and out.lstrip().startswith("{")


def test_numpy_constants_are_float32_like_onnx() -> None:
    graph = load_graph(SAMPLES / "resnet_small.pt2")
    weights = [v for v in graph.constants.values() if v.ndim == 4]
    assert weights and all(v.dtype == np.float32 for v in weights)


def test_check_config_takes_the_pytorch_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "lipcheck.toml"
    config.write_text(f"""
[[models]]
path = "{SAMPLES / "resnet_small_ckpt.pt"}"
model = "{RESNET}"
input_shape = "{IMG}"
fail_above = 100

[[models]]
path = "{SAMPLES / "cnn_bn_module.pt"}"
trust_pickle = true
input_shape = "{IMG}"

[[models]]
path = "{SAMPLES / "mlp_state_dict.pt"}"
model = "sample_models.build:make_mlp"
model_kwargs = {{ unexpected = 1 }}
input_shape = "1,16"
""")
    code, out, err = run_cli(capsys, "check", "--config", str(config))
    lines = out.strip().splitlines()
    assert code == 2, out + err
    assert lines[0].startswith("PASS") and "1.57576" in lines[0]
    assert lines[1].startswith("OK") and "0.478668" in lines[1]  # the ECLipsE-Fast chain bound
    assert lines[2].startswith("ERROR") and "unexpected keyword argument" in lines[2]


@pytest.mark.parametrize(("key", "prefix"), [("state_dict_ema", "_orig_mod."), ("model_ema", "module._orig_mod."),
                                             ("model", "")])  # fmt: skip
def test_checkpoint_keys_and_wrapper_prefixes(key: str, prefix: str, tmp_path: Path) -> None:
    state = torch.load(SAMPLES / "mlp_state_dict.pt", weights_only=True)
    path = tmp_path / "ema.pth"
    torch.save({"epoch": 7, key: {prefix + k: v for k, v in state.items()}}, path)
    report = analyse(path, ["1,16"], device="cpu", torch_options=TorchOptions(model="sample_models.build:make_mlp"))
    reference = analyse(SAMPLES / "mlp.onnx", ["1,16"], device="cpu")
    assert report.upper_bound == pytest.approx(reference.upper_bound, rel=1e-6)


# ---------------------------------------------------------------------- the interpreter runs PyTorch graphs too

TORCH_SAMPLES = [
    ("resnet_small.pt2", [], TorchOptions()),
    ("resnet_small_ts.pt", [IMG], TorchOptions()),
    ("resnet_small_ckpt.pt", [IMG], TorchOptions(model=RESNET)),
    ("cnn_bn.safetensors", [IMG], TorchOptions(model="sample_models.build:make_cnn_bn")),
    ("cnn_bn_module.pt", [IMG], TorchOptions(trust_pickle=True)),
    ("mlp_state_dict.pt", ["1,16"], TorchOptions(model="sample_models.build:make_mlp")),
]


@pytest.mark.parametrize(("name", "shapes", "options"), TORCH_SAMPLES, ids=[s[0] for s in TORCH_SAMPLES])
def test_interpreter_matches_the_original_module(name: str, shapes: list[str], options: TorchOptions) -> None:
    """lipcheck's graph of a PyTorch file, run by lipcheck's interpreter, computes the module's outputs (1e-5)."""
    from lipcheck.interpret import interpret
    from lipcheck.rewrite.sources import load_runnable

    graph = load_model(SAMPLES / name, shapes, options)
    module = load_runnable(SAMPLES / name, options)
    shape = tuple(d for d in graph.shapes[graph.inputs[0]])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = module(x).double()
    got = interpret(graph, dtype=torch.float64)(x.double())
    got = got[0] if isinstance(got, tuple) else got
    assert torch.linalg.vector_norm(got - expected) <= 1e-5 * torch.linalg.vector_norm(expected)


def test_interpreter_matches_functional_forms() -> None:
    from lipcheck.interpret import interpret

    net = FunctionalForms().eval()
    graph = module_to_graph(net, ["2,3,8,8"], "functional")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = net(x).double()
    got = interpret(graph)(x.double())
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


class _BuildsConstants(nn.Module):
    """A tensor created in forward (like a positional encoding) is a constant, not an unmapped op."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = torch.arange(4, dtype=x.dtype) * 0.5 + torch.ones(4)
        return self.fc(x) * 2.0 + offset


def test_tensors_built_in_forward_are_constants() -> None:
    net = _BuildsConstants().eval()
    result = composed(module_to_graph(net, ["1,4"], "consts"))
    exact = 2.0 * torch.linalg.matrix_norm(net.fc.weight.detach().double(), 2).item()
    assert result.upper_bound == pytest.approx(exact, rel=1e-6) and result.upper_bound >= exact


def test_dropout_in_training_mode_is_refused(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(net, (torch.randn(1, 4),))
    from lipcheck.errors import ModelLoadError
    from lipcheck.frontends.torch_frontend import program_to_graph

    with pytest.raises(ModelLoadError, match="training mode"):
        program_to_graph(program, "train.pt2")
