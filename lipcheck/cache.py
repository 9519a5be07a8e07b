"""Per-layer result cache (``--cache DIR``): repeated runs in CI recompute only the layers that changed.

An entry is one rule's answer (``LocalBound``) for one node, stored under a key that hashes everything
the rule can see: the op, its attributes, the BatchNorms folded into it, every input's role (absent,
network-dependent or constant), shape and, for constants, dtype and bytes; the output shapes; the rule
that answered, the device type, lipcheck's version and a fingerprint of lipcheck's source code (any
edit to the code invalidates every entry, so a fixed bug never hides behind a cached number).

Answers that depend on the Lipschitz constants of the node's inputs (``output_lipschitz``, e.g. Add)
are stored with those constants and reused only when they are equal.

Entries are written atomically (a temporary file renamed into place) and carry their key and an HMAC
made with a key that does not live in the cache folder (``$LIPCHECK_CACHE_KEY``, else a random key
created once under the user's config folder): a truncated, edited or foreign entry, or one signed with
another key (a cache restored from another machine or a pull request's CI run), is ignored and
recomputed, never trusted, so no cache can lower a bound.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import math
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import lipcheck
from lipcheck.errors import LipcheckError
from lipcheck.graph import Graph
from lipcheck.ops import LocalBound, Op, RuleContext

CACHE_FORMAT = "lipcheck.cache/2"
KEY_ENV = "LIPCHECK_CACHE_KEY"


class CacheError(LipcheckError):
    """The cache folder cannot be created or written."""


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of every Python file of the lipcheck package: results of other code are never reused."""
    root = Path(lipcheck.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def array_digest(value: np.ndarray) -> str:
    """dtype, shape and bytes of an array."""
    array = np.ascontiguousarray(value)
    digest = hashlib.blake2b(digest_size=32)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    if array.dtype.hasobject:
        digest.update(repr(array.tolist()).encode())
    else:
        digest.update(array.data.cast("B") if array.size else b"")
    return digest.hexdigest()


def _canonical(value: Any) -> Any:
    """A JSON-able form of an attribute value that differs whenever the value differs."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return {"float": value.hex()}
    if isinstance(value, (np.ndarray, np.generic)):
        return {"array": array_digest(np.asarray(value))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, Graph):  # a converted subgraph: its body-local weights live in its constants
        return {"graph": graph_digest(value)}
    serialise = getattr(value, "SerializeToString", None)  # protobuf (e.g. a subgraph attribute)
    if serialise is not None:
        return {"proto": hashlib.sha256(serialise(deterministic=True)).hexdigest()}
    return {"repr": repr(value)}


def graph_digest(graph: Graph) -> str:
    """A hash of everything a (sub)graph computes with: nodes and their attributes, names, the bytes of its
    constants, shapes and number types."""
    description = {
        "nodes": [[n.name, n.op, n.inputs, n.outputs, _canonical(n.attrs), n.folded] for n in graph.nodes],
        "inputs": list(graph.inputs),
        "outputs": list(graph.outputs),
        "constants": {name: array_digest(np.asarray(graph.constants[name])) for name in sorted(graph.constants)},
        "shapes": {name: _canonical(shape) for name, shape in sorted(graph.shapes.items())},
        "dtypes": dict(sorted(graph.dtypes.items())),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _float_hex(value: float | None) -> str | None:
    return None if value is None else float(value).hex()


def _bound_to_dict(bound: LocalBound) -> dict[str, Any]:
    return {
        "value": _float_hex(bound.value),
        "method": bound.method,
        "certified": bound.certified,
        "exact": bound.exact,
        "output_lipschitz": _float_hex(bound.output_lipschitz),
        "reason": bound.reason,
        "outputs_lipschitz": None
        if bound.outputs_lipschitz is None
        else [_float_hex(v) for v in bound.outputs_lipschitz],
    }


def _bound_from_dict(data: dict[str, Any]) -> LocalBound:
    output, each = data["output_lipschitz"], data.get("outputs_lipschitz")
    bound = LocalBound(
        value=float.fromhex(data["value"]),
        method=str(data["method"]),
        certified=bool(data["certified"]),
        exact=bool(data["exact"]),
        output_lipschitz=None if output is None else float.fromhex(output),
        reason=None if data["reason"] is None else str(data["reason"]),
        outputs_lipschitz=None if each is None else tuple(float.fromhex(v) for v in each),
    )
    if not isinstance(data["certified"], bool) or not isinstance(data["exact"], bool) or math.isnan(bound.value):
        raise ValueError("malformed entry")
    return bound


def _signature(key: bytes, payload: dict[str, Any]) -> str:
    """Keyed, so that whoever can write the cache folder but not read the key cannot forge an entry."""
    return hmac.new(key, json.dumps(payload, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def key_path() -> Path:
    """Where the cache key is kept when $LIPCHECK_CACHE_KEY is not set: the user's config folder."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "lipcheck" / "cache.key"


def cache_key() -> bytes:
    """$LIPCHECK_CACHE_KEY (e.g. a CI secret), else the key file, created with a random key on first use."""
    given = os.environ.get(KEY_ENV)
    if given is not None:
        if len(given) < 16:
            raise CacheError(f"${KEY_ENV}: too short to sign cache entries (16 characters at least)")
        return given.encode()
    path = key_path()
    try:
        if not path.exists():
            _create_key(path)
        if os.name == "posix" and path.stat().st_mode & 0o077:
            raise CacheError(f"{path}: the cache key is readable or writable by others; chmod 600 it")
        key = path.read_bytes().strip()
    except OSError as exc:
        raise CacheError(f"{path}: cannot read or create the cache key ({exc.strerror or exc})") from None
    if len(key) < 32:
        raise CacheError(f"{path}: not a lipcheck cache key (delete it: a new one is made on the next run)")
    return key


def _create_key(path: Path) -> None:
    """Written to a private temporary file, then linked into place: two runs starting together agree."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".cache.key-")  # mode 0600
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(secrets.token_hex(32) + "\n")
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another run made it first: use theirs
        except OSError:  # no hard links here: the last writer wins, entries signed by the other are recomputed
            os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0  # including entries found but unusable (corrupt, other input constants)
    corrupt: int = 0
    write_errors: int = 0


class LayerCache:
    """A folder of per-layer results; ``bound`` answers from it or computes and stores."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"--cache {folder}: cannot create the folder ({exc.strerror})") from None
        if not self.folder.is_dir() or not os.access(self.folder, os.W_OK | os.X_OK):
            raise CacheError(f"--cache {folder}: not a writable folder")
        self.stats = CacheStats()
        self._key = cache_key()
        self._graph: object | None = None  # the graph the digests belong to (held: ids are not reused)
        self._digests: dict[str, str] = {}  # constant name -> digest, for that graph
        self._values: set[str] | None = None  # values some node or the graph's outputs read, for that graph

    # -- keys
    def key(self, ctx: RuleContext, op: Op) -> str:
        node, graph = ctx.node, ctx.graph
        if graph is not self._graph:
            self._graph, self._digests, self._values = graph, {}, None
        digests = self._digests
        inputs: list[dict[str, Any] | None] = []
        for index, name in enumerate(node.inputs):
            if not name:
                inputs.append(None)
            elif ctx.is_variable(index):
                inputs.append({"variable": _canonical(ctx.shape(index))})
            elif name in graph.constants:
                if name not in digests:
                    digests[name] = array_digest(np.asarray(graph.constants[name]))
                inputs.append({"constant": digests[name]})
            else:  # neither a constant nor dependent on the input (e.g. a shape-only value)
                inputs.append({"other": _canonical(ctx.shape(index))})
        description = {
            "format": CACHE_FORMAT,
            "lipcheck": lipcheck.__version__,
            "code": code_fingerprint(),
            "device": ctx.device.type,
            "rule": f"{type(op).__module__}.{type(op).__qualname__}",
            "op": node.op,
            "attrs": _canonical(node.attrs),
            "folded": list(node.folded),
            "inputs": inputs,
            "outputs": [_canonical(graph.shape(o)) if o else None for o in node.outputs],
            # a rule may depend on whether a second output is read (TopK's and MaxPool's indices)
            "used_outputs": [name in self._values_read(graph) for name in node.outputs[1:]],
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()

    def _values_read(self, graph: Graph) -> set[str]:
        """The values some node reads or the graph outputs (``RuleContext.output_used``, once per graph)."""
        if self._values is None:
            self._values = {value for node in graph.nodes for value in node.inputs if value} | set(graph.outputs)
        return self._values

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    # -- lookup and store
    def bound(self, ctx: RuleContext, op: Op) -> LocalBound:
        """The cached answer for this node, or the op's rule's (then stored)."""
        key = self.key(ctx, op)
        inputs_l = [float(v).hex() for v in ctx.input_lipschitz]
        found = self._read(key, inputs_l)
        if found is not None:
            self.stats.hits += 1
            return found
        self.stats.misses += 1
        bound = op.lipschitz(ctx)
        self._write(key, bound, inputs_l)
        return bound

    def _read(self, key: str, inputs_l: list[str]) -> LocalBound | None:
        path = self._path(key)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            self.stats.corrupt += 1
            return None
        try:
            payload = {k: data[k] for k in ("format", "key", "bound", "input_lipschitz")}
            signed = hmac.compare_digest(str(data["hmac"]), _signature(self._key, payload))
            if not signed or data["format"] != CACHE_FORMAT or data["key"] != key:
                raise ValueError("signature or key mismatch")
            bound = _bound_from_dict(data["bound"])
        except (KeyError, TypeError, ValueError, AttributeError):
            self.stats.corrupt += 1
            return None
        if bound.output_lipschitz is not None and data["input_lipschitz"] != inputs_l:
            return None  # this answer scales with the inputs' constants, which differ now
        return bound

    def _write(self, key: str, bound: LocalBound, inputs_l: list[str]) -> None:
        payload = {
            "format": CACHE_FORMAT,
            "key": key,
            "bound": _bound_to_dict(bound),
            "input_lipschitz": inputs_l if bound.output_lipschitz is not None else None,
        }
        text = json.dumps({**payload, "hmac": _signature(self._key, payload)}, indent=1)
        path = self._path(key)
        temporary = None
        try:
            path.parent.mkdir(exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}-", suffix=".tmp")
            with os.fdopen(handle, "w") as stream:
                stream.write(text)  # no fsync: a torn file fails its signature and is recomputed
            os.replace(temporary, path)
            temporary = None
        except OSError:
            self.stats.write_errors += 1
        finally:
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
