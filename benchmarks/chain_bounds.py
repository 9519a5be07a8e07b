"""Certified bounds by method on the trained digits samples, with times, and a simple empirical lower bound.

    python benchmarks/chain_bounds.py                      # digits_mlp and digits_cnn
    python benchmarks/chain_bounds.py --lipsdp-max-size 200  # let LipSDP take the digits MLP (slow: minutes)
    python benchmarks/chain_bounds.py --all-samples        # product vs best on every sample model

Times are wall-clock seconds of a whole ``analyse`` call on one torch thread (the product is part of
every call, so compare each method's time with the product's). The lower bound is the largest exact
Jacobian spectral norm (torch.autograd.functional.jacobian) over the held-out digits: a true lower bound
of the Lipschitz constant, far from the best one could find by ascent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "sample_models"))

from lipcheck.pipeline import analyse  # noqa: E402
from lipcheck.refine import lipsdp  # noqa: E402

METHODS = ("product", "folded", "combettes-pesquet", "eclipse-fast", "lipsdp", "best")


def lower_bound(name: str) -> float:
    import build  # sample_models/build.py: the same deterministic training

    model = build.make_digits_mlp() if name == "digits_mlp" else build.make_digits_cnn()
    _, _, x_test, _ = build.load_digits_split()
    shape = (64,) if name == "digits_mlp" else (1, 8, 8)
    best = 0.0
    for x in x_test:
        jac = torch.autograd.functional.jacobian(lambda v: model(v.reshape(1, *shape)).reshape(-1), x.reshape(shape))
        best = max(best, float(torch.linalg.matrix_norm(jac.reshape(10, -1).double(), ord=2)))
    return best


def _show(value: float | None) -> str:
    return "unbounded" if value is None else f"{value:.6g}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lipsdp-max-size", type=int, default=lipsdp.MAX_SIZE)
    parser.add_argument("--all-samples", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lipsdp.MAX_SIZE = args.lipsdp_max_size
    if args.all_samples:
        print(f"{'model':24s} {'product':>10s} {'best':>10s}  method")
        for path in sorted((ROOT / "sample_models").glob("*.onnx")):
            report = analyse(path, device="cpu")
            product = report.method_bounds.get("product")
            print(f"{path.name:24s} {_show(product):>10s} {_show(report.upper_bound):>10s}  {report.bound_method}")
        return 0
    for name in ("digits_mlp", "digits_cnn"):
        print(f"{name}: empirical lower bound (max ||J(x)|| over the 297 test digits) {lower_bound(name):.6g}")
        for method in METHODS:
            started = time.perf_counter()
            report = analyse(ROOT / "sample_models" / f"{name}.onnx", device="cpu", method=method)
            seconds = time.perf_counter() - started
            print(f"  {method:18s} {report.upper_bound:10.6g}  ({report.bound_method}, {seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
