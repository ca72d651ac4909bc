"""One face for every model variant: text in, logits out.

A :class:`TextClassifier` pairs a model with its tokenizer and the tokenization it was trained
with (max length, truncation). Compressed formats that are not plain PyTorch modules (an ONNX
Runtime session, say) register a loader under the ``format`` named in their ``card.json``
(:func:`register_format`), so that evaluation and attacks treat every variant alike and always query
the variant itself. This module dispatches to the loaders registered; :func:`tightrope.workflows.load`
imports every package that registers one (compress, defenses) and then calls :func:`load`.

A model may carry an input transform (a defense that rewrites the text before tokenization, such as
the synonym encoding of :mod:`tightrope.defenses.canonical`): its card names it under
``input_transform`` (a loader registered with :func:`register_transform`), :func:`load` loads it from
the model directory, and :meth:`TextClassifier.encode`
applies it, so every command that queries the model (eval, attack, report, study, search) goes
through it. Writers of derived models keep it with :func:`transform_card` / :func:`transform_files`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from tightrope import models, transforms
from tightrope.encoding import Truncation, collate, encode, length_sorted_batches
from tightrope.errors import TightropeError
from tightrope.first_token import first_token_logits


class TextClassifier:
    """A sequence classifier with its tokenizer; ``forward_ids`` is the only model-specific part.

    ``first_token_only`` (on by default) computes the last encoder layer for the [CLS] row alone where
    :mod:`tightrope.first_token` covers the model: the same logits up to float rounding, about 14% fewer
    multiply-adds for MiniLM. Set it to False to time or check the full forward pass.
    """

    first_token_only = True

    def __init__(self, model, tokenizer, *, max_length: int = 256, truncation: Truncation = "head",
                 label_names: list[str] | None = None, source: str = "", card: dict | None = None,
                 input_transform: Callable[[list[str]], list[str]] | None = None):
        self.model = model
        self.input_transform = input_transform
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.source = source
        self.card = card or {}
        config = getattr(model, "config", None)
        if label_names is None and config is not None:
            label_names = [config.id2label[i] for i in range(config.num_labels)]
        self.label_names = list(label_names or [])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.input_transform is not None:
            texts = self.input_transform(list(texts))
        return encode(self.tokenizer, texts, self.max_length, self.truncation)

    def forward_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if self.first_token_only:
            logits = first_token_logits(self.model, input_ids, attention_mask)
            if logits is not None:
                return logits.float().cpu()
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float().cpu()

    @torch.inference_mode()
    def logits_of_ids(self, sequences: list[list[int]], batch_size: int = 64, progress: Callable | None = None) -> torch.Tensor:
        out = torch.empty((len(sequences), self.num_labels), dtype=torch.float32)
        for batch in length_sorted_batches(sequences, batch_size):
            inputs = collate([sequences[i] for i in batch], self.pad_id)
            out[batch] = self.forward_ids(inputs["input_ids"], inputs["attention_mask"])
            if progress is not None:
                progress(len(batch))
        return out

    def logits(self, texts: list[str], batch_size: int = 64, progress: Callable | None = None) -> torch.Tensor:
        """Logits of ``texts`` through the model's input transform; a transform with randomized smoothing
        (:class:`tightrope.transforms.Smoothing`) answers the log of the mean probability over its copies."""
        smoothing = getattr(self.input_transform, "smoothing", None)
        if smoothing is None:
            return self.logits_of_ids(self.encode(texts), batch_size, progress)
        texts = list(texts)
        copies = smoothing.expand(texts)
        raw = self.logits_of_ids(self.encode(copies), batch_size, per_text(progress, smoothing.copies))
        return transforms.smoothed_log_probs(raw, smoothing.copies)

    def predict(self, texts: list[str], batch_size: int = 64) -> list[int]:
        return self.logits(texts, batch_size).argmax(-1).tolist()


def per_text(progress: Callable | None, copies: int) -> Callable | None:
    """A progress callback counting texts, fed with counts of their ``copies`` (smoothing's forward passes)."""
    if progress is None or copies == 1:
        return progress
    done = [0, 0]  # copies seen, texts reported

    def advance(n: int) -> None:
        done[0] += n
        texts = done[0] // copies
        if texts > done[1]:
            progress(texts - done[1])
            done[1] = texts

    return advance


LOADERS: dict[str, Callable[[Path, dict], TextClassifier]] = {}


def register_format(name: str):
    """Decorator: ``@register_format("onnx-int8")`` on a ``(path, card) -> TextClassifier`` loader."""

    def wrap(fn):
        LOADERS[name] = fn
        return fn

    return wrap


TRANSFORMS: dict[str, Callable[[Path, dict], Callable[[list[str]], list[str]]]] = dict(transforms.LOADERS)


def register_transform(kind: str):
    """Register ``loader(model_dir, card_entry) -> transform`` for cards whose ``input_transform``
    has this ``kind`` (the defenses that rewrite text before tokenization do this)."""

    def wrap(fn):
        TRANSFORMS[kind] = fn
        return fn

    return wrap


def read_card(path: Path) -> dict:
    file = path / "card.json"
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise TightropeError(f"{file} is not valid JSON ({err.msg}); the model directory is damaged.") from err


def is_structured(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` is a model directory of a structurally pruned model: its card holds the pruning
    plan, without which its weights do not fit the sizes its config.json names."""
    path = Path(name_or_path).expanduser()
    return path.is_dir() and bool(read_card(path).get("structure"))


def _wrap(loaded: models.LoadedModel, card: dict) -> TextClassifier:
    tok = card.get("tokenization", {})
    return TextClassifier(loaded.model, loaded.tokenizer, max_length=tok.get("max_length", 256),
                          truncation=tok.get("truncation", "head"), source=loaded.source, card=card)


def load(name_or_path: str, *, max_length: int | None = None, trust_remote_code: bool = False) -> TextClassifier:
    """Load any model variant for inference: a tightrope model directory, a hub classifier, an alias."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        models.check_weights(path)
    card = read_card(path) if path.is_dir() else {}
    fmt = card.get("format", "torch")
    if fmt != "torch" and fmt not in LOADERS:
        raise TightropeError(f"{name_or_path} is stored in the format '{fmt}', which no imported package loads; "
                             "load it with tightrope.workflows.load, which knows every format tightrope writes.")
    if fmt == "torch":
        clf = _wrap(models.load_classifier(name_or_path, require_head=True, trust_remote_code=trust_remote_code), card)
    else:
        clf = LOADERS[fmt](path, card)
    if max_length is not None:
        clf.max_length = max_length
    entry = card.get("input_transform") if path.is_dir() else None
    if entry:
        kind = entry.get("kind")
        if kind not in TRANSFORMS:
            raise TightropeError(f"{name_or_path} applies the input transform '{kind}', which this tightrope does not "
                                 f"know here (known: {', '.join(TRANSFORMS) or 'none'}); tightrope.workflows.load "
                                 "knows every transform tightrope writes.")
        clf.input_transform = TRANSFORMS[kind](path, entry)
    return clf


def transform_card(clf_or_transform) -> dict:
    """``{"input_transform": entry}`` for the card of a model derived from ``clf`` (empty if it has none)."""
    transform = getattr(clf_or_transform, "input_transform", clf_or_transform)
    entry = getattr(transform, "card_entry", None)
    return {"input_transform": entry()} if callable(entry) else {}


def transform_files(clf_or_transform) -> dict:
    """The files (name -> JSON payload) that the input transform of ``clf`` needs in a model directory."""
    transform = getattr(clf_or_transform, "input_transform", clf_or_transform)
    files = getattr(transform, "files", None)
    return files() if callable(files) else {}
