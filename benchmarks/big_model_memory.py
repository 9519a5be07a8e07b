"""A model larger than the memory budget: ``lipcheck report --max-memory 2GiB`` on ~3.5 GiB of weights.

Writes an ONNX model whose weights are ONNX external data (one ``.data`` file, written chunk by chunk
so this script never holds more than one tensor) into a temporary folder: a chain of dense layers
x[1, 256] -> MatMul [256, 65536] -> Relu -> MatMul [65536, 256] -> Relu -> ... (64 MiB per matrix,
float32, random from a fixed seed). Then it runs, in a subprocess, ``python -m lipcheck report MODEL
--format json --max-memory BUDGET`` and prints the child's peak RSS (``getrusage(RUSAGE_CHILDREN)``)
against the weights' size and the budget (target: peak RSS under 2 GiB), and how long it took. The
folder is deleted at the end (``--keep`` keeps it).

    python benchmarks/big_model_memory.py [--pairs 28] [--budget 2GiB] [--folder DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
WIDE, NARROW = 65536, 256


def write_model(folder: Path, pairs: int) -> tuple[Path, int]:
    """The model and its external data file; returns (path, weight bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    data_name = "big.onnx.data"
    rng = np.random.default_rng(0)
    initializers, nodes = [], []
    offset = 0
    value = "x"
    with open(folder / data_name, "wb") as data:
        for i in range(2 * pairs):
            shape = (NARROW, WIDE) if i % 2 == 0 else (WIDE, NARROW)
            weight = rng.standard_normal(shape, dtype=np.float32)
            weight *= np.float32(1 / np.sqrt(shape[0]))
            raw = weight.tobytes()
            data.write(raw)
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=list(shape))
            tensor.data_location = TensorProto.EXTERNAL
            for key, item in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, item
            offset += len(raw)
            initializers.append(tensor)
            nodes.append(helper.make_node("MatMul", [value, f"w{i}"], [f"m{i}"], name=f"dense{i}"))
            nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"))
            value = f"r{i}"
            del weight, raw
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, NARROW])],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT, [1, NARROW])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "big.onnx"
    with open(path, "wb") as handle:
        handle.write(model.SerializeToString())
    return path, offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=28, help="pairs of 64 MiB matrices (default 28: 3.5 GiB)")
    parser.add_argument("--budget", default="2GiB", help="--max-memory for lipcheck (default 2GiB)")
    parser.add_argument("--folder", type=Path, default=None, help="where to write (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the model files")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="lipcheck-big-"))
    need = args.pairs * 2 * NARROW * WIDE * 4
    free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    if free < need * 1.2:
        raise SystemExit(f"not enough disk in {folder}: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed")
    try:
        path, weight_bytes = write_model(folder, args.pairs)
        print(
            f"model: {path} + external data, {weight_bytes / 2**30:.2f} GiB of weights "
            f"({2 * args.pairs} matrices of {NARROW * WIDE * 4 / 2**20:.0f} MiB)"
        )
        command = [
            sys.executable,
            "-m",
            "lipcheck",
            "report",
            str(path),
            "--format",
            "json",
            "--max-memory",
            args.budget,
            "--device",
            "cpu",
        ]
        wrapper = (
            "import resource, subprocess, sys, time, json\n"
            "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "json.dump({'wall': time.perf_counter() - t, 'rc': p.returncode, 'out': p.stdout, 'err': p.stderr,\n"
            "           'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}, sys.stdout)\n"
        )
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        done = json.loads(
            subprocess.run(
                [sys.executable, "-c", wrapper, *command], capture_output=True, text=True, env=env, check=True
            ).stdout
        )
        if done["rc"] != 0:
            raise SystemExit(f"lipcheck failed ({done['rc']}): {done['err'][-2000:]}")
        report = json.loads(done["out"])
        rss = done["rss"]
        print(
            f"lipcheck report --max-memory {args.budget}: {done['wall']:.1f} s, {len(report['layers'])} layers, "
            f"upper bound {report['upper_bound']:.6g}"
        )
        print(
            f"peak RSS {rss / 2**30:.2f} GiB = {rss / weight_bytes:.2f}x the weights "
            f"(target < 2 GiB: {'met' if rss < 2 * 2**30 else 'NOT met'})"
        )
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            print(f"deleted {folder}")


if __name__ == "__main__":
    main()
