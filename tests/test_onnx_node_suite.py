"""A deterministic sample of the ONNX backend node suite (``benchmarks/onnx_node_suite.py``).

On every sampled model lipcheck must not crash, no certified bound may be beaten by a difference quotient
measured with onnxruntime, and lipcheck's interpreter must reproduce the test's expected outputs (or refuse
cleanly). Models that fail today are marked ``xfail(strict=True)`` with the mechanism from issue 14, so
the test flips when a fix lands. The full run over all ~2,000 models is the benchmark script.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from benchmarks import onnx_node_suite as suite

pytestmark = [pytest.mark.onnx_node_suite, pytest.mark.slow]  # 25 s: the peer suite runs with -m slow

# `python benchmarks/onnx_node_suite.py --sample 40 --seed 14 --list` with onnx 1.23.2, frozen here so that
# collecting this module costs nothing; a name a later onnx lacks is skipped.
SAMPLE = [
    "node/test_attention_4d_attn_mask_4d_expanded",
    "node/test_attention_4d_softcap_expanded",
    "node/test_attention_4d_with_qk_matmul_softcap_expanded",
    "node/test_bitcast_int64_to_float64",
    "node/test_bitshift_right_int32_shift_ge_width",
    "node/test_castlike_FLOAT8E4M3FN_to_FLOAT_expanded",
    "node/test_castlike_UINT2_to_FLOAT_expanded",
    "node/test_castlike_no_saturate_FLOAT_to_FLOAT8E4M3FNUZ",
    "node/test_causal_conv_with_state_basic_expanded",
    "node/test_causal_conv_with_state_kernel_size_one_expanded",
    "node/test_causal_conv_with_state_with_past_state_expanded",
    "node/test_clip_outbounds",
    "node/test_concat_3d_axis_negative_2",
    "node/test_cos",
    "node/test_elu_default",
    "node/test_equal",
    "node/test_gelu_tanh_2_expanded",
    "node/test_gemm_default_scalar_bias",
    "node/test_l1normalization_axis_1",
    "node/test_layer_normalization_4d_axis0",
    "node/test_logsoftmax_large_number",
    "node/test_lstm_defaults",
    "node/test_pow_types_float32_int32",
    "node/test_quantizelinear_uint2",
    "node/test_range_bfloat16_type_positive_delta",
    "node/test_reduce_l2_keep_dims_random",
    "node/test_reduce_log_sum_empty_set_expanded",
    "node/test_reduce_prod_do_not_keepdims_random",
    "node/test_regex_full_match_basic",
    "node/test_rms_normalization_3d_axis0_epsilon",
    "node/test_rms_normalization_3d_axis1_epsilon",
    "node/test_rotary_embedding_no_position_ids_interleaved_expanded",
    "node/test_sce_NCd1d2d3d4d5_none_no_weight_log_prob",
    "node/test_selu_expanded_ver18",
    "node/test_sequence_map_extract_shapes",
    "node/test_sub_uint16",
    "node/test_sum_example",
    "node/test_tril_square",
    "node/test_unique_sorted_with_axis",
    "pytorch-converted/test_ELU",
]

# Models the full run found interesting: one per unsound mechanism, and sound ones that test the
# instrument's float tolerance (rounding near 0, float16 casts, NaN in the test data, tight linear bounds).
INTERESTING = [
    "node/test_affine_grid_2d_expanded",
    "node/test_training_dropout",
    "node/test_cast_FLOAT_to_FLOAT8E4M3FN",
    "node/test_cast_FLOAT_to_INT4",
    "node/test_castlike_FLOAT16_to_FLOAT8E5M2",
    "node/test_constant_pad",
    "node/test_reduce_mean_keepdims_example",
    "node/test_resize_upsample_sizes_nearest_ceil_half_pixel",
    "node/test_maxpool_with_argmax_2d_precomputed_strides",
    "node/test_celu",
    "node/test_cast_FLOAT_to_FLOAT16",
    "node/test_cast_FLOAT16_to_FLOAT",
    "node/test_softplus",
    "pytorch-converted/test_Conv2d",
    "pytorch-operator/test_operator_maxpool",
    "simple/test_single_relu_model",
    "node/test_cast_BFLOAT16_to_FLOAT",
    "node/test_l2normalization_axis_0",
    "node/test_spacetodepth_crd_mode_example",
    "node/test_upsample_nearest",
    "pytorch-converted/test_PReLU_1d_multiparam",
]

UNSOUND: dict[str, str] = {}  # model -> the mechanism by which its certified bound is below a measured quotient
PARITY: dict[str, str] = {}  # model -> why lipcheck's interpreter disagrees with the expected outputs today
CRASHES: dict[str, str] = {}

# max_runs binds before the seconds do, so the search (and each xfail) is the same on any machine
SETTINGS = suite.Settings(search_seconds=30.0, max_runs=2500, parity=True, seed=0)
NAMES = sorted(set(SAMPLE) | set(INTERESTING))


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every model once, through one worker process (the same path as the benchmark)."""
    available = set(suite.all_case_names())
    cases = suite.materialise([n for n in NAMES if n in available], tmp_path_factory.mktemp("node_suite"))
    return {record["name"]: record for record in suite.run_cases(cases, SETTINGS, workers=1, timeout=60)}


def _record(records: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    if name not in records:
        pytest.skip(f"{name} is not among this onnx's backend test models")
    return records[name]


def _marked(names: list[str], known: dict[str, str]) -> list[Any]:
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=known[n])) if n in known else n for n in names]


@pytest.mark.parametrize("name", _marked(NAMES, CRASHES))
def test_lipcheck_does_not_crash(records: dict[str, dict[str, Any]], name: str) -> None:
    record = _record(records, name)
    assert record["status"] in ("bounded", "unbounded", "refused", "load_error"), record


@pytest.mark.parametrize("name", _marked(NAMES, UNSOUND))
def test_no_quotient_beats_the_bound(records: dict[str, dict[str, Any]], name: str) -> None:
    record = _record(records, name)
    measurement = record.get("measurement", {})
    assert not measurement.get("unsound"), (record["bound"], measurement)


@pytest.mark.parametrize("name", _marked(NAMES, PARITY))
def test_interpreter_matches_expected_outputs(records: dict[str, dict[str, Any]], name: str) -> None:
    parity = _record(records, name).get("parity", {})
    assert parity.get("status") not in suite.PARITY_FAILURES, parity


def test_sample_measures_bounds(records: dict[str, dict[str, Any]]) -> None:
    """The sample exercises the instrument: bounded models are measured, with tight quotients among them."""
    measured = [r["measurement"] for r in records.values() if r.get("measurement", {}).get("status") == "measured"]
    assert len(measured) >= 12
    assert sum(m["ratio"] is not None and m["ratio"] > 0.999 for m in measured) >= 5


# ---------------------------------------------------------------------------------------------
# The instrument itself, on models whose constants are known (no lipcheck involved)


def _model(node: onnx.NodeProto, out_type: int = TensorProto.FLOAT) -> suite.TestData:
    """One node on a 2x3 float input, with its test data (the expected outputs are not needed)."""
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", out_type, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = np.linspace(-1.5, 1.3, 6, dtype=np.float32).reshape(2, 3)
    return suite.TestData(model, {"x": x}, {}, {"x": TensorProto.FLOAT})


@pytest.mark.parametrize(("bound", "unsound"), [(1.0, False), (0.99, True)])
def test_measure_finds_a_bound_one_percent_low(bound: float, unsound: bool) -> None:
    data = _model(helper.make_node("LeakyRelu", ["x"], ["y"], alpha=-1.0))  # |x|: constant exactly 1
    result = suite.measure(data, bound, seconds=10, max_runs=3000)
    assert result["status"] == "measured" and result["unsound"] is unsound, result


def test_measure_finds_a_step() -> None:
    """Rounding to an integer type is not Lipschitz: a bound of 1 is beaten by far."""
    data = _model(helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT8), TensorProto.INT8)
    result = suite.measure(data, 1.0, seconds=10, max_runs=3000)
    assert result["unsound"] and result["evidence"] > 100, result
