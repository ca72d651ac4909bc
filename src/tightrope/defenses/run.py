"""Fine-tune with a defense, woven into pruning and quantization: what ``tightrope train --defense``
runs. Two calls, so that a front can show the warnings of the first before the long second one::

    loaded, objective = prepare(train_config, DefenseConfig(kind="fast", epsilon=0.02, teacher="runs/mpnet-imdb"))
    result = harden(loaded, objective, train_config, defense, "runs/hardened", order="prune,train,quantize",
                    prune_sparsity=0.3, quantize="int8")

Where the model goes: with the order ``train`` alone, the model directory is ``out`` itself (as a
plain ``tightrope train``); with more steps, ``out/model`` holds the model that ships (hardened
fp32 weights; a quantize step is recorded as pending and applied with the same config at export),
``out/train`` the training run and ``out/pipeline.json`` the record of every step. The card keeps
the training run's tokenization (max length and truncation), so evaluation reads the texts as
training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tightrope import models
from tightrope.compress.formats import load_trainable, pruning_card
from tightrope.compress.prune import MagnitudePruning
from tightrope.compress.specs import QUANT_SCHEMES, quant_config
from tightrope.data import load_task
from tightrope.defenses.config import build_objective, check_fields
from tightrope.defenses.pipeline import parse_order, run_pipeline, scheme_for
from tightrope.errors import TightropeError
from tightrope.evaluate.results import write_json_atomic
from tightrope.inference import transform_card, transform_files
from tightrope.train import input_transform_of, train

QUANT_CHOICES = tuple(QUANT_SCHEMES)  # the same names as tightrope compress (tightrope.compress.specs)


@dataclass(frozen=True)
class HardenResult:
    model_dir: Path
    card: dict
    pipeline: dict | None  # the pipeline record (None when the order is train alone)


def prepare(train_config, defense):
    """Load the student and build the defense's objective (a teacher's label set is checked here;
    a = 1 with a teacher warns). Returns ``(loaded, objective)``."""

    check_fields(defense)  # before loading anything: a stray setting fails at once
    labels = list(load_task(train_config.task, train_config.train_split, n=1, data_dir=train_config.data_dir).label_names)
    loaded = load_trainable(train_config.model, labels, trust_remote_code=train_config.trust_remote_code)
    objective = build_objective(defense, student_labels=labels, student_tokenizer=loaded.tokenizer,
                                max_length=train_config.max_length, truncation=train_config.truncation)
    return loaded, objective


def harden(loaded, objective, train_config, defense, out: str | Path, *, order: str = "train",
           prune_sparsity: float | None = None, quantize: str | None = None, noise_sigma: float | None = None,
           noise_relative: bool = False, progress: bool = True) -> HardenResult:
    """Run the steps of ``order`` (see :mod:`tightrope.defenses.pipeline`) and save the model."""

    out = Path(out)
    steps = parse_order(order)
    describe = getattr(objective, "describe", None)
    defense_card = {**defense.model_dump(), "objective": describe() if callable(describe) else None}
    if noise_sigma is None and noise_relative:
        raise TightropeError("--noise-relative scales a weight noise, which needs --noise-sigma.")
    if steps == ("train",) and prune_sparsity is None and quantize is None and noise_sigma is None:
        card = train(train_config, out, objective=objective, initial_model=loaded, progress=progress,
                     extra_card={"defense": defense_card, "pipeline": ["train"], **pruning_card(loaded.model)})
        return HardenResult(out, card, None)

    noise = None
    if noise_sigma is not None:
        noise = {"sigma": noise_sigma, "relative": noise_relative, "seed": train_config.seed}
        if noise_relative and quantize:
            noise["scheme"] = scheme_for(quant_config(quantize))
    result = run_pipeline(
        loaded, steps, out,
        train_config=train_config if "train" in steps else None,
        objective=objective,
        prune=MagnitudePruning(sparsity=prune_sparsity) if prune_sparsity is not None else None,
        quantize=quant_config(quantize) if quantize else None,
        noise=noise, progress=progress, export=False,
    )
    trained = result.train_card or {}
    card = {key: trained[key] for key in ("config", "base_model", "data", "metrics", "history", "steps",
                                          "train_seconds", "environment", "before_training") if key in trained}
    card.update({"kind": "tightrope.model", "created_by": "tightrope train --defense", "pipeline": result.to_dict(),
                 "defense": defense_card,
                 "tokenization": {"max_length": train_config.max_length, "truncation": train_config.truncation},
                 **pruning_card(loaded.model)})

    transform = input_transform_of(objective)  # an input defense (canonical) is part of the model that ships
    card.update(transform_card(transform))
    model_dir = models.save_model(loaded, out / "model", extra={**transform_files(transform), "card.json": card})
    write_json_atomic(out / "pipeline.json", result.to_dict())
    return HardenResult(model_dir, card, result.to_dict())


__all__ = ["HardenResult", "QUANT_CHOICES", "harden", "prepare", "quant_config"]
