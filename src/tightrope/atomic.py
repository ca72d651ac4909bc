"""Atomic file writes: a temp file, fsync, then a rename, so a kill or a full disk never leaves a
half-written result. Kept free of heavy imports (no torch) so the study runner can use it too."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def replaced_dir(path: str | Path) -> Iterator[Path]:
    """Write a folder atomically: yield a temporary sibling of ``path``; when the block ends without
    an error, it replaces ``path`` (an old folder there is removed); otherwise it is deleted and
    ``path`` is left as it was."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a saved model is a folder like any other
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def append_json_lines(path: str | Path, rows: list[Any]) -> None:
    """Append ``rows`` as JSON lines in one write, flushed and fsynced: a kill loses at most the lines
    being written, and :func:`complete_lines` drops a line it cut short."""
    if not rows:
        return
    with open(path, "a", encoding="utf-8") as sink:
        sink.write("".join(json.dumps(row) + "\n" for row in rows))
        sink.flush()
        os.fsync(sink.fileno())


def complete_lines(path: str | Path) -> list[tuple[int, str]]:
    """The complete lines of a JSON Lines file as ``(line number, text)``, blank ones left out; a last
    line cut short by a kill is dropped and trimmed from the file, so that appends start on a fresh line."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep < len(raw):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return [(number, line) for number, line in enumerate(raw[:keep].decode("utf-8").splitlines(), 1) if line.strip()]
