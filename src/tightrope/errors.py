"""User-facing errors: one clear sentence, shown without a traceback by the CLI."""

from __future__ import annotations

import difflib
from pathlib import Path


class TightropeError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it."""


class MissingResourceError(TightropeError):
    """A model, dataset or linguistic resource that is not installed here."""


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the known name closest to a misspelt ``name`` (difflib), or ``""``."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


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
