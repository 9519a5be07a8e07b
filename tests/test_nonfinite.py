"""NaN or infinite weights are one-line errors naming the tensor and its node (exit 2), never a bound;
infinities where they are legitimate (attention masks, Clip without an upper bound) still get a bound."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lipcheck.cli import main
from lipcheck.errors import NonFiniteConstantError
from lipcheck.frontends.onnx_frontend import load_onnx_model, onnx_to_graph
from lipcheck.graph import LazyConstants, check_finite
from lipcheck.pipeline import analyse
from tests.conftest import ROOT
from tests.onnx_builders import model, node, rng_for, save


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    argv, sys.argv = sys.argv, ["lipcheck", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _conv(bad: float) -> onnx.ModelProto:
    weight = rng_for("nonfinite-conv").standard_normal((4, 3, 3, 3)).astype(np.float32)
    weight[1, 2, 0, 1] = bad
    return model([node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], {"x": [1, 3, 8, 8]},
                 initializers={"w": weight})  # fmt: skip


def _gemm(weight_value: float, bias_value: float) -> onnx.ModelProto:
    weight = rng_for("nonfinite-gemm").standard_normal((5, 4)).astype(np.float32)
    weight[2, 1] = weight_value
    bias = np.zeros(5, np.float32)
    bias[3] = bias_value
    return model([node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=1)], {"x": [1, 4]},
                 initializers={"w": weight, "b": bias})  # fmt: skip


CASES = [
    (_conv(np.nan), "'w' (an input of node 'conv', Conv) holds NaN"),  # was a finite "certified" bound
    (_conv(np.inf), "'w' (an input of node 'conv', Conv) holds an infinite value"),
    (_conv(-np.inf), "'w' (an input of node 'conv', Conv) holds an infinite value"),
    (_gemm(np.nan, 0.0), "'w' (an input of node 'gemm', Gemm) holds NaN"),  # was an internal error
    (_gemm(np.inf, 0.0), "'w' (an input of node 'gemm', Gemm) holds an infinite value"),
    (_gemm(1.0, np.nan), "'b' (an input of node 'gemm', Gemm) holds NaN"),
]


@pytest.mark.parametrize(("proto", "message"), CASES)
def test_non_finite_weights_are_one_line_errors(
    proto: onnx.ModelProto, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = save(proto, tmp_path)
    code, out, err = run_cli(capsys, "report", str(path), "--fail-above", "20", "--device", "cpu")
    assert code == 2 and out == "", err
    assert err.strip().splitlines() == [f"lipcheck: error: constant {message}; no bound can be certified from it"]


def test_legitimate_infinities_still_get_a_bound(tmp_path: Path) -> None:
    """-inf in an attention mask (added before Softmax) and Clip's infinite max are not weights."""
    mask = np.zeros((1, 4), np.float32)
    mask[0, 3] = -np.inf
    proto = model(
        [node("Add", ["x", "mask"], ["a"]), node("Softmax", ["a"], ["s"], axis=-1),
         node("Clip", ["s", "low", "high"], ["y"])],
        {"x": [1, 4]},
        initializers={"mask": mask, "low": np.array(0, np.float32), "high": np.array(np.inf, np.float32)},
    )  # fmt: skip
    report = analyse(save(proto, tmp_path), device="cpu")
    assert report.upper_bound == pytest.approx(0.5)


def _external(folder: Path, bad: float) -> Path:
    """A Conv -> Relu -> Conv model whose weights are external data above the eager threshold."""
    rng = rng_for("nonfinite-lazy")
    w1 = (rng.standard_normal((64, 32, 3, 3)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((48, 64, 3, 3)) * 0.1).astype(np.float32)
    w2[7, 5, 1, 1] = bad
    proto = model([node("Conv", ["x", "w1"], ["c1"], name="first", pads=[1, 1, 1, 1]), node("Relu", ["c1"], ["r"]),
                   node("Conv", ["r", "w2"], ["y"], name="second", pads=[1, 1, 1, 1])],
                  {"x": [1, 32, 8, 8]}, initializers={"w1": w1, "w2": w2})  # fmt: skip
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)  # fmt: skip
    return path


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_lazily_read_weights_are_checked_when_read_not_all_at_load(bad: float, tmp_path: Path) -> None:
    path = _external(tmp_path / "m", bad)
    graph = onnx_to_graph(load_onnx_model(path, load_weights=False), base_dir=path.parent)
    assert isinstance(graph.constants, LazyConstants) and graph.constants.loads == 0  # nothing read to check it
    with pytest.raises(NonFiniteConstantError, match="'w2' \\(an input of node 'second', Conv\\)"):
        analyse(path, device="cpu", max_memory=2**32)  # the test process itself may hold 1 GiB by now


def test_pytorch_weights_are_checked_in_every_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state_dict with --model, the same without (per-tensor norms), and a torch.export program."""
    monkeypatch.chdir(ROOT)  # --model imports relative to the working folder
    monkeypatch.syspath_prepend(str(ROOT))
    from sample_models.build import make_mlp

    net = make_mlp().eval()
    state = net.state_dict()
    state["2.weight"][3, 4] = float("nan")
    torch.save(state, tmp_path / "state.pt")
    net.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(net, (torch.randn(1, 16),)), tmp_path / "program.pt2")
    runs = [["state.pt", "--model", "sample_models.build:make_mlp", "-s", "1,16"], ["state.pt"], ["program.pt2"]]
    for args in runs:
        code, _, err = run_cli(capsys, "report", str(tmp_path / args[0]), *args[1:], "--device", "cpu")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "constant '2.weight'" in err and "holds NaN" in err, err


def test_the_check_reads_each_kind_of_value_as_it_should() -> None:
    check_finite("shape", np.array([1, -1]))  # integers are never refused
    check_finite("mask", np.array([0.0, -np.inf]))  # an infinity outside a weight is legitimate
    with pytest.raises(NonFiniteConstantError, match="infinite"):
        check_finite("w", np.array([0.0, -np.inf]), weight=True)
    with pytest.raises(NonFiniteConstantError, match="NaN"):
        check_finite("c", np.array([1.0, np.nan], dtype=np.float16))
