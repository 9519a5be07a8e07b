"""The per-layer cache trusts only entries signed with its key, which does not live in the cache folder: a
forged entry (its old unkeyed checksum recomputed) or a cache restored from elsewhere never lowers a bound."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from lipcheck.cache import KEY_ENV, CacheError, LayerCache, key_path
from lipcheck.gate import GateOptions, evaluate
from lipcheck.pipeline import analyse
from tests.conftest import SAMPLES

MODEL = SAMPLES / "cnn_bn.onnx"
FORGED = 3.9e-14


@pytest.fixture(autouse=True)
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The key is made under $XDG_CONFIG_HOME: a temporary folder here, never the real home."""
    home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.delenv(KEY_ENV, raising=False)
    return home


def forge(folder: Path) -> int:
    """Set every cached bound to 3.9e-14 and recompute the unkeyed sha256 checksum entries used to carry."""
    entries = sorted(folder.rglob("*.json"))
    for entry in entries:
        data = json.loads(entry.read_text())
        data["bound"]["value"] = FORGED.hex()
        payload = {k: data[k] for k in ("format", "key", "bound", "input_lipschitz")}
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        entry.write_text(json.dumps({**payload, "checksum": digest, "hmac": digest}))
    return len(entries)


def test_a_forged_entry_with_a_recomputed_checksum_is_not_trusted(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    expected = analyse(MODEL, device="cpu", cache=folder).to_dict()
    assert forge(folder) == len(expected["layers"])
    cache = LayerCache(folder)
    report = analyse(MODEL, device="cpu", cache=cache)
    assert report.to_dict() == expected and report.upper_bound > 0.1
    assert cache.stats.hits == 0 and cache.stats.corrupt == len(expected["layers"])
    assert not evaluate(report.to_dict(), GateOptions(fail_above=0.1)).passed  # the gate still sees the truth


def test_a_cache_signed_with_another_key_is_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache folder restored from another machine or CI run: ignored, recomputed, then trusted here."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(KEY_ENV, "the other machine's key")
    expected = analyse(MODEL, device="cpu", cache=folder).to_dict()
    monkeypatch.setenv(KEY_ENV, "this machine's own key")
    here = LayerCache(folder)
    assert analyse(MODEL, device="cpu", cache=here).to_dict() == expected
    assert here.stats.hits == 0
    again = LayerCache(folder)
    assert analyse(MODEL, device="cpu", cache=again).to_dict() == expected
    assert again.stats.hits == len(expected["layers"])


def test_the_key_is_made_once_outside_the_cache_and_private(tmp_path: Path, config_home: Path) -> None:
    folder = tmp_path / "cache"
    LayerCache(folder)
    path = key_path()
    assert path == config_home / "lipcheck" / "cache.key" and not path.is_relative_to(folder)
    key = path.read_bytes()
    assert len(key.strip()) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    LayerCache(tmp_path / "other")
    assert path.read_bytes() == key
    assert not list(config_home.glob("lipcheck/.cache.key-*"))  # no temporary file left


def test_a_key_others_can_read_or_a_short_one_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    LayerCache(tmp_path / "cache")
    os.chmod(key_path(), 0o644)
    with pytest.raises(CacheError, match="readable or writable by others"):
        LayerCache(tmp_path / "cache")
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(CacheError, match="too short"):
        LayerCache(tmp_path / "cache")
