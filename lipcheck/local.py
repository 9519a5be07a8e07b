"""Local Lipschitz constants around data (``lipcheck report --around FILE --radius R``).

For each sample x_i the domain is the ball B(x_i, R) (l2, or l-infinity), inside the --input-range box when one
is given: its value ranges (``lipcheck.ranges``) turn stable ReLUs into exact slopes and products, quotients
and attention into finite constants, and ``certify_prepared`` bounds the network there. Beside each certified
bound: the largest difference quotient found inside the same ball (a true lower bound of the local constant),
and, with labels, the certified robust radius min(R, margin / (sqrt(2) L_i)): the margin f_y - max_j f_j moves
by at most sqrt(2) L_i ||d|| for a perturbation d inside the ball.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lipcheck.domain import Domain
from lipcheck.errors import LipcheckError
from lipcheck.graph import Graph
from lipcheck.interpret import interpret

ACCURACY_FRACTIONS = (0.25, 0.5, 1.0)  # certified accuracy at these fractions of R


class LocalError(LipcheckError):
    """--around: samples, labels or a model that local bounds cannot use."""


@dataclass
class SampleResult:
    index: int
    upper: float | None
    lower: float | None = None
    label: int | None = None
    predicted: int | None = None
    margin: float | None = None
    certified_radius: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "upper": self.upper,
            "lower": self.lower,
            "label": self.label,
            "predicted": self.predicted,
            "margin": self.margin,
            "certified_radius": self.certified_radius,
            "seconds": round(self.seconds, 4),
        }


@dataclass
class LocalResult:
    radius: float
    norm: str
    samples: list[SampleResult] = field(default_factory=list)

    @property
    def max(self) -> float | None:
        uppers = [s.upper for s in self.samples]
        return None if not uppers or any(u is None for u in uppers) else max(uppers)  # type: ignore[type-var]

    def certified_accuracy(self, radii: tuple[float, ...] | None = None) -> list[dict[str, float]] | None:
        """The share of labelled samples certified robust at each radius (default R/4, R/2, R)."""
        labelled = [s for s in self.samples if s.label is not None]
        if not labelled:
            return None
        chosen = radii or tuple(self.radius * fraction for fraction in ACCURACY_FRACTIONS)
        return [
            {"radius": r, "accuracy": sum((s.certified_radius or 0.0) >= r for s in labelled) / len(labelled)}
            for r in chosen
        ]

    def to_dict(self, radii: tuple[float, ...] | None = None) -> dict[str, Any]:
        seconds = [s.seconds for s in self.samples]
        labelled = [s for s in self.samples if s.label is not None]
        return {
            "radius": self.radius,
            "norm": self.norm,
            "max": self.max,
            "seconds_per_sample": sum(seconds) / len(seconds) if seconds else 0.0,
            "samples": [s.to_dict() for s in self.samples],
            "clean_accuracy": sum(s.predicted == s.label for s in labelled) / len(labelled) if labelled else None,
            "certified_accuracy": self.certified_accuracy(radii),
        }


# ---------------------------------------------------------------------------------------------
# Reading samples and labels


def load_samples(path: str | os.PathLike[str], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """The samples of ``path`` as [N, *shape[1:]] float64 (and the labels an .npz or .pt holds as 'y')."""
    found, labels = _read_arrays(Path(path), "--around")
    sample = math.prod(shape[1:])
    array = np.asarray(found, dtype=np.float64) if found.dtype.kind in "fiu" else None
    if array is None:
        raise LocalError(f"--around {path}: expected numbers, got {found.dtype}")
    if array.size == sample:
        array = array.reshape(1, -1)
    if array.ndim < 1 or array.shape[0] == 0 or array.size != array.shape[0] * sample:
        raise LocalError(
            f"--around {path}: shape {list(found.shape)} is not a batch of inputs of shape {list(shape[1:])}"
        )
    if not np.isfinite(array).all():
        raise LocalError(f"--around {path}: holds NaN or infinite values")
    return array.reshape(array.shape[0], *shape[1:]), labels


def load_labels(path: str | os.PathLike[str], count: int) -> np.ndarray:
    found, inner = _read_arrays(Path(path), "--labels")
    labels = inner if inner is not None else found
    if labels.dtype.kind not in "iu" and not (labels.dtype.kind == "f" and np.all(labels == np.round(labels))):
        raise LocalError(f"--labels {path}: expected integer class labels, got {labels.dtype}")
    labels = labels.reshape(-1).astype(np.int64)
    if labels.shape[0] != count:
        raise LocalError(f"--labels {path}: {labels.shape[0]} labels for {count} samples")
    return labels


def _read_arrays(path: Path, flag: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(the samples, the labels 'y' when the file holds them) from .npy, .npz or .pt (tensors only)."""
    if not path.is_file():
        raise LocalError(f"{flag} {path}: no such file")
    try:
        if path.suffix == ".pt":
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            data = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy's and torch's errors differ; one line either way
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise LocalError(f"{flag} {path}: not a readable .npy, .npz or .pt file ({detail})") from None
    if isinstance(data, torch.Tensor):
        return data.detach().numpy(), None
    if isinstance(data, np.ndarray):
        return data, None
    items = dict(data.items()) if hasattr(data, "items") else {}
    items = {k: (v.detach().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in items.items()}
    samples = next((items[k] for k in ("x", "X", "inputs", "samples") if k in items), None)
    if samples is None and len(items) - ("y" in items) == 1:
        samples = next(v for k, v in items.items() if k != "y")
    if samples is None:
        raise LocalError(f"{flag} {path}: expected one array (or 'x' and 'y'), found {', '.join(items) or 'none'}")
    return samples, items.get("y")


# ---------------------------------------------------------------------------------------------
# Per sample: the certified bound, a lower bound in the same ball, the margin


def difference_quotient_lower(
    function: Any, centre: torch.Tensor, radius: float, norm: str, box: tuple[torch.Tensor, torch.Tensor], tries: int
) -> float:
    """The largest ||f(a) - f(b)|| / ||a - b|| found for a, b inside the ball (and the box): power iteration on
    the Jacobian at the centre and at random points gives directions, each measured as a true secant."""
    generator = torch.Generator().manual_seed(0)
    best = 0.0
    points = [centre]
    for _ in range(tries):
        step = torch.randn(centre.shape, generator=generator, dtype=torch.float64)
        points.append(_project(centre + step * (radius / 2 / _norm(step, norm)), centre, radius, norm, box))
    for point in points:
        direction = _top_direction(function, point, generator)
        for scale in (1e-3, 1e-1, 0.5):
            h = direction * (radius * scale)
            a = _project(point + h, centre, radius, norm, box)
            b = _project(point - h, centre, radius, norm, box)
            gap = float((a - b).norm())
            if gap > 0:
                best = max(best, float((function(a) - function(b)).norm()) / gap)
    return best


def _top_direction(function: Any, point: torch.Tensor, generator: torch.Generator, steps: int = 12) -> torch.Tensor:
    v = torch.randn(point.shape, generator=generator, dtype=torch.float64)
    v = v / v.norm()
    for _ in range(steps):
        jv = torch.func.jvp(function, (point,), (v,))[1]
        pullback = torch.func.vjp(function, point)[1]
        w = pullback(jv)[0]
        size = w.norm()
        if not size > 0:
            break
        v = w / size
    return v


def _norm(x: torch.Tensor, norm: str) -> float:
    return float(x.abs().max()) if norm == "inf" else float(x.norm())


def _project(
    x: torch.Tensor, centre: torch.Tensor, radius: float, norm: str, box: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    shift = x - centre
    if norm == "inf":
        shift = shift.clamp(-radius, radius)
    else:
        size = float(shift.norm())
        shift = shift * min(1.0, radius / size) if size > 0 else shift
    return torch.minimum(torch.maximum(centre + shift, box[0]), box[1])


def margin_of(logits: torch.Tensor, label: int) -> tuple[int, float]:
    """(the predicted class, f_label - max of the other classes)."""
    flat = logits.reshape(-1)
    others = torch.cat([flat[:label], flat[label + 1 :]])
    return int(flat.argmax()), float(flat[label] - others.max()) if others.numel() else math.inf


def run_local(
    loaded: Graph,
    samples: np.ndarray,
    domain: Domain,
    radius: float,
    norm: str,
    certify: Any,
    labels: np.ndarray | None = None,
    lower_tries: int | None = None,
) -> tuple[LocalResult, Any]:
    """Every sample's certified local bound (``certify(domain)`` returns a Certificate), with the lower bound when
    ``lower_tries`` is given and the robust radius when ``labels`` are; also the worst sample's certificate."""
    result = LocalResult(radius, norm)
    name = loaded.inputs[0]
    shape = tuple(int(d) for d in loaded.shape(name))  # type: ignore[union-attr, arg-type]
    function = interpret(loaded, torch.float64)
    worst: Any = None
    for index, sample in enumerate(samples):
        started = time.perf_counter()
        ball = domain.around(sample, radius, norm)
        found = certify(ball)
        upper = found.upper_bound
        entry = SampleResult(index, upper)
        if _worse(found, worst):
            worst = found
        centre = torch.as_tensor(sample, dtype=torch.float64).reshape(shape)
        box = ball.interval(shape)
        if lower_tries is not None:
            entry.lower = difference_quotient_lower(function, centre, radius, norm, (box.lo, box.hi), lower_tries)
        if labels is not None:
            with torch.no_grad():
                logits = function(centre)
            entry.label = int(labels[index])
            output = logits if isinstance(logits, torch.Tensor) else logits[0]
            entry.predicted, entry.margin = margin_of(output, entry.label)
            correct = entry.predicted == entry.label and entry.margin > 0
            entry.certified_radius = 0.0 if not correct else _robust_radius(entry.margin, upper, radius)
        entry.seconds = time.perf_counter() - started
        result.samples.append(entry)
    return result, worst


def _worse(found: Any, worst: Any) -> bool:
    """Whether ``found`` has a larger bound than ``worst`` (no bound counts as infinite)."""
    if worst is None:
        return True
    if worst.upper_bound is None:
        return False
    return found.upper_bound is None or found.upper_bound > worst.upper_bound


def _robust_radius(margin: float, upper: float | None, radius: float) -> float:
    if upper is None:
        return 0.0
    if upper == 0:
        return radius
    return min(radius, margin / (math.sqrt(2) * upper))
