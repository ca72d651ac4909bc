"""The audit's per-transform cache: a second ``tightrope audit`` that adds one ``--transform`` measures only that one.

Each transform's measurements (:class:`tightrope.qattack.audit.Measured`: every statistic, the trigger search's
finds, the fixed thresholds' reasons, what could not be checked) are kept in one JSON file, written atomically
(:func:`tightrope.atomic.write_json_atomic`), under a key made of

- the model's weight fingerprint: SHA-256 over every parameter and buffer (name, dtype, shape, bytes), so a
  model saved elsewhere or under another name is the same entry, and a changed weight is a new one;
- the transform's name;
- every audit setting that changes a measurement (:class:`tightrope.qattack.audit.AuditConfig` without the
  transform list, alpha and the null, which only the verdict reads), the probe texts, the classifier's
  tokenization, Wanda's calibration source;
- a digest of tightrope's attack, audit and compression code, so an entry made by other code is never read.

Verdicts are not cached: they depend on how many transforms are audited (each is tested at alpha / m) and on
the null, so they are recomputed from the measurements every run. An unreadable entry is measured again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tightrope.atomic import write_json_atomic

FORMAT = 1
# settings only the verdict reads ("quantizers": the transform list's old name, so a key never depends on it)
_VERDICT_ONLY = ("transforms", "quantizers", "alpha", "null")


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) over every parameter and buffer: name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


@lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 (16 hex digits) of the source of tightrope.qattack and tightrope.compress (the code that measures)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.joinpath("qattack").glob("*.py"), *root.joinpath("compress").glob("*.py")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _texts_digest(texts) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()[:16]


class AuditCache:
    """Per-transform measurements of one model under one set of audit settings, in folder ``root``; an entry is
    stored as ``measured.to_dict()`` and read back with ``decode`` (the audit's ``Measured.from_dict``)."""

    def __init__(self, root: str | Path, model: nn.Module, config, probe, calibration,
                 decode: Callable[[dict], Any]) -> None:
        self.root = Path(root).expanduser()
        self.decode = decode
        settings = {k: v for k, v in config.model_dump().items() if k not in _VERDICT_ONLY}
        source = calibration.source if calibration is not None else None
        self.identity = {
            "format": FORMAT, "code": code_digest(), "weights": weights_fingerprint(model), "settings": settings,
            "probe": None if probe is None else {"kind": probe.kind, "ids": _texts_digest(probe.ids)},
            "calibration": source if isinstance(source, str) or source is None else _texts_digest(source),
        }
        self.hits = 0  # transforms read from the cache in this run

    def _path(self, transform: str) -> Path:
        key = hashlib.sha256(json.dumps({**self.identity, "transform": transform}, sort_keys=True,
                                        default=str).encode()).hexdigest()[:24]
        return self.root / f"{self.identity['weights']}-{key}.json"

    def load(self, transform: str):
        """The measurements of ``transform``, or None when there are none (or they cannot be read)."""
        path = self._path(transform)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
            measured = self.decode(entry["measured"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self.hits += 1
        return measured

    def save(self, transform: str, measured) -> Path:
        return write_json_atomic(self._path(transform), {"transform": transform, "identity": self.identity,
                                                         "measured": measured.to_dict()})
