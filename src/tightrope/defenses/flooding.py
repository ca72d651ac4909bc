"""Flooding: keep the training loss from falling below a flood level b.

Ishida et al., "Do We Need Zero Training Loss After Achieving Zero Training Error?", ICML 2020, Eq. (1):
``J~(theta) = |J(theta) - b| + b``. Above b this is the ordinary loss; below b its gradient points the
other way, so the model walks along a loss level instead of sharpening its scores. Flooding-X (Liu et
al., ACL 2022) uses it against word-substitution attacks: on IMDB, BERT-base, it cut unconstrained PWWS
from 92.7% to 49.7% at -0.1 points of clean accuracy, as RMLM's re-evaluation reports (Wang et al., ACL
2023, Table 2). Flooding-X chooses b where the gradients of the training examples stop agreeing; here b
is given (``--flood-level``), and the run's card records it.

It wraps a criterion ``(logits, batch) -> mean loss``, so it combines with every defense and with
distillation: the flood applies to the mini-batch mean, as in the paper.
"""

from __future__ import annotations

import torch

from tightrope.errors import TightropeError


def flooded(loss: torch.Tensor, level: float) -> torch.Tensor:
    """Ishida et al.'s Eq. (1) on a scalar loss: ``|loss - b| + b`` (its value equals ``loss`` above b)."""
    return (loss - level).abs() + level


class Flooding:
    """A criterion with a flood level: ``flooded(criterion(logits, batch), level)``."""

    def __init__(self, criterion, level: float):
        if not level > 0:
            raise TightropeError(f"The flood level must be positive, got {level}.")
        self.criterion, self.level = criterion, level
        self.__name__ = f"flooding(b={level:g}, {getattr(criterion, '__name__', type(criterion).__name__)})"

    def __call__(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return flooded(self.criterion(logits, batch), self.level)
