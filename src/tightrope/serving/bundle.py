"""Load a bundle and classify texts with it: tokenize as the model was trained, batch by length, run ONNX Runtime.

Tokenization matches :func:`tightrope.encoding.encode` token for token (tests/test_serving.py checks
it): ``head`` keeps the first ``max_length`` tokens (special tokens included); ``head+tail`` keeps
the first quarter of the body budget and the last three quarters (Sun et al. 2019).

Batches are length-bucketed: texts are sorted by token count and each batch is padded only to its
own longest member, so a batch of short texts never pays for a long one (:func:`length_buckets`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from tightrope import transforms
from tightrope.errors import TightropeError

BUNDLE_FORMAT = "onnx-bundle"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
REQUIRED = (MODEL_FILE, "config.json", TOKENIZER_FILE, "card.json")


class BundleError(TightropeError):
    """A folder that is not a usable bundle, or input the bundle cannot classify."""


def session_options(threads: int | None = None):
    """CPU session options shared by every ONNX Runtime path of tightrope: all graph optimizations,
    sequential execution, ``threads`` intra-op threads (all cores by default), one inter-op thread.

    ONNX Runtime's intra-op threads spin-wait between operators and by default keep spinning after
    a run returns; on a small CPU that idle spinning is taken from whatever runs next (tokenisation,
    other requests, other sessions). ``session.force_spinning_stop`` parks them when a run returns
    and keeps the spinning inside it (turning spinning off altogether cost ~10% latency here)."""
    import onnxruntime as ort  # noqa: PLC0415

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    if not logging.getLogger("onnxruntime").isEnabledFor(logging.WARNING):  # tightrope.quiet, no --verbose
        opts.log_severity_level = 3
    return opts


def ort_session(model: bytes | str | Path, threads: int | None = None):
    """A CPU InferenceSession on a serialized graph or a graph file (see :func:`session_options`)."""
    import onnxruntime as ort  # noqa: PLC0415

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])


def length_buckets(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length: sort by length, cut every ``batch_size`` (input order is restored by the caller)."""
    if batch_size < 1:
        raise BundleError(f"The batch size must be at least 1, got {batch_size}.")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the batch's longest sequence: ``(input_ids, attention_mask)``, both int64 (B, T)."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{file} cannot be read as JSON ({err}); the bundle is damaged, export it again.") from err


def check_bundle_dir(path: str | Path) -> tuple[Path, dict]:
    """``(path, card)`` of a bundle folder, or a one-sentence error saying what is wrong with it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BundleError(f"{path} does not exist; make a bundle with `tightrope export MODEL --out {path}`.")
    if not path.is_dir():
        raise BundleError(f"{path} is a file, not a bundle folder; make one with `tightrope export MODEL --out DIR`.")
    card_file = path / "card.json"
    card = _read_json(card_file) if card_file.exists() else {}
    if card.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not a tightrope bundle (no card.json with format '{BUNDLE_FORMAT}'); "
                          "make one with `tightrope export MODEL --out DIR`.")
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise BundleError(f"The bundle {path} lacks {', '.join(missing)}; export it again.")
    return path, card


class Bundle:
    """An exported classifier: ``predict(texts)`` -> label and probabilities per text, in input order."""

    def __init__(self, path: str | Path, threads: int | None = None):
        from tokenizers import Tokenizer  # noqa: PLC0415

        self.path, self.card = check_bundle_dir(path)
        id2label = _read_json(self.path / "config.json").get("id2label") or {}
        names = self.card.get("label_names") or [id2label.get(str(i), f"LABEL_{i}") for i in range(len(id2label))]
        self.label_names = [str(n) for n in names]
        if not self.label_names:
            raise BundleError(f"The bundle {self.path} names no labels (card label_names or config id2label); export it again.")
        tok = self.card.get("tokenization") or {}
        self.max_length = int(tok.get("max_length", 256))
        self.truncation = str(tok.get("truncation", "head"))
        if self.truncation not in ("head", "head+tail"):
            raise BundleError(f"The bundle's card asks for truncation '{self.truncation}'; this tightrope knows head and head+tail.")
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path / TOKENIZER_FILE))
        except Exception as err:  # the Rust side raises plain Exceptions
            raise BundleError(f"{self.path / TOKENIZER_FILE} is not a tokenizer this tokenizers can read ({err}).") from err
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.prefix, self.suffix = self._special_tokens()
        self.budget = self.max_length - len(self.prefix) - len(self.suffix)
        if self.budget < 1:
            raise BundleError(f"The bundle's max length {self.max_length} leaves no room for text.")
        self.pad_id = int(self.card.get("pad_id", 0))
        entry = self.card.get("input_transform")
        try:  # a defense that rewrites the input ships inside the bundle and runs on every text
            self.input_transform = transforms.load(self.path, entry) if entry else None
        except TightropeError as err:
            raise BundleError(str(err)) from None
        self.session = ort_session(self.path / MODEL_FILE, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """Ids put before and after one sequence ([CLS] ... [SEP]), found as tightrope.encoding finds them."""
        bare = self.tokenizer.encode("hello", add_special_tokens=False).ids
        full = self.tokenizer.encode("hello").ids
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return full[:start], full[start + len(bare) :]
        return [], []

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, special tokens included, truncated as the model was trained."""
        head = self.budget if self.truncation == "head" else self.budget // 4
        if self.input_transform is not None:
            texts = self.input_transform(list(texts))
        out = []
        for enc in self.tokenizer.encode_batch(list(texts), add_special_tokens=False):
            ids = enc.ids
            if len(ids) > self.budget:
                ids = ids[:head] + (ids[len(ids) - (self.budget - head):] if self.budget > head else [])
            out.append(self.prefix + ids + self.suffix)
        return out

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits (B, labels) of one padded batch."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        return self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})[0].astype(np.float32)

    def logits_of_ids(self, sequences: list[list[int]], batch_size: int = 32) -> np.ndarray:
        """Logits in input order, computed in length buckets (no batch padded beyond its longest text)."""
        out = np.empty((len(sequences), self.num_labels), dtype=np.float32)
        for batch in length_buckets([len(s) for s in sequences], batch_size):
            out[batch] = self.run(*pad_batch([sequences[i] for i in batch], self.pad_id))
        return out

    def logits(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """As :meth:`tightrope.inference.TextClassifier.logits`, randomized smoothing included."""
        smoothing = getattr(self.input_transform, "smoothing", None)
        if smoothing is None:
            return self.logits_of_ids(self.encode(texts), batch_size)
        raw = self.logits_of_ids(self.encode(smoothing.expand(list(texts))), batch_size)
        return transforms.smoothed_log_probs(raw, smoothing.copies)

    def predict(self, texts: list[str], batch_size: int = 32) -> list[dict]:
        """``[{"label": name, "probabilities": {name: p, ...}}, ...]`` in input order."""
        if not texts:
            return []
        probs = softmax(self.logits(texts, batch_size))
        return [{"label": self.label_names[int(row.argmax())],
                 "probabilities": {name: float(p) for name, p in zip(self.label_names, row)}} for row in probs]


def load_bundle(path: str | Path, threads: int | None = None) -> Bundle:
    return Bundle(path, threads)
