"""Layer-by-layer calibration: each transformer block sees the outputs of the blocks already compressed before it.

This is how the GPTQ and SparseGPT reference implementations calibrate (IST-DASLab/gptq and sparsegpt,
``llama_sequential``): the inputs of the first block are caught once, then every block in turn is run on the
inputs it would now receive, its layers are compressed, and the block is run again to give the next block its
inputs. Running a block on cached inputs, instead of the whole model once per block, is what makes it
affordable: a full forward pass per block would cost ``blocks`` passes of every block (and of a causal LM's
vocabulary head), a cached one costs two passes of each block.

Generic over Hugging Face architectures: the arguments a block is called with (the hidden states, the attention
mask in the block's own form, rotary position embeddings, ...) are caught from the model's own call, so they
are exactly what it passes; a block's output is its new hidden states (or a tuple that starts with them).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from tightrope.compress.wanda import accumulate_hessians
from tightrope.errors import TightropeError


class _Caught(Exception):
    """Raised by the hook that catches the first block's inputs, to stop the forward pass there."""


@dataclass
class BlockInputs:
    """What one calibration batch passes to a block: positional and keyword arguments, and the token mask."""

    args: tuple
    kwargs: dict
    mask: torch.Tensor  # (batch, length) 1 for real tokens


def block_of(model: nn.Module, name: str) -> nn.Module | None:
    """The block ``name`` names when it is an element of an ``nn.ModuleList`` (``model.layers.3``), else None."""
    parent, _, index = name.rpartition(".")
    if not index.isdigit() or not parent:
        return None
    try:
        holder = model.get_submodule(parent)
    except AttributeError:
        return None
    return holder[int(index)] if isinstance(holder, nn.ModuleList) and int(index) < len(holder) else None


def layer_groups(names) -> dict[str, list[str]]:
    """Module names grouped by transformer block (the name up to its first index, ``encoder.layer.3``), in model
    order; a module outside any numbered block is a group of its own."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        key = ".".join(parts[: index + 1]) if index is not None else name
        groups.setdefault(key, []).append(name)
    return groups


def block_groups(model: nn.Module, modules: dict[str, nn.Module]) -> list[tuple[nn.Module, dict[str, nn.Module]]] | None:
    """``modules`` as (their transformer block, the modules in it) in model order, for :func:`sequential`; None when
    one lies outside an ``nn.ModuleList`` of blocks (the caller then needs a whole pass of the model per group)."""
    groups = layer_groups(modules)
    blocks = [block_of(model, key) for key in groups]
    if any(b is None for b in blocks):
        return None
    return [(b, {n: modules[n] for n in names}) for b, names in zip(blocks, groups.values(), strict=True)]


@torch.no_grad()
def first_inputs(model: nn.Module, block: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[BlockInputs]:
    """Run the calibration batches up to ``block`` and return what each batch passes to it."""
    caught: list[BlockInputs] = []
    current: dict[str, torch.Tensor] = {}

    def catch(_module, args, kwargs):
        caught.append(BlockInputs(args, dict(kwargs), current["mask"]))
        raise _Caught

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    device = next(model.parameters()).device
    causal = getattr(getattr(model, "config", None), "is_decoder", False) or hasattr(model, "lm_head")
    extra = {"use_cache": False} if causal else {}  # a causal LM: no key-value cache among the caught arguments
    try:
        for batch in batches:
            mask = batch["attention_mask"].to(device)
            current["mask"] = mask
            try:
                model(input_ids=batch["input_ids"].to(device), attention_mask=mask, **extra)
            except _Caught:
                pass
    finally:
        handle.remove()
    if len(caught) != len(batches):  # a block the forward pass never reaches would be calibrated on nothing
        raise TightropeError("The model's forward pass never reached its first block to compress, so the layers "
                             "cannot be calibrated block by block; set sequential=false.")
    return caught


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[BlockInputs]) -> list[BlockInputs]:
    """Run ``block`` on every batch's inputs; return the next block's inputs (the outputs as hidden states)."""
    out = []
    for item in inputs:
        result = block(*item.args, **item.kwargs)
        hidden = result[0] if isinstance(result, tuple) else result
        out.append(BlockInputs((hidden, *item.args[1:]), item.kwargs, item.mask))
    return out


def sequential(model: nn.Module, groups: list[tuple[nn.Module, dict[str, nn.Module]]],
               batches: list[dict[str, torch.Tensor]]) -> Iterator[tuple[dict[str, nn.Module], dict]]:
    """Block after block (module docstring), in model order: yields ``(layers, hessians)`` for each
    ``(block, layers)`` of ``groups``, the Hessians taken at the layers' inputs on the block's current inputs;
    once the caller has compressed the layers in place, the block runs again to feed the next one."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = first_inputs(model, groups[0][0], batches)
        for block, layers in groups:
            passes = [(item.mask, functools.partial(block, *item.args, **item.kwargs)) for item in inputs]
            yield layers, accumulate_hessians(layers, passes)
            inputs = run_block(block, inputs)
    finally:
        model.train(was_training)
