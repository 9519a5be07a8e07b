"""Zip-based PyTorch files are checked with one set of rules before torch reads them: crafted archives are
refused in one line (exit 2) and never run code; the archives torch writes pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lipcheck.cli import main
from lipcheck.errors import ModelLoadError
from lipcheck.frontends.torch_archive import UntrustedPickleError, check_members, read_archive
from lipcheck.frontends.torch_frontend import TorchOptions, WeightTensors, check_torch_file, load_torch
from tests.conftest import ROOT, SAMPLES
from tests.crafted import marker_pickle, marker_torch_save, members, root_of, write_zip

PT2 = SAMPLES / "resnet_small.pt2"
CONFIG = "data/weights/model_weights_config.json"


def report(capsys: pytest.CaptureFixture[str], path: Path, *flags: str) -> tuple[int, str]:
    """`lipcheck report PATH` in-process: exit code and stderr."""
    argv, sys.argv = sys.argv, ["lipcheck", "report", str(path), *flags]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, marker: Path, *words: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("lipcheck: error: "), err
    assert all(word in err for word in words), err
    assert not marker.exists()


def pt2_with(tmp_path: Path, extra: list[tuple[str, bytes]], first: bool = True) -> Path:
    """The sample .pt2 with members added (before the originals, as torch's reader finds the first copy)."""
    items = members(PT2)
    root = root_of(items)
    added = [(f"{root}/{name}", data) for name, data in extra]
    return write_zip(tmp_path / "crafted.pt2", added + items if first else items + added)


@pytest.mark.parametrize("member", ["data/weights/model.pt", "data/constants/model.pt"])
def test_pt2_with_a_legacy_pickle_member_is_refused(
    member: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch.export.load prefers a legacy weights/constants pickle and unpickles it with full Python."""
    marker = tmp_path / "pwned"
    crafted = pt2_with(tmp_path, [(member, marker_torch_save(marker))])
    code, err = report(capsys, crafted)
    assert_refused(code, err, marker, f"member resnet_small/{member}", "refused to unpickle", "--trust-pickle")


def _use_pickle_config(marker: Path) -> list[tuple[str, bytes]]:
    """A weights config whose first entry says use_pickle and points at a malicious payload weight_99."""
    config = json.loads(dict(members(PT2))[f"resnet_small/{CONFIG}"])
    first = next(iter(config["config"]))
    config["config"][first].update(use_pickle=True, path_name="weight_99")
    return [(CONFIG, json.dumps(config).encode()), ("data/weights/weight_99", marker_torch_save(marker))]


def test_pt2_with_a_duplicate_weights_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """torch reads the first copy (use_pickle), zipfile the last (benign): refused whatever either says."""
    marker = tmp_path / "pwned"
    code, err = report(capsys, pt2_with(tmp_path, _use_pickle_config(marker)))
    assert_refused(code, err, marker, f"duplicate member resnet_small/{CONFIG}")


def test_pt2_with_a_use_pickle_payload_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    config, payload = _use_pickle_config(marker)
    items = [(n, config[1] if n.endswith(CONFIG) else d) for n, d in members(PT2)]
    crafted = write_zip(tmp_path / "crafted.pt2", [*items, ("resnet_small/" + payload[0], payload[1])])
    code, err = report(capsys, crafted)
    assert_refused(code, err, marker, "member resnet_small/data/weights/weight_99", "marks", "posix.system")
    check_members(read_archive(crafted), trusted=True)  # the user may trust it: then torch reads it


def test_members_that_differ_only_in_case_are_duplicates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """torch's reader finds members without regard to case: DATA.PKL is another copy of data.pkl."""
    marker = tmp_path / "pwned"
    items = members(SAMPLES / "resnet_small.ckpt")
    crafted = write_zip(tmp_path / "crafted.ckpt", [("resnet_small/DATA.PKL", marker_pickle(marker)), *items])
    code, err = report(capsys, crafted)
    assert_refused(code, err, marker, "duplicate member resnet_small/data.pkl", "resnet_small/DATA.PKL")


def test_pt2_outside_one_folder_never_reaches_the_old_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Members outside one folder make torch's reader fail, and torch.export.load then reads torch 2.7's layout
    with Python's zipfile, unpickling serialized_state_dict.pt with full Python: refused before that."""
    marker = tmp_path / "pwned"
    payload = marker_torch_save(marker)
    model = dict(members(PT2))["resnet_small/models/model.json"]
    crafted = write_zip(tmp_path / "crafted.pt2", [
        ("x/archive_format", b"pt2"), ("version", b"8.20"), ("serialized_exported_program.json", model),
        *((f"serialized_{name}.pt", payload) for name in ("state_dict", "constants", "example_inputs")),
    ])  # fmt: skip
    code, err = report(capsys, crafted)
    assert_refused(code, err, marker, "member 'version' is outside the archive's folder x/")


@pytest.mark.parametrize(
    ("sample", "member"),
    [("mlp_state_dict.pt", "notes.txt"), ("resnet_small.ckpt", "data/weights/model.pt"),
     ("resnet_small_ts.pt", "data/extra.pkl"), ("resnet_small.pt2", "data/aotinductor/model/model.so")],
)  # fmt: skip
def test_unexpected_members_are_refused(sample: str, member: str, tmp_path: Path) -> None:
    items = members(SAMPLES / sample)
    crafted = write_zip(tmp_path / f"crafted{Path(sample).suffix}", [*items, (f"{root_of(items)}/{member}", b"x")])
    with pytest.raises(UntrustedPickleError, match=f"member {root_of(items)}/{member}"):
        load_torch(crafted, ["1,3,16,16"])


def test_an_unexpected_member_is_read_when_trusted(tmp_path: Path) -> None:
    items = members(SAMPLES / "mlp_state_dict.pt")
    crafted = write_zip(tmp_path / "crafted.pt", [*items, ("mlp_state_dict/notes.txt", b"hello")])
    loaded = load_torch(crafted, options=TorchOptions(trust_pickle=True))
    assert isinstance(loaded, WeightTensors) and len(loaded.tensors) == 6


@pytest.mark.parametrize(
    ("edit", "message"),
    [(lambda items: [("../evil", b"x"), *items], "outside the archive's folder"),
     (lambda items: [*items, ("mlp_state_dict/a\\b", b"x")], "badly named"),
     (lambda items: [(name.replace("data.pkl", "weights.pkl"), data) for name, data in items], "none of data.pkl"),
     (lambda items: [], "not a readable PyTorch file")],
)  # fmt: skip
def test_malformed_archives_are_one_line(edit: Callable[[list], list], message: str, tmp_path: Path) -> None:
    crafted = write_zip(tmp_path / "crafted.pt", edit(members(SAMPLES / "mlp_state_dict.pt")))
    with pytest.raises(ModelLoadError, match=message) as error:
        load_torch(crafted)
    assert "\n" not in str(error.value)


def test_the_real_cli_refuses_the_crafted_pt2(tmp_path: Path) -> None:
    """The same refusal through `python -m lipcheck`, as a user or CI runs it."""
    marker = tmp_path / "pwned"
    crafted = pt2_with(tmp_path, [("data/weights/model.pt", marker_torch_save(marker))])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    result = subprocess.run([sys.executable, "-m", "lipcheck", "report", str(crafted)], capture_output=True,
                            text=True, env=env, timeout=300)  # fmt: skip
    assert_refused(result.returncode, result.stderr, marker, "refused to unpickle member")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("shift", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + torch.tensor([1.0, 2.0, 3.0]) + self.shift


def test_the_archives_torch_writes_pass(tmp_path: Path) -> None:
    """Every sample file, and what torch.save / jit.save (scripted, traced, lite, extra files) / export.save write."""
    net, x = _Net(), torch.randn(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(net.state_dict(), tmp_path / "state.pt")
        torch.jit.save(torch.jit.script(net), tmp_path / "scripted.pt", _extra_files={"meta.txt": "hi"})
        torch.jit.save(torch.jit.trace(net, x), tmp_path / "traced.pt")
        torch.jit.script(net)._save_for_lite_interpreter(str(tmp_path / "lite.ptl"))
        torch.export.save(torch.export.export(net, (x,)), tmp_path / "program.pt2", extra_files={"note.txt": "y"})
    kinds = {"state.pt": "pickle", "scripted.pt": "torchscript", "traced.pt": "torchscript",
             "lite.ptl": "torchscript", "program.pt2": "pt2"}  # fmt: skip
    for name, kind in kinds.items():
        assert check_torch_file(tmp_path / name, trusted=False) == kind, name
    for path in [*SAMPLES.glob("*.pt"), *SAMPLES.glob("*.pt2"), *SAMPLES.glob("*.ckpt")]:
        assert check_torch_file(path, trusted=False) in ("pickle", "torchscript", "pt2"), path


def test_control_characters_from_the_file_stay_on_one_line(tmp_path: Path) -> None:
    """A pickled class name holding a form feed or newline is escaped in the error (found by the fuzz test)."""
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"\x80\x02cbad\x0cmodule\nName\nq\x00.")
    with pytest.raises(UntrustedPickleError) as error:
        load_torch(evil)
    assert "bad\\x0cmodule.Name" in str(error.value) and len(str(error.value).splitlines()) == 1
