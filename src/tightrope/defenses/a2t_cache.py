"""A2T's adversarial texts made once and kept on disk: the budget version of A2T training.

Yoo and Qi (2021) attack a share of every batch against the model as it trains (their Eq. 1). This
cache attacks every training text once, with the same cheap attack, against the model at the start of
training, and the training reads the adversarial texts back at every epoch: one attack per training
text in all instead of ``adv_share`` per text per epoch, at the price of adversarial texts that stay
those of the starting model. A second seed, or the recovery training of a pruned copy of the same
model, reads the same cache.

A cache is a folder:

- ``cache.json``: what it was built for (:func:`check_built_for`): the model it attacked (a SHA-256 of
  its weights, and the base it descends from: the weight files of the first model directory in the
  chain of ``source`` / ``source_model`` that compressed models' cards name), the tokenizer (its
  vocabulary, normaliser and special tokens, hashed), the max length and truncation, the attack and
  its candidate source, the training data's fingerprint and the seed (and the fingerprint of every
  later run's data that added texts, under ``data_added``); and whether it is complete;
- ``texts.jsonl``: one line per distinct (text, label) of the training data, the attack's result
  (:class:`tightrope.defenses.a2t.A2TExample`), appended a block of texts at a time and fsynced, as
  :mod:`tightrope.attacks.attacker` writes results, so a killed generation resumes at the first block
  it had not finished and never writes a text twice.

Every line is the attack of one (text, label) against the recorded model, tokenizer, length and
attack, so reuse is strict where a line's content would change: another tokenizer, another max length
or other attack settings are refused in one sentence. A cache built against another model is refused
as well, unless ``reuse="base"`` and both models descend from the same base (a compressed variant:
pruned, quantization-aware, a second seed's fresh head); the run's card records which model the texts
were made against. Training data is a matter of coverage: a run whose texts the cache holds reads
them (a second seed's subset of the same data), a run of the same model with texts it lacks attacks
those and appends them, and a variant that lacks texts is refused (they cannot be made against the
cache's model). ``rebuild=True`` replaces a cache built for anything else.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from tightrope import models
from tightrope.atomic import append_json_lines, complete_lines, write_json_atomic
from tightrope.errors import TightropeError
from tightrope.progress import tracked

KIND = "tightrope.a2t-cache"
VERSION = 1
META, LINES = "cache.json", "texts.jsonl"
WEIGHT_FILES = (".safetensors", ".bin", ".onnx", ".gguf", ".pt")
Reuse = Literal["model", "base"]
REUSE: tuple[str, ...] = ("model", "base")


# --- what a cache is built for --------------------------------------------------------------------


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def example_key(text: str, label: int) -> str:
    """The cache's key of one training example: its text and its label, hashed."""
    return hashlib.sha256(f"{int(label)}\0{text}".encode()).hexdigest()[:20]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) of a model's state dict: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        if not torch.is_tensor(value):
            digest.update(repr(value).encode())
            continue
        t = value.detach().cpu()
        t = t.int_repr() if t.is_quantized else t
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> dict:
    """The tokenizer's name and a hash of what decides its ids: vocabulary, normaliser, special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = json.loads(backend.to_str()).get("normalizer") if backend is not None else \
        {"lower": getattr(tokenizer, "do_lower_case", None)}
    payload = {"vocab": sorted(tokenizer.get_vocab().items()), "normalizer": normalizer,
               "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()}}
    name = str(tokenizer.name_or_path)
    if Path(name).is_dir():  # a local folder: its last two parts name it well enough (minilm/model)
        name = "/".join(Path(name).resolve().parts[-2:])
    return {"name": name, "fingerprint": _digest(payload)}


def base_of(start: str | None) -> dict:
    """The base a model descends from: follow ``start``'s card (``source_model``, else ``source``, as
    compressed models record them) to the first model directory that names none, and hash its weight
    files. A hub id, or a source no longer on this machine, is its own base (by name)."""
    if not start:
        return {"source": None, "fingerprint": None}
    current = str(start)
    for _ in range(16):  # a chain longer than this is a loop
        path = Path(models.resolve(current)).expanduser()
        if not path.is_dir():
            return {"source": current, "fingerprint": _digest(current)}
        card_file = path / "card.json"
        card = json.loads(card_file.read_text()) if card_file.is_file() else {}
        parent = card.get("source_model") or card.get("source")
        if not parent or not Path(models.resolve(str(parent))).expanduser().is_dir():
            break
        current = str(parent)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_FILES):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return {"source": str(path.resolve()), "fingerprint": digest.hexdigest()[:16]}


def built_for(model, tokenizer, *, start: str | None, max_length: int, truncation: str, attack: dict, data,
              seed: int) -> dict:
    """What a cache made with these inputs records (``data`` is a :class:`tightrope.data.TaskData`)."""
    return {"model": {"weights": weights_fingerprint(model), "source": str(start) if start else None,
                      "base": base_of(start)},
            "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": max_length, "truncation": truncation,
            "attack": attack, "attack_fingerprint": _digest(attack),
            "data": {"task": data.name, "split": data.split, "examples": len(data), "fingerprint": data.fingerprint()},
            "seed": seed}


def _model_name(model: dict) -> str:
    return f"{model['weights']} ({model['source']})" if model.get("source") else model["weights"]


def check_built_for(path: Path, old: dict, new: dict, reuse: Reuse = "model") -> str | None:
    """Why a cache built for ``old`` cannot serve a run described by ``new`` (one sentence), or None."""
    redo = "pass --a2t-cache-rebuild or a new --a2t-cache path"
    if old["tokenizer"]["fingerprint"] != new["tokenizer"]["fingerprint"]:
        return (f"{path} was built with tokenizer {old['tokenizer']['name']} ({old['tokenizer']['fingerprint']}); this "
                f"run's is {new['tokenizer']['name']} ({new['tokenizer']['fingerprint']}), and adversarial texts never "
                f"serve another tokenizer: {redo}.")
    settings = [k for k in ("max_length", "truncation", "attack_fingerprint") if old.get(k) != new.get(k)]
    if settings:
        names = ", ".join("attack settings" if k == "attack_fingerprint" else k.replace("_", " ") for k in settings)
        return f"{path} was built with another {names} than this run's: {redo}."
    was, now = old["model"], new["model"]
    if was["weights"] == now["weights"]:
        return None
    same_base = was["base"]["fingerprint"] is not None and was["base"]["fingerprint"] == now["base"]["fingerprint"]
    if same_base and reuse == "base":
        return None
    hint = " (both descend from the same base: --a2t-cache-reuse base reads it for this variant)" if same_base else ""
    return (f"{path} was built against model {_model_name(was)} with tokenizer {old['tokenizer']['name']}; this run "
            f"trains {_model_name(now)}{hint}: {redo}.")


# --- the folder -----------------------------------------------------------------------------------


def _read_meta(path: Path) -> dict | None:
    file = path / META
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise TightropeError(f"{file} is not an A2T cache's description; give a new --a2t-cache path.")
    return meta


def read_entries(path: Path) -> dict[str, dict]:
    """The cache's finished examples by key (a line cut short by a kill is dropped)."""
    entries = {}
    for number, line in complete_lines(path / LINES):
        try:
            row = json.loads(line)
            entries[row["key"]] = row
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise TightropeError(f"{path / LINES} line {number} is not an A2T example ({err}); the cache is damaged: "
                                 "pass --a2t-cache-rebuild.") from err
    return entries


def distinct(texts: list[str], labels: list[int]) -> dict[str, tuple[str, int]]:
    """The distinct (text, label) pairs of a dataset by :func:`example_key`, in data order."""
    out: dict[str, tuple[str, int]] = {}
    for text, label in zip(texts, labels):
        out.setdefault(example_key(text, label), (text, int(label)))
    return out


def _uncovered(path: Path, meta: dict, wanted: dict, keys) -> str | None:
    """Why a variant (not the cache's own model) cannot train on ``keys``: texts the cache lacks, which
    only the cache's model could be attacked for; or None."""
    if wanted["model"]["weights"] == meta["built_for"]["model"]["weights"]:
        return None
    entries = read_entries(path)
    missing = sum(k not in entries for k in keys)
    if not missing:
        return None
    return (f"{path} holds no adversarial text for {missing} of this run's {len(keys)} distinct training texts, and "
            f"they can be made only against model {_model_name(meta['built_for']['model'])}, not this variant: "
            "pass --a2t-cache-rebuild or a new --a2t-cache path.")


def open_cache(path: str | Path, wanted: dict, keys=(), *, reuse: Reuse = "model", rebuild: bool = False) -> dict:
    """The description of the cache at ``path`` that serves ``wanted`` and its training texts ``keys``
    (:func:`distinct`): the one there when it fits, else (``rebuild``, or no cache yet) a fresh one
    written there. A misfit is one sentence."""
    path = Path(path)
    meta = _read_meta(path)
    if meta is not None and meta.get("version") != VERSION:
        problem = f"{path} is an A2T cache of format {meta.get('version')}, not {VERSION}: pass --a2t-cache-rebuild."
    elif meta is not None:
        problem = check_built_for(path, meta["built_for"], wanted, reuse) or _uncovered(path, meta, wanted, keys)
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise TightropeError(f"{path} exists and is not an A2T cache; give a new --a2t-cache path.")
    else:
        problem = None
    if meta is not None and problem is None:
        return meta
    if meta is not None and not rebuild:
        raise TightropeError(problem)
    if meta is not None:  # rebuild: only a folder that holds an A2T cache is removed
        shutil.rmtree(path)
    meta = {"kind": KIND, "version": VERSION, "built_for": wanted, "complete": False}
    write_json_atomic(path / META, meta)
    return meta


def fill(path: str | Path, meta: dict, attack: Callable[[list[str], list[int]], list[dict]],
         examples: dict[str, tuple[str, int]], *, data: dict | None = None, seed: int = 0, block: int = 32,
         progress=False) -> dict[str, dict]:
    """Attack every example of ``examples`` (:func:`distinct`) the cache does not hold yet, a block at a
    time, and return the cache's entries by key. Texts the cache lacks are attacked against the model
    of this run, which :func:`open_cache` checked is the cache's own; when ``data`` (this run's, as
    :func:`built_for` describes it) is not the data the cache was built on, it is recorded under
    ``data_added``.

    Blocks are fixed by the data (every ``block`` distinct examples, in data order) and the global
    random generator is seeded by ``seed`` and the block, so a resumed generation writes what an
    uninterrupted one would. Each block's lines go to disk in one fsynced write.
    """
    path = Path(path)
    keys = list(examples)
    entries = read_entries(path)
    if all(k in entries for k in keys):
        return entries if meta.get("complete") else _finish(path, meta, entries)
    data = data or meta["built_for"]["data"]
    if data["fingerprint"] != meta["built_for"]["data"]["fingerprint"] and data not in meta.get("data_added", []):
        meta = {**meta, "complete": False, "data_added": [*meta.get("data_added", []), data]}
        write_json_atomic(path / META, meta)
    blocks = [keys[i:i + block] for i in range(0, len(keys), block)]
    with tracked(progress, "a2t cache", len(keys), completed=sum(k in entries for k in keys)) as bar:
        for number, chunk in enumerate(blocks):
            todo = [k for k in chunk if k not in entries]
            if not todo:
                continue
            torch.manual_seed(seed * 1_000_003 + number)
            results = attack([examples[k][0] for k in todo], [examples[k][1] for k in todo])
            rows = [{"key": k, **r} for k, r in zip(todo, results)]
            append_json_lines(path / LINES, rows)
            entries.update((row["key"], row) for row in rows)
            bar.advance(len(todo))
    return _finish(path, meta, entries)


def _finish(path: Path, meta: dict, entries: dict[str, dict]) -> dict[str, dict]:
    """Mark the cache complete, with its counts, once every text asked of it so far is in."""
    rows = list(entries.values())
    write_json_atomic(path / META, {**meta, "complete": True, "examples": len(rows),
                                    "flipped": sum(bool(r.get("flipped")) for r in rows),
                                    "skipped": sum(bool(r.get("skipped")) for r in rows)})
    return entries


__all__ = ["REUSE", "base_of", "built_for", "check_built_for", "distinct", "example_key", "fill", "open_cache",
           "read_entries",
           "tokenizer_fingerprint", "weights_fingerprint"]
