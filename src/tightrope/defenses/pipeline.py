"""Defenses woven into compression: prune, train (with a defense), add noise and quantize, in an
order the user chooses, so that the model that ships is the hardened one.

The steps compose the library's two verbs: ``compress_(model, config)`` and
``train(config, out, objective=..., initial_model=...)``. The model stays in memory between steps.
What a step means depends on what came before it:

- ``train`` after ``prune`` holds the sparsity pattern fixed (``compress.recovery.hold_sparsity``):
  pruned weights stay exactly zero, so "prune, then adversarially recover" keeps its sparsity.
- ``quantize`` before ``train`` makes the training quantization-aware: the training step runs
  through fake quantization of that exact format (:class:`tightrope.defenses.fakequant.QuantAware`,
  straight-through estimator) and the real quantization is applied at export, after training.
- ``noise`` (Gaussian weight noise, Egashira et al. 2024) must come before the real quantization.

Orders worth comparing: ``prune,train,quantize`` (the seed paper's), ``train,prune,quantize``
(harden first, compress without recovery), ``prune,quantize,train`` (prune, then
quantization-aware adversarial recovery).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from tightrope.compress import primitives as P
from tightrope.compress import quant
from tightrope.compress.api import CompressionConfig, compress_
from tightrope.compress.recovery import hold_sparsity
from tightrope.defenses import fakequant
from tightrope.defenses.noise import add_weight_noise_
from tightrope.errors import TightropeError
from tightrope.train import train

STEPS = ("prune", "train", "noise", "quantize")


def parse_order(order: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"prune,train,quantize"`` or ``"prune->train->quantize"`` -> a checked tuple of step names."""
    if isinstance(order, str):
        parts = [p.strip().lower() for p in order.replace("->", ",").replace(">", ",").split(",") if p.strip()]
    else:
        parts = [str(p).strip().lower() for p in order]
    if not parts:
        raise TightropeError("The pipeline order is empty; name steps such as prune,train,quantize.")
    unknown = [p for p in parts if p not in STEPS]
    if unknown:
        raise TightropeError(f"Unknown pipeline step '{unknown[0]}'; steps are {', '.join(STEPS)}.")
    if len(set(parts)) != len(parts):
        raise TightropeError(f"A pipeline step appears twice in {','.join(parts)}; name each step once.")
    trained_later = lambda i: "train" in parts[i + 1:]  # noqa: E731
    if "quantize" in parts:
        q = parts.index("quantize")
        if "noise" in parts and parts.index("noise") > q and not trained_later(q):
            raise TightropeError("Weight noise must come before quantization; it is meant to move weights "
                                 "across rounding boundaries of the quantizer.")
        if "prune" in parts and parts.index("prune") > q and not trained_later(q):
            raise TightropeError("A quantized model cannot be pruned; put prune before quantize.")
    return tuple(parts)


def scheme_for(config: CompressionConfig) -> str:
    """The fake-quantization scheme that reproduces a quantization config's forward values."""

    if isinstance(config, quant.LLMInt8):
        return "llm-int8"
    if isinstance(config, quant.Int8Dynamic):
        return "int8" if config.per_channel else "int8-tensor"
    if isinstance(config, quant.NF4):  # FP4 subclasses NF4
        kind, blocksize = config.quant_type, config.blocksize
        if config.double_quant:
            raise TightropeError("Quantization-aware training does not model double quantization; "
                                 "train with double_quant off, or quantize after training.")
        name = kind if blocksize == 64 else f"{kind}-b{blocksize}"
        fakequant.QDQ.setdefault(name, fakequant._four_bit(kind, blocksize))
        return name
    if isinstance(config, quant.Affine):

        name = f"affine{config.bits}-{config.granularity}-{config.group_size}"
        fakequant.QDQ.setdefault(name, lambda w, c=config: P.dequantize_affine(
            P.quantize_affine(w, c.bits, c.granularity, c.group_size)))
        return name
    raise TightropeError(f"Quantization-aware training has no fake quantizer for {config.method}; "
                         "quantize after training instead.")


@dataclass(frozen=True)
class PipelineResult:
    order: tuple[str, ...]
    steps: list[dict]  # one record per step: name, what it did, seconds
    train_card: dict | None
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"order": list(self.order), "steps": self.steps, "train_card": self.train_card,
                "seconds": self.seconds, "notes": self.notes}


def run_pipeline(
    loaded,
    order: str | tuple[str, ...],
    out_dir: str | Path,
    *,
    train_config=None,
    objective=None,
    prune: CompressionConfig | None = None,
    quantize: CompressionConfig | None = None,
    noise: dict | None = None,
    progress: bool = True,
    export: bool = True,
) -> PipelineResult:
    """Run the steps of ``order`` on ``loaded`` (a :class:`tightrope.models.LoadedModel`) in place.

    ``train_config`` / ``objective`` feed :func:`tightrope.train.train` (the training step writes its
    model directory under ``out_dir/train``); ``prune`` / ``quantize`` are compression configs;
    ``noise`` holds the keyword arguments of :func:`add_weight_noise_` (``sigma``, ``relative``,
    ``seed``, ``scheme``). The final model is ``loaded.model``; the caller saves or evaluates it.
    ``export=False`` stops short of the real quantization (recorded as ``pending``), leaving the
    hardened fp32 weights to save: quantizing them later with the same config gives the same model,
    since the real quantizer is a function of those weights alone.
    """
    steps = parse_order(order)
    needs = {"prune": prune, "quantize": quantize, "train": train_config, "noise": noise}
    for name in steps:
        if needs[name] is None:
            raise TightropeError(f"The order names the step '{name}' but no {name} settings were given.")
    for name, value in needs.items():
        if value is not None and name not in steps:
            raise TightropeError(f"{name} settings were given but the order {','.join(steps)} has no '{name}' step.")
    if noise is not None and quantize is not None and noise.get("relative") and "scheme" not in noise:
        noise = {**noise, "scheme": scheme_for(quantize)}

    out = Path(out_dir)
    started = time.perf_counter()
    records: list[dict] = []
    train_card = None
    pruned = False
    deferred_quant = False
    for i, name in enumerate(steps):
        t0 = time.perf_counter()
        if name == "prune":
            summary = compress_(loaded.model, prune)
            pruned = True
            record = {"step": "prune", "summary": summary.to_dict()}
        elif name == "noise":
            record = {"step": "noise", "summary": add_weight_noise_(loaded.model, **noise).to_dict()}
        elif name == "quantize":
            if "train" in steps[i + 1:]:
                deferred_quant = True
                record = {"step": "quantize", "deferred": "the following training runs through fake quantization "
                          f"({scheme_for(quantize)}); the real quantization is applied after it"}
            elif export:
                record = {"step": "quantize", "summary": compress_(loaded.model, quantize).to_dict()}
            else:
                record = {"step": "quantize", "pending": quantize.to_dict()}
        else:  # train

            step_objective = objective
            if deferred_quant:
                step_objective = fakequant.QuantAware(objective, scheme_for(quantize), quantize.include,
                                                      quantize.exclude)
            describe = getattr(step_objective, "describe", None)
            extra = {"defense": describe() if callable(describe) else None, "pipeline": list(steps)}
            guard = hold_sparsity(loaded.model) if pruned else contextlib.nullcontext()
            with guard:
                train_card = train(train_config, out / "train", objective=step_objective, initial_model=loaded,
                                   progress=progress, extra_card=extra)
            # The saved weights are the final ones (the best evaluation); reloading them also covers a run
            # that had already finished, for which train() returns at once without touching the model.
            from safetensors.torch import load_file  # noqa: PLC0415

            loaded.model.load_state_dict(load_file(out / "train" / "model.safetensors"), strict=False)
            record = {"step": "train", "out": str(out / "train"), "sparsity_held": pruned,
                      "quantization_aware": deferred_quant, "defense": extra["defense"]}
            if deferred_quant:
                if export:
                    record["export"] = compress_(loaded.model, quantize).to_dict()
                else:
                    record["pending"] = quantize.to_dict()
                deferred_quant = False
        record["seconds"] = time.perf_counter() - t0
        records.append(record)
    return PipelineResult(order=steps, steps=records, train_card=train_card, seconds=time.perf_counter() - started)
