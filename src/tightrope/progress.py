"""Progress of long work, reported through a callback so that the library never draws on a terminal.

Every long-running function takes ``progress``: ``False`` (silent), ``True`` (the application's
reporter: the command line installs a rich one with :func:`use`; silent when none is installed), or
a :class:`Reporter` of the caller's own. A reporter starts tasks, ``reporter(label, total,
completed) -> Task``, and says one-line notes, ``reporter.say(text)``; a task advances
(``task.advance(n, info)``) and closes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Task(Protocol):
    def advance(self, n: int = 1, info: str = "") -> None: ...

    def close(self) -> None: ...


class Reporter(Protocol):
    def __call__(self, label: str, total: int | None, completed: int = 0) -> Task: ...

    def say(self, text: str) -> None: ...


class _Silent:
    def __call__(self, label: str, total: int | None, completed: int = 0) -> _Silent:
        return self

    def advance(self, n: int = 1, info: str = "") -> None:
        pass

    def close(self) -> None:
        pass

    def say(self, text: str) -> None:
        pass


SILENT = _Silent()
_application: Reporter | None = None


def use(reporter: Reporter | None) -> None:
    """Install the application's reporter (what ``progress=True`` reports to); None: silent."""
    global _application
    _application = reporter


def reporter_of(progress: bool | Reporter | None) -> Reporter:
    if progress is True:
        return _application or SILENT
    if not progress:
        return SILENT
    return progress


@contextmanager
def tracked(progress: bool | Reporter | None, label: str, total: int | None, completed: int = 0) -> Iterator[Task]:
    """A task of ``progress``'s reporter for the length of a ``with`` block."""
    task = reporter_of(progress)(label, total, completed)
    try:
        yield task
    finally:
        task.close()


def say(progress: bool | Reporter | None, text: str) -> None:
    """One line of news (a step started, an evaluation's result) through ``progress``'s reporter."""
    reporter_of(progress).say(text)
