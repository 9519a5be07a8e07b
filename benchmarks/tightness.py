"""How tight is lipcheck on deep networks? Certified bounds by method against the best empirical lower bound.

For each network: the product bound (AutoLip), every method's certified bound (``--method best``: the
report's ``method_bounds``), the empirical lower bound (``--lower``: the largest Jacobian norm found,
a true lower bound), the ratios upper / lower, and the time of the report and of the lower-bound search
(wall and CPU seconds, separately). Networks (``--nets``, comma-separated):

* ``resnet18``, ``resnet50``: torchvision-style ResNets at 224x224 (``benchmarks/networks.py``);
* ``resnet18_64``: ResNet-18 at 64x64;
* ``regnet64``: the RegNetX-200MF-like network at 64x64 (not in the default list);
* ``digits_cnn``, ``resnet_small``: the sample models (``sample_models/*.onnx``).

The torch networks get weights from ``torch.manual_seed(--seed)``, eval mode, and (unless ``--plain-bn``)
moderately random BatchNorm statistics and affine parameters, so residual branches do work; they are
exported to ONNX in a temporary folder. The lipcheck measured is the one Python imports: set
``PYTHONPATH`` to a checkout to measure it (the table names its commit). Everything runs in this process
through the library API (``lipcheck.pipeline.analyse(path, method="best", lower=...)``), on the CPU with
``--threads`` torch threads (the lower-bound search itself always runs on one).

    PYTHONPATH=. python benchmarks/tightness.py                  # the default five networks
    python benchmarks/tightness.py --nets digits_cnn,resnet_small --lower-budget 2000
    python benchmarks/tightness.py --label after --out benchmarks/results/tightness_after.md
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import networks  # noqa: E402

import lipcheck.lower  # noqa: E402  (the lipcheck on PYTHONPATH, or the installed one)
from lipcheck.lower import LowerSettings  # noqa: E402
from lipcheck.pipeline import analyse  # noqa: E402

LIPCHECK = Path(lipcheck.lower.__file__).resolve().parents[1]  # the checkout measured

# name -> (torch network or sample file, input size)
NETS: dict[str, tuple[str, int]] = {
    "resnet18": ("resnet18", 224),
    "resnet50": ("resnet50", 224),
    "resnet18_64": ("resnet18", 64),
    "regnet64": ("regnet", 64),
    "digits_cnn": ("sample_models/digits_cnn.onnx", 8),
    "resnet_small": ("sample_models/resnet_small.onnx", 16),
}
DEFAULT_NETS = "resnet18,resnet50,resnet18_64,digits_cnn,resnet_small"
METHODS = ("product", "folded", "combettes-pesquet", "eclipse-fast", "lipsdp")


@dataclass
class Row:
    net: str
    shape: str
    layers: int
    best: float | None
    best_method: str
    bounds: dict[str, float | None]
    lower: float | None = None
    lower_evaluations: int = 0
    lower_budget: int = 0
    report_wall: float = 0.0
    report_cpu: float = 0.0
    lower_wall: float = 0.0
    lower_cpu: float = 0.0
    notes: list[str] = field(default_factory=list)


class _Timed:
    """Wraps lipcheck.lower.lower_bound (analyse imports it at call time) to time the search apart."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.inner: Callable[..., Any] = lipcheck.lower.lower_bound

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.process_time() - cpu


def model_file(name: str, folder: Path, seed: int, random_bn: bool) -> Path:
    """The ONNX file of ``name``: a sample model as it is, a torch network exported into ``folder``."""
    source, size = NETS[name]
    if source.endswith(".onnx"):
        return ROOT / source
    model = networks.build(source, seed=seed, random_bn=random_bn)
    return networks.export(model, size, folder / f"{name}.onnx")


def measure(name: str, path: Path, settings: LowerSettings | bool) -> Row:
    timed = _Timed()
    lipcheck.lower.lower_bound = timed
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        report = analyse(path, device="cpu", method="best", lower=settings)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        lipcheck.lower.lower_bound = timed.inner
    shape = "x".join(str(d) for d in next(iter(report.input_shapes.values()), ()))
    row = Row(
        net=name,
        shape=shape,
        layers=len(report.layers),
        best=report.upper_bound,
        best_method=report.bound_method or "",
        bounds=dict(report.method_bounds or {}),
        report_wall=wall - timed.wall,
        report_cpu=cpu - timed.cpu,
        lower_wall=timed.wall,
        lower_cpu=timed.cpu,
    )
    if report.lower is not None:
        row.lower = report.lower.value
        row.lower_evaluations = report.lower.evaluations
        row.lower_budget = report.lower.budget
    return row


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _ratio(upper: float | None, lower: float | None) -> str:
    return "-" if upper is None or not lower else f"{upper / lower:.3g}"


def table(rows: list[Row], label: str) -> str:
    # the known methods in their usual order, then any others the report names (newer lipcheck versions)
    seen = list(dict.fromkeys(method for row in rows for method in row.bounds))
    methods = [m for m in METHODS if m in seen] + [m for m in seen if m not in METHODS]
    head = ["net", "input", "layers", *methods, "best (method)", "lower", "product/lower", "best/lower"]
    head += ["report s (cpu)", "lower s (cpu)", "lower products"]
    lines = [f"**{label}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.net, row.shape, str(row.layers)]
        cells += [_number(row.bounds.get(m)) for m in methods]
        cells += [f"{_number(row.best)} ({row.best_method})", _number(row.lower)]
        cells += [_ratio(row.bounds.get("product"), row.lower), _ratio(row.best, row.lower)]
        cells += [f"{row.report_wall:.1f} ({row.report_cpu:.1f})"]
        cells += [f"{row.lower_wall:.1f} ({row.lower_cpu:.1f})" if row.lower is not None else "-"]
        cells += [f"{row.lower_evaluations}/{row.lower_budget}" if row.lower is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def provenance(args: argparse.Namespace) -> str:
    """Commit (with a mark when the tree differs from it), command, versions: enough to rerun the table."""

    def git(*argv: str) -> str:
        done = subprocess.run(["git", "-C", str(LIPCHECK), *argv], capture_output=True, text=True)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " (uncommitted changes in lipcheck/)" if git("status", "--porcelain", "--", "lipcheck") else ""
    command = "python benchmarks/tightness.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        f"lipcheck from {LIPCHECK} at commit {commit}{dirty}, {when}, torch {torch.__version__}, "
        f"{args.threads} torch thread(s), seed {args.seed}, BatchNorm {'plain' if args.plain_bn else 'randomised'}\n\n"
        f"    {command}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default=DEFAULT_NETS, help=f"comma-separated, of: {', '.join(NETS)}")
    parser.add_argument("--label", default="before", help="the table's heading (before, after, ...)")
    parser.add_argument("--out", type=Path, help="also write the markdown (provenance and table) to this file")
    parser.add_argument("--lower-budget", type=int, help="--lower-budget for every net (default: lipcheck's)")
    parser.add_argument("--no-lower", action="store_true", help="certified bounds only")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed of the torch networks")
    parser.add_argument("--plain-bn", action="store_true", help="BatchNorm as initialised (identity up to eps)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the report (default 1)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in names if n not in NETS]
    if unknown:
        parser.error(f"unknown nets {unknown}; known: {', '.join(NETS)}")
    torch.set_num_threads(args.threads)
    settings: LowerSettings | bool = not args.no_lower  # True: lipcheck's default settings
    if args.lower_budget is not None and not args.no_lower:
        settings = LowerSettings(budget=args.lower_budget)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lipcheck-tightness-") as folder:
        for name in names:
            print(f"{name}: exporting and measuring ...", file=sys.stderr, flush=True)
            path = model_file(name, Path(folder), args.seed, not args.plain_bn)
            rows.append(measure(name, path, settings))
            print(table(rows[-1:], name), file=sys.stderr, flush=True)
    text = provenance(args) + "\n" + table(rows, args.label)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
