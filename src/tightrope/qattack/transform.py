"""What a user does to a checkpoint after downloading it, as the attacks and the audit see it: a *transform*.

A transform is a quantizer (bitsandbytes, torch.ao, a GGUF block type) or a pruning
(:mod:`tightrope.qattack.pruning`). (Not :mod:`tightrope.transforms`, the input transforms of a defended model:
those rewrite texts, these rewrite weights.) Every transform answers the same questions, so the attack
scenarios and the audit are written once:

- ``missing()``: why it cannot run here (a library not installed, Wanda without calibration), or None;
- ``apply(model)``: the transformed copy, made by the real code path (the library's kernels, or tightrope's own
  pruner through :func:`tightrope.compress.compress_`);
- ``twin(model)``: a differentiable copy for the trigger search (a quantizer's reference quantize-dequantize;
  a pruning's pruned copy itself);
- ``boxes(model, ...)``: per weight, the interval that keeps the transformed model unchanged (a quantizer's
  codes, a pruning's mask), for the projected repair and for the audit's box positions;
- ``mismatch(a, b, names)``: how many codes (quantizers) or mask entries (prunings) differ between two models;
- ``settle_(model, reference)``: make the constraint exact after training (a no-op for quantizers, whose
  projection is exact; a few re-projections for Wanda, whose boxes move with the activations).

**Names** (one per transform, the same for ``tightrope qattack`` and ``tightrope audit``): the quantizers of
:data:`tightrope.qattack.boxes.CHOICES` (``llm-int8``, ``nf4``, ``fp4``, ``int8-tensor``, ``all``, ``gguf-q4_0`` ...;
a GGUF type may also be spelled as llama.cpp does, ``gguf:Q4_0``; a llama-quantize preset, ``gguf:Q4_K_M``, mixes
types per layer as llama.cpp does) and the prunings ``prune:magnitude:S``,
``prune:wanda:S``, ``prune:N:M`` and ``prune:sparsegpt:S`` (:data:`tightrope.qattack.pruning.PRUNINGS` and
``BOXLESS_PRUNINGS`` are the defaults).
:func:`canonical` maps a spelling to its name, or refuses it in one sentence with the closest name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tightrope.compress import gguf as G
from tightrope.errors import TightropeError, did_you_mean
from tightrope.qattack.boxes import (
    ALL_MEMBERS,
    ATTACK_QUANTIZERS,
    CHOICES,
    PRESET_QUANTIZERS,
    QUANTIZERS,
    RENAMED,
    ModelBoxes,
    check_quantizer,
    model_boxes,
)
from tightrope.qattack.pruning import BOXLESS_PRUNINGS, PRUNINGS, Calibration, Pruning
from tightrope.qattack.quantize import codes_equal, missing_library, quantized_copy
from tightrope.qattack.search import supports, twin

#: Every transform tightrope implements by its name (the audit's default, with the quantizers' intersection "all").
TRANSFORMS = (*ATTACK_QUANTIZERS, *PRUNINGS, *BOXLESS_PRUNINGS)
#: Spellings a user may type, for the did-you-mean of a misspelt one.
SPELLINGS = (*CHOICES, *(f"gguf:{t}" for t in G.TYPES), *PRUNINGS, *BOXLESS_PRUNINGS)


def canonical(name: str) -> str:
    """The one name of the transform ``name`` spells (``gguf:Q4_0`` -> ``gguf-q4_0``, ``prune:magnitude:.5`` ->
    ``prune:magnitude:0.5``); anything else is one sentence with the closest spelling."""
    text = str(name).strip()
    low = text.lower()
    if low.startswith("prune:"):
        return Pruning.parse(low).name
    preset = f"gguf-{low.removeprefix('gguf:').removeprefix('gguf-')}"
    if low.startswith(("gguf:", "gguf-")) and preset in PRESET_QUANTIZERS:
        return preset
    if low.startswith("gguf:") or (low.startswith("gguf-") and low not in CHOICES):
        return G.block_type(text).scheme  # one sentence for a k-quant or an unknown type
    if low in CHOICES:
        return low
    if low.startswith(("q4", "q5", "q8")):
        raise TightropeError(f"Unknown transform '{text}'; a GGUF type is spelled gguf:{text.upper()} "
                             f"(types: {', '.join(G.TYPES)}).")
    if low in RENAMED:
        check_quantizer(low)  # an old spelling, refused with its new name
    raise TightropeError(f"Unknown transform '{text}'{did_you_mean(low, SPELLINGS)}; choose one of {', '.join((*QUANTIZERS, 'all'))}, "
                         f"gguf:TYPE ({', '.join(G.TYPES)}), a llama-quantize preset (gguf:Q4_K_M, gguf:Q4_K_S, gguf:Q5_K_M, "
                         f"gguf:Q5_K_S) or prune:magnitude:SPARSITY, prune:wanda:SPARSITY, prune:sparsegpt:SPARSITY, prune:N:M.")


def is_pruning(name: str) -> bool:
    return str(name).strip().lower().startswith("prune:")


@dataclass(frozen=True)
class Quantization:
    """A quantizer of :data:`tightrope.qattack.boxes.CHOICES` as a transform (module docstring)."""

    name: str

    @property
    def differentiable(self) -> bool:
        # a reference quantize-dequantize exists; a preset's twin is its quantized copy (fixed weights)
        return supports(self.name) or self.name in PRESET_QUANTIZERS

    def missing(self) -> str | None:
        members = ALL_MEMBERS if self.name == "all" else (self.name,)
        return next((r for r in (missing_library(m) for m in members) if r), None)

    def apply(self, model: nn.Module) -> nn.Module:
        return quantized_copy(model, self.name)

    def twin(self, model: nn.Module) -> nn.Module:
        return quantized_copy(model, self.name) if self.name in PRESET_QUANTIZERS else twin(model, self.name)

    def boxes(self, model: nn.Module, *, margin: float = 0.0, include: tuple[str, ...] = (),
              exclude: tuple[str, ...] = ()) -> ModelBoxes:
        return model_boxes(model, self.name, margin=margin, include=include, exclude=exclude)

    def mismatch(self, a: nn.Module, b: nn.Module, names: list[str] | None = None) -> tuple[int, int]:
        return codes_equal(a, b, self.name, names)

    def settle_(self, model: nn.Module, reference: nn.Module, margin: float = 0.0) -> int:
        return 0  # the projection into a quantizer's boxes is exact


Transform = Quantization | Pruning


def resolve(name: str, calibration: Calibration | None = None) -> Transform:
    """The transform ``name`` spells; ``calibration`` is what a Wanda pruning reads (ignored by the others)."""
    name = canonical(name)
    return Pruning.parse(name, calibration) if is_pruning(name) else Quantization(name)
