"""Errors lipcheck reports to users: one line each, exit code 2 from the CLI."""

from __future__ import annotations


class LipcheckError(Exception):
    """Base class: the message is a complete, one-line explanation for the user."""

    def __init__(self, message: str = "", *args: object):
        super().__init__(one_line(str(message)), *args)


def one_line(text: str) -> str:
    """Names read from a model file (a pickled class, a node, a tensor) may hold newlines or other control
    characters: escaped, so that every error stays one line on stderr."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ModelLoadError(LipcheckError):
    """The file is missing, unreadable, or not a model lipcheck can read."""


class NonFiniteConstantError(ModelLoadError):
    """A constant holds NaN, or an infinity where it is read as a weight: no bound can be certified from it."""

    def __init__(self, tensor: str, problem: str, node: str = "", op: str = ""):
        self.tensor, self.problem = tensor, problem
        where = f" (an input of node {node!r}, {op})" if node else ""
        super().__init__(f"constant {tensor!r}{where} holds {problem}; no bound can be certified from it")


class InputShapeError(LipcheckError):
    """``--input-shape`` is malformed or does not fit the model."""


class UnsupportedOpsError(LipcheckError):
    """The graph holds ops without a rule; all of them are listed at once."""

    def __init__(self, ops: dict[str, list[str]]):
        self.ops = ops  # op type -> node names
        listed = "; ".join(
            f"{op} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" for op, names in sorted(ops.items())
        )
        super().__init__(
            f"no Lipschitz rule for {len(ops)} op type(s): {listed}. "
            "Supply a constant with --assume OP=VALUE if you know one (it is reported as an assumption)."
        )
