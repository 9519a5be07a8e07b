"""Soundness on every shipped sample model: no input pair may beat the certified bound."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from lipcheck.pipeline import analyse
from tests.conftest import SAMPLE_MODELS, SAMPLES


def _session(name: str) -> tuple[ort.InferenceSession, str, list[int]]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(SAMPLES / name), options, providers=["CPUExecutionProvider"])
    meta = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in meta.shape]
    return session, meta.name, shape


def _ratios(session: ort.InferenceSession, input_name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    fx = session.run(None, {input_name: x.astype(np.float32)})[0].astype(np.float64)
    fy = session.run(None, {input_name: y.astype(np.float32)})[0].astype(np.float64)
    # each batch element is one sample: the bound is per sample
    num = np.linalg.norm((fx - fy).reshape(len(x), -1), axis=1)
    den = np.linalg.norm(
        (x.astype(np.float32).astype(np.float64) - y.astype(np.float32).astype(np.float64)).reshape(len(x), -1), axis=1
    )
    return num / den


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_no_pair_exceeds_the_bound(name: str) -> None:
    report = analyse(SAMPLES / name, device="cpu")
    session, input_name, shape = _session(name)
    if report.upper_bound is None:
        assert report.unbounded_reasons, "an unbounded verdict must name its nodes"
        return
    rng = np.random.default_rng(0)
    batch = 64
    worst = 0.0
    for scale in (0.1, 1.0, 5.0):
        x = rng.normal(size=(batch, *shape[1:])) * scale
        far = rng.normal(size=x.shape) * scale
        near = x + 1e-2 * rng.normal(size=x.shape)
        for y in (far, near):
            worst = max(worst, float(_ratios(session, input_name, x, y).max()))
    for _ in range(3):  # adversarial pairs along the top singular vector of the local Jacobian
        x = rng.normal(size=(1, *shape[1:]))
        direction = _top_input_direction(session, input_name, x)
        pair = 1e-2 * direction.reshape(x.shape)
        worst = max(worst, float(_ratios(session, input_name, x - pair, x + pair).max()))
    # float32 evaluation noise on these pairs is far below this margin
    assert worst <= report.upper_bound * (1 + 1e-4), (worst, report.upper_bound)
    assert worst > 0.0


def _top_input_direction(session: ort.InferenceSession, input_name: str, x: np.ndarray) -> np.ndarray:
    """Top right singular vector of the Jacobian at x, by central differences (one batched run)."""
    n = x.size
    h = 1e-2
    basis = np.eye(n).reshape(n, *x.shape[1:]) * h
    plus = session.run(None, {input_name: (x + basis).astype(np.float32)})[0].astype(np.float64)
    minus = session.run(None, {input_name: (x - basis).astype(np.float32)})[0].astype(np.float64)
    jacobian = ((plus - minus).reshape(n, -1) / (2 * h)).T
    return np.linalg.svd(jacobian)[2][0]


def test_not_lipschitz_sample_names_its_nodes() -> None:
    report = analyse(SAMPLES / "gated.onnx", device="cpu")
    assert report.upper_bound is None
    ops = {reason.op for reason in report.unbounded_reasons}
    assert ops == {"Mul"}  # LayerNorm (epsilon > 0) is Lipschitz: only the product of two activations is named
    assert len(report.layers) == 9  # the table still lists every layer


def test_same_network_same_bound_across_exporters() -> None:
    """cnn_bn (TorchScript, BN folded by lipcheck) vs cnn_dynamo (BN folded by the exporter)."""
    a = analyse(SAMPLES / "cnn_bn.onnx", device="cpu").upper_bound
    b = analyse(SAMPLES / "cnn_dynamo.onnx", device="cpu").upper_bound
    c = analyse(SAMPLES / "cnn_external.onnx", device="cpu").upper_bound
    assert a == pytest.approx(b, rel=1e-6)
    assert a == c
    m1 = analyse(SAMPLES / "mlp.onnx", device="cpu").upper_bound
    m2 = analyse(SAMPLES / "mlp_dynamo.onnx", device="cpu").upper_bound
    assert m1 == pytest.approx(m2, rel=1e-9)
