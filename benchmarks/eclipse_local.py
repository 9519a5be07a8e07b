"""Local l2 Lipschitz bounds on balls: eclipse-nn's ECLipsE-Gen-Local side by side with lipcheck.

For every network, radius R (l2) and sample point x_i this measures

* eclipse-nn's ECLipsE-Gen-Local bound on B(x_i, R) and its time, per algorithm (``--algos``: ``Fast``
  (the package default: one SDP per layer, solved with SCS; a layer whose SDP fails falls back to
  the closed form), ``CF`` (closed form) and/or ``Acc`` (one multiplier per neuron, SDP));
* lipcheck's local bound on the same ball, ``lipcheck report NET.onnx --around X.npy --radius R
  --norm 2 --format json`` (``local.samples[i].upper``), when this lipcheck has ``--around``;
  otherwise "not available";
* lipcheck's global bound (``lipcheck report NET.onnx --format json``, ``upper_bound``), which is a
  bound on every ball;
* an empirical lower bound on the Lipschitz constant on the ball, found here: the largest of
  ``||J(x)||_2`` (exact spectral norm of the Jacobian from ``torch.func.jacrev``) over the centre,
  random points in the ball and the iterates of a projected ascent, and of the difference quotients
  ``||f(x) - f(y)|| / ||x - y||`` the ascent maximises over pairs x, y in the ball. For a ReLU net the
  Jacobian is piecewise constant (its norm has zero gradient), so the ascent runs on the quotient,
  which crosses activation regions; both quantities are true lower bounds of the constant on the ball.

Every certified bound is checked against the lower bound (a bound below it is unsound, or misused).

Networks: ``digits`` (``sample_models/digits_mlp.onnx``: its Gemm weights read with onnx and rebuilt
as torch Linear/ReLU layers, checked against onnxruntime; points: the first held-out test digits
of ``sample_models/build.py``'s split, pixels / 16, when scikit-learn is installed, else seeded
uniform points in [0, 1]^64), ``rand_wide`` (64-128-128-10) and ``rand_deep`` (32-64x5-10): ReLU MLPs
with He (kaiming-normal) weights and ``torch.nn.Linear``'s default biases under a fixed seed, written to
ONNX (Gemm/Relu, opset 17) with onnx.helper in a temporary folder; points seeded standard normal.

    pip install eclipse-nn==0.1.7            # or: pip install -e ".[bench]"
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/eclipse_local.py
    python benchmarks/eclipse_local.py --nets digits --points 3 --radii 0.01,0.1 --algos CF
    python benchmarks/eclipse_local.py --json /tmp/eclipse_local.json --per-point
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DIGITS_ONNX = ROOT / "sample_models" / "digits_mlp.onnx"
DIGITS_TRAIN = 1500  # sample_models/build.py: the first 1500 digits train, the rest is the test split
RANDOM_NETS = {"rand_wide": ((64, 128, 128, 10), 1), "rand_deep": ((32, 64, 64, 64, 64, 64, 10), 2)}
ALL_NETS = ("digits", *RANDOM_NETS)
TIE_RTOL = 1e-3  # bounds within 0.1% of each other: a tie


@dataclass
class Net:
    name: str
    model: nn.Sequential  # float64, Linear/ReLU only
    onnx_path: Path
    points: np.ndarray  # [n, d] float64
    points_from: str
    max_abs_diff: float  # torch model vs onnxruntime on the points


# --------------------------------------------------------------------------- networks


def gemm_mlp_from_onnx(path: Path) -> nn.Sequential:
    """Rebuild a Gemm/Relu chain as torch float64 Linear/ReLU layers (Y = alpha * A @ B' + beta * C)."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer}
    layers: list[nn.Module] = []
    for node in graph.node:
        if node.op_type == "Relu":
            layers.append(nn.ReLU())
            continue
        if node.op_type != "Gemm":
            raise ValueError(f"{path.name}: unsupported op {node.op_type}")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0):
            raise ValueError(f"{path.name}: Gemm with transA")
        w = inits[node.input[1]]
        w = w if attrs.get("transB", 0) else w.T  # torch stores [out, in]
        w = attrs.get("alpha", 1.0) * w
        b = attrs.get("beta", 1.0) * inits[node.input[2]] if len(node.input) > 2 else np.zeros(w.shape[0])
        lin = nn.Linear(w.shape[1], w.shape[0]).double()
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(np.broadcast_to(b, (w.shape[0],)).copy()))
        layers.append(lin)
    return nn.Sequential(*layers).eval()


def random_mlp(sizes: tuple[int, ...], seed: int) -> nn.Sequential:
    """He (kaiming-normal) weights, nn.Linear's default biases, under torch.manual_seed(seed); float32 values.

    (nn.Linear's default weights shrink the signal by about 1/sqrt(3) per layer: the Jacobians of a deep
    net are then tiny and every bound is mostly slack.)
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        nn.init.kaiming_normal_(layers[-1].weight, nonlinearity="relu")
        if k < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).double().eval()


def write_onnx(model: nn.Sequential, path: Path) -> None:
    """A Gemm(transB=1)/Relu graph with float32 weights, input 'input' of shape [batch, d]."""
    nodes, inits, current = [], [], "input"
    for k, layer in enumerate(model):
        out = f"t{k}"
        if isinstance(layer, nn.Linear):
            inits.append(numpy_helper.from_array(layer.weight.detach().numpy().astype(np.float32), f"w{k}"))
            inits.append(numpy_helper.from_array(layer.bias.detach().numpy().astype(np.float32), f"b{k}"))
            nodes.append(helper.make_node("Gemm", [current, f"w{k}", f"b{k}"], [out], transB=1))
        else:
            nodes.append(helper.make_node("Relu", [current], [out]))
        current = out
    nodes[-1].output[0] = "output"
    d_in, d_out = model[0].in_features, model[-1].out_features
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", d_in])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["batch", d_out])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def onnx_vs_torch(model: nn.Sequential, path: Path, points: np.ndarray) -> float:
    """Largest |torch - onnxruntime| over the points (float32 ONNX against the float64 torch model)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    ours = model(torch.from_numpy(points)).detach().numpy()
    theirs = session.run(None, {name: points.astype(np.float32)})[0]
    return float(np.max(np.abs(ours - theirs)))


def digits_points(n: int) -> tuple[np.ndarray, str]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        rng = np.random.default_rng(0)
        return rng.uniform(0.0, 1.0, size=(n, 64)), "seeded uniform [0,1]^64 (scikit-learn not installed)"
    x = load_digits().data[DIGITS_TRAIN : DIGITS_TRAIN + n] / 16.0
    return x.astype(np.float64), f"sklearn digits test split rows {DIGITS_TRAIN}..{DIGITS_TRAIN + n - 1}, /16"


def build_nets(names: list[str], n_points: int, folder: Path) -> list[Net]:
    nets = []
    for name in names:
        if name == "digits":
            model, path = gemm_mlp_from_onnx(DIGITS_ONNX), DIGITS_ONNX
            points, source = digits_points(n_points)
        else:
            sizes, seed = RANDOM_NETS[name]
            model, path = random_mlp(sizes, seed), folder / f"{name}.onnx"
            write_onnx(model, path)
            points = np.random.default_rng(seed).standard_normal((n_points, sizes[0]))
            source = f"seeded standard normal (numpy seed {seed})"
        model.requires_grad_(False)
        points = points.astype(np.float32).astype(np.float64)  # the same centres for the float32 ONNX input
        nets.append(Net(name, model, path, points, source, onnx_vs_torch(model, path, points)))
    return nets


def describe(model: nn.Sequential) -> str:
    linears = [m for m in model if isinstance(m, nn.Linear)]
    return "-".join(str(n) for n in [linears[0].in_features] + [m.out_features for m in linears])


# --------------------------------------------------------------------------- empirical lower bound


def project(x: torch.Tensor, centre: torch.Tensor, radius: float) -> torch.Tensor:
    d = x - centre
    norm = d.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return centre + d * torch.clamp(radius / norm, max=1.0)


def jacobian_norms(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Exact ||J(x)||_2 per row of x (jacrev + the largest singular value)."""
    jac = torch.func.vmap(torch.func.jacrev(model))(x)
    return torch.linalg.matrix_norm(jac, ord=2).detach()


def lower_bound(
    model: nn.Module, centre_np: np.ndarray, radius: float, restarts: int, steps: int, seed: int
) -> tuple[float, str]:
    """max of ||J|| and of difference quotients found in B(centre, radius); returns (value, where)."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.from_numpy(centre_np).double()
    d = centre.numel()
    best, where = float(jacobian_norms(model, centre[None])[0]), "J(centre)"

    # random points: uniform in the ball and on its sphere
    u = torch.randn(4 * restarts, d, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    scale = torch.rand(4 * restarts, 1, generator=gen, dtype=torch.float64) ** (1.0 / d)
    scale[: 2 * restarts] = 1.0
    samples = centre + radius * scale * u
    norms = jacobian_norms(model, samples)
    if float(norms.max()) > best:
        best, where = float(norms.max()), "J(random)"

    # pairs: x at the best samples, y a step along J(x)'s top right singular vector
    x = samples[norms.argsort(descending=True)[:restarts]].clone()
    jac = torch.func.vmap(torch.func.jacrev(model))(x)
    v = torch.linalg.svd(jac, full_matrices=False).Vh[:, 0, :]
    y = project(x + 0.2 * radius * v, centre, radius)
    x, y = x.requires_grad_(True), y.requires_grad_(True)
    lr = 0.05 * radius
    for step in range(steps):
        diff = x - y
        q = (model(x) - model(y)).norm(dim=1) / diff.norm(dim=1).clamp_min(1e-12 * radius)
        q_max = float(q.detach().max())
        if q_max > best:
            best, where = q_max, f"quotient (step {step})"
        gx, gy = torch.autograd.grad(q.sum(), (x, y))
        with torch.no_grad():
            step_lr = lr * (1.0 - step / steps) + 1e-3 * radius
            for var, g in ((x, gx), (y, gy)):
                var += step_lr * g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
                var.copy_(project(var, centre, radius))
        if step % 10 == 9 or step == steps - 1:
            with torch.no_grad():
                pts = torch.cat([x, y]).detach()
            jn = jacobian_norms(model, pts)
            if float(jn.max()) > best:
                best, where = float(jn.max()), f"J(ascent step {step})"
    return best, where


# --------------------------------------------------------------------------- eclipse-nn


class _CvxpyStatusShim:
    """cvxpy as eclipse_nn.utils.find_good_lambdas sees it, but a Problem's status 'optimal' reads 'Solved'.

    eclipse-nn 0.1.7 accepts a layer's SDP only when ``'Solved' in str(problem.status)`` (CVX's word, from the
    MATLAB code); cvxpy says 'optimal', so every Fast and Acc SDP is rejected and the layer falls back to
    the closed form (CF). With this shim ('Fast-fixed', 'Acc-fixed') only exactly 'optimal' is renamed:
    eclipse-nn's own numerical checks of the certificate (Schur complement, X and M positive definite)
    still run, and the benchmark still checks every bound against the empirical lower bound.
    """

    def __init__(self, cvxpy: Any) -> None:
        class Problem(cvxpy.Problem):
            @property
            def status(self) -> str:
                status = super().status
                return "Solved" if status == cvxpy.OPTIMAL else status

        self._cvxpy = cvxpy
        self.Problem = Problem

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cvxpy, name)


@contextlib.contextmanager
def status_shim(active: bool):
    if not active:
        yield
        return
    import importlib

    # the module, not the function eclipse_nn.utils re-exports under the same name
    fgl = importlib.import_module("eclipse_nn.utils.find_good_lambdas")
    saved = fgl.cp
    fgl.cp = _CvxpyStatusShim(saved)
    try:
        yield
    finally:
        fgl.cp = saved


def eclipse_bound(model: nn.Sequential, centre: np.ndarray, radius: float, algo: str) -> dict[str, Any]:
    """eclipse_nn.LipConstEstimator(model=...).estimate_gen_local(center, epsilon, actv='relu', algo).

    algo 'Fast-fixed' / 'Acc-fixed': 'Fast' / 'Acc' with the cvxpy status read as eclipse-nn expects.
    """
    from eclipse_nn import LipConstEstimator

    estimator = LipConstEstimator(model=model)
    log = io.StringIO()
    start = time.perf_counter()
    fixed = algo.endswith("-fixed")
    with contextlib.redirect_stdout(log), warnings.catch_warnings(), status_shim(fixed):
        warnings.simplefilter("ignore")
        try:
            lip, time_used, ext = estimator.estimate_gen_local(
                center=torch.from_numpy(centre), epsilon=radius, actv="relu", algo=algo.removesuffix("-fixed")
            )
            error = None
        except Exception as exc:  # noqa: BLE001  (report, keep going)
            lip, time_used, ext, error = math.nan, math.nan, -2, f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - start
    text = log.getvalue()
    upper = float(lip) if lip is not None and np.isfinite(lip) else None
    return {
        "upper": upper,
        "seconds": wall,
        "time_used": float(time_used),
        "exit": int(ext),
        "fallback_layers": text.count("Failed in initial try"),
        "affine_layers": text.count("Affine layer"),
        "error": error,
    }


# --------------------------------------------------------------------------- lipcheck


def lipcheck_cmd() -> list[str]:
    return [sys.executable, "-m", "lipcheck", "report"]


def lipcheck_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def lipcheck_has_around() -> bool:
    out = subprocess.run([*lipcheck_cmd(), "--help"], capture_output=True, text=True, env=lipcheck_env())
    return "--around" in out.stdout


def lipcheck_json(args: list[str]) -> tuple[dict[str, Any] | None, float, str]:
    start = time.perf_counter()
    cmd = [*lipcheck_cmd(), *args, "--format", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=lipcheck_env())
    wall = time.perf_counter() - start
    try:
        return json.loads(out.stdout), wall, ""
    except json.JSONDecodeError:
        return None, wall, (out.stderr.strip().splitlines() or ["no output"])[-1]


def lipcheck_local(net: Net, radius: float, folder: Path) -> dict[str, Any]:
    points = folder / f"{net.name}_points.npy"
    np.save(points, net.points.astype(np.float32))
    args = [str(net.onnx_path), "--around", str(points), "--radius", str(radius), "--norm", "2"]
    report, wall, error = lipcheck_json(args)
    local = (report or {}).get("local") or {}
    uppers: list[float | None] = [None] * len(net.points)
    for sample in local.get("samples", []):
        if 0 <= sample.get("index", -1) < len(uppers):
            uppers[sample["index"]] = sample.get("upper")
    return {
        "uppers": uppers,
        "max": local.get("max"),
        "upper_bound": (report or {}).get("upper_bound"),
        "seconds_per_sample": local.get("seconds_per_sample"),
        "wall": wall,
        "error": error or (None if local else "no 'local' in the JSON report"),
    }


# --------------------------------------------------------------------------- table


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def measure_point(
    net: Net, i: int, radius: float, algos: list[str], local: dict[str, Any] | None, global_ub: float | None, args
) -> dict[str, Any]:
    """Lower bound, eclipse-nn per algorithm and lipcheck's bounds at one point; which certified bound is tighter."""
    centre = net.points[i]
    start = time.perf_counter()
    lower, where = lower_bound(net.model, centre, radius, args.restarts, args.steps, seed=1000 + i)
    row: dict[str, Any] = {
        "index": i,
        "lower": lower,
        "lower_from": where,
        "lower_seconds": time.perf_counter() - start,
    }
    row["eclipse"] = {algo: eclipse_bound(net.model, centre, radius, algo) for algo in algos}
    row["lipcheck_local"] = local["uppers"][i] if local else None
    certified = {f"eclipse {a}": e["upper"] for a, e in row["eclipse"].items()}
    certified |= {"lipcheck local": row["lipcheck_local"], "lipcheck global": global_ub}
    row["below_lower"] = [
        f"{net.name} r={radius:g} point {i}: {name} {value:.6g} < lower {lower:.6g}"
        for name, value in certified.items()
        if value is not None and value < lower * (1 - 1e-9)
    ]
    eclipse_best = min((e["upper"] for e in row["eclipse"].values() if e["upper"] is not None), default=None)
    lipcheck_best = min((v for v in (row["lipcheck_local"], global_ub) if v is not None), default=None)
    if eclipse_best is None or lipcheck_best is None:
        row["tighter"] = "-"
    elif abs(eclipse_best - lipcheck_best) > TIE_RTOL * max(eclipse_best, lipcheck_best):
        row["tighter"] = "eclipse-nn" if eclipse_best < lipcheck_best else "lipcheck"
    else:
        row["tighter"] = "tie"
    bounds = ", ".join(f"{a} {fmt(e['upper'])} ({e['seconds']:.2f}s)" for a, e in row["eclipse"].items())
    print(f"  r={radius:g} point {i}: lower {fmt(lower)} [{where}], {bounds}", flush=True)
    return row


def col_max(values: list[float | None]) -> float | None:
    """The max over the points (the bound on the union of the balls); None if any point has none."""
    vals = [v for v in values if v is not None]
    return max(vals) if vals and len(vals) == len(values) else None


def summary_cells(
    net: Net, radius: float, algos: list[str], rows: list[dict[str, Any]], local: dict | None, global_ub: float | None
) -> list[str]:
    cells = [net.name, describe(net.model), f"{radius:g}", fmt(col_max([r["lower"] for r in rows]))]
    for algo in algos:
        cells.append(fmt(col_max([r["eclipse"][algo]["upper"] for r in rows])))
        cells.append(f"{np.mean([r['eclipse'][algo]['seconds'] for r in rows]):.2f}")
        cells.append(str(sum(r["eclipse"][algo]["fallback_layers"] > 0 for r in rows)))
    cells += [fmt(local["max"]), fmt(local["seconds_per_sample"], 3)] if local else ["not available", "-"]
    cells.append(fmt(global_ub))
    counts = {who: sum(r["tighter"] == who for r in rows) for who in ("eclipse-nn", "lipcheck", "tie")}
    cells.append(", ".join(f"{who} {k}/{len(rows)}" for who, k in counts.items() if k) or "-")
    return cells


def point_cells(net: Net, radius: float, row: dict[str, Any]) -> list[str]:
    cells = [net.name, f"{radius:g}", str(row["index"]), fmt(row["lower"])]
    for e in row["eclipse"].values():
        fallback = f", fb {e['fallback_layers']}" if e["fallback_layers"] else ""
        cells.append(f"{fmt(e['upper'])} ({e['seconds']:.2f}s{fallback})")
    return [*cells, fmt(row["lipcheck_local"]), row["tighter"]]


def versions() -> tuple[str, str]:
    from importlib.metadata import version

    import eclipse_nn  # noqa: F401  (fail early when it is missing)

    cmd = ["git", "rev-parse", "--short", "HEAD"]
    return version("eclipse-nn"), subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default=",".join(ALL_NETS), help=f"comma-separated, of {', '.join(ALL_NETS)}")
    parser.add_argument("--points", type=int, default=5, help="sample points per network (default 5)")
    parser.add_argument("--radii", default="0.01,0.1,1", help="l2 radii, comma-separated (default 0.01,0.1,1)")
    parser.add_argument(
        "--algos",
        default="Fast,CF,Fast-fixed",
        help="ECLipsE-Gen-Local: Fast, CF, Acc, Fast-fixed, Acc-fixed (default Fast,CF,Fast-fixed; "
        "-fixed: eclipse-nn with cvxpy's status 'optimal' read as 'Solved', see _CvxpyStatusShim)",
    )
    parser.add_argument("--restarts", type=int, default=16, help="lower-bound search: pairs ascended (default 16)")
    parser.add_argument("--steps", type=int, default=100, help="lower-bound search: ascent steps (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--per-point", action="store_true", help="also print one row per point")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write all results to OUT")
    args = parser.parse_args()

    names = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL_NETS))
    if unknown:
        parser.error(f"unknown nets {unknown}; choose from {ALL_NETS}")
    radii = [float(r) for r in args.radii.split(",")]
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    torch.set_num_threads(args.threads)

    eclipse_version, commit = versions()
    has_around = lipcheck_has_around()
    around = "yes" if has_around else "not available"
    print(f"eclipse-nn {eclipse_version}; lipcheck {ROOT} @ {commit}; lipcheck --around: {around}")
    results: dict[str, Any] = {"eclipse_nn": eclipse_version, "lipcheck_commit": commit, "lipcheck_around": has_around}
    results |= {"algos": algos, "radii": radii, "nets": []}
    unsound: list[str] = []
    summary: list[list[str]] = []
    per_point: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="eclipse_local_") as tmp:
        folder = Path(tmp)
        for net in build_nets(names, args.points, folder):
            arch = describe(net.model)
            print(f"\n{net.name} ({arch}); points: {net.points_from}; |torch - onnxruntime| <= {net.max_abs_diff:.2e}")
            report, global_wall, error = lipcheck_json([str(net.onnx_path)])
            global_ub = report["upper_bound"] if report else None
            print(f"  lipcheck global: {fmt(global_ub, 6)} ({global_wall:.1f} s with start-up) {error}")
            net_out: dict[str, Any] = {
                "name": net.name,
                "architecture": arch,
                "onnx": str(net.onnx_path) if net.name == "digits" else f"(temporary) {net.onnx_path.name}",
                "points_from": net.points_from,
                "points": net.points.tolist(),
                "max_abs_diff_vs_onnxruntime": net.max_abs_diff,
                "lipcheck_global": {"upper_bound": global_ub, "seconds_with_startup": global_wall, "error": error},
                "radii": [],
            }
            for radius in radii:
                local = lipcheck_local(net, radius, folder) if has_around else None
                rows = [measure_point(net, i, radius, algos, local, global_ub, args) for i in range(len(net.points))]
                for row in rows:
                    unsound += row["below_lower"]
                    per_point.append(point_cells(net, radius, row))
                summary.append(summary_cells(net, radius, algos, rows, local, global_ub))
                net_out["radii"].append({"radius": radius, "lipcheck_local": local, "points": rows})
            results["nets"].append(net_out)

    print("\nBounds: the max over the points (the bound on the union of the balls); s/pt: mean seconds per point;")
    print("fb: points where some layer's SDP failed and eclipse-nn fell back to the closed form (CF) there;")
    print("tighter: per point, eclipse-nn's best bound (of --algos) against lipcheck's best (local if available,")
    print("else global); within 0.1% is a tie.\n")
    headers = ["net", "arch", "r", "lower (max)"]
    for algo in algos:
        headers += [f"eclipse {algo}", "s/pt", "fb"]
    print_table([*headers, "lipcheck local", "s/pt", "lipcheck global", "tighter"], summary)
    if args.per_point:
        print()
        headers = ["net", "r", "i", "lower", *(f"eclipse {a} (s)" for a in algos), "lipcheck local", "tighter"]
        print_table(headers, per_point)
    print()
    if unsound:
        print("BOUNDS BELOW THE EMPIRICAL LOWER BOUND (unsound, or misused):")
        for line in unsound:
            print("  " + line)
    else:
        print("Every certified bound is >= the empirical lower bound.")
    results["below_lower_bound"] = unsound
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if unsound else 0


if __name__ == "__main__":
    sys.exit(main())
