"""Typed attack results and the report computed from them, exactly as TextAttack defines its metrics
(textattack/metrics/attack_metrics): skipped = the victim already misclassified the example;
original accuracy = (total - skipped) / total; accuracy under attack = failed / total;
attack success rate = succeeded / (succeeded + failed); average queries over the attacked (not skipped)
examples (a query is a text submitted to the goal function, cache hits included, as TextAttack counts
it; ``average_model_queries`` counts the distinct texts the model really scored); average perturbed
share over the successful attacks. Raw fractions; only reports round.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Status = Literal["succeeded", "failed", "skipped"]


@dataclass(frozen=True)
class AttackResult:
    index: int  # position of the example in the attacked dataset
    status: Status
    label: int
    original_text: str
    perturbed_text: str
    original_prediction: int
    perturbed_prediction: int
    original_true_prob: float
    perturbed_true_prob: float
    queries: int  # TextAttack's count: texts submitted to the goal function, cache hits included
    words: int
    words_perturbed: int
    modified_indices: list[int]
    budget_exhausted: bool
    recipe: str
    victim: str  # every query, and so every success, was on this model
    constraints: list[dict]  # the exact constraint set this example ran under
    gradient_source: str | None = None  # for gradient-guided steps: "victim" or the differentiable twin
    seconds: float = 0.0
    model_queries: int | None = None  # distinct texts the model scored (None in records before session 5)

    @property
    def perturbed_share(self) -> float:
        return self.words_perturbed / self.words if self.words else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AttackResult":
        return cls(**data)


@dataclass(frozen=True)
class AttackReport:
    recipe: str
    victim: str
    task: str
    examples: int
    succeeded: int
    failed: int
    skipped: int
    original_accuracy: float
    accuracy_under_attack: float
    attack_success_rate: float | None
    average_queries: float | None
    average_model_queries: float | None
    average_perturbed_share: float | None
    average_words: float
    budget_exhausted: int
    seconds: float
    examples_per_minute: float | None
    attack: dict = field(default_factory=dict)  # recipe, citation, constraints, transformation, search
    settings: dict = field(default_factory=dict)  # seed, query budget, data fingerprint, ...

    def to_dict(self) -> dict:
        return asdict(self)


def _mean(values: list) -> float | None:
    """Mean of ``values``, or None when there are none or any is missing (old records)."""
    return sum(values) / len(values) if values and None not in values else None


def summarize(results: list[AttackResult], *, recipe: str, victim: str, task: str, attack: dict | None = None,
              settings: dict | None = None, seconds: float | None = None) -> AttackReport:
    """TextAttack's attack metrics over ``results``."""
    total = len(results)
    succeeded = sum(r.status == "succeeded" for r in results)
    failed = sum(r.status == "failed" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    attacked = [r for r in results if r.status != "skipped"]
    wins = [r for r in results if r.status == "succeeded"]
    seconds = sum(r.seconds for r in results) if seconds is None else seconds
    return AttackReport(
        recipe=recipe,
        victim=victim,
        task=task,
        examples=total,
        succeeded=succeeded,
        failed=failed,
        skipped=skipped,
        original_accuracy=(total - skipped) / total if total else 0.0,
        accuracy_under_attack=failed / total if total else 0.0,
        attack_success_rate=succeeded / (succeeded + failed) if succeeded + failed else None,
        average_queries=sum(r.queries for r in attacked) / len(attacked) if attacked else None,
        average_model_queries=_mean([r.model_queries for r in attacked]),
        average_perturbed_share=sum(r.perturbed_share for r in wins) / len(wins) if wins else None,
        average_words=sum(r.words for r in results) / total if total else 0.0,
        budget_exhausted=sum(r.budget_exhausted for r in results),
        seconds=seconds,
        examples_per_minute=60.0 * total / seconds if seconds else None,
        attack=attack or {},
        settings=settings or {},
    )


def capped_status(result: AttackResult, *, max_share: float | None = None, max_words: int | None = None) -> Status:
    """What ``result``'s attack would have ended with under ``MaxWordsPerturbed(max_share, max_words)``.

    Exact for the greedy word-importance searches (TextFooler, PWWS, DeepWordBug: ``GreedyWordSwapWIR``).
    They rank the words once, then accept at most one new word per step and never revisit one, so the
    capped run takes the same path until the cap and then finds no allowed candidate: it succeeds iff
    the uncapped run succeeded with ``words_perturbed <= limit``. Not exact for beam or population
    searches, which may find another path within the cap.
    """
    if max_share is None and max_words is None:
        raise ValueError("capped_status needs max_share or max_words")
    if result.status != "succeeded":
        return result.status
    limit = min(x for x in (max_words, None if max_share is None else max_share * result.words, float("inf"))
                if x is not None)
    return "succeeded" if result.words_perturbed <= limit else "failed"


def capped_success_rate(results: list[AttackResult], *, max_share: float | None = None,
                        max_words: int | None = None) -> tuple[int, int]:
    """(succeeded, attacked) had the attack been capped (:func:`capped_status`); skipped examples excluded."""
    statuses = [capped_status(r, max_share=max_share, max_words=max_words) for r in results if r.status != "skipped"]
    return sum(s == "succeeded" for s in statuses), len(statuses)


@dataclass(frozen=True)
class TransferResult:
    """Adversarial texts crafted on ``source`` evaluated on ``target``, on the same examples.

    transfer_success_rate: of the examples whose attack succeeded on the source and that the target
    classifies correctly in their original form, the share the target misclassifies once perturbed.
    """

    source: str
    target: str
    examples: int
    original_accuracy: float
    accuracy_under_transfer: float
    transfer_success_rate: float | None
    transferable: int
    fooled: int = 0  # of the transferable examples, those the target misclassifies once perturbed

    def to_dict(self) -> dict:
        return asdict(self)
