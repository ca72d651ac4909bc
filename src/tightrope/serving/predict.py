"""``tightrope predict``: classify a JSONL, CSV or text stream with a bundle; write JSON Lines.

Input records are read in chunks (``chunk`` texts at a time, so memory stays bounded on any input
size), each chunk is classified in length buckets, and one output line per input record is written
in input order: ``{"label": ..., "probabilities": {...}}``, with the record's ``id`` carried over
when it has one.

Formats: ``jsonl`` (one JSON object per line with a text field, or one JSON string per line),
``csv`` (a header row naming the text column), ``text`` (one text per line). The format follows
the file's extension and is ``jsonl`` for stdin unless ``--format`` says otherwise.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from tightrope.serving.bundle import Bundle, BundleError

FORMATS = ("jsonl", "csv", "text")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".txt": "text"}


def input_format(path: str | None, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise BundleError(f"--format takes {', '.join(FORMATS)}, not '{fmt}'.")
        return fmt
    if path in (None, "-"):
        return "jsonl"
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise BundleError(f"Cannot tell the format of {path} from its extension; give --format {'/'.join(FORMATS)}.")
    return EXTENSIONS[suffix]


def read_records(stream: TextIO, fmt: str, field: str = "text") -> Iterator[tuple[str, object]]:
    """``(text, id or None)`` for each record; a one-sentence :class:`BundleError` names the first bad line."""
    if fmt == "csv":
        csv.field_size_limit(sys.maxsize)
        reader = csv.DictReader(stream)
        if reader.fieldnames is None or field not in reader.fieldnames:
            raise BundleError(f"The CSV input has no '{field}' column (columns: {', '.join(reader.fieldnames or [])}); "
                              "name it with --field.")
        for row in reader:
            yield _checked(row[field], reader.line_num), row.get("id")
        return
    for number, line in enumerate(stream, start=1):
        line = line.rstrip("\r\n")
        if fmt == "text":
            yield _checked(line, number), None
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BundleError(f"Line {number} of the input is not valid JSON ({err.msg}).") from None
        if isinstance(record, str):
            yield _checked(record, number), None
        elif isinstance(record, dict) and field in record:
            yield _checked(record[field], number), record.get("id")
        else:
            raise BundleError(f"Line {number} of the input is neither a JSON string nor an object with a '{field}' field.")


def _checked(text, where: int) -> str:
    if not isinstance(text, str):
        raise BundleError(f"Line {where} of the input has a {type(text).__name__} where a text should be.")
    if not text.strip():
        raise BundleError(f"Line {where} of the input has an empty text.")
    return text


def _chunks(records: Iterator[tuple[str, object]], size: int) -> Iterator[list[tuple[str, object]]]:
    chunk: list[tuple[str, object]] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def predict_stream(bundle: Bundle, records: Iterator[tuple[str, object]], out: TextIO, *, batch_size: int = 32,
                   chunk: int = 1024) -> int:
    """Classify ``records`` and write one JSON line each, in order; returns the count."""
    count = 0
    for part in _chunks(records, max(chunk, batch_size)):
        for (_, rid), prediction in zip(part, bundle.predict([t for t, _ in part], batch_size)):
            row = {"id": rid, **prediction} if rid is not None else prediction
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        count += len(part)
    out.flush()
    return count


def predict_file(bundle_dir: str | Path, input_path: str | None = None, output_path: str | None = None, *,
                 fmt: str | None = None, field: str = "text", batch_size: int = 32, threads: int | None = None) -> int:
    """``tightrope predict``: read ``input_path`` (stdin for None or ``-``), write JSONL to ``output_path``
    (stdout for None or ``-``; a file is written whole or not at all). Returns the number of texts."""
    fmt = input_format(input_path, fmt)
    if input_path not in (None, "-") and not Path(input_path).is_file():
        raise BundleError(f"The input {input_path} does not exist.")
    bundle = Bundle(bundle_dir, threads=threads)
    source = sys.stdin if input_path in (None, "-") else open(input_path, encoding="utf-8", newline="")  # noqa: SIM115
    try:
        records = read_records(source, fmt, field)
        if output_path in (None, "-"):
            return predict_stream(bundle, records, sys.stdout, batch_size=batch_size)
        return _write_atomic(Path(output_path), lambda f: predict_stream(bundle, records, f, batch_size=batch_size))
    except UnicodeDecodeError as err:
        raise BundleError(f"The input is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    finally:
        if source is not sys.stdin:
            source.close()


def _write_atomic(path: Path, write) -> int:
    import os  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with io.open(fd, "w", encoding="utf-8") as f:
            count = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return count
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
