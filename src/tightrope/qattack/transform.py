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
``BOXLESS_PRUNINGS`` are the defaults), and GPTQ, ``gptq:BITS`` (:class:`GPTQTransform`; ``gptq:4`` is a default).

**Boxless transforms.** SparseGPT and GPTQ update the weights they keep from the error of the ones they remove or
round (the OBS update), so no interval per weight keeps their result: they have no boxes, and the audit judges them
by behaviour and the trigger search (a classifier's, against the null; a causal LM's audit leaves them out unless
named).
:func:`canonical` maps a spelling to its name, or refuses it in one sentence with the closest name.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from torch import nn

from tightrope.compress import gguf as G
from tightrope.compress.api import compress_, select_modules
from tightrope.compress.quant import GPTQ
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
from tightrope.qattack.pruning import BOXLESS_PRUNINGS, PRUNINGS, Calibration, Pruning, tokenizer_on
from tightrope.qattack.quantize import codes_equal, missing_library, quantized_copy
from tightrope.qattack.search import supports, twin

#: GPTQ as the audit takes it by default: 4 bits, groups of 128 (``tightrope compress --quantize gptq:bits=4``).
GPTQ_TRANSFORMS = ("gptq:4",)
#: Transforms without boxes (module docstring): judged by behaviour and the search; left out of a causal LM's default.
BOXLESS = (*BOXLESS_PRUNINGS, *GPTQ_TRANSFORMS)
#: Every transform tightrope implements by its name (the audit's default, with the quantizers' intersection "all").
TRANSFORMS = (*ATTACK_QUANTIZERS, *PRUNINGS, *BOXLESS)
#: Spellings a user may type, for the did-you-mean of a misspelt one.
SPELLINGS = (*CHOICES, *(f"gguf:{t}" for t in G.TYPES), *PRUNINGS, *BOXLESS)


def canonical(name: str) -> str:
    """The one name of the transform ``name`` spells (``gguf:Q4_0`` -> ``gguf-q4_0``, ``prune:magnitude:.5`` ->
    ``prune:magnitude:0.5``); anything else is one sentence with the closest spelling."""
    text = str(name).strip()
    low = text.lower()
    if low.startswith("prune:"):
        return Pruning.parse(low).name
    if low.startswith("gptq"):
        return GPTQTransform.parse(low).name
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
                         f"gguf:Q5_K_S), prune:magnitude:SPARSITY, prune:wanda:SPARSITY, prune:sparsegpt:SPARSITY, prune:N:M or gptq:BITS.")


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

    @property
    def twin_is_copy(self) -> bool:
        """A preset's twin is its quantized copy (the audit reuses it); other quantizers have a reference twin."""
        return self.name in PRESET_QUANTIZERS

    def boxes(self, model: nn.Module, *, margin: float = 0.0, include: tuple[str, ...] = (),
              exclude: tuple[str, ...] = ()) -> ModelBoxes:
        return model_boxes(model, self.name, margin=margin, include=include, exclude=exclude)

    def mismatch(self, a: nn.Module, b: nn.Module, names: list[str] | None = None) -> tuple[int, int]:
        return codes_equal(a, b, self.name, names)

    def settle_(self, model: nn.Module, reference: nn.Module, margin: float = 0.0) -> int:
        return 0  # the projection into a quantizer's boxes is exact


@dataclass(frozen=True)
class GPTQTransform:
    """GPTQ (Frantar et al. 2022, Algorithm 1) at ``bits`` as a transform: tightrope's own
    :class:`tightrope.compress.quant.GPTQ` (groups of 128, block by block), calibrated as ``tightrope compress
    --quantize gptq:bits=B --calibration SOURCE`` would be. It rounds each column and moves the columns not yet
    rounded to make up for the error, so no box per weight keeps its codes (module docstring): the audit judges its
    behaviour and runs the trigger search through the quantized copy (dequantized in every product, so
    differentiable in its inputs); the attacks refuse it in one sentence."""

    bits: int = 4
    calibration: Calibration | None = field(default=None, compare=False)
    boxless = True
    differentiable = True

    @classmethod
    def parse(cls, name: str, calibration: Calibration | None = None) -> GPTQTransform:
        match = re.fullmatch(r"gptq[:\-](\d+)", name.strip().lower())
        if not match or int(match.group(1)) not in (2, 3, 4, 8):
            raise TightropeError(f"Unknown transform '{name}'; GPTQ is spelled gptq:BITS with 2, 3, 4 or 8 bits, "
                                 "like gptq:4.")
        return cls(int(match.group(1)), calibration)

    @property
    def name(self) -> str:
        return f"gptq:{self.bits}"

    def missing(self) -> str | None:
        if self.calibration is None or self.calibration.tokenizer is None:
            return f"{self.name} needs calibration texts and the model's tokenizer (GPTQ reads the inputs' Hessian), and has neither."
        return None

    def config(self, group_size: int | None = 128):
        reason = self.missing()
        if reason:
            raise TightropeError(reason)
        cal = self.calibration
        return GPTQ(bits=self.bits, group_size=group_size, calibration_texts=cal.source, n_calibration=cal.n,
                    max_length=cal.max_length)

    def apply(self, model: nn.Module) -> nn.Module:
        """A GPTQ-quantized deep copy, made by :func:`tightrope.compress.compress_` (the user's code path): groups of
        128 inputs, or one grid per row where 128 does not divide a layer's input width (as a user would choose)."""
        clone = copy.deepcopy(model).float().cpu().eval()
        config = self.config()
        if any(m.in_features % 128 for m in select_modules(clone, config).values()):
            config = self.config(group_size=None)
        with tokenizer_on(clone, self.calibration.tokenizer if self.calibration else None):
            compress_(clone, config)
        return clone

    twin = apply
    twin_is_copy = True  # the audit's search reuses the quantized copy

    def boxes(self, model: nn.Module, **_options) -> ModelBoxes:
        raise TightropeError(f"{self.name} moves the weights it has not rounded yet to make up for the error (the OBS "
                             "update), so no box per weight keeps its codes: the audit judges its behaviour only.")

    keep_boxes = proxy_boxes = boxes

    def mismatch(self, a: nn.Module, b: nn.Module, names: list[str] | None = None) -> tuple[int, int]:
        return self.boxes(a)

    def settle_(self, model: nn.Module, reference: nn.Module, margin: float = 0.0) -> int:
        return 0


Transform = Quantization | Pruning | GPTQTransform


def resolve(name: str, calibration: Calibration | None = None) -> Transform:
    """The transform ``name`` spells; ``calibration`` is what Wanda, SparseGPT and GPTQ read (ignored by the others)."""
    name = canonical(name)
    if name.startswith("gptq:"):
        return GPTQTransform.parse(name, calibration)
    return Pruning.parse(name, calibration) if is_pruning(name) else Quantization(name)
