"""Ctrl-C (a real SIGINT) in the middle of every command: one line on stderr, exit 130, nothing partial left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLES

# Runs the CLI with one step (``TARGET``, a module attribute) replaced by a wait: the test sends SIGINT once
# the step has begun (the file READY exists), so the signal lands inside the command, never during imports.
SCRIPT = """
import importlib, pathlib, sys, time
module_name, attribute, ready = sys.argv[1:4]
module = importlib.import_module(module_name)
real = getattr(module, attribute)

def wait(*args, **kwargs):
    pathlib.Path(ready).write_text("ready")
    time.sleep(120)
    return real(*args, **kwargs)

setattr(module, attribute, wait)
sys.argv = ["lipcheck", *sys.argv[4:]]
from lipcheck.cli import main
main()
"""


def _interrupt(tmp_path: Path, target: str, *args: str) -> subprocess.CompletedProcess[str]:
    module, attribute = target.rsplit(".", 1)
    ready = tmp_path.parent / f"{tmp_path.name}.ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    env.pop("LIPCHECK_DEBUG", None)
    command = [sys.executable, "-c", SCRIPT, module, attribute, str(ready), *args]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate(timeout=60)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


CONFIG = '[[tool.lipcheck.models]]\npath = "{model}"\nbaseline = "base.json"\n'
CASES = {
    "report": ("lipcheck.pipeline.certify", ["report", str(SAMPLES / "mlp.onnx"), "-o", "r.json", "-f", "json"]),
    "report-baseline": (
        "lipcheck.pipeline.certify",
        ["report", str(SAMPLES / "mlp.onnx"), "-o", "r.txt", "--save-baseline", "b.json"],
    ),
    "check": ("lipcheck.pipeline.certify", ["check", "--update-baselines", "-o", "c.json", "-f", "json"]),
    "normalize": ("lipcheck.rewrite.normalize._verify", ["normalize", str(SAMPLES / "mlp.onnx"), "-o", "m.onnx"]),
    "normalize-ext": (
        "lipcheck.rewrite.normalize._verify",
        ["normalize", str(SAMPLES / "cnn_external.onnx"), "-o", "m.onnx"],
    ),
    "parametrize": (
        "lipcheck.rewrite.normalize._prove_parametrized",
        [
            "normalize",
            str(SAMPLES / "resnet_small_ckpt.pt"),
            "--mode",
            "parametrize",
            "-o",
            "p.pt",
            "--model",
            "sample_models.build:ResNetSmall",
            "-s",
            "1,3,16,16",
        ],
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ctrl_c_is_one_line_exit_130_and_leaves_nothing(case: str, tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(CONFIG.format(model=(SAMPLES / "mlp.onnx").as_posix()))
    (tmp_path / "sample_models").symlink_to(ROOT / "sample_models")  # for --model sample_models.build:...
    before = sorted(p.name for p in tmp_path.iterdir())
    target, args = CASES[case]
    result = _interrupt(tmp_path, target, *args)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines() == ["lipcheck: interrupted"], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staging folder, no temporary file
