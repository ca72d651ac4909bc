"""Pruning configs and the unstructured methods behind :func:`tightrope.compress.compress_`.

- :class:`MagnitudePruning` is the seed paper's rule ``P(w) = 0 if |w| < T else w`` (Sec. III,
  "Pruning"), with ``T`` the ``sparsity``-quantile of ``|w|`` over all chosen layers (``global``) or
  within each layer (``layer``). It runs through ``torch.nn.utils.prune`` and is made permanent with
  ``prune.remove``: the weights are plain tensors holding zeros, no mask or hook is left behind.
- :class:`Wanda` scores ``|W_ij| * ||X_j||_2`` per output row (Sun et al. 2023, Eq. 1).
- :class:`SemiStructured24` keeps 2 of every 4 consecutive input weights (Mishra et al. 2021).
- :class:`SparseGPT` removes weights by OBS saliency and updates the kept ones (Frantar and Alistarh 2023).
- :class:`StructuredPruning` (its handler in :mod:`tightrope.compress.structured`) removes whole
  attention heads and FFN neurons.

Unstructured and N:M sparsity leave the matrices dense: the file is no smaller and a dense matmul is
no faster (2:4 runs faster only on GPUs with sparse tensor cores). The summaries say so.
Saving and reloading a pruned model is :mod:`tightrope.compress.formats`; recovery fine-tuning with
the sparsity held is :mod:`tightrope.compress.recovery`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from tightrope.compress import blockwise, sparsegpt, wanda
from tightrope.compress.api import (
    CompressionConfig,
    CompressionSummary,
    count_parameters,
    register_handler,
    select_modules,
)
from tightrope.errors import TightropeError

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
class SparseGPT(_Calibrated):
    """Frantar and Alistarh 2023 (:mod:`tightrope.compress.sparsegpt`): remove the ``sparsity`` share of each
    block of ``blocksize`` input columns by OBS saliency and update the kept weights to make up for them; with
    ``n`` and ``m`` set, N:M sparsity (``n`` of every ``m`` inputs kept). ``sequential`` (the reference's way):
    each transformer layer is calibrated on the outputs of the layers already pruned before it; else one pass
    of the dense model calibrates every layer (as tightrope's GPTQ does)."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    blocksize: int = 128
    percdamp: float = 0.01
    sequential: bool = True

    def __post_init__(self) -> None:
        _normalise_patterns(self)
        _check_fraction(self.method, "sparsity", self.sparsity)
        if (self.n or self.m) and not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise TightropeError(f"{self.method} N:M needs whole numbers 0 < n < m, got n={self.n!r}, m={self.m!r}.")
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise TightropeError(f"{self.method} blocksize must be a positive integer, got {self.blocksize!r}.")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or not 0 < self.percdamp < 1:
            raise TightropeError(f"{self.method} percdamp must lie strictly between 0 and 1, got {self.percdamp!r}.")
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


@register_handler(SparseGPT)
def _sparsegpt(model: nn.Module, config: SparseGPT) -> CompressionSummary:
    modules = select_modules(model, config)
    if config.m:
        odd = [name for name, m in modules.items() if m.in_features % config.m]
        if odd:
            raise TightropeError(f"{config.n}:{config.m} sparsity needs input widths divisible by {config.m}; "
                                 f"{odd[0]} has {modules[odd[0]].in_features}.")
    if config.n == 0 and config.sparsity == 0:
        return _summary(model, config, modules, [DENSE_NOTE])
    batches = _calibration(model, config)
    groups = blockwise.block_groups(model, modules) if config.sequential else None
    if groups:  # the reference's way, on cached block inputs
        steps = blockwise.sequential(model, groups, batches)
    elif config.sequential:  # layers outside numbered blocks: a whole pass of the model per group, in model order
        steps = (({n: modules[n] for n in names}, wanda.input_hessians(model, {n: modules[n] for n in names}, batches))
                 for names in blockwise.layer_groups(modules).values())
    else:
        steps = iter([(modules, wanda.input_hessians(model, modules, batches))])
    tokens = 0
    for chosen, hessians in steps:  # a generator: each group's Hessians are taken after the groups before it are pruned
        for name, lin in chosen.items():
            pruned, _ = sparsegpt.sparsegpt_prune(lin.weight.detach(), hessians[name].H, config.sparsity, config.n,
                                                  config.m, config.blocksize, config.percdamp)
            with torch.no_grad():
                lin.weight.copy_(pruned)
            tokens = hessians[name].n
    pattern = f"{config.n}:{config.m}" if config.m else f"{config.sparsity:g} per block of {config.blocksize} inputs"
    return _summary(model, config, modules, [
        NM_NOTE if config.m else DENSE_NOTE,
        f"SparseGPT {pattern}, {config.n_calibration} calibration samples ({tokens} tokens), damp {config.percdamp}, "
        + ("calibrated layer by layer on the pruned layers' outputs" if config.sequential else "one dense pass"),
        "the kept weights are updated (OBS), so the pruned model differs from the dense one beyond its zeros"])


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
