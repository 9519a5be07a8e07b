"""An empirical lower bound on the Lipschitz constant: the largest Jacobian norm found.

For any input x and direction v, ||J(x) v|| / ||v|| <= sigma_max(J(x)) <= L, so every evaluated pair
(x, v) gives a true lower bound of the global l2 Lipschitz constant L (and of the constant on the
input domain when x lies inside it). The search:

1. starts: the user's samples (``inputs``), zero (or the centre of ``input_range``), and random
   points (standard normal, or uniform in the range);
2. screening: the top singular pair of J(x) at every start, by power iteration on J^T J through
   JVPs and VJPs (or an exact SVD of J when the input or output has few entries);
3. ascent from the best starts: normalised gradient steps on x for ||J(x) v|| with v the top right
   singular vector (the gradient of sigma_max(J(x)) where it is simple; with ReLUs, of the network with
   smoothed ReLUs, and a random direction every second failed step), step sizes that grow on success
   and shrink on failure, projected onto ``input_range`` when the domain is bounded; restarts from fresh
   random points after 12 failures in a row, while budget remains;
4. certification: at the best points, nudged by a random 1e-9 (relative) so that no ReLU-like kink sits
   exactly at 0 (where autograd's one-sided choices could report a Jacobian no point has), the value reported
   is ||J(x) v|| / ||v|| evaluated in float64, after checking it against the secant
   ||f(x + t v) - f(x - t v)|| / (2 t ||v||) (t = 1e-6, then 1e-8, relative to max(1, max|x|)), itself a
   lower bound of L by definition; when they disagree (a kink within t) the secant is reported. The
   best of the four best candidates is kept; it is shaved by 1e-9 relative for rounding.

The budget caps the total work in Jacobian-vector products: each JVP or VJP counts one, so does the
forward pass they share at a point and each forward pass of a secant, the gradient of ||J v||^2 counts
three, and a product through a prefix of the network (the per-layer bounds) counts one like a whole one.
Everything counts: screening, ascent, certification and the per-layer bounds, so ``evaluations`` never
exceeds the budget. It is shared out in advance (``_Plan``): the certificate of the best point and a
one-shot per-layer bound are reserved, the search gets the rest but up to a quarter kept for refining
per-layer bounds; when the search's share runs out mid-step it stops there and the best point found so
far is certified. The per-layer bounds: one JVP of all the layers' values at once gives ||J_k(x) v|| for
every layer k at the certified point (checked by secants like the network's value); then, while budget
remains, each prefix gets its own power iteration (about twenty products a layer).

The default budget (``budget=None``) is 1000 products for the search plus what the certificate and the
per-layer bounds need, unless the network is too expensive for that: one forward pass is measured in
floating-point operations of its convolutions and matrix products (deterministic) plus an overhead per
node, and the
budget is capped at ``DEFAULT_WORK`` flop-equivalents, never below ``MIN_BUDGET``: about 40 s of one core
of the development machine, where ResNet-50 at 224x224 (8.2 GFLOP a pass) gets 24 products.

The graph is interpreted as loaded (before ``prepare``): exactly the file's function.
For a piecewise-linear network (ReLU, max pooling, linear layers) J(x) is the exact linear map of the
region around x, so the value is that region's exact Lipschitz constant; for a network with no
nonlinearity at all it is the exact global constant (up to the power iteration's convergence).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lipcheck import ops
from lipcheck.errors import LipcheckError
from lipcheck.graph import Graph, Node
from lipcheck.interpret import GraphFunction, interpret

DEFAULT_SEARCH = 1000  # the search's share of the default budget on networks that can afford it
DEFAULT_WORK = 2e11  # cap of the default budget: products x (forward flops + NODE_FLOPS x nodes)
NODE_FLOPS = 7e5  # a node's interpretation overhead in one product, in flop-equivalents (measured, float64)
MIN_BUDGET = 8  # one certificate: a product pass, two power-iteration products, a JVP, two secants
CERTIFY_ITERATIONS = 50  # power iterations at the best point before its certificate (fewer on small budgets)
SCREEN_ITERATIONS = 4  # power iterations per start while screening
ASCENT_ITERATIONS = 2  # warm-started power iterations per ascent trial
ASCENT_STARTS = 3  # starts the ascent continues from
RANDOM_STARTS = 4
PATIENCE = 12  # failed steps in a row (each halving the step) before the ascent restarts elsewhere
LAYER_ITERATIONS = 8
CHECK_COST = 5  # checking ||J v|| at a point: a JVP and two secants of two forward passes each
LAYER_ONE_SHOT = CHECK_COST  # every layer at once: one JVP of all their values, checked by secants
LAYER_REFINE = 1 + 2 * LAYER_ITERATIONS + CHECK_COST  # one prefix: power iteration, then its check
DENSE_LIMIT = 32  # exact SVD of J when the input or the output has at most this many entries
ROUNDING_SHAVE = 1e-9
AGREEMENT = 1e-4  # relative agreement required between ||J v|| and the secant
SECANT_WIDTHS = (1e-6, 1e-8)  # secant half-widths, relative to max(1, max |x|)
NUDGE = 1e-9  # random move of the certified point, relative to max(1, max |x|)
CERTIFY_CANDIDATES = 4


def _op_flag(node: Node, flag: str) -> bool:
    """An op's flag (``kinked``, ``piecewise_linear``); False for an op lipcheck does not know."""
    op = ops.get(node.op)
    return op is not None and bool(getattr(op, flag))


class LowerBoundError(LipcheckError):
    """The lower-bound search cannot run as asked (input data, range or shapes)."""


@dataclass(frozen=True)
class LowerSettings:
    """How to search. ``inputs``: a .npy/.npz path, an array (single-input model) or {input name: array}."""

    budget: int | None = None  # total products; None: the default, scaled down on expensive networks
    seed: int = 0
    inputs: str | os.PathLike[str] | np.ndarray | Mapping[str, np.ndarray] | None = None
    input_range: tuple[float, float] | None = None
    per_layer: bool = True


@dataclass
class LowerBound:
    """The result: ``value`` <= the true Lipschitz constant (on ``input_range`` when one is given)."""

    value: float
    start: str  # which start the best point came from: "zero", "centre", "random 2", "data 5"
    point: dict[str, np.ndarray]  # x, per input
    direction: dict[str, np.ndarray]  # v (unit norm over all inputs together)
    check: str  # "jvp" (||J v||, confirmed by the secant) or "secant" (a kink was within reach)
    evaluations: int
    seconds: float
    seed: int
    budget: int  # the total the search ran under (the default resolved)
    starts: int
    input_range: tuple[float, float] | None
    piecewise_linear: bool
    layers: dict[str, float] = field(default_factory=dict)  # layer name -> lower bound of its running constant

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "start": self.start,
            "check": self.check,
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 3),
            "seed": self.seed,
            "budget": self.budget,
            "starts": self.starts,
            "input_range": None if self.input_range is None else list(self.input_range),
            "piecewise_linear": self.piecewise_linear,
        }


# ---------------------------------------------------------------------------------------------
# Settings from the command line and files


def parse_input_range(text: str, prefix: str | None = None) -> tuple[float, float]:
    """'lo,hi' -> (lo, hi) with finite lo < hi; errors start with ``prefix`` (default: the flag and the text)."""
    prefix = prefix or f"--input-range {text!r}:"
    parts = text.split(",")
    try:
        lo, hi = (float(p) for p in parts) if len(parts) == 2 else (math.nan, math.nan)
    except ValueError:
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi)) or len(parts) != 2:
        raise LowerBoundError(f"{prefix} expected LO,HI with two finite numbers, e.g. 0,1 or -1,1")
    if not lo < hi:
        raise LowerBoundError(f"{prefix} LO must be below HI")
    return lo, hi


def _read_array_file(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    if not path.is_file():
        raise LowerBoundError(f"--inputs {path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise LowerBoundError(
            f"--inputs {path}: not a readable .npy or .npz file ({str(exc).splitlines()[0][:160]})"
        ) from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            return {key: np.asarray(loaded[key]) for key in loaded.files}
    return np.asarray(loaded)


def load_starts(
    source: str | os.PathLike[str] | np.ndarray | Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int | None, ...]],
) -> tuple[list[dict[str, np.ndarray]], dict[str, tuple[int, ...]]]:
    """User samples -> one {input: array of the input's shape} per sample, and the (completed) shapes.

    An array of the input's shape is one sample; with one more leading axis, a batch of samples; when
    the input's batch axis is 1, an array [N, ...rest] is N samples too. Unknown dims are taken from the data.
    """
    label = str(source) if isinstance(source, (str, os.PathLike)) else "data"
    data = _read_array_file(Path(source)) if isinstance(source, (str, os.PathLike)) else source
    names = list(shapes)
    if not isinstance(data, Mapping):
        if len(names) != 1:
            raise LowerBoundError(
                f"--inputs {label}: the model has {len(names)} inputs ({', '.join(names)}); "
                "pass an .npz file with one array per input name"
            )
        data = {names[0]: data}
    elif len(data) == 1 and len(names) == 1 and names[0] not in data:
        data = {names[0]: next(iter(data.values()))}
    unknown = sorted(set(data) - set(names))
    missing = [name for name in names if name not in data]
    if unknown or missing:
        raise LowerBoundError(
            f"--inputs {label}: arrays must be named after the model's inputs "
            f"({', '.join(names)}); missing {missing or 'none'}, unknown {unknown or 'none'}"
        )
    batches: dict[str, np.ndarray] = {}
    completed: dict[str, tuple[int, ...]] = {}
    for name in names:
        array = np.asarray(data[name])
        shape = shapes[name]
        if array.dtype.kind not in "fiu":
            raise LowerBoundError(f"--inputs {label}: input {name!r} has dtype {array.dtype}, expected numbers")
        samples = _as_samples(array, shape)
        if samples is None:
            wanted = "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"
            raise LowerBoundError(
                f"--inputs {label}: input {name!r} has shape {list(array.shape)}, which fits "
                f"neither the model's input shape {wanted} nor a batch [N, ...] of it"
            )
        if not np.isfinite(samples).all():
            raise LowerBoundError(f"--inputs {label}: input {name!r} holds NaN or infinite values")
        batches[name] = samples.astype(np.float64)
        completed[name] = tuple(samples.shape[1:])
    counts = {len(b) for b in batches.values()}
    if len(counts) != 1:
        raise LowerBoundError(f"--inputs {label}: the inputs hold different numbers of samples ({sorted(counts)})")
    count = counts.pop()
    return [{name: batches[name][i] for name in names} for i in range(count)], completed


def _fits(dims: Sequence[int], shape: Sequence[int | None]) -> bool:
    return len(dims) == len(shape) and all(s is None or s == d for d, s in zip(dims, shape, strict=True))


def _as_samples(array: np.ndarray, shape: Sequence[int | None]) -> np.ndarray | None:
    """[N, *shape] from one sample, a batch of samples, or a batch along the input's size-1 batch axis."""
    if _fits(array.shape, shape):
        return array[None]
    if array.ndim == len(shape) + 1 and _fits(array.shape[1:], shape):
        return array
    if shape and shape[0] in (1, None) and array.ndim == len(shape) and _fits(array.shape[1:], shape[1:]):
        return array[:, None]
    return None


# ---------------------------------------------------------------------------------------------
# The budget


class _Exhausted(Exception):
    """The budget, or the current phase's share of it, cannot pay for the next product."""


class _Budget:
    """Products spent against a total. ``limit`` is the current phase's ceiling: a product is paid for
    before it runs, and one that would pass the ceiling raises ``_Exhausted`` instead of running."""

    def __init__(self, total: int):
        self.total = self.limit = total
        self.spent = 0

    def take(self, count: int = 1) -> None:
        if self.spent + count > self.limit:
            raise _Exhausted
        self.spent += count

    @property
    def left(self) -> int:
        return self.limit - self.spent

    @contextmanager
    def phase(self, limit: int) -> Iterator[None]:
        """Lower the ceiling to ``limit`` (never above the total) for a while."""
        outer = self.limit
        self.limit = min(limit, outer)
        try:
            yield
        finally:
            self.limit = outer


@dataclass(frozen=True)
class _Plan:
    """How a total is shared out: the search, its certificate's power iterations, the per-layer reserve."""

    total: int
    search: int
    certify_iterations: int
    layer_reserve: int  # the one-shot per-layer bound, kept from the search and the certificate


def _certify_cost(iterations: int) -> int:
    """One certificate: a linearisation, the power iterations, then the check."""
    return 1 + 2 * iterations + CHECK_COST


def _plan(total: int, layers: int) -> _Plan:
    """An explicit budget, first come first served: a certificate (one power iteration), the one-shot
    per-layer bound, one screening, more certificate iterations (up to 8, or total / 20, at most 50), the
    search the rest, of which up to a quarter refines layers when that pays for at least one."""
    screening = 1 + 2 * SCREEN_ITERATIONS
    one_shot = LAYER_ONE_SHOT if layers and total >= _certify_cost(1) + LAYER_ONE_SHOT else 0
    room = 1 + (total - _certify_cost(1) - one_shot - screening) // 2
    iterations = max(1, min(CERTIFY_ITERATIONS, max(2 * SCREEN_ITERATIONS, total // 20), room))
    rest = max(0, total - _certify_cost(iterations) - one_shot)
    refine = min(LAYER_REFINE * layers, rest // 4) if rest // 4 >= LAYER_REFINE else 0
    return _Plan(total, rest - refine, iterations, one_shot)


def _default_plan(layers: int, cost: float, spent: int) -> _Plan:
    """The default: DEFAULT_SEARCH for the search and all the certificate and layers need, when the network's
    cost per product (flop-equivalents) allows that within DEFAULT_WORK; else what it allows (>= MIN_BUDGET).
    ``spent``: products already paid (the measuring pass), part of the total."""
    one_shot = LAYER_ONE_SHOT if layers else 0
    wanted = spent + DEFAULT_SEARCH + _certify_cost(CERTIFY_ITERATIONS) + one_shot + LAYER_REFINE * layers
    affordable = max(MIN_BUDGET + spent, int(DEFAULT_WORK // max(cost, 1.0)))
    if wanted <= affordable:
        return _Plan(wanted, DEFAULT_SEARCH, CERTIFY_ITERATIONS, one_shot)
    inner = _plan(affordable - spent, layers)
    return replace(inner, total=affordable)


def _argument(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _conv_flops(args: tuple, kwargs: dict, out: torch.Tensor) -> float:
    """2 x outputs x (input channels per group x kernel taps): the weight is (c_out, c_in / groups, *k)."""
    weight = _argument(args, kwargs, 1, "weight")
    return 2.0 * out.numel() * weight[0].numel()


def _conv_transpose_flops(args: tuple, kwargs: dict, out: torch.Tensor) -> float:
    """2 x inputs x (output channels per group x kernel taps): the weight is (c_in, c_out / groups, *k)."""
    weight = _argument(args, kwargs, 1, "weight")
    return 2.0 * _argument(args, kwargs, 0, "input").numel() * weight[0].numel()


def _matmul_flops(args: tuple, kwargs: dict, out: torch.Tensor) -> float:
    """2 x outputs x the contracted length (the first operand's last dimension)."""
    first = _argument(args, kwargs, 0, "input")
    return 2.0 * out.numel() * (first.shape[-1] if first.dim() else 1)


_FLOP_RULES: dict[Any, Any] = {
    **dict.fromkeys((F.conv1d, F.conv2d, F.conv3d), _conv_flops),
    **dict.fromkeys((F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d), _conv_transpose_flops),
    **dict.fromkeys(
        (torch.matmul, torch.mm, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__, F.linear), _matmul_flops
    ),
}


class _FlopCount(TorchFunctionMode):
    """Counts the flops of the convolutions and matrix products run under it (einsum and tensordot are
    left out: rare in the graphs, and the per-node overhead still counts them). torch's FlopCounterMode
    would do this at the dispatcher, but its first use imports torch's compiler: seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0.0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rule = _FLOP_RULES.get(func)
        if rule is not None and isinstance(out, torch.Tensor):
            self.flops += rule(args, kwargs, out)
        return out


# ---------------------------------------------------------------------------------------------
# The network as a function of one flat vector


class _FlatFunction:
    """f(x) with all inputs flattened into one vector and all outputs into another; every product it
    runs is paid from ``budget`` first (shared by the search, the certificate and the layer prefixes)."""

    def __init__(
        self,
        function: GraphFunction,
        shapes: dict[str, tuple[int, ...]],
        outputs: Sequence[str],
        budget: _Budget | None = None,
    ):
        self.function = function
        self.shapes = shapes
        self.sizes = [math.prod(shape) for shape in shapes.values()]
        self.outputs = list(outputs)
        self.budget = budget or _Budget(2**62)
        self.output_sizes: list[int] = []  # of each output, at the last evaluation
        self.constant = False  # the last linearisation's J does not depend on x

    @property
    def evaluations(self) -> int:
        return self.budget.spent

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def cost(self, x: torch.Tensor) -> float:
        """One forward pass's cost in flop-equivalents: the flops of its convolutions and matrix products,
        plus an overhead per node (what dominates on small, deep networks). Paid as one product."""
        self.budget.take()
        counter = _FlopCount()
        with counter, torch.no_grad():
            self(x)
        return counter.flops + NODE_FLOPS * len(self.function.nodes)

    def __call__(self, x: torch.Tensor, smooth: bool = False) -> torch.Tensor:
        feeds = {
            name: part.reshape(shape)
            for (name, shape), part in zip(self.shapes.items(), torch.split(x, self.sizes), strict=True)
        }
        values = self.function.run(feeds, self.outputs, smooth=smooth)
        self.output_sizes = [values[name].numel() for name in self.outputs]
        return torch.cat([values[name].to(x.dtype).reshape(-1) for name in self.outputs])

    def jvp(self, x: torch.Tensor, v: torch.Tensor, smooth: bool = False) -> torch.Tensor:
        """J(x) v as the derivative in w of (J^T w) . v (reverse over reverse).

        Forward-mode AD would be one pass cheaper, but in torch 2.x its rules for scalar arithmetic
        and matmul import torch's compiler (seconds, once per process); this stays on autograd."""
        self.budget.take()
        return self._jvp(x, v, smooth)

    def secant(self, x: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
        """f(x + t v) - f(x - t v): two forward passes, paid as two products."""
        self.budget.take(2)
        with torch.no_grad():
            return self(x + t * v) - self(x - t * v)

    def _jvp(self, x: torch.Tensor, v: torch.Tensor, smooth: bool) -> torch.Tensor:
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            y = self(leaf, smooth)
            if not y.requires_grad:
                return torch.zeros_like(y)
            w = torch.zeros_like(y, requires_grad=True)
            (pulled,) = torch.autograd.grad(y, leaf, w, create_graph=True)
            if not pulled.requires_grad:
                return torch.zeros_like(y)
            (jv,) = torch.autograd.grad(pulled, w, v, allow_unused=True)
        return torch.zeros_like(y) if jv is None else jv.detach()

    def linearise(self, x: torch.Tensor) -> _Linearisation:
        """J(x) as two products on one recorded forward pass (counts one evaluation)."""
        self.budget.take()
        jacobian = _Linearisation(self, x)
        self.constant = jacobian.constant
        return jacobian

    def top_singular(
        self,
        x: torch.Tensor,
        v: torch.Tensor,
        iterations: int,
        dense_limit: int = DENSE_LIMIT,
        partial: bool = False,
    ) -> tuple[float, torch.Tensor]:
        """(the largest ||J v|| seen over unit v, the last direction): exact SVD when J is small (at most
        ``dense_limit`` rows or columns, one product each), else power iteration on J^T J, where ||J v_k||
        never decreases, so the last iterate is the best direction. ``partial``: when the budget runs out
        after the linearisation, the best direction so far rather than ``_Exhausted``."""
        jacobian = self.linearise(x)
        best, best_v = -1.0, v
        try:
            if min(self.dim, jacobian.output_size) <= dense_limit:
                dense = jacobian.dense()
                if dense is not None and torch.isfinite(dense).all():
                    _, singular, vh = torch.linalg.svd(dense, full_matrices=False)
                    if singular.numel():
                        return float(singular[0]), vh[0]
            for _ in range(iterations):
                u = jacobian.jv(v)
                value = float(u.norm())
                if not math.isfinite(value):
                    break
                best, best_v = max(best, value), v
                w = jacobian.jtu(u)
                norm = float(w.norm())
                if not math.isfinite(norm) or norm == 0.0:
                    break
                v = best_v = w / norm
        except _Exhausted:
            if not partial:
                raise
        return best, best_v

    def ascent_direction(self, x: torch.Tensor, v: torch.Tensor, smooth: bool = False) -> torch.Tensor:
        """Gradient in x of ||J(x) v||^2 / 2 (of the smoothed network's J with ``smooth``).

        It equals H v, the Hessian of u . f at x times v with u = J(x) v held fixed: a double backward
        pass (reverse over reverse; reverse over forward would pull in torch's compiler for matmul).
        """
        self.budget.take(3)
        u = self._jvp(x, v, smooth)
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            y = self(leaf, smooth)
            if not y.requires_grad:
                return torch.zeros_like(leaf)
            (pulled,) = torch.autograd.grad((y * u).sum(), leaf, create_graph=True)
            if not pulled.requires_grad:  # J does not depend on x (a linear network)
                return torch.zeros_like(leaf)
            (grad,) = torch.autograd.grad((pulled * v).sum(), leaf, allow_unused=True)
        return torch.zeros_like(leaf) if grad is None else grad


class _Linearisation:
    """J(x) of a _FlatFunction at one point: J^T u by reverse mode, J v by reverse over reverse (the
    derivative in w of (J^T w) . v), both reusing one recorded forward pass; each product counts one."""

    def __init__(self, network: _FlatFunction, x: torch.Tensor):
        self.network = network
        with torch.enable_grad():
            self.leaf = x.detach().requires_grad_(True)
            self.y = network(self.leaf)
            self.w = torch.zeros_like(self.y, requires_grad=True)
            self.pulled = (
                torch.autograd.grad(self.y, self.leaf, self.w, create_graph=True)[0] if self.y.requires_grad else None
            )

    @property
    def output_size(self) -> int:
        return self.y.numel()

    @property
    def constant(self) -> bool:
        """J does not depend on x: the recorded J^T w has no path back to x (an affine network). Any
        nonlinearity (a ReLU's mask included) leaves a path, so this never calls a nonlinear map constant."""
        if self.pulled is None or self.pulled.grad_fn is None:
            return True
        seen: set[int] = set()
        stack = [self.pulled.grad_fn]
        while stack:
            node = stack.pop()
            if getattr(node, "variable", None) is self.leaf:
                return False
            for parent, _ in node.next_functions:
                if parent is not None and id(parent) not in seen:
                    seen.add(id(parent))
                    stack.append(parent)
        return True

    def jtu(self, u: torch.Tensor) -> torch.Tensor:
        self.network.budget.take()
        if not self.y.requires_grad:  # the output does not depend on the input
            return torch.zeros_like(self.leaf)
        (grad,) = torch.autograd.grad(self.y, self.leaf, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.leaf) if grad is None else grad

    def jv(self, v: torch.Tensor) -> torch.Tensor:
        self.network.budget.take()
        if self.pulled is None or not self.pulled.requires_grad:
            return torch.zeros_like(self.y).detach()
        (jv,) = torch.autograd.grad(self.pulled, self.w, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.y).detach() if jv is None else jv

    def dense(self) -> torch.Tensor | None:
        """The Jacobian, row by row (J^T e_i) or column by column (J e_j), whichever is fewer."""
        x = self.leaf
        try:
            if self.output_size <= x.numel():
                eye = torch.eye(self.output_size, dtype=x.dtype, device=x.device)
                return torch.stack([self.jtu(row) for row in eye])
            eye = torch.eye(x.numel(), dtype=x.dtype, device=x.device)
            return torch.stack([self.jv(column) for column in eye], dim=1)
        except (LipcheckError, _Exhausted):
            raise
        except Exception:
            return None


# ---------------------------------------------------------------------------------------------
# The search


@dataclass
class _Candidate:
    value: float
    x: torch.Tensor
    v: torch.Tensor
    start: str


def _unit(t: torch.Tensor) -> torch.Tensor:
    norm = float(t.norm())
    return t / norm if norm > 0 else t


def input_shapes_for_search(graph: Graph) -> dict[str, tuple[int | None, ...]]:
    shapes = {}
    for name in graph.inputs:
        shape = graph.shape(name)
        shapes[name] = tuple(shape) if shape is not None else ()
    return shapes


def lower_bound(
    graph: Graph,
    settings: LowerSettings | None = None,
    device: torch.device | str = "cpu",
    layer_outputs: Mapping[str, str] | None = None,
) -> LowerBound:
    """Search for the largest Jacobian norm of ``graph`` (the loaded graph, not yet prepared).

    ``layer_outputs``: {layer name: value name} of the layers whose running constant should get a
    lower bound too (the prefix of the network up to that value, at the best point found).
    On the CPU the search runs single-threaded (restored afterwards): its tensors are small, and
    intra-op threads cost more than they give (ten times more on a loaded machine).
    """
    threads = torch.get_num_threads()
    single = torch.device(device).type == "cpu"
    if single:
        torch.set_num_threads(1)
    try:
        return _search(graph, settings or LowerSettings(), torch.device(device), layer_outputs)
    finally:
        if single:
            torch.set_num_threads(threads)


def _search(
    graph: Graph, settings: LowerSettings, device: torch.device, layer_outputs: Mapping[str, str] | None
) -> LowerBound:
    _check_settings(settings)
    began = time.perf_counter()
    fixed, data_starts = _search_shapes(graph, settings)
    layers = dict(layer_outputs or {}) if settings.per_layer else {}
    search = _Search(interpret(graph, dtype=torch.float64, device=device), fixed, settings, device)
    starts = search.starts(data_starts)
    plan = search.plan(len(layers), starts[0][1])
    search.run(starts, plan)
    return search.result(plan, layers, began)


def _check_settings(settings: LowerSettings) -> None:
    if settings.budget is not None and settings.budget < MIN_BUDGET:
        raise LowerBoundError(
            f"--lower-budget {settings.budget}: must be at least {MIN_BUDGET} (one certified Jacobian norm)"
        )
    if settings.input_range is not None:
        lo, hi = settings.input_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise LowerBoundError(f"--input-range {lo},{hi}: expected finite LO < HI")


def _search_shapes(graph: Graph, settings: LowerSettings) -> tuple[dict[str, tuple[int, ...]], list[dict]]:
    """Every input's full shape (from the graph, or completed by the --inputs samples), and those samples."""
    shapes = input_shapes_for_search(graph)
    data_starts: list[dict[str, np.ndarray]] = []
    if settings.inputs is not None:
        data_starts, completed = load_starts(settings.inputs, shapes)
        shapes = dict(completed)
    unknown = {name: shape for name, shape in shapes.items() if not shape or any(d is None for d in shape)}
    if unknown:
        listed = ", ".join(
            f"{name} [{','.join('?' if d is None else str(d) for d in shape)}]" for name, shape in unknown.items()
        )
        raise LowerBoundError(
            f"the lower bound needs every input's full shape ({listed}); give --input-shape or --inputs"
        )
    return {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}, data_starts  # type: ignore[arg-type]


class _Search:
    """One search: screen the starts, climb from the best, restart while the search's share of the budget
    remains; then certify the best point and bound the layers with what the plan kept for them."""

    def __init__(
        self, function: GraphFunction, fixed: dict[str, tuple[int, ...]], settings: LowerSettings, device: torch.device
    ):
        self.function, self.fixed, self.settings, self.device = function, fixed, settings, device
        self.budget = _Budget(settings.budget if settings.budget is not None else 2**62)
        self.network = _FlatFunction(function, fixed, function.graph.outputs, self.budget)
        self.gen = torch.Generator(device="cpu").manual_seed(int(settings.seed))
        self.bounds = settings.input_range
        self.n = self.network.dim
        self.finalists: list[_Candidate] = []
        self.screened = 0
        self.affine = False  # J found constant at the first start: the search's share goes to power iteration
        self.spare = 0  # the search's share left unspent for that reason
        self.scale = (self.bounds[1] - self.bounds[0]) if self.bounds is not None else 1.0
        self.trial_cost = 4 + 2 * ASCENT_ITERATIONS
        self.kinked = any(_op_flag(node, "kinked") for node in function.nodes)

    def randn(self, *size: int) -> torch.Tensor:
        return torch.randn(*size, generator=self.gen, dtype=torch.float64).to(self.device)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.bounds is None else x.clamp(self.bounds[0], self.bounds[1])

    def plan(self, layers: int, x: torch.Tensor) -> _Plan:
        """The given budget shared out, or the default one (measured on one forward pass at ``x``)."""
        if self.settings.budget is not None:
            return _plan(self.settings.budget, layers)
        plan = _default_plan(layers, self.network.cost(x), self.budget.spent)
        self.budget.total = self.budget.limit = plan.total
        return plan

    def starts(self, data_starts: list[dict[str, np.ndarray]]) -> list[tuple[str, torch.Tensor]]:
        """The data samples, then zero (or the box's centre) and random points."""
        n, found = self.n, []
        for i, sample in enumerate(data_starts):
            parts = [torch.as_tensor(sample[name], dtype=torch.float64).reshape(-1) for name in self.fixed]
            found.append((f"data {i}", self.project(torch.cat(parts).to(self.device))))
        if self.bounds is None:
            found.append(("zero", torch.zeros(n, dtype=torch.float64, device=self.device)))
            return found + [(f"random {i}", self.randn(n)) for i in range(RANDOM_STARTS)]
        lo, hi = self.bounds
        found.append(("centre", torch.full((n,), (lo + hi) / 2, dtype=torch.float64, device=self.device)))
        uniform = torch.rand(RANDOM_STARTS, n, generator=self.gen, dtype=torch.float64).to(self.device)
        return found + [(f"random {i}", lo + (hi - lo) * uniform[i]) for i in range(RANDOM_STARTS)]

    def run(self, starts: list[tuple[str, torch.Tensor]], plan: _Plan) -> None:
        """Screen and climb within the search's share; a product it cannot pay for ends the search there.
        With no start screened (a tiny budget), the first start and a random direction go to certification."""
        began = self.budget.spent
        with self.budget.phase(began + plan.search):
            screened = self.screen(starts, began, plan.search)
            if self.affine:
                self.spare = self.budget.left
            else:
                with suppress(_Exhausted):
                    self.climb(screened)
        if not self.finalists:
            self.finalists = [_Candidate(-1.0, starts[0][1], _unit(self.randn(self.n)), starts[0][0])]

    def screen(self, starts: list[tuple[str, torch.Tensor]], began: int, share: int) -> list[_Candidate]:
        """A few power iterations at each start, best first (many samples: what half the share allows)."""
        screened: list[_Candidate] = []
        exhausted = False
        for label, x in starts:
            if screened and self.budget.spent - began >= share // 2:
                break
            try:
                value, v = self.network.top_singular(x, _unit(self.randn(self.n)), SCREEN_ITERATIONS)
            except _Exhausted:
                exhausted = True
                break
            if math.isfinite(value) and value >= 0:
                screened.append(_Candidate(value, x, v, label))
                if self.network.constant:  # the same J everywhere: other starts and the ascent are moot
                    self.affine = True
                    break
        if not screened and not exhausted:
            raise LowerBoundError("the network's Jacobian is not finite at any starting point")
        screened.sort(key=lambda c: -c.value)
        self.finalists = list(screened[:CERTIFY_CANDIDATES])
        self.screened = len(screened)
        return screened

    def climb(self, screened: list[_Candidate]) -> None:
        """Ascend from the best starts, sharing the budget; restart from random points while budget remains."""
        budget, network = self.budget, self.network
        chosen = screened[:ASCENT_STARTS]
        for index, candidate in enumerate(chosen):
            self.ascend(candidate, budget.spent + budget.left // (len(chosen) - index))
        restart = 0
        while budget.left >= 8 * self.trial_cost:  # the ascents collapsed early: restart
            if self.bounds is None:
                x = self.randn(self.n)
            else:
                uniform = torch.rand(self.n, generator=self.gen, dtype=torch.float64).to(self.device)
                x = self.bounds[0] + (self.bounds[1] - self.bounds[0]) * uniform
            value, v = network.top_singular(x, _unit(self.randn(self.n)), SCREEN_ITERATIONS)
            restart += 1
            if math.isfinite(value):
                share = max(budget.left // 2, 8 * self.trial_cost)
                self.ascend(_Candidate(value, x, v, f"restart {restart}"), budget.spent + share)

    def ascend(self, current: _Candidate, stop_at: int) -> None:
        """Normalised gradient steps while they pay, until PATIENCE failures in a row or the share is spent.

        With ReLUs the Jacobian is piecewise constant: the gradient comes from the smoothed network, and
        every second step of a failing streak explores a random direction. The best point reached is a
        finalist even when the budget runs out mid-step."""
        network, n = self.network, self.n
        step = 0.25 * self.scale * math.sqrt(n)
        failures = 0
        try:
            while network.evaluations + self.trial_cost <= stop_at and failures < PATIENCE:
                if self.kinked and failures % 2 == 1:
                    gradient = self.randn(n)
                else:
                    gradient = network.ascent_direction(current.x, current.v, smooth=self.kinked)
                if not torch.isfinite(gradient).all() or float(gradient.norm()) <= 1e-12 * max(current.value, 1e-300):
                    gradient = self.randn(n)  # a locally constant Jacobian (piecewise-linear networks): explore
                trial_x = self.project(current.x + step * _unit(gradient))
                value, v = network.top_singular(trial_x, current.v, ASCENT_ITERATIONS)
                if math.isfinite(value) and value > current.value:
                    self.finalists.append(current)
                    current = _Candidate(value, trial_x, v, current.start)
                    step *= 1.5
                    failures = 0
                else:
                    step *= 0.5
                    failures += 1
        finally:
            self.finalists.append(current)

    def result(self, plan: _Plan, layers: Mapping[str, str], began: float) -> LowerBound:
        """The best finalist certified, and the per-layer lower bounds at its point."""
        self.finalists.sort(key=lambda c: -c.value)
        with self.budget.phase(self.budget.total - plan.layer_reserve):
            iterations = plan.certify_iterations + self.spare // 2
            best = _certify(self.network, self.finalists[:CERTIFY_CANDIDATES], self.bounds, self.gen, iterations)
        certified, check, x_certified, v_certified, best_start = best
        found = self.layer_bounds(layers, x_certified, v_certified) if layers else {}
        return LowerBound(
            value=certified,
            start=best_start,
            point=self.unflatten(x_certified),
            direction=self.unflatten(v_certified),
            check=check,
            evaluations=self.budget.spent,
            seconds=time.perf_counter() - began,
            seed=int(self.settings.seed),
            budget=self.budget.total,
            starts=self.screened,
            input_range=self.bounds,
            piecewise_linear=all(_op_flag(node, "piecewise_linear") for node in self.function.nodes),
            layers=found,
        )

    def layer_bounds(self, layers: Mapping[str, str], x: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
        """Every layer's running constant at the certified point: all at once along v, then each prefix's
        own power iteration while the budget lasts (in graph order); the larger of the two is kept."""
        found = _one_shot(self.function, self.fixed, layers, x, v, self.budget)
        try:
            for layer, value_name in layers.items():
                if self.budget.left < LAYER_REFINE:
                    break
                refined = _layer_bound(self.function, self.fixed, value_name, x, v, self.budget)
                if refined is not None:
                    found[layer] = max(found.get(layer, refined), refined)
        except _Exhausted:
            pass
        return {layer: found[layer] for layer in layers if layer in found}

    def unflatten(self, flat: torch.Tensor) -> dict[str, np.ndarray]:
        parts = torch.split(flat, self.network.sizes)
        return {
            name: part.reshape(shape).cpu().numpy()
            for (name, shape), part in zip(self.fixed.items(), parts, strict=True)
        }


def _nudged(x: torch.Tensor, bounds: tuple[float, float] | None, gen: torch.Generator, t: float) -> torch.Tensor:
    """x moved by a random 1e-9 (relative) so no kink sits exactly under it, kept t inside the domain."""
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    moved = x + NUDGE * max(1.0, float(x.abs().max())) * noise
    if bounds is not None:
        lo, hi = bounds
        margin = min(t, (hi - lo) / 4)
        moved = moved.clamp(lo + margin, hi - margin)
    return moved


def _segment_norms(vector: torch.Tensor, sizes: Sequence[int]) -> list[float]:
    return [float(part.norm()) for part in torch.split(vector, list(sizes))]


def _certified_values(
    network: _FlatFunction, x: torch.Tensor, v: torch.Tensor, per_output: bool = False
) -> list[tuple[float, str]]:
    """For the whole output (or each of the network's outputs): ||J(x) v|| / ||v|| when a secant through x
    along v confirms it, else the best secant (both lower bounds). A JVP and two or four forward passes.

    Secants over [x - t v, x + t v] for two widths t: a kink (ReLU boundary) within the wider one may
    spare the narrower one.
    """
    v = _unit(v)
    jv = network.jvp(x, v)
    sizes = list(network.output_sizes) if per_output else [jv.numel()]
    rayleigh = _segment_norms(jv, sizes)
    found: list[tuple[float, str] | None] = [None] * len(sizes)
    secants: list[list[float]] = [[] for _ in sizes]
    for relative in SECANT_WIDTHS:
        if all(item is not None for item in found):
            break
        t = relative * max(1.0, float(x.abs().max()))
        for k, norm in enumerate(_segment_norms(network.secant(x, v, t), sizes)):
            secant, value = norm / (2 * t), rayleigh[k]
            if found[k] is not None:
                continue
            if math.isfinite(value) and abs(value - secant) <= AGREEMENT * max(value, secant):
                found[k] = (value * (1 - ROUNDING_SHAVE), "jvp")
            elif math.isfinite(secant):
                secants[k].append(secant)
    return [
        item if item is not None else (max(secants[k], default=0.0) * (1 - ROUNDING_SHAVE), "secant")
        for k, item in enumerate(found)
    ]


def _certify(
    network: _FlatFunction,
    candidates: list[_Candidate],
    bounds: tuple[float, float] | None,
    gen: torch.Generator,
    iterations: int,
) -> tuple[float, str, torch.Tensor, torch.Tensor, str]:
    """The best certified value over the best few candidates (a candidate on a kink may not certify).

    The plan reserves the first candidate's certificate; the power iteration there stops early rather
    than eat into the JVP and secants (a dense Jacobian only when it costs no more than the iterations).
    Later candidates are certified while the budget lasts."""
    best: tuple[float, str, torch.Tensor, torch.Tensor, str] | None = None
    budget = network.budget
    for candidate in candidates:
        if best is not None and candidate.value <= best[0]:
            break
        t = SECANT_WIDTHS[0] * max(1.0, float(candidate.x.abs().max()))
        x = _nudged(candidate.x, bounds, gen, t)
        try:
            with budget.phase(budget.limit - CHECK_COST):
                _, v = network.top_singular(x, candidate.v, iterations, min(DENSE_LIMIT, 2 * iterations), partial=True)
            ((value, check),) = _certified_values(network, x, v)
        except _Exhausted:
            if best is None:
                raise
            break
        if best is None or value > best[0]:
            best = (value, check, x, _unit(v), candidate.start)
    assert best is not None
    return best


def _one_shot(
    function: GraphFunction,
    shapes: dict[str, tuple[int, ...]],
    layers: Mapping[str, str],
    x: torch.Tensor,
    v: torch.Tensor,
    budget: _Budget,
) -> dict[str, float]:
    """||J_k(x) v|| for every layer k by one JVP of all their values together (plus two secants): a lower
    bound of each running constant for LAYER_ONE_SHOT products however many layers there are. Empty when
    the budget cannot pay or some value cannot be differentiated (the prefixes are then tried one by one)."""
    names = list(dict.fromkeys(layers.values()))
    if not names or budget.left < LAYER_ONE_SHOT:
        return {}
    together = _FlatFunction(function, shapes, names, budget)
    try:
        values = _certified_values(together, x, v, per_output=True)
    except (LipcheckError, _Exhausted):
        raise
    except Exception:
        return {}
    by_value = {name: value for name, (value, _) in zip(names, values, strict=True) if math.isfinite(value)}
    return {layer: by_value[name] for layer, name in layers.items() if name in by_value}


def _layer_bound(
    function: GraphFunction,
    shapes: dict[str, tuple[int, ...]],
    value_name: str,
    x: torch.Tensor,
    v: torch.Tensor,
    budget: _Budget,
) -> float | None:
    """A lower bound of the running constant at ``value_name`` (the prefix network's Jacobian norm at x),
    paid from ``budget``; None when the value is not a function of the inputs alone."""
    prefix = _FlatFunction(function, shapes, [value_name], budget)
    try:
        _, direction = prefix.top_singular(x, v, LAYER_ITERATIONS)
        ((value, _),) = _certified_values(prefix, x, direction)
    except (LipcheckError, _Exhausted):
        raise
    except Exception:
        return None
    return value if math.isfinite(value) else None
