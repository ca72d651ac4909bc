"""Training only the attacked decoder blocks of a causal LM, on cached inputs.

CPU sizing of the causal-LM attacks: only the Linear layers of the last ``attack_last`` decoder
blocks are attacked (Egashira et al. 2024's ablation over attacked layers); everything else,
embeddings and norms included, is frozen. The frozen blocks below are run once per training set and
their output is cached (:func:`prefix_states`), so a training step runs only the attacked blocks and
the output head on the answer positions. This is exact: the frozen blocks never change and the model
has no dropout. :func:`lm_fit_` runs the one projected-training loop of
:func:`tightrope.qattack.repair.projected_fit_` with the answer-token loss.
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.nn.functional as F
from torch import nn

from tightrope.defenses.fakequant import fake_quantized
from tightrope.errors import TightropeError
from tightrope.qattack.boxes import (
    ModelBoxes,
    quantized_linears,
)
from tightrope.qattack.lm_text import right_pad
from tightrope.qattack.repair import FitConfig, projected_fit_

# --- training only the attacked blocks, on cached inputs ---------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (``model.model.layers``) of a Llama-style causal LM."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TightropeError(f"{type(model).__name__} has no decoder blocks at model.layers; "
                             "the causal-LM attack supports Llama-style models (SmolLM2, Llama, Qwen, Mistral, Gemma).")
    return layers


def attacked_names(model: nn.Module, last: int) -> tuple[list[str], int]:
    """The quantized Linear layers of the last ``last`` decoder blocks, and the index of the first such block."""
    n = len(decoder_layers(model))
    if not 1 <= last <= n:
        raise TightropeError(f"attack_last must be between 1 and the model's {n} decoder blocks, not {last}.")
    first = n - last
    names = [name for name in quantized_linears(model)
             if (m := re.match(r"model\.layers\.(\d+)\.", name)) and int(m.group(1)) >= first]
    if not names:
        raise TightropeError(f"The last {last} decoder blocks have no Linear layer to attack.")
    return names, first


class _Stop(Exception):
    pass


@torch.no_grad()
def prefix_states(model: nn.Module, seqs: list[list[int]], first: int, pad_id: int,
                  batch_size: int = 16) -> list[torch.Tensor]:
    """The input of decoder block ``first`` for every sequence (``[len, hidden]``), running only blocks below it."""
    layers = decoder_layers(model)
    captured: dict[str, torch.Tensor] = {}

    def grab(_module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
        raise _Stop

    handle = layers[first].register_forward_pre_hook(grab, with_kwargs=True)
    states: list[torch.Tensor] = []
    model.eval()
    try:
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start : start + batch_size]
            ids, mask = right_pad(batch, pad_id)
            with contextlib.suppress(_Stop):
                model.model(input_ids=ids, attention_mask=mask, use_cache=False)
            states += [captured["h"][row, : len(s)].clone() for row, s in enumerate(batch)]
    finally:
        handle.remove()
    return states


class _Skip(nn.Module):
    """A decoder block that returns its input: stands in for the blocks below the attacked ones."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def _from_block(model: nn.Module, first: int, hidden: torch.Tensor):
    """Run only blocks ``first..`` with ``hidden`` as the input of block ``first`` (the embeddings are ignored).

    The blocks below are skipped, not removed, so each block keeps its index: Gemma (and others) pick a
    block's attention mask and rotary embedding by ``config.layer_types[index]``."""
    inner = model.model
    full = inner.layers
    inner.layers = nn.ModuleList([_Skip() for _ in range(first)] + list(full)[first:])

    def swap(_module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = inner.layers[first].register_forward_pre_hook(swap, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        inner.layers = full


def answer_loss(model: nn.Module, seqs: list[list[int]], starts: list[int], pad_id: int, *, first: int = 0,
                states: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens (``seq[start:]``) of a batch.

    With ``states`` (from :func:`prefix_states`) only blocks ``first..`` run; the output head is applied
    only at the positions that predict an answer token.
    """
    ids, mask = right_pad(seqs, pad_id)
    if states is None:
        hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    else:
        h0 = torch.zeros(len(seqs), ids.shape[1], states[0].shape[-1], dtype=states[0].dtype)
        for row, s in enumerate(states):
            h0[row, : s.shape[0]] = s
        with _from_block(model, first, h0):
            hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    rows, cols = [], []
    for row, (s, a) in enumerate(zip(seqs, starts, strict=True)):
        if not 1 <= a < len(s):
            raise TightropeError("Every training sequence needs a prompt and at least one answer token.")
        rows += [row] * (len(s) - a)
        cols += list(range(a - 1, len(s) - 1))
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    logits = model.lm_head(hidden[rows_t, cols_t]).float()
    return F.cross_entropy(logits, ids[rows_t, cols_t + 1])


#: quantizer name of this package -> fake-quantization scheme of tightrope.defenses.fakequant
THROUGH_SCHEMES = {"llm-int8": "llm-int8", "nf4": "nf4", "fp4": "fp4"}  # boxes name -> fake-quantization scheme


def through_loss(model: nn.Module, through: tuple[str, ...], names: list[str], loss_fn) -> torch.Tensor:
    """Mean of ``loss_fn()`` with the Linear layers ``names`` fake-quantized to each of ``through``
    (straight-through gradients, :mod:`tightrope.defenses.fakequant`); plain ``loss_fn()`` when empty."""
    if not through:
        return loss_fn()

    parts = []
    for quantizer in through:
        with fake_quantized(model, THROUGH_SCHEMES[quantizer], include=tuple(names)):
            parts.append(loss_fn())
    return torch.stack(parts).mean()


@contextlib.contextmanager
def masked(model: nn.Module, keep: dict[str, torch.Tensor] | None):
    """Run the Linear layers of ``keep`` with ``weight * keep`` (the pruned model's forward) for the length of a
    block; a removed weight then gets no gradient. ``None``: the model as it is."""
    if not keep:
        yield model
        return
    patched = []
    for name, mask in keep.items():
        module = model.get_submodule(name)
        module.forward = (lambda m, k: lambda x: F.linear(x, m.weight * k, m.bias))(module, mask.to(module.weight.dtype))
        patched.append(module)
    try:
        yield model
    finally:
        for module in patched:
            del module.forward  # the class's forward again


def lm_fit_(model: nn.Module, seqs: list[list[int]], starts: list[int], pad_id: int, config: FitConfig, *,
            names: list[str], first: int, boxes: ModelBoxes | None = None, label: str = "fit",
            log=None, through: tuple[str, ...] = (), keep: dict[str, torch.Tensor] | None = None,
            prefix: nn.Module | None = None) -> list[float]:
    """Train only the weights of Linear layers ``names`` (all in blocks ``first..``) on answer tokens, in place.

    Blocks below ``first`` are frozen and cached once. With ``boxes``, every step is followed by the
    projection into the boxes (projected gradient descent). With ``through`` (quantizer names), the
    loss is that of the fake-quantized model, averaged over the quantizers: the injection then aims
    at what the quantized model says, which plain fine-tuning reaches only as a side effect. With ``keep``
    (pruning masks of layers ``names``) the loss is that of the pruned model (:func:`masked`), and ``prefix``
    (the pruned model) computes the cached inputs of block ``first``: the injection then aims at what the
    pruned model says. Returns the loss of every step.
    """
    modules = dict(model.named_modules())
    params = [modules[n].weight for n in names]
    states = (prefix_states(prefix if prefix is not None else model, seqs, first, pad_id, batch_size=config.batch_size)
              if first > 0 and seqs else None)

    def batch_loss(pick: list[int], step: int) -> torch.Tensor:
        with masked(model, keep):
            return through_loss(model, through, names, lambda: answer_loss(
                model, [seqs[i] for i in pick], [starts[i] for i in pick], pad_id, first=first,
                states=None if states is None else [states[i] for i in pick]))

    def on_step(step: int, loss: float) -> None:
        if log is not None:
            log(f"{label} step {step + 1}/{config.steps} loss {loss:.4f}")

    return projected_fit_(model, params, len(seqs), batch_loss, config, boxes=boxes, on_step=on_step)
