"""The zip-based PyTorch formats, checked with one set of rules before torch reads them.

torch.save archives (state_dicts, checkpoints, Lightning ``.ckpt``), TorchScript and ``torch.export``
programs (``.pt2``) are zip files that torch reads with its own zip reader, by member name, without
regard to case. Python's ``zipfile`` and torch's reader can disagree (two members of one name: each
reads a different copy), and ``torch.export.load`` unpickles some members with full Python (legacy
weight files, weights marked ``use_pickle``, opaque constants; its sample inputs when ``weights_only``
fails). So before torch sees an archive: it must read the same to both readers, hold no duplicate,
keep every member in one folder, hold only the members torch writes for its kind, and hold nothing
torch would unpickle beyond ``weights_only``, unless the user trusts the file. Nothing is executed.
"""

from __future__ import annotations

import io
import json
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lipcheck.errors import ModelLoadError

ZIP_MAGIC = b"PK\x03\x04"  # torch.load takes a file for an archive by these first bytes, nothing else
TRUST_FLAG = "--trust-pickle"

_COMMON = r"version|byteorder|\.data/version|\.data/serialization_id"
EXPECTED_MEMBERS = {
    "pickle": re.compile(rf"{_COMMON}|data\.pkl|\.format_version|\.storage_alignment|data/\d+"),
    "torchscript": re.compile(
        rf"{_COMMON}|(data|constants|bytecode|traced_inputs)\.pkl|(data|constants|traced_inputs)/\d+|code/.+|extra/.+"
    ),
    "pt2": re.compile(
        rf"{_COMMON}|archive_format|archive_version|models/\w+\.json|extra/.+|data/sample_inputs/\w+\.pt"
        r"|data/weights/(weight_\d+|\w+_weights_config\.json)|data/constants/(tensor_\d+|\w+_constants_config\.json)"
    ),
}
KIND_NAMES = {"pickle": "torch.save archive", "torchscript": "TorchScript archive", "pt2": "torch.export archive"}
# members of a .pt2 that torch.export.load unpickles with full Python (or loads as native code)
PT2_CODE_MEMBERS = re.compile(
    r"data/(weights|constants)/\w+\.pt|data/constants/(custom|opaque)_obj_\d+|data/aotinductor/.+"
)
PT2_CONFIGS = {"weights": ("weight_", re.compile(r"data/weights/\w+_weights_config\.json")),
               "constants": ("tensor_", re.compile(r"data/constants/\w+_constants_config\.json"))}  # fmt: skip
_SEGMENT = re.compile(r"[\x20-\x7e]+")  # printable ASCII: both readers decode it the same way


class UntrustedPickleError(ModelLoadError):
    """The file needs arbitrary Python objects and the user did not say it is trusted."""


@dataclass(frozen=True)
class Archive:
    """A zip archive that torch and Python's zipfile read alike: its kind, root folder and member names."""

    path: Path
    kind: str  # 'pickle' (torch.save), 'torchscript' or 'pt2'
    root: str
    names: tuple[str, ...]  # relative to the root folder, as torch names its records

    def read(self, name: str) -> bytes:
        """A member's bytes as torch reads them (its reader, not zipfile's), so both see the same data."""
        return bytes(torch._C.PyTorchFileReader(str(self.path)).get_record(name))


def starts_like_zip(path: Path) -> bool:
    """torch.load, torch.jit.load and torch.export.load read a file as an archive when it starts like one."""
    with path.open("rb") as handle:
        return handle.read(4) == ZIP_MAGIC


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:240]


def read_archive(path: Path) -> Archive:
    """The archive's layout, refused (one line naming the member) wherever the two zip readers could differ."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [info.filename for info in archive.infolist()]
    except Exception as exc:  # zipfile raises many types on a damaged directory
        raise ModelLoadError(f"{path}: not a readable PyTorch file (damaged zip archive: {_short(exc)})") from None
    if not names:
        raise ModelLoadError(f"{path}: not a readable PyTorch file (an empty zip archive)")
    root = names[0].split("/", 1)[0]
    seen: dict[str, str] = {}
    for name in names:
        segments = name.split("/")
        if segments[0] != root or len(segments) < 2 or not all(_clean_segment(s) for s in segments):
            raise ModelLoadError(f"{path}: member {name!r} is outside the archive's folder {root}/ or badly named")
        if name.casefold() in seen:  # torch finds members without regard to case
            also = "" if seen[name.casefold()] == name else f" (the same name to torch as {seen[name.casefold()]})"
            raise ModelLoadError(
                f"{path}: duplicate member {name}{also}: zip readers differ on which copy they read; refused"
            )
        seen[name.casefold()] = name
    relative = tuple(name[len(root) + 1 :] for name in names)
    _same_as_torch(path, relative)
    return Archive(path, _kind(path, set(relative)), root, relative)


def _clean_segment(segment: str) -> bool:
    return segment not in (".", "..") and "\\" not in segment and _SEGMENT.fullmatch(segment) is not None


def _same_as_torch(path: Path, relative: tuple[str, ...]) -> None:
    """torch's reader must list exactly the members zipfile lists (else one of them misreads the directory)."""
    try:
        records = torch._C.PyTorchFileReader(str(path)).get_all_records()
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable PyTorch file (torch cannot read it: {_short(exc)})") from None
    if sorted(records) != sorted(relative):
        differ = sorted(set(records) ^ set(relative)) or ["(their number)"]
        raise ModelLoadError(f"{path}: torch and Python's zipfile read different members ({differ[0]}); refused")


def _kind(path: Path, names: set[str]) -> str:
    if "archive_format" in names:
        return "pt2"
    if "constants.pkl" in names and any(name.startswith("code/") for name in names):
        return "torchscript"
    if "data.pkl" in names:
        return "pickle"
    raise ModelLoadError(
        f"{path}: not a readable PyTorch file (a zip archive with none of data.pkl, constants.pkl, archive_format)"
    )


def check_members(archive: Archive, trusted: bool) -> None:
    """Refuse what torch would read beyond weights_only, and any member torch does not write, unless trusted."""
    if trusted:
        return
    if archive.kind == "pt2":
        _check_pt2_pickles(archive)
    expected = EXPECTED_MEMBERS[archive.kind]
    for name in archive.names:
        if not expected.fullmatch(name):
            raise UntrustedPickleError(
                f"{archive.path}: unexpected member {archive.root}/{name} in a {KIND_NAMES[archive.kind]}; lipcheck "
                f"reads only the members torch writes. If you trust the file, pass {TRUST_FLAG}"
            )


def _check_pt2_pickles(archive: Archive) -> None:
    """torch.export.load unpickles these with weights_only=False: legacy weight files, use_pickle payloads,
    custom and opaque constants; AOTInductor members are native code; sample inputs fall back to full pickle."""
    for name in archive.names:
        if PT2_CODE_MEMBERS.fullmatch(name):
            _refuse_member(archive, name, "torch.export.load would unpickle it (or load it as code)")
    for kind, (prefix, config_name) in PT2_CONFIGS.items():
        for name in (n for n in archive.names if config_name.fullmatch(n)):
            for fqn, member in _pickled_payloads(archive, name, prefix):
                _refuse_member(archive, f"data/{kind}/{member}", f"its config marks {fqn} as a pickle")
    for name in (n for n in archive.names if n.startswith("data/sample_inputs/")):
        data = archive.read(name)
        if data and not loads_weights_only(data):
            _refuse_member(archive, name, "torch.export.load would unpickle these sample inputs with full Python")


def _pickled_payloads(archive: Archive, config_name: str, prefix: str) -> list[tuple[str, str]]:
    """(fqn, member) of every payload a weights or constants config says torch must unpickle."""
    try:
        entries = json.loads(archive.read(config_name))["config"]
        items = [(str(fqn), entry.get("use_pickle"), entry.get("path_name")) for fqn, entry in entries.items()]
    except Exception:
        raise ModelLoadError(f"{archive.path}: member {archive.root}/{config_name} is not a payload config") from None
    pickled = []
    for fqn, use_pickle, member in items:
        if not isinstance(member, str) or not re.fullmatch(r"\w+_\d+", member):
            raise ModelLoadError(f"{archive.path}: {archive.root}/{config_name}: {fqn} names no member ({member!r})")
        if use_pickle or not member.startswith(prefix):
            pickled.append((fqn, member))
    return pickled


def _refuse_member(archive: Archive, name: str, why: str) -> None:
    try:
        wanted = pickle_wants(archive.read(name))
    except Exception:
        wanted = []
    asks = f"; it asks for {', '.join(wanted[:5])}" if wanted else ""
    raise UntrustedPickleError(
        f"{archive.path}: refused to unpickle member {archive.root}/{name}: {why}, which runs code from the file"
        f"{asks}. If you trust it, pass {TRUST_FLAG}"
    )


def loads_weights_only(data: bytes) -> bool:
    """Whether torch.load(weights_only=True) reads these bytes (then torch never falls back to a full unpickle)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), weights_only=True)
    except Exception:
        return False
    return True


def pickle_wants(data: bytes) -> list[str]:
    """What a pickle (plain, or a torch.save archive) imports beyond weights_only's allowlist; nothing is run."""
    try:
        if data[:4] == ZIP_MAGIC:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)))
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
        return sorted(name for name in pickle_globals(data) if name not in allowed)
    except Exception:
        return []


def pickle_globals(data: bytes) -> list[str]:
    """'module.name' of every GLOBAL / STACK_GLOBAL in a pickle stream (or several, as legacy torch.save writes)."""
    found: list[str] = []
    offset = 0
    while offset < len(data):
        strings: list[str] = []
        memo: dict[int, str] = {}
        end = offset
        for opcode, arg, pos in pickletools.genops(data[offset:]):
            end = offset + int(pos or 0)
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING"):
                strings.append(str(arg))
            elif name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[int(arg)] = strings[-1]  # type: ignore[arg-type]
            elif name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:  # type: ignore[arg-type]
                strings.append(memo[int(arg)])  # type: ignore[arg-type]
            elif name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif name == "STOP":
                break
        if end <= offset:
            break
        offset = end + 1
    return list(dict.fromkeys(found))
