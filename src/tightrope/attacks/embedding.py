"""Gradient attacks in the input-embedding space: FGSM and PGD, L-infinity and L2, batched.

Text is discrete, so gradient attacks on a text classifier perturb the continuous word embeddings
``e = E[x]`` instead of the tokens (Miyato et al. 2017; Zhu et al. 2020, FreeLB). The attack solves
the inner problem of Madry et al. (2018), Eq. (2.1):

    max_{||delta|| <= epsilon}  L(f(e + delta), y)

by projected gradient ascent (Madry et al. 2018, Sec. 2.1):

    delta_{k+1} = Proj_{||.|| <= epsilon}( delta_k + alpha * d(grad_delta L) )

with d(g) = sign(g) for the L-infinity ball (Goodfellow et al. 2015, FGSM) and d(g) = g / ||g||_2 for
the L2 ball. FGSM is the one-step case with alpha = epsilon and no random start; the "fast" variant
of Wong et al. (2020) starts from a uniform random point and uses alpha = 1.25 * epsilon.

Conventions:
- delta lives on the output of the word-embedding table (before position embeddings and LayerNorm),
  as in FreeLB; padding positions are never perturbed (delta is multiplied by the attention mask).
- The L2 ball is per example, over all its (token, channel) entries, as in Madry et al. and FreeLB,
  so an L2 epsilon means more per token on short texts than on long ones.
- Scale: MiniLM's word-embedding entries have a standard deviation of about 0.056 and a per-token L2
  norm of about 1.07; an L-infinity epsilon of 0.01 is therefore a small perturbation.

The same code serves evaluation (:func:`accuracy_under_attack`) and adversarial training
(:mod:`tightrope.defenses.adversarial`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tightrope.encoding import collate, encode, length_sorted_batches
from tightrope.errors import TightropeError
from tightrope.progress import Reporter, tracked

Norm = Literal["linf", "l2"]
NORMS = ("linf", "l2")

# Per-example loss the attack maximises: (logits (B, K), labels (B,)) -> (B,).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none")


@dataclass(frozen=True)
class EmbeddingAttack:
    """Parameters of one PGD / FGSM attack on input embeddings (validated on construction).

    ``step_size=None`` uses alpha = 2.5 * epsilon / steps, the rule of Madry et al. (2018) as
    implemented in their ``robustness`` library, so that the iterates can reach the boundary of the
    ball from anywhere inside it.
    """

    epsilon: float
    steps: int = 10
    step_size: float | None = None
    norm: Norm = "linf"
    random_start: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.norm not in NORMS:
            raise TightropeError(f"The attack norm must be one of {', '.join(NORMS)}, not '{self.norm}'.")
        if not isinstance(self.epsilon, (int, float)) or not math.isfinite(self.epsilon) or self.epsilon < 0:
            raise TightropeError(f"epsilon must be a positive number, got {self.epsilon}.")
        if self.epsilon == 0:
            raise TightropeError("epsilon is 0, so the attack would leave every input unchanged; "
                                 "use a positive epsilon (clean accuracy is reported on its own).")
        if self.steps < 1:
            raise TightropeError(f"The attack needs at least one step, got steps={self.steps}.")
        if self.step_size is not None and not self.step_size > 0:
            raise TightropeError(f"step_size must be positive, got {self.step_size}.")

    @classmethod
    def fgsm(cls, epsilon: float, norm: Norm = "linf") -> "EmbeddingAttack":
        """Goodfellow et al. (2015), Eq. (3): one step of size epsilon from the clean point."""
        return cls(epsilon=epsilon, steps=1, step_size=epsilon, norm=norm, random_start=False)

    @classmethod
    def fast(cls, epsilon: float, norm: Norm = "linf", seed: int = 0) -> "EmbeddingAttack":
        """Wong et al. (2020), Alg. 3: uniform random start, one step of alpha = 1.25 * epsilon."""
        return cls(epsilon=epsilon, steps=1, step_size=1.25 * epsilon, norm=norm, random_start=True, seed=seed)

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.epsilon / self.steps

    @property
    def name(self) -> str:
        if self.steps == 1 and not self.random_start:
            return "FGSM"
        return f"PGD-{self.steps}" if self.steps > 1 else "FGSM-RS"

    def with_epsilon(self, epsilon: float) -> "EmbeddingAttack":
        """The same attack at another radius; a step size given explicitly scales with epsilon."""
        step = None if self.step_size is None else self.step_size * epsilon / self.epsilon
        return EmbeddingAttack(epsilon, self.steps, step, self.norm, self.random_start, self.seed)

    def to_dict(self) -> dict:
        return {**asdict(self), "alpha": self.alpha, "name": self.name, "space": "word embeddings",
                "l2_ball": "per example" if self.norm == "l2" else None}


# --- pure maths -----------------------------------------------------------------------------------


def _per_example_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example over all its other dimensions, shaped to broadcast: (B, 1, 1)."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def project(delta: torch.Tensor, epsilon: float, norm: Norm) -> torch.Tensor:
    """Euclidean projection onto the epsilon-ball: clamp (L-inf) or rescale when outside (L2)."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    scale = (epsilon / _per_example_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale


def ascent_direction(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Steepest-ascent direction of unit norm: sign(g) for L-inf, g / ||g||_2 per example for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_example_norm(grad).clamp_min(1e-12)


def random_start(shape: torch.Size, epsilon: float, norm: Norm, mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """A random point of the ball on the unmasked entries: uniform per entry (L-inf, Wong et al.
    2020), or a Gaussian direction scaled to radius epsilon * u, u ~ U(0, 1) (L2)."""
    if norm == "linf":
        delta = (torch.rand(shape, generator=generator) * 2 - 1) * epsilon
        return delta.to(mask.device) * mask
    direction = torch.randn(shape, generator=generator).to(mask.device) * mask
    radius = torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=generator).to(mask.device) * epsilon
    return direction / _per_example_norm(direction).clamp_min(1e-12) * radius


# --- the attack -----------------------------------------------------------------------------------


def word_embeddings(model: nn.Module) -> nn.Module:
    """The token-embedding table of a transformers model, or a one-sentence error."""
    get = getattr(model, "get_input_embeddings", None)
    layer = get() if callable(get) else None
    if not isinstance(layer, nn.Module):
        raise TightropeError(
            f"{type(model).__name__} exposes no input embeddings, so gradient attacks cannot run on it; "
            "attack its PyTorch twin instead."
        )
    return layer


def logits_from_embeddings(model: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return model(inputs_embeds=embeds, attention_mask=attention_mask).logits


@dataclass
class AttackOutcome:
    """Result of one batched attack: the final perturbation and, per example, whether any iterate
    was misclassified (``fooled``) and the first perturbation that did it (``best``)."""

    delta: torch.Tensor  # (B, T, C), inside the ball, zero on padding
    fooled: torch.Tensor  # (B,) bool
    best: torch.Tensor  # (B, T, C): the fooling iterate where fooled, else the final delta


def perturb(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    attack: EmbeddingAttack,
    *,
    generator: torch.Generator | None = None,
    loss_fn: LossFn = _ce,
    embeds: torch.Tensor | None = None,
    track: bool = False,
) -> AttackOutcome:
    """Run PGD / FGSM on a batch and return the perturbation of the word embeddings.

    Only the gradient with respect to delta is computed (``torch.autograd.grad``), so the model's
    parameter gradients are left untouched and the weight-gradient matmuls are skipped. The model's
    mode (train / eval) is the caller's choice: adversarial training attacks with dropout on, as
    FreeLB does; evaluation attacks in eval mode. ``track`` records per-example success at every
    iterate (for evaluation); training does not need it.
    """
    if embeds is None:
        embeds = word_embeddings(model)(input_ids)
    embeds = embeds.detach()  # (B, T, C)
    mask = attention_mask.unsqueeze(-1).to(embeds.dtype)  # (B, T, 1)
    if attack.random_start:
        delta = random_start(embeds.shape, attack.epsilon, attack.norm, mask, generator).to(embeds.dtype)
    else:
        delta = torch.zeros_like(embeds)
    fooled = torch.zeros(len(labels), dtype=torch.bool, device=embeds.device)
    best = delta.clone() if track else delta
    for _ in range(attack.steps):
        delta.requires_grad_(True)
        logits = logits_from_embeddings(model, embeds + delta, attention_mask)
        loss = loss_fn(logits, labels)  # (B,)
        (grad,) = torch.autograd.grad(loss.sum(), delta)
        delta = delta.detach()
        if track:
            newly = (logits.detach().argmax(-1) != labels) & ~fooled
            best[newly] = delta[newly]
            fooled |= newly
        delta = project(delta + attack.alpha * ascent_direction(grad * mask, attack.norm), attack.epsilon,
                        attack.norm) * mask
    if track:
        with torch.no_grad():
            final_wrong = logits_from_embeddings(model, embeds + delta, attention_mask).argmax(-1) != labels
        newly = final_wrong & ~fooled
        best[newly] = delta[newly]
        fooled |= newly
        best = torch.where(fooled.view(-1, 1, 1), best, delta)
    return AttackOutcome(delta=delta, fooled=fooled, best=best)


# --- evaluation: accuracy under attack as a function of epsilon -----------------------------------


@dataclass(frozen=True)
class EpsilonPoint:
    """Attack outcome at one radius, in TextAttack's terms (examples already wrong are skipped)."""

    epsilon: float
    accuracy_under_attack: float
    attack_success_rate: float | None  # succeeded / (succeeded + failed); None when nothing was attacked
    succeeded: int
    failed: int
    skipped: int


@dataclass(frozen=True)
class EmbeddingAttackReport:
    model: str
    examples: int
    original_accuracy: float
    attack: dict  # the attack's parameters at the first epsilon (norm, steps, alpha rule, start, seed)
    points: tuple[EpsilonPoint, ...]
    max_length: int
    seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


def _as_model_and_sequences(target, texts: Sequence[str]):
    """Accept a TextClassifier (from tightrope.inference) or a (model, tokenizer, max_length) triple."""

    if hasattr(target, "encode") and hasattr(target, "model"):
        return target.model, target.encode(list(texts)), target.pad_id, getattr(target, "source", ""), target.max_length
    model, tokenizer, max_length = target
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return model, encode(tokenizer, list(texts), max_length), pad, type(model).__name__, max_length


def accuracy_under_attack(
    target,
    texts: Sequence[str],
    labels: Sequence[int],
    epsilons: Sequence[float],
    attack: EmbeddingAttack | None = None,
    *,
    batch_size: int = 32,
    progress: bool | Reporter = True,
) -> EmbeddingAttackReport:
    """Clean accuracy and accuracy under ``attack`` at each epsilon, on the same examples.

    ``target`` is a :class:`tightrope.inference.TextClassifier` (any variant that is a PyTorch
    module) or a ``(model, tokenizer, max_length)`` triple. Each batch draws its random start from a
    generator seeded with ``(attack.seed, epsilon index, batch index)``, so a fixed seed gives
    identical results. An example counts as robust only if it is classified correctly both clean and
    at every PGD iterate, so accuracy under attack never exceeds clean accuracy.
    """
    import time  # noqa: PLC0415


    if len(texts) == 0:
        raise TightropeError("The dataset is empty, so there is nothing to attack.")
    if len(texts) != len(labels):
        raise TightropeError(f"There are {len(texts)} texts but {len(labels)} labels.")
    if not epsilons:
        raise TightropeError("Give at least one epsilon.")
    attack = attack or EmbeddingAttack(epsilon=float(epsilons[0]))
    attacks = [attack.with_epsilon(float(e)) for e in epsilons]  # validates every epsilon
    model, sequences, pad_id, source, max_length = _as_model_and_sequences(target, texts)
    word_embeddings(model)  # fail early, in one sentence, on a variant without gradients
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if num_labels is not None and max(labels) >= num_labels or min(labels) < 0:
        raise TightropeError(f"A label is outside the model's {num_labels} classes.")
    device = next(model.parameters()).device
    y = torch.tensor(list(labels), dtype=torch.long)
    batches = length_sorted_batches(sequences, batch_size)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    clean_correct = torch.zeros(len(texts), dtype=torch.bool)
    robust = torch.ones((len(attacks), len(texts)), dtype=torch.bool)
    done = torch.zeros(len(texts), dtype=torch.bool)
    try:
        with tracked(progress, f"{attack.name} {attack.norm}", len(batches) * len(attacks)) as bar:
            for b, index in enumerate(batches):
                inputs = {k: v.to(device) for k, v in collate([sequences[i] for i in index], pad_id).items()}
                labels_b = y[index].to(device)
                with torch.no_grad():
                    clean = model(**inputs).logits.argmax(-1) == labels_b
                clean_correct[index] = clean.cpu()
                keep = clean.nonzero().flatten()  # attack only what the model gets right
                for a, atk in enumerate(attacks):
                    if len(keep):
                        g = torch.Generator().manual_seed(atk.seed * 1_000_003 + a * 10_007 + b)
                        out = perturb(model, inputs["input_ids"][keep], inputs["attention_mask"][keep],
                                      labels_b[keep], atk, generator=g, track=True)
                        survived = torch.zeros(len(index), dtype=torch.bool)
                        survived[keep.cpu()] = ~out.fooled.cpu()
                        robust[a, index] = survived
                    else:
                        robust[a, index] = False
                    done[index] = True
                    bar.advance(1, f"accuracy under attack (eps={atk.epsilon:g}) "
                                f"{(robust[a] & clean_correct)[done].float().mean():.3f}")
    finally:
        model.train(was_training)
    n = len(texts)
    points = []
    for atk, row in zip(attacks, robust):
        succeeded = int((clean_correct & ~row).sum())
        failed = int((clean_correct & row).sum())
        points.append(EpsilonPoint(
            epsilon=atk.epsilon, accuracy_under_attack=failed / n,
            attack_success_rate=succeeded / (succeeded + failed) if succeeded + failed else None,
            succeeded=succeeded, failed=failed, skipped=n - succeeded - failed,
        ))
    return EmbeddingAttackReport(
        model=source, examples=n, original_accuracy=float(clean_correct.float().mean()), attack=attacks[0].to_dict(),
        points=tuple(points), max_length=max_length, seconds=time.perf_counter() - started,
    )
