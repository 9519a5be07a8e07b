"""Einsum: its exact norm when one operand varies (against onnxruntime's dense Jacobian), the verdict when two do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lipcheck.frontends import load_graph
from lipcheck.interpret import interpret
from lipcheck.pipeline import analyse
from tests.onnx_builders import model, node, ort_jacobian, rng_for, save, sigma_max

# (equation, shapes of the operands, which operand is the input x)
LINEAR = [
    ("ij,jk->ik", [(3, 4), (4, 5)], 0),
    ("ij,jk->ik", [(3, 4), (4, 5)], 1),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 3)], 0),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 3)], 1),
    ("bij,bj->bi", [(3, 2, 4), (3, 4)], 1),
    ("ii->i", [(4, 4)], 0),
    ("ii", [(4, 4)], 0),
    ("bii->b", [(2, 3, 3)], 0),
    ("ij->", [(3, 4)], 0),
    ("ij->j", [(3, 4)], 0),
    ("ij->ji", [(3, 4)], 0),
    ("ij,ij->ij", [(3, 4), (3, 4)], 0),
    ("i,j->ij", [(3,), (4,)], 0),
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)], 1),
    ("...ij,jk->...ik", [(2, 3, 4), (4, 3)], 0),
    ("...ij,...jk->...ik", [(1, 3, 4), (3, 4, 2)], 0),
    ("...ij,...jk->...ik", [(3, 3, 4), (1, 4, 2)], 0),
    ("ij,jk", [(3, 4), (4, 2)], 0),
    ("bIJ,bJK->bIK", [(2, 3, 3), (2, 3, 2)], 0),
    ("ijk,jl->il", [(2, 3, 4), (3, 5)], 0),
    ("ii,ij->j", [(3, 3), (3, 4)], 1),
]


def _model(tmp_path: Path, equation: str, shapes: list[tuple[int, ...]], variable: int) -> tuple[Path, list]:
    rng = rng_for(f"einsum-{equation}-{shapes}-{variable}")
    names = [f"w{i}" if i != variable else "x" for i in range(len(shapes))]
    inits = {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes, strict=True) if n != "x"}
    proto = model([node("Einsum", names, ["y"], equation=equation)], {"x": shapes[variable]}, ["y"], inits, opset=12)
    return save(proto, tmp_path), [inits.get(n) for n in names]


@pytest.mark.parametrize(("equation", "shapes", "variable"), LINEAR)
def test_bound_is_the_dense_jacobian_norm(tmp_path: Path, equation: str, shapes: list, variable: int) -> None:
    path, _ = _model(tmp_path, equation, shapes, variable)
    report = analyse(path)
    reference = sigma_max(ort_jacobian(path, shapes[variable]))
    assert report.layers[0].exact
    assert report.upper_bound == pytest.approx(reference, rel=1e-5), report.layers[0].method
    assert report.upper_bound >= reference * (1 - 1e-6)  # float32 Jacobian: within its rounding


@pytest.mark.parametrize(("equation", "shapes", "variable"), LINEAR)
def test_interpreter_matches_onnxruntime(tmp_path: Path, equation: str, shapes: list, variable: int) -> None:
    path, _ = _model(tmp_path, equation, shapes, variable)
    x = rng_for("feed").standard_normal(shapes[variable]).astype(np.float32)
    (expected,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = interpret(load_graph(path)).run({"x": torch.as_tensor(x, dtype=torch.float64)})["y"]
    assert np.allclose(got.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("equation", "inputs"), [("ij,jk->ik", ["x", "z"]), ("i,i->", ["x", "x"]), ("ij,ij->i", ["x", "x"])]
)
def test_two_variable_operands_are_bilinear(tmp_path: Path, equation: str, inputs: list[str]) -> None:
    graph_inputs = {name: (3, 3) if "j" in equation else (3,) for name in dict.fromkeys(inputs)}
    proto = model([node("Einsum", inputs, ["y"], equation=equation)], graph_inputs, ["y"], opset=12)
    report = analyse(save(proto, tmp_path))
    assert report.upper_bound is None
    assert any("bilinear" in r.reason for r in report.unbounded_reasons)
