"""One verb for every compression method: ``summary = compress_(model, config)`` (in place).

Configs are frozen dataclasses; each config class has one handler registered with
:func:`register_handler` (the torchao ``quantize_(model, config)`` pattern). A handler edits the
model in place and returns a :class:`CompressionSummary`. Module selection is shared: every config
carries ``include`` / ``exclude`` glob patterns over module names (fnmatch), and when ``include``
is empty the per-architecture default from :func:`default_targets` applies (all Linear layers of
the encoder; the classifier head and pooler stay in full precision unless asked).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from tightrope.errors import TightropeError


@dataclass(frozen=True)
class CompressionConfig:
    """Base of every config: which modules it touches."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @property
    def method(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}


@dataclass(frozen=True)
class CompressionSummary:
    """What one compression step did, measured on the model it returned."""

    method: str
    config: dict
    modules: list[str]  # names of the modules it changed
    bits: float | None  # bits per weight of the changed modules (None for pruning)
    simulated: bool  # True when no fast kernel exists and the format is only emulated in fp32
    parameters: int  # stored parameters of the whole model after this step
    nonzero_parameters: int
    per_module_sparsity: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    stored_bytes: int | None = None  # bytes of every tensor the saved model holds (weights, scales, codes)

    def to_dict(self) -> dict:
        return asdict(self)


Handler = Callable[[nn.Module, CompressionConfig], CompressionSummary]
_HANDLERS: dict[type, Handler] = {}

# Module-name patterns kept in full precision by default, per architecture family.
DEFAULT_EXCLUDE: tuple[str, ...] = ("classifier*", "*.classifier*", "score", "*pooler*", "lm_head", "*.lm_head")


def register_handler(config_cls: type):
    """Decorator: ``@register_handler(NF4)`` on ``def _nf4(model, config) -> CompressionSummary``."""

    def wrap(fn: Handler) -> Handler:
        _HANDLERS[config_cls] = fn
        return fn

    return wrap


def select_modules(model: nn.Module, config: CompressionConfig, kinds: tuple[type, ...] = (nn.Linear,)) -> dict[str, nn.Module]:
    """Modules of the given kinds chosen by the config's include / exclude patterns.

    Raises a one-sentence error when an explicit include pattern matches nothing.
    """
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, kinds)}
    if config.include:
        chosen = {n: m for n, m in candidates.items() if any(fnmatch.fnmatch(n, p) for p in config.include)}
        if not chosen:
            raise TightropeError(
                f"The pattern(s) {list(config.include)} match no {'/'.join(k.__name__ for k in kinds)} module; "
                f"names look like {next(iter(candidates), 'none')}."
            )
    else:
        chosen = {n: m for n, m in candidates.items() if not any(fnmatch.fnmatch(n, p) for p in DEFAULT_EXCLUDE)}
    chosen = {n: m for n, m in chosen.items() if not any(fnmatch.fnmatch(n, p) for p in config.exclude)}
    if not chosen:
        raise TightropeError(f"{config.method} selects no module of this model; check --include / --exclude.")
    return chosen


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(stored, non-zero) parameters, counting packed quantized weights by their logical element count."""
    total = nonzero = 0
    for p in model.parameters():
        n = getattr(p, "logical_numel", None) or p.numel()
        total += n
        nonzero += int(torch.count_nonzero(p)) if p.is_floating_point() else n
    return total, nonzero


def compress_(model: nn.Module, config: CompressionConfig) -> CompressionSummary:
    """Apply one compression config to ``model`` in place and return what it did."""
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(sorted(c.__name__ for c in _HANDLERS)) or "none registered"
        raise TightropeError(f"Unknown compression method {type(config).__name__}; known: {known}.")
    history = getattr(model, "_tightrope_compression", [])
    summary = handler(model, config)
    model._tightrope_compression = [*history, summary.to_dict()]
    return summary
