"""Dense-Jacobian reference for lower-bound tests (no imports beyond torch and lipcheck)."""

from __future__ import annotations

import numpy as np
import torch

from lipcheck.graph import Graph
from lipcheck.interpret import interpret


def brute_force_norm(graph: Graph, point: dict[str, np.ndarray]) -> float:
    """sigma_max of the dense Jacobian (torch.autograd.functional.jacobian, float64) at ``point``."""
    function = interpret(graph)
    names = list(point)
    sizes = [point[name].size for name in names]

    def flat(x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, sizes)
        feeds = {name: part.reshape(point[name].shape) for name, part in zip(names, parts, strict=True)}
        values = function.run(feeds)
        return torch.cat([v.reshape(-1) for v in values.values()])

    x = torch.cat([torch.as_tensor(point[name], dtype=torch.float64).reshape(-1) for name in names])
    jac = torch.autograd.functional.jacobian(flat, x)
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), ord=2))
