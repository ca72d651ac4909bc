"""Pruning behind :func:`tightrope.compress.compress_`: unstructured, activation-aware, N:M, structured.

- :class:`MagnitudePruning` is the seed paper's rule ``P(w) = 0 if |w| < T else w`` (Sec. III,
  "Pruning"), with ``T`` the ``sparsity``-quantile of ``|w|`` over all chosen layers (``global``) or
  within each layer (``layer``). It runs through ``torch.nn.utils.prune`` and is made permanent with
  ``prune.remove``: the weights are plain tensors holding zeros, no mask or hook is left behind.
- :class:`Wanda` scores ``|W_ij| * ||X_j||_2`` per output row (Sun et al. 2023, Eq. 1).
- :class:`SemiStructured24` keeps 2 of every 4 consecutive input weights (Mishra et al. 2021).
- :class:`StructuredPruning` removes whole attention heads and FFN neurons, so the stored matrices
  shrink and dense matmuls get faster. Heads are scored by the L1 norm of their weights (Li et al.
  2017, "Pruning Filters for Efficient ConvNets") or by the first-order Taylor importance of a head
  gate, ``I_h = |sum W_o[:, h] * dL/dW_o[:, h]|`` (Michel et al. 2019, "Are Sixteen Heads Really Better
  than One?", Eq. 2, written with the output projection's gradient, which equals dL/dxi_h).

Unstructured and N:M sparsity leave the matrices dense: the file is no smaller and a dense matmul is
no faster (2:4 runs faster only on GPUs with sparse tensor cores). The summaries say so.

A structurally pruned model no longer fits the shapes its ``config.json`` implies, so it is saved
with ``"format": "pruned-structured"`` and a per-layer plan (``"structure"``: heads kept, FFN width)
in ``card.json`` (and in ``config.json`` as ``tightrope_structure``); :func:`load_pruned` rebuilds
the shapes from that plan and loads the safetensors weights strictly.

Recovery fine-tuning (:func:`recover`) reuses :func:`tightrope.train.train` with
:func:`hold_sparsity`, which keeps every pruned weight at exactly zero through training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.optim.optimizer import register_optimizer_step_post_hook

from tightrope import models
from tightrope.compress import wanda
from tightrope.compress.api import (
    CompressionConfig,
    CompressionSummary,
    count_parameters,
    register_handler,
    select_modules,
)
from tightrope.errors import TightropeError
from tightrope.inference import TextClassifier, read_card, register_format

STRUCTURED_FORMAT = "pruned-structured"
DENSE_NOTE = ("Unstructured sparsity keeps dense matrices: stored bytes are unchanged and dense "
              "matmuls are no faster; only the non-zero count falls.")
NM_NOTE = ("N:M sparsity is stored dense here; only GPUs with sparse tensor cores run 2:4 faster, "
           "and this CPU path is no faster than the dense model.")


# --- configs (validated when built) ---------------------------------------------------------------


def _check_fraction(method: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise TightropeError(f"{method} {name} must be a fraction in [0, 1), got {value!r}.")


def _check_choice(method: str, name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise TightropeError(f"{method} {name} must be one of {', '.join(choices)}, got {value!r}.")


def _normalise_patterns(config: CompressionConfig) -> None:
    for name in ("include", "exclude"):
        value = getattr(config, name)
        if isinstance(value, str):
            value = (value,)
        if isinstance(value, (int, float)):
            raise TightropeError(f"{config.method} takes its settings by name (e.g. sparsity=0.3), not by position.")
        if not isinstance(value, (tuple, list)) or not all(isinstance(p, str) for p in value):
            raise TightropeError(f"{config.method} {name} must be a list of module-name patterns, got {value!r}.")
        object.__setattr__(config, name, tuple(value))


@dataclass(frozen=True, kw_only=True)
class _Calibrated(CompressionConfig):
    """Calibration fields shared by criteria that look at activations or gradients.

    ``calibration_texts`` is a task name / data file (its train split, labels included) or texts.
    """

    calibration_texts: tuple[str, ...] | str = ()
    n_calibration: int = 32
    max_length: int = 128
    seed: int = 0

    def _check_calibration(self) -> None:
        if not isinstance(self.calibration_texts, str):
            object.__setattr__(self, "calibration_texts", tuple(self.calibration_texts))
        if isinstance(self.n_calibration, bool) or not isinstance(self.n_calibration, int) or self.n_calibration < 1:
            raise TightropeError(f"{self.method} n_calibration must be a positive integer, got {self.n_calibration!r}.")
        if not isinstance(self.max_length, int) or self.max_length < 8:
            raise TightropeError(f"{self.method} max_length must be an integer of at least 8, got {self.max_length!r}.")

    def to_dict(self) -> dict:
        out = super().to_dict()
        texts = self.calibration_texts
        out["calibration_texts"] = texts if isinstance(texts, str) else f"{len(texts)} texts"
        return out


@dataclass(frozen=True, kw_only=True)
class MagnitudePruning(CompressionConfig):
    """Zero the ``sparsity`` share of smallest-magnitude weights, over all chosen layers or per layer."""

    sparsity: float = 0.3
    scope: Literal["global", "layer"] = "global"

    def __post_init__(self) -> None:
        _normalise_patterns(self)
        _check_fraction(self.method, "sparsity", self.sparsity)
        _check_choice(self.method, "scope", self.scope, ("global", "layer"))


@dataclass(frozen=True, kw_only=True)
class Wanda(_Calibrated):
    """Sun et al. 2023: zero the ``sparsity`` share of each output row with the lowest ``|W| * ||X||_2``."""

    sparsity: float = 0.5

    def __post_init__(self) -> None:
        _normalise_patterns(self)
        _check_fraction(self.method, "sparsity", self.sparsity)
        self._check_calibration()


@dataclass(frozen=True, kw_only=True)
class SemiStructured24(_Calibrated):
    """N:M sparsity (2:4 by default): keep ``n`` of every ``m`` consecutive input weights of each row."""

    criterion: Literal["magnitude", "wanda"] = "magnitude"
    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        _normalise_patterns(self)
        _check_choice(self.method, "criterion", self.criterion, ("magnitude", "wanda"))
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise TightropeError(f"{self.method} needs whole numbers 0 < n < m, got n={self.n!r}, m={self.m!r}.")
        self._check_calibration()


@dataclass(frozen=True, kw_only=True)
class StructuredPruning(_Calibrated):
    """Remove the ``heads`` share of attention heads and the ``ffn`` share of FFN neurons in every layer.

    ``criterion="taylor"`` needs calibration data; with plain texts (no labels) the model's own
    predictions serve as labels. ``batch_size=1`` reproduces Michel et al.'s per-example ``|.|``.
    """

    heads: float = 0.3
    ffn: float = 0.3
    criterion: Literal["magnitude", "taylor"] = "magnitude"
    batch_size: int = 1

    def __post_init__(self) -> None:
        _normalise_patterns(self)
        _check_fraction(self.method, "heads", self.heads)
        _check_fraction(self.method, "ffn", self.ffn)
        _check_choice(self.method, "criterion", self.criterion, ("magnitude", "taylor"))
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise TightropeError(f"{self.method} batch_size must be a positive integer, got {self.batch_size!r}.")
        self._check_calibration()


# --- shared helpers -------------------------------------------------------------------------------


def sparsity_of(weight: torch.Tensor) -> float:
    """Share of exactly-zero entries."""
    return 1.0 - int(torch.count_nonzero(weight)) / weight.numel()


def _summary(model: nn.Module, config: CompressionConfig, modules: dict[str, nn.Module], notes: list[str]) -> CompressionSummary:
    total, nonzero = count_parameters(model)
    per_module = {name: sparsity_of(m.weight) for name, m in modules.items()}
    zeros = sum(int(m.weight.numel() - torch.count_nonzero(m.weight)) for m in modules.values())
    size = sum(m.weight.numel() for m in modules.values())
    notes = [f"sparsity of the pruned weights: {zeros / max(1, size):.4f} ({zeros} of {size})", *notes]
    return CompressionSummary(method=config.method, config=config.to_dict(), modules=list(modules), bits=None,
                              simulated=False, parameters=total, nonzero_parameters=nonzero,
                              per_module_sparsity=per_module, notes=notes)


@torch.no_grad()
def _zero_(module: nn.Module, keep: torch.Tensor) -> None:
    """Zero the weights where ``keep`` is False, in place (the Parameter object stays the same)."""
    module.weight.masked_fill_(~keep.to(module.weight.device), 0.0)


def _calibration(model: nn.Module, config: _Calibrated, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    return wanda.calibration_batches(model, config.calibration_texts, config.n_calibration,
                                     max_length=config.max_length, seed=config.seed, batch_size=batch_size)


# --- unstructured ---------------------------------------------------------------------------------


@register_handler(MagnitudePruning)
def _magnitude(model: nn.Module, config: MagnitudePruning) -> CompressionSummary:
    modules = select_modules(model, config)
    targets = [(m, "weight") for m in modules.values()]
    if config.sparsity > 0:
        if config.scope == "global":
            # One threshold T over all chosen weights: exactly round(sparsity * total) are zeroed.
            torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=config.sparsity)
        else:
            for m in modules.values():
                torch_prune.l1_unstructured(m, "weight", amount=config.sparsity)
        for m, name in targets:
            torch_prune.remove(m, name)  # make it permanent: weight becomes a plain Parameter with zeros
    return _summary(model, config, modules, [DENSE_NOTE])


@register_handler(Wanda)
def _wanda(model: nn.Module, config: Wanda) -> CompressionSummary:
    modules = select_modules(model, config)
    if config.sparsity > 0:
        norms = wanda.input_norms(model, modules, _calibration(model, config))
        for name, m in modules.items():
            _zero_(m, wanda.row_keep_mask(wanda.wanda_scores(m.weight.detach(), norms[name]), config.sparsity))
    return _summary(model, config, modules, [DENSE_NOTE, f"calibration: {config.n_calibration} samples"])


@register_handler(SemiStructured24)
def _n_m(model: nn.Module, config: SemiStructured24) -> CompressionSummary:
    modules = select_modules(model, config)
    odd = [name for name, m in modules.items() if m.in_features % config.m]
    if odd:
        raise TightropeError(f"{config.n}:{config.m} sparsity needs input widths divisible by {config.m}; "
                             f"{odd[0]} has {modules[odd[0]].in_features}.")
    norms = wanda.input_norms(model, modules, _calibration(model, config)) if config.criterion == "wanda" else {}
    for name, m in modules.items():
        w = m.weight.detach()
        scores = wanda.wanda_scores(w, norms[name]) if norms else w.abs()
        _zero_(m, wanda.nm_keep_mask(scores, config.n, config.m))
    return _summary(model, config, modules, [NM_NOTE])


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


# --- saving and loading ---------------------------------------------------------------------------


def pruning_card(model: nn.Module) -> dict:
    """Card fields a saver adds for a pruned model: the format and plan of a structurally pruned one."""
    structure = structure_of(model)
    card: dict = {}
    if structure is not None:
        card.update(format=STRUCTURED_FORMAT, structure=structure)
    history = getattr(model, "_tightrope_compression", None)
    if history:
        card["compression"] = history
    return card


def save_pruned(model: nn.Module, tokenizer, out_dir: str | Path, card: dict | None = None,
                files: dict | None = None) -> Path:
    """Write a pruned model (safetensors + config + tokenizer + card.json that records how it was made;
    ``files``: other JSON files for the directory, such as an input transform's table)."""
    full = {"kind": "tightrope.model", "created_by": "tightrope compress", **(card or {}), **pruning_card(model)}
    return models.save_model((model, tokenizer), out_dir, extra={**(files or {}), "card.json": full})


def load_pruned(path: str | Path) -> models.LoadedModel:
    """Load a pruned classifier; a structurally pruned one is rebuilt from its plan, then loaded strictly."""
    from safetensors.torch import load_file  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForSequenceClassification  # noqa: PLC0415

    path = Path(path).expanduser()
    card = read_card(path) if path.is_dir() else {}
    config = None
    structure = card.get("structure")
    if structure is None and (path / "config.json").exists():
        config = AutoConfig.from_pretrained(str(path))
        structure = getattr(config, "tightrope_structure", None)
    if structure is None:
        loaded = models.load_classifier(str(path))
        loaded.model._tightrope_compression = card.get("compression", [])
        return loaded
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise TightropeError(f"{path} holds no model*.safetensors weights.")
    config = config or AutoConfig.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_config(config)
    apply_structure_(model, structure)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TightropeError(f"The weights in {path} do not match its pruning plan: {str(err).splitlines()[0]}") from err
    model.eval()
    model._tightrope_compression = card.get("compression", [])
    tokenizer = models.load_tokenizer(str(path))
    return models.LoadedModel(model=model, tokenizer=tokenizer, source=str(path), path=str(path))


@register_format(STRUCTURED_FORMAT)
def _load_structured_classifier(path: Path, card: dict) -> TextClassifier:
    loaded = load_pruned(path)
    tok = card.get("tokenization", {})
    return TextClassifier(loaded.model, loaded.tokenizer, max_length=tok.get("max_length", 256),
                          truncation=tok.get("truncation", "head"), source=str(path), card=card)


# --- recovery with the sparsity pattern held fixed ------------------------------------------------


@dataclass(frozen=True)
class SparsityMask:
    """Which weights pruning removed: parameter name -> boolean keep-mask (True = still a weight)."""

    keep: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: nn.Module, config: CompressionConfig | None = None) -> SparsityMask:
        """Every exact zero of the chosen Linear weights (default: the encoder's) counts as pruned."""
        modules = select_modules(model, config or CompressionConfig())
        keep = {f"{name}.weight": m.weight.detach() != 0 for name, m in modules.items()}
        return cls({name: k for name, k in keep.items() if not bool(k.all())})

    def parameters(self, model: nn.Module) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        params = dict(model.named_parameters())
        for name, keep in self.keep.items():
            param = params.get(name, params.get(f"module.{name}"))  # DDP wraps names in "module."
            if param is None:
                raise TightropeError(f"The sparsity mask names {name}, which this model does not have.")
            yield param, keep

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        for param, keep in self.parameters(model):
            param.masked_fill_(~keep.to(param.device), 0.0)

    def violations(self, model: nn.Module) -> int:
        """How many pruned weights are no longer zero."""
        return sum(int(torch.count_nonzero(p.detach()[~k.to(p.device)])) for p, k in self.parameters(model))

    @property
    def pruned(self) -> int:
        return sum(int((~k).sum()) for k in self.keep.values())


@contextmanager
def hold_sparsity(model: nn.Module, mask: SparsityMask | None = None) -> Iterator[SparsityMask]:
    """Keep pruned weights at exactly zero while training ``model`` inside the block.

    Two hooks: the gradient of a pruned weight is zeroed (so clipping and Adam's moments see the
    sparse model), and after every optimizer step the pruned weights are set to zero again (weight
    decay, or an optimizer with older state, could otherwise move them).
    """
    mask = SparsityMask.from_model(model) if mask is None else mask
    pairs = list(mask.parameters(model))
    handles = [p.register_hook(lambda g, k=k: g.masked_fill(~k.to(g.device), 0.0)) for p, k in pairs]

    @torch.no_grad()
    def rezero(optimizer, args, kwargs) -> None:
        for p, k in pairs:
            p.masked_fill_(~k.to(p.device), 0.0)

    handles.append(register_optimizer_step_post_hook(rezero))
    try:
        yield mask
    finally:
        for h in handles:
            h.remove()


def recover(
    model_dir: str | Path,
    task: str,
    out_dir: str | Path,
    *,
    steps: int = 100,
    lr: float = 2e-5,
    batch_size: int = 16,
    max_length: int = 128,
    n_train: int | None = None,
    n_eval: int = 200,
    seed: int = 0,
    data_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """Short recovery fine-tuning of a pruned model with :func:`tightrope.train.train`, sparsity held.

    Runs exactly ``steps`` optimizer steps and writes a model directory (same format as the input,
    so a structurally pruned model stays loadable). Returns the card.
    """
    from tightrope.train import TrainConfig, split_train_eval, train  # noqa: PLC0415 - heavy imports

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TightropeError(f"Recovery needs a positive whole number of steps, got {steps!r}.")
    loaded = load_pruned(model_dir)
    try:
        settings = dict(model=str(model_dir), task=task, data_dir=data_dir, n_train=n_train, n_eval=n_eval,
                        max_length=max_length, batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=max(steps, 1))
        train_data, _ = split_train_eval(TrainConfig(**settings))
        steps_per_epoch = math.ceil(len(train_data) / batch_size)
        # train() runs ceil(steps_per_epoch * epochs) steps; the half step keeps float error from adding one.
        config = TrainConfig(**settings, epochs=(steps - 0.5) / steps_per_epoch)
    except ValueError as err:  # pydantic's ValidationError
        raise TightropeError(f"Invalid recovery setting: {str(err).splitlines()[-1].strip()}") from err
    if train_data.num_labels != loaded.model.config.num_labels:
        raise TightropeError(f"{model_dir} predicts {loaded.model.config.num_labels} labels but {task} has "
                             f"{train_data.num_labels}.")
    before = read_card(Path(model_dir)) if Path(model_dir).is_dir() else {}
    extra = {"created_by": "tightrope recover", "recovered_from": str(model_dir),
             **{k: before[k] for k in ("compression",) if k in before}, **pruning_card(loaded.model)}
    with hold_sparsity(loaded.model):
        return train(config, out_dir, initial_model=loaded, progress=progress, extra_card=extra)


def recover_model(model: nn.Module, tokenizer, task: str, *, steps: int, max_length: int = 128, card: dict | None = None,
                  out_dir: str | Path | None = None, progress: bool = False) -> nn.Module:
    """:func:`recover` for a pruned model in memory: returns the recovered model (tokenizer attached
    for calibration-based compressors). With ``out_dir`` the recovered model is kept there, and an
    ``out_dir`` that already holds one is loaded instead of trained again (recovery is seeded)."""
    import tempfile  # noqa: PLC0415

    from tightrope.compress import formats  # noqa: PLC0415

    def load(path: Path) -> nn.Module:
        loaded = load_pruned(path).model
        wanda.set_tokenizer(loaded, tokenizer)
        return loaded

    if out_dir is not None and (Path(out_dir) / "card.json").exists():
        return load(Path(out_dir))
    with tempfile.TemporaryDirectory() as tmp:
        pruned = formats.save_compressed(model, tokenizer, Path(tmp) / "pruned", card=card)
        target = Path(out_dir) if out_dir is not None else Path(tmp) / "recovered"
        recover(pruned, task, target, steps=steps, max_length=max_length, progress=progress)
        return load(target)

