"""One validated description of a defense, shared by the CLI (``tightrope harden``) and study files.

``DefenseConfig(kind="pgd", epsilon=0.02, teacher="runs/bert-imdb", a=0.5)`` names everything a
training run needs; :func:`build_objective` turns it into the objective ``(model, batch) -> loss``
that :func:`tightrope.train.train` takes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tightrope.defenses.adversarial import DEFENSES, Criterion, cross_entropy
from tightrope.errors import TightropeError


class DefenseConfig(BaseModel):
    """A defense for training: adversarial kind, its attack, distillation, fake quantization."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["none", "pgd", "fast", "freelb"] = "none"
    epsilon: float = Field(default=0.02, ge=0)  # 0 is refused with a sentence by the attack itself
    steps: int = Field(default=3, ge=1)  # PGD-K / FreeLB ascent steps (fast: always 1)
    step_size: float | None = Field(default=None, gt=0)
    norm: Literal["linf", "l2"] = "linf"
    mix: float = Field(default=1.0, ge=0, le=1)  # share of the loss on adversarial examples
    init_magnitude: float = Field(default=0.1, ge=0)  # FreeLB only
    teacher: str | None = None  # a fine-tuned classifier: directory, alias or hub id
    a: float = Field(default=0.5, ge=0, le=1)  # weight of CE in a*CE + (1-a)*KD
    temperature: float = Field(default=2.0, gt=0)
    fake_quant: str | None = None  # a scheme of tightrope.defenses.fakequant (QAT)


class Supervised:
    """Plain training with a criterion (cross-entropy or distillation): the 'none' defense."""

    name = "none"

    def __init__(self, criterion: Criterion | None = None):
        self.criterion = criterion or cross_entropy

    def __call__(self, model, batch):
        return self.criterion(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)

    def describe(self) -> dict:
        return {"defense": "none", "criterion": getattr(self.criterion, "__name__", type(self.criterion).__name__)}


def build_objective(config: DefenseConfig, *, student_labels: list[str] | None = None, student_tokenizer=None):
    """The training objective that ``config`` describes (loads the teacher, if any)."""
    criterion: Criterion = cross_entropy
    if config.teacher is not None:
        from tightrope import inference  # noqa: PLC0415
        from tightrope.defenses.distill import Distillation  # noqa: PLC0415

        teacher = inference.load(config.teacher)
        criterion = Distillation(teacher, a=config.a, temperature=config.temperature, student_labels=student_labels,
                                 student_tokenizer=student_tokenizer)
    elif config.a != 0.5 or config.temperature != 2.0:
        raise TightropeError("a and temperature weigh the distillation loss, which needs a --teacher.")
    if config.kind == "none":
        objective = Supervised(criterion)
    elif config.kind == "fast":
        objective = DEFENSES["fast"](epsilon=config.epsilon, step_size=config.step_size, norm=config.norm,
                                     mix=config.mix, criterion=criterion)
    elif config.kind == "freelb":
        if config.mix != 1.0:
            raise TightropeError("FreeLB averages the loss over its own ascent steps; it takes no mix ratio.")
        objective = DEFENSES["freelb"](epsilon=config.epsilon, steps=config.steps,
                                       step_size=config.step_size or 0.1, init_magnitude=config.init_magnitude,
                                       norm=config.norm, criterion=criterion)
    else:
        objective = DEFENSES["pgd"](epsilon=config.epsilon, steps=config.steps, step_size=config.step_size,
                                    norm=config.norm, mix=config.mix, criterion=criterion)
    if config.fake_quant is not None:
        from tightrope.defenses.fakequant import QuantAware  # noqa: PLC0415

        objective = QuantAware(objective, scheme=config.fake_quant)
    return objective


__all__ = ["DefenseConfig", "Supervised", "build_objective"]
