"""User-facing errors: one clear sentence, shown without a traceback by the CLI."""

from __future__ import annotations

from pathlib import Path


class TightropeError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it."""


class MissingResourceError(TightropeError):
    """A model, dataset or linguistic resource that is not installed here."""


def read_user_file(path: str | Path, what: str) -> str:
    """The text of a file the user named (a study file, a null, a data file); a missing one is the
    sentence "The <what> <path> does not exist." (or "... is not a text file.") rather than a traceback."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TightropeError(f"The {what} {path} does not exist.")
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise TightropeError(f"The {what} {path} is not a text file.") from None
