"""Fine-tune a sequence classifier: seeded, resumable, on top of accelerate.

The same code runs on the CPU, one GPU or several (``accelerate launch``): accelerate picks the
device, and every process takes its share of each global batch. A checkpoint is written every
``checkpoint_every`` steps and at each epoch's end (atomically: a temp folder renamed over the
old one), so a killed run started again with the same arguments resumes where it stopped and ends
with the same weights as an uninterrupted run.

Losses other than cross-entropy (adversarial training, distillation) plug in as an ``objective``:
a callable ``(model, batch) -> loss`` (see :mod:`tightrope.defenses`). An objective that needs the
whole training set first (A2T's cache of adversarial texts) has a ``before_training(model, data,
config, start=..., progress=...)`` method, called once with the starting weights; what it returns
goes into the card under ``before_training``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file

from tightrope import models, transforms
from tightrope.data import TaskData, has_split, load_task
from tightrope.accord import flood_level_from_accord, gradient_accord
from tightrope.encoding import Truncation, collate, encode, predict_logits
from tightrope.errors import TightropeError
from tightrope.evaluate.metrics import classification_metrics
from tightrope.inference import is_structured, transform_card, transform_files
from tightrope.progress import Reporter, say, tracked
from tightrope.provenance import environment

Objective = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class TrainConfig(BaseModel):
    """Hyper-parameters of one fine-tuning run (validated at the edge, frozen afterwards)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = "minilm"
    task: str = "rotten-tomatoes"
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str | None = None  # None: the task's validation split, else a slice carved from train
    n_train: int | None = Field(default=None, gt=0)
    n_eval: int = Field(default=1000, gt=0)
    max_length: int = Field(default=128, ge=8, le=4096)
    truncation: Truncation = "head"
    batch_size: int = Field(default=16, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    lr: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1)
    schedule: str = Field(default="linear", pattern="^(linear|cosine|constant)$")
    grad_clip: float = Field(default=1.0, gt=0)
    seed: int = 0
    eval_every: int | None = Field(default=None, gt=0)  # steps; evaluation also runs at each epoch's end
    patience: int | None = Field(default=None, gt=0)  # early stopping: evaluations without improvement
    checkpoint_every: int = Field(default=50, gt=0)
    trust_remote_code: bool = False
    # Measure the gradient accord every N steps (tightrope.accord; Flooding-X reads its flood
    # level from it). A measurement, not a setting: it leaves the trajectory as it is, so a run resumes
    # with or without it.
    accord_every: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.eval_every is None and self.patience is not None and self.epochs <= 1:
            raise ValueError("early stopping (patience) needs several evaluations: set eval_every or epochs > 1")
        return self


MEASUREMENTS = frozenset({"accord_every"})  # TrainConfig fields that do not change the weights


def same_run(stored: dict, config: TrainConfig) -> bool:
    """Whether a checkpoint's or a card's config describes the run ``config`` describes (measurements aside)."""
    def weights_only(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in MEASUREMENTS}
    return weights_only(stored or {}) == weights_only(config.model_dump())


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at a step: linear warm-up, then the chosen decay."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), so resuming is exact."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def carried(objective, name: str):
    """The attribute ``name`` an objective carries, looked for through wrappers (fake quantization
    exposes its inner objective as ``.objective``); None when no layer has it."""
    while objective is not None:
        value = getattr(objective, name, None)
        if value is not None:
            return value
        objective = getattr(objective, "objective", None)
    return None


def input_transform_of(objective):
    """The input transform an objective carries (``objective.input_transform``), or None."""
    return carried(objective, "input_transform")


def inherited_transform(model: str):
    """The input transform the card of the model directory ``model`` names (None for anything else)."""
    card_file = Path(model) / "card.json"
    if not card_file.is_file():
        return None
    entry = json.loads(card_file.read_text()).get("input_transform")
    return transforms.load(model, entry) if entry else None


def cross_entropy_objective(model, batch) -> torch.Tensor:
    return F.cross_entropy(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           batch["labels"])


def split_train_eval(config: TrainConfig) -> tuple[TaskData, TaskData]:
    train = load_task(config.task, config.train_split, data_dir=config.data_dir)
    if config.eval_split:
        held = load_task(config.task, config.eval_split, data_dir=config.data_dir).subset(config.n_eval, config.seed)
        return train.subset(config.n_train, config.seed), held
    if has_split(config.task, "validation"):
        held = load_task(config.task, "validation", data_dir=config.data_dir).subset(config.n_eval, config.seed)
        return train.subset(config.n_train, config.seed), held
    # No validation split: carve one from train, disjoint from the training subset.
    order = list(range(len(train)))
    random.Random(config.seed).shuffle(order)
    n_eval = min(config.n_eval, len(order) // 5)
    if n_eval < 1:
        raise TightropeError(f"{config.task} has {len(order)} training examples and no validation split: too few to "
                             "carve a validation set from (a fifth of them at most); give more data or --eval-split.")
    pick = lambda idx: TaskData(train.name, train.split, [train.texts[i] for i in idx],  # noqa: E731
                                [train.labels[i] for i in idx], train.label_names)
    held = pick(sorted(order[:n_eval]))
    rest = order[n_eval:]
    n_train = len(rest) if config.n_train is None else min(config.n_train, len(rest))
    return pick(sorted(rest[:n_train])), TaskData(held.name, "validation(carved)", held.texts, held.labels,
                                                  held.label_names)


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    objective: Objective | None = None,
    progress: bool | Reporter = True,
    stop_after_steps: int | None = None,
    extra_card: dict | None = None,
    initial_model: models.LoadedModel | None = None,
    input_transform: Callable[[list[str]], list[str]] | None = None,
) -> dict:
    """Fine-tune ``config.model`` on ``config.task`` and write a model directory with ``card.json``.

    The input transform (a defense that rewrites every text before tokenization) is the objective's
    when it carries one, else ``input_transform``, else the one the starting model's card names: a
    defended model fine-tuned further (recovery after pruning, say) keeps reading through its defense.

    ``stop_after_steps`` ends the run early *without* finishing it (used by tests to simulate a kill;
    the checkpoint stays and a second call resumes). ``initial_model`` starts from a model already in
    memory (e.g. a structurally pruned one that ``from_pretrained`` cannot rebuild) instead of
    loading ``config.model``, which is then only recorded; a structurally pruned one comes with its format and plan
    in ``extra_card`` (:func:`tightrope.compress.formats.load_trainable` and ``pruning_card``), so that it reloads.
    Returns the card.
    """
    from accelerate import Accelerator  # noqa: PLC0415 - heavy import, only for training

    out = Path(out_dir)
    if (out / "card.json").exists() and (out / "model.safetensors").exists():
        card = json.loads((out / "card.json").read_text())
        if same_run(card.get("config"), config):
            return card  # already finished with the same configuration
        raise TightropeError(f"{out} already holds a model trained with other settings; choose another --out.")
    ckpt_dir = out / "checkpoint"

    set_seed(config.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    # Data and model are checked before anything is written, so bad input leaves no folder behind.
    train_data, eval_data = split_train_eval(config)
    if initial_model is None and is_structured(config.model):
        raise TightropeError(f"{config.model} is structurally pruned: load it with "
                             "tightrope.compress.formats.load_trainable and pass it as initial_model.")
    loaded = initial_model if initial_model is not None else models.load_classifier(
        config.model, label_names=list(train_data.label_names), require_head=False,
        trust_remote_code=config.trust_remote_code,
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    # before anything is written: a cache that does not fit this run is refused with no folder left behind
    primed = _before_training(objective, accelerator, model, train_data, config, loaded.path, progress)
    out.mkdir(parents=True, exist_ok=True)
    # A defense that rewrites the input (tightrope.defenses.canonical) trains on rewritten texts and is
    # saved with the model, whose TextClassifier then applies it at inference.
    transform = input_transform_of(objective) or input_transform or inherited_transform(config.model)
    prepared = (lambda texts: transform(list(texts))) if transform is not None else list  # noqa: E731
    train_ids = encode(tokenizer, prepared(train_data.texts), config.max_length, config.truncation)
    eval_ids = encode(tokenizer, prepared(eval_data.texts), config.max_length, config.truncation)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    steps_per_epoch = math.ceil(len(train_ids) / config.batch_size)
    total_steps = max(1, math.ceil(steps_per_epoch * config.epochs))
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": config.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.schedule, int(config.warmup_ratio * total_steps), total_steps)
    )

    old = ckpt_dir.with_name(".checkpoint.old")
    if not ckpt_dir.exists() and old.exists():  # killed between the two renames of _save_checkpoint
        old.rename(ckpt_dir)
    state = {"step": 0, "best": None, "best_step": None, "bad_evals": 0, "history": [], "train_seconds": 0.0,
             "accord": []}
    if (ckpt_dir / "state.json").exists():
        state = _load_checkpoint(ckpt_dir, model, optimizer, scheduler, config)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    objective = objective or cross_entropy_objective

    def evaluate() -> dict:
        model.eval()
        logits = predict_logits(accelerator.unwrap_model(model), eval_ids, pad_id, batch_size=64)
        model.train()
        return classification_metrics(eval_data.labels, logits.argmax(-1).tolist(), list(eval_data.label_names)).summary()

    progress = progress if accelerator.is_main_process else False
    model.train()
    stopped_early = False
    started = time.perf_counter() - state["train_seconds"]
    with tracked(progress, "train", total_steps, completed=state["step"]) as bar:
        while state["step"] < total_steps and not stopped_early:
            step = state["step"]
            epoch, within = divmod(step, steps_per_epoch)
            order = epoch_order(len(train_ids), config.seed, epoch)
            batch_index = order[within * config.batch_size : (within + 1) * config.batch_size]
            mine = batch_index[accelerator.process_index :: accelerator.num_processes] or batch_index[:1]
            batch = collate([train_ids[i] for i in mine], pad_id)
            batch["labels"] = torch.tensor([train_data.labels[i] for i in mine], dtype=torch.long)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            batch["texts"] = [train_data.texts[i] for i in mine]  # raw texts, for a teacher with its own tokenizer
            if config.accord_every and step % config.accord_every == 0:  # before the step's seed: no effect on it
                accord, half_loss = gradient_accord(model, objective, batch)
                state.setdefault("accord", []).append({"step": step, "loss": half_loss, "accord": accord})
            # Dropout randomness is a function of the step, so resumed runs match uninterrupted ones.
            torch.manual_seed(config.seed * 7919 + step)
            loss = objective(model, batch)
            if not torch.isfinite(loss):
                raise TightropeError(f"The loss became {loss.item()} at step {step}; lower --lr.")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step + 1
            info = f"loss {loss.item():.3f} lr {scheduler.get_last_lr()[0]:.1e}"
            bar.advance(1, info)

            end_of_epoch = state["step"] % steps_per_epoch == 0 or state["step"] == total_steps
            if end_of_epoch or (config.eval_every and state["step"] % config.eval_every == 0):
                metrics = evaluate()
                state["train_seconds"] = time.perf_counter() - started
                record = {"step": state["step"], "epoch": state["step"] / steps_per_epoch, "loss": loss.item(), **metrics}
                state["history"].append(record)
                say(progress, f"step {state['step']}: eval accuracy {metrics['accuracy']:.4f} macro-F1 {metrics['macro_f1']:.4f}")
                if state["best"] is None or metrics["accuracy"] > state["best"]:
                    state.update(best=metrics["accuracy"], best_step=state["step"], bad_evals=0)
                    _save_weights(accelerator.unwrap_model(model), out / "best.safetensors")
                else:
                    state["bad_evals"] += 1
                    if config.patience and state["bad_evals"] >= config.patience:
                        say(progress, f"early stopping: no improvement in {config.patience} evaluations")
                        stopped_early = True
            if state["step"] % config.checkpoint_every == 0 or end_of_epoch or stopped_early:
                state["train_seconds"] = time.perf_counter() - started
                if accelerator.is_main_process:
                    _save_checkpoint(ckpt_dir, accelerator.unwrap_model(model), optimizer, scheduler, state, config)
            if stop_after_steps is not None and state["step"] >= stop_after_steps and state["step"] < total_steps:
                state["train_seconds"] = time.perf_counter() - started
                _save_checkpoint(ckpt_dir, accelerator.unwrap_model(model), optimizer, scheduler, state, config)
                return {"interrupted_at": state["step"]}

    final = accelerator.unwrap_model(model)
    if (out / "best.safetensors").exists():
        final.load_state_dict(load_file(out / "best.safetensors"), strict=False)
    final.eval()
    card = {
        "kind": "tightrope.model",
        "created_by": "tightrope train",
        "config": config.model_dump(),
        "base_model": {"source": config.model, "path": loaded.path, "parameters": models.count_parameters(final)},
        "data": {"task": config.task, "train_examples": len(train_data), "train_fingerprint": train_data.fingerprint(),
                 "eval_split": eval_data.split, "eval_examples": len(eval_data), "label_names": list(train_data.label_names)},
        "tokenization": {"max_length": config.max_length, "truncation": config.truncation},
        "metrics": {"validation": state["history"][-1] if state["history"] else None,
                    "best_validation_accuracy": state["best"], "best_step": state["best_step"]},
        "history": state["history"],
        **(_accord_card(state["accord"]) if state.get("accord") else {}),
        "steps": state["step"],
        "stopped_early": stopped_early,
        "train_seconds": round(state["train_seconds"], 2),
        "environment": environment(),
        **({"before_training": primed} if primed is not None else {}),
        **(extra_card or {}),
    }
    files = {}
    if transform is not None:

        card.update(transform_card(transform))
        files = transform_files(transform)
    if accelerator.is_main_process:
        models.save_model((final, tokenizer), out / ".final", extra={**files, "card.json": card})
        # card.json last: its presence marks a finished run.
        for item in sorted((out / ".final").iterdir(), key=lambda p: p.name == "card.json"):
            target = out / item.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            item.rename(target)
        (out / ".final").rmdir()
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        (out / "best.safetensors").unlink(missing_ok=True)
    return card


def _accord_card(trace: list[dict]) -> dict:
    """The card's record of a run measured with ``accord_every``: the trace and Flooding-X's flood level."""
    return {"gradient_accord": trace, "flooding_x": flood_level_from_accord(trace).to_dict()}


def _before_training(objective, accelerator, model, data: TaskData, config: TrainConfig, start: str, progress):
    """Run the objective's ``before_training`` (if any) on the starting weights, before a checkpoint is
    restored: the main process first (it writes what others then read), then the others."""
    hook = carried(objective, "before_training")
    if hook is None:
        return None
    model.to(accelerator.device)
    prepared = hook(model, data, config, start=start, progress=progress) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        prepared = hook(model, data, config, start=start, progress=False)
    return prepared


def _save_weights(model, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


def _save_checkpoint(ckpt_dir: Path, model, optimizer, scheduler, state: dict, config: TrainConfig) -> None:
    """Write a resumable checkpoint atomically: a temp folder, then a rename over the old one."""
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=ckpt_dir.parent))
    _save_weights(model, tmp / "model.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "config": config.model_dump()}, indent=1))
    old = ckpt_dir.with_name(".checkpoint.old")
    if ckpt_dir.exists():
        ckpt_dir.rename(old)
    tmp.rename(ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(ckpt_dir: Path, model, optimizer, scheduler, config: TrainConfig) -> dict:
    state = json.loads((ckpt_dir / "state.json").read_text())
    if not same_run(state.pop("config"), config):
        raise TightropeError(f"{ckpt_dir} was written by a run with other settings; use another --out or delete it.")
    model.load_state_dict(load_file(ckpt_dir / "model.safetensors"))
    # Our own file, but still loaded without pickle code execution.
    opt = torch.load(ckpt_dir / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return state
