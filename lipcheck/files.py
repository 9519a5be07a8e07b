"""Writing files the way every lipcheck command does: atomically, and never over a file without --force."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from lipcheck.errors import LipcheckError


def check_writable(path: Path, force: bool) -> None:
    """Fail early (before any work) when ``write_new_file`` would refuse ``path``."""
    if path.is_dir():
        raise LipcheckError(f"{path}: is a directory")
    if path.exists() and not force:
        raise LipcheckError(f"{path}: already exists; use --force to replace it")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise LipcheckError(f"{path}: folder {folder} does not exist")


def write_new_file(path: Path, text: str, force: bool) -> None:
    """Write atomically (temporary file, then rename); refuse to replace a file without --force."""
    path = Path(path)
    check_writable(path, force)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        raise LipcheckError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_text(path: Path, text: str) -> None:
    """Append (for $GITHUB_STEP_SUMMARY, which GitHub expects to be appended to)."""
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise LipcheckError(f"{path}: cannot append ({exc.strerror})") from None


def write_new_model(path: Path, write: Callable[[Path], None], force: bool) -> list[Path]:
    """Write a model (and any side files it makes, e.g. ONNX external data) atomically.

    ``write(tmp)`` writes into a private folder next to ``path`` under the final file name (torch names an
    archive's root after it, ONNX records external data by relative name); the files are then renamed into
    place, side files first, so an interrupted run leaves no half-written model. Refuses to replace any
    existing file without ``force``.
    """
    path = Path(path)
    check_writable(path, force)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    except OSError as exc:
        raise LipcheckError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        write(scratch / path.name)
        made = sorted(scratch.iterdir(), key=lambda p: p.name == path.name)  # the model itself last
        for item in made:
            target = folder / item.name
            if item.name != path.name and target.exists() and not force:
                raise LipcheckError(f"{target}: already exists; use --force to replace it")
        written = []
        for item in made:
            os.chmod(item, 0o644)
            os.replace(item, folder / item.name)
            written.append(folder / item.name)
        return written
    finally:
        for leftover in scratch.iterdir():
            leftover.unlink()
        scratch.rmdir()
