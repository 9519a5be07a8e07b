"""Mutated sample models (truncated, bit-flipped, spliced, zeroed; zip members renamed, duplicated, replaced by
pickles that would create a marker file) all end cleanly: exit 0, 1 or 2, at most one line on stderr, no
traceback or internal error, no hang, and the marker never appears. Seeded: the same cases on every run."""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lipcheck.cli import main
from tests.conftest import ROOT, SAMPLES
from tests.crafted import BYTE_MUTATIONS, ZIP_MUTATIONS, members, write_zip

SEED = 20240917
IN_PROCESS_CASES = 100  # about 15 s on one core; the slowest cases are the ones torch.export reads
CASE_SECONDS = 60  # a case running longer than this is a hang
# every sample format, with what a user passes for it (TorchScript needs an input shape)
BASES = {
    "mlp.onnx": [], "cnn_bn.onnx": [], "resnet_small.onnx": [], "gated.onnx": [], "mlp_dynamo.onnx": [],
    "cnn_dynamo.onnx": [], "cnn_external.onnx": [], "mlp_state_dict.pt": [], "resnet_small.ckpt": [],
    "resnet_small_ts.pt": ["-s", "1,3,16,16"], "resnet_small.pt2": [], "cnn_bn.safetensors": [],
    "cnn_bn_module.pt": [],
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    label: str  # e.g. "17 flip resnet_small.pt2"
    args: list[str]
    marker: Path


def make_cases(folder: Path, count: int, seed: int) -> Iterator[Case]:
    """``count`` mutated files, cycling through the sample formats, each in its own folder under its base name."""
    rng = random.Random(seed)
    bases = list(BASES)
    for index in range(count):
        base = bases[index % len(bases)]
        case_folder = folder / f"case{index}"
        case_folder.mkdir()
        marker = case_folder / "marker"
        path = case_folder / base
        if zipfile.is_zipfile(SAMPLES / base) and rng.random() < 0.5:
            kind = rng.choice(sorted(ZIP_MUTATIONS))
            write_zip(path, ZIP_MUTATIONS[kind](members(SAMPLES / base), rng, marker))
        else:
            kind = rng.choice(sorted(BYTE_MUTATIONS))
            path.write_bytes(BYTE_MUTATIONS[kind]((SAMPLES / base).read_bytes(), rng))
        if base == "cnn_external.onnx":
            shutil.copy(SAMPLES / "cnn_external.onnx.data", case_folder)
        yield Case(f"{index} {kind} {base}", ["report", str(path), "--device", "cpu", *BASES[base]], marker)


def problem(case: Case, code: object, err: str) -> str | None:
    """What is wrong with how a case ended, if anything."""
    lines = err.strip().splitlines()
    if case.marker.exists():
        return f"{case.label}: the marker file was created (code ran)"
    if code not in (0, 1, 2) or len(lines) > 1 or "Traceback" in err or "internal error" in err:
        return f"{case.label}: exit {code}, stderr {err.strip()[:300]!r}"
    return None


class _Hang(Exception):
    pass


def _raise_hang(signum: int, frame: object) -> None:
    raise _Hang


def run_in_process(args: list[str]) -> tuple[object, str]:
    """`lipcheck ARGS` through lipcheck.cli.main: exit code (or 'hang') and stderr."""
    err = io.StringIO()
    argv, sys.argv = sys.argv, ["lipcheck", *args]
    previous = signal.signal(signal.SIGALRM, _raise_hang)
    signal.alarm(CASE_SECONDS)
    code: object = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else exc.code or 0
    except _Hang:
        code = "hang"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        sys.argv = argv
    return code, err.getvalue()


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="the per-case time limit uses SIGALRM")
def test_mutated_models_end_cleanly_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIPCHECK_DEBUG", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    failures = []
    for case in make_cases(tmp_path, IN_PROCESS_CASES, SEED):
        code, err = run_in_process(case.args)
        failures.append(problem(case, code, err))
    assert [f for f in failures if f] == []


@pytest.mark.slow  # the in-process run covers the same mutations; this one adds the subprocess's exit codes
def test_mutated_models_end_cleanly_through_the_cli(tmp_path: Path) -> None:
    """A few cases as users and CI run lipcheck (`python -m lipcheck`), warnings and all."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    env.pop("LIPCHECK_DEBUG", None)
    failures = []
    for case in make_cases(tmp_path, 4, SEED + 1):
        try:
            result = subprocess.run([sys.executable, "-m", "lipcheck", *case.args], capture_output=True, text=True,
                                    env=env, timeout=CASE_SECONDS * 2)  # fmt: skip
            failures.append(problem(case, result.returncode, result.stderr))
        except subprocess.TimeoutExpired:
            failures.append(f"{case.label}: hang")
    assert [f for f in failures if f] == []
