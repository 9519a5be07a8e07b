"""Per-op Lipschitz rules. Importing this package registers every rule."""

from lipcheck.rules import activations, linear, structural  # noqa: F401  (registration)
from lipcheck.rules.registry import (
    LocalBound,
    RegisteredRule,
    RuleContext,
    get_rule,
    registered_rules,
    rule,
    unbounded,
)
from lipcheck.rules.structural import UnsupportedVariant

__all__ = [
    "LocalBound",
    "RegisteredRule",
    "RuleContext",
    "UnsupportedVariant",
    "get_rule",
    "registered_rules",
    "rule",
    "unbounded",
]
