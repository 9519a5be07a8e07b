"""Every sample model's JSON report, for every ``--method``, against reports saved before the op-family redesign.

The redesign (op package, one walker, options declared once, the pipeline) must not change a single number:
reports are compared exactly, all but ``lipcheck_version``, and floats to 1e-9 relative: the last bits of FFTs
and eigensolvers differ between CPUs (an AMD EPYC box gives 1.8558548052642718 where the machine that saved
them gave ...723), and LipSDP's solver by ~3e-11. ``LIPCHECK_UPDATE_GOLDEN=1`` rewrites the files
(and fails, so that an update is never mistaken for a pass); do that only for a change that is meant to
change reports, and say so in its commit.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from lipcheck.frontends.torch_frontend import TorchOptions
from lipcheck.pipeline import analyse
from tests.conftest import SAMPLES
from tests.golden_files import GOLDEN, write_or_compare_json

METHODS = ("best", "product", "folded", "combettes-pesquet", "eclipse-fast", "lipsdp", "all")
SHAPE = ["1,3,16,16"]
# sample file -> the options a user gives for it (README, sample_models/README.md)
CASES: dict[str, dict[str, Any]] = {
    "mlp.onnx": {},
    "mlp_dynamo.onnx": {},
    "cnn_bn.onnx": {},
    "cnn_dynamo.onnx": {},
    "cnn_external.onnx": {},
    "digits_mlp.onnx": {},
    "digits_cnn.onnx": {},
    "gated.onnx": {},
    "resnet_small.onnx": {},
    "resnet_small.pt2": {},
    "resnet_small_ts.pt": {"input_shapes": SHAPE},
    "resnet_small_ckpt.pt": {"input_shapes": SHAPE, "torch_options": TorchOptions("sample_models.build:ResNetSmall")},
    "resnet_small.ckpt": {"input_shapes": SHAPE, "torch_options": TorchOptions("sample_models.build:ResNetSmall")},
    "cnn_bn.safetensors": {"input_shapes": SHAPE, "torch_options": TorchOptions("sample_models.build:make_cnn_bn")},
    "cnn_bn_module.pt": {"input_shapes": SHAPE, "torch_options": TorchOptions(trust_pickle=True)},
    "mlp_state_dict.pt": {},
    "mlp_state_dict.pt+model": {
        "input_shapes": ["1,16"],
        "torch_options": TorchOptions("sample_models.build:make_mlp"),
    },
}
REPORTS = GOLDEN / "reports"


def test_every_sample_model_is_covered() -> None:
    shipped = {p.name for p in SAMPLES.iterdir() if p.suffix in (".onnx", ".pt", ".pt2", ".ckpt", ".safetensors")}
    assert shipped == {case.partition("+")[0] for case in CASES}


# LipSDP (and 'all', which includes it) take 15 s a model, and 'best' computes every cheap method (its golden holds
# their network bounds in method_bounds): the single-method goldens run with -m slow, outside the CI budget
SLOW_METHODS = ("folded", "combettes-pesquet", "eclipse-fast", "lipsdp", "all")


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW_METHODS else m for m in METHODS]
)
@pytest.mark.parametrize("case", sorted(CASES))
def test_reports_unchanged(case: str, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(SAMPLES.parent)  # --model imports sample_models.build relative to the working folder
    report = analyse(SAMPLES / case.partition("+")[0], device="cpu", method=method, **CASES[case]).to_dict()
    report.pop("lipcheck_version")
    write_or_compare_json(REPORTS / f"{case}.{method}.json", json.dumps(report, indent=1, sort_keys=True) + "\n")
