"""Compress a saved model directory: load, prune, recover, quantize, save (``tightrope compress``)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from torch import nn

from tightrope import inference, workflows
from tightrope.compress import formats
from tightrope.compress.api import compress_
from tightrope.compress.recovery import (
    TEACHER_AUTO,
    Recovery,
    check_order,
    recover_classifier_,
    recovery_config,
    trained_task,
)
from tightrope.compress.specs import prune_config, quant_config
from tightrope.compress.wanda import set_tokenizer
from tightrope.defenses.distill import Distillation, label_permutation
from tightrope.errors import TightropeError
from tightrope.inference import TextClassifier
from tightrope.provenance import environment


def recovery_teacher(clf: TextClassifier, configs: list) -> TextClassifier | None:
    """The teacher of the configs' distilled recovery, resolved *before* pruning (None without one).

    ``auto`` is a frozen copy of ``clf`` as it is now; another name is loaded. A teacher whose
    tokenizer vocabulary or label set differs from ``clf``'s is refused in one sentence.
    """
    wanted = {c.teacher for c in configs if isinstance(c, Recovery) and c.teacher is not None}
    if not wanted:
        return None
    if len(wanted) > 1:
        raise TightropeError(f"One compression distils from one teacher, not {sorted(wanted)}.")
    name = wanted.pop()
    if name == TEACHER_AUTO:
        if not isinstance(clf.model, nn.Module):
            raise TightropeError(f"{clf.source} is not a PyTorch model, so it cannot teach its own recovery.")
        model = copy.deepcopy(clf.model)
        for attr in ("_tightrope_tokenizer", "_tightrope_compression"):
            model.__dict__.pop(attr, None)
        return TextClassifier(model, clf.tokenizer, max_length=clf.max_length, truncation=clf.truncation,
                              label_names=list(clf.label_names), source=f"{clf.source} (auto: before pruning)",
                              card=clf.card)
    teacher = inference.load(name)
    if not isinstance(getattr(teacher, "model", None), nn.Module):
        raise TightropeError(f"The teacher {name} is not a PyTorch model (format '{teacher.card.get('format')}'); "
                             "distil from an uncompressed model directory.")
    if teacher.tokenizer.get_vocab() != clf.tokenizer.get_vocab():
        raise TightropeError(f"The teacher {name} tokenizes with another vocabulary than {clf.source}; the "
                             "distilled recovery feeds both the same token ids, so the teacher needs the same tokenizer.")
    if len(teacher.label_names) != len(clf.label_names):
        raise TightropeError(f"The teacher {name} predicts {len(teacher.label_names)} labels but {clf.source} "
                             f"predicts {len(clf.label_names)}; a teacher must be fine-tuned on the same label set.")
    label_permutation(list(clf.label_names), list(teacher.label_names))  # same names in any order, or one sentence
    return teacher


def distillation(teacher: TextClassifier, config: Recovery, student: TextClassifier) -> Distillation:
    """The seed's a * CE + (1 - a) * KD for a recovery, the teacher frozen and reading the student's token ids."""
    a, temperature = config.weights
    return Distillation(teacher, a=a, temperature=temperature, student_labels=list(student.label_names) or None,
                        student_tokenizer=student.tokenizer, student_ids=True)


def run_steps(clf, configs: list, *, card: dict, work_dir: Path | None = None, identity=None,
              progress: bool = False, before=None) -> list:
    """Apply compression configs to ``clf.model`` in order; a :class:`Recovery` step fine-tunes the
    pruned model (distilled from its teacher, resolved before anything is pruned) and replaces it.

    ``card``: what the recovered model keeps of the source's card. ``work_dir``: where a recovery
    keeps its checkpoints (a killed run started again resumes). Returns the summaries. The CLI
    (:func:`compress_model`) and a study's compress step both run through here; ``before(config)``
    is called before each step (the study saves a quantized variant's full-precision twin there).
    """
    check_order(configs)
    teacher = recovery_teacher(clf, configs)
    summaries = []
    set_tokenizer(clf.model, clf.tokenizer)
    for config in configs:
        if before is not None:
            before(config)
        if isinstance(config, Recovery):
            criterion = distillation(teacher, config, clf) if config.distilled else None
            summaries.append(recover_classifier_(clf, config, card=card, criterion=criterion,
                                                 teacher_source=teacher.source if teacher is not None else None,
                                                 work_dir=work_dir, identity=identity, progress=progress))
            set_tokenizer(clf.model, clf.tokenizer)
        else:
            summaries.append(compress_(clf.model, config))
    return summaries


def recovery_card(config: Recovery, summary) -> dict:
    """The card's ``recovery`` entry: task and steps, plus the teacher and a / T when distilled."""
    entry = {"task": summary.config["task"], "steps": config.steps}
    if config.distilled:
        entry.update(teacher=config.teacher, teacher_source=summary.config["teacher_source"],
                     a=summary.config["a"], temperature=summary.config["temperature"])
    return entry


def compress_model(model: str, out: Path, *, quantize: str | None = None, prune: list[str] | None = None,
                   include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), calibration: str | None = None,
                   recover_steps: int = 0, recover_task: str | None = None, recover_teacher: str | None = None,
                   recover_a: float | None = None, recover_temperature: float | None = None,
                   recover_max_length: int | None = None, recover_lr: float | None = None,
                   recovery_extra: dict | None = None, card_extra: dict | None = None, progress: bool = True):
    """Load ``model``, apply the pruning steps, optionally recover (``recover_steps`` of fine-tuning on
    ``recover_task``'s train split with the sparsity held, distilled from ``recover_teacher`` when given:
    ``auto`` is the model itself before pruning; :class:`tightrope.compress.recovery.Recovery`),
    then quantize, and save to ``out``; returns the summaries.

    The recovery's checkpoints live in ``.<out name>.recovery`` beside ``out`` until the model is
    saved, so a killed run started again with the same arguments resumes.

    ``recovery_extra``: entries added to the card's ``recovery`` record (what a caller built the recovery data
    from, e.g. :func:`tightrope.qattack.defense.guided_compress`); ``card_extra``: entries added to the card itself
    (the guided calibration's record).
    """

    prune_configs = [prune_config(p, include, exclude, calibration) for p in (prune or [])]
    quant = quant_config(quantize, include, exclude, calibration) if quantize else None
    recovery = recovery_config(recover_steps, recover_task, recover_teacher, recover_a, recover_temperature,
                               recover_max_length, recover_lr, include, exclude)
    if not prune_configs and quant is None:
        raise TightropeError("Nothing to do: give --quantize and / or --prune.")
    if recovery is not None and not prune_configs:
        raise TightropeError("--recover-steps fine-tunes a pruned model: give --prune too.")
    clf = workflows.load(model)
    if not hasattr(clf.model, "named_modules"):
        raise TightropeError(f"{model} is not a PyTorch model (format '{clf.card.get('format')}'), so it cannot be compressed again.")
    task = recover_task or trained_task(clf.card)
    if recovery is not None and not task:
        raise TightropeError(f"{model} does not record the task it was trained on: give --recover-task.")
    out = Path(out)
    set_tokenizer(clf.model, clf.tokenizer)
    history = clf.card.get("compression") or []
    if history:
        clf.model._tightrope_compression = list(history)
    card = {k: v for k, v in clf.card.items() if k in ("tokenization", "task", "label_names", "metrics", "base_model")}
    card["source"] = model
    card.update(inference.transform_card(clf))  # a defense applied to the input stays with the model
    configs = [*prune_configs, *([recovery] if recovery is not None else []), *([quant] if quant is not None else [])]
    work_dir = out.parent / f".{out.name}.recovery" if recovery is not None else None
    summaries = run_steps(clf, configs, card=card, work_dir=work_dir, progress=progress,
                          identity={"model": str(Path(model).resolve()) if Path(model).exists() else model,
                                    "prune": [c.to_dict() for c in prune_configs]})
    if recovery is not None:
        card["recovery"] = recovery_card(recovery, summaries[len(prune_configs)])
        card["recovery"].update(recovery_extra or {})
    card.update(card_extra or {})
    card["environment"] = environment()  # versions, CPU, and which 4-bit kernel path ran
    formats.save_compressed(clf.model, clf.tokenizer, out, card=card, files=inference.transform_files(clf))
    if work_dir is not None:
        shutil.rmtree(work_dir, ignore_errors=True)
    return summaries
