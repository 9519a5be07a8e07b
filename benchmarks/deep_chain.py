"""Time against depth: a chain of N Relu nodes (plus one Gemm) through every step of ``lipcheck report``.

Prints, for N = 2k, 8k, 32k and 100k nodes, the CPU seconds each step takes and the ratio to N = 2k: linear
time means the ratio follows N / 2000 (4, 16, 50). ``--sizes 2000,8000`` picks others; ``--profile N``
prints the 25 most expensive functions at that size; ``--torch 2000,8000`` times the PyTorch frontend's
mapping of a module calling ``torch.relu`` N times (torch.export's own time printed apart). Not a timed unit
test: the numbers are for people.

    python benchmarks/deep_chain.py
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lipcheck.frontends import load_graph  # noqa: E402
from lipcheck.pipeline import analyse, certify  # noqa: E402


def chain_model(depth: int, path: Path) -> Path:
    """x -> Gemm -> Relu -> Relu -> ... (depth nodes in all), saved as ONNX."""
    weight = numpy_helper.from_array(np.eye(8, dtype=np.float32) * 0.5, "w")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["v0"], name="gemm")]
    nodes += [helper.make_node("Relu", [f"v{i}"], [f"v{i + 1}"], name=f"relu{i}") for i in range(depth - 1)]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info(f"v{depth - 1}", TensorProto.FLOAT, [1, 8])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def timed(step: Callable[[], object]) -> tuple[float, object]:
    start = time.process_time()
    result = step()
    return time.process_time() - start, result


def measure(depth: int, folder: Path) -> dict[str, float]:
    path = chain_model(depth, folder / f"chain{depth}.onnx")
    load_s, graph = timed(lambda: load_graph(path))
    certify_s, found = timed(lambda: certify(graph, copy=True))
    report_s, report = timed(lambda: analyse(path, device="cpu"))
    assert report.upper_bound is not None and abs(report.upper_bound - 0.5) < 1e-6, report.upper_bound
    return {"load": load_s, "certify": certify_s, "report (all)": report_s}


def torch_chain(sizes: list[int]) -> None:
    """torch.export of a module calling torch.relu N times, then lipcheck's mapping of its ATen graph."""
    import torch

    from lipcheck.frontends.torch_graph import exported_to_graph

    class Chain(torch.nn.Module):
        def __init__(self, depth: int) -> None:
            super().__init__()
            self.fc, self.depth = torch.nn.Linear(8, 8), depth

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.fc(x)
            for _ in range(self.depth):
                x = torch.relu(x)
            return x

    base = None
    for depth in sizes:
        export_s, program = timed(lambda d=depth: torch.export.export(Chain(d).eval(), (torch.randn(1, 8),)))
        map_s, graph = timed(lambda p=program: exported_to_graph(p, "chain"))
        base = base or map_s
        print(f"{depth:>8} torch.relu: torch.export {export_s:7.2f} s, lipcheck's mapping {map_s:6.2f} s "
              f"({map_s / max(base, 1e-9):5.1f}x)", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,8000,32000,100000")
    parser.add_argument("--profile", type=int, default=0, help="profile `report` at this depth instead")
    parser.add_argument("--torch", default="", help="depths of the PyTorch chain to map instead, e.g. 2000,8000")
    args = parser.parse_args()
    if args.torch:
        torch_chain([int(s) for s in args.torch.split(",")])
        return
    with tempfile.TemporaryDirectory() as folder:
        if args.profile:
            path = chain_model(args.profile, Path(folder) / "chain.onnx")
            cProfile.runctx("analyse(path, device='cpu')", globals(), {"path": path}, str(Path(folder) / "p"))
            pstats.Stats(str(Path(folder) / "p")).sort_stats("cumulative").print_stats(25)
            return
        sizes = [int(s) for s in args.sizes.split(",")]
        base: dict[str, float] | None = None
        print(f"{'nodes':>8}  " + "  ".join(f"{step:>22}" for step in ("load", "certify", "report (all)")))
        for depth in sizes:
            row = measure(depth, Path(folder))
            base = base or row
            cells = [f"{row[k]:8.2f} s ({row[k] / max(base[k], 1e-9):6.1f}x)" for k in row]
            print(f"{depth:>8}  " + "  ".join(f"{c:>22}" for c in cells), flush=True)
        print(f"linear time: the ratios follow nodes / {sizes[0]} ({', '.join(f'{s / sizes[0]:g}' for s in sizes)})")


if __name__ == "__main__":
    main()
