"""Compress a saved model directory: load, prune, recover, quantize, save (``tightrope compress``)."""

from __future__ import annotations

from pathlib import Path

from tightrope import inference, workflows
from tightrope.compress import formats
from tightrope.compress.api import compress_
from tightrope.compress.recovery import recover_model
from tightrope.compress.specs import prune_config, quant_config
from tightrope.compress.wanda import set_tokenizer
from tightrope.errors import TightropeError
from tightrope.provenance import environment


def compress_model(model: str, out: Path, *, quantize: str | None = None, prune: list[str] | None = None,
                   include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), calibration: str | None = None,
                   recover_steps: int = 0, recover_task: str | None = None, progress: bool = True):
    """Load ``model``, apply the pruning steps, optionally recover (``recover_steps`` of fine-tuning on
    ``recover_task``'s train split with the sparsity held, :func:`tightrope.compress.recovery.recover`),
    then quantize, and save to ``out``; returns the summaries."""

    prune_configs = [prune_config(p, include, exclude, calibration) for p in (prune or [])]
    quant = quant_config(quantize, include, exclude, calibration) if quantize else None
    if not prune_configs and quant is None:
        raise TightropeError("Nothing to do: give --quantize and / or --prune.")
    if recover_steps and not prune_configs:
        raise TightropeError("--recover-steps fine-tunes a pruned model: give --prune too.")
    clf = workflows.load(model)
    if not hasattr(clf.model, "named_modules"):
        raise TightropeError(f"{model} is not a PyTorch model (format '{clf.card.get('format')}'), so it cannot be compressed again.")
    task = recover_task or clf.card.get("task") or (clf.card.get("data") or {}).get("task")  # train writes data.task
    if recover_steps and not task:
        raise TightropeError(f"{model} does not record the task it was trained on: give --recover-task.")
    set_tokenizer(clf.model, clf.tokenizer)
    history = clf.card.get("compression") or []
    if history:
        clf.model._tightrope_compression = list(history)
    summaries = [compress_(clf.model, c) for c in prune_configs]
    card = {k: v for k, v in clf.card.items() if k in ("tokenization", "task", "label_names", "metrics", "base_model")}
    card["source"] = model
    card.update(inference.transform_card(clf))  # a defense applied to the input stays with the model
    if recover_steps:

        tok = card.get("tokenization", {})
        clf.model = recover_model(clf.model, clf.tokenizer, str(task), steps=recover_steps, card=card, progress=progress,
                                  max_length=min(tok.get("max_length", 128), 128), input_transform=clf.input_transform)
        card["recovery"] = {"task": str(task), "steps": recover_steps}
    if quant is not None:
        summaries.append(compress_(clf.model, quant))
    card["environment"] = environment()  # versions, CPU, and which 4-bit kernel path ran
    formats.save_compressed(clf.model, clf.tokenizer, out, card=card, files=inference.transform_files(clf))
    return summaries
