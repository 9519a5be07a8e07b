"""Certified bounds tighter than the per-layer product: folding consecutive linear ops, and chain bounds
(Combettes & Pesquet 2020, ECLipsE-Fast 2024, LipSDP-neuron 2019) over linear layers separated by
slope-restricted activations, applied wherever the graph has such a chain."""

from lipcheck.ops import Slope, UnitSlopes
from lipcheck.refine.apply import (
    CHAIN_METHODS,
    CHEAP_METHODS,
    METHOD_CHOICES,
    ChainResult,
    Refinement,
    methods_for,
    refine,
)
from lipcheck.refine.chains import Chain, activation_slope, find_chains

__all__ = [
    "CHAIN_METHODS",
    "CHEAP_METHODS",
    "METHOD_CHOICES",
    "Chain",
    "ChainResult",
    "Refinement",
    "Slope",
    "UnitSlopes",
    "activation_slope",
    "find_chains",
    "methods_for",
    "refine",
]
