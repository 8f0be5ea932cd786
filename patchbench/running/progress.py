"""Progress on stderr for every long step: a rich bar on a terminal, plain lines otherwise
(so that a run logged to a file still shows how far it got)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr_console = Console(stderr=True)


class LineProgress:
    """The part of rich's Progress API we use, printing a line every ``every`` seconds."""

    def __init__(self, every: float = 30.0) -> None:
        self.every, self.tasks = every, {}

    def add_task(self, description: str, total: float, **fields: Any) -> int:
        self.tasks[len(self.tasks)] = {"description": description, "total": total,
                                       "completed": 0, "start": time.monotonic(),
                                       "last": time.monotonic(), **fields}
        return len(self.tasks) - 1

    def update(self, task_id: int, advance: float = 0, **fields: Any) -> None:
        task = self.tasks[task_id]
        task["completed"] += advance
        task.update(fields)
        now = time.monotonic()
        if now - task["last"] >= self.every or task["completed"] >= task["total"]:
            task["last"] = now
            print(f"{task['description']}: {task['completed']:.0f}/{task['total']:.0f} "
                  f"{now - task['start']:.0f}s {task.get('status', '')}", file=sys.stderr,
                  flush=True)


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | LineProgress]:
    """A Progress with a ``status`` field; disabled bars still accept updates."""
    if enabled and not stderr_console.is_terminal:
        yield LineProgress()
        return
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                   console=stderr_console, disable=not enabled, transient=False)
    with bar:
        yield bar
