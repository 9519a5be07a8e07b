"""Memory budget (``--max-memory``): how many weight bytes lipcheck may hold at once.

Frontends register weights as lazily read constants (``lipcheck.graph.LazyConstants``). This module
decides the size of their cache: everything when the weights fit in the budget, otherwise a cache
small enough that the process (interpreter, torch, the model's structure, one layer's weights and
the spectral algorithms' working memory) stays under the budget, so the model is bounded a layer at
a time, re-reading weights from the file when a later node needs them again.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from lipcheck.errors import LipcheckError

GIB = 1024**3
MIB = 1024**2
# Working memory of the spectral algorithms beyond the weights they read: float64 copies, Gram
# matrices, FFT chunks (conv.py caps its per-frequency blocks at ~256 MiB).
WORKING_MEMORY_FLOOR = 384 * MIB
WORKING_MEMORY_PER_WEIGHT_BYTE = 6  # a float32 weight becomes float64 (2x), scaled (2x), Gram/abs temporaries
# Without --max-memory: weights of in-file models are held once; external data is cached up to this.
DEFAULT_CACHE_BYTES = 1 * GIB

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": MIB,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": GIB,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


class MemoryBudgetError(LipcheckError):
    """--max-memory is malformed or too small for the model's largest layer."""


def parse_memory_size(text: str | int | float, what: str = "--max-memory") -> int:
    """'2GiB', '1.5 GB', '800MiB', '4g' or a number of bytes -> bytes."""
    if isinstance(text, bool):
        raise MemoryBudgetError(f"{what}: expected a size like 2GiB or 800MB, got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
        if match is None or match.group(2).lower() not in _UNITS:
            raise MemoryBudgetError(f"{what}: expected a size like 2GiB, 1.5GB or 800MiB, got {text!r}")
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise MemoryBudgetError(f"{what}: must be positive, got {text!r}")
    return size


def format_size(size: int) -> str:
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"


def current_rss() -> int:
    """Resident memory of this process now (Linux /proc; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class MemoryPlan:
    """How many bytes of weights to keep loaded, and whether the model is bounded layer by layer."""

    cache_bytes: int | None  # None: keep every weight once loaded
    layer_at_a_time: bool
    reason: str


def working_memory(largest_tensor: int) -> int:
    """Memory one layer's bound needs beyond the weights held in the cache."""
    return max(WORKING_MEMORY_FLOOR, WORKING_MEMORY_PER_WEIGHT_BYTE * largest_tensor)


def plan_memory(budget: int | None, weight_bytes: int, largest_tensor: int, resident: int) -> MemoryPlan:
    """Size the weight cache so that ``resident`` + cache + working memory stays within ``budget``.

    ``weight_bytes``: the re-readable weights in total; ``largest_tensor``: the biggest of them;
    ``resident``: what the process holds besides them (interpreter, libraries, the graph).
    Without a budget, weights up to ``DEFAULT_CACHE_BYTES`` stay loaded (more are re-read).
    """
    if budget is None:
        if weight_bytes <= DEFAULT_CACHE_BYTES:
            return MemoryPlan(None, False, "no budget; the weights fit the default cache")
        return MemoryPlan(max(DEFAULT_CACHE_BYTES, largest_tensor), True, "no budget; weights above the default cache")
    available = budget - resident - working_memory(largest_tensor)
    if available >= weight_bytes:
        return MemoryPlan(None, False, f"weights ({format_size(weight_bytes)}) fit in --max-memory")
    if available < largest_tensor:
        needed = resident + working_memory(largest_tensor) + largest_tensor
        raise MemoryBudgetError(
            f"--max-memory {format_size(budget)} is too small: the largest weight is {format_size(largest_tensor)} "
            f"and bounding it needs about {format_size(needed)} in all (lipcheck itself holds {format_size(resident)})"
        )
    return MemoryPlan(
        available,
        True,
        f"weights ({format_size(weight_bytes)}) exceed --max-memory: read a layer at a time, "
        f"at most {format_size(available)} held",
    )
