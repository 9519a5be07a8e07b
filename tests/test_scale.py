"""Large models and repeated runs: lazily read weights, the memory budget, the per-layer cache, progress."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import lipcheck.ops.conv as linear_rules
from lipcheck.cache import LayerCache, code_fingerprint
from lipcheck.compose import compose
from lipcheck.frontends.onnx_frontend import load_onnx_model, onnx_to_graph
from lipcheck.graph import LazyConstants, TensorSource
from lipcheck.memory import (
    DEFAULT_CACHE_BYTES,
    GIB,
    MIB,
    MemoryBudgetError,
    parse_memory_size,
    plan_memory,
    working_memory,
)
from lipcheck.passes import prepare
from lipcheck.pipeline import analyse
from tests.conftest import SAMPLES
from tests.onnx_builders import model, node, rng_for

# ---------------------------------------------------------------------------------------------
# a model whose weights are stored as external data, each above the eager-read threshold


def _weights(tag: str = "base") -> dict[str, np.ndarray]:
    rng = rng_for(f"scale-{tag}")
    return {
        "w1": (rng.standard_normal((64, 32, 3, 3)) * 0.2).astype(np.float32),
        "b1": rng.standard_normal(64).astype(np.float32),
        "w2": (rng.standard_normal((48, 64, 3, 3)) * 0.1).astype(np.float32),
        "w3": (rng.standard_normal((10, 48 * 6 * 6)) * 0.05).astype(np.float32),  # used transposed
        "shape": np.array([1, -1], dtype=np.int64),
    }


def _proto(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        node("Relu", ["c1"], ["r1"]),
        node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        node("Relu", ["c2"], ["r2"]),
        node("Reshape", ["r2", "shape"], ["flat"]),
        node("Transpose", ["w3"], ["w3t"], perm=[1, 0]),  # folded: a computed weight, recomputed on demand
        node("MatMul", ["flat", "w3t"], ["m"]),
        node("Add", ["m", "r_skip"], ["y"]),
        node("ReduceMean", ["flat"], ["r_skip"], axes=[1], keepdims=1),
    ]
    # keep topological order: ReduceMean before Add
    nodes = [*nodes[:7], nodes[8], nodes[7]]
    return model(nodes, {"x": [1, 32, 12, 12]}, initializers=weights)


def _save_external(weights: dict[str, np.ndarray], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(
        _proto(weights),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    return path


def _report_dict(graph) -> dict:
    prepare(graph)
    composition = compose(graph, device="cpu")
    return {
        "upper_bound": composition.upper_bound,
        "layers": [(lay.name, lay.op, lay.lipschitz, lay.method, lay.running) for lay in composition.layers],
    }


def test_lazy_external_weights_give_the_eager_report_with_one_layer_held(tmp_path: Path) -> None:
    path = _save_external(_weights(), tmp_path / "m")
    assert (tmp_path / "m" / "model.onnx.data").stat().st_size > 100_000
    eager_graph = onnx_to_graph(onnx.load(str(path)), name="model.onnx")  # every weight read up front
    eager = _report_dict(eager_graph)

    lazy_graph = onnx_to_graph(load_onnx_model(path, load_weights=False), name="model.onnx", base_dir=path.parent)
    constants = lazy_graph.constants
    assert isinstance(constants, LazyConstants)
    assert {"w1", "w2", "w3t"} <= {n for n in constants if constants.is_lazy(n)}
    largest = max(constants.nbytes_of(n) for n in constants if constants.is_lazy(n))
    constants.release()
    constants.cache_bytes = largest  # at most one weight held: a layer at a time
    constants.peak_bytes = 0
    lazy = _report_dict(lazy_graph)
    assert lazy == eager  # identical numbers and methods, not merely close
    assert eager["upper_bound"] is not None
    assert constants.loads >= 3  # each lazily read weight was read from the file
    assert 0 < constants.peak_bytes <= 2 * largest  # the one in use plus at most one about to be dropped
    assert constants.held_bytes <= largest


def test_analyse_reads_external_weights_lazily_and_respects_a_budget(tmp_path: Path) -> None:
    path = _save_external(_weights(), tmp_path / "m")
    reference = onnx_to_graph(onnx.load(str(path)), name="model.onnx")
    expected = _report_dict(reference)
    report = analyse(path, device="cpu", max_memory=64 * GIB)
    assert report.upper_bound == expected["upper_bound"]
    with pytest.raises(MemoryBudgetError, match="too small"):
        analyse(path, device="cpu", max_memory=1 * MIB)


def test_external_data_shorter_than_its_tensors_is_a_load_error(tmp_path: Path) -> None:
    from lipcheck.errors import ModelLoadError

    path = _save_external(_weights(), tmp_path / "m")
    data = path.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="ends at byte"):
        load_onnx_model(path, load_weights=False)


# ---------------------------------------------------------------------------------------------
# LazyConstants and the budget


def test_lazy_constants_load_on_access_and_drop_the_least_recently_used() -> None:
    reads: list[str] = []

    def source(name: str, n: int) -> TensorSource:
        def load() -> np.ndarray:
            reads.append(name)
            return np.full(n, float(len(name)), dtype=np.float64)

        return TensorSource((n,), np.dtype(np.float64), load)

    constants = LazyConstants(cache_bytes=2 * 800)
    for name in ("a", "bb", "ccc"):
        constants.add_source(name, source(name, 100))  # 800 bytes each
    constants["pinned"] = np.zeros(3)
    assert reads == [] and len(constants) == 4 and set(constants) == {"a", "bb", "ccc", "pinned"}
    assert constants.shape_of("ccc") == (100,) and constants.nbytes_of("bb") == 800
    assert constants["a"][0] == 1.0 and constants["bb"][0] == 2.0
    assert constants["a"][0] == 1.0  # cached: no new read, and now the most recent
    assert reads == ["a", "bb"]
    assert constants["ccc"][0] == 3.0  # over the cap: "bb" (least recent) is dropped
    assert constants.held_bytes == 1600
    assert constants["bb"][0] == 2.0 and reads == ["a", "bb", "ccc", "bb"]
    assert constants.loads == 4
    constants.restrict({"a", "pinned"})
    assert set(constants) == {"a", "pinned"} and "bb" not in constants
    assert constants.get("bb") is None
    constants.release()
    assert constants.held_bytes == 0 and constants["pinned"].shape == (3,)


def test_parse_memory_size() -> None:
    assert parse_memory_size("2GiB") == 2 * GIB
    assert parse_memory_size("1.5 GB") == 1_500_000_000
    assert parse_memory_size("800mib") == 800 * MIB
    assert parse_memory_size("4g") == 4_000_000_000
    assert parse_memory_size(1024) == 1024
    for bad in ("", "two GiB", "2 parsecs", "0", "-1GiB", True):
        with pytest.raises(MemoryBudgetError):
            parse_memory_size(bad)  # type: ignore[arg-type]


def test_plan_memory() -> None:
    resident = 500 * MIB
    # no budget: small models keep everything, big ones keep the default cache
    assert plan_memory(None, 100 * MIB, 10 * MIB, resident).cache_bytes is None
    big = plan_memory(None, 8 * GIB, 256 * MIB, resident)
    assert big.layer_at_a_time and big.cache_bytes == DEFAULT_CACHE_BYTES
    # weights fit: keep everything
    fits = plan_memory(4 * GIB, 1 * GIB, 64 * MIB, resident)
    assert fits.cache_bytes is None and not fits.layer_at_a_time
    # weights do not fit: what remains after the process and one layer's working memory
    plan = plan_memory(2 * GIB, 4 * GIB, 64 * MIB, resident)
    assert plan.layer_at_a_time
    assert plan.cache_bytes == 2 * GIB - resident - working_memory(64 * MIB)
    assert plan.cache_bytes + resident + working_memory(64 * MIB) <= 2 * GIB
    # not even the largest layer fits
    with pytest.raises(MemoryBudgetError, match="too small"):
        plan_memory(1 * GIB, 4 * GIB, 400 * MIB, resident)


# ---------------------------------------------------------------------------------------------
# the per-layer cache


@pytest.fixture(autouse=True)
def _cache_key_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache's signing key is made under $XDG_CONFIG_HOME: never the real home in tests."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
    monkeypatch.delenv("LIPCHECK_CACHE_KEY", raising=False)


@pytest.fixture
def count_conv_norms(monkeypatch):
    calls: list[tuple] = []
    real = linear_rules.conv_operator_norm

    def counting(weight, geometry):
        calls.append(tuple(weight.shape))
        return real(weight, geometry)

    monkeypatch.setattr(linear_rules, "conv_operator_norm", counting)
    return calls


def test_cache_reuses_every_layer_and_recomputes_only_a_changed_one(tmp_path: Path, count_conv_norms) -> None:
    weights = _weights()
    path = _save_external(weights, tmp_path / "m")
    folder = tmp_path / "cache"
    uncached = analyse(path, device="cpu").to_dict()
    assert len(count_conv_norms) == 2
    count_conv_norms.clear()

    first = LayerCache(folder)
    assert analyse(path, device="cpu", cache=first).to_dict() == uncached
    assert first.stats.hits == 0 and first.stats.misses == len(uncached["layers"])
    assert len(count_conv_norms) == 2
    count_conv_norms.clear()

    second = LayerCache(folder)
    assert analyse(path, device="cpu", cache=second).to_dict() == uncached
    assert second.stats.misses == 0 and second.stats.hits == len(uncached["layers"])
    assert count_conv_norms == []  # nothing recomputed

    changed = dict(weights, w2=weights["w2"] * np.float32(1.5))
    path2 = _save_external(changed, tmp_path / "m2")
    expected = analyse(path2, device="cpu").to_dict()
    count_conv_norms.clear()
    third = LayerCache(folder)
    result = analyse(path2, device="cpu", cache=third).to_dict()
    assert result["layers"] == expected["layers"] and result["upper_bound"] == expected["upper_bound"]
    assert count_conv_norms == [(48, 64, 3, 3)]  # only the changed conv
    # the changed conv, and the Add whose bound scales with the (changed) running constants
    assert third.stats.misses == 2


def test_cache_ignores_corrupt_and_tampered_entries(tmp_path: Path, count_conv_norms) -> None:
    path = _save_external(_weights(), tmp_path / "m")
    folder = tmp_path / "cache"
    expected = analyse(path, device="cpu", cache=folder).to_dict()
    entries = sorted(folder.rglob("*.json"))
    assert len(entries) == len(expected["layers"])
    conv_entries = [
        e
        for e in entries
        if "Conv" in json.loads(e.read_text())["bound"]["method"]
        or "circular" in json.loads(e.read_text())["bound"]["method"]
    ]
    assert conv_entries
    # a torn write, and a well-formed entry whose value was edited (checksum no longer matches)
    entries[0].write_text(entries[0].read_text()[:40])
    tampered = json.loads(conv_entries[-1].read_text())
    tampered["bound"]["value"] = (0.5).hex()
    conv_entries[-1].write_text(json.dumps(tampered))
    count_conv_norms.clear()
    cache = LayerCache(folder)
    assert analyse(path, device="cpu", cache=cache).to_dict() == expected
    assert cache.stats.corrupt == 2 and cache.stats.misses == 2
    # recomputed entries were rewritten: the next run trusts them again
    again = LayerCache(folder)
    assert analyse(path, device="cpu", cache=again).to_dict() == expected
    assert again.stats.hits == len(expected["layers"]) and again.stats.corrupt == 0
    assert not list(folder.rglob("*.tmp"))


def test_cache_key_changes_with_device_shape_weights_and_code(tmp_path: Path, monkeypatch) -> None:
    import torch

    import lipcheck.cache as cache_module
    from lipcheck.ops import RuleContext
    from lipcheck.ops import get as get_rule

    path = _save_external(_weights(), tmp_path / "m")
    graph = onnx_to_graph(load_onnx_model(path, load_weights=False), base_dir=path.parent)
    conv = next(n for n in graph.nodes if n.op == "Conv")
    registered = get_rule("Conv")
    cache = LayerCache(tmp_path / "cache")

    def key(**changes) -> str:
        ctx = RuleContext(conv, graph, [1.0, 0.0, 0.0], torch.device(changes.get("device", "cpu")))
        return cache.key(ctx, registered)

    base = key()
    assert key() == base and len(base) == 64
    assert key(device="cuda") != base
    graph.shapes[conv.inputs[0]] = (1, 32, 10, 10)
    assert key() != base
    graph.shapes[conv.inputs[0]] = (1, 32, 12, 12)
    assert key() == base
    conv.attrs["pads"] = [0, 0, 0, 0]
    assert key() != base
    conv.attrs["pads"] = [1, 1, 1, 1]
    graph.constants[conv.inputs[1]] = np.asarray(graph.constants[conv.inputs[1]]) * np.float32(2)
    assert LayerCache(tmp_path / "cache").key(RuleContext(conv, graph, [1.0, 0.0, 0.0]), registered) != base
    monkeypatch.setattr(cache_module, "code_fingerprint", lambda: "edited")
    assert LayerCache(tmp_path / "cache").key(RuleContext(conv, graph, [1.0, 0.0, 0.0]), registered) != base
    assert len(code_fingerprint()) == 64


def test_progress_callback_sees_every_node(tmp_path: Path) -> None:
    path = _save_external(_weights(), tmp_path / "m")
    seen: list[tuple[int, int, str]] = []
    report = analyse(path, device="cpu", progress=lambda done, total, name: seen.append((done, total, name)))
    total = seen[0][1]
    assert [s[0] for s in seen] == list(range(total + 1))
    assert seen[-1] == (total, total, "")
    assert {layer.name for layer in report.layers} <= {s[2] for s in seen}


# ---------------------------------------------------------------------------------------------
# the progress bar and the command line


def test_progress_bar_appears_only_after_its_delay_and_only_for_terminals() -> None:
    import io

    from rich.console import Console

    from lipcheck.progress import LayerProgress, progress_wanted

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress_wanted(False, Terminal()) and not progress_wanted(True, Terminal())
    assert not progress_wanted(False, io.StringIO())

    quick = LayerProgress(delay=3600, console=Console(file=Terminal(), force_terminal=True))
    for i in range(5):
        quick(i, 5, f"layer{i}")
    quick(5, 5, "")
    assert not quick.shown and quick.console.file.getvalue() == ""

    screen = Terminal()
    slow = LayerProgress(delay=0, console=Console(file=screen, force_terminal=True, no_color=True, width=100))
    slow(0, 4, "conv_a")
    slow(1, 4, "conv_b")
    assert slow.shown
    slow(4, 4, "")
    assert not slow.shown
    assert "conv_b" in screen.getvalue() and "1/4" in screen.getvalue()


def test_cli_cache_and_max_memory(tmp_path: Path) -> None:
    from tests.test_cli import run

    path = _save_external(_weights(), tmp_path / "m")
    cache = tmp_path / "cache"
    first = run("report", str(path), "--format", "json", "--cache", str(cache), "--max-memory", "64GiB")
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""  # stderr is not a terminal: no progress bar
    second = run("report", str(path), "--format", "json", "--cache", str(cache))
    assert second.returncode == 0 and second.stdout == first.stdout
    assert len(list(cache.rglob("*.json"))) == len(json.loads(first.stdout)["layers"])
    small = run("report", str(path), "--max-memory", "1MiB")
    assert small.returncode == 2 and small.stderr.startswith("lipcheck: error: --max-memory")
    assert "Traceback" not in small.stderr
    bad = run("report", str(path), "--max-memory", "lots")
    assert bad.returncode == 2 and "expected a size like 2GiB" in bad.stderr


def test_config_max_memory_and_cache(tmp_path: Path) -> None:
    from lipcheck.config import ConfigError, Overrides, load_config

    config = tmp_path / "lipcheck.toml"
    config.write_text(
        'max_memory = "2GiB"\ncache = ".lipcheck-cache"\n[[models]]\npath = "a.onnx"\n'
        '[[models]]\npath = "b.onnx"\nmax-memory = 1000000\n'
    )
    cfg = load_config(config)
    assert cfg.models[0].settings.max_memory == 2 * GIB and cfg.models[1].settings.max_memory == 1_000_000
    assert cfg.models[0].settings.cache == tmp_path / ".lipcheck-cache"
    cfg = load_config(config, overrides=Overrides(max_memory=5, cache=tmp_path / "other"))
    assert cfg.models[1].settings.max_memory == 5 and cfg.models[1].settings.cache == tmp_path / "other"
    config.write_text('max_memory = "much"\n[[models]]\npath = "a.onnx"\n')
    with pytest.raises(ConfigError, match="max_memory"):
        load_config(config)


def test_plain_progress_lines_come_late_and_seldom() -> None:
    import io

    from lipcheck.progress import PlainProgress

    now = [0.0]
    stream = io.StringIO()
    progress = PlainProgress("bounding m.onnx", delay=10, every=5, stream=stream, clock=lambda: now[0])
    for i in range(200):  # one layer every 0.25 s for 50 s
        now[0] = i * 0.25
        progress(i, 200, f"layer{i}")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "lipcheck: bounding m.onnx: layer 41/200 (layer40), 10 s"
    assert len(lines) == 8 and all(line.startswith("lipcheck: bounding m.onnx: layer ") for line in lines)
    short = PlainProgress("x", delay=10, stream=io.StringIO(), clock=lambda: 0.0)
    short(0, 1, "a")
    assert short.lines == 0  # a short run prints nothing


@pytest.mark.parametrize("output_format", ["json", "table"])
def test_progress_lines_go_to_stderr_when_it_is_not_a_terminal(
    output_format: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import lipcheck.progress
    from tests.test_torch_frontend import run_cli

    monkeypatch.setattr(lipcheck.progress.PlainProgress.__init__, "__defaults__", (0.0, 0.0, None, time.monotonic))
    code, out, err = run_cli(capsys, "report", str(SAMPLES / "resnet_small.onnx"), "-f", output_format)
    assert code == 0
    lines = err.splitlines()
    assert lines and all(
        line.startswith("lipcheck: bounding ") and "resnet_small.onnx: layer " in line for line in lines
    )
    assert "lipcheck:" not in out  # stdout holds the data alone
    if output_format == "json":
        assert json.loads(out)["model"] == "resnet_small.onnx"
    code, out, err = run_cli(capsys, "normalize", str(SAMPLES / "mlp.onnx"), "--dry-run", "--lipschitz", "1")
    assert code == 0 and "lipcheck: normalize mlp.onnx: searching the common layer norm: trial 1" in err
