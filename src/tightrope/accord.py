"""Gradient accord, and the flood level Flooding-X reads from it.

Flooding-X (Liu et al., ACL 2022, Sec. 3) picks the flood level b of Ishida et al.'s flooding from one
clean training run: it watches whether a gradient step taken on one part of the data still lowers the
loss on another part. To first order a step ``-eta * g_1`` changes the loss of the other part by
``-eta * g_1 . g_2``; while the two gradients agree the model learns what the examples share, and once
they stop agreeing each step fits its own examples. The training loss at that point is the flood
level: flooding then keeps the model from going further.

Our reading, stated because the criterion is what a user must trust:
- the two parts are the interleaved halves of each mini-batch, and the accord is the cosine of their
  gradients (Fort et al. 2019's "stiffness", Eq. 2), measured without dropout so that it is a property
  of the weights;
- the accord and the loss are smoothed with the same exponential moving average, and b is the smoothed
  loss at the first measurement after the smoothed accord's peak where it is no longer positive.

One batch's accord is noisy: halves of 8 IMDB reviews give a standard deviation of 0.35 between batches (MiniLM,
256 tokens, steps 550-745 of the 12,000-review baseline, where its mean fell from 0.11 over the first 100 steps to
0.01 over the last 100). Hence the smoothing (0.9: about the last 10 measurements), and the trace in the card, so
a reader can check the reading.

The accord rises before it falls: from a fresh classifier head the two halves' gradients are mostly the
head's noise (measured on IMDB with MiniLM: a mean accord of 0.05 at the start, 0.30 after 525 steps),
so a crossing before the peak is the start of learning, not of memorising. A run that never falls back
to zero has not started to memorise, and the criterion says so instead of guessing a level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tightrope.errors import TightropeError


def batch_halves(batch: dict) -> tuple[dict, dict]:
    """The interleaved halves ``[0::2]`` and ``[1::2]`` of a collated batch (tensors and lists alike)."""
    n = len(batch["labels"])
    if n < 2:
        raise TightropeError("Gradient accord needs batches of at least 2 examples; raise --batch-size.")
    return ({k: v[0::2] for k, v in batch.items()}, {k: v[1::2] for k, v in batch.items()})


def gradient_cosine(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    """Cosine of two gradients given as lists of per-parameter tensors (0 when either is zero)."""
    dot = sum(float((a * b).sum()) for a, b in zip(first, second, strict=True))
    norm = (sum(float((a * a).sum()) for a in first) * sum(float((b * b).sum()) for b in second)) ** 0.5
    return dot / norm if norm > 0 else 0.0


def gradient_accord(model: torch.nn.Module, objective, batch: dict) -> tuple[float, float]:
    """``(accord, loss)`` of one batch: the cosine between its two halves' gradients and their mean loss.

    Measured in eval mode (no dropout) with ``torch.autograd.grad``, so the parameters' ``.grad`` and
    the training mode are left as they were.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        grads, losses = [], []
        for half in batch_halves(batch):
            loss = objective(model, half)
            grads.append([g if g is not None else torch.zeros_like(p)
                          for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params, strict=True)])
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
    return gradient_cosine(*grads), sum(losses) / 2


@dataclass(frozen=True)
class FloodLevel:
    """What the criterion read from a run's accord trace."""

    level: float | None  # None: the accord never fell back to zero after its peak
    step: int | None  # the training step where it did
    peak_step: int  # where the smoothed accord was highest
    peak_accord: float
    smoothing: float

    def to_dict(self) -> dict:
        return {"level": self.level, "step": self.step, "peak_step": self.peak_step, "peak_accord": self.peak_accord,
                "smoothing": self.smoothing,
                "rule": "smoothed training loss where the smoothed gradient accord, past its peak, falls to 0 (Flooding-X)"}


def ema(values: list[float], smoothing: float) -> list[float]:
    """Exponential moving average ``m_t = s * m_(t-1) + (1 - s) * x_t``, started at the first value."""
    out: list[float] = []
    for x in values:
        out.append(x if not out else smoothing * out[-1] + (1 - smoothing) * x)
    return out


def flood_level_from_accord(trace: list[dict], smoothing: float = 0.9) -> FloodLevel:
    """Flooding-X's b from a trace of ``{"step", "loss", "accord"}`` records (in step order)."""
    if not 0 <= smoothing < 1:
        raise TightropeError(f"The smoothing of the accord trace must be in [0, 1), got {smoothing}.")
    if not trace:
        raise TightropeError("The run has no gradient accord trace: train it with --accord-every.")
    accord = ema([r["accord"] for r in trace], smoothing)
    loss = ema([r["loss"] for r in trace], smoothing)
    peak = max(range(len(accord)), key=accord.__getitem__)
    found = dict(peak_step=trace[peak]["step"], peak_accord=accord[peak], smoothing=smoothing)
    for i in range(peak + 1, len(trace)):
        if accord[i] <= 0:
            return FloodLevel(level=loss[i], step=trace[i]["step"], **found)
    return FloodLevel(level=None, step=None, **found)


__all__ = ["FloodLevel", "batch_halves", "ema", "flood_level_from_accord", "gradient_accord", "gradient_cosine"]
