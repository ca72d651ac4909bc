"""The command line's progress reporter: rich bars on a terminal, a line every 5% in a log file."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)


class RichTask:
    def __init__(self, console: Console, label: str, total: int | None, completed: int):
        self.console, self.label, self.total, self.done = console, label, total, completed
        self.bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), console=console)
        self.task = self.bar.add_task(label, total=total, completed=completed, info="")
        self.bar.start()
        self.every = max(1, (total or 20) // 20)

    def advance(self, n: int = 1, info: str = "") -> None:
        before, self.done = self.done, self.done + n
        self.bar.update(self.task, advance=n, info=info)
        if not self.console.is_terminal and self.done // self.every != before // self.every:
            self.console.log(f"{self.label} {self.done}/{self.total or '?'} {info}")  # a log file gets lines, not a bar

    def close(self) -> None:
        self.bar.stop()


class RichReporter:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)

    def __call__(self, label: str, total: int | None, completed: int = 0) -> RichTask:
        return RichTask(self.console, label, total, completed)

    def say(self, text: str) -> None:
        self.console.log(text)
