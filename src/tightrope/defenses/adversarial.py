"""Adversarial training in the word-embedding space, as objectives for :func:`tightrope.train.train`.

Each defense is an objective ``(model, batch) -> loss`` (scikit-learn style: the constructor only
stores and validates parameters). The loss on an example is given by a *criterion*
``(logits, batch) -> loss``: cross-entropy by default, or the seed's distillation loss
(:class:`tightrope.defenses.distill.Distillation`), so every defense combines with distillation.
The inner maximisation always attacks the cross-entropy of the true label.

- :class:`PGDTraining` -- Madry et al. (2018), Eq. (2.1): min_theta E max_{||delta||<=eps} L; the
  inner max by K steps of PGD, then one training step on the adversarial point. Cost: K
  input-gradient passes + 1 training pass.
- :class:`FreeLB` -- Zhu et al. (2020), Alg. 1: K ascent steps whose parameter gradients are all
  accumulated, i.e. training on the average loss over the K iterates ("free" large batch). Cost:
  K training passes.
- :class:`FastAdversarial` -- Wong, Rice and Kolter (2020), Alg. 3: FGSM from a uniform random start
  with alpha = 1.25 eps. Cost: 1 input-gradient pass + 1 training pass.

A ``mix`` in [0, 1] weights adversarial against clean examples: loss = mix * L(adv) + (1 - mix) *
L(clean) (mix = 1 is Madry's pure adversarial objective). Random starts draw from torch's global
generator, which the training loop seeds at every step, so runs are reproducible and resumable.

FreeLB and FastAdversarial with mix < 1 call ``backward`` themselves for all but the last term (the
loop's ``backward`` adds the last), accumulating parameter gradients exactly as FreeLB's reference
code does; this assumes no gradient scaling (fp32 or bf16 training).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tightrope.attacks.embedding import (
    EmbeddingAttack,
    Norm,
    ascent_direction,
    logits_from_embeddings,
    perturb,
    project,
    random_start,
    word_embeddings,
)
from tightrope.errors import TightropeError

Criterion = Callable[[torch.Tensor, dict], torch.Tensor]


def cross_entropy(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    return F.cross_entropy(logits.float(), batch["labels"])


def _check_mix(mix: float) -> None:
    if not 0.0 <= mix <= 1.0:
        raise TightropeError(f"The mixing ratio of adversarial examples must lie in [0, 1], got {mix}.")
    if mix == 0.0:
        raise TightropeError("mix = 0 gives adversarial examples no weight, which is plain fine-tuning; "
                             "use mix > 0, or train without a defense.")


class _EmbeddingDefense:
    """Shared parts: parameters, the criterion, the clean and perturbed forwards."""

    name = "embedding"

    def __init__(self, epsilon: float, steps: int, step_size: float | None, norm: Norm, mix: float,
                 criterion: Criterion | None, random_start: bool = True):
        self.attack = EmbeddingAttack(epsilon=epsilon, steps=steps, step_size=step_size, norm=norm,
                                      random_start=random_start)  # validates epsilon, steps, norm
        _check_mix(mix)
        self.mix = mix
        self.criterion = criterion or cross_entropy

    def _forward(self, model, batch: dict, delta: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at e(x) + delta with gradients flowing to every parameter, embeddings included."""
        if delta is None:
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        embeds = word_embeddings(model)(batch["input_ids"])  # (B, T, C)
        return logits_from_embeddings(model, embeds + delta, batch["attention_mask"])

    def describe(self) -> dict:
        return {"defense": self.name, **{k: v for k, v in self.attack.to_dict().items() if k != "seed"},
                "mix": self.mix, "criterion": getattr(self.criterion, "__name__", type(self.criterion).__name__)}


class PGDTraining(_EmbeddingDefense):
    """PGD-K adversarial training (Madry et al. 2018) on word embeddings."""

    name = "pgd"

    def __init__(self, epsilon: float = 0.02, steps: int = 3, step_size: float | None = None, norm: Norm = "linf",
                 mix: float = 1.0, criterion: Criterion | None = None, random_start: bool = True):
        super().__init__(epsilon, steps, step_size, norm, mix, criterion, random_start)

    def __call__(self, model, batch: dict) -> torch.Tensor:
        delta = perturb(model, batch["input_ids"], batch["attention_mask"], batch["labels"], self.attack).delta
        loss = self.mix * self.criterion(self._forward(model, batch, delta), batch)
        if self.mix < 1.0:
            loss = loss + (1.0 - self.mix) * self.criterion(self._forward(model, batch), batch)
        return loss


class FastAdversarial(_EmbeddingDefense):
    """Fast adversarial training: FGSM with a random start (Wong et al. 2020, Alg. 3).

    With mix = 1 this is exactly their algorithm: delta_0 ~ U(-eps, eps), one signed step of
    alpha = 1.25 eps computed at x + delta_0, projection, a training step at x + delta. With mix < 1
    the clean term's own backward also yields the attack gradient (the gradient reuse of Shafahi et
    al. 2019, "Adversarial Training for Free!"), so clean + adversarial costs two training passes;
    the step then starts from the random point but uses the gradient at the clean point.
    """

    name = "fast"

    def __init__(self, epsilon: float = 0.02, step_size: float | None = None, norm: Norm = "linf", mix: float = 1.0,
                 criterion: Criterion | None = None):
        super().__init__(epsilon, 1, 1.25 * epsilon if step_size is None else step_size, norm, mix, criterion)

    def __call__(self, model, batch: dict) -> torch.Tensor:
        if self.mix == 1.0:
            delta = perturb(model, batch["input_ids"], batch["attention_mask"], batch["labels"], self.attack).delta
            return self.criterion(self._forward(model, batch, delta), batch)
        eps, norm = self.attack.epsilon, self.attack.norm
        embeds = word_embeddings(model)(batch["input_ids"])  # (B, T, C)
        mask = batch["attention_mask"].unsqueeze(-1).to(embeds.dtype)  # (B, T, 1)
        zero = torch.zeros_like(embeds, requires_grad=True)
        clean = self.criterion(logits_from_embeddings(model, embeds + zero, batch["attention_mask"]), batch)
        ((1.0 - self.mix) * clean).backward()  # parameter gradients of the clean term, and d loss / d delta
        start = random_start(embeds.shape, eps, norm, mask).to(embeds.dtype)
        delta = project(start + self.attack.alpha * ascent_direction(zero.grad * mask, norm), eps, norm) * mask
        return self.mix * self.criterion(self._forward(model, batch, delta.detach()), batch)


class FreeLB(_EmbeddingDefense):
    """FreeLB (Zhu et al. 2020, Alg. 1): K ascent steps, parameter gradients accumulated over all K.

    delta_0 is uniform in [-1, 1] scaled by ``init_magnitude / sqrt(tokens * dim)`` per example
    (their ``adv-init-mag``); each step adds ``step_size * g / ||g||_F`` (their ``adv-lr``) and
    projects onto the ``epsilon`` ball (their ``adv-max-norm``) in the chosen norm. The loss of
    each step is divided by K, so the update is the gradient of the average loss over iterates.
    Paper values for BERT-base on GLUE: K = 2..3, adv-lr 1e-1, adv-init-mag 1e-1..6e-1.
    """

    name = "freelb"

    def __init__(self, epsilon: float = 0.5, steps: int = 2, step_size: float = 0.1, init_magnitude: float = 0.1,
                 norm: Norm = "l2", criterion: Criterion | None = None):
        super().__init__(epsilon, steps, step_size, norm, 1.0, criterion)
        if init_magnitude < 0:
            raise TightropeError(f"init_magnitude must be zero or positive, got {init_magnitude}.")
        self.init_magnitude = init_magnitude

    def __call__(self, model, batch: dict) -> torch.Tensor:
        K, alpha, eps, norm = self.attack.steps, self.attack.alpha, self.attack.epsilon, self.attack.norm
        ids, attention = batch["input_ids"], batch["attention_mask"]
        mask = attention.unsqueeze(-1).float()  # (B, T, 1)
        dim = word_embeddings(model).weight.shape[-1]
        lengths = attention.sum(1).float().view(-1, 1, 1)  # (B, 1, 1)
        delta = (torch.rand(*ids.shape, dim, device=ids.device) * 2 - 1) * mask
        delta = delta * self.init_magnitude / torch.sqrt(lengths * dim)
        for step in range(K):
            delta.requires_grad_(True)
            embeds = word_embeddings(model)(ids)  # recomputed: each backward frees the previous graph
            loss = self.criterion(logits_from_embeddings(model, embeds + delta, attention), batch) / K
            if step == K - 1:
                return loss  # the training loop's backward adds this last term
            loss.backward()
            grad = delta.grad.detach()
            delta = project(delta.detach() + alpha * ascent_direction(grad * mask, norm), eps, norm) * mask
        raise AssertionError("unreachable")

    def describe(self) -> dict:
        return {**super().describe(), "init_magnitude": self.init_magnitude}


DEFENSES = {"pgd": PGDTraining, "fast": FastAdversarial, "freelb": FreeLB}
