"""CPU time of ``lipcheck report`` on the same network from a state_dict (``--model``) and from its ONNX export.

Each command runs as a user runs it (a fresh process: imports included), ``--repeat`` times; the least CPU
time (user + system, of the child) is printed, with the ratio state_dict / ONNX. The target is 1.5x at most.
What the PyTorch path pays for on top: torch.export, whose first use imports torch._dynamo (about 0.8 s of
CPU here), and running the module once.

    python benchmarks/state_dict_vs_onnx.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds(args: list[str], repeat: int) -> float:
    best = float("inf")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = subprocess.run([sys.executable, "-m", "lipcheck", "report", *args, "--device", "cpu"],
                                capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            raise SystemExit(result.stderr)
        best = min(best, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    repeat = parser.parse_args().repeat
    sys.path.insert(0, str(ROOT))
    import torch

    from tests.torch_nets import ParityNet

    with tempfile.TemporaryDirectory() as folder:
        state, exported = Path(folder) / "parity.pt", Path(folder) / "parity.onnx"
        torch.save(ParityNet().state_dict(), state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(ParityNet(), (torch.randn(1, 3, 16, 16),), str(exported), dynamo=False, opset_version=17)
        pairs = {
            "ParityNet (tests/torch_nets.py)": (
                [str(exported)],
                [str(state), "--model", "tests.torch_nets:ParityNet", "-s", "1,3,16,16"],
            ),
            "ResNetSmall (sample_models)": (
                ["sample_models/resnet_small.onnx"],
                ["sample_models/resnet_small_ckpt.pt", "--model", "sample_models.build:ResNetSmall", "-s", "1,3,16,16"],
            ),
        }
        for name, (onnx_args, torch_args) in pairs.items():
            onnx_s, torch_s = cpu_seconds(onnx_args, repeat), cpu_seconds(torch_args, repeat)
            print(f"{name:34s} ONNX {onnx_s:5.2f} s   state_dict {torch_s:5.2f} s   ratio {torch_s / onnx_s:4.2f}x")


if __name__ == "__main__":
    main()
