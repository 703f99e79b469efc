"""How long steps report progress. The library takes a plain `progress(message)` callable; a step
whose amount of work is known also calls `advance(progress, label, done, total)`. A reporter that
has an `advance` method (the CLI's, on rich) turns that into a bar with elapsed time and ETA; any
other callable gets a line now and then."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, TextIO

Progress = Callable[[str], None]
LINE_EVERY_S = 10.0  # without a live display (a log file, CI): one line per counted step this often


def advance(progress: Progress, label: str, done: int, total: int, note: str = "") -> None:
    """`done` of `total` units of the step `label` are finished; `note` (a rate, say) is shown
    beside the count."""
    counter = getattr(progress, "advance", None)
    if callable(counter):
        counter(label, done, total, note)
    elif done == total or done == 1:
        progress(f"{label}: {done}/{total}" + (f" ({note})" if note else ""))


def natural_key(name: str) -> list[Any]:
    """"layers.10.x" after "layers.9.x": numbers compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class Reporter:
    """The CLI's progress: each message is a timestamped line on stderr; while a step runs, a live
    line under it shows a spinner and the step's elapsed time (a heartbeat, so a long lowering is
    visibly alive), or a bar with ETA for counted steps. Without a terminal, lines only."""

    def __init__(self, stream: TextIO, check: Callable[[], None] = lambda: None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.start = time.perf_counter()
        self.check = check
        self.console = Console(file=stream, highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal
        # a counted step: "name ━━━━━╺━━━━ 3/8 0:00:12 ETA 0:00:20"; a step of unknown length: a
        # spinner, its name and its elapsed time
        self.bars = RichProgress(SpinnerColumn(), TextColumn("{task.description}"),
                                 BarColumn(bar_width=24), TextColumn("{task.fields[count]}"), TimeElapsedColumn(),
                                 TextColumn("{task.fields[eta]}"), console=self.console, transient=True,
                                 disable=not self.live)
        self.step: Any = None
        self.counted: dict[str, Any] = {}
        self.last_line: dict[str, float] = {}

    def __enter__(self) -> Reporter:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def __call__(self, message: str) -> None:
        self.check()
        self.console.print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", markup=False)
        if self.live:
            if self.step is not None:
                self.bars.remove_task(self.step)
            self.step = self.bars.add_task(message[:70], total=None, count="", eta="")

    def advance(self, label: str, done: int, total: int, note: str = "") -> None:
        self.check()
        suffix = f" ({note})" if note else ""
        if not self.live:
            now = time.perf_counter()
            if done in (1, total) or now - self.last_line.get(label, 0.0) >= LINE_EVERY_S:
                self.last_line[label] = now
                self.console.print(f"[{now - self.start:6.1f}s] {label}: {done}/{total}{suffix}", markup=False)
            return
        task = self.counted.get(label)
        if task is None:
            if self.step is not None:
                self.bars.remove_task(self.step)
                self.step = None
            task = self.counted[label] = self.bars.add_task(label, total=total, count="", eta="")
        self.bars.update(task, completed=done, total=total, count=f"{done}/{total}{suffix}")
        remaining = self.bars.tasks[self.bars.task_ids.index(task)].time_remaining
        self.bars.update(task, eta=f"ETA {remaining:.0f}s" if remaining is not None else "")
        if done >= total:
            self.bars.remove_task(task)
            del self.counted[label]
            self.console.print(f"[{time.perf_counter() - self.start:6.1f}s] {label}: {total}/{total} done{suffix}",
                               markup=False)
