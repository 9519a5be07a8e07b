"""Progress on stderr (never on stdout) for runs that take a while: a bar on a terminal, plain lines in logs.

Presentation only: the core reports progress through ``compose``'s callback (and ``normalize``'s stage
notes) and knows nothing of Rich. On a terminal, ``LayerProgress`` draws a Rich bar once a run has lasted
``delay`` seconds (short reports never flash one) and removes it when the walk ends; not with ``--format
json``, whose reader is usually a program. When stderr is not a terminal (CI logs, pipes), ``PlainProgress``
writes a plain line now and then, as pip and pytest do: the first after ``delay`` seconds, then at most
one every ``every`` seconds, so short runs print nothing. stdout holds only the data, in every format.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


def progress_wanted(json_output: bool, stream=None) -> bool:
    """A bar only for people: stderr is a terminal and stdout is not a JSON document for a program."""
    stream = stream if stream is not None else sys.stderr
    return not json_output and is_terminal(stream)


def is_terminal(stream: object) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


class PlainProgress:
    """Progress as plain lines on stderr, for logs: ``lipcheck: LABEL: layer 120/500 (layer3.2.conv1), 30 s``.

    A ``compose`` progress callback, and ``stage(text)`` for the steps of a run (normalize's certifications).
    Nothing before ``delay`` seconds, then at most one line every ``every`` seconds: the latest news.
    """

    def __init__(
        self,
        label: str,
        delay: float = 10.0,
        every: float = 10.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label, self.delay, self.every = label, delay, every
        self.stream = stream
        self.clock = clock
        self._started = clock()
        self._last: float | None = None
        self.lines = 0

    def __call__(self, done: int, total: int, name: str) -> None:
        if done < total:
            self.stage(f"layer {done + 1}/{total} ({name})" if name else f"layer {done + 1}/{total}")

    def stage(self, text: str) -> None:
        now = self.clock()
        if now - self._started < self.delay or (self._last is not None and now - self._last < self.every):
            return
        self._last = now
        stream = self.stream or sys.stderr
        stream.write(f"lipcheck: {self.label}: {text}, {now - self._started:.0f} s\n")
        stream.flush()
        self.lines += 1

    def close(self) -> None:
        pass


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
