"""Recovery fine-tuning after pruning, with the sparsity pattern held fixed.

:func:`recover` reuses :func:`tightrope.train.train` with :func:`hold_sparsity`, which keeps every
pruned weight at exactly zero through training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from tightrope.compress import wanda
from tightrope.compress.api import (
    CompressionConfig,
    select_modules,
)
from tightrope.compress.formats import load_pruned, pruning_card, save_compressed
from tightrope.errors import TightropeError
from tightrope.inference import read_card
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
) -> dict:
    """Short recovery fine-tuning of a pruned model with :func:`tightrope.train.train`, sparsity held.

    Runs exactly ``steps`` optimizer steps and writes a model directory (same format as the input,
    so a structurally pruned model stays loadable). ``input_transform``: the model's defense on its
    input (see :func:`tightrope.train.train`), applied to the recovery's texts. Returns the card.
    """

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TightropeError(f"Recovery needs a positive whole number of steps, got {steps!r}.")
    loaded = load_pruned(model_dir)
    try:
        settings = dict(model=str(model_dir), task=task, data_dir=data_dir, n_train=n_train, n_eval=n_eval,
                        max_length=max_length, batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=max(steps, 1))
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
    with hold_sparsity(loaded.model):
        return train(config, out_dir, initial_model=loaded, progress=progress, extra_card=extra,
                     input_transform=input_transform)


def recover_model(model: nn.Module, tokenizer, task: str, *, steps: int, max_length: int = 128, card: dict | None = None,
                  out_dir: str | Path | None = None, progress: bool = False, input_transform=None) -> nn.Module:
    """:func:`recover` for a pruned model in memory: returns the recovered model (tokenizer attached
    for calibration-based compressors). With ``out_dir`` the recovered model is kept there, and an
    ``out_dir`` that already holds one is loaded instead of trained again (recovery is seeded)."""
    import tempfile  # noqa: PLC0415

    def load(path: Path) -> nn.Module:
        loaded = load_pruned(path).model
        wanda.set_tokenizer(loaded, tokenizer)
        return loaded

    if out_dir is not None and (Path(out_dir) / "card.json").exists():
        return load(Path(out_dir))
    with tempfile.TemporaryDirectory() as tmp:
        pruned = save_compressed(model, tokenizer, Path(tmp) / "pruned", card=card)
        target = Path(out_dir) if out_dir is not None else Path(tmp) / "recovered"
        recover(pruned, task, target, steps=steps, max_length=max_length, progress=progress,
                input_transform=input_transform)
        return load(target)
