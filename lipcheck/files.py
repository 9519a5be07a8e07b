"""Writing files the way every lipcheck command does: atomically, and never over a file without --force."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
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


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same resolved path, or the same inode (hard and symbolic links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def check_new_model(model: Path, out: Path, force: bool) -> None:
    """Refuse, before anything is loaded, an output that is the input model (whatever the flags, --force
    included), an existing file (without --force), or a folder that is missing or where nothing can be written."""
    if same_file(out, model):
        how = "" if Path(out).resolve() == Path(model).resolve() else " (the same file through a link)"
        raise LipcheckError(
            f"{out}: is the input model{how}; lipcheck never modifies its input, even with --force (use another -o)"
        )
    check_writable(out, force)
    folder = out.parent if str(out.parent) else Path(".")
    try:
        Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=folder)).rmdir()  # the staging folder will go there
    except OSError as exc:
        raise LipcheckError(f"{out}: cannot write ({exc.strerror})") from None


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block is done, then raise it: for renames that must all happen or none.

    Only the main thread can change signal handlers; elsewhere the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)


class StagedModel:
    """A model written into a private folder next to its target, moved into place only by ``commit``.

    ``write(fn)`` calls ``fn(tmp)`` with a path in that folder under the final file name (torch names an
    archive's root after it, ONNX records external data by relative name), so the staged model can be
    loaded and proven where it is. ``commit`` renames every file it made into place, side files first,
    with Ctrl-C held, and refuses to replace an existing file without ``force`` or any file in
    ``protect`` (the input model's own files) at all. Leaving the ``with`` block removes whatever was not
    committed: a failed proof, an error or an interrupt leaves nothing at the target.
    """

    def __init__(self, path: Path, force: bool, protect: Iterable[Path] = ()):
        self.path = Path(path)
        self.force = force
        self.protect = [Path(p) for p in protect]
        check_writable(self.path, force)
        self.folder = self.path.parent if str(self.path.parent) else Path(".")
        self.scratch: Path | None = None

    def __enter__(self) -> StagedModel:
        try:
            self.scratch = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.folder))
        except OSError as exc:
            raise LipcheckError(f"{self.path}: cannot write ({exc.strerror})") from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()

    @property
    def model(self) -> Path:
        """Where the staged model is (under its final name, in the staging folder)."""
        assert self.scratch is not None, "use StagedModel in a with block"
        return self.scratch / self.path.name

    def write(self, write: Callable[[Path], None]) -> Path:
        write(self.model)
        return self.model

    def commit(self) -> list[Path]:
        assert self.scratch is not None
        made = sorted(self.scratch.iterdir(), key=lambda p: p.name == self.path.name)  # the model itself last
        for item in made:
            target = self.folder / item.name
            if target.exists() and any(same_file(target, p) for p in self.protect):
                raise LipcheckError(f"{target}: is a file of the input model; lipcheck never modifies its input")
            if item.name != self.path.name and target.exists() and not self.force:
                raise LipcheckError(f"{target}: already exists; use --force to replace it")
        written = []
        with interrupts_deferred():
            for item in made:
                os.chmod(item, 0o644)
                os.replace(item, self.folder / item.name)
                written.append(self.folder / item.name)
        return written

    def discard(self) -> None:
        if self.scratch is None or not self.scratch.exists():
            return
        for leftover in self.scratch.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        self.scratch.rmdir()
        self.scratch = None


def write_new_model(path: Path, write: Callable[[Path], None], force: bool, protect: Iterable[Path] = ()) -> list[Path]:
    """Write a model (and any side files it makes, e.g. ONNX external data) atomically (``StagedModel``)."""
    with StagedModel(path, force, protect) as staged:
        staged.write(write)
        return staged.commit()
