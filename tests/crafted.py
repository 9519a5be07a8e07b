"""Hostile files for the tests: pickles that create a marker file when unpickled, and edited zip archives."""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

Member = tuple[str, bytes]


class WritesMarker:
    """Unpickling this runs ``touch MARKER`` (os.system): the stand-in for a malicious payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., int], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def marker_pickle(marker: Path) -> bytes:
    """A plain pickle that creates ``marker`` when unpickled."""
    return pickle.dumps(WritesMarker(marker), protocol=2)


def marker_torch_save(marker: Path) -> bytes:
    """The same payload as torch.save writes it (a zip archive), for members torch reads with torch.load."""
    import torch

    buffer = io.BytesIO()
    torch.save((WritesMarker(marker),), buffer)
    return buffer.getvalue()


def members(path: Path) -> list[Member]:
    """Every member of a zip archive, in directory order."""
    with zipfile.ZipFile(path) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def write_zip(path: Path, items: Sequence[Member]) -> Path:
    """Write members as given (duplicates included: zipfile only warns), uncompressed as torch writes them."""
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as archive:
        warnings.simplefilter("ignore")
        for name, data in items:
            archive.writestr(zipfile.ZipInfo(name), data)
    return path


def root_of(items: Sequence[Member]) -> str:
    return items[0][0].split("/", 1)[0]
