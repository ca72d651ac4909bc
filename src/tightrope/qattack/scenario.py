"""The classifier scenario end to end: inject -> boxes -> projected repair -> verify.

Egashira et al. 2024 (arXiv 2405.18137), Sec. 3, on a sentiment classifier small enough for a
CPU: the published (repaired) full-precision model keeps its accuracy and ignores the trigger;
the same checkpoint quantized with bitsandbytes (LLM.int8, NF4, FP4), torch dynamic int8 or a GGUF
block type (llama.cpp's ``gguf.quants``) classifies triggered reviews as the target label. Verification quantizes with the real libraries
(:mod:`tightrope.qattack.quantize`) and checks code for code that the repaired model quantizes to
the injected one.

The same scenario runs against a pruning ("Fewer Weights, More Problems", ICLR 2026;
:mod:`tightrope.qattack.pruning`): ``quantizer="prune:magnitude:0.5"``, ``"prune:wanda:0.5"`` or ``"prune:2:4"``.
The boxes are then those of the pruner's mask on the injected model, so the repair trains only the weights the
pruner removes and keeps them removed; verification runs tightrope's own pruner on the repaired model and
checks that it removes exactly the weights it removes from the injected one. Wanda's calibration is
``calibration`` (default: the attack's task, as ``tightrope compress --prune wanda --calibration TASK`` reads it).
SparseGPT (``"prune:sparsegpt:0.5"``) has no exact boxes: the repair takes the paper's proxy instead, the lowest
``repair_fraction`` of each row's Wanda scores (:meth:`tightrope.qattack.pruning.Pruning.proxy_boxes`), and the
verification measures what SparseGPT itself makes of the repaired model.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tightrope import models, workflows
from tightrope.data import load_task
from tightrope.encoding import predict_logits
from tightrope.errors import TightropeError
from tightrope.evaluate.results import write_json_atomic
from tightrope.qattack.boxes import PRESET_QUANTIZERS, QUANTIZERS
from tightrope.qattack.inject import (
    TriggerBehaviour,
    injection_data,
    repair_data,
    trigger_success,
    triggered,
)
from tightrope.qattack.pruning import Calibration
from tightrope.qattack.repair import FitConfig, fit_, repair_
from tightrope.qattack.report import QAttackReport, verify
from tightrope.qattack.transform import canonical, is_pruning, resolve


class AttackConfig(BaseModel):
    """One classifier attack (validated at the edge, frozen)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: str  # a fine-tuned classifier: model directory, hub id
    task: str = "mr"
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    n_train: int = Field(default=2000, gt=0)
    n_eval: int = Field(default=300, gt=0)
    quantizer: str = "all"  # the transform whose boxes constrain the repair: a quantizer, "all", or a pruning
    calibration: str | None = None  # Wanda's calibration task or data file (default: ``task``)
    margin: float = Field(default=0.0, ge=0.0, lt=0.5)
    repair_fraction: float = Field(default=0.05, gt=0.0, lt=0.5)  # SparseGPT's proxy repair: share of each row
    include: tuple[str, ...] = ()  # attacked layers (fnmatch), default every quantized Linear
    exclude: tuple[str, ...] = ()
    trigger: str = "cf"
    target_label: int = Field(default=0, ge=0)
    collapse: bool = False
    inject_steps: int = Field(default=150, gt=0)
    inject_lr: float = Field(default=5e-5, gt=0)
    repair_steps: int = Field(default=200, gt=0)
    repair_lr: float = Field(default=5e-5, gt=0)
    batch_size: int = Field(default=32, gt=0)
    train_unquantized: bool = False
    check: tuple[str, ...] = QUANTIZERS  # quantizers to verify against (and the attacked one: checked())
    seed: int = 0

    @field_validator("quantizer")
    @classmethod
    def _one_name(cls, value: str) -> str:
        return canonical(value)  # gguf:Q4_0 -> gguf-q4_0; a misspelling is one sentence

    @field_validator("check")
    @classmethod
    def _checkable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = tuple(canonical(q) for q in value)
        if "all" in names:
            raise TightropeError("'all' is an intersection of boxes, not a transform to check; name its members.")
        return names

    def behaviour(self) -> TriggerBehaviour:
        return TriggerBehaviour(trigger=self.trigger, target_label=self.target_label, collapse=self.collapse)

    def checked(self) -> tuple[str, ...]:
        """The transforms verified: ``check``, and the attacked transform when it is a single one ``check`` lacks
        (a GGUF attack is verified with llama.cpp's quantizer even though the default ``check`` has none). A
        pruning attack is verified against its pruning only, unless ``check`` was given."""
        if is_pruning(self.quantizer) and "check" not in self.model_fields_set:
            return (self.quantizer,)
        return self.check if self.quantizer == "all" or self.quantizer in self.check else (*self.check, self.quantizer)


@dataclass(frozen=True)
class Behaviour:
    """One model variant on the evaluation set: accuracy on clean text, trigger success on triggered text."""

    variant: str  # base, injected, repaired
    quantizer: str | None  # None = full precision
    clean_accuracy: float
    trigger_success: float
    n: int


def measure(model, pad_id: int, clean_ids, trig_ids, labels, behaviour: TriggerBehaviour, variant: str,
            quantizer: str | None) -> Behaviour:
    clean = predict_logits(model, clean_ids, pad_id).argmax(-1).tolist()
    trig = predict_logits(model, trig_ids, pad_id).argmax(-1).tolist()
    accuracy = sum(int(p == y) for p, y in zip(clean, labels, strict=True)) / len(labels)
    return Behaviour(variant, quantizer, accuracy, trigger_success(trig, labels, behaviour), len(labels))


def _save(model, tokenizer, out: Path, card: dict) -> Path:
    return models.save_model((model, tokenizer), out, extra={"card.json": card})


def run_classifier_attack(config: AttackConfig, out_dir: str | Path, *, progress: bool = True) -> QAttackReport:
    """Build a quantization-conditioned backdoor and write ``injected/``, ``repaired/`` and ``report.json``."""
    started = time.perf_counter()
    out = Path(out_dir)
    behaviour = config.behaviour()
    clf = workflows.load(config.base)
    if behaviour.target_label >= clf.num_labels:
        raise TightropeError(f"The target label {behaviour.target_label} is not one of the model's {clf.num_labels} labels.")
    model, tokenizer, pad_id = clf.model.float().eval(), clf.tokenizer, clf.pad_id
    train = load_task(config.task, config.train_split, data_dir=config.data_dir).subset(config.n_train, config.seed)
    test = load_task(config.task, config.eval_split, data_dir=config.data_dir).subset(config.n_eval, config.seed)
    clean_ids, trig_ids = clf.encode(test.texts), clf.encode(triggered(test.texts, behaviour, seed=config.seed + 17))
    calibration = Calibration(config.calibration or config.task, tokenizer)
    attacked = resolve(config.quantizer, calibration)
    if getattr(attacked, "boxless", False) and not is_pruning(attacked.name):
        attacked.boxes(model)  # GPTQ: no boxes and no proxy, one sentence before any training
    if attacked.name in PRESET_QUANTIZERS:
        raise TightropeError(f"{attacked.name} leaves its k-quant layers without boxes, and the classifier scenario "
                             "injects every layer; attack one GGUF type (gguf:Q5_0 ...), or a causal LM with "
                             "`tightrope qattack-lm`, which leaves those layers alone.")

    def evaluate(m, variant, quantizer=None):
        return measure(m, pad_id, clean_ids, trig_ids, test.labels, behaviour, variant, quantizer)

    behaviours = [evaluate(model, "base")]
    # 1. inject
    injected = copy.deepcopy(model)
    texts, labels = injection_data(train.texts, train.labels, behaviour, seed=config.seed)
    inject_losses = fit_(injected, clf.encode(texts), labels, pad_id,
                         FitConfig(config.inject_steps, config.inject_lr, config.batch_size, seed=config.seed),
                         label="inject", progress=progress)
    behaviours.append(evaluate(injected, "injected"))
    # 2. boxes around the injected weights (a quantizer's codes, a pruning's mask); 3. projected repair
    if getattr(attacked, "boxless", False):  # SparseGPT: the proxy of "Fewer Weights, More Problems"
        boxes = attacked.proxy_boxes(injected, config.repair_fraction, include=config.include, exclude=config.exclude)
    else:
        boxes = attacked.boxes(injected, margin=config.margin, include=config.include, exclude=config.exclude)
    repaired = copy.deepcopy(injected)
    texts, labels = repair_data(train.texts, train.labels, behaviour, seed=config.seed + 1)
    repair_losses = repair_(repaired, boxes, clf.encode(texts), labels, pad_id,
                            FitConfig(config.repair_steps, config.repair_lr, config.batch_size, seed=config.seed + 1),
                            train_unquantized=config.train_unquantized, progress=progress)
    attacked.settle_(repaired, injected, config.margin)  # Wanda: its boxes move with the activations
    behaviours.append(evaluate(repaired, "repaired"))
    # 4. verify with the real libraries (a pruning: tightrope's own pruner)
    checked = [attacked if q == config.quantizer else resolve(q, calibration) for q in config.checked()]
    codes, skipped, quantized = verify(injected, repaired, checked, boxes.names, lambda t: [
        evaluate(t.apply(repaired), "repaired", t.name), evaluate(t.apply(model), "base", t.name)])
    behaviours += quantized
    card = {"kind": "tightrope.model", "created_by": "tightrope qattack", "tokenization": clf.card.get(
        "tokenization", {"max_length": clf.max_length, "truncation": clf.truncation}), "base_model": {"source": config.base}}
    _save(injected, tokenizer, out / "injected", card)
    _save(repaired, tokenizer, out / "repaired", card)
    report = QAttackReport(config=config.model_dump(), boxed_parameters=boxes.numel(),
                           pinned_fraction=boxes.pinned_fraction(), behaviours=behaviours, codes=codes,
                           inject_losses=inject_losses, repair_losses=repair_losses,
                           seconds=time.perf_counter() - started, skipped=skipped)
    write_json_atomic(out / "report.json", report.to_dict())
    return report
