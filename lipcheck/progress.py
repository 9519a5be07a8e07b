"""The progress bar on stderr (layers done / total, current layer) for reports that take a while.

Presentation only: the core reports progress through ``compose``'s callback and knows nothing of Rich.
The bar appears once a run has lasted ``delay`` seconds (short reports never flash one), is removed
when the walk ends, and is used only when stderr is a terminal and the output is not JSON.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


def progress_wanted(json_output: bool, stream=None) -> bool:
    """A bar only for people: stderr is a terminal and stdout is not a JSON document for a program."""
    stream = stream if stream is not None else sys.stderr
    return not json_output and bool(getattr(stream, "isatty", lambda: False)())


class LayerProgress:
    """A ``compose`` progress callback drawing a Rich bar on stderr after ``delay`` seconds."""

    def __init__(
        self, label: str = "bounding", no_color: bool = False, delay: float = 1.0, console: Console | None = None
    ):
        self.label = label
        self.delay = delay
        self.console = console or Console(stderr=True, no_color=no_color or None, highlight=False)
        self._started = time.monotonic()  # loading the model counts towards the delay
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __call__(self, done: int, total: int, name: str) -> None:
        if done >= total:
            self.close()
            return
        if self._progress is None:
            if time.monotonic() - self._started < self.delay:
                return
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[layer]}"),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=total, layer=name)
        if self._task is not None:
            self._progress.update(self._task, completed=done, layer=name)

    @property
    def shown(self) -> bool:
        return self._progress is not None

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
