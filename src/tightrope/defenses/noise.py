"""Gaussian weight noise before quantization: a defense against quantization-conditioned backdoors.

Egashira et al. (2024), "Exploiting LLM Quantization" (arXiv 2405.18137), Sec. 5 ("Defense"): a
malicious full-precision model is built so that its weights sit inside the preimage boxes of the
quantizer that carry the hidden behaviour; adding i.i.d. Gaussian noise N(0, sigma^2) to every
weight before quantizing moves enough of them across rounding boundaries to remove the behaviour,
at little cost in utility (they report sigma about 1e-3 on Phi-2).

Sigma is either absolute, or relative to each layer's quantization step Delta, so that
``sigma = 0.5`` means "half a rounding bin" whatever a layer's range:

- ``llm-int8``      Delta = absmax_row / 127 (LLM.int8() row-wise absmax)
- ``int8``          Delta = absmax_row / 127.5 (dynamic int8, symmetric per channel)
- ``int8-tensor``   Delta = absmax / 127.5 (per tensor)
- ``nf4`` / ``fp4`` Delta = absmax_block * mean spacing of the code values (NF4: 2/15); the codes
                    are not uniform, so this is the average bin width of each block of 64
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from tightrope.compress import primitives as P
from tightrope.compress.api import CompressionConfig, select_modules
from tightrope.errors import TightropeError

STEP_SCHEMES = ("llm-int8", "int8", "int8-tensor", "nf4", "fp4")


def quantization_step(w: torch.Tensor, scheme: str = "llm-int8", blocksize: int = 64) -> torch.Tensor:
    """The rounding-bin width Delta of each weight under ``scheme``, with ``w``'s shape (fp32)."""
    w = w.detach().float()
    if scheme == "llm-int8":
        return (w.abs().amax(dim=1, keepdim=True) / 127.0).expand_as(w)
    if scheme == "int8":
        return (w.abs().amax(dim=1, keepdim=True) / 127.5).expand_as(w)
    if scheme == "int8-tensor":
        return (w.abs().amax() / 127.5).expand_as(w)
    if scheme in P.CODES_4BIT:
        code = torch.unique(P.CODES_4BIT[scheme])  # sorted, FP4's two zeros merged
        spacing = float((code[-1] - code[0]) / (len(code) - 1))
        _, absmax = P.quantize_blockwise(w, P.CODES_4BIT[scheme], blocksize)
        return (absmax.repeat_interleave(blocksize)[: w.numel()] * spacing).reshape(w.shape)
    raise TightropeError(f"Unknown quantization scheme '{scheme}' for a relative sigma; use one of {', '.join(STEP_SCHEMES)}.")


@dataclass(frozen=True)
class NoiseSummary:
    """What :func:`add_weight_noise_` did."""

    sigma: float
    relative: bool
    scheme: str | None  # the quantization step sigma is relative to (None when absolute)
    seed: int
    modules: list[str]
    weights: int  # number of weights perturbed
    mean_abs_change: float  # mean |noise| over those weights
    mean_sigma: float  # mean per-weight standard deviation actually used

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def add_weight_noise_(model: nn.Module, sigma: float, relative: bool = False, seed: int = 0, *,
                      scheme: str = "llm-int8", include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> NoiseSummary:
    """Add N(0, sigma_l^2) noise to every selected Linear weight, in place, before quantization.

    ``sigma_l = sigma`` (absolute) or ``sigma * Delta`` with Delta the weight's quantization step
    under ``scheme`` (:func:`quantization_step`). Layers are chosen as by the compress API (all
    encoder / decoder Linear layers, head and pooler excluded, unless ``include`` says otherwise).
    One generator seeded with ``seed`` draws the noise layer after layer, so a seed reproduces it.
    """
    if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise TightropeError(f"sigma must be a positive number, got {sigma}.")
    if sigma == 0:
        raise TightropeError("sigma is 0, so the noise would leave every weight unchanged; use a positive sigma "
                             "(1e-3 absolute is the value of Egashira et al. 2024).")
    if relative and scheme not in STEP_SCHEMES:
        raise TightropeError(f"Unknown quantization scheme '{scheme}' for a relative sigma; use one of {', '.join(STEP_SCHEMES)}.")
    modules = select_modules(model, CompressionConfig(include=tuple(include), exclude=tuple(exclude)))
    generator = torch.Generator().manual_seed(seed)
    count, change, sigma_sum = 0, 0.0, 0.0
    for module in modules.values():
        w = module.weight
        std = sigma * quantization_step(w, scheme) if relative else torch.full(w.shape, float(sigma))
        noise = torch.randn(w.shape, generator=generator) * std  # (out, in), drawn on the CPU for reproducibility
        w.add_(noise.to(device=w.device, dtype=w.dtype))
        count += w.numel()
        change += float(noise.abs().sum())
        sigma_sum += float(std.sum())
    return NoiseSummary(sigma=float(sigma), relative=relative, scheme=scheme if relative else None, seed=seed,
                        modules=list(modules), weights=count, mean_abs_change=change / count,
                        mean_sigma=sigma_sum / count)
