"""Invalid ONNX graphs are refused before analysis, in one line naming the node; what exporters write daily
(missing shapes, deprecated ops, other domains) is not."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from lipcheck.cli import main
from lipcheck.errors import ModelLoadError, UnsupportedOpsError
from lipcheck.frontends.onnx_checks import check_graph
from lipcheck.pipeline import analyse
from tests.conftest import SAMPLE_MODELS, SAMPLES
from tests.onnx_builders import model, node, save

W = np.eye(4, dtype=np.float32) * 2
TEN = np.array(10, np.float32)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    argv, sys.argv = sys.argv, ["lipcheck", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


INVALID = {
    # a = Relu(b), b = Gemm(a): walked as if the loop were not there (bound 0 before)
    "cycle": (model([node("Identity", ["b"], ["y"], name="after"), node("Relu", ["b"], ["a"], name="relu"),
                     node("Gemm", ["a", "w"], ["b"], name="gemm")], {"x": [1, 4]}, initializers={"w": W}),
              "the graph has a cycle: node 'gemm' (Gemm) waits on 'a'"),
    # two producers of h: the Gemm branch was silently dropped (bound 10 instead of 2 or more)
    "two producers": (model([node("Gemm", ["x", "w"], ["h"], name="g1"), node("Mul", ["x", "ten"], ["h"], name="m1"),
                             node("Relu", ["h"], ["y"], name="r")], {"x": [1, 4]}, initializers={"w": W, "ten": TEN}),
                      "node 'm1' (Mul) computes 'h', which node 'g1' (Gemm) already defines"),
    "overwrites an initializer": (model([node("Relu", ["x"], ["w"], name="r"), node("Gemm", ["x", "w"], ["y"])],
                                        {"x": [1, 4]}, initializers={"w": W}),
                                  "node 'r' (Relu) computes 'w', which an initializer already defines"),
    "overwrites the input": (model([node("Relu", ["x"], ["x"], name="r"), node("Relu", ["x"], ["y"])], {"x": [1, 4]}),
                             "node 'r' (Relu) computes 'x', which a graph input already defines"),
    # "weight is computed from the input" before
    "missing initializer": (model([node("Gemm", ["x", "w_missing"], ["y"], name="g")], {"x": [1, 4]}),
                            "node 'g' (Gemm) reads 'w_missing', which no node, graph input or initializer defines"),
    "output never computed": (model([node("Relu", ["x"], ["r"])], {"x": [1, 4]}, outputs=["y"]),
                              "graph output 'y' is not computed by any node"),
    "too many inputs": (model([node("Relu", ["x", "x"], ["y"], name="r")], {"x": [1, 4]}),
                        "node 'r' (Relu) has 2 inputs; Relu takes 1 to 1"),
    "empty required input": (model([node("Conv", ["x", ""], ["y"], name="c")], {"x": [1, 1, 4, 4]}),
                             "node 'c' (Conv) leaves its required input W empty"),
    "attribute of the wrong type": (model([node("Gemm", ["x", "w"], ["y"], name="g", transB=0.5)], {"x": [1, 4]},
                                          initializers={"w": W}),
                                    "node 'g' (Gemm) has attribute 'transB' of type FLOAT, not INT"),
    "misspelt attribute": (model([node("Conv", ["x", "k"], ["y"], name="c", dilation=[2, 2])], {"x": [1, 1, 6, 6]},
                                 initializers={"k": np.ones((1, 1, 3, 3), np.float32)}),
                           "node 'c' (Conv) has attribute 'dilation', which Conv does not take"),
    "missing required attribute": (model([node("Cast", ["x"], ["y"], name="cast")], {"x": [1, 4]}),
                                   "node 'cast' (Cast) lacks the required attribute 'to'"),
    # found by tests/test_fuzz.py: each crashed inside the analysis before
    "pads that do not fit": (model([node("Conv", ["x", "k"], ["y"], name="c", pads=[1, 1, 1])], {"x": [1, 1, 6, 6]},
                                   initializers={"k": np.ones((1, 1, 3, 3), np.float32)}),
                             "node 'c' (Conv): pads [1, 1, 1] does not fit a 2-D window"),
    "weight of the wrong rank": (model([node("Conv", ["x", "k"], ["y"], name="c", kernel_shape=[3, 3])],
                                       {"x": [1, 1, 6, 6]}, initializers={"k": np.ones((1, 1, 3), np.float32)}),
                                 "node 'c' (Conv): its weight has rank 3, not 4"),
}  # fmt: skip


def _untyped_attribute() -> onnx.ModelProto:
    proto = model([node("Gemm", ["x", "w"], ["y"], name="g", alpha=2.0)], {"x": [1, 4]}, initializers={"w": W})
    proto.graph.node[0].attribute[0].type = onnx.AttributeProto.UNDEFINED
    return proto


INVALID["attribute without a type"] = (_untyped_attribute(), "node 'g' (Gemm) has attribute 'alpha' of type UNDEFINED")


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_graphs_are_refused_in_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proto, message = INVALID[case]
    code, err = run_cli(capsys, "report", str(save(proto, tmp_path)), "--device", "cpu")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lipcheck: error: model.onnx: {message}"), err


def test_a_long_chain_is_checked_in_linear_time() -> None:
    """The cycle check is Kahn's algorithm over in-degrees, not a rescan per level (a 20k-node chain at once)."""
    chain = [node("Relu", [f"v{i}"], [f"v{i + 1}"], name=f"n{i}") for i in range(20_000)]
    proto = model([*chain[1:], chain[0]], {"v0": [1, 4]}, outputs=["v20000"])  # out of order on purpose
    check_graph(proto, "chain.onnx")
    cyclic = model([node("Relu", ["v20000"], ["v0"], name="back"), *chain], {"x": [1, 4]}, outputs=["v20000"])
    with pytest.raises(ModelLoadError, match="cycle: node 'back' \\(Relu\\) waits on 'v20000'"):
        check_graph(cyclic, "chain.onnx")


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_sample_models_pass(name: str) -> None:
    check_graph(onnx.load(str(SAMPLES / name), load_external_data=False), name)


def test_what_exporters_write_daily_is_not_refused(tmp_path: Path) -> None:
    """Outputs without shapes (the full checker refuses them), deprecated Upsample, initializers listed as
    inputs (IR < 4), nodes out of order, an op of another domain (reported as an op without a rule)."""
    upsample = model(
        [node("Upsample", ["x", "scales"], ["u"], mode="nearest"), node("Relu", ["u"], ["y"])],
        {"x": [1, 1, 2, 2]},
        initializers={"scales": np.array([1, 1, 2, 2], np.float32)},
        opset=10,
    )
    upsample.graph.input.append(helper.make_tensor_value_info("scales", onnx.TensorProto.FLOAT, [4]))
    upsample.graph.node.reverse()
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(upsample)
    assert analyse(save(upsample, tmp_path, "upsample.onnx"), device="cpu").upper_bound == pytest.approx(2.0)
    custom = model([node("FusedThing", ["x"], ["y"], domain="com.example")], {"x": [1, 4]},
                   extra_opsets={"com.example": 1})  # fmt: skip
    with pytest.raises(UnsupportedOpsError, match="com.example:FusedThing"):
        analyse(save(custom, tmp_path, "custom.onnx"), device="cpu")


def test_names_that_are_not_utf8_are_refused(tmp_path: Path) -> None:
    """protobuf hands such a name over as bytes, which crashed the table (found by the fuzz test)."""
    data = model([node("Relu", ["x"], ["y"], name="NODENAME")], {"x": [1, 4]}).SerializeToString()
    path = tmp_path / "model.onnx"
    path.write_bytes(data.replace(b"NODENAME", b"NODE\xf2AME"))
    with pytest.raises(ModelLoadError, match="the name b'NODE\\\\xf2AME' in the graph is not valid UTF-8"):
        analyse(path, device="cpu")


def test_unknown_external_data_keys_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """onnx only warns about them (a second stderr line) and then reads no file (found by the fuzz test)."""
    proto = onnx.load(str(SAMPLES / "cnn_external.onnx"), load_external_data=False)
    proto.graph.initializer[0].external_data[0].key = "locition"
    (tmp_path / "cnn_external.onnx.data").write_bytes((SAMPLES / "cnn_external.onnx.data").read_bytes())
    path = save(proto, tmp_path, "cnn_external.onnx")
    code, err = run_cli(capsys, "report", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "external data of '0.weight' has an unknown key 'locition'" in err
