"""Hostile files for the tests: pickles that create a marker file when unpickled, and edited zip archives."""

from __future__ import annotations

import io
import os
import pickle
import random
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


# ---------------------------------------------------------------------- mutations, for the fuzz test


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(1, len(data))]


def flip_bits(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def splice_garbage(data: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(len(data))
    garbage = rng.randbytes(rng.randint(1, 64))
    return data[:at] + garbage + data[at + (rng.randint(0, 64) if rng.random() < 0.5 else 0) :]


def zero_region(data: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(len(data))
    length = rng.randint(1, 256)
    return data[:at] + bytes(min(length, len(data) - at)) + data[at + length :]


BYTE_MUTATIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "truncate": truncate, "flip": flip_bits, "splice": splice_garbage, "zero": zero_region,
}  # fmt: skip


def rename_member(items: list[Member], rng: random.Random, marker: Path) -> list[Member]:
    index = rng.randrange(len(items))
    name, data = items[index]
    folder, _, base = name.rpartition("/")
    new = rng.choice([f"{folder}/{base}x", f"{folder}/{base.upper()}", f"other/{base}", f"{folder}/../{base}"])
    return [*items[:index], (new, data), *items[index + 1 :]]


def duplicate_member(items: list[Member], rng: random.Random, marker: Path) -> list[Member]:
    index = rng.randrange(len(items))
    name, data = items[index]
    copy = (name, rng.choice([data, marker_pickle(marker), b""]))
    return [copy, *items] if rng.random() < 0.5 else [*items, copy]


def pickle_member(items: list[Member], rng: random.Random, marker: Path) -> list[Member]:
    """A member replaced by (or a new member holding) a pickle that would create the marker."""
    payload = rng.choice([marker_pickle(marker), marker_torch_save(marker)])
    root = root_of(items)
    if rng.random() < 0.5:
        index = rng.randrange(len(items))
        return [*items[:index], (items[index][0], payload), *items[index + 1 :]]
    place = rng.choice(
        [
            "data/weights/model.pt",
            "data/constants/model.pt",
            "data.pkl",
            "constants.pkl",
            "data/sample_inputs/model.pt",
            "data/constants/opaque_obj_0",
            "serialized_state_dict.pt",
        ]
    )
    return [(f"{root}/{place}", payload), *items]


ZIP_MUTATIONS: dict[str, Callable[[list[Member], random.Random, Path], list[Member]]] = {
    "rename": rename_member, "duplicate": duplicate_member, "pickle": pickle_member,
}  # fmt: skip
