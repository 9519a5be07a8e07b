#!/usr/bin/env bash
# The GPU checks of issue 7 in one call: CUDA tests, conv norms on the device against the CPU, and the
# end-to-end report with --device cuda. Run from the repository root on a machine with CUDA; logs go
# to $OUT (or ./gpu-logs). Each step has its own time limit so one slow step cannot hide the others.
#
#     bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NO_COLOR=1
step() {  # step SECONDS NAME COMMAND...: run, log to $OUT/NAME.log, print its tail
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name: exit $? ($(date +%T))"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, onnx, onnxruntime; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0), 'threads', torch.get_num_threads(), 'onnx', onnx.__version__)"

step 240 cuda_tests python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -x
tail -n 15 "$OUT/cuda_tests.log"

step 240 conv_norms python3 benchmarks/conv_norms.py --device cuda --skip sedghi --repeats 5 --compare-cpu \
    --per-layer --profile 12
grep -A 12 "^Conv operator norms" "$OUT/conv_norms.log"
grep -B 2 -A 14 "by self_cuda_time_total" "$OUT/conv_norms.log" | head -32

step 180 e2e python3 benchmarks/resnet50_e2e.py --folder /tmp/lipcheck-bench -- --device cuda
tail -n 14 "$OUT/e2e.log"
