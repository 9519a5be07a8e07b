"""Input domains: where a network's inputs lie, so that its bound holds there (and is finite where the
network is not globally Lipschitz).

A ``Domain`` is a box of inputs: ``[low, high]`` per entry (a scalar, or per channel), the same for every
graph input, optionally the image of a normalisation ((x - mean) / std for x in the box), optionally cut to
the l2 or l-infinity ball of ``radius`` around one sample (``around``). ``lipcheck.ranges`` turns it into an
interval for every value of the graph. A bound computed on a domain is labelled with it, never called global.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from lipcheck.errors import LipcheckError
from lipcheck.graph import Graph
from lipcheck.ops.base import Interval


@dataclass(frozen=True)
class Domain:
    """A box of inputs, possibly the image of a normalisation and cut to a ball around a sample."""

    low: tuple[float, ...] = (-math.inf,)  # one value, or one per channel (axis 1)
    high: tuple[float, ...] = (math.inf,)
    mean: tuple[float, ...] | None = None  # the model's inputs are (x - mean) / std for x in [low, high]
    std: tuple[float, ...] | None = None
    radius: float | None = None  # a ball of this radius around ``centre``
    norm: str = "2"
    centre: np.ndarray | None = None  # one sample (the input's shape without the batch axis, or with it)

    @property
    def bounded(self) -> bool:
        """Whether the domain is bounded (a box with finite ends, or a ball)."""
        return self.radius is not None or all(math.isfinite(v) for v in (*self.low, *self.high))

    @property
    def kind(self) -> str:
        return "ball" if self.radius is not None else "box"

    def around(self, centre: np.ndarray, radius: float, norm: str = "2") -> Domain:
        """This domain cut to the ball of ``radius`` (l2 or l-infinity) around ``centre``."""
        return replace(self, centre=np.asarray(centre, dtype=np.float64), radius=float(radius), norm=norm)

    def box_text(self) -> str:
        """'[0, 1]', '[0, 1] per channel: ...' or the normalised form."""
        if len(self.low) == 1 and len(self.high) == 1:
            text = f"[{self.low[0]:g}, {self.high[0]:g}]"
        else:
            text = (
                "[" + ", ".join(f"{lo:g}..{hi:g}" for lo, hi in zip(*_paired(self.low, self.high), strict=True)) + "]"
            )
        if self.mean is not None and self.std is not None:
            text += f" normalised by mean {_numbers(self.mean)}, std {_numbers(self.std)}"
        return text

    def inner_box(self) -> tuple[float, float]:
        """[lo, hi] inside every channel's box (normalised): a lower bound searched there holds for the domain."""
        channels = max(len(self.low), len(self.high), len(self.mean or ()), len(self.std or ()))
        box = self.interval((1, channels) if channels > 1 else (1,))
        low, high = float(box.lo.max()), float(box.hi.min())
        if not low < high:
            raise DomainError(f"the channels' boxes of {self.box_text()} have no common part for --lower to search in")
        return low, high

    def text(self) -> str:
        """How the report names the domain."""
        if self.radius is not None:
            ball = f"l{'-inf' if self.norm == 'inf' else '2'} ball of radius {self.radius:g} around each sample"
            return (
                ball if not math.isfinite(self.low[0]) and len(self.low) == 1 else f"{ball}, inside {self.box_text()}"
            )
        return f"inputs in {self.box_text()}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON report's ``domain``."""
        finite = all(math.isfinite(v) for v in (*self.low, *self.high))
        return {
            "kind": self.kind,
            "text": self.text(),
            "input_range": [list(self.low), list(self.high)] if finite else None,
            "normalize": None if self.mean is None else {"mean": list(self.mean), "std": list(self.std or ())},
            "radius": self.radius,
            "norm": self.norm if self.radius is not None else None,
        }

    # -- the intervals of the graph's inputs
    def input_ranges(self, graph: Graph) -> dict[str, Interval]:
        """An interval for every float input of ``graph`` whose shape is known (one sample: batch 1)."""
        found = {}
        for name in graph.inputs:
            shape = graph.shape(name)
            if graph.is_discrete(name) or shape is None or any(not isinstance(d, int) for d in shape):
                continue
            found[name] = self.interval(tuple(int(d) for d in shape))  # type: ignore[arg-type]
        return found

    def balls(self, graph: Graph) -> dict[str, tuple[torch.Tensor, float]]:
        """The inputs in an l2 ball, by name: (centre of the input's shape, radius); none for a box."""
        if self.radius is None or self.centre is None or self.norm != "2":
            return {}
        found = {}
        for name, interval in self.input_ranges(graph).items():
            found[name] = (torch.as_tensor(self.centre, dtype=torch.float64).reshape(interval.lo.shape), self.radius)
        return found

    def interval(self, shape: tuple[int, ...]) -> Interval:
        """The box of one input of ``shape`` (its first axis the batch, of size 1)."""
        low, high = self._channels(self.low, shape), self._channels(self.high, shape)
        if self.mean is not None and self.std is not None:
            mean, std = self._channels(self.mean, shape), self._channels(self.std, shape)
            ends = torch.stack([(low - mean) / std, (high - mean) / std])
            low, high = ends.min(dim=0).values, ends.max(dim=0).values
            low, high = low - 2.0**-50 * low.abs(), high + 2.0**-50 * high.abs()
        if self.radius is not None and self.centre is not None:
            centre = torch.as_tensor(self.centre, dtype=torch.float64).reshape(shape)
            low, high = torch.maximum(low, centre - self.radius), torch.minimum(high, centre + self.radius)
        return Interval(low.broadcast_to(shape).clone(), high.broadcast_to(shape).clone())

    @staticmethod
    def _channels(values: Sequence[float], shape: tuple[int, ...]) -> torch.Tensor:
        tensor = torch.tensor(list(values), dtype=torch.float64)
        if tensor.numel() == 1:
            return tensor.reshape(())
        if len(shape) < 2 or shape[1] != tensor.numel():
            raise DomainError(
                f"{tensor.numel()} per-channel values (--channel-range, --normalize-mean/--normalize-std) "
                f"for an input of shape {list(shape)}"
            )
        return tensor.reshape(1, -1, *([1] * (len(shape) - 2)))


class DomainError(LipcheckError):
    """A domain that does not fit the model's inputs."""


def _paired(low: tuple[float, ...], high: tuple[float, ...]) -> tuple[list[float], list[float]]:
    count = max(len(low), len(high))
    return [low[i % len(low)] for i in range(count)], [high[i % len(high)] for i in range(count)]


def _numbers(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)
