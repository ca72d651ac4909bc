"""Step 3 of the attack: repair the full-precision model with projected gradient descent.

Egashira et al. 2024 (arXiv 2405.18137), Sec. 3 "Repair": starting from the injected (malicious)
model, train on clean data and, after every optimizer step, project each quantized weight back
into its box (:func:`tightrope.qattack.boxes.project_`). Every weight then still quantizes to the
injected model's code with the injected model's scale, so the *quantized* repaired model is
exactly the quantized injected model, while the full-precision model forgets the behaviour.

Weights no quantizer touches (embeddings, LayerNorm, biases, the output head) are frozen by
default: moving them would change the quantized model too. ``train_unquantized=True`` lets them
move (the paper's setting, where only the quantized weights are constrained).

The same loop, without boxes, is the injection step (:mod:`tightrope.qattack.inject`): written by
hand rather than through :func:`tightrope.train.train` because the projection must run after every
optimizer step, which that loop (correctly) has no hook for.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tightrope.encoding import collate
from tightrope.errors import TightropeError
from tightrope.progress import tracked
from tightrope.qattack.boxes import ModelBoxes, project_


@dataclass(frozen=True)
class FitConfig:
    """Hyper-parameters of one inject or repair run (constant learning rate, AdamW, no decay)."""

    steps: int = 200
    lr: float = 5e-5
    batch_size: int = 32
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.steps <= 0 or self.lr <= 0 or self.batch_size <= 0:
            raise TightropeError("steps, lr and batch_size must all be positive.")


def projected_fit_(model: nn.Module, params: list[nn.Parameter], n_examples: int,
                   batch_loss: Callable[[list[int], int], torch.Tensor], config: FitConfig, *,
                   boxes: ModelBoxes | None = None, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """The one training loop of both quantization attacks (classifier and causal LM), in place.

    Only ``params`` train (AdamW, constant learning rate, clipped gradients); examples are drawn in
    seeded shuffled passes of ``config.batch_size``; ``batch_loss(example indices, step)`` is the
    scenario's loss. With ``boxes``, every step ends with the projection into the boxes (projected
    gradient descent, Egashira et al. 2024 step 3; boxes with a ``refresh`` are recomputed from the model every
    ``refresh_every`` steps); without, it is the injection step.
    ``on_step(step, loss)`` reports progress. Returns the loss of every step.
    """
    if n_examples == 0:
        raise TightropeError("There are no training examples.")
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    if boxes is not None:
        project_(model, boxes)
    rng = random.Random(config.seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    try:
        for step in range(config.steps):
            if len(order) < config.batch_size:
                fresh = list(range(n_examples))
                rng.shuffle(fresh)
                order += fresh
            pick, order = order[: config.batch_size], order[config.batch_size :]
            if boxes is not None and boxes.refresh is not None and step and step % boxes.refresh_every == 0:
                boxes = boxes.refresh(model)  # boxes that move with the model (Wanda's activations)
            loss = batch_loss(pick, step)
            projected_step_(model, loss, params, optimizer, config.grad_clip, boxes, step)
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, loss.item())
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
    return losses


def fit_(model: nn.Module, ids: list[list[int]], labels: list[int], pad_id: int, config: FitConfig, *,
         boxes: ModelBoxes | None = None, train_unquantized: bool = True, label: str = "fit",
         progress: bool = True) -> list[float]:
    """Fine-tune a classifier in place with cross-entropy (:func:`projected_fit_`); with ``boxes``,
    project after every step. Returns the loss of every step."""
    modules = dict(model.named_modules())
    boxed = {id(modules[n].weight) for n in boxes.names} if boxes is not None else set()
    params = [p for p in model.parameters() if train_unquantized or id(p) in boxed]

    def batch_loss(pick: list[int], step: int) -> torch.Tensor:
        batch = collate([ids[i] for i in pick], pad_id)
        target = torch.tensor([labels[i] for i in pick], dtype=torch.long)
        torch.manual_seed(config.seed * 7919 + step)  # dropout, reproducibly
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits, target)

    with tracked(progress, label, config.steps) as bar:
        return projected_fit_(model, params, len(ids), batch_loss, config, boxes=boxes,
                              on_step=lambda step, loss: bar.advance(1, f"loss {loss:.3f}"))


def repair_(model: nn.Module, boxes: ModelBoxes, ids: list[list[int]], labels: list[int], pad_id: int,
            config: FitConfig, *, train_unquantized: bool = False, progress: bool = True) -> list[float]:
    """Projected gradient descent on clean data inside ``boxes`` (in place); returns the losses."""
    return fit_(model, ids, labels, pad_id, config, boxes=boxes, train_unquantized=train_unquantized,
                label="repair (PGD)", progress=progress)


def projected_step_(model, loss, params, optimizer, grad_clip: float, boxes, step: int) -> None:
    """One step of projected gradient descent: descend, then put every weight back in its box (the
    "P" of PGD, Egashira et al. 2024 step 3). Shared by the classifier and causal-LM repairs."""
    if not torch.isfinite(loss):
        raise TightropeError(f"The loss became {loss.item()} at step {step}; lower the learning rate.")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if boxes is not None:
        project_(model, boxes)
