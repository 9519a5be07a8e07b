"""End to end: ``lipcheck report resnet50.onnx`` against a script that only loads the model and takes reshape norms.

Builds a torchvision-style ResNet-50 v1.5 (plain torch definition below; random weights from a fixed
seed; exported with ``torch.onnx.export`` at 1x3x224x224) into a cache folder (default
``$TMPDIR/lipcheck-bench``; not committed) and times, each in a fresh subprocess from process start to
exit:

* ``lipcheck``: ``python -m lipcheck report resnet50.onnx --format json`` (cold: new interpreter);
* ``baseline``: a script that imports torch and onnx, loads the same model and computes the (wrong,
  but cheap) reshaped-kernel norm of every conv and Gemm weight: the floor any tool that reads the
  model pays.

It prints both times, their ratio (target: under 3x and under 10 s), the peak RSS of each process,
and where lipcheck's time goes, measured in a third subprocess through the library API: interpreter
start, imports, loading (ONNX parse, constant folding, shape inference), passes, conv norms (the
Conv/ConvTranspose rules), every other rule, and writing the report.

    python benchmarks/resnet50_e2e.py [--repeats 3] [--rebuild] [--folder DIR] [-- extra lipcheck args]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BASELINE = r"""
import sys
import torch, onnx
from onnx import numpy_helper
model = onnx.load(sys.argv[1])
norms = []
for init in model.graph.initializer:
    if len(init.dims) >= 2:
        w = torch.from_numpy(numpy_helper.to_array(init).copy())
        norms.append(float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2)))
print(len(norms), max(norms))
"""


def build_resnet50(path: Path) -> None:
    import torch
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from networks import Bottleneck  # the torchvision-style block the tightness benchmark uses too

    class ResNet50(nn.Module):
        def __init__(self, num_classes: int = 1000):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            self.inplanes = 64
            self.layer1 = self._stage(64, 3)
            self.layer2 = self._stage(128, 4, stride=2)
            self.layer3 = self._stage(256, 6, stride=2)
            self.layer4 = self._stage(512, 3, stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(2048, num_classes)

        def _stage(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
            downsample = None
            if stride != 1 or self.inplanes != planes * 4:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
                )
            layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * 4
            layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    torch.manual_seed(0)
    model = ResNet50().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding does something
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.onnx")
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 224, 224),),
        str(partial),
        input_names=["input"],
        output_names=["logits"],
        opset_version=17,
        dynamo=False,
    )
    partial.replace(path)


def timed_run(command: list[str], env: dict[str, str]) -> tuple[float, int, str, str]:
    """Wall seconds, peak RSS (bytes) of the child, stdout, stderr."""
    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "w = time.perf_counter() - t\n"
        "r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
        "json.dump({'wall': w, 'rss': r, 'rc': p.returncode, 'out': p.stdout, 'err': p.stderr}, sys.stdout)\n"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, env=env)
    result = json.loads(done.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result['rc']}):\n{result['err'][-3000:]}")
    return result["wall"], result["rss"], result["out"], result["err"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "lipcheck-bench")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each (the median is reported)")
    parser.add_argument("--rebuild", action="store_true", help="build the ONNX file again")
    parser.add_argument("extra", nargs="*", help="extra arguments for lipcheck report (after --)")
    args = parser.parse_args()
    model = args.folder / "resnet50.onnx"
    if args.rebuild or not model.exists():
        print(f"building {model} ...", file=sys.stderr)
        build_resnet50(model)
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
    lipcheck_cmd = [sys.executable, "-m", "lipcheck", "report", str(model), "--format", "json", *args.extra]
    baseline_cmd = [sys.executable, "-c", BASELINE, str(model)]
    runs: dict[str, list[tuple[float, int]]] = {"lipcheck": [], "baseline": []}
    for _ in range(args.repeats):  # interleaved, so machine load hits both alike
        wall, rss, _, _ = timed_run(baseline_cmd, env)
        runs["baseline"].append((wall, rss))
        wall, rss, out, _ = timed_run(lipcheck_cmd, env)
        runs["lipcheck"].append((wall, rss))
        report = json.loads(out)
    median = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    weights = sum(f.stat().st_size for f in args.folder.glob("resnet50.onnx*"))
    print(
        f"model: {model} ({weights / 2**20:.0f} MiB), {len(report['layers'])} layers, "
        f"upper bound {report['upper_bound']:.6g}"
    )
    for name, (wall, rss) in median.items():
        print(f"{name:9s} {wall:7.2f} s   peak RSS {rss / 2**20:7.0f} MiB")
    ratio = median["lipcheck"][0] / median["baseline"][0]
    print(
        f"ratio lipcheck / baseline: {ratio:.2f}x (target < 3x); lipcheck {median['lipcheck'][0]:.2f} s (target < 10 s)"
    )
    print(f"peak RSS minus weights: {(median['lipcheck'][1] - weights) / 2**20:.0f} MiB (target <= 1024 MiB)")

    _, _, out, _ = timed_run([sys.executable, "-c", PROFILE, str(model), *args.extra], env)
    start, _, _, _ = timed_run([sys.executable, "-c", "pass"], env)
    phases = {"interpreter start": start, **json.loads(out)}
    total = sum(phases.values())
    print("lipcheck's split (library API, one more run):")
    for name, seconds in phases.items():
        print(f"  {name:28s} {seconds:6.2f} s  {seconds / total:6.1%}")
    conv = phases["conv norms (Conv rules)"]
    print(
        f"  conv norms {conv:.2f} s; everything else {total - conv:.2f} s "
        f"(everything else / baseline: {(total - conv) / median['baseline'][0]:.2f}x)"
    )


PROFILE = r"""
import json, sys, time
t0 = time.perf_counter()
import lipcheck.cli  # what the command imports before it parses its arguments
t1 = time.perf_counter()
from lipcheck.compose import compose
from lipcheck.frontends import load_graph
from lipcheck.passes import prepare
from lipcheck.pipeline import resolve_device
from lipcheck.report import Report
t2 = time.perf_counter()
device = resolve_device("auto")
graph = load_graph(sys.argv[1], [a.split("=", 1)[1] for a in sys.argv[2:] if a.startswith("--input-shape=")])
t3 = time.perf_counter()
prepare(graph)
t4 = time.perf_counter()
ops = {node.name: node.op for node in graph.nodes}
per_op = {}
last = [None, time.perf_counter()]
def progress(done, total, name):
    now = time.perf_counter()
    if last[0] is not None:
        per_op[ops[last[0]]] = per_op.get(ops[last[0]], 0.0) + now - last[1]
    last[:] = [name or None, now]
composition = compose(graph, device=device, progress=progress)
t5 = time.perf_counter()
report = Report(sys.argv[1], composition.upper_bound, composition.layers, composition.unbounded,
                {n: graph.shape(n) or () for n in graph.inputs}, composition.assumptions, device=str(device))
from lipcheck.runner import json_text
from lipcheck.render import report_as_text
json_text(report.to_dict()); report_as_text(report)
t6 = time.perf_counter()
conv = per_op.get("Conv", 0.0) + per_op.get("ConvTranspose", 0.0)
print(json.dumps({
    "imports (cli)": t1 - t0, "imports (torch, onnx, rules)": t2 - t1, "load (parse, fold, shapes)": t3 - t2,
    "passes": t4 - t3, "conv norms (Conv rules)": conv, "other rules + composition": t5 - t4 - conv,
    "report (json + table)": t6 - t5,
}))
"""


if __name__ == "__main__":
    main()
