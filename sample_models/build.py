"""Build the small sample ONNX models used by lipcheck's tests and examples.

Run ``python sample_models/build.py`` from anywhere; every file is (re)written
next to this script. Weights come from ``torch.manual_seed`` and the build is
deterministic: running it twice yields byte-identical files (the script checks
its own outputs against the torch modules and with ``onnx.checker``).

Models (all in eval mode, input "input", output "output", dim 0 = "batch"):

* mlp.onnx            Linear-ReLU-Linear-Tanh-Linear, TorchScript exporter, opset 17
* cnn_bn.onnx         Conv/BN/ReLU/MaxPool/Conv/BN/SiLU/grouped Conv/ReLU/GAP/Linear,
                      TorchScript exporter, opset 13 (SiLU -> Sigmoid + Mul)
* resnet_small.onnx   stem + 2 basic blocks (identity, then stride-2 projection),
                      inception-style concat, exact (erf) GELU, GAP, Linear;
                      TorchScript exporter, opset 17
* gated.onnx          LayerNorm -> a * sigmoid(b) -> Linear on [batch, 8, 16];
                      TorchScript exporter, opset 17 (not globally Lipschitz)
* mlp_dynamo.onnx     network of mlp.onnx, dynamo exporter, opset 18
* cnn_dynamo.onnx     network of cnn_bn.onnx, dynamo exporter, opset 18
* cnn_external.onnx   cnn_bn.onnx with every initializer in cnn_external.onnx.data
* digits_mlp.onnx     Linear(64,64)-ReLU-Linear(64,32)-ReLU-Linear(32,10) trained on scikit-learn's
                      digits (8x8 images flattened, pixels / 16); TorchScript exporter, opset 17
* digits_cnn.onnx     Conv(1->8)-ReLU-Conv(8->16)-ReLU-AvgPool(2)-Flatten-Linear(256,10) trained on the
                      digits as 1x8x8 images; TorchScript exporter, opset 17

* digits_test.npz     x: the first 20 held-out digits [20, 64] (pixels / 16, float32), y: their labels;
                      samples for ``--around`` (they fit digits_mlp's [1, 64] and digits_cnn's [1, 1, 8, 8])

The digits models need scikit-learn to build (``pip install -e ".[samples]"``), not to use.

PyTorch files (same networks and weights; see README.md for the command that reads each):

* mlp_state_dict.pt        bare state_dict of mlp.onnx's network (no architecture)
* resnet_small_ckpt.pt     training checkpoint: epoch, optimizer state, 'model_state_dict' with
                           DataParallel's 'module.' prefix
* resnet_small.ckpt        Lightning-style checkpoint: 'state_dict' with the 'model.' prefix
* resnet_small_ts.pt       TorchScript (torch.jit.script)
* resnet_small.pt2         torch.export program, dynamic batch dimension
* cnn_bn.safetensors       cnn_bn.onnx's state_dict as safetensors
* cnn_bn_module.pt         the whole pickled nn.Sequential (torch.save(model)); needs --trust-pickle

Rebuilding rewrites a PyTorch file only when its content changed (torch stamps every archive with
a random serialization id, so the bytes of two saves differ).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # onnx is imported where it is used: --model sample_models.build:... does not pay for it
    import onnx

OUT_DIR = Path(__file__).resolve().parent
SEED = 1234
ATOL = 1e-5
RTOL = 1e-5


# --------------------------------------------------------------------------- models


def _randomize_norms(module: nn.Module, gen: torch.Generator) -> None:
    """Give BatchNorm / LayerNorm layers non-trivial seeded statistics and affine params."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.25 + 1.5 * torch.rand(c, generator=gen))
                m.weight.copy_(1.0 + 0.5 * torch.randn(c, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))
            elif isinstance(m, nn.LayerNorm):
                shape = m.normalized_shape
                m.weight.copy_(1.0 + 0.3 * torch.randn(shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(shape, generator=gen))


def make_mlp() -> nn.Module:
    torch.manual_seed(SEED + 1)
    return nn.Sequential(
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, 10),
    ).eval()


def make_cnn_bn() -> nn.Module:
    torch.manual_seed(SEED + 2)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.SiLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    gen = torch.Generator().manual_seed(SEED + 102)
    _randomize_norms(model, gen)
    return model.eval()


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn + shortcut (identity, or 1x1 conv + BN projection), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class ResNetSmall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.block1 = BasicBlock(8, 8, stride=1)
        self.block2 = BasicBlock(8, 16, stride=2)
        # Inception-like part: two branches concatenated on channels.
        self.branch1x1 = nn.Conv2d(16, 8, 1)
        self.branch3x3 = nn.Conv2d(16, 8, 3, padding=1)
        self.gelu = nn.GELU()  # exact (erf) GELU
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block1(x)
        x = self.block2(x)
        x = torch.cat([self.branch1x1(x), self.branch3x3(x)], dim=1)
        x = self.gelu(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def make_resnet_small() -> nn.Module:
    torch.manual_seed(SEED + 3)
    model = ResNetSmall()
    gen = torch.Generator().manual_seed(SEED + 103)
    _randomize_norms(model, gen)
    return model.eval()


class Gated(nn.Module):
    """LayerNorm -> a * sigmoid(b) (a, b both linear in x) -> Linear. Not globally Lipschitz."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.lin_a = nn.Linear(16, 16)
        self.lin_b = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        a = self.lin_a(x)
        b = self.lin_b(x)
        return self.out(a * torch.sigmoid(b))


def make_gated() -> nn.Module:
    torch.manual_seed(SEED + 4)
    model = Gated()
    gen = torch.Generator().manual_seed(SEED + 104)
    _randomize_norms(model, gen)
    return model.eval()


# --------------------------------------------------------------------------- trained on digits

DIGITS_TRAIN = 1500  # first 1500 of the 1797 digits train, the rest is the held-out test split


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (ships with the package): x in [0, 1], shape [n, 64]; fixed split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return x[:DIGITS_TRAIN], y[:DIGITS_TRAIN], x[DIGITS_TRAIN:], y[DIGITS_TRAIN:]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    """Deterministic mini-batch Adam on one thread (a few seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), 64):
                batch = order[start : start + 64]
                optimiser.zero_grad()
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                optimiser.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def digits_accuracy(model: nn.Module, image: bool = False) -> float:
    _, _, x, y = load_digits_split()
    with torch.no_grad():
        predicted = model(x.reshape(-1, 1, 8, 8) if image else x).argmax(dim=1)
    return float((predicted == y).float().mean())


def make_digits_mlp() -> nn.Module:
    torch.manual_seed(SEED + 5)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x, y, _, _ = load_digits_split()
    return _train(model, x, y, epochs=20, seed=SEED + 105)


def make_digits_cnn() -> nn.Module:
    torch.manual_seed(SEED + 6)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 10),
    )
    x, y, _, _ = load_digits_split()
    return _train(model, x.reshape(-1, 1, 8, 8), y, epochs=25, seed=SEED + 106)


# --------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet():
    """Silence exporter progress prints, warnings and log chatter."""
    buf_out, buf_err = io.StringIO(), io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
                yield
    except BaseException:
        sys.stdout.write(buf_out.getvalue())
        sys.stderr.write(buf_err.getvalue())
        raise
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def _normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Strip fields that may vary between runs or machines (doc strings, metadata)."""

    model.doc_string = ""
    del model.metadata_props[:]
    model.graph.doc_string = ""

    def clean_graph(g: onnx.GraphProto) -> None:
        g.doc_string = ""
        for node in g.node:
            node.doc_string = ""
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.HasField("g"):
                    clean_graph(attr.g)
                for sub in attr.graphs:
                    clean_graph(sub)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            vi.doc_string = ""
            del vi.metadata_props[:]
        for init in g.initializer:
            init.doc_string = ""
            del init.metadata_props[:]
        del g.metadata_props[:]

    clean_graph(model.graph)
    for fn in model.functions:
        fn.doc_string = ""
        del fn.metadata_props[:]
        for node in fn.node:
            node.doc_string = ""
            del node.metadata_props[:]
    return model


def export_torchscript(model: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    import onnx

    # training=PRESERVE (the modules are in eval mode, so BN is exported in inference form):
    # with the default TrainingMode.EVAL the exporter's eval peephole pass folds every
    # BatchNorm into the preceding Conv, and no BatchNormalization node would be left.
    assert not model.training
    buf = io.BytesIO()
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            buf,
            dynamo=False,
            opset_version=opset,
            training=torch.onnx.TrainingMode.PRESERVE,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            do_constant_folding=True,
        )
    return _normalize(onnx.load_from_string(buf.getvalue()))


def export_dynamo(model: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    # Default optimize=True, as users get it: the onnxscript optimizer folds BatchNorm into
    # Conv and removes the shape arithmetic around flatten (optimize=False keeps
    # BatchNormalization plus Shape/Concat/Reshape/Squeeze nodes).
    # The example batch is 2, not 1, so torch.export does not specialise the batch dim.
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
        )
    assert program is not None
    return _normalize(program.model_proto)


def save(model: onnx.ModelProto, name: str, external: bool = False) -> list[Path]:
    import onnx

    path = OUT_DIR / name
    if external:
        data_name = name + ".data"
        data_path = OUT_DIR / data_name
        if data_path.exists():
            data_path.unlink()  # onnx appends to an existing data file
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=0,
            convert_attribute=False,
        )
        os.chmod(data_path, 0o644)  # onnx creates it 0600
        return [path, data_path]
    onnx.save_model(model, str(path))
    return [path]


# --------------------------------------------------------------------------- checks


def _fixed_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen)


def verify(path: Path, model: nn.Module, feature_shape: tuple[int, ...]) -> float:
    """Check the file with onnx.checker and compare ORT to torch at batch 1 and 3.

    Returns the largest absolute difference seen.
    """
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"], path
    assert [o.name for o in sess.get_outputs()] == ["output"], path
    worst = 0.0
    for batch in (1, 3):
        x = _fixed_input((batch, *feature_shape), seed=SEED + 1000 + batch)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(["output"], {"input": x.numpy()})[0]
        if got.shape != ref.shape or not np.allclose(got, ref, atol=ATOL, rtol=RTOL):
            err = float(np.max(np.abs(got - ref))) if got.shape == ref.shape else float("nan")
            raise AssertionError(f"{path.name}: batch {batch} mismatch (max abs err {err})")
        worst = max(worst, float(np.max(np.abs(got - ref))))
    return worst


# --------------------------------------------------------------------------- PyTorch files


def _archive_content(path: Path) -> dict[str, bytes] | bytes:
    """What a torch archive holds, less the random serialization id and TorchScript's generated code and debug
    info (whose order varies with Python's hash seed; the module and its weights fix them)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        return {
            name.split("/", 1)[-1]: archive.read(name)
            for name in archive.namelist()
            if not name.endswith(("serialization_id", ".debug_pkl")) and "/code/" not in name
        }


def _save_if_changed(name: str, write) -> Path:
    """Write with ``write(tmp_path)``; keep the committed file when the content is the same."""
    path = OUT_DIR / name
    scratch = OUT_DIR / ".build-tmp"  # the same file name: torch names an archive's root folder after it
    scratch.mkdir(exist_ok=True)
    tmp = scratch / name
    write(tmp)
    if path.exists() and _archive_content(path) == _archive_content(tmp):
        tmp.unlink()
    else:
        os.replace(tmp, path)
    scratch.rmdir()
    return path


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


def build_torch() -> dict[str, tuple[str, float | None]]:
    """The PyTorch sample files, each checked by loading it back with plain torch."""
    from safetensors.torch import load_file, save_file

    mlp, cnn, resnet = make_mlp(), make_cnn_bn(), make_resnet_small()
    x_img = _fixed_input((2, 3, 16, 16), SEED + 12)
    optimizer = torch.optim.SGD(resnet.parameters(), lr=0.1, momentum=0.9)
    optimizer.zero_grad()
    resnet.train()
    resnet(x_img).square().mean().backward()  # momentum buffers for a realistic optimizer state
    resnet.load_state_dict(make_resnet_small().state_dict())  # the same weights as resnet_small.onnx
    resnet.eval()
    checkpoint = {
        "epoch": 3,
        "model_state_dict": _prefixed(resnet.state_dict(), "module."),
        "optimizer_state_dict": optimizer.state_dict(),
        "best_accuracy": 0.25,
    }
    lightning = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": _prefixed(resnet.state_dict(), "model."),
        "optimizer_states": [],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 0.1, "num_classes": 10},
    }
    batch = torch.export.Dim("batch", min=1, max=1024)
    with _quiet():
        program = torch.export.export(resnet, (x_img,), dynamic_shapes={"x": {0: batch}})
        scripted = torch.jit.script(resnet)
    files = [
        _save_if_changed("mlp_state_dict.pt", lambda p: torch.save(mlp.state_dict(), p)),
        _save_if_changed("resnet_small_ckpt.pt", lambda p: torch.save(checkpoint, p)),
        _save_if_changed("resnet_small.ckpt", lambda p: torch.save(lightning, p)),
        _save_if_changed("resnet_small_ts.pt", lambda p: torch.jit.save(scripted, p)),
        _save_if_changed("resnet_small.pt2", lambda p: torch.export.save(program, p)),
        _save_if_changed("cnn_bn.safetensors", lambda p: save_file(cnn.state_dict(), p)),
        _save_if_changed("cnn_bn_module.pt", lambda p: torch.save(cnn, p)),
    ]
    # every file loads back with plain torch and computes the same function
    x = _fixed_input((3, 3, 16, 16), SEED + 1003)
    with torch.no_grad(), _quiet():
        expected_resnet, expected_cnn = resnet(x), cnn(x)
        checks = {
            "mlp_state_dict.pt": torch.equal(
                torch.load(files[0], weights_only=True)["0.weight"], mlp.state_dict()["0.weight"]
            ),
            "resnet_small_ts.pt": torch.allclose(torch.jit.load(files[3])(x), expected_resnet, atol=ATOL),
            "resnet_small.pt2": torch.allclose(torch.export.load(files[4]).module()(x), expected_resnet, atol=ATOL),
            "cnn_bn.safetensors": all(torch.equal(load_file(files[5])[k], v) for k, v in cnn.state_dict().items()),
            "cnn_bn_module.pt": torch.allclose(torch.load(files[6], weights_only=False)(x), expected_cnn, atol=ATOL),
        }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise AssertionError(f"PyTorch sample files do not match their networks: {', '.join(failed)}")
    return {f.name: (hashlib.sha256(f.read_bytes()).hexdigest(), None) for f in files}


# --------------------------------------------------------------------------- main


def build() -> dict[str, tuple[str, float | None]]:
    """Export, save and verify every model; map file name -> (sha256, max ORT-vs-torch error)."""
    torch.use_deterministic_algorithms(True)
    mlp = make_mlp()
    cnn = make_cnn_bn()
    resnet = make_resnet_small()
    gated = make_gated()
    digits_mlp = make_digits_mlp()
    digits_cnn = make_digits_cnn()
    x_digits = _fixed_input((2, 64), SEED + 14)
    x_digit_images = _fixed_input((2, 1, 8, 8), SEED + 15)

    x_vec = _fixed_input((2, 16), SEED + 11)
    x_img = _fixed_input((2, 3, 16, 16), SEED + 12)
    x_seq = _fixed_input((2, 8, 16), SEED + 13)

    jobs = [
        ("mlp.onnx", mlp, (16,), lambda: export_torchscript(mlp, x_vec, 17), False),
        ("cnn_bn.onnx", cnn, (3, 16, 16), lambda: export_torchscript(cnn, x_img, 13), False),
        (
            "resnet_small.onnx",
            resnet,
            (3, 16, 16),
            lambda: export_torchscript(resnet, x_img, 17),
            False,
        ),
        ("gated.onnx", gated, (8, 16), lambda: export_torchscript(gated, x_seq, 17), False),
        ("mlp_dynamo.onnx", mlp, (16,), lambda: export_dynamo(mlp, x_vec, 18), False),
        ("cnn_dynamo.onnx", cnn, (3, 16, 16), lambda: export_dynamo(cnn, x_img, 18), False),
        ("cnn_external.onnx", cnn, (3, 16, 16), lambda: export_torchscript(cnn, x_img, 13), True),
        ("digits_mlp.onnx", digits_mlp, (64,), lambda: export_torchscript(digits_mlp, x_digits, 17), False),
        ("digits_cnn.onnx", digits_cnn, (1, 8, 8), lambda: export_torchscript(digits_cnn, x_digit_images, 17), False),
    ]

    print(
        f"digits test accuracy: MLP {digits_accuracy(digits_mlp):.3f}, "
        f"CNN {digits_accuracy(digits_cnn, image=True):.3f}"
    )
    results: dict[str, tuple[str, float | None]] = {}
    for name, module, feat, exporter, external in jobs:
        proto = exporter()
        files = save(proto, name, external=external)
        err = verify(files[0], module, feat)
        for f in files:
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            results[f.name] = (digest, err if f == files[0] else None)
    return results


def build_digits_samples(count: int = 20) -> dict[str, tuple[str, float | None]]:
    """digits_test.npz: held-out samples and labels for ``lipcheck report --around``."""
    _, _, x, y = load_digits_split()
    buffer = io.BytesIO()
    np.savez(buffer, x=x[:count].numpy().astype(np.float32), y=y[:count].numpy().astype(np.int64))
    path = OUT_DIR / "digits_test.npz"
    if not path.exists() or path.read_bytes() != buffer.getvalue():
        path.write_bytes(buffer.getvalue())
    return {path.name: (hashlib.sha256(path.read_bytes()).hexdigest(), None)}


def main() -> int:
    os.chdir(OUT_DIR)
    results = build()
    results.update(build_torch())
    results.update(build_digits_samples())
    total = 0
    for name, (digest, err) in results.items():
        size = (OUT_DIR / name).stat().st_size
        total += size
        err_s = f"max|ort-torch| {err:.1e}" if err is not None else ""
        print(f"{name:26s} {size:8d} B  sha256 {digest[:16]}  {err_s}")
    print(f"{'total':26s} {total:8d} B  (all checked: onnx.checker + onnxruntime vs torch, batch 1 and 3, atol {ATOL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
