"""Local Lipschitz bounds on the digits samples: certified bound per ball against the lower bound found there.

For ``sample_models/digits_mlp.onnx`` and ``digits_cnn.onnx`` and the 20 held-out digits of
``sample_models/digits_test.npz``, at l2 radii 0.01, 0.1 and 1: each sample's certified local bound
(``lipcheck report --around``), the largest difference quotient found in the same ball (``--lower``), their
ratio (median and worst over the samples), the largest local bound against the global one, the certified
accuracy at R, and the seconds per sample.

    PYTHONPATH=. python benchmarks/local_digits.py [--radii 0.01,0.1,1] [--samples 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from lipcheck.pipeline import Around, analyse

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("digits_mlp.onnx", "digits_cnn.onnx")


def measure(model: str, radius: float, samples: np.ndarray, labels: np.ndarray) -> dict:
    path = ROOT / "sample_models" / model
    started = time.perf_counter()
    report = analyse(path, device="cpu", lower=True, around=Around(samples, radius, "2", labels))
    seconds = time.perf_counter() - started
    local = report.local or {}
    rows = local.get("samples", [])
    ratios = [row["upper"] / row["lower"] for row in rows if row["upper"] is not None and row["lower"]]
    accuracy = (local.get("certified_accuracy") or [{}])[-1].get("accuracy")
    return {
        "model": model,
        "radius": radius,
        "max_local": local.get("max"),
        "median_ratio": statistics.median(ratios) if ratios else None,
        "worst_ratio": max(ratios) if ratios else None,
        "certified_accuracy": accuracy,
        "seconds_per_sample": local.get("seconds_per_sample"),
        "seconds": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--radii", default="0.01,0.1,1")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = np.load(ROOT / "sample_models" / "digits_test.npz")
    samples, labels = data["x"][: args.samples], data["y"][: args.samples]
    results = []
    for model in MODELS:
        global_bound = analyse(ROOT / "sample_models" / model, device="cpu").upper_bound
        for radius in (float(r) for r in args.radii.split(",")):
            row = measure(model, radius, samples, labels)
            row["global"] = global_bound
            results.append(row)
            print(
                f"{model:16s} r={radius:<5g} max local {row['max_local']:.4g} (global {global_bound:.4g}); "
                f"upper/lower median {row['median_ratio']:.3f}, worst {row['worst_ratio']:.3f}; "
                f"certified accuracy at r {row['certified_accuracy']:.0%}; {row['seconds_per_sample']:.2f} s/sample"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
