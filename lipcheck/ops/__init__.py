"""lipcheck's op vocabulary: one class per op, each holding everything lipcheck knows of it.

Families (one module each): ``activations``, ``arithmetic``, ``attention``, ``linear`` (Gemm, MatMul),
``control`` (If, Loop, Scan), ``conv``, ``normalization``, ``pooling``, ``reductions``, ``shape``
(rearrangements, casts), ``selection`` (slices, gathers, concatenation, padding, copies), ``indexing``
(gathers and scatters by index tensors, unpooling, folding patches), ``resize``, ``recurrent`` (recurrent
layers unrolled), ``elementwise`` (math without a global constant, logic), ``steps`` (arg-max, remainders,
quantisation), ``signal`` (DFT, cache writes), ``generators``.
``base`` defines the facets (see ``Op``) and the registry; importing this package registers every op.
CONTRIBUTING.md shows how to add one.
"""

from lipcheck.ops import (  # noqa: F401  (registration)
    activations,
    arithmetic,
    attention,
    control,
    conv,
    elementwise,
    generators,
    indexing,
    linear,
    normalization,
    pooling,
    recurrent,
    reductions,
    resize,
    selection,
    shape,
    signal,
    steps,
)
from lipcheck.ops.base import (
    AffineContext,
    EvalContext,
    Interval,
    LocalBound,
    NotFoldable,
    Op,
    RegisteredRule,
    RuleContext,
    ShiftInvariant,
    Slope,
    UnitSlopes,
    UnsupportedVariant,
    get,
    node_attrs,
    register,
    registered,
    registered_rules,
    rule,
    unbounded,
    variable_inputs,
)

__all__ = [
    "AffineContext",
    "EvalContext",
    "Interval",
    "LocalBound",
    "NotFoldable",
    "Op",
    "RegisteredRule",
    "RuleContext",
    "ShiftInvariant",
    "Slope",
    "UnitSlopes",
    "UnsupportedVariant",
    "get",
    "node_attrs",
    "register",
    "registered",
    "registered_rules",
    "rule",
    "unbounded",
    "variable_inputs",
]
