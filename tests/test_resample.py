"""Resize and GridSample beyond the dense-Jacobian cases of test_rules: verdicts for moving grids, the bound
used for large sampling matrices, and the interpreter against the ONNX reference implementation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from lipcheck.compose import compose
from lipcheck.frontends import load_graph
from lipcheck.frontends.torch_frontend import module_to_graph
from lipcheck.interpret import interpret
from lipcheck.ops import resize
from lipcheck.passes import prepare
from lipcheck.pipeline import analyse
from tests.onnx_builders import Runner, model, node, ort_jacobian, save, sigma_max


def _analyse(path, shapes: list[str]):
    return analyse(path, input_shapes=shapes, device="cpu")


def test_grid_from_the_input_is_not_lipschitz_naming_the_node(tmp_path) -> None:
    nodes = [node("Tanh", ["g"], ["t"]), node("GridSample", ["x", "t"], ["y"], name="sampler")]
    path = save(model(nodes, {"x": (1, 1, 4, 4), "g": (1, 3, 3, 2)}, opset=16), tmp_path)
    report = _analyse(path, ["1,1,4,4", "1,3,3,2"])
    assert report.upper_bound is None
    assert [(r.node, r.op) for r in report.unbounded_reasons] == [("sampler", "GridSample")]
    assert "grid" in report.unbounded_reasons[0].reason


def test_constant_image_at_a_moving_grid_is_not_lipschitz(tmp_path) -> None:
    image = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    nodes = [node("GridSample", ["image", "g"], ["y"], name="sampler", mode="nearest")]
    path = save(model(nodes, {"g": (1, 3, 3, 2)}, initializers={"image": image}, opset=16), tmp_path)
    report = _analyse(path, ["1,3,3,2"])
    assert report.upper_bound is None and report.unbounded_reasons[0].node == "sampler"


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
def test_large_sampling_matrix_bound_holds(tmp_path, monkeypatch, mode: str) -> None:
    """Past the dense size, sqrt(||M||_1 ||M||_inf) of |M|: above the exact norm, and not far above it."""
    grid = np.random.default_rng(3).uniform(-1.2, 1.2, size=(2, 5, 6, 2)).astype(np.float32)
    nodes = [node("GridSample", ["x", "grid"], ["y"], mode=mode, padding_mode="reflection")]
    path = save(model(nodes, {"x": (2, 1, 4, 5)}, initializers={"grid": grid}, opset=16), tmp_path)
    exact = sigma_max(ort_jacobian(path, (2, 1, 4, 5)))
    monkeypatch.setattr(resize, "_DENSE_ENTRIES", 4)
    report = _analyse(path, ["2,1,4,5"])
    assert report.upper_bound is not None and exact * (1 - 1e-6) <= report.upper_bound <= 3 * exact
    assert not report.layers[0].exact


# cubic with border or reflection padding left out: the reference clamps the sampling point before taking its
# taps, onnxruntime (and torch) clamp each tap
ONE_D = [(m, p) for m in ("linear", "nearest") for p in ("zeros", "border", "reflection")] + [("cubic", "zeros")]


@pytest.mark.parametrize(("mode", "padding"), ONE_D)
def test_one_dimensional_grid_sample_matches_the_reference(tmp_path, mode: str, padding: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 6)).astype(np.float32)
    grid = rng.uniform(-1.2, 1.2, size=(2, 5, 1)).astype(np.float32)
    for align in (0, 1):
        attrs = {"mode": mode, "padding_mode": padding, "align_corners": align}
        proto = model([node("GridSample", ["x", "grid"], ["y"], **attrs)], {"x": x.shape, "grid": grid.shape}, opset=20)
        want = ReferenceEvaluator(proto).run(None, {"x": x, "grid": grid})[0]
        got = interpret(load_graph(save(proto, tmp_path))).run({"x": x, "grid": grid})["y"]
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-5, err_msg=str(attrs))


def test_upsample_bilinear_is_linear_resize(tmp_path) -> None:
    """Old Upsample's 'bilinear' is its linear mode: asymmetric interpolation, bounded like Resize's."""
    x = np.random.default_rng(1).normal(size=(1, 1, 3, 4)).astype(np.float32)
    paths = {}
    for mode in ("bilinear", "linear"):
        proto = model([node("Upsample", ["x"], ["y"], mode=mode, scales=[1.0, 1.0, 2.0, 1.5])], {"x": x.shape}, opset=7)
        paths[mode] = save(proto, tmp_path, f"{mode}.onnx")
    want = Runner(paths["linear"])(x)
    got = interpret(load_graph(paths["bilinear"])).run({"x": x})["y"].detach().numpy()
    np.testing.assert_allclose(got.reshape(-1), np.asarray(want).reshape(-1), rtol=1e-6, atol=1e-6)
    exact = sigma_max(ort_jacobian(paths["linear"], x.shape))
    for path in paths.values():
        assert _analyse(path, ["1,1,3,4"]).upper_bound == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize(("mode", "padding"), [("bilinear", "zeros"), ("nearest", "reflection"), ("bicubic", "border")])
def test_torch_grid_sample_with_a_grid_buffer(mode: str, padding: str) -> None:
    """F.grid_sample through the PyTorch frontend: the exact norm of the sampling matrix, torch's own Jacobian."""
    torch.manual_seed(0)

    class Sampler(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("grid", torch.rand(2, 5, 6, 2) * 2.4 - 1.2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.grid_sample(x, self.grid, mode=mode, padding_mode=padding, align_corners=True)

    net = Sampler().eval()
    graph = module_to_graph(net, ["2,1,4,4"], "sampler")
    prepare(graph)
    result = compose(graph)
    x = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: net.double()(v.reshape(x.shape)).reshape(-1), x.reshape(-1))
    assert result.upper_bound == pytest.approx(float(torch.linalg.matrix_norm(jac, ord=2)), rel=1e-5)


def _frozen_cases(tmp_path, word: str) -> list[tuple[str, Path, np.ndarray]]:
    """The ONNX backend models named ``word``, every input but the image made a constant (grid, roi, scales)."""
    from benchmarks import onnx_node_suite as suite

    names = [n for n in suite.all_case_names() if n.startswith("node/") and word in n]
    found = []
    for case in suite.materialise(names, tmp_path):
        folder = Path(case.directory)
        proto = onnx.load(folder / "model.onnx")
        data = sorted((folder / "test_data_set_0").glob("input_*.pb"))
        values = [numpy_helper.to_array(onnx.load_tensor(str(f))) for f in data]
        for index in range(len(values) - 1, 0, -1):
            proto.graph.initializer.append(numpy_helper.from_array(values[index], proto.graph.input[index].name))
            del proto.graph.input[index]
        found.append((case.name, save(proto, tmp_path, case.name.replace("/", "_") + ".onnx"), values[0]))
    return found


@pytest.mark.onnx_node_suite
@pytest.mark.parametrize("word", ["resize", "upsample", "gridsample"])
def test_backend_models_with_constant_parameters_get_the_exact_norm(tmp_path, word: str) -> None:
    """Every Resize, Upsample and GridSample backend model, its grid or roi/scales made constants: the bound is
    onnxruntime's Jacobian norm (up to the rule's 1e-6 margin), never below it."""
    cases = _frozen_cases(tmp_path, word)
    assert cases
    for name, path, image in cases:
        report = _analyse(path, [",".join(map(str, image.shape))])
        exact = sigma_max(ort_jacobian(path, image.shape))
        assert report.upper_bound is not None, (name, report.unbounded_reasons)
        assert exact * (1 - 1e-6) <= report.upper_bound <= exact * (1 + 1e-5), name


@pytest.mark.parametrize(("size", "align"), [([2, 3, 4, 5], 0), ([1, 1, 3, 2], 1), ([2, 1, 2, 3, 4], 0)])
def test_affine_grid_is_linear_in_theta_with_the_base_grid_norm(size: list[int], align: int, tmp_path) -> None:
    """Against onnxruntime, and the exact norm against the dense Jacobian (theta is the variable)."""
    import onnxruntime as ort

    from lipcheck.pipeline import analyse
    from tests.jacobian import brute_force_norm

    d = len(size) - 2
    theta = np.random.default_rng(3).standard_normal((size[0], d, d + 1)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("AffineGrid", ["x", "size"], ["y"], align_corners=align)],
        "affine",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(theta.shape))],
        [onnx.ValueInfoProto(name="y")],
        [numpy_helper.from_array(np.array(size, np.int64), "size")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)])
    proto.ir_version = 10
    path = str(tmp_path / "affine.onnx")
    onnx.save(proto, path)
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": theta})[0]
    loaded = load_graph(path, [])
    assert np.allclose(interpret(loaded).run({"x": theta})["y"].numpy(), want, atol=1e-5)
    bound = analyse(path).upper_bound
    assert bound == pytest.approx(brute_force_norm(loaded, {"x": theta.astype(np.float64)}), rel=1e-9)


@pytest.mark.parametrize(("mode", "transform", "ratio"), [("avg", "half_pixel", 0), ("avg", "output_half_pixel", 2),
                                                          ("max", "half_pixel", 0)])  # fmt: skip
def test_roi_align_with_constant_regions(mode: str, transform: str, ratio: int, tmp_path) -> None:
    """Against onnxruntime; avg is linear with the exact norm, max is bounded above its Jacobian."""
    import onnxruntime as ort

    from lipcheck.pipeline import analyse
    from tests.jacobian import brute_force_norm

    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 2, 6, 7)).astype(np.float32)
    rois = np.array([[0.5, 1.0, 5.2, 4.4], [1.0, 0.0, 6.0, 5.5], [2.0, 2.0, 3.0, 3.5]], np.float32)
    attrs = {"output_height": 3, "output_width": 2, "spatial_scale": 0.9}
    node = onnx.helper.make_node(
        "RoiAlign",
        ["x", "rois", "b"],
        ["y"],
        mode=mode,
        sampling_ratio=ratio,
        coordinate_transformation_mode=transform,
        **attrs,
    )
    inits = [numpy_helper.from_array(rois, "rois"), numpy_helper.from_array(np.array([0, 1, 0], np.int64), "b")]
    graph = onnx.helper.make_graph(
        [node], "roi", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
        [onnx.ValueInfoProto(name="y")], inits,
    )  # fmt: skip
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 16)])
    proto.ir_version = 10
    path = str(tmp_path / "roi.onnx")
    onnx.save(proto, path)
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    loaded = load_graph(path, [])
    assert np.allclose(interpret(loaded).run({"x": x})["y"].numpy(), want, atol=1e-5)
    bound = analyse(path).upper_bound
    found = max(brute_force_norm(loaded, {"x": rng.standard_normal(x.shape)}) for _ in range(4))
    assert bound is not None and bound >= found * (1 - 1e-9)
    if mode == "avg":
        assert bound == pytest.approx(found, rel=1e-5)
