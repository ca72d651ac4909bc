"""Activation-aware pruning scores (Wanda) and the calibration data they need, with the input Hessians that GPTQ
and SparseGPT read from the same data (:func:`input_hessians`, :func:`accumulate_hessians`).

Wanda (Sun, Liu, Bair, Kolter 2023, "A Simple and Effective Pruning Approach for Large Language
Models", Eq. 1) scores weight ``W_ij`` of a linear layer by

    S_ij = |W_ij| * ||X_j||_2

where ``X_j`` is the j-th input feature gathered over every calibration token (N*L rows), and
compares weights *per output row*: each row loses the same share of its weights (their Sec. 3,
"comparison group"). The input norms are collected with forward hooks, as in locuslab/wanda's
``WrappedGPT``; padding tokens are left out, because a padded batch would otherwise count the
activations of [PAD] positions that the model never attends to.

The N:M mask (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks": 2:4 keeps 2 of every
4 consecutive input weights) is a pure function of any score, magnitude or Wanda.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from tightrope.compress.gptq import HessianAccumulator
from tightrope.data import load_task
from tightrope.encoding import collate, encode
from tightrope.errors import TightropeError

# --- pure maths -----------------------------------------------------------------------------------


def wanda_scores(weight: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """Sun et al. 2023, Eq. 1: ``S = |W| * ||X||_2`` broadcast over output rows.

    weight: (out, in); x_norm: (in,) the L2 norm of each input feature over all calibration tokens.
    """
    if weight.dim() != 2 or x_norm.shape != (weight.shape[1],):
        raise ValueError(f"weight {tuple(weight.shape)} and input norms {tuple(x_norm.shape)} do not match")
    return weight.abs() * x_norm.to(weight.dtype).unsqueeze(0)  # (out, in)


def row_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that removes the ``round(sparsity * in)`` lowest-scoring weights of every output row.

    Sun et al. 2023, Sec. 3: the comparison group is each output (row), not the whole layer.
    Exactly that many weights go from each row, whatever ties there are (ties broken by index).
    """
    out_features, in_features = scores.shape
    k = round(sparsity * in_features)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k == 0:
        return keep
    drop = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices  # (out, k)
    keep.scatter_(1, drop, False)
    return keep


def nm_keep_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M keep-mask: in every group of ``m`` consecutive input weights of a row keep the ``n`` best.

    scores: (out, in) with ``in`` divisible by ``m``. 2:4 is the pattern NVIDIA's sparse tensor
    cores run (Mishra et al. 2021).
    """
    out_features, in_features = scores.shape
    if in_features % m:
        raise ValueError(f"{in_features} input features are not a multiple of {m}")
    groups = scores.reshape(out_features, in_features // m, m)  # (out, in/m, m)
    best = torch.topk(groups, n, dim=-1, sorted=False).indices  # (out, in/m, n)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, best, True)
    return keep.reshape(out_features, in_features)


# --- calibration ----------------------------------------------------------------------------------


def set_tokenizer(model: nn.Module, tokenizer) -> nn.Module:
    """Attach the tokenizer that calibration texts are encoded with (when the model has no directory)."""
    model._tightrope_tokenizer = tokenizer
    return model


def tokenizer_for(model: nn.Module):
    """The model's tokenizer: one attached with :func:`set_tokenizer`, else the one saved beside it."""
    attached = getattr(model, "_tightrope_tokenizer", None)
    if attached is not None:
        return attached
    source = getattr(model, "name_or_path", "") or ""
    if source and Path(source).is_dir():
        from transformers import AutoTokenizer  # noqa: PLC0415

        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise TightropeError(f"The tokenizer beside {source} could not be read: {str(err).splitlines()[0]}") from err
    raise TightropeError(
        "Calibration texts need the model's tokenizer; load the model from a directory or call "
        "tightrope.compress.wanda.set_tokenizer(model, tokenizer) first."
    )


def calibration_batches(
    model: nn.Module,
    source: str | Iterable[str],
    n: int,
    *,
    max_length: int = 128,
    seed: int = 0,
    batch_size: int = 8,
) -> list[dict[str, torch.Tensor]]:
    """Encoded calibration batches (input_ids, attention_mask, and labels when the source has them).

    ``source`` is a task name or data file (``n`` seeded examples of its train split, labels
    included) or a sequence of texts (no labels).
    """
    labels: list[int] | None = None
    if isinstance(source, str):

        data = load_task(source, "train", n=n, seed=seed)
        texts, labels = list(data.texts), list(data.labels)
    else:
        texts = list(source)[:n]
    if not texts:
        raise TightropeError("This criterion needs calibration texts: give calibration_texts (texts or a task name).")
    tokenizer = tokenizer_for(model)
    ids = encode(tokenizer, texts, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(ids), batch_size):
        batch = collate(ids[start : start + batch_size], pad)
        if labels is not None:
            batch["labels"] = torch.tensor(labels[start : start + batch_size], dtype=torch.long)
        batches.append(batch)
    return batches


@torch.no_grad()
def input_norms(model: nn.Module, modules: dict[str, nn.Linear], batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` of every input feature of each module, over all non-padding calibration tokens.

    Forward hooks accumulate the sum of squares in float64 (locuslab/wanda keeps a running mean
    of squares instead; the ranking within a row is the same).
    """
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in modules.items()}
    current: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach()
            valid = current.get("mask")
            if valid is not None and x.shape[:-1] == valid.shape:
                x = x[valid]  # (tokens, in): padding positions dropped
            x = x.reshape(-1, x.shape[-1]).double()
            sums[name] += (x * x).sum(0).cpu()

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current["mask"] = batch["attention_mask"].bool().to(device)
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: s.sqrt().float() for name, s in sums.items()}


@torch.no_grad()
def accumulate_hessians(modules: dict[str, nn.Linear], passes: Iterable[tuple[torch.Tensor, Callable[[], object]]]) -> dict:
    """``H = 2 X X^T / N`` at the input of each module (GPTQ's and SparseGPT's Hessian) over the real tokens of
    ``passes``: pairs of (token mask, a call that runs the modules on that batch). Returns
    :class:`tightrope.compress.gptq.HessianAccumulator` objects (``.H``, ``.n``) by module name."""
    acc = {name: HessianAccumulator(m.in_features) for name, m in modules.items()}
    mask: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(_module, args):
            acc[name].add(args[0], mask.get("m"))

        return add

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        for token_mask, run in passes:
            mask["m"] = token_mask
            run()
    finally:
        for h in handles:
            h.remove()
    return acc


def input_hessians(model: nn.Module, modules: dict[str, nn.Linear], batches: list[dict[str, torch.Tensor]]) -> dict:
    """:func:`accumulate_hessians` over one pass of the whole model on the calibration batches."""
    device = next(model.parameters()).device
    passes = [(b["attention_mask"].to(device),
               functools.partial(model, input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)))
              for b in batches]
    was_training = model.training
    model.eval()
    try:
        return accumulate_hessians(modules, passes)
    finally:
        model.train(was_training)
