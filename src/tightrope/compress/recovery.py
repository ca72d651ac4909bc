"""Recovery fine-tuning after pruning, with the sparsity pattern held fixed.

:func:`recover` reuses :func:`tightrope.train.train` with :func:`hold_sparsity`, which keeps every
pruned weight at exactly zero through training. With a teacher the recovery is distilled: the loss
is the seed paper's ``a * CE + (1 - a) * KD``, a criterion passed in from above (the layers point
down, so :mod:`tightrope.workflows.compress` builds :class:`tightrope.defenses.distill.Distillation`
with the teacher frozen, reading the same token ids as the pruned student).

:class:`Recovery` is the one description of a recovery step, built by ``tightrope compress
--recover-steps ...`` (:func:`recovery_config`) and by a study file's compress step (``method:
Recovery``); :func:`recover_classifier_` runs it on a pruned model in memory
(:func:`tightrope.workflows.compress.run_steps` resolves the teacher before pruning).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from tightrope.compress import quant, wanda
from tightrope.compress.api import (
    CompressionConfig,
    CompressionSummary,
    count_parameters,
    register_handler,
    select_modules,
)
from tightrope.compress.formats import load_pruned, pruning_card, save_compressed
from tightrope.errors import TightropeError
from tightrope.inference import TextClassifier, read_card
from tightrope.train import TrainConfig, split_train_eval, train

# --- recovery with the sparsity pattern held fixed ------------------------------------------------


@dataclass(frozen=True)
class SparsityMask:
    """Which weights pruning removed: parameter name -> boolean keep-mask (True = still a weight)."""

    keep: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: nn.Module, config: CompressionConfig | None = None) -> SparsityMask:
        """Every exact zero of the chosen Linear weights (default: the encoder's) counts as pruned."""
        modules = select_modules(model, config or CompressionConfig())
        keep = {f"{name}.weight": m.weight.detach() != 0 for name, m in modules.items()}
        return cls({name: k for name, k in keep.items() if not bool(k.all())})

    def parameters(self, model: nn.Module) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        params = dict(model.named_parameters())
        for name, keep in self.keep.items():
            param = params.get(name, params.get(f"module.{name}"))  # DDP wraps names in "module."
            if param is None:
                raise TightropeError(f"The sparsity mask names {name}, which this model does not have.")
            yield param, keep

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        for param, keep in self.parameters(model):
            param.masked_fill_(~keep.to(param.device), 0.0)

    def violations(self, model: nn.Module) -> int:
        """How many pruned weights are no longer zero."""
        return sum(int(torch.count_nonzero(p.detach()[~k.to(p.device)])) for p, k in self.parameters(model))

    @property
    def pruned(self) -> int:
        return sum(int((~k).sum()) for k in self.keep.values())


@contextmanager
def hold_sparsity(model: nn.Module, mask: SparsityMask | None = None) -> Iterator[SparsityMask]:
    """Keep pruned weights at exactly zero while training ``model`` inside the block.

    Two hooks: the gradient of a pruned weight is zeroed (so clipping and Adam's moments see the
    sparse model), and after every optimizer step the pruned weights are set to zero again (weight
    decay, or an optimizer with older state, could otherwise move them).
    """
    mask = SparsityMask.from_model(model) if mask is None else mask
    pairs = list(mask.parameters(model))
    handles = [p.register_hook(lambda g, k=k: g.masked_fill(~k.to(g.device), 0.0)) for p, k in pairs]

    @torch.no_grad()
    def rezero(optimizer, args, kwargs) -> None:
        for p, k in pairs:
            p.masked_fill_(~k.to(p.device), 0.0)

    handles.append(register_optimizer_step_post_hook(rezero))
    try:
        yield mask
    finally:
        for h in handles:
            h.remove()


def recover(
    model_dir: str | Path,
    task: str,
    out_dir: str | Path,
    *,
    steps: int = 100,
    lr: float = 2e-5,
    batch_size: int = 16,
    max_length: int = 128,
    n_train: int | None = None,
    n_eval: int = 200,
    seed: int = 0,
    data_dir: str | None = None,
    progress: bool = True,
    input_transform=None,
    truncation: str = "head",
    criterion=None,
    distilled_from: dict | None = None,
    checkpoint_every: int = 50,
    hold: CompressionConfig | None = None,
) -> dict:
    """Short recovery fine-tuning of a pruned model with :func:`tightrope.train.train`, sparsity held.

    Runs exactly ``steps`` optimizer steps and writes a model directory (same format as the input,
    so a structurally pruned model stays loadable). ``input_transform``: the model's defense on its
    input (see :func:`tightrope.train.train`), applied to the recovery's texts. ``criterion``:
    ``(student_logits, batch) -> loss`` instead of cross-entropy, such as
    :class:`~tightrope.defenses.distill.Distillation` (``distilled_from``, recorded in the card, says
    from what). ``hold``: whose Linears' zeros stay zero (include / exclude; default the
    encoder's). A checkpoint every ``checkpoint_every`` steps (atomic) lets a killed run
    started again with the same arguments resume. Returns the card.
    """

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TightropeError(f"Recovery needs a positive whole number of steps, got {steps!r}.")
    loaded = load_pruned(model_dir)
    try:
        settings = dict(model=str(model_dir), task=task, data_dir=data_dir, n_train=n_train, n_eval=n_eval,
                        max_length=max_length, truncation=truncation, batch_size=batch_size, lr=lr, seed=seed,
                        checkpoint_every=max(1, min(checkpoint_every, steps)))
        train_data, _ = split_train_eval(TrainConfig(**settings))
        steps_per_epoch = math.ceil(len(train_data) / batch_size)
        # train() runs ceil(steps_per_epoch * epochs) steps; the half step keeps float error from adding one.
        config = TrainConfig(**settings, epochs=(steps - 0.5) / steps_per_epoch)
    except ValueError as err:  # pydantic's ValidationError
        raise TightropeError(f"Invalid recovery setting: {str(err).splitlines()[-1].strip()}") from err
    if train_data.num_labels != loaded.model.config.num_labels:
        raise TightropeError(f"{model_dir} predicts {loaded.model.config.num_labels} labels but {task} has "
                             f"{train_data.num_labels}.")
    before = read_card(Path(model_dir)) if Path(model_dir).is_dir() else {}
    extra = {"created_by": "tightrope recover", "recovered_from": str(model_dir),
             **{k: before[k] for k in ("compression",) if k in before}, **pruning_card(loaded.model)}
    objective = _Supervised(criterion) if criterion is not None else None
    if distilled_from:
        extra["distilled_from"] = distilled_from
    with hold_sparsity(loaded.model, SparsityMask.from_model(loaded.model, hold)):
        return train(config, out_dir, initial_model=loaded, progress=progress, extra_card=extra,
                     input_transform=input_transform, objective=objective)


class _Supervised:
    """The objective ``(model, batch) -> loss`` of a criterion on the model's logits."""

    def __init__(self, criterion):
        self.criterion = criterion

    def __call__(self, model, batch):
        return self.criterion(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)


def recover_model(model: nn.Module, tokenizer, task: str, *, steps: int, max_length: int = 128, card: dict | None = None,
                  out_dir: str | Path | None = None, progress: bool = False, input_transform=None,
                  work_dir: str | Path | None = None, **settings) -> nn.Module:
    """:func:`recover` for a pruned model in memory: returns the recovered model (tokenizer attached
    for calibration-based compressors). With ``out_dir`` the recovered model is kept there, and an
    ``out_dir`` that already holds one is loaded instead of trained again (recovery is seeded).
    ``work_dir`` keeps the pruned model and the recovery's checkpoints there instead of in a temporary
    folder, so a killed recovery started again resumes. ``settings``: more keyword arguments of
    :func:`recover` (criterion, distilled_from, truncation, lr, batch_size, seed, hold)."""
    import tempfile  # noqa: PLC0415

    def load(path: Path) -> nn.Module:
        loaded = load_pruned(path).model
        wanda.set_tokenizer(loaded, tokenizer)
        return loaded

    if out_dir is not None and (Path(out_dir) / "card.json").exists():
        return load(Path(out_dir))
    if work_dir is not None:
        work = Path(work_dir)
        target = Path(out_dir) if out_dir is not None else work / "recovered"
        if (target / "card.json").exists():
            return load(target)
        work.mkdir(parents=True, exist_ok=True)
        pruned = save_compressed(model, tokenizer, work / "pruned", card=card)
        recover(pruned, task, target, steps=steps, max_length=max_length, progress=progress,
                input_transform=input_transform, **settings)
        return load(target)
    with tempfile.TemporaryDirectory() as tmp:
        pruned = save_compressed(model, tokenizer, Path(tmp) / "pruned", card=card)
        target = Path(out_dir) if out_dir is not None else Path(tmp) / "recovered"
        recover(pruned, task, target, steps=steps, max_length=max_length, progress=progress,
                input_transform=input_transform, **settings)
        return load(target)


# --- the recovery step of a compression: one config for the CLI and study files ------------------

TEACHER_AUTO = "auto"


@dataclass(frozen=True)
class Recovery(CompressionConfig):
    """Fine-tune a pruned model for ``steps`` steps (sparsity held) before it is quantized.

    ``task``: whose train split (default: the task the model was trained on). ``teacher``: distil
    instead of plain cross-entropy, from ``"auto"`` (the model being compressed, before pruning) or a
    model directory / alias with the same vocabulary and labels; the loss is ``a * CE + (1 - a) * KD``
    at ``temperature`` (default 0.5 and 2.0, settable only with a teacher). ``max_length`` (default:
    the model's, at most 128) and the model's truncation tokenize the recovery's texts. ``include`` /
    ``exclude`` choose the Linears whose zeros are held.
    """

    steps: int = 100
    task: str | None = None
    teacher: str | None = None
    a: float | None = None
    temperature: float | None = None
    lr: float = 2e-5
    batch_size: int = 16
    max_length: int | None = None
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise TightropeError(f"Recovery needs a positive whole number of steps, got {self.steps!r}.")
        if self.teacher is None and (self.a is not None or self.temperature is not None):
            raise TightropeError("a and temperature weigh the distillation loss of the recovery, which needs a teacher "
                                 "(--recover-teacher auto or a model).")
        if self.a is not None and not 0.0 <= self.a <= 1.0:
            raise TightropeError(f"The recovery's loss weight a must lie in [0, 1], got {self.a}.")
        if self.temperature is not None and not self.temperature > 0:
            raise TightropeError(f"The recovery's distillation temperature must be positive, got {self.temperature}.")
        if not self.lr > 0 or self.batch_size < 1 or (self.max_length is not None and self.max_length < 8):
            raise TightropeError("The recovery needs lr > 0, batch_size >= 1 and max_length >= 8.")

    @property
    def distilled(self) -> bool:
        return self.teacher is not None

    @property
    def weights(self) -> tuple[float, float]:
        """(a, temperature) with their defaults filled."""
        return (0.5 if self.a is None else float(self.a), 2.0 if self.temperature is None else float(self.temperature))


def trained_task(card: dict) -> str | None:
    """The task a model's card says it was trained on (``tightrope train`` writes ``data.task``), or None."""
    return card.get("task") or (card.get("data") or {}).get("task")


def recovery_config(steps: int = 0, task: str | None = None, teacher: str | None = None, a: float | None = None,
                    temperature: float | None = None, max_length: int | None = None,
                    lr: float | None = None, include: tuple[str, ...] = (),
                    exclude: tuple[str, ...] = ()) -> Recovery | None:
    """The :class:`Recovery` that ``tightrope compress --recover-*`` describes (None for 0 steps).

    The distillation settings without recovery steps are refused in one sentence.
    """
    if not steps:
        given = [f for f, v in (("--recover-teacher", teacher), ("--recover-a", a),
                                ("--recover-temperature", temperature), ("--recover-task", task),
                                ("--recover-max-length", max_length), ("--recover-lr", lr)) if v is not None]
        if given:
            raise TightropeError(f"{', '.join(given)} {'sets' if len(given) == 1 else 'set'} the recovery after pruning, "
                                 "which runs only with --recover-steps N: give it too.")
        return None
    return Recovery(steps=steps, task=task, teacher=teacher, a=a, temperature=temperature, max_length=max_length,
                    include=tuple(include), exclude=tuple(exclude), **({"lr": lr} if lr is not None else {}))


@register_handler(Recovery)
def _refuse(model: nn.Module, config: Recovery) -> CompressionSummary:
    raise TightropeError("Recovery trains on a task with the model's tokenizer and card, so it runs through "
                         "tightrope.compress.recovery.recover_classifier_ (tightrope compress, a study's compress step), "
                         "not compress_.")


def check_order(configs: list) -> None:
    """A recovery step comes after a pruning step and before any quantization: one sentence otherwise."""
    pruned = quantized = False
    for config in configs:
        if isinstance(config, Recovery):
            if not pruned:
                raise TightropeError("Recovery fine-tunes a pruned model: put a pruning step before it "
                                     "(--recover-steps needs --prune).")
            if quantized:
                raise TightropeError("Recovery trains in full precision: put it before the quantization step.")
        elif type(config).__module__ == quant.__name__:
            quantized = True
        else:
            pruned = True


def _fingerprint(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recover_classifier_(clf: TextClassifier, config: Recovery, *, card: dict, criterion=None, teacher_source: str | None = None,
                        work_dir: str | Path | None = None, identity=None, progress: bool = False) -> CompressionSummary:
    """Run ``config`` on the pruned ``clf.model`` in memory and put the recovered model in its place.

    ``card``: what the recovered model's card keeps (tokenization, task, input transform).
    ``criterion``: the distillation loss from ``config.teacher`` (needed when it is set; built by
    :func:`tightrope.workflows.compress.run_steps`), ``teacher_source`` what the teacher was. ``work_dir`` holds the
    recovery's checkpoints, so a killed run started again resumes; ``identity`` (anything JSON) names
    what was pruned, and a ``work_dir`` left by another identity or setting is cleared first.
    Returns the step's summary, also appended to the model's compression history (the card's).
    """
    if config.distilled and criterion is None:
        raise TightropeError("This recovery distils from a teacher: run it through tightrope.workflows.compress.run_steps, "
                             "which loads the teacher before pruning.")
    task = config.task or trained_task(card) or trained_task(clf.card)
    if not task:
        raise TightropeError(f"{clf.source} does not record the task it was trained on: give --recover-task.")
    tok = card.get("tokenization", {})
    max_length = config.max_length or min(tok.get("max_length", 128), 128)
    a, temperature = config.weights
    settings = dict(lr=config.lr, batch_size=config.batch_size, seed=config.seed, truncation=tok.get("truncation", "head"),
                    hold=CompressionConfig(config.include, config.exclude) if config.include or config.exclude else None)
    teacher_source = teacher_source or config.teacher
    if config.distilled:
        settings.update(criterion=criterion,
                        distilled_from={"teacher": teacher_source, "a": a, "temperature": temperature})
    if work_dir is not None:
        work = Path(work_dir)
        stamp = _fingerprint({"identity": identity, "config": config.to_dict(), "task": str(task), "max_length": max_length})
        mark = work / "recovery.json"
        if work.exists() and (not mark.exists() or json.loads(mark.read_text()).get("fingerprint") != stamp):
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        mark.write_text(json.dumps({"fingerprint": stamp}))
    history = list(getattr(clf.model, "_tightrope_compression", []) or [])
    recovered = recover_model(clf.model, clf.tokenizer, str(task), steps=config.steps, max_length=max_length, card=card,
                              progress=progress, input_transform=clf.input_transform, work_dir=work_dir, **settings)
    record = read_card(Path(work_dir) / "recovered") if work_dir is not None else {}
    parameters, nonzero = count_parameters(recovered)
    notes = [f"{config.steps} steps on {task}'s train split, batch {config.batch_size}, max length {max_length}, "
             f"lr {config.lr:g}, sparsity held"]
    if config.distilled:
        notes.append(f"distilled: L = {a:g} * CE + {1 - a:g} * KD at T = {temperature:g} from {teacher_source}")
    validation = (record.get("metrics") or {}).get("validation") or {}
    if validation.get("accuracy") is not None:
        notes.append(f"validation accuracy after recovery {validation['accuracy']:.4f} ({record['data']['eval_examples']} examples)")
    summary_config = {**config.to_dict(), "task": str(task), "max_length": max_length}
    if config.distilled:
        summary_config.update(a=a, temperature=temperature, teacher_source=teacher_source)
    summary = CompressionSummary(method=config.method, config=summary_config, modules=[], bits=None, simulated=False,
                                 parameters=parameters, nonzero_parameters=nonzero, notes=notes)
    recovered._tightrope_compression = [*history, summary.to_dict()]
    clf.model = recovered
    return summary
