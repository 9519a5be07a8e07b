"""Certified bounds on an input domain: lipcheck on networks that are Lipschitz only on a bounded box.

Builds the networks of ``benchmarks/domain_networks.py`` (EfficientNet-style SE gating, MobileNetV3 hardsigmoid
SE, RegNetY, SwiGLU, a small ViT, division / exp), exports each to ONNX (opset 17, TorchScript exporter) and runs

    python -m lipcheck report NET.onnx --input-range 0,1 --lower --format json

in a subprocess (with a timeout). Prints, per network: the certified upper bound on the box [0, 1]^n (or, when
there is none, the first reason lipcheck gives), the empirical lower bound, upper/lower, the seconds, and then
every unbounded reason (node, op) per network: what the value-range analysis must cover. ``domain`` is read
from the report when present.

    PYTHONPATH=. python benchmarks/domains.py
    PYTHONPATH=. python benchmarks/domains.py --nets vit,swiglu --json /tmp/domains.json
    PYTHONPATH=. python benchmarks/domains.py --folder /tmp/domnets --input-shape --timeout 600

Options: ``--folder DIR`` (where the .onnx files and each full report, NAME.report.json, go; default a
temporary folder, removed at the end), ``--nets a,b`` (default all), ``--range LO,HI`` (default 0,1),
``--input-shape`` (also pass each network's input shape with ``-s``), ``--lower-budget N`` and ``--seed N``
(passed to lipcheck), ``--timeout S`` (per network, default 900), ``--json OUT`` (the results as JSON),
``--loose X`` (also list bounded layers whose local bound exceeds X, default 100: LayerNorm's 1/sqrt(eps) and
the like), ``--no-lower`` (do not pass ``--lower``; ``--input-range`` implies it today, so this changes nothing
until a domain upper bound exists without the search).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import domain_networks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_lipcheck(path: Path, args: argparse.Namespace, shape: tuple[int, ...]) -> dict[str, Any]:
    """One lipcheck report in a subprocess; the fields this benchmark reads, the seconds and any error."""
    cmd = [sys.executable, "-m", "lipcheck", "report", str(path), "--input-range", args.range, "--format", "json"]
    if not args.no_lower:
        cmd.append("--lower")
    if args.input_shape:
        cmd += ["--input-shape", "input=" + ",".join(map(str, shape))]
    if args.lower_budget is not None:
        cmd += ["--lower-budget", str(args.lower_budget)]
    if args.seed is not None:
        cmd += ["--seed", str(args.seed)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("OMP_NUM_THREADS", "1")
    result: dict[str, Any] = {"command": ["lipcheck", *cmd[3:4], path.name, *cmd[5:]]}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        result.update(seconds=time.perf_counter() - start, error=f"timeout after {args.timeout} s")
        return result
    result["seconds"] = time.perf_counter() - start
    result["returncode"] = proc.returncode
    stderr_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    result["stderr_tail"] = stderr_lines[-5:]
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        result["error"] = stderr_lines[-1] if stderr_lines else f"exit {proc.returncode}, no JSON"
        return result
    result["upper_bound"] = report.get("upper_bound")
    result["lower_bound"] = report.get("lower_bound")
    result["bounded"] = report.get("bounded")
    result["certified"] = report.get("certified")
    result["domain"] = report.get("domain")
    result["assumptions"] = report.get("assumptions")
    result["unbounded_reasons"] = report.get("unbounded_reasons") or []
    # layers whose local bound is large although bounded (LayerNorm's 1/sqrt(eps), ...): a domain can tighten them
    result["loose_layers"] = [
        {"node": layer["name"], "op": layer["op"], "lipschitz": layer["lipschitz"]}
        for layer in report.get("layers", [])
        if layer.get("lipschitz") is not None and layer["lipschitz"] > args.loose
    ]
    result["warnings"] = [line for line in stderr_lines if "unsupported" in line.lower() or "no rule" in line.lower()]
    if args.folder is not None:
        path.with_suffix(".report.json").write_text(proc.stdout)
    upper, lower = result["upper_bound"], result["lower_bound"]
    result["ratio"] = upper / lower if upper is not None and lower else None
    return result


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def print_table(results: dict[str, dict[str, Any]]) -> None:
    rows = [("network", "upper bound", "lower bound", "ratio", "seconds", "domain")]
    for name, r in results.items():
        if "error" in r:
            upper = f"ERROR: {r['error']}"
        elif r.get("upper_bound") is not None:
            upper = f"{r['upper_bound']:.4g}"
        elif r.get("unbounded_reasons"):
            first = r["unbounded_reasons"][0]
            upper = f"none: {first['op']} {first['node']} ({first['reason']})"
        else:
            upper = "none"
        domain = "-" if r.get("domain") is None else json.dumps(r["domain"])
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        rows.append((name, upper, _fmt(r.get("lower_bound")), _fmt(r.get("ratio")), seconds, domain))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print("unbounded reasons (what a domain bound must cover):")
    for name, r in results.items():
        reasons = r.get("unbounded_reasons") or []
        if not reasons:
            print(f"  {name}: none" + (f" (error: {r['error']})" if "error" in r else ""))
            continue
        ops = Counter(x["op"] for x in reasons)
        print(f"  {name}: {len(reasons)} nodes; " + ", ".join(f"{op} x{n}" for op, n in ops.most_common()))
        for reason, n in Counter((x["op"], x["reason"]) for x in reasons).most_common():
            print(f"      {n:3d}  {reason[0]}: {reason[1]}")
    print()
    print("bounded layers with a large local bound (a domain can tighten these too):")
    for name, r in results.items():
        loose = Counter((x["op"], f"{x['lipschitz']:.4g}") for x in r.get("loose_layers") or [])
        print(f"  {name}: " + (", ".join(f"{op} {b} x{n}" for (op, b), n in loose.items()) or "none"))
    for name, r in results.items():
        for line in r.get("warnings") or []:
            print(f"  {name}: warning: {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="where the .onnx files go (default: a temporary folder)")
    parser.add_argument("--nets", default=",".join(domain_networks.NAMES), help="comma-separated network names")
    parser.add_argument("--range", default="0,1", help="the input box LO,HI (default 0,1)")
    parser.add_argument("--input-shape", action="store_true", help="also pass each network's input shape (-s)")
    parser.add_argument("--no-lower", action="store_true", help="do not pass --lower explicitly")
    parser.add_argument("--lower-budget", type=int, help="passed to lipcheck --lower-budget")
    parser.add_argument("--seed", type=int, help="passed to lipcheck --seed")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per network (default 900)")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--loose", type=float, default=100.0, help="list layers whose local bound exceeds this")
    args = parser.parse_args(argv)
    names = [n for n in args.nets.split(",") if n]
    unknown = sorted(set(names) - set(domain_networks.NAMES))
    if unknown:
        parser.error(f"unknown networks {unknown}; known: {domain_networks.NAMES}")

    with tempfile.TemporaryDirectory(prefix="lipcheck-domains-") as tmp:
        folder = args.folder or Path(tmp)
        results: dict[str, dict[str, Any]] = {}
        for name in names:
            shape = domain_networks.input_shape(name)
            print(f"[{name}] export ...", file=sys.stderr, flush=True)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    path = domain_networks.export(name, folder)
            except Exception as exc:  # an export failure is one row, not a crash
                results[name] = {"error": f"export failed: {type(exc).__name__}: {exc}"}
                continue
            print(f"[{name}] lipcheck ...", file=sys.stderr, flush=True)
            results[name] = {"input_shape": list(shape), **run_lipcheck(path, args, shape)}
            r = results[name]
            print(
                f"[{name}] upper {_fmt(r.get('upper_bound'))} lower {_fmt(r.get('lower_bound'))} "
                f"{r.get('seconds', 0):.1f} s" + (f" ERROR {r['error']}" if "error" in r else ""),
                file=sys.stderr,
                flush=True,
            )
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"range": args.range, "results": results}, indent=2) + "\n")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
