"""Structured pruning: whole attention heads and FFN neurons removed, so matrices shrink.

Heads are scored by the L1 norm of their weights (Li et al. 2017, "Pruning Filters for Efficient
ConvNets") or by the first-order Taylor importance of a head gate,
``I_h = |sum W_o[:, h] * dL/dW_o[:, h]|`` (Michel et al. 2019, "Are Sixteen Heads Really Better than
One?", Eq. 2, written with the output projection's gradient, which equals dL/dxi_h).

A structurally pruned model no longer fits the shapes its ``config.json`` implies: the per-layer
plan (heads kept, FFN width) is recorded by :func:`structure_of` and rebuilt by
:func:`apply_structure_` (:mod:`tightrope.compress.formats` saves and reloads it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tightrope.compress.api import (
    CompressionSummary,
    count_parameters,
    register_handler,
    select_modules,
)
from tightrope.compress.prune import StructuredPruning, _calibration
from tightrope.errors import TightropeError

# --- structured: architectures --------------------------------------------------------------------


@dataclass(frozen=True)
class LayerLayout:
    """Where one transformer layer keeps its prunable parts (paths relative to the layer)."""

    attention: str  # module holding the q/k/v projections and the head counts
    qkv: tuple[str, str, str]  # attribute names on that module
    attention_out: str  # projection from the concatenated heads back to the hidden size
    ffn_in: str = "intermediate.dense"
    ffn_out: str = "output.dense"
    shared_head_bias: bool = False  # MPNet adds one relative position bias (B, heads, T, T) to every layer


LAYOUTS: dict[str, LayerLayout] = {
    "bert": LayerLayout("attention.self", ("query", "key", "value"), "attention.output.dense"),
    "roberta": LayerLayout("attention.self", ("query", "key", "value"), "attention.output.dense"),
    "mpnet": LayerLayout("attention.attn", ("q", "k", "v"), "attention.attn.o", shared_head_bias=True),
}


def layout_of(model: nn.Module) -> LayerLayout:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if model_type not in LAYOUTS:
        raise TightropeError(f"Structured pruning supports {', '.join(sorted(LAYOUTS))} models, not {model_type}.")
    return LAYOUTS[model_type]


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise TightropeError(f"{type(model).__name__} has no encoder.layer list to prune.")
    return layers


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping rows (dim 0) or columns (dim 1) ``index`` (transformers' prune_linear_layer)."""
    from transformers.pytorch_utils import prune_linear_layer  # noqa: PLC0415

    return prune_linear_layer(linear, index.to(linear.weight.device), dim=dim)


def _slice_head_bias(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook for MPNet self-attention: keep only this layer's heads of the shared bias."""
    kept = module.tightrope_kept_heads
    if len(args) > 2 and args[2] is not None:
        args = (*args[:2], args[2].index_select(1, kept), *args[3:])
    elif kwargs.get("position_bias") is not None:
        kwargs = {**kwargs, "position_bias": kwargs["position_bias"].index_select(1, kept)}
    return args, kwargs


def prune_layer_(layer: nn.Module, layout: LayerLayout, keep_heads: torch.Tensor, keep_ffn: torch.Tensor) -> None:
    """Shrink one layer in place to the heads ``keep_heads`` and FFN neurons ``keep_ffn`` (local indices)."""
    attention = layer.get_submodule(layout.attention)
    d = attention.attention_head_size
    if len(keep_heads) < attention.num_attention_heads:
        rows = (keep_heads.view(-1, 1) * d + torch.arange(d)).reshape(-1)  # (kept * d,)
        for name in layout.qkv:
            setattr(attention, name, _slice_linear(getattr(attention, name), rows, dim=0))
        _set_submodule(layer, layout.attention_out, _slice_linear(layer.get_submodule(layout.attention_out), rows, dim=1))
        if layout.shared_head_bias:
            before = getattr(attention, "tightrope_kept_heads", None)
            if before is None:
                before = torch.arange(attention.num_attention_heads)
                attention.register_forward_pre_hook(_slice_head_bias, with_kwargs=True)
            attention.register_buffer("tightrope_kept_heads", before.to(keep_heads.device)[keep_heads], persistent=False)
        attention.num_attention_heads = len(keep_heads)
        attention.all_head_size = len(keep_heads) * d
    ffn_in = layer.get_submodule(layout.ffn_in)
    if len(keep_ffn) < ffn_in.out_features:
        _set_submodule(layer, layout.ffn_in, _slice_linear(ffn_in, keep_ffn, dim=0))
        _set_submodule(layer, layout.ffn_out, _slice_linear(layer.get_submodule(layout.ffn_out), keep_ffn, dim=1))


# --- structured: scores ---------------------------------------------------------------------------


def n_removed(fraction: float, n: int) -> int:
    """How many of ``n`` units a fraction removes: ``round(fraction * n)``, always leaving one."""
    return min(round(fraction * n), n - 1)


def kept_indices(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Indices of the ``len(scores) - n_remove`` highest scores, in increasing index order."""
    keep = torch.topk(scores, len(scores) - n_remove, sorted=False).indices
    return keep.sort().values


def head_l1(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """L1 norm of each head's weights (Li et al. 2017): its q/k/v rows and its columns of o. -> (heads,)"""
    rows = sum(w.abs().reshape(n_heads, -1).sum(1) for w in (q, k, v))  # q: (heads*d, hidden)
    cols = o.abs().reshape(o.shape[0], n_heads, -1).sum((0, 2))  # o: (hidden, heads*d)
    return rows + cols


def neuron_l1(w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """L1 norm of each FFN neuron: its row of the input dense and its column of the output dense. -> (ffn,)"""
    return w_in.abs().sum(1) + w_out.abs().sum(0)


def gate_taylor(w_out: torch.Tensor, grad_out: torch.Tensor, group: int) -> torch.Tensor:
    """``|dL/dxi_g|`` for a gate xi_g on each group of ``group`` input columns of a projection.

    For ``y = W (xi * c)``, ``dL/dxi_g = sum_{j in g} sum_r W_rj dL/dW_rj`` (Michel et al. 2019,
    Eq. 2; Molchanov et al. 2019 group Taylor). ``group`` is the head size for heads, 1 for neurons.
    """
    contribution = (w_out * grad_out).sum(0)  # (in,)
    return contribution.reshape(-1, group).sum(1).abs()  # (in / group,)


def _taylor_scores(model: nn.Module, layers: list[nn.Module], layout: LayerLayout,
                   batches: list[dict[str, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Head and neuron importances, |.| taken per batch and summed over the calibration batches."""
    import torch.nn.functional as F  # noqa: PLC0415

    outs = [layer.get_submodule(layout.attention_out).weight for layer in layers]
    ffn_outs = [layer.get_submodule(layout.ffn_out).weight for layer in layers]
    head_size = [layer.get_submodule(layout.attention).attention_head_size for layer in layers]
    heads = [torch.zeros(w.shape[1] // d) for w, d in zip(outs, head_size)]
    neurons = [torch.zeros(w.shape[1]) for w in ffn_outs]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it will be used
    try:
        with torch.enable_grad():
            for batch in batches:
                logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
                labels = batch["labels"].to(device) if "labels" in batch else logits.detach().argmax(-1)
                loss = F.cross_entropy(logits, labels)
                grads = torch.autograd.grad(loss, outs + ffn_outs)
                for i in range(len(layers)):
                    heads[i] += gate_taylor(outs[i].detach(), grads[i], head_size[i]).cpu()
                    neurons[i] += gate_taylor(ffn_outs[i].detach(), grads[len(layers) + i], 1).cpu()
    finally:
        model.train(was_training)
    return heads, neurons


def _magnitude_scores(layers: list[nn.Module], layout: LayerLayout) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    heads, neurons = [], []
    for layer in layers:
        attention = layer.get_submodule(layout.attention)
        q, k, v = (getattr(attention, n).weight.detach() for n in layout.qkv)
        o = layer.get_submodule(layout.attention_out).weight.detach()
        heads.append(head_l1(q, k, v, o, attention.num_attention_heads).cpu())
        neurons.append(neuron_l1(layer.get_submodule(layout.ffn_in).weight.detach(),
                                 layer.get_submodule(layout.ffn_out).weight.detach()).cpu())
    return heads, neurons


# --- structured: the plan recorded for reloading --------------------------------------------------


def structure_of(model: nn.Module) -> dict | None:
    """The per-layer plan of a structurally pruned model (None when it was never pruned that way)."""
    return getattr(getattr(model, "config", None), "tightrope_structure", None)


def _full_structure(model: nn.Module, layout: LayerLayout) -> dict:
    layers = encoder_layers(model)
    return {"architecture": model.config.model_type, "layers": [
        {"heads": list(range(layer.get_submodule(layout.attention).num_attention_heads)),
         "ffn": layer.get_submodule(layout.ffn_in).out_features} for layer in layers]}


def apply_structure_(model: nn.Module, structure: dict) -> nn.Module:
    """Shrink a freshly built (unpruned) model to a recorded plan, so a pruned state dict loads into it."""
    layout = layout_of(model)
    layers = encoder_layers(model)
    plan = structure.get("layers", [])
    if len(plan) != len(layers):
        raise TightropeError(f"The pruning plan lists {len(plan)} layers but the model has {len(layers)}.")
    for layer, entry in zip(layers, plan):
        prune_layer_(layer, layout, torch.tensor(entry["heads"], dtype=torch.long),
                     torch.arange(int(entry["ffn"]), dtype=torch.long))
    model.config.tightrope_structure = structure
    return model


@register_handler(StructuredPruning)
def _structured(model: nn.Module, config: StructuredPruning) -> CompressionSummary:
    layout = layout_of(model)
    all_layers = list(encoder_layers(model))
    paths = [f"{layout.attention}.{n}" for n in layout.qkv] + [layout.attention_out, layout.ffn_in, layout.ffn_out]
    if not all(type(layer.get_submodule(p)) is nn.Linear for layer in all_layers for p in paths):
        raise TightropeError("Structured pruning needs plain Linear layers; prune before quantizing, not after.")
    chosen = select_modules(model, config, kinds=(type(all_layers[0]),))
    index = {id(layer): i for i, layer in enumerate(all_layers)}
    picked = sorted(index[id(m)] for m in chosen.values())
    layers = [all_layers[i] for i in picked]
    before = count_parameters(model)[0]
    if config.criterion == "taylor":
        batches = _calibration(model, config, batch_size=config.batch_size)
        head_scores, neuron_scores = _taylor_scores(model, layers, layout, batches)
    else:
        head_scores, neuron_scores = _magnitude_scores(layers, layout)
    structure = structure_of(model) or _full_structure(model, layout)
    for i, layer, hs, ns in zip(picked, layers, head_scores, neuron_scores):
        keep_heads = kept_indices(hs, n_removed(config.heads, len(hs)))
        keep_ffn = kept_indices(ns, n_removed(config.ffn, len(ns)))
        prune_layer_(layer, layout, keep_heads, keep_ffn)
        entry = structure["layers"][i]
        entry["heads"] = [entry["heads"][j] for j in keep_heads.tolist()]
        entry["ffn"] = len(keep_ffn)
    model.config.tightrope_structure = structure
    after, nonzero = count_parameters(model)
    kept = [f"layer {i}: {len(structure['layers'][i]['heads'])} heads, FFN {structure['layers'][i]['ffn']}" for i in picked]
    return CompressionSummary(
        method=config.method, config=config.to_dict(), modules=[n for n, _ in sorted(chosen.items())], bits=None,
        simulated=False, parameters=after, nonzero_parameters=nonzero, per_module_sparsity={},
        notes=[f"stored parameters {before} -> {after} ({1 - after / before:.4f} removed); matrices shrink, "
               "so dense matmuls do less work", *kept],
    )
